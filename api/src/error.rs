//! The only place that maps errors to HTTP. A response carries a stable code, a safe message
//! and the request id; the log carries the whole error chain.

use poem_openapi::{ApiResponse, Object, payload::Json};

tokio::task_local! {
    /// The current request's id, set by the request-id middleware for the whole request.
    pub static REQUEST_ID: String;
}

#[must_use]
pub fn current_request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

/// The body of every error response.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `not_found`, `validation_failed`.
    pub code: String,
    /// What went wrong and what to fix; never contains secrets or internals.
    pub message: String,
    /// Quote this id when reporting a problem: it finds the server log lines.
    pub request_id: String,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> Json<Self> {
        Json(Self {
            code: code.to_string(),
            message: message.into(),
            request_id: current_request_id(),
        })
    }
}

#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request is malformed.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// Missing or invalid credentials.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// Authenticated, but the role does not allow this.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// No such object for this tenant.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The request conflicts with the current state (e.g. an Idempotency-Key reused with
    /// another body).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// Well-formed but semantically invalid.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// Something failed on our side; the detail is in the server log under the request id.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// A dependency (the database, Microsoft Graph) is unavailable; try again later.
    #[oai(status = 503)]
    Unavailable(
        Json<ErrorBody>,
        /// Seconds to wait before trying again, when known.
        #[oai(header = "Retry-After")]
        Option<u32>,
    ),
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::BadRequest(ErrorBody::new("bad_request", msg))
    }
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::Unauthorized(ErrorBody::new("unauthorized", msg))
    }
    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::Forbidden(ErrorBody::new("forbidden", msg))
    }
    pub fn not_found(what: &str) -> Self {
        Self::NotFound(ErrorBody::new("not_found", format!("{what} not found")))
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        Self::Conflict(ErrorBody::new("conflict", msg))
    }
    pub fn unprocessable(msg: impl Into<String>) -> Self {
        Self::Unprocessable(ErrorBody::new("validation_failed", msg))
    }
    /// Logs the full chain and answers with a generic message: 503 with a Retry-After when
    /// the chain shows the database unreachable (a client should come back; nothing is wrong
    /// with its request), else 500.
    pub fn internal(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        if database_unavailable(err) {
            tracing::error!(error = %chain, "database unavailable");
            return Self::Unavailable(
                ErrorBody::new(
                    "database_unavailable",
                    "the database is unavailable; try again shortly",
                ),
                Some(DATABASE_RETRY_AFTER_SECS),
            );
        }
        tracing::error!(error = %chain, "internal error");
        Self::Internal(ErrorBody::new(
            "internal",
            "an internal error occurred; quote the request id when reporting it",
        ))
    }
}

/// What a 503 for an unreachable database asks clients to wait: long enough for a restart or
/// a failover to finish, short next to the pool's own 10 s wait for a connection.
pub const DATABASE_RETRY_AFTER_SECS: u32 = 5;

/// Whether any error in `err`'s chain is a database connection failure. Errors of every
/// layer (queue, connect flow, tokens) wrap the sqlx error, so the chain is searched rather
/// than each wrapper matched.
#[must_use]
pub fn database_unavailable(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source())
        .filter_map(|e| e.downcast_ref::<sqlx::Error>())
        .any(jobs::db::is_connection_failure)
}

impl From<jobs::queue::QueueError> for ApiError {
    fn from(e: jobs::queue::QueueError) -> Self {
        Self::internal(&e)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::internal(&e)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
