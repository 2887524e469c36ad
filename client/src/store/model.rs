//! The replica's rules, without I/O: what the optimistic state of a document is, which server
//! state a replica takes, what an acknowledgement does to an outbox entry, how stored
//! subscriptions change. [`super`] reads rows, calls these, and writes what they decide, one
//! SQLite transaction per operation.

use syncgate_protocol::apply::apply;
use syncgate_protocol::{
    Body, ConflictInfo, ErrorCode, Mutation, MutationOp, MutationResult, MutationStatus,
};

/// An outbox entry as rebase sees it: the mutation, and the version it wrote once acked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub(crate) mutation: Mutation,
    pub(crate) acked_version: Option<u64>,
}

/// The server's state of a document as the replica holds it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ServerState {
    /// The body (`None`: deleted, left the filter, or never seen).
    pub(crate) body: Option<Body>,
    /// The version (0: not known).
    pub(crate) version: u64,
    /// Waiting for a snapshot to confirm it.
    pub(crate) stale: bool,
}

/// What [`rebase`] decided for a document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rebased {
    /// The optimistic body the application sees (`None`: absent or deleted).
    pub(crate) local_body: Option<Body>,
    /// Outbox entries of the document still waiting for their ack.
    pub(crate) pending: u64,
    /// Nothing is left of the document (no server state, no outbox entry): drop its row.
    pub(crate) forget: bool,
}

/// Whether the replica still needs an acknowledged entry: only while the server state it holds
/// is older than the version the entry wrote.
pub(crate) fn reflects(server_version: u64, acked_version: u64) -> bool {
    acked_version <= server_version
}

/// The optimistic state of a document: the server's body with every outbox entry the server
/// state does not reflect yet (pending ones, and acked ones above the server version) applied
/// in mutation-id order (`entries` are in that order). A mutation that cannot apply locally (a
/// patch of a document the replica does not have) leaves the state as it was: the server has
/// the last word.
pub(crate) fn rebase(server: &ServerState, entries: &[Entry]) -> Rebased {
    let mut body = server.body.clone();
    let mut pending = 0;
    let mut applied = 0;
    for e in entries {
        if e.acked_version.is_some_and(|v| reflects(server.version, v)) {
            continue;
        }
        applied += 1;
        if e.acked_version.is_none() {
            pending += 1;
        }
        if let Ok(b) = apply(body.as_ref(), e.mutation.op, e.mutation.body.as_ref()) {
            body = b;
        }
    }
    let forget = body.is_none() && server.version == 0 && !server.stale && applied == 0;
    Rebased {
        local_body: body,
        pending,
        forget,
    }
}

/// Whether a server state at `incoming` replaces what the replica holds (`held`: its version
/// and staleness, `None`: no row). A snapshot may be newer than the catch-up that follows it,
/// so an older version is ignored — unless the held one is stale (a snapshot is replacing it).
pub(crate) fn takes_server_version(held: Option<(u64, bool)>, incoming: u64) -> bool {
    match held {
        Some((version, stale)) => stale || version < incoming,
        None => true,
    }
}

/// The server state to record for an acknowledged write to a collection the replica does not
/// follow (no change will ever come back for it): the previous known state with the mutation
/// applied, at `version`. `None`: keep what is held (it is as new, or the mutation cannot
/// apply to it — a patch of a document the replica never had).
pub(crate) fn own_write(previous: &ServerState, m: &Mutation, version: u64) -> Option<ServerState> {
    if version <= previous.version {
        return None;
    }
    let body = apply(previous.body.as_ref(), m.op, m.body.as_ref()).ok()?;
    Some(ServerState {
        body,
        version,
        stale: false,
    })
}

/// The `base_version` a new mutation names, from the server version the replica holds of the
/// document (`None` or 0: none): that version; for a put of a document it holds no version of,
/// 0 — "I create this, having seen no other" — so that the gateway's conflict policy decides
/// when another client created the same id meanwhile; otherwise none (a blind patch or delete
/// of a document this replica never downloaded follows server order).
pub(crate) fn base_version(held: Option<u64>, op: MutationOp) -> Option<u64> {
    match held.filter(|v| *v > 0) {
        Some(v) => Some(v),
        None => (op == MutationOp::Put).then_some(0),
    }
}

/// What an acknowledgement does to one outbox entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AckAction {
    /// Applied at `version`: keep the entry (acked) until the replica sees that version.
    Acked { version: u64 },
    /// Applied at `version` to a collection the replica does not follow: record the write as
    /// the document's server state ([`own_write`]) and drop the entry.
    AckedUnfollowed { version: u64 },
    /// Applied at `version` to an `upload_only` collection: nothing of it ever comes back, so
    /// the local copy is forgotten with the entry.
    AckedUploadOnly { version: u64 },
    /// Refused: move the entry to the rejected table with the code and reason.
    Rejected { code: u16, reason: String },
    /// Refused by a conflict policy (413): the server's side replaces the optimistic state; a
    /// `manual` conflict (with an id) is kept until resolved, a `first_write_wins` refusal goes
    /// to the rejected table.
    Conflict {
        reason: String,
        conflict: ConflictInfo,
    },
}

/// Decides [`AckAction`] for a result whose mutation is in a collection that is (`followed`)
/// or is not subscribed, and is or is not `upload_only`.
pub(crate) fn ack_action(r: &MutationResult, followed: bool, upload_only: bool) -> AckAction {
    match r.status {
        MutationStatus::Applied => {
            let version = r.version.unwrap_or(0);
            if upload_only {
                AckAction::AckedUploadOnly { version }
            } else if followed {
                AckAction::Acked { version }
            } else {
                AckAction::AckedUnfollowed { version }
            }
        }
        MutationStatus::Rejected if r.conflict.is_some() => AckAction::Conflict {
            reason: r.reason.clone().unwrap_or_default(),
            conflict: r.conflict.clone().unwrap_or(ConflictInfo {
                id: None,
                version: 0,
                body: None,
            }),
        },
        MutationStatus::Rejected => AckAction::Rejected {
            code: r.code.unwrap_or(ErrorCode::InternalError.code()),
            reason: r.reason.clone().unwrap_or_default(),
        },
    }
}

/// The next mutation id after a `welcome`: if the server has applied ids this store has not
/// handed out yet (the data directory was restored from a backup), new ids continue above
/// them, so a new edit is never mistaken for a replay. `None`: keep `next`.
pub(crate) fn next_after_welcome(next: u64, last_applied: u64) -> Option<u64> {
    (last_applied >= next).then(|| last_applied.saturating_add(1))
}

/// How one stored subscription changes when the application asks for `wanted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SubscriptionChange {
    /// Same filter: keep it and its cursor.
    Keep,
    /// Another filter: store it and start again from a snapshot.
    Refilter(Vec<u8>),
    /// No longer wanted: delete it and forget the collection's server state.
    Forget,
}

/// For a stored subscription (`collection`, its encoded filter), what `wanted` (collection,
/// encoded filter) makes of it.
pub(crate) fn subscription_change(
    collection: &str,
    filter: &[u8],
    wanted: &[(String, Vec<u8>)],
) -> SubscriptionChange {
    match wanted.iter().find(|(c, _)| c == collection) {
        Some((_, f)) if f.as_slice() == filter => SubscriptionChange::Keep,
        Some((_, f)) => SubscriptionChange::Refilter(f.clone()),
        None => SubscriptionChange::Forget,
    }
}

/// How many of the pending entries (their encoded sizes, oldest first) go into one batch: at
/// least one, then as many as fit in `max_bytes`.
pub(crate) fn batch_len(sizes: impl IntoIterator<Item = usize>, max_bytes: usize) -> usize {
    let mut n = 0;
    let mut bytes = 0usize;
    for size in sizes {
        bytes = bytes.saturating_add(size);
        if n > 0 && bytes > max_bytes {
            break;
        }
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    #[test]
    fn a_mutation_names_the_version_it_was_based_on() {
        use MutationOp::{Delete, Patch, Put};
        assert_eq!(base_version(Some(7), Patch), Some(7));
        assert_eq!(base_version(Some(7), Put), Some(7));
        // A create names 0: another client's document of the same id is a conflict.
        assert_eq!(base_version(None, Put), Some(0));
        assert_eq!(base_version(Some(0), Put), Some(0));
        // A patch or delete of a document never downloaded is blind.
        assert_eq!(base_version(None, Patch), None);
        assert_eq!(base_version(Some(0), Delete), None);
    }

    fn body(pairs: &[(&str, i64)]) -> Body {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect()
    }

    fn entry(id: u64, op: MutationOp, b: Option<Body>, acked: Option<u64>) -> Entry {
        Entry {
            mutation: Mutation {
                mutation_id: id,
                collection: "orders".into(),
                id: "o1".into(),
                op,
                body: b,
                base_version: None,
                resolves: None,
            },
            acked_version: acked,
        }
    }

    fn server(b: Option<Body>, version: u64) -> ServerState {
        ServerState {
            body: b,
            version,
            stale: false,
        }
    }

    struct Case {
        name: &'static str,
        server: ServerState,
        entries: Vec<Entry>,
        /// The optimistic body expected.
        local: Option<Body>,
        pending: u64,
        forget: bool,
    }

    #[test]
    fn rebase_table() {
        use MutationOp::*;
        let cases = vec![
            Case {
                name: "nothing at all: the row goes",
                server: ServerState::default(),
                entries: vec![],
                local: None,
                pending: 0,
                forget: true,
            },
            Case {
                name: "a pending put on nothing is the optimistic state",
                server: ServerState::default(),
                entries: vec![entry(1, Put, Some(body(&[("qty", 1)])), None)],
                local: Some(body(&[("qty", 1)])),
                pending: 1,
                forget: false,
            },
            Case {
                name: "a pending patch goes on top of a newer server body",
                server: server(Some(body(&[("qty", 5), ("done", 0)])), 9),
                entries: vec![entry(3, Patch, Some(body(&[("done", 1)])), None)],
                local: Some(body(&[("qty", 5), ("done", 1)])),
                pending: 1,
                forget: false,
            },
            Case {
                name: "an acked entry the server state reflects is not applied again",
                server: server(Some(body(&[("qty", 7)])), 9),
                entries: vec![entry(3, Put, Some(body(&[("qty", 1)])), Some(9))],
                local: Some(body(&[("qty", 7)])),
                pending: 0,
                forget: false,
            },
            Case {
                name: "an acked entry above the server version still shows",
                server: server(Some(body(&[("qty", 7)])), 9),
                entries: vec![entry(3, Put, Some(body(&[("qty", 1)])), Some(12))],
                local: Some(body(&[("qty", 1)])),
                pending: 0,
                forget: false,
            },
            Case {
                name: "a patch of a document the replica does not have changes nothing",
                server: ServerState::default(),
                entries: vec![entry(4, Patch, Some(body(&[("qty", 1)])), None)],
                local: None,
                pending: 1,
                forget: false,
            },
            Case {
                name: "entries apply in order: put, patch, delete",
                server: server(Some(body(&[("qty", 1)])), 2),
                entries: vec![
                    entry(5, Put, Some(body(&[("qty", 2)])), None),
                    entry(6, Patch, Some(body(&[("x", 1)])), None),
                    entry(7, Delete, None, None),
                ],
                local: None,
                pending: 3,
                forget: false,
            },
            Case {
                name: "a stale row stays until its snapshot decides",
                server: ServerState {
                    body: None,
                    version: 0,
                    stale: true,
                },
                entries: vec![],
                local: None,
                pending: 0,
                forget: false,
            },
        ];
        for c in cases {
            let r = rebase(&c.server, &c.entries);
            assert_eq!(r.local_body, c.local, "{}", c.name);
            assert_eq!(r.pending, c.pending, "{}", c.name);
            assert_eq!(r.forget, c.forget, "{}", c.name);
        }
    }

    #[test]
    fn server_versions_never_go_back_unless_a_snapshot_replaces_them() {
        assert!(takes_server_version(None, 1));
        assert!(takes_server_version(Some((4, false)), 5));
        assert!(!takes_server_version(Some((5, false)), 5), "a duplicate");
        assert!(
            !takes_server_version(Some((9, false)), 5),
            "older than held"
        );
        assert!(
            takes_server_version(Some((9, true)), 5),
            "stale: the snapshot decides"
        );
    }

    #[test]
    fn an_acknowledged_write_to_an_unfollowed_collection_becomes_the_known_state() {
        let put = entry(1, MutationOp::Put, Some(body(&[("qty", 1)])), None).mutation;
        let patch = entry(2, MutationOp::Patch, Some(body(&[("x", 2)])), None).mutation;
        let s = own_write(&ServerState::default(), &put, 10).unwrap();
        assert_eq!((s.body.clone(), s.version), (Some(body(&[("qty", 1)])), 10));
        let s = own_write(&s, &patch, 11).unwrap();
        assert_eq!(s.body, Some(body(&[("qty", 1), ("x", 2)])));
        assert_eq!(own_write(&s, &patch, 11), None, "not newer");
        assert_eq!(
            own_write(&ServerState::default(), &patch, 12),
            None,
            "a patch of an unknown document leaves it unknown"
        );
    }

    #[test]
    fn acks_keep_drop_or_reject() {
        let applied = MutationResult::applied(3, 8);
        assert_eq!(
            ack_action(&applied, true, false),
            AckAction::Acked { version: 8 }
        );
        assert_eq!(
            ack_action(&applied, false, true),
            AckAction::AckedUploadOnly { version: 8 }
        );
        assert_eq!(
            ack_action(&applied, false, false),
            AckAction::AckedUnfollowed { version: 8 }
        );
        let rejected = MutationResult::rejected(3, ErrorCode::DocumentTooLarge, "big");
        assert_eq!(
            ack_action(&rejected, true, true),
            AckAction::Rejected {
                code: 402,
                reason: "big".into()
            }
        );
    }

    #[test]
    fn ids_continue_above_what_the_server_applied() {
        assert_eq!(next_after_welcome(5, 3), None);
        assert_eq!(next_after_welcome(5, 4), None);
        assert_eq!(next_after_welcome(5, 5), Some(6));
        assert_eq!(next_after_welcome(1, 1000), Some(1001));
        assert_eq!(next_after_welcome(1, u64::MAX), Some(u64::MAX));
    }

    #[test]
    fn subscriptions_keep_refilter_or_forget() {
        let wanted = vec![
            ("orders".to_owned(), vec![1u8]),
            ("machines".to_owned(), vec![2u8]),
        ];
        assert_eq!(
            subscription_change("orders", &[1], &wanted),
            SubscriptionChange::Keep
        );
        assert_eq!(
            subscription_change("machines", &[3], &wanted),
            SubscriptionChange::Refilter(vec![2])
        );
        assert_eq!(
            subscription_change("stock", &[1], &wanted),
            SubscriptionChange::Forget
        );
    }

    #[test]
    fn batches_take_at_least_one_entry_then_what_fits() {
        assert_eq!(batch_len([10, 10, 10], 25), 2);
        assert_eq!(
            batch_len([100, 1], 25),
            1,
            "an oversized first entry goes alone"
        );
        assert_eq!(batch_len([5; 4], 100), 4);
        assert_eq!(batch_len([], 100), 0);
    }
}
