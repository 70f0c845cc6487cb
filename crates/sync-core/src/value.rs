//! The document model stories are made of: a JSON-like tree that can also hold
//! what a Lua table can (NaN, the integer/float split, empty tables that are
//! neither clearly arrays nor objects).
//!
//! Equality is *semantic*, matching how Lua compares the values a story is
//! built from: `1 == 1.0`, an empty array equals an empty object (Lua has a
//! single empty table), and NaN equals NaN so that a document always equals
//! itself (otherwise a story holding NaN would look changed on every sync).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::ser::{Error as _, SerializeMap, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Object members, ordered by key so that serialisation and hashing are canonical.
pub type Map = BTreeMap<String, Value>;

/// A story document or any part of one.
#[derive(Debug, Clone, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Array(Vec<Value>),
    Object(Map),
}

impl Value {
    /// An empty object, the value of an empty Lua table.
    pub fn empty_object() -> Self {
        Value::Object(Map::new())
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Map> {
        match self {
            Value::Object(map) => Some(map),
            _ => None,
        }
    }

    /// The number as `f64`, for ordering timestamps and versions.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            _ => None,
        }
    }

    /// The number as `i64` when it is integral (JSON and Lua 5.1 carry integers as floats).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(i) => Some(i),
            Value::Float(f) => integral(f),
            _ => None,
        }
    }

    /// Member `key` of an object (`None` for other kinds or a missing key).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_object().and_then(|map| map.get(key))
    }

    /// True for an empty array or object: the one empty Lua table.
    fn is_empty_table(&self) -> bool {
        match self {
            Value::Array(items) => items.is_empty(),
            Value::Object(map) => map.is_empty(),
            _ => false,
        }
    }

    /// Canonical JSON text: sorted keys, integral floats written as integers.
    /// Two semantically equal documents give the same text (see [`PartialEq`]),
    /// which is what content hashes are computed from.
    pub fn to_canonical_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(&Canonical::new(self))
    }

    /// Writes the canonical JSON text to `writer`; for an object, leaving out
    /// the member `skip` (hashes of a story apart from its metadata).
    pub fn write_canonical_json(
        &self,
        writer: impl std::io::Write,
        skip: Option<&str>,
    ) -> Result<(), serde_json::Error> {
        serde_json::to_writer(writer, &Canonical { value: self, skip })
    }

    /// Maximum nesting depth (a scalar has depth 0).
    pub fn depth(&self) -> usize {
        match self {
            Value::Array(items) => 1 + items.iter().map(Value::depth).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(Value::depth).max().unwrap_or(0),
            _ => 0,
        }
    }
}

/// `f` as an integer when it is one and fits exactly.
pub fn integral(f: f64) -> Option<i64> {
    // 2^63 is exactly representable; anything at or beyond it does not fit in i64.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    (f.fract() == 0.0 && (-LIMIT..LIMIT).contains(&f)).then_some(f as i64)
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        use Value::*;
        match (self, other) {
            (Null, Null) => true,
            (Bool(a), Bool(b)) => a == b,
            (Int(a), Int(b)) => a == b,
            (Float(a), Float(b)) => a == b || (a.is_nan() && b.is_nan()),
            (Int(i), Float(f)) | (Float(f), Int(i)) => integral(*f) == Some(*i),
            (Str(a), Str(b)) => a == b,
            (Array(a), Array(b)) => a == b,
            (Object(a), Object(b)) => a == b,
            (a, b) => a.is_empty_table() && b.is_empty_table(),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<Map> for Value {
    fn from(map: Map) -> Self {
        Value::Object(map)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_canonical_json() {
            Ok(text) => f.write_str(&text),
            Err(_) => write!(f, "{self:?}"),
        }
    }
}

fn serialize_float<S: Serializer>(f: f64, serializer: S) -> Result<S::Ok, S::Error> {
    if !f.is_finite() {
        return Err(S::Error::custom(format!(
            "{f} cannot be represented in JSON"
        )));
    }
    match integral(f) {
        // Within 2^53 an integral float is exactly an integer: write it as one so that
        // 5 and 5.0 (Lua 5.1 has only floats) produce the same text.
        Some(i) if i.unsigned_abs() <= 1 << 53 => serializer.serialize_i64(i),
        _ => serializer.serialize_f64(f),
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::Float(f) => serialize_float(*f, serializer),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Object(map) => {
                let mut out = serializer.serialize_map(Some(map.len()))?;
                for (k, v) in map {
                    out.serialize_entry(k, v)?;
                }
                out.end()
            }
        }
    }
}

/// Serialises like [`Value`] but writes an empty array as `{}`, the way an empty
/// Lua table reads back, so the two spellings hash alike. `skip` leaves out
/// one member of the outermost object.
struct Canonical<'a> {
    value: &'a Value,
    skip: Option<&'a str>,
}

impl<'a> Canonical<'a> {
    fn new(value: &'a Value) -> Self {
        Canonical { value, skip: None }
    }
}

impl Serialize for Canonical<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.value {
            Value::Array(items) if !items.is_empty() => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Canonical::new(item))?;
                }
                seq.end()
            }
            Value::Array(_) => serializer.serialize_map(Some(0))?.end(),
            Value::Object(map) => {
                let mut out = serializer.serialize_map(None)?;
                for (k, v) in map {
                    if Some(k.as_str()) != self.skip {
                        out.serialize_entry(k, &Canonical::new(v))?;
                    }
                }
                out.end()
            }
            other => other.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int(i))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(i64::try_from(u).map_or(Value::Float(u as f64), Value::Int))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(Value::Float(f))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::Str(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::Str(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some((k, v)) = access.next_entry::<String, Value>()? {
            map.insert(k, v);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(pairs: &[(&str, Value)]) -> Value {
        Value::Object(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn integers_equal_integral_floats() {
        assert_eq!(Value::Int(3), Value::Float(3.0));
        assert_ne!(Value::Int(3), Value::Float(3.5));
    }

    #[test]
    fn nan_equals_itself() {
        assert_eq!(Value::Float(f64::NAN), Value::Float(f64::NAN));
        assert_ne!(Value::Float(f64::NAN), Value::Float(1.0));
    }

    #[test]
    fn empty_array_equals_empty_object() {
        assert_eq!(Value::Array(vec![]), Value::empty_object());
        assert_ne!(Value::Array(vec![Value::Null]), Value::empty_object());
    }

    #[test]
    fn canonical_json_sorts_keys_and_normalises_numbers() {
        let v = obj(&[("b", Value::Float(2.0)), ("a", Value::Array(vec![]))]);
        assert_eq!(v.to_canonical_json().unwrap(), r#"{"a":{},"b":2}"#);
    }

    #[test]
    fn nan_is_not_json() {
        let err = Value::Float(f64::NAN).to_canonical_json().unwrap_err();
        assert!(err.to_string().contains("cannot be represented in JSON"));
    }

    #[test]
    fn json_round_trip() {
        let text = r#"{"a":[1,2.5,"x",null,true],"b":{"c":{}}}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), text);
    }

    #[test]
    fn depth_counts_nesting() {
        assert_eq!(Value::Int(1).depth(), 0);
        assert_eq!(obj(&[("a", Value::Array(vec![Value::Int(1)]))]).depth(), 2);
    }
}
