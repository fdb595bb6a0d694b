//! The external services every process shares: one HTTP client, the Graph and identity
//! configuration, the token vault. Built once per process from the environment.

use std::sync::Arc;

use secrecy::SecretString;
use sqlx::PgPool;

use crate::config::{ConfigError, SyncSettings, env_opt, env_parse};
use crate::graph::{GraphConfig, IdentityClient, IdentityConfig, TenantSegment, build_http_client};
use crate::queue::Queue;
use crate::vault::TokenVault;

/// Settings of the Microsoft integration (see README for each variable).
#[derive(Debug, Clone)]
pub struct IntegrationSettings {
    pub graph_base_url: String,
    pub identity_base_url: String,
    pub client_id: String,
    pub client_secret: SecretString,
    pub redirect_uri: url::Url,
    /// The authority segment: `organizations`, `common`, or a tenant GUID/domain.
    pub authority: TenantSegment,
    pub keyring: SecretString,
    /// Delegated scopes requested at sign-in (space-separated).
    pub scopes: String,
    /// Per-mailbox Graph limits, held across every process.
    pub mailbox_concurrency: u32,
    pub mailbox_budget_per_10_min: u32,
    /// `SYNC_INITIAL_DAYS` and `SYNC_PAGE_SIZE`.
    pub sync: SyncSettings,
}

impl IntegrationSettings {
    pub fn from_env(graph_base_url: &str, identity_base_url: &str) -> Result<Self, ConfigError> {
        let required = |name: &'static str| env_opt(name).ok_or(ConfigError::Missing { name });
        let redirect = env_opt("OAUTH_REDIRECT_URI")
            .unwrap_or_else(|| "http://127.0.0.1:8080/oauth/callback".into());
        Ok(Self {
            graph_base_url: graph_base_url.to_string(),
            identity_base_url: identity_base_url.to_string(),
            client_id: required("OAUTH_CLIENT_ID")?,
            client_secret: SecretString::from(required("OAUTH_CLIENT_SECRET")?),
            redirect_uri: url::Url::parse(&redirect).map_err(|e| ConfigError::Invalid {
                name: "OAUTH_REDIRECT_URI",
                reason: e.to_string(),
            })?,
            authority: TenantSegment::parse(
                &env_opt("OAUTH_AUTHORITY").unwrap_or_else(|| "organizations".into()),
            )
            .map_err(|e| ConfigError::Invalid {
                name: "OAUTH_AUTHORITY",
                reason: e.to_string(),
            })?,
            keyring: SecretString::from(required("TOKEN_ENCRYPTION_KEYS")?),
            scopes: env_opt("OAUTH_SCOPES").unwrap_or_else(|| crate::graph::DEFAULT_SCOPES.into()),
            mailbox_concurrency: env_parse("GRAPH_MAILBOX_CONCURRENCY", 4u32)?,
            mailbox_budget_per_10_min: env_parse("GRAPH_MAILBOX_BUDGET_PER_10_MIN", 10_000u32)?,
            sync: SyncSettings::from_env()?,
        })
    }
}

/// Everything a handler or endpoint needs to reach the database and Microsoft. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Services {
    /// Tenant-scoped work (the app role; Row Level Security applies).
    pub pool: PgPool,
    /// Cross-tenant work (the system role): OAuth states before their tenant is known,
    /// webhook routing, the scheduler, the queue.
    pub system_pool: PgPool,
    pub queue: Queue,
    pub http: reqwest::Client,
    pub graph: Arc<GraphConfig>,
    pub identity: IdentityClient,
    pub vault: Arc<TokenVault>,
    pub authority: TenantSegment,
    pub mailbox_concurrency: u32,
    pub mailbox_budget_per_10_min: u32,
    pub sync: SyncSettings,
    /// Work that holds one of `pool`'s connections (a session lock) while it takes others
    /// goes through this: at most half the pool at once, so the other half can always serve
    /// the holders' statements. With every connection held by a sync waiting for a second
    /// one, each waited out the pool's acquire timeout and failed, and no mail came in.
    pub connection_holders: Arc<tokio::sync::Semaphore>,
}

impl Services {
    /// Cross-tenant work (and the queue) goes through `system_pool`; without this call it is
    /// the same pool as tenant work.
    #[must_use]
    pub fn with_system_pool(mut self, system_pool: PgPool) -> Self {
        self.queue = Queue::new(system_pool.clone());
        self.system_pool = system_pool;
        self
    }

    pub fn new(pool: PgPool, settings: &IntegrationSettings) -> Result<Self, ConfigError> {
        use secrecy::ExposeSecret;
        let http = build_http_client().map_err(|e| ConfigError::Invalid {
            name: "HTTP client",
            reason: e.to_string(),
        })?;
        let graph =
            GraphConfig::new(&settings.graph_base_url).map_err(|e| ConfigError::Invalid {
                name: "GRAPH_BASE_URL",
                reason: e.to_string(),
            })?;
        let mut identity = IdentityConfig::new(
            &settings.identity_base_url,
            settings.client_id.clone(),
            settings.client_secret.clone(),
            settings.redirect_uri.clone(),
        )
        .map_err(|e| ConfigError::Invalid {
            name: "IDENTITY_BASE_URL",
            reason: e.to_string(),
        })?;
        identity.scopes = settings.scopes.clone();
        let vault = TokenVault::from_keyring(settings.keyring.expose_secret()).map_err(|e| {
            ConfigError::Invalid {
                name: "TOKEN_ENCRYPTION_KEYS",
                reason: e.to_string(),
            }
        })?;
        let pool_max_connections = pool.options().get_max_connections();
        Ok(Self {
            queue: Queue::new(pool.clone()),
            system_pool: pool.clone(),
            pool,
            identity: IdentityClient::new(http.clone(), Arc::new(identity)),
            http,
            graph: Arc::new(graph),
            vault: Arc::new(vault),
            authority: settings.authority.clone(),
            mailbox_concurrency: settings.mailbox_concurrency,
            mailbox_budget_per_10_min: settings.mailbox_budget_per_10_min,
            sync: settings.sync,
            connection_holders: Arc::new(tokio::sync::Semaphore::new(
                (pool_max_connections / 2).max(1) as usize,
            )),
        })
    }
}
