//! A listener for the HTTP server that bounds what silent clients can hold: connections over
//! the cap are closed at accept, and a connection is closed when it sends nothing for the idle
//! time (a read that stays pending that long fails with `TimedOut`) — a TLS handshake included,
//! which happens on the connection's first read, never in the accept loop. While the server
//! is answering a request on the connection (a long poll of `/v1/changes`, a write waiting
//! for its group commit), the client owes nothing, so the idle time does not run: each
//! connection's [`Busy`] count is raised by the [`busy`] middleware for the request's
//! duration.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::{ServerConfig, ServerConnection};
use syncgate_protocol::tls::Transport;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// A TCP listener serving at most `cap` connections, each closed after `idle` of silence.
pub(crate) struct Bounded {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    idle: Duration,
    tls: Option<Arc<ServerConfig>>,
}

impl Bounded {
    pub(crate) fn new(
        listener: TcpListener,
        cap: usize,
        idle: Duration,
        tls: Option<Arc<ServerConfig>>,
    ) -> Bounded {
        Bounded {
            listener,
            slots: Arc::new(Semaphore::new(cap)),
            idle,
            tls,
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = IdleStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (IdleStream, std::net::SocketAddr) {
        loop {
            let (tcp, addr) = match self.listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let _ = tcp.set_nodelay(true);
                    let io = Transport::accept(tcp, self.tls.clone());
                    return (IdleStream::new(io, slot, self.idle), addr);
                }
                // Over the cap: closed at once (dropped), the listener goes on.
                Err(_) => drop(tcp),
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// A TCP stream whose reads fail with `TimedOut` after `idle` without a byte while no
/// request of it is being answered, holding one of the listener's slots until it is dropped.
pub(crate) struct IdleStream {
    tcp: Transport<TcpStream, ServerConnection>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    busy: Busy,
    _slot: OwnedSemaphorePermit,
}

/// How many requests of one connection are being answered (the connection's "connect info",
/// given to every request by axum).
#[derive(Clone, Debug, Default)]
pub(crate) struct Busy(Arc<AtomicUsize>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Bounded>> for Busy {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Bounded>) -> Self {
        stream.io().busy.clone()
    }
}

/// Marks the request's connection busy while the request is answered.
pub(crate) async fn busy(
    axum::extract::ConnectInfo(busy): axum::extract::ConnectInfo<Busy>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    busy.0.fetch_add(1, Ordering::SeqCst);
    // Decremented however the answer ends (also when the handler is dropped).
    struct Done(Busy);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _done = Done(busy);
    next.run(request).await
}

impl IdleStream {
    fn new(
        tcp: Transport<TcpStream, ServerConnection>,
        slot: OwnedSemaphorePermit,
        idle: Duration,
    ) -> IdleStream {
        IdleStream {
            tcp,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            busy: Busy::default(),
            _slot: slot,
        }
    }
}

impl AsyncRead for IdleStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let idle = this.idle;
                this.deadline.as_mut().reset(Instant::now() + idle);
                Poll::Ready(r)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                // Answering a request: the client is not idle, the clock starts again.
                Poll::Ready(()) if this.busy.0.load(Ordering::SeqCst) > 0 => {
                    let idle = this.idle;
                    this.deadline.as_mut().reset(Instant::now() + idle);
                    // Registers the waker for the new deadline.
                    let _ = this.deadline.as_mut().poll(cx);
                    Poll::Pending
                }
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "HTTP connection idle",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for IdleStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.tcp).poll_write(cx, buf);
        if written.is_ready() {
            // An answer just went out: the client's idle time starts now.
            let idle = this.idle;
            this.deadline.as_mut().reset(Instant::now() + idle);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
