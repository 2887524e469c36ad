//! The group-commit task: one per node. Connections hand it push jobs; it takes everything
//! queued (up to `group_commit_max_mutations`), commits it in one transaction, passes the
//! committed changes to the hub and answers each job.

use std::time::Instant;

use syncgate_protocol::{ErrorCode, MutationStatus};
use tokio::sync::{mpsc, oneshot};

use crate::hub::HubEvent;
use crate::metrics::Metrics;
use crate::storage::{PushJob, PushOutcome, Rules, Store};

/// A job and where to send its outcome.
pub struct IngestRequest {
    /// The batch.
    pub job: PushJob,
    /// The outcome, or the code of the failure (the client retries the batch).
    pub reply: oneshot::Sender<Result<PushOutcome, ErrorCode>>,
}

/// Runs until every sender is dropped.
pub async fn run_ingest(
    store: Store,
    rules: Rules,
    mut rx: mpsc::Receiver<IngestRequest>,
    hub: mpsc::Sender<HubEvent>,
    max_mutations: usize,
    metrics: Metrics,
) {
    while let Some(first) = rx.recv().await {
        let mut n = first.job.mutations.len();
        let mut group = vec![first];
        while n < max_mutations {
            match rx.try_recv() {
                Ok(r) => {
                    n += r.job.mutations.len();
                    group.push(r);
                }
                Err(_) => break,
            }
        }
        let jobs: Vec<PushJob> = group.iter().map(|r| r.job.clone()).collect();
        let started = Instant::now();
        let result = store.apply_group(&jobs, &rules).await;
        metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.group_size.observe(n as f64);
        match result {
            Ok((outcomes, committed)) => {
                // Fan-out first: the follower publishes in seq order, the acks go straight out.
                let _ = hub.send(HubEvent::Committed(committed)).await;
                for (req, outcome) in group.into_iter().zip(outcomes) {
                    for r in &outcome.results {
                        let status = match r.status {
                            MutationStatus::Applied => "applied",
                            MutationStatus::Rejected => "rejected",
                        };
                        metrics.mutations.with_label_values(&[status]).inc();
                    }
                    let _ = req.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = group.len(), "group commit failed; clients will retry");
                // The hub may have missed nothing (rolled back) or a commit whose answer was
                // lost; a poll settles it.
                let _ = hub.send(HubEvent::Wake).await;
                for req in group {
                    let _ = req.reply.send(Err(ErrorCode::StorageUnavailable));
                }
            }
        }
    }
}
