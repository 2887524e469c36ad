//! Answering a `fetch`: the documents a client names by id, read in chunks, each chunk within
//! one of the node's read turns (`node_concurrent_reads`), cut into `fetched` frames of at
//! most the frame budget, every id answered once — as a document, or as missing when it does
//! not exist, is deleted or lies outside the user's scope (the three are not told apart, so a
//! fetch reveals nothing outside the scope).

use std::sync::Arc;

use bytes::Bytes;
use syncgate_protocol::codec::{encode, to_msgpack};
use syncgate_protocol::{Doc, Fetched, Frame};

use crate::error::{ErrorReply, GatewayError, Step};
use crate::outbound::Outbound;
use crate::shared::Shared;
use crate::sync::frames::View;

/// Ids read from the database per statement (and per read turn).
const READ_CHUNK: usize = 32;

/// What one `fetch` asks for, checked by the connection.
pub(crate) struct FetchJob {
    pub(crate) req: u32,
    pub(crate) collection: String,
    pub(crate) ids: Vec<String>,
    /// The user's scope in the collection (the filter part matches everything).
    pub(crate) view: View,
}

/// Reads and sends the answer; on a database error the client gets `storage_unavailable`
/// for the request (frames already sent stand: their documents are correct).
pub(crate) async fn answer(shared: Arc<Shared>, out: Arc<Outbound>, job: FetchJob) {
    if let Err(e) = run(&shared, &out, &job).await {
        tracing::error!(error = %e, req = job.req, "fetch failed");
        ErrorReply::from(GatewayError::Storage(Step::Fetch))
            .req(job.req)
            .send(&out, &shared.metrics);
    }
}

async fn run(
    shared: &Shared,
    out: &Outbound,
    job: &FetchJob,
) -> Result<(), crate::storage::StoreError> {
    let budget = shared.hub.frame_budget();
    let chunks: Vec<&[String]> = job.ids.chunks(READ_CHUNK).collect();
    let last = chunks.len().saturating_sub(1);
    for (n, ids) in chunks.into_iter().enumerate() {
        let keys: Vec<&str> = ids.iter().map(String::as_str).collect();
        let turn = crate::ws::subscription::read_turn(shared).await;
        let mut found = shared.store.documents_by_id(&job.collection, &keys).await?;
        let mut frames: Vec<Fetched> = vec![empty(job.req)];
        let mut bytes = 0usize;
        for id in ids {
            let doc = found
                .remove(id)
                .filter(|d| !d.deleted)
                .and_then(|d| Some((d.body?, d.version)))
                .filter(|(body, _)| job.view.matches(body));
            let Some((body, version)) = doc else {
                if let Some(f) = frames.last_mut() {
                    f.missing.push(id.clone());
                }
                continue;
            };
            let size = to_msgpack(&body).len() + id.len() + 16;
            if bytes > 0 && bytes + size > budget {
                frames.push(empty(job.req));
                bytes = 0;
            }
            bytes += size;
            if let Some(f) = frames.last_mut() {
                f.docs.push(Doc {
                    id: id.clone(),
                    body,
                    version,
                });
            }
        }
        if n == last
            && let Some(f) = frames.last_mut()
        {
            f.done = true;
        }
        let encoded: Vec<Bytes> = frames
            .into_iter()
            .map(|f| Bytes::from(encode(&Frame::Fetched(f))))
            .collect();
        // Never held while waiting for the client to read.
        drop(turn);
        for frame in encoded {
            out.wait_for_space().await;
            out.push(frame);
        }
    }
    Ok(())
}

fn empty(req: u32) -> Fetched {
    Fetched {
        req,
        docs: Vec::new(),
        missing: Vec::new(),
        done: false,
    }
}
