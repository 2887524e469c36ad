//! TLS for both ends (feature `tls`): a tokio stream over a rustls connection, the handshakes,
//! and the configurations the gateway and the client build from PEM files. The rest of this
//! crate does no I/O; this module is the one transport piece the gateway and the SDK share, so
//! that `wss://` and `https://` need no further crate.
//!
//! rustls is sans-IO: it turns TLS records into plaintext and back. [`TlsStream`] moves bytes
//! between it and the socket: reads pull records in (`read_tls`, `process_new_packets`) until
//! plaintext is available; writes hand plaintext to rustls and push records out (`write_tls`).

use std::io::{self, Read, Write};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection, SideData,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream that speaks TLS over `io`: `C` is a [`ClientConnection`] or a [`ServerConnection`].
pub struct TlsStream<IO, C> {
    io: IO,
    conn: C,
    /// `close_notify` was queued (by `poll_shutdown`).
    closing: bool,
}

impl<IO, C> TlsStream<IO, C> {
    /// The rustls connection (peer certificates, negotiated ALPN ...).
    pub fn connection(&self) -> &C {
        &self.conn
    }
}

/// `std::io::Read` over a tokio reader, for rustls: `Pending` becomes `WouldBlock`.
struct SyncRead<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncRead + Unpin> Read for SyncRead<'_, '_, IO> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// `std::io::Write` over a tokio writer, for rustls.
struct SyncWrite<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncWrite + Unpin> Write for SyncWrite<'_, '_, IO> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

fn ready_io<T>(r: io::Result<T>) -> Poll<io::Result<T>> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        r => Poll::Ready(r),
    }
}

impl<IO, C, D> TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    /// Reads TLS records from the socket into rustls and processes them. `Ok(0)`: the socket
    /// reached its end.
    fn read_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let n = match ready_io(self.conn.read_tls(&mut SyncRead {
            io: &mut self.io,
            cx,
        })) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        if let Err(e) = self.conn.process_new_packets() {
            // Send the alert rustls queued for the peer, then fail.
            let _ = self.write_io(cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        Poll::Ready(Ok(n))
    }

    /// Writes queued TLS records to the socket.
    fn write_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        ready_io(self.conn.write_tls(&mut SyncWrite {
            io: &mut self.io,
            cx,
        }))
    }

    /// Writes every queued record (`Pending` while the socket is full).
    fn flush_records(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            match self.write_io(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Drives the handshake to its end.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.is_handshaking() {
            match self.flush_records(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
            }
            if !self.conn.is_handshaking() {
                break;
            }
            if self.conn.wants_read() {
                match self.read_io(cx) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection during the TLS handshake",
                        )));
                    }
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        match self.flush_records(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.io).poll_flush(cx),
            other => other,
        }
    }

    async fn handshake(mut self) -> io::Result<Self> {
        std::future::poll_fn(|cx| self.poll_handshake(cx)).await?;
        Ok(self)
    }
}

impl<IO, C, D> AsyncRead for TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.conn.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            // Records rustls wants sent first (a key update); a full socket does not stop
            // reading.
            if let Poll::Ready(Err(e)) = this.flush_records(cx) {
                return Poll::Ready(Err(e));
            }
            match this.read_io(cx) {
                Poll::Ready(Ok(0)) => {
                    // The socket ended: rustls now reports a clean end (after close_notify) or
                    // an unexpected one on the next read; if it still has nothing, it is the end.
                    return match this.conn.reader().read(buf.initialize_unfilled()) {
                        Ok(n) => {
                            buf.advance(n);
                            Poll::Ready(Ok(()))
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
                        Err(e) => Poll::Ready(Err(e)),
                    };
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<IO, C, D> AsyncWrite for TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Records already queued go first, so rustls's buffer never grows without bound.
        match this.flush_records(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let n = this.conn.writer().write(buf)?;
        // Push what can go now; the rest goes on the next write or flush.
        if let Poll::Ready(Err(e)) = this.flush_records(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.conn.writer().flush()?;
        match this.flush_records(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.conn.send_close_notify();
            this.closing = true;
        }
        match this.flush_records(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_shutdown(cx),
            other => other,
        }
    }
}

/// The server side of a TLS handshake on an accepted connection.
pub async fn accept<IO>(
    io: IO,
    config: Arc<ServerConfig>,
) -> io::Result<TlsStream<IO, ServerConnection>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
    TlsStream {
        io,
        conn,
        closing: false,
    }
    .handshake()
    .await
}

/// The client side of a TLS handshake with `host` (a DNS name or an IP address).
pub async fn connect<IO>(
    io: IO,
    host: &str,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<IO, ClientConnection>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
    TlsStream {
        io,
        conn,
        closing: false,
    }
    .handshake()
    .await
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the certificate, key or settings.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsConfigError {
    TlsConfigError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The certificate chain (leaf first) in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// The private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_error(path, format!("no usable private key: {e}")))
}

/// The crypto provider every configuration here uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that trusts the CA certificates in `ca_file`, or the public web PKI
/// (Mozilla's roots, built in) when there is none.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in load_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A handshake in progress, as [`Transport::Handshaking`] holds it.
pub type Handshake<IO, C> =
    Pin<Box<dyn std::future::Future<Output = io::Result<TlsStream<IO, C>>> + Send>>;

/// A plain or TLS stream, one type for both (the listener decides at accept, the client by the
/// URL's scheme). A TLS stream may still be handshaking: its first read or write finishes the
/// handshake, so an accept loop never waits on a slow client's handshake.
pub enum Transport<IO, C> {
    /// No TLS.
    Plain(IO),
    /// The TLS handshake is under way.
    Handshaking(Handshake<IO, C>),
    /// TLS, handshake done (boxed: a plain connection should not carry its size).
    Tls(Box<TlsStream<IO, C>>),
}

impl<IO: Send + AsyncRead + AsyncWrite + Unpin + 'static> Transport<IO, ServerConnection> {
    /// The server side: plain, or TLS with `config` (handshake on first use).
    pub fn accept(io: IO, config: Option<Arc<ServerConfig>>) -> Self {
        match config {
            None => Transport::Plain(io),
            Some(config) => Transport::Handshaking(Box::pin(accept(io, config))),
        }
    }
}

/// A byte stream both ways (what [`Transport`] forwards to).
trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

impl<IO, C, D> Transport<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    /// The stream to read or write, once a TLS handshake (if any) has finished.
    fn poll_io<'a>(
        &'a mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Pin<&'a mut (dyn Io + 'a)>>> {
        if let Transport::Handshaking(h) = self {
            match h.as_mut().poll(cx) {
                Poll::Ready(Ok(s)) => *self = Transport::Tls(Box::new(s)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        match self {
            Transport::Plain(io) => Poll::Ready(Ok(Pin::new(io))),
            Transport::Tls(t) => Poll::Ready(Ok(Pin::new(t.as_mut()))),
            Transport::Handshaking(_) => Poll::Pending,
        }
    }
}

impl<IO, C, D> AsyncRead for Transport<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().poll_io(cx) {
            Poll::Ready(Ok(io)) => io.poll_read(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO, C, D> AsyncWrite for Transport<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().poll_io(cx) {
            Poll::Ready(Ok(io)) => io.poll_write(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().poll_io(cx) {
            Poll::Ready(Ok(io)) => io.poll_flush(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Transport::Handshaking(_) = this {
            // Nothing was said yet: dropping closes the socket.
            return Poll::Ready(Ok(()));
        }
        match this.poll_io(cx) {
            Poll::Ready(Ok(io)) => io.poll_shutdown(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}
