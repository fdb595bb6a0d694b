//! Subscriptions (`/subscriptions`), the validation handshake, and delivery of change and
//! lifecycle notifications.

use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::GraphSim;
use crate::graph::{Classified, View};
use crate::model::{FaultKind, NotificationRecord};
use crate::odata::parse_datetime;
use crate::server::{Ctx, SimRequest, SimResponse, split_path};
use crate::state::{AccessGrant, Outgoing, Phase, Subscription, fmt_dt_offset};

/// Items, change types and lifecycle event of one POST.
type Batch = (Vec<Value>, Vec<String>, Option<String>);

/// Background loop: makes late Sent Items copies visible and posts queued notifications.
pub(crate) async fn pump(sim: GraphSim, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = sim.inner.wake.notified() => {}
            _ = tokio::time::sleep(StdDuration::from_millis(50)) => {}
            _ = stop.changed() => return,
        }
        let outgoing = {
            let mut st = sim.lock();
            st.materialize_pending();
            std::mem::take(&mut st.outbox)
        };
        if outgoing.is_empty() {
            continue;
        }
        // Graph batches several changes of one subscription into one POST.
        let mut batches: BTreeMap<(String, String), Batch> = BTreeMap::new();
        for o in outgoing {
            match o {
                Outgoing::Change {
                    sub_id,
                    url,
                    item,
                    change,
                } => {
                    let e = batches.entry((sub_id, url)).or_default();
                    e.0.push(item);
                    e.1.push(change);
                }
                Outgoing::Lifecycle {
                    sub_id,
                    url,
                    item,
                    event,
                } => {
                    let e = batches
                        .entry((format!("{sub_id}#{event}"), url))
                        .or_default();
                    e.0.push(item);
                    e.2 = Some(event);
                }
            }
        }
        for ((sub_key, url), (items, changes, event)) in batches {
            let sim = sim.clone();
            let sub_id = sub_key.split('#').next().unwrap_or("").to_string();
            tokio::spawn(async move {
                deliver(sim, sub_id, url, items, changes, event).await;
            });
        }
    }
}

async fn deliver(
    sim: GraphSim,
    sub_id: String,
    url: String,
    items: Vec<Value>,
    changes: Vec<String>,
    event: Option<String>,
) {
    let body = json!({"value": items}).to_string();
    // Contract §7: the receiver answers within 3 s; a later answer counts as a failure.
    let timeout = StdDuration::from_millis(sim.lock().cfg.notification_timeout_ms);
    for attempt in 1..=4u32 {
        let res = sim
            .inner
            .http
            .post(&url)
            .header("Content-Type", "application/json; charset=utf-8")
            .body(body.clone())
            .timeout(timeout)
            .send()
            .await;
        let status = res.as_ref().ok().map(|r| r.status().as_u16());
        {
            let mut st = sim.lock();
            let time = st.now();
            st.stats.notifications += 1;
            st.notifications.push(NotificationRecord {
                subscription_id: sub_id.clone(),
                url: url.clone(),
                status,
                items: items.len(),
                lifecycle_event: event.clone(),
                change_types: changes.clone(),
                time,
                attempt,
            });
        }
        match status {
            Some(s) if s < 500 => return,
            _ => tokio::time::sleep(StdDuration::from_millis(250 * u64::from(attempt))).await,
        }
    }
}

/// Sends Graph's validation request and checks the echo.
async fn validate(sim: &GraphSim, url: &str, timeout: StdDuration) -> Result<(), String> {
    let token = format!(
        "Validation: Testing client application reachability for subscription Request-Id: {}",
        uuid::Uuid::new_v4()
    );
    let encoded: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
    let sep = if url.contains('?') { '&' } else { '?' };
    let full = format!("{url}{sep}validationToken={encoded}");
    let res = sim
        .inner
        .http
        .post(&full)
        .header("Content-Type", "text/plain; charset=utf-8")
        .body("")
        .timeout(timeout)
        .send()
        .await;
    let res = match res {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Err("Subscription validation request timed out.".into()),
        Err(_) => {
            return Err(
                "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request."
                    .into(),
            );
        }
    };
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let body = res.text().await.unwrap_or_default();
    if status != 200 {
        return Err(format!(
            "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request. Response status code: {status}."
        ));
    }
    if !ct.starts_with("text/plain") {
        return Err(
            "Subscription validation request failed. Response must have Content-Type text/plain."
                .into(),
        );
    }
    if body != token {
        return Err("Subscription validation request failed. Response must exactly match validationToken query parameter.".into());
    }
    Ok(())
}

fn sub_json(s: &Subscription, base: &str, client_id: &str) -> Value {
    json!({
        "@odata.context": format!("{base}/v1.0/$metadata#subscriptions/$entity"),
        "id": s.id,
        "resource": s.resource,
        "applicationId": client_id,
        "changeType": s.change_type,
        "clientState": s.client_state,
        "notificationUrl": s.notification_url,
        "notificationQueryOptions": null,
        "lifecycleNotificationUrl": s.lifecycle_url,
        "expirationDateTime": fmt_dt_offset(s.expiration),
        "creatorId": s.user_id,
        "includeResourceData": null,
        "latestSupportedTlsVersion": "v1_2",
        "encryptionCertificate": null,
        "encryptionCertificateId": null,
        "notificationUrlAppId": null,
    })
}

impl GraphSim {
    fn check_expiration(&self, ctx: &Ctx, v: &Value) -> Result<DateTime<Utc>, SimResponse> {
        let Some(exp) = v["expirationDateTime"].as_str().and_then(parse_datetime) else {
            return Err(ctx.error(
                400,
                "InvalidRequest",
                "expirationDateTime is required and must be a valid DateTimeOffset.",
            ));
        };
        let (now, max) = {
            let st = self.lock();
            (st.now(), st.cfg.max_subscription_minutes)
        };
        if exp <= now {
            return Err(ctx.error(
                400,
                "ExtensionError",
                "Subscription expiration must be in the future.",
            ));
        }
        if exp > now + Duration::minutes(max) + Duration::seconds(60) {
            return Err(ctx.error(
                400,
                "ExtensionError",
                &format!("Subscription expiration can only be {max} minutes in the future."),
            ));
        }
        Ok(exp)
    }

    pub(crate) async fn subscription_route(
        &self,
        req: &SimRequest,
        ctx: &Ctx,
        cls: &Classified,
        grant: &AccessGrant,
        view: &View,
    ) -> SimResponse {
        let id = cls.params.first().cloned().unwrap_or_default();
        let client_id = self.client_id();
        let not_found = || {
            ctx.error(
                404,
                "ResourceNotFound",
                &format!("The object was not found. Subscription '{id}'."),
            )
        };
        match (req.method.as_str(), cls.template.as_str()) {
            ("GET", "/subscriptions") => {
                let st = self.lock();
                let v: Vec<Value> = st
                    .subs
                    .values()
                    .filter(|s| s.user_id == grant.user_id)
                    .map(|s| sub_json(s, &view.base, &client_id))
                    .collect();
                SimResponse::json(
                    200,
                    json!({"@odata.context": format!("{}/v1.0/$metadata#subscriptions", view.base), "value": v}),
                )
            }
            ("GET", "/subscriptions/{id}") => match self.lock().subs.get(&id) {
                Some(s) => SimResponse::json(200, sub_json(s, &view.base, &client_id)),
                None => not_found(),
            },
            ("DELETE", "/subscriptions/{id}") => match self.lock().subs.remove(&id) {
                Some(_) => SimResponse::empty(204),
                None => not_found(),
            },
            ("POST", "/subscriptions/{id}/reauthorize") => {
                if self.lock().subs.contains_key(&id) {
                    SimResponse::empty(200)
                } else {
                    not_found()
                }
            }
            ("PATCH", "/subscriptions/{id}") => {
                // An expired subscription is gone (see `drop_expired_subscriptions`): renewing
                // it is a 404 whatever the body says, and the client has to create a new one.
                if !self.lock().subs.contains_key(&id) {
                    return not_found();
                }
                let Ok(body) = req.json() else {
                    return ctx.error(400, "InvalidRequest", "Invalid JSON.");
                };
                let exp = match self.check_expiration(ctx, &body) {
                    Ok(e) => e,
                    Err(r) => return r,
                };
                let mut st = self.lock();
                match st.subs.get_mut(&id) {
                    Some(s) => {
                        s.expiration = exp;
                        SimResponse::json(200, sub_json(s, &view.base, &client_id))
                    }
                    None => not_found(),
                }
            }
            ("POST", "/subscriptions") => self.create_subscription(req, ctx, grant, view).await,
            (m, _) => ctx.error(
                405,
                "Request_BadRequest",
                &format!("The HTTP method '{m}' is not allowed for this resource."),
            ),
        }
    }

    async fn create_subscription(
        &self,
        req: &SimRequest,
        ctx: &Ctx,
        grant: &AccessGrant,
        view: &View,
    ) -> SimResponse {
        let Ok(body) = req.json() else {
            return ctx.error(400, "InvalidRequest", "Invalid JSON.");
        };
        let change_type = body["changeType"].as_str().unwrap_or("").to_string();
        if change_type.is_empty()
            || !change_type
                .split(',')
                .all(|c| ["created", "updated", "deleted"].contains(&c.trim()))
        {
            return ctx.error(
                400,
                "InvalidRequest",
                &format!("'{change_type}' is not a valid changeType."),
            );
        }
        let Some(url) = body["notificationUrl"].as_str().map(str::to_string) else {
            return ctx.error(400, "InvalidRequest", "notificationUrl is required.");
        };
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return ctx.error(
                400,
                "InvalidRequest",
                "The notificationUrl must be an absolute https URL.",
            );
        }
        let lifecycle_url = body["lifecycleNotificationUrl"]
            .as_str()
            .map(str::to_string);
        let client_state = body["clientState"].as_str().map(str::to_string);
        if client_state
            .as_ref()
            .is_some_and(|c| c.chars().count() > 128)
        {
            return ctx.error(
                400,
                "InvalidRequest",
                "clientState must be at most 128 characters.",
            );
        }
        let resource = body["resource"].as_str().unwrap_or("").to_string();
        let exp = match self.check_expiration(ctx, &body) {
            Ok(e) => e,
            Err(r) => return r,
        };
        // me/mailFolders('Inbox')/messages, users/{id}/messages, ...
        let segs = split_path(&resource);
        let s: Vec<&str> = segs.iter().map(String::as_str).collect();
        let eqi = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        let (user_key, tail): (String, &[&str]) = match s.as_slice() {
            [me, rest @ ..] if eqi(me, "me") => (grant.user_id.clone(), rest),
            [u, k, rest @ ..] if eqi(u, "users") => (k.to_string(), rest),
            _ => {
                return ctx.error(
                    400,
                    "InvalidRequest",
                    &format!("Resource '{resource}' is not supported."),
                );
            }
        };
        let (user_id, tenant_id, folder_id) = {
            let st = self.lock();
            let Some(i) = st.user_idx(&user_key) else {
                return ctx.error(
                    400,
                    "InvalidRequest",
                    &format!("Resource '{resource}' is not supported."),
                );
            };
            let u = &st.users[i];
            if u.user.id != grant.user_id && !u.mailbox.delegates.contains(&grant.user_id) {
                return ctx.error(403, "ExtensionError", "Access is denied.");
            }
            let folder = match tail {
                [m] if eqi(m, "messages") => None,
                [mf, f, m] if eqi(mf, "mailFolders") && eqi(m, "messages") => {
                    match u.mailbox.folder_id(f) {
                        Some(id) => Some(id),
                        None => {
                            return ctx.error(
                                404,
                                "ExtensionError",
                                "The specified folder could not be found in the store.",
                            );
                        }
                    }
                }
                _ => {
                    return ctx.error(
                        400,
                        "InvalidRequest",
                        &format!("Resource '{resource}' is not supported."),
                    );
                }
            };
            (u.user.id.clone(), u.user.tenant_id.clone(), folder)
        };
        let (timeout_fault, timeout) = {
            let mut st = self.lock();
            let f = st.take_faults(
                Phase::SubscriptionCreate,
                "POST",
                &req.path_and_query(),
                Some(&user_id),
            );
            (
                f.iter()
                    .any(|k| matches!(k, FaultKind::SubscriptionValidationTimeout)),
                StdDuration::from_millis(st.cfg.subscription_validation_timeout_ms),
            )
        };
        if timeout_fault {
            return ctx.error(
                400,
                "ValidationError",
                "Subscription validation request timed out.",
            );
        }
        for u in std::iter::once(&url).chain(lifecycle_url.iter()) {
            if let Err(msg) = validate(self, u, timeout).await {
                return ctx.error(400, "ValidationError", &msg);
            }
        }
        let mut st = self.lock();
        let id = st.guid();
        let sub = Subscription {
            id: id.clone(),
            user_id,
            folder_id,
            resource,
            change_type,
            notification_url: url,
            lifecycle_url,
            client_state,
            expiration: exp,
            immutable: view.imm,
            tenant_id,
        };
        let j = sub_json(&sub, &view.base, &st.cfg.client_id);
        st.subs.insert(id, sub);
        SimResponse::json(201, j)
    }
}
