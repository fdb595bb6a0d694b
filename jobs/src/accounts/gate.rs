//! Microsoft's per-mailbox limits held across every process: at most N concurrent requests
//! (slot rows claimed with SKIP LOCKED, leased so a dead holder's slot comes back) and a
//! request budget per fixed 10-minute window.

use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use futures::future::BoxFuture;
use sqlx::PgPool;
use uuid::Uuid;

use crate::graph::{GateError, GatePermit, RequestGate};
use crate::ids::AccountId;

/// How long a slot stays held without its holder renewing it. A holder renews its slot every
/// third of this while its request runs (the HTTP client allows a request 60 s), so the lease
/// only bounds how long a crashed holder's slot stays taken: a worker killed mid-request
/// blocks its mailboxes' slots for this long, not for the longest request.
const SLOT_LEASE: Duration = Duration::from_secs(15);
/// How long a request waits for a free slot before the job is deferred instead.
const MAX_SLOT_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct PgMailboxGate {
    pool: PgPool,
    account: AccountId,
    concurrency: u32,
    budget: u32,
    lease: Duration,
}

impl PgMailboxGate {
    #[must_use]
    pub fn new(pool: PgPool, account: AccountId, concurrency: u32, budget_per_10_min: u32) -> Self {
        Self {
            pool,
            account,
            concurrency: concurrency.max(1),
            budget: budget_per_10_min.max(1),
            lease: SLOT_LEASE,
        }
    }

    /// Another slot lease than the default (tests use a short one).
    #[must_use]
    pub fn with_slot_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(300));
        self
    }

    async fn spend_budget(&self) -> Result<(), GateError> {
        let now = Utc::now();
        let window: DateTime<Utc> = now.duration_trunc(TimeDelta::minutes(10)).unwrap_or(now);
        let used: i32 = sqlx::query_scalar(
            "INSERT INTO graph_mailbox_budget (email_account_id, window_start, requests)
             VALUES ($1, $2, 1)
             ON CONFLICT (email_account_id, window_start)
             DO UPDATE SET requests = graph_mailbox_budget.requests + 1
             RETURNING requests",
        )
        .bind(self.account.as_uuid())
        .bind(window)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| GateError::Failed(Box::new(e)))?;
        if used as u32 > self.budget {
            let reopens = window + TimeDelta::minutes(10) - now;
            return Err(GateError::Busy {
                retry_after: reopens.to_std().ok(),
            });
        }
        Ok(())
    }

    async fn try_take_slot(&self, holder: Uuid) -> Result<Option<i32>, sqlx::Error> {
        sqlx::query(
            "INSERT INTO graph_mailbox_slots (email_account_id, slot)
             SELECT $1, s FROM generate_series(1, $2) s
             ON CONFLICT DO NOTHING",
        )
        .bind(self.account.as_uuid())
        .bind(self.concurrency as i32)
        .execute(&self.pool)
        .await?;
        sqlx::query_scalar(
            "UPDATE graph_mailbox_slots s
             SET holder = $3, expires_at = now() + make_interval(secs => $4)
             FROM (SELECT slot FROM graph_mailbox_slots
                   WHERE email_account_id = $1 AND slot <= $2
                     AND (holder IS NULL OR expires_at < now())
                   ORDER BY slot LIMIT 1
                   FOR UPDATE SKIP LOCKED) free
             WHERE s.email_account_id = $1 AND s.slot = free.slot
             RETURNING s.slot",
        )
        .bind(self.account.as_uuid())
        .bind(self.concurrency as i32)
        .bind(holder)
        .bind(self.lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
    }
}

/// Keeps the slot's lease alive while the request runs; gives the slot back when the request
/// is done (dropping the permit).
struct SlotGuard {
    pool: PgPool,
    account: AccountId,
    slot: i32,
    holder: Uuid,
    renewal: tokio::task::AbortHandle,
}

impl SlotGuard {
    fn new(gate: &PgMailboxGate, slot: i32, holder: Uuid) -> Self {
        let renewal = tokio::spawn(renew_slot(
            gate.pool.clone(),
            gate.account,
            slot,
            holder,
            gate.lease,
        ))
        .abort_handle();
        Self {
            pool: gate.pool.clone(),
            account: gate.account,
            slot,
            holder,
            renewal,
        }
    }
}

async fn renew_slot(pool: PgPool, account: AccountId, slot: i32, holder: Uuid, lease: Duration) {
    let mut every = tokio::time::interval(lease / 3);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let renewed = sqlx::query(
            "UPDATE graph_mailbox_slots SET expires_at = now() + make_interval(secs => $4)
             WHERE email_account_id = $1 AND slot = $2 AND holder = $3",
        )
        .bind(account.as_uuid())
        .bind(slot)
        .bind(holder)
        .bind(lease.as_secs_f64())
        .execute(&pool)
        .await;
        match renewed {
            // Taken over after the lease ran out: there is nothing of ours left to renew.
            Ok(done) if done.rows_affected() == 0 => return,
            Ok(_) => {}
            // The next tick tries again; only a lease that runs out lets the slot go.
            Err(e) => tracing::warn!(%account, slot, error = %e, "could not renew a mailbox slot"),
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.renewal.abort();
        let pool = self.pool.clone();
        let (account, slot, holder) = (self.account, self.slot, self.holder);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = sqlx::query(
                    "UPDATE graph_mailbox_slots SET holder = NULL, expires_at = NULL
                     WHERE email_account_id = $1 AND slot = $2 AND holder = $3",
                )
                .bind(account.as_uuid())
                .bind(slot)
                .bind(holder)
                .execute(&pool)
                .await;
            });
        }
    }
}

impl RequestGate for PgMailboxGate {
    fn acquire(&self) -> BoxFuture<'_, Result<GatePermit, GateError>> {
        Box::pin(async move {
            let holder = Uuid::new_v4();
            let deadline = tokio::time::Instant::now() + MAX_SLOT_WAIT;
            let mut wait = Duration::from_millis(5);
            loop {
                match self.try_take_slot(holder).await {
                    Ok(Some(slot)) => {
                        let guard = SlotGuard::new(self, slot, holder);
                        // Spent only once a slot is held: a refused request is not a request,
                        // and jobs waiting on a busy mailbox would otherwise use up its budget
                        // without sending anything. On refusal the guard gives the slot back.
                        self.spend_budget().await?;
                        return Ok(GatePermit::holding(guard));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(GateError::Failed(Box::new(e))),
                }
                if tokio::time::Instant::now() >= deadline {
                    metrics::counter!("graphdesk_graph_gate_busy_total").increment(1);
                    return Err(GateError::Busy {
                        retry_after: Some(Duration::from_secs(2)),
                    });
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(100));
            }
        })
    }
}
