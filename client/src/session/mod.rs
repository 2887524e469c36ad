//! The background task: connect, resume, upload, download, heartbeat, reconnect.
//!
//! # Layout
//! - [`machine`]: one connection's protocol state machine, without I/O (`handle_frame`,
//!   `handle_timeout`, `poll_work`, `poll_transmit`, `poll_timeout`, `poll_end`).
//! - [`reconnect`]: what to do after a session ends (retry, back off, stop), pure.
//! - this module: the tokio shell that drives both with the socket, the store and the clock.
//!
//! One task per [`crate::Client`]; it owns the WebSocket and is the only writer of incoming
//! data to the store. Per session (one connection):
//!
//! 1. `hello` with a token from the provider → `welcome` (`on_welcome` records the epoch and the
//!    server's `last_applied_mutation`).
//! 2. Every stored subscription is sent with its cursor (none = snapshot; the rows it will
//!    replace are marked stale first).
//! 3. The outbox is uploaded in mutation-id order, in batches, at most [`machine::MAX_INFLIGHT`] batches
//!    unacknowledged. Entries the server already applied (ids at or below
//!    `last_applied_mutation`, whose ack was lost) are sent again on purpose: the gateway
//!    applies nothing twice and answers with the stored outcome, so a rejection whose ack was
//!    lost still reaches the application.
//! 4. Incoming `snapshot`/`changes`/`synced`/`resync`/`push_ack` each become one local
//!    transaction (data and cursor together) and then events.
//! 5. `sync_now` requests wait until every mutation they cover has its outcome, every
//!    subscription is synced and a `ping` sent after that was answered by a `pong` whose
//!    `head` covers every ack's `visible_at` (PROTOCOL.md §4.6).
//!
//! A session ends on a closed or dead connection (nothing received for `dead_after`; a `ping`
//! goes out every heartbeat so a live server always answers), a fatal error, `goaway`, or a
//! local store failure. The task then waits (backoff with full jitter; `goaway`'s hint; no wait
//! after an expired token, once) and starts over; a `sync_now` call cuts the wait short.

mod machine;
mod reconnect;

use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::StdRng;
use syncgate_protocol::ErrorCode;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_util::sync::CancellationToken;

use crate::conn::{ConnError, Connection};
use crate::sdk::{ConnectionState, Event, Settings, Shared, SyncFailure, SyncReport, SyncRequest};
use crate::store::{Applied, StoreError};
use machine::{End, Limits, Machine, Work, permanent_code};
use reconnect::{Next, Reconnect};

impl From<StoreError> for End {
    fn from(e: StoreError) -> End {
        End::Lost {
            reason: format!("local store: {e}"),
        }
    }
}

impl From<ConnError> for End {
    fn from(e: ConnError) -> End {
        match e {
            ConnError::Closed(Some(code)) if code == 4000 + ErrorCode::TokenExpired.code() => {
                End::TokenExpired
            }
            ConnError::Server(e) if e.code == ErrorCode::TokenExpired.code() => End::TokenExpired,
            ConnError::Server(e) if permanent_code(e.code) => End::Refused {
                code: Some(e.code),
                reason: format!("{} ({}): {}", e.name, e.code, e.message),
            },
            ConnError::Closed(Some(close)) if close > 4000 && permanent_code(close - 4000) => {
                End::Refused {
                    code: Some(close - 4000),
                    reason: format!("connection closed with code {close}"),
                }
            }
            ConnError::Ws(WsError::Url(e)) => End::Refused {
                code: None,
                reason: format!("not a usable WebSocket URL ({e}): use ws://HOST:PORT"),
            },
            ConnError::Url(reason) => End::Refused { code: None, reason },
            // Turned away before `welcome` (admission, a draining node): the server's hint.
            ConnError::GoAway {
                reason,
                retry_after_ms,
            } => End::GoAway {
                reason,
                retry_after: std::time::Duration::from_millis(u64::from(retry_after_ms)),
            },
            // An untrusted certificate is not retried in silence: it is either a configuration
            // to fix (the CA file) or someone in between.
            ConnError::Tls(reason) => End::Refused {
                code: None,
                reason: format!("TLS: {reason}"),
            },
            ConnError::Ws(WsError::Http(response))
                if response.status().is_client_error()
                    && !matches!(response.status().as_u16(), 408 | 429) =>
            {
                End::Refused {
                    code: None,
                    reason: format!(
                        "the server answered the WebSocket upgrade with HTTP {}: is the URL \
                         the gateway's WebSocket listener (ws://HOST:7420 by default, path /)?",
                        response.status()
                    ),
                }
            }
            other => End::Lost {
                reason: other.to_string(),
            },
        }
    }
}

/// The task's main loop.
pub(crate) async fn run(
    shared: Arc<Shared>,
    settings: Settings,
    mut sync_rx: mpsc::Receiver<SyncRequest>,
    cancel: CancellationToken,
) {
    let mut rng = StdRng::from_os_rng();
    let mut reconnect = Reconnect::default();
    let mut waiting: Vec<SyncRequest> = Vec::new();
    // Lowered when the gateway refuses a batch for writing too much to its log.
    let mut batch_size = settings.batch_size;
    loop {
        shared.set_state(ConnectionState::Connecting {
            attempt: reconnect.attempt,
        });
        let mut connected_at = None;
        let end = tokio::select! {
            _ = cancel.cancelled() => End::Shutdown,
            end = session(&shared, &settings, &mut batch_size, &mut sync_rx, &mut waiting, &cancel, &mut connected_at) => end,
        };
        let up_for = connected_at.map(|t: Instant| t.elapsed());
        let mut asked_now = false;
        if matches!(end, End::Lost { .. }) {
            while let Ok(r) = sync_rx.try_recv() {
                asked_now = true;
                waiting.push(r);
            }
            if up_for.is_none() {
                // Callers that asked not to wait for an unreachable gateway get their answer
                // now.
                let reason = match &end {
                    End::Lost { reason } => reason.clone(),
                    _ => String::new(),
                };
                for r in waiting.extract_if(.., |r| r.fail_fast) {
                    let _ = r.reply.send(Err(SyncFailure::Offline(reason.clone())));
                }
            }
        }
        let next = reconnect.after(
            end,
            up_for,
            asked_now && !waiting.is_empty(),
            &settings.backoff,
            settings.dead_after,
            &mut rng,
        );
        let (reason, delay) = match next {
            Next::Shutdown => break,
            Next::Stop { code, reason } => {
                tracing::warn!(%reason, "syncgate refused this client; not retrying");
                // The state first: a caller that learns of the refusal sees it stopped.
                shared.set_state(ConnectionState::Stopped {
                    code,
                    reason: reason.clone(),
                });
                for r in waiting.drain(..) {
                    let _ = r.reply.send(Err(SyncFailure::Refused {
                        code,
                        reason: reason.clone(),
                    }));
                }
                // Stay down until the application asks again (after fixing what was wrong).
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = sync_rx.recv() => match r {
                        Some(r) => waiting.push(r),
                        None => break,
                    },
                }
                continue;
            }
            Next::Retry { reason, delay } => (reason, delay),
        };
        tracing::debug!(%reason, ?delay, "syncgate session ended");
        shared.set_state(ConnectionState::Disconnected {
            reason,
            retry_in: delay,
        });
        let until = Instant::now() + delay;
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(until) => {}
            r = sync_rx.recv() => match r {
                // Someone wants to sync now: try at once.
                Some(r) => waiting.push(r),
                None => break,
            },
        }
    }
    shared.set_state(ConnectionState::Closed);
}

async fn session(
    shared: &Shared,
    settings: &Settings,
    batch_size: &mut u32,
    sync_rx: &mut mpsc::Receiver<SyncRequest>,
    waiting: &mut Vec<SyncRequest>,
    cancel: &CancellationToken,
    connected_at: &mut Option<Instant>,
) -> End {
    let token = match (settings.token)().await {
        Ok(t) => t,
        Err(e) => {
            return End::Lost {
                reason: format!("token provider: {e}"),
            };
        }
    };
    let connect = async {
        Connection::open_tls(&settings.url, None, None, settings.tls.clone())
            .await?
            .offer_compression(settings.compression)
            .count_into(shared.traffic.clone())
            .handshake(shared.store.client_id(), &token)
            .await
    };
    let (conn, welcome) = match tokio::time::timeout(settings.connect_timeout, connect).await {
        Err(_) => {
            return End::Lost {
                reason: format!(
                    "no answer from {} within {:?}",
                    settings.url, settings.connect_timeout
                ),
            };
        }
        Ok(Err(ConnError::Server(e))) => {
            shared.emit(Event::ServerError {
                code: e.code,
                name: e.name.clone(),
                message: e.message.clone(),
            });
            return ConnError::Server(e).into();
        }
        Ok(Err(e)) => return e.into(),
        Ok(Ok(c)) => c,
    };
    *connected_at = Some(Instant::now());
    let mut shell = Shell {
        shared,
        conn,
        rejected: 0,
    };
    match shell
        .run(welcome, settings, batch_size, sync_rx, waiting, cancel)
        .await
    {
        Ok(end) | Err(end) => end,
    }
}

/// Drives one connection's [`Machine`] with the socket, the local store and the clock.
struct Shell<'a> {
    shared: &'a Shared,
    conn: Connection,
    /// Mutations rejected in this session (reported by `sync_now`).
    rejected: u64,
}

impl Shell<'_> {
    async fn run(
        &mut self,
        welcome: syncgate_protocol::Welcome,
        settings: &Settings,
        batch_size: &mut u32,
        sync_rx: &mut mpsc::Receiver<SyncRequest>,
        waiting: &mut Vec<SyncRequest>,
        cancel: &CancellationToken,
    ) -> Result<End, End> {
        let store = &self.shared.store;
        if store
            .on_welcome(&welcome.epoch, welcome.last_applied_mutation)
            .await?
        {
            tracing::warn!(
                last_applied = welcome.last_applied_mutation,
                "the gateway has applied mutation ids this client never handed out \
                 (restored data directory?); new ids continue above them"
            );
        }
        store
            .set_meta(
                "max_document_bytes",
                &welcome.limits.max_document_bytes.to_string(),
            )
            .await?;
        // Acknowledged writes to these collections are forgotten locally (`on_ack`).
        store
            .set_meta("upload_only", &welcome.upload_only.join("\n"))
            .await?;
        self.shared.set_state(ConnectionState::Connected {
            session: welcome.session.clone(),
        });
        let limits = Limits::negotiate(
            *batch_size,
            settings.heartbeat,
            settings.dead_after,
            &welcome,
        );
        let mut m = Machine::new(
            &welcome,
            store.subscriptions().await?,
            limits,
            Instant::now().into_std(),
        );
        // Callers may have asked before this session began (during the backoff wait).
        m.set_waiting(!waiting.is_empty());
        // A fresh token is sent before the session's one expires (`refresh`), so the session
        // does not end with `token_expired` and a reconnect.
        let mut refresh_at = welcome
            .token_valid_ms
            .map(|ms| Instant::now() + refresh_after(ms));
        loop {
            while let Some(work) = m.poll_work() {
                self.carry_out(work, &mut m, waiting).await?;
            }
            while let Some(frame) = m.poll_transmit() {
                self.conn.send(&frame).await?;
            }
            if let Some(end) = m.poll_end() {
                if let Some(hint) = m.batch_hint() {
                    *batch_size = (*batch_size).min(hint);
                }
                return Ok(end);
            }
            let before = waiting.len();
            waiting.retain(|r| !r.reply.is_closed());
            if waiting.len() != before {
                m.set_waiting(!waiting.is_empty());
                continue;
            }
            let deadline = m.poll_timeout().map(Instant::from_std);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(End::Shutdown),
                frame = self.conn.recv() => {
                    let frame = frame?;
                    if let syncgate_protocol::Frame::Refreshed(r) = &frame {
                        refresh_at = Some(Instant::now() + refresh_after(r.token_valid_ms));
                    }
                    m.handle_frame(frame, Instant::now().into_std());
                }
                _ = sleep_until(refresh_at) => {
                    // One attempt per token; a refusal leaves the session to its current
                    // token, and its expiry to the usual reconnect with a new one.
                    refresh_at = None;
                    match (settings.token)().await {
                        Ok(token) => {
                            let frame = syncgate_protocol::Frame::Refresh(
                                syncgate_protocol::Refresh { token },
                            );
                            self.conn.send(&frame).await?;
                        }
                        Err(e) => tracing::warn!(error = %e, "token provider failed; the session ends when its token expires"),
                    }
                }
                r = sync_rx.recv() => match r {
                    Some(r) => {
                        waiting.push(r);
                        m.set_waiting(true);
                    }
                    None => return Ok(End::Shutdown),
                },
                _ = self.shared.wake.notified() => m.outbox_changed(),
                _ = sleep_until(deadline) => m.handle_timeout(Instant::now().into_std()),
            }
        }
    }

    /// One local-store operation or event the machine decided.
    async fn carry_out(
        &mut self,
        work: Work,
        m: &mut Machine,
        waiting: &mut Vec<SyncRequest>,
    ) -> Result<(), End> {
        let store = &self.shared.store;
        match work {
            Work::BeginSnapshot { collection, resync } => {
                store.begin_snapshot(&collection, resync).await?;
            }
            Work::ApplySnapshot { collection, docs } => {
                let applied = store.apply_snapshot(&collection, &docs).await?;
                self.emit_applied(applied);
            }
            Work::ApplyChanges {
                collection,
                changes,
                cursor,
            } => {
                let applied = store.apply_changes(&collection, &changes, &cursor).await?;
                self.emit_applied(applied);
            }
            Work::Synced { collection, cursor } => {
                let applied = store.synced(&collection, &cursor).await?;
                self.emit_applied(applied);
            }
            Work::Ack { results } => {
                let outcome = store.on_ack(&results).await?;
                for (mutation_id, version) in outcome.applied {
                    self.shared.emit(Event::Uploaded {
                        mutation_id,
                        version,
                    });
                }
                for r in outcome.rejected {
                    self.rejected += 1;
                    self.shared.emit(Event::Rejected {
                        mutation: r.mutation,
                        code: r.code,
                        reason: r.reason,
                    });
                }
                for conflict in outcome.conflicts {
                    self.shared.emit(Event::ConflictOpened(conflict));
                }
            }
            Work::ReadOutbox {
                after,
                limit,
                bytes,
            } => {
                let batch = store.pending_after(after, limit, bytes).await?;
                m.handle_outbox(batch);
            }
            Work::FinishSync {
                cursor,
                collections,
            } => {
                for c in &collections {
                    store.advance(c, &cursor).await?;
                }
                let first_pending = store
                    .pending_after(0, 1, usize::MAX)
                    .await?
                    .first()
                    .map(|m| m.mutation_id);
                let pending = store.pending_count().await?;
                let done = |r: &SyncRequest| first_pending.is_none_or(|p| p > r.upto);
                for r in waiting.extract_if(.., |r| done(r)) {
                    let _ = r.reply.send(Ok(SyncReport {
                        head: cursor.seq,
                        pending,
                        rejected: self.rejected,
                    }));
                }
                m.set_waiting(!waiting.is_empty());
            }
            Work::Emit(event) => self.shared.emit(event),
        }
        Ok(())
    }

    fn emit_applied(&self, applied: Vec<Applied>) {
        for a in applied {
            if a.concurrent_pending > 0 {
                self.shared.emit(Event::Conflict {
                    collection: a.collection.clone(),
                    id: a.id.clone(),
                    server_version: a.version,
                    pending_mutations: a.concurrent_pending,
                });
            }
            self.shared.emit(Event::RemoteChange {
                collection: a.collection,
                id: a.id,
                version: a.version,
                body: a.body,
            });
        }
    }
}

/// How long after learning that its token is valid for `valid_ms` a session sends a newer
/// one: at three quarters of the validity, so a slow token provider or network still has a
/// quarter left.
fn refresh_after(valid_ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(valid_ms / 4 * 3)
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
