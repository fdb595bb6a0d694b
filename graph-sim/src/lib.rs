//! # graph-sim: a local Microsoft Graph v1.0 + identity platform v2.0 simulator
//!
//! Serves, on one port:
//! - identity: `GET /{tenant}/oauth2/v2.0/authorize`, `POST /{tenant}/oauth2/v2.0/token`
//!   (`base_url()` is the authority, `IDENTITY_BASE_URL`);
//! - Graph: everything under `/v1.0` (`graph_base_url()`, `GRAPH_BASE_URL`);
//! - control: JSON under `/_sim` mirroring the Rust methods on [`GraphSim`].
//!
//! It follows the project's Graph contract (paths, JSON shapes, error bodies, paging, delta,
//! throttling, token expiry). Use it in-process ([`GraphSim::start`]) or as the `graph-sim` binary.
//!
//! ## Graph routes (`/me/...` and `/users/{id|UPN}/...` alike)
//! `GET /me`, `GET /users`; `GET|POST mailFolders`, `GET mailFolders/{id}`,
//! `GET|POST mailFolders/{id}/childFolders`; `GET mailFolders/{id}/messages` (`$top`, `$skip`,
//! `$select`, `$filter`, `$orderby`, `$count`), `GET mailFolders/{id}/messages/delta`;
//! `GET|POST messages`, `GET|PATCH|DELETE messages/{id}`, `GET messages/{id}/$value`,
//! `GET|POST messages/{id}/attachments`, `GET messages/{id}/attachments/{id}`,
//! `POST messages/{id}/{createReply|createReplyAll|createForward|reply|replyAll|forward|send|move|copy}`,
//! `POST sendMail`; `POST /$batch`; `GET|POST /subscriptions`, `GET|PATCH|DELETE /subscriptions/{id}`,
//! `POST /subscriptions/{id}/reauthorize`.
//!
//! ## Control API (`/_sim`, JSON, no auth)
//! Bodies use the serde form of the types in this crate (snake_case fields).
//! A fault: `{"kind": {"type": "too_many_requests", "retry_after": "2.128"}, "mailbox": "a@b.com",
//! "path_contains": "/messages", "method": "GET", "count": 1, "probability": 0.5}`.
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | `/_sim/health` | → `{"ok":true}` |
//! | POST | `/_sim/tenants` | `{domain, display_name?}` → SimTenant |
//! | GET | `/_sim/tenants` | → [SimTenant] |
//! | POST | `/_sim/users` | `{tenant, upn, display_name, shared?}` → SimUser |
//! | GET | `/_sim/users` | → [SimUser] |
//! | POST | `/_sim/users/{user}/grant` | `{delegate}` → 204 |
//! | POST | `/_sim/users/{user}/folders` | `{parent?, name}` → `{id}` |
//! | POST | `/_sim/users/{user}/deliver` | InboundMail → DeliveredMessage |
//! | GET | `/_sim/users/{user}/folders/{folder}/messages` | → [SimMessage] |
//! | GET | `/_sim/users/{user}/sent-items` | → [SimMessage] |
//! | POST | `/_sim/users/{user}/messages/{id}/move` | `{destination}` → MessageRef |
//! | POST | `/_sim/users/{user}/messages/{id}/read` | `{read}` → 204 |
//! | DELETE | `/_sim/users/{user}/messages/{id}` | → 204 |
//! | POST | `/_sim/users/{user}/revoke` | `{aadsts}` → 204 |
//! | POST | `/_sim/users/{user}/expire-tokens` | → 204 |
//! | POST | `/_sim/users/{user}/tokens` | `{scopes:[..]}` → TokenResponse |
//! | POST | `/_sim/users/{user}/evict-delta` | → 204 |
//! | POST | `/_sim/users/{user}/generate` | GeneratorSpec → GeneratedSummary |
//! | POST | `/_sim/login-user` | `{user}` → 204 |
//! | POST | `/_sim/sign-in-as` | `{user}` (`{"user": null}` clears) → 204 |
//! | POST | `/_sim/faults` | FaultRule → `{id}` |
//! | GET | `/_sim/faults` | → [{id, rule}] |
//! | DELETE | `/_sim/faults` / `/_sim/faults/{id}` | → 204 |
//! | POST | `/_sim/settings` | `{access_token_lifetime_secs?, auto_consent?, sent_items_delay_ms?}` → 204 |
//! | POST | `/_sim/clock/advance` | `{seconds}` → 204 |
//! | GET | `/_sim/subscriptions` | → [SimSubscription] |
//! | POST | `/_sim/subscriptions/{id}/lifecycle` | `{event: reauthorizationRequired\|subscriptionRemoved\|missed}` → 204 |
//! | GET | `/_sim/stats`, `/_sim/sends`, `/_sim/log`, `/_sim/notifications` | → figures |
//!
//! ## Choices where the contract is silent or marked UNCONFIRMED
//! - Shared mailboxes: no endpoint lists them. A user reaches another mailbox only after
//!   [`GraphSim::grant_mailbox_access`] and with a `.Shared` scope; otherwise 403
//!   `ErrorAccessDenied`. An unknown `/users/{x}` gives 404 `ErrorInvalidUser`.
//!   [`GraphSim::grant_mailbox_access_without_send_as`]: full access without SendAs; reads and
//!   drafts work, the send routes (`sendMail`, `send`, `reply`, `replyAll`, `forward`) as that
//!   mailbox answer 403 `ErrorSendAsDenied`. [`GraphSim::set_cloud_mailbox`]`(user, false)`: a
//!   directory user without a cloud mailbox; `GET /users/{x}` still answers, every mailbox route
//!   (own or delegated, checked before rights) answers 404 `MailboxNotEnabledForRESTAPI` (the
//!   contract names only the code; 404 is what Graph answers).
//! - Who signs in at authorize: the [`GraphSim::sign_in_as`] user if set (a person who signs in
//!   as someone else than the link suggested: `login_hint` only pre-fills Microsoft's sign-in),
//!   else the `login_hint` user, else the [`GraphSim::set_login_user`] user, else the first
//!   non-shared user of the authority's tenant.
//! - `Retry-After` is always delta-seconds (integer or decimal), never an HTTP-date.
//! - Mailbox-concurrency 429s carry `Retry-After: 1` (configurable); budget 429s (`TooManyRequests`)
//!   carry the seconds until the oldest request leaves the 10-minute window.
//! - Delta `@removed.reason`: `deleted` for hard deletes, `changed` when the message still exists
//!   in another folder (moved out). `$top` on the first delta request acts as the page size when
//!   no `Prefer: odata.maxpagesize` is given; default page size is 10. A nextLink may be retried
//!   until a later page of the same round has been fetched; then it gives 410.
//! - `internetMessageHeaders` is omitted entirely (not `[]`) on mail that did not come from the
//!   internet (drafts, Sent Items copies, mail created through Graph).
//! - Replies: `createReply` strips an existing reply prefix before adding `RE: ` (no "RE: RE:").
//!   Both `comment` and `message` in the body = 400 `ErrorInvalidRequest`.
//!   PATCH of `subject`/`body`/recipients on a non-draft = 400 `ErrorInvalidPropertyUpdateSentMessage`.
//! - Sent Items copies keep the draft's immutable id and get a new plain id.
//!   A send to a simulator user also lands in that user's Inbox as internet mail with
//!   Message-ID/In-Reply-To/References headers.
//! - `DELETE /messages/{id}` is a hard delete (no Deleted Items copy); use `/move` to soft-delete.
//! - Subscription validation: the token looks like Graph's ("Validation: Testing client
//!   application reachability for subscription Request-Id: {guid}") and is form-encoded
//!   (spaces as `+`). Failure or time-out = 400 `ValidationError`. `http://` notification URLs are
//!   accepted (real Graph wants https). A notification POST not answered within 3 s (contract
//!   §7; `SimConfig::notification_timeout_ms`) is a failed delivery, like a 5xx or transport
//!   error: recorded with `status: None` and retried 3 times.
//! - Notifications carry immutable ids when the subscription was created with
//!   `Prefer: IdType="ImmutableId"`; several changes of one subscription share one POST.
//! - Time: tests shorten expiries with [`SimConfig`] lifetimes, [`GraphSim::advance_clock`]
//!   (moves the simulator clock for tokens, codes, subscriptions and late Sent Items) or
//!   [`GraphSim::expire_access_tokens`], instead of sleeping.
//! - Token endpoint: unknown code or refresh token = `invalid_grant` AADSTS9002313; redirect_uri
//!   different from the authorize request = `invalid_grant` AADSTS50011; a PKCE mismatch also
//!   consumes the code. Refresh tokens are rotated on every refresh; old ones stay valid until
//!   revoked ([`GraphSim::revoke_refresh_tokens`], which rejects all refresh tokens issued so far
//!   with the given AADSTS code) or 90 days unused (`700082`). 65001 answers
//!   `invalid_grant` + `suberror: consent_required`; 50076/50079/53003 answer `interaction_required`.
//!   Transient token faults answer 503 `temporarily_unavailable` (AADSTS90033), except a
//!   `TooManyRequests` fault: a bare 429 (body `Too Many Requests`) with its Retry-After, as
//!   Entra throttles. An unknown tenant in the authority path = 400 `invalid_request` AADSTS90002.
//! - Access tokens look like JWTs (claims `oid`, `tid`, `upn`, `scp`, `exp`) but are opaque to the
//!   simulator: only tokens it issued are accepted. Scopes are enforced per route (Graph's least
//!   privileged scope or any stronger one); switch off with `SimConfig::enforce_scopes`.
//! - `$batch`: inner requests run one at a time in dependency order; responses are shuffled
//!   (the contract says "any order"). An injected connection reset inside a batch becomes an inner
//!   504. Each inner request is logged (`in_batch: true`) and throttled like a direct one.
//! - Route templates in the log fold `/users/{id}/...` into `/me/...` (e.g.
//!   `GET /me/mailFolders/{id}/messages`).
//! - `GET /messages/{id}/$value` answers `message/rfc822` MIME built from the stored headers.
//! - Attachments honour `$select` (`@odata.type` and `id` always come back). Properties only
//!   `fileAttachment` has (`contentId`, `contentLocation`, `contentBytes`) need the type cast,
//!   `microsoft.graph.fileAttachment/contentId`; named bare they give 400 `RequestBroker--ParseUri`
//!   ("Could not find a property named 'contentId' on type 'microsoft.graph.attachment'."), as Graph does.
//! - A subscription whose expirationDateTime has passed (simulator clock) is deleted: it is no
//!   longer listed and GET/PATCH/DELETE of it answer 404 `ResourceNotFound`.
//! - Generator: headerless replies share their thread's `conversationId` (Exchange threads by
//!   conversation topic); forwards start a new thread. `GeneratedSummary::threads` counts both.

mod control;
mod generator;
mod graph;
mod identity;
mod model;
mod notify;
mod odata;
mod server;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration as StdDuration;

use anyhow::Context as _;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

pub use model::*;

use state::State;

/// Simulator settings. `Default` gives Graph's real limits and lifetimes.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub client_id: String,
    pub client_secret: String,
    /// Exact-match list, as in the app registration.
    pub redirect_uris: Vec<String>,
    pub access_token_lifetime_secs: u64,
    pub refresh_token_inactivity_secs: u64,
    pub auth_code_lifetime_secs: u64,
    /// MailboxConcurrency: simultaneous requests per mailbox before 429 ApplicationThrottled.
    pub mailbox_concurrency_limit: usize,
    pub concurrency_retry_after: String,
    /// Requests per mailbox per rolling 10 minutes before 429 TooManyRequests.
    pub mailbox_budget_per_10_min: u64,
    /// Delta tokens kept per folder; older ones give 410 SyncStateNotFound.
    pub delta_generations_kept: usize,
    /// `true`: authorize redirects straight back with a code. `false`: with error=access_denied.
    pub auto_consent: bool,
    /// Delay before a Sent Items copy becomes visible.
    pub sent_items_delay_ms: u64,
    pub subscription_validation_timeout_ms: u64,
    /// How long a notification receiver has to answer (contract: 202 within 3 s); a slower
    /// answer is a failed delivery and is retried.
    pub notification_timeout_ms: u64,
    pub max_subscription_minutes: i64,
    pub default_page_size: usize,
    /// Links (nextLink, deltaLink) use this instead of the request's Host header.
    pub public_base_url: Option<String>,
    pub enforce_scopes: bool,
    pub shuffle_batch_responses: bool,
    /// Seeds ids and fault probabilities; `None` = random.
    pub seed: Option<u64>,
    pub request_log_capacity: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            client_id: "6731de76-14a6-49ae-97bc-6eba6914391e".into(),
            client_secret: "sim-client-secret".into(),
            redirect_uris: vec!["http://localhost:8080/auth/callback".into()],
            access_token_lifetime_secs: 3599,
            refresh_token_inactivity_secs: 90 * 24 * 3600,
            auth_code_lifetime_secs: 600,
            mailbox_concurrency_limit: 4,
            concurrency_retry_after: "1".into(),
            mailbox_budget_per_10_min: 10_000,
            delta_generations_kept: 3,
            auto_consent: true,
            sent_items_delay_ms: 0,
            subscription_validation_timeout_ms: 10_000,
            notification_timeout_ms: 3_000,
            max_subscription_minutes: 4230,
            default_page_size: 10,
            public_base_url: None,
            enforce_scopes: true,
            shuffle_batch_responses: true,
            seed: None,
            request_log_capacity: 200_000,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) state: Mutex<State>,
    pub(crate) addr: SocketAddr,
    pub(crate) http: reqwest::Client,
    pub(crate) wake: Notify,
    shutdown_tx: Mutex<Option<oneshot::Sender<()>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Handle to a running simulator. Cheap to clone; all clones share one world.
#[derive(Clone)]
pub struct GraphSim {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for GraphSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphSim")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl GraphSim {
    /// Binds 127.0.0.1 on a free port.
    pub async fn start(config: SimConfig) -> anyhow::Result<GraphSim> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    pub async fn start_on(addr: SocketAddr, config: SimConfig) -> anyhow::Result<GraphSim> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        let acceptor = poem::listener::TcpAcceptor::from_tokio(listener)?;
        let http = reqwest::Client::builder()
            .timeout(StdDuration::from_secs(30))
            .build()?;
        let (tx, rx) = oneshot::channel::<()>();
        let sim = GraphSim {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(config)),
                addr: local,
                http,
                wake: Notify::new(),
                shutdown_tx: Mutex::new(Some(tx)),
                tasks: Mutex::new(vec![]),
            }),
        };
        let ep = server::SimEndpoint { sim: sim.clone() };
        let (stop_pump_tx, stop_pump_rx) = tokio::sync::watch::channel(false);
        let server_task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
                let _ = stop_pump_tx.send(true);
            };
            let _ = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(ep, shutdown, Some(StdDuration::from_millis(300)))
                .await;
        });
        let pump_task = tokio::spawn(notify::pump(sim.clone(), stop_pump_rx));
        lock_tasks(&sim.inner).extend([server_task, pump_task]);
        Ok(sim)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// `http://127.0.0.1:PORT`: the identity authority (append `/{tenant}/oauth2/v2.0/...`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// `base_url() + "/v1.0"`.
    pub fn graph_base_url(&self) -> String {
        format!("{}/v1.0", self.base_url())
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn config(&self) -> SimConfig {
        self.lock().cfg.clone()
    }

    pub fn client_id(&self) -> String {
        self.lock().cfg.client_id.clone()
    }

    /// Idempotent per domain.
    pub fn create_tenant(&self, domain: &str, display_name: &str) -> SimTenant {
        self.lock().create_tenant(domain, display_name)
    }

    pub fn tenants(&self) -> Vec<SimTenant> {
        self.lock().tenants.clone()
    }

    /// Creates a user with a mailbox. An unknown tenant given as a domain is created on the fly.
    pub fn create_user(&self, tenant: impl AsTenant, upn: &str, display_name: &str) -> SimUser {
        self.try_create_user(tenant, upn, display_name)
            .expect("graph-sim: create_user")
    }

    pub fn try_create_user(
        &self,
        tenant: impl AsTenant,
        upn: &str,
        display_name: &str,
    ) -> anyhow::Result<SimUser> {
        self.lock()
            .create_user(&tenant.tenant_key(), upn, display_name, false)
    }

    /// A mailbox nobody signs in to; see [`GraphSim::grant_mailbox_access`].
    pub fn create_shared_mailbox(
        &self,
        tenant: impl AsTenant,
        upn: &str,
        display_name: &str,
    ) -> SimUser {
        self.lock()
            .create_user(&tenant.tenant_key(), upn, display_name, true)
            .expect("graph-sim: create_shared_mailbox")
    }

    /// Lets `delegate` open `mailbox` (with `Mail.*.Shared` scopes), SendAs included.
    pub fn grant_mailbox_access(&self, mailbox: impl AsUser, delegate: impl AsUser) {
        let mut st = self.lock();
        let delegate_id = st
            .user(&delegate.user_key())
            .map(|u| u.user.id.clone())
            .expect("graph-sim: unknown delegate");
        let mailbox = &mut st
            .user_mut(&mailbox.user_key())
            .expect("graph-sim: unknown mailbox")
            .mailbox;
        mailbox.send_as_denied.remove(&delegate_id);
        mailbox.delegates.insert(delegate_id);
    }

    /// Full access without SendAs: `delegate` opens `mailbox` (reads, drafts, moves), but
    /// sending as it (`sendMail`, `messages/{id}/send`, `reply`, `replyAll`, `forward`) answers
    /// 403 `ErrorSendAsDenied`. [`GraphSim::grant_mailbox_access`] gives SendAs back.
    pub fn grant_mailbox_access_without_send_as(
        &self,
        mailbox: impl AsUser,
        delegate: impl AsUser,
    ) {
        self.grant_mailbox_access(mailbox.user_key(), delegate.user_key());
        let mut st = self.lock();
        let delegate_id = st
            .user(&delegate.user_key())
            .map(|u| u.user.id.clone())
            .expect("graph-sim: unknown delegate");
        st.user_mut(&mailbox.user_key())
            .expect("graph-sim: unknown mailbox")
            .mailbox
            .send_as_denied
            .insert(delegate_id);
    }

    /// `false`: the user stays in the directory (`GET /users/{x}` answers) but has no cloud
    /// mailbox (hosted on-premises, unlicensed): every mailbox route, for the user and for
    /// delegates alike, answers 404 `MailboxNotEnabledForRESTAPI`. `true` restores it.
    pub fn set_cloud_mailbox(&self, user: impl AsUser, enabled: bool) {
        self.lock()
            .user_mut(&user.user_key())
            .expect("graph-sim: unknown user")
            .mailbox
            .no_cloud_mailbox = !enabled;
    }

    pub fn users(&self) -> Vec<SimUser> {
        self.lock().users.iter().map(|u| u.user.clone()).collect()
    }

    pub fn user(&self, user: impl AsUser) -> Option<SimUser> {
        self.lock()
            .user(&user.user_key())
            .ok()
            .map(|u| u.user.clone())
    }

    /// Creates a child folder (`parent` = well-known name or id); returns its id.
    pub fn create_folder(&self, user: impl AsUser, parent: &str, name: &str) -> String {
        let mut st = self.lock();
        let key = user.user_key();
        match st
            .create_folder(&key, parent, name)
            .expect("graph-sim: create_folder")
        {
            Some(id) => id,
            None => {
                let u = st.user(&key).expect("user");
                let pid = u.mailbox.folder_id(parent).unwrap_or_default();
                u.mailbox
                    .folders
                    .iter()
                    .find(|f| f.parent_id == pid && f.display_name.eq_ignore_ascii_case(name))
                    .map(|f| f.id.clone())
                    .unwrap_or_default()
            }
        }
    }

    /// Folder id for a well-known name (`inbox`, `sentitems`, ...) or display name.
    pub fn folder_id(&self, user: impl AsUser, name: &str) -> Option<String> {
        let st = self.lock();
        let u = st.user(&user.user_key()).ok()?;
        u.mailbox.folder_id(name).or_else(|| {
            u.mailbox
                .folders
                .iter()
                .find(|f| f.display_name.eq_ignore_ascii_case(name))
                .map(|f| f.id.clone())
        })
    }

    /// Delivers inbound internet mail (with whatever headers it carries).
    pub fn deliver(&self, user: impl AsUser, mail: InboundMail) -> DeliveredMessage {
        self.try_deliver(user, mail).expect("graph-sim: deliver")
    }

    pub fn try_deliver(
        &self,
        user: impl AsUser,
        mail: InboundMail,
    ) -> anyhow::Result<DeliveredMessage> {
        let r = self.lock().deliver(&user.user_key(), mail);
        self.wake();
        r
    }

    /// Moves a message (by plain or immutable id) to a folder (well-known name or id).
    pub fn move_message(
        &self,
        user: impl AsUser,
        message_id: &str,
        destination: &str,
    ) -> MessageRef {
        self.try_move_message(user, message_id, destination)
            .expect("graph-sim: move_message")
    }

    pub fn try_move_message(
        &self,
        user: impl AsUser,
        message_id: &str,
        destination: &str,
    ) -> anyhow::Result<MessageRef> {
        let r = self
            .lock()
            .move_message(&user.user_key(), message_id, destination);
        self.wake();
        r
    }

    /// Hard delete.
    pub fn delete_message(&self, user: impl AsUser, message_id: &str) -> anyhow::Result<()> {
        let r = self.lock().delete_message(&user.user_key(), message_id);
        self.wake();
        r
    }

    /// Changes `isRead` (a partial update in delta).
    pub fn set_read(&self, user: impl AsUser, message_id: &str, read: bool) -> anyhow::Result<()> {
        let mut st = self.lock();
        let uid = st.user(&user.user_key())?.user.id.clone();
        let u = st.user_mut(&uid)?;
        let m = u
            .mailbox
            .msg_mut(message_id)
            .ok_or_else(|| anyhow::anyhow!("unknown message {message_id}"))?;
        m.is_read = read;
        st.touch(&uid, message_id, &["isRead"]);
        drop(st);
        self.wake();
        Ok(())
    }

    /// All messages of a folder (well-known name or id), newest first. Pending late Sent Items
    /// copies are not included until due.
    pub fn messages(&self, user: impl AsUser, folder: &str) -> Vec<SimMessage> {
        let mut st = self.lock();
        st.materialize_pending();
        let Ok(u) = st.user(&user.user_key()) else {
            return vec![];
        };
        let Some(fid) = u.mailbox.folder_id(folder) else {
            return vec![];
        };
        let mut v: Vec<SimMessage> = u
            .mailbox
            .in_folder(&fid)
            .map(|m| st.sim_message(&u.mailbox, m))
            .collect();
        v.sort_by_key(|m| std::cmp::Reverse(m.received));
        v
    }

    /// The visible Sent Items of a user.
    pub fn sent_items(&self, user: impl AsUser) -> Vec<SimMessage> {
        self.messages(user, "sentitems")
    }

    pub fn set_fault(&self, rule: FaultRule) -> FaultId {
        self.lock().add_fault(rule)
    }

    pub fn remove_fault(&self, id: &FaultId) -> bool {
        let mut st = self.lock();
        let before = st.faults.len();
        st.faults.retain(|(f, _, _)| f != id);
        before != st.faults.len()
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn faults(&self) -> Vec<(FaultId, FaultRule)> {
        self.lock()
            .faults
            .iter()
            .map(|(i, r, _)| (i.clone(), r.clone()))
            .collect()
    }

    /// Every refresh token issued to the user so far now fails with this AADSTS code
    /// (70008, 700082, 50173, 70043 → invalid_grant; 65001 → consent_required; 50076 → interaction_required).
    pub fn revoke_refresh_tokens(&self, user: impl AsUser, aadsts_code: u32) {
        let mut st = self.lock();
        let seq = st.refresh_seq;
        st.user_mut(&user.user_key())
            .expect("graph-sim: revoke_refresh_tokens")
            .revoked = Some((seq, aadsts_code));
    }

    /// Makes every access token of the user expired (the next Graph call gets 401).
    pub fn expire_access_tokens(&self, user: impl AsUser) {
        let mut st = self.lock();
        let Ok(uid) = st.user(&user.user_key()).map(|u| u.user.id.clone()) else {
            return;
        };
        let past = st.now() - chrono::Duration::seconds(1);
        for g in st.access.values_mut().filter(|g| g.user_id == uid) {
            g.expires = past;
        }
    }

    /// `expires_in` of tokens issued from now on.
    pub fn set_access_token_lifetime(&self, secs: u64) {
        self.lock().cfg.access_token_lifetime_secs = secs;
    }

    pub fn set_auto_consent(&self, auto_consent: bool) {
        self.lock().cfg.auto_consent = auto_consent;
    }

    /// The user the authorize endpoint signs in when there is no `login_hint`.
    pub fn set_login_user(&self, user: impl AsUser) {
        self.lock().login_user = Some(user.user_key());
    }

    /// The user who finishes every sign-in from now on, whatever `login_hint` pre-filled (at
    /// Microsoft the hint only pre-fills the account; the person may pick another one).
    pub fn sign_in_as(&self, user: impl AsUser) {
        self.lock().sign_in_as = Some(user.user_key());
    }

    /// Undoes [`GraphSim::sign_in_as`]: sign-ins follow `login_hint` again.
    pub fn clear_sign_in_as(&self) {
        self.lock().sign_in_as = None;
    }

    pub fn set_sent_items_delay(&self, delay: StdDuration) {
        self.lock().cfg.sent_items_delay_ms = delay.as_millis() as u64;
    }

    /// Moves the simulator clock forward (token, code and subscription expiry; late Sent Items).
    pub fn advance_clock(&self, by: StdDuration) {
        let mut st = self.lock();
        st.clock_offset += chrono::Duration::from_std(by).unwrap_or_default();
        st.materialize_pending();
        drop(st);
        self.wake();
    }

    /// Tokens without the browser flow. Scopes as in the authorize request
    /// (`offline_access` yields a refresh token, `openid` an id_token).
    pub fn issue_tokens_for(&self, user: impl AsUser, scopes: &[&str]) -> TokenResponse {
        let mut st = self.lock();
        let uid = st
            .user(&user.user_key())
            .expect("graph-sim: issue_tokens_for")
            .user
            .id
            .clone();
        let scopes = State::normalize_scopes(&scopes.join(" "));
        st.issue_tokens(&uid, &scopes, None)
    }

    /// Drops every delta token of the user's folders (next delta round with a token → 410).
    pub fn evict_delta_tokens(&self, user: impl AsUser) {
        let mut st = self.lock();
        if let Ok(u) = st.user_mut(&user.user_key()) {
            u.mailbox.delta.clear();
        }
    }

    /// Sends a lifecycle event to the subscription's lifecycleNotificationUrl.
    /// `subscriptionRemoved` also deletes the subscription. False if unknown or no lifecycle URL.
    pub fn fire_lifecycle_event(&self, subscription_id: &str, event: LifecycleEvent) -> bool {
        let ok = self.lock().lifecycle(subscription_id, event);
        self.wake();
        ok
    }

    /// Live subscriptions (expired ones are gone, as in Graph).
    pub fn subscriptions(&self) -> Vec<SimSubscription> {
        let mut st = self.lock();
        st.drop_expired_subscriptions();
        st.subs
            .values()
            .map(|s| SimSubscription {
                id: s.id.clone(),
                user_id: s.user_id.clone(),
                resource: s.resource.clone(),
                change_type: s.change_type.clone(),
                notification_url: s.notification_url.clone(),
                lifecycle_notification_url: s.lifecycle_url.clone(),
                client_state: s.client_state.clone(),
                expiration: s.expiration,
            })
            .collect()
    }

    pub fn notifications(&self) -> Vec<NotificationRecord> {
        self.lock().notifications.clone()
    }

    pub fn stats(&self) -> SimStats {
        self.lock().stats()
    }

    pub fn request_log(&self) -> Vec<LogEntry> {
        self.lock().log.iter().cloned().collect()
    }

    /// Every send: draft id, internetMessageId, subject, recipients, Sent Items id, time.
    pub fn sends(&self) -> Vec<SentRecord> {
        self.lock().sends.clone()
    }

    /// Fills a mailbox with realistic threaded mail (deterministic per seed).
    pub fn generate_mailbox(&self, user: impl AsUser, spec: GeneratorSpec) -> GeneratedSummary {
        let key = user.user_key();
        let owner = self
            .user(key.as_str())
            .expect("graph-sim: generate_mailbox");
        let r = generator::generate(self, &owner, &spec);
        self.wake();
        r
    }

    /// Stops the server and background delivery.
    pub async fn shutdown(self) {
        let tx = self
            .inner
            .shutdown_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
        let tasks: Vec<_> = std::mem::take(&mut *lock_tasks(&self.inner));
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(StdDuration::from_secs(2), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

fn lock_tasks(inner: &Inner) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
    inner.tasks.lock().unwrap_or_else(|e| e.into_inner())
}
