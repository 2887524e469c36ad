//! A listener for the HTTP server that bounds what silent clients can hold: connections over
//! the cap are closed at accept, and a connection is closed when it sends nothing for the idle
//! time (a read that stays pending that long fails with `TimedOut`) — a TLS handshake included,
//! which happens on the connection's first read, never in the accept loop.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
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

/// A TCP stream whose reads fail with `TimedOut` after `idle` without a byte, holding one of
/// the listener's slots until it is dropped.
pub(crate) struct IdleStream {
    tcp: Transport<TcpStream, ServerConnection>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
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
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
