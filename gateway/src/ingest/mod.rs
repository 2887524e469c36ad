//! The group-commit task: one per node. Connections hand it push jobs; it takes everything
//! queued (up to `group_commit_max_mutations`), commits it in one transaction, passes the
//! committed changes to the hub and answers each job.
//!
//! # Layout
//! - this module: the task (the I/O shell).
//! - `fair`: which queued batches go into the next group — round-robin over clients, so a
//!   client with many large batches queued delays another by one turn at most (pure).
//! - [`checks`]: a collection's declared field types, required fields and references, and
//!   the check of one write against them (pure).
//! - [`order`]: which batches may join a group, so that a client's later batch never commits
//!   past an earlier one that failed (a pure decision).
//! - [`plan`]: what a group does — each mutation's outcome, the rows to write, the committed
//!   changes (a pure decision over what storage prefetched).
//!
//! A group is: lock the head and read the horizons, read what [`plan::wanted`] names, plan,
//! write and commit ([`commit_group`]); only then are the changes published and the jobs
//! answered.

pub(crate) mod checks;
#[cfg(test)]
mod conflict_props;
mod fair;
pub(crate) mod order;
pub(crate) mod plan;

use std::sync::Arc;
use std::time::Instant;

use syncgate_protocol::MutationStatus;
use tokio::sync::{mpsc, oneshot};

use crate::changes::Committed;
use crate::error::{GatewayError, Step};
use crate::metrics::Metrics;
use crate::oplog::OpLog;
use crate::storage::{Store, StoreError};
use crate::sync::hub::HubEvent;
use fair::Fair;
use order::ClientOrder;
use plan::{Prefetched, PushJob, PushOutcome, Rules};

/// A job and where to send its outcome.
pub(crate) struct IngestRequest {
    /// The batch.
    pub job: PushJob,
    /// The outcome, or why the batch was not applied (the client pushes it again, or fixes it).
    pub(crate) reply: oneshot::Sender<Result<PushOutcome, GatewayError>>,
    /// The frame's share of `node_inflight_push_bytes`, given back once the job is answered.
    pub(crate) permit: tokio::sync::OwnedSemaphorePermit,
}

/// Runs until every sender is dropped.
pub(crate) async fn run_ingest(
    store: Store,
    rules: Rules,
    mut rx: mpsc::Receiver<IngestRequest>,
    hub: mpsc::Sender<HubEvent>,
    max_mutations: usize,
    metrics: Metrics,
    oplog: Arc<OpLog>,
) {
    let mut order = ClientOrder::default();
    let mut waiting: Fair<IngestRequest> = Fair::default();
    loop {
        // Everything queued waits its turn here (bounded by the channel's capacity and the
        // node's push bytes); groups are filled round-robin over clients.
        if waiting.is_empty() {
            match rx.recv().await {
                Some(req) => queue(&mut waiting, req),
                None => return,
            }
        }
        while let Ok(req) = rx.try_recv() {
            queue(&mut waiting, req);
        }
        let mut jobs: Vec<PushJob> = Vec::new();
        let mut permits = Vec::new();
        let mut replies: Vec<oneshot::Sender<Result<PushOutcome, GatewayError>>> = Vec::new();
        let mut n = 0;
        for req in waiting.next_group(max_mutations) {
            match order.admit(&req.job.client_id, &req.job.mutations, &rules.limits) {
                Ok(()) => {
                    n += req.job.mutations.len();
                    jobs.push(req.job);
                    replies.push(req.reply);
                    // Held until the end of this group's turn: the node's push bytes are
                    // given back only once the job is answered.
                    permits.push(req.permit);
                }
                Err(refusal) => {
                    if let Some(suppressed) = oplog.rejections.allow() {
                        tracing::info!(
                            client_id = %req.job.client_id,
                            user = %crate::oplog::printable(&req.job.user),
                            batch = req.job.batch,
                            code = refusal.code().code(),
                            reason = %refusal,
                            suppressed,
                            "push refused, nothing applied"
                        );
                    }
                    let _ = req.reply.send(Err(refusal));
                }
            }
        }
        metrics.fenced_clients.set(order.len() as i64);
        if jobs.is_empty() {
            continue;
        }
        let started = Instant::now();
        let result = commit_group(&store, &jobs, &rules, Some(&metrics)).await;
        metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.group_size.observe(n as f64);
        match result {
            Ok((outcomes, committed)) => {
                // Fan-out first: the follower publishes in seq order, the acks go straight out.
                let _ = hub.send(HubEvent::Committed(committed)).await;
                for ((reply, outcome), job) in replies.into_iter().zip(outcomes).zip(&jobs) {
                    let outcome = match outcome {
                        Ok(o) => o,
                        Err(refusal) => {
                            if matches!(refusal, GatewayError::BatchOutputTooLarge { .. }) {
                                // Nothing of it was applied: no later batch of the client may
                                // commit before it is pushed again (in smaller batches).
                                let first = job.mutations.first().map(|m| m.mutation_id);
                                order.group_failed([(job.client_id.as_str(), first)]);
                                metrics.fenced_clients.set(order.len() as i64);
                            }
                            if let Some(suppressed) = oplog.rejections.allow() {
                                tracing::info!(
                                    client_id = %crate::oplog::printable(&job.client_id),
                                    user = %crate::oplog::printable(&job.user),
                                    batch = job.batch,
                                    code = refusal.code().code(),
                                    reason = %refusal,
                                    suppressed,
                                    "push refused, nothing applied"
                                );
                            }
                            let _ = reply.send(Err(refusal));
                            continue;
                        }
                    };
                    if outcome.unstored_rejections > 0 {
                        metrics
                            .quota_refusals
                            .with_label_values(&["sync_errors"])
                            .inc_by(outcome.unstored_rejections as u64);
                    }
                    for (r, m) in outcome.results.iter().zip(&job.mutations) {
                        if r.code == Some(syncgate_protocol::ErrorCode::QuotaExceeded.code()) {
                            metrics
                                .quota_refusals
                                .with_label_values(&["documents"])
                                .inc();
                        }
                        let status = match r.status {
                            MutationStatus::Applied => "applied",
                            MutationStatus::Rejected => "rejected",
                        };
                        metrics.mutations.with_label_values(&[status]).inc();
                        if r.status == MutationStatus::Rejected
                            && let Some(suppressed) = oplog.rejections.allow()
                        {
                            tracing::info!(
                                client_id = %job.client_id,
                                user = %crate::oplog::printable(&job.user),
                                mutation_id = r.mutation_id,
                                collection = %crate::oplog::printable(&m.collection),
                                id = %crate::oplog::printable(&m.id),
                                code = r.code.unwrap_or(0),
                                reason = r.reason.as_deref().unwrap_or(""),
                                suppressed,
                                "mutation rejected (stored in sg_sync_errors)"
                            );
                        }
                    }
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = jobs.len(), "group commit failed; clients will retry");
                // No later batch of these clients may commit before they replay this one.
                order.group_failed(jobs.iter().map(|j| {
                    (
                        j.client_id.as_str(),
                        j.mutations.first().map(|m| m.mutation_id),
                    )
                }));
                metrics.fenced_clients.set(order.len() as i64);
                // The hub may have missed nothing (rolled back) or a commit whose answer was
                // lost; a poll settles it.
                let _ = hub.send(HubEvent::Wake).await;
                for reply in replies {
                    let _ = reply.send(Err(GatewayError::Storage(Step::Push)));
                }
            }
        }
    }
}

/// One group commit: prefetch, [`plan::plan`], write. Returns one outcome per job and the
/// committed changes; on error nothing was committed (the transaction rolled back), unless the
/// connection failed during the commit itself, which the hub's next poll settles.
pub(crate) async fn commit_group(
    store: &Store,
    jobs: &[PushJob],
    rules: &Rules,
    metrics: Option<&Metrics>,
) -> Result<(Vec<Result<PushOutcome, GatewayError>>, Committed), StoreError> {
    let txn = store.begin_group().await?;
    if let (Some(m), Some(waited)) = (metrics, txn.turn_wait()) {
        m.writer_wait_seconds.observe(waited.as_secs_f64());
    }
    let mut pre = Prefetched::default();
    for (client, stored) in txn.clients(&plan::clients(jobs)).await? {
        pre.lasts.insert(client.clone(), stored.last_mutation);
        pre.owners.insert(client, stored.owner);
    }
    if rules.max_documents_per_user > 0 || rules.max_sync_errors_per_user > 0 {
        pre.usage = txn.usage(&plan::users(jobs)).await?;
    }
    pre.captured = txn.captured().await?;
    let wanted = plan::wanted(jobs, &pre.lasts, rules);
    pre.docs = txn.documents(&wanted.docs).await?;
    let history = plan::history_wanted(jobs, &pre.lasts, &pre.docs);
    if !history.is_empty() {
        pre.history = txn.history(&history).await?;
    }
    // After the history (see `storage::compaction`).
    let horizons = plan::horizons_wanted(jobs, &pre.lasts, &pre.docs, &history);
    if !horizons.is_empty() {
        pre.horizons = txn.horizons(&horizons).await?;
    }
    if !wanted.conflicts.is_empty() {
        pre.conflicts = txn.conflicts(&wanted.conflicts).await?;
    }
    for (client, ids) in &wanted.earlier {
        let outcomes = txn.earlier_outcomes(client, ids).await?;
        pre.earlier.insert((*client).to_owned(), outcomes);
    }
    let plan = plan::plan(jobs, txn.head(), &pre, rules);
    txn.commit(&plan.rows, plan.committed.to).await?;
    if let Some(m) = metrics {
        for c in &plan.rows.conflicts {
            m.conflicts
                .with_label_values(&[c.policy.as_str(), c.outcome.as_str()])
                .inc();
        }
    }
    Ok((plan.outcomes, plan.committed))
}

/// Queues a request for its client's turn.
fn queue(waiting: &mut Fair<IngestRequest>, req: IngestRequest) {
    let client = req.job.client_id.clone();
    let weight = req.job.mutations.len();
    waiting.push(&client, req, weight);
}
