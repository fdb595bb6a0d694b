//! A worker process with WORKER_METRICS_ADDR serves what it records: job outcomes, Graph
//! responses and email-to-ticket latency, scraped over HTTP like Prometheus would.

use std::time::Duration;

use graph_sim::{FaultKind, FaultRule, InboundMail};
use graphdesk_tests::{
    Endpoints, TestDb, WorkerOptions, connect_direct, free_port, spawn_sim, spawn_worker,
    wait_for_count,
};
use jobs::kinds::{Probe, SyncMailbox};
use jobs::queue::{EnqueueOptions, Queue};
use prometheus_parse::{Scrape, Value};

async fn scrape(addr: &str) -> Scrape {
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("the metrics listener answers")
        .error_for_status()
        .expect("metrics served")
        .text()
        .await
        .expect("metrics body");
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

/// The value of one series, `None` when the worker has not recorded it (yet).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a single number: {other:?}"),
        })
}

/// Scrapes until `name{labels}` reaches `expected` (the counter is bumped as the job finishes,
/// a moment before or after the database says so), then asserts the exact value, so a count
/// that overshoots fails too.
async fn assert_settles(addr: &str, name: &str, labels: &[(&str, &str)], expected: f64) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = scrape(addr).await;
        let got = value(&s, name, labels);
        if got == Some(expected) || tokio::time::Instant::now() >= deadline {
            assert_eq!(got, Some(expected), "{name}{labels:?}");
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metrics_env() -> (String, Vec<(String, String)>) {
    let addr = format!("127.0.0.1:{}", free_port());
    let env = vec![("WORKER_METRICS_ADDR".to_string(), addr.clone())];
    (addr, env)
}

#[tokio::test]
async fn a_worker_serves_its_job_counts_on_worker_metrics_addr() {
    let db = TestDb::new().await;
    let (addr, extra_env) = metrics_env();
    let _worker = spawn_worker(
        &db,
        WorkerOptions {
            extra_env,
            ..WorkerOptions::default()
        },
    )
    .await;
    let queue = Queue::new(db.pool.clone());
    const JOBS: i64 = 7;
    for _ in 0..JOBS {
        queue
            .enqueue(&Probe::default(), EnqueueOptions::default())
            .await
            .expect("enqueue");
    }
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_jobs_all WHERE queue = 'graphdesk.probe' AND status = 'done'",
        JOBS,
        Duration::from_secs(30),
    )
    .await;
    let s = assert_settles(
        &addr,
        "graphdesk_jobs_total",
        &[("queue", "graphdesk.probe"), ("outcome", "done")],
        JOBS as f64,
    )
    .await;
    assert_eq!(
        value(
            &s,
            "graphdesk_job_duration_seconds_count",
            &[("queue", "graphdesk.probe")]
        ),
        Some(JOBS as f64),
        "one duration observation per job"
    );
}

#[tokio::test]
async fn a_worker_counts_graph_responses_throttling_and_email_to_ticket_latency() {
    const MAILBOX: &str = "support@contoso.example";
    let db = TestDb::new().await;
    let sim = spawn_sim("http://127.0.0.1:9/oauth/callback", |_| {}).await;
    let t = sim.create_tenant("contoso.example", "Contoso");
    sim.create_user(&t, MAILBOX, "Support");
    let endpoints = Endpoints::sim(&sim, "http://127.0.0.1:9/oauth/callback");
    let services = endpoints.services(&db.pool);
    let tenant = db.create_tenant("Contoso").await;
    let account = connect_direct(&services, &sim, tenant, MAILBOX).await;
    for i in 0..3 {
        sim.deliver(
            MAILBOX,
            InboundMail::new(
                format!("customer{i}@example.org"),
                format!("Printer {i} is on fire"),
            )
            .text("Please help"),
        );
    }
    // One throttled delta request: the client waits the second and retries.
    sim.set_fault(
        FaultRule::new(FaultKind::TooManyRequests {
            retry_after: Some("1".into()),
        })
        .mailbox(MAILBOX)
        .path("/messages/delta")
        .times(1),
    );
    let (addr, extra_env) = metrics_env();
    let _worker = spawn_worker(
        &db,
        WorkerOptions {
            endpoints,
            extra_env,
            ..WorkerOptions::default()
        },
    )
    .await;
    Queue::new(db.pool.clone())
        .enqueue(
            &SyncMailbox {
                tenant,
                account,
                folder: "inbox".into(),
            },
            EnqueueOptions::default(),
        )
        .await
        .expect("enqueue");
    wait_for_count(
        &db.pool,
        "SELECT count(*) FROM queue_jobs_all WHERE queue = 'graphdesk.sync_mailbox' AND status = 'done'",
        1,
        Duration::from_secs(30),
    )
    .await;
    let s = assert_settles(&addr, "graphdesk_email_to_ticket_seconds_count", &[], 3.0).await;
    assert_eq!(value(&s, "graphdesk_graph_throttled_total", &[]), Some(1.0));
    assert_eq!(
        value(
            &s,
            "graphdesk_graph_requests_total",
            &[
                ("op", "delta_page"),
                ("status", "429"),
                ("code", "TooManyRequests")
            ]
        ),
        Some(1.0)
    );
    let delta_ok = value(
        &s,
        "graphdesk_graph_requests_total",
        &[("op", "delta_page"), ("status", "200")],
    )
    .unwrap_or(0.0);
    assert!(delta_ok >= 1.0, "the retried delta request succeeded");
    // The mail was delivered moments ago: the latency is seconds, not the age of old mail.
    let sum = value(&s, "graphdesk_email_to_ticket_seconds_sum", &[]).expect("latency sum");
    assert!((0.0..90.0).contains(&sum), "latency sum {sum}");
}
