//! Property tests of the conflict policies, one per policy: three replicas write the same two
//! documents concurrently, push in random groups, lose acknowledgements and replay, receive
//! the log at random paces, and resolve `manual` conflicts. The server is the real planner
//! over an in-memory log that keeps exactly what storage keeps. At the end every replica holds
//! the server's state, every mutation has exactly one outcome (a replay gets the same one),
//! every overwrite or refusal of a concurrent change has an audit row — derived again from the
//! log, not from the planner — and each policy's own promise holds.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use rmpv::Value;
use syncgate_protocol::codec::from_msgpack;
use syncgate_protocol::{Body, ErrorCode, Limits, Mutation, MutationOp, MutationStatus};

use super::plan::{self, Prefetched, PushJob, Rules};
use crate::auth::scope::Access;
use crate::config::{CollectionConfig, ConflictPolicy};
use crate::conflict::{self, FieldSet, Outcome};
use crate::storage::{
    ConflictRow, Earlier, HistoryRow, RefusedConflict, StoredConflict, StoredDoc,
};

const COLLECTION: &str = "orders";
const DOCS: [&str; 2] = ["d1", "d2"];
const FIELDS: [&str; 3] = ["status", "a", "b"];
const STATUSES: [&str; 4] = ["cancelled", "completed", "in_progress", "open"];

/// One change in the log, as `sg_changes` keeps it.
#[derive(Debug, Clone)]
struct Logged {
    seq: u64,
    id: String,
    origin: String,
    mutation: u64,
    prev: Option<Body>,
    body: Option<Body>,
}

/// The server: the real planner over in-memory tables.
#[derive(Default)]
struct Server {
    head: u64,
    docs: HashMap<String, StoredDoc>,
    log: Vec<Logged>,
    lasts: HashMap<String, u64>,
    rejected: HashMap<(String, u64), Earlier>,
    conflicts: Vec<ConflictRow>,
    /// (client, mutation) of each `manual` conflict -> still open.
    open: HashMap<(String, u64), bool>,
    /// Resolutions: (conflict's client, mutation) -> the resolving change's version.
    resolved: HashMap<(String, u64), u64>,
}

impl Server {
    /// One group commit: prefetch exactly as `commit_group` does, plan, write the rows.
    fn commit(
        &mut self,
        jobs: &[PushJob],
        rules: &Rules,
    ) -> Vec<Vec<syncgate_protocol::MutationResult>> {
        let mut pre = Prefetched::default();
        for c in plan::clients(jobs) {
            if let Some(l) = self.lasts.get(c) {
                pre.lasts.insert(c.to_owned(), *l);
                pre.owners.insert(c.to_owned(), format!("user-of-{c}"));
            }
        }
        let wanted = plan::wanted(jobs, &pre.lasts, rules);
        for (c, id) in &wanted.docs {
            if let Some(d) = self.docs.get(*id) {
                pre.docs
                    .entry((*c).to_owned())
                    .or_default()
                    .insert((*id).to_owned(), d.clone());
            }
        }
        for (client, ids) in &wanted.earlier {
            for id in ids {
                if let Some(e) = self.earlier(client, *id) {
                    pre.earlier
                        .entry((*client).to_owned())
                        .or_default()
                        .insert(*id, e);
                }
            }
        }
        for (c, id, after) in plan::history_wanted(jobs, &pre.lasts, &pre.docs) {
            let rows = self
                .log
                .iter()
                .filter(|l| l.id == id && l.seq > after)
                .map(|l| HistoryRow {
                    seq: l.seq,
                    origin_client: Some(l.origin.clone()),
                    body: l.body.clone(),
                    prev_body: l.prev.clone(),
                })
                .collect();
            pre.history.insert((c.to_owned(), id.to_owned()), rows);
        }
        for (client, mutation) in &wanted.conflicts {
            let key = ((*client).to_owned(), *mutation);
            if let Some(open) = self.open.get(&key) {
                let row = self
                    .conflicts
                    .iter()
                    .find(|r| r.client_id == key.0 && r.mutation_id == key.1);
                if let Some(row) = row {
                    pre.conflicts.insert(
                        key,
                        StoredConflict {
                            collection: row.collection.clone(),
                            doc_id: row.id.clone(),
                            open: *open,
                        },
                    );
                }
            }
        }
        let plan = plan::plan(jobs, self.head, &pre, rules);
        let rows = plan.rows;
        for c in &rows.changes {
            let ch = &c.entry.change;
            self.log.push(Logged {
                seq: ch.seq,
                id: ch.id.clone(),
                origin: c.origin_client.clone(),
                mutation: c.origin_mutation,
                prev: c.entry.prev_body.clone(),
                body: ch.body.clone(),
            });
        }
        for d in &rows.documents {
            let body: Option<Body> = d.body.as_ref().map(|b| from_msgpack(b).unwrap());
            self.docs.insert(
                d.id.clone(),
                StoredDoc {
                    body,
                    encoded: d.body.clone(),
                    version: d.version,
                    deleted: d.deleted,
                },
            );
        }
        for r in &rows.rejections {
            self.rejected.insert(
                (r.client_id.clone(), r.mutation_id),
                Earlier::Rejected {
                    code: r.code.code(),
                    reason: r.reason.clone(),
                },
            );
        }
        for c in rows.clients {
            self.lasts.insert(c.client_id, c.last_mutation);
        }
        for r in rows.conflicts {
            if r.outcome == Outcome::Open {
                self.open.insert((r.client_id.clone(), r.mutation_id), true);
            }
            self.conflicts.push(r);
        }
        for r in rows.resolutions {
            let key = (r.client_id, r.mutation_id);
            assert_eq!(
                self.open.insert(key.clone(), false),
                Some(true),
                "resolved twice"
            );
            self.resolved.insert(key, r.version);
        }
        self.head = plan.committed.to;
        plan.outcomes
            .into_iter()
            .map(|o| o.expect("no job is refused here").results)
            .collect()
    }

    /// A mutation's stored outcome, as `earlier_outcomes` reads it.
    fn earlier(&self, client: &str, id: u64) -> Option<Earlier> {
        if let Some(l) = self
            .log
            .iter()
            .find(|l| l.origin == client && l.mutation == id)
        {
            return Some(Earlier::Applied { seq: l.seq });
        }
        if let Some(e) = self.rejected.get(&(client.to_owned(), id)) {
            return Some(e.clone());
        }
        let c = self
            .conflicts
            .iter()
            .find(|c| c.client_id == client && c.mutation_id == id && c.outcome.refused())?;
        Some(Earlier::Conflict(Box::new(RefusedConflict {
            id: (c.outcome == Outcome::Open).then(|| conflict::conflict_id(client, id)),
            collection: c.collection.clone(),
            doc_id: c.id.clone(),
            policy: c.policy.clone(),
            base_version: c.base_version,
            server_version: c.server_version,
            server_body: c.server_body.as_ref().map(|b| from_msgpack(b).unwrap()),
        })))
    }

    /// The body of a document as of `version` (`None`: absent or deleted then).
    fn body_at(&self, id: &str, version: u64) -> Option<Body> {
        self.log
            .iter()
            .rfind(|l| l.id == id && l.seq <= version)
            .and_then(|l| l.body.clone())
    }
}

/// A replica: the server state it has received, and its outbox.
#[derive(Default)]
struct Replica {
    id: String,
    next: u64,
    batch: u64,
    /// doc -> (version, body) as delivered.
    server: HashMap<String, (u64, Option<Body>)>,
    cursor: usize,
    pending: Vec<Mutation>,
    /// `manual` conflicts this replica was told of: (conflict id, doc, its intended body).
    conflicts: Vec<(String, String, Option<Body>)>,
}

impl Replica {
    fn write(&mut self, doc: &str, op: MutationOp, body: Option<Body>, resolves: Option<String>) {
        self.next += 1;
        self.pending.push(Mutation {
            mutation_id: self.next,
            collection: COLLECTION.into(),
            id: doc.into(),
            op,
            body,
            base_version: Some(self.server.get(doc).map_or(0, |v| v.0)),
            resolves,
        });
    }

    fn deliver(&mut self, log: &[Logged], n: usize) {
        let end = self.cursor.saturating_add(n).min(log.len());
        for l in &log[self.cursor..end] {
            self.server.insert(l.id.clone(), (l.seq, l.body.clone()));
        }
        self.cursor = end;
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        r: usize,
        doc: usize,
        kind: u8,
        field: usize,
        value: usize,
    },
    Push {
        r: usize,
        n: usize,
        lose_ack: bool,
    },
    PushTwo {
        a: usize,
        b: usize,
    },
    Deliver {
        r: usize,
        n: usize,
    },
    Resolve {
        r: usize,
        take_mine: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3usize, 0..2usize, 0..3u8, 0..3usize, 0..4usize).prop_map(
            |(r, doc, kind, field, value)| Step::Write { r, doc, kind, field, value }
        ),
        3 => (0..3usize, 1..4usize, any::<bool>()).prop_map(|(r, n, lose_ack)| Step::Push {
            r,
            n,
            lose_ack
        }),
        1 => (0..3usize, 0..3usize).prop_map(|(a, b)| Step::PushTwo { a, b }),
        2 => (0..3usize, 0..4usize).prop_map(|(r, n)| Step::Deliver { r, n }),
        1 => (0..3usize, any::<bool>()).prop_map(|(r, take_mine)| Step::Resolve { r, take_mine }),
    ]
}

fn status(v: usize) -> Value {
    Value::from(STATUSES[v % STATUSES.len()])
}

fn value_of(field: usize, v: usize, r: usize) -> Value {
    if field == 0 {
        status(v)
    } else {
        Value::from(format!("{}{v}", ["x", "y", "z"][r]))
    }
}

struct World {
    server: Server,
    replicas: Vec<Replica>,
    rules: Rules,
    /// The first answer each mutation got, and the mutation.
    answers: HashMap<(String, u64), (syncgate_protocol::MutationResult, Mutation)>,
}

impl World {
    fn new(policy: ConflictPolicy) -> World {
        let config = CollectionConfig {
            policy,
            precedence: if policy == ConflictPolicy::Precedence {
                [("status".to_owned(), STATUSES.map(String::from).to_vec())].into()
            } else {
                Default::default()
            },
            ..Default::default()
        };
        let rules = Rules {
            collections: [COLLECTION.to_owned()].into_iter().collect(),
            limits: Limits::default(),
            max_batch_output_bytes: 1 << 30,
            write_roles: HashMap::new(),
            max_documents_per_user: 0,
            max_sync_errors_per_user: 0,
            checks: HashMap::new(),
            resolvers: [(COLLECTION.to_owned(), conflict::builtin(&config))].into(),
        };
        World {
            server: Server::default(),
            replicas: (0..3)
                .map(|i| Replica {
                    id: format!("r{i}"),
                    ..Replica::default()
                })
                .collect(),
            rules,
            answers: HashMap::new(),
        }
    }

    fn job(&mut self, r: usize, n: usize) -> Option<PushJob> {
        let rep = &mut self.replicas[r];
        if rep.pending.is_empty() {
            return None;
        }
        rep.batch += 1;
        Some(PushJob {
            client_id: rep.id.clone(),
            user: format!("user-of-{}", rep.id),
            access: Arc::new(Access::roles(&["operator"])),
            batch: rep.batch,
            mutations: rep.pending.iter().take(n).cloned().collect(),
        })
    }

    /// Pushes the jobs in one group; each replica records its answers unless `lose_ack`.
    fn push(&mut self, jobs: Vec<(usize, PushJob)>, lose_ack: bool) {
        let only: Vec<PushJob> = jobs.iter().map(|(_, j)| j.clone()).collect();
        let answers = self.server.commit(&only, &self.rules);
        for ((r, job), results) in jobs.into_iter().zip(answers) {
            for (m, result) in job.mutations.iter().zip(&results) {
                let key = (job.client_id.clone(), m.mutation_id);
                match self.answers.get(&key) {
                    Some((first, _)) => assert_eq!(first, result, "a replay got another answer"),
                    None => {
                        self.answers.insert(key, (result.clone(), m.clone()));
                    }
                }
            }
            if lose_ack {
                continue;
            }
            let rep = &mut self.replicas[r];
            for (m, result) in job.mutations.iter().zip(&results) {
                rep.pending.retain(|p| p.mutation_id != m.mutation_id);
                if let Some(id) = result.conflict.as_ref().and_then(|c| c.id.clone())
                    && !rep.conflicts.iter().any(|c| c.0 == id)
                {
                    rep.conflicts.push((id, m.id.clone(), m.body.clone()));
                }
            }
        }
    }

    fn run(&mut self, step: &Step) {
        match *step {
            Step::Write {
                r,
                doc,
                kind,
                field,
                value,
            } => {
                let doc = DOCS[doc];
                let (op, body) = match kind {
                    0 => {
                        let b: Body = (0..FIELDS.len())
                            .map(|f| (FIELDS[f].to_owned(), value_of(f, value + f, r)))
                            .collect();
                        (MutationOp::Put, Some(b))
                    }
                    1 => {
                        let b: Body =
                            [(FIELDS[field].to_owned(), value_of(field, value, r))].into();
                        (MutationOp::Patch, Some(b))
                    }
                    _ => (MutationOp::Delete, None),
                };
                self.replicas[r].write(doc, op, body, None);
            }
            Step::Push { r, n, lose_ack } => {
                if let Some(j) = self.job(r, n) {
                    self.push(vec![(r, j)], lose_ack);
                }
            }
            Step::PushTwo { a, b } => {
                let jobs: Vec<(usize, PushJob)> = [a, b]
                    .into_iter()
                    .filter_map(|r| Some((r, self.job(r, 3)?)))
                    .collect();
                self.push(jobs, false);
            }
            Step::Deliver { r, n } => {
                let log = std::mem::take(&mut self.server.log);
                self.replicas[r].deliver(&log, n);
                self.server.log = log;
            }
            Step::Resolve { r, take_mine } => self.resolve(r, take_mine),
        }
    }

    /// The replica resolves the oldest conflict it was told of: its own body or the server's.
    fn resolve(&mut self, r: usize, take_mine: bool) {
        let log = std::mem::take(&mut self.server.log);
        let rep = &mut self.replicas[r];
        // A resolution is made on what the replica now knows of the server.
        rep.deliver(&log, usize::MAX);
        self.server.log = log;
        if rep.conflicts.is_empty() {
            return;
        }
        let (id, doc, mine) = rep.conflicts.remove(0);
        let body = if take_mine {
            mine
        } else {
            rep.server.get(&doc).and_then(|v| v.1.clone())
        };
        match body {
            Some(b) => rep.write(&doc, MutationOp::Put, Some(b), Some(id)),
            None => rep.write(&doc, MutationOp::Delete, None, Some(id)),
        }
    }

    /// Everyone pushes everything and resolves every conflict, then receives the whole log.
    fn settle(&mut self) {
        for _ in 0..20 {
            let mut busy = false;
            for r in 0..3 {
                while !self.replicas[r].conflicts.is_empty() {
                    self.resolve(r, r % 2 == 0);
                }
                while let Some(j) = self.job(r, 5) {
                    busy = true;
                    self.push(vec![(r, j)], false);
                }
            }
            if !busy {
                break;
            }
        }
        for r in 0..3 {
            let log = std::mem::take(&mut self.server.log);
            self.replicas[r].deliver(&log, usize::MAX);
            self.server.log = log;
        }
    }

    /// Every promise, checked against the log.
    fn check(&self, policy: ConflictPolicy) {
        let s = &self.server;
        // Convergence: every replica holds exactly the server's documents.
        for rep in &self.replicas {
            assert!(rep.pending.is_empty() && rep.conflicts.is_empty());
            for (id, d) in &s.docs {
                let body = if d.deleted { None } else { d.body.clone() };
                assert_eq!(
                    rep.server.get(id),
                    Some(&(d.version, body)),
                    "{} on {id}",
                    rep.id
                );
            }
            assert_eq!(rep.server.len(), s.docs.len());
        }
        // The document table is the log's last word.
        for (id, d) in &s.docs {
            let last = s
                .log
                .iter()
                .rfind(|l| &l.id == id)
                .expect("a document has a change");
            assert_eq!(d.version, last.seq);
            assert_eq!(d.body.is_none(), last.body.is_none());
        }
        // Exactly one outcome per mutation; an applied one is in the log once.
        for rep in &self.replicas {
            for mid in 1..=rep.next {
                let (result, _) = &self.answers[&(rep.id.clone(), mid)];
                let logged = s
                    .log
                    .iter()
                    .filter(|l| l.origin == rep.id && l.mutation == mid)
                    .count();
                let applied = result.status == MutationStatus::Applied;
                assert_eq!(logged, usize::from(applied), "{}:{mid}", rep.id);
            }
        }
        let audit = |client: &str, mid: u64| {
            s.conflicts
                .iter()
                .find(|c| c.client_id == client && c.mutation_id == mid)
        };
        // Every refusal is audited.
        for ((client, mid), (result, _)) in &self.answers {
            if result.code == Some(ErrorCode::Conflict.code()) {
                let row = audit(client, *mid).expect("a refusal has an audit row");
                assert!(row.outcome.refused());
            }
        }
        let resolutions: Vec<(String, u64)> = s
            .log
            .iter()
            .filter(|l| s.resolved.values().any(|v| *v == l.seq))
            .map(|l| (l.origin.clone(), l.mutation))
            .collect();
        // Every overwrite of a concurrent change is audited, and each policy keeps its word.
        for l in &s.log {
            let (_, m) = &self.answers[&(l.origin.clone(), l.mutation)];
            let Some(base) = m.base_version else { continue };
            let others: Vec<&Logged> = s
                .log
                .iter()
                .filter(|o| o.id == l.id && o.seq > base && o.seq < l.seq && o.origin != l.origin)
                .collect();
            if others.is_empty() {
                continue;
            }
            let is_resolution = resolutions.contains(&(l.origin.clone(), l.mutation));
            let mut theirs = FieldSet::none();
            for o in &others {
                theirs.extend(FieldSet::diff(o.prev.as_ref(), o.body.as_ref()));
            }
            let overwrote = match (&l.prev, &l.body) {
                (Some(p), Some(b)) => match &theirs {
                    FieldSet::All => p != b,
                    FieldSet::Fields(f) => f.iter().any(|k| p.get(k) != b.get(k)),
                },
                (None, None) => false,
                _ => true,
            };
            if overwrote && !is_resolution {
                let row = audit(&l.origin, l.mutation).expect("an overwrite has an audit row");
                assert_eq!(row.applied_version, Some(l.seq));
                assert!(matches!(row.outcome, Outcome::Overwrote | Outcome::Merged));
            }
            match policy {
                ConflictPolicy::FirstWriteWins => {
                    panic!(
                        "first_write_wins applied {}:{} over a concurrent change",
                        l.origin, l.mutation
                    )
                }
                ConflictPolicy::Manual => assert!(
                    is_resolution,
                    "manual applied {}:{} over a concurrent change",
                    l.origin, l.mutation
                ),
                ConflictPolicy::Precedence => {
                    // A concurrently written higher-ranked status is never replaced by a
                    // lower-ranked one.
                    let rank = |b: &Option<Body>| {
                        let v = b
                            .as_ref()
                            .and_then(|b| b.get("status"))
                            .and_then(Value::as_str);
                        v.and_then(|v| STATUSES.iter().position(|s| *s == v))
                            .unwrap_or(STATUSES.len())
                    };
                    if theirs.contains("status") && l.prev.is_some() && l.body.is_some() {
                        assert!(rank(&l.body) <= rank(&l.prev), "precedence lost a status");
                    }
                }
                ConflictPolicy::FieldMerge => {
                    // A field only the others changed keeps their value.
                    let (Some(prev), Some(body)) = (&l.prev, &l.body) else {
                        continue;
                    };
                    let mine = match m.op {
                        MutationOp::Patch => FieldSet::of_patch(m.body.as_ref().unwrap()),
                        _ => FieldSet::diff(s.body_at(&l.id, base).as_ref(), m.body.as_ref()),
                    };
                    if let FieldSet::Fields(f) = &theirs {
                        for k in f.iter().filter(|k| !mine.contains(k)) {
                            assert_eq!(prev.get(k), body.get(k), "field_merge lost {k}");
                        }
                    }
                }
                ConflictPolicy::Lww => {}
            }
        }
        if policy == ConflictPolicy::Lww || policy == ConflictPolicy::FieldMerge {
            assert!(
                self.answers
                    .values()
                    .all(|(r, _)| r.code != Some(ErrorCode::Conflict.code())),
                "{policy:?} refused a write"
            );
        }
        assert!(
            s.open.values().all(|open| !open),
            "a manual conflict stayed open"
        );
    }
}

fn run(policy: ConflictPolicy, steps: &[Step]) {
    let mut w = World::new(policy);
    for s in steps {
        w.run(s);
    }
    w.settle();
    w.check(policy);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn lww_histories_converge_and_audit_every_overwrite(steps in prop::collection::vec(step(), 1..60)) {
        run(ConflictPolicy::Lww, &steps);
    }

    #[test]
    fn field_merge_histories_converge_and_keep_both_sides(steps in prop::collection::vec(step(), 1..60)) {
        run(ConflictPolicy::FieldMerge, &steps);
    }

    #[test]
    fn first_write_wins_histories_converge_and_never_apply_a_stale_write(steps in prop::collection::vec(step(), 1..60)) {
        run(ConflictPolicy::FirstWriteWins, &steps);
    }

    #[test]
    fn manual_histories_converge_once_every_conflict_is_resolved(steps in prop::collection::vec(step(), 1..60)) {
        run(ConflictPolicy::Manual, &steps);
    }

    #[test]
    fn precedence_histories_converge_and_keep_the_higher_status(steps in prop::collection::vec(step(), 1..60)) {
        run(ConflictPolicy::Precedence, &steps);
    }
}
