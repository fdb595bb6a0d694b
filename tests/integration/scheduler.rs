//! The scheduler (leader lease, set-based enqueues, clean-ups) and Graph change notifications
//! (the handshake, clientState checks, coalescing, lifecycle events, subscriptions in graph-sim).

use std::process::Stdio;
use std::time::Duration;

use graph_sim::{GraphSim, InboundMail, LifecycleEvent};
use graphdesk_tests::{
    QueueReads, TestApp, TestDb, TestRole, bind_api, spawn_app, spawn_app_with_sim, workspace_bin,
};
use jobs::ids::{AccountId, TenantId};
use jobs::kinds::{RefreshToken, SyncMailbox, ValidateAccount};
use jobs::queue::JobKind;
use jobs::scheduler::{Scheduler, SchedulerSettings, TickReport};
use jobs::webhooks::WebhookSettings;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};

const TICK: Duration = Duration::from_millis(100);

fn settings() -> SchedulerSettings {
    SchedulerSettings::with_tick(TICK)
}

async fn add_account(pool: &PgPool, tenant: TenantId, email: &str, status: &str) -> AccountId {
    let id = AccountId::new();
    sqlx::query(
        "INSERT INTO helpdesk_email_accounts (id, tenant_id, email_address, status)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(id.as_uuid())
    .bind(tenant.as_uuid())
    .bind(email)
    .bind(status)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn exec(pool: &PgPool, sql: &'static str, account: AccountId) {
    sqlx::query(sql)
        .bind(account.as_uuid())
        .execute(pool)
        .await
        .unwrap();
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[derive(sqlx::FromRow, Debug)]
struct JobRow {
    queue: String,
    tenant_id: Option<uuid::Uuid>,
    email_account_id: Option<uuid::Uuid>,
    payload: serde_json::Value,
    coalesce_key: Option<String>,
    max_attempts: i32,
}

async fn jobs_of(pool: &PgPool, queue: &str) -> Vec<JobRow> {
    sqlx::query_as(
        "SELECT queue, tenant_id, email_account_id, payload, coalesce_key, max_attempts
         FROM queue_jobs_all WHERE queue = $1 ORDER BY id",
    )
    .bind(queue)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The SQL-built row decodes into `J`, re-encodes to exactly the same JSON, and carries the
/// coalesce key, tenant, account and attempt budget the Rust enqueue path would give it.
fn decode<J: JobKind + PartialEq + std::fmt::Debug>(row: &JobRow) -> J {
    assert_eq!(row.queue, J::QUEUE);
    let job: J = serde_json::from_value(row.payload.clone()).expect("payload decodes");
    assert_eq!(
        serde_json::to_value(&job).unwrap(),
        row.payload,
        "exact serde form"
    );
    assert_eq!(row.coalesce_key, job.coalesce_key());
    assert_eq!(row.tenant_id, job.tenant().map(|t| t.as_uuid()));
    assert_eq!(row.email_account_id, job.account().map(|a| a.as_uuid()));
    assert_eq!(row.max_attempts, J::MAX_ATTEMPTS);
    job
}

#[tokio::test]
async fn one_tick_enqueues_what_is_due_with_payloads_the_workers_decode() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let tenant = db.create_tenant("Contoso").await;
    // Due: never synced, two folders, token expiring in a minute.
    let due = add_account(pool, tenant, "due@contoso.example", "active").await;
    exec(
        pool,
        "UPDATE helpdesk_email_accounts SET sync_folders = ARRAY['inbox', 'archive'],
                token_expires_at = now() + interval '1 minute', refresh_token_enc = '\\x00'
         WHERE id = $1",
        due,
    )
    .await;
    // Not due: synced 10 s ago with a 60 s interval; token good for an hour.
    let fresh = add_account(pool, tenant, "fresh@contoso.example", "active").await;
    exec(
        pool,
        "UPDATE helpdesk_email_accounts SET last_sync_started_at = now() - interval '10 seconds',
                token_expires_at = now() + interval '1 hour', refresh_token_enc = '\\x00'
         WHERE id = $1",
        fresh,
    )
    .await;
    // Due by a custom interval: 30 s, last started 45 s ago.
    let custom = add_account(pool, tenant, "custom@contoso.example", "active").await;
    exec(
        pool,
        "UPDATE helpdesk_email_accounts SET sync_interval_seconds = 30,
                last_sync_started_at = now() - interval '45 seconds'
         WHERE id = $1",
        custom,
    )
    .await;
    // In error and never validated: validate, but neither sync nor refresh.
    let failing = add_account(pool, tenant, "failing@contoso.example", "error").await;
    exec(
        pool,
        "UPDATE helpdesk_email_accounts SET token_expires_at = now(), refresh_token_enc = '\\x00'
         WHERE id = $1",
        failing,
    )
    .await;
    // In error but validated 5 minutes ago: not yet.
    let recent = add_account(pool, tenant, "recent@contoso.example", "error").await;
    exec(
        pool,
        "UPDATE helpdesk_email_accounts SET validated_at = now() - interval '5 minutes' WHERE id = $1",
        recent,
    )
    .await;
    // Needs reauth: nothing at all.
    add_account(pool, tenant, "gone@contoso.example", "needs_reauth").await;

    let scheduler = Scheduler::new(pool.clone(), None, settings(), "replica-a");
    let report = scheduler.run_tick().await.unwrap();
    assert!(report.leader());
    assert_eq!(
        (report.syncs, report.refreshes, report.validations),
        (3, 1, 1)
    );

    let mut syncs: Vec<SyncMailbox> = jobs_of(pool, SyncMailbox::QUEUE)
        .await
        .iter()
        .map(decode::<SyncMailbox>)
        .collect();
    syncs.sort_by(|a, b| (a.account, &a.folder).cmp(&(b.account, &b.folder)));
    let mut expected = vec![
        SyncMailbox {
            tenant,
            account: due,
            folder: "archive".into(),
        },
        SyncMailbox {
            tenant,
            account: due,
            folder: "inbox".into(),
        },
        SyncMailbox {
            tenant,
            account: custom,
            folder: "inbox".into(),
        },
    ];
    expected.sort_by(|a, b| (a.account, &a.folder).cmp(&(b.account, &b.folder)));
    assert_eq!(syncs, expected);
    let refreshes: Vec<RefreshToken> = jobs_of(pool, RefreshToken::QUEUE)
        .await
        .iter()
        .map(decode::<RefreshToken>)
        .collect();
    assert_eq!(
        refreshes,
        vec![RefreshToken {
            tenant,
            account: due,
            force: false
        }]
    );
    let validations: Vec<ValidateAccount> = jobs_of(pool, ValidateAccount::QUEUE)
        .await
        .iter()
        .map(decode::<ValidateAccount>)
        .collect();
    assert_eq!(
        validations,
        vec![ValidateAccount {
            tenant,
            account: failing
        }]
    );

    // The next tick finds every job still pending: coalesced, nothing new.
    let again = scheduler.run_tick().await.unwrap();
    assert_eq!((again.syncs, again.refreshes, again.validations), (0, 0, 0));
    // Once the jobs ran, the syncs and the refresh are due again (the fake handlers did not
    // stamp the account), but a validation that left no trace is not repeated for 15 minutes.
    sqlx::query("UPDATE queue_jobs SET status = 'done', finished_at = now()")
        .execute(pool)
        .await
        .unwrap();
    let later = scheduler.run_tick().await.unwrap();
    assert_eq!((later.syncs, later.refreshes, later.validations), (3, 1, 0));
}

/// The check for a recent ValidateAccount of a failing account reads the partial index of
/// that queue's jobs (20261130000010), not the queue: since the (tenant, status, queue) index
/// went, nothing else leads to an account's jobs, and a busy queue's other jobs must not be
/// walked on every tick.
#[tokio::test]
async fn the_recent_validation_check_reads_its_own_index_not_the_queue() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let tenant = db.create_tenant("Contoso").await;
    let failing = add_account(pool, tenant, "failing@contoso.example", "error").await;
    sqlx::query(
        "INSERT INTO queue_jobs (queue, tenant_id, email_account_id, payload, max_attempts)
         SELECT 'graphdesk.probe', $1, $2, '{}', 5 FROM generate_series(1, 20000)",
    )
    .bind(tenant.as_uuid())
    .bind(failing.as_uuid())
    .execute(pool)
    .await
    .unwrap();
    let validated = |minutes_ago: i32| async move {
        sqlx::query(
            "INSERT INTO queue_jobs (queue, tenant_id, email_account_id, payload, max_attempts,
                                     status, finished_at, created_at)
             VALUES ($1, $2, $3, '{}', 5, 'done', now(), now() - make_interval(mins => $4))",
        )
        .bind(ValidateAccount::QUEUE)
        .bind(tenant.as_uuid())
        .bind(failing.as_uuid())
        .bind(minutes_ago)
        .execute(pool)
        .await
        .unwrap();
    };
    validated(40).await;
    for (analyzed, recent, expected) in [(false, false, 1), (false, true, 0), (true, true, 0)] {
        if recent {
            validated(1).await;
        }
        if analyzed {
            sqlx::query("ANALYZE queue_jobs")
                .execute(pool)
                .await
                .unwrap();
        }
        let mut tx = pool.begin().await.unwrap();
        // The plan a long-lived connection settles on after five runs, which cannot use a
        // partial index whose predicate a parameter would have to match.
        sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
            .execute(&mut *tx)
            .await
            .unwrap();
        let before = QueueReads::now(&mut tx).await;
        let created =
            jobs::scheduler::sql::enqueue_due_validations(&mut tx, chrono::TimeDelta::minutes(15))
                .await
                .unwrap();
        let read = QueueReads::now(&mut tx).await.since(&before);
        tx.rollback().await.unwrap();
        let case = format!("analyzed: {analyzed}, validated a minute ago: {recent}");
        assert_eq!(created, expected, "{case}");
        assert_eq!(
            read.scans("queue_jobs"),
            0,
            "{case}: scanned queue_jobs sequentially"
        );
        assert!(
            read.scans("queue_jobs_validation_idx") > 0,
            "{case}: did not use queue_jobs_validation_idx"
        );
    }
}

#[tokio::test]
async fn two_replicas_never_lead_at_once_and_never_double_enqueue() {
    let db = TestDb::new().await;
    let tenant = db.create_tenant("Contoso").await;
    for i in 0..20 {
        let a = add_account(
            &db.pool,
            tenant,
            &format!("box{i}@contoso.example"),
            "active",
        )
        .await;
        exec(
            &db.pool,
            "UPDATE helpdesk_email_accounts SET sync_folders = ARRAY['inbox', 'archive'],
                    token_expires_at = now(), refresh_token_enc = '\\x00'
             WHERE id = $1",
            a,
        )
        .await;
    }
    // A leads first, then stalls, so both must lead. Started together, B sometimes won the
    // first tick, led throughout (it never stalls), and A never led: B now waits for A's
    // first tick.
    let a_ticked = std::sync::Arc::new(tokio::sync::Notify::new());
    let replica = |name: &'static str| {
        let url = db.url.clone();
        let a_ticked = a_ticked.clone();
        async move {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(&url)
                .await
                .unwrap();
            let scheduler = Scheduler::new(pool, None, settings(), name);
            let mut reports: Vec<TickReport> = Vec::new();
            if name == "replica-b" {
                a_ticked.notified().await;
            }
            for i in 0..30 {
                reports.push(scheduler.run_tick().await.unwrap());
                if name == "replica-a" && i == 0 {
                    a_ticked.notify_one();
                }
                tokio::time::sleep(TICK).await;
                if name == "replica-a" && i == 10 {
                    // A stall longer than the lease (a GC pause, a lost network): B must
                    // take over, and A must notice it is no longer leading.
                    tokio::time::sleep(TICK * 8).await;
                }
            }
            (name, reports)
        }
    };
    // Meanwhile "workers" finish jobs, so the leader keeps finding work to enqueue.
    let pool = db.pool.clone();
    let stop = tokio_util_stop();
    let worker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut max_pending_per_key = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let worst: Option<i64> = sqlx::query_scalar(
                    "SELECT max(n) FROM (SELECT count(*) AS n FROM queue_jobs_all
                     WHERE status = 'pending' GROUP BY queue, coalesce_key) per_key",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                max_pending_per_key = max_pending_per_key.max(worst.unwrap_or(0));
                sqlx::query(
                    "UPDATE queue_jobs SET status = 'done', finished_at = now()
                     WHERE id IN (SELECT id FROM queue_jobs_all WHERE status = 'pending'
                                  ORDER BY random() LIMIT 15)",
                )
                .execute(&pool)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(70)).await;
            }
            max_pending_per_key
        })
    };
    let handles = [
        tokio::spawn(replica("replica-a")),
        tokio::spawn(replica("replica-b")),
    ];
    let mut leads = Vec::new();
    let mut enqueued_by = std::collections::HashMap::new();
    for h in handles {
        let (name, reports) = h.await.unwrap();
        for r in &reports {
            if let Some(lease) = r.lease {
                leads.push((name, lease));
                *enqueued_by.entry(name).or_insert(0u64) += r.syncs + r.refreshes;
            } else {
                assert_eq!(
                    (r.syncs, r.refreshes, r.validations),
                    (0, 0, 0),
                    "{name}: a follower enqueued"
                );
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_pending_per_key = worker.await.unwrap();
    assert!(
        max_pending_per_key <= 1,
        "a coalesce key had {max_pending_per_key} pending jobs"
    );

    // Leadership intervals never overlap: a replica only ever took the lease after the other's
    // last renewal had expired.
    assert!(
        leads.len() >= 25,
        "someone led nearly every tick: {}",
        leads.len()
    );
    for name in ["replica-a", "replica-b"] {
        assert!(leads.iter().any(|(n, _)| *n == name), "{name} never led");
    }
    for (a_name, a) in &leads {
        for (b_name, b) in &leads {
            if a_name != b_name && a.renewed_at < b.renewed_at {
                assert!(
                    b.renewed_at > a.expires_at,
                    "{b_name} took the lease at {} while {a_name} held it until {}",
                    b.renewed_at,
                    a.expires_at
                );
            }
        }
    }
    assert!(
        enqueued_by.values().sum::<u64>() > 40,
        "the leader kept enqueuing: {enqueued_by:?}"
    );
    let duplicates = count(
        &db.pool,
        "SELECT count(*) FROM (SELECT 1 FROM queue_jobs_all WHERE status = 'pending'
         GROUP BY queue, coalesce_key HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(duplicates, 0);
}

fn tokio_util_stop() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

#[tokio::test]
async fn a_stopped_leader_hands_over_and_a_dead_one_is_replaced_after_its_lease() {
    let db = TestDb::new().await;
    // A lease far longer than the default three ticks: B's first tick must come before A's
    // lease runs out even when a loaded CI machine stalls the test for a few hundred ms.
    let lease = Duration::from_secs(2);
    let settings = SchedulerSettings {
        lease,
        ..settings()
    };
    let a = Scheduler::new(db.pool.clone(), None, settings.clone(), "replica-a");
    let b = Scheduler::new(db.pool.clone(), None, settings, "replica-b");
    let a_lease = a.run_tick().await.unwrap().lease.expect("A leads");
    assert!(!b.run_tick().await.unwrap().leader());

    // A crashes (stops ticking without a word): B waits out A's lease.
    let started = tokio::time::Instant::now();
    let b_lease = loop {
        if let Some(lease) = b.run_tick().await.unwrap().lease {
            break lease;
        }
        assert!(
            started.elapsed() < lease + Duration::from_secs(8),
            "B never took over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Judged on the database's clock, so a slow machine cannot blur it.
    assert!(
        b_lease.acquired_at > a_lease.expires_at,
        "B took over at {} before A's lease ran out at {}",
        b_lease.acquired_at,
        a_lease.expires_at
    );
    assert!(a_lease.expires_at - a_lease.renewed_at >= chrono::TimeDelta::seconds(2));
    assert!(!a.run_tick().await.unwrap().leader(), "A lost the lease");

    // B shuts down cleanly: A takes over at its very next tick.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(b.clone().run(async {
        let _ = rx.await;
    }));
    tokio::time::sleep(TICK * 2).await;
    assert!(!a.run_tick().await.unwrap().leader());
    tx.send(()).unwrap();
    running.await.unwrap();
    assert!(
        a.run_tick().await.unwrap().leader(),
        "the released lease is free at once"
    );
}

#[tokio::test]
async fn clean_up_removes_exactly_what_is_due() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let short = db.create_tenant("Short retention").await;
    sqlx::query("UPDATE tenants SET audit_retention_days = 30 WHERE id = $1")
        .bind(short.as_uuid())
        .execute(pool)
        .await
        .unwrap();
    let default = db.create_tenant("Default retention").await;

    for (tenant, hours, marker) in [
        (short, 25, "state-old"),
        (short, 23, "state-new"),
        (default, 48, "state-older"),
    ] {
        sqlx::query(
            "INSERT INTO oauth_states (state_hash, tenant_id, user_subject, code_verifier_enc,
                                       created_at, expires_at)
             VALUES ($1, $2, 'u', '\\x00', now() - make_interval(hours => $3),
                     now() - make_interval(hours => $3) + interval '15 minutes')",
        )
        .bind(marker)
        .bind(tenant.as_uuid())
        .bind(hours)
        .execute(pool)
        .await
        .unwrap();
    }
    for (tenant, days, marker) in [
        (Some(short), 31, "short-old"),
        (Some(short), 29, "short-new"),
        (Some(default), 91, "default-old"),
        (Some(default), 89, "default-new"),
        (None, 91, "system-old"),
        (None, 89, "system-new"),
    ] {
        sqlx::query(
            "INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id, created_at)
             VALUES ($1, 'test', 'seeded', 'test', $2, now() - make_interval(days => $3))",
        )
        .bind(tenant.map(|t| t.as_uuid()))
        .bind(marker)
        .bind(days)
        .execute(pool)
        .await
        .unwrap();
    }
    for (status, finished_days, marker) in [
        ("done", Some(8), "done-old"),
        ("done", Some(6), "done-new"),
        ("dead", Some(8), "dead-old"),
        ("cancelled", Some(9), "cancelled-old"),
        ("pending", None, "pending-ancient"),
    ] {
        sqlx::query(
            "INSERT INTO queue_jobs (queue, payload, status, max_attempts, idempotency_key,
                                     created_at, finished_at)
             VALUES ('graphdesk.probe', '{}', $1, 3, $2, now() - interval '30 days',
                     now() - make_interval(days => $3))",
        )
        .bind(status)
        .bind(marker)
        .bind(finished_days)
        .execute(pool)
        .await
        .unwrap();
    }
    // A job whose worker died: its lease ran out a minute ago.
    sqlx::query(
        "INSERT INTO queue_jobs (queue, payload, status, attempts, max_attempts, idempotency_key,
                                 locked_by, lease_expires_at)
         VALUES ('graphdesk.probe', '{}', 'running', 1, 3, 'orphan', 'dead-worker',
                 now() - interval '1 minute')",
    )
    .execute(pool)
    .await
    .unwrap();

    let scheduler = Scheduler::new(pool.clone(), None, settings(), "replica-a");
    let report = scheduler.run_tick().await.unwrap();
    assert_eq!(report.cleanup.oauth_states, 2);
    assert_eq!(report.cleanup.audit_rows, 3);
    assert_eq!(report.cleanup.finished_jobs, 3);
    assert_eq!(report.cleanup.reaped_jobs, 1);

    let states: Vec<String> = sqlx::query_scalar("SELECT state_hash FROM oauth_states")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(states, vec!["state-new"]);
    let audit: Vec<String> =
        sqlx::query_scalar("SELECT entity_id FROM audit_log ORDER BY entity_id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(audit, vec!["default-new", "short-new", "system-new"]);
    let jobs: Vec<(String, String)> = sqlx::query_as(
        "SELECT idempotency_key, status FROM queue_jobs_all ORDER BY idempotency_key",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        jobs,
        vec![
            ("done-new".to_string(), "done".to_string()),
            ("orphan".to_string(), "pending".to_string()),
            ("pending-ancient".to_string(), "pending".to_string()),
        ]
    );
    // Nothing else is due: a second tick removes nothing.
    let again = scheduler.run_tick().await.unwrap();
    assert_eq!(again.cleanup, jobs::scheduler::Cleanup::default());
}

fn encode(token: &str) -> String {
    url::form_urlencoded::byte_serialize(token.as_bytes()).collect()
}

#[tokio::test]
async fn the_validation_handshake_echoes_the_decoded_token_before_anything_else() {
    let app = spawn_app().await;
    let token = "Validation: Testing client application reachability for subscription Request-Id: 8e1d+a/b=c&d";
    for path in ["/graph/notifications", "/graph/lifecycle"] {
        // As Graph sends it: form-encoded (spaces as '+'), an empty text/plain body.
        let resp = app
            .client
            .post(app.url(&format!("{path}?validationToken={}", encode(token))))
            .header("content-type", "text/plain; charset=utf-8")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/plain"), "{ct}");
        assert_eq!(resp.text().await.unwrap(), token);
        // Percent-encoded spaces, no Content-Type and a body that is not JSON: still the echo.
        let percent = token
            .replace(' ', "%20")
            .replace('+', "%2B")
            .replace('&', "%26")
            .replace('/', "%2F")
            .replace('=', "%3D");
        let resp = app
            .client
            .post(app.url(&format!("{path}?validationToken={percent}")))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.text().await.unwrap(), token);
    }
    // Without a token the body must be a notification collection.
    let resp = app
        .client
        .post(app.url("/graph/notifications"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

/// An active mailbox with a subscription whose clientState is `secret`.
async fn subscribed_account(
    pool: &PgPool,
    subscription: &str,
    secret: &str,
) -> (TenantId, AccountId) {
    let tenant = TenantId::new();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'Contoso')")
        .bind(tenant.as_uuid())
        .execute(pool)
        .await
        .unwrap();
    let account = add_account(pool, tenant, "helpdesk@contoso.example", "active").await;
    sqlx::query(
        "INSERT INTO graph_subscriptions (subscription_id, tenant_id, email_account_id, folder,
                                          resource, client_state_hash, expires_at)
         VALUES ($1, $2, $3, 'inbox', 'me/mailFolders(''Inbox'')/messages',
                 sha256(convert_to($4, 'UTF8')), now() + interval '2 days')",
    )
    .bind(subscription)
    .bind(tenant.as_uuid())
    .bind(account.as_uuid())
    .bind(secret)
    .execute(pool)
    .await
    .unwrap();
    (tenant, account)
}

fn notification(subscription: &str, client_state: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "id": null,
        "subscriptionId": subscription,
        "subscriptionExpirationDateTime": "2030-01-01T00:00:00.0000000+00:00",
        "changeType": "created",
        "resource": "Users/u1/Messages/m1",
        "clientState": client_state,
        "tenantId": "t1",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": "Users/u1/Messages/m1", "id": "m1"}
    })
}

async fn post_notifications(app: &TestApp, path: &str, items: Vec<serde_json::Value>) -> u16 {
    app.client
        .post(app.url(path))
        .json(&serde_json::json!({ "value": items }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_notification_with_a_wrong_client_state_is_discarded_and_enqueues_nothing() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let (tenant, account) = subscribed_account(pool, "sub-1", "the-right-secret").await;
    let syncs = "SELECT count(*) FROM queue_jobs_all";

    for items in [
        vec![notification("sub-1", Some("the-wrong-secret"))],
        vec![notification("sub-1", Some("the-right-secret "))],
        vec![notification("sub-1", None)],
        // The right secret under another subscription's id proves nothing either.
        vec![notification("sub-unknown", Some("the-right-secret"))],
    ] {
        assert_eq!(
            post_notifications(&app, "/graph/notifications", items).await,
            202
        );
    }
    // Forged lifecycle events neither enqueue nor touch the subscription.
    let mut forged = notification("sub-1", Some("nope"));
    forged["lifecycleEvent"] = "subscriptionRemoved".into();
    assert_eq!(
        post_notifications(&app, "/graph/lifecycle", vec![forged]).await,
        202
    );
    assert_eq!(count(pool, syncs).await, 0);
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM graph_subscriptions WHERE removed_at IS NOT NULL"
        )
        .await,
        0
    );

    // The right secret wakes the mailbox's inbox sync.
    let items = vec![notification("sub-1", Some("the-right-secret"))];
    assert_eq!(
        post_notifications(&app, "/graph/notifications", items).await,
        202
    );
    let jobs = jobs_of(pool, SyncMailbox::QUEUE).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        decode::<SyncMailbox>(&jobs[0]),
        SyncMailbox {
            tenant,
            account,
            folder: "inbox".into()
        }
    );
}

#[tokio::test]
async fn a_hundred_notifications_for_one_mailbox_make_at_most_two_syncs() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    subscribed_account(pool, "sub-1", "s3cret").await;
    let posts = (0..20).map(|_| {
        let items = (0..5)
            .map(|_| notification("sub-1", Some("s3cret")))
            .collect();
        post_notifications(&app, "/graph/notifications", items)
    });
    let statuses = futures::future::join_all(posts).await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    let created = count(
        pool,
        "SELECT count(*) FROM queue_jobs_all WHERE queue = 'graphdesk.sync_mailbox'",
    )
    .await;
    assert!((1..=2).contains(&created), "{created} sync jobs");
}

/// Connects `upn` (already a graph-sim user) to `tenant` through the real OAuth flow.
async fn connect_mailbox(app: &TestApp, tenant: TenantId, upn: &str) {
    let admin = app.token(tenant, TestRole::Admin);
    let start: serde_json::Value = app
        .client
        .get(app.url(&format!("/api/v1/oauth/connect?login_hint={upn}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let resp = app
        .client
        .get(start["authorize_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let callback = resp.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(
        app.client.get(&callback).send().await.unwrap().status(),
        200
    );
}

/// A graph-sim whose change notifications reach the in-process api, with one mailbox
/// connected through the real OAuth flow.
struct World {
    app: TestApp,
    sim: GraphSim,
    tenant: TenantId,
    account: AccountId,
    webhooks: WebhookSettings,
}

async fn world() -> World {
    let (app, sim, base) = spawn_app_with_sim().await;
    let tenant = app.db.create_tenant("Contoso").await;
    let t = sim.create_tenant("contoso.example", "Contoso");
    sim.create_user(&t, "helpdesk@contoso.example", "Help Desk");
    connect_mailbox(&app, tenant, "helpdesk@contoso.example").await;
    // Not due for a periodic sync for an hour: every sync these tests see was asked for by a
    // notification, a lifecycle event or a new subscription.
    let id: uuid::Uuid = sqlx::query_scalar(
        "UPDATE helpdesk_email_accounts
         SET last_sync_started_at = now(), sync_interval_seconds = 3600
         RETURNING id",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    World {
        webhooks: WebhookSettings::new(&base).unwrap(),
        app,
        sim,
        tenant,
        account: AccountId::from_uuid(id),
    }
}

impl World {
    fn scheduler(&self, name: &str) -> Scheduler {
        let settings = SchedulerSettings {
            webhooks: Some(self.webhooks.clone()),
            ..SchedulerSettings::with_tick(Duration::from_millis(200))
        };
        let services = self.app.endpoints.services(&self.app.db.pool);
        Scheduler::new(self.app.db.pool.clone(), Some(services), settings, name)
    }

    async fn finish_all_jobs(&self) {
        sqlx::query(
            "UPDATE queue_jobs SET status = 'done', finished_at = now() WHERE status = 'pending'",
        )
        .execute(&self.app.db.pool)
        .await
        .unwrap();
    }

    async fn pending_inbox_syncs(&self) -> Vec<SyncMailbox> {
        sqlx::query_as::<_, JobRow>(
            "SELECT queue, tenant_id, email_account_id, payload, coalesce_key, max_attempts
             FROM queue_jobs_all WHERE queue = $1 AND status = 'pending'",
        )
        .bind(SyncMailbox::QUEUE)
        .fetch_all(&self.app.db.pool)
        .await
        .unwrap()
        .iter()
        .map(decode::<SyncMailbox>)
        .collect()
    }

    async fn wait_for_pending_sync(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let expected = SyncMailbox {
            tenant: self.tenant,
            account: self.account,
            folder: "inbox".into(),
        };
        loop {
            if self.pending_inbox_syncs().await == vec![expected.clone()] {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no inbox sync was enqueued"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until graph-sim holds exactly one subscription other than `not`.
    async fn wait_for_subscription(&self, not: Option<&str>) -> graph_sim::SimSubscription {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let subs = self.sim.subscriptions();
            if subs.len() == 1 && Some(subs[0].id.as_str()) != not {
                let stored: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM graph_subscriptions WHERE subscription_id = $1",
                )
                .bind(&subs[0].id)
                .fetch_one(&self.app.db.pool)
                .await
                .unwrap();
                if stored == 1 {
                    return subs[0].clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no subscription appeared: {subs:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A `worker scheduler` process against the test database. Killed on drop.
async fn spawn_scheduler_process(w: &World, tick_secs: &str) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(workspace_bin("worker"));
    cmd.arg("scheduler")
        .env("DATABASE_URL", &w.app.db.url)
        .env("SCHEDULER_TICK_SECS", tick_secs)
        .env("PUBLIC_BASE_URL", w.app.address.clone())
        .env_remove("GRAPH_WEBHOOKS_ENABLED")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true);
    for (k, v) in w.app.endpoints.env() {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn worker scheduler");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("scheduler ") && line.ends_with(" running") {
                return;
            }
        }
        panic!("the scheduler exited before it was ready");
    })
    .await
    .expect("scheduler ready within 60 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

#[tokio::test]
async fn the_scheduler_process_subscribes_a_connected_inbox_and_new_mail_wakes_a_sync() {
    let w = world().await;
    let _scheduler = spawn_scheduler_process(&w, "0.2").await;
    let sub = w.wait_for_subscription(None).await;
    assert_eq!(sub.change_type, "created");
    assert_eq!(sub.resource, "me/mailFolders('Inbox')/messages");
    assert_eq!(
        sub.notification_url,
        format!("{}/graph/notifications", w.app.address)
    );
    assert_eq!(
        sub.lifecycle_notification_url.as_deref(),
        Some(format!("{}/graph/lifecycle", w.app.address).as_str())
    );
    let lifetime = sub.expiration - chrono::Utc::now();
    assert!(
        lifetime > chrono::TimeDelta::minutes(4100) && lifetime <= chrono::TimeDelta::minutes(4230),
        "{lifetime}"
    );
    // Only the hash of the random clientState is stored.
    let client_state = sub.client_state.clone().expect("a clientState");
    assert!(client_state.len() >= 32 && client_state.len() <= 128);
    let (hash_matches, stored_plain): (bool, bool) = sqlx::query_as(
        "SELECT client_state_hash = sha256(convert_to($2, 'UTF8')),
                position(convert_to($2, 'UTF8') IN client_state_hash) > 0
         FROM graph_subscriptions WHERE subscription_id = $1",
    )
    .bind(&sub.id)
    .bind(&client_state)
    .fetch_one(&w.app.db.pool)
    .await
    .unwrap();
    assert!(hash_matches && !stored_plain);

    // New mail: graph-sim notifies the api, which wakes the inbox sync.
    w.finish_all_jobs().await;
    w.sim.deliver(
        "helpdesk@contoso.example",
        InboundMail::new("customer@fabrikam.example", "Printer on fire"),
    );
    w.wait_for_pending_sync(Duration::from_secs(10)).await;
    // The simulator records a delivery's status once it has read the response, which can be
    // after the webhook's enqueue is visible: wait for it rather than read it once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let delivered = loop {
        let delivered = w
            .sim
            .notifications()
            .into_iter()
            .filter(|n| n.subscription_id == sub.id && n.lifecycle_event.is_none())
            .collect::<Vec<_>>();
        if delivered.iter().any(|n| n.status == Some(202)) || std::time::Instant::now() > deadline {
            break delivered;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        delivered.iter().any(|n| n.status == Some(202)),
        "{delivered:?}"
    );
    // Ticks go on; the subscription is neither duplicated nor replaced.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(w.sim.subscriptions().len(), 1);
    assert_eq!(w.sim.subscriptions()[0].id, sub.id);
}

#[tokio::test]
async fn lifecycle_events_recreate_renew_and_resync() {
    let w = world().await;
    let scheduler = w.scheduler("replica-a");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(scheduler.run(async {
        let _ = stopped.await;
    }));
    let first = w.wait_for_subscription(None).await;

    // subscriptionRemoved: Graph dropped it. A delta sync is queued and a new one is created.
    w.finish_all_jobs().await;
    assert!(
        w.sim
            .fire_lifecycle_event(&first.id, LifecycleEvent::SubscriptionRemoved)
    );
    let second = w.wait_for_subscription(Some(&first.id)).await;
    w.wait_for_pending_sync(Duration::from_secs(10)).await;
    assert_eq!(
        count(&w.app.db.pool, "SELECT count(*) FROM graph_subscriptions").await,
        1,
        "the removed subscription's row is gone"
    );

    // reauthorizationRequired: renewed with a PATCH, not replaced.
    let patches = || {
        w.sim
            .request_log()
            .iter()
            .filter(|e| e.method == "PATCH" && e.path.ends_with(&second.id) && e.status == 200)
            .count()
    };
    assert_eq!(patches(), 0);
    assert!(
        w.sim
            .fire_lifecycle_event(&second.id, LifecycleEvent::ReauthorizationRequired)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let renewed: bool = sqlx::query_scalar(
            "SELECT renewed_at IS NOT NULL AND reauthorize_requested_at IS NULL
             FROM graph_subscriptions WHERE subscription_id = $1",
        )
        .bind(&second.id)
        .fetch_one(&w.app.db.pool)
        .await
        .unwrap();
        if renewed {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never renewed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(patches(), 1);
    assert_eq!(w.sim.subscriptions()[0].id, second.id);

    // A subscription close to expiry is renewed by the periodic pass.
    sqlx::query(
        "UPDATE graph_subscriptions SET expires_at = now() + interval '1 hour', renewed_at = NULL",
    )
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while patches() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never renewed before expiry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - now())::float8 / 60 FROM graph_subscriptions",
    )
    .fetch_one(&w.app.db.pool)
    .await
    .unwrap();
    assert!(left > 4100.0, "expires in {left} minutes");

    // missed: Graph lost notifications; a delta sync catches up.
    w.finish_all_jobs().await;
    assert!(
        w.sim
            .fire_lifecycle_event(&second.id, LifecycleEvent::Missed)
    );
    w.wait_for_pending_sync(Duration::from_secs(10)).await;

    stop.send(()).unwrap();
    running.await.unwrap();
}

/// Graph deletes a subscription once its expirationDateTime passes; renewing it then answers
/// 404. The maintenance pass must not stop there: it drops the row, creates a new subscription
/// and queues the catch-up sync for mail that arrived while nobody was subscribed.
#[tokio::test]
async fn a_subscription_that_expired_in_graph_is_recreated_with_a_catch_up_sync() {
    let w = world().await;
    assert!(w.sim.subscriptions().is_empty());
    let services = w.app.endpoints.services(&w.app.db.pool);
    let graph = jobs::accounts::graph_client(&services, w.tenant, w.account);
    // A subscription two minutes from its end, as if renewals had been failing for days; our
    // row still thinks it is alive.
    let old = graph
        .create_subscription(&jobs::graph::NewSubscription {
            change_type: "created".into(),
            notification_url: w.webhooks.notification_url(),
            lifecycle_notification_url: Some(w.webhooks.lifecycle_url()),
            resource: jobs::webhooks::INBOX_RESOURCE.into(),
            expiration_date_time: chrono::Utc::now() + chrono::TimeDelta::minutes(2),
            client_state: "old-state".into(),
        })
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO graph_subscriptions (subscription_id, tenant_id, email_account_id, folder,
                                          resource, client_state_hash, expires_at)
         VALUES ($1, $2, $3, 'inbox', 'me/mailFolders(''Inbox'')/messages',
                 sha256(convert_to('old-state', 'UTF8')), $4)",
    )
    .bind(&old.id)
    .bind(w.tenant.as_uuid())
    .bind(w.account.as_uuid())
    .bind(old.expiration_date_time)
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    assert_eq!(w.sim.subscriptions().len(), 1);

    // Graph's clock passes the expiry: Graph has deleted it.
    w.sim.advance_clock(Duration::from_secs(3 * 60));
    assert!(w.sim.subscriptions().is_empty());
    w.finish_all_jobs().await;

    let report = w
        .scheduler("replica-a")
        .maintain_subscriptions()
        .await
        .unwrap();
    assert_eq!(
        (report.renewed, report.created, report.failed),
        (0, 1, 0),
        "{report:?}"
    );
    let renewals: Vec<u16> = w
        .sim
        .request_log()
        .iter()
        .filter(|e| e.method == "PATCH" && e.path.ends_with(&format!("/subscriptions/{}", old.id)))
        .map(|e| e.status)
        .collect();
    assert_eq!(renewals, [404], "the renewal found it gone");
    let new = w.wait_for_subscription(Some(&old.id)).await;
    assert!(new.expiration > chrono::Utc::now() + chrono::TimeDelta::minutes(4100));
    assert_eq!(
        count(&w.app.db.pool, "SELECT count(*) FROM graph_subscriptions").await,
        1,
        "the expired subscription's row is gone"
    );
    w.wait_for_pending_sync(Duration::from_secs(5)).await;
}

/// Mailboxes whose subscription cannot be created (no expiry, so they sort first) and are
/// backing off must not fill the pass's batch: another mailbox's subscription is still made.
#[tokio::test]
async fn accounts_backing_off_leave_the_subscription_batch_to_the_others() {
    let w = world().await;
    let t = w.sim.create_tenant("fabrikam.example", "Fabrikam");
    for upn in ["sales@fabrikam.example", "billing@fabrikam.example"] {
        w.sim.create_user(&t, upn, upn);
        connect_mailbox(&w.app, w.tenant, upn).await;
    }
    let accounts: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, email_address FROM helpdesk_email_accounts ORDER BY id")
            .fetch_all(&w.app.db.pool)
            .await
            .unwrap();
    assert_eq!(accounts.len(), 3);
    // The pass takes mailboxes without a subscription in id order: the first two always fail.
    for (_, upn) in &accounts[..2] {
        w.sim.set_fault(
            graph_sim::FaultRule::new(graph_sim::FaultKind::SubscriptionValidationTimeout)
                .mailbox(upn.as_str()),
        );
    }
    let settings = SchedulerSettings {
        webhooks: Some(w.webhooks.clone()),
        subscription_batch: 2,
        // A backoff (four ticks) far longer than the test.
        ..SchedulerSettings::with_tick(Duration::from_secs(30))
    };
    let scheduler = Scheduler::new(
        w.app.db.pool.clone(),
        Some(w.app.endpoints.services(&w.app.db.pool)),
        settings,
        "replica-a",
    );
    let first = scheduler.maintain_subscriptions().await.unwrap();
    assert_eq!((first.created, first.failed), (0, 2), "{first:?}");

    let second = scheduler.maintain_subscriptions().await.unwrap();
    assert_eq!(
        (second.created, second.failed, second.backing_off),
        (1, 0, 2),
        "{second:?}"
    );
    let subscribed: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT email_account_id FROM graph_subscriptions")
            .fetch_all(&w.app.db.pool)
            .await
            .unwrap();
    assert_eq!(subscribed, [accounts[2].0]);
    let subs = w.sim.subscriptions();
    assert_eq!(subs.len(), 1, "{subs:?}");
    // Backing off means no Graph call for the failing two.
    let creations = w
        .sim
        .request_log()
        .iter()
        .filter(|e| e.method == "POST" && e.path.ends_with("/subscriptions"))
        .count();
    assert_eq!(creations, 3);
}

/// After the public base URL changes, the renewal of a subscription that still points at the
/// old host replaces it instead of extending it.
#[tokio::test]
async fn a_renewal_moves_a_subscription_to_a_new_public_base_url() {
    let w = world().await;
    let created = w
        .scheduler("replica-a")
        .maintain_subscriptions()
        .await
        .unwrap();
    assert_eq!(created.created, 1, "{created:?}");
    let old = w.wait_for_subscription(None).await;
    assert_eq!(old.notification_url, w.webhooks.notification_url());

    // The api now answers at another address, serving the same database.
    let (acceptor, moved_base) = bind_api().await;
    let state = api::AppState::new(
        w.app.endpoints.services(&w.app.db.pool),
        w.app.jwt.clone(),
        api::Limits::default(),
    );
    let moved_api = tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor)
            .run(api::build_app(state))
            .await;
    });
    let moved = WebhookSettings::new(&moved_base).unwrap();
    assert_ne!(moved.notification_url(), w.webhooks.notification_url());

    sqlx::query("UPDATE graph_subscriptions SET expires_at = now() + interval '1 hour'")
        .execute(&w.app.db.pool)
        .await
        .unwrap();
    w.finish_all_jobs().await;
    let settings = SchedulerSettings {
        webhooks: Some(moved.clone()),
        ..SchedulerSettings::with_tick(Duration::from_millis(200))
    };
    let report = Scheduler::new(
        w.app.db.pool.clone(),
        Some(w.app.endpoints.services(&w.app.db.pool)),
        settings,
        "replica-b",
    )
    .maintain_subscriptions()
    .await
    .unwrap();
    assert_eq!((report.created, report.failed), (1, 0), "{report:?}");

    let subs = w.sim.subscriptions();
    assert_eq!(subs.len(), 1, "the old subscription is gone: {subs:?}");
    let new = &subs[0];
    assert_ne!(new.id, old.id);
    assert_eq!(new.notification_url, moved.notification_url());
    assert_eq!(
        new.lifecycle_notification_url.as_deref(),
        Some(moved.lifecycle_url().as_str())
    );
    let rows: Vec<String> = sqlx::query_scalar("SELECT subscription_id FROM graph_subscriptions")
        .fetch_all(&w.app.db.pool)
        .await
        .unwrap();
    assert_eq!(rows, [new.id.as_str()]);
    // Nothing was announced while the subscription was replaced: a delta sync catches up.
    w.wait_for_pending_sync(Duration::from_secs(5)).await;
    moved_api.abort();
}
