//! JSON request bodies whose parse errors name the field at fault.
//!
//! poem-openapi's `Json<T>` reports a mistyped, missing or null field as `Expected input type
//! "integer(uint32)", found "two"`, without saying which field: a client sending several
//! fields cannot tell what to fix. `JsonBody<T>` parses exactly as `Json<T>` does (same
//! content types, same schema in the spec) and, only when that fails, walks the body against
//! `T`'s own registered schema to name the first field that does not fit. Where the walk finds
//! nothing it is sure of, poem-openapi's message is kept.

use poem::{FromRequest, Request, RequestBody, Result};
use poem_openapi::{
    error::ParseRequestPayloadError,
    impl_apirequest_for_payload,
    payload::{Json, ParsePayload, Payload},
    registry::{MetaSchema, MetaSchemaRef, Registry},
    types::{ParseFromJSON, Type},
};
use serde_json::Value;

/// A JSON request body; see the module docs.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T> std::ops::Deref for JsonBody<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Type> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn check_content_type(content_type: &str) -> bool {
        <Json<T> as Payload>::check_content_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: ParseFromJSON> ParsePayload for JsonBody<T> {
    const IS_REQUIRED: bool = T::IS_REQUIRED;

    async fn from_request(request: &Request, body: &mut RequestBody) -> Result<Self> {
        let data = Vec::<u8>::from_request(request, body).await?;
        let parse = |data: &[u8]| -> Result<Value> {
            if data.is_empty() {
                return Ok(Value::Null);
            }
            serde_json::from_slice(data).map_err(|err| {
                ParseRequestPayloadError {
                    reason: format!("the body is not valid JSON: {err}"),
                }
                .into()
            })
        };
        match T::parse_from_json(Some(parse(&data)?)) {
            Ok(value) => Ok(Self(value)),
            Err(err) => {
                // Parsed again rather than cloned up front: only a rejected body pays for it.
                let value = parse(&data)?;
                let reason = explain::<T>(&value).unwrap_or_else(|| err.into_message());
                Err(ParseRequestPayloadError { reason }.into())
            }
        }
    }
}

impl_apirequest_for_payload!(JsonBody<T>, T: ParseFromJSON);

/// The first place where `value` does not fit `T`'s schema, said so a client can fix it.
pub fn explain<T: Type>(value: &Value) -> Option<String> {
    let mut registry = Registry::new();
    T::register(&mut registry);
    Walk {
        registry: &registry,
    }
    .check(&T::schema_ref(), value, "")
}

struct Walk<'a> {
    registry: &'a Registry,
}

impl Walk<'_> {
    fn resolve<'s>(&'s self, schema: &'s MetaSchemaRef) -> Option<&'s MetaSchema> {
        match schema {
            MetaSchemaRef::Inline(schema) => Some(schema),
            MetaSchemaRef::Reference(name) => self.registry.schemas.get(name),
        }
    }

    fn check(&self, schema: &MetaSchemaRef, value: &Value, path: &str) -> Option<String> {
        let schema = self.resolve(schema)?;
        // A field with a description or default is emitted as `allOf: [its type]`.
        for part in &schema.all_of {
            if let Some(problem) = self.check(part, value, path) {
                return Some(problem);
            }
        }
        // Unions and enums of objects are left to poem-openapi's own message.
        if !schema.any_of.is_empty() || !schema.one_of.is_empty() {
            return None;
        }
        let expected = match schema.format {
            Some(format) => format!("{} ({format})", article(schema.ty)),
            None => article(schema.ty).to_string(),
        };
        let wrong = || {
            Some(format!(
                "{}: expected {expected}, found {}",
                at(path),
                describe(value)
            ))
        };
        match schema.ty {
            "object" => {
                let Some(object) = value.as_object() else {
                    return wrong();
                };
                for (name, field) in &schema.properties {
                    let field_path = if path.is_empty() {
                        (*name).to_string()
                    } else {
                        format!("{path}.{name}")
                    };
                    match object.get(*name) {
                        None if schema.required.contains(name) => {
                            return Some(format!("field `{field_path}` is missing"));
                        }
                        Some(Value::Null) if schema.required.contains(name) => {
                            return Some(format!("field `{field_path}` may not be null"));
                        }
                        None | Some(Value::Null) => {}
                        Some(field_value) => {
                            if let Some(problem) = self.check(field, field_value, &field_path) {
                                return Some(problem);
                            }
                        }
                    }
                }
                None
            }
            "array" => {
                let Some(items) = value.as_array() else {
                    return wrong();
                };
                let item_schema = schema.items.as_deref()?;
                items
                    .iter()
                    .enumerate()
                    .find_map(|(i, item)| self.check(item_schema, item, &format!("{path}[{i}]")))
            }
            "integer" => {
                let fits = match schema.format {
                    Some("int8") => value.as_i64().is_some_and(|n| i8::try_from(n).is_ok()),
                    Some("int16") => value.as_i64().is_some_and(|n| i16::try_from(n).is_ok()),
                    Some("int32") => value.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
                    Some("uint8") => value.as_u64().is_some_and(|n| u8::try_from(n).is_ok()),
                    Some("uint16") => value.as_u64().is_some_and(|n| u16::try_from(n).is_ok()),
                    Some("uint32") => value.as_u64().is_some_and(|n| u32::try_from(n).is_ok()),
                    Some("uint64") => value.is_u64(),
                    _ => value.is_i64() || value.is_u64(),
                };
                if fits {
                    self.range(schema, value, path)
                } else {
                    wrong()
                }
            }
            "number" if !value.is_number() => wrong(),
            "number" => self.range(schema, value, path),
            "boolean" if !value.is_boolean() => wrong(),
            "string" => {
                let Some(text) = value.as_str() else {
                    // poem-openapi takes a number or a boolean as a plain string's text.
                    if schema.format.is_none() && (value.is_number() || value.is_boolean()) {
                        return None;
                    }
                    return wrong();
                };
                let fits = match schema.format {
                    Some("uuid") => uuid::Uuid::parse_str(text).is_ok(),
                    Some("date-time") => chrono::DateTime::parse_from_rfc3339(text).is_ok(),
                    _ => true,
                };
                if !fits {
                    return wrong();
                }
                if !schema.enum_items.is_empty() && !schema.enum_items.contains(value) {
                    let allowed: Vec<String> =
                        schema.enum_items.iter().map(Value::to_string).collect();
                    return Some(format!(
                        "{}: expected one of {}, found {}",
                        at(path),
                        allowed.join(", "),
                        describe(value)
                    ));
                }
                None
            }
            _ => None,
        }
    }

    fn range(&self, schema: &MetaSchema, value: &Value, path: &str) -> Option<String> {
        let n = value.as_f64()?;
        let below = schema.minimum.is_some_and(|min| {
            if schema.exclusive_minimum == Some(true) {
                n <= min
            } else {
                n < min
            }
        });
        let above = schema.maximum.is_some_and(|max| {
            if schema.exclusive_maximum == Some(true) {
                n >= max
            } else {
                n > max
            }
        });
        if !below && !above {
            return None;
        }
        let bounds = match (schema.minimum, schema.maximum) {
            (Some(min), Some(max)) => format!("from {min} to {max}"),
            (Some(min), None) => format!("at least {min}"),
            (None, Some(max)) => format!("at most {max}"),
            (None, None) => return None,
        };
        Some(format!("{}: must be {bounds}, found {value}", at(path)))
    }
}

fn at(path: &str) -> String {
    if path.is_empty() {
        "the body".into()
    } else {
        format!("field `{path}`")
    }
}

fn article(ty: &str) -> &'static str {
    match ty {
        "object" => "an object",
        "array" => "an array",
        "integer" => "an integer",
        "number" => "a number",
        "boolean" => "true or false",
        "string" => "a string",
        _ => "another type",
    }
}

/// The offending value, bounded: a body may be large, and an error message is not its echo.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let shown: String = s.chars().take(40).collect();
            let ellipsis = if shown.len() < s.len() { "…" } else { "" };
            format!("the string \"{shown}{ellipsis}\"")
        }
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use poem_openapi::Object;
    use serde_json::json;

    use super::explain;

    #[derive(Debug, Object)]
    struct Inner {
        id: uuid::Uuid,
    }

    #[derive(Debug, Object)]
    struct Sample {
        /// A described field, which the spec wraps in `allOf`.
        #[oai(validator(minimum(value = "1"), maximum(value = "10")))]
        limit: u32,
        #[oai(default)]
        to: Vec<String>,
        note: Option<String>,
        inner: Option<Inner>,
        flag: bool,
    }

    fn says(body: serde_json::Value) -> String {
        explain::<Sample>(&body).unwrap_or_else(|| panic!("no problem found in {body}"))
    }

    #[test]
    fn names_the_field_whose_type_is_wrong() {
        assert_eq!(
            says(json!({ "limit": "two", "flag": true })),
            "field `limit`: expected an integer (uint32), found the string \"two\""
        );
        assert_eq!(
            says(json!({ "limit": 2, "flag": "yes" })),
            "field `flag`: expected true or false, found the string \"yes\""
        );
        assert_eq!(
            says(json!({ "limit": -1, "flag": true })),
            "field `limit`: expected an integer (uint32), found -1"
        );
    }

    #[test]
    fn names_missing_and_null_required_fields_but_not_optional_ones() {
        assert_eq!(says(json!({ "flag": true })), "field `limit` is missing");
        assert_eq!(
            says(json!({ "limit": null, "flag": true })),
            "field `limit` may not be null"
        );
        assert_eq!(
            explain::<Sample>(&json!({ "limit": 3, "flag": true, "note": null })),
            None
        );
    }

    #[test]
    fn walks_into_arrays_and_nested_objects() {
        assert_eq!(
            says(json!({ "limit": 2, "flag": true, "to": ["a@example.com", {}] })),
            "field `to[1]`: expected a string, found an object"
        );
        assert_eq!(
            says(json!({ "limit": 2, "flag": true, "inner": { "id": "not-a-uuid" } })),
            "field `inner.id`: expected a string (uuid), found the string \"not-a-uuid\""
        );
    }

    #[test]
    fn says_the_range_and_what_the_body_should_be() {
        assert_eq!(
            says(json!({ "limit": 11, "flag": true })),
            "field `limit`: must be from 1 to 10, found 11"
        );
        assert_eq!(
            says(json!([1, 2])),
            "the body: expected an object, found an array"
        );
    }

    #[test]
    fn a_body_that_fits_has_nothing_to_explain() {
        assert_eq!(
            explain::<Sample>(&json!({ "limit": 10, "flag": false, "to": ["x"] })),
            None
        );
        // What poem-openapi itself accepts is not called wrong: it reads 7 as the text "7".
        assert_eq!(
            explain::<Sample>(&json!({ "limit": 10, "flag": false, "to": [7, true] })),
            None
        );
    }

    #[test]
    fn long_strings_are_cut_short_in_the_message() {
        let long = "x".repeat(500);
        let message = says(json!({ "limit": long, "flag": true }));
        assert!(message.len() < 120, "{message}");
        assert!(message.ends_with("…\""), "{message}");
    }
}
