//! Public value types exchanged with the simulator (Rust API and `/_sim` JSON API).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `{ name, address }` as Graph spells it inside `emailAddress`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailAddress {
    #[serde(default)]
    pub name: String,
    pub address: String,
}

impl EmailAddress {
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            address: address.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageHeader {
    pub name: String,
    pub value: String,
}

impl MessageHeader {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimTenant {
    pub id: String,
    pub domain: String,
    pub display_name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimUser {
    pub id: String,
    pub upn: String,
    pub mail: Option<String>,
    pub display_name: String,
    pub tenant_id: String,
    /// Shared mailboxes cannot sign in; other users reach them with `.Shared` scopes once granted.
    pub shared: bool,
}

/// Anything that names a tenant: its id, its domain, or the tenant itself.
pub trait AsTenant {
    fn tenant_key(&self) -> String;
}
impl AsTenant for &str {
    fn tenant_key(&self) -> String {
        (*self).to_string()
    }
}
impl AsTenant for String {
    fn tenant_key(&self) -> String {
        self.clone()
    }
}
impl AsTenant for &String {
    fn tenant_key(&self) -> String {
        (*self).clone()
    }
}
impl AsTenant for SimTenant {
    fn tenant_key(&self) -> String {
        self.id.clone()
    }
}
impl AsTenant for &SimTenant {
    fn tenant_key(&self) -> String {
        self.id.clone()
    }
}

/// Anything that names a user: object id, UPN, mail address, or the user itself.
pub trait AsUser {
    fn user_key(&self) -> String;
}
impl AsUser for &str {
    fn user_key(&self) -> String {
        (*self).to_string()
    }
}
impl AsUser for String {
    fn user_key(&self) -> String {
        self.clone()
    }
}
impl AsUser for &String {
    fn user_key(&self) -> String {
        (*self).clone()
    }
}
impl AsUser for SimUser {
    fn user_key(&self) -> String {
        self.id.clone()
    }
}
impl AsUser for &SimUser {
    fn user_key(&self) -> String {
        self.id.clone()
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InboundAttachment {
    pub name: String,
    pub content_type: String,
    /// Base64 (standard alphabet), exactly what Graph returns as `contentBytes`.
    pub content_bytes: String,
    pub is_inline: bool,
    pub content_id: Option<String>,
}

impl InboundAttachment {
    pub fn file(name: impl Into<String>, content_type: impl Into<String>, bytes: &[u8]) -> Self {
        Self {
            name: name.into(),
            content_type: content_type.into(),
            content_bytes: STANDARD.encode(bytes),
            is_inline: false,
            content_id: None,
        }
    }
}

/// A message arriving from the internet. Unset fields get plausible defaults on delivery.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InboundMail {
    pub from: EmailAddress,
    /// Defaults to the mailbox owner.
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub reply_to: Vec<EmailAddress>,
    pub subject: String,
    pub text_body: Option<String>,
    pub html_body: Option<String>,
    /// `Message-ID` header (with angle brackets); generated when absent.
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    /// Any further raw headers (Auto-Submitted, X-Auto-Response-Suppress, Precedence, ...).
    pub headers: Vec<MessageHeader>,
    /// Forces the Graph `conversationId`; otherwise derived from In-Reply-To/References.
    pub conversation_id: Option<String>,
    pub received: Option<DateTime<Utc>>,
    pub attachments: Vec<InboundAttachment>,
    /// Well-known name or folder id; default `inbox`.
    pub folder: Option<String>,
    pub is_read: bool,
}

impl InboundMail {
    pub fn new(from: impl Into<String>, subject: impl Into<String>) -> Self {
        Self {
            from: EmailAddress::new("", from),
            subject: subject.into(),
            ..Self::default()
        }
    }
    pub fn from_name(mut self, name: impl Into<String>) -> Self {
        self.from.name = name.into();
        self
    }
    pub fn text(mut self, body: impl Into<String>) -> Self {
        self.text_body = Some(body.into());
        self
    }
    pub fn html(mut self, body: impl Into<String>) -> Self {
        self.html_body = Some(body.into());
        self
    }
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }
    pub fn in_reply_to(mut self, id: impl Into<String>) -> Self {
        self.in_reply_to = Some(id.into());
        self
    }
    pub fn references<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ids: I) -> Self {
        self.references = ids.into_iter().map(Into::into).collect();
        self
    }
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(MessageHeader::new(name, value));
        self
    }
    pub fn conversation(mut self, id: impl Into<String>) -> Self {
        self.conversation_id = Some(id.into());
        self
    }
    pub fn received_at(mut self, at: DateTime<Utc>) -> Self {
        self.received = Some(at);
        self
    }
    pub fn to(mut self, address: impl Into<String>) -> Self {
        self.to.push(EmailAddress::new("", address));
        self
    }
    pub fn cc(mut self, address: impl Into<String>) -> Self {
        self.cc.push(EmailAddress::new("", address));
        self
    }
    pub fn attachment(mut self, attachment: InboundAttachment) -> Self {
        self.attachments.push(attachment);
        self
    }
    pub fn into_folder(mut self, folder: impl Into<String>) -> Self {
        self.folder = Some(folder.into());
        self
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveredMessage {
    /// The regular (move-sensitive) Graph id.
    pub id: String,
    pub immutable_id: String,
    pub internet_message_id: String,
    pub conversation_id: String,
    pub folder_id: String,
}

/// Id pair of a message after a move.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MessageRef {
    pub id: String,
    pub immutable_id: String,
    pub folder_id: String,
}

/// Read-only view of a stored message for assertions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimMessage {
    pub id: String,
    pub immutable_id: String,
    pub folder_id: String,
    pub folder: String,
    pub internet_message_id: String,
    pub conversation_id: String,
    pub subject: String,
    pub from: Option<EmailAddress>,
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub body_content_type: String,
    pub body: String,
    pub is_draft: bool,
    pub is_read: bool,
    pub received: DateTime<Utc>,
    pub sent: Option<DateTime<Utc>>,
    pub headers: Vec<MessageHeader>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub attachment_names: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(transparent)]
pub struct FaultId(pub u64);

/// What an injected fault does. JSON form: `{"type": "too_many_requests", "retry_after": "2.5"}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FaultKind {
    /// 429 TooManyRequests; `retry_after` is sent verbatim ("3", "2.128"), or omitted.
    TooManyRequests {
        #[serde(default)]
        retry_after: Option<String>,
    },
    /// 503 serviceNotAvailable, with or without Retry-After.
    ServiceUnavailable {
        #[serde(default)]
        retry_after: Option<String>,
    },
    /// 504 with an empty-ish gateway body.
    GatewayTimeout,
    /// 401 InvalidAuthenticationToken regardless of the token.
    InvalidAuthenticationToken,
    /// Close the connection without writing a response.
    ConnectionReset,
    /// Hold the request (inside the mailbox concurrency window) before answering.
    Delay { millis: u64 },
    /// 410 SyncStateNotFound on delta requests that carry a skip or delta token.
    DeltaEviction,
    /// Token endpoint answers as AAD does for this AADSTS code (70008, 700082, 50173, 65001, 50076, ...).
    TokenError { aadsts: u32 },
    /// Token endpoint: 401 invalid_client (AADSTS7000222, expired secret).
    InvalidClient,
    /// The authorize endpoint redirects back with this error.
    AuthorizeError { error: String, description: String },
    /// Sent Items copies of sends matched by this rule appear only after this delay.
    SentItemsDelay { millis: u64 },
    /// Subscription creation fails as if the validation request timed out.
    SubscriptionValidationTimeout,
    /// Delta pages carry every item twice (the contract: tolerate replays and duplicates).
    ReplayDeltaItems,
    /// Graph's error body with this status, code and message (e.g. a 400 a test needs that no
    /// modelled state produces).
    GraphError {
        status: u16,
        code: String,
        message: String,
    },
}

/// A switchable fault: which requests it hits, and how often.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FaultRule {
    pub kind: FaultKind,
    /// Mailbox (id, UPN or address) whose requests are hit; `None` = all.
    #[serde(default)]
    pub mailbox: Option<String>,
    /// Substring of `path?query` (e.g. `/messages/delta`, `/oauth2/v2.0/token`).
    #[serde(default)]
    pub path_contains: Option<String>,
    /// HTTP method, case-insensitive.
    #[serde(default)]
    pub method: Option<String>,
    /// Fire this many times, then retire. `None` = unlimited.
    #[serde(default)]
    pub count: Option<u32>,
    /// Chance per matching request (0..=1). `None` = always.
    #[serde(default)]
    pub probability: Option<f64>,
}

impl FaultRule {
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            mailbox: None,
            path_contains: None,
            method: None,
            count: None,
            probability: None,
        }
    }
    pub fn mailbox(mut self, mailbox: impl Into<String>) -> Self {
        self.mailbox = Some(mailbox.into());
        self
    }
    pub fn path(mut self, substring: impl Into<String>) -> Self {
        self.path_contains = Some(substring.into());
        self
    }
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into());
        self
    }
    pub fn times(mut self, count: u32) -> Self {
        self.count = Some(count);
        self
    }
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = Some(p);
        self
    }
}

/// The token endpoint's success body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token_type: String,
    pub expires_in: u64,
    pub ext_expires_in: u64,
    pub scope: String,
    pub access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

/// One outbound message (send of a draft, reply, or sendMail).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SentRecord {
    pub user_id: String,
    pub user_upn: String,
    /// `send` (draft sent), `reply`, `replyAll`, `forward` (one-shot) or `sendMail`.
    pub kind: String,
    pub draft_id: Option<String>,
    pub draft_immutable_id: Option<String>,
    pub internet_message_id: String,
    pub conversation_id: String,
    pub subject: String,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub body: String,
    /// Plain id of the Sent Items copy (None when saveToSentItems=false).
    pub sent_message_id: Option<String>,
    pub sent_immutable_id: Option<String>,
    pub sent_at: DateTime<Utc>,
    /// When the Sent Items copy becomes visible (late copies).
    pub sent_items_visible_at: Option<DateTime<Utc>>,
}

/// One handled request, as the simulator saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    pub time: DateTime<Utc>,
    pub method: String,
    pub path: String,
    pub query: String,
    /// Route template, e.g. `GET /me/mailFolders/{id}/messages` (`/users/{id}` folds into `/me`).
    pub route: String,
    /// 0 = connection reset by fault.
    pub status: u16,
    pub mailbox: Option<String>,
    pub request_id: String,
    pub client_request_id: Option<String>,
    pub duration_ms: u64,
    pub grant_type: Option<String>,
    pub in_batch: bool,
    pub error_code: Option<String>,
}

/// One POST the simulator made to a subscriber.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NotificationRecord {
    pub subscription_id: String,
    pub url: String,
    /// `None` when the request failed at the transport level or was not answered in time
    /// (`SimConfig::notification_timeout_ms`).
    pub status: Option<u16>,
    pub items: usize,
    pub lifecycle_event: Option<String>,
    pub change_types: Vec<String>,
    pub time: DateTime<Utc>,
    pub attempt: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimSubscription {
    pub id: String,
    pub user_id: String,
    pub resource: String,
    pub change_type: String,
    pub notification_url: String,
    pub lifecycle_notification_url: Option<String>,
    pub client_state: Option<String>,
    pub expiration: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum LifecycleEvent {
    ReauthorizationRequired,
    SubscriptionRemoved,
    Missed,
}

impl LifecycleEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReauthorizationRequired => "reauthorizationRequired",
            Self::SubscriptionRemoved => "subscriptionRemoved",
            Self::Missed => "missed",
        }
    }
}

/// Figures derived from the request log.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SimStats {
    pub total_requests: u64,
    /// route template -> status -> count.
    pub by_route: BTreeMap<String, BTreeMap<u16, u64>>,
    pub by_status: BTreeMap<u16, u64>,
    /// mailbox UPN -> highest number of simultaneous requests seen (rejected ones included).
    pub max_concurrency: BTreeMap<String, usize>,
    /// `authorization_code`, `refresh_token`, ... -> token endpoint requests.
    pub token_requests_by_grant: BTreeMap<String, u64>,
    pub throttled: u64,
    pub sends: usize,
    pub notifications_sent: u64,
    pub connection_resets: u64,
}

impl SimStats {
    /// Requests on a route template, any status.
    pub fn route(&self, route: &str) -> u64 {
        self.by_route
            .get(route)
            .map(|m| m.values().sum())
            .unwrap_or(0)
    }
    pub fn route_status(&self, route: &str, status: u16) -> u64 {
        self.by_route
            .get(route)
            .and_then(|m| m.get(&status))
            .copied()
            .unwrap_or(0)
    }
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
    /// By UPN (case-insensitive) or id-less lookup.
    pub fn max_concurrency_for(&self, upn: &str) -> usize {
        self.max_concurrency
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(upn))
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
    pub fn token_requests(&self, grant_type: &str) -> u64 {
        self.token_requests_by_grant
            .get(grant_type)
            .copied()
            .unwrap_or(0)
    }
}

/// Realistic mailbox generator input. Deterministic for a given seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct GeneratorSpec {
    pub seed: u64,
    /// Exact number of messages delivered.
    pub messages: usize,
    /// Share of follow-ups that are auto-replies (Auto-Submitted etc.).
    pub auto_reply_ratio: f64,
    /// Share of follow-ups sent without In-Reply-To/References.
    pub headerless_reply_ratio: f64,
    /// Share of threads that are forwards (new thread, "FW:"-style subject).
    pub forward_ratio: f64,
    /// Mean messages per thread (>= 1).
    pub mean_thread_length: f64,
    /// Mail spreads over this many days up to now.
    pub days: u32,
    pub folder: Option<String>,
}

impl Default for GeneratorSpec {
    fn default() -> Self {
        Self {
            seed: 1,
            messages: 100,
            auto_reply_ratio: 0.08,
            headerless_reply_ratio: 0.05,
            forward_ratio: 0.05,
            mean_thread_length: 2.5,
            days: 14,
            folder: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GeneratedThread {
    pub subject: String,
    pub conversation_id: String,
    /// `original` or `forward`.
    pub kind: String,
    pub locale: String,
    pub internet_message_ids: Vec<String>,
    pub auto_replies: usize,
    pub headerless_replies: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GeneratedSummary {
    /// Distinct threads (= expected tickets). Auto-replies and headerless replies sit inside
    /// their thread; each forward starts its own.
    pub threads: usize,
    pub messages: usize,
    pub auto_replies: usize,
    pub headerless_replies: usize,
    pub forwards: usize,
    /// Replies that carry In-Reply-To/References.
    pub threaded_replies: usize,
    pub thread_details: Vec<GeneratedThread>,
}
