//! The ops dashboard, the ops JSON API and /metrics: role rules, audit rows, CSRF, metrics
//! values, and the dashboard driven end to end in headless Chromium.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use fantoccini::{ClientBuilder, Locator};
use graphdesk_tests::{TestApp, TestRole, WorkerOptions, spawn_app, spawn_worker, wait_for_count};
use jobs::ids::TenantId;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const PROBE: &str = "graphdesk.probe";
const SYNC: &str = "graphdesk.sync_mailbox";

/// A queue_jobs row written directly, so a test can set up any state (dead, aged, finished
/// long ago) without waiting for a worker to get there.
struct JobRow {
    queue: &'static str,
    status: &'static str,
    tenant: Option<TenantId>,
    payload: Value,
    last_error: Option<&'static str>,
    errors: Value,
    run_at_ago_secs: i64,
    finished_ago_secs: Option<i64>,
}

impl Default for JobRow {
    fn default() -> Self {
        Self {
            queue: PROBE,
            status: "pending",
            tenant: None,
            payload: json!({}),
            last_error: None,
            errors: json!([]),
            run_at_ago_secs: 0,
            finished_ago_secs: None,
        }
    }
}

impl JobRow {
    fn dead(tenant: TenantId, error: &'static str) -> Self {
        Self {
            status: "dead",
            tenant: Some(tenant),
            last_error: Some(error),
            errors: json!([
                { "attempt": 1, "at": Utc::now(), "kind": "retry", "error": "first try failed" },
                { "attempt": 2, "at": Utc::now(), "kind": "dead", "error": error },
            ]),
            finished_ago_secs: Some(0),
            ..Self::default()
        }
    }

    async fn insert(self, pool: &PgPool) -> i64 {
        let finished = matches!(self.status, "done" | "dead" | "cancelled");
        let attempts = if finished && self.status != "cancelled" {
            2
        } else {
            0
        };
        sqlx::query_scalar(
            "INSERT INTO queue_jobs (queue, tenant_id, payload, status, attempts, max_attempts,
                                     run_at, last_error, errors, finished_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 2, now() - make_interval(secs => $6), $7, $8,
                     CASE WHEN $9::float8 IS NULL THEN NULL
                          ELSE now() - make_interval(secs => $9::float8) END,
                     now() - make_interval(secs => coalesce($9::float8, 0)))
             RETURNING id",
        )
        .bind(self.queue)
        .bind(self.tenant.map(|t| t.as_uuid()))
        .bind(&self.payload)
        .bind(self.status)
        .bind(attempts)
        .bind(self.run_at_ago_secs as f64)
        .bind(self.last_error)
        .bind(&self.errors)
        .bind(
            self.finished_ago_secs
                .or(finished.then_some(0))
                .map(|s| s as f64),
        )
        .fetch_one(pool)
        .await
        .expect("insert job")
    }
}

struct AccountRow {
    tenant: TenantId,
    email: &'static str,
    status: &'static str,
    last_error: Option<&'static str>,
    ingested: i64,
    duplicates: i64,
}

impl AccountRow {
    async fn insert(self, pool: &PgPool) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO helpdesk_email_accounts
                 (id, tenant_id, email_address, status, status_reason, last_sync_success_at,
                  last_sync_error, token_expires_at, throttled_until, messages_ingested,
                  duplicates_skipped)
             VALUES ($1, $2, $3, $4,
                     CASE WHEN $4 = 'needs_reauth' THEN 'refresh token revoked' END,
                     now() - interval '95 seconds', $5,
                     now() + interval '40 minutes',
                     CASE WHEN $4 = 'needs_reauth' THEN now() + interval '3 minutes' END,
                     $6, $7)",
        )
        .bind(id)
        .bind(self.tenant.as_uuid())
        .bind(self.email)
        .bind(self.status)
        .bind(self.last_error)
        .bind(self.ingested)
        .bind(self.duplicates)
        .execute(pool)
        .await
        .expect("insert account");
        id
    }
}

async fn status_of(pool: &PgPool, id: i64) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM queue_jobs_all WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct AuditRow {
    tenant_id: Option<Uuid>,
    actor: String,
    action: String,
    entity_type: String,
    entity_id: String,
    details: Value,
}

async fn audit_rows(pool: &PgPool) -> Vec<AuditRow> {
    sqlx::query_as(
        "SELECT tenant_id, actor, action, entity_type, entity_id, details
         FROM audit_log ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = app.client.request(method, app.url(path)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn get(app: &TestApp, path: &str, token: &str) -> (u16, Value) {
    call(app, reqwest::Method::GET, path, token, None).await
}

async fn post(app: &TestApp, path: &str, token: &str, body: Value) -> (u16, Value) {
    call(app, reqwest::Method::POST, path, token, Some(body)).await
}

fn ids(page: &Value) -> HashSet<i64> {
    page["jobs"]
        .as_array()
        .expect("jobs array")
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect()
}

/// Tenants a and b, with an ops token (issued in b: ops act on every tenant) and a's admin
/// and agent tokens.
struct TwoTenants {
    app: TestApp,
    ta: TenantId,
    tb: TenantId,
    ops: String,
    admin_a: String,
    agent_a: String,
}

async fn two_tenants() -> TwoTenants {
    let app = spawn_app().await;
    let ta = app.db.create_tenant("tenant-a").await;
    let tb = app.db.create_tenant("tenant-b").await;
    TwoTenants {
        ops: app.token(tb, TestRole::Ops),
        admin_a: app.token(ta, TestRole::Admin),
        agent_a: app.token(ta, TestRole::Agent),
        app,
        ta,
        tb,
    }
}

#[tokio::test]
async fn ops_api_applies_role_rules_and_audits_every_action() {
    let TwoTenants {
        app,
        ta,
        tb,
        ops,
        admin_a,
        agent_a,
    } = two_tenants().await;
    let pool = &app.db.pool;

    let dead_a = JobRow {
        payload: json!({ "marker": "m", "access_token": "plain-secret", "nested": { "password": "p" } }),
        ..JobRow::dead(ta, "boom in tenant a")
    }
    .insert(pool)
    .await;
    let dead_b = JobRow::dead(tb, "boom in tenant b").insert(pool).await;
    let pending_a = JobRow {
        tenant: Some(ta),
        run_at_ago_secs: 120,
        ..JobRow::default()
    }
    .insert(pool)
    .await;

    // Listing: ops see every tenant, admins their own, agents nothing.
    let (s, page) = get(&app, "/api/v1/jobs", &ops).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(ids(&page), HashSet::from([dead_a, dead_b, pending_a]));
    let (s, page) = get(&app, "/api/v1/jobs", &admin_a).await;
    assert_eq!(s, 200);
    assert_eq!(ids(&page), HashSet::from([dead_a, pending_a]));
    let (s, _) = get(&app, &format!("/api/v1/jobs?tenant_id={tb}"), &admin_a).await;
    assert_eq!(s, 403, "an admin cannot ask for another tenant");
    let (s, body) = get(&app, "/api/v1/jobs", &agent_a).await;
    assert_eq!(s, 403);
    assert_eq!(body["code"], "forbidden");

    // Arguments never show credentials.
    let (_, page) = get(
        &app,
        &format!("/api/v1/jobs?status=dead&tenant_id={ta}"),
        &ops,
    )
    .await;
    let job = &page["jobs"][0];
    assert_eq!(job["id"], dead_a);
    assert_eq!(job["arguments"]["access_token"], "[REDACTED]");
    assert_eq!(job["arguments"]["nested"]["password"], "[REDACTED]");
    assert_eq!(job["arguments"]["marker"], "m");
    assert_eq!(job["errors"].as_array().unwrap().len(), 2);

    // Filters and keyset pagination.
    let (_, page) = get(&app, "/api/v1/jobs?error=TENANT%20B", &ops).await;
    assert_eq!(ids(&page), HashSet::from([dead_b]));
    let (_, page) = get(
        &app,
        &format!("/api/v1/jobs?queue={PROBE}&status=pending"),
        &ops,
    )
    .await;
    assert_eq!(ids(&page), HashSet::from([pending_a]));
    let (_, first) = get(&app, "/api/v1/jobs?limit=2", &ops).await;
    assert_eq!(ids(&first), HashSet::from([pending_a, dead_b]));
    let next = first["next_before_id"].as_i64().expect("a next page");
    let (_, second) = get(
        &app,
        &format!("/api/v1/jobs?limit=2&before_id={next}"),
        &ops,
    )
    .await;
    assert_eq!(ids(&second), HashSet::from([dead_a]));
    assert!(second["next_before_id"].is_null());
    let (s, _) = get(&app, "/api/v1/jobs?status=exploded", &ops).await;
    assert_eq!(s, 400);

    // Single retry: another tenant's job does not exist for an admin.
    let (s, _) = post(
        &app,
        &format!("/api/v1/jobs/{dead_b}/retry"),
        &admin_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(status_of(pool, dead_b).await.as_deref(), Some("dead"));
    let (s, _) = post(
        &app,
        &format!("/api/v1/jobs/{dead_a}/retry"),
        &agent_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 403);
    assert!(
        audit_rows(pool).await.is_empty(),
        "refused calls are not audited"
    );
    let (s, job) = post(
        &app,
        &format!("/api/v1/jobs/{dead_a}/retry"),
        &admin_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{job}");
    assert_eq!(job["status"], "pending");
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["arguments"]["access_token"], "[REDACTED]");
    assert_eq!(status_of(pool, dead_a).await.as_deref(), Some("pending"));
    let (s, body) = post(
        &app,
        &format!("/api/v1/jobs/{dead_a}/retry"),
        &admin_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 409, "a pending job cannot be retried: {body}");

    // Cancel.
    let (s, _) = post(
        &app,
        &format!("/api/v1/jobs/{pending_a}/cancel"),
        &agent_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 403);
    let (s, job) = post(
        &app,
        &format!("/api/v1/jobs/{pending_a}/cancel"),
        &admin_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(job["status"], "cancelled");
    assert_eq!(
        status_of(pool, pending_a).await.as_deref(),
        Some("cancelled")
    );
    let (s, _) = post(
        &app,
        &format!("/api/v1/jobs/{dead_b}/cancel"),
        &ops,
        json!({}),
    )
    .await;
    assert_eq!(s, 409, "only pending jobs can be cancelled");

    // Bulk retry by filter.
    let (s, _) = post(
        &app,
        "/api/v1/jobs/retry",
        &admin_a,
        json!({ "tenant_id": tb }),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = post(&app, "/api/v1/jobs/retry", &agent_a, json!({})).await;
    assert_eq!(s, 403);
    let (s, body) = post(
        &app,
        "/api/v1/jobs/retry",
        &ops,
        json!({ "error": "tenant b" }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["count"], 1);
    assert_eq!(status_of(pool, dead_b).await.as_deref(), Some("pending"));
    assert_eq!(
        status_of(pool, pending_a).await.as_deref(),
        Some("cancelled"),
        "the error filter kept tenant a's cancelled job out"
    );

    // Purge: ops only, and only jobs finished before the horizon.
    let old_done = JobRow {
        status: "done",
        tenant: Some(ta),
        finished_ago_secs: Some(10 * 86_400),
        ..JobRow::default()
    }
    .insert(pool)
    .await;
    let recent_done = JobRow {
        status: "done",
        tenant: Some(ta),
        ..JobRow::default()
    }
    .insert(pool)
    .await;
    let (s, _) = post(
        &app,
        "/api/v1/jobs/purge",
        &admin_a,
        json!({ "older_than_days": 7 }),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = post(
        &app,
        "/api/v1/jobs/purge",
        &ops,
        json!({ "older_than_days": 0 }),
    )
    .await;
    assert_eq!(s, 400);
    let (s, body) = post(
        &app,
        "/api/v1/jobs/purge",
        &ops,
        json!({ "older_than_days": 7 }),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["count"], 1);
    assert_eq!(status_of(pool, old_done).await, None);
    assert_eq!(status_of(pool, recent_done).await.as_deref(), Some("done"));

    let audit = audit_rows(pool).await;
    let summary: Vec<(&str, &str, &str, Option<Uuid>)> = audit
        .iter()
        .map(|a| {
            (
                a.action.as_str(),
                a.entity_type.as_str(),
                a.entity_id.as_str(),
                a.tenant_id,
            )
        })
        .collect();
    let (dead_a_id, pending_a_id) = (dead_a.to_string(), pending_a.to_string());
    assert_eq!(
        summary,
        vec![
            ("job.retried", "job", dead_a_id.as_str(), Some(ta.as_uuid())),
            (
                "job.cancelled",
                "job",
                pending_a_id.as_str(),
                Some(ta.as_uuid())
            ),
            ("job.bulk_retried", "jobs", "filter", None),
            ("jobs.purged", "jobs", "finished", None),
        ]
    );
    assert!(audit.iter().all(|a| a.actor == "test-user"));
    assert_eq!(audit[0].details["role"], "admin");
    assert_eq!(audit[0].details["detail"]["previous_status"], "dead");
    assert_eq!(audit[2].details["detail"]["filter"]["error"], "tenant b");
    assert_eq!(audit[2].details["detail"]["retried"], 1);
    assert_eq!(audit[3].details["detail"]["purged"], 1);
    assert_eq!(audit[3].details["role"], "ops");
}

async fn put(app: &TestApp, path: &str, token: &str, body: Value) -> (u16, Value) {
    call(app, reqwest::Method::PUT, path, token, Some(body)).await
}

async fn tenant_limit(pool: &PgPool, tenant: TenantId) -> Option<i32> {
    sqlx::query_scalar("SELECT concurrency_limit FROM tenants WHERE id = $1")
        .bind(tenant.as_uuid())
        .fetch_one(pool)
        .await
        .unwrap()
}

/// What one worker with the default limit of 4 (WORKER_TENANT_CONCURRENCY=4) takes now: a
/// grant sync reporting the jobs it already runs, then a claim within the slots granted.
async fn claim_with_default_limit_4(pool: &PgPool) -> usize {
    use jobs::queue::runtime::{CLAIM_GRANTED_JOBS, TENANT_CLAIM_LOCK};
    const WORKER: &str = "test-worker";
    let running: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT tenant_id, count(*)::int FROM queue_jobs_all
         WHERE status = 'running' AND locked_by = $1 GROUP BY tenant_id",
    )
    .bind(WORKER)
    .fetch_all(pool)
    .await
    .unwrap();
    let (tenants, bounds): (Vec<Uuid>, Vec<i32>) = running.iter().copied().unzip();
    let granted: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT * FROM queue_sync_tenant_grants($1, $2, $3, 4, 60, $4, $5, 256,
                                                '00000000-0000-0000-0000-000000000000', 10)",
    )
    .bind(WORKER)
    .bind(vec![PROBE])
    .bind(TENANT_CLAIM_LOCK)
    .bind(&tenants)
    .bind(&bounds)
    .fetch_all(pool)
    .await
    .unwrap();
    let (rooms, sizes): (Vec<Uuid>, Vec<i32>) = granted
        .iter()
        .map(|(tenant, slots)| {
            let held = running.iter().find(|(t, _)| t == tenant).map_or(0, |r| r.1);
            (*tenant, slots - held)
        })
        .filter(|(_, free)| *free > 0)
        .unzip();
    sqlx::query(CLAIM_GRANTED_JOBS)
        .bind(PROBE)
        .bind(WORKER)
        .bind(&rooms)
        .bind(&sizes)
        .bind(10_i32)
        .bind(60.0_f64)
        // No claim cursors: every tenant from its head.
        .bind(vec![None::<i16>; rooms.len()])
        .bind(vec![None::<chrono::DateTime<Utc>>; rooms.len()])
        .bind(vec![None::<i64>; rooms.len()])
        .fetch_all(pool)
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn ops_set_a_tenants_concurrency_limit_and_the_next_claim_applies_it() {
    let TwoTenants {
        app,
        ta,
        tb,
        ops,
        admin_a,
        agent_a,
    } = two_tenants().await;
    let pool = &app.db.pool;
    let path_a = format!("/api/v1/tenants/{ta}/concurrency");

    // Reading: ops any tenant, admins their own, agents nothing.
    let (s, body) = get(&app, &path_a, &admin_a).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["name"], "tenant-a");
    assert_eq!(body["running_jobs"], 0);
    assert!(
        body.get("concurrency_limit").is_none(),
        "no override: {body}"
    );
    let (s, _) = get(&app, &format!("/api/v1/tenants/{tb}/concurrency"), &admin_a).await;
    assert_eq!(s, 403);
    let (s, _) = get(&app, &path_a, &agent_a).await;
    assert_eq!(s, 403);

    // Changing: ops only, and a whole number from 1 to 1000.
    let (s, _) = put(&app, &path_a, &admin_a, json!({ "concurrency_limit": 9 })).await;
    assert_eq!(s, 403, "a tenant's admin may not raise its own share");
    // Each error names the field and says what it must be.
    for (bad, says) in [
        (json!({ "concurrency_limit": 0 }), "concurrency_limit"),
        (json!({ "concurrency_limit": 1001 }), "concurrency_limit"),
        (
            json!({ "concurrency_limit": "two" }),
            "field `concurrency_limit`: expected an integer (uint32), found the string \"two\"",
        ),
        (
            json!({ "concurrency_limit": null }),
            "field `concurrency_limit` may not be null",
        ),
        (json!({}), "field `concurrency_limit` is missing"),
    ] {
        let (s, body) = put(&app, &path_a, &ops, bad.clone()).await;
        assert_eq!(s, 400, "{bad}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(says)),
            "{bad}: the error should say `{says}`: {body}"
        );
    }
    let (s, _) = call(&app, reqwest::Method::DELETE, &path_a, &admin_a, None).await;
    assert_eq!(s, 403);
    let unknown = TenantId::new();
    let (s, body) = put(
        &app,
        &format!("/api/v1/tenants/{unknown}/concurrency"),
        &ops,
        json!({ "concurrency_limit": 1 }),
    )
    .await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(
        tenant_limit(pool, ta).await,
        None,
        "refused changes left it alone"
    );
    assert!(audit_rows(pool).await.is_empty());

    for _ in 0..3 {
        JobRow {
            tenant: Some(ta),
            ..JobRow::default()
        }
        .insert(pool)
        .await;
    }
    let (s, body) = put(&app, &path_a, &ops, json!({ "concurrency_limit": 1 })).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["concurrency_limit"], 1);
    assert_eq!(tenant_limit(pool, ta).await, Some(1));
    assert_eq!(
        claim_with_default_limit_4(pool).await,
        1,
        "the next claim holds the tenant to its own limit, not the workers' default"
    );
    let (_, body) = get(&app, &path_a, &ops).await;
    assert_eq!(body["running_jobs"], 1, "{body}");
    assert_eq!(body["pending_jobs"], 2, "{body}");

    // Setting what is already set is not a change: no second audit row.
    let (s, _) = put(&app, &path_a, &ops, json!({ "concurrency_limit": 1 })).await;
    assert_eq!(s, 200);

    let (s, body) = call(&app, reqwest::Method::DELETE, &path_a, &ops, None).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.get("concurrency_limit").is_none(), "{body}");
    assert_eq!(tenant_limit(pool, ta).await, None);
    assert_eq!(
        claim_with_default_limit_4(pool).await,
        2,
        "cleared: the default of 4 applies, so both remaining jobs start"
    );

    let audit = audit_rows(pool).await;
    let summary: Vec<Value> = audit
        .iter()
        .map(|a| {
            json!([
                a.action,
                a.entity_type,
                a.entity_id,
                a.tenant_id,
                a.details["detail"]["from"],
                a.details["detail"]["to"]
            ])
        })
        .collect();
    let set = "tenant.concurrency_limit_set";
    assert_eq!(
        summary,
        vec![
            json!([set, "tenant", ta, ta, null, 1]),
            json!([set, "tenant", ta, ta, 1, null]),
        ],
        "one row per change, none for setting the same value again"
    );
    assert!(
        audit
            .iter()
            .all(|a| a.actor == "test-user" && a.details["role"] == "ops")
    );
}

#[tokio::test]
async fn ops_overview_and_account_health_follow_the_role_rules() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let ta = app.db.create_tenant("tenant-a").await;
    let tb = app.db.create_tenant("tenant-b").await;
    let ops = app.token(ta, TestRole::Ops);
    let admin_b = app.token(tb, TestRole::Admin);

    JobRow {
        tenant: Some(ta),
        run_at_ago_secs: 300,
        ..JobRow::default()
    }
    .insert(pool)
    .await;
    JobRow {
        tenant: Some(tb),
        run_at_ago_secs: 30,
        ..JobRow::default()
    }
    .insert(pool)
    .await;
    // Scheduled for a later retry: waiting on time, not on capacity.
    JobRow {
        queue: SYNC,
        tenant: Some(tb),
        run_at_ago_secs: -600,
        ..JobRow::default()
    }
    .insert(pool)
    .await;
    JobRow::dead(tb, "gone").insert(pool).await;
    for _ in 0..3 {
        JobRow {
            status: "done",
            tenant: Some(tb),
            ..JobRow::default()
        }
        .insert(pool)
        .await;
    }

    let (s, o) = get(&app, "/api/v1/ops/overview", &ops).await;
    assert_eq!(s, 200, "{o}");
    let queue = |o: &Value, name: &str| -> Value {
        o["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("queue {name} in {o}"))
    };
    let probe = queue(&o, PROBE);
    assert_eq!(
        (&probe["pending"], &probe["dead"], &probe["done"]),
        (&json!(2), &json!(1), &json!(3))
    );
    let age = probe["oldest_pending_seconds"].as_f64().unwrap();
    assert!((299.0..400.0).contains(&age), "{age}");
    assert!(
        queue(&o, SYNC)["oldest_pending_seconds"].is_null(),
        "a job scheduled in the future is not waiting"
    );
    assert_eq!(o["bucket_seconds"], 300);
    let buckets = o["throughput"].as_array().unwrap();
    assert!((12..=13).contains(&buckets.len()), "{}", buckets.len());
    let sum = |k: &str| buckets.iter().map(|b| b[k].as_i64().unwrap()).sum::<i64>();
    assert_eq!(sum("done"), 3);
    // The dead job's history has one retry and one dead attempt: both are failures.
    assert_eq!(sum("failed"), 2);

    let (_, o) = get(&app, "/api/v1/ops/overview", &admin_b).await;
    let probe = queue(&o, PROBE);
    assert_eq!(
        probe["pending"], 1,
        "tenant a's job is not counted for b's admin"
    );
    let age = probe["oldest_pending_seconds"].as_f64().unwrap();
    assert!(age < 200.0, "{age}");
    let (s, _) = get(
        &app,
        "/api/v1/ops/overview",
        &app.token(ta, TestRole::Agent),
    )
    .await;
    assert_eq!(s, 403);

    let a1 = AccountRow {
        tenant: ta,
        email: "help@a.example",
        status: "needs_reauth",
        last_error: Some("invalid_grant"),
        ingested: 10,
        duplicates: 1,
    }
    .insert(pool)
    .await;
    let b1 = AccountRow {
        tenant: tb,
        email: "support@b.example",
        status: "active",
        last_error: None,
        ingested: 4,
        duplicates: 0,
    }
    .insert(pool)
    .await;
    let (s, accounts) = get(&app, "/api/v1/accounts", &ops).await;
    assert_eq!(s, 200, "{accounts}");
    let accounts = accounts.as_array().unwrap();
    assert_eq!(accounts.len(), 2);
    let first = &accounts[0];
    assert_eq!(first["id"], a1.to_string(), "needs_reauth sorts first");
    assert_eq!(first["status"], "needs_reauth");
    assert_eq!(first["last_sync_error"], "invalid_grant");
    assert_eq!(first["messages_ingested"], 10);
    assert_eq!(first["duplicates_skipped"], 1);
    assert_eq!(
        first["reconnect_url"],
        format!("/dashboard/accounts/{a1}/reconnect"),
        "a link a browser can follow (dashboard_reconnect_link_… follows it)"
    );
    let lag = first["sync_lag_seconds"].as_f64().unwrap();
    assert!((94.0..200.0).contains(&lag), "{lag}");
    assert!(first["throttled_until"].is_string());
    assert!(first["token_expires_at"].is_string());
    let (_, mine) = get(&app, "/api/v1/accounts", &admin_b).await;
    let mine: Vec<&Value> = mine.as_array().unwrap().iter().map(|a| &a["id"]).collect();
    assert_eq!(mine, vec![&json!(b1.to_string())]);
    let (s, _) = get(&app, "/api/v1/accounts", &app.token(tb, TestRole::Agent)).await;
    assert_eq!(s, 403);
}

/// A dashboard user over plain HTTP with a cookie kept by hand, to see exactly what is sent.
struct DashClient {
    http: reqwest::Client,
    base: String,
    session: Option<String>,
}

impl DashClient {
    fn new(app: &TestApp) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: app.address.clone(),
            session: None,
        }
    }

    /// Logs in as a browser does: the login page first (its pre-session cookie and form
    /// token), then the form.
    async fn login(&mut self, token: &str) -> reqwest::Response {
        let (cookie, csrf) = self.login_form().await;
        let resp = self
            .http
            .post(format!("{}/dashboard/login", self.base))
            .header("cookie", cookie)
            .form(&[("token", token), ("csrf", &csrf)])
            .send()
            .await
            .unwrap();
        self.session = set_cookies(&resp)
            .into_iter()
            .find(|c| c.starts_with("gd_session=") && !c.starts_with("gd_session=;"))
            .map(|c| c.split(';').next().unwrap().to_string());
        resp
    }

    /// The login page's pre-session cookie (`name=value`) and the form's CSRF token.
    async fn login_form(&self) -> (String, String) {
        let resp = self
            .http
            .get(format!("{}/dashboard/login", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let cookie = set_cookies(&resp)
            .into_iter()
            .find(|c| c.starts_with("gd_login="))
            .expect("the login page sets its pre-session cookie");
        let cookie = cookie.split(';').next().unwrap().to_string();
        (cookie, csrf_in(&resp.text().await.unwrap()))
    }

    fn cookie(&self, extra: Option<&str>) -> String {
        [self.session.as_deref(), extra]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn get(&self, path: &str, extra_cookie: Option<&str>) -> (u16, String) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", self.cookie(extra_cookie))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("cookie", self.cookie(None))
            .form(form)
            .send()
            .await
            .unwrap()
    }
}

fn set_cookies(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

fn csrf_in(page: &str) -> String {
    let at = page
        .find(r#"name="csrf" value=""#)
        .expect("a CSRF field on the page");
    let rest = &page[at + r#"name="csrf" value=""#.len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

async fn oauth_states(pool: &PgPool) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT tenant_id, user_subject FROM oauth_states ORDER BY created_at")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The Accounts page's Reconnect link, followed by a browser with its dashboard session (no
/// bearer header): the Microsoft sign-in for that mailbox, with the OAuth state in the
/// mailbox's tenant, whoever clicked.
#[tokio::test]
async fn dashboard_reconnect_link_starts_the_sign_in_for_the_accounts_own_tenant() {
    let TwoTenants {
        app,
        ta,
        tb,
        ops,
        admin_a,
        agent_a,
    } = two_tenants().await;
    let pool = &app.db.pool;
    let a1 = AccountRow {
        tenant: ta,
        email: "help@a.example",
        status: "needs_reauth",
        last_error: Some("invalid_grant"),
        ingested: 0,
        duplicates: 0,
    }
    .insert(pool)
    .await;
    let link = format!("/dashboard/accounts/{a1}/reconnect");

    // The API and the Accounts page both point at it.
    let (s, accounts) = get(&app, "/api/v1/accounts", &ops).await;
    assert_eq!(s, 200, "{accounts}");
    assert_eq!(accounts[0]["reconnect_url"], link.as_str());
    let mut dash = DashClient::new(&app);
    dash.login(&ops).await;
    let (s, page) = dash.get("/dashboard/accounts", None).await;
    assert_eq!(s, 200);
    assert!(page.contains(&format!(r#"href="{link}""#)), "{page}");

    // Without a session: the login page, like every dashboard route; nothing stored.
    let anonymous = DashClient::new(&app);
    let resp = anonymous.http.get(app.url(&link)).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/dashboard/login");
    assert!(oauth_states(pool).await.is_empty());

    // Ops (their token is from tenant b) are sent to the sign-in for the mailbox's address;
    // the state belongs to tenant a, whose account the callback must update.
    let resp = dash
        .http
        .get(app.url(&link))
        .header("cookie", dash.cookie(None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let location = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    let identity = url::Url::parse(&app.endpoints.identity_base_url).unwrap();
    assert_eq!(location.origin(), identity.origin(), "{location}");
    assert!(
        location.path().ends_with("/oauth2/v2.0/authorize"),
        "{location}"
    );
    let query: std::collections::HashMap<String, String> =
        location.query_pairs().into_owned().collect();
    assert_eq!(query["login_hint"], "help@a.example");
    assert!(!query["state"].is_empty());
    assert_eq!(
        oauth_states(pool).await,
        vec![(ta.as_uuid(), "test-user".to_string())],
        "the state is the account's tenant's, not the ops user's tenant b"
    );

    // Tenant b's admin cannot reach tenant a's mailbox; tenant a's admin can.
    let admin_b = app.token(tb, TestRole::Admin);
    let mut dash_b = DashClient::new(&app);
    dash_b.login(&admin_b).await;
    let (s, page) = dash_b.get(&link, None).await;
    assert_eq!(s, 404, "{page}");
    assert_eq!(
        oauth_states(pool).await.len(),
        1,
        "a refusal stores nothing"
    );
    let mut dash_a = DashClient::new(&app);
    dash_a.login(&admin_a).await;
    let resp = dash_a
        .http
        .get(app.url(&link))
        .header("cookie", dash_a.cookie(None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert!(
        resp.headers()["location"]
            .to_str()
            .unwrap()
            .contains("login_hint=help%40a.example")
    );
    assert!(
        oauth_states(pool)
            .await
            .iter()
            .all(|(t, _)| *t == ta.as_uuid())
    );

    // Unknown and malformed ids are not found; agents cannot use the dashboard at all.
    for path in [
        format!("/dashboard/accounts/{}/reconnect", Uuid::new_v4()),
        "/dashboard/accounts/not-an-id/reconnect".to_string(),
    ] {
        let (s, _) = dash.get(&path, None).await;
        assert_eq!(s, 404, "{path}");
    }
    let resp = dash
        .http
        .get(app.url(&link))
        .header("cookie", format!("gd_session={agent_a}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(oauth_states(pool).await.len(), 2);
}

/// An ops action and its audit row commit together: when the audit row cannot be written the
/// action answers an error and the job is left as it was.
#[tokio::test]
async fn ops_actions_change_nothing_when_their_audit_row_cannot_be_written() {
    let TwoTenants {
        app,
        ta,
        ops,
        admin_a,
        ..
    } = two_tenants().await;
    let pool = &app.db.pool;
    let dead = JobRow::dead(ta, "boom").insert(pool).await;
    let pending = JobRow {
        tenant: Some(ta),
        ..JobRow::default()
    }
    .insert(pool)
    .await;
    let attempts = |id: i64| async move {
        sqlx::query_scalar::<_, i32>("SELECT attempts FROM queue_jobs_all WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    // The audit insert fails inside the database, after the job's UPDATE has run.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'audit_log is refusing rows in this test'; END $$;
         CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log
             FOR EACH ROW EXECUTE FUNCTION refuse_audit();",
    )
    .execute(pool)
    .await
    .unwrap();

    let (s, body) = post(
        &app,
        &format!("/api/v1/jobs/{dead}/retry"),
        &admin_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 500, "{body}");
    assert_eq!(body["code"], "internal");
    assert!(!body["request_id"].as_str().unwrap().is_empty());
    assert_eq!(status_of(pool, dead).await.as_deref(), Some("dead"));
    assert_eq!(attempts(dead).await, 2, "the attempt budget is untouched");

    let (s, body) = post(
        &app,
        &format!("/api/v1/jobs/{pending}/cancel"),
        &admin_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 500, "{body}");
    assert_eq!(status_of(pool, pending).await.as_deref(), Some("pending"));

    let (s, body) = post(&app, "/api/v1/jobs/retry", &ops, json!({})).await;
    assert_eq!(s, 500, "{body}");
    assert_eq!(status_of(pool, dead).await.as_deref(), Some("dead"));

    // The dashboard's form runs the same action.
    let mut dash = DashClient::new(&app);
    dash.login(&admin_a).await;
    let (_, page) = dash.get(&format!("/dashboard/jobs/{dead}"), None).await;
    let csrf = csrf_in(&page);
    let resp = dash
        .post(&format!("/dashboard/jobs/{dead}/retry"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), 500);
    assert_eq!(status_of(pool, dead).await.as_deref(), Some("dead"));
    assert!(audit_rows(pool).await.is_empty());

    // With the audit log back, each action lands with its row.
    sqlx::query("DROP TRIGGER refuse_audit ON audit_log")
        .execute(pool)
        .await
        .unwrap();
    let (s, body) = post(
        &app,
        &format!("/api/v1/jobs/{dead}/retry"),
        &admin_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(status_of(pool, dead).await.as_deref(), Some("pending"));
    assert_eq!(attempts(dead).await, 0);
    let (s, body) = post(
        &app,
        &format!("/api/v1/jobs/{pending}/cancel"),
        &admin_a,
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(status_of(pool, pending).await.as_deref(), Some("cancelled"));
    let (s, body) = post(&app, "/api/v1/jobs/retry", &ops, json!({})).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["count"], 1, "the cancelled job");
    assert_eq!(status_of(pool, pending).await.as_deref(), Some("pending"));
    let audit: Vec<(String, String)> = audit_rows(pool)
        .await
        .into_iter()
        .map(|a| (a.action, a.entity_id))
        .collect();
    assert_eq!(
        audit,
        vec![
            ("job.retried".to_string(), dead.to_string()),
            ("job.cancelled".to_string(), pending.to_string()),
            ("job.bulk_retried".to_string(), "filter".to_string()),
        ]
    );
}

#[tokio::test]
async fn dashboard_tenants_page_shows_load_and_lets_ops_change_a_limit() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let ta = app.db.create_tenant("tenant-a").await;
    let tb = app.db.create_tenant("tenant-b").await;
    for status in ["running", "running", "pending"] {
        JobRow {
            status,
            tenant: Some(ta),
            ..JobRow::default()
        }
        .insert(pool)
        .await;
    }
    let action = format!("/dashboard/tenants/{ta}/concurrency");

    let mut dash = DashClient::new(&app);
    dash.login(&app.token(tb, TestRole::Ops)).await;
    let (s, page) = dash.get("/dashboard/tenants", None).await;
    assert_eq!(s, 200);
    let row_a = &page[page
        .find(&format!(r#"data-tenant-id="{ta}""#))
        .expect("tenant a")..];
    let row_a = &row_a[..row_a.find("</tr>").unwrap()];
    assert!(row_a.contains("tenant-a"), "{row_a}");
    assert!(
        row_a.contains(r#"<td class="num">2</td><td class="num">1</td>"#),
        "2 running, 1 pending: {row_a}"
    );
    assert!(row_a.contains("default"), "{row_a}");
    assert!(
        page.find("tenant-a") < page.find("tenant-b"),
        "the busiest tenant comes first"
    );
    let csrf = csrf_in(&page);

    // Without the session's CSRF token nothing changes.
    let resp = dash.post(&action, &[("limit", "2")]).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(tenant_limit(pool, ta).await, None);

    // A value that is not a limit is refused with what to enter instead.
    for bad in ["two", "0", "1001", ""] {
        let resp = dash.post(&action, &[("csrf", &csrf), ("limit", bad)]).await;
        assert_eq!(resp.status(), 422, "{bad}");
        let body = resp.text().await.unwrap();
        assert!(
            body.contains("1 and 1000") || body.contains("1 to 1000"),
            "{bad}: {body}"
        );
    }
    assert_eq!(tenant_limit(pool, ta).await, None);

    let resp = dash.post(&action, &[("csrf", &csrf), ("limit", "2")]).await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/dashboard/tenants");
    assert_eq!(tenant_limit(pool, ta).await, Some(2));
    let flash = set_cookies(&resp)
        .into_iter()
        .find(|c| c.starts_with("gd_flash="))
        .expect("a flash message");
    let (_, page) = dash
        .get("/dashboard/tenants", Some(flash.split(';').next().unwrap()))
        .await;
    assert!(
        page.contains("Tenant tenant-a now uses its own limit of 2"),
        "{page}"
    );
    assert!(page.contains("Use default"), "an override can be cleared");

    let resp = dash
        .post(&action, &[("csrf", &csrf), ("limit", ""), ("clear", "1")])
        .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(tenant_limit(pool, ta).await, None);
    let actions: Vec<String> = audit_rows(pool)
        .await
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(
        actions,
        [
            "tenant.concurrency_limit_set",
            "tenant.concurrency_limit_set"
        ]
    );

    // An admin sees their own tenant only, without the forms, and cannot post one.
    let mut admin = DashClient::new(&app);
    admin.login(&app.token(ta, TestRole::Admin)).await;
    let (s, page) = admin.get("/dashboard/tenants", None).await;
    assert_eq!(s, 200);
    assert!(page.contains("tenant-a"));
    assert!(!page.contains("tenant-b"));
    assert!(!page.contains("/concurrency"), "no change form for admins");
    let admin_csrf = csrf_in(&page);
    let resp = admin
        .post(&action, &[("csrf", &admin_csrf), ("limit", "50")])
        .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(tenant_limit(pool, ta).await, None);
}

/// Login CSRF: a login post only counts with the form token of the login page this browser
/// loaded (bound to its SameSite=Strict pre-session cookie), so a page on another site cannot
/// log a victim into the attacker's session. And the login page's `?error=` is a code with a
/// fixed message: text put in the link never reaches the page.
#[tokio::test]
async fn dashboard_login_needs_its_form_token_and_shows_only_fixed_errors() {
    let app = spawn_app().await;
    let tenant = app.db.create_tenant("t").await;
    let attacker = app.token(tenant, TestRole::Ops);
    let dash = DashClient::new(&app);
    let no_session = |resp: &reqwest::Response| {
        !set_cookies(resp)
            .iter()
            .any(|c| c.starts_with("gd_session=") && !c.starts_with("gd_session=;"))
    };
    let login_url = app.url("/dashboard/login");

    // What an auto-submitted form on another site sends: no cookie of ours, no form token.
    let resp = dash
        .http
        .post(&login_url)
        .header("origin", "https://attacker.example")
        .form(&[("token", attacker.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(no_session(&resp), "a cross-site login sets no session");
    assert!(resp.text().await.unwrap().contains("security token"));

    // The attacker's own form token, without the cookie it belongs to.
    let (cookie, csrf) = dash.login_form().await;
    let resp = dash
        .http
        .post(&login_url)
        .form(&[("token", attacker.as_str()), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(no_session(&resp));
    // The cookie without the token, or with the token of another browser's login page.
    let (_, foreign_csrf) = dash.login_form().await;
    for form in [
        vec![("token", attacker.as_str())],
        vec![
            ("token", attacker.as_str()),
            ("csrf", foreign_csrf.as_str()),
        ],
    ] {
        let resp = dash
            .http
            .post(&login_url)
            .header("cookie", &cookie)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{form:?}");
        assert!(no_session(&resp));
    }

    // The pre-session cookie: HttpOnly, SameSite=Strict (never sent by a cross-site post).
    let resp = dash.http.get(&login_url).send().await.unwrap();
    let pre = set_cookies(&resp)
        .into_iter()
        .find(|c| c.starts_with("gd_login="))
        .unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(pre.contains(attr), "{pre} has {attr}");
    }

    // A login from the login page works, and its nonce is spent.
    let mut user = DashClient::new(&app);
    let resp = user.login(&app.token(tenant, TestRole::Admin)).await;
    assert_eq!(resp.status(), 303);
    assert!(user.session.is_some());
    assert!(
        set_cookies(&resp)
            .iter()
            .any(|c| c.starts_with("gd_login=;") && c.contains("Max-Age=0"))
    );
    let (s, _) = user.get("/dashboard", None).await;
    assert_eq!(s, 200);

    // `?error=` shows nothing it was given, raw or base64 (the old form of the parameter).
    use base64::Engine as _;
    let lure = "Call +1 555 0100 and read out your token";
    for error in [
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(lure),
        lure.replace(' ', "%20"),
    ] {
        let (s, page) = dash
            .get(&format!("/dashboard/login?error={error}"), None)
            .await;
        assert_eq!(s, 200);
        assert!(!page.contains("555 0100"), "{page}");
        assert!(
            !page.contains(r#"id="message""#),
            "no message at all: {page}"
        );
    }
    // An ended session sends the browser to the login page with a code and a fixed message.
    let expired = app.jwt.mint(
        "test-user",
        tenant,
        TestRole::Ops,
        chrono::Duration::hours(-2),
    );
    let resp = dash
        .http
        .get(app.url("/dashboard"))
        .header("cookie", format!("gd_session={expired}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(location, "/dashboard/login?error=session_ended");
    let (_, page) = dash.get(&location, None).await;
    assert!(page.contains("Your session has ended"), "{page}");
}

#[tokio::test]
async fn dashboard_sessions_csrf_escaping_and_tenant_scope() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let ta = app.db.create_tenant("tenant-a").await;
    let tb = app.db.create_tenant("tenant-b").await;
    let dead = JobRow {
        payload: json!({ "refresh_token": "s3cret-refresh", "marker": "visible-marker" }),
        ..JobRow::dead(ta, "<script>alert(1)</script> upstream said no")
    }
    .insert(pool)
    .await;

    let mut dash = DashClient::new(&app);
    let resp = dash.http.get(app.url("/dashboard")).send().await.unwrap();
    assert_eq!(resp.status(), 303, "no session: off to the login page");
    assert_eq!(resp.headers()["location"], "/dashboard/login");
    let (s, login) = dash.get("/dashboard/login", None).await;
    assert_eq!(s, 200);
    assert!(login.contains(r#"name="token""#));

    let resp = dash.login("not-a-jwt").await;
    assert_eq!(resp.status(), 401);
    assert!(dash.session.is_none());
    let resp = dash.login(&app.token(ta, TestRole::Agent)).await;
    assert_eq!(resp.status(), 403);
    assert!(dash.session.is_none(), "agents get no session");
    assert!(resp.text().await.unwrap().contains("Access denied"));

    let ops_token = app.token(ta, TestRole::Ops);
    let resp = dash.login(&ops_token).await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/dashboard");
    let cookie = set_cookies(&resp)
        .into_iter()
        .find(|c| c.starts_with("gd_session="))
        .unwrap();
    assert!(cookie.starts_with(&format!("gd_session={ops_token};")));
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(cookie.contains(attr), "{cookie} has {attr}");
    }
    assert!(
        !cookie.contains("Secure"),
        "DASHBOARD_SECURE_COOKIE defaults to false"
    );

    // The job page escapes what a job's error says and never shows a credential.
    let (s, page) = dash.get(&format!("/dashboard/jobs/{dead}"), None).await;
    assert_eq!(s, 200);
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt; upstream said no"));
    assert!(!page.contains("<script>alert"));
    assert!(page.contains("visible-marker"));
    assert!(page.contains("[REDACTED]"));
    assert!(!page.contains("s3cret-refresh"));
    assert!(
        page.contains("first try failed"),
        "each attempt's error is listed"
    );
    let csrf = csrf_in(&page);

    // Form posts without the session's CSRF token change nothing.
    let retry = format!("/dashboard/jobs/{dead}/retry");
    let resp = dash.post(&retry, &[]).await;
    assert_eq!(resp.status(), 403);
    let resp = dash.post(&retry, &[("csrf", &"00".repeat(32))]).await;
    assert_eq!(resp.status(), 403);
    let mut other = DashClient::new(&app);
    other.login(&app.token(tb, TestRole::Ops)).await;
    let (_, other_page) = other.get("/dashboard/jobs", None).await;
    let other_csrf = csrf_in(&other_page);
    assert_ne!(other_csrf, csrf);
    let resp = dash.post(&retry, &[("csrf", &other_csrf)]).await;
    assert_eq!(resp.status(), 403, "another session's token does not fit");
    for path in ["/dashboard/jobs/retry", "/dashboard/jobs/purge"] {
        let resp = dash.post(path, &[("days", "1")]).await;
        assert_eq!(resp.status(), 403, "{path}");
    }
    assert_eq!(status_of(pool, dead).await.as_deref(), Some("dead"));
    assert!(audit_rows(pool).await.is_empty());

    let resp = dash.post(&retry, &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), 303);
    assert_eq!(
        resp.headers()["location"],
        format!("/dashboard/jobs/{dead}")
    );
    let flash = set_cookies(&resp)
        .into_iter()
        .find(|c| c.starts_with("gd_flash="))
        .expect("a flash message");
    assert_eq!(status_of(pool, dead).await.as_deref(), Some("pending"));
    let audit = audit_rows(pool).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "job.retried");
    assert_eq!(audit[0].actor, "test-user");
    let flash = flash.split(';').next().unwrap();
    let (_, page) = dash
        .get(&format!("/dashboard/jobs/{dead}"), Some(flash))
        .await;
    assert!(page.contains(&format!("Job {dead} was put back to pending.")));

    // Bulk retry and purge through the forms.
    let bulk = JobRow::dead(ta, "mailbox quota exceeded")
        .insert(pool)
        .await;
    let resp = dash
        .post(
            "/dashboard/jobs/retry",
            &[
                ("csrf", &csrf),
                ("error", "quota"),
                ("queue", ""),
                ("tenant", ""),
            ],
        )
        .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/dashboard/jobs?error=quota");
    assert_eq!(status_of(pool, bulk).await.as_deref(), Some("pending"));
    let old = JobRow {
        status: "done",
        finished_ago_secs: Some(3 * 86_400),
        ..JobRow::default()
    }
    .insert(pool)
    .await;
    let resp = dash
        .post("/dashboard/jobs/purge", &[("csrf", &csrf), ("days", "2")])
        .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(status_of(pool, old).await, None);
    let actions: Vec<String> = audit_rows(pool)
        .await
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(actions, ["job.retried", "job.bulk_retried", "jobs.purged"]);

    // An admin of tenant b sees neither tenant a's jobs nor the purge form.
    let mut admin = DashClient::new(&app);
    admin.login(&app.token(tb, TestRole::Admin)).await;
    let (s, _) = admin.get(&format!("/dashboard/jobs/{dead}"), None).await;
    assert_eq!(s, 404);
    let (s, list) = admin.get("/dashboard/jobs", None).await;
    assert_eq!(s, 200);
    assert!(!list.contains(&format!("data-job-id=\"{dead}\"")));
    assert!(!list.contains("/dashboard/jobs/purge"));
    let admin_csrf = csrf_in(&list);
    let resp = admin
        .post(
            "/dashboard/jobs/purge",
            &[("csrf", &admin_csrf), ("days", "1")],
        )
        .await;
    assert_eq!(resp.status(), 403);

    // Logging out clears the cookie.
    let resp = dash.post("/dashboard/logout", &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), 303);
    assert!(
        set_cookies(&resp)
            .iter()
            .any(|c| c.starts_with("gd_session=;") && c.contains("Max-Age=0"))
    );
}

fn sample<'a>(
    scrape: &'a prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> &'a prometheus_parse::Value {
    &scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("{name}{labels:?} in the scrape"))
        .value
}

fn gauge(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Gauge(g) => *g,
        other => panic!("expected a gauge, got {other:?}"),
    }
}

fn counter(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(c) => *c,
        other => panic!("expected a counter, got {other:?}"),
    }
}

#[tokio::test]
async fn metrics_need_an_ops_token_because_they_add_up_every_tenant() {
    let app = spawn_app().await;
    let t = app.db.create_tenant("tenant").await;
    let get = |token: Option<String>| {
        let mut req = app.client.get(app.url("/metrics"));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_string());
            (status, challenge, resp.text().await.unwrap())
        }
    };

    let (status, challenge, body) = get(None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    assert!(
        body.contains("ops role") && body.contains("mint-token"),
        "{body}"
    );
    assert!(!body.contains("graphdesk_"), "no metric leaks: {body}");

    let (status, _, body) = get(Some("not-a-jwt".into())).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("not accepted"), "{body}");

    for role in [TestRole::Agent, TestRole::Admin] {
        let (status, challenge, body) = get(Some(app.token(t, role))).await;
        assert_eq!(status, 403, "{role:?}: {body}");
        assert_eq!(challenge, None);
        assert!(
            body.contains(role.as_str()) && !body.contains("graphdesk_"),
            "{body}"
        );
    }

    let (status, _, body) = get(Some(app.token(t, TestRole::Ops))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("graphdesk_queue_depth"), "{body}");
}

#[tokio::test]
async fn metrics_report_queue_accounts_and_ops_actions_in_prometheus_format() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let t = app.db.create_tenant("tenant").await;
    let ops = app.token(t, TestRole::Ops);
    JobRow {
        run_at_ago_secs: 90,
        ..JobRow::default()
    }
    .insert(pool)
    .await;
    JobRow::default().insert(pool).await;
    let dead = JobRow::dead(t, "nope").insert(pool).await;
    JobRow {
        queue: SYNC,
        status: "running",
        ..JobRow::default()
    }
    .insert(pool)
    .await;
    for (email, status, ingested, duplicates) in [
        ("a@x.example", "active", 30, 6),
        ("b@x.example", "active", 6, 2),
        ("c@x.example", "needs_reauth", 4, 0),
    ] {
        AccountRow {
            tenant: t,
            email,
            status,
            last_error: None,
            ingested,
            duplicates,
        }
        .insert(pool)
        .await;
    }
    let (s, _) = post(&app, &format!("/api/v1/jobs/{dead}/retry"), &ops, json!({})).await;
    assert_eq!(s, 200);

    let resp = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let body = resp.text().await.unwrap();
    // The parser skips lines it cannot read; insist that every line is well-formed.
    for line in body.lines() {
        assert!(
            !matches!(
                prometheus_parse::LineInfo::parse(line),
                prometheus_parse::LineInfo::Ignored
            ) || line.starts_with('#'),
            "malformed metrics line: {line:?}"
        );
    }
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();

    let depth = |queue: &str, status: &str| {
        gauge(sample(
            &scrape,
            "graphdesk_queue_depth",
            &[("queue", queue), ("status", status)],
        ))
    };
    assert_eq!(
        depth(PROBE, "pending"),
        3.0,
        "two pending plus the retried one"
    );
    assert_eq!(depth(PROBE, "dead"), 0.0);
    assert_eq!(depth(SYNC, "running"), 1.0);
    assert_eq!(
        depth("graphdesk.send_reply", "pending"),
        0.0,
        "known queues always appear"
    );
    let oldest = gauge(sample(
        &scrape,
        "graphdesk_queue_oldest_pending_seconds",
        &[("queue", PROBE)],
    ));
    assert!((89.0..200.0).contains(&oldest), "{oldest}");
    assert_eq!(
        gauge(sample(
            &scrape,
            "graphdesk_queue_oldest_pending_seconds",
            &[("queue", SYNC)]
        )),
        0.0
    );
    let accounts = |status| gauge(sample(&scrape, "graphdesk_accounts", &[("status", status)]));
    assert_eq!(accounts("active"), 2.0);
    assert_eq!(accounts("needs_reauth"), 1.0);
    assert_eq!(accounts("error"), 0.0);
    assert_eq!(
        counter(sample(&scrape, "graphdesk_messages_ingested_total", &[])),
        40.0
    );
    assert_eq!(
        counter(sample(&scrape, "graphdesk_duplicates_skipped_total", &[])),
        8.0
    );
    assert_eq!(
        gauge(sample(&scrape, "graphdesk_duplicate_detection_ratio", &[])),
        8.0 / 48.0
    );
    // From the process's recorder (shared by every app in this test process, hence >=).
    let retried = counter(sample(
        &scrape,
        "graphdesk_ops_actions_total",
        &[("action", "job.retried")],
    ));
    assert!(retried >= 1.0, "{retried}");
    assert!(scrape.docs.contains_key("graphdesk_queue_depth"));
}

// ---------------------------------------------------------------------------------------------
// Headless Chromium

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a page element may take to appear: generous, since the whole suite shares two
/// cores with the browser.
const BROWSER_WAIT: Duration = Duration::from_secs(30);
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver on a free port plus one browser session; both end on drop.
struct Browser {
    client: fantoccini::Client,
    _driver: tokio::process::Child,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    async fn start() -> Self {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the dashboard tests need Debian's chromium and chromium-driver (scripts/test.sh installs them)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let probe = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while probe.get(format!("{url}/status")).send().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("graphdesk-chromium-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&profile).unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let client = ClientBuilder::rustls()
            .expect("rustls client")
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a chromium session");
        Self {
            client,
            _driver: driver,
            profile,
        }
    }

    async fn goto(&self, app: &TestApp, path: &str) {
        self.client.goto(&app.url(path)).await.unwrap();
    }

    /// The element's text. A click that navigates can leave us holding the old page's
    /// element for a moment, so a stale element is looked up again.
    async fn text(&self, css: &str) -> String {
        let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
        loop {
            let found = self
                .client
                .wait()
                .at_most(BROWSER_WAIT)
                .for_element(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("{css} on the page: {e}"));
            match found.text().await {
                Ok(text) => return text,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "looking {css} up again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{css} text: {e}"),
            }
        }
    }

    async fn click(&self, css: &str) {
        self.client
            .wait()
            .at_most(BROWSER_WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} on the page: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// Waits for a click's navigation, so the next lookup cannot read the previous page.
    async fn wait_for_url(&self, fragment: &str) {
        let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
        loop {
            let url = self.client.current_url().await.unwrap();
            if url.as_str().contains(fragment) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still on {url}, expected {fragment}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    async fn login(&self, app: &TestApp, token: &str) {
        self.goto(app, "/dashboard/login").await;
        self.type_into("#token", token).await;
        self.click("#login").await;
    }

    /// Saves a PNG of the page: into docs/screenshots when UPDATE_SCREENSHOTS is set (to
    /// refresh the committed ones), else into a temporary directory so the work tree stays
    /// clean.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let dir = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/screenshots"))
        } else {
            self.profile.join("screenshots")
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

async fn wait_for_text(browser: &Browser, css: &str, expected: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = browser.text(css).await;
        if text.contains(expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{css} still says {text:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        browser.client.refresh().await.unwrap();
    }
}

/// Finished jobs and failed attempts spread over the last hour, so the charts have shape.
async fn seed_history(pool: &PgPool, tenant: TenantId) {
    for minutes_ago in [2_i64, 3, 7, 8, 9, 14, 22, 23, 31, 38, 39, 40, 47, 50, 52] {
        JobRow {
            status: "done",
            tenant: Some(tenant),
            finished_ago_secs: Some(minutes_ago * 60),
            errors: if minutes_ago % 3 == 0 {
                json!([{ "attempt": 1, "kind": "retry", "error": "Graph 503",
                         "at": Utc::now() - chrono::Duration::minutes(minutes_ago) }])
            } else {
                json!([])
            },
            ..JobRow::default()
        }
        .insert(pool)
        .await;
    }
    JobRow {
        queue: SYNC,
        tenant: Some(tenant),
        run_at_ago_secs: 75,
        ..JobRow::default()
    }
    .insert(pool)
    .await;
}

#[tokio::test]
async fn the_dashboard_works_in_a_real_browser() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let tenant = app.db.create_tenant("contoso").await;
    seed_history(pool, tenant).await;
    let failed = JobRow {
        payload: json!({ "marker": "nightly-check" }),
        ..JobRow::dead(tenant, "probe exploded: the disk is on fire")
    }
    .insert(pool)
    .await;
    AccountRow {
        tenant,
        email: "support@contoso.example",
        status: "active",
        last_error: None,
        ingested: 1284,
        duplicates: 37,
    }
    .insert(pool)
    .await;
    AccountRow {
        tenant,
        email: "billing@contoso.example",
        status: "needs_reauth",
        last_error: Some("AADSTS700082: the refresh token has expired due to inactivity"),
        ingested: 212,
        duplicates: 4,
    }
    .insert(pool)
    .await;
    let _worker = spawn_worker(&app.db, WorkerOptions::default()).await;
    let browser = Browser::start().await;

    browser.login(&app, &app.token(tenant, TestRole::Ops)).await;
    let queues = browser.text("#queues").await;
    assert!(queues.contains(PROBE), "{queues}");
    assert_eq!(browser.text("#chart-done .total").await, "15");
    assert!(browser.text("#who").await.contains("ops"));
    browser.screenshot("overview").await;

    // The failed job and its error are on the jobs page.
    browser.goto(&app, "/dashboard/jobs?status=dead").await;
    let row = browser.text(&format!("tr[data-job-id=\"{failed}\"]")).await;
    assert!(row.contains("the disk is on fire"), "{row}");
    assert!(row.contains("dead"), "{row}");
    browser.screenshot("jobs").await;

    browser
        .click(&format!("tr[data-job-id=\"{failed}\"] a"))
        .await;
    assert!(
        browser
            .text("#last-error")
            .await
            .contains("the disk is on fire")
    );
    assert!(browser.text("#errors").await.contains("first try failed"));
    assert!(browser.text("#arguments").await.contains("nightly-check"));
    browser.screenshot("job").await;

    // Retry it: the worker runs the (empty, so succeeding) probe to completion.
    browser.click("#retry-button").await;
    assert!(
        browser
            .text("#flash")
            .await
            .contains(&format!("Job {failed} was put back to pending."))
    );
    wait_for_text(&browser, "#job-status", "done", Duration::from_secs(30)).await;
    assert_eq!(status_of(pool, failed).await.as_deref(), Some("done"));

    // Bulk retry by an error filter retries exactly the matching dead jobs.
    let mut quota = Vec::new();
    for _ in 0..2 {
        quota.push(
            JobRow::dead(tenant, "mailbox quota exceeded")
                .insert(pool)
                .await,
        );
    }
    let unrelated = JobRow::dead(tenant, "something else").insert(pool).await;
    browser.goto(&app, "/dashboard/jobs").await;
    browser.type_into("#error-filter", "quota").await;
    browser.click("#apply-filter").await;
    browser.wait_for_url("error=quota").await;
    let list = browser.text("#jobs").await;
    assert!(list.contains("mailbox quota exceeded") && !list.contains("something else"));
    browser.click("#bulk-retry-button").await;
    assert!(
        browser
            .text("#flash")
            .await
            .contains("2 jobs matching the filter put back to pending.")
    );
    wait_for_count(
        pool,
        "SELECT count(*) FROM queue_jobs_all WHERE status = 'done' AND last_error = 'mailbox quota exceeded'",
        2,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status_of(pool, unrelated).await.as_deref(), Some("dead"));

    browser.goto(&app, "/dashboard/accounts").await;
    let flagged = browser.text("tr.needs-reauth").await;
    assert!(flagged.contains("billing@contoso.example"), "{flagged}");
    assert!(flagged.contains("AADSTS700082"), "{flagged}");
    assert!(browser.text("#accounts").await.contains("1284"));
    browser.screenshot("accounts").await;

    // Ops rein in a tenant from the tenants page.
    browser.goto(&app, "/dashboard/tenants").await;
    let row = format!("tr[data-tenant-id=\"{tenant}\"]");
    browser
        .type_into(&format!("{row} input[name=limit]"), "3")
        .await;
    browser.click(&format!("{row} button[type=submit]")).await;
    assert!(
        browser
            .text("#flash")
            .await
            .contains("now uses its own limit of 3"),
    );
    assert_eq!(browser.text(&format!("{row} td.limit")).await, "3");
    assert_eq!(tenant_limit(pool, tenant).await, Some(3));
    browser.screenshot("tenants").await;

    // Logging out and in again as an agent is refused.
    browser.click("header form button").await;
    browser.text("#token").await;
    browser
        .login(&app, &app.token(tenant, TestRole::Agent))
        .await;
    assert!(
        browser
            .text("#message")
            .await
            .contains("Agent tokens cannot use it")
    );
    browser.goto(&app, "/dashboard").await;
    browser.text("#token").await;
    assert!(
        browser
            .client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/dashboard/login")
    );
    browser.client.clone().close().await.unwrap();
}
