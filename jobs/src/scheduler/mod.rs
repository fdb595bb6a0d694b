//! The scheduler: periodic job emission and housekeeping, safe to run as several replicas.
//!
//! Every tick each replica tries to take (or renew) one leader lease row; only the holder works.
//! The lease is taken in the same transaction as the enqueue statements, so a replica taking
//! over waits on the row lock until the previous holder's enqueues committed, and a holder
//! whose lease ran out can never enqueue beside its successor. Coalesce keys are the second
//! guard: whatever happens, at most one pending job per key.
//!
//! Each concern is one set-based statement ([`sql`]): due mailbox syncs, token refreshes,
//! re-validation of failing accounts, and the clean-ups (OAuth states, audit rows past their
//! tenant's retention, finished jobs, expired job leases). Graph subscriptions are the one
//! per-account part, because each renewal is a Graph call; they run in the background so a slow
//! Graph never delays the lease renewal.

pub mod sql;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tracing::{debug, info, warn};

use crate::accounts::tokens::REFRESH_MARGIN;
use crate::config::{ConfigError, env_parse};
use crate::ids::AccountId;
use crate::queue::{Queue, QueueError};
use crate::services::Services;
use crate::webhooks::{self, MaintenanceReport, SCHEDULER_CHANNEL, WebhookSettings, WorkOutcome};

/// The lease row every replica competes for (created by the migration).
pub const LEASE_NAME: &str = "scheduler";

/// Scheduler tuning; every value has a production default.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    pub tick: Duration,
    /// How long the leader lease lasts without renewal: three ticks, so one slow tick does
    /// not hand leadership over, yet a dead leader is replaced within seconds.
    pub lease: Duration,
    pub oauth_state_max_age: TimeDelta,
    /// Audit retention for rows without a tenant; tenants have `audit_retention_days`.
    pub audit_default_retention_days: i32,
    pub queue_retention: Duration,
    pub refresh_margin: TimeDelta,
    /// Accounts in `error` are re-validated this often.
    pub revalidate_every: TimeDelta,
    /// `None`: no Graph change notifications (polling only).
    pub webhooks: Option<WebhookSettings>,
    /// Subscriptions handled per pass, and how many Graph calls run at once.
    pub subscription_batch: i64,
    pub subscription_concurrency: usize,
}

impl SchedulerSettings {
    #[must_use]
    pub fn with_tick(tick: Duration) -> Self {
        Self {
            tick,
            lease: tick * 3,
            oauth_state_max_age: TimeDelta::hours(24),
            audit_default_retention_days: 90,
            queue_retention: Duration::from_secs(7 * 24 * 3600),
            refresh_margin: REFRESH_MARGIN,
            revalidate_every: TimeDelta::minutes(15),
            webhooks: None,
            subscription_batch: 200,
            subscription_concurrency: 4,
        }
    }

    /// `SCHEDULER_TICK_SECS` (default 15, fractions allowed), `AUDIT_RETENTION_DAYS` (default
    /// 90), `PUBLIC_BASE_URL` / `GRAPH_WEBHOOKS_ENABLED`; the job retention is the queue's
    /// (`QUEUE_RETENTION_DAYS`).
    pub fn from_env(queue_retention: Duration) -> Result<Self, ConfigError> {
        let secs: f64 = env_parse("SCHEDULER_TICK_SECS", 15.0)?;
        if !(secs.is_finite() && secs > 0.0 && secs <= 3600.0) {
            return Err(ConfigError::Invalid {
                name: "SCHEDULER_TICK_SECS",
                reason: "must be a number of seconds above 0 and at most 3600".into(),
            });
        }
        let audit_days: i32 = env_parse("AUDIT_RETENTION_DAYS", 90)?;
        if audit_days < 1 {
            return Err(ConfigError::Invalid {
                name: "AUDIT_RETENTION_DAYS",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            audit_default_retention_days: audit_days,
            queue_retention,
            webhooks: WebhookSettings::from_env()?,
            ..Self::with_tick(Duration::from_secs_f64(secs))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("scheduler database statement failed: {0}")]
    Db(#[from] sqlx::Error),
    #[error("queue operation failed")]
    Queue(#[from] QueueError),
}

/// Rows removed by one tick's clean-ups.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleanup {
    pub oauth_states: u64,
    pub audit_rows: u64,
    pub finished_jobs: u64,
    pub reaped_jobs: u64,
}

/// What one tick did. A replica that is not the leader did nothing but look.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickReport {
    /// The lease as this replica holds it after the tick; `None` when another replica leads.
    pub lease: Option<sql::Lease>,
    pub syncs: u64,
    pub refreshes: u64,
    pub validations: u64,
    pub cleanup: Cleanup,
    /// A subscription pass was started in the background.
    pub subscriptions_started: bool,
}

impl TickReport {
    #[must_use]
    pub fn leader(&self) -> bool {
        self.lease.is_some()
    }
}

#[derive(Default)]
struct SubscriptionState {
    running: Option<tokio::task::JoinHandle<()>>,
    /// account → (consecutive failures, not before). Per process: a new leader starts fresh,
    /// which at worst costs one extra attempt per failing account.
    backoff: HashMap<AccountId, (u32, DateTime<Utc>)>,
}

struct Inner {
    pool: PgPool,
    queue: Queue,
    services: Option<Services>,
    settings: SchedulerSettings,
    holder: String,
    subscriptions: Mutex<SubscriptionState>,
}

/// One scheduler replica. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("holder", &self.inner.holder)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// `services` reach Microsoft Graph; they are needed only when webhooks are enabled.
    #[must_use]
    pub fn new(
        pool: PgPool,
        services: Option<Services>,
        settings: SchedulerSettings,
        holder: impl Into<String>,
    ) -> Self {
        if settings.webhooks.is_some() && services.is_none() {
            warn!(
                "webhooks are configured but the scheduler has no Graph access; subscriptions are not maintained"
            );
        }
        Self {
            inner: Arc::new(Inner {
                queue: Queue::new(pool.clone()),
                pool,
                services,
                settings,
                holder: holder.into(),
                subscriptions: Mutex::new(SubscriptionState::default()),
            }),
        }
    }

    #[must_use]
    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    /// One tick: take or renew the lease and, as leader, enqueue what is due, clean up, and
    /// start a subscription pass unless one is still running.
    pub async fn run_tick(&self) -> Result<TickReport, SchedulerError> {
        let inner = &self.inner;
        let s = &inner.settings;
        let mut tx = inner.pool.begin().await?;
        let Some(lease) = sql::take_lease(&mut tx, LEASE_NAME, &inner.holder, s.lease).await?
        else {
            tx.rollback().await?;
            return Ok(TickReport::default());
        };
        let syncs = sql::enqueue_due_syncs(&mut tx).await?;
        let refreshes = sql::enqueue_due_refreshes(&mut tx, s.refresh_margin).await?;
        let validations = sql::enqueue_due_validations(&mut tx, s.revalidate_every).await?;
        tx.commit().await?;

        let cleanup = Cleanup {
            oauth_states: crate::accounts::connect::purge_states(
                &inner.pool,
                s.oauth_state_max_age,
            )
            .await?,
            audit_rows: sql::purge_audit(&inner.pool, s.audit_default_retention_days).await?,
            finished_jobs: inner
                .queue
                .purge_finished(
                    Utc::now()
                        - TimeDelta::from_std(s.queue_retention).unwrap_or(TimeDelta::days(7)),
                )
                .await?,
            reaped_jobs: crate::queue::runtime::reap_expired(&inner.pool).await?,
        };
        let subscriptions_started = self.start_subscription_pass();
        let report = TickReport {
            lease: Some(lease),
            syncs,
            refreshes,
            validations,
            cleanup,
            subscriptions_started,
        };
        if syncs + refreshes + validations > 0 || cleanup != Cleanup::default() {
            info!(
                syncs,
                refreshes,
                validations,
                oauth_states = cleanup.oauth_states,
                audit_rows = cleanup.audit_rows,
                finished_jobs = cleanup.finished_jobs,
                reaped_jobs = cleanup.reaped_jobs,
                "scheduler tick"
            );
        }
        Ok(report)
    }

    fn start_subscription_pass(&self) -> bool {
        if self.inner.settings.webhooks.is_none() || self.inner.services.is_none() {
            return false;
        }
        let mut state = self.inner.subscriptions.lock().expect("poisoned");
        if state.running.as_ref().is_some_and(|h| !h.is_finished()) {
            return false;
        }
        let this = self.clone();
        state.running = Some(tokio::spawn(async move {
            match this.maintain_subscriptions().await {
                Ok(r) if r != MaintenanceReport::default() => info!(?r, "subscriptions maintained"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "subscription pass failed"),
            }
        }));
        true
    }

    /// Creates, renews and recreates inbox subscriptions, a few Graph calls at a time. The
    /// tick runs this in the background; it is public so tools can run one pass and wait.
    pub async fn maintain_subscriptions(&self) -> Result<MaintenanceReport, SchedulerError> {
        let inner = &self.inner;
        let (Some(settings), Some(services)) = (&inner.settings.webhooks, &inner.services) else {
            return Ok(MaintenanceReport::default());
        };
        let now = Utc::now();
        let waiting: Vec<uuid::Uuid> = {
            let state = inner.subscriptions.lock().expect("poisoned");
            state
                .backoff
                .iter()
                .filter(|(_, (_, until))| *until > now)
                .map(|(account, _)| account.as_uuid())
                .collect()
        };
        let (expired_dropped, ready) = webhooks::due_subscription_work(
            &inner.pool,
            inner.settings.subscription_batch,
            &waiting,
        )
        .await?;
        let mut report = MaintenanceReport {
            expired_dropped,
            backing_off: waiting.len(),
            ..MaintenanceReport::default()
        };
        let outcomes: Vec<(AccountId, Result<WorkOutcome, webhooks::SubscriptionError>)> =
            futures::stream::iter(ready)
                .map(|w| async move {
                    let account = AccountId::from_uuid(w.email_account_id);
                    (
                        account,
                        webhooks::reconcile_subscription(services, settings, &w).await,
                    )
                })
                .buffer_unordered(inner.settings.subscription_concurrency.max(1))
                .collect()
                .await;
        let mut state = inner.subscriptions.lock().expect("poisoned");
        for (account, outcome) in outcomes {
            match outcome {
                Ok(WorkOutcome::Created) => {
                    report.created += 1;
                    state.backoff.remove(&account);
                }
                Ok(WorkOutcome::Renewed) => {
                    report.renewed += 1;
                    state.backoff.remove(&account);
                }
                Err(e) => {
                    report.failed += 1;
                    let failures = state.backoff.get(&account).map_or(0, |(n, _)| *n) + 1;
                    let until = webhooks::backoff_after(failures, inner.settings.tick * 4);
                    state.backoff.insert(account, (failures, until));
                    warn!(%account, failures, retry_at = %until, error = %e, "subscription not maintained");
                }
            }
        }
        Ok(report)
    }

    /// Ticks until `shutdown` resolves, then hands the lease back. A lifecycle event that asks
    /// for subscription work (NOTIFY on [`SCHEDULER_CHANNEL`]) runs a tick at once.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let tick = self.inner.settings.tick;
        info!(holder = %self.inner.holder, ?tick, webhooks = self.inner.settings.webhooks.is_some(), "scheduler started");
        let mut listener = self.listen().await;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = interval.tick() => {}
                woke = recv(&mut listener) => {
                    if !woke {
                        // The connection dropped; poll until it is back.
                        listener = None;
                    }
                }
            }
            if listener.is_none() && self.inner.settings.webhooks.is_some() {
                listener = self.listen().await;
            }
            match self.run_tick().await {
                Ok(r) => debug!(leader = r.leader(), "tick"),
                Err(e) => warn!(error = %e, "scheduler tick failed; retrying next tick"),
            }
        }
        let pass = self
            .inner
            .subscriptions
            .lock()
            .expect("poisoned")
            .running
            .take();
        if let Some(pass) = pass {
            pass.abort();
        }
        match sql::release_lease(&self.inner.pool, LEASE_NAME, &self.inner.holder).await {
            Ok(true) => info!("scheduler stopped; lease released"),
            Ok(false) => info!("scheduler stopped"),
            Err(e) => warn!(error = %e, "could not release the lease; it expires on its own"),
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        self.inner.settings.webhooks.as_ref()?;
        let mut listener = PgListener::connect_with(&self.inner.pool).await.ok()?;
        listener.listen(SCHEDULER_CHANNEL).await.ok()?;
        Some(listener)
    }
}

/// Waits for a notification; pending forever without a listener. False when the connection
/// failed.
async fn recv(listener: &mut Option<PgListener>) -> bool {
    match listener {
        Some(l) => l.recv().await.is_ok(),
        None => std::future::pending().await,
    }
}
