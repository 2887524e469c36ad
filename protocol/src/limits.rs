//! Size limits. A gateway announces its limits in `Welcome`; clients must stay within them and
//! the gateway rejects anything beyond them with a stable error code.

use serde::{Deserialize, Serialize};

/// Limits enforced on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest accepted WebSocket message, in bytes. Checked on the frame header, before the
    /// payload is read.
    pub max_frame_bytes: u32,
    /// Most mutations in one `Push`.
    pub max_mutations_per_batch: u32,
    /// Largest document body, in MessagePack-encoded bytes.
    pub max_document_bytes: u32,
    /// Longest document id and client id, in UTF-8 bytes.
    pub max_id_bytes: u32,
    /// Most concurrent subscriptions on one connection.
    pub max_subscriptions: u32,
    /// Deepest nesting of arrays and maps inside a frame (the frame's own array counts as 1).
    pub max_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 1024 * 1024,
            max_mutations_per_batch: 1000,
            max_document_bytes: 256 * 1024,
            max_id_bytes: 128,
            max_subscriptions: 64,
            max_depth: 32,
        }
    }
}

/// The collection-name rule: `[a-z][a-z0-9_]{0,63}`.
pub fn is_valid_collection_name(name: &str) -> bool {
    let b = name.as_bytes();
    let Some((first, rest)) = b.split_first() else {
        return false;
    };
    b.len() <= 64
        && first.is_ascii_lowercase()
        && rest
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// Id rule for document ids and client ids: 1..=max bytes of UTF-8 with no control characters.
pub fn is_valid_id(id: &str, max_bytes: u32) -> bool {
    !id.is_empty() && id.len() <= max_bytes as usize && !id.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names() {
        assert!(is_valid_collection_name("work_orders"));
        assert!(is_valid_collection_name("a"));
        assert!(!is_valid_collection_name(""));
        assert!(!is_valid_collection_name("1abc"));
        assert!(!is_valid_collection_name("Work"));
        assert!(!is_valid_collection_name(&"a".repeat(65)));
        assert!(is_valid_collection_name(&"a".repeat(64)));
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("wo-1", 128));
        assert!(!is_valid_id("", 128));
        assert!(!is_valid_id("a\nb", 128));
        assert!(!is_valid_id(&"x".repeat(129), 128));
    }
}
