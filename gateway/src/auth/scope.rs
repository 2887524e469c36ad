//! Row scopes: which documents of a collection a user may see and write, decided by their
//! token's claims. Pure: no I/O, tested without sockets.
//!
//! A collection's `scope` maps document fields to claim paths, e.g.
//! `scope = { plant = "claims.plant" }`. For a user, each field may hold any of the values of
//! its claim: one scalar (string, number, boolean), or any element of a list of scalars. A
//! document is in scope when every scoped field equals one of its allowed values (a missing
//! field is never in scope). `claims.sub` names the user; a dotted path (`claims.org.plant`)
//! walks nested objects.
//!
//! A token that lacks a claim its scope needs (or whose claim holds no scalar) reaches no
//! document of that collection: subscribing is refused with `read_forbidden` and every write
//! with `out_of_scope`, each naming the claim.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value as Json;
use syncgate_protocol::Body;
use syncgate_protocol::Value;
use syncgate_protocol::filter::values_equal;

use crate::auth::Identity;
use crate::config::{CLAIM_PREFIX, CollectionConfig};

/// One user's scope in one collection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scope {
    /// Each scoped field and the values it may hold, in field order.
    terms: Vec<(String, Vec<Value>)>,
    /// The first claim path the token lacks (the scope then matches nothing).
    missing: Option<String>,
}

impl Scope {
    /// The scope that `rule` (field -> claim path) gives the user of `identity`.
    pub(crate) fn resolve(rule: &BTreeMap<String, String>, identity: &Identity) -> Scope {
        let mut terms = Vec::with_capacity(rule.len());
        let mut missing = None;
        for (field, path) in rule {
            let allowed = claim_values(path, identity);
            if allowed.is_empty() && missing.is_none() {
                missing = Some(path.clone());
            }
            terms.push((field.clone(), allowed));
        }
        Scope { terms, missing }
    }

    /// The claim path the token lacks, if any: then nothing is in scope.
    pub(crate) fn missing_claim(&self) -> Option<&str> {
        self.missing.as_deref()
    }

    /// Whether `body` is in scope: every scoped field equals one of its allowed values.
    pub(crate) fn matches(&self, body: &Body) -> bool {
        self.missing.is_none()
            && self.terms.iter().all(|(field, allowed)| {
                body.get(field)
                    .is_some_and(|v| allowed.iter().any(|a| values_equal(v, a)))
            })
    }

    /// The rule in words, for refusals: `plant in ["A", "B"]`.
    pub(crate) fn describe(&self) -> String {
        self.terms
            .iter()
            .map(|(field, allowed)| {
                let values: Vec<String> = allowed.iter().map(ToString::to_string).collect();
                format!("{field} in [{}]", values.join(", "))
            })
            .collect::<Vec<_>>()
            .join(" and ")
    }
}

/// The values a claim path names for this identity: a scalar gives one, a list its scalar
/// elements; anything else (absent, null, an object) gives none.
fn claim_values(path: &str, identity: &Identity) -> Vec<Value> {
    let Some(rest) = path.strip_prefix(CLAIM_PREFIX) else {
        return Vec::new();
    };
    if rest == "sub" {
        return vec![Value::from(identity.user.as_str())];
    }
    let mut parts = rest.split('.');
    let Some(first) = parts.next() else {
        return Vec::new();
    };
    let mut at = identity.claims.get(first);
    for part in parts {
        at = at.and_then(|v| v.get(part));
    }
    match at {
        Some(Json::Array(items)) => items.iter().filter_map(scalar).collect(),
        Some(v) => scalar(v).into_iter().collect(),
        None => Vec::new(),
    }
}

fn scalar(v: &Json) -> Option<Value> {
    match v {
        Json::String(s) => Some(Value::from(s.as_str())),
        Json::Bool(b) => Some(Value::from(*b)),
        Json::Number(n) => n
            .as_u64()
            .map(Value::from)
            .or_else(|| n.as_i64().map(Value::from))
            .or_else(|| n.as_f64().map(Value::from)),
        Json::Null | Json::Array(_) | Json::Object(_) => None,
    }
}

/// What one session may do: its roles, and its scope in every scoped collection. Built once at
/// `hello`, shared by the session's subscriptions and pushes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Access {
    /// The user's roles (for `read_roles` / `write_roles`).
    pub roles: Vec<String>,
    /// collection -> the user's scope there; collections without a `scope` are absent.
    scopes: HashMap<String, Scope>,
}

impl Access {
    /// The access `identity` has to the declared `collections`.
    pub(crate) fn new(
        identity: &Identity,
        collections: &BTreeMap<String, CollectionConfig>,
    ) -> Access {
        let scopes = collections
            .iter()
            .filter(|(_, c)| !c.scope.is_empty())
            .map(|(name, c)| (name.clone(), Scope::resolve(&c.scope, identity)))
            .collect();
        Access {
            roles: identity.roles.clone(),
            scopes,
        }
    }

    /// An operator's access (an administrator's command, not a client session): every role
    /// any collection names, no row scope.
    pub(crate) fn operator(collections: &BTreeMap<String, CollectionConfig>) -> Access {
        let mut roles: Vec<String> = collections
            .values()
            .flat_map(|c| c.read_roles.iter().chain(&c.write_roles))
            .cloned()
            .collect();
        roles.sort();
        roles.dedup();
        Access {
            roles,
            scopes: HashMap::new(),
        }
    }

    /// Roles only, every collection unscoped (tests and tools).
    #[cfg(test)]
    pub(crate) fn roles(roles: &[&str]) -> Access {
        Access {
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            scopes: HashMap::new(),
        }
    }

    /// The user's scope in `collection`; `None` when the collection is not scoped.
    pub(crate) fn scope(&self, collection: &str) -> Option<&Scope> {
        self.scopes.get(collection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(user: &str, claims: serde_json::Value) -> Identity {
        Identity {
            user: user.into(),
            claims: serde_json::from_value(claims).unwrap(),
            roles: vec![],
            valid_until: u64::MAX,
        }
    }

    fn rule(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(f, c)| ((*f).to_owned(), (*c).to_owned()))
            .collect()
    }

    fn doc(pairs: &[(&str, Value)]) -> Body {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn a_scalar_claim_admits_exactly_its_value() {
        let s = Scope::resolve(
            &rule(&[("plant", "claims.plant")]),
            &identity("u", serde_json::json!({"plant": "A"})),
        );
        assert!(s.matches(&doc(&[("plant", "A".into()), ("x", 1.into())])));
        assert!(!s.matches(&doc(&[("plant", "B".into())])));
        assert!(!s.matches(&doc(&[("x", 1.into())])), "a missing field");
        assert!(!s.matches(&doc(&[("plant", Value::Nil)])));
        assert!(!s.matches(&doc(&[("plant", "a".into())])), "case matters");
        assert_eq!(s.missing_claim(), None);
        assert_eq!(s.describe(), r#"plant in ["A"]"#);
    }

    #[test]
    fn a_list_claim_admits_any_of_its_scalars() {
        let s = Scope::resolve(
            &rule(&[("plant", "claims.plants")]),
            &identity("u", serde_json::json!({"plants": ["A", 7, {"x": 1}, null]})),
        );
        assert!(s.matches(&doc(&[("plant", "A".into())])));
        assert!(s.matches(&doc(&[("plant", Value::from(7u8))])));
        assert!(s.matches(&doc(&[("plant", Value::from(7i64))])));
        assert!(!s.matches(&doc(&[("plant", "B".into())])));
    }

    #[test]
    fn every_scoped_field_must_match() {
        let s = Scope::resolve(
            &rule(&[("plant", "claims.org.plant"), ("owner", "claims.sub")]),
            &identity("alice", serde_json::json!({"org": {"plant": "A"}})),
        );
        assert!(s.matches(&doc(&[("plant", "A".into()), ("owner", "alice".into())])));
        assert!(!s.matches(&doc(&[("plant", "A".into()), ("owner", "bob".into())])));
        assert!(!s.matches(&doc(&[("plant", "B".into()), ("owner", "alice".into())])));
    }

    #[test]
    fn a_token_without_the_claim_reaches_nothing() {
        for claims in [
            serde_json::json!({}),
            serde_json::json!({"plant": null}),
            serde_json::json!({"plant": []}),
            serde_json::json!({"plant": {"A": true}}),
        ] {
            let s = Scope::resolve(&rule(&[("plant", "claims.plant")]), &identity("u", claims));
            assert_eq!(s.missing_claim(), Some("claims.plant"));
            assert!(!s.matches(&doc(&[("plant", "A".into())])));
            assert!(!s.matches(&doc(&[])));
        }
    }

    #[test]
    fn claim_paths() {
        use crate::config::is_valid_claim_path;
        for ok in ["claims.plant", "claims.sub", "claims.org.plant"] {
            assert!(is_valid_claim_path(ok), "{ok}");
        }
        for bad in [
            "plant",
            "claims.",
            "claims..x",
            "claims.x.",
            "",
            "claim.plant",
        ] {
            assert!(!is_valid_claim_path(bad), "{bad}");
        }
    }

    #[test]
    fn access_resolves_scoped_collections_only() {
        let mut collections = BTreeMap::new();
        collections.insert("free".to_owned(), CollectionConfig::default());
        collections.insert(
            "orders".to_owned(),
            CollectionConfig {
                scope: rule(&[("plant", "claims.plant")]),
                ..CollectionConfig::default()
            },
        );
        let a = Access::new(
            &identity("u", serde_json::json!({"plant": "A"})),
            &collections,
        );
        assert!(a.scope("free").is_none());
        assert!(
            a.scope("orders")
                .is_some_and(|s| s.matches(&doc(&[("plant", "A".into())])))
        );
    }
}
