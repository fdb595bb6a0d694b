//! Foundation: an API call becomes a job that a worker process runs, on real Postgres.

use std::time::Duration;

use graphdesk_tests::{
    TestApp, TestDb, TestRole, WorkerOptions, spawn_app, spawn_worker, wait_for_count,
};
use jobs::kinds::Probe;
use jobs::queue::Queue;
use nix::sys::signal::Signal;
use serde_json::json;

async fn ops_token(app: &TestApp) -> String {
    let tenant = app.db.create_tenant("ops-tenant").await;
    app.token(tenant, TestRole::Ops)
}

#[tokio::test]
async fn a_job_enqueued_over_http_is_run_by_a_worker_process() {
    let app = spawn_app().await;
    let token = ops_token(&app).await;
    let _worker = spawn_worker(&app.db, WorkerOptions::default()).await;

    let resp = app
        .client
        .post(app.url("/api/v1/ops/probe"))
        .bearer_auth(&token)
        .json(&json!({ "marker": "hello" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    let id = body["job_id"].as_i64().expect("job id");
    assert_eq!(body["queue"], "graphdesk.probe");

    let job = app
        .wait_for_job(&token, id, &["done"], Duration::from_secs(30))
        .await;
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["last_error"], serde_json::Value::Null);

    // A job that fails once is retried by the worker and its first error stays visible.
    let resp = app
        .client
        .post(app.url("/api/v1/ops/probe"))
        .bearer_auth(&token)
        .json(&json!({ "fail_attempts": 1 }))
        .send()
        .await
        .unwrap();
    let id = resp.json::<serde_json::Value>().await.unwrap()["job_id"]
        .as_i64()
        .unwrap();
    let job = app
        .wait_for_job(&token, id, &["done"], Duration::from_secs(30))
        .await;
    assert_eq!(job["attempts"], 2, "{job}");
    assert_eq!(job["errors"].as_array().unwrap().len(), 1, "{job}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("fail on attempt 1"),
        "{job}"
    );
}

#[tokio::test]
async fn two_worker_processes_run_each_of_2000_jobs_exactly_once() {
    let db = TestDb::new().await;
    let opts = || WorkerOptions {
        queue: jobs::config::QueueSettings {
            tenant_concurrency: None,
            ..WorkerOptions::default().queue
        },
        ..WorkerOptions::default()
    };
    let w1 = spawn_worker(&db, opts()).await;
    let w2 = spawn_worker(&db, opts()).await;
    let queue = Queue::new(db.pool.clone());
    let probes: Vec<Probe> = (0..2000)
        .map(|i| Probe {
            record: true,
            sleep_ms: 1,
            marker: Some(format!("job-{i}")),
            ..Probe::default()
        })
        .collect();
    let ids = queue.enqueue_batch(&probes).await.unwrap();
    assert_eq!(ids.len(), 2000);

    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_jobs_all WHERE status = 'done'",
        2000,
        Duration::from_secs(120),
    )
    .await;
    let (runs, distinct_jobs): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT job_id) FROM queue_probe_runs")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(runs, 2000, "every job executed exactly once");
    assert_eq!(distinct_jobs, 2000);
    let workers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT worker_id FROM queue_probe_runs ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut expected = vec![w1.worker_id.clone(), w2.worker_id.clone()];
    expected.sort();
    assert_eq!(workers, expected, "both processes took part");
}

#[tokio::test]
async fn sigterm_during_work_loses_no_job() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    // Grace shorter than the work: in-flight jobs must go back to pending, not stay running.
    let mut worker = spawn_worker(
        &db,
        WorkerOptions {
            shutdown_grace_secs: 1,
            ..WorkerOptions::default()
        },
    )
    .await;
    let probes: Vec<Probe> = (0..20)
        .map(|_| Probe {
            record: true,
            sleep_ms: 4000,
            ..Probe::default()
        })
        .collect();
    queue.enqueue_batch(&probes).await.unwrap();
    wait_for_count(
        &db.pool,
        "SELECT least(count(*), 1) FROM queue_jobs_all WHERE status = 'running'",
        1,
        Duration::from_secs(30),
    )
    .await;
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "worker exits cleanly on SIGTERM: {status:?}"
    );
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all WHERE status = 'running'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(running, 0, "nothing is left stranded as running");
    let spent: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(attempts), 0) FROM queue_jobs_all WHERE status = 'pending'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(spent, 0, "handing a job back does not spend its attempt");

    // Long grace: in-flight jobs finish instead.
    let mut worker = spawn_worker(&db, WorkerOptions::default()).await;
    wait_for_count(
        &db.pool,
        "SELECT least(count(*), 1) FROM queue_jobs_all WHERE status = 'running'",
        1,
        Duration::from_secs(30),
    )
    .await;
    worker.signal(Signal::SIGTERM);
    worker.wait_exit(Duration::from_secs(60)).await;
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all WHERE status = 'running'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(running, 0);
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all WHERE status = 'done'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        done >= 1,
        "jobs in flight at SIGTERM finished within the grace period"
    );

    // Whatever is left is picked up by the next worker: none is lost.
    let _worker = spawn_worker(&db, WorkerOptions::default()).await;
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_jobs_all WHERE status = 'done'",
        20,
        Duration::from_secs(60),
    )
    .await;
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT job_id) FROM queue_probe_runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(distinct, 20);
}

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_a_second_run_changes_nothing() {
    let db = TestDb::empty().await;
    jobs::db::migrate(&db.pool).await.unwrap();
    let schema = || async {
        let cols: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT table_name::text, column_name::text, data_type::text
             FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (cols, applied)
    };
    let first = schema().await;
    assert!(
        first
            .0
            .iter()
            .any(|(t, c, _)| t == "helpdesk_messages" && c == "microsoft_message_id")
    );
    assert_eq!(first.1, jobs::db::MIGRATOR.iter().count() as i64);
    jobs::db::migrate(&db.pool).await.unwrap();
    assert_eq!(schema().await, first);
    assert!(jobs::db::readiness(&db.pool).await.ready());
}

#[tokio::test]
async fn readyz_reports_pending_migrations() {
    let app = graphdesk_tests::spawn_app_on(TestDb::empty().await).await;
    let resp = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    jobs::db::migrate(&app.db.pool).await.unwrap();
    let resp = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn the_committed_openapi_spec_matches_the_code() {
    let app = spawn_app().await;
    let served = app
        .client
        .get(app.url("/openapi.yaml"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/openapi.yaml");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &served).unwrap();
    }
    let committed = std::fs::read_to_string(path).expect("api/openapi.yaml is committed");
    assert!(
        committed == served,
        "api/openapi.yaml is out of date: run `UPDATE_OPENAPI=1 cargo test --test integration openapi` and commit it"
    );
}

#[tokio::test]
async fn malformed_requests_and_unknown_ids_get_json_errors_with_a_request_id() {
    let app = spawn_app().await;
    let token = ops_token(&app).await;
    let check = |resp: reqwest::Response, status: u16| async move {
        assert_eq!(resp.status().as_u16(), status);
        let header = resp
            .headers()
            .get("x-request-id")
            .cloned()
            .expect("request id header");
        let body: serde_json::Value = resp.json().await.expect("JSON error body");
        assert_eq!(
            body["request_id"].as_str().unwrap(),
            header.to_str().unwrap()
        );
        assert!(!body["message"].as_str().unwrap().is_empty());
        body
    };

    let resp = app
        .client
        .post(app.url("/api/v1/ops/probe"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let body = check(resp, 400).await;
    assert_eq!(body["code"], "bad_request");

    let resp = app
        .client
        .get(app.url("/api/v1/jobs/987654321"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(check(resp, 404).await["code"], "not_found");

    let resp = app
        .client
        .get(app.url("/api/v1/jobs/abc"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    check(resp, 400).await;

    let resp = app
        .client
        .get(app.url("/api/v1/jobs/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(check(resp, 401).await["code"], "unauthorized");

    let resp = app
        .client
        .get(app.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    check(resp, 404).await;

    let resp = app
        .client
        .post(app.url("/api/v1/accounts/not-a-uuid/sync"))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let body = check(resp, 400).await;
    assert!(
        body["message"].as_str().unwrap().contains("account id"),
        "{body}"
    );

    // Nothing was enqueued by any of the failed requests.
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0);
}
