//! Queue layer: each apalis-postgres defect the project measured is reproduced here against
//! graphdesk's backend, plus limits, recovery and ops operations.

use std::time::Duration;

use chrono::{DateTime, Utc};
use graphdesk_tests::{QueueReads, TestDb, WorkerOptions, spawn_worker, wait_for_count};
use jobs::config::QueueSettings;
use jobs::ids::{AccountId, JobId, TenantId};
use jobs::kinds::{Probe, SyncMailbox};
use jobs::queue::{
    AuditEntry, EnqueueOptions, JobFilter, JobStatus, Queue, RetryOutcome, enqueue_in,
};
use nix::sys::signal::Signal;

fn opts(f: impl FnOnce(&mut QueueSettings)) -> WorkerOptions {
    let mut o = WorkerOptions::default();
    f(&mut o.queue);
    o
}

async fn job(queue: &Queue, id: JobId) -> jobs::queue::JobRecord {
    queue.get_job(id).await.unwrap().expect("job exists")
}

async fn wait_status(
    queue: &Queue,
    id: JobId,
    status: &str,
    within: Duration,
) -> jobs::queue::JobRecord {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let j = job(queue, id).await;
        if j.status == status {
            return j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never reached {status}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_times(j: &jobs::queue::JobRecord) -> Vec<DateTime<Utc>> {
    j.errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["at"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_timed_out_run_is_a_failed_attempt_with_its_reason_and_is_retried() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let _w = spawn_worker(&db, opts(|q| q.job_timeout = Duration::from_secs(1))).await;
    let probe = Probe {
        sleep_ms: 5_000,
        ..Probe::default()
    };
    let id = queue
        .enqueue(&probe, EnqueueOptions::default().max_attempts(2))
        .await
        .unwrap()
        .id;
    let j = wait_status(&queue, id, "dead", Duration::from_secs(30)).await;
    assert_eq!(j.attempts, 2);
    let errors = j.errors.as_array().unwrap();
    assert_eq!(errors.len(), 2, "{j:?}");
    assert!(
        errors
            .iter()
            .all(|e| e["error"].as_str().unwrap().contains("timed out")),
        "{j:?}"
    );
    assert!(j.last_error.unwrap().contains("gave up after 2 attempts"));
}

#[tokio::test]
async fn a_panic_is_a_failed_attempt_and_the_retry_succeeds() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let _w = spawn_worker(&db, WorkerOptions::default()).await;
    let probe = Probe {
        panic_attempts: 1,
        ..Probe::default()
    };
    let id = queue
        .enqueue(&probe, EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    let j = wait_status(&queue, id, "done", Duration::from_secs(30)).await;
    assert_eq!(j.attempts, 2);
    assert!(
        j.errors[0]["error"].as_str().unwrap().contains("panicked"),
        "{j:?}"
    );
}

#[tokio::test]
async fn deferral_moves_run_at_and_spends_no_attempt() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let _w = spawn_worker(&db, WorkerOptions::default()).await;
    let probe = Probe {
        defer_times: 3,
        defer_ms: 400,
        ..Probe::default()
    };
    let id = queue
        .enqueue(&probe, EnqueueOptions::default().max_attempts(1))
        .await
        .unwrap()
        .id;
    let j = wait_status(&queue, id, "done", Duration::from_secs(30)).await;
    assert_eq!(
        j.attempts, 1,
        "three deferrals spent no attempt (max_attempts is 1)"
    );
    let times = error_times(&j);
    assert_eq!(times.len(), 3);
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= chrono::Duration::milliseconds(350),
            "deferral honoured run_at: {gap}"
        );
    }
}

#[tokio::test]
async fn retries_back_off_between_attempts() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let _w = spawn_worker(&db, WorkerOptions::default()).await;
    let probe = Probe {
        fail_attempts: 3,
        ..Probe::default()
    };
    let id = queue
        .enqueue(&probe, EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    let j = wait_status(&queue, id, "done", Duration::from_secs(30)).await;
    assert_eq!(j.attempts, 4);
    let times = error_times(&j);
    // Probe's policy: base 200 ms, so after failed attempt n the next waits between
    // 100 ms * 2^(n-1) and twice that (jitter); without backoff the gaps would be a few ms.
    let gaps: Vec<i64> = times
        .windows(2)
        .map(|p| (p[1] - p[0]).num_milliseconds())
        .collect();
    assert!(gaps[0] >= 100, "the first retry waited: {gaps:?}");
    assert!(gaps[1] >= 200, "the second retry waited longer: {gaps:?}");
}

#[tokio::test]
async fn a_permanent_error_is_dead_at_once() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let _w = spawn_worker(&db, WorkerOptions::default()).await;
    let probe = Probe {
        permanent_failure: true,
        ..Probe::default()
    };
    let id = queue
        .enqueue(&probe, EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    let j = wait_status(&queue, id, "dead", Duration::from_secs(30)).await;
    assert_eq!(j.attempts, 1);
    assert_eq!(
        j.last_error.as_deref(),
        Some("probe asked to fail permanently")
    );
}

#[tokio::test]
async fn a_worker_with_short_settings_does_not_steal_a_live_workers_job() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let _patient = spawn_worker(&db, opts(|q| q.lease = Duration::from_secs(30))).await;
    let id = queue
        .enqueue(
            &Probe {
                sleep_ms: 4_000,
                record: true,
                ..Probe::default()
            },
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    wait_status(&queue, id, "running", Duration::from_secs(10)).await;
    // This worker reaps every ~250 ms with a 1 s lease of its own; the running job's lease
    // was written by its owner and is renewed, so it must not be taken.
    let _eager = spawn_worker(&db, opts(|q| q.lease = Duration::from_secs(1))).await;
    let j = wait_status(&queue, id, "done", Duration::from_secs(30)).await;
    assert_eq!(j.attempts, 1, "{j:?}");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_probe_runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1, "the job ran exactly once");
}

#[tokio::test]
async fn a_long_job_keeps_its_lease_through_heartbeats() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    // Lease 1 s, job 4 s: without renewal the reaper would hand it to the second worker.
    let _a = spawn_worker(&db, opts(|q| q.lease = Duration::from_secs(1))).await;
    let _b = spawn_worker(&db, opts(|q| q.lease = Duration::from_secs(1))).await;
    let id = queue
        .enqueue(
            &Probe {
                sleep_ms: 4_000,
                record: true,
                ..Probe::default()
            },
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    let j = wait_status(&queue, id, "done", Duration::from_secs(30)).await;
    assert_eq!(j.attempts, 1, "{j:?}");
}

/// Runs `worker <args>` with `env` on top of the test endpoints' settings and expects it to
/// fail start-up: returns its stderr.
async fn worker_start_failure(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = tokio::process::Command::new(graphdesk_tests::workspace_bin("worker"));
    cmd.args(args)
        .env("DATABASE_URL", &db.url)
        .env("DATABASE_MAX_CONNECTIONS", "2")
        .env("RUST_LOG", "warn")
        .env_remove("WORKER_QUEUES")
        .env_remove("WORKER_METRICS_ADDR")
        .env_remove("SYNC_PAGE_SIZE")
        .env_remove("SYNC_INITIAL_DAYS")
        .kill_on_drop(true);
    for (k, v) in graphdesk_tests::Endpoints::unreachable().env() {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the worker exits within 60 s instead of running")
        .expect("spawn worker");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the worker exited successfully: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(" running"),
        "the worker started running"
    );
    stderr
}

/// `WORKER_QUEUES=sync,send_reply` used to run only send_reply: mailbox syncs waited for a
/// worker nobody had started. Now the unknown name stops start-up, and the message lists
/// what would have been valid.
#[tokio::test]
async fn a_worker_refuses_an_unknown_queue_name_and_lists_the_valid_ones() {
    let db = TestDb::new().await;
    let valid: Vec<&str> = jobs::kinds::QUEUES
        .iter()
        .map(|q| q.strip_prefix("graphdesk.").unwrap())
        .collect();
    let from_env =
        worker_start_failure(&db, &["run"], &[("WORKER_QUEUES", "sync,send_reply")]).await;
    let from_flag =
        worker_start_failure(&db, &["run", "--queues", "graphdesk.probe,nope"], &[]).await;
    // No subcommand is `run`, and WORKER_QUEUES counts there too.
    let bare = worker_start_failure(&db, &[], &[("WORKER_QUEUES", "send_reply,sync")]).await;
    for (stderr, unknown, known) in [
        (&from_env, "`sync`", "`send_reply`"),
        (&from_flag, "`nope`", "`graphdesk.probe`"),
        (&bare, "`sync`", "`send_reply`"),
    ] {
        assert!(
            stderr.contains(&format!("unknown queue(s) {unknown};")),
            "{stderr}"
        );
        assert!(
            !stderr.contains(known),
            "only the unknown name is reported: {stderr}"
        );
        assert!(
            stderr.contains(&format!("valid queues: {}", valid.join(", "))),
            "{stderr}"
        );
    }
    // Valid names, with and without the prefix, start a worker.
    let _w = spawn_worker(
        &db,
        WorkerOptions {
            extra_env: vec![("WORKER_QUEUES".into(), "graphdesk.probe, send_reply".into())],
            ..WorkerOptions::default()
        },
    )
    .await;
}

/// SYNC_PAGE_SIZE used to be read at each sync round, a bad value silently becoming 50; now a
/// worker that would sync refuses to start, naming the variable and the value.
#[tokio::test]
async fn a_worker_with_a_bad_sync_page_size_fails_start_up_naming_it() {
    let db = TestDb::new().await;
    for bad in ["abc", "0"] {
        let stderr = worker_start_failure(
            &db,
            &["run", "--queues", "sync_mailbox"],
            &[("SYNC_PAGE_SIZE", bad)],
        )
        .await;
        assert!(
            stderr.contains(&format!(
                "SYNC_PAGE_SIZE has an invalid value: `{bad}` is not a whole number from 1 to 1000"
            )),
            "{stderr}"
        );
    }
}

#[test]
fn worker_names_are_unique_per_process_start() {
    let a = jobs::queue::runtime::unique_worker_id("w");
    let b = jobs::queue::runtime::unique_worker_id("w");
    assert_ne!(a, b);
    assert!(a.contains(&std::process::id().to_string()));
}

/// A burst of jobs must not wait for database backends to start: under load a new one took
/// about 100 ms, and the first completions of a 20,000-job burst waited that long.
#[tokio::test]
async fn an_idle_worker_holds_its_claim_and_completion_connections_open() {
    let db = TestDb::new().await;
    let _w = spawn_worker(&db, opts(|q| q.poll_interval = Duration::from_secs(30))).await;
    // No job has run: these were opened at start (the names are the runtime's
    // CLAIM_CONNECTION_NAME and COMPLETION_CONNECTION_NAME, as ops see them).
    for (query, open) in [
        (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'graphdesk-worker-claims'",
            i64::from(jobs::queue::runtime::CLAIM_CONNECTIONS),
        ),
        (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'graphdesk-worker-completions'",
            jobs::queue::runtime::MAX_FLUSHES as i64,
        ),
    ] {
        wait_for_count(&db.pool, query, open, Duration::from_secs(20)).await;
    }
}

#[tokio::test]
async fn a_worker_survives_losing_its_database_connections() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let _w = spawn_worker(&db, WorkerOptions::default()).await;
    let first = queue
        .enqueue(&Probe::default(), EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    wait_status(&queue, first, "done", Duration::from_secs(30)).await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND application_name LIKE 'graphdesk-worker%') t",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(killed >= 1, "the worker's connections were cut");
    let second = queue
        .enqueue(&Probe::default(), EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    wait_status(&queue, second, "done", Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_poison_row_is_quarantined_and_the_queue_goes_on() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let poison: i64 = sqlx::query_scalar(
        "INSERT INTO queue_jobs (queue, payload, max_attempts)
         VALUES ('graphdesk.probe', '{\"sleep_ms\": \"not a number\"}', 5) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let good = queue
        .enqueue(&Probe::default(), EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    let _w = spawn_worker(&db, WorkerOptions::default()).await;
    wait_status(&queue, good, "done", Duration::from_secs(30)).await;
    let p = wait_status(&queue, JobId::new(poison), "dead", Duration::from_secs(30)).await;
    assert!(p.last_error.unwrap().contains("could not be decoded"));
}

#[tokio::test]
async fn enqueue_returns_ids_and_duplicate_keys_return_the_existing_job() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let a = queue
        .enqueue(
            &Probe::default(),
            EnqueueOptions::default().idempotency_key("k1"),
        )
        .await
        .unwrap();
    let b = queue
        .enqueue(
            &Probe::default(),
            EnqueueOptions::default().idempotency_key("k1"),
        )
        .await
        .unwrap();
    assert!(a.created && !b.created);
    assert_eq!(a.id, b.id);
    let c = queue
        .enqueue(
            &Probe::default(),
            EnqueueOptions::default().idempotency_key("k2"),
        )
        .await
        .unwrap();
    assert_ne!(c.id, a.id);

    // Coalescing: one pending sync per account and folder.
    let tenant = db.create_tenant("t").await;
    let account = AccountId::new();
    let sync = SyncMailbox {
        tenant,
        account,
        folder: "inbox".into(),
    };
    let s1 = queue
        .enqueue(&sync, EnqueueOptions::default())
        .await
        .unwrap();
    let s2 = queue
        .enqueue(&sync, EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(s1.id, s2.id);
    assert!(!s2.created);
    let other = SyncMailbox {
        folder: "archive".into(),
        ..sync.clone()
    };
    assert_ne!(
        queue
            .enqueue(&other, EnqueueOptions::default())
            .await
            .unwrap()
            .id,
        s1.id
    );

    // Enqueue inside the caller's transaction: a rollback leaves no job.
    let mut tx = db.pool.begin().await.unwrap();
    let inside = enqueue_in(
        &mut tx,
        &Probe::default(),
        EnqueueOptions::default().idempotency_key("tx"),
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert!(queue.get_job(inside.id).await.unwrap().is_none());
}

#[tokio::test]
async fn concurrent_duplicate_enqueues_create_one_job() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let mut handles = Vec::new();
    for _ in 0..20 {
        let q = queue.clone();
        handles.push(tokio::spawn(async move {
            q.enqueue(
                &Probe::default(),
                EnqueueOptions::default().idempotency_key("same"),
            )
            .await
            .unwrap()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for h in handles {
        let e = h.await.unwrap();
        ids.insert(e.id);
        created += usize::from(e.created);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(created, 1);
}

#[tokio::test]
async fn kill_9_mid_run_recovers_every_job_within_the_lease() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let lease = |q: &mut QueueSettings| q.lease = Duration::from_secs(2);
    let mut victim = spawn_worker(&db, opts(lease)).await;
    let probes: Vec<Probe> = (0..30)
        .map(|_| Probe {
            sleep_ms: 1_500,
            record: true,
            ..Probe::default()
        })
        .collect();
    queue.enqueue_batch(&probes).await.unwrap();
    wait_for_count(
        &db.pool,
        "SELECT least(count(*), 1) FROM queue_jobs_all WHERE status = 'running'",
        1,
        Duration::from_secs(20),
    )
    .await;
    victim.signal(Signal::SIGKILL);
    victim.wait_exit(Duration::from_secs(10)).await;
    let killed_at = tokio::time::Instant::now();
    let _survivor = spawn_worker(&db, opts(lease)).await;
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_jobs_all WHERE status = 'done'",
        30,
        Duration::from_secs(60),
    )
    .await;
    let runs: Vec<(i64, i64)> =
        sqlx::query_as("SELECT job_id, count(*) FROM queue_probe_runs GROUP BY job_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(runs.len(), 30, "no job lost");
    assert!(
        runs.iter().all(|(_, n)| *n == 1),
        "no job's effect committed twice: {runs:?}"
    );
    let recovered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM queue_jobs_all, jsonb_array_elements(errors) e WHERE e->>'kind' = 'lease_expired'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        recovered >= 1,
        "the killed worker's jobs came back through the reaper"
    );
    assert!(killed_at.elapsed() < Duration::from_secs(60));
}

/// The maximum number of overlapping probe runs per tenant.
async fn max_concurrency_per_tenant(pool: &sqlx::PgPool) -> Vec<(uuid::Uuid, i64)> {
    sqlx::query_as(
        "WITH events AS (
            SELECT tenant_id, started_at AS at, 1 AS delta FROM queue_probe_runs
            UNION ALL
            SELECT tenant_id, finished_at AS at, -1 AS delta FROM queue_probe_runs
         ), running AS (
            SELECT tenant_id, sum(delta) OVER (PARTITION BY tenant_id ORDER BY at, delta
                                               ROWS UNBOUNDED PRECEDING) AS n
            FROM events
         )
         SELECT tenant_id, max(n)::bigint FROM running GROUP BY tenant_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn tenant_limits_hold_across_three_worker_processes() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let mut tenants = Vec::new();
    for i in 0..50 {
        tenants.push(db.create_tenant(&format!("tenant-{i}")).await);
    }
    let limited = |q: &mut QueueSettings| q.tenant_concurrency = Some(2);
    let _w1 = spawn_worker(&db, opts(limited)).await;
    let _w2 = spawn_worker(&db, opts(limited)).await;
    let _w3 = spawn_worker(&db, opts(limited)).await;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let probes: Vec<Probe> = (0..5000)
        .map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            Probe {
                tenant: Some(tenants[(seed % 50) as usize]),
                sleep_ms: seed % 15,
                record: true,
                marker: Some(i.to_string()),
                ..Probe::default()
            }
        })
        .collect();
    for chunk in probes.chunks(1000) {
        queue.enqueue_batch(chunk).await.unwrap();
    }
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_jobs_all WHERE status = 'done'",
        5000,
        Duration::from_secs(240),
    )
    .await;
    let (runs, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT job_id) FROM queue_probe_runs")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (runs, distinct),
        (5000, 5000),
        "every job completed exactly once"
    );
    let maxes = max_concurrency_per_tenant(&db.pool).await;
    assert_eq!(maxes.len(), 50);
    let worst = maxes.iter().map(|(_, n)| *n).max().unwrap();
    assert!(
        worst <= 2,
        "a tenant ran more than 2 jobs at once: {maxes:?}"
    );
    assert_eq!(
        worst, 2,
        "the limit, not a lack of work, bounded concurrency"
    );
}

/// A tenant whose own concurrency limit is 1, whatever the workers' default.
async fn tenant_limited_to_one(db: &TestDb) -> TenantId {
    let tenant = db.create_tenant("one-at-a-time").await;
    sqlx::query("UPDATE tenants SET concurrency_limit = 1 WHERE id = $1")
        .bind(tenant.as_uuid())
        .execute(&db.pool)
        .await
        .unwrap();
    tenant
}

#[tokio::test]
async fn a_per_tenant_override_beats_the_default() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let tenant = tenant_limited_to_one(&db).await;
    let _w = spawn_worker(&db, opts(|q| q.tenant_concurrency = Some(8))).await;
    let probes: Vec<Probe> = (0..20)
        .map(|_| Probe {
            tenant: Some(tenant),
            sleep_ms: 50,
            record: true,
            ..Probe::default()
        })
        .collect();
    queue.enqueue_batch(&probes).await.unwrap();
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_jobs_all WHERE status = 'done'",
        20,
        Duration::from_secs(60),
    )
    .await;
    let maxes = max_concurrency_per_tenant(&db.pool).await;
    assert_eq!(maxes, vec![(tenant.as_uuid(), 1)]);
}

/// A new tenant's first job starts once its slots are granted, not at the next poll. The
/// grant wakes every queue's fetchers, and each claim reserves every free slot whatever its
/// queue; a probe fetcher that found the slot reserved by another queue's claim used to sleep
/// until its poll (here 30 s) although that claim gave the slot back at once; so did one that
/// got other slots but not that one. Each of ten tenants in turn gives the race its chance:
/// it was lost about half the time, and the second form in one suite run of three.
#[tokio::test]
async fn a_new_tenants_first_job_starts_without_waiting_for_a_poll() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let _w = worker_polling_every_30s(&db, 1).await;
    for i in 0..10 {
        let tenant = db.create_tenant(&format!("new-{i}")).await;
        let id = enqueue_tenant_probe(&queue, tenant, 0).await;
        // Well under the poll, with room for a loaded machine.
        wait_status(&queue, id, "done", Duration::from_secs(15)).await;
    }
}

/// A worker with tenant limits whose poll is too far off to start anything a test waits
/// for: what starts a job must be a wake-up.
async fn worker_polling_every_30s(
    db: &TestDb,
    tenant_limit: u32,
) -> graphdesk_tests::WorkerProcess {
    spawn_worker(
        db,
        opts(|q| {
            q.tenant_concurrency = Some(tenant_limit);
            q.poll_interval = Duration::from_secs(30);
        }),
    )
    .await
}

async fn enqueue_tenant_probe(queue: &Queue, tenant: TenantId, sleep_ms: u64) -> JobId {
    enqueue_probe(
        queue,
        Probe {
            tenant: Some(tenant),
            sleep_ms,
            ..Probe::default()
        },
        EnqueueOptions::default(),
    )
    .await
}

/// A backlog of one tenant at the head of the queue, then a few jobs of a later tenant; one
/// worker with `limit` per tenant. Returns how many backlog jobs had run when the later
/// tenant's last job was done, or panics if that took longer than `within`.
async fn backlog_run_before_the_later_tenant(
    backlog_jobs: usize,
    sleep_ms: u64,
    limit: u32,
    within: Duration,
) -> i64 {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let busy = db.create_tenant("backlog").await;
    let quiet = db.create_tenant("arrives-later").await;
    let probes = |tenant: TenantId, n: usize, sleep_ms: u64| -> Vec<Probe> {
        (0..n)
            .map(|_| Probe {
                tenant: Some(tenant),
                sleep_ms,
                ..Probe::default()
            })
            .collect()
    };
    queue
        .enqueue_batch(&probes(busy, backlog_jobs, sleep_ms))
        .await
        .unwrap();
    queue.enqueue_batch(&probes(quiet, 3, 0)).await.unwrap();
    let _w = spawn_worker(&db, opts(|q| q.tenant_concurrency = Some(limit))).await;
    let done = |tenant: TenantId| {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM queue_jobs_all WHERE status = 'done' AND tenant_id = $1",
        )
        .bind(tenant.as_uuid())
        .fetch_one(&db.pool)
    };
    let deadline = tokio::time::Instant::now() + within;
    while done(quiet).await.unwrap() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the later tenant's jobs did not run within {within:?} (the backlog ran {} jobs)",
            done(busy).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done(busy).await.unwrap()
}

/// A tenant with a deep backlog at the head of the queue must not hold back a tenant whose
/// jobs arrive later: the claim skips tenants at their limit instead of stopping at them.
#[tokio::test]
async fn a_tenant_at_its_limit_does_not_block_the_tenants_behind_it() {
    let busy_done = backlog_run_before_the_later_tenant(1000, 10, 2, Duration::from_secs(60)).await;
    // At two at a time the backlog takes seconds; the later tenant must not wait for most of it.
    assert!(
        busy_done < 500,
        "the later tenant only ran after {busy_done} of the backlog's 1000 jobs"
    );
}

/// The usual claim looks at a bounded head of the queue, so a backlog deeper than that scan,
/// from one tenant at its limit, used to hide every tenant behind it until it drained at its
/// limit's pace (here over two minutes). The periodic deep claim looks at each tenant.
#[tokio::test]
async fn a_backlog_deeper_than_the_claim_scan_does_not_hide_the_tenants_behind_it() {
    backlog_run_before_the_later_tenant(3000, 50, 1, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn ops_can_list_retry_cancel_and_purge() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let tenant = db.create_tenant("t").await;
    let failing: Vec<Probe> = (0..3)
        .map(|_| Probe {
            tenant: Some(tenant),
            permanent_failure: true,
            ..Probe::default()
        })
        .collect();
    let dead = queue.enqueue_batch(&failing).await.unwrap();
    let w = spawn_worker(&db, WorkerOptions::default()).await;
    for id in &dead {
        wait_status(&queue, *id, "dead", Duration::from_secs(30)).await;
    }
    drop(w);
    let filter = JobFilter {
        status: Some(JobStatus::Dead),
        tenant: Some(tenant),
        error_contains: Some("PERMANENTLY".into()),
        limit: 50,
        ..JobFilter::default()
    };
    let listed = queue.list_jobs(&filter).await.unwrap();
    assert_eq!(listed.len(), 3, "error text matches case-insensitively");
    assert!(
        queue
            .list_jobs(&JobFilter {
                tenant: Some(TenantId::new()),
                limit: 50,
                ..JobFilter::default()
            })
            .await
            .unwrap()
            .is_empty()
    );

    // Each action writes its audit row; the dashboard's own tests check the rows.
    let audit = |action| AuditEntry {
        tenant: Some(tenant.as_uuid()),
        actor: "queue-test",
        action,
        entity_type: "job",
        entity_id: "test",
        details: serde_json::json!({}),
    };
    assert_eq!(
        queue
            .retry_job(dead[0], &audit("job.retried"))
            .await
            .unwrap(),
        RetryOutcome::Retried
    );
    assert_eq!(
        queue
            .retry_job(dead[0], &audit("job.retried"))
            .await
            .unwrap(),
        RetryOutcome::NotRetryable,
        "a pending job is not retried twice"
    );
    let j = job(&queue, dead[0]).await;
    assert_eq!((j.status.as_str(), j.attempts), ("pending", 0));
    assert_eq!(j.errors.as_array().unwrap().len(), 1, "history kept");
    assert_eq!(
        queue
            .retry_matching(&filter, |_| audit("job.bulk_retried"))
            .await
            .unwrap(),
        2
    );

    assert!(
        queue
            .cancel_job(dead[1], &audit("job.cancelled"))
            .await
            .unwrap()
    );
    assert_eq!(job(&queue, dead[1]).await.status, "cancelled");

    sqlx::query("UPDATE queue_jobs SET finished_at = now() - interval '8 days' WHERE id = $1")
        .bind(dead[1].get())
        .execute(&db.pool)
        .await
        .unwrap();
    let purged = queue
        .purge_finished(Utc::now() - chrono::Duration::days(7))
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert!(queue.get_job(dead[1]).await.unwrap().is_none());
    assert!(queue.get_job(dead[2]).await.unwrap().is_some());
}

/// A recovered job must not break "one pending job per coalesce key" (the chaos run found the
/// reaper failing whole passes on it): it is superseded by the pending one.
#[tokio::test]
async fn the_reaper_supersedes_a_recovered_job_whose_key_is_already_pending() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let probe = Probe {
        coalesce: Some("same".into()),
        ..Probe::default()
    };
    let first = queue
        .enqueue(&probe, EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    // Its worker died mid-run: running, lease expired.
    sqlx::query(
        "UPDATE queue_jobs SET status = 'running', attempts = 1, locked_by = 'dead-worker',
            lease_expires_at = now() - interval '1 minute' WHERE id = $1",
    )
    .bind(first.get())
    .execute(&db.pool)
    .await
    .unwrap();
    let second = queue
        .enqueue(&probe, EnqueueOptions::default())
        .await
        .unwrap();
    assert!(second.created, "a running job does not coalesce a new one");
    let unrelated = queue
        .enqueue(&Probe::default(), EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    sqlx::query(
        "UPDATE queue_jobs SET status = 'running', attempts = 1, locked_by = 'dead-worker',
            lease_expires_at = now() - interval '1 minute' WHERE id = $1",
    )
    .bind(unrelated.get())
    .execute(&db.pool)
    .await
    .unwrap();
    let recovered = jobs::queue::runtime::reap_expired(&db.pool)
        .await
        .expect("the pass succeeds");
    assert_eq!(recovered, 2);
    let first = job(&queue, first).await;
    assert_eq!(first.status, "cancelled");
    assert!(first.last_error.unwrap().contains("superseded"));
    assert_eq!(job(&queue, second.id).await.status, "pending");
    assert_eq!(
        job(&queue, unrelated).await.status,
        "pending",
        "the rest of the pass was recovered"
    );
}

/// The same for a run that fails and would go back to pending while a newer job with its key
/// waits: the completion flush must not fail (and take other jobs' completions with it).
#[tokio::test]
async fn a_retry_whose_key_is_already_pending_is_superseded_and_other_completions_land() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let _w = spawn_worker(&db, WorkerOptions::default()).await;
    let keyed = |sleep_ms, fail_attempts| Probe {
        coalesce: Some("k".into()),
        sleep_ms,
        fail_attempts,
        ..Probe::default()
    };
    let first = queue
        .enqueue(&keyed(1_500, 1), EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    wait_status(&queue, first, "running", Duration::from_secs(20)).await;
    // Hold the second one back until the first has failed, so both want to be pending. It is
    // enqueued already deferred: a worker woken by the enqueue could claim it before a later
    // UPDATE of run_at lands.
    let second = queue
        .enqueue(
            &keyed(0, 0),
            EnqueueOptions::default().run_at(chrono::Utc::now() + chrono::Duration::seconds(4)),
        )
        .await
        .unwrap();
    assert!(second.created);
    let other = queue
        .enqueue(
            &Probe {
                sleep_ms: 1_500,
                ..Probe::default()
            },
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    let first = wait_status(&queue, first, "cancelled", Duration::from_secs(20)).await;
    assert!(
        first.last_error.unwrap().contains("superseded"),
        "{:?}",
        first.errors
    );
    wait_status(&queue, other, "done", Duration::from_secs(20)).await;
    wait_status(&queue, second.id, "done", Duration::from_secs(30)).await;
}

/// Statistics as autovacuum would take them of the queue as it stands.
async fn vacuum_analyze_queue(db: &TestDb) {
    sqlx::query("VACUUM ANALYZE queue_jobs")
        .execute(&db.pool)
        .await
        .unwrap();
}

/// The statements that look up in-flight jobs by id must not scan the partial running-jobs
/// index, whatever the statistics say. After an ANALYZE of an idle queue (no running jobs) the planner
/// used to scan a partial running-jobs index as the outer side of a nested loop over the ids:
/// a flush of 2,000 completions took seconds on a busy table.
#[tokio::test]
async fn id_list_statements_skip_the_running_index_after_an_idle_analyze() {
    use jobs::queue::runtime::{COMPLETE_JOBS, COMPLETE_SUCCESSES, RELEASE_JOBS, RENEW_LEASES};
    let db = TestDb::new().await;
    // Statistics of a queue that has only finished work, as autovacuum would take them.
    sqlx::query(
        "INSERT INTO queue_jobs (queue, payload, max_attempts, status, attempts, finished_at)
         SELECT 'graphdesk.probe', '{}', 5, 'done', 1, now() FROM generate_series(1, 20000)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    vacuum_analyze_queue(&db).await;
    sqlx::query(
        "INSERT INTO queue_jobs (queue, payload, max_attempts, status, attempts, locked_by,
                                 lease_expires_at)
         SELECT 'graphdesk.probe', '{}', 5, 'running', 1, 'w', now() + interval '1 minute'
         FROM generate_series(1, 3000)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM queue_jobs_all WHERE status = 'running' ORDER BY id LIMIT 2000",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let n = ids.len();
    let ones = vec![1_i32; n];
    let complete: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {COMPLETE_JOBS}")))
            .bind(&ids)
            .bind(&ones)
            .bind(vec!["done"; n])
            .bind(vec![0_i32; n])
            .bind(vec![None::<DateTime<Utc>>; n])
            .bind(vec![None::<String>; n])
            .bind(vec!["done"; n])
            .bind(vec![Utc::now(); n])
            .bind("w")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let complete_successes = explain_id_list(&db.pool, COMPLETE_SUCCESSES, &ids, &ones).await;
    let renew = explain_id_list(&db.pool, RENEW_LEASES, &ids, 30.0_f64).await;
    let release = explain_id_list(&db.pool, RELEASE_JOBS, &ids, &ones).await;
    for (name, lines) in [
        ("complete", complete),
        ("complete successes", complete_successes),
        ("renew", renew),
        ("release", release),
    ] {
        let text = lines.join("\n");
        assert!(
            !text.contains("queue_jobs_lease_idx"),
            "{name} scans queue_jobs_lease_idx:\n{text}"
        );
    }
}

/// The queue runs at the pace of PostgreSQL's CPU, and every index entry a claim or a
/// completion writes is paid per job: an index keyed by tenant first, written on every claim
/// and read by nothing, cost about a tenth of the throughput of claim-and-complete
/// (docs/benchmarks.md, twentieth round), and the (tenant, status, queue) index, written on
/// both, about an eighth (twenty-first round). A completion, which wrote the primary key and
/// the finished index, now deletes the row and packs it with its flush (twenty-second round).
/// An index that grows while a backlog is claimed, or completed, is one that step writes;
/// only these may.
#[tokio::test]
async fn claims_and_completions_write_only_the_indexes_they_need() {
    use jobs::queue::runtime::{CLAIM_JOBS, COMPLETE_SUCCESSES};
    use sqlx::Row;
    use std::collections::BTreeMap;
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO queue_jobs (queue, tenant_id, payload, max_attempts)
         SELECT 'graphdesk.probe',
                ('00000000-0000-0000-0000-' || lpad((g % 100)::text, 12, '0'))::uuid, '{}', 5
         FROM generate_series(1, 20000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let sizes = || async {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index
             WHERE indrelid IN ('queue_jobs'::regclass, 'queue_jobs_done'::regclass)",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        rows.into_iter().collect::<BTreeMap<String, i64>>()
    };
    let grown = |before: &BTreeMap<String, i64>, after: &BTreeMap<String, i64>| {
        after
            .iter()
            .filter(|(name, size)| before.get(*name) != Some(*size))
            .map(|(name, _)| name.clone())
            .collect::<Vec<_>>()
    };

    let pending = sizes().await;
    let mut claimed = Vec::new();
    loop {
        let rows = sqlx::query(CLAIM_JOBS)
            .bind("graphdesk.probe")
            .bind(2000_i64)
            .bind("w")
            .bind(30.0_f64)
            .fetch_all(&db.pool)
            .await
            .unwrap();
        if rows.is_empty() {
            break;
        }
        claimed.extend(rows.iter().map(|r| r.get::<i64, _>("id")));
    }
    assert_eq!(claimed.len(), 20000);
    let running = sizes().await;
    assert_writes_only(
        "claims",
        &grown(&pending, &running),
        "queue_jobs_lease_idx",
        &["queue_jobs_pkey"],
    );

    for ids in claimed.chunks(2000) {
        let done: Vec<(i64, bool)> = sqlx::query_as(COMPLETE_SUCCESSES)
            .bind(ids)
            .bind(vec![1_i32; ids.len()])
            .bind("w")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        assert_eq!(done.len(), ids.len());
    }
    // A completion deletes the job's row and packs it with its flush: no entry in any index
    // of queue_jobs, one per flush in queue_jobs_done's.
    assert_writes_only(
        "completions",
        &grown(&running, &sizes().await),
        "queue_jobs_done_finished_idx",
        &["queue_jobs_done_ids_idx", "queue_jobs_done_newest_idx"],
    );
}

/// `grown` (the indexes a step made larger) holds `own`, an index only that step's rows
/// enter (else growth would show nothing), and nothing but it and `also`.
fn assert_writes_only(step: &str, grown: &[String], own: &str, also: &[&str]) {
    assert!(
        grown.iter().any(|index| index == own),
        "{own} did not grow under {step}, so growth shows nothing: {grown:?}"
    );
    for index in grown {
        assert!(
            index == own || also.contains(&index.as_str()),
            "{step} wrote {index}: {grown:?}"
        );
    }
}

/// The plan of an id-list statement whose parameters are the ids, one more value, and the
/// worker `w`.
async fn explain_id_list<T>(pool: &sqlx::PgPool, sql: &str, ids: &[i64], second: T) -> Vec<String>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .bind(ids)
        .bind(second)
        .bind("w")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// `n` jobs running under worker `w`, leased for a minute.
async fn running_jobs(db: &TestDb, n: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "INSERT INTO queue_jobs (queue, payload, max_attempts, status, attempts, locked_by,
                                 lease_expires_at)
         SELECT 'graphdesk.probe', '{}', 5, 'running', 1, 'w', now() + interval '1 minute'
         FROM generate_series(1, $1) RETURNING id",
    )
    .bind(n)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// A transaction holding job `id`'s row, as a claim, a flush or an ops action would.
async fn hold_row(db: &TestDb, id: i64) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM queue_jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// `n` running jobs, the first one's row held by another transaction, and a connection that
/// fails a statement waiting for it.
struct HeldRow {
    db: TestDb,
    ids: Vec<i64>,
    holder: sqlx::Transaction<'static, sqlx::Postgres>,
    conn: sqlx::PgConnection,
}

async fn first_row_held(n: i64) -> HeldRow {
    let db = TestDb::new().await;
    let ids = running_jobs(&db, n).await;
    let holder = hold_row(&db, ids[0]).await;
    let conn = impatient_connection(&db).await;
    HeldRow {
        db,
        ids,
        holder,
        conn,
    }
}

/// Runs the successes-only flush statement for `ids` at `attempts` as `worker`.
async fn complete_successes<'c>(
    db: impl sqlx::PgExecutor<'c>,
    ids: &[i64],
    attempts: &[i32],
    worker: &str,
) -> Result<Vec<(i64, bool)>, sqlx::Error> {
    sqlx::query_as(jobs::queue::runtime::COMPLETE_SUCCESSES)
        .bind(ids)
        .bind(attempts)
        .bind(worker)
        .fetch_all(db)
        .await
}

/// A job done without an idempotency key leaves `queue_jobs` for a packed row of
/// `queue_jobs_done`, and reads back through every ops path as the row it would have been
/// updated to: each column kept but the completion's own, its id found, its status listed,
/// counted and purged. A job with a key stays in place, so its key still answers.
#[tokio::test]
async fn a_done_job_is_packed_and_reads_back_as_it_was() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let tenant = TenantId::new();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO queue_jobs (queue, tenant_id, payload, status, priority, attempts,
                                 max_attempts, run_at, locked_by, locked_at, lease_expires_at,
                                 idempotency_key, coalesce_key, last_error, errors, created_at)
         SELECT 'graphdesk.probe', $1, jsonb_build_object('n', g), 'running', g::smallint, 2,
                5, now() - interval '1 minute', 'w', now() - interval '2 seconds',
                now() + interval '1 minute', CASE WHEN g = 4 THEN 'key-4' END,
                'coalesce-' || g, 'first attempt failed',
                jsonb_build_array(jsonb_build_object('attempt', 1, 'at', now() - interval '30 seconds',
                                                   'error', 'first attempt failed')),
                now() - interval '1 hour'
         FROM generate_series(1, 4) g ORDER BY g RETURNING id",
    )
    .bind(tenant.as_uuid())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let kept_columns = "to_jsonb(j) - ARRAY['status', 'locked_by', 'lease_expires_at',
                                            'updated_at', 'finished_at']";
    let before: Vec<serde_json::Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {kept_columns} FROM queue_jobs j ORDER BY id"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();

    let applied = complete_successes(&db.pool, &ids, &[2; 4], "w")
        .await
        .unwrap();
    assert_eq!(applied.len(), 4);
    assert!(applied.iter().all(|(_, done)| *done), "{applied:?}");

    let in_place: Vec<(i64, String)> = sqlx::query_as("SELECT id, status FROM queue_jobs")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        in_place,
        vec![(ids[3], "done".to_string())],
        "only the keyed job stays"
    );
    let packed: Vec<(String, i64, i32, Vec<uuid::Uuid>)> = sqlx::query_as(
        "SELECT queue, cardinality(jobs)::bigint, job_count, tenant_ids FROM queue_jobs_done",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        packed,
        vec![("graphdesk.probe".to_string(), 3, 3, vec![tenant.as_uuid()])],
        "one row per queue per flush"
    );

    let after: Vec<serde_json::Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {kept_columns} FROM queue_jobs_all j ORDER BY id"
    )))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(after, before, "every column but the completion's is kept");
    let completion: Vec<(String, Option<String>, bool, bool)> = sqlx::query_as(
        "SELECT status, locked_by, lease_expires_at IS NULL,
                finished_at IS NOT NULL AND finished_at = updated_at
         FROM queue_jobs_all ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(completion, vec![("done".to_string(), None, true, true); 4]);

    let found = job(&queue, JobId::new(ids[1])).await;
    assert_eq!((found.status.as_str(), found.attempts), ("done", 2));
    assert_eq!(found.payload, serde_json::json!({"n": 2}));
    assert!(
        queue
            .get_job(JobId::new(ids[3] + 100))
            .await
            .unwrap()
            .is_none()
    );

    let done = |tenant| JobFilter {
        status: Some(JobStatus::Done),
        tenant,
        limit: 50,
        ..JobFilter::default()
    };
    let listed: Vec<i64> = queue
        .list_jobs(&done(Some(tenant)))
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    let newest_first: Vec<i64> = ids.iter().rev().copied().collect();
    assert_eq!(listed, newest_first);
    let page: Vec<i64> = queue
        .list_jobs(&JobFilter {
            before_id: Some(ids[2]),
            limit: 1,
            ..done(None)
        })
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(page, vec![ids[1]], "keyset pages run through packed jobs");
    assert!(
        queue
            .list_jobs(&JobFilter {
                status: Some(JobStatus::Pending),
                limit: 50,
                ..JobFilter::default()
            })
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        queue
            .list_jobs(&done(Some(TenantId::new())))
            .await
            .unwrap()
            .is_empty()
    );

    for scope in [None, Some(tenant)] {
        let counts: Vec<(String, String, i64)> = queue
            .queue_counts(scope)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.queue, c.status, c.count))
            .collect();
        assert_eq!(
            counts,
            vec![("graphdesk.probe".to_string(), "done".to_string(), 4)],
            "{scope:?}"
        );
    }
    assert!(
        queue
            .queue_counts(Some(TenantId::new()))
            .await
            .unwrap()
            .is_empty()
    );
    let stats: Vec<(String, i64)> = queue
        .stats()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.status, s.count))
        .collect();
    assert_eq!(stats, vec![("done".to_string(), 4)]);
    let buckets = queue
        .throughput(
            Some(tenant),
            Utc::now() - chrono::Duration::minutes(5),
            3600,
        )
        .await
        .unwrap();
    let (done_n, failed_n) = buckets
        .iter()
        .fold((0, 0), |(d, f), b| (d + b.done, f + b.failed));
    assert_eq!(
        (done_n, failed_n),
        (4, 4),
        "packed jobs count as done, their failures too"
    );

    assert_eq!(
        queue
            .purge_finished(Utc::now() - chrono::Duration::hours(1))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        queue
            .purge_finished(Utc::now() + chrono::Duration::minutes(1))
            .await
            .unwrap(),
        4
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// Flushes overlap in ids (two processes' batches interleave), so the job list's walk of
/// packed rows newest first may stop only once a page of matches lies at or above the next
/// row's largest id: stopping at the first full page would skip a newer job that a later
/// row holds.
#[tokio::test]
async fn the_job_list_pages_through_overlapping_packed_rows_in_id_order() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    for ids in [vec![10_i64, 40], vec![20, 30, 50], vec![5, 60]] {
        sqlx::query(
            "INSERT INTO queue_jobs_done (queue, finished_at, job_ids, tenant_ids, jobs, job_count)
             SELECT 'graphdesk.probe', now(), int8range(min(i), max(i), '[]'), '{}',
                    array_agg(ROW(i, 'graphdesk.probe', NULL, NULL, '{}', 'done', 0, 1, 5,
                                  now(), NULL, now(), NULL, NULL, NULL, NULL, '[]', now(),
                                  now(), now())::queue_jobs ORDER BY i),
                    count(*)
             FROM unnest($1::bigint[]) AS i",
        )
        .bind(&ids)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let page = |before_id: Option<i64>, limit: i64| {
        let queue = queue.clone();
        async move {
            queue
                .list_jobs(&JobFilter {
                    before_id,
                    limit,
                    ..JobFilter::default()
                })
                .await
                .unwrap()
                .iter()
                .map(|j| j.id)
                .collect::<Vec<i64>>()
        }
    };
    assert_eq!(page(None, 2).await, vec![60, 50]);
    assert_eq!(
        page(None, 3).await,
        vec![60, 50, 40],
        "the oldest row's 40 comes third"
    );
    assert_eq!(page(Some(50), 2).await, vec![40, 30]);
    assert_eq!(page(Some(30), 10).await, vec![20, 10, 5]);
}

/// The job list's newest page unpacks a few packed rows, not the whole history: its walk
/// goes down the newest-first index and stops once the page is settled. Without the stop it
/// read all 2,000 rows here (the lab's million packed jobs: 405 ms against 3.8 ms).
#[tokio::test]
async fn the_job_lists_newest_page_reads_a_few_packed_rows_not_the_history() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO queue_jobs_done (queue, finished_at, job_ids, tenant_ids, jobs, job_count)
         SELECT 'graphdesk.probe', now(), int8range(i, i, '[]'), '{}',
                ARRAY[ROW(i, 'graphdesk.probe', NULL, NULL, '{}', 'done', 0, 1, 5, now(), NULL,
                          now(), NULL, NULL, NULL, NULL, '[]', now(), now(), now())::queue_jobs],
                1
         FROM generate_series(1, 2000) AS i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE queue_jobs_done")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let before = QueueReads::now(&mut tx).await;
    let page: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM queue_jobs_done_page(NULL, NULL, NULL, NULL, NULL, 5)")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    let read = QueueReads::now(&mut tx).await.since(&before);
    assert_eq!(page, vec![2000, 1999, 1998, 1997, 1996]);
    assert_eq!(
        read.scans("queue_jobs_done"),
        0,
        "no scan of the packed table: {read:?}"
    );
    let entries = read.returned("queue_jobs_done_newest_idx");
    assert!(
        (1..=50).contains(&entries),
        "{entries} packed rows walked: {read:?}"
    );
}

/// The statuses of `ids`, in id order.
async fn statuses(db: &TestDb, ids: &[i64]) -> Vec<String> {
    sqlx::query_scalar("SELECT status FROM queue_jobs_all WHERE id = ANY ($1) ORDER BY id")
        .bind(ids)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// A flush's answer for three jobs whose first row another statement holds: that one
/// reported back to be sent again, the other two applied. Then the holder lets go, and the
/// jobs' statuses are `after`: the held one untouched.
async fn assert_first_held_rest_applied(
    held: HeldRow,
    mut outcome: Vec<(i64, bool)>,
    after: [&str; 3],
) {
    let ids = &held.ids;
    outcome.sort();
    assert_eq!(
        outcome,
        vec![(ids[0], false), (ids[1], true), (ids[2], true)]
    );
    held.holder.rollback().await.unwrap();
    assert_eq!(statuses(&held.db, ids).await, after);
}

/// A connection that gives up waiting for a lock after 3 s, so a statement that waits fails
/// instead of hanging. Detached from the pool: the setting must not outlive the test's use.
async fn impatient_connection(db: &TestDb) -> sqlx::PgConnection {
    let mut conn = db.pool.acquire().await.unwrap().detach();
    sqlx::query("SET lock_timeout = '3s'")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// A lease renewal must never wait for a row another statement holds: the completion flush
/// locks the same rows in its own order, and the two deadlocked under load (seen in the
/// benchmark: Postgres broke it after a second, and completions stalled that long).
#[tokio::test]
async fn a_lease_renewal_skips_rows_another_statement_holds() {
    use jobs::queue::runtime::RENEW_LEASES;
    // A flush (say) holds the first job's row.
    let mut held = first_row_held(2).await;
    let renewed = sqlx::query(RENEW_LEASES)
        .bind(&held.ids)
        .bind(600.0_f64)
        .bind("w")
        .execute(&mut held.conn)
        .await
        .expect("the renewal waited for the held row");
    assert_eq!(renewed.rows_affected(), 1);
    held.holder.rollback().await.unwrap();
    let extended: Vec<bool> = sqlx::query_scalar(
        "SELECT lease_expires_at > now() + interval '5 minutes' FROM queue_jobs_all
         WHERE id = ANY ($1) ORDER BY id",
    )
    .bind(&held.ids)
    .fetch_all(&held.db.pool)
    .await
    .unwrap();
    assert_eq!(extended, vec![false, true]);
}

/// A completion flush must never wait for a row another statement holds. A plain claim can
/// hold rows it does not claim (locking a version its snapshot still sees as pending locks the
/// newer versions too, and waits for their updater whatever SKIP LOCKED says); a flush that
/// waited for such a claim while the claim waited for it deadlocked in the benchmark, and
/// Postgres broke the deadlock only after a second. The held job is reported back, not lost.
#[tokio::test]
async fn a_completion_flush_skips_rows_another_statement_holds() {
    use jobs::queue::runtime::COMPLETE_JOBS;
    // A claim (say) holds the first job's row.
    let mut held = first_row_held(3).await;
    // The first two are plain successes, the third a retry.
    let retry_at = Utc::now() + chrono::Duration::minutes(5);
    let outcome: Vec<(i64, bool)> = sqlx::query_as(COMPLETE_JOBS)
        .bind(&held.ids)
        .bind(vec![1_i32; 3])
        .bind(vec!["done", "done", "pending"])
        .bind(vec![0_i32; 3])
        .bind(vec![None, None, Some(retry_at)])
        .bind(vec![None, None, Some("boom")])
        .bind(vec!["done", "done", "retry"])
        .bind(vec![Utc::now(); 3])
        .bind("w")
        .fetch_all(&mut held.conn)
        .await
        .expect("the flush waited for the held row");
    assert_first_held_rest_applied(held, outcome, ["running", "done", "pending"]).await;
}

/// The flush of a batch of plain successes uses its own statement, which must skip a held
/// row the same way: applied for the others, reported back for the held one, never waited for.
#[tokio::test]
async fn a_flush_of_successes_only_skips_rows_another_statement_holds() {
    let mut held = first_row_held(3).await;
    let outcome = complete_successes(&mut held.conn, &held.ids, &[1, 1, 1], "w")
        .await
        .expect("the flush waited for the held row");
    assert_first_held_rest_applied(held, outcome, ["running", "done", "done"]).await;
}

/// A recorded probe of `sleep_ms` running on one worker (leases of 30 s), its row held by
/// `holder`'s open transaction.
struct HeldProbe {
    db: TestDb,
    queue: Queue,
    worker: graphdesk_tests::WorkerProcess,
    id: JobId,
    holder: sqlx::Transaction<'static, sqlx::Postgres>,
}

async fn held_running_probe(sleep_ms: u64) -> HeldProbe {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let worker = spawn_worker(&db, opts(|q| q.lease = Duration::from_secs(30))).await;
    let probe = Probe {
        sleep_ms,
        record: true,
        ..Probe::default()
    };
    let id = queue
        .enqueue(&probe, EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    wait_status(&queue, id, "running", Duration::from_secs(10)).await;
    let holder = hold_row(&db, id.get()).await;
    HeldProbe {
        db,
        queue,
        worker,
        id,
        holder,
    }
}

/// A job whose completion met its row held elsewhere stays in flight and completes once the
/// row is free: once, without waiting for its lease to expire.
#[tokio::test]
async fn a_completion_held_back_by_a_locked_row_lands_once_the_row_is_free() {
    let HeldProbe {
        db,
        queue,
        worker: _worker,
        id,
        holder,
    } = held_running_probe(1_000).await;
    // The handler finishes while the row is held; its completion cannot land yet.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let ran: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_probe_runs WHERE job_id = $1")
        .bind(id.get())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(ran, 1, "the handler ran while the row was held");
    assert_eq!(job(&queue, id).await.status, "running");
    holder.commit().await.unwrap();
    let j = wait_status(&queue, id, "done", Duration::from_secs(5)).await;
    assert_eq!(j.attempts, 1);
    let ran: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_probe_runs WHERE job_id = $1")
        .bind(id.get())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(ran, 1, "the job ran once");
}

/// The same at shutdown: a completion waiting for a held row when the worker is told to stop
/// still lands once the row is free, instead of being dropped with the flusher, which left the
/// job running until its lease expired and then ran it a second time.
#[tokio::test]
async fn a_completion_held_back_at_shutdown_still_lands() {
    let HeldProbe {
        db,
        queue,
        mut worker,
        id,
        holder,
    } = held_running_probe(500).await;
    // The handler records its run as it returns; its completion then meets the held row.
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_probe_runs",
        1,
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    worker.signal(Signal::SIGTERM);
    // Long enough for the worker to stop taking completions; the row is still held.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(job(&queue, id).await.status, "running");
    holder.commit().await.unwrap();
    let exit = worker.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success(), "{exit:?}");
    let j = job(&queue, id).await;
    assert_eq!(
        j.status, "done",
        "the completion landed before the worker exited"
    );
    assert_eq!(j.attempts, 1);
}

/// A worker whose shutdown grace is `grace_secs`, its queue settings changed by `f`.
async fn worker_with(
    db: &TestDb,
    grace_secs: u64,
    f: impl FnOnce(&mut QueueSettings),
) -> graphdesk_tests::WorkerProcess {
    spawn_worker(
        db,
        WorkerOptions {
            shutdown_grace_secs: grace_secs,
            ..opts(f)
        },
    )
    .await
}

async fn enqueue_probe(queue: &Queue, probe: Probe, options: EnqueueOptions) -> JobId {
    queue.enqueue(&probe, options).await.unwrap().id
}

/// SIGTERM, then a clean exit; returns how long the worker took to stop.
async fn stop_gracefully(worker: &mut graphdesk_tests::WorkerProcess) -> Duration {
    let started = std::time::Instant::now();
    worker.signal(Signal::SIGTERM);
    let exit = worker.wait_exit(Duration::from_secs(30)).await;
    assert!(exit.success(), "{exit:?}");
    started.elapsed()
}

/// Jobs still running when the shutdown grace ends go back to pending without spending an
/// attempt. One of them shares its coalesce key with a job queued while it ran; handing it
/// back as pending would break the one-pending-per-key rule, and the unique index refused the
/// whole hand-back: every leftover stayed `running` until its lease ended and the reaper
/// spent an attempt on it. That one is superseded now, and the others go back at once.
#[tokio::test]
async fn jobs_handed_back_at_shutdown_go_back_even_when_one_is_superseded() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let mut worker = worker_with(&db, 1, |q| q.lease = Duration::from_secs(60)).await;
    let keyed = enqueue_probe(
        &queue,
        Probe {
            sleep_ms: 30_000,
            coalesce: Some("k".into()),
            ..Probe::default()
        },
        EnqueueOptions::default(),
    )
    .await;
    let plain = enqueue_probe(
        &queue,
        Probe {
            sleep_ms: 30_000,
            ..Probe::default()
        },
        EnqueueOptions::default(),
    )
    .await;
    wait_status(&queue, keyed, "running", Duration::from_secs(10)).await;
    wait_status(&queue, plain, "running", Duration::from_secs(10)).await;
    // The same work asked for again while the first runs: it waits, pending.
    let covering = enqueue_probe(
        &queue,
        Probe {
            coalesce: Some("k".into()),
            ..Probe::default()
        },
        EnqueueOptions::default().run_at(Utc::now() + chrono::Duration::minutes(5)),
    )
    .await;
    assert_ne!(covering, keyed);
    stop_gracefully(&mut worker).await;
    let p = job(&queue, plain).await;
    assert_eq!((p.status.as_str(), p.attempts), ("pending", 0), "{p:?}");
    let k = job(&queue, keyed).await;
    assert_eq!(k.status, "cancelled", "{k:?}");
    assert_eq!(job(&queue, covering).await.status, "pending");
}

/// A claim still on its way to the database when shutdown begins (here: waiting for a lock
/// on the jobs table) is part of the drain. The drain used to see nothing executing,
/// stop the completion flusher, and let the claim's jobs run with nowhere to report: they
/// stayed `running` until their leases ended and then ran again.
#[tokio::test]
async fn a_claim_in_flight_at_shutdown_still_has_its_jobs_completed() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let id = enqueue_probe(
        &queue,
        Probe {
            record: true,
            ..Probe::default()
        },
        EnqueueOptions::default(),
    )
    .await;
    // Reads go on under this lock, but a claim's row locks wait for it: holding it parks
    // every claim.
    let mut lock_holder = db.pool.acquire().await.unwrap().detach();
    sqlx::query("BEGIN")
        .execute(&mut lock_holder)
        .await
        .unwrap();
    sqlx::query("LOCK TABLE queue_jobs IN EXCLUSIVE MODE")
        .execute(&mut lock_holder)
        .await
        .unwrap();
    let mut worker = worker_with(&db, 10, |q| q.tenant_concurrency = Some(4)).await;
    // Every fetcher claims at start and waits for the lock: once the number waiting has
    // stopped growing for a second, the probe queue's claim is among them.
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
             WHERE l.locktype = 'relation' AND l.relation = 'queue_jobs'::regclass
               AND NOT l.granted AND d.datname = current_database()",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (mut seen, mut since) = (0, std::time::Instant::now());
    loop {
        let now_waiting = waiting().await;
        if now_waiting != seen {
            (seen, since) = (now_waiting, std::time::Instant::now());
        } else if seen > 0 && since.elapsed() >= Duration::from_secs(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "claims did not settle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::query("ROLLBACK")
        .execute(&mut lock_holder)
        .await
        .unwrap();
    let exit = worker.wait_exit(Duration::from_secs(30)).await;
    assert!(exit.success(), "{exit:?}");
    let j = job(&queue, id).await;
    let ran: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_probe_runs WHERE job_id = $1")
        .bind(id.get())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (j.status.as_str(), j.attempts, ran),
        ("done", 1, 1),
        "{j:?}"
    );
}

/// A completion counts only for the worker that holds the job: the attempt number alone
/// can repeat (a hand-back refunds it), and a stale run's result must not land on another
/// worker's run of the same attempt.
#[tokio::test]
async fn a_completion_from_a_worker_that_no_longer_holds_the_job_is_not_applied() {
    use jobs::queue::runtime::COMPLETE_JOBS;
    let db = TestDb::new().await;
    // Held by worker `w`, attempt 1.
    let ids = running_jobs(&db, 2).await;
    let outcome: Vec<(i64, bool)> = sqlx::query_as(COMPLETE_JOBS)
        .bind(&ids)
        .bind(vec![1_i32; 2])
        .bind(vec!["done", "dead"])
        .bind(vec![0_i32; 2])
        .bind(vec![None::<DateTime<Utc>>; 2])
        .bind(vec![None, Some("boom")])
        .bind(vec!["done", "dead"])
        .bind(vec![Utc::now(); 2])
        .bind("another-worker")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(outcome, vec![], "neither applied nor reported as held");
    assert_eq!(statuses(&db, &ids).await, vec!["running", "running"]);
}

/// The same compare-and-set in the successes-only flush: a success reported by a worker that
/// no longer holds the job, or for an earlier attempt, is neither applied nor reported held.
#[tokio::test]
async fn a_success_from_a_stale_run_is_not_applied() {
    let db = TestDb::new().await;
    // Held by worker `w`, attempt 1.
    let ids = running_jobs(&db, 2).await;
    let by_another_worker = complete_successes(&db.pool, &ids[..1], &[1], "another-worker")
        .await
        .unwrap();
    assert_eq!(by_another_worker, vec![], "another worker's success");
    let earlier_attempt = complete_successes(&db.pool, &ids[1..], &[0], "w")
        .await
        .unwrap();
    assert_eq!(earlier_attempt, vec![], "an earlier attempt's success");
    assert_eq!(statuses(&db, &ids).await, vec!["running", "running"]);
}

/// At most one job is pending per coalesce key, and the unique index enforces it. An ops
/// retry of a job whose work a pending job already covers is refused with that reason, and a
/// bulk retry of several superseded jobs of one key puts only the newest back; it used to fail
/// whole on the unique index.
#[tokio::test]
async fn ops_retries_keep_one_pending_job_per_coalesce_key() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let keyed = |key: &str| Probe {
        coalesce: Some(key.into()),
        ..Probe::default()
    };
    let mut cancelled = Vec::new();
    for key in ["a", "a", "b"] {
        let id = queue
            .enqueue(&keyed(key), EnqueueOptions::default())
            .await
            .unwrap()
            .id;
        sqlx::query(
            "UPDATE queue_jobs SET status = 'cancelled', finished_at = now() WHERE id = $1",
        )
        .bind(id.get())
        .execute(&db.pool)
        .await
        .unwrap();
        cancelled.push(id);
    }
    let covering = queue
        .enqueue(&keyed("b"), EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    let audit = |action| AuditEntry {
        tenant: None,
        actor: "queue-test",
        action,
        entity_type: "job",
        entity_id: "test",
        details: serde_json::json!({}),
    };
    assert_eq!(
        queue
            .retry_job(cancelled[2], &audit("job.retried"))
            .await
            .unwrap(),
        RetryOutcome::Covered(covering)
    );
    let retried = queue
        .retry_matching(&JobFilter::default(), |_| audit("job.bulk_retried"))
        .await
        .unwrap();
    assert_eq!(retried, 1, "only the newest of key a");
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM queue_jobs_all ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        statuses,
        vec!["cancelled", "pending", "cancelled", "pending"]
    );
}

/// A worker can claim a job again while its own earlier run of it is still going (the lease
/// lapsed while the database was out of reach, the job went back to pending, and the same
/// worker took it). Its bookkeeping was keyed by job id alone: the earlier run's end cleared
/// the newer run's entry, the newer run's end then counted nothing, and the worker believed
/// one handler was still running for ever, so its next shutdown waited out the whole grace.
#[tokio::test]
async fn a_job_claimed_again_by_the_worker_still_running_it_keeps_its_books_straight() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let mut worker = worker_with(&db, 15, |q| q.lease = Duration::from_secs(30)).await;
    let id = enqueue_probe(
        &queue,
        Probe {
            sleep_ms: 2_000,
            record: true,
            ..Probe::default()
        },
        EnqueueOptions::default(),
    )
    .await;
    wait_status(&queue, id, "running", Duration::from_secs(10)).await;
    // What the reaper does after a lapsed lease; the same worker claims it again.
    sqlx::query(
        "UPDATE queue_jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL,
                run_at = now()
         WHERE id = $1",
    )
    .bind(id.get())
    .execute(&db.pool)
    .await
    .unwrap();
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_probe_runs",
        2,
        Duration::from_secs(15),
    )
    .await;
    let j = wait_status(&queue, id, "done", Duration::from_secs(15)).await;
    assert_eq!(j.attempts, 2);
    let took = stop_gracefully(&mut worker).await;
    assert!(
        took < Duration::from_secs(8),
        "nothing was running, yet shutdown took {took:?}"
    );
}

/// Claims must stay index lookups once the queue has fresh statistics, as autovacuum takes
/// them on any real server. On an analyzed queue of 20,000 pending jobs over 100 tenants, 75
/// of them at their limit, the limited claim of an earlier release joined its picked ids by a
/// nested loop over a sequential scan of the whole table (178 ms for one claim of 100), the
/// plain claim by a hash join over one (20 ms instead of 5), and a skip scan over tenants like
/// the grant sync's walked the (tenant_id, status, queue) index, which also held every
/// finished job (its check for a tenant's due jobs used that index until the migration
/// 20261128000020; the index is gone since 20261130000010).
#[tokio::test]
async fn claims_stay_index_lookups_on_an_analyzed_busy_queue() {
    let db = TestDb::new().await;
    let mut tenants = Vec::new();
    for i in 0..100 {
        tenants.push(db.create_tenant(&format!("tenant-{i}")).await.as_uuid());
    }
    tenants.sort();
    sqlx::query(
        "INSERT INTO queue_jobs (queue, tenant_id, payload, max_attempts)
         SELECT 'graphdesk.probe', ($1::uuid[])[g % 100 + 1], '{}', 5
         FROM generate_series(0, 19999) g ORDER BY g",
    )
    .bind(&tenants)
    .execute(&db.pool)
    .await
    .unwrap();
    // The first 75 tenants each run 4 jobs: at the default limit.
    sqlx::query(
        "UPDATE queue_jobs SET status = 'running', attempts = 1, locked_by = 'w',
             locked_at = now(), lease_expires_at = now() + interval '1 minute'
         WHERE id IN (SELECT id FROM (
             SELECT id, tenant_id,
                    row_number() OVER (PARTITION BY tenant_id ORDER BY id) AS n
             FROM queue_jobs_all) x
           WHERE x.n <= 4 AND x.tenant_id = ANY ($1))",
    )
    .bind(&tenants[..75])
    .execute(&db.pool)
    .await
    .unwrap();
    // Claims with tenant limits take each tenant's free slots; the grant sync finds the
    // tenants with due jobs, counts the running jobs of workers whose grants lapsed (here the
    // 300 of a dead worker, so only the last 25 tenants have room) and grants.
    sqlx::query(
        "INSERT INTO queue_tenant_grants (tenant_id, worker_id, slots, wants, wanted_at, expires_at)
         SELECT t, 'w', 4, true, now(), now() - interval '1 second' FROM unnest($1::uuid[]) t",
    )
    .bind(&tenants[..75])
    .execute(&db.pool)
    .await
    .unwrap();
    let rooms = vec![2_i32; tenants.len()];
    // Before and after the queue is analyzed: a server without autovacuum never analyzes it.
    for analyzed in [false, true] {
        if analyzed {
            vacuum_analyze_queue(&db).await;
        }
        claims_use_their_indexes(&db, &tenants, &rooms, analyzed).await;
    }
}

async fn claims_use_their_indexes(
    db: &TestDb,
    tenants: &[uuid::Uuid],
    rooms: &[i32],
    analyzed: bool,
) {
    use jobs::queue::runtime::{CLAIM_GRANTED_JOBS, CLAIM_JOBS, CLAIM_SESSION};
    let sync = "SELECT count(*) FROM queue_sync_tenant_grants('w2', '{graphdesk.probe}', 1, 4,
                    30, '{}', '{}', 256, '00000000-0000-0000-0000-000000000000', 0)";
    for name in ["granted claim", "grant sync", "plain claim"] {
        let mut tx = db.pool.begin().await.unwrap();
        if name != "grant sync" {
            for (setting, value) in CLAIM_SESSION {
                sqlx::query("SELECT set_config($1, $2, true)")
                    .bind(setting)
                    .bind(value)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
        }
        let before = QueueReads::now(&mut tx).await;
        let (got, expected) = match name {
            "granted claim" => (
                sqlx::query(CLAIM_GRANTED_JOBS)
                    .bind("graphdesk.probe")
                    .bind("w2")
                    .bind(tenants)
                    .bind(rooms)
                    .bind(200_i32)
                    .bind(30.0_f64)
                    .bind(vec![None::<i16>; tenants.len()])
                    .bind(vec![None::<DateTime<Utc>>; tenants.len()])
                    .bind(vec![None::<i64>; tenants.len()])
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap()
                    .len() as i64,
                200,
            ),
            "grant sync" => (
                sqlx::query_scalar(sync).fetch_one(&mut *tx).await.unwrap(),
                25,
            ),
            _ => (
                sqlx::query(CLAIM_JOBS)
                    .bind("graphdesk.probe")
                    .bind(200_i64)
                    .bind("w2")
                    .bind(30.0_f64)
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap()
                    .len() as i64,
                200,
            ),
        };
        let read = QueueReads::now(&mut tx).await.since(&before);
        tx.rollback().await.unwrap();
        let (seq_scans, lease_index_scans, head_index_scans, lease_index_rows) = (
            read.scans("queue_jobs"),
            read.scans("queue_jobs_lease_idx"),
            read.scans("queue_jobs_claim_idx"),
            read.returned("queue_jobs_lease_idx"),
        );
        let name = format!("{name} (analyzed: {analyzed})");
        assert_eq!(got, expected, "{name}");
        assert_eq!(seq_scans, 0, "{name} scanned queue_jobs sequentially");
        // The claims never read running jobs. The grant sync counts the dead worker's 300
        // running jobs, which its 75 lapsed rows stand for, in one walk of the lease index
        // (the running jobs' only index since 20261130000010), which also still holds the
        // entries of the granted claim rolled back just before (200): a lookup per lapsed row
        // would return 75 times as many, twice (the row's check and its count).
        let running_rows = if name.starts_with("grant sync") {
            75 * 4 + 200
        } else {
            0
        };
        assert!(
            lease_index_rows <= running_rows,
            "{name} walked the lease index: {lease_index_scans} scans returned \
             {lease_index_rows} entries, at most {running_rows} expected"
        );
        if !name.starts_with("plain claim") {
            assert_eq!(
                head_index_scans, 0,
                "{name} filtered the queue's head index by tenant"
            );
        }
    }
}

/// The tenants page's running and pending counts read the live jobs' own indexes (the lease
/// index, the pending indexes) once for all tenants, never the table: with 20,000 finished
/// jobs beside a few live ones, a scan of queue_jobs would read the whole history on every
/// page view, and a lookup per tenant would read every live job once per tenant. Before and
/// after the queue is analyzed, for every tenant and for one.
#[tokio::test]
async fn tenant_load_counts_read_live_jobs_only() {
    use jobs::queue::TENANT_LOAD;
    let db = TestDb::new().await;
    let busy = db.create_tenant("busy").await.as_uuid();
    let mut idle = Vec::new();
    for i in 0..50 {
        idle.push(db.create_tenant(&format!("idle-{i:02}")).await.as_uuid());
    }
    sqlx::query(
        "INSERT INTO queue_jobs (queue, tenant_id, payload, max_attempts, status, finished_at)
         SELECT 'graphdesk.probe', $1, '{}', 5, 'done', now() FROM generate_series(1, 20000)",
    )
    .bind(busy)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO queue_jobs (queue, tenant_id, payload, max_attempts, status, attempts,
                                 locked_by, lease_expires_at)
         SELECT 'graphdesk.probe', $1, '{}', 5, s, 1, 'w', now() + interval '1 minute'
         FROM unnest(ARRAY['running', 'running', 'pending']) s",
    )
    .bind(busy)
    .execute(&db.pool)
    .await
    .unwrap();
    for analyzed in [false, true] {
        if analyzed {
            vacuum_analyze_queue(&db).await;
        }
        for only in [None, Some(busy)] {
            let mut tx = db.pool.begin().await.unwrap();
            let before = QueueReads::now(&mut tx).await;
            let load: Vec<(uuid::Uuid, String, Option<i32>, i64, i64)> =
                sqlx::query_as(TENANT_LOAD)
                    .bind(only)
                    .bind(500_i64)
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap();
            let read = QueueReads::now(&mut tx).await.since(&before);
            tx.rollback().await.unwrap();
            let live_entries = read.returned("queue_jobs_lease_idx")
                + read.returned("queue_jobs_claim_idx")
                + read.returned("queue_jobs_tenant_claim_idx");
            let case = format!("analyzed: {analyzed}, only: {only:?}");
            let counts: Vec<(uuid::Uuid, i64, i64)> = load
                .into_iter()
                .map(|(id, _, _, r, p)| (id, r, p))
                .collect();
            let mut expected = vec![(busy, 2, 1)];
            if only.is_none() {
                expected.extend(idle.iter().map(|t| (*t, 0, 0)));
            }
            assert_eq!(counts, expected, "{case}");
            assert!(
                live_entries <= 3,
                "{case}: read {live_entries} live-job index entries for 3 live jobs"
            );
            assert_eq!(
                read.scans("queue_jobs"),
                0,
                "{case}: scanned queue_jobs sequentially"
            );
        }
    }
}

/// Deferrals spend no attempt, so nothing but this bounds the history of a job that waits
/// again and again; both writers of the history (the completion flush and the reaper) keep it.
#[tokio::test]
async fn a_jobs_error_history_keeps_its_newest_fifty_entries() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let earlier_waits = serde_json::Value::Array(
        (1..=50)
            .map(|i| {
                serde_json::json!({
                    "attempt": 0, "at": "2026-11-01T00:00:00Z", "kind": "deferred",
                    "error": format!("wait {i}"),
                })
            })
            .collect(),
    );
    let set_history = |id: JobId| {
        let (pool, history) = (db.pool.clone(), earlier_waits.clone());
        async move {
            sqlx::query("UPDATE queue_jobs SET errors = $2 WHERE id = $1")
                .bind(id.get())
                .bind(history)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let failing_once = Probe {
        fail_attempts: 1,
        ..Probe::default()
    };
    let failed = queue
        .enqueue(&failing_once, EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    set_history(failed).await;
    // Its worker died mid-run: running, lease expired.
    let stranded = queue
        .enqueue(&Probe::default(), EnqueueOptions::default())
        .await
        .unwrap()
        .id;
    set_history(stranded).await;
    sqlx::query(
        "UPDATE queue_jobs SET status = 'running', attempts = 1, locked_by = 'dead-worker',
            lease_expires_at = now() - interval '1 minute' WHERE id = $1",
    )
    .bind(stranded.get())
    .execute(&db.pool)
    .await
    .unwrap();
    let recovered = jobs::queue::runtime::reap_expired(&db.pool).await.unwrap();
    assert_eq!(recovered, 1);
    let _w = spawn_worker(&db, WorkerOptions::default()).await;
    for (id, newest) in [(failed, "retry"), (stranded, "lease_expired")] {
        let j = wait_status(&queue, id, "done", Duration::from_secs(30)).await;
        let history = j.errors.as_array().unwrap();
        assert_eq!(history.len(), 50, "{id}: {}", j.errors);
        assert_eq!(
            history[0]["error"], "wait 2",
            "the oldest entry went: {}",
            j.errors
        );
        assert_eq!(history[49]["kind"], newest, "{}", j.errors);
    }
}

/// One grant sync for `worker` reporting `bounds` (tenant, the most it may hold); returns the
/// slots it may fill per tenant.
async fn grant_sync(
    db: &TestDb,
    worker: &str,
    bounds: &[(TenantId, i32)],
) -> std::collections::HashMap<uuid::Uuid, i32> {
    let tenants: Vec<uuid::Uuid> = bounds.iter().map(|(t, _)| t.as_uuid()).collect();
    let sizes: Vec<i32> = bounds.iter().map(|(_, n)| *n).collect();
    sqlx::query_as::<_, (uuid::Uuid, i32)>(
        "SELECT * FROM queue_sync_tenant_grants($1, '{graphdesk.probe}', $2, 4, 60, $3, $4, 256,
                                                '00000000-0000-0000-0000-000000000000', 0)",
    )
    .bind(worker)
    .bind(jobs::queue::runtime::TENANT_CLAIM_LOCK)
    .bind(&tenants)
    .bind(&sizes)
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// A worker keeps a tenant's slots for a while after the tenant's last due job, so its next
/// job starts without waiting for a sync, but gives them up at once to another worker that
/// wants the tenant, and for good once the linger is over.
#[tokio::test]
async fn idle_tenant_slots_linger_until_another_worker_wants_them() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let tenant = db.create_tenant("quiet").await;
    let id = enqueue_probe(
        &queue,
        Probe {
            tenant: Some(tenant),
            ..Probe::default()
        },
        EnqueueOptions::default(),
    )
    .await;
    let sync = |worker: &'static str, linger_secs: f64| {
        sqlx::query_as::<_, (uuid::Uuid, i32)>(
            "SELECT * FROM queue_sync_tenant_grants($1, '{graphdesk.probe}', $2, 4, 60, '{}', '{}',
                 256, '00000000-0000-0000-0000-000000000000', $3)",
        )
        .bind(worker)
        .bind(jobs::queue::runtime::TENANT_CLAIM_LOCK)
        .bind(linger_secs)
        .fetch_all(&db.pool)
    };
    assert_eq!(sync("a", 60.0).await.unwrap(), vec![(tenant.as_uuid(), 4)]);
    sqlx::query("UPDATE queue_jobs SET status = 'cancelled' WHERE id = $1")
        .bind(id.get())
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        sync("a", 60.0).await.unwrap(),
        vec![(tenant.as_uuid(), 4)],
        "no due jobs, but within the linger: the slots stay"
    );
    assert!(
        sync("a", 0.0).await.unwrap().is_empty(),
        "past the linger the slots go back"
    );
    assert_eq!(sync("a", 60.0).await.unwrap(), vec![]);
    // Lingering again (the tenant had work), until another worker wants the tenant.
    enqueue_probe(
        &queue,
        Probe {
            tenant: Some(tenant),
            ..Probe::default()
        },
        EnqueueOptions::default(),
    )
    .await;
    assert_eq!(sync("a", 60.0).await.unwrap(), vec![(tenant.as_uuid(), 4)]);
    sqlx::query("UPDATE queue_jobs SET status = 'cancelled' WHERE status = 'pending'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO queue_tenant_grants (tenant_id, worker_id, slots, wants, wanted_at, expires_at)
         VALUES ($1, 'b', 0, true, now(), now() + interval '1 minute')",
    )
    .bind(tenant.as_uuid())
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(
        sync("a", 60.0).await.unwrap().is_empty(),
        "another worker wants the tenant: lingering slots go to it"
    );
}

/// Per tenant: the slots of every live grant plus its running jobs that no live grant
/// covers (a dead worker's), which is what the limit bounds.
async fn granted_or_uncovered(db: &TestDb, tenant: TenantId) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT coalesce(sum(slots), 0) FROM queue_tenant_grants
                 WHERE tenant_id = $1 AND expires_at >= now())
              + (SELECT count(*) FROM queue_jobs_all r
                 WHERE r.tenant_id = $1 AND r.status = 'running'
                   AND NOT EXISTS (SELECT 1 FROM queue_tenant_grants g
                                   WHERE g.tenant_id = $1 AND g.worker_id = r.locked_by
                                     AND g.expires_at >= now()))",
    )
    .bind(tenant.as_uuid())
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// The grant protocol step by step, as two and three processes would drive it: the first to
/// ask gets all it may use, a second wanting the same tenant gets a fair share as the first
/// one's jobs finish, a tenant's own limit and a dead worker's running jobs count (through
/// its lapsed rows), lapsed grants are taken back, and at no step do a tenant's grants exceed
/// its limit.
#[tokio::test]
async fn tenant_slot_grants_share_each_limit_and_never_exceed_it() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let busy = db.create_tenant("busy").await;
    let single = tenant_limited_to_one(&db).await;
    for tenant in [busy, single] {
        let probes: Vec<Probe> = (0..10)
            .map(|_| Probe {
                tenant: Some(tenant),
                ..Probe::default()
            })
            .collect();
        queue.enqueue_batch(&probes).await.unwrap();
    }
    let within_limits = || async {
        assert!(granted_or_uncovered(&db, busy).await <= 4);
        assert!(granted_or_uncovered(&db, single).await <= 1);
    };
    let (b, s) = (busy.as_uuid(), single.as_uuid());

    // Alone, a worker is granted each tenant's whole limit.
    let a = grant_sync(&db, "a", &[]).await;
    assert_eq!((a.get(&b), a.get(&s)), (Some(&4), Some(&1)));
    within_limits().await;
    // A second worker wants them too: nothing is free yet.
    let second = grant_sync(&db, "b", &[]).await;
    assert!(second.is_empty(), "{second:?}");
    within_limits().await;
    // The first worker is told its fair share, while its row still covers the 4 jobs it may
    // be running until it syncs again...
    let a = grant_sync(&db, "a", &[(busy, 4), (single, 1)]).await;
    assert_eq!((a.get(&b), a.get(&s)), (Some(&2), Some(&1)));
    assert!(grant_sync(&db, "b", &[]).await.is_empty());
    within_limits().await;
    // ...and once it runs no more than that, the second worker gets the rest.
    grant_sync(&db, "a", &[(busy, 2), (single, 1)]).await;
    let second = grant_sync(&db, "b", &[]).await;
    assert_eq!((second.get(&b), second.get(&s)), (Some(&2), None));
    within_limits().await;

    // A worker died running one job of the tenant; its row (of 2 slots) lapsed. The row stays
    // and stands for that job, not for its slots, until the reaper takes the job back.
    sqlx::query(
        "UPDATE queue_jobs SET status = 'running', attempts = 1, locked_by = 'dead',
             lease_expires_at = now() + interval '1 minute'
         WHERE id = (SELECT min(id) FROM queue_jobs_all WHERE tenant_id = $1)",
    )
    .bind(b)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO queue_tenant_grants (tenant_id, worker_id, slots, wants, wanted_at, expires_at)
         VALUES ($1, 'dead', 2, true, now(), now() - interval '1 second')",
    )
    .bind(b)
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(grant_sync(&db, "c", &[]).await.is_empty());
    // The first worker's rows lapse (it stopped syncing): their slots go to those who want
    // them, less the dead worker's job.
    sqlx::query("UPDATE queue_tenant_grants SET expires_at = now() - interval '1 second' WHERE worker_id = 'a'")
        .execute(&db.pool)
        .await
        .unwrap();
    let third = grant_sync(&db, "c", &[]).await;
    assert_eq!((third.get(&b), third.get(&s)), (Some(&1), Some(&1)));
    within_limits().await;
    let lapsed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_tenant_grants WHERE worker_id = 'a'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(lapsed, 0, "a lapsed worker's rows are deleted");
    let dead_rows = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM queue_tenant_grants WHERE worker_id = 'dead'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(
        dead_rows().await,
        1,
        "it still stands for the dead worker's job"
    );
    // The reaper returns the job: the row goes, and its slot with it.
    sqlx::query(
        "UPDATE queue_jobs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL
         WHERE locked_by = 'dead'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let third = grant_sync(&db, "c", &[(busy, 1), (single, 1)]).await;
    assert_eq!((third.get(&b), third.get(&s)), (Some(&2), Some(&1)));
    assert_eq!(dead_rows().await, 0);
    within_limits().await;

    // With no due jobs left, a worker that holds nothing gives its slots back.
    sqlx::query("UPDATE queue_jobs SET status = 'cancelled' WHERE status = 'pending'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(grant_sync(&db, "b", &[(busy, 0)]).await.is_empty());
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_tenant_grants WHERE worker_id = 'b'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
}

/// At shutdown a worker gives its slots back at once instead of when its rows lapse, except
/// for a tenant whose job it could not finish writing: that job is still `running` in the
/// database, and the row stays to stand for it until the reaper takes it back.
#[tokio::test]
async fn a_stopping_worker_gives_back_its_slots_but_those_of_jobs_left_running() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let finished = db.create_tenant("finished").await;
    let stuck = db.create_tenant("stuck").await;
    let probe = |tenant| Probe {
        tenant: Some(tenant),
        ..Probe::default()
    };
    let mut worker = worker_with(&db, 1, |q| q.tenant_concurrency = Some(4)).await;
    let done = enqueue_probe(&queue, probe(finished), EnqueueOptions::default()).await;
    wait_status(&queue, done, "done", Duration::from_secs(30)).await;
    // The stuck tenant's job is claimed, then its row is held so its completion cannot be
    // written: the flush gives up on it at shutdown.
    let left = enqueue_probe(
        &queue,
        Probe {
            sleep_ms: 300,
            ..probe(stuck)
        },
        EnqueueOptions::default(),
    )
    .await;
    wait_status(&queue, left, "running", Duration::from_secs(30)).await;
    let holder = hold_row(&db, left.get()).await;
    stop_gracefully(&mut worker).await;
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT tenant_id, worker_id FROM queue_tenant_grants")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let locked_by: Option<String> =
        sqlx::query_scalar("SELECT locked_by FROM queue_jobs_all WHERE id = $1")
            .bind(left.get())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![(
            stuck.as_uuid(),
            locked_by.expect("still locked by the worker")
        )],
        "only the row of the tenant whose job is still running stays"
    );
    holder.rollback().await.unwrap();
}

/// A tenant's slot is free once its handler returns: the limit bounds handlers running, so a
/// completion that cannot be written yet (here its row is held by another transaction, and
/// the flush skips it) does not hold the tenant's next job back. Slots used to be held until
/// the completion was flushed, and then the returned slot woke no fetcher: with the poll 30 s
/// away and nothing enqueued meanwhile, only that wake-up starts the next job in time.
#[tokio::test]
async fn a_tenants_next_job_starts_while_the_last_ones_completion_waits_to_be_written() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let tenant = db.create_tenant("one-at-a-time").await;
    let probe = |sleep_ms| Probe {
        tenant: Some(tenant),
        record: true,
        sleep_ms,
        ..Probe::default()
    };
    let first = enqueue_probe(&queue, probe(500), EnqueueOptions::default()).await;
    let _worker = worker_polling_every_30s(&db, 1).await;
    wait_status(&queue, first, "running", Duration::from_secs(30)).await;
    let holder = hold_row(&db, first.get()).await;
    let second = enqueue_probe(&queue, probe(0), EnqueueOptions::default()).await;
    let ran = |id: JobId| {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM queue_probe_runs WHERE job_id = $1")
            .bind(id.get())
            .fetch_one(&db.pool)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ran(second).await.unwrap() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tenant's next job waited for the last one's completion to be written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ran(first).await.unwrap(),
        1,
        "the first job's handler had returned"
    );
    assert_eq!(
        job(&queue, first).await.status,
        "running",
        "its completion was still waiting for the held row"
    );
    holder.rollback().await.unwrap();
    wait_status(&queue, first, "done", Duration::from_secs(30)).await;
    wait_status(&queue, second, "done", Duration::from_secs(30)).await;
}

/// A claim cursor (where this process's last limited claim of a tenant stopped) starts the
/// tenant's next descent after it, and the index itself rejects what lies before: the taken
/// jobs there each cost a visit to their row otherwise, until vacuum. A tenant without a
/// cursor is claimed from its head.
#[tokio::test]
async fn limited_claims_start_after_a_tenants_cursor_and_at_its_head_without_one() {
    use jobs::queue::runtime::CLAIM_GRANTED_JOBS;
    let db = TestDb::new().await;
    let a = db.create_tenant("a").await.as_uuid();
    let b = db.create_tenant("b").await.as_uuid();
    // a b a b ...: jobs 1, 3, 5... are a's, 2, 4, 6... b's; one statement, one run_at.
    let mut jobs: Vec<(i64, uuid::Uuid, i16, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO queue_jobs (queue, tenant_id, payload, max_attempts)
         SELECT 'graphdesk.probe', CASE WHEN g % 2 = 1 THEN $1::uuid ELSE $2::uuid END, '{}', 5
         FROM generate_series(1, 12) g ORDER BY g
         RETURNING id, tenant_id, priority, run_at",
    )
    .bind(a)
    .bind(b)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    jobs.sort_by_key(|j| j.0);
    let of =
        |t: uuid::Uuid| -> Vec<i64> { jobs.iter().filter(|j| j.1 == t).map(|j| j.0).collect() };
    let (a_jobs, b_jobs) = (of(a), of(b));
    let a3 = jobs.iter().find(|j| j.0 == a_jobs[2]).unwrap();

    // The plan, then the claim itself, with the same arguments: a has a cursor at its third
    // job and room for 2, b no cursor and room for 2.
    let mut tx = db.pool.begin().await.unwrap();
    let mut answers = Vec::new();
    for sql in [
        format!("EXPLAIN {CLAIM_GRANTED_JOBS}"),
        format!("WITH c AS ({CLAIM_GRANTED_JOBS}) SELECT id::text FROM c"),
    ] {
        let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind("graphdesk.probe")
            .bind("w")
            .bind(vec![a, b])
            .bind(vec![2_i32, 2])
            .bind(10_i32)
            .bind(30.0_f64)
            .bind(vec![Some(a3.2), None])
            .bind(vec![Some(a3.3), None])
            .bind(vec![Some(a3.0), None])
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        answers.push(lines);
    }
    tx.rollback().await.unwrap();
    let (plan, claimed) = (&answers[0], &answers[1]);
    let mut claimed: Vec<i64> = claimed.iter().map(|id| id.parse().unwrap()).collect();
    claimed.sort_unstable();
    let mut expected = vec![a_jobs[3], a_jobs[4], b_jobs[0], b_jobs[1]];
    expected.sort_unstable();
    assert_eq!(claimed, expected, "a's after its cursor, b's from its head");
    // The cursor must bound the index scan (an Index Cond), not filter the rows it fetched.
    assert!(
        plan.iter()
            .any(|l| l.contains("Index Cond") && l.contains("ROW(") && l.contains("run_at")),
        "the cursor is not an index condition:\n{}",
        plan.join("\n")
    );
}

/// A job a limited claim passed by (locked by someone else at the time) lies before its
/// tenant's cursor once the claims after it moved on; it must still run.
#[tokio::test]
async fn a_job_passed_over_while_locked_still_runs() {
    let db = TestDb::new().await;
    let queue = Queue::new(db.pool.clone());
    let tenant = db.create_tenant("busy").await;
    let probes: Vec<Probe> = (0..41)
        .map(|_| Probe {
            tenant: Some(tenant),
            ..Probe::default()
        })
        .collect();
    let ids = queue.enqueue_batch(&probes).await.unwrap();
    let first = ids[0];
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM queue_jobs WHERE id = $1 FOR UPDATE")
        .bind(first.get())
        .execute(&mut *holder)
        .await
        .unwrap();
    let _w = spawn_worker(
        &db,
        opts(|q| {
            q.batch_size = 3;
            q.worker_concurrency = 3;
            q.tenant_concurrency = Some(3);
        }),
    )
    .await;
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_jobs_all WHERE status = 'done'",
        40,
        Duration::from_secs(60),
    )
    .await;
    // Released without a notification: nothing but the claims' own fallback finds it.
    holder.commit().await.unwrap();
    wait_status(&queue, first, "done", Duration::from_secs(10)).await;
}
