//! Files the gateway re-reads when they change (JWKS, TLS certificates): what identifies one
//! version of a file.

use std::path::Path;
use std::time::SystemTime;

/// One version of a file: modification time, length and (on Unix) inode, so a replacement by
/// rename is seen even within the file system's timestamp granularity.
pub(crate) type Stamp = (SystemTime, u64, u64);

/// The current stamp of `path`.
pub(crate) fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Ok((m.modified()?, m.len(), ino))
}
