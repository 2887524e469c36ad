//! A single protocol connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::{ClientConfig, ClientConnection};
use syncgate_protocol::codec::{decode_message, encode};
use syncgate_protocol::compress::{Compression, compress};
use syncgate_protocol::tls::Transport;
use syncgate_protocol::{
    DecodeError, ErrorFrame, Frame, Hello, Limits, SUPPORTED_VERSIONS, Welcome,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The WebSocket layer failed (connect, read or write).
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server sent bytes that are not a valid frame.
    #[error("undecodable frame from server: {0}")]
    Decode(#[from] DecodeError),
    /// The server answered with an error frame.
    #[error("server error {} {}: {}", .0.code, .0.name, .0.message)]
    Server(ErrorFrame),
    /// The server closed the connection.
    #[error("connection closed by server{}", .0.as_ref().map(|c| format!(" (code {c})")).unwrap_or_default())]
    Closed(Option<u16>),
    /// Nothing arrived in time.
    #[error("timed out waiting for the server")]
    Timeout,
    /// The server sent the connection away before `welcome` (busy, or draining): connect
    /// again after `retry_after_ms` (plus jitter), to any node.
    #[error("sent away by the server ({reason}): retry after {retry_after_ms} ms")]
    GoAway {
        /// Why.
        reason: String,
        /// The server's hint.
        retry_after_ms: u32,
    },
    /// The server broke the protocol (for example no `Welcome` after `Hello`).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The URL cannot be used (scheme, host, port).
    #[error("{0}")]
    Url(String),
    /// TLS failed: the CA file, or the server's certificate (not trusted, wrong name, expired).
    #[error("TLS: {0}")]
    Tls(String),
}

/// The client TLS configuration used for `wss://` URLs when none is given: the public web PKI
/// (Mozilla's roots, built in).
fn default_tls() -> Result<Arc<ClientConfig>, ConnError> {
    static DEFAULT: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            syncgate_protocol::tls::client_config(None)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(ConnError::Tls)
}

/// Where a `ws://` or `wss://` URL points.
struct Target {
    tls: bool,
    host: String,
    port: u16,
}

impl Target {
    fn parse(url: &str) -> Result<Target, ConnError> {
        let bad = |why: &str| {
            ConnError::Url(format!(
                "{url}: {why} (use ws://HOST:PORT or wss://HOST:PORT)"
            ))
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("the scheme must be ws or wss")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        // An IPv6 literal comes bracketed; names and sockets want it bare.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Target { tls, host, port })
    }
}

fn io_err(e: std::io::Error) -> ConnError {
    ConnError::Ws(tokio_tungstenite::tungstenite::Error::Io(e))
}

/// One connection to a gateway.
pub struct Connection {
    ws: WebSocketStream<Transport<TcpStream, ClientConnection>>,
    /// Limits the server announced (defaults until `Welcome`).
    limits: Limits,
    /// Whether `hello` offers compression ([`Connection::offer_compression`]).
    offer: bool,
    /// The compression in use (PROTOCOL.md §3.15): the offered one from `hello` until
    /// `welcome`, then the one `welcome` names, if any.
    compression: Option<Compression>,
    /// Message payload bytes sent and received, counted as on the wire.
    traffic: Arc<Traffic>,
}

/// Payload bytes of the WebSocket messages a connection (or every connection of an SDK
/// client) sent and received, as on the wire: a compressed frame counts its compressed size.
/// WebSocket and TCP framing are not counted.
#[derive(Debug, Default)]
pub struct Traffic {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Traffic {
    /// Bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn count_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn count_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Frames the client sends compressed, once negotiated, from this size on.
const COMPRESS_MIN_BYTES: usize = 1024;
/// The deflate level the client compresses at.
const COMPRESS_LEVEL: u32 = 6;

impl Connection {
    /// Opens the WebSocket without sending anything.
    pub async fn open(url: &str) -> Result<Connection, ConnError> {
        Connection::open_from(url, None).await
    }

    /// Opens the WebSocket from a chosen local address (`ws://` URLs with an IP host only when
    /// `local` is given): load tests spread connections over 127.0.0.x source addresses to get
    /// past the ~28,000 ephemeral ports of one address pair.
    pub async fn open_from(url: &str, local: Option<IpAddr>) -> Result<Connection, ConnError> {
        Connection::open_with(url, local, None).await
    }

    /// [`Connection::open_from`] with a chosen kernel receive buffer (`SO_RCVBUF`, set before
    /// connecting): load tests use a small one to make a client that stops reading back up
    /// into the server quickly.
    pub async fn open_with(
        url: &str,
        local: Option<IpAddr>,
        recv_buffer: Option<u32>,
    ) -> Result<Connection, ConnError> {
        Connection::open_tls(url, local, recv_buffer, None).await
    }

    /// Opens the WebSocket at a `ws://` or `wss://` URL; `wss://` verifies the server with
    /// `tls` (default: the public web PKI; see [`syncgate_protocol::tls::client_config`] for a
    /// private CA).
    pub async fn open_tls(
        url: &str,
        local: Option<IpAddr>,
        recv_buffer: Option<u32>,
        tls: Option<Arc<ClientConfig>>,
    ) -> Result<Connection, ConnError> {
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let target = Target::parse(url)?;
        let stream = match (local, recv_buffer) {
            (None, None) => TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(io_err)?,
            (local, recv_buffer) => {
                let ip: IpAddr = target.host.parse().map_err(|_| {
                    ConnError::Url(format!(
                        "{url}: a source address or receive buffer needs an IP address as host"
                    ))
                })?;
                let addr = SocketAddr::new(ip, target.port);
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(io_err)?;
                if let Some(ip) = local {
                    socket.bind(SocketAddr::new(ip, 0)).map_err(io_err)?;
                }
                if let Some(size) = recv_buffer {
                    socket.set_recv_buffer_size(size).map_err(io_err)?;
                }
                socket.connect(addr).await.map_err(io_err)?
            }
        };
        stream.set_nodelay(true).map_err(io_err)?;
        let transport = if target.tls {
            let tls = match tls {
                Some(c) => c,
                None => default_tls()?,
            };
            let stream = syncgate_protocol::tls::connect(stream, &target.host, tls)
                .await
                .map_err(|e| ConnError::Tls(e.to_string()))?;
            Transport::Tls(Box::new(stream))
        } else {
            Transport::Plain(stream)
        };
        let ws = tokio_tungstenite::client_async_with_config(url, transport, Some(config))
            .await?
            .0;
        Ok(Connection {
            ws,
            limits: Limits {
                max_frame_bytes: 64 << 20,
                ..Limits::default()
            },
            offer: false,
            compression: None,
            traffic: Arc::default(),
        })
    }

    /// Counts this connection's traffic into `traffic` (shared across reconnections by the
    /// SDK) instead of a counter of its own.
    pub fn count_into(mut self, traffic: Arc<Traffic>) -> Connection {
        self.traffic = traffic;
        self
    }

    /// The bytes this connection sent and received so far.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    /// Makes `hello` offer compression (`deflate`): large frames in both directions then go
    /// compressed if the gateway agrees. The SDK offers it; the plain handshake does not.
    pub fn offer_compression(mut self, offer: bool) -> Connection {
        self.offer = offer;
        self
    }

    /// The compression negotiated in `welcome`, if any.
    pub fn compression(&self) -> Option<Compression> {
        self.compression
    }

    /// Opens the WebSocket and completes the handshake.
    pub async fn connect(
        url: &str,
        client_id: &str,
        token: &str,
    ) -> Result<(Connection, Welcome), ConnError> {
        Connection::connect_from(url, None, client_id, token).await
    }

    /// [`Connection::connect`] verifying a `wss://` server with `tls`.
    pub async fn connect_tls(
        url: &str,
        tls: Option<Arc<ClientConfig>>,
        client_id: &str,
        token: &str,
    ) -> Result<(Connection, Welcome), ConnError> {
        let c = Connection::open_tls(url, None, None, tls).await?;
        c.handshake(client_id, token).await
    }

    /// [`Connection::connect`] from a chosen local address (see [`Connection::open_from`]).
    pub async fn connect_from(
        url: &str,
        local: Option<IpAddr>,
        client_id: &str,
        token: &str,
    ) -> Result<(Connection, Welcome), ConnError> {
        let c = Connection::open_from(url, local).await?;
        c.handshake(client_id, token).await
    }

    /// Sends `Hello` on an open connection and waits for `Welcome`.
    pub async fn handshake(
        mut self,
        client_id: &str,
        token: &str,
    ) -> Result<(Connection, Welcome), ConnError> {
        let c = &mut self;
        let offered = match c.offer {
            true => Compression::offer(),
            false => Vec::new(),
        };
        c.send(&Frame::Hello(Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            client_id: client_id.to_owned(),
            token: token.to_owned(),
            agent: concat!("syncgate-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            compression: offered.clone(),
        }))
        .await?;
        // Having offered it, the client accepts a compressed frame from here on (the gateway
        // may compress the welcome itself).
        c.compression = Compression::choose(&offered);
        match c.recv_timeout(Duration::from_secs(10)).await? {
            Frame::Welcome(w) => {
                c.compression = match w.compression.as_deref() {
                    None => None,
                    Some(name) => match offered.iter().any(|o| o == name) {
                        true => Compression::from_name(name),
                        false => {
                            return Err(ConnError::Protocol(format!(
                                "welcome chose compression {name:?}, which hello did not offer"
                            )));
                        }
                    },
                };
                Ok((self, w))
            }
            Frame::Error(e) => Err(ConnError::Server(e)),
            Frame::GoAway(g) => Err(ConnError::GoAway {
                reason: g.reason,
                retry_after_ms: g.retry_after_ms,
            }),
            other => Err(ConnError::Protocol(format!(
                "expected welcome, got {}",
                other.type_name()
            ))),
        }
    }

    /// Sends a frame (compressed if negotiated, large enough and smaller for it).
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ConnError> {
        let bytes = encode(frame);
        let bytes = match self.compression {
            Some(Compression::Deflate) if bytes.len() >= COMPRESS_MIN_BYTES => {
                compress(&bytes, COMPRESS_LEVEL).unwrap_or(bytes)
            }
            _ => bytes,
        };
        self.send_raw(bytes).await
    }

    /// Sends arbitrary bytes as one binary message (tests use it for malformed frames).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), ConnError> {
        self.traffic.count_sent(bytes.len());
        self.ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    /// Receives the next frame. Server `Error` frames are returned as frames, not errors.
    pub async fn recv(&mut self) -> Result<Frame, ConnError> {
        loop {
            match self.ws.next().await {
                None => return Err(ConnError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(b))) => {
                    self.traffic.count_received(b.len());
                    return Ok(decode_message(&b, &self.limits, self.compression)?);
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(ConnError::Closed(c.map(|c| c.code.into())));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Receives the next binary message as it arrived, undecoded, or fails after `timeout`
    /// (tests that check what bytes a client was sent).
    pub async fn recv_raw(&mut self, timeout: Duration) -> Result<Vec<u8>, ConnError> {
        let next = async {
            loop {
                match self.ws.next().await {
                    None => return Err(ConnError::Closed(None)),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Message::Binary(b))) => {
                        self.traffic.count_received(b.len());
                        return Ok(b.to_vec());
                    }
                    Some(Ok(Message::Close(c))) => {
                        return Err(ConnError::Closed(c.map(|c| c.code.into())));
                    }
                    Some(Ok(_)) => continue,
                }
            }
        };
        tokio::time::timeout(timeout, next)
            .await
            .map_err(|_| ConnError::Timeout)?
    }

    /// Receives the next frame or fails after `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Frame, ConnError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| ConnError::Timeout)?
    }

    /// Sends a close frame and waits briefly for the server's.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}
