//! Plugin configuration: validation against the JSON Schema a plugin's manifest declares,
//! defaults, and masking of sensitive values.
//!
//! The schema is ordinary JSON Schema, written as TOML in the manifest:
//!
//! ```toml
//! [package.metadata.kiln.configSchema]
//! type = "object"
//! required = ["greeting"]
//! properties.greeting = { type = "string", default = "hello" }
//! properties.api_key = { type = "string", sensitive = true }
//! ```
//!
//! `default` values fill in missing properties (at every level of nested objects) before the
//! plugin sees its config; properties marked `sensitive = true` are masked in every answer.

use serde_json::{Map, Value};

/// What replaces a sensitive value in answers.
pub const MASK: &str = "********";

/// One reason a config does not match its schema.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// JSON Pointer of the offending value (`""` for the whole config).
    pub path: String,
    pub message: String,
}

/// Checks that `schema` is a usable JSON Schema.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    jsonschema::validator_for(schema).map(drop).map_err(|e| format!("invalid configSchema: {e}"))
}

/// Validates `config` against `schema` (after filling in defaults); returns every violation.
pub fn validate(schema: &Value, config: &Value) -> Result<Value, Vec<Violation>> {
    let validator = jsonschema::validator_for(schema)
        .map_err(|e| vec![Violation { path: String::new(), message: format!("invalid configSchema: {e}") }])?;
    let effective = with_defaults(schema, config);
    // Messages quote the offending values: a sensitive one must not reach an answer or a log.
    let mut secrets = Vec::new();
    sensitive_values(Some(schema), &effective, &mut secrets);
    let violations: Vec<Violation> = validator
        .iter_errors(&effective)
        .map(|e| {
            let mut message = e.to_string();
            for s in &secrets {
                message = message.replace(s.as_str(), MASK);
            }
            Violation { path: e.instance_path().as_str().to_string(), message }
        })
        .collect();
    if violations.is_empty() { Ok(effective) } else { Err(violations) }
}

/// `config` with the schema's `default`s filled in where a property is missing.
pub fn with_defaults(schema: &Value, config: &Value) -> Value {
    let (Some(props), Value::Object(obj)) = (schema.get("properties").and_then(Value::as_object), config) else {
        return config.clone();
    };
    let mut out: Map<String, Value> = obj.clone();
    for (key, prop) in props {
        match out.get(key) {
            Some(v) => {
                let filled = with_defaults(prop, v);
                out.insert(key.clone(), filled);
            }
            None => {
                if let Some(d) = prop.get("default") {
                    out.insert(key.clone(), with_defaults(prop, d));
                } else if prop.get("type").and_then(Value::as_str) == Some("object") && prop.get("properties").is_some()
                {
                    // A nested object whose own properties have defaults.
                    let nested = with_defaults(prop, &Value::Object(Map::new()));
                    if nested.as_object().is_some_and(|m| !m.is_empty()) {
                        out.insert(key.clone(), nested);
                    }
                }
            }
        }
    }
    Value::Object(out)
}

/// The text of every sensitive value in `config` (as it appears in messages), longest first.
fn sensitive_values(schema: Option<&Value>, config: &Value, out: &mut Vec<String>) {
    let (Some(props), Value::Object(obj)) =
        (schema.and_then(|s| s.get("properties")).and_then(Value::as_object), config)
    else {
        return;
    };
    for (key, value) in obj {
        let Some(prop) = props.get(key) else { continue };
        if prop.get("sensitive").and_then(Value::as_bool) == Some(true) {
            out.push(value.to_string());
            if let Some(s) = value.as_str() {
                out.push(s.to_string());
            }
        } else {
            sensitive_values(Some(prop), value, out);
        }
    }
    out.retain(|s| !s.is_empty());
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `config` with every value of a `sensitive` property replaced by [`MASK`].
pub fn mask(schema: Option<&Value>, config: &Value) -> Value {
    let (Some(props), Value::Object(obj)) =
        (schema.and_then(|s| s.get("properties")).and_then(Value::as_object), config)
    else {
        return config.clone();
    };
    let mut out = obj.clone();
    for (key, value) in out.iter_mut() {
        let Some(prop) = props.get(key) else { continue };
        if prop.get("sensitive").and_then(Value::as_bool) == Some(true) {
            *value = Value::String(MASK.into());
        } else {
            *value = mask(Some(prop), value);
        }
    }
    Value::Object(out)
}

/// `incoming` with every sensitive value that is exactly [`MASK`] replaced by the value stored
/// in `stored`: a client that sends back what `GET …/config` showed keeps the secret it cannot
/// see. A mask with nothing stored behind it stays as sent.
pub fn unmask(schema: Option<&Value>, incoming: &Value, stored: &Value) -> Value {
    let (Some(props), Value::Object(obj)) =
        (schema.and_then(|s| s.get("properties")).and_then(Value::as_object), incoming)
    else {
        return incoming.clone();
    };
    let mut out = obj.clone();
    for (key, value) in out.iter_mut() {
        let (Some(prop), Some(old)) = (props.get(key), stored.get(key)) else { continue };
        if prop.get("sensitive").and_then(Value::as_bool) == Some(true) {
            if value.as_str() == Some(MASK) {
                *value = old.clone();
            }
        } else {
            *value = unmask(Some(prop), value, old);
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["greeting"],
            "additionalProperties": false,
            "properties": {
                "greeting": { "type": "string", "default": "hello" },
                "times": { "type": "integer", "minimum": 1 },
                "api_key": { "type": "string", "sensitive": true },
                "db": { "type": "object", "properties": {
                    "password": { "type": "string", "sensitive": true },
                    "pool": { "type": "integer", "default": 4 }
                } }
            }
        })
    }

    #[test]
    fn defaults_fill_in_missing_values_at_every_level() {
        let v = validate(&schema(), &json!({})).unwrap();
        assert_eq!(v, json!({ "greeting": "hello", "db": { "pool": 4 } }));
        let v = validate(&schema(), &json!({ "greeting": "hi", "db": {} })).unwrap();
        assert_eq!(v, json!({ "greeting": "hi", "db": { "pool": 4 } }));
    }

    #[test]
    fn every_violation_is_reported_with_its_path() {
        let errs = validate(&schema(), &json!({ "times": 0, "nope": 1, "db": { "pool": "x" } })).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|v| v.path.as_str()).collect();
        assert!(paths.contains(&"/times"), "{errs:?}");
        assert!(paths.contains(&"/db/pool"), "{errs:?}");
        assert!(paths.contains(&""), "additionalProperties is reported at the root: {errs:?}");
        assert!(errs.len() >= 3);
    }

    #[test]
    fn sensitive_values_are_masked_at_every_level() {
        let masked = mask(
            Some(&schema()),
            &json!({ "greeting": "hi", "api_key": "s3cret", "db": { "password": "pw", "pool": 2 } }),
        );
        assert_eq!(masked, json!({ "greeting": "hi", "api_key": MASK, "db": { "password": MASK, "pool": 2 } }));
        assert!(!masked.to_string().contains("s3cret"));
    }

    #[test]
    fn violation_messages_never_show_a_sensitive_value() {
        let errs = validate(&schema(), &json!({ "api_key": 12345678, "db": { "password": ["hunter2"] } })).unwrap_err();
        let all = format!("{errs:?}");
        assert!(!all.contains("12345678") && !all.contains("hunter2"), "{all}");
        assert!(errs.iter().any(|v| v.path == "/api_key"), "{errs:?}");
    }

    #[test]
    fn a_mask_sent_back_keeps_the_stored_secret() {
        let stored = json!({ "greeting": "hi", "api_key": "s3cret", "db": { "password": "pw" } });
        let shown = mask(Some(&schema()), &stored);
        let edited = json!({ "greeting": "yo", "api_key": shown["api_key"], "db": shown["db"] });
        assert_eq!(
            unmask(Some(&schema()), &edited, &stored),
            json!({ "greeting": "yo", "api_key": "s3cret", "db": { "password": "pw" } })
        );
        let changed = json!({ "api_key": "new", "greeting": MASK });
        assert_eq!(unmask(Some(&schema()), &changed, &stored), changed, "only sensitive masks are replaced");
        assert_eq!(unmask(Some(&schema()), &json!({ "api_key": MASK }), &json!({})), json!({ "api_key": MASK }));
    }

    #[test]
    fn a_broken_schema_is_refused() {
        assert!(check_schema(&json!({ "type": "no-such-type" })).is_err());
        assert!(check_schema(&schema()).is_ok());
    }
}
