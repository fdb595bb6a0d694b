//! HTTP plumbing: one catch-all endpoint, the request pipeline (auth, mailbox throttling,
//! faults, logging) and response helpers.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Utc};
use poem::http::{HeaderMap, Method, StatusCode};
use poem::{Endpoint, Request, Response};
use serde_json::{Value, json};

use crate::GraphSim;
use crate::model::{FaultKind, LogEntry};
use crate::state::{AccessGrant, Phase};

#[derive(Clone, Debug)]
pub(crate) struct SimRequest {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub base_url: String,
    pub in_batch: bool,
}

impl SimRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// All `Prefer` preferences, split on commas, trimmed.
    pub fn prefs(&self) -> Vec<String> {
        self.headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    pub fn immutable_ids(&self) -> bool {
        self.prefs().iter().any(|p| {
            let p = p.replace(' ', "").to_ascii_lowercase();
            p == "idtype=\"immutableid\"" || p == "idtype=immutableid"
        })
    }

    pub fn max_page_size(&self) -> Option<usize> {
        self.prefs().iter().find_map(|p| {
            let (k, v) = p.split_once('=')?;
            if k.trim().eq_ignore_ascii_case("odata.maxpagesize") {
                v.trim().trim_matches('"').parse().ok()
            } else {
                None
            }
        })
    }

    pub fn body_type_pref(&self) -> Option<bool> {
        self.prefs().iter().find_map(|p| {
            let (k, v) = p.split_once('=')?;
            if k.trim().eq_ignore_ascii_case("outlook.body-content-type") {
                Some(v.trim().trim_matches('"').eq_ignore_ascii_case("html"))
            } else {
                None
            }
        })
    }

    pub fn path_and_query(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }

    pub fn json(&self) -> Result<Value, ()> {
        if self.body.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(json!({}));
        }
        serde_json::from_slice(&self.body).map_err(|_| ())
    }
}

#[derive(Debug)]
pub(crate) enum RespBody {
    Empty,
    Json(Value),
    Text(String, String),
    Reset,
}

#[derive(Debug)]
pub(crate) struct SimResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: RespBody,
    /// Graph error code, for the log.
    pub error_code: Option<String>,
}

impl SimResponse {
    pub fn json(status: u16, v: Value) -> Self {
        Self {
            status,
            headers: vec![],
            body: RespBody::Json(v),
            error_code: None,
        }
    }
    pub fn empty(status: u16) -> Self {
        Self {
            status,
            headers: vec![],
            body: RespBody::Empty,
            error_code: None,
        }
    }
    pub fn text(status: u16, content_type: &str, body: String) -> Self {
        Self {
            status,
            headers: vec![],
            body: RespBody::Text(body, content_type.into()),
            error_code: None,
        }
    }
    pub fn with_header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
    }
}

/// Per-request facts the error bodies echo.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    pub request_id: String,
    pub client_request_id: Option<String>,
    pub now: DateTime<Utc>,
}

impl Ctx {
    /// Graph's error envelope.
    pub fn error(&self, status: u16, code: &str, message: &str) -> SimResponse {
        let mut r = SimResponse::json(
            status,
            json!({"error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": self.now.format("%Y-%m-%dT%H:%M:%S").to_string(),
                    "request-id": self.request_id,
                    "client-request-id": self.client_request_id.clone().unwrap_or_else(|| self.request_id.clone()),
                }
            }}),
        );
        r.error_code = Some(code.to_string());
        r
    }
}

pub(crate) struct SimEndpoint {
    pub sim: GraphSim,
}

impl Endpoint for SimEndpoint {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let body = req.take_body().into_vec().await.unwrap_or_default();
        let public = self.sim.lock().cfg.public_base_url.clone();
        let base_url = public.unwrap_or_else(|| {
            let host = req
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| self.sim.inner.addr.to_string());
            format!("http://{host}")
        });
        let sreq = SimRequest {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
            headers: req.headers().clone(),
            body,
            base_url,
            in_batch: false,
        };
        let resp = self.sim.handle(sreq).await;
        if matches!(resp.body, RespBody::Reset) {
            // Unwinding out of the connection task drops the socket without a response; the
            // payload-less resume_unwind skips the panic hook, so nothing is printed.
            std::panic::resume_unwind(Box::new("graph-sim: injected connection reset"));
        }
        let mut b = Response::builder()
            .status(StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
        for (k, v) in &resp.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let explicit_ct = resp.header("content-type").is_some();
        Ok(match resp.body {
            RespBody::Empty | RespBody::Reset => b.body(poem::Body::empty()),
            RespBody::Json(v) if explicit_ct => b.body(v.to_string()),
            RespBody::Json(v) => b
                .content_type("application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8")
                .body(v.to_string()),
            RespBody::Text(t, ct) => b.content_type(ct).body(t),
        })
    }
}

/// Outcome of routing, for the log.
pub(crate) struct Outcome {
    pub resp: SimResponse,
    pub route: String,
    pub mailbox: Option<String>,
    pub grant_type: Option<String>,
}

impl Outcome {
    pub fn new(resp: SimResponse, route: impl Into<String>) -> Self {
        Self {
            resp,
            route: route.into(),
            mailbox: None,
            grant_type: None,
        }
    }
}

/// Decrements the in-flight count of a mailbox even when the request unwinds (connection reset).
pub(crate) struct InflightGuard {
    sim: GraphSim,
    user: String,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut st = self.sim.lock();
        if let Some(n) = st.inflight.get_mut(&self.user) {
            *n = n.saturating_sub(1);
        }
    }
}

pub(crate) fn split_path(path: &str) -> Vec<String> {
    let mut out = vec![];
    for raw in path.split('/').filter(|s| !s.is_empty()) {
        let seg = percent_decode(raw);
        // OData key syntax: mailFolders('Inbox') == mailFolders/Inbox.
        if let Some(open) = seg.find("('")
            && seg.ends_with("')")
        {
            out.push(seg[..open].to_string());
            out.push(seg[open + 2..seg.len() - 2].to_string());
        } else if let Some(open) = seg.find('(')
            && seg.ends_with(')')
            && open > 0
        {
            out.push(seg[..open].to_string());
            out.push(seg[open + 1..seg.len() - 1].to_string());
        } else {
            out.push(seg);
        }
    }
    out
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

pub(crate) fn www_authenticate(base_url: &str) -> String {
    format!(
        "Bearer realm=\"\", authorization_uri=\"{base_url}/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\""
    )
}

impl GraphSim {
    pub(crate) fn handle(
        &self,
        req: SimRequest,
    ) -> Pin<Box<dyn Future<Output = SimResponse> + Send + '_>> {
        Box::pin(self.handle_inner(req))
    }

    async fn handle_inner(&self, req: SimRequest) -> SimResponse {
        let started = Instant::now();
        let now = {
            let mut st = self.lock();
            st.materialize_pending();
            st.now()
        };
        let ctx = Ctx {
            request_id: uuid::Uuid::new_v4().to_string(),
            client_request_id: req.header("client-request-id").map(str::to_string),
            now,
        };
        let is_control = req.path.starts_with("/_sim");
        let out = if is_control {
            crate::control::handle(self, &req).await
        } else if req.path == "/v1.0" || req.path.starts_with("/v1.0/") {
            self.graph_pipeline(&req, &ctx).await
        } else if req.path.contains("/oauth2/v2.0/") {
            crate::identity::handle(self, &req, &ctx).await
        } else {
            Outcome::new(
                ctx.error(
                    400,
                    "BadRequest",
                    &format!("Invalid version: {}", req.path.trim_start_matches('/')),
                ),
                format!("{} (unknown)", req.method),
            )
        };
        let mut resp = out.resp;
        resp.headers
            .push(("request-id".into(), ctx.request_id.clone()));
        resp.headers.push((
            "client-request-id".into(),
            ctx.client_request_id
                .clone()
                .unwrap_or_else(|| ctx.request_id.clone()),
        ));
        if !is_control {
            let entry = LogEntry {
                seq: 0,
                time: ctx.now,
                method: req.method.to_string(),
                path: req.path.clone(),
                query: req.query.clone(),
                route: out.route,
                status: if matches!(resp.body, RespBody::Reset) {
                    0
                } else {
                    resp.status
                },
                mailbox: out.mailbox,
                request_id: ctx.request_id.clone(),
                client_request_id: ctx.client_request_id.clone(),
                duration_ms: started.elapsed().as_millis() as u64,
                grant_type: out.grant_type,
                in_batch: req.in_batch,
                error_code: resp.error_code.clone(),
            };
            self.lock().record(entry);
        }
        self.wake();
        resp
    }

    /// 401 with the WWW-Authenticate challenge Graph sends.
    pub(crate) fn unauthorized(req: &SimRequest, ctx: &Ctx, message: &str) -> SimResponse {
        ctx.error(401, "InvalidAuthenticationToken", message)
            .with_header("WWW-Authenticate", www_authenticate(&req.base_url))
    }

    pub(crate) fn authenticate(
        &self,
        req: &SimRequest,
        ctx: &Ctx,
    ) -> Result<AccessGrant, SimResponse> {
        let Some(auth) = req.header("authorization") else {
            return Err(Self::unauthorized(req, ctx, "Access token is empty."));
        };
        let Some(token) = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
        else {
            return Err(Self::unauthorized(req, ctx, "Access token is empty."));
        };
        let st = self.lock();
        match st.access.get(token.trim()) {
            None => Err(Self::unauthorized(
                req,
                ctx,
                "IDX14100: JWT is not well formed, there are no dots (.).",
            )
            .with_unknown_token(token)),
            Some(g) if g.expires <= st.now() => Err(Self::unauthorized(
                req,
                ctx,
                "Access token has expired or is not yet valid.",
            )),
            Some(g) => Ok(g.clone()),
        }
    }

    /// Concurrency slot for a mailbox, or the MailboxConcurrency 429.
    pub(crate) fn acquire(
        &self,
        user_id: &str,
        upn: &str,
        ctx: &Ctx,
    ) -> Result<InflightGuard, SimResponse> {
        let mut st = self.lock();
        let limit = st.cfg.mailbox_concurrency_limit;
        let n = {
            let n = st.inflight.entry(user_id.to_string()).or_default();
            *n += 1;
            *n
        };
        let max = st.stats.max_conc.entry(upn.to_string()).or_default();
        *max = (*max).max(n);
        let guard = InflightGuard {
            sim: self.clone(),
            user: user_id.to_string(),
        };
        if n > limit {
            let ra = st.cfg.concurrency_retry_after.clone();
            drop(st);
            drop(guard);
            return Err(ctx
                .error(
                    429,
                    "ApplicationThrottled",
                    "Application is over its MailboxConcurrency limit.",
                )
                .with_header("Retry-After", ra));
        }
        Ok(guard)
    }

    /// Rolling 10-minute request budget per mailbox.
    pub(crate) fn spend_budget(&self, user_id: &str, ctx: &Ctx) -> Result<(), SimResponse> {
        let mut st = self.lock();
        let budget = st.cfg.mailbox_budget_per_10_min;
        let now = st.now();
        let window = chrono::Duration::minutes(10);
        let q = st.budget.entry(user_id.to_string()).or_default();
        while q.front().is_some_and(|t| *t + window <= now) {
            q.pop_front();
        }
        if q.len() as u64 >= budget {
            let wait = q
                .front()
                .map(|t| (*t + window - now).num_milliseconds())
                .unwrap_or(1000);
            let secs = ((wait as f64) / 1000.0).ceil().max(1.0) as u64;
            return Err(ctx
                .error(
                    429,
                    "TooManyRequests",
                    "Application is over its MailboxRequests limit.",
                )
                .with_header("Retry-After", secs.to_string()));
        }
        q.push_back(now);
        Ok(())
    }

    /// Applies Request-phase faults. `Ok(())` = carry on.
    pub(crate) async fn apply_faults(
        &self,
        req: &SimRequest,
        ctx: &Ctx,
        mailbox: Option<&str>,
        identity: bool,
    ) -> Result<(), SimResponse> {
        let phase = if identity {
            Phase::Token
        } else {
            Phase::Request
        };
        let faults =
            self.lock()
                .take_faults(phase, req.method.as_str(), &req.path_and_query(), mailbox);
        let mut terminal = None;
        for f in faults {
            match f {
                FaultKind::Delay { millis } => {
                    tokio::time::sleep(StdDuration::from_millis(millis)).await
                }
                other => terminal = Some(other),
            }
        }
        let Some(f) = terminal else { return Ok(()) };
        let resp = match f {
            FaultKind::TooManyRequests { retry_after } => {
                let mut r = if identity {
                    identity_transient(ctx, 429)
                } else {
                    ctx.error(429, "TooManyRequests", "Too many requests.")
                };
                if let Some(ra) = retry_after {
                    r = r.with_header("Retry-After", ra);
                }
                r
            }
            FaultKind::ServiceUnavailable { retry_after } => {
                let mut r = if identity {
                    identity_transient(ctx, 503)
                } else {
                    ctx.error(
                        503,
                        "serviceNotAvailable",
                        "Service Unavailable, please retry later.",
                    )
                };
                if let Some(ra) = retry_after {
                    r = r.with_header("Retry-After", ra);
                }
                r
            }
            FaultKind::GatewayTimeout => {
                if identity {
                    identity_transient(ctx, 504)
                } else {
                    ctx.error(504, "UnknownError", "")
                }
            }
            FaultKind::InvalidAuthenticationToken => {
                Self::unauthorized(req, ctx, "Access token has expired or is not yet valid.")
            }
            FaultKind::ConnectionReset => {
                if req.in_batch {
                    ctx.error(504, "UnknownError", "")
                } else {
                    SimResponse {
                        status: 0,
                        headers: vec![],
                        body: RespBody::Reset,
                        error_code: None,
                    }
                }
            }
            FaultKind::GraphError {
                status,
                code,
                message,
            } => ctx.error(status, &code, &message),
            FaultKind::DeltaEviction
                if req.path.ends_with("/delta")
                    && (req.query.contains("deltatoken") || req.query.contains("skiptoken")) =>
            {
                sync_state_not_found(ctx)
            }
            _ => return Ok(()),
        };
        Err(resp)
    }
}

trait UnknownToken {
    fn with_unknown_token(self, token: &str) -> Self;
}

impl UnknownToken for SimResponse {
    /// A dotted (JWT-shaped) token we never issued gets the signature-validation message instead.
    fn with_unknown_token(mut self, token: &str) -> Self {
        if token.contains('.')
            && let RespBody::Json(v) = &mut self.body
        {
            v["error"]["message"] = json!("Access token validation failure. Invalid audience.");
        }
        self
    }
}

fn identity_transient(ctx: &Ctx, status: u16) -> SimResponse {
    let (_, mut body) = crate::state::aad_error(90033, "", None, ctx.now);
    if status == 504 {
        body["error"] = json!("server_error");
    }
    SimResponse::json(status, body)
}

pub(crate) fn sync_state_not_found(ctx: &Ctx) -> SimResponse {
    ctx.error(
        410,
        "SyncStateNotFound",
        "The sync state generation was not found. The token may have expired or been evicted; start a full resync.",
    )
}
