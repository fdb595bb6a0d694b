//! `/_sim` JSON control API: the same operations as the Rust methods on [`GraphSim`].
//! The route table is in the crate docs.

use std::time::Duration as StdDuration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::GraphSim;
use crate::model::*;
use crate::server::{Outcome, SimRequest, SimResponse, split_path};

fn ok_json<T: serde::Serialize>(v: &T) -> SimResponse {
    SimResponse::json(200, serde_json::to_value(v).unwrap_or(Value::Null))
        .with_header("Content-Type", "application/json")
}

fn err(status: u16, msg: impl std::fmt::Display) -> SimResponse {
    SimResponse::json(status, json!({"error": msg.to_string()}))
        .with_header("Content-Type", "application/json")
}

fn body<T: DeserializeOwned>(req: &SimRequest) -> Result<T, SimResponse> {
    let raw: &[u8] = if req.body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(raw).map_err(|e| err(400, format!("bad JSON body: {e}")))
}

#[derive(Deserialize)]
struct TenantBody {
    domain: String,
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Deserialize)]
struct UserBody {
    #[serde(default)]
    tenant: String,
    upn: String,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    shared: bool,
}

#[derive(Deserialize)]
struct Settings {
    access_token_lifetime_secs: Option<u64>,
    auto_consent: Option<bool>,
    sent_items_delay_ms: Option<u64>,
}

pub(crate) async fn handle(sim: &GraphSim, req: &SimRequest) -> Outcome {
    let resp = match route(sim, req) {
        Ok(r) | Err(r) => r,
    };
    Outcome::new(resp, "_sim")
}

fn route(sim: &GraphSim, req: &SimRequest) -> Result<SimResponse, SimResponse> {
    let segs = split_path(&req.path);
    let s: Vec<&str> = segs.iter().skip(1).map(String::as_str).collect();
    let m = req.method.as_str();
    let no_content = || SimResponse::empty(204);
    Ok(match (m, s.as_slice()) {
        ("GET", ["health"]) => ok_json(&json!({"ok": true})),
        ("POST", ["tenants"]) => {
            let b: TenantBody = body(req)?;
            let name = b.display_name.unwrap_or_else(|| b.domain.clone());
            ok_json(&sim.create_tenant(&b.domain, &name))
        }
        ("GET", ["tenants"]) => ok_json(&sim.tenants()),
        ("POST", ["users"]) => {
            let b: UserBody = body(req)?;
            let name = b.display_name.unwrap_or_else(|| b.upn.clone());
            let r = sim
                .lock()
                .create_user(&b.tenant, &b.upn, &name, b.shared)
                .map_err(|e| err(400, e))?;
            ok_json(&r)
        }
        ("GET", ["users"]) => ok_json(&sim.users()),
        ("POST", ["users", u, "grant"]) => {
            let b: Value = body(req)?;
            let d = b["delegate"].as_str().unwrap_or("").to_string();
            if sim.user(*u).is_none() || sim.user(d.as_str()).is_none() {
                return Err(err(404, "unknown user"));
            }
            sim.grant_mailbox_access(*u, d.as_str());
            no_content()
        }
        ("POST", ["users", u, "folders"]) => {
            let b: Value = body(req)?;
            let parent = b["parent"].as_str().unwrap_or("msgfolderroot");
            let name = b["name"]
                .as_str()
                .ok_or_else(|| err(400, "name required"))?;
            let id = sim
                .lock()
                .create_folder(u, parent, name)
                .map_err(|e| err(404, e))?;
            match id {
                Some(id) => ok_json(&json!({"id": id})),
                None => ok_json(&json!({"id": sim.folder_id(*u, name)})),
            }
        }
        ("POST", ["users", u, "deliver"]) => {
            let mail: InboundMail = body(req)?;
            ok_json(&sim.try_deliver(*u, mail).map_err(|e| err(400, e))?)
        }
        ("GET", ["users", u, "folders", f, "messages"]) => ok_json(&sim.messages(*u, f)),
        ("GET", ["users", u, "sent-items"]) => ok_json(&sim.sent_items(*u)),
        ("POST", ["users", u, "messages", id, "move"]) => {
            let b: Value = body(req)?;
            let dest = b["destination"]
                .as_str()
                .ok_or_else(|| err(400, "destination required"))?;
            ok_json(
                &sim.try_move_message(*u, id, dest)
                    .map_err(|e| err(404, e))?,
            )
        }
        ("POST", ["users", u, "messages", id, "read"]) => {
            let b: Value = body(req)?;
            sim.set_read(*u, id, b["read"].as_bool().unwrap_or(true))
                .map_err(|e| err(404, e))?;
            no_content()
        }
        ("DELETE", ["users", u, "messages", id]) => {
            sim.delete_message(*u, id).map_err(|e| err(404, e))?;
            no_content()
        }
        ("POST", ["users", u, "revoke"]) => {
            let b: Value = body(req)?;
            let code = b["aadsts"].as_u64().unwrap_or(50173) as u32;
            if sim.user(*u).is_none() {
                return Err(err(404, "unknown user"));
            }
            sim.revoke_refresh_tokens(*u, code);
            no_content()
        }
        ("POST", ["users", u, "expire-tokens"]) => {
            sim.expire_access_tokens(*u);
            no_content()
        }
        ("POST", ["users", u, "tokens"]) => {
            let b: Value = body(req)?;
            let scopes: Vec<String> = b["scopes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_else(|| {
                    ["offline_access", "User.Read", "Mail.ReadWrite", "Mail.Send"]
                        .map(String::from)
                        .to_vec()
                });
            if sim.user(*u).is_none() {
                return Err(err(404, "unknown user"));
            }
            let refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
            ok_json(&sim.issue_tokens_for(*u, &refs))
        }
        ("POST", ["users", u, "evict-delta"]) => {
            sim.evict_delta_tokens(*u);
            no_content()
        }
        ("POST", ["users", u, "generate"]) => {
            let spec: GeneratorSpec = body(req)?;
            if sim.user(*u).is_none() {
                return Err(err(404, "unknown user"));
            }
            ok_json(&sim.generate_mailbox(*u, spec))
        }
        ("POST", ["login-user"]) => {
            let b: Value = body(req)?;
            sim.set_login_user(b["user"].as_str().unwrap_or(""));
            no_content()
        }
        ("POST", ["sign-in-as"]) => {
            let b: Value = body(req)?;
            match b["user"].as_str() {
                Some(user) => sim.sign_in_as(user),
                None => sim.clear_sign_in_as(),
            }
            no_content()
        }
        ("POST", ["faults"]) => {
            let rule: FaultRule = body(req)?;
            ok_json(&json!({"id": sim.set_fault(rule)}))
        }
        ("GET", ["faults"]) => ok_json(
            &sim.faults()
                .into_iter()
                .map(|(id, rule)| json!({"id": id, "rule": rule}))
                .collect::<Vec<_>>(),
        ),
        ("DELETE", ["faults"]) => {
            sim.clear_faults();
            no_content()
        }
        ("DELETE", ["faults", id]) => {
            let id: u64 = id.parse().map_err(|_| err(400, "bad fault id"))?;
            if !sim.remove_fault(&FaultId(id)) {
                return Err(err(404, "unknown fault"));
            }
            no_content()
        }
        ("POST", ["settings"]) => {
            let b: Settings = body(req)?;
            if let Some(s) = b.access_token_lifetime_secs {
                sim.set_access_token_lifetime(s);
            }
            if let Some(a) = b.auto_consent {
                sim.set_auto_consent(a);
            }
            if let Some(d) = b.sent_items_delay_ms {
                sim.set_sent_items_delay(StdDuration::from_millis(d));
            }
            no_content()
        }
        ("POST", ["clock", "advance"]) => {
            let b: Value = body(req)?;
            let secs = b["seconds"].as_f64().unwrap_or(0.0).max(0.0);
            sim.advance_clock(StdDuration::from_secs_f64(secs));
            no_content()
        }
        ("GET", ["subscriptions"]) => ok_json(&sim.subscriptions()),
        ("POST", ["subscriptions", id, "lifecycle"]) => {
            #[derive(Deserialize)]
            struct B {
                event: LifecycleEvent,
            }
            let b: B = body(req)?;
            if !sim.fire_lifecycle_event(id, b.event) {
                return Err(err(
                    404,
                    "unknown subscription or no lifecycleNotificationUrl",
                ));
            }
            no_content()
        }
        ("GET", ["stats"]) => ok_json(&sim.stats()),
        ("GET", ["sends"]) => ok_json(&sim.sends()),
        ("GET", ["log"]) => ok_json(&sim.request_log()),
        ("GET", ["notifications"]) => ok_json(&sim.notifications()),
        _ => return Err(err(404, format!("no control route {m} {}", req.path))),
    })
}
