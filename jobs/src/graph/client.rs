//! The Microsoft Graph client: one shared `reqwest::Client`, retries that honour Retry-After,
//! one token refresh on 401, ImmutableId on every request, and typed mail operations.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{Instrument as _, debug, info_span, instrument, warn};
use url::Url;

use super::auth::{AccessTokenSource, NoGate, RequestGate};
use super::error::{GraphError, TokenSourceError, parse_retry_after};
use super::types::{
    AttachmentInfo, DeltaChange, DeltaNext, DeltaPage, MailFolder, MailboxProbe, Message,
    MessagePatch, NewSubscription, OutgoingMessage, Page, RawDeltaPage, ReplyContent, Subscription,
    User,
};
use crate::ids::{InternetMessageId, MicrosoftMessageId};

/// Microsoft's production Graph endpoint (`GRAPH_BASE_URL` overrides it).
pub const DEFAULT_GRAPH_BASE_URL: &str = "https://graph.microsoft.com/v1.0";

const PREFER_IMMUTABLE_ID: &str = "IdType=\"ImmutableId\"";
const PREFER_HTML_BODY: &str = "outlook.body-content-type=\"html\"";
const CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("client-request-id");
const RETURN_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("return-client-request-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
const PREFER: HeaderName = HeaderName::from_static("prefer");

/// Fields read for a full message (ticket ingest). `internetMessageHeaders` is only returned
/// when selected, and threading needs In-Reply-To / References from it.
pub const MESSAGE_SELECT: &[&str] = &[
    "id",
    "internetMessageId",
    "conversationId",
    "conversationIndex",
    "subject",
    "bodyPreview",
    "body",
    "from",
    "sender",
    "toRecipients",
    "ccRecipients",
    "replyTo",
    "receivedDateTime",
    "sentDateTime",
    "createdDateTime",
    "lastModifiedDateTime",
    "hasAttachments",
    "isRead",
    "isDraft",
    "parentFolderId",
    "changeKey",
    "internetMessageHeaders",
];

/// Fields requested on the first delta request of a round (Graph carries them in the links).
pub const DELTA_SELECT: &[&str] = &[
    "id",
    "internetMessageId",
    "conversationId",
    "subject",
    "bodyPreview",
    "body",
    "from",
    "sender",
    "toRecipients",
    "ccRecipients",
    "replyTo",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "isRead",
    "isDraft",
    "parentFolderId",
];

/// Retry behaviour for 429/503/504 and transport failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total tries of one logical request (the extra try after a 401 refresh is not counted).
    pub max_attempts: u32,
    /// First backoff when the server gives no Retry-After; doubles per attempt, with jitter.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// A Retry-After (or backoff) longer than this is not slept in the worker: the call fails
    /// with `Throttled`/`Unavailable` and the job is rescheduled instead of holding a slot.
    pub max_inline_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            // Microsoft's SDKs start at 3 s when Graph gives no Retry-After.
            base_backoff: Duration::from_secs(3),
            max_backoff: Duration::from_secs(30),
            max_inline_wait: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Backoff before try `attempt + 1` (1-based `attempt`): `base * 2^(attempt-1)`, capped,
    /// plus up to 25 % jitter so that workers throttled together do not return together.
    #[must_use]
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let capped = exp.min(self.max_backoff);
        let jitter = rand::rng().random_range(0.0..=0.25);
        capped.mul_f64(1.0 + jitter)
    }
}

/// Where Graph lives and how hard to retry.
#[derive(Debug, Clone)]
pub struct GraphConfig {
    base_url: Url,
    pub retry: RetryPolicy,
}

/// The configured base URL is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid base URL `{url}`: {reason}")]
pub struct BaseUrlError {
    pub url: String,
    pub reason: &'static str,
}

pub(crate) fn parse_base_url(raw: &str) -> Result<Url, BaseUrlError> {
    let err = |reason| BaseUrlError {
        url: raw.chars().take(200).collect(),
        reason,
    };
    let url = Url::parse(raw.trim().trim_end_matches('/')).map_err(|_| err("not a URL"))?;
    if !matches!(url.scheme(), "https" | "http") || url.cannot_be_a_base() {
        return Err(err("must be an http(s) URL"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(err("must not have a query, fragment or credentials"));
    }
    Ok(url)
}

impl GraphConfig {
    /// `base_url` is e.g. `https://graph.microsoft.com/v1.0` (a trailing `/` is ignored).
    pub fn new(base_url: &str) -> Result<Self, BaseUrlError> {
        Ok(Self {
            base_url: parse_base_url(base_url)?,
            retry: RetryPolicy::default(),
        })
    }

    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    #[must_use]
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }
}

impl Default for GraphConfig {
    fn default() -> Self {
        Self::new(DEFAULT_GRAPH_BASE_URL).expect("the default Graph URL is valid")
    }
}

/// Whose mailbox the `/me/...`-style calls address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Mailbox {
    /// The signed-in user (`/me`).
    Me,
    /// Another mailbox the user may open, e.g. a shared mailbox (`/users/{address}`).
    User(String),
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Me => f.write_str("me"),
            Self::User(u) => write!(f, "users/{u}"),
        }
    }
}

/// Folders addressable by their well-known name instead of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WellKnownFolder {
    Inbox,
    Drafts,
    SentItems,
    DeletedItems,
    JunkEmail,
    Archive,
    MsgFolderRoot,
}

impl WellKnownFolder {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Inbox => "inbox",
            Self::Drafts => "drafts",
            Self::SentItems => "sentitems",
            Self::DeletedItems => "deleteditems",
            Self::JunkEmail => "junkemail",
            Self::Archive => "archive",
            Self::MsgFolderRoot => "msgfolderroot",
        }
    }
}

/// A folder, by well-known name or by Graph id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FolderRef {
    WellKnown(WellKnownFolder),
    Id(String),
}

impl FolderRef {
    fn segment(&self) -> &str {
        match self {
            Self::WellKnown(w) => w.as_str(),
            Self::Id(id) => id,
        }
    }
}

impl From<WellKnownFolder> for FolderRef {
    fn from(value: WellKnownFolder) -> Self {
        Self::WellKnown(value)
    }
}

impl fmt::Display for FolderRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

/// Options of a message listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListMessagesQuery {
    /// Empty = Graph's default property set.
    pub select: Vec<String>,
    /// 1–1000; Graph's default page is 10.
    pub top: Option<u32>,
    /// OData `$filter`, verbatim (properties in `orderby` must also lead the filter).
    pub filter: Option<String>,
    pub orderby: Option<String>,
}

/// Options of the first request of a delta round (later requests follow links verbatim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaOptions {
    pub select: Vec<String>,
    /// Sent as `Prefer: odata.maxpagesize=N` on every page.
    pub max_page_size: Option<u32>,
    /// `$filter=receivedDateTime ge …` (Graph caps such a round at 5,000 messages).
    pub received_since: Option<chrono::DateTime<chrono::Utc>>,
}

impl Default for DeltaOptions {
    fn default() -> Self {
        Self {
            select: DELTA_SELECT.iter().map(|s| (*s).to_owned()).collect(),
            max_page_size: Some(50),
            received_since: None,
        }
    }
}

/// A Microsoft Graph client for one mailbox. Cheap to clone: everything is shared.
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    config: Arc<GraphConfig>,
    tokens: Arc<dyn AccessTokenSource>,
    gate: Arc<dyn RequestGate>,
    mailbox: Mailbox,
}

impl fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GraphClient")
            .field("base_url", &self.config.base_url.as_str())
            .field("mailbox", &self.mailbox)
            .finish_non_exhaustive()
    }
}

struct Call<'a> {
    op: &'static str,
    method: Method,
    url: Url,
    body: Option<Vec<u8>>,
    prefer: &'a [&'a str],
    /// Safe to repeat after an unknown outcome (GET, PATCH, DELETE). POSTs that create or send
    /// are not: after a gateway timeout or a broken connection they are not repeated here.
    idempotent: bool,
}

struct Success {
    status: StatusCode,
    body: Vec<u8>,
}

impl GraphClient {
    /// `http` should come from [`super::build_http_client`] (redirects off, timeouts set) and
    /// be shared by every client in the process.
    pub fn new(
        http: reqwest::Client,
        config: Arc<GraphConfig>,
        tokens: Arc<dyn AccessTokenSource>,
    ) -> Self {
        Self {
            http,
            config,
            tokens,
            gate: Arc::new(NoGate),
            mailbox: Mailbox::Me,
        }
    }

    /// Routes every request through `gate` (per-mailbox concurrency and budget).
    #[must_use]
    pub fn with_gate(mut self, gate: Arc<dyn RequestGate>) -> Self {
        self.gate = gate;
        self
    }

    /// The same client addressing another mailbox (`/users/{address}/...`).
    #[must_use]
    pub fn for_mailbox(&self, mailbox: Mailbox) -> Self {
        Self {
            mailbox,
            ..self.clone()
        }
    }

    #[must_use]
    pub fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    #[must_use]
    pub fn config(&self) -> &GraphConfig {
        &self.config
    }

    // ---- URLs -------------------------------------------------------------------------------

    fn root_url(&self, segments: &[&str]) -> Url {
        let mut url = self.config.base_url.clone();
        url.path_segments_mut()
            .expect("base URL was checked to be a base")
            .pop_if_empty()
            .extend(segments);
        url
    }

    fn mailbox_url(&self, segments: &[&str]) -> Url {
        let mut all: Vec<&str> = match &self.mailbox {
            Mailbox::Me => vec!["me"],
            Mailbox::User(u) => vec!["users", u.as_str()],
        };
        all.extend_from_slice(segments);
        self.root_url(&all)
    }

    /// Only links under the configured base URL receive the bearer token.
    fn trusted_link(&self, link: &str) -> Result<Url, GraphError> {
        let url = Url::parse(link).map_err(|_| GraphError::UntrustedLink {
            origin: "unparseable link".into(),
        })?;
        let base = &self.config.base_url;
        let same_origin = url.origin() == base.origin();
        let base_path = base.path().trim_end_matches('/');
        let under_base = url.path() == base_path
            || url
                .path()
                .strip_prefix(base_path)
                .is_some_and(|rest| rest.starts_with('/'));
        if same_origin && under_base {
            Ok(url)
        } else {
            Err(GraphError::UntrustedLink {
                origin: url.origin().ascii_serialization(),
            })
        }
    }

    // ---- the request engine -----------------------------------------------------------------

    async fn execute(&self, call: Call<'_>) -> Result<Success, GraphError> {
        let client_request_id = uuid::Uuid::new_v4().to_string();
        let span = info_span!(
            "graph_request",
            op = call.op,
            method = %call.method,
            path = call.url.path(),
            client_request_id = %client_request_id,
        );
        self.execute_inner(call, client_request_id)
            .instrument(span)
            .await
    }

    async fn execute_inner(
        &self,
        call: Call<'_>,
        client_request_id: String,
    ) -> Result<Success, GraphError> {
        let policy = &self.config.retry;
        let prefer = prefer_header(call.prefer);
        let mut token = self
            .tokens
            .access_token()
            .await
            .map_err(GraphError::Token)?;
        let mut refreshed = false;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let permit = self.gate.acquire().await.map_err(GraphError::Gate)?;
            let outcome = self
                .send_once(&call, &token, &prefer, &client_request_id)
                .await;
            drop(permit);
            let (status, headers, body) = match outcome {
                Ok(parts) => parts,
                Err((err, maybe_sent)) => {
                    count_response(call.op, "transport", "");
                    let may_repeat = call.idempotent || !maybe_sent;
                    let delay = policy.backoff(attempt);
                    if may_repeat
                        && attempt < policy.max_attempts
                        && delay <= policy.max_inline_wait
                    {
                        warn!(attempt, delay_ms = delay.as_millis() as u64, error = %err, "graph transport failure; retrying");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    return Err(GraphError::Transport {
                        operation: call.op,
                        message: err,
                        maybe_sent,
                    });
                }
            };
            let request_id = headers
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if status.is_success() {
                count_response(call.op, status.as_str(), "");
                debug!(
                    attempt,
                    status = status.as_u16(),
                    request_id,
                    "graph request done"
                );
                return Ok(Success { status, body });
            }
            let retry_after = headers.get(header::RETRY_AFTER).and_then(parse_retry_after);
            let err = GraphError::from_response(status, &body, request_id.clone(), retry_after);
            count_response(call.op, status.as_str(), err.code().unwrap_or(""));
            if status == StatusCode::TOO_MANY_REQUESTS {
                metrics::counter!("graphdesk_graph_throttled_total").increment(1);
            }

            if matches!(err, GraphError::Unauthorized { .. }) && !refreshed {
                refreshed = true;
                // The extra try after a refresh is not counted: it is bounded by `refreshed`.
                attempt -= 1;
                warn!(
                    request_id,
                    "graph rejected the access token; refreshing once"
                );
                token = self
                    .tokens
                    .force_refresh(&token)
                    .await
                    .map_err(GraphError::Token)?;
                continue;
            }

            let retryable_status = matches!(status.as_u16(), 429 | 503)
                || (status == StatusCode::GATEWAY_TIMEOUT && call.idempotent);
            if !retryable_status || attempt >= policy.max_attempts {
                return Err(err);
            }
            let delay = retry_after.unwrap_or_else(|| policy.backoff(attempt));
            if delay > policy.max_inline_wait {
                // Holding a worker for minutes helps nobody: hand the wait to the scheduler.
                warn!(
                    attempt,
                    status = status.as_u16(),
                    wait_ms = delay.as_millis() as u64,
                    request_id,
                    "graph asked for a long wait; deferring"
                );
                return Err(err);
            }
            warn!(
                attempt,
                status = status.as_u16(),
                delay_ms = delay.as_millis() as u64,
                from_retry_after = retry_after.is_some(),
                request_id,
                "graph throttled or unavailable; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One HTTP exchange. Errors carry whether the request may have reached the server.
    async fn send_once(
        &self,
        call: &Call<'_>,
        token: &SecretString,
        prefer: &HeaderValue,
        client_request_id: &str,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), (String, bool)> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
            .map_err(|_| {
                (
                    "the access token is not a valid header value".to_owned(),
                    false,
                )
            })?;
        auth.set_sensitive(true);
        let mut req = self
            .http
            .request(call.method.clone(), call.url.clone())
            .header(header::AUTHORIZATION, auth)
            .header(PREFER, prefer.clone())
            .header(header::ACCEPT, "application/json")
            .header(CLIENT_REQUEST_ID, client_request_id)
            .header(RETURN_CLIENT_REQUEST_ID, "true");
        req = match &call.body {
            Some(body) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone()),
            // Graph's send endpoints want an explicit empty body on POST.
            None if call.method == Method::POST => {
                req.header(header::CONTENT_LENGTH, "0").body(Vec::new())
            }
            None => req,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| (transport_message(&e), !e.is_connect()))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| (transport_message(&e), true))?;
        Ok((status, headers, body.to_vec()))
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        op: &'static str,
        url: Url,
        prefer: &[&str],
    ) -> Result<T, GraphError> {
        let ok = self
            .execute(Call {
                op,
                method: Method::GET,
                url,
                body: None,
                prefer,
                idempotent: true,
            })
            .await?;
        decode(op, &ok.body)
    }

    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: &B,
        idempotent: bool,
    ) -> Result<T, GraphError> {
        let ok = self
            .execute(Call {
                op,
                method,
                url,
                body: Some(encode(op, body)?),
                prefer: &[],
                idempotent,
            })
            .await?;
        decode(op, &ok.body)
    }

    async fn send_no_content(
        &self,
        op: &'static str,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        idempotent: bool,
    ) -> Result<StatusCode, GraphError> {
        let ok = self
            .execute(Call {
                op,
                method,
                url,
                body,
                prefer: &[],
                idempotent,
            })
            .await?;
        Ok(ok.status)
    }

    // ---- typed operations -------------------------------------------------------------------

    /// `GET /me` (always the signed-in user, whatever mailbox this client addresses).
    #[instrument(skip_all)]
    pub async fn get_me(&self) -> Result<User, GraphError> {
        self.get_json("get_me", self.root_url(&["me"]), &[]).await
    }

    /// `GET {mailbox}/mailFolders` (root children, hidden ones included). Follow
    /// [`Page::next_link`] with [`GraphClient::next_page`].
    #[instrument(skip_all, fields(mailbox = %self.mailbox))]
    pub async fn list_mail_folders(&self) -> Result<Page<MailFolder>, GraphError> {
        let mut url = self.mailbox_url(&["mailFolders"]);
        set_query(&mut url, &[("includeHiddenFolders", "true".into())]);
        self.get_json("list_mail_folders", url, &[]).await
    }

    /// `GET {mailbox}/mailFolders/{id|well-known name}`.
    #[instrument(skip_all, fields(mailbox = %self.mailbox, folder = %folder))]
    pub async fn get_folder(&self, folder: &FolderRef) -> Result<MailFolder, GraphError> {
        let url = self.mailbox_url(&["mailFolders", folder.segment()]);
        self.get_json("get_folder", url, &[]).await
    }

    /// `GET {mailbox}/mailFolders/{folder}/messages` with `$select/$top/$filter/$orderby`.
    #[instrument(skip_all, fields(mailbox = %self.mailbox, folder = %folder))]
    pub async fn list_messages(
        &self,
        folder: &FolderRef,
        query: &ListMessagesQuery,
    ) -> Result<Page<Message>, GraphError> {
        let mut url = self.mailbox_url(&["mailFolders", folder.segment(), "messages"]);
        let mut pairs = Vec::new();
        if !query.select.is_empty() {
            pairs.push(("$select", query.select.join(",")));
        }
        if let Some(top) = query.top {
            pairs.push(("$top", top.clamp(1, 1000).to_string()));
        }
        if let Some(filter) = &query.filter {
            pairs.push(("$filter", filter.clone()));
        }
        if let Some(orderby) = &query.orderby {
            pairs.push(("$orderby", orderby.clone()));
        }
        set_query(&mut url, &pairs);
        self.get_json("list_messages", url, &[PREFER_HTML_BODY])
            .await
    }

    /// Follows an `@odata.nextLink` verbatim (it must point under the configured base URL).
    #[instrument(skip_all)]
    pub async fn next_page<T: DeserializeOwned>(&self, link: &str) -> Result<Page<T>, GraphError> {
        let url = self.trusted_link(link)?;
        self.get_json("next_page", url, &[PREFER_HTML_BODY]).await
    }

    /// One delta page: the first of a new round when `link` is `None` (full initial sync), else
    /// the page at a stored nextLink/deltaLink, followed verbatim.
    #[instrument(skip_all, fields(mailbox = %self.mailbox, folder = %folder, initial = link.is_none()))]
    pub async fn delta_page(
        &self,
        folder: &FolderRef,
        link: Option<&str>,
        options: &DeltaOptions,
    ) -> Result<DeltaPage, GraphError> {
        let url = match link {
            Some(link) => self.trusted_link(link)?,
            None => {
                let mut url =
                    self.mailbox_url(&["mailFolders", folder.segment(), "messages", "delta"]);
                let mut pairs = Vec::new();
                if !options.select.is_empty() {
                    pairs.push(("$select", options.select.join(",")));
                }
                if let Some(since) = options.received_since {
                    pairs.push((
                        "$filter",
                        format!(
                            "receivedDateTime ge {}",
                            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                    ));
                }
                set_query(&mut url, &pairs);
                url
            }
        };
        let page_size = options
            .max_page_size
            .map(|n| format!("odata.maxpagesize={}", n.max(1)));
        let mut prefer = vec![PREFER_HTML_BODY];
        if let Some(p) = &page_size {
            prefer.push(p);
        }
        let raw: RawDeltaPage = self.get_json("delta_page", url, &prefer).await?;
        let next = match (raw.next_link, raw.delta_link) {
            (Some(next), _) => DeltaNext::NextLink(next),
            (None, Some(delta)) => DeltaNext::DeltaLink(delta),
            (None, None) => {
                return Err(GraphError::Decode {
                    operation: "delta_page",
                    message: "page has neither @odata.nextLink nor @odata.deltaLink".into(),
                });
            }
        };
        let changes = raw
            .value
            .into_iter()
            .map(|item| match item.removed {
                Some(removed) => DeltaChange::Removed {
                    id: item.message.id,
                    reason: removed.reason.unwrap_or_else(|| "deleted".into()),
                },
                None => DeltaChange::Upsert(item.message),
            })
            .collect();
        Ok(DeltaPage { changes, next })
    }

    /// Iterates one delta round page by page, from `link` (or a fresh initial sync) to the
    /// deltaLink.
    #[must_use]
    pub fn delta_round(
        &self,
        folder: FolderRef,
        link: Option<String>,
        options: DeltaOptions,
    ) -> DeltaRound {
        DeltaRound {
            client: self.clone(),
            folder,
            options,
            state: DeltaRoundState::Pending(link),
        }
    }

    /// `GET {mailbox}/messages/{id}` with the full [`MESSAGE_SELECT`] (incl. headers), HTML body.
    #[instrument(skip_all, fields(mailbox = %self.mailbox))]
    pub async fn get_message(&self, id: &MicrosoftMessageId) -> Result<Message, GraphError> {
        let mut url = self.mailbox_url(&["messages", id.as_str()]);
        set_query(&mut url, &[("$select", MESSAGE_SELECT.join(","))]);
        self.get_json("get_message", url, &[PREFER_HTML_BODY]).await
    }

    /// `GET {mailbox}/messages/{id}/attachments`, metadata only (no `contentBytes`). `contentId`
    /// (what a body's `cid:` URLs name) exists only on file attachments: named bare in `$select`
    /// Graph refuses the whole request (400, no property `contentId` on `microsoft.graph.attachment`),
    /// so it is selected through the OData type cast and comes back on file attachments only.
    #[instrument(skip_all, fields(mailbox = %self.mailbox))]
    pub async fn list_attachments(
        &self,
        id: &MicrosoftMessageId,
    ) -> Result<Vec<AttachmentInfo>, GraphError> {
        let mut url = self.mailbox_url(&["messages", id.as_str(), "attachments"]);
        set_query(
            &mut url,
            &[(
                "$select",
                "id,name,contentType,size,isInline,microsoft.graph.fileAttachment/contentId".into(),
            )],
        );
        let mut page: Page<AttachmentInfo> = self.get_json("list_attachments", url, &[]).await?;
        let mut all = std::mem::take(&mut page.value);
        while let Some(link) = page.next_link.take() {
            page = self.next_page(&link).await?;
            all.append(&mut page.value);
        }
        Ok(all)
    }

    /// `POST {mailbox}/messages/{id}/createReply` → the new draft (201). Not repeated after an
    /// unknown outcome: the caller records the draft id and reconciles.
    #[instrument(skip_all, fields(mailbox = %self.mailbox))]
    pub async fn create_reply(
        &self,
        message_id: &MicrosoftMessageId,
        content: &ReplyContent,
    ) -> Result<Message, GraphError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        enum Body<'a> {
            Comment(&'a str),
            Message(&'a MessagePatch),
        }
        let body = match content {
            ReplyContent::Comment(c) => Body::Comment(c),
            ReplyContent::Message(m) => Body::Message(m),
        };
        let url = self.mailbox_url(&["messages", message_id.as_str(), "createReply"]);
        self.send_json("create_reply", Method::POST, url, &body, false)
            .await
    }

    /// `POST {mailbox}/messages` → a new draft in Drafts (201), for mail that answers no
    /// message this mailbox holds. Unlike `sendMail` it returns the id, so the draft can be
    /// sent and found again like a reply draft. Not repeated after an unknown outcome.
    #[instrument(skip_all, fields(mailbox = %self.mailbox))]
    pub async fn create_message(&self, message: &MessagePatch) -> Result<Message, GraphError> {
        let url = self.mailbox_url(&["messages"]);
        self.send_json("create_message", Method::POST, url, message, false)
            .await
    }

    /// `PATCH {mailbox}/messages/{id}` (body and subject only while it is a draft).
    #[instrument(skip_all, fields(mailbox = %self.mailbox))]
    pub async fn update_message(
        &self,
        id: &MicrosoftMessageId,
        patch: &MessagePatch,
    ) -> Result<Message, GraphError> {
        let url = self.mailbox_url(&["messages", id.as_str()]);
        self.send_json("update_message", Method::PATCH, url, patch, true)
            .await
    }

    /// `POST {mailbox}/messages/{id}/send` (202, empty). After an unknown outcome
    /// ([`GraphError::outcome_unknown`]) look in Sent Items before sending again.
    #[instrument(skip_all, fields(mailbox = %self.mailbox))]
    pub async fn send_draft(&self, id: &MicrosoftMessageId) -> Result<(), GraphError> {
        let url = self.mailbox_url(&["messages", id.as_str(), "send"]);
        self.send_no_content("send_draft", Method::POST, url, None, false)
            .await
            .map(drop)
    }

    /// `POST {mailbox}/sendMail` (202, no id). Prefer the draft flow when the sent message
    /// must be found again.
    #[instrument(skip_all, fields(mailbox = %self.mailbox))]
    pub async fn send_mail(
        &self,
        message: &OutgoingMessage,
        save_to_sent_items: bool,
    ) -> Result<(), GraphError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            message: &'a OutgoingMessage,
            save_to_sent_items: bool,
        }
        let body = encode(
            "send_mail",
            &Body {
                message,
                save_to_sent_items,
            },
        )?;
        let url = self.mailbox_url(&["sendMail"]);
        self.send_no_content("send_mail", Method::POST, url, Some(body), false)
            .await
            .map(drop)
    }

    /// One look in Sent Items for the copy of a sent message. `None` until transport has
    /// placed it there: poll with backoff.
    #[instrument(skip_all, fields(mailbox = %self.mailbox, internet_message_id = %internet_message_id))]
    pub async fn find_sent_by_internet_message_id(
        &self,
        internet_message_id: &InternetMessageId,
    ) -> Result<Option<Message>, GraphError> {
        let mut url = self.mailbox_url(&[
            "mailFolders",
            WellKnownFolder::SentItems.as_str(),
            "messages",
        ]);
        let filter = format!(
            "internetMessageId eq '{}'",
            internet_message_id.as_str().replace('\'', "''")
        );
        set_query(
            &mut url,
            &[
                ("$filter", filter),
                (
                    "$select",
                    "id,internetMessageId,conversationId,subject,sentDateTime,parentFolderId"
                        .into(),
                ),
                ("$top", "1".into()),
            ],
        );
        let page: Page<Message> = self.get_json("find_sent", url, &[]).await?;
        Ok(page.value.into_iter().next())
    }

    /// `POST /subscriptions` for change notifications.
    #[instrument(skip_all, fields(resource = %subscription.resource))]
    pub async fn create_subscription(
        &self,
        subscription: &NewSubscription,
    ) -> Result<Subscription, GraphError> {
        let url = self.root_url(&["subscriptions"]);
        self.send_json(
            "create_subscription",
            Method::POST,
            url,
            subscription,
            false,
        )
        .await
    }

    /// `PATCH /subscriptions/{id}` with a new expiration.
    #[instrument(skip_all)]
    pub async fn renew_subscription(
        &self,
        id: &str,
        expiration: chrono::DateTime<chrono::Utc>,
    ) -> Result<Subscription, GraphError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            expiration_date_time: chrono::DateTime<chrono::Utc>,
        }
        let url = self.root_url(&["subscriptions", id]);
        self.send_json(
            "renew_subscription",
            Method::PATCH,
            url,
            &Body {
                expiration_date_time: expiration,
            },
            true,
        )
        .await
    }

    /// `DELETE {mailbox}/messages/{id}`. An already missing message counts as deleted.
    #[instrument(skip_all, fields(mailbox = %self.mailbox))]
    pub async fn delete_message(&self, id: &MicrosoftMessageId) -> Result<(), GraphError> {
        let url = self.mailbox_url(&["messages", id.as_str()]);
        match self
            .send_no_content("delete_message", Method::DELETE, url, None, true)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `DELETE /subscriptions/{id}`. An already missing subscription counts as deleted, so a
    /// repeated clean-up converges.
    #[instrument(skip_all)]
    pub async fn delete_subscription(&self, id: &str) -> Result<(), GraphError> {
        let url = self.root_url(&["subscriptions", id]);
        match self
            .send_no_content("delete_subscription", Method::DELETE, url, None, true)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Can the signed-in user open the mailbox at `address` (e.g. a shared mailbox)?
    /// Probes `GET /users/{address}/mailFolders/inbox`.
    #[instrument(skip_all)]
    pub async fn probe_mailbox(&self, address: &str) -> Result<MailboxProbe, GraphError> {
        let url = self.root_url(&["users", address, "mailFolders", "inbox"]);
        match self.get_json::<MailFolder>("probe_mailbox", url, &[]).await {
            Ok(inbox) => Ok(MailboxProbe::Accessible(inbox)),
            Err(e) if e.is_mailbox_not_enabled() => Ok(MailboxProbe::NoMailbox),
            Err(e) if e.is_access_denied() => Ok(MailboxProbe::NoAccess),
            Err(e) if e.is_not_found() => Ok(MailboxProbe::NoMailbox),
            Err(e) => Err(e),
        }
    }
}

/// Pages of one delta round; see [`GraphClient::delta_round`].
#[derive(Debug)]
pub struct DeltaRound {
    client: GraphClient,
    folder: FolderRef,
    options: DeltaOptions,
    state: DeltaRoundState,
}

#[derive(Debug)]
enum DeltaRoundState {
    Pending(Option<String>),
    Done(String),
}

impl DeltaRound {
    /// The next page, or `None` once the deltaLink page has been returned.
    pub async fn next_page(&mut self) -> Result<Option<DeltaPage>, GraphError> {
        let link = match &self.state {
            DeltaRoundState::Done(_) => return Ok(None),
            DeltaRoundState::Pending(link) => link.clone(),
        };
        let page = self
            .client
            .delta_page(&self.folder, link.as_deref(), &self.options)
            .await?;
        self.state = match &page.next {
            DeltaNext::NextLink(next) => DeltaRoundState::Pending(Some(next.clone())),
            DeltaNext::DeltaLink(delta) => DeltaRoundState::Done(delta.clone()),
        };
        Ok(Some(page))
    }

    /// The deltaLink that ends the round, once reached.
    #[must_use]
    pub fn delta_link(&self) -> Option<&str> {
        match &self.state {
            DeltaRoundState::Done(link) => Some(link),
            DeltaRoundState::Pending(_) => None,
        }
    }
}

/// Every HTTP exchange, retries included: the retries are what Microsoft counts against the
/// mailbox. The error code comes from the response body, so only a plain identifier is kept as
/// a label value; anything else would let a misbehaving server mint unbounded series.
fn count_response(op: &'static str, status: &str, code: &str) {
    let code = if code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        code.to_owned()
    } else {
        "other".to_owned()
    };
    metrics::counter!(
        "graphdesk_graph_requests_total",
        "op" => op,
        "status" => status.to_owned(),
        "code" => code
    )
    .increment(1);
}

fn prefer_header(extra: &[&str]) -> HeaderValue {
    let mut values = vec![PREFER_IMMUTABLE_ID];
    values.extend_from_slice(extra);
    HeaderValue::from_str(&values.join(", "))
        .unwrap_or_else(|_| HeaderValue::from_static(PREFER_IMMUTABLE_ID))
}

fn decode<T: DeserializeOwned>(op: &'static str, body: &[u8]) -> Result<T, GraphError> {
    serde_json::from_slice(body).map_err(|e| GraphError::Decode {
        operation: op,
        message: e.to_string(),
    })
}

fn encode<B: Serialize>(op: &'static str, body: &B) -> Result<Vec<u8>, GraphError> {
    serde_json::to_vec(body).map_err(|e| GraphError::Decode {
        operation: op,
        message: format!("request body could not be encoded: {e}"),
    })
}

/// reqwest's text without the URL: URLs carry skip/delta tokens and mailbox addresses, and the
/// operation name already says what failed.
fn transport_message(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    let mut msg = format!("{kind}: ");
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut first = true;
    while let Some(err) = source {
        let text = if first {
            // Display of reqwest::Error includes the URL; its sources do not.
            error_without_url(e)
        } else {
            err.to_string()
        };
        if !first {
            msg.push_str(": ");
        }
        msg.push_str(&text);
        first = false;
        source = err.source();
    }
    msg
}

fn error_without_url(e: &reqwest::Error) -> String {
    let text = e.to_string();
    match e.url() {
        Some(url) => text.replace(&format!(" for url ({url})"), ""),
        None => text,
    }
}

/// Percent-encodes a query (RFC 3986 unreserved kept, everything else escaped, spaces as
/// `%20`, never `+`: OData filters contain spaces, and Message-IDs contain literal `+`).
fn set_query(url: &mut Url, pairs: &[(&str, String)]) {
    if pairs.is_empty() {
        return;
    }
    let encoded = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
        .collect::<Vec<_>>()
        .join("&");
    url.set_query(Some(&encoded));
}

fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        // `$` (system query options) and `,` (select lists) are legal in a query component
        // and keep URLs readable in logs.
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'$' | b',') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl From<TokenSourceError> for GraphError {
    fn from(value: TokenSourceError) -> Self {
        Self::Token(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::auth::StaticToken;

    fn client(base: &str) -> GraphClient {
        GraphClient::new(
            reqwest::Client::new(),
            Arc::new(GraphConfig::new(base).unwrap()),
            Arc::new(StaticToken(SecretString::from("t"))),
        )
    }

    #[test]
    fn urls_encode_ids_and_use_the_mailbox_prefix() {
        let c = client("https://graph.example/v1.0/");
        let id = MicrosoftMessageId::try_from("AAMk/a+b=".to_string()).unwrap();
        assert_eq!(
            c.mailbox_url(&["messages", id.as_str()]).as_str(),
            "https://graph.example/v1.0/me/messages/AAMk%2Fa+b="
        );
        let shared = c.for_mailbox(Mailbox::User("help@contoso.com".into()));
        assert_eq!(
            shared.mailbox_url(&["mailFolders", "inbox"]).as_str(),
            "https://graph.example/v1.0/users/help@contoso.com/mailFolders/inbox"
        );
    }

    #[test]
    fn filter_values_are_percent_encoded_without_plus() {
        let mut url =
            Url::parse("https://graph.example/v1.0/me/mailFolders/sentitems/messages").unwrap();
        set_query(
            &mut url,
            &[("$filter", "internetMessageId eq '<a+b@x.com>'".into())],
        );
        assert_eq!(
            url.query(),
            Some("$filter=internetMessageId%20eq%20%27%3Ca%2Bb%40x.com%3E%27")
        );
    }

    #[test]
    fn links_outside_the_base_are_refused() {
        let c = client("https://graph.example/v1.0");
        assert!(
            c.trusted_link("https://graph.example/v1.0/me/messages?$skiptoken=x")
                .is_ok()
        );
        for bad in [
            "https://evil.example/v1.0/me/messages",
            "http://graph.example/v1.0/me/messages",
            "https://graph.example/beta/me/messages",
            "https://graph.example/v1.0evil/me",
            "not a url",
        ] {
            let err = c.trusted_link(bad).unwrap_err();
            assert!(matches!(err, GraphError::UntrustedLink { .. }), "{bad}");
        }
    }

    #[test]
    fn prefer_always_starts_with_immutable_id() {
        assert_eq!(
            prefer_header(&["odata.maxpagesize=50", PREFER_HTML_BODY]),
            "IdType=\"ImmutableId\", odata.maxpagesize=50, outlook.body-content-type=\"html\""
        );
        assert_eq!(prefer_header(&[]), "IdType=\"ImmutableId\"");
    }

    #[test]
    fn backoff_grows_with_jitter_and_cap() {
        let p = RetryPolicy::default();
        for _ in 0..50 {
            let first = p.backoff(1);
            assert!(first >= Duration::from_secs(3) && first <= Duration::from_millis(3750));
            let third = p.backoff(3);
            assert!(third >= Duration::from_secs(12) && third <= Duration::from_secs(15));
            assert!(p.backoff(30) <= Duration::from_millis(37_500));
        }
    }

    #[test]
    fn base_url_validation() {
        assert!(GraphConfig::new("https://graph.microsoft.com/v1.0").is_ok());
        assert!(GraphConfig::new("ftp://x").is_err());
        assert!(GraphConfig::new("https://x/v1.0?a=b").is_err());
        assert!(GraphConfig::new("nope").is_err());
    }
}
