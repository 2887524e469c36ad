//! The ingest planner: what a group of push batches does, decided without I/O.
//!
//! The group commit is three steps, and only the middle one decides anything:
//! 1. **prefetch** (storage): every pushing client's horizon (`last_mutation`), then — from
//!    [`wanted`] — the stored state of every document the new mutations touch and the stored
//!    outcomes of every replayed mutation;
//! 2. **plan** ([`plan`], this module): for each mutation, in order, either its earlier
//!    outcome (a replay), a rejection with a stable code, or a new change at the next seq; the
//!    rows to write; the acknowledgements; the committed changes for fan-out;
//! 3. **write** (storage): the rows, the new head, commit.
//!
//! The checks, in order, for a mutation above its client's horizon: the collection is
//! declared (300 `unknown_collection`), the document id is valid (403), the mutation's shape
//! fits its op (400), a patch finds a live document (405), the resulting document fits
//! `max_document_bytes` (402). A mutation at or below the horizon gets its stored outcome, or
//! 400 if the client skipped that id.
//! Then the document checks (schema, required fields), references, and the conflict step: a
//! mutation whose `base_version` is older than a change by another client is handed to its
//! collection's [`ConflictResolver`], whose answer is applied, refused or kept open, and
//! audited (`sg_conflicts`) when it overwrote or refused a concurrent change. A mutation that
//! `resolves` an open `manual` conflict skips that step and closes the conflict.
//!
//! Each new body is encoded to MessagePack once, here: those bytes size-check the document,
//! are stored in `sg_changes` and `sg_documents`, and are spliced into the change's wire
//! encoding. A previous body is passed on as the bytes it was stored as.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use syncgate_protocol::apply::{apply, check_shape};
use syncgate_protocol::codec::to_msgpack;
use syncgate_protocol::limits::is_valid_id;
use syncgate_protocol::{
    Body, Change, ChangeOp, ErrorCode, Limits, Mutation, MutationResult, MutationStatus,
};

use crate::auth::allowed;
use crate::auth::scope::Access;
use crate::changes::{Committed, LogEntry};
use crate::conflict::{
    Conflict, ConflictResolver, FieldSet, LastWriteWins, Outcome, Resolution, applied_outcome,
    conflict_id, parse_conflict_id, refusal_reason,
};
use crate::error::GatewayError;
use crate::ingest::checks::DocChecks;
use crate::storage::{
    ChangeRow, ClientRow, ConflictRow, DocumentRow, Earlier, GroupRows, HistoryRow, RejectionRow,
    ResolutionRow, StoredConflict, StoredDoc, UsageRow,
};

/// One client's push batch, as the connection hands it to ingest.
#[derive(Debug, Clone)]
pub(crate) struct PushJob {
    /// The pushing client.
    pub client_id: String,
    /// The authenticated user, recorded with the client.
    pub user: String,
    /// The user's roles and row scopes, shared by the session's pushes.
    pub access: Arc<Access>,
    /// The client's batch id, recorded with rejections.
    pub batch: u64,
    /// The mutations, in strictly increasing `mutation_id` (checked by [`super::order`]).
    pub mutations: Vec<Mutation>,
}

/// The acknowledgement of one job.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PushOutcome {
    /// One result per mutation.
    pub results: Vec<MutationResult>,
    /// The highest seq the batch wrote (0 if it wrote nothing).
    pub visible_at: u64,
    /// Rejections answered but not stored (the user is at `max_sync_errors_per_user`).
    pub unstored_rejections: usize,
}

/// What a mutation is checked against.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// Declared collections.
    pub collections: HashSet<String>,
    /// Size limits.
    pub limits: Limits,
    /// Most bytes of bodies (new and previous) one batch may write to the log.
    pub max_batch_output_bytes: usize,
    /// Collections that only some roles may write: collection -> those roles.
    pub write_roles: HashMap<String, Vec<String>>,
    /// Documents one user may hold (created minus deleted); 0 = no limit.
    pub max_documents_per_user: u64,
    /// Rejections stored per user; beyond it a rejection is answered but not stored. 0 = no
    /// limit.
    pub max_sync_errors_per_user: u64,
    /// Collections that declare a schema, required fields or references: collection -> them.
    pub checks: HashMap<String, DocChecks>,
    /// Each collection's conflict policy (absent: `lww`).
    pub resolvers: HashMap<String, Arc<dyn ConflictResolver>>,
}

/// What the planner reads from the database (the prefetch step).
#[derive(Debug, Default)]
pub(crate) struct Prefetched {
    /// Each pushing client's last handled mutation id (absent = 0).
    pub lasts: HashMap<String, u64>,
    /// Each pushing client id's owner (absent: never used).
    pub owners: HashMap<String, String>,
    /// collection -> id -> the stored state of each document in [`Wanted::docs`] that exists
    /// (deleted ones too).
    pub docs: HashMap<String, HashMap<String, StoredDoc>>,
    /// client -> mutation id -> the stored outcome of each mutation in [`Wanted::earlier`]
    /// that has one.
    pub earlier: HashMap<String, HashMap<u64, Earlier>>,
    /// What each pushing user holds: (documents, stored rejections) — read only when a
    /// quota is set.
    pub usage: HashMap<String, (i64, i64)>,
    /// (collection, id) -> the changes after the oldest base version a mutation of the
    /// group names, for each document in [`history_wanted`].
    pub history: HashMap<(String, String), Vec<HistoryRow>>,
    /// The recorded conflicts named by mutations' `resolves` ([`Wanted::conflicts`]).
    pub conflicts: HashMap<(String, u64), StoredConflict>,
    /// The collections captured from PostgreSQL tables: collection -> table. Writes to them
    /// are rejected (`captured_collection`).
    pub captured: HashMap<String, String>,
    /// The compaction horizon of each collection in [`horizons_wanted`] that has one: a
    /// base version older than it has an incomplete history.
    pub horizons: HashMap<String, u64>,
}

/// What to prefetch once the horizons are known.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Wanted<'a> {
    /// `(collection, id)` of every document a new mutation touches, each once.
    pub docs: Vec<(&'a str, &'a str)>,
    /// Per client, the ids at or below its stored horizon (replays), each once.
    pub earlier: Vec<(&'a str, Vec<u64>)>,
    /// The conflicts that new mutations resolve: (client id, mutation id), each once.
    pub conflicts: Vec<(&'a str, u64)>,
}

/// Everything a group does, decided before anything is written.
#[derive(Debug)]
pub(crate) struct Plan {
    /// One outcome per job, in job order: its acknowledgement, or why nothing of it was
    /// applied (a client id owned by another user).
    pub outcomes: Vec<Result<PushOutcome, GatewayError>>,
    /// The rows to write.
    pub rows: GroupRows,
    /// The changes for fan-out once the rows are committed (`to` is the new head).
    pub committed: Committed,
}

/// Every pushing user, each once.
pub(crate) fn users(jobs: &[PushJob]) -> Vec<&str> {
    let mut seen = HashSet::new();
    jobs.iter()
        .map(|j| j.user.as_str())
        .filter(|u| seen.insert(*u))
        .collect()
}

/// Every pushing client, each once.
pub(crate) fn clients(jobs: &[PushJob]) -> Vec<&str> {
    let mut seen = HashSet::new();
    jobs.iter()
        .map(|j| j.client_id.as_str())
        .filter(|c| seen.insert(*c))
        .collect()
}

/// What to read, given each client's stored horizon: the documents that mutations above it
/// touch or refer to (`references`), and the stored outcomes of mutations at or below it.
pub(crate) fn wanted<'a>(
    jobs: &'a [PushJob],
    lasts: &HashMap<String, u64>,
    rules: &'a Rules,
) -> Wanted<'a> {
    let mut docs = Vec::new();
    let mut seen_docs = HashSet::new();
    let mut earlier: Vec<(&str, Vec<u64>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut seen_ids = HashSet::new();
    let mut conflicts = Vec::new();
    for job in jobs {
        let last = lasts.get(&job.client_id).copied().unwrap_or(0);
        for m in &job.mutations {
            if m.mutation_id > last {
                let key = (m.collection.as_str(), m.id.as_str());
                if seen_docs.insert(key) {
                    docs.push(key);
                }
                if let Some(named) = m.resolves.as_deref().and_then(parse_conflict_id)
                    && !conflicts.contains(&named)
                {
                    conflicts.push(named);
                }
                if let (Some(checks), Some(written)) =
                    (rules.checks.get(&m.collection), m.body.as_ref())
                {
                    for (_, collection, id) in checks.targets(written) {
                        if seen_docs.insert((collection, id)) {
                            docs.push((collection, id));
                        }
                    }
                }
            } else if seen_ids.insert((job.client_id.as_str(), m.mutation_id)) {
                let i = *index.entry(job.client_id.as_str()).or_insert_with(|| {
                    earlier.push((job.client_id.as_str(), Vec::new()));
                    earlier.len() - 1
                });
                if let Some((_, ids)) = earlier.get_mut(i) {
                    ids.push(m.mutation_id);
                }
            }
        }
    }
    Wanted {
        docs,
        earlier,
        conflicts,
    }
}

/// The documents whose history conflict detection needs, given what [`wanted`] read: each
/// document a new mutation with a `base_version` touches whose stored version is newer than
/// that base, with the oldest such base. Most groups need none.
pub(crate) fn history_wanted<'a>(
    jobs: &'a [PushJob],
    lasts: &HashMap<String, u64>,
    docs: &HashMap<String, HashMap<String, StoredDoc>>,
) -> Vec<(&'a str, &'a str, u64)> {
    let mut out: Vec<(&str, &str, u64)> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    for job in jobs {
        let last = lasts.get(&job.client_id).copied().unwrap_or(0);
        for m in job.mutations.iter().filter(|m| m.mutation_id > last) {
            let Some(base) = m.base_version else { continue };
            let stored = docs.get(&m.collection).and_then(|ids| ids.get(&m.id));
            if stored.is_none_or(|d| d.version <= base) {
                continue;
            }
            let key = (m.collection.as_str(), m.id.as_str());
            match index.get(&key).and_then(|i| out.get_mut(*i)) {
                Some(entry) => entry.2 = entry.2.min(base),
                None => {
                    index.insert(key, out.len());
                    out.push((key.0, key.1, base));
                }
            }
        }
    }
    out
}

/// The collections whose compaction horizon the conflict step needs, each once: those of the
/// documents in `history` (their history may be cut short by compaction) and of new
/// mutations based on a version of a document that has no row any more (deleted, and the
/// tombstone purged by compaction).
pub(crate) fn horizons_wanted<'a>(
    jobs: &'a [PushJob],
    lasts: &HashMap<String, u64>,
    docs: &HashMap<String, HashMap<String, StoredDoc>>,
    history: &[(&'a str, &'a str, u64)],
) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    let mut add = |c: &'a str| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    for (c, _, _) in history {
        add(c);
    }
    for job in jobs {
        let last = lasts.get(&job.client_id).copied().unwrap_or(0);
        for m in job.mutations.iter().filter(|m| m.mutation_id > last) {
            if m.base_version.is_some_and(|b| b > 0)
                && docs
                    .get(&m.collection)
                    .and_then(|ids| ids.get(&m.id))
                    .is_none()
            {
                add(&m.collection);
            }
        }
    }
    out
}

/// A document's state as the group goes: as stored, or as an earlier mutation of the group
/// left it.
#[derive(Debug, Clone)]
struct DocNow {
    body: Option<Body>,
    encoded: Option<Bytes>,
    version: u64,
    deleted: bool,
}

/// What one mutation above its client's horizon does: a new change, a rejection, or a
/// refusal by its conflict policy.
enum Effect {
    Change {
        op: ChangeOp,
        body: Option<Body>,
        encoded: Option<Bytes>,
    },
    Rejected(ErrorCode, String),
    Conflict(Box<(ConflictRow, MutationResult)>),
}

/// What the conflict step adds to an applied change: the audit row (its applied version is
/// set once the seq is known) and the `manual` conflict it resolves.
#[derive(Default)]
struct Decided {
    audit: Option<ConflictRow>,
    resolves: Option<(String, u64)>,
}

/// One side of a conflict: a document's body and the bytes it is stored as (`None`: absent,
/// or deleted).
#[derive(Clone, Copy)]
struct Side<'b> {
    body: Option<&'b Body>,
    encoded: Option<&'b Bytes>,
}

/// The changes to a document after a base version, as conflict detection sees them.
struct Since {
    /// The fields other clients changed.
    others: FieldSet,
    /// Those other clients, each once, in order.
    other_clients: Vec<String>,
    /// The body at the base version (`None` inside: it did not exist); `None`: unknown.
    base_body: Option<Option<Body>>,
}

/// Plans a group: `head` is the log head read under the head lock, `pre` what was prefetched
/// for these jobs ([`clients`], then [`wanted`]). Pure: the same inputs give the same plan.
///
/// A job is all or nothing at this level: if it would write more than
/// `rules.max_batch_output_bytes` of bodies to the log, its effects are undone and it is
/// refused (`batch_output_too_large`), and every later job of the same client in the group is
/// refused with `replay_required` — a later batch never commits past one that was not applied.
pub(crate) fn plan(jobs: &[PushJob], head: u64, pre: &Prefetched, rules: &Rules) -> Plan {
    let mut g = Group {
        pre,
        rules,
        next: head,
        docs: HashMap::new(),
        doc_order: Vec::new(),
        changes: Vec::new(),
        rejections: Vec::new(),
        horizons: HashMap::new(),
        client_order: Vec::new(),
        in_group: HashMap::new(),
        refused: HashMap::new(),
        usage: HashMap::new(),
        usage_order: Vec::new(),
        unstored: 0,
        doc_changes: HashMap::new(),
        conflicts: Vec::new(),
        resolutions: Vec::new(),
    };
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs {
        outcomes.push(g.job(job));
    }
    let Group {
        next,
        mut docs,
        doc_order,
        changes,
        rejections,
        horizons,
        client_order,
        usage,
        usage_order,
        conflicts,
        resolutions,
        ..
    } = g;
    let usage = usage_order
        .into_iter()
        .filter_map(|user| {
            let (documents, sync_errors) = usage.get(user).copied()?;
            ((documents, sync_errors) != (0, 0)).then(|| UsageRow {
                user: user.to_owned(),
                documents,
                sync_errors,
            })
        })
        .collect();
    let documents = doc_order
        .into_iter()
        .filter_map(|key| {
            let d = docs.remove(&key)?;
            Some(DocumentRow {
                collection: key.0.to_owned(),
                id: key.1.to_owned(),
                body: d.encoded,
                version: d.version,
                deleted: d.deleted,
            })
        })
        .collect();
    let clients = client_order
        .into_iter()
        .filter_map(|c| {
            let (last, user) = horizons.get(c)?;
            Some(ClientRow {
                client_id: c.to_owned(),
                last_mutation: *last,
                user: (*user).to_owned(),
            })
        })
        .collect();
    let entries = changes.iter().map(|c| c.entry.clone()).collect();
    Plan {
        outcomes,
        rows: GroupRows {
            changes,
            documents,
            rejections,
            clients,
            usage,
            conflicts,
            resolutions,
        },
        committed: Committed {
            from: head,
            to: next,
            entries,
        },
    }
}

/// A group being planned: the state its jobs build up, in job order.
struct Group<'a> {
    pre: &'a Prefetched,
    rules: &'a Rules,
    /// The last seq handed out.
    next: u64,
    /// Documents as the group has left them so far.
    docs: HashMap<(&'a str, &'a str), DocNow>,
    /// Documents in the order the group first touched them.
    doc_order: Vec<(&'a str, &'a str)>,
    changes: Vec<ChangeRow>,
    rejections: Vec<RejectionRow>,
    /// Each client's horizon as the group goes, and the user it is written for.
    horizons: HashMap<&'a str, (u64, &'a str)>,
    /// Clients in the order their horizons are written.
    client_order: Vec<&'a str>,
    /// Outcomes of mutations handled earlier in this same group, for replays within it.
    in_group: HashMap<(&'a str, u64), MutationResult>,
    /// Clients with a job refused in this group, and the first id they must push again.
    refused: HashMap<&'a str, u64>,
    /// Per user, what the group changed: (documents created minus deleted, rejections).
    usage: HashMap<&'a str, (i64, i64)>,
    /// Users in the order their usage first changed.
    usage_order: Vec<&'a str>,
    /// Rejections answered but not stored, so far.
    unstored: usize,
    /// Per document, the indexes in `changes` of the group's changes to it.
    doc_changes: HashMap<(&'a str, &'a str), Vec<usize>>,
    /// Conflict decisions to audit.
    conflicts: Vec<ConflictRow>,
    /// `manual` conflicts the group resolved.
    resolutions: Vec<ResolutionRow>,
}

/// What one job changed in a [`Group`], so that it can be undone.
struct Undo<'a> {
    next: u64,
    changes: usize,
    rejections: usize,
    doc_order: usize,
    client_order: usize,
    /// Each document the job wrote, with what the group held for it before (in order).
    docs: Vec<((&'a str, &'a str), Option<DocNow>)>,
    /// Replay outcomes the job recorded.
    in_group: Vec<(&'a str, u64)>,
    /// The job's user, and its usage before the job.
    user: &'a str,
    usage: Option<(i64, i64)>,
    usage_order: usize,
    conflicts: usize,
    resolutions: usize,
}

impl<'a> Group<'a> {
    fn job(&mut self, job: &'a PushJob) -> Result<PushOutcome, GatewayError> {
        let client = job.client_id.as_str();
        // The user that owns the client id: as stored, or as the group's first job of it
        // claims it. Another user's batch touches nothing of it, not even its horizon.
        let owner = self
            .pre
            .owners
            .get(client)
            .map(String::as_str)
            .or_else(|| self.horizons.get(client).map(|(_, user)| *user));
        if owner.is_some_and(|o| o != job.user) {
            return Err(GatewayError::ClientIdTaken);
        }
        if let Some(&fence) = self.refused.get(client) {
            return Err(GatewayError::ReplayRequired { fence });
        }
        let mut undo = Undo {
            next: self.next,
            changes: self.changes.len(),
            rejections: self.rejections.len(),
            doc_order: self.doc_order.len(),
            client_order: self.client_order.len(),
            docs: Vec::new(),
            in_group: Vec::new(),
            user: job.user.as_str(),
            usage: self.usage.get(job.user.as_str()).copied(),
            usage_order: self.usage_order.len(),
            conflicts: self.conflicts.len(),
            resolutions: self.resolutions.len(),
        };
        let stored = self.pre.lasts.get(client).copied().unwrap_or(0);
        let mut last = match self.horizons.get(client) {
            Some((l, _)) => *l,
            None => {
                self.client_order.push(client);
                stored
            }
        };
        let unstored_before = self.unstored;
        let mut results = Vec::with_capacity(job.mutations.len());
        // Bytes of bodies this job writes to the log, and how many of its changes fit.
        let mut output = 0usize;
        let mut fitting = 0usize;
        for m in &job.mutations {
            if m.mutation_id <= last {
                let earlier = if m.mutation_id <= stored {
                    self.pre
                        .earlier
                        .get(client)
                        .and_then(|ids| ids.get(&m.mutation_id))
                        .map(|e| e.result(m.mutation_id))
                } else {
                    self.in_group.get(&(client, m.mutation_id)).cloned()
                };
                results.push(earlier.unwrap_or_else(|| never_seen(m.mutation_id)));
                continue;
            }
            let result = self.mutation(job, m, &mut undo, &mut output);
            if output > self.rules.max_batch_output_bytes && fitting > 0 {
                self.undo(undo);
                let first = job.mutations.first().map_or(0, |m| m.mutation_id);
                self.refused.insert(client, first);
                return Err(GatewayError::BatchOutputTooLarge {
                    limit: self.rules.max_batch_output_bytes,
                    fitting,
                });
            }
            if result.status == MutationStatus::Applied {
                fitting += 1;
            }
            last = m.mutation_id;
            self.in_group
                .insert((client, m.mutation_id), result.clone());
            undo.in_group.push((client, m.mutation_id));
            results.push(result);
        }
        self.horizons.insert(client, (last, job.user.as_str()));
        let visible_at = results
            .iter()
            .filter(|r| r.status == MutationStatus::Applied)
            .filter_map(|r| r.version)
            .max()
            .unwrap_or(0);
        Ok(PushOutcome {
            results,
            visible_at,
            unstored_rejections: self.unstored - unstored_before,
        })
    }

    /// Applies or rejects one mutation above its client's horizon; adds the bytes it writes
    /// to the log to `output`.
    fn mutation(
        &mut self,
        job: &'a PushJob,
        m: &'a Mutation,
        undo: &mut Undo<'a>,
        output: &mut usize,
    ) -> MutationResult {
        let key = (m.collection.as_str(), m.id.as_str());
        let current = match self.docs.get(&key) {
            Some(d) => Some(d.clone()),
            None => self
                .pre
                .docs
                .get(&m.collection)
                .and_then(|ids| ids.get(&m.id))
                .map(|s| DocNow {
                    body: s.body.clone(),
                    encoded: s.encoded.clone(),
                    version: s.version,
                    deleted: s.deleted,
                }),
        };
        let version = current.as_ref().map(|d| d.version);
        let live = current.filter(|d| !d.deleted);
        let mut effect = match self.pre.captured.get(&m.collection) {
            Some(table) => Effect::Rejected(
                ErrorCode::CapturedCollection,
                format!(
                    "{} is captured from the table {table}: write the row there with SQL",
                    m.collection
                ),
            ),
            None => effect(
                m,
                &job.access,
                live.as_ref().and_then(|d| d.body.as_ref()),
                self.rules,
            ),
        };
        if let Effect::Change { .. } = &effect
            && let (Some(checks), Some(written)) =
                (self.rules.checks.get(&m.collection), m.body.as_ref())
            && let Some((field, target, id)) = checks
                .targets(written)
                .find(|(_, target, id)| !self.is_live(target, id))
        {
            effect = Effect::Rejected(
                ErrorCode::DanglingReference,
                format!(
                    "{}/{}: field {field:?} refers to {target}/{id}, which does not exist",
                    m.collection, m.id
                ),
            );
        }
        let mut decided = Decided::default();
        if let Effect::Change { body, encoded, .. } = &effect {
            let server = Side {
                body: live.as_ref().and_then(|d| d.body.as_ref()),
                encoded: live.as_ref().and_then(|d| d.encoded.as_ref()),
            };
            let mine = Side {
                body: body.as_ref(),
                encoded: encoded.as_ref(),
            };
            match self.decide(job, m, version, server, mine) {
                Ok(None) => {}
                Ok(Some((e, d))) => {
                    decided = d;
                    if let Some(e) = e {
                        effect = e;
                    }
                }
                Err(e) => effect = e,
            }
        }
        // What the document count of the writer changes by: a create adds one, a delete of
        // a live document takes one away. A create beyond the writer's quota is refused.
        let held = match &effect {
            Effect::Change { op, .. } => match (live.is_some(), op) {
                (false, ChangeOp::Upsert) => 1,
                (true, ChangeOp::Delete) => -1,
                _ => 0,
            },
            Effect::Rejected(..) | Effect::Conflict(..) => 0,
        };
        let quota = self.rules.max_documents_per_user;
        if held > 0 && quota > 0 {
            let user = job.user.as_str();
            let before = self.pre.usage.get(user).map_or(0, |u| u.0)
                + self.usage.get(user).map_or(0, |u| u.0);
            if before >= i64::try_from(quota).unwrap_or(i64::MAX) {
                effect = Effect::Rejected(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "this user holds {before} documents, the most allowed \
                         (max_documents_per_user = {quota}); delete some first"
                    ),
                );
            }
        }
        match effect {
            Effect::Change { op, body, encoded } => {
                self.count_usage(job.user.as_str(), held, 0);
                self.next += 1;
                let next = self.next;
                let (prev_body, prev_encoded) = match live {
                    Some(d) => (d.body, d.encoded),
                    None => (None, None),
                };
                *output += encoded.as_ref().map_or(0, Bytes::len)
                    + prev_encoded.as_ref().map_or(0, Bytes::len);
                let entry = LogEntry::with_encoded_body(
                    Change {
                        seq: next,
                        collection: m.collection.clone(),
                        id: m.id.clone(),
                        op,
                        body: body.clone(),
                    },
                    prev_body,
                    encoded.as_deref(),
                );
                let before = self.docs.insert(
                    key,
                    DocNow {
                        body,
                        encoded: encoded.clone(),
                        version: next,
                        deleted: op == ChangeOp::Delete,
                    },
                );
                if before.is_none() {
                    self.doc_order.push(key);
                }
                undo.docs.push((key, before));
                if let Some(mut audit) = decided.audit {
                    audit.applied_version = Some(next);
                    self.conflicts.push(audit);
                }
                if let Some((client_id, mutation_id)) = decided.resolves {
                    self.resolutions.push(ResolutionRow {
                        client_id,
                        mutation_id,
                        resolved_by: conflict_id(&job.client_id, m.mutation_id),
                        version: next,
                    });
                }
                self.doc_changes
                    .entry(key)
                    .or_default()
                    .push(self.changes.len());
                self.changes.push(ChangeRow {
                    entry: Arc::new(entry),
                    body: encoded,
                    prev_body: prev_encoded,
                    origin_client: job.client_id.clone(),
                    origin_mutation: m.mutation_id,
                });
                MutationResult::applied(m.mutation_id, next)
            }
            Effect::Conflict(refused) => {
                let (row, result) = *refused;
                self.conflicts.push(row);
                result
            }
            Effect::Rejected(code, reason) => {
                let user = job.user.as_str();
                let stored = self.pre.usage.get(user).map_or(0, |u| u.1)
                    + self.usage.get(user).map_or(0, |u| u.1);
                let quota = self.rules.max_sync_errors_per_user;
                if quota > 0 && stored >= i64::try_from(quota).unwrap_or(i64::MAX) {
                    // Answered, not kept: the client has the rejection (the SDK keeps it in
                    // its own rejected list); a replay of this id after a lost ack gets 400.
                    self.unstored += 1;
                    return MutationResult::rejected(m.mutation_id, code, reason);
                }
                self.count_usage(user, 0, 1);
                self.rejections.push(RejectionRow {
                    client_id: job.client_id.clone(),
                    mutation_id: m.mutation_id,
                    batch: job.batch,
                    code,
                    reason: reason.clone(),
                    mutation: to_msgpack(m),
                });
                MutationResult::rejected(m.mutation_id, code, reason)
            }
        }
    }

    /// The conflict step for a mutation that passed every check: `Ok(None)` when it does not
    /// conflict (blind, based on the current version, or only its own client changed the
    /// document since); otherwise what its policy decided — a replaced effect (a merge, a
    /// refusal) and what to record — or `Err` with a rejection (an unknown conflict id, a
    /// merge that fails the collection's checks).
    fn decide(
        &self,
        job: &'a PushJob,
        m: &'a Mutation,
        version: Option<u64>,
        server_side: Side<'_>,
        mine_side: Side<'_>,
    ) -> Result<Option<(Option<Effect>, Decided)>, Effect> {
        let (server, mine) = (server_side.body, mine_side.body);
        if let Some(named) = &m.resolves {
            let found = parse_conflict_id(named).and_then(|(client, mutation)| {
                let stored = self.pre.conflicts.get(&(client.to_owned(), mutation))?;
                (stored.collection == m.collection && stored.doc_id == m.id).then_some((
                    client,
                    mutation,
                    stored.open,
                ))
            });
            let Some((client, mutation, open)) = found else {
                return Err(Effect::Rejected(
                    ErrorCode::UnknownConflict,
                    format!(
                        "{}/{} has no conflict {named:?} to resolve",
                        m.collection, m.id
                    ),
                ));
            };
            let resolved_here = self
                .resolutions
                .iter()
                .any(|r| r.client_id == client && r.mutation_id == mutation);
            if open && !resolved_here {
                let decided = Decided {
                    audit: None,
                    resolves: Some((client.to_owned(), mutation)),
                };
                return Ok(Some((None, decided)));
            }
            // Resolved already (by another writer): this one is an ordinary write.
        }
        let horizon = self.pre.horizons.get(&m.collection).copied().unwrap_or(0);
        let version = match (m.base_version, version) {
            // The writer had a version the server has no row of: the document was deleted
            // and its tombstone purged by compaction, at or before the horizon.
            (Some(base), None) if base > 0 && base < horizon => Some(horizon),
            _ => version,
        };
        let (Some(base), Some(version)) = (m.base_version, version) else {
            return Ok(None);
        };
        if version <= base {
            return Ok(None);
        }
        let since = self.since(m, base, &job.client_id, version);
        if since.other_clients.is_empty() {
            return Ok(None);
        }
        let by_mine = match (m.op, m.body.as_ref(), &since.base_body) {
            (syncgate_protocol::MutationOp::Patch, Some(patch), _) => FieldSet::of_patch(patch),
            (syncgate_protocol::MutationOp::Put, _, Some(base_body)) => {
                FieldSet::diff(base_body.as_ref(), mine)
            }
            _ => FieldSet::All,
        };
        let c = Conflict {
            collection: &m.collection,
            id: &m.id,
            base_version: base,
            server_version: version,
            server,
            mine,
            changed_by_others: &since.others,
            changed_by_mine: &by_mine,
        };
        let resolver: &dyn ConflictResolver = match self.rules.resolvers.get(&m.collection) {
            Some(r) => r.as_ref(),
            None => &LastWriteWins,
        };
        let row = |outcome: Outcome| ConflictRow {
            client_id: job.client_id.clone(),
            mutation_id: m.mutation_id,
            collection: m.collection.clone(),
            id: m.id.clone(),
            policy: resolver.name().to_owned(),
            outcome,
            base_version: base,
            server_version: version,
            // The bytes both bodies are stored as already: not encoded again.
            server_body: server_side.encoded.cloned(),
            client_body: mine_side.encoded.cloned(),
            applied_version: None,
            other_clients: since.other_clients.clone(),
        };
        let (replaced, result) = match resolver.resolve(&c) {
            Resolution::Mine => (None, mine.cloned()),
            Resolution::Write(r) if r.as_ref() == mine => (None, r),
            Resolution::Write(r) => (Some(self.merged(job, m, r.clone())?), r),
            refusal @ (Resolution::Server | Resolution::Manual) => {
                let outcome = if refusal == Resolution::Manual {
                    Outcome::Open
                } else {
                    Outcome::Refused
                };
                let info = syncgate_protocol::ConflictInfo {
                    id: (outcome == Outcome::Open)
                        .then(|| conflict_id(&job.client_id, m.mutation_id)),
                    version,
                    body: server.cloned(),
                };
                let reason = refusal_reason(&m.collection, &m.id, resolver.name(), base, version);
                let result = MutationResult::conflict(m.mutation_id, reason, info);
                let refused = Effect::Conflict(Box::new((row(outcome), result)));
                return Ok(Some((Some(refused), Decided::default())));
            }
        };
        let decided = Decided {
            audit: applied_outcome(&c, result.as_ref()).map(row),
            resolves: None,
        };
        Ok(Some((replaced, decided)))
    }

    /// The effect of writing a resolver's merge instead of the mutation's own result: checked
    /// like any write (scope, schema, size).
    fn merged(&self, job: &PushJob, m: &Mutation, body: Option<Body>) -> Result<Effect, Effect> {
        let Some(b) = body else {
            return Ok(Effect::Change {
                op: ChangeOp::Delete,
                body: None,
                encoded: None,
            });
        };
        let rejected = |code, reason: String| {
            Effect::Rejected(
                code,
                format!(
                    "{}/{}: the conflict policy's merge {reason}",
                    m.collection, m.id
                ),
            )
        };
        if let Some(scope) = job.access.scope(&m.collection)
            && !scope.matches(&b)
        {
            return Err(rejected(
                ErrorCode::OutOfScope,
                format!("is outside your scope ({})", scope.describe()),
            ));
        }
        if let Some(checks) = self.rules.checks.get(&m.collection)
            && let Err((code, reason)) = checks.check(&b)
        {
            return Err(rejected(code, format!("fails a check: {reason}")));
        }
        let encoded = Bytes::from(to_msgpack(&b));
        let limit = self.rules.limits.max_document_bytes as usize;
        if encoded.len() > limit {
            return Err(rejected(
                ErrorCode::DocumentTooLarge,
                format!("is {} bytes, the limit is {limit}", encoded.len()),
            ));
        }
        Ok(Effect::Change {
            op: ChangeOp::Upsert,
            body: Some(b),
            encoded: Some(encoded),
        })
    }

    /// The changes to `m`'s document after `base`: stored ones, then the group's own. A
    /// document whose version is past `base` but whose log holds nothing after it (a log
    /// trimmed below the base) counts as changed everywhere by someone else.
    fn since(&self, m: &Mutation, base: u64, client: &str, version: u64) -> Since {
        let mut since = Since {
            others: FieldSet::none(),
            other_clients: Vec::new(),
            base_body: None,
        };
        let mut note = |origin: Option<&str>, prev: Option<&Body>, body: Option<&Body>| {
            if since.base_body.is_none() {
                since.base_body = Some(prev.cloned());
            }
            let Some(origin) = origin.filter(|o| *o != client) else {
                return;
            };
            since.others.extend(FieldSet::diff(prev, body));
            if !since.other_clients.iter().any(|o| o == origin) {
                since.other_clients.push(origin.to_owned());
            }
        };
        let key = (m.collection.clone(), m.id.clone());
        for h in self.pre.history.get(&key).into_iter().flatten() {
            if h.seq > base {
                note(
                    h.origin_client.as_deref(),
                    h.prev_body.as_ref(),
                    h.body.as_ref(),
                );
            }
        }
        let in_group = self
            .doc_changes
            .get(&(m.collection.as_str(), m.id.as_str()))
            .into_iter()
            .flatten()
            .filter_map(|i| self.changes.get(*i));
        for c in in_group {
            if c.entry.change.seq > base {
                note(
                    Some(c.origin_client.as_str()),
                    c.entry.prev_body.as_ref(),
                    c.entry.change.body.as_ref(),
                );
            }
        }
        let horizon = self.pre.horizons.get(&m.collection).copied().unwrap_or(0);
        if base < horizon {
            // Compaction removed changes after the base: who changed what since is unknown,
            // so the document counts as changed everywhere by someone else.
            since.others = FieldSet::All;
            since.base_body = None;
            since.other_clients.push("(compacted log)".to_owned());
        } else if since.base_body.is_none() && version > base {
            since.others = FieldSet::All;
            since.other_clients.push("(log trimmed)".to_owned());
        }
        since
    }

    /// Whether a document exists and is not deleted, as the group has left it so far.
    fn is_live(&self, collection: &'a str, id: &'a str) -> bool {
        match self.docs.get(&(collection, id)) {
            Some(d) => !d.deleted,
            None => self
                .pre
                .docs
                .get(collection)
                .and_then(|ids| ids.get(id))
                .is_some_and(|d| !d.deleted),
        }
    }

    /// Adds to a user's usage change in this group.
    fn count_usage(&mut self, user: &'a str, documents: i64, sync_errors: i64) {
        if documents == 0 && sync_errors == 0 {
            return;
        }
        let u = self.usage.entry(user).or_insert_with(|| (0, 0));
        if *u == (0, 0) && !self.usage_order.contains(&user) {
            self.usage_order.push(user);
        }
        u.0 += documents;
        u.1 += sync_errors;
    }

    /// Takes back everything one job did.
    fn undo(&mut self, undo: Undo<'a>) {
        self.next = undo.next;
        self.changes.truncate(undo.changes);
        self.rejections.truncate(undo.rejections);
        self.doc_order.truncate(undo.doc_order);
        self.client_order.truncate(undo.client_order);
        self.conflicts.truncate(undo.conflicts);
        self.resolutions.truncate(undo.resolutions);
        for (key, _) in &undo.docs {
            if let Some(indexes) = self.doc_changes.get_mut(key) {
                indexes.retain(|i| *i < undo.changes);
            }
        }
        for (key, before) in undo.docs.into_iter().rev() {
            match before {
                Some(d) => {
                    self.docs.insert(key, d);
                }
                None => {
                    self.docs.remove(&key);
                }
            }
        }
        for k in undo.in_group {
            self.in_group.remove(&k);
        }
        self.usage_order.truncate(undo.usage_order);
        match undo.usage {
            Some(before) => {
                self.usage.insert(undo.user, before);
            }
            None => {
                self.usage.remove(undo.user);
            }
        }
        // The client's horizon is written only when a job completes: nothing to take back.
    }
}

/// The result for an id below the client's horizon with no stored outcome: the client skipped
/// it (ids may have gaps). Nothing was applied for it and nothing ever will be.
fn never_seen(mutation_id: u64) -> MutationResult {
    MutationResult::rejected(
        mutation_id,
        ErrorCode::InvalidMutation,
        "mutation id is below the client's last applied mutation and was never seen",
    )
}

/// Checks one new mutation against the rules and the document's live body (`None`: it does
/// not exist or is deleted) and computes its effect.
fn effect(m: &Mutation, access: &Access, current: Option<&Body>, rules: &Rules) -> Effect {
    if !rules.collections.contains(&m.collection) {
        return Effect::Rejected(
            ErrorCode::UnknownCollection,
            format!("collection {:?} is not declared", m.collection),
        );
    }
    if let Some(required) = rules.write_roles.get(&m.collection)
        && !allowed(required, &access.roles)
    {
        return Effect::Rejected(
            ErrorCode::WriteForbidden,
            format!(
                "writing {:?} needs one of the roles {required:?}",
                m.collection
            ),
        );
    }
    if !is_valid_id(&m.id, rules.limits.max_id_bytes) {
        return Effect::Rejected(
            ErrorCode::InvalidDocumentId,
            format!(
                "document id must be 1..={} bytes without control characters",
                rules.limits.max_id_bytes
            ),
        );
    }
    if let Err((code, reason)) = check_shape(m.op, m.body.as_ref()) {
        return Effect::Rejected(code, reason);
    }
    let scope = access.scope(&m.collection);
    if let Some(scope) = scope {
        if let Some(claim) = scope.missing_claim() {
            return Effect::Rejected(
                ErrorCode::OutOfScope,
                format!(
                    "writing {:?} needs the token claim {claim:?} for its scope",
                    m.collection
                ),
            );
        }
        // Nothing about a document out of scope is said: not its body, not its version.
        if current.is_some_and(|b| !scope.matches(b)) {
            return Effect::Rejected(
                ErrorCode::OutOfScope,
                format!(
                    "{}/{} is outside your scope ({})",
                    m.collection,
                    m.id,
                    scope.describe()
                ),
            );
        }
    }
    let body = match apply(current, m.op, m.body.as_ref()) {
        Ok(b) => b,
        Err((ErrorCode::DocumentNotFound, _)) => {
            return Effect::Rejected(
                ErrorCode::DocumentNotFound,
                format!("{}/{} does not exist", m.collection, m.id),
            );
        }
        Err((code, reason)) => return Effect::Rejected(code, reason),
    };
    if let (Some(scope), Some(b)) = (scope, &body)
        && !scope.matches(b)
    {
        let verb = if current.is_some() { "move" } else { "create" };
        return Effect::Rejected(
            ErrorCode::OutOfScope,
            format!(
                "this would {verb} {}/{} outside your scope ({})",
                m.collection,
                m.id,
                scope.describe()
            ),
        );
    }
    if let (Some(checks), Some(b)) = (rules.checks.get(&m.collection), &body)
        && let Err((code, reason)) = checks.check(b)
    {
        return Effect::Rejected(code, format!("{}/{}: {reason}", m.collection, m.id));
    }
    let encoded = body.as_ref().map(|b| Bytes::from(to_msgpack(b)));
    if let Some(e) = &encoded
        && e.len() > rules.limits.max_document_bytes as usize
    {
        return Effect::Rejected(
            ErrorCode::DocumentTooLarge,
            format!(
                "document is {} bytes, the limit is {}",
                e.len(),
                rules.limits.max_document_bytes
            ),
        );
    }
    let op = if body.is_some() {
        ChangeOp::Upsert
    } else {
        ChangeOp::Delete
    };
    Effect::Change { op, body, encoded }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;
    use syncgate_protocol::MutationOp;
    use syncgate_protocol::codec::encode_change;

    fn body(fields: &[(&str, i64)]) -> Body {
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect()
    }

    fn m(
        mutation_id: u64,
        collection: &str,
        id: &str,
        op: MutationOp,
        b: Option<Body>,
    ) -> Mutation {
        Mutation {
            mutation_id,
            collection: collection.into(),
            id: id.into(),
            op,
            body: b,
            base_version: None,
            resolves: None,
        }
    }

    fn put(mutation_id: u64, id: &str, fields: &[(&str, i64)]) -> Mutation {
        m(
            mutation_id,
            "orders",
            id,
            MutationOp::Put,
            Some(body(fields)),
        )
    }

    fn patch(mutation_id: u64, id: &str, fields: &[(&str, i64)]) -> Mutation {
        m(
            mutation_id,
            "orders",
            id,
            MutationOp::Patch,
            Some(body(fields)),
        )
    }

    fn delete(mutation_id: u64, id: &str) -> Mutation {
        m(mutation_id, "orders", id, MutationOp::Delete, None)
    }

    fn job(client: &str, batch: u64, mutations: Vec<Mutation>) -> PushJob {
        PushJob {
            client_id: client.into(),
            user: format!("user-of-{client}"),
            access: Access::roles(&["operator"]).into(),
            batch,
            mutations,
        }
    }

    /// A job of a user whose token says `plant` (or has no plant claim), writing `orders`
    /// scoped by `plant = "claims.plant"`.
    fn plant_job(
        client: &str,
        batch: u64,
        plant: Option<i64>,
        mutations: Vec<Mutation>,
    ) -> PushJob {
        let collections = [(
            "orders".to_owned(),
            crate::config::CollectionConfig {
                scope: [("plant".to_owned(), "claims.plant".to_owned())].into(),
                ..Default::default()
            },
        )]
        .into();
        let identity = crate::auth::Identity {
            user: format!("user-of-{client}"),
            claims: plant
                .map(|p| ("plant".to_owned(), serde_json::Value::from(p)))
                .into_iter()
                .collect(),
            roles: vec![],
            valid_until: u64::MAX,
        };
        PushJob {
            access: Access::new(&identity, &collections).into(),
            ..job(client, batch, mutations)
        }
    }

    fn rules() -> Rules {
        Rules {
            collections: ["orders".to_owned(), "plans".to_owned()]
                .into_iter()
                .collect(),
            limits: Limits {
                max_document_bytes: 24,
                ..Limits::default()
            },
            max_batch_output_bytes: 1 << 20,
            write_roles: [("plans".to_owned(), vec!["planner".to_owned()])]
                .into_iter()
                .collect(),
            max_documents_per_user: 0,
            max_sync_errors_per_user: 0,
            checks: HashMap::new(),
            resolvers: HashMap::new(),
        }
    }

    /// The document quota: a user holding `quota` documents creates no more until a delete
    /// frees one; edits of existing documents go on; a refused job's usage is taken back;
    /// the usage rows say what the group changed per user.
    #[test]
    fn creates_beyond_the_document_quota_are_refused() {
        let db = Db {
            docs: vec![("o1", stored(4, Some(&[("qty", 1)])))],
            ..Db::default()
        };
        let jobs = vec![
            job(
                "a",
                1,
                vec![
                    put(1, "n1", &[("qty", 1)]),
                    put(2, "n2", &[("qty", 2)]),
                    patch(3, "o1", &[("qty", 3)]),
                    delete(4, "n1"),
                    put(5, "n3", &[("qty", 4)]),
                    put(6, "n4", &[("qty", 5)]),
                ],
            ),
            // Another user has a quota of its own.
            job("b", 1, vec![put(1, "m1", &[("qty", 1)])]),
        ];
        let mut pre = db.prefetch(&jobs);
        pre.usage.insert("user-of-a".into(), (1, 0));
        let rules = Rules {
            max_documents_per_user: 3,
            ..rules()
        };
        let plan = plan(&jobs, 10, &pre, &rules);
        let results: Vec<String> = plan
            .outcomes
            .iter()
            .map(|o| {
                o.as_ref()
                    .unwrap()
                    .results
                    .iter()
                    .map(show)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        assert_eq!(
            results,
            [
                "1:applied@11,2:applied@12,3:applied@13,4:applied@14,5:applied@15,6:rejected 409",
                "1:applied@16",
            ]
        );
        let usage: Vec<(&str, i64, i64)> = plan
            .rows
            .usage
            .iter()
            .map(|u| (u.user.as_str(), u.documents, u.sync_errors))
            .collect();
        assert_eq!(usage, [("user-of-a", 2, 1), ("user-of-b", 1, 0)]);
    }

    /// The stored-rejection quota: beyond it a rejection is answered with its code but not
    /// kept, and counted as unstored.
    #[test]
    fn rejections_beyond_the_quota_are_answered_not_stored() {
        let jobs = vec![job(
            "a",
            1,
            vec![
                patch(1, "x1", &[("qty", 1)]),
                patch(2, "x2", &[("qty", 1)]),
                put(3, "ok", &[("qty", 1)]),
                patch(4, "x3", &[("qty", 1)]),
            ],
        )];
        let mut pre = Db::default().prefetch(&jobs);
        pre.usage.insert("user-of-a".into(), (0, 1));
        let rules = Rules {
            max_sync_errors_per_user: 2,
            ..rules()
        };
        let plan = plan(&jobs, 10, &pre, &rules);
        let outcome = plan.outcomes[0].as_ref().unwrap();
        let results: Vec<String> = outcome.results.iter().map(show).collect();
        assert_eq!(
            results,
            [
                "1:rejected 405",
                "2:rejected 405",
                "3:applied@11",
                "4:rejected 405"
            ]
        );
        let stored: Vec<u64> = plan.rows.rejections.iter().map(|r| r.mutation_id).collect();
        assert_eq!(stored, [1], "one more fits the quota of 2");
        assert_eq!(outcome.unstored_rejections, 2);
        assert_eq!(
            plan.rows.usage,
            [UsageRow {
                user: "user-of-a".into(),
                documents: 1,
                sync_errors: 1
            }]
        );
    }

    fn stored(version: u64, fields: Option<&[(&str, i64)]>) -> StoredDoc {
        let b = fields.map(body);
        StoredDoc {
            encoded: b.as_ref().map(|b| Bytes::from(to_msgpack(b))),
            deleted: b.is_none(),
            body: b,
            version,
        }
    }

    /// What the database holds before the group.
    #[derive(Default)]
    struct Db {
        lasts: Vec<(&'static str, u64)>,
        owners: Vec<(&'static str, &'static str)>,
        docs: Vec<(&'static str, StoredDoc)>,
        earlier: Vec<(&'static str, u64, Earlier)>,
    }

    impl Db {
        /// Answers exactly what the planner says it wants under [`rules`], as storage does.
        fn prefetch(&self, jobs: &[PushJob]) -> Prefetched {
            self.prefetch_for(jobs, &rules())
        }

        /// Answers exactly what the planner says it wants under `rules`.
        fn prefetch_for(&self, jobs: &[PushJob], rules: &Rules) -> Prefetched {
            let lasts: HashMap<String, u64> = self
                .lasts
                .iter()
                .filter(|(c, _)| clients(jobs).contains(c))
                .map(|(c, l)| ((*c).to_owned(), *l))
                .collect();
            let w = wanted(jobs, &lasts, rules);
            let mut pre = Prefetched {
                lasts,
                owners: self
                    .owners
                    .iter()
                    .map(|(c, o)| ((*c).to_owned(), (*o).to_owned()))
                    .collect(),
                ..Prefetched::default()
            };
            for (c, id) in &w.docs {
                if let Some((_, d)) = self.docs.iter().find(|(i, _)| i == id) {
                    pre.docs
                        .entry((*c).to_owned())
                        .or_default()
                        .insert((*id).to_owned(), d.clone());
                }
            }
            for (client, ids) in &w.earlier {
                for (c, id, e) in &self.earlier {
                    if c == client && ids.contains(id) {
                        pre.earlier
                            .entry((*c).to_owned())
                            .or_default()
                            .insert(*id, e.clone());
                    }
                }
            }
            pre
        }
    }

    /// A result as `id:applied@seq` or `id:rejected CODE`.
    fn show(r: &MutationResult) -> String {
        match r.status {
            MutationStatus::Applied => {
                format!("{}:applied@{}", r.mutation_id, r.version.unwrap_or(0))
            }
            MutationStatus::Rejected => {
                format!("{}:rejected {}", r.mutation_id, r.code.unwrap_or(0))
            }
        }
    }

    struct Case {
        name: &'static str,
        db: Db,
        jobs: Vec<PushJob>,
        /// Per job, the results.
        results: Vec<Vec<&'static str>>,
        /// Final document rows: `id@version` or `id@version deleted`.
        documents: Vec<&'static str>,
        /// `client:last`.
        clients: Vec<&'static str>,
        /// `client:mutation_id:code`.
        rejections: Vec<&'static str>,
    }

    #[test]
    fn table() {
        let head = 10;
        let cases = vec![
            Case {
                name: "a put creates a document at the next seq",
                db: Db::default(),
                jobs: vec![job("a", 1, vec![put(1, "o1", &[("qty", 1)])])],
                results: vec![vec!["1:applied@11"]],
                documents: vec!["o1@11"],
                clients: vec!["a:1"],
                rejections: vec![],
            },
            Case {
                name: "a scoped writer creates, edits and deletes only in its scope, and moves nothing out",
                db: Db {
                    docs: vec![
                        ("a1", stored(4, Some(&[("plant", 1), ("qty", 1)]))),
                        ("a3", stored(5, Some(&[("plant", 1)]))),
                        ("b1", stored(6, Some(&[("plant", 2), ("qty", 9)]))),
                        ("gone", stored(7, None)),
                    ],
                    ..Db::default()
                },
                jobs: vec![
                    plant_job(
                        "a",
                        1,
                        Some(1),
                        vec![
                            put(1, "a2", &[("plant", 1)]),
                            put(2, "b2", &[("plant", 2)]),
                            put(3, "x", &[("qty", 1)]),
                            patch(4, "b1", &[("qty", 1)]),
                            delete(5, "b1"),
                            put(6, "b1", &[("plant", 1)]),
                            patch(7, "a1", &[("plant", 2)]),
                            put(8, "a1", &[("plant", 2)]),
                            patch(9, "a1", &[("qty", 5)]),
                            delete(10, "a3"),
                            put(11, "gone", &[("plant", 1)]),
                        ],
                    ),
                    plant_job("n", 1, None, vec![put(1, "a9", &[("plant", 1)])]),
                ],
                results: vec![
                    vec![
                        "1:applied@11",
                        "2:rejected 408",
                        "3:rejected 408",
                        "4:rejected 408",
                        "5:rejected 408",
                        "6:rejected 408",
                        "7:rejected 408",
                        "8:rejected 408",
                        "9:applied@12",
                        "10:applied@13",
                        "11:applied@14",
                    ],
                    vec!["1:rejected 408"],
                ],
                documents: vec!["a2@11", "a1@12", "a3@13 deleted", "gone@14"],
                clients: vec!["a:11", "n:1"],
                rejections: vec![
                    "a:2:408", "a:3:408", "a:4:408", "a:5:408", "a:6:408", "a:7:408", "a:8:408",
                    "n:1:408",
                ],
            },
            Case {
                name: "patch and delete of stored documents; a tombstone is not patched",
                db: Db {
                    docs: vec![
                        ("o1", stored(4, Some(&[("qty", 1)]))),
                        ("o2", stored(5, Some(&[("qty", 2)]))),
                        ("gone", stored(6, None)),
                    ],
                    ..Db::default()
                },
                jobs: vec![job(
                    "a",
                    1,
                    vec![
                        patch(1, "o1", &[("done", 1)]),
                        delete(2, "o2"),
                        patch(3, "gone", &[("x", 1)]),
                    ],
                )],
                results: vec![vec!["1:applied@11", "2:applied@12", "3:rejected 405"]],
                documents: vec!["o1@11", "o2@12 deleted"],
                clients: vec!["a:3"],
                rejections: vec!["a:3:405"],
            },
            Case {
                name: "every rule's rejection, each stored and each advancing the horizon",
                db: Db::default(),
                jobs: vec![job(
                    "a",
                    7,
                    vec![
                        m(1, "secrets", "s1", MutationOp::Put, Some(body(&[("x", 1)]))),
                        put(2, "", &[("x", 1)]),
                        m(3, "orders", "o1", MutationOp::Put, None),
                        m(4, "orders", "o1", MutationOp::Patch, Some(Body::new())),
                        m(
                            5,
                            "orders",
                            "o1",
                            MutationOp::Delete,
                            Some(body(&[("x", 1)])),
                        ),
                        patch(6, "missing", &[("x", 1)]),
                        put(
                            7,
                            "big",
                            &[
                                ("a", 1),
                                ("b", 2),
                                ("c", 3),
                                ("d", 4),
                                ("e", 5),
                                ("f", 6),
                                ("g", 7),
                                ("h", 8),
                                ("i", 9),
                                ("j", 10),
                                ("k", 11),
                            ],
                        ),
                        put(8, "ok", &[("x", 1)]),
                        m(9, "plans", "p1", MutationOp::Put, Some(body(&[("x", 1)]))),
                    ],
                )],
                results: vec![vec![
                    "1:rejected 300",
                    "2:rejected 403",
                    "3:rejected 400",
                    "4:rejected 400",
                    "5:rejected 400",
                    "6:rejected 405",
                    "7:rejected 402",
                    "8:applied@11",
                    "9:rejected 407",
                ]],
                documents: vec!["ok@11"],
                clients: vec!["a:9"],
                rejections: vec![
                    "a:1:300", "a:2:403", "a:3:400", "a:4:400", "a:5:400", "a:6:405", "a:7:402",
                    "a:9:407",
                ],
            },
            Case {
                name: "replays get their stored outcome; a skipped id is never applied later",
                db: Db {
                    lasts: vec![("a", 5)],
                    earlier: vec![
                        ("a", 5, Earlier::Applied { seq: 3 }),
                        (
                            "a",
                            4,
                            Earlier::Rejected {
                                code: 402,
                                reason: "too big".into(),
                            },
                        ),
                    ],
                    ..Db::default()
                },
                jobs: vec![job(
                    "a",
                    2,
                    vec![
                        put(2, "o1", &[("x", 1)]),
                        put(4, "o1", &[("x", 1)]),
                        put(5, "o1", &[("x", 1)]),
                        put(6, "o1", &[("x", 2)]),
                    ],
                )],
                results: vec![vec![
                    "2:rejected 400",
                    "4:rejected 402",
                    "5:applied@3",
                    "6:applied@11",
                ]],
                documents: vec!["o1@11"],
                clients: vec!["a:6"],
                rejections: vec![],
            },
            Case {
                name: "a batch sent again while the first is in the same group gets the same results",
                db: Db::default(),
                jobs: vec![
                    job(
                        "a",
                        1,
                        vec![put(1, "o1", &[("x", 1)]), put(3, "o2", &[("x", 1)])],
                    ),
                    job(
                        "a",
                        2,
                        vec![
                            put(1, "o1", &[("x", 9)]),
                            put(2, "o2", &[("x", 9)]),
                            put(3, "o2", &[("x", 9)]),
                            put(4, "o3", &[("x", 1)]),
                        ],
                    ),
                ],
                results: vec![
                    vec!["1:applied@11", "3:applied@12"],
                    vec![
                        "1:applied@11",
                        "2:rejected 400",
                        "3:applied@12",
                        "4:applied@13",
                    ],
                ],
                documents: vec!["o1@11", "o2@12", "o3@13"],
                clients: vec!["a:4"],
                rejections: vec![],
            },
            Case {
                name: "another user's batch for a client id touches nothing of it",
                db: Db {
                    lasts: vec![("alice-terminal", 5)],
                    owners: vec![("alice-terminal", "user-of-alice-terminal")],
                    ..Db::default()
                },
                jobs: vec![
                    PushJob {
                        user: "mallory".into(),
                        ..job("alice-terminal", 1, vec![put(1000, "o1", &[("x", 1)])])
                    },
                    job("fresh", 1, vec![put(1, "o2", &[("x", 1)])]),
                    PushJob {
                        user: "mallory".into(),
                        ..job("fresh", 2, vec![put(2, "o3", &[("x", 1)])])
                    },
                    job("alice-terminal", 2, vec![put(6, "o4", &[("x", 1)])]),
                ],
                results: vec![
                    vec!["refused 203"],
                    vec!["1:applied@11"],
                    vec!["refused 203"],
                    vec!["6:applied@12"],
                ],
                documents: vec!["o2@11", "o4@12"],
                clients: vec!["fresh:1", "alice-terminal:6"],
                rejections: vec![],
            },
            Case {
                name: "several clients interleave in job order on one document",
                db: Db {
                    lasts: vec![("b", 9)],
                    docs: vec![("o1", stored(2, Some(&[("qty", 1)])))],
                    ..Db::default()
                },
                jobs: vec![
                    job("a", 1, vec![patch(1, "o1", &[("qty", 2)])]),
                    job(
                        "b",
                        1,
                        vec![patch(10, "o1", &[("qty", 3)]), delete(11, "o1")],
                    ),
                    job(
                        "a",
                        2,
                        vec![patch(2, "o1", &[("qty", 4)]), put(3, "o1", &[("qty", 5)])],
                    ),
                ],
                results: vec![
                    vec!["1:applied@11"],
                    vec!["10:applied@12", "11:applied@13"],
                    vec!["2:rejected 405", "3:applied@14"],
                ],
                documents: vec!["o1@14"],
                clients: vec!["a:3", "b:11"],
                rejections: vec!["a:2:405"],
            },
        ];
        for case in cases {
            let pre = case.db.prefetch(&case.jobs);
            let plan = plan(&case.jobs, head, &pre, &rules());
            let results: Vec<Vec<String>> = plan
                .outcomes
                .iter()
                .map(|o| match o {
                    Ok(o) => o.results.iter().map(show).collect(),
                    Err(e) => vec![format!("refused {}", e.code().code())],
                })
                .collect();
            assert_eq!(results, case.results, "{}: results", case.name);
            for o in plan.outcomes.iter().flatten() {
                let max = o
                    .results
                    .iter()
                    .filter(|r| r.status == MutationStatus::Applied)
                    .filter_map(|r| r.version)
                    .max()
                    .unwrap_or(0);
                assert_eq!(o.visible_at, max, "{}: visible_at", case.name);
            }
            let documents: Vec<String> = plan
                .rows
                .documents
                .iter()
                .map(|d| {
                    format!(
                        "{}@{}{}",
                        d.id,
                        d.version,
                        if d.deleted { " deleted" } else { "" }
                    )
                })
                .collect();
            assert_eq!(documents, case.documents, "{}: documents", case.name);
            let clients: Vec<String> = plan
                .rows
                .clients
                .iter()
                .map(|c| format!("{}:{}", c.client_id, c.last_mutation))
                .collect();
            assert_eq!(clients, case.clients, "{}: clients", case.name);
            let rejections: Vec<String> = plan
                .rows
                .rejections
                .iter()
                .map(|r| format!("{}:{}:{}", r.client_id, r.mutation_id, r.code.code()))
                .collect();
            assert_eq!(rejections, case.rejections, "{}: rejections", case.name);
            // The log: contiguous seqs after the head, one entry per applied mutation.
            let seqs: Vec<u64> = plan
                .rows
                .changes
                .iter()
                .map(|c| c.entry.change.seq)
                .collect();
            let expected: Vec<u64> = (head + 1..=plan.committed.to).collect();
            assert_eq!(seqs, expected, "{}: seqs", case.name);
            assert_eq!(plan.committed.from, head);
            assert_eq!(plan.committed.entries.len(), plan.rows.changes.len());
        }
    }

    #[test]
    fn each_body_is_encoded_once_and_the_previous_body_is_passed_on_as_stored() {
        let first = stored(4, Some(&[("qty", 1)]));
        let db = Db {
            docs: vec![("o1", first.clone())],
            ..Db::default()
        };
        let jobs = vec![job(
            "a",
            1,
            vec![
                patch(1, "o1", &[("done", 1)]),
                patch(2, "o1", &[("qty", 7)]),
                delete(3, "o1"),
            ],
        )];
        let plan = plan(&jobs, 10, &db.prefetch(&jobs), &rules());
        let [one, two, three] = &plan.rows.changes[..] else {
            panic!("three changes expected: {:?}", plan.rows.changes);
        };
        // The first change's previous body is the stored bytes themselves.
        assert_eq!(one.prev_body, first.encoded);
        assert_eq!(one.entry.prev_body, first.body);
        // Each later change's previous body is the bytes the change before it wrote.
        assert_eq!(two.prev_body, one.body);
        assert_eq!(three.prev_body, two.body);
        assert_eq!(three.body, None);
        for c in [one, two, three] {
            assert_eq!(
                c.body,
                c.entry
                    .change
                    .body
                    .as_ref()
                    .map(|b| Bytes::from(to_msgpack(b)))
            );
            assert_eq!(
                c.entry.encoded.as_ref(),
                encode_change(&c.entry.change).as_slice()
            );
        }
        assert_eq!(
            two.entry.change.body,
            Some(body(&[("done", 1), ("qty", 7)]))
        );
        // The document row carries the final state only.
        assert_eq!(
            plan.rows.documents,
            vec![DocumentRow {
                collection: "orders".into(),
                id: "o1".into(),
                body: None,
                version: 13,
                deleted: true,
            }]
        );
    }

    #[test]
    fn a_batch_that_would_write_too_much_is_undone_whole_and_not_overtaken() {
        let text = |t: &str| -> Body { [("t".to_owned(), Value::from(t))].into_iter().collect() };
        let put_text =
            |mid: u64, id: &str, t: &str| m(mid, "orders", id, MutationOp::Put, Some(text(t)));
        let db = Db {
            docs: vec![("o1", stored(3, Some(&[("qty", 1)])))],
            ..Db::default()
        };
        let jobs = vec![
            // Another client changes o1 first.
            job("c", 1, vec![put_text(1, "o1", "c")]),
            // Client a: each put writes a new body of 8 bytes; over o1 also its previous body
            // (c's, 5 bytes): 8, 21, then 29 > 28.
            job(
                "a",
                1,
                vec![
                    put_text(1, "o2", "aaaa"),
                    put_text(2, "o1", "aaaa"),
                    put_text(3, "o3", "aaaa"),
                    put_text(4, "o4", "aaaa"),
                ],
            ),
            job("a", 2, vec![put_text(5, "o5", "a")]),
            job("b", 1, vec![put_text(1, "o9", "b")]),
        ];
        let rules = Rules {
            max_batch_output_bytes: 28,
            ..rules()
        };
        let plan = plan(&jobs, 10, &db.prefetch(&jobs), &rules);
        let outcomes: Vec<String> = plan
            .outcomes
            .iter()
            .map(|o| match o {
                Ok(o) => o.results.iter().map(show).collect::<Vec<_>>().join(","),
                Err(e) => format!("{e:?}"),
            })
            .collect();
        assert_eq!(
            outcomes,
            vec![
                "1:applied@11".to_owned(),
                "BatchOutputTooLarge { limit: 28, fitting: 2 }".to_owned(),
                "ReplayRequired { fence: 1 }".to_owned(),
                "1:applied@12".to_owned(),
            ]
        );
        // Nothing of a's batches is written; o1 keeps c's change; seqs stay contiguous.
        let docs: Vec<(String, u64)> = plan
            .rows
            .documents
            .iter()
            .map(|d| (d.id.clone(), d.version))
            .collect();
        assert_eq!(docs, vec![("o1".to_owned(), 11), ("o9".to_owned(), 12)]);
        let o1 = plan.rows.documents.first().unwrap();
        assert_eq!(o1.body, Some(Bytes::from(to_msgpack(&text("c")))));
        let clients: Vec<&str> = plan
            .rows
            .clients
            .iter()
            .map(|c| c.client_id.as_str())
            .collect();
        assert_eq!(clients, vec!["c", "b"], "a's horizon does not move");
        let usage: Vec<(&str, i64)> = plan
            .rows
            .usage
            .iter()
            .map(|u| (u.user.as_str(), u.documents))
            .collect();
        // c edited an existing document; a's two creates were taken back with its batch.
        assert_eq!(
            usage,
            vec![("user-of-b", 1)],
            "a's documents are not counted"
        );
        let seqs: Vec<u64> = plan
            .rows
            .changes
            .iter()
            .map(|c| c.entry.change.seq)
            .collect();
        assert_eq!(seqs, vec![11, 12]);
        assert_eq!(plan.committed.to, 12);
    }

    #[test]
    fn wanted_reads_documents_above_the_horizon_and_outcomes_at_or_below_it() {
        let jobs = vec![
            job(
                "a",
                1,
                vec![put(3, "o1", &[]), put(5, "o2", &[]), put(6, "o1", &[])],
            ),
            job("b", 1, vec![put(1, "o3", &[])]),
            job("a", 2, vec![put(4, "o9", &[]), put(7, "o4", &[])]),
        ];
        let lasts: HashMap<String, u64> = [("a".to_owned(), 5)].into_iter().collect();
        assert_eq!(clients(&jobs), vec!["a", "b"]);
        assert_eq!(
            wanted(&jobs, &lasts, &rules()),
            Wanted {
                docs: vec![("orders", "o1"), ("orders", "o3"), ("orders", "o4")],
                earlier: vec![("a", vec![3, 5, 4])],
                conflicts: vec![],
            }
        );
    }

    /// References and schema checks: a dangling reference, a missing required field and a
    /// wrong type are each rejected with their code and stored, and the mutations after them
    /// still apply; a reference to a document created earlier in the batch, or stored and
    /// live, is fine; one to a stored but deleted document dangles; a patch that does not
    /// write the reference is not checked for it. Every referenced id is prefetched.
    #[test]
    fn references_and_schema_checks_reject_one_mutation_and_the_rest_apply() {
        use crate::config::{CollectionConfig, FieldType};
        let config = CollectionConfig {
            schema: [("p".to_owned(), FieldType::Integer)].into(),
            required: vec!["p".into()],
            references: [("m".to_owned(), "machines".to_owned())].into(),
            ..CollectionConfig::default()
        };
        let rules = Rules {
            collections: ["orders".to_owned(), "machines".to_owned()]
                .into_iter()
                .collect(),
            checks: [(
                "orders".to_owned(),
                DocChecks::from_config(&config).unwrap(),
            )]
            .into(),
            ..rules()
        };
        let order = |mid: u64, id: &str, machine: Option<&str>, p: Option<Value>| {
            let mut b = Body::new();
            if let Some(p) = p {
                b.insert("p".into(), p);
            }
            if let Some(machine) = machine {
                b.insert("m".into(), Value::from(machine));
            }
            m(mid, "orders", id, MutationOp::Put, Some(b))
        };
        let jobs = vec![job(
            "a",
            1,
            vec![
                order(1, "o1", Some("M1"), Some(Value::from(1))),
                m(2, "machines", "M1", MutationOp::Put, Some(Body::new())),
                order(3, "o2", Some("M1"), Some(Value::from(1))),
                order(4, "o3", Some("M1"), None),
                order(5, "o4", None, Some(Value::from("x"))),
                patch(6, "o2", &[("q", 2)]),
                order(7, "o5", Some("M9"), Some(Value::from(1))),
                order(8, "o6", Some("MD"), Some(Value::from(1))),
            ],
        )];
        let db = Db {
            docs: vec![("M9", stored(3, Some(&[]))), ("MD", stored(4, None))],
            ..Db::default()
        };
        let lasts = HashMap::new();
        let w = wanted(&jobs, &lasts, &rules);
        for key in [("machines", "M1"), ("machines", "M9"), ("machines", "MD")] {
            assert!(
                w.docs.contains(&key),
                "{key:?} not prefetched: {:?}",
                w.docs
            );
        }
        let pre = db.prefetch_for(&jobs, &rules);
        let plan = plan(&jobs, 10, &pre, &rules);
        let results: Vec<String> = plan.outcomes[0]
            .as_ref()
            .unwrap()
            .results
            .iter()
            .map(show)
            .collect();
        assert_eq!(
            results,
            [
                "1:rejected 412",
                "2:applied@11",
                "3:applied@12",
                "4:rejected 410",
                "5:rejected 411",
                "6:applied@13",
                "7:applied@14",
                "8:rejected 412",
            ]
        );
        let stored: Vec<(u64, u16)> = plan
            .rows
            .rejections
            .iter()
            .map(|r| (r.mutation_id, r.code.code()))
            .collect();
        assert_eq!(stored, [(1, 412), (4, 410), (5, 411), (8, 412)]);
        let reason = &plan.rows.rejections[0].reason;
        assert!(
            reason.contains("\"m\"") && reason.contains("machines/M1"),
            "{reason}"
        );
    }
}
