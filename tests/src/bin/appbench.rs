//! Application benchmarks: the HTTP edge, mail ingest and the scheduler, each against a
//! baseline measured in the same run on the same machine (absolute numbers on a shared machine
//! mean little; ratios travel better). Every scenario runs `--runs` times and the table shows
//! medians. Run in release mode:
//!
//! ```sh
//! cargo build --release --bins && target/release/appbench
//! ```
//!
//! - http: POST /api/v1/ops/probe (authenticate, validate, enqueue one job) vs GET /healthz on
//!   the same `api serve` process, `--connections` concurrent keep-alive connections.
//! - ingest: a full sync of a generated mailbox from graph-sim vs a raw batched INSERT of the
//!   very rows the sync stored; then a re-sync of the unchanged mailbox.
//! - scheduler: one tick over `--accounts` active accounts (all due) vs a raw INSERT … SELECT
//!   of the same number of job rows; then a tick with nothing new due.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use api::auth::{JwtConfig, Role};
use chrono::{DateTime, Utc};
use clap::Parser;
use graph_sim::GeneratorSpec;
use graphdesk_tests::{Endpoints, JWT_SECRET, TestDb, connect_direct, spawn_sim};
use jobs::scheduler::{Scheduler, SchedulerSettings};
use secrecy::SecretString;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(Parser, Debug)]
#[command(about = "graphdesk application benchmarks (see docs/benchmarks.md)")]
struct Cli {
    /// Runs per scenario; the table shows the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only these groups: http, ingest, scheduler.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Requests per HTTP run (per endpoint).
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Concurrent connections of the HTTP load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Messages in the generated mailbox of the ingest scenario.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Accounts for the scheduler tick.
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
}

impl Cli {
    fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }
}

/// One table row: a name, the median of each run's value, its unit, and optionally the ratio
/// to the baseline row's median.
struct Row {
    name: String,
    values: Vec<f64>,
    unit: &'static str,
    baseline: Option<(&'static str, f64)>,
    /// Other rows compare themselves with this one.
    is_baseline: bool,
    /// True when smaller is better (latencies, times): the ratio is then baseline / value.
    lower_is_better: bool,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

impl Row {
    fn new(name: impl Into<String>, unit: &'static str, lower_is_better: bool) -> Self {
        Self {
            name: name.into(),
            values: Vec::new(),
            unit,
            baseline: None,
            is_baseline: false,
            lower_is_better,
        }
    }

    /// Compares this row with `baseline` (called `label` in the table).
    fn vs(mut self, baseline: &mut Row, label: &'static str) -> Self {
        baseline.is_baseline = true;
        self.baseline = Some((label, median(&baseline.values)));
        self
    }

    fn cells(&self) -> (String, String, String) {
        let m = median(&self.values);
        let value = if m >= 100.0 {
            format!("{m:.0} {}", self.unit)
        } else {
            format!("{m:.2} {}", self.unit)
        };
        let runs = self
            .values
            .iter()
            .map(|v| {
                if *v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            })
            .collect::<Vec<_>>()
            .join(" / ");
        let ratio = match &self.baseline {
            Some((name, b)) => {
                let r = if self.lower_is_better { b / m } else { m / b };
                format!("{r:.2}x {name}")
            }
            None if self.is_baseline => "baseline".into(),
            None => "-".into(),
        };
        (value, runs, ratio)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs >= 1, "--runs must be at least 1");
    if cfg!(debug_assertions) {
        eprintln!("appbench: this is a debug build; numbers only mean something in release");
    }
    let mut sections: Vec<(&str, Vec<Row>)> = Vec::new();
    if cli.wants("http") {
        sections.push(("Enqueue over HTTP", http(&cli).await?));
    }
    if cli.wants("ingest") {
        sections.push(("Ingest", ingest(&cli).await?));
    }
    if cli.wants("scheduler") {
        sections.push(("Scheduler tick", scheduler(&cli).await?));
    }
    println!();
    println!("| scenario | median | runs | vs baseline |\n|---|---|---|---|");
    for (section, rows) in &sections {
        println!("| **{section}** | | | |");
        for row in rows {
            let (value, runs, ratio) = row.cells();
            println!("| {} | {value} | {runs} | {ratio} |", row.name);
        }
    }
    Ok(())
}

// ---- http ----

async fn http(cli: &Cli) -> anyhow::Result<Vec<Row>> {
    let db = TestDb::new().await;
    let tenant = db.create_tenant("Bench").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bin = std::env::current_exe()?
        .parent()
        .context("bin dir")?
        .join("api");
    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .env("DATABASE_URL", &db.url)
        .env("JWT_SECRET", JWT_SECRET)
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in Endpoints::unreachable().env() {
        cmd.env(k, v);
    }
    let mut api = cmd
        .spawn()
        .with_context(|| format!("starting {} (build with --bins)", bin.display()))?;
    let mut lines = BufReader::new(api.stdout.take().context("stdout")?).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("api listening") {
                return Ok(());
            }
        }
        bail!("the api exited before listening")
    })
    .await
    .context("api start")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let base = format!("http://127.0.0.1:{port}");
    let jwt = JwtConfig::new(SecretString::from(JWT_SECRET), "graphdesk", "graphdesk-api");
    let token = jwt.mint("bench", tenant, Role::Ops, chrono::Duration::hours(1));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(cli.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    // "api listening" is printed just before the server binds: poll until it answers.
    let mut ready = false;
    for _ in 0..300 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(ready, "the api did not become ready");
    let health = Target::Get(format!("{base}/healthz"));
    let probe = Target::Post {
        url: format!("{base}/api/v1/ops/probe"),
        token: token.clone(),
    };
    // Warm both paths (connections, the database pool, caches) before measuring.
    load(&client, &health, 1_000, cli.connections).await?;
    load(&client, &probe, 1_000, cli.connections).await?;

    let mut h_rps = Row::new("GET /healthz: requests/s", "req/s", false);
    let mut h_p50 = Row::new("GET /healthz: p50 latency", "ms", true);
    let mut h_p99 = Row::new("GET /healthz: p99 latency", "ms", true);
    let mut p_rps = Row::new("POST /api/v1/ops/probe: requests/s", "req/s", false);
    let mut p_p50 = Row::new("POST /api/v1/ops/probe: p50 latency", "ms", true);
    let mut p_p99 = Row::new("POST /api/v1/ops/probe: p99 latency", "ms", true);
    for run in 1..=cli.runs {
        // Each run enqueues into an empty table, so runs compare like with like.
        sqlx::query("TRUNCATE queue_jobs").execute(&db.pool).await?;
        let h = load(&client, &health, cli.requests, cli.connections).await?;
        let p = load(&client, &probe, cli.requests, cli.connections).await?;
        let enqueued: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all")
            .fetch_one(&db.pool)
            .await?;
        ensure!(
            enqueued as usize == cli.requests,
            "{enqueued} jobs stored for {} accepted probes",
            cli.requests
        );
        eprintln!(
            "http run {run}: healthz {:.0} req/s p99 {:.2} ms; probe {:.0} req/s p99 {:.2} ms",
            h.rps, h.p99, p.rps, p.p99
        );
        h_rps.values.push(h.rps);
        h_p50.values.push(h.p50);
        h_p99.values.push(h.p99);
        p_rps.values.push(p.rps);
        p_p50.values.push(p.p50);
        p_p99.values.push(p.p99);
    }
    let _ = api.start_kill();
    let _ = api.wait().await;
    let p_rps = p_rps.vs(&mut h_rps, "healthz");
    let p_p50 = p_p50.vs(&mut h_p50, "healthz");
    let p_p99 = p_p99.vs(&mut h_p99, "healthz");
    Ok(vec![h_rps, p_rps, h_p50, p_p50, h_p99, p_p99])
}

enum Target {
    Get(String),
    Post { url: String, token: String },
}

struct LoadResult {
    rps: f64,
    p50: f64,
    p99: f64,
}

/// `total` requests over `connections` concurrent loops; any non-2xx answer fails the run.
async fn load(
    client: &reqwest::Client,
    target: &Target,
    total: usize,
    connections: usize,
) -> anyhow::Result<LoadResult> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let loops = (0..connections).map(|_| {
        let next = next.clone();
        async move {
            let mut latencies = Vec::with_capacity(total / connections + 1);
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                let req = match target {
                    Target::Get(url) => client.get(url),
                    Target::Post { url, token } => client
                        .post(url)
                        .bearer_auth(token)
                        .json(&serde_json::json!({"sleep_ms": 0, "marker": "appbench"})),
                };
                let resp = req.send().await?;
                let status = resp.status();
                let _ = resp.bytes().await?;
                ensure!(status.is_success(), "answered {status}");
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        }
    });
    let mut all = Vec::with_capacity(total);
    for l in futures::future::join_all(loops).await {
        all.extend(l?);
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Ok(LoadResult {
        rps: all.len() as f64 / secs,
        p50: pct(0.50),
        p99: pct(0.99),
    })
}

// ---- ingest ----

async fn ingest(cli: &Cli) -> anyhow::Result<Vec<Row>> {
    let mut sync = Row::new(
        format!("full sync of {} messages", cli.messages),
        "msg/s",
        false,
    );
    let mut raw = Row::new(
        "raw batched INSERT of the same rows (1,000 per statement)",
        "msg/s",
        false,
    );
    let mut resync_time = Row::new("re-sync of the unchanged mailbox: time", "ms", true);
    let mut resync_calls = Row::new(
        "re-sync of the unchanged mailbox: Graph requests",
        "req",
        true,
    );
    let mut full_calls = Row::new("full sync: Graph requests", "req", true);
    for run in 1..=cli.runs {
        let db = TestDb::new().await;
        let redirect = "http://127.0.0.1:9/oauth/callback";
        let sim = spawn_sim(redirect, |_| {}).await;
        let upn = "support@ingest.example";
        sim.create_user("ingest.example", upn, "Support");
        sim.generate_mailbox(
            upn,
            GeneratorSpec {
                seed: 42,
                messages: cli.messages,
                days: 20,
                ..GeneratorSpec::default()
            },
        );
        let services = Endpoints::sim(&sim, redirect).services(&db.pool);
        let tenant = db.create_tenant("Ingest").await;
        let account = connect_direct(&services, &sim, tenant, upn).await;

        let before = sim.stats().total_requests;
        let t = Instant::now();
        let report = jobs::sync::sync_folder(&services, tenant, account, "inbox")
            .await?
            .context("no concurrent sync")?;
        let secs = t.elapsed().as_secs_f64();
        ensure!(
            report.ingested as usize == cli.messages,
            "the sync ingested {} of {} messages",
            report.ingested,
            cli.messages
        );
        let full_requests = sim.stats().total_requests - before;

        let before = sim.stats().total_requests;
        let t = Instant::now();
        let again = jobs::sync::sync_folder(&services, tenant, account, "inbox")
            .await?
            .context("no concurrent sync")?;
        let resync = t.elapsed().as_secs_f64();
        ensure!(
            again.ingested == 0,
            "the re-sync ingested {}",
            again.ingested
        );
        let resync_requests = sim.stats().total_requests - before;

        let raw_secs = raw_insert(&db).await?;
        eprintln!(
            "ingest run {run}: sync {:.0} msg/s ({full_requests} requests), raw {:.0} msg/s, re-sync {:.0} ms ({resync_requests} requests)",
            cli.messages as f64 / secs,
            cli.messages as f64 / raw_secs,
            resync * 1000.0
        );
        sync.values.push(cli.messages as f64 / secs);
        raw.values.push(cli.messages as f64 / raw_secs);
        full_calls.values.push(full_requests as f64);
        resync_time.values.push(resync * 1000.0);
        resync_calls.values.push(resync_requests as f64);
        sim.shutdown().await;
    }
    let sync = sync.vs(&mut raw, "raw INSERT");
    Ok(vec![raw, sync, full_calls, resync_time, resync_calls])
}

#[derive(sqlx::FromRow)]
struct StoredMessage {
    id: uuid::Uuid,
    tenant_id: uuid::Uuid,
    email_account_id: uuid::Uuid,
    ticket_id: i64,
    direction: String,
    microsoft_message_id: String,
    internet_message_id: Option<String>,
    in_reply_to: Option<String>,
    references: Vec<String>,
    conversation_id: Option<String>,
    subject: String,
    from_address: String,
    from_name: Option<String>,
    to_recipients: serde_json::Value,
    cc_recipients: serde_json::Value,
    body_html: Option<String>,
    body_text: Option<String>,
    body_preview: Option<String>,
    received_at: Option<DateTime<Utc>>,
    is_auto_reply: bool,
    auto_reply_reason: Option<String>,
    thread_rule: String,
    thread_detail: Option<String>,
    attachments: serde_json::Value,
}

/// Reads back what the sync stored, deletes it, and times inserting the same rows again in
/// batches of 1,000 from the client: the floor any ingest path pays for these rows, with the
/// table's real indexes and foreign keys.
async fn raw_insert(db: &TestDb) -> anyhow::Result<f64> {
    let rows: Vec<StoredMessage> = sqlx::query_as(
        r#"SELECT id, tenant_id, email_account_id, ticket_id, direction, microsoft_message_id,
                  internet_message_id, in_reply_to, "references", conversation_id, subject,
                  from_address, from_name, to_recipients, cc_recipients, body_html, body_text,
                  body_preview, received_at, is_auto_reply, auto_reply_reason, thread_rule,
                  thread_detail, attachments
           FROM helpdesk_messages ORDER BY received_at"#,
    )
    .fetch_all(&db.pool)
    .await?;
    sqlx::query("DELETE FROM helpdesk_messages")
        .execute(&db.pool)
        .await?;
    let t = Instant::now();
    for chunk in rows.chunks(1_000) {
        macro_rules! col {
            ($f:ident) => {
                chunk.iter().map(|r| r.$f.clone()).collect::<Vec<_>>()
            };
        }
        // Per-row arrays cannot be a column of a 2-D array; they travel joined by a separator
        // no Message-ID contains.
        let references: Vec<String> = chunk.iter().map(|r| r.references.join("\u{1f}")).collect();
        sqlx::query(
            r#"INSERT INTO helpdesk_messages
                (id, tenant_id, email_account_id, ticket_id, direction, microsoft_message_id,
                 internet_message_id, in_reply_to, "references", conversation_id, subject,
                 from_address, from_name, to_recipients, cc_recipients, body_html, body_text,
                 body_preview, received_at, is_auto_reply, auto_reply_reason, thread_rule,
                 thread_detail, attachments)
               SELECT id, tenant_id, email_account_id, ticket_id, direction, microsoft_message_id,
                      internet_message_id, in_reply_to,
                      CASE WHEN refs = '' THEN '{}'::text[] ELSE string_to_array(refs, E'\x1f') END,
                      conversation_id, subject, from_address, from_name, to_recipients,
                      cc_recipients, body_html, body_text, body_preview, received_at,
                      is_auto_reply, auto_reply_reason, thread_rule, thread_detail, attachments
               FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::text[],
                           $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                           $11::text[], $12::text[], $13::text[], $14::jsonb[], $15::jsonb[],
                           $16::text[], $17::text[], $18::text[], $19::timestamptz[],
                           $20::bool[], $21::text[], $22::text[], $23::text[], $24::jsonb[])
                 AS u(id, tenant_id, email_account_id, ticket_id, direction,
                      microsoft_message_id, internet_message_id, in_reply_to, refs,
                      conversation_id, subject, from_address, from_name, to_recipients,
                      cc_recipients, body_html, body_text, body_preview, received_at,
                      is_auto_reply, auto_reply_reason, thread_rule, thread_detail,
                      attachments)"#,
        )
        .bind(col!(id))
        .bind(col!(tenant_id))
        .bind(col!(email_account_id))
        .bind(col!(ticket_id))
        .bind(col!(direction))
        .bind(col!(microsoft_message_id))
        .bind(col!(internet_message_id))
        .bind(col!(in_reply_to))
        .bind(references)
        .bind(col!(conversation_id))
        .bind(col!(subject))
        .bind(col!(from_address))
        .bind(col!(from_name))
        .bind(col!(to_recipients))
        .bind(col!(cc_recipients))
        .bind(col!(body_html))
        .bind(col!(body_text))
        .bind(col!(body_preview))
        .bind(col!(received_at))
        .bind(col!(is_auto_reply))
        .bind(col!(auto_reply_reason))
        .bind(col!(thread_rule))
        .bind(col!(thread_detail))
        .bind(col!(attachments))
        .execute(&db.pool)
        .await?;
    }
    let secs = t.elapsed().as_secs_f64();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_messages")
        .fetch_one(&db.pool)
        .await?;
    ensure!(
        n as usize == rows.len(),
        "{n} of {} rows re-inserted",
        rows.len()
    );
    Ok(secs)
}

// ---- scheduler ----

async fn scheduler(cli: &Cli) -> anyhow::Result<Vec<Row>> {
    let db = TestDb::new().await;
    let tenants = 100.min(cli.accounts.max(1));
    sqlx::query(
        "INSERT INTO tenants (id, name)
         SELECT gen_random_uuid(), 'Tenant ' || n FROM generate_series(1, $1) n",
    )
    .bind(tenants as i32)
    .execute(&db.pool)
    .await?;
    // Every account is due for a sync; every other one's token is close to expiry.
    sqlx::query(
        "INSERT INTO helpdesk_email_accounts
            (id, tenant_id, email_address, status, refresh_token_enc, token_expires_at)
         SELECT gen_random_uuid(), t.id, 'box' || n || '@bench.example', 'active', '\\x00',
                now() + CASE WHEN n % 2 = 0 THEN interval '2 minutes' ELSE interval '1 hour' END
         FROM generate_series(1, $1) n
         JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM tenants) t
           ON t.k = n % $2",
    )
    .bind(cli.accounts as i32)
    .bind(tenants as i64)
    .execute(&db.pool)
    .await?;
    let scheduler = Scheduler::new(
        db.pool.clone(),
        None,
        SchedulerSettings::with_tick(Duration::from_secs(15)),
        "appbench",
    );
    let mut due = Row::new(
        format!(
            "tick with {} accounts due (enqueues syncs + refreshes)",
            cli.accounts
        ),
        "ms",
        true,
    );
    let mut idle = Row::new("next tick: nothing new due (all still pending)", "ms", true);
    let mut raw = Row::new(
        format!("raw INSERT … SELECT of {} job rows", cli.accounts),
        "ms",
        true,
    );
    for run in 1..=cli.runs {
        sqlx::query("TRUNCATE queue_jobs").execute(&db.pool).await?;
        let t = Instant::now();
        let report = scheduler.run_tick().await?;
        let first = t.elapsed().as_secs_f64() * 1000.0;
        ensure!(report.leader(), "the bench scheduler did not lead");
        ensure!(
            report.syncs as usize == cli.accounts,
            "the tick enqueued {} syncs for {} accounts",
            report.syncs,
            cli.accounts
        );
        let t = Instant::now();
        let second = scheduler.run_tick().await?;
        let next = t.elapsed().as_secs_f64() * 1000.0;
        ensure!(
            second.syncs == 0,
            "the second tick enqueued {}",
            second.syncs
        );

        sqlx::query("TRUNCATE queue_jobs").execute(&db.pool).await?;
        let t = Instant::now();
        sqlx::query(
            "INSERT INTO queue_jobs (queue, tenant_id, email_account_id, payload, max_attempts)
             SELECT 'appbench.raw', tenant_id, id,
                    jsonb_build_object('tenant', tenant_id, 'account', id, 'folder', 'inbox'), 8
             FROM helpdesk_email_accounts",
        )
        .execute(&db.pool)
        .await?;
        let baseline = t.elapsed().as_secs_f64() * 1000.0;
        eprintln!(
            "scheduler run {run}: tick {first:.1} ms ({} syncs, {} refreshes), idle tick {next:.1} ms, raw insert {baseline:.1} ms",
            report.syncs, report.refreshes
        );
        due.values.push(first);
        idle.values.push(next);
        raw.values.push(baseline);
    }
    let due = due.vs(&mut raw, "raw INSERT");
    let idle = idle.vs(&mut raw, "raw INSERT");
    Ok(vec![raw, due, idle])
}
