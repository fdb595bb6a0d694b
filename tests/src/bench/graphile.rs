//! graphile-worker, measured beside the raw loop and graphdesk's queue in the same run. The
//! queue-throughput issue sets graphile-worker batched as the bar ("at least as fast as
//! graphile-worker batched on the same machine and database"), measured once on another day at
//! about 0.95x of the raw claim-100 loop; this measures it here, against the same server.
//!
//! It needs Node.js and npm on PATH: graphile-worker is installed from the npm registry into a
//! temporary directory (no lockfile, nothing kept) and run with the configuration of its own
//! performance page (`graphile-runner.mjs`). Without node or npm the group is skipped with a note.
//!
//! Timing follows the other throughput rows: the jobs are added in one transaction
//! (`graphile_worker.add_jobs`) and the clock starts at its commit; it stops at the
//! transaction time (`now()`) of the last completion. graphile-worker deletes a completed job,
//! so a statement-level trigger on its jobs table records each completing statement's `now()`
//! and row count: one insert per batch of completions, the same instant graphdesk's flush
//! stamps as `finished_at`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::process::{Child, Command};

/// The version the queue-throughput issue measured.
pub const GRAPHILE_VERSION: &str = "0.18.0";
const RUNNER: &str = include_str!("graphile-runner.mjs");

/// graphile-worker installed in a temporary directory, removed on drop.
pub struct Graphile {
    dir: PathBuf,
}

impl Drop for Graphile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Graphile {
    /// Installs graphile-worker; the error says why it cannot run here (no node, no npm, no
    /// registry).
    pub async fn install() -> anyhow::Result<Self> {
        for tool in ["node", "npm"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            ensure!(found, "`{tool}` is not on PATH");
        }
        let dir = std::env::temp_dir().join(format!(
            "gd-bench-graphile-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let this = Self { dir };
        std::fs::write(this.dir.join("package.json"), r#"{ "private": true }"#)?;
        std::fs::write(this.dir.join("runner.mjs"), RUNNER)?;
        let out = Command::new("npm")
            .args([
                "install",
                "--no-save",
                "--no-package-lock",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ])
            .arg(format!("graphile-worker@{GRAPHILE_VERSION}"))
            .current_dir(&this.dir)
            .output()
            .await
            .context("running npm install")?;
        ensure!(
            out.status.success(),
            "npm install graphile-worker@{GRAPHILE_VERSION} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(this)
    }

    /// Starts one graphile-worker process on `db_url`. The first one creates graphile-worker's
    /// schema; start the others after it is ready.
    pub async fn spawn(&self, db_url: &str) -> anyhow::Result<GraphileProcess> {
        let mut child = Command::new("node")
            .arg("runner.mjs")
            .current_dir(&self.dir)
            .env("DATABASE_URL", db_url)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning node")?;
        crate::wait_ready(&mut child, "graphile-worker", |line| line.trim() == "ready").await?;
        Ok(GraphileProcess { child })
    }
}

pub struct GraphileProcess {
    child: Child,
}

impl GraphileProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn stop(mut self) {
        crate::terminate(&mut self.child).await;
    }
}

/// The connection string for node-postgres: TLS when this bench's own connection uses it (as
/// graphdesk's workers and the raw loop then do), without certificate checks, as libpq's
/// `sslmode=prefer` and `require` make none either.
pub async fn node_url(pool: &PgPool, db_url: &str) -> anyhow::Result<String> {
    let tls: bool = sqlx::query_scalar(
        "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
    )
    .fetch_one(pool)
    .await?;
    let mut url = url::Url::parse(db_url).context("the bench database URL parses")?;
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "sslmode")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair("sslmode", if tls { "no-verify" } else { "disable" });
    Ok(url.to_string())
}

/// Records every statement that completes jobs: its transaction time and how many it deleted.
/// Needs graphile-worker's schema (a first process has started).
pub async fn install_completion_trigger(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS bench_graphile_done (at timestamptz NOT NULL, n bigint NOT NULL);
         CREATE OR REPLACE FUNCTION bench_graphile_count_done() RETURNS trigger
         LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO bench_graphile_done SELECT now(), count(*) FROM done_rows;
             RETURN NULL;
         END $$;
         CREATE OR REPLACE TRIGGER bench_graphile_done
             AFTER DELETE ON graphile_worker._private_jobs
             REFERENCING OLD TABLE AS done_rows
             FOR EACH STATEMENT EXECUTE FUNCTION bench_graphile_count_done();",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Adds `n` no-op jobs in one transaction; returns the database's clock as its commit began.
/// The jobs table starts empty of dead rows too, as graphdesk's queue does (TRUNCATE), and
/// is analyzed with the new jobs in it.
pub async fn stage(pool: &PgPool, n: usize) -> anyhow::Result<DateTime<Utc>> {
    sqlx::query("TRUNCATE graphile_worker._private_jobs, bench_graphile_done")
        .execute(pool)
        .await?;
    let mut tx = pool.begin().await?;
    let added: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM graphile_worker.add_jobs(ARRAY(
             SELECT ROW('noop', '{}'::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
             FROM generate_series(1, $1)))",
    )
    .bind(n as i64)
    .fetch_one(&mut *tx)
    .await?;
    ensure!(
        added == n as i64,
        "added {added} of {n} graphile-worker jobs"
    );
    // graphile-worker's job fetch needs statistics: on its table never analyzed (this bench's
    // server runs no autovacuum) a 200,000-job run fell to about 15k jobs/s, a third of its
    // rate with them. It is measured at its best, analyzed with the backlog in place (the
    // staging transaction's own rows count), as autovacuum would leave it; graphdesk's main
    // rows are measured never analyzed, its harder case.
    sqlx::query("ANALYZE graphile_worker._private_jobs")
        .execute(&mut *tx)
        .await?;
    let start: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(start)
}

/// Waits until `n` jobs have completed; returns the last completion's transaction time.
pub async fn wait_completed(
    pool: &PgPool,
    n: usize,
    within: Duration,
) -> anyhow::Result<DateTime<Utc>> {
    let deadline = Instant::now() + within;
    loop {
        let (done, last): (i64, Option<DateTime<Utc>>) =
            sqlx::query_as("SELECT coalesce(sum(n), 0)::bigint, max(at) FROM bench_graphile_done")
                .fetch_one(pool)
                .await?;
        if done >= n as i64 {
            ensure!(
                done == n as i64,
                "graphile-worker completed {done} of {n} jobs"
            );
            return last.context("no completion recorded");
        }
        ensure!(
            Instant::now() < deadline,
            "graphile-worker completed {done} of {n} jobs within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
