//! One WebSocket connection: the handshake, then a loop that turns frames into work
//! (subscriptions, pushes, pings) and, in the same task, drains the outbound queue into the
//! socket ([`Io`], [`crate::outbound::Writer`]).
//!
//! Tasks per connection: this one and, while a subscription is catching up, one short-lived
//! task per subscription
//! ([`crate::ws::subscription::start`], stopped by [`SubEntry::end`]: nothing of it is kept once
//! it finished). On disconnect the loop ends and unregisters every subscription, which stops
//! their catch-up tasks; pushes already handed to ingest still commit (the client learns
//! their outcome from `Welcome.last_applied_mutation` and replays).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::task::AtomicWaker;
use futures_util::{Future, Sink, StreamExt};
use syncgate_protocol::codec::{decode_with_limits, encode};
use syncgate_protocol::limits::is_valid_id;
use syncgate_protocol::tls::Transport;
use syncgate_protocol::{
    Compression, Fetch, Filter, Frame, GoAway, Hello, Pong, Push, PushAck, Refreshed, Subscribe,
    Unsubscribed, Welcome, negotiate_version,
};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::auth::AuthError;
use crate::auth::scope::Access;
use crate::config::SyncMode;
use crate::error::{ErrorReply, GatewayError, Step};
use crate::ingest::IngestRequest;
use crate::ingest::plan::{PushJob, PushOutcome};
use crate::outbound::{Outbound, Writer};
use crate::shared::Shared;
use crate::storage::ClientClaim;
use crate::sync::frames::View;
use crate::sync::hub::SubEntry;
use crate::ws::rate::{Bucket, Pace, Verdict};

/// Refusals (less allowed frames since) that close a connection going over the frame rate.
const MAX_RATE_STRIKES: u32 = 100;

/// A push on its way; it completes with its [`PushDone`].
type PushReply = Pin<Box<dyn Future<Output = PushDone> + Send>>;

/// A connection's pushes in flight, answered in order. Nothing while there are none: most
/// connections seldom or never push (a terminal that watches), and a `FuturesOrdered`, even
/// empty, holds two heap allocations (~150 B) — for the connection's life if kept.
#[derive(Default)]
struct Pushes(Option<FuturesOrdered<PushReply>>);

impl Pushes {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesOrdered::len)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_back(&mut self, reply: PushReply) {
        self.0
            .get_or_insert_with(FuturesOrdered::new)
            .push_back(reply);
    }

    /// The oldest push's answer, once it is there (`None` at once if there is no push). A
    /// `poll_fn`, not an `async fn`: its future is one reference, like `StreamExt::next`'s,
    /// and it sits in the wait every idle connection carries.
    fn next(&mut self) -> impl Future<Output = Option<PushDone>> + '_ {
        std::future::poll_fn(move |cx| {
            let Some(pushes) = self.0.as_mut() else {
                return Poll::Ready(None);
            };
            let done = std::task::ready!(pushes.poll_next_unpin(cx));
            if pushes.is_empty() {
                self.0 = None;
            }
            Poll::Ready(done)
        })
    }
}

/// A push whose answer came back.
struct PushDone {
    batch: u64,
    /// The frame's size, counted in `inflight_bytes` until now.
    size: usize,
    /// When the push arrived (for `syncgate_push_seconds`).
    started: Instant,
    /// The outcome, a refusal, or nothing (ingest stopped).
    reply: Result<Result<PushOutcome, GatewayError>, oneshot::error::RecvError>,
}

/// The close code for a WebSocket protocol violation by the peer (RFC 6455 §7.4.1): 1002 for
/// a malformed or unmasked frame, a reserved bit or opcode; 1007 for text that is not UTF-8.
/// `None` for errors that are not the peer's protocol violations (the connection is gone).
fn ws_violation_close_code(e: &WsError) -> Option<u16> {
    match e {
        WsError::Protocol(_) => Some(1002),
        WsError::Utf8(_) => Some(1007),
        _ => None,
    }
}

/// Refuses the WebSocket upgrade of a browser page from an origin that is not allowed
/// (`allowed_origins`; empty = any). Clients that are not browsers send no `Origin` and are
/// not affected: they authenticate with their token like everyone else.
struct OriginCheck<'a> {
    allowed: &'a [String],
}

impl tokio_tungstenite::tungstenite::handshake::server::Callback for OriginCheck<'_> {
    fn on_request(
        self,
        request: &tokio_tungstenite::tungstenite::handshake::server::Request,
        response: tokio_tungstenite::tungstenite::handshake::server::Response,
    ) -> Result<
        tokio_tungstenite::tungstenite::handshake::server::Response,
        tokio_tungstenite::tungstenite::handshake::server::ErrorResponse,
    > {
        let origin = request
            .headers()
            .get("origin")
            .map(|o| o.to_str().unwrap_or("<not text>"));
        match origin {
            Some(o) if !self.allowed.is_empty() && !self.allowed.iter().any(|a| a == o) => {
                let mut refusal =
                    tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(Some(
                        format!("origin {o:?} is not allowed\n"),
                    ));
                *refusal.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::FORBIDDEN;
                Err(refusal)
            }
            _ => Ok(response),
        }
    }
}

/// An authenticated session.
struct Session {
    client_id: String,
    user: String,
    /// The user's roles and row scopes, shared with every push of the session.
    access: Arc<Access>,
    /// The session id sent in `welcome` (as 16 hex digits), for log lines.
    id: u64,
    /// When the token expires (plus the leeway): the session ends then with
    /// `token_expired`, and the client reconnects with a fresh token.
    token_deadline: Instant,
    /// This session's place in its user's count (given back when the session ends).
    _slot: Option<UserSlot>,
}

/// One session of a user, counted against `max_connections_per_user` until dropped.
struct UserSlot {
    counts: Arc<dashmap::DashMap<String, usize>>,
    user: String,
}

impl UserSlot {
    /// Takes a place for `user`, unless it already holds `limit` (0 = no limit: not counted).
    fn take(
        counts: &Arc<dashmap::DashMap<String, usize>>,
        user: &str,
        limit: usize,
    ) -> Result<Option<UserSlot>, GatewayError> {
        if limit == 0 {
            return Ok(None);
        }
        let mut n = counts.entry(user.to_owned()).or_insert(0);
        if *n >= limit {
            return Err(GatewayError::TooManyConnections { limit });
        }
        *n += 1;
        Ok(Some(UserSlot {
            counts: counts.clone(),
            user: user.to_owned(),
        }))
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let gone = match self.counts.get_mut(&self.user) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if gone {
            self.counts.remove_if(&self.user, |_, n| *n == 0);
        }
    }
}

/// A subscription of this connection (its start task stops when the entry ends).
struct ActiveSub {
    entry: Arc<SubEntry>,
}

/// Serves one accepted TCP connection to the end.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let opened = Instant::now();
    // Kept as an address, not a string: every idle connection carries it.
    let peer = tcp
        .peer_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let limits = shared.config.limits;
    // Admission: a turn among `max_concurrent_handshakes`, held until `welcome`; without
    // one within `handshake_queue_ms` the connection is sent away with a retry hint.
    let admission = match &shared.handshakes {
        Some(turns) => match turns.clone().try_acquire_owned() {
            Ok(turn) => Some(turn),
            // Both boxed, like the upgrade below: the rare paths' state would otherwise size
            // every connection's future for its whole life.
            Err(_) => match Box::pin(wait_for_turn(&shared, turns)).await {
                Some(turn) => Some(turn),
                None => return Box::pin(turn_away(&shared, tcp)).await,
            },
        },
        None => None,
    };
    // The WebSocket upgrade and then `hello` must each come within this.
    let handshake_timeout = Duration::from_millis(shared.config.handshake_timeout_ms);
    // A 1 KiB read buffer (tungstenite zero-fills the whole buffer it reads into, and an idle
    // connection keeps it): 10.0 → 6.9 KiB of RSS per idle connection (BENCHMARKS.md, P1); a
    // larger frame grows the buffer as it arrives, and ingest throughput was unchanged.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(shared.config.outbound_buffer_bytes * 2 + 64 * 1024)
        .max_message_size(Some(limits.max_frame_bytes as usize))
        .max_frame_size(Some(limits.max_frame_bytes as usize));
    // Boxed: a future's size is that of its largest await point, so the upgrade's state
    // machine inline would be carried by every idle connection for its whole life.
    let ws = match tokio::time::timeout(
        handshake_timeout,
        Box::pin(tokio_tungstenite::accept_hdr_async_with_config(
            // A TLS handshake, if any, runs on the first read: within this same timeout.
            Transport::accept(tcp, shared.tls.clone()),
            OriginCheck {
                allowed: &shared.config.allowed_origins,
            },
            Some(ws_config),
        )),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "websocket upgrade failed");
            return;
        }
        Err(_) => return,
    };
    shared.metrics.connections.inc();
    shared.metrics.connections_opened.inc();
    let out = Arc::new(Outbound::new(
        shared.config.outbound_buffer_bytes,
        shared.metrics.outbound_bytes.clone(),
    ));
    let mut io = Io {
        ws,
        writer: Writer::new(crate::outbound::WriterMetrics::of(&shared.metrics)),
        written: false,
    };
    let mut conn = Connection {
        shared: shared.clone(),
        peer,
        out: out.clone(),
        session: None,
        subs: HashMap::new(),
        inflight_bytes: 0,
        rate: Bucket::new(
            shared.config.max_frames_per_second,
            shared.config.max_frames_per_second,
            MAX_RATE_STRIKES,
            Instant::now(),
        ),
        pace: Pacing::new(&shared.config, Instant::now()),
        fetches: Vec::new(),
        admission,
        info: None,
        compression: None,
    };
    let reason = conn.run(&mut io).await;
    conn.teardown();
    shared
        .metrics
        .connections_closed
        .with_label_values(&[close_label(&reason, conn.session.is_some())])
        .inc();
    if let Some(suppressed) = shared.oplog.connections.allow() {
        let duration_ms = opened.elapsed().as_millis() as u64;
        match &conn.session {
            Some(s) => tracing::info!(
                %peer, client_id = %s.client_id, user = %crate::oplog::printable(&s.user), session = %format_args!("{:016x}", s.id),
                duration_ms, reason = %reason, suppressed, "connection closed"
            ),
            None => tracing::info!(
                %peer, duration_ms, reason = %reason, suppressed,
                "connection closed before the handshake"
            ),
        }
    }
    if !out.is_closed() {
        out.close_after_flush(1000, "bye");
    }
    let silence = Duration::from_millis(u64::from(shared.config.heartbeat_ms) * 3);
    let cap = Duration::from_millis(shared.config.close_linger_ms);
    linger(&mut io, &out, silence, cap).await;
    shared.metrics.connections.dec();
}

/// How long a closing connection waits for the client's close frame once its own is out.
const CLOSE_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// The end of a connection: drives the writer until it sent what is left (the error that
/// says why, `goaway`) and the close frame, reading and dropping whatever the client still
/// sends meanwhile, then waits briefly for the client's close frame. Closing a socket with
/// unread bytes makes the kernel send a reset, and a reset makes the client's kernel discard
/// what the client had not read yet: a client that stopped reading but went on sending `ping`
/// used to lose the `slow_consumer` error that way and see only a reset (1006). Gives up when
/// the client is silent for three heartbeats (it is gone) or after `close_linger_ms`.
async fn linger<S>(io: &mut Io<S>, out: &Outbound, silence: Duration, cap: Duration)
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Sink<Message> + Unpin,
{
    let cap = Instant::now() + cap;
    let mut last_seen = Instant::now();
    let mut reading = true;
    while !io.written {
        // Once the client's side has ended, the writer gets a few seconds to finish (a close
        // frame after a protocol violation) and nothing more.
        let until = match reading {
            true => cap.min(last_seen + silence),
            false => cap.min(last_seen + Duration::from_secs(5)),
        };
        tokio::select! {
            event = io.next(out, reading) => match event {
                IoEvent::Written => {}
                IoEvent::Read(Some(Ok(_))) => last_seen = Instant::now(),
                IoEvent::Read(Some(Err(_)) | None) => {
                    reading = false;
                    last_seen = Instant::now();
                }
            },
            // Given up: the socket is dropped with whatever was not written.
            _ = tokio::time::sleep_until(until.into()) => return,
        }
    }
    if !reading {
        return;
    }
    // The close frame is out: the client answers with its own (RFC 6455 §5.5.1). A live
    // client does so at once; a dead one is not waited for long.
    let answer = async {
        while let Some(Ok(msg)) = io.ws.next().await {
            if msg.is_close() {
                return;
            }
        }
    };
    let _ =
        tokio::time::timeout_at(cap.min(Instant::now() + CLOSE_ANSWER_WAIT).into(), answer).await;
}

/// A connection's WebSocket, read and written by its one task: [`Io::next`] drives the
/// writer and, when asked to, reads.
struct Io<S> {
    ws: S,
    writer: Writer,
    /// The writer finished (the close frame is out, or the socket failed).
    written: bool,
}

/// What [`Io::next`] saw.
enum IoEvent {
    /// The writer finished.
    Written,
    /// The next message from the client (`None`: the stream ended).
    Read(Option<Result<Message, WsError>>),
}

impl<S> Io<S>
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Sink<Message> + Unpin,
{
    /// Writes what `out` holds as far as the socket takes it and, if `read`, resolves with the
    /// next message; resolves with [`IoEvent::Written`] once when the writer finishes.
    fn next<'a>(&'a mut self, out: &'a Outbound, read: bool) -> impl Future<Output = IoEvent> + 'a {
        std::future::poll_fn(move |cx| {
            if !self.written && self.writer.poll_write(out, &mut self.ws, cx).is_ready() {
                self.written = true;
                return Poll::Ready(IoEvent::Written);
            }
            match read {
                true => self.ws.poll_next_unpin(cx).map(IoEvent::Read),
                false => Poll::Pending,
            }
        })
    }
}

/// The connection's socket, for one poll. A poisoned lock is still usable: a panic while it
/// was held ended the task that owns the socket.
fn lock<'a, T>(m: &'a std::sync::Mutex<T>) -> std::sync::MutexGuard<'a, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one wait of [`Connection::run`] ended with.
enum Turn {
    /// The node is shutting down.
    Shutdown,
    /// A push was answered by ingest.
    Pushed(PushDone),
    /// The outbound queue has room again.
    Space,
    /// The client's next message (`None`: the stream ended).
    Read(Option<Result<Message, WsError>>),
    /// The handshake, heartbeat, token or pause deadline passed.
    Deadline,
    /// A close was asked for.
    Closed,
    /// The writer finished.
    Written,
}

/// One task serves a connection's reads and writes, but its wake-ups have two kinds of cause:
/// the writer's (a frame queued, the socket writable again) — most of them under fan-out —
/// and everything else (a frame from the client, an ingest answer, a timer, shutdown). The
/// waits of the second kind are polled with this gate's waker, which marks the gate before it
/// wakes the task, so a wake-up for the writer polls the writer alone and not every wait.
struct Gate {
    inner: Arc<GateInner>,
    waker: std::task::Waker,
}

struct GateInner {
    /// A wait was woken since the last poll of the waits.
    woken: AtomicBool,
    /// The connection's task.
    task: AtomicWaker,
}

impl std::task::Wake for GateInner {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Gate {
    fn new() -> Gate {
        let inner = Arc::new(GateInner {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Gate {
            waker: std::task::Waker::from(inner.clone()),
            inner,
        }
    }

    /// Drives the writer until it finishes (then [`Turn::Written`]) while `waits` (polled
    /// only once one of them was woken) comes to a turn.
    fn wait<'a, S, F>(
        &'a self,
        io: &'a std::sync::Mutex<&mut Io<S>>,
        out: &'a Outbound,
        mut waits: Pin<&'a mut F>,
    ) -> impl Future<Output = Turn> + 'a
    where
        S: Sink<Message> + Unpin,
        F: Future<Output = Turn>,
    {
        // New waits: each must be polled once to register.
        self.inner.woken.store(true, Ordering::Release);
        std::future::poll_fn(move |cx| {
            {
                let mut io = lock(io);
                let io = &mut **io;
                if !io.written && io.writer.poll_write(out, &mut io.ws, cx).is_ready() {
                    io.written = true;
                    return Poll::Ready(Turn::Written);
                }
            }
            // Registered before the mark is read: a wait woken after the read wakes the task.
            self.inner.task.register(cx.waker());
            if !self.inner.woken.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            waits
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&self.waker))
        })
    }
}

/// What a frame leaves for [`Connection::run`] to await.
enum Awaited {
    /// The handshake.
    Hello(Hello),
    /// A push and its frame's size (inflated).
    Push(Push, usize),
}

struct Connection {
    shared: Arc<Shared>,
    /// The client's address, for log lines.
    peer: std::net::SocketAddr,
    out: Arc<Outbound>,
    session: Option<Session>,
    subs: HashMap<u32, ActiveSub>,
    /// Bytes of push frames in flight (`max_inflight_push_bytes`).
    inflight_bytes: usize,
    /// Frames per second (`max_frames_per_second`), pushes not counted.
    rate: Bucket,
    /// What pushes and subscription starts may cost per second.
    pace: Pacing,
    /// Answers to `fetch` being sent.
    fetches: Vec<tokio::task::AbortHandle>,
    /// The handshake's turn (`max_concurrent_handshakes`), given back at `welcome`.
    admission: Option<tokio::sync::OwnedSemaphorePermit>,
    /// What `GET /admin/clients` shows of this session (from `welcome` on).
    info: Option<Arc<crate::shared::ClientInfo>>,
    /// The compression negotiated in `welcome`, if any: frames from the client may come
    /// compressed with it.
    compression: Option<Compression>,
}

/// `fetch` requests one connection may have answered at once.
const MAX_FETCHES_IN_FLIGHT: usize = 8;

/// When a session whose token is valid until `valid_until` (Unix seconds, leeway included)
/// must end, and how many milliseconds that is from now (`None`: beyond any deadline worth
/// the name, as for an API key).
fn token_deadline(valid_until: u64) -> (Instant, Option<u64>) {
    let left = valid_until.saturating_sub(crate::auth::unix_now());
    let now = Instant::now();
    match now.checked_add(Duration::from_secs(left)) {
        Some(deadline) if left < 100 * 365 * 24 * 3600 => (deadline, Some(left * 1000)),
        _ => (now + Duration::from_secs(100 * 365 * 24 * 3600), None),
    }
}

/// A connection's pushes (mutations and bytes) and subscription starts per second, and the
/// pause its pushes put it in: while paused, the connection reads no frame.
struct Pacing {
    mutations: Pace,
    bytes: Pace,
    subscribes: Pace,
    /// When the pause began and when it ends.
    paused: Option<(Instant, Instant)>,
}

impl Pacing {
    fn new(config: &crate::config::Config, now: Instant) -> Pacing {
        let limits = &config.limits;
        let mutations = u64::from(config.max_push_mutations_per_second);
        let bytes = config.max_push_bytes_per_second;
        let subscribes = u64::from(config.max_subscribes_per_second);
        Pacing {
            // Bursts of one second's worth, and always at least one largest batch or frame.
            mutations: Pace::new(
                mutations,
                mutations.max(u64::from(limits.max_mutations_per_batch)),
                now,
            ),
            bytes: Pace::new(bytes, bytes.max(u64::from(limits.max_frame_bytes)), now),
            subscribes: Pace::new(
                subscribes,
                subscribes.max(u64::from(limits.max_subscriptions)),
                now,
            ),
            paused: None,
        }
    }
}

impl Connection {
    /// Serves frames until the connection ends; returns why (for the closing log line).
    async fn run<S>(&mut self, io: &mut Io<S>) -> String
    where
        S: futures_util::Stream<Item = Result<Message, WsError>> + Sink<Message> + Unpin,
    {
        let out = self.out.clone();
        let heartbeat = Duration::from_millis(u64::from(self.shared.config.heartbeat_ms) * 3);
        let handshake_deadline =
            Instant::now() + Duration::from_millis(self.shared.config.handshake_timeout_ms);
        let mut last_seen = Instant::now();
        let mut pushes = Pushes::default();
        let max_inflight = self.shared.config.max_inflight_pushes;
        let max_inflight_bytes = self.shared.config.max_inflight_push_bytes;
        let shutdown = self.shared.shutdown.clone();
        let gate = Gate::new();
        loop {
            // One timer per connection: the handshake deadline, then the earlier of the
            // heartbeat and the token's expiry.
            let token_deadline = self.session.as_ref().map(|s| s.token_deadline);
            let deadline = match token_deadline {
                None => handshake_deadline,
                Some(token) => (last_seen + heartbeat).min(token),
            };
            let deadline = match self.pace.paused {
                Some((_, until)) => deadline.min(until),
                None => deadline,
            };
            let paused = self.pace.paused.is_some();
            let can_read = !paused
                && pushes.len() < max_inflight
                && self.inflight_bytes < max_inflight_bytes
                && self.out.has_space();
            let may_wait_for_space = !can_read
                && !paused
                && pushes.len() < max_inflight
                && self.inflight_bytes < max_inflight_bytes;
            let turn = {
                // Shared by the writer and the read wait, which are polled one after the other
                // by this one task: never contended.
                let io = std::sync::Mutex::new(&mut *io);
                // Pinned here and lent to the gate: moved into it, the waits would be laid out
                // twice in this future (every idle connection carries its size).
                let waits = std::pin::pin!(async {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => Turn::Shutdown,
                        Some(done) = pushes.next(), if !pushes.is_empty() => Turn::Pushed(done),
                        _ = out.wait_for_space(), if may_wait_for_space => Turn::Space,
                        msg = std::future::poll_fn(|cx| lock(&io).ws.poll_next_unpin(cx)),
                            if can_read => Turn::Read(msg),
                        _ = tokio::time::sleep_until(deadline.into()) => Turn::Deadline,
                        _ = out.closed() => Turn::Closed,
                    }
                });
                gate.wait(&io, &out, waits).await
            };
            match turn {
                Turn::Shutdown => return self.drain(&mut pushes).await,
                Turn::Pushed(done) => self.finish_push(done),
                Turn::Space => {}
                Turn::Read(None) => return "connection ended by the client".into(),
                Turn::Read(Some(msg)) => match msg {
                    Ok(Message::Binary(b)) => {
                        last_seen = Instant::now();
                        self.shared.metrics.frames_in.inc();
                        self.shared.metrics.bytes_in.inc_by(b.len() as u64);
                        match self.handle_binary(&b) {
                            None => {}
                            // Boxed: the handshake's state (token checks, the client-id
                            // claim) lives on the heap while it runs, not in every
                            // connection's future for the connection's life.
                            Some(Awaited::Hello(h)) => Box::pin(self.hello(h)).await,
                            Some(Awaited::Push(p, size)) => {
                                if let Some(reply) = self.push(p, size).await {
                                    pushes.push_back(reply);
                                }
                            }
                        }
                    }
                    Ok(Message::Text(_)) => {
                        last_seen = Instant::now();
                        self.reply(GatewayError::TextFrame);
                        if self.session.is_none() {
                            return "text frame before hello".into();
                        }
                    }
                    Ok(Message::Ping(_) | Message::Pong(_)) => last_seen = Instant::now(),
                    Ok(Message::Close(_)) => return "closed by the client".into(),
                    Ok(Message::Frame(_)) => {}
                    Err(WsError::Capacity(e)) => {
                        self.reply(GatewayError::MessageTooLarge(e.to_string()));
                        return "frame_too_large".into();
                    }
                    Err(e) => {
                        // A peer that breaks the WebSocket protocol gets the close code
                        // RFC 6455 names for it; a vanished one gets nothing.
                        if let Some(code) = ws_violation_close_code(&e) {
                            self.out.close(None, code, "websocket protocol violation");
                        }
                        return format!("read failed: {e}");
                    }
                },
                Turn::Deadline => {
                    if let Some((from, until)) = self.pace.paused
                        && Instant::now() >= until
                    {
                        // The pause was the server's doing: it does not count as silence.
                        self.pace.paused = None;
                        last_seen += until.saturating_duration_since(from);
                        continue;
                    }
                    if token_deadline.is_some_and(|t| Instant::now() >= t) {
                        // The server says why before closing; the client renews and resumes.
                        self.reply(GatewayError::Auth(AuthError::Expired));
                        return "token expired".into();
                    }
                    let e = GatewayError::Timeout {
                        established: self.session.is_some(),
                    };
                    let name = e.code().name();
                    self.reply(e);
                    return name.into();
                }
                // A close was asked for, or the writer finished (which only a close request
                // or a failed socket does).
                Turn::Closed | Turn::Written => return self.close_reason(),
            }
            if self.out.is_closed() {
                return self.close_reason();
            }
        }
    }

    /// The connection's part of a drain: reads nothing more, answers the pushes already taken
    /// (ingest goes on committing; at most 3/4 of the grace period), then `goaway` with a
    /// jittered retry hint and a close with 1012. A push the client sent but the gateway had
    /// not read yet stays in the client's outbox and is sent again after the reconnect.
    async fn drain(&mut self, pushes: &mut Pushes) -> String {
        let grace = Duration::from_millis(self.shared.config.shutdown_grace_ms);
        let until = tokio::time::Instant::now() + grace * 3 / 4;
        let mut unanswered = pushes.len();
        while !pushes.is_empty() {
            match tokio::time::timeout_at(until, pushes.next()).await {
                Ok(Some(done)) => {
                    self.finish_push(done);
                    unanswered -= 1;
                }
                Ok(None) | Err(_) => break,
            }
        }
        if unanswered > 0 {
            tracing::warn!(
                unanswered,
                "drain: pushes still uncommitted at the deadline; the client sends them again"
            );
        }
        self.send(Frame::GoAway(GoAway {
            reason: "server shutting down".into(),
            retry_after_ms: goaway_retry_after_ms(rand::random()),
        }));
        self.out.close_after_flush(1012, "server shutting down");
        "server shutting down".into()
    }

    /// Why the server asked its writer to close (a fatal error's code name, `slow_consumer`).
    fn close_reason(&self) -> String {
        self.out
            .close_request()
            .map_or_else(|| "closed".to_owned(), |c| c.reason)
    }

    fn teardown(&mut self) {
        if let Some(s) = &self.session {
            self.shared.clients.remove(&s.id);
        }
        for t in self.fetches.drain(..) {
            t.abort();
        }
        for (_, s) in self.subs.drain() {
            s.entry.end();
            self.shared.hub.unregister(&s.entry);
        }
    }

    fn send(&self, frame: Frame) {
        self.out.push(Bytes::from(encode(&frame)));
    }

    /// Sends an error (before `welcome`, every error ends the connection).
    fn reply(&self, e: impl Into<ErrorReply>) {
        e.into()
            .before_handshake(self.session.is_none())
            .send(&self.out, &self.shared.metrics);
    }

    /// Handles one binary frame; returns a pending push acknowledgement, if it was a push.
    /// Handles a binary frame; what it must wait for (the handshake, handing a push to
    /// ingest) it returns for [`Connection::run`] to await. Not `async` itself: an `async fn`
    /// here would carry the decoded frame twice across that await, and the largest await
    /// point of `run` sizes every idle connection's future.
    fn handle_binary(&mut self, bytes: &[u8]) -> Option<Awaited> {
        let limits = &self.shared.config.limits;
        // A compressed frame is inflated first, within the frame limit (PROTOCOL.md §3.15).
        let inflated = syncgate_protocol::compress::inflate(bytes, limits, self.compression);
        let size = inflated.as_ref().map_or(bytes.len(), |b| b.len());
        let frame = inflated.and_then(|b| decode_with_limits(&b, limits));
        // Pushes are bounded by their acknowledgements (count and bytes in flight); everything
        // else a client sends is counted against its frame rate.
        if !matches!(frame, Ok(Frame::Push(_))) {
            match self.rate.frame(Instant::now()) {
                Verdict::Allow => {}
                verdict => {
                    self.shared.metrics.rate_limited.inc();
                    self.reply(GatewayError::RateLimited {
                        limit: self.shared.config.max_frames_per_second,
                        retry_ms: self.rate.wait().as_millis() as u64,
                        closing: verdict == Verdict::Close,
                    });
                    return None;
                }
            }
        }
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // Before the handshake this ends the connection; after it, one bad frame is
                // answered and the session goes on.
                self.reply(GatewayError::Decode(e));
                return None;
            }
        };
        if self.session.is_none() {
            match frame {
                Frame::Hello(h) => return Some(Awaited::Hello(h)),
                _ => self.reply(GatewayError::HelloFirst),
            }
            return None;
        }
        match frame {
            Frame::Hello(_) => self.reply(GatewayError::DuplicateHello),
            Frame::Subscribe(s) => self.subscribe(s),
            Frame::Unsubscribe(u) => match self.subs.remove(&u.sub) {
                Some(s) => {
                    // Ended under the queue's lock: every frame of the subscription is queued
                    // before `unsubscribed`, and its catch-up task (stopping at its next await)
                    // can add none after it.
                    s.entry.end();
                    self.shared.hub.unregister(&s.entry);
                    self.send(Frame::Unsubscribed(Unsubscribed { sub: u.sub }));
                    if let Some(info) = &self.info {
                        info.subs
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&u.sub);
                    }
                }
                None => self.reply(ErrorReply::from(GatewayError::UnknownSubscription).sub(u.sub)),
            },
            Frame::Push(p) => return Some(Awaited::Push(p, size)),
            Frame::Fetch(f) => self.fetch(f),
            Frame::Refresh(r) => self.refresh(&r.token),
            Frame::Ping(p) => {
                // `published()` is raised only after every live subscriber's frames up to it
                // were queued, and this pong goes into the same FIFO queue after them.
                let head = Some(self.shared.hub.published());
                self.send(Frame::Pong(Pong {
                    nonce: p.nonce,
                    head,
                }))
            }
            Frame::Pong(_) => {}
            other => self.reply(GatewayError::ServerMessage(other.type_name())),
        }
        None
    }

    async fn hello(&mut self, h: Hello) {
        let Some(version) = negotiate_version(&h.versions) else {
            let ours = format!("{:?}", syncgate_protocol::SUPPORTED_VERSIONS);
            self.reply(GatewayError::UnsupportedVersion(ours));
            return;
        };
        if !is_valid_id(&h.client_id, self.shared.config.limits.max_id_bytes) {
            let e = GatewayError::InvalidClientId {
                max_id_bytes: self.shared.config.limits.max_id_bytes,
            };
            self.refused_handshake(&e, &h.agent);
            self.reply(e);
            return;
        }
        let is_api_key = crate::auth::api_key::parse(&h.token).is_some();
        let verified = match crate::auth::api_key::parse(&h.token) {
            // A backend service's API key: looked up at every hello, so a revoked key opens
            // no further session.
            Some((key_id, secret)) => match self.shared.store.api_key(key_id).await {
                Ok(key) => key
                    .and_then(|k| k.identity(secret))
                    .ok_or_else(|| AuthError::Invalid("unknown or revoked API key".into())),
                Err(e) => {
                    tracing::error!(error = %e, "reading an API key failed");
                    self.reply(GatewayError::Storage(Step::Handshake));
                    return;
                }
            },
            None => self.shared.auth.verify(&h.token),
        };
        let identity = match verified {
            Ok(id) => id,
            Err(e) => {
                // The token itself is never logged.
                let e = GatewayError::Auth(e);
                self.refused_handshake(&e, &h.agent);
                self.reply(e);
                return;
            }
        };
        let access = Arc::new(Access::new(&identity, &self.shared.config.collections));
        let user = identity.user;
        let slot = match UserSlot::take(
            &self.shared.sessions_per_user,
            &user,
            self.shared.config.max_connections_per_user,
        ) {
            Ok(slot) => slot,
            Err(e) => {
                self.refused_handshake(&e, &h.agent);
                self.reply(e);
                return;
            }
        };
        let quota = self.shared.config.max_client_ids_per_user;
        let claim = self.shared.claim_client(&h.client_id, &user).await;
        let last_applied_mutation = match claim {
            Ok(ClientClaim::Owned { last_applied }) => last_applied,
            Ok(ClientClaim::OverQuota) => {
                self.shared
                    .metrics
                    .quota_refusals
                    .with_label_values(&["client_ids"])
                    .inc();
                let e = GatewayError::ClientQuota { limit: quota };
                self.refused_handshake(&e, &h.agent);
                self.reply(e);
                return;
            }
            Ok(ClientClaim::Taken) => {
                // Nothing of the other user's installation is revealed, not even its horizon.
                let e = GatewayError::ClientIdTaken;
                self.refused_handshake(&e, &h.agent);
                self.reply(e);
                return;
            }
            Err(()) => {
                self.reply(GatewayError::Storage(Step::Handshake));
                return;
            }
        };
        let (token_deadline, token_valid_ms) = token_deadline(identity.valid_until);
        // An API key never expires: its session has no deadline worth announcing.
        let token_valid_ms = token_valid_ms.filter(|_| !is_api_key);
        let session_id = rand::random::<u64>();
        let session = format!("{session_id:016x}");
        if let Some(suppressed) = self.shared.oplog.connections.allow() {
            tracing::info!(
                peer = %self.peer, client_id = %h.client_id, user = %crate::oplog::printable(&user),
                agent = %crate::oplog::printable(&h.agent), session = %session, last_applied_mutation,
                suppressed, "session established"
            );
        }
        let compression = match self.shared.config.compression {
            true => Compression::choose(&h.compression),
            false => None,
        };
        if let Some(c) = compression {
            // The client accepts compressed frames from its `hello` on, so the welcome
            // itself may go compressed.
            self.compression = Some(c);
            self.out.compress_from_now(crate::outbound::Packer {
                min_bytes: self.shared.config.compression_min_bytes,
                level: self.shared.config.compression_level,
            });
        }
        self.send(Frame::Welcome(Welcome {
            version,
            session,
            epoch: self.shared.hub.epoch().to_owned(),
            last_applied_mutation,
            limits: self.shared.config.limits,
            heartbeat_ms: self.shared.config.heartbeat_ms,
            upload_only: self
                .shared
                .config
                .collections
                .iter()
                .filter(|(_, c)| c.mode == SyncMode::UploadOnly)
                .map(|(name, _)| name.clone())
                .collect(),
            token_valid_ms,
            compression: compression.map(|c| c.name().to_owned()),
        }));
        let info = Arc::new(crate::shared::ClientInfo {
            client_id: h.client_id.clone(),
            user: user.clone(),
            agent: crate::oplog::printable(&h.agent).to_string(),
            peer: self.peer,
            connected_at_ms: crate::storage::now_ms() as u64,
            out: self.out.clone(),
            subs: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            last_push_ms: std::sync::atomic::AtomicU64::new(0),
            applied: std::sync::atomic::AtomicU64::new(last_applied_mutation),
        });
        self.shared.clients.insert(session_id, info.clone());
        self.info = Some(info);
        self.session = Some(Session {
            client_id: h.client_id,
            user,
            access,
            id: session_id,
            token_deadline,
            _slot: slot,
        });
        // The handshake is done: its turn goes to the next connection.
        self.admission = None;
    }

    /// The log line of a refused handshake (rate-limited; never the token).
    fn refused_handshake(&self, e: &GatewayError, agent: &str) {
        if let Some(suppressed) = self.shared.oplog.auth.allow() {
            let code = e.code();
            tracing::info!(
                peer = %self.peer, code = code.code(), name = code.name(), reason = %e,
                agent = %crate::oplog::printable(agent), suppressed, "handshake refused"
            );
        }
    }

    fn subscribe(&mut self, s: Subscribe) {
        let Some(access) = self.session.as_ref().map(|u| u.access.clone()) else {
            return;
        };
        let scope = access.scope(&s.collection).cloned();
        let refusal = if self.subs.contains_key(&s.sub) {
            Some(GatewayError::DuplicateSubscription)
        } else if self.subs.len() >= self.shared.config.limits.max_subscriptions as usize {
            Some(GatewayError::TooManySubscriptions)
        } else {
            self.shared
                .read_refusal(&s.collection, &access, SyncMode::subscribable)
        };
        if let Some(e) = refusal {
            self.reply(ErrorReply::from(e).sub(s.sub));
            return;
        }
        let filter = match Filter::new(&s.filter) {
            Ok(f) => f,
            Err(msg) => {
                self.reply(ErrorReply::from(GatewayError::InvalidFilter(msg)).sub(s.sub));
                return;
            }
        };
        // Over the connection's subscription rate: accepted, and its reads wait for their turn
        // (an unsubscribe before then costs the database nothing).
        let not_before = self.pace.subscribes.take(1, Instant::now());
        if not_before.is_some() {
            self.shared
                .metrics
                .paced
                .with_label_values(&["subscribe"])
                .inc();
        }
        let view = View::new(filter, scope);
        let entry = Arc::new(SubEntry::new(self.out.clone(), s.sub, s.collection, view));
        self.shared.hub.register(entry.clone());
        // Stops at its next await once the subscription ends (unsubscribe, connection gone);
        // nothing is kept of it once it finished.
        let start = crate::ws::subscription::start(
            self.shared.clone(),
            entry.clone(),
            s.cursor,
            not_before,
        );
        let stop = entry.clone();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = stop.stopped() => {}
                _ = start => {}
            }
        });
        if let Some(info) = &self.info {
            info.subs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(s.sub, entry.clone());
        }
        self.subs.insert(s.sub, ActiveSub { entry });
    }

    /// Replaces the session's token with a newer one of the same user and rights: the
    /// session then ends when the new token expires. Anything else is refused (206) and the
    /// session goes on until its current token expires.
    fn refresh(&mut self, token: &str) {
        let Some(session) = self.session.as_ref() else {
            return;
        };
        let refused = |why: String| Some(GatewayError::RefreshRefused(why));
        let refusal = if crate::auth::api_key::parse(token).is_some() {
            refused("an API key does not expire and is not refreshed".into())
        } else {
            match self.shared.auth.verify(token) {
                // The token itself is never logged or echoed.
                Err(e) => refused(e.to_string()),
                Ok(identity) if identity.user != session.user => {
                    refused("the token names another user".into())
                }
                Ok(identity) => {
                    let access = Access::new(&identity, &self.shared.config.collections);
                    if access != *session.access {
                        refused(
                            "the token grants other roles or scope claims; reconnect with it"
                                .into(),
                        )
                    } else {
                        let (deadline, valid_ms) = token_deadline(identity.valid_until);
                        if let Some(s) = self.session.as_mut() {
                            s.token_deadline = deadline;
                        }
                        self.send(Frame::Refreshed(Refreshed {
                            token_valid_ms: valid_ms.unwrap_or(u64::MAX),
                        }));
                        None
                    }
                }
            }
        };
        if let Some(e) = refusal {
            self.reply(e);
        }
    }

    /// Checks a `fetch` and starts its answer (`ws::fetch`) beside the reader loop.
    fn fetch(&mut self, f: Fetch) {
        let Some(access) = self.session.as_ref().map(|u| u.access.clone()) else {
            return;
        };
        self.fetches.retain(|t| !t.is_finished());
        let limits = &self.shared.config.limits;
        let max_ids = limits.max_mutations_per_batch as usize;
        let scope = access.scope(&f.collection).cloned();
        let refusal = self
            .shared
            .read_refusal(&f.collection, &access, SyncMode::fetchable)
            .or_else(|| {
                if f.ids.is_empty() || f.ids.len() > max_ids {
                    return Some(GatewayError::InvalidFetch(format!(
                        "a fetch names 1..={max_ids} ids"
                    )));
                }
                if self.fetches.len() >= MAX_FETCHES_IN_FLIGHT {
                    return Some(GatewayError::InvalidFetch(format!(
                        "at most {MAX_FETCHES_IN_FLIGHT} fetches in flight per connection"
                    )));
                }
                let bad = f
                    .ids
                    .iter()
                    .find(|id| !is_valid_id(id, limits.max_id_bytes))?;
                Some(GatewayError::InvalidFetch(format!(
                    "invalid document id {:?}",
                    crate::oplog::printable(bad)
                )))
            });
        if let Some(e) = refusal {
            self.reply(ErrorReply::from(e).req(f.req));
            return;
        }
        // A fetch costs like a subscription start.
        if self.pace.subscribes.take(1, Instant::now()).is_some() {
            self.shared
                .metrics
                .paced
                .with_label_values(&["subscribe"])
                .inc();
        }
        // An id named twice is answered once.
        let mut seen = std::collections::HashSet::new();
        let ids = f
            .ids
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect();
        let job = crate::ws::fetch::FetchJob {
            req: f.req,
            view: View::new(Filter::default(), scope),
            collection: f.collection,
            ids,
        };
        let task = tokio::spawn(crate::ws::fetch::answer(
            self.shared.clone(),
            self.out.clone(),
            job,
        ));
        self.fetches.push(task.abort_handle());
    }

    /// Hands a batch to ingest, which also checks its shape: a refused batch must fence the
    /// client's later batches there (see `ingest::order`).
    ///
    /// The frame's `size` is taken from the node's push budget first; while the node is full
    /// this connection waits here and reads nothing (its own earlier pushes are answered by
    /// ingest regardless, which is what gives the budget back).
    async fn push(&mut self, p: Push, size: usize) -> Option<PushReply> {
        let session = self.session.as_ref()?;
        let started = Instant::now();
        let n = u32::try_from(size).unwrap_or(u32::MAX);
        let Ok(permit) = self.shared.push_bytes.clone().acquire_many_owned(n).await else {
            // Closed only if the node is gone.
            let batch = p.batch;
            return Some(Box::pin(async move {
                PushDone {
                    batch,
                    size,
                    started,
                    reply: Ok(Err(GatewayError::Draining)),
                }
            }));
        };
        self.inflight_bytes += size;
        let (reply, rx) = oneshot::channel();
        let req = IngestRequest {
            job: PushJob {
                client_id: session.client_id.clone(),
                user: session.user.clone(),
                access: session.access.clone(),
                batch: p.batch,
                mutations: p.mutations,
            },
            reply,
            permit,
        };
        // Over the connection's push rate: this batch goes on, the next frame waits.
        let now = Instant::now();
        let mutations = req.job.mutations.len() as u64;
        let until = Ord::max(
            self.pace.mutations.take(mutations, now),
            self.pace.bytes.take(size as u64, now),
        );
        if let Some(until) = until {
            self.shared.metrics.paced.with_label_values(&["push"]).inc();
            self.pace.paused = Some((now, until));
        }
        let ingest = self.shared.ingest.clone();
        let batch = p.batch;
        Some(Box::pin(async move {
            let reply = match ingest.send(req).await {
                Ok(()) => rx.await,
                Err(_) => Ok(Err(GatewayError::Draining)),
            };
            PushDone {
                batch,
                size,
                started,
                reply,
            }
        }))
    }

    fn finish_push(&mut self, done: PushDone) {
        let PushDone {
            batch,
            size,
            started,
            reply,
        } = done;
        self.inflight_bytes = self.inflight_bytes.saturating_sub(size);
        match reply {
            Ok(Ok(outcome)) => {
                self.shared
                    .metrics
                    .push_seconds
                    .observe(started.elapsed().as_secs_f64());
                if let Some(info) = &self.info {
                    use std::sync::atomic::Ordering::Relaxed;
                    info.last_push_ms
                        .store(crate::storage::now_ms() as u64, Relaxed);
                    let applied = outcome.results.iter().map(|r| r.mutation_id).max();
                    info.applied.fetch_max(applied.unwrap_or(0), Relaxed);
                }
                self.send(Frame::PushAck(PushAck {
                    batch,
                    results: outcome.results,
                    visible_at: outcome.visible_at,
                }));
            }
            Ok(Err(e)) => self.reply(ErrorReply::from(e).batch(batch)),
            Err(_) => self.reply(ErrorReply::from(GatewayError::IngestStopped).batch(batch)),
        }
    }
}

/// Waits up to `handshake_queue_ms` for a handshake turn (the semaphore serves waiters in
/// arrival order); `None` when none came in time or the node is shutting down. A client that
/// gives up meanwhile is found out when its upgrade is read, and gives its turn back then.
async fn wait_for_turn(
    shared: &Shared,
    turns: &Arc<tokio::sync::Semaphore>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let queue = Duration::from_millis(shared.config.handshake_queue_ms);
    if queue.is_zero() {
        return None;
    }
    /// Counts the connection as waiting until dropped (also when the wait is cancelled).
    struct Waiting<'a>(&'a prometheus::IntGauge);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    shared.metrics.admission_waiting.inc();
    let waiting = Waiting(&shared.metrics.admission_waiting);
    let waited = Instant::now();
    let turn = tokio::select! {
        t = tokio::time::timeout(queue, turns.clone().acquire_owned()) => t.ok().and_then(Result::ok),
        _ = shared.shutdown.cancelled() => None,
    };
    drop(waiting);
    shared
        .metrics
        .admission_wait
        .observe(waited.elapsed().as_secs_f64());
    turn
}

/// A connection beyond `max_concurrent_handshakes`: upgraded (within the handshake timeout),
/// sent `goaway` with a jittered retry hint and closed with 1013 ("try again later"), without
/// reading anything from it.
async fn turn_away(shared: &Shared, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    shared.metrics.admission_refused.inc();
    let timeout = Duration::from_millis(shared.config.handshake_timeout_ms);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .max_message_size(Some(1024))
        .max_frame_size(Some(1024));
    let upgrade = tokio::time::timeout(
        timeout,
        Box::pin(tokio_tungstenite::accept_hdr_async_with_config(
            Transport::accept(tcp, shared.tls.clone()),
            OriginCheck {
                allowed: &shared.config.allowed_origins,
            },
            Some(ws_config),
        )),
    )
    .await;
    let Ok(Ok(mut ws)) = upgrade else {
        return;
    };
    let goaway = encode(&Frame::GoAway(GoAway {
        reason: "busy: too many handshakes in progress".into(),
        retry_after_ms: admission_retry_after_ms(rand::random()),
    }));
    use futures_util::SinkExt;
    let bye = async {
        ws.send(Message::Binary(goaway.into())).await?;
        ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 1013.into(),
            reason: "try again later".into(),
        }))
        .await
    };
    let _ = tokio::time::timeout(timeout, bye).await;
    shared
        .metrics
        .connections_closed
        .with_label_values(&["admission"])
        .inc();
}

/// The retry hint of a connection turned away by admission: 100–1,000 ms for a random draw
/// `r`, so the turned-away come back spread out.
pub(crate) fn admission_retry_after_ms(r: u32) -> u32 {
    100 + r % 901
}

/// The bounded label (`metrics::CLOSE_REASONS`) of the reason [`Connection::run`] returned.
fn close_label(reason: &str, established: bool) -> &'static str {
    use syncgate_protocol::ErrorCode;
    match reason {
        "server shutting down" => "drain",
        "connection ended by the client" | "closed by the client" => "client",
        "token expired" => "token_expired",
        r if r.starts_with("read failed") => "network",
        r if r == ErrorCode::SlowConsumer.name() => "slow_consumer",
        r if r == ErrorCode::HeartbeatTimeout.name() => "heartbeat_timeout",
        _ if !established => "handshake",
        _ => "error",
    }
}

/// Shortest `retry_after_ms` of a drain's `goaway`.
pub(crate) const GOAWAY_RETRY_MIN_MS: u32 = 1_000;
/// Spread of the drain's `retry_after_ms` above the minimum: a node's clients come back over
/// ~5 s instead of all at once to the nodes that remain (the SDK adds up to half again).
pub(crate) const GOAWAY_RETRY_SPREAD_MS: u32 = 4_000;

/// The `retry_after_ms` of a drain's `goaway` for a random draw `r`: uniform in
/// `GOAWAY_RETRY_MIN_MS ..= GOAWAY_RETRY_MIN_MS + GOAWAY_RETRY_SPREAD_MS`.
pub(crate) fn goaway_retry_after_ms(r: u32) -> u32 {
    GOAWAY_RETRY_MIN_MS + r % (GOAWAY_RETRY_SPREAD_MS + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pushes_in_flight_hold_nothing_while_there_are_none_and_answer_in_order() {
        fn reply(batch: u64, answered: oneshot::Receiver<()>) -> PushReply {
            Box::pin(async move {
                let _ = answered.await;
                PushDone {
                    batch,
                    size: 0,
                    started: Instant::now(),
                    reply: Ok(Err(GatewayError::Draining)),
                }
            })
        }
        let mut pushes = Pushes::default();
        assert!(pushes.0.is_none() && pushes.next().await.is_none());
        let (first, first_rx) = oneshot::channel();
        let (second, second_rx) = oneshot::channel();
        pushes.push_back(reply(1, first_rx));
        pushes.push_back(reply(2, second_rx));
        assert_eq!(pushes.len(), 2);
        // The second is answered first; the first still comes out first.
        let _ = second.send(());
        let _ = first.send(());
        assert_eq!(pushes.next().await.map(|d| d.batch), Some(1));
        assert!(pushes.0.is_some());
        assert_eq!(pushes.next().await.map(|d| d.batch), Some(2));
        // Empty again: nothing kept.
        assert!(pushes.0.is_none() && pushes.is_empty());
    }

    #[test]
    fn every_close_gets_one_of_the_bounded_labels() {
        for (reason, established, label) in [
            ("server shutting down", true, "drain"),
            ("closed by the client", true, "client"),
            ("connection ended by the client", false, "client"),
            ("token expired", true, "token_expired"),
            (
                "read failed: Connection reset without closing handshake",
                true,
                "network",
            ),
            ("slow_consumer", true, "slow_consumer"),
            ("heartbeat_timeout", true, "heartbeat_timeout"),
            ("handshake_required", false, "handshake"),
            ("unauthorized", false, "handshake"),
            ("frame_too_large", true, "error"),
        ] {
            let got = close_label(reason, established);
            assert_eq!(got, label, "{reason}");
            assert!(crate::metrics::CLOSE_REASONS.contains(&got));
        }
    }

    #[test]
    fn admission_hints_spread_over_a_tenth_of_a_second_to_one() {
        assert_eq!(admission_retry_after_ms(0), 100);
        assert_eq!(admission_retry_after_ms(900), 1_000);
        assert_eq!(admission_retry_after_ms(901), 100);
        assert!((0..10_000u32).all(|r| (100..=1_000).contains(&admission_retry_after_ms(r))));
    }

    #[test]
    fn goaway_hints_spread_over_the_window() {
        assert_eq!(goaway_retry_after_ms(0), 1_000);
        assert_eq!(goaway_retry_after_ms(4_000), 5_000);
        assert_eq!(goaway_retry_after_ms(4_001), 1_000);
        assert_eq!(goaway_retry_after_ms(u32::MAX), 1_000 + u32::MAX % 4_001);
        let hints: std::collections::BTreeSet<u32> = (0..1000)
            .map(|_| goaway_retry_after_ms(rand::random()))
            .collect();
        assert!(hints.iter().all(|h| (1_000..=5_000).contains(h)));
        assert!(hints.len() > 100, "{} distinct hints", hints.len());
    }
}
