//! Per-client order across failed groups: a pure decision, no I/O.
//!
//! A client may have several pushes in flight, and the ingest queue may hold a later batch of a
//! client while an earlier one is being committed. If the group holding the earlier batch fails
//! (the database session died, the transaction was refused), the later batch must not commit in
//! the next group: the client's horizon (`last_mutation`) would jump past mutations that were
//! never applied, and their replay would find ids "below the horizon and never seen" — lost
//! writes. Likewise a batch refused as a whole before ingest (too many mutations, ids not
//! increasing) must not be overtaken by the client's next batch.
//!
//! [`ClientOrder`] records a **fence** per client: the first mutation id of the earliest batch
//! that was not applied. While a fence stands, a batch of that client is admitted only if it
//! starts at or below the fence (it replays the failed batch, or something older); a batch
//! starting above it is refused with `replay_required` (505, retryable) without touching the
//! database. The fence falls when an admitted batch reaches it (its last id is at or above the
//! fence); if that batch's group fails too, the fence is raised again from it.
//!
//! State: owned by the single ingest task, so no locking. Memory: one entry per client with an
//! unreplayed failure; an entry is removed as soon as the client replays.

use std::collections::HashMap;

use syncgate_protocol::{Limits, Mutation};

use crate::error::GatewayError;

/// The fences of every client with a batch that was not applied and not yet replayed.
#[derive(Debug, Default)]
pub(crate) struct ClientOrder {
    /// client id -> first mutation id that must be pushed again before anything after it.
    fences: HashMap<String, u64>,
}

impl ClientOrder {
    /// Decides whether a batch may join a group. A refused batch raises the client's fence at
    /// its first mutation id when the refusal is about the batch's shape (the client must send
    /// those mutations again, differently), so nothing later overtakes it.
    pub(crate) fn admit(
        &mut self,
        client_id: &str,
        mutations: &[Mutation],
        limits: &Limits,
    ) -> Result<(), GatewayError> {
        let (Some(first), Some(last)) = (mutations.first(), mutations.last()) else {
            // An empty batch applies nothing and overtakes nothing.
            return Ok(());
        };
        let (first, last) = (first.mutation_id, last.mutation_id);
        if let Some(refusal) = shape_refusal(mutations, limits) {
            self.fence(client_id, first);
            return Err(refusal);
        }
        if let Some(&fence) = self.fences.get(client_id) {
            if first > fence {
                return Err(GatewayError::ReplayRequired { fence });
            }
            if last >= fence {
                self.fences.remove(client_id);
            }
        }
        Ok(())
    }

    /// Records that a group failed: every batch in it (client id, first mutation id) must be
    /// replayed before anything later of the same client.
    pub(crate) fn group_failed<'a>(
        &mut self,
        batches: impl IntoIterator<Item = (&'a str, Option<u64>)>,
    ) {
        for (client_id, first) in batches {
            if let Some(first) = first {
                self.fence(client_id, first);
            }
        }
    }

    /// The fence of a client, if one stands.
    #[cfg(test)]
    pub(crate) fn fence_of(&self, client_id: &str) -> Option<u64> {
        self.fences.get(client_id).copied()
    }

    /// Clients with a standing fence.
    pub(crate) fn len(&self) -> usize {
        self.fences.len()
    }

    /// Whether no fence stands.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.fences.is_empty()
    }

    fn fence(&mut self, client_id: &str, first: u64) {
        self.fences
            .entry(client_id.to_owned())
            .and_modify(|f| *f = (*f).min(first))
            .or_insert(first);
    }
}

/// A refusal of the whole batch as sent: too many mutations, or ids not strictly increasing.
pub(crate) fn shape_refusal(mutations: &[Mutation], limits: &Limits) -> Option<GatewayError> {
    if mutations.len() > limits.max_mutations_per_batch as usize {
        return Some(GatewayError::BatchTooLarge {
            limit: limits.max_mutations_per_batch,
        });
    }
    if mutations
        .iter()
        .zip(mutations.iter().skip(1))
        .any(|(a, b)| a.mutation_id >= b.mutation_id)
    {
        return Some(GatewayError::MutationIdsNotIncreasing);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncgate_protocol::MutationOp;

    fn batch(ids: &[u64]) -> Vec<Mutation> {
        ids.iter()
            .map(|&mutation_id| Mutation {
                mutation_id,
                collection: "c".into(),
                id: format!("d{mutation_id}"),
                op: MutationOp::Delete,
                body: None,
                base_version: None,
                resolves: None,
            })
            .collect()
    }

    fn code(r: Result<(), GatewayError>) -> Option<u16> {
        r.err().map(|r| r.code().code())
    }

    /// Each row: a sequence of events and the expected answer to each admission.
    #[test]
    fn table() {
        enum Ev {
            Admit(&'static str, &'static [u64], Option<u16>),
            Fail(&'static [(&'static str, u64)]),
        }
        use Ev::*;
        let rows: Vec<(&str, Vec<Ev>)> = vec![
            (
                "no fence: everything is admitted",
                vec![Admit("a", &[1, 2], None), Admit("a", &[3], None)],
            ),
            (
                "a later batch after a failed group is refused until the replay",
                vec![
                    Fail(&[("a", 1)]),
                    Admit("a", &[21, 22], Some(505)),
                    Admit("b", &[21, 22], None),
                    Admit("a", &[1, 2, 20], None),
                    Admit("a", &[21, 22], None),
                ],
            ),
            (
                "a replay of older, already applied ids passes but keeps the fence",
                vec![
                    Fail(&[("a", 10)]),
                    Admit("a", &[5, 6], None),
                    Admit("a", &[12], Some(505)),
                    Admit("a", &[9, 15], None),
                    Admit("a", &[16], None),
                ],
            ),
            (
                "a replay re-cut differently (ids with gaps) still lifts the fence",
                vec![Fail(&[("a", 10)]), Admit("a", &[8, 11], None)],
            ),
            (
                "the earliest failure wins when several groups fail",
                vec![
                    Fail(&[("a", 30)]),
                    Fail(&[("a", 10), ("b", 4)]),
                    Admit("a", &[20], Some(505)),
                    Admit("b", &[5], Some(505)),
                    Admit("a", &[10], None),
                    Admit("b", &[4], None),
                ],
            ),
            (
                "a batch refused for its shape fences the client",
                vec![
                    Admit("a", &[5, 5], Some(404)),
                    Admit("a", &[6], Some(505)),
                    Admit("a", &[5, 6], None),
                ],
            ),
            (
                "a batch too large fences the client; the replay cut smaller passes",
                vec![
                    Admit("a", &[1, 2, 3, 4], Some(401)),
                    Admit("a", &[5], Some(505)),
                    Admit("a", &[1, 2, 3], None),
                    Admit("a", &[4, 5], None),
                ],
            ),
            (
                "an empty batch is always admitted",
                vec![Fail(&[("a", 3)]), Admit("a", &[], None)],
            ),
        ];
        let limits = Limits {
            max_mutations_per_batch: 3,
            ..Limits::default()
        };
        for (name, events) in rows {
            let mut order = ClientOrder::default();
            for (i, ev) in events.into_iter().enumerate() {
                match ev {
                    Admit(client, ids, want) => {
                        let got = code(order.admit(client, &batch(ids), &limits));
                        assert_eq!(got, want, "{name}: event {i}");
                    }
                    Fail(batches) => {
                        order.group_failed(batches.iter().map(|(c, f)| (*c, Some(*f))));
                    }
                }
            }
        }
    }

    #[test]
    fn fences_are_dropped_once_replayed() {
        let mut order = ClientOrder::default();
        order.group_failed([("a", Some(7)), ("b", None)]);
        assert_eq!(order.fence_of("a"), Some(7));
        assert_eq!(order.fence_of("b"), None);
        assert_eq!(order.len(), 1);
        order
            .admit("a", &batch(&[7]), &Limits::default())
            .expect("replay");
        assert!(order.is_empty());
    }
}
