use std::time::Duration;

use anyhow::Context;
use api::auth::{JwtConfig, Role};
use api::{AppState, Limits, build_app};
use clap::{Parser, Subcommand};
use jobs::config::{Settings, bind_addr, load_dotenv};
use jobs::ids::TenantId;
use jobs::services::{IntegrationSettings, Services};
use poem::Server;
use poem::listener::TcpListener;

#[derive(Parser)]
#[command(
    name = "api",
    about = "graphdesk HTTP API, OAuth endpoints and ops dashboard"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP on BIND_ADDR (the default).
    Serve,
    /// Print the OpenAPI document (YAML).
    Openapi,
    /// Mint a JWT for local use and the demo.
    MintToken {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "ops")]
        role: Role,
        #[arg(long, default_value = "cli")]
        subject: String,
        #[arg(long, default_value_t = 24)]
        hours: i64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    load_dotenv();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve().await,
        Command::Openapi => {
            print!("{}", api::spec_yaml(&api::offline_state()?));
            Ok(())
        }
        Command::MintToken {
            tenant,
            role,
            subject,
            hours,
        } => {
            let jwt = JwtConfig::from_env()?;
            let tenant: TenantId = tenant.parse()?;
            println!(
                "{}",
                jwt.mint(&subject, tenant, role, chrono::Duration::hours(hours))
            );
            Ok(())
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    jobs::telemetry::init(settings.json_logs);
    let jwt = JwtConfig::from_env()?;
    let limits = Limits::from_env()?;
    let max = settings.database_max_connections;
    let pool = jobs::db::connect_as(
        &settings.database_url,
        max,
        "graphdesk-api",
        jobs::db::DbRole::App,
    )
    .await
    .context(
        "connecting as the application role (were the migrations applied? `worker migrate`)",
    )?;
    let system_pool = jobs::db::connect_as(
        &settings.database_url,
        max,
        "graphdesk-api",
        jobs::db::DbRole::System,
    )
    .await
    .context("connecting as the system role")?;
    let addr = bind_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    drop(listener);
    tracing::info!(%local, "api listening");
    println!("api listening on http://{local}");
    let integration =
        IntegrationSettings::from_env(&settings.graph_base_url, &settings.identity_base_url)?;
    let services = Services::new(pool, &integration)?.with_system_pool(system_pool);
    let app = build_app(AppState::new(services, jwt, limits));
    Server::new(TcpListener::bind(local))
        .run_with_graceful_shutdown(app, shutdown_signal(), Some(Duration::from_secs(10)))
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
