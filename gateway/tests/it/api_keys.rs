//! API keys for backend services: created (shown once), used as the `token` of `hello` with
//! the roles and claims they grant, listed without their secret, and revoked — after which
//! the next connection is refused.

use syncgate_gateway::server::{ApiKeyRequest, create_api_key, list_api_keys, revoke_api_key};

use super::*;

async fn hello_code(gw: &Gateway, client_id: &str, key: &str) -> Result<Connection, u16> {
    connect_code(&ws_url(gw), client_id, key)
        .await
        .map(|(c, _)| c)
}

pub(crate) async fn api_keys_grant_roles_and_claims_until_revoked(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut config = db.config();
    let orders = config.collections.get_mut("work_orders").unwrap();
    orders.write_roles = vec!["planner".into()];
    orders.scope = [("plant".to_owned(), "claims.plant".to_owned())].into();
    let gw = Gateway::start(config.clone()).await.unwrap();
    let request = |name: &str| ApiKeyRequest {
        name: name.into(),
        user: "erp".into(),
        roles: vec!["planner".into()],
        claims: [("plant".to_owned(), serde_json::json!("A"))].into(),
    };
    let (key, stored) = create_api_key(&config, request("erp-2026-11"))
        .await
        .unwrap();
    assert!(key.starts_with("sgk_") && key.contains(&stored.id));
    assert!(
        create_api_key(&config, request("erp-2026-11"))
            .await
            .is_err(),
        "names are unique"
    );

    let mut erp = hello_code(&gw, "erp-writer", &key).await.unwrap();
    let ack = push(
        &mut erp,
        1,
        vec![
            put(
                1,
                "work_orders",
                "wo-a",
                body(&[("plant", Value::from("A"))]),
            ),
            put(
                2,
                "work_orders",
                "wo-b",
                body(&[("plant", Value::from("B"))]),
            ),
        ],
    )
    .await;
    let codes: Vec<_> = ack.results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [None, Some(ErrorCode::OutOfScope.code())],
        "its role writes, its claim scopes"
    );

    // A guessed secret for a real id, and a key of the right shape nobody created.
    let (id_part, _) = key.rsplit_once('_').unwrap();
    let forged = format!("{id_part}_{}", "0".repeat(64));
    assert_eq!(
        hello_code(&gw, "erp-x", &forged).await.err(),
        Some(ErrorCode::Unauthorized.code())
    );
    let unknown = format!("sgk_{}_{}", "0".repeat(16), "0".repeat(64));
    assert_eq!(
        hello_code(&gw, "erp-x", &unknown).await.err(),
        Some(ErrorCode::Unauthorized.code())
    );

    // Rotation: a second key of the same user keeps the installation and its horizon.
    let (key2, _) = create_api_key(&config, request("erp-2026-12"))
        .await
        .unwrap();
    let listed = list_api_keys(&config).await.unwrap();
    assert_eq!(listed.len(), 2);
    let shown = serde_json::to_string(&listed).unwrap();
    for secret in [&key, &key2] {
        let (_, s) = secret.rsplit_once('_').unwrap();
        assert!(!shown.contains(s), "a list never shows a secret");
    }
    let revoked = revoke_api_key(&config, "erp-2026-11")
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked_at_ms.is_some());
    assert_eq!(
        hello_code(&gw, "erp-writer", &key).await.err(),
        Some(ErrorCode::Unauthorized.code())
    );
    let (_, welcome) = Connection::connect(&ws_url(&gw), "erp-writer", &key2)
        .await
        .unwrap();
    assert_eq!(welcome.last_applied_mutation, 2);
    assert!(revoke_api_key(&config, "nobody").await.unwrap().is_none());
    drop(erp);
    gw.shutdown().await;
    db.cleanup().await;
}
