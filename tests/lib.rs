//! The integration-test harness: a fresh PostgreSQL database per test, the api in-process on
//! port 0, worker processes spawned from the real binary, and graph-sim on port 0.
//!
//! PostgreSQL: `DATABASE_URL` (any database on the server; tests create their own), else
//! `postgres://postgres@127.0.0.1:5432/postgres`. `.ci/run` starts a server when none answers.
//! Logs: set `TEST_LOG=1` to see the app's logs.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Once, OnceLock};
use std::time::Duration;

use api::auth::{JwtConfig, Role};
use api::{AppState, Limits};
use jobs::config::QueueSettings;
use jobs::ids::TenantId;
use poem::listener::{Acceptor, Listener, TcpListener};
use secrecy::SecretString;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";
/// The OAuth app the tests register in graph-sim, and the redirect URI graphdesk uses.
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_SECRET: &str = "test-client-secret";

/// The scopes graphdesk asks for in tests: the defaults plus shared-mailbox access.
pub const TEST_SCOPES: &str =
    "offline_access User.Read Mail.ReadWrite Mail.Send Mail.ReadWrite.Shared Mail.Send.Shared";

/// One keyring for the whole test run, shared by the in-process api and worker processes.
pub fn test_keyring() -> &'static str {
    static KEYRING: OnceLock<String> = OnceLock::new();
    KEYRING.get_or_init(|| format!("test1:{}", jobs::vault::TokenVault::generate_key()))
}

/// Where graphdesk reaches Microsoft in a test: a graph-sim, or an address nothing listens on.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub graph_base_url: String,
    pub identity_base_url: String,
    pub redirect_uri: String,
}

impl Endpoints {
    pub fn unreachable() -> Self {
        Self {
            graph_base_url: "http://127.0.0.1:9/v1.0".into(),
            identity_base_url: "http://127.0.0.1:9".into(),
            redirect_uri: "http://127.0.0.1:9/oauth/callback".into(),
        }
    }

    pub fn sim(sim: &graph_sim::GraphSim, redirect_uri: &str) -> Self {
        Self {
            graph_base_url: sim.graph_base_url(),
            identity_base_url: sim.base_url(),
            redirect_uri: redirect_uri.to_string(),
        }
    }

    pub fn integration(&self) -> jobs::services::IntegrationSettings {
        jobs::services::IntegrationSettings {
            graph_base_url: self.graph_base_url.clone(),
            identity_base_url: self.identity_base_url.clone(),
            client_id: CLIENT_ID.into(),
            client_secret: SecretString::from(CLIENT_SECRET),
            redirect_uri: self.redirect_uri.parse().expect("redirect uri"),
            authority: jobs::graph::TenantSegment::organizations(),
            keyring: SecretString::from(test_keyring()),
            scopes: TEST_SCOPES.into(),
            mailbox_concurrency: 4,
            mailbox_budget_per_10_min: 10_000,
            sync: jobs::config::SyncSettings::default(),
        }
    }

    /// Services acting as the application's database roles (Row Level Security enforced
    /// for tenant work), on the database `pool` points at.
    pub fn services(&self, pool: &PgPool) -> jobs::services::Services {
        let options = (*pool.connect_options()).clone();
        // Small pools: the suite runs tests in parallel against one server's connection limit.
        let app = jobs::db::lazy_pool_as(options.clone(), 4, Some("graphdesk_app".into()));
        let system = jobs::db::lazy_pool_as(options, 4, Some("graphdesk_system".into()));
        jobs::services::Services::new(app, &self.integration())
            .expect("services")
            .with_system_pool(system)
    }

    /// The same settings as environment variables, for worker processes.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("GRAPH_BASE_URL".into(), self.graph_base_url.clone()),
            ("IDENTITY_BASE_URL".into(), self.identity_base_url.clone()),
            ("OAUTH_REDIRECT_URI".into(), self.redirect_uri.clone()),
            ("OAUTH_CLIENT_ID".into(), CLIENT_ID.into()),
            ("OAUTH_CLIENT_SECRET".into(), CLIENT_SECRET.into()),
            ("OAUTH_AUTHORITY".into(), "organizations".into()),
            ("TOKEN_ENCRYPTION_KEYS".into(), test_keyring().into()),
            ("OAUTH_SCOPES".into(), TEST_SCOPES.into()),
        ]
    }
}

/// A graph-sim on port 0 with graphdesk's test app registered (redirect URI included).
pub async fn spawn_sim(
    redirect_uri: &str,
    tweak: impl FnOnce(&mut graph_sim::SimConfig),
) -> graph_sim::GraphSim {
    let mut config = graph_sim::SimConfig {
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        redirect_uris: vec![redirect_uri.to_string()],
        ..graph_sim::SimConfig::default()
    };
    tweak(&mut config);
    graph_sim::GraphSim::start(config)
        .await
        .expect("graph-sim starts")
}

pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            jobs::telemetry::init(false);
        }
    });
}

fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    /// Only the owning handle drops the database.
    owned: bool,
}

impl TestDb {
    /// A fresh database with every migration applied.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        jobs::db::migrate(&db.pool).await.expect("migrations apply");
        db
    }

    /// A fresh database with no schema at all.
    pub async fn empty() -> Self {
        init_logs();
        let base: PgConnectOptions = server_url().parse().expect("DATABASE_URL parses");
        let name = format!("gd_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = base
            .clone()
            .database("postgres")
            .connect()
            .await
            .expect("PostgreSQL reachable (set DATABASE_URL or run .ci/run)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let opts = base.database(&name);
        let url = opts.to_url_lossy().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await
            .expect("connect to test database");
        Self {
            name,
            url,
            pool,
            owned: true,
        }
    }

    /// A second handle on the same database that does not drop it.
    pub fn share(&self) -> Self {
        Self {
            name: self.name.clone(),
            url: self.url.clone(),
            pool: self.pool.clone(),
            owned: false,
        }
    }

    pub fn settings(&self) -> SecretString {
        SecretString::from(self.url.clone())
    }

    pub async fn create_tenant(&self, name: &str) -> TenantId {
        let id = TenantId::new();
        sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
            .bind(id.as_uuid())
            .bind(name)
            .execute(&self.pool)
            .await
            .expect("insert tenant");
        id
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let name = self.name.clone();
        let url = server_url();
        // Drop the database off the test's runtime, which may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    let base: Result<PgConnectOptions, _> = url.parse();
                    if let Ok(base) = base
                        && let Ok(mut c) = base.database("postgres").connect().await
                    {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut c)
                        .await;
                    }
                });
            }
        })
        .join();
    }
}

/// The api running in-process on an ephemeral port, over a fresh database.
pub struct TestApp {
    pub db: TestDb,
    pub address: String,
    pub client: reqwest::Client,
    pub jwt: JwtConfig,
    pub endpoints: Endpoints,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_on(TestDb::new().await).await
}

pub async fn spawn_app_on(db: TestDb) -> TestApp {
    let acceptor = TcpListener::bind("127.0.0.1:0")
        .into_acceptor()
        .await
        .expect("bind api");
    serve_app(db, acceptor, Endpoints::unreachable()).await
}

/// Binds the api's port first, so the redirect URI registered in graph-sim can name it.
pub async fn bind_api() -> (poem::listener::TcpAcceptor, String) {
    let acceptor = TcpListener::bind("127.0.0.1:0")
        .into_acceptor()
        .await
        .expect("bind api");
    let addr = acceptor.local_addr()[0]
        .as_socket_addr()
        .copied()
        .expect("tcp address");
    (acceptor, format!("http://{addr}"))
}

/// The api in process on a fresh database, with graph-sim as its Microsoft and the sim's
/// redirect URI naming the api's own OAuth callback. Also returns the api's base URL.
pub async fn spawn_app_with_sim() -> (TestApp, graph_sim::GraphSim, String) {
    let db = TestDb::new().await;
    let (acceptor, base) = bind_api().await;
    let redirect = format!("{base}/oauth/callback");
    let sim = spawn_sim(&redirect, |_| {}).await;
    let app = serve_app(db, acceptor, Endpoints::sim(&sim, &redirect)).await;
    (app, sim, base)
}

pub async fn serve_app(
    db: TestDb,
    acceptor: poem::listener::TcpAcceptor,
    endpoints: Endpoints,
) -> TestApp {
    let jwt = JwtConfig::new(SecretString::from(JWT_SECRET), "graphdesk", "graphdesk-api");
    let state = AppState::new(endpoints.services(&db.pool), jwt.clone(), Limits::default());
    let addr = acceptor.local_addr()[0]
        .as_socket_addr()
        .copied()
        .expect("tcp address");
    let app = api::build_app(state);
    let server = tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor).run(app).await;
    });
    TestApp {
        db,
        address: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client"),
        jwt,
        endpoints,
        server,
    }
}

impl TestApp {
    pub fn token(&self, tenant: TenantId, role: Role) -> String {
        self.jwt
            .mint("test-user", tenant, role, chrono::Duration::hours(1))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get_job(&self, token: &str, id: i64) -> serde_json::Value {
        self.client
            .get(self.url(&format!("/api/v1/jobs/{id}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET job")
            .json()
            .await
            .expect("job JSON")
    }

    /// Polls a job over HTTP until it reaches one of `states`.
    pub async fn wait_for_job(
        &self,
        token: &str,
        id: i64,
        states: &[&str],
        within: Duration,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let job = self.get_job(token, id).await;
            if states.iter().any(|s| job["status"] == *s) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} did not reach {states:?} within {within:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn target_dir() -> PathBuf {
    // The test binary lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target profile dir")
        .to_path_buf()
}

/// Path of a workspace binary, built once if the test run did not build it.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = target_dir().join(name);
    if !path.exists() {
        BUILT.get_or_init(|| {
            let status = std::process::Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--bin",
                    "worker",
                    "--bin",
                    "api",
                    "--bin",
                    "graph-sim",
                ])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .status()
                .expect("cargo build");
            assert!(status.success(), "building the binaries failed");
        });
    }
    path
}

/// A worker OS process. Killed on drop.
pub struct WorkerProcess {
    pub child: Child,
    pub worker_id: String,
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

pub struct WorkerOptions {
    pub queue: QueueSettings,
    pub endpoints: Endpoints,
    pub shutdown_grace_secs: u64,
    pub extra_env: Vec<(String, String)>,
    /// Write the worker's log (stderr) to this file, e.g. to search it for secrets.
    pub log_file: Option<std::path::PathBuf>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            queue: QueueSettings {
                poll_interval: Duration::from_millis(200),
                lease: Duration::from_secs(5),
                ..QueueSettings::default()
            },
            endpoints: Endpoints::unreachable(),
            shutdown_grace_secs: 20,
            extra_env: Vec::new(),
            log_file: None,
        }
    }
}

pub async fn spawn_worker(db: &TestDb, opts: WorkerOptions) -> WorkerProcess {
    let mut cmd = Command::new(workspace_bin("worker"));
    cmd.arg("run")
        .env("DATABASE_URL", &db.url)
        // Each process opens two pools (app and system role); keep the suite under the
        // server's connection limit.
        .env("DATABASE_MAX_CONNECTIONS", "6")
        .env(
            "WORKER_CONCURRENCY",
            opts.queue.worker_concurrency.to_string(),
        )
        .env("WORKER_BATCH_SIZE", opts.queue.batch_size.to_string())
        .env(
            "WORKER_POLL_INTERVAL_MS",
            opts.queue.poll_interval.as_millis().to_string(),
        )
        .env("QUEUE_LEASE_SECS", opts.queue.lease.as_secs().to_string())
        .env(
            "WORKER_TENANT_CONCURRENCY",
            opts.queue.tenant_concurrency.unwrap_or(0).to_string(),
        )
        .env(
            "JOB_TIMEOUT_SECS",
            opts.queue.job_timeout.as_secs().to_string(),
        )
        .env(
            "WORKER_SHUTDOWN_GRACE_SECS",
            opts.shutdown_grace_secs.to_string(),
        )
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("WORKER_QUEUES")
        .stdout(Stdio::piped())
        .stderr(match &opts.log_file {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("worker log file")),
            None if std::env::var_os("TEST_LOG").is_some() => Stdio::inherit(),
            None => Stdio::null(),
        })
        .kill_on_drop(true);
    for (k, v) in opts.endpoints.env().iter().chain(&opts.extra_env) {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn worker");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let worker_id = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("worker ")
                && let Some((id, _)) = rest.split_once(" running")
            {
                return id.to_string();
            }
        }
        panic!("worker exited before it was ready");
    })
    .await
    .expect("worker ready within 60 s");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    WorkerProcess { child, worker_id }
}

impl WorkerProcess {
    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal worker");
    }

    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("worker exits in time")
            .expect("wait")
    }
}

/// Polls `query` (a scalar i64) until it equals `expected`.
pub async fn wait_for_count(pool: &PgPool, query: &'static str, expected: i64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n: i64 = sqlx::query_scalar(query)
            .fetch_one(pool)
            .await
            .expect("count query");
        if n == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{query}` = {n}, expected {expected} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub use api::auth::Role as TestRole;

/// Connects a graph-sim mailbox without the browser flow (the OAuth flow itself is tested in
/// `accounts`): tokens issued by the simulator, stored encrypted like the callback does.
pub async fn connect_direct(
    services: &jobs::services::Services,
    sim: &graph_sim::GraphSim,
    tenant: TenantId,
    upn: &str,
) -> jobs::ids::AccountId {
    let issued = sim.issue_tokens_for(
        upn,
        &["offline_access", "User.Read", "Mail.ReadWrite", "Mail.Send"],
    );
    let tokens = jobs::graph::TokenSet {
        access_token: SecretString::from(issued.access_token),
        refresh_token: issued.refresh_token.map(SecretString::from),
        expires_at: chrono::Utc::now() + chrono::Duration::seconds(issued.expires_in as i64),
        scope: issued.scope,
    };
    let account = jobs::ids::AccountId::new();
    let mut tx = jobs::db::tenant_tx(&services.pool, tenant)
        .await
        .expect("begin");
    sqlx::query(
        "INSERT INTO helpdesk_email_accounts (id, tenant_id, email_address, status)
         VALUES ($1, $2, $3, 'active')",
    )
    .bind(account.as_uuid())
    .bind(tenant.as_uuid())
    .bind(upn)
    .execute(&mut *tx)
    .await
    .expect("insert account");
    jobs::accounts::tokens::store_tokens(&mut tx, &services.vault, tenant, account, &tokens)
        .await
        .expect("store tokens");
    tx.commit().await.expect("commit");
    account
}

/// The api as a real OS process (its own logging, as in production), on a free local port.
pub struct ApiProcess {
    pub child: Child,
    pub address: String,
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A free local port (bound and released; the caller binds it right away).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub async fn spawn_api_process(
    db: &TestDb,
    endpoints: &Endpoints,
    port: u16,
    log_file: Option<&std::path::Path>,
) -> ApiProcess {
    let mut cmd = Command::new(workspace_bin("api"));
    cmd.arg("serve")
        .env("DATABASE_URL", &db.url)
        .env("DATABASE_MAX_CONNECTIONS", "6")
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("JWT_SECRET", JWT_SECRET)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
        )
        .stdout(Stdio::null())
        .stderr(match log_file {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("api log file")),
            None => Stdio::null(),
        })
        .kill_on_drop(true);
    for (k, v) in endpoints.env() {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn api");
    let address = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{address}/readyz")).send().await
            && r.status().is_success()
        {
            return ApiProcess { child, address };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the api process did not become ready on port {port}");
}

/// What the current transaction has read so far from `queue_jobs`, `queue_jobs_done` and each
/// of their indexes,
/// by PostgreSQL's per-transaction counters: scans of each relation (for the table, its
/// sequential scans) and the entries each index's scans returned. A statement's own reads
/// are the difference across it ([`QueueReads::since`]); the backend's unflushed counters
/// may still hold earlier statements'.
#[derive(Debug, Clone)]
pub struct QueueReads(std::collections::BTreeMap<String, (i64, i64)>);

impl QueueReads {
    pub async fn now(conn: &mut sqlx::PgConnection) -> Self {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT c.relname::text, pg_stat_get_xact_numscans(c.oid),
                    pg_stat_get_xact_tuples_returned(c.oid)
             FROM pg_class c
             WHERE c.oid IN ('queue_jobs'::regclass, 'queue_jobs_done'::regclass)
                OR c.oid IN (SELECT indexrelid FROM pg_index
                             WHERE indrelid IN ('queue_jobs'::regclass,
                                                'queue_jobs_done'::regclass))",
        )
        .fetch_all(conn)
        .await
        .expect("read the transaction's scan counters");
        Self(rows.into_iter().map(|(r, s, t)| (r, (s, t))).collect())
    }

    /// What was read between `before` and these counters.
    #[must_use]
    pub fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(r, (s, t))| {
                    let (s0, t0) = before.0.get(r).copied().unwrap_or_default();
                    (r.clone(), (s - s0, t - t0))
                })
                .collect(),
        )
    }

    /// Scans of `relation` (either table or one of their indexes, by name).
    #[must_use]
    pub fn scans(&self, relation: &str) -> i64 {
        self.get(relation).0
    }

    /// Entries the scans of the index `relation` returned.
    #[must_use]
    pub fn returned(&self, relation: &str) -> i64 {
        self.get(relation).1
    }

    fn get(&self, relation: &str) -> (i64, i64) {
        *self
            .0
            .get(relation)
            .unwrap_or_else(|| panic!("{relation} is not a queue table or one of its indexes"))
    }
}
