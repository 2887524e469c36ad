//! An embedded gateway with a business rule of its own for one collection.
//!
//! Stock counts are corrected concurrently by terminals and by the ERP. The rule: a correction
//! based on an outdated count wins only if it does not take the count below zero; otherwise
//! the server's count stays and the terminal is told (413, with the server's version).
//!
//! ```sh
//! cargo run -p syncgate-gateway --example custom_resolver -- --data-dir /tmp/sg-custom
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use syncgate_gateway::conflict::{Conflict, ConflictResolver, Resolution};
use syncgate_gateway::server::Resolvers;
use syncgate_gateway::{Config, Gateway};

/// Keeps the server's stock count when a conflicting correction would make it negative.
#[derive(Debug)]
struct NeverNegative;

impl ConflictResolver for NeverNegative {
    fn name(&self) -> &str {
        "never_negative"
    }

    fn resolve(&self, c: &Conflict<'_>) -> Resolution {
        let qty = c.mine.and_then(|b| b.get("qty")).and_then(|q| q.as_i64());
        if qty.is_some_and(|q| q < 0) {
            Resolution::Server
        } else {
            Resolution::Mine
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--data-dir" {
            config.data_dir = args.next().unwrap_or_default().into();
        }
    }
    let resolvers: Resolvers = HashMap::from([(
        "stock".to_owned(),
        Arc::new(NeverNegative) as Arc<dyn ConflictResolver>,
    )]);
    let gateway = Gateway::start_with_resolvers(config, resolvers).await?;
    println!("serving on ws://{} (Ctrl-C stops)", gateway.ws_addr);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = gateway.cancelled() => {}
    }
    gateway.shutdown().await;
    Ok(())
}
