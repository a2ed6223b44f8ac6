//! A catalog's `catalog.json`: what it lists, checked entry by entry. A bad entry is refused
//! with its reason and the others are kept, so one typo does not hide a whole catalog.
//!
//! ```json
//! { "plugins": [ { "name": "greeter", "version": "1.2.0", "description": "Says hello",
//!                  "url": "greeter-1.2.0.tar.gz", "sha256": "<64 hex>",
//!                  "signature": "<base64 ed25519 over the sha256 text>" } ] }
//! ```

use super::fetch::Location;
use crate::repo::CatalogEntry;
use serde::Deserialize;

/// What one sync read from a catalog: the entries it keeps, and those it refused.
#[derive(Debug, Default)]
pub struct Index {
    pub entries: Vec<CatalogEntry>,
    /// `{"entry": <index or name@version>, "error": …}` for each refused entry.
    pub refused: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    plugins: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawEntry {
    name: String,
    version: String,
    #[serde(default)]
    description: String,
    url: String,
    sha256: String,
    #[serde(default)]
    signature: Option<String>,
}

/// Reads `text`, the `catalog.json` found at `at`. Relative archive URLs are resolved against
/// `at`. An error means the document as a whole is unreadable.
pub fn parse(text: &[u8], at: &Location) -> Result<Index, String> {
    let doc: Document = serde_json::from_slice(text).map_err(|e| format!("catalog.json is not a catalog: {e}"))?;
    let mut index = Index::default();
    let mut seen = std::collections::HashSet::new();
    for (i, value) in doc.plugins.into_iter().enumerate() {
        // PostgreSQL keeps no NUL in text: the label of an entry is made without them.
        let label = match (value.get("name").and_then(|v| v.as_str()), value.get("version").and_then(|v| v.as_str())) {
            (Some(n), Some(v)) => format!("{n}@{v}").replace('\0', "\\0"),
            _ => format!("#{i}"),
        };
        let checked = serde_json::from_value::<RawEntry>(value)
            .map_err(|e| e.to_string())
            .and_then(|raw| entry(raw, at))
            .and_then(|e| {
                if seen.insert((e.name.clone(), e.version.clone())) { Ok(e) } else { Err("listed twice".to_string()) }
            });
        match checked {
            Ok(e) => index.entries.push(e),
            Err(error) => {
                let error = error.replace('\0', "\\0");
                index.refused.push(serde_json::json!({ "entry": label, "error": error }))
            }
        }
    }
    Ok(index)
}

fn entry(raw: RawEntry, at: &Location) -> Result<CatalogEntry, String> {
    crate::manifest::validate_name(&raw.name)?;
    let texts = [&raw.description, &raw.url, &raw.sha256, &raw.version];
    if texts.into_iter().chain(raw.signature.as_ref()).any(|t| t.contains('\0')) {
        return Err("a NUL character in a field".into());
    }
    let version = semver::Version::parse(&raw.version).map_err(|e| format!("version {:?}: {e}", raw.version))?;
    let sha256 = raw.sha256.to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("sha256 {:?} is not 64 hexadecimal digits", raw.sha256));
    }
    if let Some(sig) = &raw.signature {
        super::trust::decode_signature(sig)?;
    }
    let archive = at.resolve(&raw.url)?;
    Ok(CatalogEntry {
        name: raw.name,
        version: version.to_string(),
        description: raw.description,
        archive_url: archive.to_string(),
        sha256,
        signature: raw.signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ab00000000000000000000000000000000000000000000000000000000000000";

    fn at() -> Location {
        Location::parse("http://example.test/cat/catalog.json").unwrap()
    }

    #[test]
    fn good_entries_are_kept_and_bad_ones_refused_with_why() {
        let doc = serde_json::json!({ "plugins": [
            { "name": "greeter", "version": "1.0.0", "url": "g-1.tar.gz", "sha256": SHA.to_uppercase() },
            { "name": "bad name", "version": "1.0.0", "url": "x", "sha256": SHA },
            { "name": "v", "version": "one", "url": "x", "sha256": SHA },
            { "name": "s", "version": "1.0.0", "url": "x", "sha256": "abc" },
            { "name": "greeter", "version": "1.0.0", "url": "again", "sha256": SHA },
            { "name": "f", "version": "1.0.0", "url": "file:///etc/passwd", "sha256": SHA },
            { "name": "sig", "version": "1.0.0", "url": "x", "sha256": SHA, "signature": "not base64!" },
            { "name": "nul", "version": "1.0.0", "url": "x", "sha256": SHA, "description": "a\u{0}b" },
            { "version": "1.0.0" },
        ]});
        let index = parse(doc.to_string().as_bytes(), &at()).unwrap();
        assert_eq!(index.entries.len(), 1);
        let e = &index.entries[0];
        assert_eq!(e.archive_url, "http://example.test/cat/g-1.tar.gz");
        assert_eq!(e.sha256, SHA, "lowercased");
        let refused: Vec<&str> = index.refused.iter().map(|r| r["entry"].as_str().unwrap()).collect();
        assert_eq!(
            refused,
            ["bad name@1.0.0", "v@one", "s@1.0.0", "greeter@1.0.0", "f@1.0.0", "sig@1.0.0", "nul@1.0.0", "#8"]
        );
        assert!(index.refused[3]["error"].as_str().unwrap().contains("listed twice"));
        assert!(index.refused[4]["error"].as_str().unwrap().contains("http"), "{:?}", index.refused[4]);
    }

    #[test]
    fn an_unreadable_document_is_an_error() {
        assert!(parse(b"[]", &at()).is_err());
        assert!(parse(b"{\"plugins\": [], \"extra\": 1}", &at()).is_err());
        assert!(parse(b"not json", &at()).is_err());
    }
}
