//! The audit log: who changed what, when. Never a secret in `details`.

use serde_json::Value;
use sqlx::PgConnection;

use crate::ids::TenantId;

pub async fn record(
    conn: &mut PgConnection,
    tenant: Option<TenantId>,
    actor: &str,
    action: &str,
    entity_type: &str,
    entity_id: &str,
    details: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, actor, action, entity_type, entity_id, details)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(tenant.map(|t| t.as_uuid()))
    .bind(actor)
    .bind(action)
    .bind(entity_type)
    .bind(entity_id)
    .bind(details)
    .execute(conn)
    .await?;
    Ok(())
}
