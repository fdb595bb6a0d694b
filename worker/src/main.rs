//! graphdesk worker: registers one apalis worker per queue on graphdesk's Postgres backend.
//! Run as many processes, on as many hosts, as the load needs.

use std::time::Duration;

use anyhow::Context;
use apalis_core::monitor::Monitor;
use apalis_core::worker::builder::WorkerBuilder;
use clap::{Parser, Subcommand};
use jobs::config::{Settings, load_dotenv};
use jobs::kinds::{Probe, QUEUES, RefreshToken, SendReply, SyncMailbox, ValidateAccount};
use jobs::queue::JobKind;
use jobs::queue::runtime::{JobContext, WorkerRuntime, unique_worker_id};
use jobs::scheduler::{Scheduler, SchedulerSettings};
use jobs::services::{IntegrationSettings, Services};

mod metrics;

#[derive(Parser)]
#[command(name = "worker", about = "graphdesk job worker")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the workers (the default).
    Run {
        /// Only these queues (comma-separated): sync_mailbox, send_reply, refresh_token,
        /// validate_account, probe (the `graphdesk.` prefix is optional); default: all. An
        /// unknown name fails start-up.
        #[arg(long, env = "WORKER_QUEUES", value_delimiter = ',')]
        queues: Vec<String>,
    },
    /// Apply database migrations and exit.
    Migrate {
        /// Create the database named in DATABASE_URL first if it does not exist.
        #[arg(long)]
        create_database: bool,
    },
    /// Re-encrypt every stored token under the first key of TOKEN_ENCRYPTION_KEYS (run after
    /// adding a new key in front; the old key may leave the ring once this reports 0).
    ReencryptTokens,
    /// Create a tenant (customer organisation) and print its id.
    CreateTenant {
        #[arg(long)]
        name: String,
    },
    /// Run the scheduler: periodic syncs, token refreshes, clean-ups and Graph subscriptions.
    /// Any number of replicas may run; one leads at a time.
    Scheduler,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    load_dotenv();
    let cli = Cli::parse();
    // No subcommand is `run`, WORKER_QUEUES included (clap reads it only for `run`).
    let command = cli.command.unwrap_or_else(|| Command::Run {
        queues: jobs::config::env_opt("WORKER_QUEUES")
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
    });
    // A bad queue selection fails before anything connects.
    let queues = match &command {
        Command::Run { queues } => select_queues(queues)?,
        _ => Vec::new(),
    };
    let settings = Settings::from_env()?;
    jobs::telemetry::init(settings.json_logs);
    if let Command::Migrate {
        create_database: true,
    } = &command
    {
        jobs::db::create_database_if_missing(&settings.database_url).await?;
    }
    let pool = jobs::db::connect(
        &settings.database_url,
        settings.database_max_connections,
        "graphdesk-worker",
    )
    .await
    .context("connecting to the database")?;
    match command {
        Command::Migrate { .. } => {
            jobs::db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::ReencryptTokens => {
            let keyring = jobs::config::env_opt("TOKEN_ENCRYPTION_KEYS")
                .context("TOKEN_ENCRYPTION_KEYS is required")?;
            let vault = jobs::vault::TokenVault::from_keyring(&keyring)
                .context("TOKEN_ENCRYPTION_KEYS is invalid")?;
            let report = jobs::accounts::manage::reencrypt_all(&pool, &vault, |r| {
                println!(
                    "checked {} accounts, re-encrypted {}",
                    r.rows_checked, r.rows_reencrypted
                );
            })
            .await?;
            println!(
                "done: {} accounts checked, {} re-encrypted under key {}",
                report.rows_checked,
                report.rows_reencrypted,
                vault.current_key_id()
            );
            Ok(())
        }
        Command::CreateTenant { name } => {
            let name = name.trim();
            anyhow::ensure!(
                (1..=200).contains(&name.chars().count()),
                "--name must be 1 to 200 characters"
            );
            let id = jobs::ids::TenantId::new();
            sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
                .bind(id.as_uuid())
                .bind(name)
                .execute(&pool)
                .await
                .context("creating the tenant")?;
            println!("{id}");
            Ok(())
        }
        Command::Run { .. } => {
            serve_metrics()?;
            let pools = role_pools(&settings).await?;
            run(settings, pools, queues).await
        }
        Command::Scheduler => {
            serve_metrics()?;
            let pools = role_pools(&settings).await?;
            scheduler(settings, pools).await
        }
    }
}

/// Before any work starts, so nothing recorded is lost; a taken port fails start-up rather than
/// leaving a replica that silently reports nothing.
fn serve_metrics() -> anyhow::Result<()> {
    if let Some(addr) = metrics::install_from_env()? {
        tracing::info!(%addr, "serving Prometheus metrics");
    }
    Ok(())
}

/// Tenant work runs as the app role (Row Level Security applies); the queue, the scheduler
/// and other cross-tenant work as the system role.
struct Pools {
    app: sqlx::PgPool,
    system: sqlx::PgPool,
}

async fn role_pools(settings: &Settings) -> anyhow::Result<Pools> {
    use jobs::db::{DbRole, connect_as};
    let max = settings.database_max_connections;
    Ok(Pools {
        app: connect_as(&settings.database_url, max, "graphdesk-worker", DbRole::App)
            .await
            .context("connecting as the application role (was `worker migrate` run?)")?,
        system: connect_as(
            &settings.database_url,
            max,
            "graphdesk-worker",
            DbRole::System,
        )
        .await
        .context("connecting as the system role (was `worker migrate` run?)")?,
    })
}

async fn scheduler(settings: Settings, pools: Pools) -> anyhow::Result<()> {
    let pool = pools.system.clone();
    let scheduler_settings = SchedulerSettings::from_env(settings.queue.retention)?;
    // Graph is only reached for webhook subscriptions; without them the scheduler needs no
    // Microsoft configuration at all.
    let services = match &scheduler_settings.webhooks {
        None => None,
        Some(_) => Some(
            Services::new(
                pools.app.clone(),
                &IntegrationSettings::from_env(&settings.graph_base_url, &settings.identity_base_url)
                    .context("webhooks need the Microsoft integration (see README: OAUTH_*, TOKEN_ENCRYPTION_KEYS)")?,
            )?
            .with_system_pool(pools.system.clone()),
        ),
    };
    let holder = unique_worker_id("scheduler");
    let scheduler = Scheduler::new(pool, services, scheduler_settings, holder.clone());
    println!("scheduler {holder} running");
    scheduler.run(shutdown_signal()).await;
    println!("scheduler {holder} stopped");
    Ok(())
}

/// The queues `--queues`/`WORKER_QUEUES` selects, by their full names; empty = every queue.
/// Names are those of `jobs::kinds::QUEUES`, with or without the `graphdesk.` prefix. An
/// unknown name is an error, not ignored: `sync,send_reply` would otherwise run only
/// `send_reply` and leave mailbox syncs waiting on a worker nobody started.
fn select_queues(requested: &[String]) -> anyhow::Result<Vec<&'static str>> {
    let mut selected = Vec::new();
    let mut unknown = Vec::new();
    for name in requested.iter().map(|q| q.trim()).filter(|q| !q.is_empty()) {
        match QUEUES
            .iter()
            .find(|q| **q == name || q.strip_prefix("graphdesk.") == Some(name))
        {
            Some(q) if !selected.contains(q) => selected.push(*q),
            Some(_) => {}
            None => unknown.push(format!("`{name}`")),
        }
    }
    if !unknown.is_empty() {
        let valid: Vec<&str> = QUEUES
            .iter()
            .map(|q| q.strip_prefix("graphdesk.").unwrap_or(q))
            .collect();
        anyhow::bail!(
            "WORKER_QUEUES/--queues names unknown queue(s) {}; valid queues: {} \
             (each may carry the `graphdesk.` prefix; leave it unset to run every queue)",
            unknown.join(", "),
            valid.join(", ")
        );
    }
    anyhow::ensure!(
        requested.is_empty() || !selected.is_empty(),
        "WORKER_QUEUES/--queues names no queue; leave it unset to run every queue"
    );
    Ok(selected)
}

fn wanted(queues: &[&str], queue: &str) -> bool {
    queues.is_empty() || queues.contains(&queue)
}

async fn run(settings: Settings, pools: Pools, queues: Vec<&'static str>) -> anyhow::Result<()> {
    // The queue is cross-tenant infrastructure.
    let pool = pools.system.clone();
    let worker_id = unique_worker_id("worker");
    let runtime = WorkerRuntime::start(pool.clone(), settings.queue.clone(), worker_id.clone());
    let mut monitor = Monitor::new();
    let mut registered = Vec::new();

    if wanted(&queues, Probe::QUEUE) {
        let pool = pool.clone();
        let handler =
            move |job: Probe, ctx: JobContext| jobs::handlers::run_probe(pool.clone(), job, ctx);
        monitor = register(monitor, &runtime, &worker_id, handler);
        registered.push(Probe::QUEUE);
    }
    let graph_queues = [
        ValidateAccount::QUEUE,
        RefreshToken::QUEUE,
        SyncMailbox::QUEUE,
        SendReply::QUEUE,
    ];
    if graph_queues.iter().any(|q| wanted(&queues, q)) {
        let integration =
            IntegrationSettings::from_env(&settings.graph_base_url, &settings.identity_base_url)
                .context(
                    "the Microsoft integration is not configured or invalid (see README: OAUTH_*, TOKEN_ENCRYPTION_KEYS, SYNC_*)",
                )?;
        let services =
            Services::new(pools.app.clone(), &integration)?.with_system_pool(pools.system.clone());
        if wanted(&queues, ValidateAccount::QUEUE) {
            let s = services.clone();
            let handler = move |job: ValidateAccount, ctx: JobContext| {
                jobs::handlers::validate_account(s.clone(), job, ctx)
            };
            monitor = register(monitor, &runtime, &worker_id, handler);
            registered.push(ValidateAccount::QUEUE);
        }
        if wanted(&queues, RefreshToken::QUEUE) {
            let s = services.clone();
            let handler = move |job: RefreshToken, ctx: JobContext| {
                jobs::handlers::refresh_token(s.clone(), job, ctx)
            };
            monitor = register(monitor, &runtime, &worker_id, handler);
            registered.push(RefreshToken::QUEUE);
        }
        if wanted(&queues, SyncMailbox::QUEUE) {
            let s = services.clone();
            let handler = move |job: SyncMailbox, ctx: JobContext| {
                jobs::handlers::sync_mailbox(s.clone(), job, ctx)
            };
            monitor = register(monitor, &runtime, &worker_id, handler);
            registered.push(SyncMailbox::QUEUE);
        }
        if wanted(&queues, SendReply::QUEUE) {
            let s = services.clone();
            let handler = move |job: SendReply, ctx: JobContext| {
                jobs::handlers::send_reply(s.clone(), job, ctx)
            };
            monitor = register(monitor, &runtime, &worker_id, handler);
            registered.push(SendReply::QUEUE);
        }
    }
    anyhow::ensure!(
        !registered.is_empty(),
        "no queue selected: check WORKER_QUEUES"
    );
    tracing::info!(%worker_id, queues = ?registered, "worker started");
    println!("worker {worker_id} running queues {registered:?}");

    let monitor_task = tokio::spawn(monitor.run());
    shutdown_signal().await;
    // Stop claiming, give in-flight jobs time to finish, hand the rest back.
    runtime
        .shutdown(Duration::from_secs(jobs::config::env_parse(
            "WORKER_SHUTDOWN_GRACE_SECS",
            20u64,
        )?))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), monitor_task).await;
    println!("worker {worker_id} stopped");
    Ok(())
}

/// One apalis worker per queue. The factory runs again if apalis restarts the worker; each
/// run gets a fresh fetcher from the shared runtime.
fn register<J, H>(monitor: Monitor, runtime: &WorkerRuntime, worker_id: &str, handler: H) -> Monitor
where
    J: JobKind,
    H: jobs::queue::runtime::JobHandler<J>,
{
    let runtime = runtime.clone();
    let name = format!("{worker_id}-{}", J::QUEUE);
    monitor.register(move |_| {
        let (backend, service) = runtime.worker::<J, H>(handler.clone());
        WorkerBuilder::new(name.clone())
            .backend(backend)
            .build(service)
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
