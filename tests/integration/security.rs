//! Security: JWT verification, roles × tenants, Row Level Security enforced by PostgreSQL,
//! safe errors for bad input, and no secret in any log line of a full run.

use std::time::Duration;

use graphdesk_tests::{
    CLIENT_SECRET, Endpoints, JWT_SECRET, TestApp, TestDb, TestRole, WorkerOptions, free_port,
    spawn_api_process, spawn_app, spawn_sim, spawn_worker, test_keyring,
};
use jobs::ids::{AccountId, TenantId};
use jobs::vault::{AssociatedData, Column};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::ExposeSecret;
use serde_json::json;

fn claims(tenant: TenantId, role: &str, exp_offset: i64) -> serde_json::Value {
    json!({
        "sub": "mallory", "tenant_id": tenant, "role": role,
        "exp": chrono::Utc::now().timestamp() + exp_offset,
        "iss": "graphdesk", "aud": "graphdesk-api",
    })
}

fn hs256(secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn status_of(app: &TestApp, token: &str) -> u16 {
    app.client
        .get(app.url("/api/v1/tickets"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn bad_tokens_are_rejected_and_good_ones_accepted() {
    let app = spawn_app().await;
    let tenant = app.db.create_tenant("t").await;
    assert_eq!(
        status_of(&app, &app.token(tenant, TestRole::Agent)).await,
        200
    );
    assert_eq!(
        status_of(&app, &hs256(JWT_SECRET, &claims(tenant, "agent", -3600))).await,
        401,
        "expired"
    );
    assert_eq!(
        status_of(
            &app,
            &hs256(
                "another-secret-another-secret-another-secret",
                &claims(tenant, "agent", 3600)
            )
        )
        .await,
        401,
        "forged"
    );
    let mut wrong_aud = claims(tenant, "agent", 3600);
    wrong_aud["aud"] = json!("someone-else");
    assert_eq!(
        status_of(&app, &hs256(JWT_SECRET, &wrong_aud)).await,
        401,
        "audience"
    );
    let mut wrong_iss = claims(tenant, "agent", 3600);
    wrong_iss["iss"] = json!("evil");
    assert_eq!(
        status_of(&app, &hs256(JWT_SECRET, &wrong_iss)).await,
        401,
        "issuer"
    );
    let mut early = claims(tenant, "agent", 3600);
    early["nbf"] = json!(chrono::Utc::now().timestamp() + 600);
    assert_eq!(
        status_of(&app, &hs256(JWT_SECRET, &early)).await,
        401,
        "not yet valid"
    );
    let mut bad_role = claims(tenant, "agent", 3600);
    bad_role["role"] = json!("root");
    assert_eq!(
        status_of(&app, &hs256(JWT_SECRET, &bad_role)).await,
        401,
        "unknown role"
    );
    // alg=none: header {"alg":"none"}, no signature.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims(tenant, "ops", 3600).to_string())
    );
    let resp = app
        .client
        .get(app.url("/api/v1/tickets"))
        .bearer_auth(&none)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "alg=none");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["request_id"].is_string() && !body["message"].as_str().unwrap().contains(JWT_SECRET)
    );
}

#[tokio::test]
async fn rs256_tokens_from_an_identity_provider_are_accepted_with_the_configured_key() {
    let dir = std::env::temp_dir().join(format!("gd-rsa-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key.pem");
    let public = dir.join("pub.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs")
        .success()
        && std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success();
    assert!(ok, "openssl made a key pair");
    let config =
        api::auth::JwtConfig::new(JWT_SECRET.to_string().into(), "graphdesk", "graphdesk-api")
            .with_rsa_public_key(&std::fs::read(&public).unwrap())
            .unwrap();
    let tenant = TenantId::new();
    let signed = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(tenant, "admin", 3600),
        &EncodingKey::from_rsa_pem(&std::fs::read(&key).unwrap()).unwrap(),
    )
    .unwrap();
    let principal = config.verify(&signed).expect("RS256 accepted");
    assert_eq!(principal.tenant, tenant);
    // Without the public key configured, the same token is refused.
    let hs_only =
        api::auth::JwtConfig::new(JWT_SECRET.to_string().into(), "graphdesk", "graphdesk-api");
    assert!(hs_only.verify(&signed).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// Seeds one account and one ticket for a tenant, directly in the database.
async fn seed(db: &TestDb, tenant: TenantId, tag: &str) -> (AccountId, i64) {
    let account = AccountId::new();
    sqlx::query("INSERT INTO helpdesk_email_accounts (id, tenant_id, email_address, status) VALUES ($1, $2, $3, 'active')")
        .bind(account.as_uuid())
        .bind(tenant.as_uuid())
        .bind(format!("{tag}@example.com"))
        .execute(&db.pool)
        .await
        .unwrap();
    let ticket: i64 = sqlx::query_scalar(
        "INSERT INTO helpdesk_tickets (tenant_id, email_account_id, subject, normalized_subject, customer_email)
         VALUES ($1, $2, $3, $3, 'c@example.com') RETURNING id",
    )
    .bind(tenant.as_uuid())
    .bind(account.as_uuid())
    .bind(format!("{tag} subject"))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO helpdesk_messages (id, tenant_id, email_account_id, ticket_id, direction, microsoft_message_id, thread_rule)
         VALUES ($1, $2, $3, $4, 'inbound', $5, 'new_ticket')",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(tenant.as_uuid())
    .bind(account.as_uuid())
    .bind(ticket)
    .bind(format!("AAMk-{tag}"))
    .execute(&db.pool)
    .await
    .unwrap();
    (account, ticket)
}

#[tokio::test]
async fn row_level_security_hides_other_tenants_rows_from_the_app_role() {
    let db = TestDb::new().await;
    let a = db.create_tenant("A").await;
    let b = db.create_tenant("B").await;
    seed(&db, a, "a").await;
    seed(&db, b, "b").await;
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET ROLE graphdesk_app")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (bypass, owns): (bool, i64) = sqlx::query_as(
        "SELECT r.rolbypassrls, (SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tableowner = current_user)
         FROM pg_roles r WHERE r.rolname = current_user",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert!(!bypass, "the app role cannot bypass RLS");
    assert_eq!(owns, 0, "the app role owns no table");
    // No tenant set: nothing at all, even with no WHERE clause.
    for table in [
        "helpdesk_tickets",
        "helpdesk_messages",
        "helpdesk_email_accounts",
        "tenants",
    ] {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        assert_eq!(n, 0, "{table} without a tenant");
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    sqlx::query("SELECT set_config('app.tenant_id', $1, true)")
        .bind(a.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    let subjects: Vec<String> = sqlx::query_scalar("SELECT subject FROM helpdesk_tickets")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(subjects, vec!["a subject"]);
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_messages")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(messages, 1);
    // Writing into another tenant is refused by the policy's WITH CHECK.
    let err = sqlx::query("UPDATE helpdesk_tickets SET tenant_id = $1")
        .bind(b.as_uuid())
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");
    tx.rollback().await.unwrap();
    // The system role is the explicit cross-tenant path.
    sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
    sqlx::query("SET ROLE graphdesk_system")
        .execute(&mut *conn)
        .await
        .unwrap();
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_tickets")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(all, 2);
    sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
}

#[tokio::test]
async fn every_endpoint_answers_by_role_and_tenant() {
    let app = spawn_app().await;
    let own = app.db.create_tenant("own").await;
    let other = app.db.create_tenant("other").await;
    let (own_account, own_ticket) = seed(&app.db, own, "own").await;
    let (other_account, other_ticket) = seed(&app.db, other, "other").await;
    let job: i64 = sqlx::query_scalar("INSERT INTO queue_jobs (queue, tenant_id, payload, max_attempts, status) VALUES ('graphdesk.probe', $1, '{}', 1, 'dead') RETURNING id")
        .bind(own.as_uuid())
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let other_job: i64 = sqlx::query_scalar("INSERT INTO queue_jobs (queue, tenant_id, payload, max_attempts, status) VALUES ('graphdesk.probe', $1, '{}', 1, 'dead') RETURNING id")
        .bind(other.as_uuid())
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    // (method, path, body) → expected status for agent, admin, ops — all with `own` tenant.
    let cases: Vec<(&str, String, Option<serde_json::Value>, [u16; 3])> = vec![
        ("GET", "/api/v1/tickets".into(), None, [200, 200, 200]),
        (
            "GET",
            format!("/api/v1/tickets/{own_ticket}"),
            None,
            [200, 200, 200],
        ),
        (
            "GET",
            format!("/api/v1/tickets/{other_ticket}"),
            None,
            [404, 404, 404],
        ),
        (
            "GET",
            format!("/api/v1/accounts/{own_account}"),
            None,
            [200, 200, 200],
        ),
        (
            "GET",
            format!("/api/v1/accounts/{other_account}"),
            None,
            [404, 404, 404],
        ),
        (
            "POST",
            format!("/api/v1/accounts/{own_account}/sync"),
            Some(json!({})),
            [403, 202, 202],
        ),
        (
            "POST",
            format!("/api/v1/accounts/{other_account}/sync"),
            Some(json!({})),
            [403, 404, 404],
        ),
        (
            "POST",
            format!("/api/v1/accounts/{own_account}/validate"),
            None,
            [403, 202, 202],
        ),
        // README: admins see their tenant's jobs, ops every tenant's; agents none.
        ("GET", format!("/api/v1/jobs/{job}"), None, [403, 200, 200]),
        (
            "GET",
            format!("/api/v1/jobs/{other_job}"),
            None,
            [403, 404, 200],
        ),
        (
            "POST",
            "/api/v1/ops/probe".into(),
            Some(json!({})),
            [403, 403, 202],
        ),
        ("GET", "/api/v1/oauth/connect".into(), None, [403, 200, 200]),
    ];
    for (i, role) in [TestRole::Agent, TestRole::Admin, TestRole::Ops]
        .into_iter()
        .enumerate()
    {
        let token = app.token(own, role);
        for (method, path, body, expected) in &cases {
            let mut req = app
                .client
                .request(method.parse().unwrap(), app.url(path))
                .bearer_auth(&token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(
                resp.status().as_u16(),
                expected[i],
                "{role:?} {method} {path}"
            );
        }
    }
    // Nothing of the other tenant changed hands: its account got no job.
    let foreign: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all WHERE email_account_id = $1")
            .bind(other_account.as_uuid())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(foreign, 0);
}

#[tokio::test]
async fn oversize_and_malformed_bodies_get_4xx_and_store_nothing() {
    let app = spawn_app().await;
    let tenant = app.db.create_tenant("t").await;
    let (_, ticket) = seed(&app.db, tenant, "t").await;
    let token = app.token(tenant, TestRole::Ops);
    let huge = "x".repeat(2 * 1024 * 1024);
    let resp = app
        .client
        .post(app.url(&format!("/api/v1/tickets/{ticket}/replies")))
        .bearer_auth(&token)
        .header("Idempotency-Key", "huge")
        .header("content-type", "application/json")
        .body(format!("{{\"body_html\":\"{huge}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "payload_too_large");
    for (body, key) in [
        ("[]", "k1"),
        ("{\"body_html\": [\"x\"]}", "k2"),
        ("{\"to\": \"x\"}", "k3"),
    ] {
        let resp = app
            .client
            .post(app.url(&format!("/api/v1/tickets/{ticket}/replies")))
            .bearer_auth(&token)
            .header("Idempotency-Key", key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let text = resp.text().await.unwrap();
        assert!(
            !text.contains("panicked") && !text.contains("sqlx"),
            "{text}"
        );
    }
    let bad_key = app
        .client
        .post(app.url(&format!("/api/v1/tickets/{ticket}/replies")))
        .bearer_auth(&token)
        .header("Idempotency-Key", "has spaces in it")
        .json(&json!({ "body_html": "<p>x</p>" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 400);
    let bad_page = app
        .client
        .get(app.url("/api/v1/tickets?limit=100000"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_page.status(), 422);
    let sends: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_outbound_sends")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!((sends, jobs), (0, 0));
}

#[tokio::test]
async fn no_secret_appears_in_any_log_of_a_full_run() {
    // The api and the worker run as real processes at debug level, logging to files.
    let db = TestDb::new().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let redirect = format!("{base}/oauth/callback");
    let sim = spawn_sim(&redirect, |_| {}).await;
    let endpoints = Endpoints::sim(&sim, &redirect);
    let dir = std::env::temp_dir().join(format!("gd-logs-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let api_log = dir.join("api.log");
    let worker_log = dir.join("worker.log");
    let api = spawn_api_process(&db, &endpoints, port, Some(&api_log)).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let jwt =
        api::auth::JwtConfig::new(JWT_SECRET.to_string().into(), "graphdesk", "graphdesk-api");
    let tenant = db.create_tenant("Secretive").await;
    let admin = jwt.mint(
        "admin-user",
        tenant,
        TestRole::Admin,
        chrono::Duration::hours(1),
    );
    let ops = jwt.mint(
        "ops-user",
        tenant,
        TestRole::Ops,
        chrono::Duration::hours(1),
    );
    let t = sim.create_tenant("secret.example", "Secret");
    sim.create_user(&t, "desk@secret.example", "Desk");
    sim.deliver(
        "desk@secret.example",
        graph_sim::InboundMail::new("cust@else.example", "Help")
            .message_id("<h@else.example>")
            .text("hi"),
    );

    let start: serde_json::Value = client
        .get(format!(
            "{}/api/v1/oauth/connect?login_hint=desk@secret.example",
            api.address
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let services = endpoints.services(&db.pool);
    let (hash, verifier_enc): (String, Vec<u8>) =
        sqlx::query_as("SELECT state_hash, code_verifier_enc FROM oauth_states")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let verifier = services
        .vault
        .decrypt(
            &AssociatedData::for_owner(tenant, format!("oauth_state:{hash}"), Column::CodeVerifier),
            &verifier_enc,
        )
        .unwrap();
    let redirect_resp = client
        .get(start["authorize_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let callback = redirect_resp.headers()["location"]
        .to_str()
        .unwrap()
        .to_string();
    let code = url::Url::parse(&callback)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    assert_eq!(client.get(&callback).send().await.unwrap().status(), 200);
    let (account, first_access, first_refresh) = decrypt_tokens(&db, &services, tenant).await;

    let worker = spawn_worker(
        &db,
        WorkerOptions {
            endpoints: endpoints.clone(),
            log_file: Some(worker_log.clone()),
            extra_env: vec![("RUST_LOG".into(), "debug".into())],
            ..WorkerOptions::default()
        },
    )
    .await;
    sqlx::query(
        "UPDATE helpdesk_email_accounts SET token_refreshed_at = now() - interval '1 hour'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    jobs::queue::Queue::new(db.pool.clone())
        .enqueue(
            &jobs::kinds::RefreshToken {
                tenant,
                account,
                force: true,
            },
            jobs::queue::EnqueueOptions::default(),
        )
        .await
        .unwrap();
    // Validation, the first sync and the refresh all run in the worker.
    wait_quiet(&db).await;
    let ticket: i64 = sqlx::query_scalar("SELECT id FROM helpdesk_tickets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let reply = client
        .post(format!("{}/api/v1/tickets/{ticket}/replies", api.address))
        .bearer_auth(&ops)
        .header("Idempotency-Key", "log-test")
        .json(&json!({ "body_html": "<p>Thanks</p>" }))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    wait_quiet(&db).await;
    let sent: String = sqlx::query_scalar("SELECT status FROM helpdesk_outbound_sends")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(sent, "confirmed");
    let (_, last_access, last_refresh) = decrypt_tokens(&db, &services, tenant).await;
    assert_ne!(
        first_refresh, last_refresh,
        "the refresh happened during the run"
    );
    drop(worker);
    drop(api);

    let mut logs = std::fs::read_to_string(&api_log).unwrap_or_default();
    logs.push_str(&std::fs::read_to_string(&worker_log).unwrap_or_default());
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        logs.contains("request finished"),
        "the api's logs were captured"
    );
    assert!(
        logs.contains("graphdesk.sync_mailbox"),
        "the worker's logs were captured"
    );
    let keyring = test_keyring();
    let secrets = [
        ("JWT secret", JWT_SECRET.to_string()),
        ("client secret", CLIENT_SECRET.to_string()),
        (
            "encryption key",
            keyring.split_once(':').unwrap().1.to_string(),
        ),
        ("admin JWT", admin),
        ("ops JWT", ops),
        ("authorization code", code),
        ("PKCE verifier", verifier.expose_secret().to_string()),
        ("first access token", first_access),
        ("first refresh token", first_refresh),
        ("last access token", last_access),
        ("last refresh token", last_refresh),
    ];
    for (name, secret) in secrets {
        assert!(secret.len() >= 8, "{name} is a real value");
        assert!(!logs.contains(&secret), "the {name} appears in the logs");
    }
}

/// Waits until no job is pending or running.
async fn wait_quiet(db: &TestDb) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM queue_jobs_all WHERE status IN ('pending', 'running')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if open == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn decrypt_tokens(
    db: &TestDb,
    services: &jobs::services::Services,
    tenant: TenantId,
) -> (AccountId, String, String) {
    let (id, access, refresh): (uuid::Uuid, Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT id, access_token_enc, refresh_token_enc FROM helpdesk_email_accounts",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let account = AccountId::from_uuid(id);
    let a = services
        .vault
        .decrypt(
            &AssociatedData::for_account(tenant, account, Column::AccessToken),
            &access,
        )
        .unwrap();
    let r = services
        .vault
        .decrypt(
            &AssociatedData::for_account(tenant, account, Column::RefreshToken),
            &refresh,
        )
        .unwrap();
    (
        account,
        a.expose_secret().to_string(),
        r.expose_secret().to_string(),
    )
}

#[tokio::test]
async fn hostile_webhook_payloads_are_discarded_without_a_server_error() {
    let app = spawn_app().await;
    for body in [
        json!({ "value": [{ "subscriptionId": "\u{1}\u{7f}", "clientState": "x", "tenantId": "t" }] }),
        json!({ "value": [{ "subscriptionId": "a".repeat(5000), "clientState": "x" }] }),
        json!({ "value": [{ "subscriptionId": "unknown", "clientState": "x", "changeType": "created" }] }),
    ] {
        for path in ["/graph/notifications", "/graph/lifecycle"] {
            let resp = app
                .client
                .post(app.url(path))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 202, "{path}");
        }
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0);
}

#[tokio::test]
async fn a_nul_character_anywhere_in_a_request_is_a_clear_400() {
    let app = spawn_app().await;
    let tenant = app.db.create_tenant("t").await;
    let (_, ticket) = seed(&app.db, tenant, "t").await;
    let token = app.token(tenant, TestRole::Ops);
    for path in ["/api/v1/jobs?error_contains=%00", "/api/v1/tickets?q=a%00b"] {
        let resp = app
            .client
            .get(app.url(path))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains("NUL"), "{body}");
    }
    let resp = app
        .client
        .post(app.url(&format!("/api/v1/tickets/{ticket}/replies")))
        .bearer_auth(&token)
        .header("Idempotency-Key", "nul")
        .json(&json!({ "body_html": "a\u{0}b" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = app
        .client
        .post(app.url("/graph/notifications"))
        .json(&json!({ "value": [{ "subscriptionId": "\u{0}", "clientState": "x" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let sends: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_outbound_sends")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(sends, 0);
}

/// A pool built from a role pool's connection options acts as the same role: the queue's claim
/// pool is built that way (with its own commit setting), and must not fall back to the login
/// user, which owns the tables and so is not subject to Row Level Security.
#[tokio::test]
async fn pools_derived_from_a_role_pool_keep_its_role() {
    let db = TestDb::new().await;
    let options = (*db.pool.connect_options()).clone();
    let system = jobs::db::lazy_pool_as(options, 1, Some("graphdesk_system".into()));
    let derived = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            (*system.connect_options())
                .clone()
                .options([("synchronous_commit", "off")]),
        )
        .await
        .unwrap();
    let (user, commit): (String, String) =
        sqlx::query_as("SELECT current_user::text, current_setting('synchronous_commit')")
            .fetch_one(&derived)
            .await
            .unwrap();
    assert_eq!(
        (user.as_str(), commit.as_str()),
        ("graphdesk_system", "off")
    );
}

/// A database outage is a 503 with Retry-After, not a 500: the request was fine and is worth
/// repeating. The api here reaches its database at a port nothing listens on (connection
/// refused until the pool's acquire timeout), then through a closed pool.
#[tokio::test]
async fn an_unreachable_database_answers_503_with_retry_after_and_a_request_id() {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

    let nowhere = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(free_port())
        .username("postgres")
        .database("graphdesk");
    // A short acquire timeout keeps the test quick; production waits 10 s.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(nowhere);
    let services =
        jobs::services::Services::new(pool.clone(), &Endpoints::unreachable().integration())
            .expect("services");
    let jwt = api::auth::JwtConfig::new(JWT_SECRET.into(), "graphdesk", "graphdesk-api");
    let state = api::AppState::new(services, jwt.clone(), api::Limits::default());
    let (acceptor, address) = graphdesk_tests::bind_api().await;
    let server = tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor)
            .run(api::build_app(state))
            .await;
    });
    let tenant = TenantId::new();
    let ops = jwt.mint(
        "ops-user",
        tenant,
        TestRole::Ops,
        chrono::Duration::hours(1),
    );
    let agent = jwt.mint("agent", tenant, TestRole::Agent, chrono::Duration::hours(1));
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let expect_503 = |resp: reqwest::Response| async move {
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "5");
        let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let body: serde_json::Value = resp.json().await.expect("a JSON error body");
        assert_eq!(body["code"], "database_unavailable", "{body}");
        assert_eq!(body["request_id"], request_id.as_str());
        let message = body["message"].as_str().unwrap();
        assert!(
            !message.contains("127.0.0.1") && !message.contains("refused"),
            "no internals in the message: {message}"
        );
    };
    // The queue's ops views (QueueError) and a tenant's tickets (a bare sqlx error).
    for (path, token) in [("/api/v1/jobs", &ops), ("/api/v1/tickets", &agent)] {
        let resp = client
            .get(format!("{address}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        expect_503(resp).await;
    }
    // The dashboard says the same in its own page.
    let resp = client
        .get(format!("{address}/dashboard/jobs"))
        .header("cookie", format!("gd_session={ops}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");

    // A pool that was closed (shutting down) is unavailable too.
    pool.close().await;
    let resp = client
        .get(format!("{address}/api/v1/jobs"))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap();
    expect_503(resp).await;
    server.abort();
}

/// GET /api/v1/jobs/{id} shows a job's arguments through the same redaction as the ops API
/// and the dashboard, to the admin of its tenant as to ops; an agent is refused with a reason.
#[tokio::test]
async fn a_jobs_secret_looking_arguments_are_redacted_on_the_job_endpoint() {
    let app = spawn_app().await;
    let tenant = app.db.create_tenant("t").await;
    let job: i64 = sqlx::query_scalar(
        "INSERT INTO queue_jobs (queue, tenant_id, payload, max_attempts, status)
         VALUES ('graphdesk.probe', $1, $2, 1, 'dead') RETURNING id",
    )
    .bind(tenant.as_uuid())
    .bind(json!({
        "marker": "visible-marker",
        "refresh_token": "s3cret-refresh",
        "nested": [{ "client_secret": "s3cret-client", "Password": "s3cret-password" }],
    }))
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    for role in [TestRole::Admin, TestRole::Ops] {
        let resp = app
            .client
            .get(app.url(&format!("/api/v1/jobs/{job}")))
            .bearer_auth(app.token(tenant, role))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{role:?}");
        let text = resp.text().await.unwrap();
        assert!(!text.contains("s3cret"), "{role:?} sees a secret: {text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            body["arguments"],
            json!({
                "marker": "visible-marker",
                "refresh_token": "[REDACTED]",
                "nested": [{ "client_secret": "[REDACTED]", "Password": "[REDACTED]" }],
            }),
            "{role:?}"
        );
    }
    let resp = app
        .client
        .get(app.url(&format!("/api/v1/jobs/{job}")))
        .bearer_auth(app.token(tenant, TestRole::Agent))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("admin and ops"),
        "{body}"
    );
}

/// The message of a failed statement, which must be a refused privilege.
fn permission_denied(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>, what: &str) {
    let err = result.expect_err(what);
    let db = err.as_database_error().expect("a database error");
    assert_eq!(db.code().as_deref(), Some("42501"), "{what}: {err}");
    assert!(
        err.to_string().contains("permission denied"),
        "{what}: {err}"
    );
}

/// audit_log is append-only for the application role; the system role may only delete (the
/// scheduler's retention clean-up, which still works when it runs as that role).
#[tokio::test]
async fn audit_rows_cannot_be_rewritten_or_erased_by_the_application() {
    let db = TestDb::new().await;
    let tenant = db.create_tenant("t").await;
    let options = (*db.pool.connect_options()).clone();
    let app = jobs::db::lazy_pool_as(options.clone(), 1, Some("graphdesk_app".into()));
    let system = jobs::db::lazy_pool_as(options, 1, Some("graphdesk_system".into()));
    // One row past its tenant's retention (90 days), one recent.
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id, created_at)
         VALUES ($1, 'u', 'x.old', 'x', 'old', now() - interval '100 days'),
                ($1, 'u', 'x.new', 'x', 'new', now())",
    )
    .bind(tenant.as_uuid())
    .execute(&db.pool)
    .await
    .unwrap();

    // The app role writes and reads its tenant's audit rows, and can do nothing else to them.
    let mut tx = jobs::db::tenant_tx(&app, tenant).await.unwrap();
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id)
         VALUES ($1, 'u', 'x.app', 'x', 'app')",
    )
    .bind(tenant.as_uuid())
    .execute(&mut *tx)
    .await
    .expect("the app role appends audit rows");
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, 3);
    tx.commit().await.unwrap();
    for (statement, what) in [
        ("UPDATE audit_log SET actor = 'someone else'", "app UPDATE"),
        ("DELETE FROM audit_log", "app DELETE"),
        ("TRUNCATE audit_log", "app TRUNCATE"),
    ] {
        let mut tx = jobs::db::tenant_tx(&app, tenant).await.unwrap();
        permission_denied(sqlx::query(statement).execute(&mut *tx).await, what);
    }

    // The system role appends too, and may not rewrite.
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity_type, entity_id) VALUES ('system', 'x.sys', 'x', 'sys')",
    )
    .execute(&system)
    .await
    .expect("the system role appends audit rows");
    permission_denied(
        sqlx::query("UPDATE audit_log SET details = '{\"rewritten\": true}'")
            .execute(&system)
            .await,
        "system UPDATE",
    );
    permission_denied(
        sqlx::query("TRUNCATE audit_log").execute(&system).await,
        "system TRUNCATE",
    );

    // The retention clean-up, as the scheduler runs it (its tick on the system role's pool).
    let scheduler = jobs::scheduler::Scheduler::new(
        system.clone(),
        None,
        jobs::scheduler::SchedulerSettings::with_tick(Duration::from_millis(100)),
        "replica-a",
    );
    let report = scheduler
        .run_tick()
        .await
        .expect("a tick as the system role");
    assert_eq!(report.cleanup.audit_rows, 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT entity_id FROM audit_log ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, vec!["new", "app", "sys"]);
    let actors: Vec<String> = sqlx::query_scalar("SELECT DISTINCT actor FROM audit_log ORDER BY 1")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(actors, vec!["system", "u"], "nothing was rewritten");
}

/// The application pool refuses to start as a role Row Level Security does not bind: a
/// superuser (here: DATABASE_APP_ROLE empty, so the login user), a BYPASSRLS role, an owner of
/// the tables. DATABASE_ALLOW_RLS_BYPASS lets it start anyway.
#[tokio::test]
async fn an_application_pool_that_would_bypass_row_level_security_is_refused() {
    use jobs::db::{DbError, DbRole, connect_role};

    let db = TestDb::new().await;
    let options = (*db.pool.connect_options()).clone();
    let current_user = |pool: sqlx::PgPool| async move {
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&pool)
            .await
            .unwrap();
        user
    };

    // The default role is fine.
    let pool = connect_role(
        options.clone(),
        1,
        DbRole::App,
        Some("graphdesk_app".into()),
        false,
    )
    .await
    .expect("the default app role is accepted");
    assert_eq!(current_user(pool).await, "graphdesk_app");

    let refused = |result: Result<sqlx::PgPool, DbError>, reason: &str| {
        let err = result.expect_err(reason);
        assert!(matches!(err, DbError::RlsBypassed { .. }), "{err:?}");
        let message = err.to_string();
        for part in ["DATABASE_APP_ROLE", reason, "DATABASE_ALLOW_RLS_BYPASS"] {
            assert!(message.contains(part), "`{part}` in: {message}");
        }
    };
    // No role: the login user, a superuser in the test cluster.
    refused(
        connect_role(options.clone(), 1, DbRole::App, None, false).await,
        "is a superuser",
    );

    // Roles are cluster-wide: unique names, dropped at the end.
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let bypass = format!("gd_bypass_{suffix}");
    let owner = format!("gd_owner_{suffix}");
    for sql in [
        format!("CREATE ROLE {bypass} NOLOGIN BYPASSRLS"),
        format!("CREATE ROLE {owner} NOLOGIN"),
        format!("ALTER TABLE helpdesk_tickets OWNER TO {owner}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    refused(
        connect_role(options.clone(), 1, DbRole::App, Some(bypass.clone()), false).await,
        "has BYPASSRLS",
    );
    refused(
        connect_role(options.clone(), 1, DbRole::App, Some(owner.clone()), false).await,
        "owns 1 table(s) with Row Level Security enabled (e.g. public.helpdesk_tickets)",
    );
    // FORCE ROW LEVEL SECURITY binds the owner too.
    sqlx::query("ALTER TABLE helpdesk_tickets FORCE ROW LEVEL SECURITY")
        .execute(&db.pool)
        .await
        .unwrap();
    let pool = connect_role(options.clone(), 1, DbRole::App, Some(owner.clone()), false)
        .await
        .expect("an owner bound by FORCE ROW LEVEL SECURITY is accepted");
    pool.close().await;

    // The escape hatch, for single-role development setups.
    let pool = connect_role(options.clone(), 1, DbRole::App, None, true)
        .await
        .expect("DATABASE_ALLOW_RLS_BYPASS lets it start");
    assert_ne!(current_user(pool).await, "graphdesk_app");
    // The system role is the explicit cross-tenant path and is not checked.
    connect_role(options, 1, DbRole::System, None, false)
        .await
        .expect("the system pool is not checked");

    let login: String = sqlx::query_scalar("SELECT session_user::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for sql in [
        format!("ALTER TABLE helpdesk_tickets OWNER TO {login}"),
        format!("DROP ROLE {owner}"),
        format!("DROP ROLE {bypass}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await
            .unwrap();
    }
}

/// The api and the worker do not start with DATABASE_APP_ROLE empty (the login user, which
/// owns the tables) and say why; DATABASE_ALLOW_RLS_BYPASS=1 lets them start.
#[tokio::test]
async fn the_processes_refuse_to_start_when_the_app_role_bypasses_row_level_security() {
    use std::process::Stdio;

    let db = TestDb::new().await;
    let command = |bin: &str, allow: Option<&str>| {
        let mut cmd = tokio::process::Command::new(graphdesk_tests::workspace_bin(bin));
        cmd.arg(if bin == "api" { "serve" } else { "run" })
            .env("DATABASE_URL", &db.url)
            .env("DATABASE_MAX_CONNECTIONS", "2")
            .env("DATABASE_APP_ROLE", "")
            .env_remove("DATABASE_SYSTEM_ROLE")
            .env_remove("DATABASE_ALLOW_RLS_BYPASS")
            .env("JWT_SECRET", JWT_SECRET)
            .env("BIND_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("RUST_LOG", "warn")
            .env("LOG_JSON", "false")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in Endpoints::unreachable().env() {
            cmd.env(k, v);
        }
        if let Some(allow) = allow {
            cmd.env("DATABASE_ALLOW_RLS_BYPASS", allow);
        }
        cmd
    };
    for bin in ["api", "worker"] {
        let out = tokio::time::timeout(Duration::from_secs(60), command(bin, None).output())
            .await
            .unwrap_or_else(|_| panic!("{bin} kept running with the app role bypassing RLS"))
            .unwrap();
        assert!(!out.status.success(), "{bin}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("DATABASE_APP_ROLE") && stderr.contains("is a superuser"),
            "{bin}: {stderr}"
        );

        // With the escape hatch it starts (and warns): still running after a moment.
        let mut child = command(bin, Some("1")).spawn().unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "{bin} starts with DATABASE_ALLOW_RLS_BYPASS=1"
        );
        child.kill().await.unwrap();
        let stderr = child.wait_with_output().await.unwrap().stderr;
        assert!(
            String::from_utf8_lossy(&stderr).contains("DATABASE_ALLOW_RLS_BYPASS is set"),
            "{bin} warns"
        );
    }
}
