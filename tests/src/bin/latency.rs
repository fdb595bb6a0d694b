//! Email-to-ticket latency: how long after graph-sim accepts a mail its message row exists.
//! Not a test: it prints figures. Each mode gets a fresh database, graph-sim, the api
//! (in-process), a `worker run` and a `worker scheduler` process, and one mailbox connected
//! through the real OAuth flow; then mails are delivered spaced out and each is timed from
//! delivery until its row appears in helpdesk_messages (polled by internetMessageId).
//!
//! - `notifications`: webhooks on; graph-sim posts a change notification per mail, which wakes
//!   the coalesced delta sync. The periodic sync still runs at the account's interval.
//! - `polling`: webhooks off; only the scheduler's periodic sync finds the mail.
//!
//! Build the binaries first (`cargo build --release --bins`), then e.g.
//! `target/release/latency --mode both --mails 50`.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use graph_sim::{GraphSim, InboundMail};
use graphdesk_tests::{TestApp, TestRole, spawn_app_with_sim};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Notifications,
    Polling,
    Both,
}

#[derive(Parser, Debug)]
#[command(about = "Measure email-to-ticket latency with change notifications and with polling")]
struct Cli {
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// Mails delivered per mode.
    #[arg(long, default_value_t = 50)]
    mails: usize,
    /// Pause between two deliveries.
    #[arg(long, default_value_t = 300)]
    spacing_ms: u64,
    /// The account's sync interval (sync_interval_seconds, at least 10) in both modes.
    #[arg(long, default_value_t = 60)]
    interval_secs: i32,
    /// SCHEDULER_TICK_SECS for the scheduler process.
    #[arg(long, default_value = "15")]
    tick_secs: String,
    /// Give up on a mail after this long.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.interval_secs >= 10,
        "--interval-secs must be at least 10"
    );
    let modes: &[Mode] = match cli.mode {
        Mode::Both => &[Mode::Notifications, Mode::Polling],
        Mode::Notifications => &[Mode::Notifications],
        Mode::Polling => &[Mode::Polling],
    };
    println!(
        "[latency] {} mails per mode, {} ms apart; sync interval {} s; scheduler tick {} s",
        cli.mails, cli.spacing_ms, cli.interval_secs, cli.tick_secs
    );
    let mut results = Vec::new();
    for mode in modes {
        let samples = run_mode(&cli, *mode)
            .await
            .with_context(|| format!("{mode:?} run"))?;
        results.push((*mode, samples));
    }
    println!();
    println!(
        "{:<15} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "mode", "mails", "median_ms", "p95_ms", "max_ms", "lost"
    );
    for (mode, samples) in &results {
        let mut ms: Vec<u128> = samples.iter().flatten().map(Duration::as_millis).collect();
        ms.sort_unstable();
        let lost = samples.iter().filter(|s| s.is_none()).count();
        println!(
            "{:<15} {:>6} {:>10} {:>10} {:>10} {:>10}",
            format!("{mode:?}").to_lowercase(),
            samples.len(),
            percentile(&ms, 50),
            percentile(&ms, 95),
            ms.last().copied().unwrap_or(0),
            lost
        );
    }
    Ok(())
}

fn percentile(sorted: &[u128], p: usize) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// Runs one mode end to end; one latency per mail (`None`: not ingested in time).
async fn run_mode(cli: &Cli, mode: Mode) -> anyhow::Result<Vec<Option<Duration>>> {
    let (app, sim, base) = spawn_app_with_sim().await;
    let tenant = app.db.create_tenant("Latency Co").await;
    let t = sim.create_tenant("latency.example", "Latency Co");
    let mailbox = "helpdesk@latency.example";
    sim.create_user(&t, mailbox, "Help Desk");

    let mut children = vec![spawn(&app, "run", &[], "worker ").await?];
    connect(&app, tenant, mailbox).await?;
    sqlx::query("UPDATE helpdesk_email_accounts SET sync_interval_seconds = $1")
        .bind(cli.interval_secs)
        .execute(&app.db.pool)
        .await?;
    let webhooks = mode == Mode::Notifications;
    let mut env = vec![("SCHEDULER_TICK_SECS", cli.tick_secs.clone())];
    if webhooks {
        env.push(("PUBLIC_BASE_URL", base.clone()));
    } else {
        env.push(("GRAPH_WEBHOOKS_ENABLED", "false".into()));
    }
    children.push(spawn(&app, "scheduler", &env, "scheduler ").await?);

    // Steady state first: the first sync done and, with webhooks, the subscription in place.
    wait_until(Duration::from_secs(120), "the first sync", || async {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM queue_jobs_all WHERE queue = 'graphdesk.sync_mailbox' AND status = 'done'",
        )
        .fetch_one(&app.db.pool)
        .await?;
        Ok(done > 0)
    })
    .await?;
    if webhooks {
        wait_until(
            Duration::from_secs(120),
            "the inbox subscription",
            || async {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM graph_subscriptions")
                    .fetch_one(&app.db.pool)
                    .await?;
                Ok(n > 0 && !sim.subscriptions().is_empty())
            },
        )
        .await?;
    }
    println!(
        "[latency] {mode:?}: steady state; delivering {} mails",
        cli.mails
    );

    let samples = measure(cli, &app, &sim, mailbox).await?;
    let stats = sim.stats();
    println!(
        "[latency] {mode:?}: {} Graph requests, {} notification POSTs, {} sync jobs",
        stats.total_requests,
        sim.notifications().len(),
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM queue_jobs_all WHERE queue = 'graphdesk.sync_mailbox'"
        )
        .fetch_one(&app.db.pool)
        .await?
    );
    for mut child in children {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    sim.shutdown().await;
    Ok(samples)
}

async fn measure(
    cli: &Cli,
    app: &TestApp,
    sim: &GraphSim,
    mailbox: &str,
) -> anyhow::Result<Vec<Option<Duration>>> {
    let pool = app.db.pool.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let total = cli.mails;
    let timeout = Duration::from_secs(cli.timeout_secs);
    // The watcher polls for every delivered id still missing and stamps its first sighting.
    let watcher = tokio::spawn(async move {
        let mut waiting: HashMap<String, Instant> = HashMap::new();
        let mut seen: Vec<Option<Duration>> = Vec::new();
        let mut delivered = 0usize;
        loop {
            while let Ok((id, at)) = rx.try_recv() {
                waiting.insert(id, at);
                delivered += 1;
            }
            if !waiting.is_empty() {
                let ids: Vec<String> = waiting.keys().cloned().collect();
                let found: Vec<String> = sqlx::query_scalar(
                    "SELECT internet_message_id FROM helpdesk_messages
                     WHERE internet_message_id = ANY($1)",
                )
                .bind(&ids)
                .fetch_all(&pool)
                .await?;
                let now = Instant::now();
                for id in found {
                    if let Some(at) = waiting.remove(&id) {
                        seen.push(Some(now - at));
                    }
                }
                waiting.retain(|_, at| {
                    let keep = now - *at < timeout;
                    if !keep {
                        seen.push(None);
                    }
                    keep
                });
            }
            if delivered == total && waiting.is_empty() {
                return Ok::<_, anyhow::Error>(seen);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    for i in 0..total {
        let mut mail = InboundMail::new(
            "customer@fabrikam.example",
            format!("Latency probe {i}: the printer is on fire"),
        );
        mail.message_id = Some(format!(
            "<latency-{i}-{}@bench.example>",
            uuid::Uuid::new_v4()
        ));
        mail.text_body = Some("Please help.".into());
        let at = Instant::now();
        let delivered = sim.deliver(mailbox, mail);
        let id = if delivered.internet_message_id.starts_with('<') {
            delivered.internet_message_id
        } else {
            format!("<{}>", delivered.internet_message_id)
        };
        tx.send((id, at)).ok();
        tokio::time::sleep(Duration::from_millis(cli.spacing_ms)).await;
    }
    watcher.await?
}

/// Connects the mailbox like a browser would: start, follow graph-sim's consent redirect,
/// land on our callback.
async fn connect(app: &TestApp, tenant: jobs::ids::TenantId, mailbox: &str) -> anyhow::Result<()> {
    let admin = app.token(tenant, TestRole::Admin);
    let start: serde_json::Value = app
        .client
        .get(app.url(&format!("/api/v1/oauth/connect?login_hint={mailbox}")))
        .bearer_auth(&admin)
        .send()
        .await?
        .json()
        .await?;
    let authorize = start["authorize_url"]
        .as_str()
        .context("no authorize_url")?;
    let resp = app.client.get(authorize).send().await?;
    let callback = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("graph-sim did not redirect back")?
        .to_string();
    let page = app.client.get(&callback).send().await?;
    if page.status() != 200 {
        bail!("connecting the mailbox failed: {}", page.text().await?);
    }
    Ok(())
}

/// A `worker <subcommand>` process next to this binary, ready once it prints `ready_prefix`.
async fn spawn(
    app: &TestApp,
    subcommand: &str,
    env: &[(&str, String)],
    ready_prefix: &str,
) -> anyhow::Result<Child> {
    let bin = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .join("worker");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build the binaries first (cargo build --bins)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.arg(subcommand)
        .env("DATABASE_URL", &app.db.url)
        // One mailbox needs few connections; the server is often shared with test suites.
        .env("DATABASE_MAX_CONNECTIONS", "8")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("PUBLIC_BASE_URL")
        .env_remove("GRAPH_WEBHOOKS_ENABLED")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in app.endpoints.env() {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting worker {subcommand}"))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with(ready_prefix) && line.contains(" running") {
                return Ok(());
            }
        }
        bail!("worker {subcommand} exited before it was ready")
    })
    .await
    .context("worker not ready within 60 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

async fn wait_until<F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + within;
    while !check().await? {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
