//! Pieces the scenarios share: run ids and filters, subscribing until `synced`, pushing a
//! batch and checking its ack, and the JSON report.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use syncgate_client::{ConnError, Connection};
use syncgate_protocol::{
    Body, Change, Cursor, Frame, Mutation, MutationOp, MutationStatus, Ping, Push, Subscribe,
    Value, Welcome,
};

pub use crate::report::Report;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// Gateway WebSocket URL.
    pub url: String,
    /// Client token.
    pub token: String,
    /// Local source addresses to spread connections over (empty = the OS's choice).
    pub sources: Vec<IpAddr>,
}

impl Target {
    /// The source address of connection number `i` (rotating over `sources`; none = the OS's
    /// choice).
    fn source(&self, i: usize) -> Option<IpAddr> {
        self.sources
            .get(i.checked_rem(self.sources.len())?)
            .copied()
    }

    /// Connects connection number `i` (its source address rotates over `sources`). A
    /// `goaway` before `welcome` (the node's admission control: too many handshakes in
    /// progress) is honoured as the SDK does: wait the hint plus up to half of it again, then
    /// connect again (counted in [`sent_away`]); at most 100 times.
    pub async fn connect(
        &self,
        i: usize,
        client_id: &str,
    ) -> anyhow::Result<(Connection, syncgate_protocol::Welcome)> {
        self.connect_offering(i, client_id, false).await
    }

    /// [`Target::connect`], offering frame compression in `hello` when `compression`.
    pub async fn connect_offering(
        &self,
        i: usize,
        client_id: &str,
        compression: bool,
    ) -> anyhow::Result<(Connection, syncgate_protocol::Welcome)> {
        let mut tries = 0;
        loop {
            let handshake = async {
                Connection::open_from(&self.url, self.source(i))
                    .await?
                    .offer_compression(compression)
                    .handshake(client_id, &self.token)
                    .await
            };
            match handshake.await {
                Err(syncgate_client::ConnError::GoAway { retry_after_ms, .. }) if tries < 100 => {
                    tries += 1;
                    SENT_AWAY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let hint = u64::from(retry_after_ms);
                    let wait = hint + rand::random_range(0..=hint / 2);
                    // The server's retry hint, as a client honours it.
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                other => {
                    return other
                        .with_context(|| format!("connecting {client_id} to {}", self.url));
                }
            }
        }
    }

    /// [`Target::connect`] with a small kernel receive buffer: a client that stops reading
    /// backs up into the server after a few KiB instead of megabytes.
    pub async fn connect_small_buffer(
        &self,
        i: usize,
        client_id: &str,
    ) -> anyhow::Result<(Connection, syncgate_protocol::Welcome)> {
        let c = Connection::open_with(&self.url, self.source(i), Some(4096))
            .await
            .with_context(|| format!("connecting {client_id} to {}", self.url))?;
        c.handshake(client_id, &self.token)
            .await
            .with_context(|| format!("handshake of {client_id}"))
    }
}

/// Handshakes answered with `goaway` (admission control) that this process retried.
static SENT_AWAY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many handshakes the gateway sent away (and this process retried) so far.
pub fn sent_away() -> u64 {
    SENT_AWAY.load(std::sync::atomic::Ordering::Relaxed)
}

/// A random id naming one run; every document of the run carries it in `run`.
pub fn run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// The filter that selects one run's documents.
pub fn run_filter(run: &str) -> Body {
    [("run".to_owned(), Value::from(run))].into()
}

/// Wall-clock nanoseconds (write→delivery latency crosses tasks, so it is measured on the
/// shared clock, stamped into the document).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Time left until `end`.
pub fn left(end: Instant) -> Duration {
    end.saturating_duration_since(Instant::now())
}

/// Subscribes and reads until `synced`; returns its cursor and the changes of the catch-up.
pub async fn subscribe(
    c: &mut Connection,
    welcome: &Welcome,
    collection: &str,
    filter: &Body,
    cursor: Option<Cursor>,
    end: Instant,
) -> anyhow::Result<(Cursor, Vec<syncgate_protocol::Change>, usize)> {
    c.send(&Frame::Subscribe(Subscribe {
        sub: 1,
        collection: collection.to_owned(),
        filter: filter.clone(),
        cursor,
    }))
    .await?;
    let mut changes = Vec::new();
    let mut snapshot_docs = 0;
    // The protocol's heartbeat holds while the answer takes long (a gateway with thousands
    // of subscriptions starting at once): a `ping` after every `heartbeat_ms` of silence on
    // this side, or the gateway ends the session with heartbeat_timeout.
    let beat = Duration::from_millis(u64::from(welcome.heartbeat_ms.max(1)));
    let mut next_ping = Instant::now() + beat;
    loop {
        let wait = left(end).min(next_ping.saturating_duration_since(Instant::now()));
        let frame = match c.recv_timeout(wait).await {
            Ok(f) => f,
            Err(ConnError::Timeout) if Instant::now() < end => {
                c.send(&Frame::Ping(Ping { nonce: 0 })).await?;
                next_ping = Instant::now() + beat;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match frame {
            Frame::Synced(s) => return Ok((s.cursor, changes, snapshot_docs)),
            Frame::Changes(ch) => changes.extend(ch.changes),
            Frame::Snapshot(s) => snapshot_docs += s.docs.len(),
            Frame::Error(e) => bail!("subscribe failed: {} {}", e.name, e.message),
            _ => {}
        }
    }
}

/// A put of `{run, writer, n, t}` as document `"{run}-{writer}-{n}"`.
pub fn put(run: &str, writer: usize, n: u64, mutation_id: u64, collection: &str) -> Mutation {
    put_padded(run, writer, n, mutation_id, collection, 0)
}

/// [`put`] with a `pad` field of `pad` bytes (to size changes, e.g. to fill a slow consumer's
/// buffer sooner).
pub fn put_padded(
    run: &str,
    writer: usize,
    n: u64,
    mutation_id: u64,
    collection: &str,
    pad: usize,
) -> Mutation {
    let mut body: Body = [
        ("run".to_owned(), Value::from(run)),
        ("writer".to_owned(), Value::from(writer as u64)),
        ("n".to_owned(), Value::from(n)),
        ("t".to_owned(), Value::from(now_ns())),
    ]
    .into();
    if pad > 0 {
        body.insert("pad".to_owned(), Value::from("x".repeat(pad)));
    }
    Mutation {
        mutation_id,
        collection: collection.to_owned(),
        id: format!("{run}-{writer}-{n}"),
        op: MutationOp::Put,
        body: Some(body),
        base_version: None,
        resolves: None,
    }
}

/// `(writer, n, stamped send time)` of a change written by [`put`], if it is one.
pub fn stamp(change: &Change) -> Option<(usize, u64, u64)> {
    let b = change.body.as_ref()?;
    Some((
        b.get("writer")?.as_u64()? as usize,
        b.get("n")?.as_u64()?,
        b.get("t")?.as_u64()?,
    ))
}

/// Opens `n` connections (numbered from `first`), each subscribed with `filter` and synced,
/// a few hundred handshakes at a time.
pub async fn open_subscribers(
    target: &Target,
    collection: &str,
    filter: &Body,
    name: &str,
    first: usize,
    n: usize,
    end: Instant,
) -> anyhow::Result<Vec<(Connection, Cursor)>> {
    let mut out = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for i in first..first + n {
        let (target, collection, filter) = (target.clone(), collection.to_owned(), filter.clone());
        let id = format!("{name}-{i}");
        pending.push(tokio::spawn(async move {
            let (mut c, w) = target.connect(i, &id).await?;
            let (cursor, _, _) = subscribe(&mut c, &w, &collection, &filter, None, end).await?;
            anyhow::Ok((c, cursor))
        }));
        if pending.len() >= 256 {
            for t in pending.drain(..) {
                out.push(t.await.context("subscriber setup")??);
            }
        }
    }
    for t in pending {
        out.push(t.await.context("subscriber setup")??);
    }
    Ok(out)
}

/// Pushes one batch and waits for its ack; fails unless every mutation was applied.
pub async fn push_and_check(
    c: &mut Connection,
    batch: u64,
    mutations: Vec<Mutation>,
    end: Instant,
) -> anyhow::Result<u64> {
    let ids: Vec<u64> = mutations.iter().map(|m| m.mutation_id).collect();
    c.send(&Frame::Push(Push { batch, mutations })).await?;
    loop {
        match c.recv_timeout(left(end)).await? {
            Frame::PushAck(a) if a.batch == batch => {
                check_ack(&ids, &a)?;
                return Ok(a.visible_at);
            }
            Frame::Error(e) => bail!("push: {} {}", e.name, e.message),
            _ => {}
        }
    }
}

/// Every mutation of the batch answered once, in order, as applied.
pub fn check_ack(ids: &[u64], a: &syncgate_protocol::PushAck) -> anyhow::Result<()> {
    let got: Vec<u64> = a.results.iter().map(|r| r.mutation_id).collect();
    if got != ids {
        bail!("batch {}: ack covers {got:?}, expected {ids:?}", a.batch);
    }
    if let Some(r) = a
        .results
        .iter()
        .find(|r| r.status != MutationStatus::Applied)
    {
        bail!(
            "batch {}: mutation {} not applied: {:?}",
            a.batch,
            r.mutation_id,
            r.reason
        );
    }
    Ok(())
}
