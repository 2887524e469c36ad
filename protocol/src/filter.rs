//! Equality filters on top-level document fields.

use crate::messages::{Body, Value};

/// A conjunction of `field == value` terms. The empty filter matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    terms: Vec<(String, Value)>,
}

impl Filter {
    /// Builds a filter from a subscription's filter map. Values must be scalars (nil, booleans,
    /// numbers, strings, binary); arrays and maps are refused.
    pub fn new(map: &Body) -> Result<Filter, String> {
        let mut terms = Vec::with_capacity(map.len());
        for (k, v) in map {
            if matches!(v, Value::Array(_) | Value::Map(_) | Value::Ext(..)) {
                return Err(format!("filter value for {k:?} must be a scalar"));
            }
            terms.push((k.clone(), v.clone()));
        }
        Ok(Filter { terms })
    }

    /// Whether the filter has no terms.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Whether `body` has every filtered field equal to the filter's value. A missing field
    /// equals nil.
    pub fn matches(&self, body: &Body) -> bool {
        self.terms.iter().all(|(k, v)| match body.get(k) {
            Some(actual) => values_equal(actual, v),
            None => v.is_nil(),
        })
    }
}

/// Equality that treats integers by value (a uint 5 equals an int 5) and compares floats by
/// value, so clients in other languages need not pick the same integer encoding. Filters and
/// the gateway's row scopes both compare with it.
pub fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Integer(x), Value::Integer(y)) => {
            x.as_i64() == y.as_i64() && x.as_u64() == y.as_u64()
        }
        (Value::F32(x), Value::F64(y)) | (Value::F64(y), Value::F32(x)) => f64::from(*x) == *y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(pairs: &[(&str, Value)]) -> Body {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn matching() {
        let f = Filter::new(&body(&[("plant", Value::from("p1"))])).unwrap();
        assert!(f.matches(&body(&[
            ("plant", Value::from("p1")),
            ("x", Value::from(1))
        ])));
        assert!(!f.matches(&body(&[("plant", Value::from("p2"))])));
        assert!(!f.matches(&body(&[])));
        assert!(Filter::default().matches(&body(&[])));
        let n = Filter::new(&body(&[("line", Value::from(3u8))])).unwrap();
        assert!(n.matches(&body(&[("line", Value::from(3i64))])));
        let nil = Filter::new(&body(&[("operator", Value::Nil)])).unwrap();
        assert!(nil.matches(&body(&[])));
        assert!(Filter::new(&body(&[("a", Value::Array(vec![]))])).is_err());
    }
}
