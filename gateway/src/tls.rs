//! TLS for the gateway's listeners: a rustls server configuration whose certificate and key
//! come from the files in `[tls]` and are read again whenever either file changes (checked at
//! each handshake, one `stat` per file), so a renewed certificate is served without a restart.
//! A renewal that cannot be loaded (a half-written file) keeps the last good certificate and
//! logs a warning.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use syncgate_protocol::tls::{load_certs, load_key, provider};

use crate::config::TlsConfig;
use crate::files::{Stamp, stamp};

/// The certificate files and the key last loaded from them.
#[derive(Debug)]
struct Reloading {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: Mutex<Loaded>,
}

/// The files' stamps when last looked at, and the key served.
#[derive(Debug)]
struct Loaded {
    stamps: Option<(Stamp, Stamp)>,
    key: Arc<CertifiedKey>,
}

fn certified_key(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .with_context(|| format!("{}: not a usable private key", key_file.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().with_context(|| {
        format!(
            "{} and {} do not belong together",
            cert_file.display(),
            key_file.display()
        )
    })?;
    Ok(Arc::new(certified))
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.cert_file).ok().zip(stamp(&self.key_file).ok());
        if now.is_some() && now != current.stamps {
            match certified_key(&self.cert_file, &self.key_file) {
                Ok(key) => {
                    tracing::info!(cert = %self.cert_file.display(), "TLS certificate changed: reloaded");
                    *current = Loaded { stamps: now, key };
                }
                Err(e) => {
                    tracing::warn!(
                        cert = %self.cert_file.display(), error = %format!("{e:#}"),
                        "TLS certificate files changed but cannot be used; serving the previous one"
                    );
                    current.stamps = now;
                }
            }
        }
        Some(current.key.clone())
    }
}

/// The server configuration for `[tls]`, or `None` when TLS is off. Files that cannot be used
/// are an error at startup.
pub(crate) fn server_config(tls: &TlsConfig) -> anyhow::Result<Option<Arc<ServerConfig>>> {
    if tls.cert_file.as_os_str().is_empty() {
        return Ok(None);
    }
    let stamps = stamp(&tls.cert_file)
        .with_context(|| format!("tls.cert_file {}", tls.cert_file.display()))?;
    let key_stamp =
        stamp(&tls.key_file).with_context(|| format!("tls.key_file {}", tls.key_file.display()))?;
    let key = certified_key(&tls.cert_file, &tls.key_file)?;
    let resolver = Reloading {
        cert_file: tls.cert_file.clone(),
        key_file: tls.key_file.clone(),
        current: Mutex::new(Loaded {
            stamps: Some((stamps, key_stamp)),
            key,
        }),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // HTTP/1.1 only (the WebSocket upgrade and the HTTP endpoints both speak it).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}
