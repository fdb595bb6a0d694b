//! The connection pool, the schema migrator and readiness.

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The single source of the schema: `migrations/` at the workspace root.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL")]
    BadUrl(#[source] sqlx::Error),
    #[error("could not connect to PostgreSQL")]
    Connect(#[source] sqlx::Error),
    #[error("applying migrations failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error(
        "DATABASE_APP_ROLE: the application pool acts as `{role}`, which {reason}, so Row Level \
         Security would not keep tenants apart. Set DATABASE_APP_ROLE to a role that is not a \
         superuser, has no BYPASSRLS and owns no table (the default, graphdesk_app, created by \
         the migrations), or set DATABASE_ALLOW_RLS_BYPASS=1 for a single-role development setup"
    )]
    RlsBypassed { role: String, reason: String },
    #[error("DATABASE_ALLOW_RLS_BYPASS must be 1 or 0 (true/false), not `{0}`")]
    BadAllowRlsBypass(String),
}

pub async fn connect(
    url: &secrecy::SecretString,
    max_connections: u32,
    app_name: &str,
) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.expose_secret().parse().map_err(DbError::BadUrl)?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.application_name(app_name))
        .await
        .map_err(DbError::Connect)
}

/// Which database role a pool's connections act as. The login user in DATABASE_URL only needs
/// to be allowed to `SET ROLE` to these (it may own the tables: the role it switches to does
/// not, so Row Level Security applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbRole {
    /// Tenant-scoped work: sees only the rows of the tenant set on the transaction.
    App,
    /// Cross-tenant work: the queue, the scheduler, ops, OAuth state look-ups, webhooks.
    System,
}

impl DbRole {
    fn configured(self) -> Option<String> {
        let (var, default) = match self {
            Self::App => ("DATABASE_APP_ROLE", "graphdesk_app"),
            Self::System => ("DATABASE_SYSTEM_ROLE", "graphdesk_system"),
        };
        match std::env::var(var) {
            Ok(v) if v.trim().is_empty() => None,
            Ok(v) => Some(v.trim().to_string()),
            Err(_) => Some(default.to_string()),
        }
    }
}

fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A pool whose every connection acts as `role` (as if by SET ROLE). The app pool is refused
/// when Row Level Security would not apply to it (see [`connect_role`]).
pub async fn connect_as(
    url: &secrecy::SecretString,
    max_connections: u32,
    app_name: &str,
    role: DbRole,
) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.expose_secret().parse().map_err(DbError::BadUrl)?;
    connect_role(
        options.application_name(app_name),
        max_connections,
        role,
        role.configured(),
        allow_rls_bypass()?,
    )
    .await
}

/// DATABASE_ALLOW_RLS_BYPASS; unset is false. A value that is neither true nor false is an
/// error rather than either: a typo must not decide whether tenants are isolated.
fn allow_rls_bypass() -> Result<bool, DbError> {
    let Some(raw) = crate::config::env_opt("DATABASE_ALLOW_RLS_BYPASS") else {
        return Ok(false);
    };
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(DbError::BadAllowRlsBypass(raw)),
    }
}

/// [`connect_as`] with the role name and the escape hatch given rather than read from the
/// environment. For [`DbRole::App`] the connected role is checked: a superuser, a BYPASSRLS
/// role or an owner of a table with Row Level Security (without FORCE) sees every tenant's
/// rows, and that happens silently when DATABASE_APP_ROLE is empty and the login user owns the
/// schema. Such a pool is refused unless `allow_rls_bypass`, which only logs loudly.
pub async fn connect_role(
    options: PgConnectOptions,
    max_connections: u32,
    role: DbRole,
    role_name: Option<String>,
    allow_rls_bypass: bool,
) -> Result<PgPool, DbError> {
    let pool = pool_as(options, max_connections, role_name)
        .await
        .map_err(DbError::Connect)?;
    if role != DbRole::App {
        return Ok(pool);
    }
    let Some(bypass) = rls_bypass(&pool).await? else {
        return Ok(pool);
    };
    if allow_rls_bypass {
        tracing::warn!(
            role = %bypass.role,
            reason = %bypass.reason,
            "DATABASE_ALLOW_RLS_BYPASS is set: the application pool is NOT subject to Row Level \
             Security and every query sees every tenant's rows; never run production like this"
        );
        return Ok(pool);
    }
    pool.close().await;
    Err(DbError::RlsBypassed {
        role: bypass.role,
        reason: bypass.reason,
    })
}

struct RlsBypass {
    role: String,
    reason: String,
}

/// Why Row Level Security would not apply to the pool's current role, if it would not.
async fn rls_bypass(pool: &PgPool) -> Result<Option<RlsBypass>, sqlx::Error> {
    // Ownership counts through role membership too (PostgreSQL's owner check does), and FORCE
    // ROW LEVEL SECURITY subjects even the owner to the policies.
    let (role, superuser, bypassrls, owned, example): (String, bool, bool, i64, Option<String>) =
        sqlx::query_as(
            "SELECT current_user::text, r.rolsuper, r.rolbypassrls, count(c.oid),
                    min(quote_ident(n.nspname) || '.' || quote_ident(c.relname))
             FROM pg_roles r
             LEFT JOIN pg_class c
               ON c.relrowsecurity AND NOT c.relforcerowsecurity
              AND pg_has_role(current_user, c.relowner, 'USAGE')
             LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE r.rolname = current_user
             GROUP BY r.rolname, r.rolsuper, r.rolbypassrls",
        )
        .fetch_one(pool)
        .await?;
    let reason = if superuser {
        "is a superuser".to_string()
    } else if bypassrls {
        "has BYPASSRLS".to_string()
    } else if owned > 0 {
        format!(
            "owns {owned} table(s) with Row Level Security enabled (e.g. {})",
            example.unwrap_or_default()
        )
    } else {
        return Ok(None);
    };
    Ok(Some(RlsBypass { role, reason }))
}

/// Connection options that act as `role`. The role is a startup option rather than a `SET ROLE`
/// after connecting, so it travels with the options: a pool built from a clone of them (the
/// queue's claim pool) acts as the same role.
fn acting_as(options: PgConnectOptions, role: Option<String>) -> PgConnectOptions {
    match role {
        Some(role) => options.options([("role", role)]),
        None => options,
    }
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
}

/// Like [`connect_as`] for a given role name (tests use it with explicit options).
pub async fn pool_as(
    options: PgConnectOptions,
    max_connections: u32,
    role: Option<String>,
) -> Result<PgPool, sqlx::Error> {
    pool_options(max_connections)
        .connect_with(acting_as(options, role))
        .await
}

/// [`pool_as`] without connecting up front.
#[must_use]
pub fn lazy_pool_as(
    options: PgConnectOptions,
    max_connections: u32,
    role: Option<String>,
) -> PgPool {
    pool_options(max_connections).connect_lazy_with(acting_as(options, role))
}

/// A transaction scoped to one tenant: Row Level Security shows and accepts only that
/// tenant's rows, whatever the queries inside say.
pub async fn tenant_tx(
    pool: &PgPool,
    tenant: crate::ids::TenantId,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('app.tenant_id', $1, true)")
        .bind(tenant.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// One statement in its own tenant-scoped transaction, committed.
pub async fn tenant_execute(
    pool: &PgPool,
    tenant: crate::ids::TenantId,
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> Result<sqlx::postgres::PgQueryResult, sqlx::Error> {
    let mut tx = tenant_tx(pool, tenant).await?;
    let done = query.execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(done)
}

/// Creates the database `url` names, connecting to the server's `postgres` database, unless it
/// exists already (a fresh environment's first `worker migrate --create-database`).
pub async fn create_database_if_missing(url: &secrecy::SecretString) -> Result<(), DbError> {
    use sqlx::{ConnectOptions, Connection};
    let options: PgConnectOptions = url.expose_secret().parse().map_err(DbError::BadUrl)?;
    let name = options.get_database().unwrap_or("postgres").to_string();
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(DbError::Connect)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            quote_ident(&name)
        )))
        .execute(&mut admin)
        .await?;
    }
    admin.close().await.ok();
    Ok(())
}

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await.map_err(DbError::Migrate)
}

/// Whether `err` means the database could not be reached or dropped the connection (the
/// server is down, restarting, refusing connections or out of them), rather than that a
/// statement failed: the first is worth retrying later, the second is a bug or bad data.
#[must_use]
pub fn is_connection_failure(err: &sqlx::Error) -> bool {
    match err {
        // Connection refused is an Io error; the pool retries it until its acquire timeout,
        // which then surfaces as PoolTimedOut.
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Class 08: connection exception; 57P01-57P03: the server is shutting down,
            // crashed or is starting up; 53300: too many connections.
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Readiness: the database answers and every migration this binary knows is applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    pub database: bool,
    pub migrations_current: bool,
    pub pending_migrations: Vec<i64>,
}

impl Readiness {
    #[must_use]
    pub fn ready(&self) -> bool {
        self.database && self.migrations_current
    }
}

pub async fn readiness(pool: &PgPool) -> Readiness {
    let applied: Result<Vec<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await;
    match applied {
        Err(_) => {
            let database = sqlx::query("SELECT 1").execute(pool).await.is_ok();
            Readiness {
                database,
                migrations_current: false,
                pending_migrations: MIGRATOR.iter().map(|m| m.version).collect(),
            }
        }
        Ok(applied) => {
            let pending: Vec<i64> = MIGRATOR
                .iter()
                .map(|m| m.version)
                .filter(|v| !applied.contains(v))
                .collect();
            Readiness {
                database: true,
                migrations_current: pending.is_empty(),
                pending_migrations: pending,
            }
        }
    }
}
