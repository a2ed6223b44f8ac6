//! Event topics and the patterns subscribers match them with.
//!
//! A topic is dot-separated segments of ASCII letters, digits, `_` and `-` (`notes.created`,
//! `kiln.plugin.loaded`), at most [`MAX_TOPIC`] bytes. A pattern is a topic whose segments may
//! also be `*`, which matches exactly one segment: `notes.*` matches `notes.created`, not
//! `notes` nor `notes.a.b`.

/// Longest topic or pattern, in bytes.
pub const MAX_TOPIC: usize = 200;

/// Topics under this prefix are kiln's own: only kiln publishes them.
pub const KILN_PREFIX: &str = "kiln.";

/// Checks `topic` (or, with `wildcards`, a pattern); the error says what is wrong.
pub fn check(topic: &str, wildcards: bool) -> Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC {
        return Err(format!("a topic has 1 to {MAX_TOPIC} bytes; {:?} has {}", short(topic), topic.len()));
    }
    for segment in topic.split('.') {
        let ok = (wildcards && segment == "*")
            || (!segment.is_empty() && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        if !ok {
            let what = if wildcards { "a pattern" } else { "a topic" };
            return Err(format!(
                "{what} is dot-separated segments of letters, digits, '_' and '-'{}: {:?} is not",
                if wildcards { " (or '*')" } else { "" },
                short(topic)
            ));
        }
    }
    Ok(())
}

fn short(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A checked pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern(String);

impl Pattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        check(pattern, true)?;
        Ok(Self(pattern.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` (a checked topic) matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut pattern = self.0.split('.');
        let mut topic = topic.split('.');
        loop {
            match (pattern.next(), topic.next()) {
                (None, None) => return true,
                (Some(p), Some(t)) if p == "*" || p == t => {}
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_matches_one_segment() {
        let p = Pattern::parse("notes.*").unwrap();
        assert!(p.matches("notes.created"));
        assert!(!p.matches("notes"));
        assert!(!p.matches("notes.a.b"));
        assert!(!p.matches("orders.created"));
        assert!(Pattern::parse("*.created").unwrap().matches("orders.created"));
        assert!(Pattern::parse("kiln.plugin.loaded").unwrap().matches("kiln.plugin.loaded"));
        assert!(!Pattern::parse("kiln.plugin.loaded").unwrap().matches("kiln.plugin.loaded2"));
    }

    #[test]
    fn topics_and_patterns_are_checked() {
        assert!(check("orders.created", false).is_ok());
        assert!(check("a-b_c.9", false).is_ok());
        for bad in ["", ".", "a..b", "a.", "a b", "a.*", "é", &"a".repeat(MAX_TOPIC + 1)] {
            assert!(check(bad, false).is_err(), "{bad:?}");
        }
        assert!(check("a.*", true).is_ok());
        assert!(check("a.b*", true).is_err());
    }
}
