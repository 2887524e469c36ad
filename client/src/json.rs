//! JSON ⇄ MessagePack value conversions for the command line.

use syncgate_protocol::{Body, Value};

/// Converts a JSON value. Integers stay integers, other numbers become f64.
pub fn to_value(j: &serde_json::Value) -> Value {
    match j {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                Value::from(n.as_f64().unwrap_or(0.0))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(to_value).collect()),
        serde_json::Value::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| (Value::from(k.as_str()), to_value(v)))
                .collect(),
        ),
    }
}

/// Parses a JSON object into a document body.
pub fn parse_body(text: &str) -> Result<Body, String> {
    let j: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    match j {
        serde_json::Value::Object(o) => {
            Ok(o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect())
        }
        _ => Err("the body must be a JSON object".into()),
    }
}

/// Converts a value to JSON for display (binary becomes an array of numbers).
pub fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Nil => serde_json::Value::Null,
        Value::Boolean(b) => (*b).into(),
        Value::Integer(i) => i
            .as_u64()
            .map(serde_json::Value::from)
            .or_else(|| i.as_i64().map(serde_json::Value::from))
            .unwrap_or(serde_json::Value::Null),
        Value::F32(f) => serde_json::Value::from(f64::from(*f)),
        Value::F64(f) => serde_json::Value::from(*f),
        Value::String(s) => s
            .as_str()
            .map(serde_json::Value::from)
            .unwrap_or(serde_json::Value::Null),
        Value::Binary(b) => b.iter().map(|x| serde_json::Value::from(*x)).collect(),
        Value::Array(a) => a.iter().map(to_json).collect(),
        Value::Map(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| k.to_string()),
                        to_json(v),
                    )
                })
                .collect(),
        ),
        Value::Ext(_, _) => serde_json::Value::Null,
    }
}

/// Converts a body to a JSON object.
pub fn body_to_json(b: &Body) -> serde_json::Value {
    serde_json::Value::Object(b.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let b = parse_body(r#"{"plant":"p1","qty":5,"neg":-2,"f":1.5,"ok":true,"n":null,"a":[1]}"#)
            .unwrap();
        assert_eq!(b["qty"], Value::from(5u64));
        assert_eq!(body_to_json(&b)["plant"], "p1");
        assert_eq!(body_to_json(&b)["neg"], -2);
        assert!(parse_body("[1]").is_err());
        assert!(parse_body("{").is_err());
    }
}
