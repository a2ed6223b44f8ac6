//! JSON Schemas derived from Rust types (with schemars), in the OpenAPI 3.0 dialect kiln's
//! document speaks.

use schemars::JsonSchema;
use schemars::generate::{Contract, SchemaSettings};
use serde_json::{Map, Value};

/// Where a derived schema's named parts live until the plugin's description is built. A
/// recursive type cannot be inlined: its schema refers to itself by `$ref`, and the referenced
/// definitions go into the OpenAPI document's `components.schemas`.
pub(crate) const DEFINITIONS: &str = "#/components/schemas/";

/// The schema of `T`, as read from a request (`Contract::Deserialize`) or written to a response
/// (`Contract::Serialize`), with every subschema inlined except recursive ones, whose
/// definitions are added to `defs`.
pub(crate) fn schema_for<T: JsonSchema + ?Sized>(contract: Contract, defs: &mut Map<String, Value>) -> Value {
    let settings = SchemaSettings::openapi3().with(|s| {
        s.inline_subschemas = true;
        s.contract = contract;
    });
    let mut generator = settings.into_generator();
    let mut schema = generator.subschema_for::<T>();
    for transform in generator.transforms_mut() {
        transform.transform(&mut schema);
    }
    defs.extend(generator.take_definitions(true));
    let mut value = schema.to_value();
    if let Some(object) = value.as_object_mut() {
        object.remove("$schema");
    }
    value
}

/// Renames every `$ref` in `value` to one of the derived definitions `defs` with `prefix` (a
/// plugin's name), so that two plugins' types of one name stay apart in the document; a name
/// is reduced to the characters OpenAPI allows in a component's name. Other `$ref`s (written
/// by hand) are left as they are.
pub(crate) fn prefix_refs(value: &mut Value, prefix: &str, defs: &Map<String, Value>) {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(r)) = object.get_mut("$ref")
                && let Some(name) = r.strip_prefix(DEFINITIONS)
            {
                // A JSON pointer, percent-encoded (schemars writes `Tree%20Node`).
                let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
                let name = name.replace("~1", "/").replace("~0", "~");
                if defs.contains_key(&name) {
                    *r = format!("{DEFINITIONS}{}", component_name(prefix, &name));
                }
            }
            object.values_mut().for_each(|v| prefix_refs(v, prefix, defs));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| prefix_refs(v, prefix, defs)),
        _ => {}
    }
}

/// `prefix.name`, with anything OpenAPI does not allow in a component name (`[A-Za-z0-9._-]`)
/// replaced by `_`.
pub(crate) fn component_name(prefix: &str, name: &str) -> String {
    format!("{prefix}.{name}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect()
}

/// The schema of property `name` of an object schema.
pub(crate) fn property<'a>(schema: &'a Value, name: &str) -> Option<&'a Value> {
    schema.get("properties")?.get(name)
}

/// Whether an object schema requires property `name`.
pub(crate) fn requires(schema: &Value, name: &str) -> bool {
    schema.get("required").and_then(Value::as_array).is_some_and(|r| r.iter().any(|n| n == name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(JsonSchema)]
    #[allow(dead_code)]
    struct Note {
        id: i64,
        text: String,
        tags: Option<Vec<String>>,
    }

    #[derive(JsonSchema)]
    #[allow(dead_code)]
    struct Tree {
        children: Vec<Tree>,
    }

    #[test]
    fn numbers_are_numbers_and_required_fields_required() {
        let mut defs = Map::new();
        let s = schema_for::<Note>(Contract::Deserialize, &mut defs);
        assert_eq!(s["properties"]["id"]["type"], "integer");
        assert_eq!(s["properties"]["tags"]["nullable"], true, "{s}");
        assert_eq!(s["required"], json!(["id", "text"]));
        assert!(s.get("$schema").is_none());
        assert!(defs.is_empty());
    }

    #[test]
    fn a_recursive_type_refers_to_a_prefixed_definition() {
        let mut defs = Map::new();
        let mut s = schema_for::<Tree>(Contract::Deserialize, &mut defs);
        s["properties"]["other"] = json!({ "$ref": "#/components/schemas/ApiError" });
        prefix_refs(&mut s, "my-plugin", &defs);
        assert_eq!(s["properties"]["children"]["items"]["$ref"], "#/components/schemas/my-plugin.Tree");
        assert_eq!(s["properties"]["other"]["$ref"], "#/components/schemas/ApiError", "hand-written refs stay");
        assert!(defs.contains_key("Tree"), "{defs:?}");
    }

    #[test]
    fn component_names_keep_to_what_openapi_allows() {
        assert_eq!(component_name("p", "Wrapper<Note>"), "p.Wrapper_Note_");
    }
}
