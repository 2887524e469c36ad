//! A loopback TCP proxy that the tests put between clients and a gateway, to cut, hold and
//! delay connections: the network faults of a shop floor, made on purpose and bounded in time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Random faults.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chaos {
    /// Each connection is cut after a random lifetime in this range (ms).
    pub(crate) lifetime_ms: (u64, u64),
    /// Each chunk is delayed by a random time in this range (ms).
    pub(crate) delay_ms: (u64, u64),
}

struct State {
    target: Mutex<Option<SocketAddr>>,
    chaos: Mutex<Option<Chaos>>,
    /// What may flow from the gateway to clients (held bytes wait in the proxy).
    hold: watch::Sender<Hold>,
    /// Bumped to cut every open connection.
    generation: watch::Sender<u64>,
    accepted: AtomicU64,
    stopped: AtomicBool,
}

/// Holding back what the gateway sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Everything flows.
    Nothing,
    /// Nothing flows.
    Everything,
    /// The first two chunks of each connection flow (the HTTP upgrade response, then the
    /// gateway's `welcome`, each sent only after the client's request), nothing after them.
    AfterWelcome,
}

/// The proxy; dropping it stops it and cuts everything.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.cut_all();
        self.task.abort();
    }
}

impl Proxy {
    pub(crate) async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            target: Mutex::new(None),
            chaos: Mutex::new(None),
            hold: watch::channel(Hold::Nothing).0,
            generation: watch::channel(0).0,
            accepted: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                s.accepted.fetch_add(1, Ordering::Relaxed);
                let target = *s.target.lock().unwrap();
                // No gateway behind the proxy: the connection is refused (closed at once).
                let Some(target) = target else { continue };
                conns.spawn(pipe(s.clone(), client, target));
                while conns.try_join_next().is_some() {}
            }
        });
        Proxy { addr, state, task }
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Where new connections go (`None`: refuse them).
    pub(crate) fn set_target(&self, target: Option<SocketAddr>) {
        *self.state.target.lock().unwrap() = target;
    }

    pub(crate) fn set_chaos(&self, chaos: Option<Chaos>) {
        *self.state.chaos.lock().unwrap() = chaos;
    }

    /// Holds (or releases) what the gateway sends.
    pub(crate) fn hold_downstream(&self, hold: Hold) {
        self.state.hold.send_replace(hold);
    }

    /// Cuts every open connection.
    pub(crate) fn cut_all(&self) {
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// Connections accepted so far.
    pub(crate) fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

async fn pipe(state: Arc<State>, client: TcpStream, target: SocketAddr) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut generation = state.generation.subscribe();
    generation.borrow_and_update();
    let chaos = *state.chaos.lock().unwrap();
    let lifetime = chaos.map(|c| {
        Duration::from_millis(rand::rng().random_range(c.lifetime_ms.0..=c.lifetime_ms.1))
    });
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = copy(state.clone(), cr, sw, None);
    let down = copy(state.clone(), sr, cw, Some(state.hold.subscribe()));
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = generation.changed() => {}
        // Fault injection, not synchronisation: the connection dies after its random lifetime.
        _ = async {
            match lifetime {
                Some(l) => tokio::time::sleep(l).await,
                None => std::future::pending().await,
            }
        } => {}
    }
}

async fn copy(
    state: Arc<State>,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hold: Option<watch::Receiver<Hold>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut forwarded = 0u64;
    loop {
        if let Some(h) = hold.as_mut()
            && h.wait_for(|held| flows(*held, forwarded)).await.is_err()
        {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = *state.chaos.lock().unwrap();
        if let Some(c) = delay {
            let ms = rand::rng().random_range(c.delay_ms.0..=c.delay_ms.1);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        // Bytes read while the hold was switched on wait here until it is released.
        if let Some(h) = hold.as_mut()
            && h.wait_for(|held| flows(*held, forwarded)).await.is_err()
        {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        forwarded += 1;
    }
}

fn flows(hold: Hold, forwarded_chunks: u64) -> bool {
    match hold {
        Hold::Nothing => true,
        Hold::Everything => false,
        Hold::AfterWelcome => forwarded_chunks < 2,
    }
}
