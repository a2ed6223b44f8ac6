//! Compiler diagnostics with their places, from cargo's JSON messages
//! (`--message-format=json`): what a failed build tells its author, per message.

use serde::{Deserialize, Serialize};

/// Most diagnostics kept of one build (rustc stops early anyway; a flood helps nobody).
const MAX_KEPT: usize = 50;

/// One compiler message about the plugin's own code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    /// `error`, `warning`, …
    pub level: String,
    pub message: String,
    /// rustc's code (`E0308`), when it has one.
    pub code: Option<String>,
    /// The primary span: file (relative to the crate), line and column (1-based).
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    /// rustc's own rendering, as a terminal shows it.
    pub rendered: String,
}

impl Diagnostic {
    /// `error[E0308] src/lib.rs:4:9: mismatched types`.
    pub fn summary(&self) -> String {
        let code = self.code.as_deref().map(|c| format!("[{c}]")).unwrap_or_default();
        let place = match (&self.file, self.line, self.column) {
            (Some(f), Some(l), Some(c)) => format!(" {f}:{l}:{c}"),
            (Some(f), _, _) => format!(" {f}"),
            _ => String::new(),
        };
        format!("{}{code}{place}: {}", self.level, self.message)
    }
}

/// The errors and warnings among cargo's JSON message lines (no summaries such as "aborting
/// due to 2 previous errors", which have no place), errors first, at most [`MAX_KEPT`].
pub fn from_cargo(lines: &[String]) -> Vec<Diagnostic> {
    let mut all: Vec<Diagnostic> = lines.iter().filter_map(|line| parse(line)).collect();
    all.sort_by_key(|d| d.level != "error"); // stable: each level keeps its order
    all.truncate(MAX_KEPT);
    all
}

fn parse(line: &str) -> Option<Diagnostic> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg["reason"] != "compiler-message" {
        return None;
    }
    let m = &msg["message"];
    let level = m["level"].as_str()?;
    if !matches!(level, "error" | "warning") {
        return None;
    }
    let spans = m["spans"].as_array()?;
    let primary = spans.iter().find(|s| s["is_primary"] == true);
    if primary.is_none() && spans.is_empty() && m["code"].is_null() {
        return None; // "aborting due to …", "N warnings emitted"
    }
    let number = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    Some(Diagnostic {
        level: level.to_string(),
        message: m["message"].as_str().unwrap_or_default().to_string(),
        code: m["code"]["code"].as_str().map(str::to_string),
        file: primary.and_then(|s| s["file_name"].as_str()).map(str::to_string),
        line: primary.and_then(|s| number(&s["line_start"])),
        column: primary.and_then(|s| number(&s["column_start"])),
        rendered: m["rendered"].as_str().unwrap_or_default().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_keep_their_places_and_summaries_are_dropped() {
        let error = json!({
            "reason": "compiler-message",
            "message": {
                "level": "error", "message": "mismatched types", "code": { "code": "E0308" },
                "rendered": "error[E0308]: mismatched types\n --> src/lib.rs:4:9\n",
                "spans": [
                    { "is_primary": false, "file_name": "src/other.rs", "line_start": 1, "column_start": 1 },
                    { "is_primary": true, "file_name": "src/lib.rs", "line_start": 4, "column_start": 9 }
                ]
            }
        });
        let aborting = json!({
            "reason": "compiler-message",
            "message": { "level": "error", "message": "aborting due to 1 previous error", "code": null, "spans": [], "rendered": "" }
        });
        let artifact = json!({ "reason": "compiler-artifact" });
        let lines: Vec<String> = [error, aborting, artifact].iter().map(|v| v.to_string()).collect();
        let found = from_cargo(&lines);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].file.as_deref(), found[0].line, found[0].column), (Some("src/lib.rs"), Some(4), Some(9)));
        assert_eq!(found[0].summary(), "error[E0308] src/lib.rs:4:9: mismatched types");
    }
}
