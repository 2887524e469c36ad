//! What a collection declares about its documents — field types (`schema`), `required`
//! fields, and `references` to other collections — and the check of one write against it.
//! Pure: the planner asks [`DocChecks::check`] about the document a write would leave, and
//! looks up the ids [`DocChecks::targets`] names in what it prefetched.

use std::collections::BTreeMap;

use rmpv::Value;
use syncgate_protocol::{Body, ErrorCode};

use crate::config::{CollectionConfig, FieldType};

/// One collection's declared checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DocChecks {
    schema: BTreeMap<String, FieldType>,
    required: Vec<String>,
    references: BTreeMap<String, String>,
}

impl DocChecks {
    /// The checks a collection declares; `None` when it declares none.
    pub(crate) fn from_config(c: &CollectionConfig) -> Option<DocChecks> {
        if c.schema.is_empty() && c.required.is_empty() && c.references.is_empty() {
            return None;
        }
        Some(DocChecks {
            schema: c.schema.clone(),
            required: c.required.clone(),
            references: c.references.clone(),
        })
    }

    /// Checks the document a write would leave: every required field present and not nil,
    /// every declared field (and every reference) of its type. The first violation, in field
    /// order, is the answer.
    pub(crate) fn check(&self, body: &Body) -> Result<(), (ErrorCode, String)> {
        for field in &self.required {
            if body.get(field).is_none_or(Value::is_nil) {
                return Err((
                    ErrorCode::MissingField,
                    format!("required field {field:?} is missing"),
                ));
            }
        }
        for (field, want) in &self.schema {
            if let Some(v) = body.get(field).filter(|v| !v.is_nil())
                && !is(*want, v)
            {
                return Err((
                    ErrorCode::WrongType,
                    format!(
                        "field {field:?} must be {}, not {}",
                        name(*want),
                        type_name(v)
                    ),
                ));
            }
        }
        for (field, target) in &self.references {
            if let Some(v) = body.get(field).filter(|v| !v.is_nil())
                && !v.is_str()
            {
                return Err((
                    ErrorCode::WrongType,
                    format!(
                        "field {field:?} refers to a document of {target:?}: it must be a \
                         string id, not {}",
                        type_name(v)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `(field, collection, id)` of every reference a write sets (`written`: the fields of the
    /// put or patch; a nil value removes a reference and names nothing).
    pub(crate) fn targets<'a>(
        &'a self,
        written: &'a Body,
    ) -> impl Iterator<Item = (&'a str, &'a str, &'a str)> + 'a {
        self.references.iter().filter_map(|(field, target)| {
            let id = written.get(field)?.as_str()?;
            Some((field.as_str(), target.as_str(), id))
        })
    }
}

/// Whether `v` (not nil) is of type `t`.
fn is(t: FieldType, v: &Value) -> bool {
    match t {
        FieldType::String => v.is_str(),
        FieldType::Integer => v.is_i64() || v.is_u64(),
        FieldType::Number => v.is_number(),
        FieldType::Boolean => v.is_bool(),
        FieldType::Array => v.is_array(),
        FieldType::Map => v.is_map(),
        FieldType::Binary => v.is_bin(),
        FieldType::Any => true,
    }
}

/// The config word for a type.
fn name(t: FieldType) -> &'static str {
    match t {
        FieldType::String => "a string",
        FieldType::Integer => "an integer",
        FieldType::Number => "a number",
        FieldType::Boolean => "a boolean",
        FieldType::Array => "an array",
        FieldType::Map => "a map",
        FieldType::Binary => "binary",
        FieldType::Any => "anything",
    }
}

/// What a value is, for a rejection's reason.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks() -> DocChecks {
        DocChecks {
            schema: [
                ("plant", FieldType::String),
                ("qty", FieldType::Integer),
                ("weight", FieldType::Number),
                ("done", FieldType::Boolean),
                ("tags", FieldType::Array),
                ("meta", FieldType::Map),
                ("note", FieldType::Any),
            ]
            .into_iter()
            .map(|(k, t)| (k.to_owned(), t))
            .collect(),
            required: vec!["plant".into()],
            references: [("machine".to_owned(), "machines".to_owned())].into(),
        }
    }

    fn body(pairs: &[(&str, Value)]) -> Body {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn each_violation_has_its_code_and_names_the_field() {
        let c = checks();
        let ok = body(&[
            ("plant", Value::from("A")),
            ("qty", Value::from(3)),
            ("weight", Value::from(2.5)),
            ("done", Value::from(false)),
            ("tags", Value::Array(vec![])),
            ("meta", Value::Map(vec![])),
            ("note", Value::from(1)),
            ("machine", Value::from("M1")),
            ("free", Value::from("not declared: not checked")),
        ]);
        assert_eq!(c.check(&ok), Ok(()));
        // An integer is a number; nil counts as absent for a field that is not required.
        let mut b = ok.clone();
        b.insert("weight".into(), Value::from(7));
        b.insert("qty".into(), Value::Nil);
        assert_eq!(c.check(&b), Ok(()));
        for (field, bad, code, says) in [
            (
                "plant",
                None,
                ErrorCode::MissingField,
                "\"plant\" is missing",
            ),
            (
                "plant",
                Some(Value::Nil),
                ErrorCode::MissingField,
                "\"plant\"",
            ),
            (
                "qty",
                Some(Value::from("3")),
                ErrorCode::WrongType,
                "\"qty\" must be an integer, not a string",
            ),
            (
                "qty",
                Some(Value::from(3.0)),
                ErrorCode::WrongType,
                "not a float",
            ),
            (
                "weight",
                Some(Value::from("2")),
                ErrorCode::WrongType,
                "a number",
            ),
            (
                "done",
                Some(Value::from(1)),
                ErrorCode::WrongType,
                "a boolean",
            ),
            (
                "tags",
                Some(Value::from("x")),
                ErrorCode::WrongType,
                "an array",
            ),
            ("meta", Some(Value::from(1)), ErrorCode::WrongType, "a map"),
            (
                "machine",
                Some(Value::from(17)),
                ErrorCode::WrongType,
                "\"machine\" refers to a document of \"machines\"",
            ),
        ] {
            let mut b = ok.clone();
            match bad {
                Some(v) => b.insert(field.into(), v),
                None => b.remove(field),
            };
            let (got, reason) = c.check(&b).unwrap_err();
            assert_eq!(got, code, "{field}: {reason}");
            assert!(reason.contains(says), "{field}: {reason}");
        }
    }

    #[test]
    fn targets_are_the_references_a_write_sets() {
        let c = checks();
        let written = body(&[("machine", Value::from("M7")), ("plant", Value::from("A"))]);
        assert_eq!(
            c.targets(&written).collect::<Vec<_>>(),
            [("machine", "machines", "M7")]
        );
        // A patch that does not touch the reference, or removes it, names nothing.
        assert_eq!(c.targets(&body(&[("qty", Value::from(1))])).count(), 0);
        assert_eq!(c.targets(&body(&[("machine", Value::Nil)])).count(), 0);
    }

    #[test]
    fn a_collection_without_checks_has_none() {
        assert_eq!(DocChecks::from_config(&CollectionConfig::default()), None);
        let c = CollectionConfig {
            required: vec!["plant".into()],
            ..CollectionConfig::default()
        };
        assert!(DocChecks::from_config(&c).is_some());
    }
}
