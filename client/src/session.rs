//! The background task: connect, resume, upload, download, heartbeat, reconnect.
//!
//! One task per [`crate::Client`]; it owns the WebSocket and is the only writer of incoming
//! data to the store. Per session (one connection):
//!
//! 1. `hello` with a token from the provider → `welcome` (`on_welcome` records the epoch and the
//!    server's `last_applied_mutation`).
//! 2. Every stored subscription is sent with its cursor (none = snapshot; the rows it will
//!    replace are marked stale first).
//! 3. The outbox is uploaded in mutation-id order, in batches, at most [`MAX_INFLIGHT`] batches
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use syncgate_protocol::{Cursor, ErrorCode, Frame, Ping, Pong, Push, Subscribe, Welcome};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::conn::{ConnError, Connection};
use crate::sdk::{ConnectionState, Event, Settings, Shared, SyncFailure, SyncReport, SyncRequest};
use crate::store::{Applied, StoreError};

/// Most unacknowledged push batches per connection.
pub(crate) const MAX_INFLIGHT: usize = 4;

/// How a session ended.
enum End {
    /// The client is closing.
    Shutdown,
    /// The server asked us to come back later.
    GoAway {
        reason: String,
        retry_after: Duration,
    },
    /// The token was refused as expired: ask the provider again.
    TokenExpired,
    /// Anything else: back off and retry.
    Lost { reason: String },
    /// Refused for a reason that retrying cannot fix: stop until the application asks again.
    Refused { code: Option<u16>, reason: String },
}

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

/// A server error code that says the request is wrong as sent: retrying cannot help. Codes
/// this client does not know are treated as retryable (a newer server's transient error).
fn permanent_code(code: u16) -> bool {
    ErrorCode::from_code(code).is_some_and(|c| !c.retryable())
}

/// The task's main loop.
pub(crate) async fn run(
    shared: Arc<Shared>,
    settings: Settings,
    mut sync_rx: mpsc::Receiver<SyncRequest>,
    cancel: CancellationToken,
) {
    let mut rng = StdRng::from_os_rng();
    let mut attempt = 0u32;
    let mut waiting: Vec<SyncRequest> = Vec::new();
    let mut token_retried = false;
    loop {
        shared.set_state(ConnectionState::Connecting { attempt });
        let mut connected_at = None;
        let end = tokio::select! {
            _ = cancel.cancelled() => End::Shutdown,
            end = session(&shared, &settings, &mut sync_rx, &mut waiting, &cancel, &mut connected_at) => end,
        };
        // A session that stayed up a while was a success: start the backoff over. (One that
        // failed right after the handshake keeps backing off.)
        if connected_at.is_some_and(|t: Instant| t.elapsed() >= settings.dead_after) {
            attempt = 0;
        }
        let never_connected = connected_at.is_none();
        let end = match end {
            // The provider was asked again and its token is expired too: it cannot renew.
            End::TokenExpired if token_retried => End::Refused {
                code: Some(ErrorCode::TokenExpired.code()),
                reason: "the token has expired and the token provider gave no fresh one".into(),
            },
            other => other,
        };
        let (reason, delay) = match end {
            End::Shutdown => break,
            End::Refused { code, reason } => {
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
                attempt = 0;
                token_retried = false;
                continue;
            }
            End::GoAway {
                reason,
                retry_after,
            } => {
                attempt = 0;
                (
                    format!("server going away: {reason}"),
                    Backoff::after_goaway(retry_after, &mut rng),
                )
            }
            End::TokenExpired => {
                token_retried = true;
                (
                    "token expired; asking the provider for a new one".into(),
                    Duration::ZERO,
                )
            }
            End::Lost { reason } => {
                // A request that arrived while this attempt was failing asks to sync now: it
                // cuts the backoff short, as one arriving during the wait does.
                let mut asked_now = false;
                while let Ok(r) = sync_rx.try_recv() {
                    asked_now = true;
                    waiting.push(r);
                }
                if never_connected {
                    // Callers that asked not to wait for an unreachable gateway get their
                    // answer now.
                    for r in waiting.extract_if(.., |r| r.fail_fast) {
                        let _ = r.reply.send(Err(SyncFailure::Offline(reason.clone())));
                    }
                }
                token_retried = false;
                let d = if asked_now && !waiting.is_empty() {
                    Duration::ZERO
                } else {
                    settings.backoff.delay(attempt, &mut rng)
                };
                attempt = attempt.saturating_add(1);
                (reason, d)
            }
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
    let connect = Connection::connect(&settings.url, shared.store.client_id(), &token);
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
    let mut s = Session {
        shared,
        settings,
        conn,
        subs: HashMap::new(),
        synced: HashSet::new(),
        refused: HashSet::new(),
        inflight: VecDeque::new(),
        sent_upto: 0,
        next_batch: 1,
        max_visible: 0,
        barrier: None,
        nonce: 0,
        rejected: 0,
        epoch: welcome.epoch.clone(),
    };
    match s.run(welcome, sync_rx, waiting, cancel).await {
        Ok(end) => end,
        Err(end) => end,
    }
}

struct Session<'a> {
    shared: &'a Shared,
    settings: &'a Settings,
    conn: Connection,
    /// Subscription id → collection.
    subs: HashMap<u32, String>,
    /// Subscriptions that are live.
    synced: HashSet<u32>,
    /// Subscriptions the server refused (final for the session; reported as events).
    refused: HashSet<u32>,
    /// Unacknowledged batches: (batch id, its last mutation id).
    inflight: VecDeque<(u64, u64)>,
    /// The highest mutation id sent on this connection.
    sent_upto: u64,
    next_batch: u64,
    /// The highest `visible_at` of this session's acks.
    max_visible: u64,
    /// The `ping` that closes a `sync_now`: (nonce, the head it must reach).
    barrier: Option<(u64, u64)>,
    nonce: u64,
    rejected: u64,
    epoch: String,
}

impl Session<'_> {
    async fn run(
        &mut self,
        welcome: Welcome,
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
        self.shared.set_state(ConnectionState::Connected {
            session: welcome.session.clone(),
        });
        for (i, sub) in store.subscriptions().await?.into_iter().enumerate() {
            let id = i as u32 + 1;
            if sub.cursor.is_none() {
                store.begin_snapshot(&sub.collection, false).await?;
            }
            self.conn
                .send(&Frame::Subscribe(Subscribe {
                    sub: id,
                    collection: sub.collection.clone(),
                    filter: sub.filter,
                    cursor: sub.cursor,
                }))
                .await?;
            self.subs.insert(id, sub.collection);
        }
        let batch_limit = self
            .settings
            .batch_size
            .min(welcome.limits.max_mutations_per_batch)
            .max(1);
        // Half the frame limit leaves room for the framing around the mutations.
        let batch_bytes = welcome.limits.max_frame_bytes as usize / 2;
        let beat = self.settings.heartbeat.min(Duration::from_millis(u64::from(
            welcome.heartbeat_ms.max(10),
        )));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + beat, beat);
        let mut last_recv = Instant::now();
        loop {
            while self.inflight.len() < MAX_INFLIGHT {
                let batch = store
                    .pending_after(self.sent_upto, batch_limit, batch_bytes)
                    .await?;
                let Some(last) = batch.last().map(|m| m.mutation_id) else {
                    break;
                };
                let id = self.next_batch;
                self.next_batch += 1;
                self.conn
                    .send(&Frame::Push(Push {
                        batch: id,
                        mutations: batch,
                    }))
                    .await?;
                self.inflight.push_back((id, last));
                self.sent_upto = last;
            }
            waiting.retain(|r| !r.reply.is_closed());
            if !waiting.is_empty()
                && self.barrier.is_none()
                && self.inflight.is_empty()
                && self.synced.len() + self.refused.len() == self.subs.len()
            {
                self.nonce += 1;
                self.barrier = Some((self.nonce, self.max_visible));
                self.conn
                    .send(&Frame::Ping(Ping { nonce: self.nonce }))
                    .await?;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(End::Shutdown),
                frame = self.conn.recv() => {
                    last_recv = Instant::now();
                    if let Some(end) = self.handle(frame?, waiting).await? {
                        return Ok(end);
                    }
                }
                r = sync_rx.recv() => match r {
                    Some(r) => waiting.push(r),
                    None => return Ok(End::Shutdown),
                },
                _ = self.shared.wake.notified() => {}
                _ = heartbeat.tick() => {
                    if last_recv.elapsed() >= self.settings.dead_after {
                        return Ok(End::Lost {
                            reason: format!(
                                "nothing received for {:?}: connection presumed dead",
                                last_recv.elapsed()
                            ),
                        });
                    }
                    // Nonce 0 is never a barrier's.
                    self.conn.send(&Frame::Ping(Ping { nonce: 0 })).await?;
                }
            }
        }
    }

    fn collection(&self, sub: u32) -> Result<&str, End> {
        self.subs
            .get(&sub)
            .map(String::as_str)
            .ok_or_else(|| End::Lost {
                reason: format!("protocol violation: the server named unknown subscription {sub}"),
            })
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

    /// Handles one frame; `Some` ends the session.
    async fn handle(
        &mut self,
        frame: Frame,
        waiting: &mut Vec<SyncRequest>,
    ) -> Result<Option<End>, End> {
        let store = &self.shared.store;
        match frame {
            Frame::Snapshot(s) => {
                let c = self.collection(s.sub)?.to_owned();
                let applied = store.apply_snapshot(&c, &s.docs).await?;
                self.emit_applied(applied);
            }
            Frame::Changes(ch) => {
                let c = self.collection(ch.sub)?.to_owned();
                let applied = store.apply_changes(&c, &ch.changes, &ch.cursor).await?;
                self.emit_applied(applied);
            }
            Frame::Synced(s) => {
                let c = self.collection(s.sub)?.to_owned();
                let applied = store.synced(&c, &s.cursor).await?;
                self.emit_applied(applied);
                self.synced.insert(s.sub);
                self.shared.emit(Event::Synced {
                    collection: c,
                    cursor: s.cursor,
                });
            }
            Frame::Resync(r) => {
                let c = self.collection(r.sub)?.to_owned();
                self.synced.remove(&r.sub);
                store.begin_snapshot(&c, true).await?;
                self.shared.emit(Event::Resync {
                    collection: c,
                    reason: r.reason,
                });
            }
            Frame::PushAck(ack) => {
                match self.inflight.pop_front() {
                    Some((batch, _)) if batch == ack.batch => {}
                    other => {
                        return Ok(Some(End::Lost {
                            reason: format!(
                                "protocol violation: ack for batch {} while waiting for {:?}",
                                ack.batch,
                                other.map(|o| o.0)
                            ),
                        }));
                    }
                }
                self.max_visible = self.max_visible.max(ack.visible_at);
                let outcome = store.on_ack(&ack.results).await?;
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
            }
            Frame::Pong(p) => {
                if let Some((nonce, required)) = self.barrier
                    && p.nonce == nonce
                {
                    self.barrier = None;
                    let head = p.head.unwrap_or(0);
                    if head >= required {
                        self.finish_sync(head, waiting).await?;
                    }
                    // Otherwise the node has not published our own writes yet: the next
                    // loop turn pings again.
                }
            }
            Frame::Ping(p) => {
                self.conn
                    .send(&Frame::Pong(Pong {
                        nonce: p.nonce,
                        head: None,
                    }))
                    .await?;
            }
            Frame::Error(e) => {
                self.shared.emit(Event::ServerError {
                    code: e.code,
                    name: e.name.clone(),
                    message: e.message.clone(),
                });
                if e.code == ErrorCode::TokenExpired.code() {
                    return Ok(Some(End::TokenExpired));
                }
                if e.fatal && permanent_code(e.code) {
                    return Ok(Some(End::Refused {
                        code: Some(e.code),
                        reason: format!("{} ({}): {}", e.name, e.code, e.message),
                    }));
                }
                if e.fatal {
                    return Ok(Some(End::Lost {
                        reason: format!("server error {} {}: {}", e.code, e.name, e.message),
                    }));
                }
                if e.batch.is_some() {
                    // The batch was not committed: reconnect and upload it again.
                    return Ok(Some(End::Lost {
                        reason: format!("push failed: {} {}: {}", e.code, e.name, e.message),
                    }));
                }
                if let Some(sub) = e.sub {
                    // A refused subscription is final for this session; do not wait for it.
                    self.refused.insert(sub);
                }
            }
            Frame::GoAway(g) => {
                return Ok(Some(End::GoAway {
                    reason: g.reason,
                    retry_after: Duration::from_millis(u64::from(g.retry_after_ms)),
                }));
            }
            other => {
                return Ok(Some(End::Lost {
                    reason: format!("protocol violation: unexpected {}", other.type_name()),
                }));
            }
        }
        Ok(None)
    }

    /// Every subscription has seen everything up to `head`: store that as their cursor and
    /// answer the `sync_now` calls whose mutations all have their outcome.
    async fn finish_sync(&mut self, head: u64, waiting: &mut Vec<SyncRequest>) -> Result<(), End> {
        let store = &self.shared.store;
        let cursor = Cursor {
            epoch: self.epoch.clone(),
            seq: head,
        };
        for (id, c) in &self.subs {
            if self.synced.contains(id) {
                store.advance(c, &cursor).await?;
            }
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
                head,
                pending,
                rejected: self.rejected,
            }));
        }
        Ok(())
    }
}
