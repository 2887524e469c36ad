//! Which queued batches go into the next group: round-robin over clients, so that a client
//! with many large batches queued cannot make another client's batch wait behind all of
//! them. A pure decision; each client's batches keep their order (invariant 4).

use std::collections::{HashMap, VecDeque};

/// Batches waiting for a group, per client in arrival order.
#[derive(Debug)]
pub(crate) struct Fair<T> {
    /// Clients with something waiting, in the order they get their next turn.
    turns: VecDeque<String>,
    /// Each waiting client's batches with their weight (mutations), oldest first.
    queues: HashMap<String, VecDeque<(T, usize)>>,
    len: usize,
}

impl<T> Default for Fair<T> {
    fn default() -> Self {
        Fair {
            turns: VecDeque::new(),
            queues: HashMap::new(),
            len: 0,
        }
    }
}

impl<T> Fair<T> {
    /// Queues a batch of `client` weighing `weight` mutations.
    pub(crate) fn push(&mut self, client: &str, item: T, weight: usize) {
        match self.queues.get_mut(client) {
            Some(q) => q.push_back((item, weight)),
            None => {
                self.queues
                    .insert(client.to_owned(), VecDeque::from([(item, weight)]));
                self.turns.push_back(client.to_owned());
            }
        }
        self.len += 1;
    }

    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next group: one batch per client in turn, round after round, until the next batch
    /// would pass `budget` mutations (the first batch is always taken). A client that got a
    /// turn goes to the back of the line.
    pub(crate) fn next_group(&mut self, budget: usize) -> Vec<T> {
        let mut group = Vec::new();
        let mut taken = 0usize;
        while let Some(client) = self.turns.pop_front() {
            let Some(queue) = self.queues.get_mut(&client) else {
                continue;
            };
            let fits = queue
                .front()
                .is_some_and(|(_, w)| group.is_empty() || taken + w <= budget);
            if !fits {
                self.turns.push_front(client);
                break;
            }
            if let Some((item, weight)) = queue.pop_front() {
                taken += weight;
                self.len -= 1;
                group.push(item);
            }
            if queue.is_empty() {
                self.queues.remove(&client);
            } else {
                self.turns.push_back(client);
            }
            if taken >= budget {
                break;
            }
        }
        group
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_with_much_queued_does_not_delay_another_beyond_one_turn() {
        let mut f = Fair::default();
        // The flooder queues 16 batches of 1,000 before anyone else arrives.
        for i in 0..16 {
            f.push("flood", format!("flood-{i}"), 1000);
        }
        f.push("calm", "calm-0".to_owned(), 1);
        // Budget 5,000: the calm client's batch is in the first group, after one of the
        // flooder's, not in the fourth.
        let first = f.next_group(5000);
        assert_eq!(first[..2], ["flood-0".to_owned(), "calm-0".to_owned()]);
        assert_eq!(first.len(), 5, "then the flooder fills the group");
        // The flooder's batches stay in order, nothing is lost or doubled.
        let mut rest = Vec::new();
        while !f.is_empty() {
            rest.extend(f.next_group(5000));
        }
        let mut flood: Vec<String> = first
            .into_iter()
            .filter(|b| b.starts_with("flood"))
            .collect();
        flood.extend(rest);
        let expected: Vec<String> = (0..16).map(|i| format!("flood-{i}")).collect();
        assert_eq!(flood, expected);
    }

    #[test]
    fn the_first_batch_is_taken_even_over_budget_and_turns_rotate() {
        let mut f = Fair::default();
        f.push("a", 1, 9000);
        f.push("b", 2, 10);
        f.push("a", 3, 10);
        assert_eq!(f.next_group(5000), vec![1]);
        assert_eq!(f.next_group(5000), vec![2, 3]);
        assert!(f.is_empty());
        assert!(f.next_group(5000).is_empty());
    }
}
