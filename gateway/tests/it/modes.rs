//! Sync modes and `fetch`: an `upload_only` collection is written and never read back, a
//! `never` collection is not subscribed but fetched by id, and a fetch answers every id once
//! — in several frames when the documents are large — or is refused with its code.

use super::*;

/// Fetches `ids` and returns (documents by id, missing ids, frames of the answer).
async fn fetch(
    c: &mut Connection,
    req: u32,
    collection: &str,
    ids: &[String],
) -> Result<(BTreeMap<String, Body>, Vec<String>, usize), ErrorFrame> {
    c.send(&Frame::Fetch(Fetch {
        req,
        collection: collection.into(),
        ids: ids.to_vec(),
    }))
    .await
    .unwrap();
    let (mut docs, mut missing, mut frames) = (BTreeMap::new(), Vec::new(), 0);
    loop {
        match c.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Fetched(a) => {
                assert_eq!(a.req, req);
                frames += 1;
                for d in a.docs {
                    assert!(docs.insert(d.id, d.body).is_none(), "an id answered twice");
                }
                missing.extend(a.missing);
                if a.done {
                    return Ok((docs, missing, frames));
                }
            }
            Frame::Error(e) if e.req == Some(req) => return Err(e),
            Frame::Error(e) => panic!("{e:?}"),
            _ => {}
        }
    }
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

pub async fn modes_and_fetch(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    config.collections.insert(
        "manuals".into(),
        syncgate_gateway::config::CollectionConfig {
            mode: syncgate_gateway::config::SyncMode::Never,
            ..Default::default()
        },
    );
    assert_eq!(
        config.collections["feedback"].mode,
        syncgate_gateway::config::SyncMode::UploadOnly,
        "the default config's feedback is upload-only"
    );
    let gw = Gateway::start(config).await.unwrap();
    let (mut c, _) = connect(&gw, "terminal").await;
    // 40 manuals of ~100 KB: a fetch of all of them needs several frames.
    let page = "p".repeat(100 * 1024);
    for b in 0..10u64 {
        let m = (0..4u64)
            .map(|i| {
                let n = b * 4 + i;
                put(
                    n + 1,
                    "manuals",
                    &format!("m-{n:02}"),
                    body(&[("text", Value::from(page.as_str()))]),
                )
            })
            .collect();
        push(&mut c, b + 1, m).await;
    }
    let ack = push(
        &mut c,
        11,
        vec![
            put(41, "feedback", "f-1", body(&[("stars", Value::from(4))])),
            delete(42, "manuals", "m-39"),
        ],
    )
    .await;
    assert!(
        ack.results
            .iter()
            .all(|r| r.status == MutationStatus::Applied),
        "writes apply"
    );

    // Subscribing to either is refused with 306; fetching feedback too.
    for (sub, collection) in [(1, "manuals"), (2, "feedback")] {
        c.send(&Frame::Subscribe(Subscribe {
            sub,
            collection: collection.into(),
            filter: Body::new(),
            cursor: None,
        }))
        .await
        .unwrap();
        match c.recv_timeout(DEADLINE).await.unwrap() {
            Frame::Error(e) => {
                assert_eq!(
                    (e.code, e.sub),
                    (ErrorCode::NotDownloadable.code(), Some(sub))
                );
            }
            other => panic!("{other:?}"),
        }
    }
    let e = fetch(&mut c, 1, "feedback", &ids(&["f-1"]))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotDownloadable.code());
    assert!(
        !format!("{e:?}").contains("stars"),
        "nothing of feedback comes down"
    );

    // Fetching manuals: every id once, the deleted and the unknown ones missing.
    let mut wanted: Vec<String> = (0..40).map(|n| format!("m-{n:02}")).collect();
    wanted.push("m-none".into());
    wanted.push("m-07".into()); // named twice, answered once
    let (docs, missing, frames) = fetch(&mut c, 2, "manuals", &wanted).await.unwrap();
    assert_eq!(docs.len(), 39);
    assert_eq!(missing, ["m-39", "m-none"]);
    assert!(frames > 1, "40 × 100 KB came in {frames} frame(s)");
    assert_eq!(docs["m-07"]["text"], Value::from(page.as_str()));

    // Bad fetches: no ids, too many, an invalid id, an undeclared collection.
    let too_many: Vec<String> = (0..1001).map(|n| format!("x{n}")).collect();
    for (req, collection, list, code) in [
        (3, "manuals", Vec::new(), ErrorCode::InvalidFetch),
        (4, "manuals", too_many, ErrorCode::InvalidFetch),
        (5, "manuals", ids(&[""]), ErrorCode::InvalidFetch),
        (6, "nope", ids(&["a"]), ErrorCode::UnknownCollection),
    ] {
        let e = fetch(&mut c, req, collection, &list).await.unwrap_err();
        assert_eq!(e.code, code.code(), "{e:?}");
    }
    // The session goes on: a collection in mode "all" can be fetched too.
    push(
        &mut c,
        12,
        vec![put(43, "stock", "s-1", body(&[("qty", Value::from(2))]))],
    )
    .await;
    let (docs, missing, _) = fetch(&mut c, 7, "stock", &ids(&["s-1", "s-2"]))
        .await
        .unwrap();
    assert_eq!(docs.keys().collect::<Vec<_>>(), ["s-1"]);
    assert_eq!(missing, ["s-2"]);
    gw.shutdown().await;
    db.cleanup().await;
}
