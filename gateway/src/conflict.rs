//! Conflict policies: what wins when a mutation was based on a version of a document that
//! another client has changed since.
//!
//! A mutation carries the `base_version` its writer had seen (0: it had seen none). If a change
//! made after that version by *another* client exists, the mutation conflicts and the
//! collection's [`ConflictResolver`] decides. A change by the same client is not a conflict:
//! an offline terminal that edits one document twice sends both edits with the same base.
//! A mutation without `base_version` is blind and never conflicts (server order, like `lww`).
//!
//! Everything here is pure: the planner ([`crate::ingest::plan`]) hands a resolver the
//! server's body, the body the mutation would leave, and which fields each side changed
//! (derived from the log, never from the client), and records the answer. An embedder of the
//! gateway library plugs its own business rule in with [`ConflictResolver`] (see
//! `Gateway::start_with_resolvers`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use rmpv::Value;
use syncgate_protocol::Body;

use crate::config::{CollectionConfig, ConflictPolicy};

/// Which top-level fields of a document one or more changes touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldSet {
    /// The whole document (a create, a delete, a put whose base is unknown).
    All,
    /// These fields (possibly none).
    Fields(BTreeSet<String>),
}

impl FieldSet {
    /// No field.
    pub fn none() -> FieldSet {
        FieldSet::Fields(BTreeSet::new())
    }

    /// The fields a patch sets (or removes).
    pub fn of_patch(patch: &Body) -> FieldSet {
        FieldSet::Fields(patch.keys().cloned().collect())
    }

    /// The fields whose values differ between two versions of a document; [`FieldSet::All`]
    /// when either side is absent (a create or a delete).
    pub fn diff(before: Option<&Body>, after: Option<&Body>) -> FieldSet {
        let (Some(before), Some(after)) = (before, after) else {
            return FieldSet::All;
        };
        let mut changed = BTreeSet::new();
        for (k, v) in before {
            if after.get(k) != Some(v) {
                changed.insert(k.clone());
            }
        }
        for k in after.keys() {
            if !before.contains_key(k) {
                changed.insert(k.clone());
            }
        }
        FieldSet::Fields(changed)
    }

    /// Whether the set holds `field`.
    pub fn contains(&self, field: &str) -> bool {
        match self {
            FieldSet::All => true,
            FieldSet::Fields(f) => f.contains(field),
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        matches!(self, FieldSet::Fields(f) if f.is_empty())
    }

    /// Adds every field of `other`.
    pub fn extend(&mut self, other: FieldSet) {
        match (&mut *self, other) {
            (FieldSet::All, _) => {}
            (_, FieldSet::All) => *self = FieldSet::All,
            (FieldSet::Fields(mine), FieldSet::Fields(theirs)) => mine.extend(theirs),
        }
    }
}

impl fmt::Display for FieldSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldSet::All => f.write_str("the whole document"),
            FieldSet::Fields(fields) => {
                let names: Vec<&str> = fields.iter().map(String::as_str).collect();
                write!(f, "{}", names.join(", "))
            }
        }
    }
}

/// A conflict, as a [`ConflictResolver`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Conflict<'a> {
    /// The collection.
    pub collection: &'a str,
    /// The document id.
    pub id: &'a str,
    /// The version the writer had seen (0: none).
    pub base_version: u64,
    /// The document's version now.
    pub server_version: u64,
    /// The document's body now (`None`: deleted).
    pub server: Option<&'a Body>,
    /// The body the mutation would leave (`None`: it deletes the document).
    pub mine: Option<&'a Body>,
    /// The fields other clients changed after `base_version`.
    pub changed_by_others: &'a FieldSet,
    /// The fields the mutation changes, relative to what its writer had seen (a patch's
    /// fields; a put's differences from the body at `base_version`).
    pub changed_by_mine: &'a FieldSet,
}

/// A [`ConflictResolver`]'s answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Apply the mutation as it is (server order wins).
    Mine,
    /// Keep the server's version; the mutation is refused with `conflict` (413) and the
    /// server's version and body.
    Server,
    /// Write this document instead (`None`: delete it): a merge of both sides. It is checked
    /// like any write (schema, scope, size).
    Write(Option<Body>),
    /// Keep the server's version and record an open conflict that a later mutation naming
    /// its id resolves; the writer gets `conflict` (413) with the id.
    Manual,
}

/// A collection's conflict policy: decides what a conflicting mutation does. Implement it to
/// plug a business rule of your own into an embedded gateway.
///
/// ```
/// use syncgate_gateway::conflict::{Conflict, ConflictResolver, Resolution};
///
/// /// Stock counts: concurrent adjustments never go below zero; otherwise server order.
/// #[derive(Debug)]
/// struct NeverNegative;
///
/// impl ConflictResolver for NeverNegative {
///     fn name(&self) -> &str {
///         "never_negative"
///     }
///
///     fn resolve(&self, c: &Conflict<'_>) -> Resolution {
///         let negative = c
///             .mine
///             .and_then(|b| b.get("qty"))
///             .and_then(|q| q.as_i64())
///             .is_some_and(|q| q < 0);
///         if negative { Resolution::Server } else { Resolution::Mine }
///     }
/// }
/// ```
pub trait ConflictResolver: Send + Sync + fmt::Debug {
    /// The policy's name, recorded in the conflict audit.
    fn name(&self) -> &str;

    /// Decides one conflict. Called under the log's write lock: it must be quick and must
    /// not block. The same inputs must give the same answer (a replay after a crash re-plans
    /// the group).
    fn resolve(&self, conflict: &Conflict<'_>) -> Resolution;
}

/// `lww`: the mutation committed last wins (server order, never client clocks).
#[derive(Debug, Clone, Copy, Default)]
pub struct LastWriteWins;

impl ConflictResolver for LastWriteWins {
    fn name(&self) -> &str {
        "lww"
    }

    fn resolve(&self, _: &Conflict<'_>) -> Resolution {
        Resolution::Mine
    }
}

/// `first_write_wins`: a mutation based on an outdated version is refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstWriteWins;

impl ConflictResolver for FirstWriteWins {
    fn name(&self) -> &str {
        "first_write_wins"
    }

    fn resolve(&self, _: &Conflict<'_>) -> Resolution {
        Resolution::Server
    }
}

/// `manual`: a conflict is kept open until someone resolves it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Manual;

impl ConflictResolver for Manual {
    fn name(&self) -> &str {
        "manual"
    }

    fn resolve(&self, _: &Conflict<'_>) -> Resolution {
        Resolution::Manual
    }
}

/// `field_merge`: the mutation's changed fields are applied on top of the server's document;
/// fields only the others changed keep the others' values; a field both changed takes the
/// mutation's value (server order). A delete, or a write to a deleted document, is
/// whole-document and follows server order.
#[derive(Debug, Clone, Copy, Default)]
pub struct FieldMerge;

impl ConflictResolver for FieldMerge {
    fn name(&self) -> &str {
        "field_merge"
    }

    fn resolve(&self, c: &Conflict<'_>) -> Resolution {
        let (Some(server), Some(mine), FieldSet::Fields(fields)) =
            (c.server, c.mine, c.changed_by_mine)
        else {
            return Resolution::Mine;
        };
        let mut merged = server.clone();
        for f in fields {
            match mine.get(f) {
                Some(v) => {
                    merged.insert(f.clone(), v.clone());
                }
                None => {
                    merged.remove(f);
                }
            }
        }
        Resolution::Write(Some(merged))
    }
}

/// `precedence`: per field, a ranking of values (highest first). On a field both sides
/// changed, the higher-ranked value wins whatever the arrival order (a value not in the
/// ranking ranks below every listed one; a tie goes to server order). A ranked field only
/// the others changed keeps their value. Every other field follows `lww`.
#[derive(Debug, Clone, Default)]
pub struct Precedence {
    ranks: BTreeMap<String, Vec<String>>,
}

impl Precedence {
    /// A ranking per field, each highest first.
    pub fn new(ranks: BTreeMap<String, Vec<String>>) -> Precedence {
        Precedence { ranks }
    }

    /// A value's rank in a field's ranking: 0 is the highest; unlisted values rank last.
    fn rank(ranking: &[String], v: Option<&Value>) -> usize {
        v.and_then(Value::as_str)
            .and_then(|s| ranking.iter().position(|r| r == s))
            .unwrap_or(ranking.len())
    }
}

impl ConflictResolver for Precedence {
    fn name(&self) -> &str {
        "precedence"
    }

    fn resolve(&self, c: &Conflict<'_>) -> Resolution {
        let (Some(server), Some(mine)) = (c.server, c.mine) else {
            return Resolution::Mine;
        };
        let mut result = mine.clone();
        for (field, ranking) in &self.ranks {
            if !c.changed_by_others.contains(field) {
                continue;
            }
            let theirs = server.get(field);
            let keep_theirs = !c.changed_by_mine.contains(field)
                || Self::rank(ranking, theirs) < Self::rank(ranking, mine.get(field));
            if keep_theirs {
                match theirs {
                    Some(v) => {
                        result.insert(field.clone(), v.clone());
                    }
                    None => {
                        result.remove(field);
                    }
                }
            }
        }
        Resolution::Write(Some(result))
    }
}

/// The built-in resolver a collection's configuration declares.
pub fn builtin(c: &CollectionConfig) -> Arc<dyn ConflictResolver> {
    match c.policy {
        ConflictPolicy::Lww => Arc::new(LastWriteWins),
        ConflictPolicy::FirstWriteWins => Arc::new(FirstWriteWins),
        ConflictPolicy::Manual => Arc::new(Manual),
        ConflictPolicy::FieldMerge => Arc::new(FieldMerge),
        ConflictPolicy::Precedence => Arc::new(Precedence::new(c.precedence.clone())),
    }
}

/// What a decision did to a concurrent change, as the audit records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The mutation was applied over another client's change.
    Overwrote,
    /// The mutation was applied, but the other client's values were kept where they
    /// conflicted (`precedence`, a resolver's merge).
    KeptServer,
    /// Both: some of the others' values were overwritten, some of the mutation's dropped.
    Merged,
    /// The mutation was refused; the server's version stays (`first_write_wins`).
    Refused,
    /// The mutation was refused and an open conflict recorded (`manual`).
    Open,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 5] = [
        Outcome::Overwrote,
        Outcome::KeptServer,
        Outcome::Merged,
        Outcome::Refused,
        Outcome::Open,
    ];

    /// The name stored in the audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Overwrote => "overwrote",
            Outcome::KeptServer => "kept_server",
            Outcome::Merged => "merged",
            Outcome::Refused => "refused",
            Outcome::Open => "open",
        }
    }

    /// The outcome stored as `name`.
    pub fn parse(name: &str) -> Option<Outcome> {
        [
            Outcome::Overwrote,
            Outcome::KeptServer,
            Outcome::Merged,
            Outcome::Refused,
            Outcome::Open,
        ]
        .into_iter()
        .find(|o| o.as_str() == name)
    }

    /// Whether the mutation was refused (nothing applied).
    pub fn refused(self) -> bool {
        matches!(self, Outcome::Refused | Outcome::Open)
    }
}

/// What applying `result` does to a conflict: whether it overwrote a value another client
/// changed, and whether it dropped a value the mutation changed. `None`: neither (a clean
/// merge, or both sides wrote the same), so there is nothing to audit.
pub fn applied_outcome(c: &Conflict<'_>, result: Option<&Body>) -> Option<Outcome> {
    let overwrote = differs(result, c.server, c.changed_by_others);
    let dropped = differs(result, c.mine, c.changed_by_mine);
    match (overwrote, dropped) {
        (true, false) => Some(Outcome::Overwrote),
        (false, true) => Some(Outcome::KeptServer),
        (true, true) => Some(Outcome::Merged),
        (false, false) => None,
    }
}

/// Whether two versions differ on any of `fields`.
fn differs(a: Option<&Body>, b: Option<&Body>, fields: &FieldSet) -> bool {
    match (a, b) {
        (None, None) => false,
        (Some(a), Some(b)) => match fields {
            FieldSet::All => a != b,
            FieldSet::Fields(f) => f.iter().any(|k| a.get(k) != b.get(k)),
        },
        _ => true,
    }
}

/// The reason given with a refused conflicting mutation (the same on a replay).
pub fn refusal_reason(
    collection: &str,
    id: &str,
    policy: &str,
    base_version: u64,
    server_version: u64,
) -> String {
    let keeps = if policy == "manual" {
        "keeps the server's version until the conflict is resolved"
    } else {
        "keeps the server's version"
    };
    format!(
        "{collection}/{id} was changed by another client after version {base_version} \
         (now version {server_version}); policy {policy} {keeps}"
    )
}

/// The id of the conflict a client's mutation opened: `<mutation_id>@<client_id>`.
pub fn conflict_id(client_id: &str, mutation_id: u64) -> String {
    format!("{mutation_id}@{client_id}")
}

/// The client id and mutation id a conflict id names.
pub fn parse_conflict_id(id: &str) -> Option<(&str, u64)> {
    let (mutation, client) = id.split_once('@')?;
    let mutation = mutation.parse().ok()?;
    (!client.is_empty()).then_some((client, mutation))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(fields: &[(&str, &str)]) -> Body {
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect()
    }

    fn fields(names: &[&str]) -> FieldSet {
        FieldSet::Fields(names.iter().map(|n| (*n).to_owned()).collect())
    }

    fn conflict<'a>(
        server: Option<&'a Body>,
        mine: Option<&'a Body>,
        others: &'a FieldSet,
        by_mine: &'a FieldSet,
    ) -> Conflict<'a> {
        Conflict {
            collection: "work_orders",
            id: "w1",
            base_version: 3,
            server_version: 7,
            server,
            mine,
            changed_by_others: others,
            changed_by_mine: by_mine,
        }
    }

    #[test]
    fn diff_names_changed_added_and_removed_fields() {
        let a = body(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let b = body(&[("a", "1"), ("b", "9"), ("d", "4")]);
        assert_eq!(FieldSet::diff(Some(&a), Some(&b)), fields(&["b", "c", "d"]));
        assert_eq!(FieldSet::diff(None, Some(&b)), FieldSet::All);
        assert_eq!(FieldSet::diff(Some(&a), None), FieldSet::All);
        assert!(FieldSet::diff(Some(&a), Some(&a)).is_empty());
        let mut s = fields(&["a"]);
        s.extend(fields(&["b"]));
        assert_eq!(s, fields(&["a", "b"]));
        s.extend(FieldSet::All);
        assert_eq!(s, FieldSet::All);
        assert_eq!(fields(&["a", "b"]).to_string(), "a, b");
    }

    #[test]
    fn lww_takes_the_mutation_and_audits_the_overwrite() {
        let server = body(&[("status", "cancelled"), ("note", "x")]);
        let mine = body(&[("status", "completed"), ("note", "x")]);
        let (others, by_mine) = (fields(&["status"]), fields(&["status"]));
        let c = conflict(Some(&server), Some(&mine), &others, &by_mine);
        assert_eq!(LastWriteWins.resolve(&c), Resolution::Mine);
        assert_eq!(applied_outcome(&c, Some(&mine)), Some(Outcome::Overwrote));
        // Writing what the server already holds overwrote nothing.
        assert_eq!(
            applied_outcome(&c, Some(&server)),
            Some(Outcome::KeptServer)
        );
        let same = conflict(Some(&server), Some(&server), &others, &by_mine);
        assert_eq!(applied_outcome(&same, Some(&server)), None);
    }

    #[test]
    fn first_write_wins_and_manual_keep_the_server() {
        let server = body(&[("qty", "1")]);
        let mine = body(&[("qty", "2")]);
        let (others, by_mine) = (fields(&["qty"]), fields(&["qty"]));
        let c = conflict(Some(&server), Some(&mine), &others, &by_mine);
        assert_eq!(FirstWriteWins.resolve(&c), Resolution::Server);
        assert_eq!(Manual.resolve(&c), Resolution::Manual);
    }

    #[test]
    fn field_merge_keeps_both_sides_fields_and_server_order_on_a_shared_one() {
        let server = body(&[("a", "theirs"), ("b", "base"), ("c", "theirs")]);
        let mine = body(&[("a", "base"), ("b", "mine"), ("c", "mine")]);
        let (others, by_mine) = (fields(&["a", "c"]), fields(&["b", "c"]));
        let c = conflict(Some(&server), Some(&mine), &others, &by_mine);
        let Resolution::Write(Some(merged)) = FieldMerge.resolve(&c) else {
            panic!("field_merge writes a merge");
        };
        assert_eq!(
            merged,
            body(&[("a", "theirs"), ("b", "mine"), ("c", "mine")])
        );
        // c was changed by both: the overwrite is audited.
        assert_eq!(applied_outcome(&c, Some(&merged)), Some(Outcome::Overwrote));
        // Disjoint fields: a clean merge, nothing to audit.
        let (others, by_mine) = (fields(&["a"]), fields(&["b"]));
        let c = conflict(Some(&server), Some(&mine), &others, &by_mine);
        let Resolution::Write(Some(merged)) = FieldMerge.resolve(&c) else {
            panic!("field_merge writes a merge");
        };
        assert_eq!(
            merged,
            body(&[("a", "theirs"), ("b", "mine"), ("c", "theirs")])
        );
        assert_eq!(applied_outcome(&c, Some(&merged)), None);
        // A removed field is removed; a delete is whole-document.
        let mine = body(&[("a", "base")]);
        let (others, by_mine) = (fields(&["a"]), fields(&["b"]));
        let c = conflict(Some(&server), Some(&mine), &others, &by_mine);
        assert_eq!(
            FieldMerge.resolve(&c),
            Resolution::Write(Some(body(&[("a", "theirs"), ("c", "theirs")])))
        );
        let c = conflict(Some(&server), None, &others, &FieldSet::All);
        assert_eq!(FieldMerge.resolve(&c), Resolution::Mine);
        assert_eq!(applied_outcome(&c, None), Some(Outcome::Overwrote));
    }

    #[test]
    fn precedence_keeps_the_higher_ranked_value_whatever_the_order() {
        let p = Precedence::new(
            [(
                "status".to_owned(),
                ["cancelled", "completed", "in_progress", "open"]
                    .map(String::from)
                    .to_vec(),
            )]
            .into(),
        );
        let cancelled = body(&[("status", "cancelled"), ("note", "erp")]);
        let completed = body(&[("status", "completed"), ("note", "terminal")]);
        let (others, by_mine) = (fields(&["status", "note"]), fields(&["status", "note"]));
        // A completion arriving after a cancellation keeps the cancellation; the unranked
        // note follows server order.
        let c = conflict(Some(&cancelled), Some(&completed), &others, &by_mine);
        let Resolution::Write(Some(r)) = p.resolve(&c) else {
            panic!("precedence writes");
        };
        assert_eq!(r, body(&[("status", "cancelled"), ("note", "terminal")]));
        assert_eq!(applied_outcome(&c, Some(&r)), Some(Outcome::Merged));
        // A cancellation arriving after a completion wins too.
        let c = conflict(Some(&completed), Some(&cancelled), &others, &by_mine);
        assert_eq!(p.resolve(&c), Resolution::Write(Some(cancelled.clone())));
        // An unlisted value ranks last.
        let odd = body(&[("status", "weird"), ("note", "erp")]);
        let c = conflict(Some(&odd), Some(&completed), &others, &by_mine);
        assert_eq!(p.resolve(&c), Resolution::Write(Some(completed.clone())));
        // The mutation did not change status (it carried its stale base value): the others'
        // status stays even though it ranks lower.
        let open = body(&[("status", "open"), ("note", "terminal")]);
        let stale = body(&[("status", "completed"), ("note", "terminal")]);
        let note = fields(&["note"]);
        let c = conflict(Some(&open), Some(&stale), &others, &note);
        assert_eq!(p.resolve(&c), Resolution::Write(Some(open.clone())));
    }

    #[test]
    fn conflict_ids_round_trip_and_reject_garbage() {
        let id = conflict_id("term@1", 42);
        assert_eq!(id, "42@term@1");
        assert_eq!(parse_conflict_id(&id), Some(("term@1", 42)));
        assert_eq!(parse_conflict_id("x@c"), None);
        assert_eq!(parse_conflict_id("5@"), None);
        assert_eq!(parse_conflict_id("5"), None);
        for o in ["overwrote", "kept_server", "merged", "refused", "open"] {
            assert_eq!(Outcome::parse(o).map(Outcome::as_str), Some(o));
        }
        assert!(
            refusal_reason("stock", "s1", "manual", 3, 9)
                .contains("until the conflict is resolved")
        );
    }
}
