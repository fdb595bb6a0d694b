//! The ops dashboard under `/dashboard`: server-rendered HTML (maud) over the same service
//! functions as the JSON ops API.
//!
//! Session: the login form takes one of the API's JWTs and keeps it in an HttpOnly,
//! SameSite=Strict cookie scoped to /dashboard, so page scripts cannot read it and other sites
//! cannot send it. Every state-changing form carries a CSRF token: an HMAC of the session
//! token, which a page on another origin can neither read nor compute, checked in constant
//! time. Agents are refused at login and on every page.
//!
//! The login form has its own CSRF token (login CSRF: a page elsewhere must not be able to log
//! a victim into the attacker's session): an HMAC of a random pre-session nonce kept in a
//! SameSite=Strict cookie, which a cross-site post never carries.

mod pages;
pub mod service;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jobs::ids::{AccountId, TenantId};
use jobs::queue::{JobFilter, JobStatus};
use poem::http::{StatusCode, header};
use poem::web::{Data, Form, Path, Query};
use poem::{Endpoint, EndpointExt, Request, Response, Route, get, handler, post};
use serde::Deserialize;
use sha2::Sha256;

use crate::AppState;
use crate::auth::{Principal, Role};
use service::OpsError;

const SESSION_COOKIE: &str = "gd_session";
const FLASH_COOKIE: &str = "gd_flash";
const LOGIN_COOKIE: &str = "gd_login";
/// How long a login form stays usable.
const LOGIN_NONCE_MAX_AGE_SECS: i64 = 3600;
const PAGE_SIZE: i64 = 50;

/// Dashboard settings (see README: DASHBOARD_SECURE_COOKIE).
#[derive(Debug, Clone, Copy)]
pub struct DashboardConfig {
    /// Mark the session cookie `Secure` (HTTPS only). Off by default for local http.
    pub secure_cookie: bool,
}

impl DashboardConfig {
    #[must_use]
    pub fn from_env() -> Self {
        Self {
            secure_cookie: secure_cookie_setting(
                jobs::config::env_opt("DASHBOARD_SECURE_COOKIE").as_deref(),
            ),
        }
    }
}

/// An unreadable value picks `Secure`: a misconfiguration then shows up as a login that
/// does not stick over plain http, never as a session cookie sent in the clear.
fn secure_cookie_setting(raw: Option<&str>) -> bool {
    match raw.map(|r| r.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "off") => false,
        Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => true,
        Some(v) => {
            tracing::error!(value = %v, "DASHBOARD_SECURE_COOKIE is not a boolean; using true");
            true
        }
    }
}

/// The dashboard's routes, to be nested at `/dashboard`.
pub fn routes() -> impl Endpoint<Output = Response> {
    Route::new()
        .at("/", get(overview))
        .at("/login", get(login_page).post(login))
        .at("/logout", post(logout))
        .at("/jobs", get(jobs_page))
        .at("/jobs/retry", post(bulk_retry))
        .at("/jobs/purge", post(purge))
        .at("/jobs/:id", get(job_page))
        .at("/jobs/:id/retry", post(retry_job))
        .at("/jobs/:id/cancel", post(cancel_job))
        .at("/accounts", get(accounts_page))
        .at("/accounts/:id/reconnect", get(reconnect_account))
        .at("/tenants", get(tenants_page))
        .at("/tenants/:id/concurrency", post(set_tenant_concurrency))
        .data(DashboardConfig::from_env())
        .map_to_response()
}

/// A logged-in ops or admin user.
pub(crate) struct Session {
    pub principal: Principal,
    pub csrf: String,
    pub flash: Option<String>,
}

fn cookie<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// What a CSRF token is bound to. The purposes keep a session's form token and a login form's
/// token from ever standing in for each other.
#[derive(Clone, Copy)]
enum CsrfPurpose {
    /// Forms of a logged-in session, keyed by the session token.
    Session,
    /// The login form, keyed by the pre-session nonce.
    Login,
}

impl CsrfPurpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Session => b"graphdesk dashboard csrf v1",
            Self::Login => b"graphdesk dashboard login csrf v1",
        }
    }
}

fn csrf_token(session_token: &str) -> String {
    hex::encode(
        csrf_mac(CsrfPurpose::Session, session_token)
            .finalize()
            .into_bytes(),
    )
}

fn csrf_mac(purpose: CsrfPurpose, key: &str) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(purpose.label());
    mac
}

fn csrf_valid(purpose: CsrfPurpose, key: &str, presented: Option<&str>) -> bool {
    let Some(bytes) = presented.and_then(|p| hex::decode(p).ok()) else {
        return false;
    };
    csrf_mac(purpose, key).verify_slice(&bytes).is_ok()
}

/// The login form's pre-session nonce from this request's cookie, if it is one we could have
/// issued (64 hex digits).
fn login_nonce(req: &Request) -> Option<&str> {
    cookie(req, LOGIN_COOKIE).filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A fresh nonce: two v4 UUIDs, 244 bits from the operating system's CSPRNG.
fn new_login_nonce() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn login_csrf_token(nonce: &str) -> String {
    hex::encode(csrf_mac(CsrfPurpose::Login, nonce).finalize().into_bytes())
}

/// The session of this request, or the response to send instead (login redirect, 403 page).
fn session(req: &Request, state: &AppState) -> Result<Session, Response> {
    let Some(token) = cookie(req, SESSION_COOKIE) else {
        return Err(redirect("/dashboard/login", None));
    };
    let principal = match state.jwt.verify(token) {
        Ok(p) => p,
        Err(msg) => {
            tracing::info!(reason = %msg, "dashboard session token no longer accepted");
            let to = format!(
                "/dashboard/login?error={}",
                LoginNotice::SessionEnded.code()
            );
            return Err(redirect(&to, None).with_clear_session());
        }
    };
    if principal.role == Role::Agent {
        return Err(forbidden_page());
    }
    Ok(Session {
        csrf: csrf_token(token),
        flash: cookie(req, FLASH_COOKIE)
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
            .and_then(|b| String::from_utf8(b).ok()),
        principal,
    })
}

/// The session for a form post, refused with 403 unless the form's CSRF token matches.
fn session_for_post(
    req: &Request,
    state: &AppState,
    csrf: Option<&str>,
) -> Result<Session, Response> {
    let s = session(req, state)?;
    let token = cookie(req, SESSION_COOKIE).unwrap_or_default();
    if !csrf_valid(CsrfPurpose::Session, token, csrf) {
        tracing::warn!(actor = %s.principal.subject, "dashboard form post with a missing or wrong CSRF token");
        return Err(html(
            StatusCode::FORBIDDEN,
            pages::message_page(
                "Request refused",
                "The form's security token is missing or does not match your session. Reload the page and try again.",
            ),
        ));
    }
    Ok(s)
}

fn set_cookie(name: &str, value: &str, max_age: Option<i64>, secure: bool) -> String {
    let mut c = format!("{name}={value}; Path=/dashboard; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        c.push_str("; Secure");
    }
    c
}

fn redirect(to: &str, flash: Option<&str>) -> Response {
    let mut b = Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, to);
    if let Some(msg) = flash {
        b = b.header(
            header::SET_COOKIE,
            set_cookie(FLASH_COOKIE, &URL_SAFE_NO_PAD.encode(msg), Some(60), false),
        );
    }
    b.finish()
}

trait ResponseExt {
    fn with_clear_session(self) -> Response;
}

impl ResponseExt for Response {
    fn with_clear_session(mut self) -> Response {
        if let Ok(v) = set_cookie(SESSION_COOKIE, "", Some(0), false).parse() {
            self.headers_mut().append(header::SET_COOKIE, v);
        }
        self
    }
}

fn html(status: StatusCode, markup: maud::Markup) -> Response {
    Response::builder()
        .status(status)
        .content_type("text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-frame-options", "DENY")
        .header(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
        )
        .body(markup.into_string())
}

/// A page for a logged-in user; consumes the flash message it shows.
fn page(s: &Session, markup: maud::Markup) -> Response {
    let mut resp = html(StatusCode::OK, markup);
    if s.flash.is_some()
        && let Ok(v) = set_cookie(FLASH_COOKIE, "", Some(0), false).parse()
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

fn forbidden_page() -> Response {
    html(
        StatusCode::FORBIDDEN,
        pages::message_page(
            "Access denied",
            "The ops dashboard is for the ops and admin roles. Agent tokens cannot use it.",
        ),
    )
    .with_clear_session()
}

fn error_response(s: &Session, e: OpsError) -> Response {
    let failure: Option<&(dyn std::error::Error + 'static)> = match &e {
        OpsError::Queue(err) => Some(err),
        OpsError::Connect(err) => Some(err),
        _ => None,
    };
    if let Some(err) = failure {
        tracing::error!(error = %err, source = ?err.source(), "dashboard action failed");
        // Same rule as the API (crate::error): an unreachable database is worth a retry.
        let request_id = crate::error::current_request_id();
        let (status, title, msg) = if crate::error::database_unavailable(err) {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "Database unavailable",
                format!(
                    "The database cannot be reached right now; try again shortly (request id {request_id})."
                ),
            )
        } else {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                format!(
                    "An internal error occurred; quote request id {request_id} when reporting it."
                ),
            )
        };
        let mut resp = html(status, pages::error_page(s, title, &msg));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                crate::error::DATABASE_RETRY_AFTER_SECS.into(),
            );
        }
        return resp;
    }
    let (status, title) = match &e {
        OpsError::Forbidden(_) => (StatusCode::FORBIDDEN, "Not allowed"),
        OpsError::NotFound(_) => (StatusCode::NOT_FOUND, "Not found"),
        OpsError::Conflict(_) => (StatusCode::CONFLICT, "Not possible"),
        OpsError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid request"),
        // Answered above, without their internals.
        OpsError::Queue(_) | OpsError::Connect(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong")
        }
    };
    html(status, pages::error_page(s, title, &e.to_string()))
}

// ---- login ----

/// Why the login page was shown, as `?error=<code>`. Only these fixed messages are ever shown:
/// the query string is anyone's to write, so its text must never reach the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoginNotice {
    /// The session's token expired or is no longer accepted.
    SessionEnded,
}

impl LoginNotice {
    fn code(self) -> &'static str {
        match self {
            Self::SessionEnded => "session_ended",
        }
    }

    fn parse(code: &str) -> Option<Self> {
        [Self::SessionEnded].into_iter().find(|n| n.code() == code)
    }

    fn message(self) -> &'static str {
        match self {
            Self::SessionEnded => {
                "Your session has ended: its token expired or is no longer accepted. Please log in again."
            }
        }
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    error: Option<String>,
}

/// The login page with its form token, and the pre-session cookie that token is bound to. The
/// browser's nonce is kept when it has one, so two open login tabs both still work.
fn login_form(
    req: &Request,
    config: &DashboardConfig,
    status: StatusCode,
    message: Option<&str>,
) -> Response {
    let nonce = login_nonce(req).map_or_else(new_login_nonce, str::to_string);
    let mut resp = html(
        status,
        pages::login_page(message, &login_csrf_token(&nonce)),
    );
    if let Ok(v) = set_cookie(
        LOGIN_COOKIE,
        &nonce,
        Some(LOGIN_NONCE_MAX_AGE_SECS),
        config.secure_cookie,
    )
    .parse()
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

#[handler]
async fn login_page(
    req: &Request,
    Data(config): Data<&DashboardConfig>,
    Query(q): Query<LoginQuery>,
) -> Response {
    let notice = q.error.as_deref().and_then(LoginNotice::parse);
    login_form(
        req,
        config,
        StatusCode::OK,
        notice.map(LoginNotice::message),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    csrf: Option<String>,
}

#[handler]
async fn login(
    req: &Request,
    Data(state): Data<&AppState>,
    Data(config): Data<&DashboardConfig>,
    Form(form): Form<LoginForm>,
) -> Response {
    // Checked before the token is even looked at: a cross-site post has no nonce cookie.
    let csrf_ok = login_nonce(req)
        .is_some_and(|nonce| csrf_valid(CsrfPurpose::Login, nonce, form.csrf.as_deref()));
    if !csrf_ok {
        tracing::warn!("dashboard login refused: missing or wrong login form token");
        return html(
            StatusCode::FORBIDDEN,
            pages::message_page(
                "Request refused",
                "The login form's security token is missing, expired or does not match this browser. Open the login page and try again.",
            ),
        );
    }
    let token = form.token.trim();
    match state.jwt.verify(token) {
        Err(msg) => login_form(
            req,
            config,
            StatusCode::UNAUTHORIZED,
            Some(&format!("That token was not accepted: {msg}.")),
        ),
        Ok(p) if p.role == Role::Agent => forbidden_page(),
        Ok(p) => {
            tracing::info!(actor = %p.subject, role = p.role.as_str(), "dashboard login");
            Response::builder()
                .status(StatusCode::SEE_OTHER)
                .header(header::LOCATION, "/dashboard")
                .header(
                    header::SET_COOKIE,
                    set_cookie(SESSION_COOKIE, token, None, config.secure_cookie),
                )
                // The nonce has done its job; a new login gets a new one.
                .header(
                    header::SET_COOKIE,
                    set_cookie(LOGIN_COOKIE, "", Some(0), config.secure_cookie),
                )
                .finish()
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

#[handler]
async fn logout(req: &Request, Data(state): Data<&AppState>, Form(f): Form<CsrfForm>) -> Response {
    match session_for_post(req, state, f.csrf.as_deref()) {
        Ok(_) => redirect("/dashboard/login", None).with_clear_session(),
        Err(resp) => resp,
    }
}

// ---- pages ----

#[handler]
async fn overview(req: &Request, Data(state): Data<&AppState>) -> Response {
    let s = match session(req, state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match service::overview(state, &s.principal).await {
        Ok(o) => page(&s, pages::overview(&s, &o)),
        Err(e) => error_response(&s, e),
    }
}

/// The job filter as it travels in query strings and hidden form fields. Everything is a
/// string so that a half-typed filter shows an error on the page instead of a bare 400.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct FilterParams {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub queue: String,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub account: String,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub before_id: String,
}

impl FilterParams {
    fn to_filter(&self) -> Result<JobFilter, OpsError> {
        let opt = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        Ok(JobFilter {
            status: opt(&self.status)
                .map(|s| {
                    JobStatus::parse(&s)
                        .ok_or_else(|| OpsError::Invalid(format!("unknown status `{s}`")))
                })
                .transpose()?,
            queue: opt(&self.queue),
            tenant: opt(&self.tenant)
                .map(|t| {
                    t.parse::<TenantId>()
                        .map_err(|e| OpsError::Invalid(e.to_string()))
                })
                .transpose()?,
            account: opt(&self.account)
                .map(|a| {
                    a.parse::<AccountId>()
                        .map_err(|e| OpsError::Invalid(e.to_string()))
                })
                .transpose()?,
            error_contains: opt(&self.error),
            before_id: opt(&self.before_id)
                .map(|b| {
                    b.parse::<i64>()
                        .map_err(|_| OpsError::Invalid("before_id must be a job id".into()))
                })
                .transpose()?,
            limit: PAGE_SIZE,
        })
    }

    /// The query string for this filter (without paging), for links and redirects.
    pub fn query(&self, before_id: Option<i64>) -> String {
        let mut pairs: Vec<(&str, String)> = [
            ("status", &self.status),
            ("queue", &self.queue),
            ("tenant", &self.tenant),
            ("account", &self.account),
            ("error", &self.error),
        ]
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k, v.trim().to_string()))
        .collect();
        if let Some(b) = before_id {
            pairs.push(("before_id", b.to_string()));
        }
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }
}

#[handler]
async fn jobs_page(
    req: &Request,
    Data(state): Data<&AppState>,
    Query(params): Query<FilterParams>,
) -> Response {
    let s = match session(req, state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let result = match params.to_filter() {
        Ok(f) => service::list_jobs(state, &s.principal, f).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(jobs) => {
            let next = (jobs.len() as i64 == PAGE_SIZE)
                .then(|| jobs.last().map(|j| j.id))
                .flatten();
            page(&s, pages::jobs(&s, &params, &jobs, next))
        }
        Err(e) => error_response(&s, e),
    }
}

#[handler]
async fn job_page(req: &Request, Data(state): Data<&AppState>, Path(id): Path<i64>) -> Response {
    let s = match session(req, state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match service::get_job(state, &s.principal, id).await {
        Ok(job) => page(&s, pages::job(&s, &job)),
        Err(e) => error_response(&s, e),
    }
}

#[handler]
async fn accounts_page(req: &Request, Data(state): Data<&AppState>) -> Response {
    let s = match session(req, state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match service::accounts(state, &s.principal).await {
        Ok(accounts) => page(&s, pages::accounts(&s, &accounts)),
        Err(e) => error_response(&s, e),
    }
}

/// The Accounts page's Reconnect link: starts the Microsoft sign-in for the mailbox and sends
/// the browser there. A GET, so it works as a plain link; the state it stores is single use
/// and expires, and the SameSite=Strict session cookie keeps other sites from triggering it.
#[handler]
async fn reconnect_account(
    req: &Request,
    Data(state): Data<&AppState>,
    Path(id): Path<String>,
) -> Response {
    let s = match session(req, state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let result = match id.parse::<AccountId>() {
        Ok(account) => service::reconnect_account(state, &s.principal, account).await,
        // Not an account id: as unknown as a missing account.
        Err(_) => Err(OpsError::NotFound("account")),
    };
    match result {
        Ok(url) => redirect(&url, None),
        Err(e) => error_response(&s, e),
    }
}

#[handler]
async fn tenants_page(req: &Request, Data(state): Data<&AppState>) -> Response {
    let s = match session(req, state) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match service::tenant_concurrencies(state, &s.principal).await {
        Ok(tenants) => page(&s, pages::tenants(&s, &tenants)),
        Err(e) => error_response(&s, e),
    }
}

// ---- actions ----

#[derive(Deserialize)]
struct ConcurrencyForm {
    csrf: Option<String>,
    /// A whole number from 1 to 1000; ignored with `clear`.
    #[serde(default)]
    limit: String,
    /// Present when the "use the default" button was pressed.
    clear: Option<String>,
}

#[handler]
async fn set_tenant_concurrency(
    req: &Request,
    Data(state): Data<&AppState>,
    Path(id): Path<String>,
    Form(f): Form<ConcurrencyForm>,
) -> Response {
    let s = match session_for_post(req, state, f.csrf.as_deref()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Ok(tenant) = id.parse::<TenantId>() else {
        return error_response(&s, OpsError::NotFound("tenant"));
    };
    let limit = if f.clear.is_some() {
        None
    } else {
        match f.limit.trim().parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error_response(
                    &s,
                    OpsError::Invalid(format!(
                        "`{}` is not a concurrency limit: enter a whole number from 1 to {}",
                        f.limit.trim(),
                        jobs::queue::ConcurrencyLimit::MAX
                    )),
                );
            }
        }
    };
    match service::set_tenant_concurrency(state, &s.principal, tenant, limit).await {
        Ok(t) => {
            let what = match t.limit {
                Some(l) => format!("its own limit of {}", l.get()),
                None => "the workers' default limit".to_string(),
            };
            redirect(
                "/dashboard/tenants",
                Some(&format!(
                    "Tenant {} now uses {what}; the next claim applies it.",
                    t.name
                )),
            )
        }
        Err(e) => error_response(&s, e),
    }
}

#[handler]
async fn retry_job(
    req: &Request,
    Data(state): Data<&AppState>,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let s = match session_for_post(req, state, f.csrf.as_deref()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match service::retry_job(state, &s.principal, id).await {
        Ok(_) => redirect(
            &format!("/dashboard/jobs/{id}"),
            Some(&format!("Job {id} was put back to pending.")),
        ),
        Err(e) => error_response(&s, e),
    }
}

#[handler]
async fn cancel_job(
    req: &Request,
    Data(state): Data<&AppState>,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let s = match session_for_post(req, state, f.csrf.as_deref()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match service::cancel_job(state, &s.principal, id).await {
        Ok(_) => redirect(
            &format!("/dashboard/jobs/{id}"),
            Some(&format!("Job {id} was cancelled.")),
        ),
        Err(e) => error_response(&s, e),
    }
}

#[derive(Deserialize)]
struct BulkRetryForm {
    csrf: Option<String>,
    #[serde(flatten)]
    filter: FilterParams,
}

#[handler]
async fn bulk_retry(
    req: &Request,
    Data(state): Data<&AppState>,
    Form(f): Form<BulkRetryForm>,
) -> Response {
    let s = match session_for_post(req, state, f.csrf.as_deref()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    // Paging and status do not narrow a bulk retry: it acts on every dead or cancelled match.
    let params = FilterParams {
        status: String::new(),
        before_id: String::new(),
        ..f.filter
    };
    let result = match params.to_filter() {
        Ok(filter) => service::bulk_retry(state, &s.principal, filter).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(n) => redirect(
            &format!("/dashboard/jobs?{}", params.query(None)),
            Some(&format!(
                "{n} job{} matching the filter put back to pending.",
                if n == 1 { "" } else { "s" }
            )),
        ),
        Err(e) => error_response(&s, e),
    }
}

#[derive(Deserialize)]
struct PurgeForm {
    csrf: Option<String>,
    days: String,
}

#[handler]
async fn purge(req: &Request, Data(state): Data<&AppState>, Form(f): Form<PurgeForm>) -> Response {
    let s = match session_for_post(req, state, f.csrf.as_deref()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let result = match f.days.trim().parse::<u32>() {
        Ok(days) => service::purge(state, &s.principal, days)
            .await
            .map(|n| (days, n)),
        Err(_) => Err(OpsError::Invalid("days must be a whole number".into())),
    };
    match result {
        Ok((days, n)) => redirect(
            "/dashboard/jobs",
            Some(&format!(
                "Purged {n} finished job{} older than {days} day{}.",
                if n == 1 { "" } else { "s" },
                if days == 1 { "" } else { "s" }
            )),
        ),
        Err(e) => error_response(&s, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_cookie_defaults_off_and_unreadable_values_turn_it_on() {
        assert!(!secure_cookie_setting(None));
        assert!(!secure_cookie_setting(Some("false")));
        assert!(!secure_cookie_setting(Some(" 0 ")));
        assert!(secure_cookie_setting(Some("TRUE")));
        assert!(secure_cookie_setting(Some("1")));
        assert!(secure_cookie_setting(Some("maybe")));
        assert!(set_cookie("a", "b", None, true).ends_with("; Secure"));
        assert!(!set_cookie("a", "b", None, false).contains("Secure"));
    }

    #[test]
    fn csrf_tokens_are_bound_to_the_session() {
        use CsrfPurpose::{Login, Session};
        let t = csrf_token("session-one");
        assert!(csrf_valid(Session, "session-one", Some(&t)));
        assert!(!csrf_valid(Session, "session-two", Some(&t)));
        assert!(!csrf_valid(Session, "session-one", None));
        assert!(!csrf_valid(Session, "session-one", Some("zz")));
        assert!(!csrf_valid(Session, "session-one", Some("")));
        // A token for one purpose never passes for the other, even under the same key.
        assert!(!csrf_valid(Login, "session-one", Some(&t)));
        let for_login = login_csrf_token("session-one");
        assert!(csrf_valid(Login, "session-one", Some(&for_login)));
        assert!(!csrf_valid(Session, "session-one", Some(&for_login)));
    }

    #[test]
    fn login_notices_are_only_known_codes() {
        assert_eq!(
            LoginNotice::parse("session_ended"),
            Some(LoginNotice::SessionEnded)
        );
        assert_eq!(LoginNotice::parse("Call us now"), None);
        assert_eq!(LoginNotice::parse(""), None);
    }
}
