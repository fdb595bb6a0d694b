//! graphdesk's HTTP edge: poem + poem-openapi. Handlers parse, authorize and call `jobs`;
//! nothing here decides business rules.

pub mod auth;
pub mod body;
pub mod dashboard;
pub mod error;
pub mod metrics;
pub mod routes;

use std::time::Duration;

use jobs::queue::Queue;
use jobs::services::Services;
use poem::http::StatusCode;
use poem::{Endpoint, EndpointExt, IntoResponse, Request, Response, Route};
use poem_openapi::OpenApiService;
use sqlx::PgPool;

use crate::auth::JwtConfig;
use crate::error::{ErrorBody, REQUEST_ID};
use crate::routes::oauth::OAuthApi;
use crate::routes::webhooks::WebhookApi;
use crate::routes::{
    accounts::AccountsApi, health::HealthApi, jobs_api::JobsApi, ops::OpsApi, tickets::TicketsApi,
};

/// Request-size limits (configurable; see README).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_reply_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 1024 * 1024,
            max_reply_body_bytes: 256 * 1024,
        }
    }
}

impl Limits {
    pub fn from_env() -> Result<Self, jobs::config::ConfigError> {
        let d = Self::default();
        Ok(Self {
            max_request_bytes: jobs::config::env_parse(
                "API_MAX_REQUEST_BYTES",
                d.max_request_bytes,
            )?,
            max_reply_body_bytes: jobs::config::env_parse(
                "API_MAX_REPLY_BODY_BYTES",
                d.max_reply_body_bytes,
            )?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub queue: Queue,
    pub jwt: JwtConfig,
    pub limits: Limits,
    pub services: Services,
}

impl AppState {
    /// `services.pool` serves tenant work (app role); the queue and ops views go through
    /// `services.system_pool`.
    #[must_use]
    pub fn new(services: Services, jwt: JwtConfig, limits: Limits) -> Self {
        Self {
            queue: Queue::new(services.system_pool.clone()),
            pool: services.pool.clone(),
            jwt,
            limits,
            services,
        }
    }
}

type Apis = (
    HealthApi,
    JobsApi,
    AccountsApi,
    TicketsApi,
    OAuthApi,
    OpsApi,
    WebhookApi,
);

fn openapi(state: &AppState) -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            HealthApi {
                state: state.clone(),
            },
            JobsApi {
                state: state.clone(),
            },
            AccountsApi {
                state: state.clone(),
            },
            TicketsApi {
                state: state.clone(),
            },
            OAuthApi {
                state: state.clone(),
            },
            OpsApi {
                state: state.clone(),
            },
            WebhookApi {
                state: state.clone(),
            },
        ),
        "graphdesk",
        env!("CARGO_PKG_VERSION"),
    )
    .description("Microsoft 365 mailboxes as help-desk tickets. Every endpoint but the health checks, the OAuth callback and the Graph webhook needs `Authorization: Bearer <JWT>`.")
}

/// A state that reaches nothing, for printing the OpenAPI document without a deployment.
pub fn offline_state() -> anyhow::Result<AppState> {
    let pool = PgPool::connect_lazy("postgres://localhost/unused")?;
    let jwt = JwtConfig::new("x".repeat(32).into(), "graphdesk", "graphdesk-api");
    let settings = jobs::services::IntegrationSettings {
        graph_base_url: jobs::config::DEFAULT_GRAPH_BASE_URL.into(),
        identity_base_url: jobs::config::DEFAULT_IDENTITY_BASE_URL.into(),
        client_id: "unused".into(),
        client_secret: "unused".to_string().into(),
        redirect_uri: "http://localhost/oauth/callback".parse()?,
        authority: jobs::graph::TenantSegment::organizations(),
        keyring: format!("k1:{}", jobs::vault::TokenVault::generate_key()).into(),
        scopes: jobs::graph::DEFAULT_SCOPES.into(),
        mailbox_concurrency: 4,
        mailbox_budget_per_10_min: 10_000,
        sync: jobs::config::SyncSettings::default(),
    };
    Ok(AppState::new(
        Services::new(pool, &settings)?,
        jwt,
        Limits::default(),
    ))
}

/// The OpenAPI document as YAML, exactly as served at /openapi.yaml (committed as
/// `api/openapi.yaml`; a test fails when the two drift).
pub fn spec_yaml(state: &AppState) -> String {
    openapi(state).spec_yaml()
}

pub fn build_app(state: AppState) -> impl Endpoint<Output = Response> {
    let api = openapi(&state);
    let docs = api.swagger_ui();
    let spec_json = api.spec_endpoint();
    let spec_yaml = api.spec_endpoint_yaml();
    let max_request_bytes = state.limits.max_request_bytes;
    Route::new()
        .nest("/", api)
        .nest("/docs", docs)
        .at("/openapi.json", spec_json)
        .at("/openapi.yaml", spec_yaml)
        .nest("/dashboard", dashboard::routes())
        .at("/metrics", metrics::endpoint())
        .data(state)
        .around(move |next, req| limit_body(next, req, max_request_bytes))
        .around(request_context)
}

/// Refuses bodies over the limit before any handler reads them: by Content-Length when sent,
/// else by reading at most `max + 1` bytes of a chunked body.
async fn limit_body<E: Endpoint>(next: E, mut req: Request, max: usize) -> poem::Result<Response> {
    let too_large = || poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE);
    // PostgreSQL text cannot hold a NUL character; refuse it here with a clear 400 rather than
    // let it surface as a database error.
    let nul = || {
        poem::Error::from_string(
            "the request contains a NUL character, which no field accepts",
            StatusCode::BAD_REQUEST,
        )
    };
    let has_encoded_nul = |s: &str| s.to_ascii_lowercase().contains("%00");
    // The OAuth callback stores none of its query (the state is hashed, the rest shown on its
    // HTML page), and it answers in HTML, so it keeps its own error page for odd input.
    let is_callback = req.uri().path() == "/oauth/callback";
    if has_encoded_nul(req.uri().path())
        || (!is_callback && req.uri().query().is_some_and(has_encoded_nul))
    {
        return Err(nul());
    }
    if let Some(len) = req.headers().get(poem::http::header::CONTENT_LENGTH) {
        let len: usize = len
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| poem::Error::from_status(StatusCode::BAD_REQUEST))?;
        if len > max {
            return Err(too_large());
        }
    }
    let has_body = req
        .headers()
        .contains_key(poem::http::header::CONTENT_LENGTH)
        || req
            .headers()
            .contains_key(poem::http::header::TRANSFER_ENCODING);
    if has_body {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        req.take_body()
            .into_async_read()
            .take(max as u64 + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(|_| poem::Error::from_status(StatusCode::BAD_REQUEST))?;
        if buf.len() > max {
            return Err(too_large());
        }
        // A raw NUL, or JSON's escape for one.
        if buf.contains(&0) || buf.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000")) {
            return Err(nul());
        }
        req.set_body(buf);
    }
    next.call(req).await.map(IntoResponse::into_response)
}

/// Gives every request an id (the `x-request-id` response header, every log line of the
/// request, and every error body) and turns every error — including poem's own parse errors
/// and unknown routes — into the JSON error shape with a safe message.
async fn request_context<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        %method,
        %path,
        tenant = tracing::field::Empty,
        role = tracing::field::Empty
    );
    let started = std::time::Instant::now();
    let rid = request_id.clone();
    let result = REQUEST_ID
        .scope(rid.clone(), async move {
            let resp = match next.call(req).await {
                Ok(r) => r.into_response(),
                // Our own ApiError responses already carry the JSON shape and request id.
                Err(err) if err.is_from_response() => err.into_response(),
                Err(err) => error_response(&err),
            };
            tracing::info!(
                status = resp.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "request finished"
            );
            resp
        })
        .instrument_with(span)
        .await;
    Ok(result
        .with_header("x-request-id", request_id)
        .into_response())
}

trait InstrumentExt: std::future::Future + Sized {
    fn instrument_with(self, span: tracing::Span) -> tracing::instrument::Instrumented<Self> {
        tracing::Instrument::instrument(self, span)
    }
}
impl<F: std::future::Future> InstrumentExt for F {}

fn error_response(err: &poem::Error) -> Response {
    let status = err.status();
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such route".to_string()),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "method not allowed on this route".to_string(),
        ),
        StatusCode::UNAUTHORIZED => ("unauthorized", {
            let m = err.to_string();
            if m.is_empty() || m.contains("authorization") || m.contains("Authorization") {
                "missing or malformed `Authorization: Bearer <token>` header".to_string()
            } else {
                m
            }
        }),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the request body is too large".to_string(),
        ),
        s if s.is_client_error() => ("bad_request", safe_client_message(err)),
        _ => {
            tracing::error!(error = %err, "unhandled error");
            (
                "internal",
                "an internal error occurred; quote the request id when reporting it".to_string(),
            )
        }
    };
    let body = ErrorBody::new(code, message).0;
    let json = serde_json::json!({
        "code": body.code,
        "message": body.message,
        "request_id": body.request_id,
    });
    Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(json.to_string())
}

/// poem-openapi's parse errors say which parameter or field is wrong; keep that, bounded.
fn safe_client_message(err: &poem::Error) -> String {
    let msg = err.to_string();
    let msg: String = msg.chars().take(300).collect();
    if msg.is_empty() {
        "the request is invalid".into()
    } else {
        msg
    }
}

/// Generous per-connection timeouts; see README for the knobs.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
