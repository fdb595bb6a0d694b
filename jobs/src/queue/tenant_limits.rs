//! Per-tenant concurrency overrides: how many of one tenant's jobs may run at once across every
//! worker, when that should differ from the workers' `WORKER_TENANT_CONCURRENCY`. Every slot
//! grant sync (each worker syncs several times a second) reads `tenants.concurrency_limit`
//! afresh, so a change applies within a fraction of a second on every host without a restart;
//! jobs already running are never interrupted by a lower limit, and their slots are not given
//! out again until they finish.

use serde_json::json;

use super::error::DbContext;
use super::{Queue, QueueError};
use crate::ids::TenantId;

/// A tenant's own concurrency limit: at least one job (zero would stop the tenant for good,
/// which is what cancelling its jobs is for) and at most [`ConcurrencyLimit::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyLimit(u32);

impl ConcurrencyLimit {
    /// Far above what one tenant's Graph mailboxes can use (4 concurrent requests each).
    pub const MAX: u32 = 1000;

    /// # Errors
    /// When `n` is 0 or above [`ConcurrencyLimit::MAX`].
    pub fn new(n: u32) -> Result<Self, InvalidConcurrencyLimit> {
        if (1..=Self::MAX).contains(&n) {
            Ok(Self(n))
        } else {
            Err(InvalidConcurrencyLimit(n))
        }
    }

    #[must_use]
    pub fn get(self) -> u32 {
        self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "a tenant's concurrency limit must be between 1 and {max}, got {0}",
    max = ConcurrencyLimit::MAX
)]
pub struct InvalidConcurrencyLimit(pub u32);

/// A tenant's concurrency setting and what it is using now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantConcurrency {
    pub tenant: TenantId,
    pub name: String,
    /// `None`: the workers' default applies.
    pub limit: Option<ConcurrencyLimit>,
    /// The tenant's jobs running now, on every worker.
    pub running: i64,
    /// The tenant's jobs waiting, due or not.
    pub pending: i64,
}

/// Who changed a setting, for the audit row written in the same transaction.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub subject: &'a str,
    pub role: &'a str,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: uuid::Uuid,
    name: String,
    concurrency_limit: Option<i32>,
    running: i64,
    pending: i64,
}

impl From<Row> for TenantConcurrency {
    fn from(row: Row) -> Self {
        Self {
            tenant: TenantId::from_uuid(row.id),
            name: row.name,
            // The column's CHECK keeps it positive; a value above MAX written by hand in SQL
            // still reads back as the limit the claims apply.
            limit: row
                .concurrency_limit
                .and_then(|n| u32::try_from(n).ok())
                .map(ConcurrencyLimit),
            running: row.running,
            pending: row.pending,
        }
    }
}

/// Every tenant (or the one in $1), busiest first. The counts read the pending-only and
/// running-only indexes once for all tenants, so a tenant with a long history costs no more
/// than its live jobs. Public so a test can check what it reads.
pub const TENANT_LOAD: &str = "WITH live AS (
        SELECT l.tenant_id, count(*) FILTER (WHERE l.running) AS running,
               count(*) FILTER (WHERE NOT l.running) AS pending
        FROM (SELECT q.tenant_id, true AS running FROM queue_jobs q
              WHERE q.status = 'running' AND q.tenant_id IS NOT NULL
              UNION ALL
              SELECT q.tenant_id, false FROM queue_jobs q
              WHERE q.status = 'pending' AND q.tenant_id IS NOT NULL) l
        WHERE $1::uuid IS NULL OR l.tenant_id = $1
        GROUP BY l.tenant_id
     )
     SELECT t.id, t.name, t.concurrency_limit, coalesce(l.running, 0) AS running,
            coalesce(l.pending, 0) AS pending
     FROM tenants t LEFT JOIN live l ON l.tenant_id = t.id
     WHERE $1::uuid IS NULL OR t.id = $1
     ORDER BY running DESC, pending DESC, t.name, t.id
     LIMIT $2";

/// The most tenants [`Queue::tenant_concurrencies`] returns: the busiest, which are the ones
/// whose limits matter; a page of thousands of idle tenants helps nobody at 3 a.m.
pub const TENANT_LIST_MAX: usize = 500;

impl Queue {
    /// `None` when no such tenant exists.
    pub async fn tenant_concurrency(
        &self,
        tenant: TenantId,
    ) -> Result<Option<TenantConcurrency>, QueueError> {
        Ok(self.tenant_concurrencies(Some(tenant)).await?.pop())
    }

    /// Every tenant's setting and load (or only `only`'s), busiest first, at most
    /// [`TENANT_LIST_MAX`].
    pub async fn tenant_concurrencies(
        &self,
        only: Option<TenantId>,
    ) -> Result<Vec<TenantConcurrency>, QueueError> {
        let rows: Vec<Row> = sqlx::query_as(TENANT_LOAD)
            .bind(only.map(|t| t.as_uuid()))
            .bind(TENANT_LIST_MAX as i64)
            .fetch_all(self.pool())
            .await
            .ctx("read tenant concurrency")?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Sets (or with `None` clears) a tenant's own limit and records who did it, from what to
    /// what, in the audit log; both land or neither does. Setting the value it already has is
    /// not a change and writes no audit row. `None` when no such tenant exists.
    pub async fn set_tenant_concurrency(
        &self,
        tenant: TenantId,
        limit: Option<ConcurrencyLimit>,
        actor: Actor<'_>,
    ) -> Result<Option<TenantConcurrency>, QueueError> {
        let mut tx = self.pool().begin().await.ctx("begin tenant concurrency")?;
        let before: Option<Option<i32>> =
            sqlx::query_scalar("SELECT concurrency_limit FROM tenants WHERE id = $1 FOR UPDATE")
                .bind(tenant.as_uuid())
                .fetch_optional(&mut *tx)
                .await
                .ctx("lock tenant")?;
        let Some(before) = before else {
            return Ok(None);
        };
        let after = limit.map(|l| l.get() as i32);
        if before != after {
            sqlx::query("UPDATE tenants SET concurrency_limit = $2 WHERE id = $1")
                .bind(tenant.as_uuid())
                .bind(after)
                .execute(&mut *tx)
                .await
                .ctx("set tenant concurrency")?;
            let details = json!({
                "role": actor.role,
                "detail": { "from": before, "to": after },
            });
            sqlx::query(
                "INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id, details)
                 VALUES ($1, $2, 'tenant.concurrency_limit_set', 'tenant', $1::text, $3)",
            )
            .bind(tenant.as_uuid())
            .bind(actor.subject)
            .bind(&details)
            .execute(&mut *tx)
            .await
            .ctx("audit tenant concurrency")?;
        }
        let row: Row = sqlx::query_as(TENANT_LOAD)
            .bind(tenant.as_uuid())
            .bind(1_i64)
            .fetch_one(&mut *tx)
            .await
            .ctx("read tenant concurrency")?;
        tx.commit().await.ctx("commit tenant concurrency")?;
        Ok(Some(row.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_between_one_and_the_maximum() {
        assert_eq!(ConcurrencyLimit::new(0), Err(InvalidConcurrencyLimit(0)));
        assert_eq!(ConcurrencyLimit::new(1).map(ConcurrencyLimit::get), Ok(1));
        assert_eq!(
            ConcurrencyLimit::new(ConcurrencyLimit::MAX).map(ConcurrencyLimit::get),
            Ok(ConcurrencyLimit::MAX)
        );
        let too_many = ConcurrencyLimit::new(ConcurrencyLimit::MAX + 1).unwrap_err();
        assert_eq!(
            too_many.to_string(),
            "a tenant's concurrency limit must be between 1 and 1000, got 1001"
        );
    }
}
