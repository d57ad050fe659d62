//! The client's request body as top-level fields with raw JSON values: adapters replace the
//! few fields they must set and copy every other one byte for byte, without parsing the
//! (possibly large) message history into a `serde_json::Value`.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Top-level fields of a JSON object body, in the client's order, values unparsed.
#[derive(Debug)]
pub struct RequestBody<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    /// The whole body, for adapters that translate it into another protocol.
    raw: &'a RawValue,
    /// Length of the original text, to size the outgoing buffer in one allocation.
    raw_len: usize,
}

impl<'a> RequestBody<'a> {
    /// Splits `raw` into fields; fails when it is not a JSON object.
    pub fn parse(raw: &'a RawValue) -> Result<Self, serde_json::Error> {
        let Fields(fields) = serde_json::from_str(raw.get())?;
        Ok(Self {
            fields,
            raw,
            raw_len: raw.get().len(),
        })
    }

    pub fn fields(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.fields.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.fields().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// The whole body's JSON text.
    pub fn to_json(&self) -> &'a str {
        self.raw.get()
    }

    pub fn raw_len(&self) -> usize {
        self.raw_len
    }
}

struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor(std::marker::PhantomData))
    }
}

struct FieldsVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for FieldsVisitor<'a> {
    type Value = Fields<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(Key(k)) = map.next_key()? {
            let v: &'a RawValue = map.next_value()?;
            fields.push((k, v));
        }
        Ok(Fields(fields))
    }
}

/// A key that borrows from the input unless it has escapes (serde's own `Cow` always owns).
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for KeyVisitor<'a> {
            type Value = Key<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fields_in_order_and_keeps_values_raw() {
        let raw = RawValue::from_string(
            r#"{"model":"m","messages":[{"role":"user","content":"hi \"there\""}],"te\u006dperature":0.5}"#.to_owned(),
        )
        .expect("raw");
        let body = RequestBody::parse(&raw).expect("object");
        let keys: Vec<&str> = body.fields().map(|(k, _)| k).collect();
        assert_eq!(keys, ["model", "messages", "temperature"]);
        assert_eq!(
            body.get("messages").map(RawValue::get),
            Some(r#"[{"role":"user","content":"hi \"there\""}]"#)
        );
        assert_eq!(body.raw_len(), raw.get().len());
    }

    #[test]
    fn rejects_non_objects() {
        let raw = RawValue::from_string("[1,2]".to_owned()).expect("raw");
        assert!(RequestBody::parse(&raw).is_err());
    }
}
