//! `graph-sim` binary: serves the simulator until Ctrl-C.

use std::net::{IpAddr, SocketAddr};

use clap::Parser;
use graph_sim::{GeneratorSpec, GraphSim, InboundMail, SimConfig};

/// Local Microsoft Graph v1.0 + identity platform v2.0 simulator.
///
/// Prints exactly one line, `graph-sim listening on http://127.0.0.1:PORT`, once it accepts
/// connections. Identity authority = that URL; Graph base = that URL + `/v1.0`;
/// control API under `/_sim`.
#[derive(Parser, Debug)]
#[command(name = "graph-sim", version)]
struct Args {
    /// Port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = 0, env = "GRAPH_SIM_PORT")]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Application (client) id the simulator accepts.
    #[arg(long, env = "GRAPH_SIM_CLIENT_ID")]
    client_id: Option<String>,
    /// Client secret the simulator accepts.
    #[arg(long, env = "GRAPH_SIM_CLIENT_SECRET")]
    client_secret: Option<String>,
    /// Registered redirect URI (repeatable; exact match).
    #[arg(long = "redirect-uri")]
    redirect_uris: Vec<String>,
    /// Access token lifetime (`expires_in`), seconds.
    #[arg(long, default_value_t = 3599)]
    token_lifetime: u64,
    /// Concurrent requests per mailbox before 429 ApplicationThrottled.
    #[arg(long, default_value_t = 4)]
    concurrency_limit: usize,
    /// Requests per mailbox per 10 minutes before 429 TooManyRequests.
    #[arg(long, default_value_t = 10_000)]
    budget: u64,
    /// Delta tokens kept per folder (older ones answer 410 SyncStateNotFound).
    #[arg(long, default_value_t = 3)]
    delta_generations: usize,
    /// Delay before Sent Items copies appear, milliseconds.
    #[arg(long, default_value_t = 0)]
    sent_items_delay_ms: u64,
    /// Authorize answers error=access_denied instead of consenting.
    #[arg(long)]
    deny_consent: bool,
    /// Base URL written into nextLink/deltaLink instead of the request's Host.
    #[arg(long)]
    public_base_url: Option<String>,
    /// Seed demo data: tenant --demo-tenant with users `support@` (the help-desk mailbox, signed
    /// in by default at authorize, filled by the mail generator) and `agent@`.
    #[arg(long)]
    demo: bool,
    /// Tenant domain for --demo.
    #[arg(long, default_value = "contoso.onmicrosoft.com")]
    demo_tenant: String,
    /// Generated messages in the demo help-desk inbox.
    #[arg(long, default_value_t = 40)]
    demo_messages: usize,
    /// Seed of the demo mail generator.
    #[arg(long, default_value_t = 7)]
    demo_seed: u64,
    /// Extra users to create, as UPN (repeatable); the domain names the tenant.
    #[arg(long = "user")]
    users: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut cfg = SimConfig::default();
    if let Some(c) = args.client_id {
        cfg.client_id = c;
    }
    if let Some(s) = args.client_secret {
        cfg.client_secret = s;
    }
    if !args.redirect_uris.is_empty() {
        cfg.redirect_uris = args.redirect_uris;
    }
    cfg.access_token_lifetime_secs = args.token_lifetime;
    cfg.mailbox_concurrency_limit = args.concurrency_limit;
    cfg.mailbox_budget_per_10_min = args.budget;
    cfg.delta_generations_kept = args.delta_generations;
    cfg.sent_items_delay_ms = args.sent_items_delay_ms;
    cfg.auto_consent = !args.deny_consent;
    cfg.public_base_url = args.public_base_url;
    let sim = GraphSim::start_on(SocketAddr::new(args.host, args.port), cfg).await?;
    for upn in &args.users {
        let domain = upn.split('@').nth(1).unwrap_or("contoso.onmicrosoft.com");
        let name = upn.split('@').next().unwrap_or(upn);
        sim.try_create_user(domain, upn, name)?;
    }
    if args.demo {
        let tenant = sim.create_tenant(&args.demo_tenant, "Contoso");
        let support = sim.create_user(
            &tenant,
            &format!("support@{}", args.demo_tenant),
            "Contoso Support",
        );
        sim.create_user(
            &tenant,
            &format!("agent@{}", args.demo_tenant),
            "Alex Agent",
        );
        sim.set_login_user(&support);
        let summary = sim.generate_mailbox(
            &support,
            GeneratorSpec {
                seed: args.demo_seed,
                messages: args.demo_messages,
                ..GeneratorSpec::default()
            },
        );
        sim.deliver(
            &support,
            InboundMail::new("welcome@example.com", "Welcome to the graph-sim demo")
                .from_name("graph-sim")
                .text("This mailbox was seeded by graph-sim --demo."),
        );
        tracing::info!(
            threads = summary.threads,
            messages = summary.messages,
            "demo mailbox seeded"
        );
    }
    println!("graph-sim listening on {}", sim.base_url());
    tokio::signal::ctrl_c().await?;
    sim.shutdown().await;
    Ok(())
}
