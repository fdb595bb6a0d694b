//! Typed settings read once from the environment (and a `.env` file for local use).
//! Every variable is documented in README.md; a bad value fails start-up with a message that
//! names the variable, never with a panic deep inside a handler.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is required but not set")]
    Missing { name: &'static str },
    #[error("{name} has an invalid value: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Settings shared by every process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: SecretString,
    pub database_max_connections: u32,
    pub graph_base_url: String,
    pub identity_base_url: String,
    pub json_logs: bool,
    pub queue: QueueSettings,
}

/// Queue and worker tuning; every value has a production default.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Jobs a worker process runs at once, per queue.
    pub worker_concurrency: usize,
    /// Jobs claimed per fetch statement.
    pub batch_size: usize,
    /// How often an idle worker polls when no notification arrives (scheduled and retried
    /// jobs wake nobody).
    pub poll_interval: Duration,
    /// How long a claimed job stays owned without a heartbeat; one value for the whole
    /// cluster so recovery never depends on the recovering worker's own settings.
    pub lease: Duration,
    /// Default per-tenant concurrent job limit (a tenant row may override it).
    pub tenant_concurrency: Option<u32>,
    /// Finished jobs older than this are purged.
    pub retention: Duration,
    /// A job that runs longer than this is stopped and counted as a failed attempt.
    pub job_timeout: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            worker_concurrency: 16,
            batch_size: 50,
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(60),
            tenant_concurrency: Some(4),
            retention: Duration::from_secs(7 * 24 * 3600),
            job_timeout: Duration::from_secs(300),
        }
    }
}

/// Mailbox sync tuning, parsed once at start-up by every process that builds `Services`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncSettings {
    /// `SYNC_INITIAL_DAYS`: a newly connected mailbox's first sync ingests mail this recent
    /// (used by the api's OAuth callback, which stores the account's `sync_since`).
    pub initial_days: u32,
    /// `SYNC_PAGE_SIZE`: messages per delta page (`Prefer: odata.maxpagesize`; used by the
    /// workers' syncs).
    pub page_size: u32,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            initial_days: 30,
            page_size: 50,
        }
    }
}

impl SyncSettings {
    /// 0 = only mail that arrives after the mailbox is connected; at most ten years.
    pub const INITIAL_DAYS: std::ops::RangeInclusive<u32> = 0..=3650;
    /// Graph accepts page sizes of 1 to 1000.
    pub const PAGE_SIZE: std::ops::RangeInclusive<u32> = 1..=1000;

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::parse(
            env_opt("SYNC_INITIAL_DAYS").as_deref(),
            env_opt("SYNC_PAGE_SIZE").as_deref(),
        )
    }

    /// The raw values as read from the environment (`None` = unset, so the default).
    pub fn parse(initial_days: Option<&str>, page_size: Option<&str>) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            initial_days: in_range(
                "SYNC_INITIAL_DAYS",
                initial_days,
                defaults.initial_days,
                Self::INITIAL_DAYS,
            )?,
            page_size: in_range(
                "SYNC_PAGE_SIZE",
                page_size,
                defaults.page_size,
                Self::PAGE_SIZE,
            )?,
        })
    }
}

/// A whole number within `range`; the error names the variable, the value and the range.
fn in_range(
    name: &'static str,
    raw: Option<&str>,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, ConfigError> {
    let Some(raw) = raw.map(str::trim).filter(|r| !r.is_empty()) else {
        return Ok(default);
    };
    match raw.parse::<u32>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(ConfigError::Invalid {
            name,
            reason: format!(
                "`{raw}` is not a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        }),
    }
}

pub const DEFAULT_GRAPH_BASE_URL: &str = "https://graph.microsoft.com/v1.0";
pub const DEFAULT_IDENTITY_BASE_URL: &str = "https://login.microsoftonline.com";

/// Reads `.env` if present; real environment variables win over it.
pub fn load_dotenv() {
    let _ = dotenvy::dotenv();
}

pub fn env_opt(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub fn env_parse<T>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match env_opt(name) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|e: T::Err| ConfigError::Invalid {
                name,
                reason: e.to_string(),
            }),
    }
}

fn env_millis(name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
    env_parse(name, default.as_millis() as u64).map(Duration::from_millis)
}

fn env_secs(name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
    env_parse(name, default.as_secs()).map(Duration::from_secs)
}

fn base_url(name: &'static str, default: &str) -> Result<String, ConfigError> {
    let raw = env_opt(name).unwrap_or_else(|| default.to_string());
    let parsed = url::Url::parse(&raw).map_err(|e| ConfigError::Invalid {
        name,
        reason: format!("not an absolute URL ({e})"),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::Invalid {
            name,
            reason: "must start with http:// or https://".into(),
        });
    }
    Ok(raw.trim_end_matches('/').to_string())
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let database_url = env_opt("DATABASE_URL").ok_or(ConfigError::Missing {
            name: "DATABASE_URL",
        })?;
        let defaults = QueueSettings::default();
        let tenant_concurrency = match env_parse("WORKER_TENANT_CONCURRENCY", 4u32)? {
            0 => None,
            n => Some(n),
        };
        let queue = QueueSettings {
            worker_concurrency: env_parse("WORKER_CONCURRENCY", defaults.worker_concurrency)?,
            batch_size: env_parse("WORKER_BATCH_SIZE", defaults.batch_size)?,
            poll_interval: env_millis("WORKER_POLL_INTERVAL_MS", defaults.poll_interval)?,
            lease: env_secs("QUEUE_LEASE_SECS", defaults.lease)?,
            tenant_concurrency,
            retention: Duration::from_secs(
                env_parse("QUEUE_RETENTION_DAYS", 7u64)?.saturating_mul(24 * 3600),
            ),
            job_timeout: env_secs("JOB_TIMEOUT_SECS", defaults.job_timeout)?,
        };
        if queue.worker_concurrency == 0 || queue.batch_size == 0 {
            return Err(ConfigError::Invalid {
                name: "WORKER_CONCURRENCY",
                reason: "WORKER_CONCURRENCY and WORKER_BATCH_SIZE must be at least 1".into(),
            });
        }
        Ok(Self {
            database_url: SecretString::from(database_url),
            database_max_connections: env_parse("DATABASE_MAX_CONNECTIONS", 20u32)?,
            graph_base_url: base_url("GRAPH_BASE_URL", DEFAULT_GRAPH_BASE_URL)?,
            identity_base_url: base_url("IDENTITY_BASE_URL", DEFAULT_IDENTITY_BASE_URL)?,
            json_logs: env_parse("LOG_JSON", false)?,
            queue,
        })
    }
}

/// The address the api binds to.
pub fn bind_addr() -> Result<SocketAddr, ConfigError> {
    env_parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_settings_default_when_unset_and_accept_the_range_ends() {
        assert_eq!(
            SyncSettings::parse(None, None).unwrap(),
            SyncSettings::default()
        );
        assert_eq!(
            SyncSettings::parse(Some("0"), Some(" 1000 ")).unwrap(),
            SyncSettings {
                initial_days: 0,
                page_size: 1000
            }
        );
        assert_eq!(
            SyncSettings::parse(Some("3650"), Some("1")).unwrap(),
            SyncSettings {
                initial_days: 3650,
                page_size: 1
            }
        );
    }

    #[test]
    fn a_bad_sync_setting_fails_naming_the_variable_and_the_value() {
        for bad in ["abc", "0", "1001", "-5", "50.5"] {
            let err = SyncSettings::parse(None, Some(bad))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("SYNC_PAGE_SIZE "), "{err}");
            assert!(err.contains(&format!("`{bad}`")), "{err}");
            assert!(err.contains("1 to 1000"), "{err}");
        }
        for bad in ["thirty", "-1", "3651"] {
            let err = SyncSettings::parse(Some(bad), None)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("SYNC_INITIAL_DAYS "), "{err}");
            assert!(err.contains(&format!("`{bad}`")), "{err}");
            assert!(err.contains("0 to 3650"), "{err}");
        }
    }
}
