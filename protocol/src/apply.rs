//! What a mutation does to a document: the one definition shared by the gateway, which commits
//! it, and the client SDK, which shows its effect optimistically before the server answers.

use crate::error::ErrorCode;
use crate::messages::{Body, MutationOp};

/// Why a mutation cannot apply: a stable code and a reason for humans.
pub type Refusal = (ErrorCode, String);

/// Checks the shape of a mutation: put and patch need a body, a patch needs at least one field,
/// a delete takes none.
pub fn check_shape(op: MutationOp, body: Option<&Body>) -> Result<(), Refusal> {
    let reason = match (op, body) {
        (MutationOp::Put, None) => "put needs a body",
        (MutationOp::Patch, None) => "patch needs a body",
        (MutationOp::Patch, Some(b)) if b.is_empty() => "patch with no fields",
        (MutationOp::Delete, Some(_)) => "delete takes no body",
        _ => return Ok(()),
    };
    Err((ErrorCode::InvalidMutation, reason.to_owned()))
}

/// The body after applying `op` to `current` (`None` = the document does not exist or is
/// deleted). Returns `Ok(None)` for a delete.
///
/// - put: the new body, with nil fields dropped;
/// - patch: `current` with each given field set, a nil value removing the field; a patch of a
///   document that does not exist is refused with [`ErrorCode::DocumentNotFound`];
/// - delete: `None`.
pub fn apply(
    current: Option<&Body>,
    op: MutationOp,
    body: Option<&Body>,
) -> Result<Option<Body>, Refusal> {
    check_shape(op, body)?;
    match op {
        MutationOp::Put => {
            let mut b = body.cloned().unwrap_or_default();
            b.retain(|_, v| !v.is_nil());
            Ok(Some(b))
        }
        MutationOp::Patch => {
            let Some(mut b) = current.cloned() else {
                return Err((
                    ErrorCode::DocumentNotFound,
                    "the document does not exist".to_owned(),
                ));
            };
            for (k, v) in body.into_iter().flatten() {
                if v.is_nil() {
                    b.remove(k);
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
            Ok(Some(b))
        }
        MutationOp::Delete => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Value;

    fn body(pairs: &[(&str, Value)]) -> Body {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn put_drops_nil_fields() {
        let b = body(&[("a", Value::from(1)), ("b", Value::Nil)]);
        let out = apply(None, MutationOp::Put, Some(&b)).unwrap().unwrap();
        assert_eq!(out, body(&[("a", Value::from(1))]));
    }

    #[test]
    fn patch_sets_and_removes_fields() {
        let cur = body(&[("a", Value::from(1)), ("b", Value::from(2))]);
        let p = body(&[
            ("a", Value::from(5)),
            ("b", Value::Nil),
            ("c", Value::from(3)),
        ]);
        let out = apply(Some(&cur), MutationOp::Patch, Some(&p))
            .unwrap()
            .unwrap();
        assert_eq!(out, body(&[("a", Value::from(5)), ("c", Value::from(3))]));
    }

    #[test]
    fn patch_of_missing_document_is_refused() {
        let p = body(&[("a", Value::from(5))]);
        let err = apply(None, MutationOp::Patch, Some(&p)).unwrap_err();
        assert_eq!(err.0, ErrorCode::DocumentNotFound);
    }

    #[test]
    fn shapes() {
        let b = body(&[("a", Value::from(1))]);
        assert!(apply(None, MutationOp::Put, None).is_err());
        assert!(apply(Some(&b), MutationOp::Patch, Some(&Body::new())).is_err());
        assert!(apply(Some(&b), MutationOp::Delete, Some(&b)).is_err());
        assert_eq!(apply(Some(&b), MutationOp::Delete, None).unwrap(), None);
    }
}
