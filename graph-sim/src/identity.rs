//! Microsoft identity platform v2.0: authorize (auto-consent or deny) and token endpoints.

use std::collections::HashMap;
use std::time::Duration as StdDuration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::Duration;
use sha2::{Digest, Sha256};

use crate::GraphSim;
use crate::model::FaultKind;
use crate::server::{Ctx, Outcome, SimRequest, SimResponse, split_path};
use crate::state::{AuthCode, Phase, State, aad_error};

const AUTHORIZE_ROUTE: &str = "GET /{tenant}/oauth2/v2.0/authorize";
const TOKEN_ROUTE: &str = "POST /{tenant}/oauth2/v2.0/token";

pub(crate) async fn handle(sim: &GraphSim, req: &SimRequest, ctx: &Ctx) -> Outcome {
    let segs = split_path(&req.path);
    match (
        req.method.as_str(),
        segs.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
    ) {
        ("GET", [tenant, "oauth2", "v2.0", "authorize"]) => authorize(sim, req, ctx, tenant).await,
        ("POST", [tenant, "oauth2", "v2.0", "token"]) => token(sim, req, ctx, tenant).await,
        (m, _) => Outcome::new(
            SimResponse::text(
                404,
                "text/html; charset=utf-8",
                "<html><body>Not found</body></html>".into(),
            ),
            format!("{m} (unknown)"),
        ),
    }
}

fn tenant_ok(st: &State, tenant: &str) -> bool {
    ["common", "organizations", "consumers"]
        .iter()
        .any(|t| t.eq_ignore_ascii_case(tenant))
        || st.tenant(tenant).is_some()
}

fn error_page(status: u16, code: u32, text: &str) -> SimResponse {
    SimResponse::text(
        status,
        "text/html; charset=utf-8",
        format!(
            "<!DOCTYPE html><html><head><title>Sign in to your account</title></head><body><div id=\"error\">AADSTS{code}: {text}</div></body></html>"
        ),
    )
}

fn redirect(uri: &str, params: &[(&str, &str)]) -> SimResponse {
    let q = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter().filter(|(_, v)| !v.is_empty()))
        .finish();
    let sep = if uri.contains('?') { '&' } else { '?' };
    SimResponse::empty(302).with_header("Location", format!("{uri}{sep}{q}"))
}

async fn authorize(sim: &GraphSim, req: &SimRequest, ctx: &Ctx, tenant: &str) -> Outcome {
    let params: HashMap<String, String> = url::form_urlencoded::parse(req.query.as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    let mut out = Outcome::new(SimResponse::empty(500), AUTHORIZE_ROUTE);
    let state_param = get("state").to_string();
    let now = ctx.now;
    let mut st = sim.lock();
    if !tenant_ok(&st, tenant) {
        out.resp = error_page(400, 90002, &format!("Tenant '{tenant}' not found."));
        return out;
    }
    if get("client_id") != st.cfg.client_id {
        out.resp = error_page(
            400,
            700016,
            &format!(
                "Application with identifier '{}' was not found in the directory.",
                get("client_id")
            ),
        );
        return out;
    }
    let redirect_uri = get("redirect_uri").to_string();
    if !st.cfg.redirect_uris.contains(&redirect_uri) {
        out.resp = error_page(
            400,
            50011,
            &format!(
                "The redirect URI '{redirect_uri}' specified in the request does not match the redirect URIs configured for the application '{}'.",
                st.cfg.client_id
            ),
        );
        return out;
    }
    let deny = |error: &str, desc: String| {
        redirect(
            &redirect_uri,
            &[
                ("error", error),
                ("error_description", &desc),
                ("state", &state_param),
            ],
        )
    };
    if get("response_type") != "code" {
        out.resp = deny(
            "unsupported_response_type",
            "AADSTS70005: response_type 'token' is not enabled for the application.".into(),
        );
        return out;
    }
    if get("scope").trim().is_empty() {
        out.resp = deny(
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'scope'.".into(),
        );
        return out;
    }
    let challenge = if get("code_challenge").is_empty() {
        None
    } else {
        let method = match get("code_challenge_method") {
            "" => "plain",
            m => m,
        };
        if method != "S256" && method != "plain" {
            out.resp = deny(
                "invalid_request",
                "AADSTS501491: Invalid size of Code_Challenge parameter.".into(),
            );
            return out;
        }
        Some((get("code_challenge").to_string(), method.to_string()))
    };
    // Like Microsoft: `login_hint` only pre-fills the sign-in; the person may sign in as
    // someone else (`sign_in_as`).
    let user_key = if let Some(u) = st.sign_in_as.clone() {
        Some(u)
    } else if !get("login_hint").is_empty() {
        Some(get("login_hint").to_string())
    } else if let Some(u) = st.login_user.clone() {
        Some(u)
    } else {
        let specific = st.tenant(tenant).map(|t| t.id.clone());
        st.users
            .iter()
            .find(|u| !u.user.shared && specific.as_ref().is_none_or(|t| *t == u.user.tenant_id))
            .map(|u| u.user.id.clone())
    };
    let Some(user) = user_key
        .and_then(|k| st.user_idx(&k))
        .map(|i| st.users[i].user.clone())
    else {
        out.resp = deny(
            "login_required",
            "AADSTS50058: A silent sign-in request was sent but no user is signed in.".into(),
        );
        return out;
    };
    out.mailbox = Some(user.upn.clone());
    let faults = st.take_faults(
        Phase::Authorize,
        "GET",
        &req.path_and_query(),
        Some(&user.id),
    );
    if let Some(FaultKind::AuthorizeError { error, description }) = faults.into_iter().next() {
        out.resp = deny(&error, description);
        return out;
    }
    if !st.cfg.auto_consent {
        out.resp = deny(
            "access_denied",
            "AADSTS65004: User declined to consent to access the app.".into(),
        );
        return out;
    }
    let code = format!("1.AQ{}", st.rand_b64(220));
    let life = st.cfg.auth_code_lifetime_secs as i64;
    st.codes.insert(
        code.clone(),
        AuthCode {
            user_id: user.id.clone(),
            client_id: get("client_id").to_string(),
            redirect_uri: redirect_uri.clone(),
            scopes: State::normalize_scopes(get("scope")),
            challenge,
            expires: now + Duration::seconds(life),
            used: false,
            nonce: params.get("nonce").cloned(),
        },
    );
    let session = st.guid();
    out.resp = redirect(
        &redirect_uri,
        &[
            ("code", &code),
            ("state", &state_param),
            ("session_state", &session),
        ],
    );
    out
}

fn token_error(code: u32, client_id: &str, ctx: &Ctx) -> SimResponse {
    let (status, body) = aad_error(code, client_id, None, ctx.now);
    SimResponse::json(status, body)
        .with_header("Content-Type", "application/json; charset=utf-8")
        .with_header("Cache-Control", "no-store, no-cache")
        .with_header("Pragma", "no-cache")
}

fn pkce_ok(challenge: &(String, String), verifier: &str) -> bool {
    match challenge.1.as_str() {
        "S256" => URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) == challenge.0,
        _ => verifier == challenge.0,
    }
}

async fn token(sim: &GraphSim, req: &SimRequest, ctx: &Ctx, tenant: &str) -> Outcome {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect();
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let grant_type = get("grant_type").to_string();
    let mut out = Outcome::new(SimResponse::empty(500), TOKEN_ROUTE);
    out.grant_type = Some(if grant_type.is_empty() {
        "(none)".into()
    } else {
        grant_type.clone()
    });

    // HTTP Basic carries form-urlencoded client_id:client_secret (RFC 6749 §2.3.1).
    let mut client_id = get("client_id").to_string();
    let mut client_secret = form.get("client_secret").cloned();
    if let Some(basic) = req
        .header("authorization")
        .and_then(|a| a.strip_prefix("Basic "))
        && let Ok(raw) = STANDARD.decode(basic.trim())
        && let Ok(raw) = String::from_utf8(raw)
        && let Some((id, secret)) = raw.split_once(':')
    {
        let dec = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        client_id = dec(id);
        client_secret = Some(dec(secret));
    }

    // Peek at the user first so per-mailbox faults can target the token endpoint.
    let (user_id, cfg_client, cfg_secret) = {
        let st = sim.lock();
        let uid = match grant_type.as_str() {
            "authorization_code" => st.codes.get(get("code")).map(|c| c.user_id.clone()),
            "refresh_token" => st
                .refresh
                .get(get("refresh_token"))
                .map(|r| r.user_id.clone()),
            _ => None,
        };
        (uid, st.cfg.client_id.clone(), st.cfg.client_secret.clone())
    };
    if let Some(u) = &user_id {
        out.mailbox = sim.lock().user_by_id(u).map(|u| u.user.upn.clone());
    }
    let faults = sim.lock().take_faults(
        Phase::Token,
        req.method.as_str(),
        &req.path_and_query(),
        user_id.as_deref(),
    );
    let mut terminal = None;
    for f in faults {
        match f {
            FaultKind::Delay { millis } => {
                tokio::time::sleep(StdDuration::from_millis(millis)).await
            }
            other => terminal = Some(other),
        }
    }
    match terminal {
        Some(FaultKind::TokenError { aadsts }) => {
            out.resp = token_error(aadsts, &client_id, ctx);
            return out;
        }
        Some(FaultKind::InvalidClient) => {
            out.resp = token_error(7000222, &client_id, ctx);
            return out;
        }
        Some(FaultKind::ConnectionReset) => {
            out.resp = SimResponse {
                status: 0,
                headers: vec![],
                body: crate::server::RespBody::Reset,
                error_code: None,
            };
            return out;
        }
        Some(FaultKind::TooManyRequests { retry_after }) => {
            // Entra throttles with a bare 429 (body "Too Many Requests", not an OAuth error
            // body) and a Retry-After header.
            let mut r =
                SimResponse::text(429, "text/plain; charset=utf-8", "Too Many Requests".into());
            if let Some(ra) = retry_after {
                r = r.with_header("Retry-After", ra);
            }
            out.resp = r;
            return out;
        }
        Some(FaultKind::ServiceUnavailable { retry_after }) => {
            let mut r = token_error(90033, &client_id, ctx);
            if let Some(ra) = retry_after {
                r = r.with_header("Retry-After", ra);
            }
            out.resp = r;
            return out;
        }
        Some(FaultKind::GatewayTimeout) => {
            let mut r = token_error(90033, &client_id, ctx);
            r.status = 504;
            out.resp = r;
            return out;
        }
        _ => {}
    }

    let mut st = sim.lock();
    if !tenant_ok(&st, tenant) {
        let (status, body) = aad_error(
            90002,
            &client_id,
            Some(&format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            )),
            ctx.now,
        );
        out.resp = SimResponse::json(status, body)
            .with_header("Content-Type", "application/json; charset=utf-8");
        return out;
    }
    if client_id.is_empty() {
        let (status, body) = aad_error(
            900144,
            "",
            Some("The request body must contain the following parameter: 'client_id'."),
            ctx.now,
        );
        out.resp = SimResponse::json(status, body)
            .with_header("Content-Type", "application/json; charset=utf-8");
        return out;
    }
    if client_id != cfg_client {
        out.resp = token_error(700016, &client_id, ctx);
        return out;
    }
    match client_secret.as_deref() {
        None => {
            out.resp = token_error(7000218, &client_id, ctx);
            return out;
        }
        Some(s) if s != cfg_secret => {
            out.resp = token_error(7000215, &client_id, ctx);
            return out;
        }
        _ => {}
    }
    let now = ctx.now;
    let resp = match grant_type.as_str() {
        "authorization_code" => {
            let code = get("code");
            if code.is_empty() {
                let (s, b) = aad_error(
                    900144,
                    &client_id,
                    Some("The request body must contain the following parameter: 'code'."),
                    now,
                );
                out.resp = SimResponse::json(s, b)
                    .with_header("Content-Type", "application/json; charset=utf-8");
                return out;
            }
            let Some(c) = st.codes.get_mut(code) else {
                out.resp = token_error(9002313, &client_id, ctx);
                return out;
            };
            if c.used {
                out.resp = token_error(54005, &client_id, ctx);
                return out;
            }
            if c.expires <= now {
                out.resp = token_error(70008, &client_id, ctx);
                return out;
            }
            c.used = true;
            if c.client_id != client_id {
                out.resp = token_error(70000, &client_id, ctx);
                return out;
            }
            if c.redirect_uri != get("redirect_uri") {
                out.resp = token_error(50011, &client_id, ctx);
                return out;
            }
            if let Some(ch) = &c.challenge
                && !pkce_ok(ch, get("code_verifier"))
            {
                out.resp = token_error(501481, &client_id, ctx);
                return out;
            }
            let c = c.clone();
            st.issue_tokens(&c.user_id, &c.scopes, c.nonce.as_deref())
        }
        "refresh_token" => {
            let rt = get("refresh_token");
            if rt.is_empty() {
                let (s, b) = aad_error(
                    900144,
                    &client_id,
                    Some("The request body must contain the following parameter: 'refresh_token'."),
                    now,
                );
                out.resp = SimResponse::json(s, b)
                    .with_header("Content-Type", "application/json; charset=utf-8");
                return out;
            }
            let Some(g) = st.refresh.get(rt).cloned() else {
                out.resp = token_error(9002313, &client_id, ctx);
                return out;
            };
            let revoked = st
                .user_by_id(&g.user_id)
                .and_then(|u| u.revoked)
                .filter(|(seq, _)| g.seq <= *seq)
                .map(|(_, code)| code);
            if let Some(code) = revoked {
                out.resp = token_error(code, &client_id, ctx);
                return out;
            }
            let inactivity = Duration::seconds(st.cfg.refresh_token_inactivity_secs as i64);
            if g.last_used + inactivity <= now {
                out.resp = token_error(700082, &client_id, ctx);
                return out;
            }
            if g.client_id != client_id {
                out.resp = token_error(70000, &client_id, ctx);
                return out;
            }
            if let Some(r) = st.refresh.get_mut(rt) {
                r.last_used = now;
            }
            let _ = g.issued;
            let mut scopes = g.scopes.clone();
            // A refresh always yields a new refresh token, even if offline_access was left out.
            if !scopes
                .iter()
                .any(|s| s.eq_ignore_ascii_case("offline_access"))
            {
                scopes.push("offline_access".into());
            }
            st.issue_tokens(&g.user_id, &scopes, None)
        }
        "" => {
            let (s, b) = aad_error(
                900144,
                &client_id,
                Some("The request body must contain the following parameter: 'grant_type'."),
                now,
            );
            out.resp = SimResponse::json(s, b)
                .with_header("Content-Type", "application/json; charset=utf-8");
            return out;
        }
        _ => {
            out.resp = token_error(70003, &client_id, ctx);
            return out;
        }
    };
    out.resp = SimResponse::json(200, serde_json::to_value(resp).unwrap_or_default())
        .with_header("Content-Type", "application/json; charset=utf-8")
        .with_header("Cache-Control", "no-store, no-cache")
        .with_header("Pragma", "no-cache");
    out
}
