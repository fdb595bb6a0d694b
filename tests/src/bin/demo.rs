//! The demo driver: a fresh `graphdesk_demo` database, the api and two workers as real
//! processes, work pushed through the public API, progress printed, and the URLs to open.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use api::auth::{JwtConfig, Role};
use clap::Parser;
use jobs::ids::TenantId;
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(about = "Run the graphdesk demo")]
struct Cli {
    /// Port for the api.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Probe jobs to push through the queue.
    #[arg(long, default_value_t = 200)]
    jobs: usize,
    /// Exit once the work is done instead of waiting for Ctrl-C.
    #[arg(long)]
    exit: bool,
}

const DEMO_SECRET: &str = "demo-secret-demo-secret-demo-secret-0000";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let base: PgConnectOptions = server.parse().context("DATABASE_URL")?;
    let mut admin = base.clone().database("postgres").connect().await.context("connecting to PostgreSQL")?;
    sqlx::query("DROP DATABASE IF EXISTS graphdesk_demo WITH (FORCE)").execute(&mut admin).await?;
    sqlx::query("CREATE DATABASE graphdesk_demo").execute(&mut admin).await?;
    admin.close().await.ok();
    let db_url = base.database("graphdesk_demo").to_url_lossy().to_string();
    let pool = sqlx::PgPool::connect(&db_url).await?;
    jobs::db::migrate(&pool).await?;
    println!("[demo] database graphdesk_demo ready");

    let tenant = TenantId::new();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'Demo Co')")
        .bind(tenant.as_uuid())
        .execute(&pool)
        .await?;

    let bin_dir = std::env::current_exe()?.parent().context("bin dir")?.to_path_buf();
    let api_addr = format!("127.0.0.1:{}", cli.port);
    let env = |cmd: &mut Command| {
        cmd.env("DATABASE_URL", &db_url)
            .env("JWT_SECRET", DEMO_SECRET)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .kill_on_drop(true);
    };
    let mut children: Vec<Child> = Vec::new();
    let mut api = Command::new(bin_dir.join("api"));
    api.arg("serve").env("BIND_ADDR", &api_addr);
    env(&mut api);
    children.push(api.spawn().context("starting api")?);
    for _ in 0..2 {
        let mut worker = Command::new(bin_dir.join("worker"));
        worker.arg("run");
        env(&mut worker);
        children.push(worker.spawn().context("starting a worker")?);
    }
    let base_url = format!("http://{api_addr}");
    let client = reqwest::Client::new();
    wait_ready(&client, &base_url).await?;
    println!("[demo] api and 2 workers running");

    let jwt = JwtConfig::new(SecretString::from(DEMO_SECRET), "graphdesk", "graphdesk-api");
    let token = jwt.mint("demo-ops", tenant, Role::Ops, chrono::Duration::hours(12));
    let mut ids = Vec::new();
    for i in 0..cli.jobs {
        let resp: serde_json::Value = client
            .post(format!("{base_url}/api/v1/ops/probe"))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "sleep_ms": 20, "fail_attempts": u32::from(i % 10 == 0), "marker": format!("demo-{i}") }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        ids.push(resp["job_id"].as_i64().context("job id")?);
    }
    println!("[demo] enqueued {} jobs over HTTP (every 10th fails once and is retried)", ids.len());
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_jobs WHERE status = 'done'")
            .fetch_one(&pool)
            .await?;
        println!("[demo] progress: {done}/{} jobs done", ids.len());
        if done as usize >= ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!();
    println!("  API docs:   {base_url}/docs");
    println!("  A job:      {base_url}/api/v1/jobs/{}", ids[0]);
    println!("  Ops token:  {token}");
    println!();
    if !cli.exit {
        println!("[demo] running; Ctrl-C stops everything");
        tokio::signal::ctrl_c().await?;
    }
    for mut c in children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    println!("[demo] stopped");
    Ok(())
}

async fn wait_ready(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the api did not become ready at {base}")
}
