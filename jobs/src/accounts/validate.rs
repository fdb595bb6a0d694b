//! The connection test (ValidateAccount): /me, the inbox, the granted scopes, send permission.

use chrono::Utc;
use serde::Serialize;

use crate::graph::{FolderRef, GraphError, WellKnownFolder};
use crate::ids::{AccountId, TenantId};
use crate::services::Services;

/// Graph scopes graphdesk needs. `offline_access` is not echoed in the token response's
/// `scope`; its evidence is a stored refresh token, checked separately.
pub const REQUIRED_SCOPES: [&str; 3] = ["Mail.ReadWrite", "Mail.Send", "User.Read"];

#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub me: bool,
    pub inbox: bool,
    pub granted_scopes: Vec<String>,
    pub missing_scopes: Vec<String>,
    pub can_send: bool,
    pub problems: Vec<String>,
    pub checked_at: chrono::DateTime<Utc>,
}

impl ValidationReport {
    #[must_use]
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn has_scope(granted: &[String], wanted: &str) -> bool {
    // Granted scopes may come back fully qualified (https://graph.microsoft.com/Mail.Send).
    granted.iter().any(|g| {
        g.eq_ignore_ascii_case(wanted)
            || g.rsplit('/')
                .next()
                .is_some_and(|s| s.eq_ignore_ascii_case(wanted))
    })
}

/// Why a connection test could not finish (its findings about the account are in the report).
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// A Graph failure that is not the account's fault (throttling, outage).
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// Reading or storing the account failed: worth another attempt, like any outage.
    #[error("storing the connection test of the account failed: {0}")]
    Store(#[from] sqlx::Error),
}

/// Runs the checks and stores the report on the account.
pub async fn validate_account(
    services: &Services,
    tenant: TenantId,
    account: AccountId,
) -> Result<ValidationReport, ValidateError> {
    let client = super::graph_client(services, tenant, account);
    let mut problems = Vec::new();
    let me = match client.get_me().await {
        Ok(_) => true,
        Err(e) if matches!(e.class(), crate::graph::ErrorClass::Permanent) => {
            problems.push(format!("reading the profile failed: {e}"));
            false
        }
        Err(e) => return Err(e.into()),
    };
    let inbox = match client
        .get_folder(&FolderRef::WellKnown(WellKnownFolder::Inbox))
        .await
    {
        Ok(_) => true,
        Err(e) if matches!(e.class(), crate::graph::ErrorClass::Permanent) => {
            problems.push(format!("reading the inbox failed: {e}"));
            false
        }
        Err(e) => return Err(e.into()),
    };
    let mut tx = crate::db::tenant_tx(&services.pool, tenant).await?;
    let stored: Option<(Option<String>, bool)> = sqlx::query_as(
        "SELECT granted_scopes, refresh_token_enc IS NOT NULL
         FROM helpdesk_email_accounts WHERE id = $1 AND tenant_id = $2",
    )
    .bind(account.as_uuid())
    .bind(tenant.as_uuid())
    .fetch_optional(&mut *tx)
    .await?;
    let (scopes, has_refresh_token) = stored.unwrap_or((None, false));
    if !has_refresh_token {
        problems.push("no refresh token: offline_access was not granted".into());
    }
    let granted: Vec<String> = scopes
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let missing: Vec<String> = REQUIRED_SCOPES
        .iter()
        .filter(|s| !has_scope(&granted, s))
        .map(|s| (*s).to_string())
        .collect();
    if !missing.is_empty() {
        problems.push(format!("missing permissions: {}", missing.join(", ")));
    }
    let report = ValidationReport {
        me,
        inbox,
        can_send: has_scope(&granted, "Mail.Send"),
        granted_scopes: granted,
        missing_scopes: missing,
        problems,
        checked_at: Utc::now(),
    };
    let summary = (!report.ok()).then(|| report.problems.join("; "));
    sqlx::query(
        "UPDATE helpdesk_email_accounts SET
            validation = $3, validated_at = now(), updated_at = now(),
            status = CASE WHEN status IN ('needs_reauth', 'disabled') THEN status
                          WHEN $4::text IS NULL THEN 'active' ELSE 'error' END,
            status_reason = CASE WHEN status IN ('needs_reauth', 'disabled') THEN status_reason
                                 ELSE $4 END
         WHERE id = $1 AND tenant_id = $2",
    )
    .bind(account.as_uuid())
    .bind(tenant.as_uuid())
    .bind(serde_json::to_value(&report).unwrap_or_default())
    .bind(summary)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_match_short_and_qualified_forms() {
        let granted = vec![
            "https://graph.microsoft.com/Mail.Send".to_string(),
            "mail.readwrite".to_string(),
        ];
        assert!(has_scope(&granted, "Mail.Send"));
        assert!(has_scope(&granted, "Mail.ReadWrite"));
        assert!(!has_scope(&granted, "User.Read"));
    }
}
