//! Microsoft Graph change notifications: the inbox subscription of each connected mailbox, and
//! what the webhook endpoints do with what Graph posts.
//!
//! A notification never fetches mail itself: it only wakes the coalesced delta sync of its
//! mailbox folder, so a burst of a hundred notifications is one sync, and a lost notification
//! is healed by the scheduler's periodic sync. The endpoints only persist (flag a subscription,
//! enqueue a sync) and answer; Graph work that lifecycle events ask for (renewing, recreating)
//! is done by the scheduler's leader, which a lifecycle event wakes through
//! [`SCHEDULER_CHANNEL`].
//!
//! Each subscription carries its own random `clientState`; only its SHA-256 is stored, and a
//! notification counts only when the hash of the state it carries matches (compared in
//! constant time). Anything else is discarded without enqueuing.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeDelta, Utc};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::{ConfigError, env_opt, env_parse};
use crate::graph::{NewSubscription, WellKnownFolder};
use crate::ids::{AccountId, TenantId};
use crate::kinds::SyncMailbox;
use crate::queue::{EnqueueOptions, QueueError, enqueue_in};
use crate::services::Services;

/// The one resource graphdesk watches: new mail in each mailbox's inbox.
pub const INBOX_RESOURCE: &str = "me/mailFolders('Inbox')/messages";
/// Where Graph posts change notifications, below `PUBLIC_BASE_URL`.
pub const NOTIFICATIONS_PATH: &str = "/graph/notifications";
/// Where Graph posts lifecycle events, below `PUBLIC_BASE_URL`.
pub const LIFECYCLE_PATH: &str = "/graph/lifecycle";
/// Below Microsoft's 4,230-minute maximum for messages, with room for clock skew.
pub const SUBSCRIPTION_LIFETIME: TimeDelta = TimeDelta::minutes(4200);
/// Subscriptions expiring sooner than this are renewed.
pub const RENEW_WITHIN: TimeDelta = TimeDelta::hours(12);
/// A lifecycle event that needs Graph work NOTIFYs this channel so the scheduler acts at once
/// instead of at its next tick.
pub const SCHEDULER_CHANNEL: &str = "graphdesk_scheduler";

/// Where Graph reaches this deployment's webhook endpoints.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    public_base_url: String,
}

impl WebhookSettings {
    /// `public_base_url` is the api's externally reachable root (Microsoft requires https).
    pub fn new(public_base_url: &str) -> Result<Self, ConfigError> {
        let parsed = url::Url::parse(public_base_url).map_err(|e| ConfigError::Invalid {
            name: "PUBLIC_BASE_URL",
            reason: format!("not an absolute URL ({e})"),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ConfigError::Invalid {
                name: "PUBLIC_BASE_URL",
                reason: "must start with https:// (or http:// for a local simulator)".into(),
            });
        }
        Ok(Self {
            public_base_url: public_base_url.trim_end_matches('/').to_string(),
        })
    }

    /// `GRAPH_WEBHOOKS_ENABLED` (default: on exactly when `PUBLIC_BASE_URL` is set).
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        let base = env_opt("PUBLIC_BASE_URL");
        if !env_parse("GRAPH_WEBHOOKS_ENABLED", base.is_some())? {
            return Ok(None);
        }
        let base = base.ok_or(ConfigError::Missing {
            name: "PUBLIC_BASE_URL",
        })?;
        Self::new(&base).map(Some)
    }

    #[must_use]
    pub fn notification_url(&self) -> String {
        format!("{}{NOTIFICATIONS_PATH}", self.public_base_url)
    }

    #[must_use]
    pub fn lifecycle_url(&self) -> String {
        format!("{}{LIFECYCLE_PATH}", self.public_base_url)
    }
}

/// What Graph posts to either endpoint: `{"value": [...]}`.
#[derive(Debug, Deserialize)]
pub struct NotificationBatch {
    #[serde(default)]
    pub value: Vec<Notification>,
}

/// One change notification or lifecycle event. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub subscription_id: String,
    /// The secret set at creation, echoed back; a secret type so no log can show it.
    #[serde(default)]
    pub client_state: Option<SecretString>,
    #[serde(default)]
    pub change_type: Option<String>,
    /// Set on lifecycle events: `reauthorizationRequired`, `subscriptionRemoved`, `missed`.
    #[serde(default)]
    pub lifecycle_event: Option<String>,
}

/// What one POST did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Notifications whose subscription and clientState checked out.
    pub verified: usize,
    /// Discarded: unknown subscription or wrong/missing clientState.
    pub rejected: usize,
    /// Sync jobs this POST created (0 when a pending one already covered the folder).
    pub syncs_created: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("database error while accepting notifications")]
    Db(#[from] sqlx::Error),
    #[error("queueing the sync failed")]
    Queue(#[from] QueueError),
}

fn hash_state(state: &str) -> [u8; 32] {
    Sha256::digest(state.as_bytes()).into()
}

/// Equal-length digests compared without an early exit, so timing says nothing about how many
/// leading bytes of a forged state's hash matched.
fn digests_equal(a: &[u8], b: &[u8; 32]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(sqlx::FromRow)]
struct KnownSubscription {
    subscription_id: String,
    tenant_id: Uuid,
    email_account_id: Uuid,
    folder: String,
    client_state_hash: Vec<u8>,
    account_active: bool,
}

fn plausible_subscription_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control)
}

/// Verifies every notification and persists what the valid ones ask for, in one transaction:
/// a coalesced sync per mailbox folder, and flags for the scheduler on lifecycle events. When
/// this returns Ok the work is durable and the endpoint may answer 202.
pub async fn accept(pool: &PgPool, batch: &NotificationBatch) -> Result<Accepted, WebhookError> {
    let ids: Vec<&str> = batch
        .value
        .iter()
        .map(|n| n.subscription_id.as_str())
        // Graph's ids are short and printable; anything else cannot be one of ours (and a NUL
        // byte cannot even be sent to PostgreSQL as text).
        .filter(|id| plausible_subscription_id(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let known: BTreeMap<String, KnownSubscription> = sqlx::query_as::<_, KnownSubscription>(
        "SELECT s.subscription_id, s.tenant_id, s.email_account_id, s.folder, s.client_state_hash,
                a.status = 'active' AS account_active
         FROM graph_subscriptions s
         JOIN helpdesk_email_accounts a ON a.id = s.email_account_id AND a.tenant_id = s.tenant_id
         WHERE s.subscription_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|k| (k.subscription_id.clone(), k))
    .collect();

    let mut report = Accepted::default();
    let mut wake: BTreeSet<(Uuid, Uuid, String)> = BTreeSet::new();
    let mut reauthorize: BTreeSet<String> = BTreeSet::new();
    let mut removed: BTreeSet<String> = BTreeSet::new();
    for n in &batch.value {
        let verified = known.get(&n.subscription_id).filter(|k| {
            n.client_state.as_ref().is_some_and(|s| {
                digests_equal(&k.client_state_hash, &hash_state(s.expose_secret()))
            })
        });
        let Some(sub) = verified else {
            report.rejected += 1;
            continue;
        };
        report.verified += 1;
        let target = (sub.tenant_id, sub.email_account_id, sub.folder.clone());
        match n.lifecycle_event.as_deref() {
            Some("reauthorizationRequired") => {
                reauthorize.insert(sub.subscription_id.clone());
            }
            Some("subscriptionRemoved") => {
                removed.insert(sub.subscription_id.clone());
                // Mail may have arrived while nobody was told: catch up now.
                if sub.account_active {
                    wake.insert(target);
                }
            }
            // A change, `missed`, or an event type Graph adds later: the delta sync is the
            // answer to all of them (delta tracks state, not notifications).
            _ => {
                if sub.account_active {
                    wake.insert(target);
                }
            }
        }
    }
    if report.rejected > 0 {
        metrics::counter!("graphdesk_webhook_notifications_total", "outcome" => "rejected")
            .increment(report.rejected as u64);
        warn!(
            rejected = report.rejected,
            "discarded notifications with an unknown subscription or a wrong clientState"
        );
    }
    if report.verified == 0 {
        return Ok(report);
    }
    metrics::counter!("graphdesk_webhook_notifications_total", "outcome" => "verified")
        .increment(report.verified as u64);

    let mut tx = pool.begin().await?;
    if !reauthorize.is_empty() {
        sqlx::query(
            "UPDATE graph_subscriptions SET reauthorize_requested_at = now()
             WHERE subscription_id = ANY($1)",
        )
        .bind(reauthorize.iter().collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    if !removed.is_empty() {
        sqlx::query(
            "UPDATE graph_subscriptions SET removed_at = now() WHERE subscription_id = ANY($1)",
        )
        .bind(removed.iter().collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    if !reauthorize.is_empty() || !removed.is_empty() {
        sqlx::query("SELECT pg_notify($1, 'subscriptions')")
            .bind(SCHEDULER_CHANNEL)
            .execute(&mut *tx)
            .await?;
    }
    for (tenant, account, folder) in wake {
        let job = SyncMailbox {
            tenant: TenantId::from_uuid(tenant),
            account: AccountId::from_uuid(account),
            folder,
        };
        if enqueue_in(&mut tx, &job, EnqueueOptions::default())
            .await?
            .created
        {
            report.syncs_created += 1;
        }
    }
    tx.commit().await?;
    Ok(report)
}

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MaintenanceReport {
    pub created: usize,
    pub renewed: usize,
    pub failed: usize,
    /// Rows of subscriptions that expired in Graph, dropped so they get recreated.
    pub expired_dropped: u64,
    /// Accounts still backing off after recent failures, left out of this pass.
    pub backing_off: usize,
}

/// One account's subscription work.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SubscriptionWork {
    pub tenant_id: Uuid,
    pub email_account_id: Uuid,
    /// The current subscription, if any.
    pub subscription_id: Option<String>,
    /// Graph removed it (lifecycle event): recreate instead of renewing.
    pub removed: bool,
}

/// Drops rows of subscriptions Graph has already expired, then lists active mailboxes whose
/// inbox has no subscription, lost it, or needs a renewal (expiring within [`RENEW_WITHIN`] or
/// reauthorization requested), soonest first.
///
/// `backing_off` accounts are left out before the limit applies: mailboxes that keep failing
/// sort first (no subscription, no expiry) and would otherwise take every slot of every pass.
pub async fn due_subscription_work(
    pool: &PgPool,
    limit: i64,
    backing_off: &[Uuid],
) -> Result<(u64, Vec<SubscriptionWork>), sqlx::Error> {
    let dropped = sqlx::query("DELETE FROM graph_subscriptions WHERE expires_at < now()")
        .execute(pool)
        .await?
        .rows_affected();
    let work = sqlx::query_as::<_, SubscriptionWork>(
        "SELECT a.tenant_id, a.id AS email_account_id, s.subscription_id,
                coalesce(s.removed_at IS NOT NULL, false) AS removed
         FROM helpdesk_email_accounts a
         LEFT JOIN graph_subscriptions s ON s.email_account_id = a.id AND s.folder = $1
         WHERE a.status = 'active' AND a.access_token_enc IS NOT NULL
           AND (s.subscription_id IS NULL
                OR s.removed_at IS NOT NULL
                OR s.reauthorize_requested_at IS NOT NULL
                OR s.expires_at < now() + make_interval(secs => $2))
           AND a.id <> ALL($4)
         ORDER BY s.expires_at NULLS FIRST, a.id
         LIMIT $3",
    )
    .bind(WellKnownFolder::Inbox.as_str())
    .bind(RENEW_WITHIN.num_seconds() as f64)
    .bind(limit)
    .bind(backing_off)
    .fetch_all(pool)
    .await?;
    Ok((dropped, work))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkOutcome {
    Created,
    Renewed,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("Microsoft Graph refused: {0}")]
    Graph(#[from] crate::graph::GraphError),
    #[error("database error while storing the subscription")]
    Db(#[from] sqlx::Error),
    #[error("queueing the catch-up sync failed")]
    Queue(#[from] QueueError),
}

/// Renews (PATCH) or (re)creates one account's inbox subscription. Converges when re-run: a
/// renewal of a subscription Graph no longer knows, or one that posts to addresses other than
/// `settings`' (the public base URL moved), becomes a creation, and a creation that loses a
/// race with another creator deletes its own subscription again.
pub async fn reconcile_subscription(
    services: &Services,
    settings: &WebhookSettings,
    work: &SubscriptionWork,
) -> Result<WorkOutcome, SubscriptionError> {
    let tenant = TenantId::from_uuid(work.tenant_id);
    let account = AccountId::from_uuid(work.email_account_id);
    let graph = crate::accounts::graph_client(services, tenant, account);
    if let Some(id) = &work.subscription_id {
        if !work.removed {
            match graph
                .renew_subscription(id, Utc::now() + SUBSCRIPTION_LIFETIME)
                .await
            {
                Ok(sub) if points_elsewhere(&sub, settings) => {
                    // A renewal only moves the expiry (graph-contract §7): after the public
                    // base URL moved, renewing would keep it posting to the old host forever.
                    // A new one is validated at the new address and gets a catch-up sync.
                    info!(%account, subscription = %id, "subscription posts to an old address; replacing it");
                    if let Err(e) = graph.delete_subscription(id).await {
                        warn!(%account, subscription = %id, error = %e, "could not delete the outdated subscription; it expires on its own");
                    }
                }
                Ok(sub) => {
                    sqlx::query(
                        "UPDATE graph_subscriptions SET expires_at = $2, renewed_at = now(),
                                reauthorize_requested_at = NULL
                         WHERE subscription_id = $1",
                    )
                    .bind(id)
                    .bind(sub.expiration_date_time)
                    .execute(&services.system_pool)
                    .await?;
                    info!(%account, subscription = %id, "subscription renewed");
                    return Ok(WorkOutcome::Renewed);
                }
                Err(e) if e.is_not_found() => {
                    info!(%account, subscription = %id, "subscription gone in Graph; recreating");
                }
                Err(e) => return Err(e.into()),
            }
        }
        sqlx::query("DELETE FROM graph_subscriptions WHERE subscription_id = $1")
            .bind(id)
            .execute(&services.system_pool)
            .await?;
    }
    create_subscription(services, settings, &graph, tenant, account).await?;
    Ok(WorkOutcome::Created)
}

/// Whether Graph reports notification addresses other than this deployment's current ones.
/// An address Graph leaves out counts as unchanged.
fn points_elsewhere(sub: &crate::graph::Subscription, settings: &WebhookSettings) -> bool {
    let differs = |reported: &Option<String>, current: String| {
        reported.as_deref().is_some_and(|url| url != current)
    };
    differs(&sub.notification_url, settings.notification_url())
        || differs(&sub.lifecycle_notification_url, settings.lifecycle_url())
}

async fn create_subscription(
    services: &Services,
    settings: &WebhookSettings,
    graph: &crate::graph::GraphClient,
    tenant: TenantId,
    account: AccountId,
) -> Result<(), SubscriptionError> {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let client_state = SecretString::from(hex::encode(raw));
    let hash = hash_state(client_state.expose_secret());
    let sub = graph
        .create_subscription(&NewSubscription {
            change_type: "created".into(),
            notification_url: settings.notification_url(),
            lifecycle_notification_url: Some(settings.lifecycle_url()),
            resource: INBOX_RESOURCE.into(),
            expiration_date_time: Utc::now() + SUBSCRIPTION_LIFETIME,
            client_state: client_state.expose_secret().to_string(),
        })
        .await?;
    let folder = WellKnownFolder::Inbox.as_str();
    // Subscriptions are system bookkeeping, routed by subscription id across tenants.
    let mut tx = services.system_pool.begin().await?;
    let stored = sqlx::query(
        "INSERT INTO graph_subscriptions
            (subscription_id, tenant_id, email_account_id, folder, resource, client_state_hash,
             expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (email_account_id, folder) DO NOTHING",
    )
    .bind(&sub.id)
    .bind(tenant.as_uuid())
    .bind(account.as_uuid())
    .bind(folder)
    .bind(INBOX_RESOURCE)
    .bind(hash.as_slice())
    .bind(sub.expiration_date_time)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !stored {
        tx.rollback().await?;
        // Another creator won; ours would only send notifications nobody can verify.
        if let Err(e) = graph.delete_subscription(&sub.id).await {
            warn!(%account, subscription = %sub.id, error = %e, "could not delete a duplicate subscription; it expires on its own");
        }
        return Ok(());
    }
    // Mail that arrived before the subscription existed (or while a removed one was being
    // replaced) was announced to nobody: one delta sync catches up.
    enqueue_in(
        &mut tx,
        &SyncMailbox {
            tenant,
            account,
            folder: folder.into(),
        },
        EnqueueOptions::default(),
    )
    .await?;
    tx.commit().await?;
    info!(%account, subscription = %sub.id, expires_at = %sub.expiration_date_time, "inbox subscription created");
    Ok(())
}

/// When a failing account may be tried again: doubling from `base`, at most an hour.
#[must_use]
pub fn backoff_after(failures: u32, base: std::time::Duration) -> DateTime<Utc> {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    let delay = base
        .saturating_mul(factor)
        .min(std::time::Duration::from_secs(3600));
    Utc::now() + TimeDelta::from_std(delay).unwrap_or(TimeDelta::hours(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_compare_by_value_and_length() {
        let h = hash_state("s3cret");
        assert!(digests_equal(&h, &hash_state("s3cret")));
        assert!(!digests_equal(&h, &hash_state("s3cret ")));
        assert!(!digests_equal(&h[..31], &h));
        assert!(!digests_equal(&[], &h));
    }

    #[test]
    fn urls_hang_below_the_public_base_url() {
        let s = WebhookSettings::new("https://desk.example.com/").unwrap();
        assert_eq!(
            s.notification_url(),
            "https://desk.example.com/graph/notifications"
        );
        assert_eq!(
            s.lifecycle_url(),
            "https://desk.example.com/graph/lifecycle"
        );
        assert!(WebhookSettings::new("desk.example.com").is_err());
        assert!(WebhookSettings::new("ftp://desk.example.com").is_err());
    }

    #[test]
    fn the_lifetime_stays_under_the_graph_maximum_for_messages() {
        assert!(SUBSCRIPTION_LIFETIME < TimeDelta::minutes(4230));
        assert!(RENEW_WITHIN < SUBSCRIPTION_LIFETIME);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = std::time::Duration::from_secs(10);
        let first = backoff_after(1, base) - Utc::now();
        let third = backoff_after(3, base) - Utc::now();
        assert!(first <= TimeDelta::seconds(10) && first > TimeDelta::seconds(8));
        assert!(third <= TimeDelta::seconds(40) && third > TimeDelta::seconds(38));
        assert!(backoff_after(40, base) - Utc::now() <= TimeDelta::hours(1));
    }

    #[test]
    fn a_notification_never_shows_its_client_state() {
        let n: Notification = serde_json::from_value(serde_json::json!({
            "subscriptionId": "sub-1",
            "clientState": "do-not-print-me",
            "changeType": "created",
            "resource": "Users/u/Messages/m",
        }))
        .unwrap();
        assert!(!format!("{n:?}").contains("do-not-print-me"));
    }
}
