//! Typed inputs of a handler: the JSON body ([`Json`]), the path parameters ([`Path`]) and the
//! query ([`Query`]). An input that does not fit is answered 400 before the handler runs, in
//! kiln's error shape, naming where (`details.in`: `body`, `path` or `query`) and which field
//! (`details.field`, e.g. `items[0].name`).

use crate::route::RouteDocs;
use crate::sdk::{Request, Response};
use schemars::JsonSchema;
use serde::de::value::{Error as TextError, MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde_json::{Value, json};
use std::borrow::Cow;

/// A typed input of a handler.
pub trait FromRequest: Sized {
    /// The input from the request, or the answer for a request it does not fit.
    fn from_request(req: &Request<'_>) -> Result<Self, Response>;

    /// Documents what the input says about the route.
    fn document(docs: &mut RouteDocs) {
        let _ = docs;
    }
}

/// The 400 answer for an input that does not fit: `{"error": "BadRequest", "message": …,
/// "details": {"in": …, "field": …}}`.
fn bad_request(place: &str, field: &str, message: impl std::fmt::Display) -> Response {
    let message = if field.is_empty() || field == "." {
        format!("{place}: {message}")
    } else {
        format!("{place} field {field}: {message}")
    };
    let field = if field == "." { "" } else { field };
    let body = json!({ "error": "BadRequest", "message": message, "details": { "in": place, "field": field } });
    Response::json(400, &body)
}

/// A JSON body (as an input) or a JSON answer with status 200 (as a result). Its schema
/// documents the request body or the 200 answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + JsonSchema> FromRequest for Json<T> {
    fn from_request(req: &Request<'_>) -> Result<Self, Response> {
        let mut de = serde_json::Deserializer::from_slice(req.body());
        let value = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| bad_request("body", &e.path().to_string(), e.inner()))?;
        de.end().map_err(|e| bad_request("body", "", e))?;
        Ok(Json(value))
    }

    fn document(docs: &mut RouteDocs) {
        let schema = docs.request_schema_of::<T>();
        docs.set_request_schema(schema);
    }
}

/// The route's path parameters: one value (`Path<i64>` for `/notes/{id}`), a tuple of them in
/// order, or a struct with a field per parameter. The values come percent-decoded (as
/// [`Request::param`] gives them); text is parsed into the number, boolean or string the type
/// asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + JsonSchema> FromRequest for Path<T> {
    fn from_request(req: &Request<'_>) -> Result<Self, Response> {
        // kiln hands over the values percent-decoded already.
        let params = req.params();
        let texts = Texts(params.clone());
        serde_path_to_error::deserialize(texts).map(Path).map_err(|e| {
            // A single value has no field of its own: name the parameter.
            let field = match (e.path().to_string().as_str(), params.as_slice()) {
                (".", [(name, _)]) => name.to_string(),
                (path, _) => path.to_string(),
            };
            bad_request("path", &field, e.inner())
        })
    }

    fn document(docs: &mut RouteDocs) {
        let schema = docs.request_schema_of::<T>();
        let names = docs.path_params().to_vec();
        match (schema.get("properties"), names.as_slice()) {
            (Some(_), _) => {
                for name in &names {
                    if let Some(s) = crate::schema::property(&schema, name) {
                        docs.param(name, s.clone());
                    }
                }
            }
            (None, [name]) => docs.param(name, schema),
            (None, _) => {
                if let Some(items) = schema.get("items").and_then(Value::as_array) {
                    for (name, s) in names.iter().zip(items) {
                        docs.param(name, s.clone());
                    }
                }
            }
        }
    }
}

/// The query string as a struct with a field per parameter (an `Option` field is optional).
/// Names and values are form-decoded; text is parsed into the number, boolean or string the
/// field asks for; of a repeated name, the last value counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned + JsonSchema> FromRequest for Query<T> {
    fn from_request(req: &Request<'_>) -> Result<Self, Response> {
        let pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = form_urlencoded::parse(req.query_string().as_bytes()).collect();
        // Of a repeated name the last value counts (a map: linear in the parameters).
        let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::with_capacity(pairs.len());
        let mut texts: Vec<(&str, &str)> = Vec::with_capacity(pairs.len());
        for (name, value) in &pairs {
            match at.get(name.as_ref()) {
                Some(&i) => texts[i].1 = value,
                None => {
                    at.insert(name, texts.len());
                    texts.push((name, value));
                }
            }
        }
        serde_path_to_error::deserialize(Fields(texts))
            .map(Query)
            .map_err(|e| bad_request("query", &e.path().to_string(), e.inner()))
    }

    fn document(docs: &mut RouteDocs) {
        let schema = docs.request_schema_of::<T>();
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (name, s) in properties {
                docs.query_param(name, crate::schema::requires(&schema, name), s.clone());
            }
        }
    }
}

/// One parameter's text, parsed into what the visitor asks for.
struct Text<'a>(&'a str);

macro_rules! parse_text {
    ($($method:ident => $ty:ty, $visit:ident, $what:literal;)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TextError> {
            match self.0.parse::<$ty>() {
                Ok(v) => visitor.$visit(v),
                Err(_) => Err(de::Error::invalid_value(de::Unexpected::Str(self.0), &$what)),
            }
        })*
    };
}

impl<'de> de::Deserializer<'de> for Text<'_> {
    type Error = TextError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TextError> {
        visitor.visit_str(self.0)
    }

    parse_text! {
        deserialize_bool => bool, visit_bool, "true or false";
        deserialize_i8 => i8, visit_i8, "an integer";
        deserialize_i16 => i16, visit_i16, "an integer";
        deserialize_i32 => i32, visit_i32, "an integer";
        deserialize_i64 => i64, visit_i64, "an integer";
        deserialize_u8 => u8, visit_u8, "a non-negative integer";
        deserialize_u16 => u16, visit_u16, "a non-negative integer";
        deserialize_u32 => u32, visit_u32, "a non-negative integer";
        deserialize_u64 => u64, visit_u64, "a non-negative integer";
        deserialize_i128 => i128, visit_i128, "an integer";
        deserialize_u128 => u128, visit_u128, "a non-negative integer";
        deserialize_f32 => f32, visit_f32, "a number";
        deserialize_f64 => f64, visit_f64, "a number";
    }

    /// An empty value (`?limit=`) is no value.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TextError> {
        if self.0.is_empty() { visitor.visit_none() } else { visitor.visit_some(self) }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, TextError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TextError> {
        visitor.visit_enum(self.0.into_deserializer())
    }

    serde::forward_to_deserialize_any! {
        char str string bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}

impl<'de, 'a> IntoDeserializer<'de, TextError> for Text<'a> {
    type Deserializer = Text<'a>;

    fn into_deserializer(self) -> Text<'a> {
        self
    }
}

/// Named texts (query parameters) as a map or struct.
struct Fields<'a>(Vec<(&'a str, &'a str)>);

impl<'de> de::Deserializer<'de> for Fields<'_> {
    type Error = TextError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TextError> {
        let mut map = MapDeserializer::new(self.0.into_iter().map(|(n, v)| (n, Text(v))));
        let value = visitor.visit_map(&mut map)?;
        map.end()?;
        Ok(value)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// Path parameters in order: one value, a sequence of them, or a map or struct by name.
struct Texts<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Texts<'a> {
    /// The one parameter, for a single value.
    fn one(self) -> Result<Text<'a>, TextError> {
        match self.0.as_slice() {
            [(_, value)] => Ok(Text(value)),
            _ => Err(de::Error::custom(format!("one path parameter expected, the route has {}", self.0.len()))),
        }
    }
}

macro_rules! one_text {
    ($($method:ident)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TextError> {
            self.one()?.$method(visitor)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Texts<'_> {
    type Error = TextError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TextError> {
        self.one()?.deserialize_any(visitor)
    }

    one_text! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128 deserialize_f32
        deserialize_f64 deserialize_option deserialize_str deserialize_string
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TextError> {
        self.one()?.deserialize_newtype_struct(name, visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TextError> {
        self.one()?.deserialize_enum(name, variants, visitor)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TextError> {
        let mut seq = SeqDeserializer::new(self.0.into_iter().map(|(_, v)| Text(v)));
        let value = visitor.visit_seq(&mut seq)?;
        seq.end()?;
        Ok(value)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, TextError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, TextError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TextError> {
        Fields(self.0).deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TextError> {
        Fields(self.0).deserialize_any(visitor)
    }

    serde::forward_to_deserialize_any! {
        char bytes byte_buf unit unit_struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Key {
        id: i64,
        name: String,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Page {
        limit: Option<u32>,
        desc: bool,
    }

    #[test]
    fn path_texts_become_one_value_a_tuple_or_a_struct() {
        let one = || Texts(vec![("id", "42")]);
        assert_eq!(i64::deserialize(one()).unwrap(), 42);
        assert_eq!(String::deserialize(one()).unwrap(), "42");
        let two = || Texts(vec![("id", "7"), ("name", "x")]);
        assert_eq!(<(i64, String)>::deserialize(two()).unwrap(), (7, "x".to_string()));
        assert_eq!(Key::deserialize(two()).unwrap(), Key { id: 7, name: "x".into() });
        assert!(i64::deserialize(two()).is_err(), "two parameters are not one value");
        let bad = i64::deserialize(Texts(vec![("id", "abc")])).unwrap_err().to_string();
        assert!(bad.contains("an integer"), "{bad}");
    }

    #[test]
    fn query_fields_are_parsed_and_optional_ones_may_be_missing() {
        assert_eq!(Page::deserialize(Fields(vec![("desc", "true")])).unwrap(), Page { limit: None, desc: true });
        let page = Page::deserialize(Fields(vec![("limit", "5"), ("desc", "false")])).unwrap();
        assert_eq!(page, Page { limit: Some(5), desc: false });
        assert!(Page::deserialize(Fields(vec![("limit", "5")])).unwrap_err().to_string().contains("desc"));
        assert!(Page::deserialize(Fields(vec![("desc", "yes")])).is_err());
        let empty = Page::deserialize(Fields(vec![("limit", ""), ("desc", "true")])).unwrap();
        assert_eq!(empty, Page { limit: None, desc: true }, "an empty value is no value");
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Pair(i64, String);

    #[test]
    fn tuple_structs_and_wide_integers_fit_path_texts() {
        assert_eq!(Pair::deserialize(Texts(vec![("a", "1"), ("b", "x")])).unwrap(), Pair(1, "x".into()));
        assert_eq!(
            u128::deserialize(Texts(vec![("id", "340282366920938463463374607431768211455")])).unwrap(),
            u128::MAX
        );
    }
}
