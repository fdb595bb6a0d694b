//! Classified failures of Graph and the identity platform.
//!
//! The queue does not look at status codes: it asks [`GraphError::class`] or
//! [`TokenError::class`] what to do. Display texts carry status, service error code, request id
//! and Microsoft's message, and never an access token, refresh token, authorization code, PKCE
//! verifier or client secret: none of those is ever put into an error value.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use serde::Deserialize;

/// What the job layer should do with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later; `after` is the server's Retry-After when it gave one.
    Retryable { after: Option<Duration> },
    /// Our own per-mailbox limit (concurrent requests, request budget) says wait `after`.
    /// Nothing failed: the job waits without spending an attempt, however often it waits.
    Busy { after: Duration },
    /// The request itself is wrong or not allowed; retrying gives the same answer.
    Permanent,
    /// The account's grant is gone (revoked, expired, MFA, consent): a human must reconnect.
    NeedsReauth,
    /// The application's own registration or settings are wrong (client secret, redirect URI).
    /// Retrying in a loop only locks the app out; alert an operator.
    Configuration,
    /// The stored delta state is gone: drop it and run a full initial sync.
    Resync,
}

/// A failed Microsoft Graph call.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// 429: the app or mailbox is over a limit.
    #[error("Graph throttled the request ({code}){}", fmt_after(*.retry_after))]
    Throttled {
        retry_after: Option<Duration>,
        code: String,
    },
    /// 5xx (503/504 and others): the service could not answer now.
    #[error("Graph is unavailable (HTTP {status}){}", fmt_after(*.retry_after))]
    Unavailable {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// 401 that survived one token refresh.
    #[error("Graph rejected the access token even after a refresh ({code}{})", fmt_request_id(.request_id.as_deref()))]
    Unauthorized {
        code: String,
        request_id: Option<String>,
    },
    /// 400, 403, 404, 409 ...: retrying the same request gives the same answer.
    #[error("Graph refused the request: HTTP {status} {code}: {message}{}", fmt_request_id(.request_id.as_deref()))]
    Permanent {
        status: u16,
        code: String,
        message: String,
        request_id: Option<String>,
    },
    /// 410 SyncStateNotFound / resyncRequired: the delta token was evicted.
    #[error("Graph no longer knows this delta state ({code}); a full resync is needed")]
    SyncStateNotFound { code: String },
    /// A nextLink or deltaLink that does not point at the configured Graph base URL. Never
    /// followed, because it would receive the bearer token. A stored deltaLink from another
    /// base URL (configuration changed) is also answered by a resync.
    #[error("refusing to follow a link outside the configured Graph base URL (origin {origin})")]
    UntrustedLink { origin: String },
    /// The request never got an HTTP answer (connect, TLS, timeout, body read).
    #[error("Graph request {operation} failed in transport: {message}")]
    Transport {
        operation: &'static str,
        message: String,
        /// Whether the request may have reached Graph (a non-idempotent call may have had its
        /// effect).
        maybe_sent: bool,
    },
    /// A 2xx answer whose body is not what the contract says.
    #[error("Graph response to {operation} could not be decoded: {message}")]
    Decode {
        operation: &'static str,
        message: String,
    },
    /// The access token could not be obtained or refreshed.
    #[error("could not get an access token for Graph: {0}")]
    Token(#[source] TokenSourceError),
    /// The per-mailbox request gate refused or failed.
    #[error("the mailbox request gate did not admit the request: {0}")]
    Gate(#[source] GateError),
}

fn fmt_after(after: Option<Duration>) -> String {
    after.map_or_else(String::new, |d| {
        format!("; retry after {:.3}s", d.as_secs_f64())
    })
}

fn fmt_request_id(id: Option<&str>) -> String {
    id.map_or_else(String::new, |id| format!(" [request-id {id}]"))
}

impl GraphError {
    /// The request never reached Microsoft: the mailbox gate refused it or no access token
    /// could be had. Whatever was counted for it can be given back.
    #[must_use]
    pub fn was_not_sent(&self) -> bool {
        matches!(self, Self::Gate(_) | Self::Token(_))
    }

    #[must_use]
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Throttled { retry_after, .. } | Self::Unavailable { retry_after, .. } => {
                ErrorClass::Retryable {
                    after: *retry_after,
                }
            }
            // A refresh that fails surfaces as `Token` (NeedsReauth when the grant is gone). A
            // 401 that survives a freshly minted token is not evidence that the grant is gone
            // (token replication, clock skew), so it is retried later rather than disconnecting
            // the account.
            Self::Unauthorized { .. } | Self::Transport { .. } => {
                ErrorClass::Retryable { after: None }
            }
            Self::Permanent { .. } | Self::Decode { .. } => ErrorClass::Permanent,
            Self::SyncStateNotFound { .. } | Self::UntrustedLink { .. } => ErrorClass::Resync,
            Self::Token(e) => e.class(),
            Self::Gate(e) => e.class(),
        }
    }

    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Throttled { .. } => Some(429),
            Self::Unavailable { status, .. } | Self::Permanent { status, .. } => Some(*status),
            Self::Unauthorized { .. } => Some(401),
            Self::SyncStateNotFound { .. } => Some(410),
            _ => None,
        }
    }

    /// The Graph error code (`ErrorItemNotFound`, ...), when the service sent one.
    #[must_use]
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Throttled { code, .. }
            | Self::Unauthorized { code, .. }
            | Self::Permanent { code, .. }
            | Self::SyncStateNotFound { code } => Some(code),
            _ => None,
        }
    }

    fn code_is(&self, expected: &str) -> bool {
        self.code()
            .is_some_and(|c| c.eq_ignore_ascii_case(expected))
    }

    /// 404 (ErrorItemNotFound and friends): the item is gone or moved.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// 403 ErrorAccessDenied (or any 403 without a more specific code).
    #[must_use]
    pub fn is_access_denied(&self) -> bool {
        self.status() == Some(403) && !self.is_send_as_denied() && !self.is_mailbox_not_enabled()
    }

    /// 403 ErrorSendAsDenied: the user may not send as this (shared) mailbox.
    #[must_use]
    pub fn is_send_as_denied(&self) -> bool {
        self.code_is("ErrorSendAsDenied")
    }

    /// MailboxNotEnabledForRESTAPI: the address has no cloud mailbox.
    #[must_use]
    pub fn is_mailbox_not_enabled(&self) -> bool {
        self.code_is("MailboxNotEnabledForRESTAPI")
    }

    /// Whether a non-idempotent request may have taken effect although no success was seen
    /// (transport failure after sending, or a gateway timeout). The caller reconciles (e.g.
    /// looks for the message in Sent Items) instead of blindly repeating.
    #[must_use]
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::Transport { maybe_sent, .. } => *maybe_sent,
            Self::Unavailable { status, .. } => *status == 504,
            _ => false,
        }
    }

    /// Builds the error for a non-success Graph response. `retry_after` is the parsed header.
    pub(crate) fn from_response(
        status: StatusCode,
        body: &[u8],
        header_request_id: Option<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        let parsed = serde_json::from_slice::<GraphErrorEnvelope>(body)
            .ok()
            .map(|e| e.error);
        let (code, message, inner_request_id) = match parsed {
            Some(e) => (
                e.code.unwrap_or_default(),
                e.message.unwrap_or_default(),
                e.inner_error.and_then(|i| i.request_id),
            ),
            None => (String::new(), String::new(), None),
        };
        let code = if code.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("Unknown")
                .replace(' ', "")
        } else {
            code
        };
        let request_id = header_request_id.or(inner_request_id);
        let status_u16 = status.as_u16();
        match status_u16 {
            429 => Self::Throttled { retry_after, code },
            401 => Self::Unauthorized { code, request_id },
            410 if is_resync_code(&code) => Self::SyncStateNotFound { code },
            500..=599 => Self::Unavailable {
                status: status_u16,
                retry_after,
            },
            _ => Self::Permanent {
                status: status_u16,
                code,
                message: truncate(&message, 500),
                request_id,
            },
        }
    }
}

fn is_resync_code(code: &str) -> bool {
    ["SyncStateNotFound", "resyncRequired", "SyncStateInvalid"]
        .iter()
        .any(|c| code.eq_ignore_ascii_case(c))
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[derive(Deserialize)]
struct GraphErrorEnvelope {
    error: GraphErrorBody,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GraphErrorBody {
    code: Option<String>,
    message: Option<String>,
    #[serde(alias = "innererror")]
    inner_error: Option<InnerError>,
}

#[derive(Deserialize)]
struct InnerError {
    #[serde(rename = "request-id")]
    request_id: Option<String>,
}

/// A failed call to the identity platform's token endpoint, branched on the OAuth `error`
/// field, never on the description text.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// `invalid_grant`: refresh token expired/revoked (70008, 700082, 50173, 70043), code
    /// already redeemed (54005), PKCE mismatch (501481), missing consent (65001).
    #[error("the grant is no longer valid (invalid_grant{}){}", fmt_codes(.detail), fmt_detail(.detail))]
    InvalidGrant { detail: TokenErrorDetail },
    /// `interaction_required`: MFA or conditional access (50076, 50079, 53003).
    #[error("the user must sign in again interactively (interaction_required{}){}", fmt_codes(.detail), fmt_detail(.detail))]
    InteractionRequired { detail: TokenErrorDetail },
    /// `consent_required`: the user or admin has not consented to the scopes.
    #[error("consent is required (consent_required{}){}", fmt_codes(.detail), fmt_detail(.detail))]
    ConsentRequired { detail: TokenErrorDetail },
    /// `invalid_client`: wrong or expired client secret (7000215, 7000222), unknown client id.
    #[error("the application's client credentials were refused (invalid_client{}){}", fmt_codes(.detail), fmt_detail(.detail))]
    InvalidClient { detail: TokenErrorDetail },
    /// `temporarily_unavailable`, `server_error`, 429 or any 5xx.
    #[error("the identity platform is temporarily unavailable (HTTP {status}, {error}){}", fmt_after(*.retry_after))]
    Transient {
        status: u16,
        error: String,
        retry_after: Option<Duration>,
    },
    /// Any other OAuth error (`invalid_request`, `unauthorized_client`, `invalid_scope`, ...):
    /// the request or app registration is wrong.
    #[error("the identity platform refused the request (HTTP {status}, {error}{}){}", fmt_codes(.detail), fmt_detail(.detail))]
    Rejected {
        status: u16,
        error: String,
        detail: TokenErrorDetail,
    },
    #[error("token request failed in transport: {message}")]
    Transport { message: String },
    /// A success answer that is not a usable token response.
    #[error("token response could not be decoded: {message}")]
    Decode { message: String },
}

/// The non-secret parts of an identity-platform error body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenErrorDetail {
    /// AADSTS numbers from `error_codes`.
    pub aadsts: Vec<u32>,
    /// First line of `error_description`, truncated.
    pub description: String,
    pub trace_id: Option<String>,
    pub correlation_id: Option<String>,
}

fn fmt_codes(d: &TokenErrorDetail) -> String {
    d.aadsts
        .iter()
        .map(|c| format!(", AADSTS{c}"))
        .collect::<String>()
}

fn fmt_detail(d: &TokenErrorDetail) -> String {
    let mut out = String::new();
    if !d.description.is_empty() {
        out.push_str(": ");
        out.push_str(&d.description);
    }
    if let Some(t) = &d.trace_id {
        out.push_str(" [trace-id ");
        out.push_str(t);
        out.push(']');
    }
    out
}

impl TokenError {
    #[must_use]
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidGrant { .. }
            | Self::InteractionRequired { .. }
            | Self::ConsentRequired { .. } => ErrorClass::NeedsReauth,
            Self::InvalidClient { .. } | Self::Rejected { .. } => ErrorClass::Configuration,
            Self::Transient { retry_after, .. } => ErrorClass::Retryable {
                after: *retry_after,
            },
            // A non-JSON success is most likely a proxy page; the endpoint itself is stable.
            Self::Transport { .. } | Self::Decode { .. } => ErrorClass::Retryable { after: None },
        }
    }

    /// The AADSTS codes the service sent, if any.
    #[must_use]
    pub fn aadsts_codes(&self) -> &[u32] {
        match self {
            Self::InvalidGrant { detail }
            | Self::InteractionRequired { detail }
            | Self::ConsentRequired { detail }
            | Self::InvalidClient { detail }
            | Self::Rejected { detail, .. } => &detail.aadsts,
            _ => &[],
        }
    }

    /// The authorization code was already redeemed or the PKCE verifier did not match:
    /// the authorize step must start over (not a reason to disconnect an existing account).
    #[must_use]
    pub fn must_restart_authorize(&self) -> bool {
        matches!(self, Self::InvalidGrant { .. })
            && self
                .aadsts_codes()
                .iter()
                .any(|c| matches!(c, 54005 | 501481 | 70000))
    }

    pub(crate) fn from_response(
        status: StatusCode,
        body: &[u8],
        retry_after: Option<Duration>,
    ) -> Self {
        let status_u16 = status.as_u16();
        let Ok(body) = serde_json::from_slice::<TokenErrorBody>(body) else {
            return if status.is_server_error() || status_u16 == 429 {
                Self::Transient {
                    status: status_u16,
                    error: "no_error_body".into(),
                    retry_after,
                }
            } else {
                Self::Rejected {
                    status: status_u16,
                    error: "no_error_body".into(),
                    detail: TokenErrorDetail::default(),
                }
            };
        };
        let detail = TokenErrorDetail {
            aadsts: body.error_codes,
            description: body
                .error_description
                .as_deref()
                .and_then(|d| d.lines().next())
                .map(|d| truncate(d.trim(), 300))
                .unwrap_or_default(),
            trace_id: body.trace_id,
            correlation_id: body.correlation_id,
        };
        match body.error.as_str() {
            "invalid_grant" => Self::InvalidGrant { detail },
            "interaction_required" | "login_required" => Self::InteractionRequired { detail },
            "consent_required" => Self::ConsentRequired { detail },
            "invalid_client" => Self::InvalidClient { detail },
            "temporarily_unavailable" | "server_error" => Self::Transient {
                status: status_u16,
                error: body.error,
                retry_after,
            },
            _ if status.is_server_error() || status_u16 == 429 => Self::Transient {
                status: status_u16,
                error: body.error,
                retry_after,
            },
            _ => Self::Rejected {
                status: status_u16,
                error: body.error,
                detail,
            },
        }
    }
}

#[derive(Deserialize)]
struct TokenErrorBody {
    error: String,
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u32>,
    trace_id: Option<String>,
    correlation_id: Option<String>,
}

/// Why an [`AccessTokenSource`](super::AccessTokenSource) could not hand out a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenSourceError {
    /// The identity platform refused or failed the refresh.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The account is already marked as needing a reconnect; no refresh was attempted.
    #[error("the account must be reconnected: {reason}")]
    NeedsReauth { reason: String },
    /// The token store (database, vault) failed.
    #[error("the token store failed: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl TokenSourceError {
    #[must_use]
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Token(e) => e.class(),
            Self::NeedsReauth { .. } => ErrorClass::NeedsReauth,
            Self::Store(_) => ErrorClass::Retryable { after: None },
        }
    }
}

/// How long to wait for a busy mailbox when the gate names no time.
const BUSY_RETRY: Duration = Duration::from_secs(2);

/// Why a [`RequestGate`](super::RequestGate) did not admit a request.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The mailbox is at its concurrency or request budget: defer the job.
    #[error("the mailbox is busy{}", fmt_after(*.retry_after))]
    Busy { retry_after: Option<Duration> },
    /// The gate's own store failed.
    #[error("the request gate failed: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl GateError {
    #[must_use]
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Busy { retry_after } => ErrorClass::Busy {
                after: retry_after.unwrap_or(BUSY_RETRY),
            },
            Self::Failed(_) => ErrorClass::Retryable { after: None },
        }
    }
}

/// Parses a Retry-After value: integer or decimal seconds (Graph sends `2.128`, `0.249`), then
/// an HTTP-date (relative to now, never negative); anything else is `None` so the caller falls
/// back to its own backoff.
#[must_use]
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    parse_retry_after_at(value.to_str().ok()?, Utc::now())
}

pub(crate) fn parse_retry_after_at(raw: &str, now: DateTime<Utc>) -> Option<Duration> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    if raw.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = raw.parse().ok()?;
        // Caps absurd values instead of panicking in Duration::from_secs_f64.
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0 * 7.0)));
    }
    let when = DateTime::parse_from_rfc2822(raw).ok()?.with_timezone(&Utc);
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retryable { after: Some(d) } => {
                write!(f, "retryable after {:.3}s", d.as_secs_f64())
            }
            Self::Retryable { after: None } => f.write_str("retryable"),
            Self::Busy { after } => write!(f, "busy for {:.3}s", after.as_secs_f64()),
            Self::Permanent => f.write_str("permanent"),
            Self::NeedsReauth => f.write_str("needs reauthorization"),
            Self::Configuration => f.write_str("configuration error"),
            Self::Resync => f.write_str("resync required"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    #[test]
    fn retry_after_integer_decimal_and_http_date() {
        let now = Utc.with_ymd_and_hms(2015, 10, 21, 7, 27, 30).unwrap();
        assert_eq!(parse_retry_after_at("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after_at("2.128", now),
            Some(Duration::from_millis(2128))
        );
        assert_eq!(
            parse_retry_after_at(" 0.249 ", now),
            Some(Duration::from_millis(249))
        );
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date in the past means "now", not a negative wait.
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for junk in ["", "soon", "-1", "1.2.3", "NaN"] {
            assert_eq!(parse_retry_after_at(junk, now), None, "{junk}");
        }
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("7")),
            Some(Duration::from_secs(7))
        );
    }

    fn graph(status: u16, body: &str, retry_after: Option<Duration>) -> GraphError {
        GraphError::from_response(
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            None,
            retry_after,
        )
    }

    #[test]
    fn graph_errors_are_classified_from_real_bodies() {
        let e = graph(
            429,
            r#"{"error":{"code":"ApplicationThrottled","message":"Application is over its MailboxConcurrency limit."}}"#,
            Some(Duration::from_millis(2128)),
        );
        assert!(
            matches!(e, GraphError::Throttled { ref code, .. } if code == "ApplicationThrottled")
        );
        assert_eq!(
            e.class(),
            ErrorClass::Retryable {
                after: Some(Duration::from_millis(2128))
            }
        );

        let e = graph(
            401,
            r#"{"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid.","innerError":{"date":"2024-05-01T10:00:00","request-id":"r-1","client-request-id":"c-1"}}}"#,
            None,
        );
        assert!(
            matches!(e, GraphError::Unauthorized { ref request_id, .. } if request_id.as_deref() == Some("r-1"))
        );

        let e = graph(
            404,
            r#"{"error":{"code":"ErrorItemNotFound","message":"The specified object was not found in the store.","innerError":{"request-id":"r-2"}}}"#,
            None,
        );
        assert!(e.is_not_found());
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(e.to_string().contains("ErrorItemNotFound"));
        assert!(e.to_string().contains("r-2"));

        let e = graph(
            403,
            r#"{"error":{"code":"ErrorAccessDenied","message":"Access is denied. Check credentials and try again."}}"#,
            None,
        );
        assert!(e.is_access_denied() && !e.is_send_as_denied());

        let e = graph(
            403,
            r#"{"error":{"code":"ErrorSendAsDenied","message":"The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account."}}"#,
            None,
        );
        assert!(e.is_send_as_denied() && !e.is_access_denied());

        let e = graph(
            404,
            r#"{"error":{"code":"MailboxNotEnabledForRESTAPI","message":"The mailbox is either inactive, soft-deleted, or is hosted on-premise."}}"#,
            None,
        );
        assert!(e.is_mailbox_not_enabled());

        let e = graph(
            400,
            r#"{"error":{"code":"InefficientFilter","message":"The restriction or sort order is too complex for this operation."}}"#,
            None,
        );
        assert_eq!(e.class(), ErrorClass::Permanent);

        for code in ["SyncStateNotFound", "resyncRequired", "syncstatenotfound"] {
            let body = format!(
                r#"{{"error":{{"code":"{code}","message":"The sync state generation is not found."}}}}"#
            );
            let e = graph(410, &body, None);
            assert!(matches!(e, GraphError::SyncStateNotFound { .. }), "{code}");
            assert_eq!(e.class(), ErrorClass::Resync);
        }

        for status in [503, 504] {
            let e = graph(
                status,
                r#"{"error":{"code":"serviceNotAvailable","message":"Service unavailable"}}"#,
                None,
            );
            assert_eq!(e.class(), ErrorClass::Retryable { after: None });
        }
        assert!(graph(504, "", None).outcome_unknown());
        // Non-JSON bodies still classify by status.
        assert!(matches!(
            graph(502, "<html>bad gateway</html>", None),
            GraphError::Unavailable { status: 502, .. }
        ));
        assert!(matches!(
            graph(400, "", None),
            GraphError::Permanent { ref code, .. } if code == "BadRequest"
        ));
    }

    fn token(status: u16, body: &str) -> TokenError {
        TokenError::from_response(StatusCode::from_u16(status).unwrap(), body.as_bytes(), None)
    }

    #[test]
    fn only_a_refusal_before_the_request_counts_as_not_sent() {
        let gate = GraphError::Gate(GateError::Busy { retry_after: None });
        assert!(gate.was_not_sent());
        let no_token = GraphError::Token(TokenSourceError::NeedsReauth {
            reason: "revoked".into(),
        });
        assert!(no_token.was_not_sent());
        // An answer from Microsoft, even a refusal or an outage, may follow a request it acted on.
        assert!(!graph(503, "", None).was_not_sent());
        assert!(!graph(429, "", Some(Duration::from_secs(1))).was_not_sent());
    }

    #[test]
    fn token_errors_branch_on_error_not_text() {
        let revoked = token(
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS70008: The provided authorization code or refresh token has expired due to inactivity.\r\nTrace ID: t\r\nCorrelation ID: c\r\nTimestamp: 2024-05-01 10:00:00Z","error_codes":[70008],"timestamp":"2024-05-01 10:00:00Z","trace_id":"t-1","correlation_id":"c-1"}"#,
        );
        assert_eq!(revoked.class(), ErrorClass::NeedsReauth);
        assert_eq!(revoked.aadsts_codes(), &[70008]);
        assert!(!revoked.must_restart_authorize());
        let text = revoked.to_string();
        assert!(
            text.contains("AADSTS70008") && text.contains("t-1"),
            "{text}"
        );
        assert!(!text.contains("Correlation ID: c\r"), "{text}");

        let reused = token(
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS54005: OAuth2 Authorization code was already redeemed.","error_codes":[54005]}"#,
        );
        assert!(reused.must_restart_authorize());

        let mfa = token(
            400,
            r#"{"error":"interaction_required","error_description":"AADSTS50076: Due to a configuration change made by your administrator, you must use multi-factor authentication.","error_codes":[50076]}"#,
        );
        assert_eq!(mfa.class(), ErrorClass::NeedsReauth);

        let consent = token(
            400,
            r#"{"error":"consent_required","error_description":"AADSTS65001: The user or administrator has not consented.","error_codes":[65001]}"#,
        );
        assert_eq!(consent.class(), ErrorClass::NeedsReauth);

        let client = token(
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#,
        );
        assert_eq!(client.class(), ErrorClass::Configuration);

        let busy = token(
            503,
            r#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: The server is busy."}"#,
        );
        assert_eq!(busy.class(), ErrorClass::Retryable { after: None });
        assert_eq!(
            token(500, "<html/>").class(),
            ErrorClass::Retryable { after: None }
        );
        assert_eq!(
            token(400, r#"{"error":"invalid_scope"}"#).class(),
            ErrorClass::Configuration
        );
        // The same words in the text do not change the branch.
        assert_eq!(
            token(
                400,
                r#"{"error":"invalid_request","error_description":"invalid_grant temporarily_unavailable"}"#
            )
            .class(),
            ErrorClass::Configuration
        );
    }
}
