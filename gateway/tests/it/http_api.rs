//! The HTTP API for backend services, on both backends: writes in JSON and MessagePack go
//! through the same ingest as WebSocket pushes (interleaved with them, every subscriber gets
//! each change once, in order), a request sent again gets the same answer and applies
//! nothing twice, reads apply scopes, and every bad request gets problem+json with its code.

use std::collections::HashMap;

use syncgate_gateway::server::{ApiKeyRequest, create_api_key};

use super::*;

/// A raw HTTP/1.1 request: status, headers (lower-case names), body.
pub async fn http(
    gw: &Gateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, HashMap<String, String>, Vec<u8>) {
    http_at(gw.http_addr, method, path, headers, body).await
}

/// [`http`] to an address (a gateway that is shutting down is no longer at hand).
pub async fn http_at(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, HashMap<String, String>, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: syncgate\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (and close) before reading an oversized body.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw))
        .await
        .expect("an HTTP answer in time")
        .ok();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete HTTP head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, raw[split + 4..].to_vec())
}

pub fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

/// `Bearer <key>` for a new API key of user `erp` with no roles or claims.
pub async fn bearer_for(config: &syncgate_gateway::Config, name: &str) -> String {
    let (key, _) = create_api_key(
        config,
        ApiKeyRequest {
            name: name.into(),
            user: "erp".into(),
            roles: vec![],
            claims: Default::default(),
        },
    )
    .await
    .unwrap();
    format!("Bearer {key}")
}

/// Asserts a problem+json answer with this status and protocol code.
pub fn problem(answer: &(u16, HashMap<String, String>, Vec<u8>), status: u16, code: ErrorCode) {
    let (got, headers, body) = answer;
    let p = json(body);
    assert_eq!(
        (*got, p["code"].as_u64()),
        (status, Some(u64::from(code.code()))),
        "{p}"
    );
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(p["name"], code.name());
    assert_eq!(p["status"], status);
}

pub async fn the_http_api_writes_through_ingest_and_reads_with_scopes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    config.limits.max_frame_bytes = 64 * 1024;
    config.limits.max_document_bytes = 32 * 1024;
    let stock = config.collections.get_mut("stock").unwrap();
    stock.scope = [("plant".to_owned(), "claims.plant".to_owned())].into();
    let gw = Gateway::start(config.clone()).await.unwrap();
    let key_for = |name: &str, plant: &str| ApiKeyRequest {
        name: name.into(),
        user: "erp".into(),
        roles: vec![],
        claims: [("plant".to_owned(), serde_json::json!(plant))].into(),
    };
    let (key, _) = create_api_key(&config, key_for("erp-a", "A"))
        .await
        .unwrap();
    let (key_b, _) = create_api_key(&config, key_for("erp-b", "B"))
        .await
        .unwrap();
    // A planner of both plants may move stock between them.
    let (key_ab, _) = create_api_key(
        &config,
        ApiKeyRequest {
            claims: [("plant".to_owned(), serde_json::json!(["A", "B"]))].into(),
            ..key_for("erp-ab", "-")
        },
    )
    .await
    .unwrap();
    let bearer_ab = format!("Bearer {key_ab}");
    let bearer = format!("Bearer {key}");
    let auth = ("Authorization", bearer.as_str());
    let mut watcher = Replica::subscribe(&gw, "watcher", "work_orders", Body::new(), None).await;
    let (mut terminal, _) = connect(&gw, "terminal").await;

    // A machine, in JSON, by document URL.
    let put_machine = http(
        &gw,
        "PUT",
        "/v1/collections/machines/documents/M1",
        &[
            auth,
            ("Syncgate-Client-Id", "erp-svc"),
            ("Syncgate-Mutation-Id", "1"),
        ],
        br#"{"name": "press"}"#,
    )
    .await;
    assert_eq!(
        put_machine.0,
        200,
        "{}",
        String::from_utf8_lossy(&put_machine.2)
    );
    assert_eq!(put_machine.1["content-type"], "application/json");
    assert_eq!(json(&put_machine.2)["results"][0]["status"], "applied");
    // Two work orders' writes in one batch, atomic like a push.
    let batch = serde_json::json!({"client_id": "erp-svc", "mutations": [
        {"mutation_id": 2, "collection": "work_orders", "id": "wo-1", "op": "put",
         "body": {"status": "open", "machine": "M1", "qty": 5}},
        {"mutation_id": 3, "collection": "work_orders", "id": "wo-1", "op": "patch",
         "body": {"qty": 6}},
    ]})
    .to_string();
    let first = http(&gw, "POST", "/v1/batch", &[auth], batch.as_bytes()).await;
    assert_eq!(first.0, 200, "{}", String::from_utf8_lossy(&first.2));
    let answer = json(&first.2);
    assert_eq!(answer["results"][1]["status"], "applied", "{answer}");
    // Sent again (the answer was lost): the same answer, nothing applied twice.
    let again = http(&gw, "POST", "/v1/batch", &[auth], batch.as_bytes()).await;
    assert_eq!(json(&again.2), answer);
    // A terminal's push to the same document, between HTTP writes.
    let ack = push(
        &mut terminal,
        1,
        vec![patch(
            1,
            "work_orders",
            "wo-1",
            body(&[("note", Value::from("checked"))]),
        )],
    )
    .await;
    assert_eq!(ack.results[0].status, MutationStatus::Applied);
    // A cancellation in MessagePack, answered in MessagePack.
    let fields =
        syncgate_protocol::codec::to_msgpack(&body(&[("status", Value::from("cancelled"))]));
    let cancel = http(
        &gw,
        "PATCH",
        "/v1/collections/work_orders/documents/wo-1",
        &[
            auth,
            ("Content-Type", "application/msgpack"),
            ("Syncgate-Client-Id", "erp-svc"),
            ("Syncgate-Mutation-Id", "4"),
        ],
        &fields,
    )
    .await;
    assert_eq!(cancel.0, 200);
    assert_eq!(cancel.1["content-type"], "application/msgpack");
    let decoded: serde_json::Value = syncgate_protocol::codec::from_msgpack(&cancel.2).unwrap();
    assert_eq!(decoded["results"][0]["status"], "applied");
    let last = decoded["visible_at"].as_u64().unwrap();

    // Every change reached the subscriber once, in order.
    watcher.until_seq(last).await;
    watcher.assert_in_order_once();
    assert_eq!(watcher.seqs.len(), 4, "{:?}", watcher.seqs);
    let (doc, version) = watcher.docs["wo-1"].clone();
    assert_eq!(version, last);
    assert_eq!(doc["status"], Value::from("cancelled"));
    assert_eq!(doc["note"], Value::from("checked"));

    // Reads: JSON and MessagePack, with the version as ETag.
    let read = http(
        &gw,
        "GET",
        "/v1/collections/work_orders/documents/wo-1",
        &[auth],
        b"",
    )
    .await;
    assert_eq!(read.0, 200);
    assert_eq!(read.1["etag"], format!("\"{last}\""));
    let got = json(&read.2);
    assert_eq!(
        (got["version"].as_u64(), &got["body"]["qty"]),
        (Some(last), &serde_json::json!(6))
    );
    let read = http(
        &gw,
        "GET",
        "/v1/collections/work_orders/documents/wo-1",
        &[auth, ("Accept", "application/msgpack")],
        b"",
    )
    .await;
    let got: DocAnswerCheck = syncgate_protocol::codec::from_msgpack(&read.2).unwrap();
    assert_eq!((got.id.as_str(), got.version), ("wo-1", last));
    // Row scopes: plant A's stock is plant A's; another plant's key sees nothing of it.
    let stock = http(
        &gw,
        "PUT",
        "/v1/collections/stock/documents/s-1",
        &[
            auth,
            ("Syncgate-Client-Id", "erp-svc"),
            ("Syncgate-Mutation-Id", "5"),
        ],
        br#"{"plant": "A", "qty": 3}"#,
    )
    .await;
    assert_eq!(json(&stock.2)["results"][0]["status"], "applied");
    let read = http(
        &gw,
        "GET",
        "/v1/collections/stock/documents/s-1",
        &[auth],
        b"",
    )
    .await;
    assert_eq!(json(&read.2)["body"]["qty"], 3);
    let other = format!("Bearer {key_b}");
    let hidden = http(
        &gw,
        "GET",
        "/v1/collections/stock/documents/s-1",
        &[("Authorization", other.as_str())],
        b"",
    )
    .await;
    problem(&hidden, 404, ErrorCode::DocumentNotFound);
    // A deleted document is gone.
    let gone = http(
        &gw,
        "DELETE",
        "/v1/collections/machines/documents/M1",
        &[
            auth,
            ("Syncgate-Client-Id", "erp-svc"),
            ("Syncgate-Mutation-Id", "6"),
        ],
        b"",
    )
    .await;
    assert_eq!(json(&gone.2)["results"][0]["status"], "applied");
    let read = http(
        &gw,
        "GET",
        "/v1/collections/machines/documents/M1",
        &[auth],
        b"",
    )
    .await;
    problem(&read, 404, ErrorCode::DocumentNotFound);
    // A mutation's own rejection is a result, as in push_ack: another plant, an unknown
    // collection.
    let outside = serde_json::json!({"client_id": "erp-svc", "mutations": [
        {"mutation_id": 7, "collection": "stock", "id": "s-9", "op": "put",
         "body": {"plant": "B"}},
        {"mutation_id": 8, "collection": "nope", "id": "x", "op": "put", "body": {}},
    ]})
    .to_string();
    let answer = json(
        &http(&gw, "POST", "/v1/batch", &[auth], outside.as_bytes())
            .await
            .2,
    );
    assert_eq!(answer["results"][0]["code"], ErrorCode::OutOfScope.code());
    assert_eq!(
        answer["results"][1]["code"],
        ErrorCode::UnknownCollection.code()
    );

    // A paged list with an equality filter.
    let more = serde_json::json!({"client_id": "erp-svc", "mutations": [
        {"mutation_id": 20, "collection": "work_orders", "id": "wo-a", "op": "put", "body": {"status": "open"}},
        {"mutation_id": 21, "collection": "work_orders", "id": "wo-b", "op": "put", "body": {"status": "done"}},
        {"mutation_id": 22, "collection": "work_orders", "id": "wo-c", "op": "put", "body": {"status": "open"}},
        {"mutation_id": 23, "collection": "work_orders", "id": "wo-d", "op": "put", "body": {"status": "open"}},
    ]})
    .to_string();
    let written = json(
        &http(&gw, "POST", "/v1/batch", &[auth], more.as_bytes())
            .await
            .2,
    );
    let head = written["visible_at"].as_u64().unwrap();
    let page = |query: String| {
        let gw = &gw;
        async move {
            let path = format!("/v1/collections/work_orders/documents?{query}");
            let (status, _, body) = http(gw, "GET", &path, &[auth], b"").await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let v = json(&body);
            let ids: Vec<String> = v["documents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned())
                .collect();
            (ids, v["next"].as_str().map(str::to_owned))
        }
    };
    let (ids, next) = page("where.status=open&limit=2".into()).await;
    assert_eq!(ids, ["wo-a", "wo-c"]);
    let (ids, last) = page(format!("where.status=open&limit=2&after={}", next.unwrap())).await;
    assert_eq!((ids, last), (vec!["wo-d".to_owned()], None));
    let (ids, _) = page("where.status=%22cancelled%22".into()).await;
    assert_eq!(ids, ["wo-1"]);
    // Every endpoint in MessagePack too: a batch, a PUT, a list and the feed.
    let mp = [
        auth,
        ("Content-Type", "application/msgpack"),
        ("Accept", "application/msgpack"),
    ];
    let batch = syncgate_protocol::codec::to_msgpack(&serde_json::json!({
        "client_id": "erp-svc",
        "mutations": [{"mutation_id": 30, "collection": "machines", "id": "M5", "op": "put",
                       "body": {"name": "mill", "axes": 5}}],
    }));
    let (status, headers, raw) = http(&gw, "POST", "/v1/batch", &mp, &batch).await;
    assert_eq!(
        (status, headers["content-type"].as_str()),
        (200, "application/msgpack")
    );
    let answer: serde_json::Value = syncgate_protocol::codec::from_msgpack(&raw).unwrap();
    assert_eq!(answer["results"][0]["status"], "applied");
    let put_m6 = [
        mp[0],
        mp[1],
        mp[2],
        ("Syncgate-Client-Id", "erp-svc"),
        ("Syncgate-Mutation-Id", "31"),
    ];
    let doc = syncgate_protocol::codec::to_msgpack(&body(&[("name", Value::from("drill"))]));
    let (status, _, raw) = http(
        &gw,
        "PUT",
        "/v1/collections/machines/documents/M6",
        &put_m6,
        &doc,
    )
    .await;
    assert_eq!(status, 200);
    let answer: serde_json::Value = syncgate_protocol::codec::from_msgpack(&raw).unwrap();
    let m6_at = answer["visible_at"].as_u64().unwrap();
    let (_, _, raw) = http(
        &gw,
        "GET",
        "/v1/collections/machines/documents?where.axes=5",
        &mp,
        b"",
    )
    .await;
    let listed: serde_json::Value = syncgate_protocol::codec::from_msgpack(&raw).unwrap();
    assert_eq!(listed["documents"][0]["id"], "M5");
    assert_eq!(listed["documents"].as_array().map(Vec::len), Some(1));
    let path = format!("/v1/changes?collection=machines&after={}", m6_at - 1);
    let (_, _, raw) = http(&gw, "GET", &path, &mp, b"").await;
    let fed: serde_json::Value = syncgate_protocol::codec::from_msgpack(&raw).unwrap();
    assert_eq!(
        (&fed["changes"][0]["id"], fed["next"].as_u64()),
        (&"M6".into(), Some(m6_at))
    );

    // The change feed: every change of the collection in order, then a long poll that
    // returns when the next one is published.
    let feed = |key: &str, query: String| {
        let key = key.to_owned();
        let gw = &gw;
        async move {
            let bearer = format!("Bearer {key}");
            let path = format!("/v1/changes?{query}");
            let (status, _, body) =
                http(gw, "GET", &path, &[("Authorization", bearer.as_str())], b"").await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            json(&body)
        }
    };
    let all = feed(&key, "collection=work_orders&after=0".into()).await;
    let seqs: Vec<u64> = all["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    watcher.until_seq(head).await;
    assert_eq!(
        seqs, watcher.seqs,
        "the feed holds what the subscriber received"
    );
    assert_eq!(
        all["next"].as_u64(),
        Some(m6_at),
        "the feed moves on to the head"
    );
    assert_eq!(all["epoch"].as_str(), Some(gw.store.epoch()));
    let poll = feed(
        &key,
        format!("collection=work_orders&after={head}&timeout_ms=20000"),
    );
    let write = async {
        push(
            &mut terminal,
            2,
            vec![patch(
                2,
                "work_orders",
                "wo-a",
                body(&[("status", Value::from("done"))]),
            )],
        )
        .await
    };
    let (polled, ack) = tokio::join!(poll, write);
    let change = &polled["changes"][0];
    assert_eq!(change["id"], "wo-a");
    assert_eq!(change["seq"].as_u64(), Some(ack.visible_at));
    assert_eq!(polled["next"].as_u64(), Some(ack.visible_at));
    // A long poll of one collection is not answered by changes of another.
    let now = ack.visible_at;
    let poll = feed(
        &key,
        format!("collection=machines&after={now}&timeout_ms=20000"),
    );
    let writes = async {
        let other = push(
            &mut terminal,
            3,
            vec![patch(
                3,
                "work_orders",
                "wo-c",
                body(&[("qty", Value::from(1))]),
            )],
        )
        .await;
        let machine = push(
            &mut terminal,
            4,
            vec![put(
                4,
                "machines",
                "M7",
                body(&[("name", Value::from("lathe"))]),
            )],
        )
        .await;
        (other.visible_at, machine.visible_at)
    };
    let (polled, (other_at, machine_at)) = tokio::join!(poll, writes);
    assert!(other_at < machine_at);
    let got: Vec<(u64, &str)> = polled["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["seq"].as_u64().unwrap(), c["id"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(machine_at, "M7")]);
    // Scopes: a document that moves to plant B leaves plant A's feed as a delete and enters
    // plant B's.
    let moved = http(
        &gw,
        "PATCH",
        "/v1/collections/stock/documents/s-1",
        &[
            ("Authorization", bearer_ab.as_str()),
            ("Syncgate-Client-Id", "erp-planner"),
            ("Syncgate-Mutation-Id", "1"),
        ],
        br#"{"plant": "B"}"#,
    )
    .await;
    let moved_at = json(&moved.2)["visible_at"].as_u64().unwrap();
    assert!(moved_at > 0, "{}", String::from_utf8_lossy(&moved.2));
    let seen_a = feed(
        &key,
        format!("collection=stock&after={}&timeout_ms=20000", moved_at - 1),
    )
    .await;
    assert_eq!(
        (&seen_a["changes"][0]["op"], &seen_a["changes"][0]["id"]),
        (&"delete".into(), &"s-1".into())
    );
    let seen_b = feed(&key_b, "collection=stock&after=0&timeout_ms=20000".into()).await;
    let ops: Vec<(&str, &str)> = seen_b["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_str().unwrap(), c["op"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ops,
        [("s-1", "upsert")],
        "plant B never saw s-1 while it was plant A's"
    );

    // Exactly once by Idempotency-Key: the same request twice is one change and the same
    // answer; the key for another request is refused; a batch works the same way.
    let keyed = |key: &'static str| [auth, ("Idempotency-Key", key)];
    let url = "/v1/collections/machines/documents/M9";
    let first = http(&gw, "PUT", url, &keyed("k-1"), br#"{"name": "saw"}"#).await;
    assert_eq!(first.0, 200, "{}", String::from_utf8_lossy(&first.2));
    let again = http(&gw, "PUT", url, &keyed("k-1"), br#"{"name": "saw"}"#).await;
    assert_eq!(json(&again.2), json(&first.2));
    assert_eq!(json(&first.2)["results"][0]["status"], "applied");
    let history = gw
        .store
        .document_history("machines", "M9", 10)
        .await
        .unwrap();
    assert_eq!(history.len(), 1, "applied once");
    let reused = http(&gw, "PUT", url, &keyed("k-1"), br#"{"name": "drill"}"#).await;
    problem(&reused, 422, ErrorCode::IdempotencyKeyReused);
    let keyed_batch = serde_json::json!({"mutations": [
        {"mutation_id": 1, "collection": "machines", "id": "M10", "op": "put", "body": {}},
        {"mutation_id": 2, "collection": "machines", "id": "M11", "op": "put", "body": {}},
    ]})
    .to_string();
    let one = http(
        &gw,
        "POST",
        "/v1/batch",
        &keyed("k-2"),
        keyed_batch.as_bytes(),
    )
    .await;
    let two = http(
        &gw,
        "POST",
        "/v1/batch",
        &keyed("k-2"),
        keyed_batch.as_bytes(),
    )
    .await;
    assert_eq!(one.0, 200, "{}", String::from_utf8_lossy(&one.2));
    assert_eq!(json(&one.2), json(&two.2));
    assert_eq!(json(&one.2)["results"].as_array().map(Vec::len), Some(2));
    // Either a client id or a key, not both; the key's client ids are reserved.
    let both_ids = [
        auth,
        ("Idempotency-Key", "k-3"),
        ("Syncgate-Client-Id", "erp-svc"),
    ];
    problem(
        &http(&gw, "PUT", url, &both_ids, b"{}").await,
        400,
        ErrorCode::InvalidClientId,
    );
    let reserved = [
        auth,
        ("Syncgate-Client-Id", "idem-x"),
        ("Syncgate-Mutation-Id", "1"),
    ];
    problem(
        &http(&gw, "PUT", url, &reserved, b"{}").await,
        400,
        ErrorCode::InvalidClientId,
    );

    // Refusals, each with its problem code.
    let doc_url = "/v1/collections/work_orders/documents/wo-2";
    let ids = [
        ("Syncgate-Client-Id", "erp-svc"),
        ("Syncgate-Mutation-Id", "9"),
    ];
    problem(
        &http(&gw, "GET", doc_url, &[], b"").await,
        401,
        ErrorCode::Unauthorized,
    );
    let no_auth = http(&gw, "PUT", doc_url, &ids, b"{}").await;
    problem(&no_auth, 401, ErrorCode::Unauthorized);
    assert!(no_auth.1["www-authenticate"].starts_with("Bearer"));
    let forged = ("Authorization", "Bearer sgk_0000000000000000_nope");
    problem(
        &http(&gw, "GET", doc_url, &[forged], b"").await,
        401,
        ErrorCode::Unauthorized,
    );
    let both = [auth, ids[0], ids[1]];
    problem(
        &http(&gw, "PUT", doc_url, &both, b"{not json").await,
        400,
        ErrorCode::MalformedFrame,
    );
    problem(
        &http(&gw, "PUT", doc_url, &[auth, ids[1]], b"{}").await,
        400,
        ErrorCode::InvalidClientId,
    );
    problem(
        &http(&gw, "PUT", doc_url, &[auth, ids[0]], b"{}").await,
        400,
        ErrorCode::InvalidMutation,
    );
    problem(
        &http(&gw, "GET", "/v1/collections/nope/documents/x", &[auth], b"").await,
        404,
        ErrorCode::UnknownCollection,
    );
    problem(
        &http(
            &gw,
            "GET",
            "/v1/collections/feedback/documents/f",
            &[auth],
            b"",
        )
        .await,
        403,
        ErrorCode::NotDownloadable,
    );
    let big = format!("{{\"text\": \"{}\"}}", "x".repeat(70 * 1024));
    problem(
        &http(&gw, "PUT", doc_url, &both, big.as_bytes()).await,
        413,
        ErrorCode::FrameTooLarge,
    );
    let deep = format!("{{\"a\": {}1{}}}", "[".repeat(40), "]".repeat(40));
    problem(
        &http(&gw, "PUT", doc_url, &both, deep.as_bytes()).await,
        400,
        ErrorCode::NestingTooDeep,
    );
    // The terminal's client id belongs to the terminal's user.
    let taken = [
        auth,
        ("Syncgate-Client-Id", "terminal"),
        ("Syncgate-Mutation-Id", "50"),
    ];
    problem(
        &http(&gw, "PUT", doc_url, &taken, b"{}").await,
        409,
        ErrorCode::ClientIdTaken,
    );
    // Mutation ids must increase within a request.
    let backwards = serde_json::json!({"client_id": "erp-svc", "mutations": [
        {"mutation_id": 12, "collection": "machines", "id": "M2", "op": "put", "body": {}},
        {"mutation_id": 11, "collection": "machines", "id": "M3", "op": "put", "body": {}},
    ]})
    .to_string();
    problem(
        &http(&gw, "POST", "/v1/batch", &[auth], backwards.as_bytes()).await,
        400,
        ErrorCode::MutationIdsNotIncreasing,
    );
    gw.shutdown().await;
    db.cleanup().await;
}

/// The fields of a `GET` answer the test reads back from MessagePack.
#[derive(serde::Deserialize)]
struct DocAnswerCheck {
    id: String,
    version: u64,
}

/// `/v1/openapi.json` describes the routes as they are: every operation it lists answers (a
/// request without a key gets 401 problem+json, not a 404 or 405 from the router), every
/// other method of its paths gets 405, and a path it does not list is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let db = TestDb::new(Backend::Sqlite).await;
    let gw = Gateway::start(db.config()).await.unwrap();
    let (status, headers, body) = http(&gw, "GET", "/v1/openapi.json", &[], b"").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    let doc = json(&body);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 5, "{paths:?}");
    let methods = ["get", "put", "patch", "delete", "post"];
    for (path, item) in paths {
        let concrete = path
            .replace("{collection}", "work_orders")
            .replace("{id}", "wo-1");
        let concrete = if path == "/v1/changes" {
            format!("{concrete}?collection=work_orders")
        } else {
            concrete
        };
        for method in methods {
            let listed = item.get(method).is_some();
            let (status, _, body) = http(&gw, &method.to_uppercase(), &concrete, &[], b"{}").await;
            let expected = match (listed, path.as_str()) {
                (true, "/v1/openapi.json") => 200,
                (true, _) => 401,
                (false, _) => 405,
            };
            assert_eq!(
                status,
                expected,
                "{method} {path}: {}",
                String::from_utf8_lossy(&body)
            );
            if expected == 401 {
                assert_eq!(json(&body)["code"], ErrorCode::Unauthorized.code());
            }
            for reference in serde_json::to_string(item)
                .unwrap()
                .split("#/components/schemas/")
                .skip(1)
            {
                let name: String = reference
                    .chars()
                    .take_while(|c| c.is_alphanumeric())
                    .collect();
                assert!(
                    doc["components"]["schemas"].get(&name).is_some(),
                    "{path} names schema {name}, which is not defined"
                );
            }
        }
    }
    let (status, _, _) = http(&gw, "GET", "/v1/nothing-here", &[], b"").await;
    assert_eq!(status, 404);
    gw.shutdown().await;
}

/// A long poll longer than the HTTP idle timeout (10 s) is answered: while the server is
/// answering, the client is not idle (`http::idle::Busy`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_outlasts_the_idle_timeout() {
    let db = TestDb::new(Backend::Sqlite).await;
    let config = db.config();
    let gw = Gateway::start(config.clone()).await.unwrap();
    let bearer = bearer_for(&config, "feed").await;
    let started = std::time::Instant::now();
    let (status, _, body) = http(
        &gw,
        "GET",
        "/v1/changes?collection=stock&after=0&timeout_ms=11000",
        &[("Authorization", bearer.as_str())],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer = json(&body);
    assert_eq!(
        (
            answer["changes"].as_array().map(Vec::len),
            answer["next"].as_u64()
        ),
        (Some(0), Some(0))
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(10),
        "it waited past the idle time"
    );
    gw.shutdown().await;
}
