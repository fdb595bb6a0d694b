//! Connecting mailboxes through the real OAuth flow against graph-sim, the encrypted token
//! store, single-flight refresh and revocation.

use std::time::Duration;

use graph_sim::GraphSim;
use graphdesk_tests::{TestApp, TestRole, WorkerOptions, spawn_app_with_sim, spawn_worker};
use jobs::accounts::tokens::{AccountTokenSource, RefreshMode, refresh_tokens};
use jobs::graph::AccessTokenSource;
use jobs::ids::{AccountId, TenantId};
use jobs::kinds::RefreshToken;
use jobs::queue::{EnqueueOptions, JobKind};
use jobs::vault::{AssociatedData, Column};
use secrecy::ExposeSecret;

struct World {
    app: TestApp,
    sim: GraphSim,
    tenant: TenantId,
    admin: String,
}

async fn world() -> World {
    let (app, sim, _) = spawn_app_with_sim().await;
    let tenant = app.db.create_tenant("Contoso").await;
    let admin = app.token(tenant, TestRole::Admin);
    let t = sim.create_tenant("contoso.example", "Contoso");
    sim.create_user(&t, "helpdesk@contoso.example", "Help Desk");
    World {
        app,
        sim,
        tenant,
        admin,
    }
}

impl World {
    /// Starts the connect flow and follows Microsoft's redirect to our callback, like a browser.
    async fn connect(&self, login_hint: &str) -> (reqwest::StatusCode, String, String) {
        self.connect_with(Some(login_hint)).await
    }

    /// [`World::connect`], with or without a `login_hint`.
    async fn connect_with(
        &self,
        login_hint: Option<&str>,
    ) -> (reqwest::StatusCode, String, String) {
        let path = match login_hint {
            Some(hint) => format!("/api/v1/oauth/connect?login_hint={hint}"),
            None => "/api/v1/oauth/connect".to_string(),
        };
        let start: serde_json::Value = self
            .app
            .client
            .get(self.app.url(&path))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let authorize = start["authorize_url"]
            .as_str()
            .expect("authorize url")
            .to_string();
        assert!(
            authorize.contains("code_challenge_method=S256"),
            "{authorize}"
        );
        self.sign_in(&authorize).await
    }

    /// Follows a Microsoft sign-in URL to our callback, like a browser.
    async fn sign_in(&self, authorize: &str) -> (reqwest::StatusCode, String, String) {
        let resp = self.app.client.get(authorize).send().await.unwrap();
        assert_eq!(resp.status(), 302, "graph-sim redirects back");
        let callback = resp.headers()["location"].to_str().unwrap().to_string();
        let page = self.app.client.get(&callback).send().await.unwrap();
        let status = page.status();
        (status, page.text().await.unwrap(), callback)
    }

    async fn account(&self) -> AccountId {
        let id: uuid::Uuid =
            sqlx::query_scalar("SELECT id FROM helpdesk_email_accounts WHERE tenant_id = $1")
                .bind(self.tenant.as_uuid())
                .fetch_one(&self.app.db.pool)
                .await
                .unwrap();
        AccountId::from_uuid(id)
    }

    fn services(&self) -> jobs::services::Services {
        self.app.endpoints.services(&self.app.db.pool)
    }
}

#[tokio::test]
async fn a_mailbox_connects_through_the_oauth_flow_and_its_tokens_are_encrypted() {
    let w = world().await;
    let (status, page, callback) = w.connect("helpdesk@contoso.example").await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("helpdesk@contoso.example is connected"),
        "{page}"
    );

    let account = w.account().await;
    let (status, access, refresh): (String, Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT status, access_token_enc, refresh_token_enc FROM helpdesk_email_accounts WHERE id = $1",
    )
    .bind(account.as_uuid())
    .fetch_one(&w.app.db.pool)
    .await
    .unwrap();
    assert_eq!(status, "active");
    let services = w.services();
    let plain = services
        .vault
        .decrypt(
            &AssociatedData::for_account(w.tenant, account, Column::AccessToken),
            &access,
        )
        .unwrap();
    let plain = plain.expose_secret();
    assert!(plain.len() > 10);
    assert!(
        !access
            .windows(plain.len())
            .any(|win| win == plain.as_bytes()),
        "the stored access token is not plaintext"
    );
    // A ciphertext is bound to its row and column.
    assert!(
        services
            .vault
            .decrypt(
                &AssociatedData::for_account(w.tenant, account, Column::RefreshToken),
                &access
            )
            .is_err()
    );
    assert!(
        services
            .vault
            .decrypt(
                &AssociatedData::for_account(w.tenant, AccountId::new(), Column::RefreshToken),
                &refresh
            )
            .is_err()
    );

    // The connection test and the first sync were queued with the account, and audited.
    let queues: Vec<String> = sqlx::query_scalar("SELECT queue FROM queue_jobs_all ORDER BY queue")
        .fetch_all(&w.app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        queues,
        vec!["graphdesk.sync_mailbox", "graphdesk.validate_account"]
    );
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'account.connected' AND entity_id = $1",
    )
    .bind(account.to_string())
    .fetch_one(&w.app.db.pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);

    // The same callback replayed is refused and changes nothing.
    let replay = w.app.client.get(&callback).send().await.unwrap();
    assert_eq!(replay.status(), 400);
    assert!(replay.text().await.unwrap().contains("already used"));
    assert_eq!(w.sim.stats().token_requests("authorization_code"), 1);
}

#[tokio::test]
async fn an_expired_state_or_a_denied_consent_connects_nothing() {
    let w = world().await;
    // Expired: the state row is aged before the browser comes back.
    let start: serde_json::Value = w
        .app
        .client
        .get(w.app.url("/api/v1/oauth/connect"))
        .bearer_auth(&w.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    sqlx::query("UPDATE oauth_states SET expires_at = now() - interval '1 minute'")
        .execute(&w.app.db.pool)
        .await
        .unwrap();
    w.sim.set_login_user("helpdesk@contoso.example");
    let resp = w
        .app
        .client
        .get(start["authorize_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let callback = resp.headers()["location"].to_str().unwrap().to_string();
    let page = w.app.client.get(&callback).send().await.unwrap();
    assert_eq!(page.status(), 400);
    assert!(page.text().await.unwrap().contains("expired"));

    // Denied consent.
    w.sim.set_auto_consent(false);
    let (status, page, _) = w.connect("helpdesk@contoso.example").await;
    assert_eq!(status, 400);
    assert!(page.contains("declined"), "{page}");

    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_email_accounts")
        .fetch_one(&w.app.db.pool)
        .await
        .unwrap();
    assert_eq!(accounts, 0, "nothing half-created");
    assert_eq!(
        w.sim.stats().token_requests("authorization_code"),
        0,
        "no code was redeemed"
    );
}

#[tokio::test]
async fn a_wrong_pkce_verifier_is_refused_by_the_identity_platform() {
    let w = world().await;
    let start: serde_json::Value = w
        .app
        .client
        .get(
            w.app
                .url("/api/v1/oauth/connect?login_hint=helpdesk@contoso.example"),
        )
        .bearer_auth(&w.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Swap the stored verifier for another one: the code's challenge no longer matches.
    let (hash,): (String,) = sqlx::query_as("SELECT state_hash FROM oauth_states")
        .fetch_one(&w.app.db.pool)
        .await
        .unwrap();
    let other = jobs::graph::Pkce::new_random();
    let enc = w.services().vault.encrypt(
        &AssociatedData::for_owner(
            w.tenant,
            format!("oauth_state:{hash}"),
            Column::CodeVerifier,
        ),
        other.verifier(),
    );
    sqlx::query("UPDATE oauth_states SET code_verifier_enc = $1")
        .bind(enc)
        .execute(&w.app.db.pool)
        .await
        .unwrap();
    let resp = w
        .app
        .client
        .get(start["authorize_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let callback = resp.headers()["location"].to_str().unwrap().to_string();
    let page = w.app.client.get(&callback).send().await.unwrap();
    assert_eq!(page.status(), 400);
    assert!(page.text().await.unwrap().contains("invalid_grant"));
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_email_accounts")
        .fetch_one(&w.app.db.pool)
        .await
        .unwrap();
    assert_eq!(accounts, 0);
}

#[tokio::test]
async fn concurrent_refreshes_from_two_connection_pools_make_one_token_request() {
    let w = world().await;
    let (status, _, _) = w.connect("helpdesk@contoso.example").await;
    assert_eq!(status, 200);
    let account = w.account().await;
    let initial_refresh = stored_refresh(&w, account).await;
    // Two pools stand for two processes: Postgres sees independent sessions either way.
    let second_pool = sqlx::PgPool::connect(&w.app.db.url).await.unwrap();
    let before = chrono::Utc::now();
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut services = w.services();
        if i % 2 == 1 {
            services.pool = second_pool.clone();
        }
        let tenant = w.tenant;
        calls.push(tokio::spawn(async move {
            refresh_tokens(
                &services.pool,
                &services.vault,
                &services.identity,
                &services.authority,
                tenant,
                account,
                RefreshMode::Force {
                    unless_refreshed_since: before,
                },
            )
            .await
            .map(|t| t.expose_secret().to_string())
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for c in calls {
        tokens.insert(c.await.unwrap().expect("refresh succeeds"));
    }
    assert_eq!(
        w.sim.stats().token_requests("refresh_token"),
        1,
        "single flight"
    );
    assert_eq!(tokens.len(), 1, "every caller got the one new token");

    // The rotated refresh token was persisted, and the next refresh uses and rotates it.
    let rotated = stored_refresh(&w, account).await;
    assert_ne!(rotated, initial_refresh);
    let services = w.services();
    refresh_tokens(
        &services.pool,
        &services.vault,
        &services.identity,
        &services.authority,
        w.tenant,
        account,
        RefreshMode::Force {
            unless_refreshed_since: chrono::Utc::now(),
        },
    )
    .await
    .unwrap();
    assert_ne!(stored_refresh(&w, account).await, rotated);
    assert_eq!(w.sim.stats().token_requests("refresh_token"), 2);
}

async fn stored_refresh(w: &World, account: AccountId) -> String {
    let enc: Vec<u8> =
        sqlx::query_scalar("SELECT refresh_token_enc FROM helpdesk_email_accounts WHERE id = $1")
            .bind(account.as_uuid())
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    w.services()
        .vault
        .decrypt(
            &AssociatedData::for_account(w.tenant, account, Column::RefreshToken),
            &enc,
        )
        .unwrap()
        .expose_secret()
        .to_string()
}

#[tokio::test]
async fn a_revoked_refresh_token_marks_the_account_needs_reauth_without_a_retry_storm() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    w.sim
        .revoke_refresh_tokens("helpdesk@contoso.example", 70008);
    // The tokens were issued an hour ago, so a forced refresh really goes to Microsoft.
    sqlx::query(
        "UPDATE helpdesk_email_accounts SET token_refreshed_at = now() - interval '1 hour'",
    )
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    let _worker = spawn_worker(
        &w.app.db,
        WorkerOptions {
            endpoints: w.app.endpoints.clone(),
            ..WorkerOptions::default()
        },
    )
    .await;
    let job = w.app.db.pool.clone();
    let queue = jobs::queue::Queue::new(job);
    let id = queue
        .enqueue(
            &RefreshToken {
                tenant: w.tenant,
                account,
                force: true,
            },
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    let ops = w.app.token(w.tenant, TestRole::Ops);
    let job = w
        .app
        .wait_for_job(&ops, id.get(), &["dead"], Duration::from_secs(30))
        .await;
    assert_eq!(job["attempts"], 1, "no retries: {job}");
    assert!(
        job["last_error"].as_str().unwrap().contains("reconnect"),
        "{job}"
    );
    let (status, reason): (String, Option<String>) =
        sqlx::query_as("SELECT status, status_reason FROM helpdesk_email_accounts WHERE id = $1")
            .bind(account.as_uuid())
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "needs_reauth");
    assert!(reason.unwrap().contains("70008"));
    // A later job does not go back to Microsoft: the account is known to need a reconnect.
    let again = queue
        .enqueue(
            &RefreshToken {
                tenant: w.tenant,
                account,
                force: true,
            },
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    w.app
        .wait_for_job(&ops, again.get(), &["dead"], Duration::from_secs(30))
        .await;
    assert_eq!(
        w.sim.stats().token_requests("refresh_token"),
        1,
        "one refused refresh, no storm"
    );
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'account.needs_reauth'")
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);
    assert_eq!(RefreshToken::QUEUE, "graphdesk.refresh_token");
}

impl World {
    async fn forced_refresh(&self, account: AccountId) -> Result<(), String> {
        let services = self.services();
        refresh_tokens(
            &services.pool,
            &services.vault,
            &services.identity,
            &services.authority,
            self.tenant,
            account,
            RefreshMode::Force {
                unless_refreshed_since: chrono::Utc::now(),
            },
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
    }

    async fn account_status(&self, account: AccountId) -> (String, String) {
        let (status, reason): (String, Option<String>) = sqlx::query_as(
            "SELECT status, status_reason FROM helpdesk_email_accounts WHERE id = $1",
        )
        .bind(account.as_uuid())
        .fetch_one(&self.app.db.pool)
        .await
        .unwrap();
        (status, reason.unwrap_or_default())
    }
}

/// An expired client secret (`invalid_client`) is our configuration, not the account's: it
/// must not be retried every scheduler tick for every account (graph-contract §1: do not
/// loop), and it must say what to fix.
#[tokio::test]
async fn a_refresh_refused_for_the_apps_credentials_takes_the_account_out_of_the_sweeps() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    let fault = w.sim.set_fault(
        graph_sim::FaultRule::new(graph_sim::FaultKind::InvalidClient).path("/oauth2/v2.0/token"),
    );
    let err = w.forced_refresh(account).await.unwrap_err();
    assert!(err.contains("invalid_client"), "{err}");
    let (status, reason) = w.account_status(account).await;
    assert_eq!(status, "error");
    assert!(reason.contains("OAUTH_CLIENT_SECRET"), "{reason}");
    // The refresh sweep would pick the account up now, were it still active.
    sqlx::query(
        "UPDATE helpdesk_email_accounts SET token_expires_at = now(), validated_at = now()
         WHERE id = $1",
    )
    .bind(account.as_uuid())
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM queue_jobs")
        .execute(&w.app.db.pool)
        .await
        .unwrap();
    let scheduler = jobs::scheduler::Scheduler::new(
        w.app.db.pool.clone(),
        None,
        jobs::scheduler::SchedulerSettings::with_tick(Duration::from_secs(1)),
        "replica-a",
    );
    let tick = scheduler.run_tick().await.unwrap();
    assert_eq!((tick.refreshes, tick.syncs), (0, 0));
    // Once the secret is fixed, a refresh that works puts the account back.
    w.sim.remove_fault(&fault);
    w.forced_refresh(account).await.unwrap();
    assert_eq!(
        w.account_status(account).await,
        ("active".into(), String::new())
    );
}

/// A connection test's finding (here a missing permission) is not fixed by new tokens: a
/// refresh must not report the account healthy again.
#[tokio::test]
async fn a_refresh_that_works_keeps_what_the_connection_test_found() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    sqlx::query(
        "UPDATE helpdesk_email_accounts
         SET status = 'error', status_reason = 'missing permissions: Mail.Send' WHERE id = $1",
    )
    .bind(account.as_uuid())
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    w.forced_refresh(account).await.unwrap();
    assert_eq!(
        w.account_status(account).await,
        ("error".into(), "missing permissions: Mail.Send".into())
    );
}

/// A connection test still running when an admin disconnects the account must not bring it
/// back as `error` (or `active`): the scheduler would keep queueing work for it.
#[tokio::test]
async fn a_connection_test_finishing_after_a_disconnect_leaves_the_account_disabled() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    w.sim.set_fault(
        graph_sim::FaultRule::new(graph_sim::FaultKind::Delay { millis: 1_500 })
            .path("/mailFolders/inbox"),
    );
    let (services, tenant) = (w.services(), w.tenant);
    let test = tokio::spawn(async move {
        jobs::accounts::validate::validate_account(&services, tenant, account).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = w
        .app
        .client
        .delete(w.app.url(&format!("/api/v1/accounts/{account}")))
        .bearer_auth(&w.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    test.await.unwrap().unwrap();
    assert_eq!(w.account_status(account).await.0, "disabled");
}

/// A connection test whose result cannot be stored (the database failed at that moment) is
/// retried like any outage; it used to be reported as a Graph decode error, which is
/// permanent, and the connect-time test died on its first try.
#[tokio::test]
async fn a_connection_test_that_cannot_store_its_result_is_retried() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_validation() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'storage unavailable'; END $$;
         CREATE TRIGGER refuse_validation BEFORE UPDATE OF validation ON helpdesk_email_accounts
         FOR EACH ROW EXECUTE FUNCTION refuse_validation();",
    )
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    let ctx = jobs::queue::runtime::JobContext {
        id: jobs::ids::JobId::new(1),
        attempt: 1,
        max_attempts: 5,
        tenant: Some(w.tenant),
        worker_id: "test".into(),
    };
    let result = jobs::handlers::validate_account(
        w.services(),
        jobs::kinds::ValidateAccount {
            tenant: w.tenant,
            account,
        },
        ctx,
    )
    .await;
    match result {
        Err(jobs::queue::JobError::Retryable { reason, .. }) => {
            assert!(reason.contains("storage unavailable"), "{reason}");
        }
        other => panic!("expected a retry, got {other:?}"),
    }
}

#[tokio::test]
async fn a_401_mid_call_refreshes_once_and_the_connection_test_passes() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    let services = w.services();
    let source = AccountTokenSource::new(services.clone(), w.tenant, account);
    let before = source
        .access_token()
        .await
        .unwrap()
        .expose_secret()
        .to_string();
    w.sim.expire_access_tokens("helpdesk@contoso.example");
    let report = jobs::accounts::validate::validate_account(&services, w.tenant, account)
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(report.can_send);
    assert_eq!(w.sim.stats().token_requests("refresh_token"), 1);
    let after = source
        .access_token()
        .await
        .unwrap()
        .expose_secret()
        .to_string();
    assert_ne!(before, after, "the refreshed token was stored");
    let validated: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT validation FROM helpdesk_email_accounts WHERE id = $1")
            .bind(account.as_uuid())
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    assert_eq!(validated.unwrap()["inbox"], true);
}

#[tokio::test]
async fn a_token_copied_into_another_row_does_not_decrypt() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    let other = AccountId::new();
    sqlx::query(
        "INSERT INTO helpdesk_email_accounts (id, tenant_id, email_address, status, access_token_enc,
            refresh_token_enc, token_expires_at)
         SELECT $1, tenant_id, 'copy@contoso.example', 'active', access_token_enc, refresh_token_enc,
                token_expires_at
         FROM helpdesk_email_accounts WHERE id = $2",
    )
    .bind(other.as_uuid())
    .bind(account.as_uuid())
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    let source = AccountTokenSource::new(w.services(), w.tenant, other);
    let err = source.access_token().await.unwrap_err();
    assert!(err.to_string().contains("token store"), "{err}");
}

#[tokio::test]
async fn an_admin_lists_folders_and_probes_shared_mailboxes() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    let t = w
        .sim
        .tenants()
        .into_iter()
        .find(|t| t.domain == "contoso.example")
        .unwrap();
    let team = w
        .sim
        .create_shared_mailbox(&t, "team@contoso.example", "Team");
    w.sim
        .grant_mailbox_access(&team, "helpdesk@contoso.example");
    w.sim
        .create_shared_mailbox(&t, "finance@contoso.example", "Finance");
    let resp = w
        .app
        .client
        .get(w.app.url(&format!(
            "/api/v1/accounts/{account}/mailboxes?shared=team@contoso.example,finance@contoso.example,nobody@contoso.example"
        )))
        .bearer_auth(&w.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let folders: Vec<&str> = body["folders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(folders.contains(&"Inbox"), "{folders:?}");
    let access: Vec<(&str, &str)> = body["shared"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["address"].as_str().unwrap(),
                s["access"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        access,
        vec![
            ("team@contoso.example", "accessible"),
            ("finance@contoso.example", "no_access"),
            ("nobody@contoso.example", "no_mailbox"),
        ]
    );
    // Agents may not, and a bad address is a clear 422.
    let agent = w.app.token(w.tenant, TestRole::Agent);
    let resp = w
        .app
        .client
        .get(w.app.url(&format!("/api/v1/accounts/{account}/mailboxes")))
        .bearer_auth(&agent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = w
        .app
        .client
        .get(w.app.url(&format!(
            "/api/v1/accounts/{account}/mailboxes?shared=not-an-address"
        )))
        .bearer_auth(&w.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
}

#[tokio::test]
async fn probing_tells_a_directory_user_without_a_cloud_mailbox_from_one_without_rights() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    let t = w
        .sim
        .tenants()
        .into_iter()
        .find(|t| t.domain == "contoso.example")
        .unwrap();
    // In the directory, but hosted on-premises: Graph answers MailboxNotEnabledForRESTAPI.
    let onprem = w
        .sim
        .create_user(&t, "onprem@contoso.example", "On Premises");
    w.sim.set_cloud_mailbox(&onprem, false);
    // Full access without SendAs: the probe only reads, so it can open the mailbox.
    let billing = w
        .sim
        .create_shared_mailbox(&t, "billing@contoso.example", "Billing");
    w.sim
        .grant_mailbox_access_without_send_as(&billing, "helpdesk@contoso.example");
    let resp = w
        .app
        .client
        .get(w.app.url(&format!(
            "/api/v1/accounts/{account}/mailboxes?shared=onprem@contoso.example,billing@contoso.example"
        )))
        .bearer_auth(&w.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let access: Vec<(&str, &str)> = body["shared"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["address"].as_str().unwrap(),
                s["access"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        access,
        vec![
            ("onprem@contoso.example", "no_mailbox"),
            ("billing@contoso.example", "accessible"),
        ]
    );
    let probes = w
        .sim
        .request_log()
        .into_iter()
        .filter(|e| e.path.contains("/mailFolders/inbox") && e.path.contains("onprem"))
        .map(|e| (e.status, e.error_code))
        .collect::<Vec<_>>();
    assert_eq!(
        probes,
        vec![(404, Some("MailboxNotEnabledForRESTAPI".to_string()))],
        "one probe, answered as Graph answers an address without a cloud mailbox"
    );
}

#[tokio::test]
async fn disconnecting_wipes_tokens_cancels_pending_jobs_and_is_audited() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    let resp = w
        .app
        .client
        .delete(w.app.url(&format!("/api/v1/accounts/{account}")))
        .bearer_auth(&w.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (status, access, refresh): (String, Option<Vec<u8>>, Option<Vec<u8>>) = sqlx::query_as(
        "SELECT status, access_token_enc, refresh_token_enc FROM helpdesk_email_accounts WHERE id = $1",
    )
    .bind(account.as_uuid())
    .fetch_one(&w.app.db.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), access, refresh), ("disabled", None, None));
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all WHERE status = 'pending'")
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        pending, 0,
        "the connect-time validation and sync were cancelled"
    );
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'account.disconnected'")
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);
    // Another tenant's admin cannot disconnect it (nor learn it exists).
    let stranger = w.app.token(TenantId::new(), TestRole::Admin);
    let resp = w
        .app
        .client
        .delete(w.app.url(&format!("/api/v1/accounts/{account}")))
        .bearer_auth(&stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn tokens_are_re_encrypted_under_a_new_key_and_the_old_key_can_then_leave() {
    let w = world().await;
    w.connect("helpdesk@contoso.example").await;
    let account = w.account().await;
    let before = AccountTokenSource::new(w.services(), w.tenant, account)
        .access_token()
        .await
        .unwrap()
        .expose_secret()
        .to_string();
    let old = graphdesk_tests::test_keyring();
    let new_key = format!("rotated:{}", jobs::vault::TokenVault::generate_key());
    let both = jobs::vault::TokenVault::from_keyring(&format!("{new_key},{old}")).unwrap();
    let mut progress = 0;
    let report = jobs::accounts::manage::reencrypt_all(&w.app.db.pool, &both, |_| progress += 1)
        .await
        .unwrap();
    assert_eq!((report.rows_checked, report.rows_reencrypted), (1, 1));
    assert!(progress >= 1, "progress was reported");
    // Only the new key is needed now.
    let only_new = jobs::vault::TokenVault::from_keyring(&new_key).unwrap();
    let enc: Vec<u8> =
        sqlx::query_scalar("SELECT access_token_enc FROM helpdesk_email_accounts WHERE id = $1")
            .bind(account.as_uuid())
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    let after = only_new
        .decrypt(
            &AssociatedData::for_account(w.tenant, account, Column::AccessToken),
            &enc,
        )
        .unwrap();
    assert_eq!(after.expose_secret(), before);
    let again = jobs::accounts::manage::reencrypt_all(&w.app.db.pool, &both, |_| {})
        .await
        .unwrap();
    assert_eq!(again.rows_reencrypted, 0, "nothing left under the old key");
}

/// A Microsoft user outside the mailbox a sign-in link is for.
fn stranger(w: &World) -> &'static str {
    let t = w.sim.create_tenant("y.example", "Y");
    w.sim.create_user(&t, "b@y.example", "B Stranger");
    "b@y.example"
}

async fn count(w: &World, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&w.app.db.pool)
        .await
        .unwrap()
}

/// `login_hint` only pre-fills Microsoft's sign-in: whoever finishes it may be someone else.
/// A connect started for helpdesk@ that b@ finishes connects nothing and spends the link.
#[tokio::test]
async fn a_connect_for_one_mailbox_refuses_a_sign_in_as_another() {
    let w = world().await;
    let b = stranger(&w);
    w.sim.sign_in_as(b);
    let (status, page, callback) = w.connect("helpdesk@contoso.example").await;
    assert_eq!(status, 400, "{page}");
    for says in [
        "This sign-in link was for helpdesk@contoso.example, but b@y.example signed in",
        "Nothing was connected",
        "sign in to Microsoft as helpdesk@contoso.example",
        "To connect b@y.example instead, start a new connection without an address",
    ] {
        assert!(page.contains(says), "{says:?} in {page}");
    }
    assert_eq!(
        w.sim.stats().token_requests("authorization_code"),
        1,
        "the code was redeemed: only /me tells who signed in"
    );

    // No account (so no tokens), no jobs, nothing audited as connected.
    assert_eq!(
        count(&w, "SELECT count(*) FROM helpdesk_email_accounts").await,
        0
    );
    assert_eq!(count(&w, "SELECT count(*) FROM queue_jobs_all").await, 0);
    assert_eq!(
        count(
            &w,
            "SELECT count(*) FROM audit_log WHERE action LIKE 'account.%'"
        )
        .await,
        0
    );

    // The link is spent: the same callback again is refused and redeems nothing.
    assert_eq!(
        count(
            &w,
            "SELECT count(*) FROM oauth_states WHERE consumed_at IS NULL"
        )
        .await,
        0
    );
    let replay = w.app.client.get(&callback).send().await.unwrap();
    assert_eq!(replay.status(), 400);
    assert!(replay.text().await.unwrap().contains("already used"));
    assert_eq!(w.sim.stats().token_requests("authorization_code"), 1);
    assert_eq!(
        count(&w, "SELECT count(*) FROM helpdesk_email_accounts").await,
        0
    );
}

/// A Reconnect link (the dashboard's, through `start_reconnect`) finished by another user
/// leaves the existing account exactly as it was and creates none.
#[tokio::test]
async fn a_reconnect_finished_by_another_user_leaves_the_account_unchanged() {
    let w = world().await;
    let (status, page, _) = w.connect("helpdesk@contoso.example").await;
    assert_eq!(status, 200, "{page}");
    let account = w.account().await;
    sqlx::query(
        "UPDATE helpdesk_email_accounts SET status = 'needs_reauth', status_reason = 'invalid_grant'",
    )
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    let row = |w: &World| {
        let pool = w.app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT row_to_json(a)::text FROM helpdesk_email_accounts a",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let before = row(&w).await;
    let jobs_before = count(&w, "SELECT count(*) FROM queue_jobs_all").await;
    let audit_before = count(&w, "SELECT count(*) FROM audit_log").await;

    let url = jobs::accounts::connect::start_reconnect(
        &w.services(),
        account,
        Some(w.tenant),
        "test-admin",
    )
    .await
    .unwrap()
    .expect("the account exists");
    assert!(
        url.query_pairs()
            .any(|(k, v)| k == "login_hint" && v == "helpdesk@contoso.example"),
        "{url}"
    );
    let b = stranger(&w);
    w.sim.sign_in_as(b);
    let (status, page, _) = w.sign_in(url.as_str()).await;
    assert_eq!(status, 400, "{page}");
    assert!(
        page.contains(
            "This sign-in link was for helpdesk@contoso.example, but b@y.example signed in"
        ),
        "{page}"
    );

    assert_eq!(
        row(&w).await,
        before,
        "the account is untouched, and no other appeared"
    );
    assert_eq!(
        count(&w, "SELECT count(*) FROM queue_jobs_all").await,
        jobs_before,
        "no jobs queued"
    );
    assert_eq!(
        count(&w, "SELECT count(*) FROM audit_log").await,
        audit_before,
        "no reconnect audited"
    );

    // The right person following a fresh Reconnect link does reconnect it.
    w.sim.clear_sign_in_as();
    let url = jobs::accounts::connect::start_reconnect(
        &w.services(),
        account,
        Some(w.tenant),
        "test-admin",
    )
    .await
    .unwrap()
    .unwrap();
    let (status, page, _) = w.sign_in(url.as_str()).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(w.account().await, account);
    let status: String = sqlx::query_scalar("SELECT status FROM helpdesk_email_accounts")
        .fetch_one(&w.app.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "active");
}

/// The expected mailbox is compared like every address: the case of the hint does not matter.
#[tokio::test]
async fn a_connect_for_a_mailbox_accepts_it_signed_in_under_another_case() {
    let w = world().await;
    w.sim.sign_in_as("helpdesk@contoso.example");
    let (status, page, _) = w.connect("HelpDesk@CONTOSO.Example").await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("helpdesk@contoso.example is connected"),
        "{page}"
    );
    assert_eq!(
        count(&w, "SELECT count(*) FROM helpdesk_email_accounts WHERE email_address = 'helpdesk@contoso.example'").await,
        1
    );
}

/// Without a hint the product flow is unchanged: an admin connects a mailbox by signing in as
/// it, whichever it is.
#[tokio::test]
async fn a_connect_without_a_hint_connects_whoever_signs_in() {
    let w = world().await;
    let b = stranger(&w);
    w.sim.sign_in_as(b);
    let (status, page, _) = w.connect_with(None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("b@y.example is connected"), "{page}");
    let email: String = sqlx::query_scalar("SELECT email_address FROM helpdesk_email_accounts")
        .fetch_one(&w.app.db.pool)
        .await
        .unwrap();
    assert_eq!(email, "b@y.example");
    assert_eq!(count(&w, "SELECT count(*) FROM queue_jobs_all").await, 2);
}
