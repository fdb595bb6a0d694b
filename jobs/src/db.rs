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

pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await.map_err(DbError::Migrate)
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
