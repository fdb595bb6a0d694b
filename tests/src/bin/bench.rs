//! Queue benchmarks: graphdesk's queue against raw SQL on the same database, in the same run.
//!
//! Every scenario runs `--runs` times; the table shows medians and the ratio to a baseline
//! measured in this run, because absolute numbers on a shared machine mean little. The
//! methodology and the latest table are in docs/benchmarks.md.
//!
//! Throughput runs exclude insertion on both sides: the jobs are inserted in one transaction
//! and the clock starts at its commit (which is also when the workers are notified), and stops
//! at the last job's `finished_at`. Both ends are read from the database's clock, for the raw
//! loop too. Insertion has its own rows (single and batched enqueue).
//!
//! Beside each throughput figure it reports where the CPU went per job: the PostgreSQL server
//! (read from /proc when it runs on this host) and the client processes (the raw loop's own
//! process, or the workers), so a gap to the raw loop can be told apart as more database work,
//! more client work on the shared cores, or cores left idle.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use jobs::ids::TenantId;
use jobs::kinds::Probe;
use jobs::queue::{EnqueueOptions, JobKind, Queue, enqueue_batch_in};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[path = "../bench/graphile.rs"]
mod graphile;

#[derive(Parser, Debug)]
#[command(about = "graphdesk queue benchmarks (see docs/benchmarks.md)")]
struct Cli {
    /// Runs per scenario; the table shows the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Jobs per throughput run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Also run the throughput scenarios with 200,000 jobs.
    #[arg(long)]
    large: bool,
    /// Also measure dequeue cost with 1,000,000 finished jobs in the table (vs 10,000).
    #[arg(long)]
    scale: bool,
    /// Only these scenario groups: raw, queue, graphile, latency, enqueue, rss, scale. graphile
    /// (graphile-worker batched, the queue-throughput issue's bar) needs Node.js and npm, and is
    /// skipped with a note without them.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Worker process counts for the throughput scenarios.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    processes: Vec<usize>,
    /// WORKER_CONCURRENCY of the worker processes in the throughput runs: no-op jobs need
    /// many slots to keep the database busy (graphile-worker was measured with a 500-job
    /// local queue).
    #[arg(long, default_value_t = 400)]
    concurrency: usize,
    /// WORKER_BATCH_SIZE of the worker processes in the throughput runs. With 400 slots, 200
    /// means two fetchers per process; batches of 100 (four fetchers, more claims contending
    /// for the head of the queue) measured 0.53x / 0.47x of raw against 0.62-0.73x / 0.60-0.68x
    /// with 1 / 2 processes, back to back on this machine.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Extra environment for the worker processes (KEY=VALUE), to try other settings.
    #[arg(long = "worker-env")]
    worker_env: Vec<String>,
    /// Keep the benchmark database instead of dropping it.
    #[arg(long)]
    keep: bool,
}

impl Cli {
    fn wants(&self, group: &str) -> bool {
        if group == "scale" && !self.scale && self.only.is_empty() {
            return false;
        }
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }
}

const TENANTS: usize = 100;
const TENANT_LIMIT: u32 = 4;
const RAW_CLIENTS: usize = 8;

/// One measured scenario: samples, and what its ratio is taken against.
struct Row {
    name: String,
    unit: &'static str,
    samples: Vec<f64>,
    against: Option<String>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn add(&mut self, name: impl Into<String>, unit: &'static str, samples: Vec<f64>) {
        self.add_vs(name, unit, samples, None::<String>);
    }

    fn add_vs(
        &mut self,
        name: impl Into<String>,
        unit: &'static str,
        samples: Vec<f64>,
        against: Option<impl Into<String>>,
    ) {
        let row = Row {
            name: name.into(),
            unit,
            samples,
            against: against.map(Into::into),
        };
        println!(
            "  {:<58} median {:>10} {}   runs {:?}",
            row.name,
            fmt_num(median(&row.samples)),
            row.unit,
            row.samples.iter().map(|s| fmt_num(*s)).collect::<Vec<_>>()
        );
        self.rows.push(row);
    }

    /// A CPU-per-job row; skipped when the measure is unavailable (Postgres not on this host).
    fn add_cpu(
        &mut self,
        name: &str,
        samples: &[Throughput],
        measure: impl Fn(&CpuPerJob) -> Option<f64>,
        against: Option<String>,
    ) {
        let values: Option<Vec<f64>> = samples.iter().map(|t| measure(&t.cpu)).collect();
        if let Some(values) = values.filter(|v| !v.is_empty()) {
            self.add_vs(name, "µs", values, against);
        }
    }

    fn median_of(&self, name: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.name == name)
            .map(|r| median(&r.samples))
    }

    fn markdown(&self) -> String {
        let mut out = String::from(
            "| scenario | median | unit | min – max | ratio | vs |\n|---|---:|---|---|---:|---|\n",
        );
        for r in &self.rows {
            let m = median(&r.samples);
            let lo = r.samples.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let (ratio, vs) = match r.against.as_deref().and_then(|a| {
                self.median_of(a)
                    .filter(|b| *b > 0.0)
                    .map(|b| (format!("{:.2}×", m / b), a))
            }) {
                Some((ratio, a)) => (ratio, a.to_string()),
                None => (String::new(), String::new()),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} – {} | {} | {} |\n",
                r.name,
                fmt_num(m),
                r.unit,
                fmt_num(lo),
                fmt_num(hi),
                ratio,
                vs
            ));
        }
        out
    }
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v >= 1000.0 {
        let n = v.round() as u64;
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The benchmark's own database, dropped at the end unless `--keep`.
struct BenchDb {
    name: String,
    url: String,
    server: PgConnectOptions,
    pool: PgPool,
}

impl BenchDb {
    async fn create(server_url: &str) -> anyhow::Result<Self> {
        let server: PgConnectOptions = server_url.parse().context("DATABASE_URL parses")?;
        let name = format!("gd_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = server
            .clone()
            .database("postgres")
            .connect()
            .await
            .context("connecting to PostgreSQL")?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        admin.close().await.ok();
        let opts = server.clone().database(&name);
        let url = opts.to_url_lossy().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(RAW_CLIENTS as u32 + 4)
            .connect_with(opts.application_name("graphdesk-bench"))
            .await?;
        jobs::db::migrate(&pool).await?;
        Ok(Self {
            name,
            url,
            server,
            pool,
        })
    }

    async fn drop_db(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut admin = self.server.database("postgres").connect().await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

/// A worker OS process running only the probe queue.
struct Worker {
    child: Child,
}

impl Worker {
    async fn spawn(db: &BenchDb, env: &[(String, String)]) -> anyhow::Result<Self> {
        let bin = std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("worker");
        ensure!(
            bin.exists(),
            "{} is missing: build it first (cargo build --release --bins)",
            bin.display()
        );
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .env("DATABASE_URL", &db.url)
            .env("WORKER_QUEUES", "probe")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawning the worker")?;
        wait_ready(&mut child, "the worker", |line| {
            line.starts_with("worker ") && line.contains(" running")
        })
        .await?;
        Ok(Self { child })
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Peak resident set size (VmHWM) in MiB.
    fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        let pid = self.pid().context("worker exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmHWM in /proc/<pid>/status")?;
        Ok(kb / 1024.0)
    }

    async fn stop(mut self) {
        terminate(&mut self.child).await;
    }
}

/// Waits up to 60 s for a line of the child's standard output that says it is ready, then
/// keeps reading (and dropping) the rest so the child never blocks on a full pipe.
async fn wait_ready(
    child: &mut Child,
    what: &str,
    ready: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if ready(&line) {
                return Ok(());
            }
        }
        bail!("{what} exited before it was ready")
    })
    .await
    .with_context(|| format!("{what} ready within 60 s"))??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(())
}

/// SIGTERM, then up to 30 s for a graceful exit, then SIGKILL.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn worker_env(cli: &Cli, limits: bool) -> anyhow::Result<Vec<(String, String)>> {
    let mut env = vec![
        (
            "WORKER_TENANT_CONCURRENCY".to_string(),
            if limits {
                TENANT_LIMIT.to_string()
            } else {
                "0".to_string()
            },
        ),
        ("WORKER_CONCURRENCY".into(), cli.concurrency.to_string()),
        ("WORKER_BATCH_SIZE".into(), cli.batch.to_string()),
        // The server is shared with test suites: stay well inside its connection limit.
        ("DATABASE_MAX_CONNECTIONS".into(), "12".into()),
    ];
    for kv in &cli.worker_env {
        let (k, v) = kv.split_once('=').context("--worker-env takes KEY=VALUE")?;
        env.push((k.to_string(), v.to_string()));
    }
    Ok(env)
}

async fn create_tenants(pool: &PgPool) -> anyhow::Result<Vec<TenantId>> {
    let mut tenants = Vec::with_capacity(TENANTS);
    for i in 0..TENANTS {
        let id = TenantId::new();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
            .bind(id.as_uuid())
            .bind(format!("bench-{i}"))
            .execute(pool)
            .await?;
        tenants.push(id);
    }
    Ok(tenants)
}

async fn reset_queue(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE queue_jobs, queue_jobs_done, queue_probe_runs")
        .execute(pool)
        .await?;
    Ok(())
}

fn probes(n: usize, tenants: &[TenantId]) -> Vec<Probe> {
    (0..n)
        .map(|i| Probe {
            tenant: Some(tenants[i % tenants.len()]),
            ..Probe::default()
        })
        .collect()
}

/// What the workers plan on. This benchmark's server runs no autovacuum, so most runs plan on
/// a queue table never analyzed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Statistics {
    NeverAnalyzed,
    /// Taken with the backlog in place (ANALYZE counts the staging transaction's own inserts)
    /// and landing with it, as autovacuum would take them on a server that runs it.
    WithBacklog,
}

/// Inserts `jobs` in one transaction through the queue's own batch enqueue and returns the
/// database's clock as its commit (and so the workers' wake-up) began.
async fn stage_jobs(
    pool: &PgPool,
    jobs: &[Probe],
    stats: Statistics,
) -> anyhow::Result<DateTime<Utc>> {
    let mut tx = pool.begin().await?;
    for chunk in jobs.chunks(10_000) {
        enqueue_batch_in(&mut tx, chunk).await?;
    }
    if stats == Statistics::WithBacklog {
        sqlx::query("ANALYZE queue_jobs").execute(&mut *tx).await?;
    }
    let start: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(start)
}

/// Waits until no probe is pending or running; returns when the last one was completed, by
/// the database's clock (`finished_at` of the last completion, as the raw loop is timed).
///
/// The poll is sparse because it is not free and runs on the cores being measured: its index
/// probes walk every entry a finished job left at the head of the pending and running indexes
/// (this server runs no autovacuum), 3-6 ms per probe after 150,000 jobs in the lab. Polled
/// every 2 ms, as it was, it kept a backend busy for much of a 200,000-job run, a cost the raw
/// loop, whose clients see the end themselves, never paid. The end time does not depend on the
/// poll's rate, only the bench's own wall time does.
async fn wait_drained(pool: &PgPool, within: Duration) -> anyhow::Result<DateTime<Utc>> {
    let deadline = Instant::now() + within;
    loop {
        let busy: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM queue_jobs WHERE queue = $1 AND status = 'pending')
                 OR EXISTS (SELECT 1 FROM queue_jobs WHERE status = 'running')",
        )
        .bind(Probe::QUEUE)
        .fetch_one(pool)
        .await?;
        if !busy {
            let end: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT max(f) FROM (
                         SELECT max(finished_at) FROM queue_jobs WHERE queue = $1
                         UNION ALL
                         SELECT max(finished_at) FROM queue_jobs_done WHERE queue = $1) AS m(f)",
            )
            .bind(Probe::QUEUE)
            .fetch_one(pool)
            .await?;
            return end.context("no probe finished");
        }
        ensure!(
            Instant::now() < deadline,
            "jobs not drained within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Jobs per second over a window timed by the database's clock.
fn per_sec(n: usize, start: DateTime<Utc>, end: DateTime<Utc>) -> anyhow::Result<f64> {
    let secs = (end - start)
        .to_std()
        .context("the run ended before it began")?;
    Ok(n as f64 / secs.as_secs_f64())
}

async fn queue_throughput(
    db: &BenchDb,
    tenants: &[TenantId],
    n: usize,
    runs: usize,
    stats: Statistics,
    workers: &[Worker],
) -> anyhow::Result<Vec<Throughput>> {
    let mut samples = Vec::with_capacity(runs);
    let pids: Vec<String> = workers
        .iter()
        .filter_map(|w| w.pid().map(|p| p.to_string()))
        .collect();
    for _ in 0..runs {
        reset_queue(&db.pool).await?;
        let jobs = probes(n, tenants);
        let start = stage_jobs(&db.pool, &jobs, stats).await?;
        let meter = CpuMeter::start(pids.clone());
        let end = wait_drained(&db.pool, Duration::from_secs(600)).await?;
        let cpu = meter.per_job(n);
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM queue_jobs_all WHERE status = 'done'")
                .fetch_one(&db.pool)
                .await?;
        ensure!(done == n as i64, "{done} of {n} jobs done");
        samples.push(Throughput {
            jobs_per_sec: per_sec(n, start, end)?,
            cpu,
        });
    }
    Ok(samples)
}

fn rates(samples: &[Throughput]) -> Vec<f64> {
    samples.iter().map(|t| t.jobs_per_sec).collect()
}

// ---- CPU per job ---------------------------------------------------------------------------

/// CPU time, as /proc counts it (USER_HZ, which Linux fixes at 100 per second for user space).
const TICKS_PER_SEC: f64 = 100.0;

/// Fields 14-17 of /proc/<pid>/stat: utime, stime, cutime, cstime (children reaped).
fn proc_ticks(pid: &str) -> Option<[u64; 4]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; what follows its ')' is field 3 on.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some([n(11)?, n(12)?, n(13)?, n(14)?])
}

/// CPU seconds the local PostgreSQL server has used: every live postgres process, plus what
/// exited backends used (the postmaster's reaped children). None when no server process is
/// visible, as with a remote `DATABASE_URL`. A backend that exits between two readings has its
/// time before the first counted again at the second; the bench's and workers' pools keep
/// their connections through a run, so only a stray client's disconnect can inflate a figure.
fn postgres_cpu_secs() -> Option<f64> {
    let mut ticks = 0;
    let mut seen = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "postgres" {
            continue;
        }
        if let Some(t) = proc_ticks(pid) {
            ticks += t.iter().sum::<u64>();
            seen = true;
        }
    }
    seen.then(|| ticks as f64 / TICKS_PER_SEC)
}

/// CPU seconds used by these processes themselves (the bench's client, or the workers).
fn processes_cpu_secs(pids: &[String]) -> f64 {
    pids.iter()
        .filter_map(|p| proc_ticks(p))
        .map(|t| (t[0] + t[1]) as f64 / TICKS_PER_SEC)
        .sum()
}

/// Where a run's CPU went, per job: the database server and the client side (the raw loop's
/// own process, or the worker processes). Throughput alone cannot tell a queue that does more
/// work per job from one that leaves the cores idle between claims.
#[derive(Clone, Copy)]
struct CpuPerJob {
    postgres_us: Option<f64>,
    client_us: f64,
}

struct CpuMeter {
    clients: Vec<String>,
    postgres: Option<f64>,
    client: f64,
}

impl CpuMeter {
    fn start(clients: Vec<String>) -> Self {
        let postgres = postgres_cpu_secs();
        let client = processes_cpu_secs(&clients);
        Self {
            clients,
            postgres,
            client,
        }
    }

    fn per_job(&self, jobs: usize) -> CpuPerJob {
        let us = |secs: f64| secs * 1e6 / jobs as f64;
        CpuPerJob {
            postgres_us: postgres_cpu_secs()
                .zip(self.postgres)
                .map(|(now, then)| us(now - then)),
            client_us: us(processes_cpu_secs(&self.clients) - self.client),
        }
    }
}

#[derive(Clone, Copy)]
struct Throughput {
    jobs_per_sec: f64,
    cpu: CpuPerJob,
}

// ---- raw SQL baseline ----------------------------------------------------------------------

async fn create_raw_table(pool: &PgPool) -> anyhow::Result<()> {
    // The same columns, defaults and indexes as queue_jobs, plus an index that serves the
    // baseline's ORDER BY id, so the raw loop pays the same per-row costs and no more.
    sqlx::raw_sql(
        "CREATE TABLE bench_jobs (LIKE queue_jobs INCLUDING ALL);
         CREATE INDEX bench_jobs_pending_id_idx ON bench_jobs (id) WHERE status = 'pending';",
    )
    .execute(pool)
    .await?;
    Ok(())
}

async fn raw_claim_loop(pool: &PgPool, n: usize, batch: i64) -> anyhow::Result<Throughput> {
    sqlx::query("TRUNCATE bench_jobs").execute(pool).await?;
    let payload = serde_json::to_value(Probe::default())?;
    sqlx::query(
        "INSERT INTO bench_jobs (queue, payload, max_attempts)
         SELECT 'bench', $2, 5 FROM generate_series(1, $1)",
    )
    .bind(n as i64)
    .bind(&payload)
    .execute(pool)
    .await?;
    let done = Arc::new(AtomicU64::new(0));
    let meter = CpuMeter::start(vec![std::process::id().to_string()]);
    // Timed by the database's clock, start to the last `finished_at`, as the queue runs are.
    let start: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await?;
    let mut clients = Vec::new();
    for c in 0..RAW_CLIENTS {
        let pool = pool.clone();
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let me = format!("raw-{c}");
            loop {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "WITH c AS (
                        SELECT id FROM bench_jobs WHERE status = 'pending'
                        ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                     UPDATE bench_jobs j SET status = 'running', attempts = j.attempts + 1,
                        locked_by = $2, locked_at = now(),
                        lease_expires_at = now() + interval '60 seconds', updated_at = now()
                     FROM c WHERE j.id = c.id
                     RETURNING j.id",
                )
                .bind(batch)
                .bind(&me)
                .fetch_all(&pool)
                .await?;
                if ids.is_empty() {
                    return Ok::<_, sqlx::Error>(());
                }
                sqlx::query(
                    "UPDATE bench_jobs SET status = 'done', finished_at = now(),
                        locked_by = NULL, lease_expires_at = NULL, updated_at = now()
                     WHERE id = ANY($1)",
                )
                .bind(&ids)
                .execute(&pool)
                .await?;
                done.fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    for c in clients {
        c.await??;
    }
    let cpu = meter.per_job(n);
    let done = done.load(Ordering::Relaxed);
    ensure!(done == n as u64, "raw loop finished {done} of {n}");
    let end: DateTime<Utc> = sqlx::query_scalar("SELECT max(finished_at) FROM bench_jobs")
        .fetch_one(pool)
        .await?;
    Ok(Throughput {
        jobs_per_sec: per_sec(n, start, end)?,
        cpu,
    })
}

// ---- latency and enqueue -------------------------------------------------------------------

/// Enqueue-to-start latencies (ms) of `n` jobs enqueued one at a time on an idle queue, each
/// of the next tenant in turn, as real jobs all have one: with limits on, a worker holds no
/// slots of a tenant whose jobs it has not seen lately, and must be granted some first.
async fn start_latencies(
    pool: &PgPool,
    n: usize,
    tenants: &[TenantId],
) -> anyhow::Result<Vec<f64>> {
    reset_queue(pool).await?;
    let queue = Queue::new(pool.clone());
    // Let the worker settle into its idle wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..n {
        queue
            .enqueue(
                &Probe {
                    record: true,
                    tenant: Some(tenants[i % tenants.len()]),
                    ..Probe::default()
                },
                EnqueueOptions::default(),
            )
            .await?;
        // Idle between jobs: each one should find the worker waiting.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    wait_drained(pool, Duration::from_secs(60)).await?;
    let mut lat: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM (r.started_at - j.created_at)) * 1000)::float8
         FROM queue_probe_runs r JOIN queue_jobs_all j ON j.id = r.job_id",
    )
    .fetch_all(pool)
    .await?;
    ensure!(lat.len() == n, "{} of {n} probes recorded", lat.len());
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

async fn concurrently<F, Fut>(producers: usize, per_producer: usize, f: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_producer {
                f().await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((producers * per_producer) as f64 / start.elapsed().as_secs_f64())
}

// ---- scale ---------------------------------------------------------------------------------

async fn fill_finished(pool: &PgPool, rows: i64) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM queue_jobs").execute(pool).await?;
    let payload = serde_json::to_value(Probe::default())?;
    let mut left = rows;
    while left > 0 {
        let n = left.min(100_000);
        sqlx::query(
            "INSERT INTO queue_jobs (queue, payload, max_attempts, status, attempts, finished_at)
             SELECT 'graphdesk.finished', $2, 5, 'done', 1, now() FROM generate_series(1, $1)",
        )
        .bind(n)
        .bind(&payload)
        .execute(pool)
        .await?;
        left -= n;
    }
    sqlx::query("VACUUM ANALYZE queue_jobs")
        .execute(pool)
        .await?;
    Ok(())
}

async fn throughput_beside_finished(
    db: &BenchDb,
    tenants: &[TenantId],
    n: usize,
    runs: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        let jobs = probes(n, tenants);
        let start = stage_jobs(&db.pool, &jobs, Statistics::NeverAnalyzed).await?;
        let end = wait_drained(&db.pool, Duration::from_secs(600)).await?;
        samples.push(per_sec(n, start, end)?);
        sqlx::query("DELETE FROM queue_jobs WHERE queue = 'graphdesk.probe'")
            .execute(&db.pool)
            .await?;
        sqlx::query("DELETE FROM queue_jobs_done WHERE queue = 'graphdesk.probe'")
            .execute(&db.pool)
            .await?;
        sqlx::query("VACUUM queue_jobs").execute(&db.pool).await?;
    }
    Ok(samples)
}

// ---- main ----------------------------------------------------------------------------------

fn machine_notes() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    format!("{cpus} CPUs, load average at start {load}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ensure!(cli.runs >= 1, "--runs must be at least 1");
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let notes = machine_notes();
    println!("graphdesk queue benchmark: {notes}; {} runs each", cli.runs);
    let db = BenchDb::create(&server).await?;
    let pg_version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&db.pool)
        .await?;
    let result = run(&cli, &db).await;
    if cli.keep {
        println!("kept database {}", db.name);
    } else {
        db.drop_db().await?;
    }
    let report = result?;
    println!("\nPostgreSQL {pg_version}; {notes}\n");
    println!("{}", report.markdown());
    Ok(())
}

async fn run(cli: &Cli, db: &BenchDb) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let tenants = create_tenants(&db.pool).await?;
    let sizes: Vec<usize> = if cli.large {
        vec![cli.jobs, 200_000]
    } else {
        vec![cli.jobs]
    };
    let raw_name =
        |batch: i64, n: usize| format!("raw SQL claim-{batch} loop, 8 clients, {n} jobs");

    // Rounds interleave the baseline and every queue configuration, one sample each, so a
    // change in the machine's load during the run (it is shared) lands on both sides of a
    // ratio instead of on whichever scenario ran then.
    let mut raw_samples: HashMap<(i64, usize), Vec<Throughput>> = HashMap::new();
    let mut raw_cpu: HashMap<usize, Vec<Throughput>> = HashMap::new();
    let mut queue_samples: HashMap<(bool, usize, usize), Vec<Throughput>> = HashMap::new();
    let mut graphile_samples: HashMap<(usize, usize), Vec<Throughput>> = HashMap::new();
    let graphile = if cli.wants("graphile") {
        match graphile::Graphile::install().await {
            Ok(g) => Some((g, graphile::node_url(&db.pool, &db.url).await?)),
            Err(e) => {
                println!("  graphile-worker skipped: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let mut completion_trigger_installed = false;
    if cli.wants("raw") || cli.wants("queue") || graphile.is_some() {
        create_raw_table(&db.pool).await?;
        // The first loop on a fresh table runs cold (its first sample was the slowest in every
        // run so far); one unrecorded loop warms the caches for both sides.
        raw_claim_loop(&db.pool, cli.jobs, 100).await?;
        for _ in 0..cli.runs {
            for &n in &sizes {
                for batch in [100, 10] {
                    let sample = raw_claim_loop(&db.pool, n, batch).await?;
                    raw_samples.entry((batch, n)).or_default().push(sample);
                }
            }
            if let Some((g, url)) = &graphile {
                for &procs in &cli.processes {
                    let mut runners = vec![g.spawn(url).await?];
                    // Once, when the first process has created graphile-worker's schema.
                    if !completion_trigger_installed {
                        graphile::install_completion_trigger(&db.pool).await?;
                        completion_trigger_installed = true;
                    }
                    for _ in 1..procs {
                        runners.push(g.spawn(url).await?);
                    }
                    // Unrecorded: node compiles its hot paths during the first thousands of
                    // jobs (a fresh process ran its first 20,000 at about a third of the rate
                    // of the next).
                    graphile_throughput(db, cli.jobs.min(20_000), &runners).await?;
                    for &n in &sizes {
                        let sample = graphile_throughput(db, n, &runners).await?;
                        graphile_samples.entry((procs, n)).or_default().push(sample);
                    }
                    for r in runners {
                        r.stop().await;
                    }
                }
            }
            if !cli.wants("queue") {
                continue;
            }
            for limits in [false, true] {
                for &procs in &cli.processes {
                    let env = worker_env(cli, limits)?;
                    let mut workers = Vec::new();
                    for _ in 0..procs {
                        workers.push(Worker::spawn(db, &env).await?);
                    }
                    for &n in &sizes {
                        let sample = queue_throughput(
                            db,
                            &tenants,
                            n,
                            1,
                            Statistics::NeverAnalyzed,
                            &workers,
                        )
                        .await?;
                        queue_samples
                            .entry((limits, procs, n))
                            .or_default()
                            .extend(sample);
                    }
                    for w in workers {
                        w.stop().await;
                    }
                }
            }
        }
        sqlx::query("DROP TABLE bench_jobs")
            .execute(&db.pool)
            .await?;
        for &n in &sizes {
            for batch in [100, 10] {
                let against = (batch == 10).then(|| raw_name(100, n));
                let samples = raw_samples.remove(&(batch, n)).unwrap_or_default();
                report.add_vs(raw_name(batch, n), "jobs/s", rates(&samples), against);
                if batch == 100 {
                    raw_cpu.insert(n, samples);
                }
            }
        }
        for &procs in &cli.processes {
            for &n in &sizes {
                let Some(samples) = graphile_samples.get(&(procs, n)) else {
                    continue;
                };
                let name = graphile_name(procs, n);
                report.add_vs(&name, "jobs/s", rates(samples), Some(raw_name(100, n)));
                if cli.wants("queue") {
                    report.add_vs(
                        format!("{} (vs graphile-worker)", queue_name(procs, n, false)),
                        "jobs/s",
                        rates(
                            &queue_samples
                                .get(&(false, procs, n))
                                .cloned()
                                .unwrap_or_default(),
                        ),
                        Some(name.clone()),
                    );
                }
            }
        }
    }

    if cli.wants("queue") {
        // (processes, jobs, samples) of the limited runs.
        let mut limited: Vec<(usize, usize, Vec<f64>)> = Vec::new();
        let mut queue_cpu: Vec<(String, usize, Vec<Throughput>)> = Vec::new();
        for limits in [false, true] {
            for &procs in &cli.processes {
                for &n in &sizes {
                    let samples = queue_samples
                        .remove(&(limits, procs, n))
                        .unwrap_or_default();
                    let name = queue_name(procs, n, limits);
                    let against = if limits {
                        queue_name(procs, n, false)
                    } else {
                        raw_name(100, n)
                    };
                    report.add_vs(name, "jobs/s", rates(&samples), Some(against));
                    queue_cpu.push((queue_name(procs, n, limits), n, samples.clone()));
                    if limits {
                        limited.push((procs, n, rates(&samples)));
                    }
                }
            }
        }
        // The shipped defaults size a process for Graph-bound work, not for no-op jobs.
        let defaults = vec![
            ("WORKER_TENANT_CONCURRENCY".to_string(), "0".to_string()),
            ("DATABASE_MAX_CONNECTIONS".to_string(), "12".to_string()),
        ];
        let worker = Worker::spawn(db, &defaults).await?;
        let samples = queue_throughput(
            db,
            &tenants,
            cli.jobs,
            cli.runs,
            Statistics::NeverAnalyzed,
            std::slice::from_ref(&worker),
        )
        .await?;
        worker.stop().await;
        report.add_vs(
            format!(
                "graphdesk queue, 1 process, {} jobs, limits off, default WORKER_CONCURRENCY/BATCH_SIZE",
                cli.jobs
            ),
            "jobs/s",
            rates(&samples),
            Some(raw_name(100, cli.jobs)),
        );
        // On a server that runs autovacuum the queue has statistics; the claims must not
        // plan differently for it (migrations/20261126000030_claim_plans_with_fresh_statistics.sql).
        for limits in [false, true] {
            for &procs in &cli.processes {
                let mut workers = Vec::new();
                for _ in 0..procs {
                    workers.push(Worker::spawn(db, &worker_env(cli, limits)?).await?);
                }
                let samples = queue_throughput(
                    db,
                    &tenants,
                    cli.jobs,
                    cli.runs,
                    Statistics::WithBacklog,
                    &workers,
                )
                .await;
                for w in workers {
                    w.stop().await;
                }
                let name = queue_name(procs, cli.jobs, limits);
                report.add_vs(
                    format!("{name}, analyzed with the backlog queued"),
                    "jobs/s",
                    rates(&samples?),
                    Some(name),
                );
            }
        }
        // The scenarios after this one were measured, in earlier rounds too, on a queue
        // never analyzed: put it back in that state.
        sqlx::raw_sql(
            "DELETE FROM pg_statistic WHERE starelid = 'queue_jobs'::regclass;
             UPDATE pg_class SET reltuples = -1, relpages = 0 WHERE oid = 'queue_jobs'::regclass;",
        )
        .execute(&db.pool)
        .await?;
        // Limit rows are also worth reading against raw.
        for (procs, n, samples) in limited {
            report.add_vs(
                format!("{} (vs raw)", queue_name(procs, n, true)),
                "jobs/s",
                samples,
                Some(raw_name(100, n)),
            );
        }
        // Where the CPU went, per job: more here than the raw loop's means more work per job;
        // the same with fewer jobs per second means cores left idle between claims.
        let pg_row = |name: &str| format!("CPU per job, PostgreSQL: {name}");
        let client_row = |name: &str| format!("CPU per job, client processes: {name}");
        for n in &sizes {
            let samples = raw_cpu.get(n).map(Vec::as_slice).unwrap_or_default();
            report.add_cpu(
                &pg_row(&raw_name(100, *n)),
                samples,
                |c| c.postgres_us,
                None,
            );
            report.add_cpu(
                &client_row(&raw_name(100, *n)),
                samples,
                |c| Some(c.client_us),
                None,
            );
        }
        for &procs in &cli.processes {
            for &n in &sizes {
                if let Some(samples) = graphile_samples.get(&(procs, n)) {
                    queue_cpu.push((graphile_name(procs, n), n, samples.clone()));
                }
            }
        }
        for (name, n, samples) in &queue_cpu {
            let raw = raw_name(100, *n);
            report.add_cpu(
                &pg_row(name),
                samples,
                |c| c.postgres_us,
                Some(pg_row(&raw)),
            );
            report.add_cpu(
                &client_row(name),
                samples,
                |c| Some(c.client_us),
                Some(client_row(&raw)),
            );
        }
    }

    if cli.wants("latency") {
        for limits in [false, true] {
            let worker = Worker::spawn(db, &worker_env(cli, limits)?).await?;
            let (mut p50, mut p95) = (Vec::new(), Vec::new());
            for _ in 0..cli.runs {
                let lat = start_latencies(&db.pool, 1000, &tenants).await?;
                p50.push(percentile(&lat, 50.0));
                p95.push(percentile(&lat, 95.0));
            }
            worker.stop().await;
            let tag = if limits { "limits on" } else { "limits off" };
            report.add(
                format!("enqueue-to-start p50, idle queue, {tag}"),
                "ms",
                p50,
            );
            report.add(
                format!("enqueue-to-start p95, idle queue, {tag}"),
                "ms",
                p95,
            );
        }
    }

    if cli.wants("enqueue") {
        let queue = Queue::new(db.pool.clone());
        let raw_single = "raw INSERT one row per statement, 8 producers";
        let raw_batch = "raw INSERT 1,000 rows per statement (unnest)";
        let payload = serde_json::to_value(Probe::default())?;
        let (mut s_raw, mut s_q, mut b_raw, mut b_q) = (vec![], vec![], vec![], vec![]);
        for _ in 0..cli.runs {
            reset_queue(&db.pool).await?;
            let (pool, p) = (db.pool.clone(), payload.clone());
            s_raw.push(
                concurrently(RAW_CLIENTS, 500, move || {
                    let (pool, p) = (pool.clone(), p.clone());
                    async move {
                        sqlx::query(
                            "INSERT INTO queue_jobs (queue, payload, max_attempts)
                             VALUES ('graphdesk.bench', $1, 5)",
                        )
                        .bind(p)
                        .execute(&pool)
                        .await?;
                        Ok(())
                    }
                })
                .await?,
            );
            let q = queue.clone();
            s_q.push(
                concurrently(RAW_CLIENTS, 500, move || {
                    let q = q.clone();
                    async move {
                        q.enqueue(&Probe::default(), EnqueueOptions::default())
                            .await?;
                        Ok(())
                    }
                })
                .await?,
            );
            let pool = db.pool.clone();
            let payloads: Vec<serde_json::Value> = vec![payload.clone(); 1000];
            b_raw.push(
                concurrently(1, 20, move || {
                    let (pool, payloads) = (pool.clone(), payloads.clone());
                    async move {
                        sqlx::query(
                            "INSERT INTO queue_jobs (queue, payload, max_attempts)
                             SELECT 'graphdesk.bench', p, 5 FROM unnest($1::jsonb[]) AS u(p)",
                        )
                        .bind(payloads)
                        .execute(&pool)
                        .await?;
                        Ok(())
                    }
                })
                .await?
                    * 1000.0,
            );
            let q = queue.clone();
            let batch = vec![Probe::default(); 1000];
            b_q.push(
                concurrently(1, 20, move || {
                    let (q, batch) = (q.clone(), batch.clone());
                    async move {
                        q.enqueue_batch(&batch).await?;
                        Ok(())
                    }
                })
                .await?
                    * 1000.0,
            );
        }
        report.add(raw_single, "jobs/s", s_raw);
        report.add_vs(
            "Queue::enqueue, 8 producers",
            "jobs/s",
            s_q,
            Some(raw_single),
        );
        report.add(raw_batch, "jobs/s", b_raw);
        report.add_vs(
            "Queue::enqueue_batch, 1,000 per call",
            "jobs/s",
            b_q,
            Some(raw_batch),
        );
    }

    if cli.wants("rss") {
        let mut env = worker_env(cli, false)?;
        env.push(("WORKER_CONCURRENCY".into(), "50".into()));
        let (mut idle, mut peak) = (Vec::new(), Vec::new());
        for _ in 0..cli.runs {
            reset_queue(&db.pool).await?;
            let worker = Worker::spawn(db, &env).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            idle.push(worker.peak_rss_mib()?);
            let jobs: Vec<Probe> = (0..500)
                .map(|_| Probe {
                    sleep_ms: 100,
                    ..Probe::default()
                })
                .collect();
            stage_jobs(&db.pool, &jobs, Statistics::NeverAnalyzed).await?;
            wait_drained(&db.pool, Duration::from_secs(120)).await?;
            peak.push(worker.peak_rss_mib()?);
            worker.stop().await;
        }
        report.add("worker peak RSS, idle (VmHWM)", "MiB", idle);
        report.add(
            "worker peak RSS, 50 concurrent jobs (VmHWM)",
            "MiB",
            peak.clone(),
        );
    }

    if cli.wants("scale") {
        let env = worker_env(cli, false)?;
        let worker = Worker::spawn(db, &env).await?;
        let small = "dequeue 20k jobs beside 10k finished, 1 process";
        let large = "dequeue 20k jobs beside 1M finished, 1 process";
        fill_finished(&db.pool, 10_000).await?;
        let s = throughput_beside_finished(db, &tenants, 20_000, cli.runs).await?;
        report.add(small, "jobs/s", s);
        fill_finished(&db.pool, 1_000_000).await?;
        let l = throughput_beside_finished(db, &tenants, 20_000, cli.runs).await?;
        report.add_vs(large, "jobs/s", l, Some(small));
        worker.stop().await;
    }
    Ok(report)
}

async fn graphile_throughput(
    db: &BenchDb,
    n: usize,
    runners: &[graphile::GraphileProcess],
) -> anyhow::Result<Throughput> {
    let pids: Vec<String> = runners
        .iter()
        .filter_map(|r| r.pid().map(|p| p.to_string()))
        .collect();
    let start = graphile::stage(&db.pool, n).await?;
    let meter = CpuMeter::start(pids);
    let end = graphile::wait_completed(&db.pool, n, Duration::from_secs(600)).await?;
    Ok(Throughput {
        jobs_per_sec: per_sec(n, start, end)?,
        cpu: meter.per_job(n),
    })
}

fn graphile_name(procs: usize, n: usize) -> String {
    let s = if procs == 1 { "" } else { "es" };
    format!(
        "graphile-worker {} batched, {procs} process{s}, {n} jobs",
        graphile::GRAPHILE_VERSION
    )
}

fn queue_name(procs: usize, n: usize, limits: bool) -> String {
    let limits = if limits {
        format!("limits on ({TENANTS} tenants, limit {TENANT_LIMIT})")
    } else {
        "limits off".to_string()
    };
    let s = if procs == 1 { "" } else { "es" };
    format!("graphdesk queue, {procs} process{s}, {n} jobs, {limits}")
}
