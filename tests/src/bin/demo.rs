//! The demo driver (README's first command, through `scripts/demo.sh`).
//!
//! Brings up, as real processes: graph-sim with three tenants of two mailboxes each, filled
//! with realistic threaded mail; the api; two workers; and the scheduler. Connects every
//! mailbox through the real OAuth flow over HTTP, exactly as a browser would; keeps delivering
//! mail and sends a few agent replies through the public API while printing progress; then
//! prints the dashboard URL with a ready ops token. Ctrl-C stops everything.
//!
//! Nothing here reaches into a process: graph-sim is driven through its `/_sim` control API,
//! graphdesk through its HTTP API. The database is read only to print progress.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use api::auth::{JwtConfig, Role};
use clap::Parser;
use graph_sim::{GeneratorSpec, InboundMail, SimStats};
use jobs::ids::TenantId;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(about = "Run the graphdesk demo (see README)")]
struct Cli {
    /// Port for the api; 0 picks a free one. When the port is taken a free one is used.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Seconds of live mail delivery after the mailboxes are connected.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// One new inbound mail every this many milliseconds while delivering.
    #[arg(long, default_value_t = 1500)]
    mail_every_ms: u64,
    /// Generated (historical) messages per mailbox before connecting.
    #[arg(long, default_value_t = 30)]
    seed_messages: usize,
    /// Agent replies sent through the API while mail is delivered.
    #[arg(long, default_value_t = 6)]
    replies: usize,
    /// Share of Graph requests graph-sim answers with 429 (with Retry-After), so the
    /// dashboard shows throttling being absorbed. 0 switches it off.
    #[arg(long, default_value_t = 0.03)]
    throttle_rate: f64,
    /// Exit once the work is done instead of waiting for Ctrl-C (for tests and CI).
    #[arg(long)]
    exit: bool,
}

const DEMO_SECRET: &str = "demo-secret-demo-secret-demo-secret-0000";
const CLIENT_ID: &str = "0de70de7-0000-4000-8000-000000000001";
const CLIENT_SECRET: &str = "demo-client-secret";
const DATABASE: &str = "graphdesk_demo";
const TENANTS: [(&str, &str); 3] = [
    ("contoso.example", "Contoso"),
    ("fabrikam.example", "Fabrikam"),
    ("northwind.example", "Northwind Traders"),
];
const MAILBOXES: [(&str, &str); 2] = [("support", "Support"), ("billing", "Billing")];
const TOPICS: [&str; 10] = [
    "Cannot sign in after the password change",
    "Invoice shows the wrong VAT number",
    "Printer on the 2nd floor jams",
    "VPN drops every few minutes",
    "Please cancel order 5521",
    "Refund for a duplicate charge",
    "New starter needs a laptop",
    "Shared calendar is not syncing",
    "Delivery arrived damaged",
    "Question about the annual plan",
];
const CUSTOMERS: [(&str, &str); 8] = [
    ("Olivia Smith", "olivia.smith@example.com"),
    ("Lena Müller", "lena.mueller@beispiel.de"),
    ("Marco Bianchi", "marco.bianchi@esempio.it"),
    ("Sanne de Vries", "sanne@voorbeeld.nl"),
    ("Oskar Johansson", "oskar@exempel.se"),
    ("Liam Johnson", "liam.j@example.org"),
    ("王伟", "wang.wei@example.cn"),
    ("Emma Brown", "emma.brown@example.net"),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut procs = Processes::default();
    // Ctrl-C at any point (even while starting up) stops every child before exiting.
    let outcome = tokio::select! {
        r = run(&cli, &mut procs) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\n[demo] Ctrl-C: stopping");
            Ok(())
        }
    };
    procs.stop().await;
    println!("[demo] stopped");
    outcome
}

async fn run(cli: &Cli, procs: &mut Processes) -> anyhow::Result<()> {
    let started = Instant::now();
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("bin dir")?
        .to_path_buf();
    let log_dir = std::env::temp_dir().join("graphdesk-demo");
    std::fs::create_dir_all(&log_dir)?;
    println!(
        "[demo] process logs go to {} (RUST_LOG sets the level)",
        log_dir.display()
    );

    let (db_url, pool) = fresh_database().await?;
    println!("[demo] database {DATABASE} created and migrated");

    let api_port = pick_port(cli.port)?;
    let api_base = format!("http://127.0.0.1:{api_port}");
    let redirect_uri = format!("{api_base}/oauth/callback");

    // graph-sim first: the api needs its URL, and it must know our redirect URI.
    let sim_base = procs
        .spawn_sim(&bin_dir, &log_dir, &redirect_uri)
        .await
        .context("starting graph-sim")?;
    let sim = Sim::new(&sim_base);
    let mut mailboxes = Vec::new();
    for (t, (domain, name)) in TENANTS.iter().enumerate() {
        sim.post(
            "/_sim/tenants",
            serde_json::json!({"domain": domain, "display_name": name}),
        )
        .await?;
        for (m, (local, display)) in MAILBOXES.iter().enumerate() {
            let upn = format!("{local}@{domain}");
            sim.post(
                "/_sim/users",
                serde_json::json!({"tenant": domain, "upn": upn, "display_name": format!("{name} {display}")}),
            )
            .await?;
            let spec = GeneratorSpec {
                seed: 100 + (t * 10 + m) as u64,
                messages: cli.seed_messages,
                days: 7,
                ..GeneratorSpec::default()
            };
            sim.post(
                &format!("/_sim/users/{upn}/generate"),
                serde_json::to_value(spec)?,
            )
            .await?;
            mailboxes.push(Mailbox {
                tenant_index: t,
                upn,
                thread_heads: Vec::new(),
            });
        }
    }
    if cli.throttle_rate > 0.0 {
        sim.post(
            "/_sim/faults",
            serde_json::json!({
                "kind": {"type": "too_many_requests", "retry_after": "1"},
                "path_contains": "/v1.0/",
                "probability": cli.throttle_rate,
            }),
        )
        .await?;
    }
    println!(
        "[demo] graph-sim at {sim_base}: {} tenants x {} mailboxes, {} generated messages each{}",
        TENANTS.len(),
        MAILBOXES.len(),
        cli.seed_messages,
        if cli.throttle_rate > 0.0 {
            format!(
                ", {:.0}% of Graph calls throttled",
                cli.throttle_rate * 100.0
            )
        } else {
            String::new()
        }
    );

    let jwt = JwtConfig::new(
        SecretString::from(DEMO_SECRET),
        "graphdesk",
        "graphdesk-api",
    );
    let mut tenants = Vec::new();
    let mut first_tenant = None;
    for (_, name) in TENANTS {
        let id = TenantId::new();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
            .bind(id.as_uuid())
            .bind(name)
            .execute(&pool)
            .await?;
        first_tenant.get_or_insert(id);
        tenants.push(DemoTenant {
            name,
            admin: jwt.mint("demo-admin", id, Role::Admin, chrono::Duration::hours(12)),
            agent: jwt.mint("demo-agent", id, Role::Agent, chrono::Duration::hours(12)),
        });
    }
    let ops_token = jwt.mint(
        "demo-ops",
        first_tenant.context("a tenant")?,
        Role::Ops,
        chrono::Duration::hours(12),
    );

    let env = ChildEnv {
        database_url: db_url,
        sim_base: sim_base.clone(),
        redirect_uri,
        keyring: format!("demo1:{}", jobs::vault::TokenVault::generate_key()),
    };
    procs
        .spawn(
            &bin_dir,
            &log_dir,
            "api",
            &["serve"],
            &env,
            &[("BIND_ADDR", format!("127.0.0.1:{api_port}"))],
        )
        .await?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?;
    wait_ready(&http, &api_base).await?;
    for i in 1..=2 {
        procs
            .spawn(
                &bin_dir,
                &log_dir,
                &format!("worker-{i}"),
                &["run"],
                &env,
                &[],
            )
            .await?;
    }
    let scheduler = has_scheduler(&bin_dir).await;
    if scheduler {
        // A short tick so new mail shows within seconds (production default: 15 s).
        procs
            .spawn(
                &bin_dir,
                &log_dir,
                "scheduler",
                &["scheduler"],
                &env,
                &[("SCHEDULER_TICK_SECS", "2".to_string())],
            )
            .await?;
        println!("[demo] api at {api_base}, 2 workers and the scheduler running");
    } else {
        println!(
            "[demo] api at {api_base} and 2 workers running; this worker binary has no \
             `scheduler` subcommand, so the demo asks for a sync every 10 s over HTTP instead"
        );
    }

    // The real OAuth flow, as a browser does it: our connect endpoint gives the Microsoft
    // sign-in URL, graph-sim (signed in as the hinted user, consent given) redirects back to
    // our callback with a code, and the callback redeems it.
    let mut accounts: Vec<(usize, String)> = Vec::new();
    for mb in &mailboxes {
        let tenant = &tenants[mb.tenant_index];
        let start: serde_json::Value = http
            .get(format!("{api_base}/api/v1/oauth/connect"))
            .query(&[("login_hint", mb.upn.as_str())])
            .bearer_auth(&tenant.admin)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let authorize = start["authorize_url"]
            .as_str()
            .context("authorize_url in the connect answer")?;
        let consent = http.get(authorize).send().await?;
        ensure!(
            consent.status() == reqwest::StatusCode::FOUND,
            "graph-sim answered the sign-in with {}",
            consent.status()
        );
        let callback = consent
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .context("redirect back to graphdesk")?
            .to_string();
        let page = http.get(&callback).send().await?;
        let status = page.status();
        let text = page.text().await?;
        ensure!(
            status.is_success() && text.contains("is connected"),
            "connecting {} failed ({status}): {text}",
            mb.upn
        );
        let account: uuid::Uuid =
            sqlx::query_scalar("SELECT id FROM helpdesk_email_accounts WHERE email_address = $1")
                .bind(&mb.upn)
                .fetch_one(&pool)
                .await?;
        accounts.push((mb.tenant_index, account.to_string()));
        println!(
            "[demo] connected {} ({}) through OAuth",
            mb.upn, tenant.name
        );
    }
    // The scheduler syncs an account when its interval has passed; the demo wants new mail
    // visible within seconds rather than the default minute.
    sqlx::query("UPDATE helpdesk_email_accounts SET sync_interval_seconds = 10")
        .execute(&pool)
        .await?;

    print_urls(&api_base, &sim_base, &ops_token, &log_dir);

    // Live traffic: new mail, customers answering earlier mail, agents replying.
    println!(
        "[demo] delivering mail for {} s (one every {} ms) and sending {} replies",
        cli.duration, cli.mail_every_ms, cli.replies
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(api_port));
    let mut delivered: Vec<String> = Vec::new();
    let mut sends: Vec<String> = Vec::new();
    let live = Instant::now();
    let until = live + Duration::from_secs(cli.duration);
    let mut next_mail = live;
    let mut next_progress = live + Duration::from_secs(5);
    let mut next_http_sync = live;
    let reply_gap = Duration::from_secs(cli.duration.max(1)) / (cli.replies as u32 + 1);
    let mut next_reply = live + reply_gap;
    while Instant::now() < until {
        let now = Instant::now();
        if now >= next_mail {
            next_mail += Duration::from_millis(cli.mail_every_ms.max(50));
            let i = rng.below(mailboxes.len());
            let mail = next_mail_for(&mut mailboxes[i], &mut rng, delivered.len());
            let id = mail.message_id.clone().unwrap_or_default();
            sim.post(
                &format!("/_sim/users/{}/deliver", mailboxes[i].upn),
                serde_json::to_value(&mail)?,
            )
            .await?;
            delivered.push(id);
        }
        if now >= next_reply && sends.len() < cli.replies {
            next_reply += reply_gap;
            let t = rng.below(tenants.len());
            if let Some(send) =
                reply_to_a_ticket(&http, &api_base, &tenants[t], sends.len()).await?
            {
                sends.push(send);
            }
        }
        if !scheduler && now >= next_http_sync {
            next_http_sync += Duration::from_secs(10);
            for (t, account) in &accounts {
                http.post(format!("{api_base}/api/v1/accounts/{account}/sync"))
                    .bearer_auth(&tenants[*t].admin)
                    .json(&serde_json::json!({}))
                    .send()
                    .await?;
            }
        }
        if now >= next_progress {
            next_progress += Duration::from_secs(5);
            let p = Progress::read(&pool, &sim, &delivered).await?;
            println!(
                "[demo {:>4}s] {}",
                started.elapsed().as_secs(),
                p.line(delivered.len())
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!("[demo] delivery stopped; waiting for the last syncs and sends");
    let settle = Instant::now() + Duration::from_secs(90);
    let mut last = Progress::read(&pool, &sim, &delivered).await?;
    while Instant::now() < settle && !last.settled(delivered.len(), sends.len()) {
        if !scheduler {
            for (t, account) in &accounts {
                http.post(format!("{api_base}/api/v1/accounts/{account}/sync"))
                    .bearer_auth(&tenants[*t].admin)
                    .json(&serde_json::json!({}))
                    .send()
                    .await?;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        last = Progress::read(&pool, &sim, &delivered).await?;
        println!(
            "[demo {:>4}s] {}",
            started.elapsed().as_secs(),
            last.line(delivered.len())
        );
    }
    if last.settled(delivered.len(), sends.len()) {
        println!(
            "[demo] all {} live mails are on tickets and all {} replies confirmed by Graph",
            delivered.len(),
            sends.len()
        );
    } else {
        println!("[demo] still working after 90 s; the dashboard shows what is pending or failed");
    }
    print_urls(&api_base, &sim_base, &ops_token, &log_dir);
    if cli.exit {
        ensure!(
            last.settled(delivered.len(), sends.len()),
            "the demo did not settle: {}",
            last.line(delivered.len())
        );
        return Ok(());
    }
    println!("[demo] running; Ctrl-C stops everything");
    std::future::pending::<()>().await;
    Ok(())
}

fn print_urls(api: &str, sim: &str, ops_token: &str, logs: &Path) {
    println!();
    println!(
        "  Dashboard:  {api}/dashboard   (log in at {api}/dashboard/login with the ops token)"
    );
    println!("  API docs:   {api}/docs");
    println!("  Metrics:    {api}/metrics   (curl -H \"Authorization: Bearer $OPS_TOKEN\" ...)");
    println!("  graph-sim:  {sim}/_sim/stats   (what Microsoft Graph saw)");
    println!("  Logs:       {}", logs.display());
    println!("  Ops token:  {ops_token}");
    println!();
}

struct DemoTenant {
    name: &'static str,
    admin: String,
    agent: String,
}

struct Mailbox {
    tenant_index: usize,
    upn: String,
    /// (Message-ID chain, subject, customer) of threads the demo started, for follow-ups.
    thread_heads: Vec<(Vec<String>, String, usize)>,
}

/// A new thread, or (one time in three) the customer answering one the demo started.
fn next_mail_for(mb: &mut Mailbox, rng: &mut Rng, n: usize) -> InboundMail {
    let domain = mb
        .upn
        .split('@')
        .nth(1)
        .unwrap_or("example.com")
        .to_string();
    let id = format!("<demo-{n}-{}@mail.{domain}>", rng.next() % 1_000_000);
    if !mb.thread_heads.is_empty() && rng.below(3) == 0 {
        let k = rng.below(mb.thread_heads.len());
        let (chain, subject, customer) = &mut mb.thread_heads[k];
        let (name, address) = CUSTOMERS[*customer];
        let mail = InboundMail::new(address, format!("RE: {subject}"))
            .from_name(name)
            .message_id(id.clone())
            .in_reply_to(chain.last().cloned().unwrap_or_default())
            .references(chain.clone())
            .text("Thanks, but it is still happening. Could you have another look?");
        chain.push(id);
        return mail;
    }
    let customer = rng.below(CUSTOMERS.len());
    let (name, address) = CUSTOMERS[customer];
    let subject = format!("{} (ref {})", TOPICS[rng.below(TOPICS.len())], 1000 + n);
    mb.thread_heads
        .push((vec![id.clone()], subject.clone(), customer));
    InboundMail::new(address, subject)
        .from_name(name)
        .message_id(id)
        .text("Hello, could you help me with this? Thanks in advance.")
}

/// Posts an agent reply on the most recent open ticket of the tenant; `None` while the tenant
/// has no ticket yet.
async fn reply_to_a_ticket(
    http: &reqwest::Client,
    api: &str,
    tenant: &DemoTenant,
    n: usize,
) -> anyhow::Result<Option<String>> {
    let list: serde_json::Value = http
        .get(format!("{api}/api/v1/tickets"))
        .query(&[("status", "open"), ("limit", "20")])
        .bearer_auth(&tenant.agent)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let Some(ticket) = list["tickets"]
        .as_array()
        .and_then(|t| t.get(n % t.len().max(1)))
        .and_then(|t| t["id"].as_i64())
    else {
        return Ok(None);
    };
    let accepted: serde_json::Value = http
        .post(format!("{api}/api/v1/tickets/{ticket}/replies"))
        .bearer_auth(&tenant.agent)
        .header("Idempotency-Key", format!("demo-reply-{n}"))
        .json(&serde_json::json!({
            "body_html": format!("<p>Hello, thanks for getting in touch. We are on it (demo reply {n}).</p>")
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!("[demo] {} agent replied on ticket #{ticket}", tenant.name);
    Ok(accepted["send_id"].as_str().map(str::to_string))
}

/// Figures for one progress line, read from the database and graph-sim.
struct Progress {
    tickets: i64,
    inbound: i64,
    outbound: i64,
    live_stored: i64,
    jobs: BTreeMap<String, i64>,
    retried: i64,
    sends: BTreeMap<String, i64>,
    graph: SimStats,
    graph_sends: usize,
}

impl Progress {
    async fn read(pool: &PgPool, sim: &Sim, delivered: &[String]) -> anyhow::Result<Self> {
        let (tickets, inbound, outbound, live_stored): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM helpdesk_tickets WHERE merged_into_ticket_id IS NULL),
                    (SELECT count(*) FROM helpdesk_messages WHERE direction = 'inbound'),
                    (SELECT count(*) FROM helpdesk_messages WHERE direction = 'outbound'),
                    (SELECT count(*) FROM helpdesk_messages WHERE internet_message_id = ANY($1))",
        )
        .bind(delivered)
        .fetch_one(pool)
        .await?;
        let jobs: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM queue_jobs_all GROUP BY status")
                .fetch_all(pool)
                .await?;
        let retried: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM queue_jobs_all WHERE jsonb_array_length(errors) > 0",
        )
        .fetch_one(pool)
        .await?;
        let sends: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM helpdesk_outbound_sends GROUP BY status")
                .fetch_all(pool)
                .await?;
        let graph: SimStats = sim.get("/_sim/stats").await?;
        Ok(Self {
            tickets,
            inbound,
            outbound,
            live_stored,
            jobs: jobs.into_iter().collect(),
            retried,
            sends: sends.into_iter().collect(),
            graph_sends: graph.sends,
            graph,
        })
    }

    fn n(map: &BTreeMap<String, i64>, key: &str) -> i64 {
        map.get(key).copied().unwrap_or(0)
    }

    fn line(&self, delivered: usize) -> String {
        let total_sends: i64 = self.sends.values().sum();
        format!(
            "live mail {}/{} stored | tickets {} | messages {} in, {} out | jobs {} done, {} running, {} pending, {} failed, {} retried | replies {}/{} confirmed ({} sent by Graph) | Graph {} requests, {} throttled",
            self.live_stored,
            delivered,
            self.tickets,
            self.inbound,
            self.outbound,
            Self::n(&self.jobs, "done"),
            Self::n(&self.jobs, "running"),
            Self::n(&self.jobs, "pending"),
            Self::n(&self.jobs, "dead"),
            self.retried,
            Self::n(&self.sends, "confirmed"),
            total_sends,
            self.graph_sends,
            self.graph.total_requests,
            self.graph.throttled,
        )
    }

    fn settled(&self, delivered: usize, sends: usize) -> bool {
        self.live_stored as usize >= delivered
            && Self::n(&self.sends, "confirmed") as usize >= sends
    }
}

/// graph-sim's control API.
struct Sim {
    base: String,
    http: reqwest::Client,
}

impl Sim {
    fn new(base: &str) -> Self {
        Self {
            base: base.to_string(),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("graph-sim {path}: {} {}", resp.status(), resp.text().await?);
        }
        Ok(())
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

/// A tiny xorshift: the demo's mail only needs to look varied, not be unpredictable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct ChildEnv {
    database_url: String,
    sim_base: String,
    redirect_uri: String,
    keyring: String,
}

impl ChildEnv {
    fn apply(&self, cmd: &mut Command) {
        cmd.env("DATABASE_URL", &self.database_url)
            .env("JWT_SECRET", DEMO_SECRET)
            .env("GRAPH_BASE_URL", format!("{}/v1.0", self.sim_base))
            .env("IDENTITY_BASE_URL", &self.sim_base)
            .env("OAUTH_CLIENT_ID", CLIENT_ID)
            .env("OAUTH_CLIENT_SECRET", CLIENT_SECRET)
            .env("OAUTH_REDIRECT_URI", &self.redirect_uri)
            .env("OAUTH_AUTHORITY", "organizations")
            .env("TOKEN_ENCRYPTION_KEYS", &self.keyring)
            .env("WORKER_POLL_INTERVAL_MS", "200");
    }
}

/// The demo's child processes, stopped in reverse start order.
#[derive(Default)]
struct Processes {
    children: Vec<(String, Child)>,
}

impl Processes {
    fn command(bin_dir: &Path, log_dir: &Path, name: &str, bin: &str) -> anyhow::Result<Command> {
        let path = bin_dir.join(bin);
        ensure!(
            path.exists(),
            "{} is missing: build with `cargo build --release --bins` (scripts/demo.sh does)",
            path.display()
        );
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(path);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
        // Own process group: the terminal's Ctrl-C reaches only the demo, which then stops
        // the children in order (workers hand their jobs back before the api and graph-sim go).
        cmd.process_group(0);
        Ok(cmd)
    }

    async fn spawn_sim(
        &mut self,
        bin_dir: &Path,
        log_dir: &Path,
        redirect_uri: &str,
    ) -> anyhow::Result<String> {
        let mut cmd = Self::command(bin_dir, log_dir, "graph-sim", "graph-sim")?;
        cmd.args([
            "--port",
            "0",
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
            "--redirect-uri",
            redirect_uri,
        ]);
        let mut child = cmd.spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        self.children.push(("graph-sim".into(), child));
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("graph-sim listening on ") {
                    return Ok(url.trim().to_string());
                }
            }
            bail!("graph-sim exited before it listened")
        })
        .await
        .context("graph-sim did not start within 30 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(url)
    }

    async fn spawn(
        &mut self,
        bin_dir: &Path,
        log_dir: &Path,
        name: &str,
        args: &[&str],
        env: &ChildEnv,
        extra: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let bin = if name == "api" { "api" } else { "worker" };
        let mut cmd = Self::command(bin_dir, log_dir, name, bin)?;
        cmd.args(args);
        env.apply(&mut cmd);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        self.children.push((name.to_string(), child));
        // Every graphdesk process prints one line once it is up ("... running", "api listening").
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(" running") || line.starts_with("api listening") {
                    return true;
                }
            }
            false
        })
        .await;
        ensure!(
            matches!(ready, Ok(true)),
            "{name} did not start; see {}",
            log_dir.join(format!("{name}.log")).display()
        );
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(())
    }

    /// SIGTERM in reverse start order, so workers finish or hand back their jobs while the api
    /// and graph-sim still answer; SIGKILL whatever has not exited after its grace period.
    async fn stop(&mut self) {
        while let Some((name, mut child)) = self.children.pop() {
            if let Some(pid) = child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            match tokio::time::timeout(Duration::from_secs(25), child.wait()).await {
                Ok(_) => println!("[demo] {name} stopped"),
                Err(_) => {
                    let _ = child.kill().await;
                    println!("[demo] {name} killed after 25 s");
                }
            }
        }
    }
}

/// Drops and recreates the demo database, so every run starts from nothing.
async fn fresh_database() -> anyhow::Result<(String, PgPool)> {
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let base: PgConnectOptions = server.parse().context("DATABASE_URL")?;
    let mut admin = base
        .clone()
        .database("postgres")
        .connect()
        .await
        .context("connecting to PostgreSQL (scripts/demo.sh starts one when none answers)")?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
        .execute(&mut admin)
        .await?;
    admin.close().await.ok();
    let url = base.database(DATABASE).to_url_lossy().to_string();
    let pool = PgPool::connect(&url).await?;
    jobs::db::migrate(&pool).await?;
    Ok((url, pool))
}

/// The requested port when it is free, else any free one: the redirect URI registered in
/// graph-sim must name the api's real port, so it is chosen before anything starts.
fn pick_port(wanted: u16) -> anyhow::Result<u16> {
    if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", wanted)) {
        return Ok(l.local_addr()?.port());
    }
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port();
    println!("[demo] port {wanted} is taken; the api uses {port}");
    Ok(port)
}

async fn has_scheduler(bin_dir: &Path) -> bool {
    Command::new(bin_dir.join("worker"))
        .arg("--help")
        .output()
        .await
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("scheduler"))
}

async fn wait_ready(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the api did not become ready at {base}")
}
