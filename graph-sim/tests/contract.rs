//! The simulator held to the Graph contract, over real HTTP.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use graph_sim::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const SCOPES: &[&str] = &["offline_access", "User.Read", "Mail.ReadWrite", "Mail.Send"];

struct Env {
    sim: GraphSim,
    user: SimUser,
    token: String,
    http: reqwest::Client,
}

async fn env_with(cfg: SimConfig) -> Env {
    let sim = GraphSim::start(cfg).await.expect("start");
    let tenant = sim.create_tenant("contoso.onmicrosoft.com", "Contoso");
    let user = sim.create_user(
        &tenant,
        "support@contoso.onmicrosoft.com",
        "Contoso Support",
    );
    let token = sim.issue_tokens_for(&user, SCOPES).access_token;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    Env {
        sim,
        user,
        token,
        http,
    }
}

async fn env() -> Env {
    env_with(SimConfig::default()).await
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.sim.graph_base_url(), path)
    }
    async fn get(&self, path_or_url: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.send(reqwest::Method::GET, path_or_url, None, &[])
            .await
    }
    async fn send(
        &self,
        method: reqwest::Method,
        path_or_url: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let url = if path_or_url.starts_with("http") {
            path_or_url.to_string()
        } else {
            self.url(path_or_url)
        };
        let mut rb = self.http.request(method, url).bearer_auth(&self.token);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request");
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, headers, v)
    }
    fn deliver(&self, subject: &str) -> DeliveredMessage {
        self.sim.deliver(
            &self.user,
            InboundMail::new("customer@example.com", subject)
                .from_name("Cora Customer")
                .text("Hello, please help."),
        )
    }
}

fn assert_graph_error(v: &Value, code: &str) {
    assert_eq!(v["error"]["code"], code, "body: {v}");
    assert!(v["error"]["message"].is_string(), "body: {v}");
    let inner = &v["error"]["innerError"];
    for k in ["date", "request-id", "client-request-id"] {
        assert!(inner[k].is_string(), "innerError.{k} missing in {v}");
    }
}

#[tokio::test]
async fn paging_follows_absolute_next_links() {
    let e = env().await;
    for i in 0..25 {
        e.deliver(&format!("message {i}"));
    }
    let mut url = e.url("/me/mailFolders/inbox/messages?$top=10&$select=subject");
    let mut ids = HashSet::new();
    let mut pages = 0;
    loop {
        let (s, _, v) = e.get(&url).await;
        assert_eq!(s, 200);
        pages += 1;
        for m in v["value"].as_array().unwrap() {
            assert!(ids.insert(m["id"].as_str().unwrap().to_string()));
            assert!(m.get("body").is_none(), "$select must limit fields");
        }
        match v["@odata.nextLink"].as_str() {
            Some(n) => {
                assert!(
                    n.starts_with(&e.sim.base_url()),
                    "nextLink must be absolute: {n}"
                );
                url = n.to_string();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 25);
    let (s, _, v) = e.get("/me/mailFolders/inbox/messages").await;
    assert_eq!(s, 200);
    assert_eq!(
        v["value"].as_array().unwrap().len(),
        10,
        "default page is 10"
    );
    let (s, _, v) = e.get("/me/mailFolders/inbox/messages?$top=1001").await;
    assert_eq!(s, 400);
    assert_graph_error(&v, "ErrorInvalidArgument");
}

async fn delta_to_end(
    e: &Env,
    mut url: String,
    prefer: &[(&str, &str)],
) -> (Vec<Value>, String, usize) {
    let mut items = vec![];
    let mut pages = 0;
    loop {
        let (s, _, v) = e.send(reqwest::Method::GET, &url, None, prefer).await;
        assert_eq!(s, 200, "delta page: {v}");
        pages += 1;
        items.extend(v["value"].as_array().unwrap().iter().cloned());
        let next = v["@odata.nextLink"].as_str();
        let delta = v["@odata.deltaLink"].as_str();
        assert!(
            next.is_some() != delta.is_some(),
            "exactly one of nextLink/deltaLink: {v}"
        );
        if let Some(n) = next {
            url = n.to_string();
        } else {
            return (items, delta.unwrap().to_string(), pages);
        }
    }
}

#[tokio::test]
async fn delta_rounds_report_created_updated_and_removed() {
    let e = env().await;
    let a = e.deliver("a");
    let b = e.deliver("b");
    let c = e.deliver("c");
    let page2 = [("Prefer", "odata.maxpagesize=2")];
    let (items, delta_link, pages) =
        delta_to_end(&e, e.url("/me/mailFolders/inbox/messages/delta"), &page2).await;
    assert_eq!(items.len(), 3);
    assert_eq!(pages, 2);
    assert!(delta_link.starts_with(&e.sim.base_url()));

    // Nothing changed: an empty round.
    let (items, delta_link, _) = delta_to_end(&e, delta_link, &[]).await;
    assert!(items.is_empty(), "{items:?}");

    let d = e.deliver("d");
    let (items, delta_link, _) = delta_to_end(&e, delta_link, &[]).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], d.id);
    assert_eq!(items[0]["subject"], "d", "created items come whole");

    e.sim.set_read(&e.user, &a.id, true).unwrap();
    let (items, delta_link, _) = delta_to_end(&e, delta_link, &[]).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], a.id);
    assert_eq!(items[0]["isRead"], true);
    assert!(
        items[0].get("subject").is_none(),
        "updates are partial: {}",
        items[0]
    );

    e.sim.move_message(&e.user, &b.id, "archive");
    e.sim.delete_message(&e.user, &c.id).unwrap();
    let (items, _, _) = delta_to_end(&e, delta_link, &[]).await;
    assert_eq!(items.len(), 2, "{items:?}");
    let by_id: HashMap<String, &Value> = items
        .iter()
        .map(|i| (i["id"].as_str().unwrap().to_string(), i))
        .collect();
    assert_eq!(by_id[&b.id]["@removed"]["reason"], "changed");
    assert_eq!(by_id[&c.id]["@removed"]["reason"], "deleted");
}

#[tokio::test]
async fn evicted_delta_token_and_stale_next_link_give_410() {
    let e = env_with(SimConfig {
        delta_generations_kept: 2,
        ..SimConfig::default()
    })
    .await;
    for i in 0..5 {
        e.deliver(&format!("m{i}"));
    }
    let start = e.url("/me/mailFolders/inbox/messages/delta");
    let (_, d1, _) = delta_to_end(&e, start.clone(), &[]).await;
    let (_, d2, _) = delta_to_end(&e, d1.clone(), &[]).await;
    let (s, _, _) = e.get(&d1).await;
    assert_eq!(s, 200, "still within the kept generations");
    let (_, d3, _) = delta_to_end(&e, d2.clone(), &[]).await;
    let (_, _d4, _) = delta_to_end(&e, d3.clone(), &[]).await;
    let (s, _, v) = e.get(&d1).await;
    assert_eq!(s, 410);
    assert_graph_error(&v, "SyncStateNotFound");

    // A nextLink may be retried, but not after a later page was fetched.
    let pref = [("Prefer", "odata.maxpagesize=2")];
    let (_, _, v) = e.send(reqwest::Method::GET, &start, None, &pref).await;
    let n1 = v["@odata.nextLink"].as_str().unwrap().to_string();
    let (s, _, v) = e.send(reqwest::Method::GET, &n1, None, &pref).await;
    assert_eq!(s, 200);
    let (s, _, _) = e.send(reqwest::Method::GET, &n1, None, &pref).await;
    assert_eq!(s, 200, "retrying the newest nextLink is fine");
    let n2 = v["@odata.nextLink"].as_str().unwrap().to_string();
    let (s, _, _) = e.send(reqwest::Method::GET, &n2, None, &pref).await;
    assert_eq!(s, 200);
    let (s, _, v) = e.send(reqwest::Method::GET, &n1, None, &pref).await;
    assert_eq!(s, 410);
    assert_graph_error(&v, "SyncStateNotFound");

    // Evicting on demand.
    e.sim.evict_delta_tokens(&e.user);
    let (s, _, _) = e.get(&d3).await;
    assert_eq!(s, 410);
}

#[tokio::test]
async fn expired_or_unknown_token_gets_401_with_challenge() {
    let e = env().await;
    let (s, h, _) = e.get("/me").await;
    assert_eq!(s, 200);
    assert!(h.contains_key("request-id"));
    e.sim.advance_clock(Duration::from_secs(3600));
    let (s, h, v) = e.get("/me/mailFolders/inbox/messages").await;
    assert_eq!(s, 401);
    assert_graph_error(&v, "InvalidAuthenticationToken");
    assert_eq!(
        v["error"]["message"],
        "Access token has expired or is not yet valid."
    );
    let www = h["www-authenticate"].to_str().unwrap();
    assert!(www.starts_with("Bearer realm=\"\""), "{www}");
    assert!(
        www.contains("authorization_uri=\"") && www.contains("client_id=\""),
        "{www}"
    );
    assert!(h.contains_key("request-id"));

    let r = e
        .http
        .get(e.url("/me"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
}

fn pkce() -> (String, String) {
    let verifier = format!(
        "verifier-{}-0123456789abcdefghijklmnopqrstuvwxyz",
        uuid_like()
    );
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn authorize(e: &Env, challenge: &str, state: &str) -> reqwest::Response {
    let cfg = e.sim.config();
    e.http
        .get(format!("{}/common/oauth2/v2.0/authorize", e.sim.base_url()))
        .query(&[
            ("client_id", cfg.client_id.as_str()),
            ("response_type", "code"),
            ("redirect_uri", cfg.redirect_uris[0].as_str()),
            (
                "scope",
                "offline_access Mail.ReadWrite Mail.Send User.Read openid",
            ),
            ("state", state),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap()
}

async fn code_from(e: &Env, challenge: &str) -> String {
    let r = authorize(e, challenge, "st-1").await;
    assert_eq!(r.status(), 302);
    let loc = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let q: HashMap<_, _> = loc.query_pairs().into_owned().collect();
    assert_eq!(q["state"], "st-1");
    q["code"].clone()
}

async fn token(e: &Env, form: &[(&str, &str)], basic: bool) -> (StatusCode, Value) {
    let cfg = e.sim.config();
    let mut form: Vec<(&str, &str)> = form.to_vec();
    let mut rb = e
        .http
        .post(format!("{}/common/oauth2/v2.0/token", e.sim.base_url()));
    if basic {
        rb = rb.basic_auth(&cfg.client_id, Some(&cfg.client_secret));
    } else {
        form.push(("client_id", &cfg.client_id));
        form.push(("client_secret", &cfg.client_secret));
    }
    let r = rb.form(&form).send().await.unwrap();
    (r.status(), r.json().await.unwrap())
}

fn assert_aad_error(v: &Value, error: &str, code: u64) {
    assert_eq!(v["error"], error, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .starts_with(&format!("AADSTS{code}: ")),
        "{v}"
    );
    assert_eq!(v["error_codes"], json!([code]));
    for k in ["timestamp", "trace_id", "correlation_id"] {
        assert!(v[k].is_string(), "{k} missing: {v}");
    }
}

#[tokio::test]
async fn auth_code_flow_checks_pkce_single_use_and_rotates_refresh_tokens() {
    let e = env().await;
    let redirect = e.sim.config().redirect_uris[0].clone();

    let (_, challenge) = pkce();
    let code = code_from(&e, &challenge).await;
    let (s, v) = token(
        &e,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &redirect),
            (
                "code_verifier",
                "wrong-verifier-wrong-verifier-wrong-verifier",
            ),
        ],
        false,
    )
    .await;
    assert_eq!(s, 400);
    assert_aad_error(&v, "invalid_grant", 501481);

    let (verifier, challenge) = pkce();
    let code = code_from(&e, &challenge).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", redirect.as_str()),
        ("code_verifier", verifier.as_str()),
    ];
    let (s, v) = token(&e, &form, true).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3599);
    assert!(v["id_token"].is_string() && v["scope"].is_string());
    let rt1 = v["refresh_token"].as_str().unwrap().to_string();
    let at = v["access_token"].as_str().unwrap().to_string();
    let r = e
        .http
        .get(e.url("/me"))
        .bearer_auth(&at)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let me: Value = r.json().await.unwrap();
    assert_eq!(me["userPrincipalName"], e.user.upn);

    let (s, v) = token(&e, &form, false).await;
    assert_eq!(s, 400);
    assert_aad_error(&v, "invalid_grant", 54005);

    let (s, v) = token(
        &e,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
        false,
    )
    .await;
    assert_eq!(s, 200);
    let rt2 = v["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rt1, rt2, "every refresh rotates");
    let (s, v) = token(
        &e,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
        false,
    )
    .await;
    assert_eq!(s, 200, "the old refresh token is not revoked at once");
    assert_ne!(v["refresh_token"], rt2.as_str());

    // Wrong secret: 401 invalid_client.
    let cfg = e.sim.config();
    let r = e
        .http
        .post(format!("{}/common/oauth2/v2.0/token", e.sim.base_url()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt2.as_str()),
            ("client_id", cfg.client_id.as_str()),
            ("client_secret", "nope"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_aad_error(&r.json().await.unwrap(), "invalid_client", 7000215);

    e.sim.revoke_refresh_tokens(&e.user, 65001);
    let (s, v) = token(
        &e,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
        false,
    )
    .await;
    assert_eq!(s, 400);
    assert_aad_error(&v, "invalid_grant", 65001);
    assert_eq!(v["suberror"], "consent_required");
    e.sim.revoke_refresh_tokens(&e.user, 50076);
    let (_, v) = token(
        &e,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
        false,
    )
    .await;
    assert_aad_error(&v, "interaction_required", 50076);

    let stats = e.sim.stats();
    assert_eq!(stats.token_requests("authorization_code"), 3);
    assert_eq!(stats.token_requests("refresh_token"), 5);
}

#[tokio::test]
async fn authorize_can_deny_and_checks_redirect_uri() {
    let e = env().await;
    e.sim.set_auto_consent(false);
    let r = authorize(&e, "x", "st-9").await;
    assert_eq!(r.status(), 302);
    let loc = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let q: HashMap<_, _> = loc.query_pairs().into_owned().collect();
    assert_eq!(q["error"], "access_denied");
    assert!(q["error_description"].starts_with("AADSTS"));
    assert_eq!(q["state"], "st-9");
    let r = e
        .http
        .get(format!("{}/common/oauth2/v2.0/authorize", e.sim.base_url()))
        .query(&[
            ("client_id", e.sim.client_id().as_str()),
            ("response_type", "code"),
            ("redirect_uri", "http://evil.example/cb"),
            ("scope", "Mail.Read"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "unregistered redirect_uri never redirects");
}

#[tokio::test]
async fn fifth_concurrent_request_on_a_mailbox_is_throttled() {
    let e = env().await;
    e.deliver("x");
    e.sim.set_fault(
        FaultRule::new(FaultKind::Delay { millis: 1500 })
            .mailbox(&e.user.upn)
            .path("/messages"),
    );
    let e = Arc::new(e);
    let mut handles = vec![];
    for _ in 0..8 {
        let e = e.clone();
        handles.push(tokio::spawn(async move {
            e.get("/me/mailFolders/inbox/messages").await
        }));
    }
    let mut ok = 0;
    let mut throttled = 0;
    for h in handles {
        let (s, h, v) = h.await.unwrap();
        match s.as_u16() {
            200 => ok += 1,
            429 => {
                throttled += 1;
                assert_graph_error(&v, "ApplicationThrottled");
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("MailboxConcurrency")
                );
                assert!(h.contains_key("retry-after"));
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 4, "exactly the limit gets through");
    assert_eq!(throttled, 4);
    assert!(e.sim.stats().max_concurrency_for(&e.user.upn) >= 5);
}

#[tokio::test]
async fn request_budget_per_mailbox_gives_too_many_requests() {
    let e = env_with(SimConfig {
        mailbox_budget_per_10_min: 3,
        ..SimConfig::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(e.get("/me/mailFolders/inbox/messages").await.0, 200);
    }
    let (s, h, v) = e.get("/me/mailFolders/inbox/messages").await;
    assert_eq!(s, 429);
    assert_graph_error(&v, "TooManyRequests");
    let ra: f64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(ra > 0.0);
}

#[tokio::test]
async fn reply_draft_flow_lands_in_sent_items_with_its_internet_message_id() {
    let e = env().await;
    let inbound = e.sim.deliver(
        &e.user,
        InboundMail::new("customer@example.com", "Printer broken")
            .text("It is on fire")
            .message_id("<orig-1@example.com>"),
    );
    let path = format!("/me/messages/{}/createReply", inbound.id);
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            &path,
            Some(json!({"comment": "x", "message": {"subject": "y"}})),
            &[],
        )
        .await;
    assert_eq!(s, 400, "comment and message together are rejected");
    assert!(v["error"]["code"].is_string());

    let (s, _, draft) = e
        .send(
            reqwest::Method::POST,
            &path,
            Some(json!({"comment": "On it."})),
            &[],
        )
        .await;
    assert_eq!(s, 201, "{draft}");
    assert_eq!(draft["isDraft"], true);
    assert_eq!(draft["subject"], "RE: Printer broken");
    assert_eq!(draft["conversationId"], inbound.conversation_id.as_str());
    assert_eq!(
        draft["toRecipients"][0]["emailAddress"]["address"],
        "customer@example.com"
    );
    let imid = draft["internetMessageId"].as_str().unwrap().to_string();
    assert!(imid.starts_with('<') && imid.contains('@'));
    let draft_id = draft["id"].as_str().unwrap().to_string();

    let (s, _, v) = e
        .send(
            reqwest::Method::PATCH,
            &format!("/me/messages/{draft_id}"),
            Some(json!({"body": {"contentType": "html", "content": "<p>Fixed.</p>"}})),
            &[],
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["body"]["content"], "<p>Fixed.</p>");
    let (s, _, _) = e
        .send(
            reqwest::Method::PATCH,
            &format!("/me/messages/{}", inbound.id),
            Some(json!({"subject": "nope"})),
            &[],
        )
        .await;
    assert_eq!(s, 400, "subject only while isDraft");

    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            &format!("/me/messages/{draft_id}/send"),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 202);
    assert!(v.is_null(), "send answers an empty body");
    let (s, _, _) = e.get(&format!("/me/messages/{draft_id}")).await;
    assert_eq!(s, 404, "the draft has left Drafts");

    let filter = format!("internetMessageId eq '{imid}'");
    let url = format!(
        "{}?$filter={}&$select=subject,internetMessageId,isDraft,internetMessageHeaders",
        e.url("/me/mailFolders/sentitems/messages"),
        urlencode(&filter)
    );
    let (s, _, v) = e.get(&url).await;
    assert_eq!(s, 200, "{v}");
    let found = v["value"].as_array().unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["isDraft"], false);
    assert!(
        found[0].get("internetMessageHeaders").is_none(),
        "sent items lack internet headers"
    );

    let sends = e.sim.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].draft_id.as_deref(), Some(draft_id.as_str()));
    assert_eq!(sends[0].internet_message_id, imid);
    assert_eq!(
        sends[0].in_reply_to.as_deref(),
        Some("<orig-1@example.com>")
    );
    assert_eq!(sends[0].sent_message_id.as_deref(), found[0]["id"].as_str());
    assert_eq!(e.sim.sent_items(&e.user).len(), 1);
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[tokio::test]
async fn sent_items_copy_can_appear_late() {
    let e = env().await;
    e.sim.set_sent_items_delay(Duration::from_millis(800));
    let t0 = Instant::now();
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            "/me/sendMail",
            Some(json!({"message": {
                "subject": "Hello",
                "body": {"contentType": "text", "content": "hi"},
                "toRecipients": [{"emailAddress": {"address": "someone@example.com"}}],
            }, "saveToSentItems": true})),
            &[],
        )
        .await;
    assert_eq!(s, 202);
    assert!(v.is_null());
    let imid = e.sim.sends()[0].internet_message_id.clone();
    let url = format!(
        "{}?$filter={}",
        e.url("/me/mailFolders/sentitems/messages"),
        urlencode(&format!("internetMessageId eq '{imid}'"))
    );
    let (_, _, v) = e.get(&url).await;
    assert_eq!(v["value"].as_array().unwrap().len(), 0, "not there yet");
    loop {
        let (_, _, v) = e.get(&url).await;
        if v["value"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t0.elapsed() >= Duration::from_millis(700));
}

type Received = Arc<Mutex<Vec<Value>>>;

/// A notification receiver; `decode` = answer the URL-decoded token (correct) or the raw one.
async fn receiver(decode: bool) -> (String, Received) {
    use poem::{EndpointExt, Route, handler, post};

    #[handler]
    async fn hook(req: &poem::Request, body: poem::Body) -> poem::Response {
        let (store, decode) = req.data::<(Received, bool)>().unwrap().clone();
        let q = req.uri().query().unwrap_or("");
        // Answer the handshake before touching the body, as the contract asks.
        if let Some(raw) = q
            .split('&')
            .find_map(|p| p.strip_prefix("validationToken="))
        {
            let token = if decode {
                url::form_urlencoded::parse(format!("t={raw}").as_bytes())
                    .next()
                    .unwrap()
                    .1
                    .into_owned()
            } else {
                raw.to_string()
            };
            return poem::Response::builder()
                .content_type("text/plain")
                .body(token);
        }
        let bytes = body.into_vec().await.unwrap_or_default();
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            store.lock().unwrap().push(v);
        }
        poem::Response::builder()
            .status(poem::http::StatusCode::ACCEPTED)
            .finish()
    }

    let store: Received = Arc::new(Mutex::new(vec![]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
    let app = Route::new().at("/hook", post(hook).data((store.clone(), decode)));
    tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor).run(app).await;
    });
    (format!("http://{addr}/hook"), store)
}

#[tokio::test]
async fn subscription_validation_notifications_and_lifecycle() {
    let e = env().await;
    let (url, store) = receiver(true).await;
    let exp = (chrono::Utc::now() + chrono::Duration::minutes(60)).to_rfc3339();
    let too_far = (chrono::Utc::now() + chrono::Duration::minutes(4300)).to_rfc3339();
    let body = |exp: &str, url: &str| {
        json!({
            "changeType": "created",
            "notificationUrl": url,
            "lifecycleNotificationUrl": url,
            "resource": "me/mailFolders('Inbox')/messages",
            "expirationDateTime": exp,
            "clientState": "secret-state",
        })
    };
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            "/subscriptions",
            Some(body(&too_far, &url)),
            &[],
        )
        .await;
    assert_eq!(s, 400);
    assert_graph_error(&v, "ExtensionError");

    let (s, _, sub) = e
        .send(
            reqwest::Method::POST,
            "/subscriptions",
            Some(body(&exp, &url)),
            &[],
        )
        .await;
    assert_eq!(s, 201, "{sub}");
    assert_eq!(sub["clientState"], "secret-state");
    let sub_id = sub["id"].as_str().unwrap().to_string();

    let d = e.deliver("notify me");
    let t0 = Instant::now();
    let note = loop {
        if let Some(v) = store.lock().unwrap().first().cloned() {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no notification");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let item = &note["value"][0];
    assert_eq!(item["subscriptionId"], sub_id.as_str());
    assert_eq!(item["clientState"], "secret-state");
    assert_eq!(item["changeType"], "created");
    assert_eq!(item["resourceData"]["id"], d.id.as_str());
    assert_eq!(
        item["resource"],
        format!("Users/{}/Messages/{}", e.user.id, d.id).as_str()
    );

    assert!(e.sim.fire_lifecycle_event(&sub_id, LifecycleEvent::Missed));
    let t0 = Instant::now();
    loop {
        let got = store
            .lock()
            .unwrap()
            .iter()
            .any(|v| v["value"][0]["lifecycleEvent"] == "missed");
        if got {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no lifecycle event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (s, _, v) = e
        .send(
            reqwest::Method::PATCH,
            &format!("/subscriptions/{sub_id}"),
            Some(json!({"expirationDateTime": exp})),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _, _) = e
        .send(
            reqwest::Method::DELETE,
            &format!("/subscriptions/{sub_id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 204);

    // A receiver that echoes the still-encoded token fails validation (the token has spaces).
    let (raw_url, _) = receiver(false).await;
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            "/subscriptions",
            Some(body(&exp, &raw_url)),
            &[],
        )
        .await;
    assert_eq!(s, 400);
    assert_graph_error(&v, "ValidationError");

    e.sim
        .set_fault(FaultRule::new(FaultKind::SubscriptionValidationTimeout).times(1));
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            "/subscriptions",
            Some(body(&exp, &url)),
            &[],
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
}

#[tokio::test]
async fn plain_ids_change_on_move_immutable_ids_do_not() {
    let e = env().await;
    let m = e.deliver("movable");
    let (s, h, v) = e
        .send(
            reqwest::Method::POST,
            &format!("/me/messages/{}/move", m.id),
            Some(json!({"destinationId": "archive"})),
            &[],
        )
        .await;
    assert_eq!(s, 201);
    assert!(!h.contains_key("preference-applied"));
    let new_id = v["id"].as_str().unwrap().to_string();
    assert_ne!(new_id, m.id);
    assert_eq!(e.get(&format!("/me/messages/{}", m.id)).await.0, 404);
    assert_eq!(e.get(&format!("/me/messages/{new_id}")).await.0, 200);

    let imm = [("Prefer", "IdType=\"ImmutableId\"")];
    let (s, h, v) = e
        .send(
            reqwest::Method::GET,
            &format!("/me/messages/{new_id}"),
            None,
            &imm,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(h["preference-applied"], "IdType=ImmutableId");
    let immutable = v["id"].as_str().unwrap().to_string();
    assert_eq!(immutable, m.immutable_id);
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            &format!("/me/messages/{immutable}/move"),
            Some(json!({"destinationId": "inbox"})),
            &imm,
        )
        .await;
    assert_eq!(s, 201);
    assert_eq!(v["id"], immutable.as_str());
    let (s, _, _) = e
        .send(
            reqwest::Method::GET,
            &format!("/me/messages/{immutable}"),
            None,
            &imm,
        )
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn batch_enforces_limits_dependencies_and_inner_throttling() {
    let e = env().await;
    e.deliver("batched");
    let get =
        |id: &str| json!({"id": id, "method": "GET", "url": "/me/mailFolders/inbox/messages"});
    let reqs: Vec<Value> = (0..21).map(|i| get(&i.to_string())).collect();
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            "/$batch",
            Some(json!({"requests": reqs})),
            &[],
        )
        .await;
    assert_eq!(s, 400);
    assert_graph_error(&v, "BadRequest");
    let (s, _, _) = e
        .send(
            reqwest::Method::POST,
            "/$batch",
            Some(json!({"requests": [get("1"), get("1")]})),
            &[],
        )
        .await;
    assert_eq!(s, 400, "ids must be unique");
    let (s, _, _) = e
        .send(
            reqwest::Method::POST,
            "/$batch",
            Some(json!({"requests": [{"id": "1", "method": "POST", "url": "/me/sendMail", "body": {}}]})),
            &[],
        )
        .await;
    assert_eq!(s, 400, "a body needs Content-Type");

    e.sim.set_fault(
        FaultRule::new(FaultKind::TooManyRequests {
            retry_after: Some("2.128".into()),
        })
        .path("/mailFolders/inbox/messages")
        .times(1),
    );
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            "/$batch",
            Some(json!({"requests": [
                get("1"),
                {"id": "2", "method": "GET", "url": "/me/messages/AAMkAGdoesnotexistdoesnotexist"},
                {"id": "3", "method": "GET", "url": "/me", "dependsOn": ["2"]},
                {"id": "4", "method": "GET", "url": "/me"},
            ]})),
            &[],
        )
        .await;
    assert_eq!(s, 200);
    let by_id: HashMap<String, Value> = v["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r.clone()))
        .collect();
    assert_eq!(by_id["1"]["status"], 429);
    assert_eq!(by_id["1"]["headers"]["Retry-After"], "2.128");
    assert_eq!(by_id["2"]["status"], 404);
    assert_eq!(by_id["3"]["status"], 424);
    assert_eq!(by_id["4"]["status"], 200);
}

#[tokio::test]
async fn errors_have_graph_shape_and_echo_request_ids() {
    let e = env().await;
    let (s, h, v) = e
        .send(
            reqwest::Method::GET,
            "/me/messages/AAMkAGdoesnotexistdoesnotexistdoesnotexist",
            None,
            &[("client-request-id", "abc-123")],
        )
        .await;
    assert_eq!(s, 404);
    assert_graph_error(&v, "ErrorItemNotFound");
    assert_eq!(v["error"]["innerError"]["client-request-id"], "abc-123");
    assert_eq!(
        v["error"]["innerError"]["request-id"],
        h["request-id"].to_str().unwrap()
    );
    let (s, _, v) = e.get("/me/messages/123").await;
    assert_eq!(s, 400);
    assert_graph_error(&v, "ErrorInvalidIdMalformed");
    let (s, _, v) = e
        .get("/users/nobody@contoso.onmicrosoft.com/mailFolders/inbox")
        .await;
    assert_eq!(s, 404);
    assert_graph_error(&v, "ErrorInvalidUser");
    let other = e.sim.create_user(
        "contoso.onmicrosoft.com",
        "shared@contoso.onmicrosoft.com",
        "Shared",
    );
    let (s, _, v) = e
        .get(&format!("/users/{}/mailFolders/inbox", other.upn))
        .await;
    assert_eq!(s, 403);
    assert_graph_error(&v, "ErrorAccessDenied");
}

#[tokio::test]
async fn filter_orderby_rule_and_internet_headers_on_select_only() {
    let e = env().await;
    e.sim.deliver(
        &e.user,
        InboundMail::new("c@example.com", "RE: thing")
            .message_id("<r2@example.com>")
            .in_reply_to("<r1@example.com>")
            .references(["<r1@example.com>"])
            .header("Auto-Submitted", "auto-replied"),
    );
    let (s, _, v) = e
        .get(
            "/me/mailFolders/inbox/messages?$filter=isRead eq false&$orderby=receivedDateTime desc",
        )
        .await;
    assert_eq!(s, 400);
    assert_graph_error(&v, "InefficientFilter");
    let (s, _, v) = e
        .get("/me/mailFolders/inbox/messages?$filter=receivedDateTime ge 2000-01-01T00:00:00Z and isRead eq false&$orderby=receivedDateTime desc")
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["value"].as_array().unwrap().len(), 1);
    let m = &v["value"][0];
    assert!(m.get("internetMessageHeaders").is_none());
    let (_, _, v) = e
        .get(&format!(
            "/me/messages/{}?$select=internetMessageHeaders",
            m["id"].as_str().unwrap()
        ))
        .await;
    let headers: HashMap<String, String> = v["internetMessageHeaders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(headers["In-Reply-To"], "<r1@example.com>");
    assert_eq!(headers["References"], "<r1@example.com>");
    assert_eq!(headers["Auto-Submitted"], "auto-replied");
}

#[tokio::test]
async fn injected_faults_fire_the_requested_number_of_times() {
    let e = env().await;
    e.sim.set_fault(
        FaultRule::new(FaultKind::ServiceUnavailable { retry_after: None })
            .path("/mailFolders")
            .times(1),
    );
    let (s, h, v) = e.get("/me/mailFolders").await;
    assert_eq!(s, 503);
    assert!(!h.contains_key("retry-after"));
    assert_graph_error(&v, "serviceNotAvailable");
    assert_eq!(e.get("/me/mailFolders").await.0, 200);

    e.sim.set_fault(
        FaultRule::new(FaultKind::ConnectionReset)
            .method("GET")
            .times(1),
    );
    let r = e.http.get(e.url("/me")).bearer_auth(&e.token).send().await;
    assert!(r.is_err(), "connection closed without a response");
    assert_eq!(e.get("/me").await.0, 200);

    e.sim
        .set_fault(FaultRule::new(FaultKind::InvalidAuthenticationToken).times(1));
    let (s, h, _) = e.get("/me").await;
    assert_eq!(s, 401);
    assert!(h.contains_key("www-authenticate"));

    e.sim
        .set_fault(FaultRule::new(FaultKind::TokenError { aadsts: 70008 }).times(1));
    let rt = e
        .sim
        .issue_tokens_for(&e.user, SCOPES)
        .refresh_token
        .unwrap();
    let (s, v) = token(
        &e,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
        false,
    )
    .await;
    assert_eq!(s, 400);
    assert_aad_error(&v, "invalid_grant", 70008);
    let (s, _) = token(
        &e,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
        false,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(e.sim.stats().connection_resets, 1);
}

#[tokio::test]
async fn generator_is_deterministic_and_reports_threads() {
    let e = env().await;
    let other = e.sim.create_user(
        "contoso.onmicrosoft.com",
        "two@contoso.onmicrosoft.com",
        "Two",
    );
    let spec = GeneratorSpec {
        seed: 42,
        messages: 120,
        ..GeneratorSpec::default()
    };
    let a = e.sim.generate_mailbox(&e.user, spec.clone());
    let b = e.sim.generate_mailbox(&other, spec);
    assert_eq!(a.messages, 120);
    assert_eq!(a.threads, b.threads);
    assert_eq!(a.auto_replies, b.auto_replies);
    let subjects = |u: &SimUser| {
        let mut v: Vec<String> = e
            .sim
            .messages(u, "inbox")
            .into_iter()
            .map(|m| m.subject)
            .collect();
        v.sort();
        v
    };
    assert_eq!(subjects(&e.user), subjects(&other));
    let msgs = e.sim.messages(&e.user, "inbox");
    assert_eq!(msgs.len(), 120);
    let convs: HashSet<&str> = msgs.iter().map(|m| m.conversation_id.as_str()).collect();
    assert_eq!(convs.len(), a.threads);
    assert!(a.threads > 10 && a.threads < 120);
    assert!(a.auto_replies > 0 && a.threaded_replies > 0);
    let prefixes = ["RE: ", "AW: ", "SV: ", "R: ", "Antw: ", "回复: "];
    assert!(
        msgs.iter()
            .any(|m| prefixes.iter().any(|p| m.subject.starts_with(p)))
    );
    assert!(msgs.iter().any(|m| {
        m.headers
            .iter()
            .any(|h| h.name == "Auto-Submitted" && h.value == "auto-replied")
    }));
}

#[tokio::test]
async fn control_api_mirrors_the_rust_methods() {
    let e = env().await;
    let base = e.sim.base_url();
    let r = e
        .http
        .post(format!("{base}/_sim/users"))
        .json(&json!({"tenant": "contoso.onmicrosoft.com", "upn": "ops@contoso.onmicrosoft.com", "display_name": "Ops"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = e
        .http
        .post(format!(
            "{base}/_sim/users/ops@contoso.onmicrosoft.com/deliver"
        ))
        .json(
            &json!({"from": {"name": "X", "address": "x@example.com"}, "subject": "via http",
            "text_body": "hi", "headers": [{"name": "Precedence", "value": "bulk"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let d: DeliveredMessage = r.json().await.unwrap();
    let msgs = e.sim.messages("ops@contoso.onmicrosoft.com", "inbox");
    assert_eq!(msgs[0].id, d.id);
    let r = e
        .http
        .post(format!("{base}/_sim/faults"))
        .json(&json!({"kind": {"type": "gateway_timeout"}, "path_contains": "/me", "count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(e.get("/me").await.0, 504);
    let stats: SimStats = e
        .http
        .get(format!("{base}/_sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.route_status("GET /me", 504), 1);
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test]
async fn attachments_honour_select_and_reach_file_properties_through_the_cast() {
    let e = env().await;
    let d = e.sim.deliver(
        &e.user,
        InboundMail::new("customer@example.com", "Screenshot")
            .html("<p><img src=\"cid:img1\"></p>")
            .attachment(InboundAttachment {
                is_inline: true,
                content_id: Some("img1".into()),
                ..InboundAttachment::file("shot.png", "image/png", &[1, 2, 3])
            })
            .attachment(InboundAttachment::file(
                "invoice.pdf",
                "application/pdf",
                &[4, 5],
            )),
    );
    let list = format!("/me/messages/{}/attachments", d.id);

    // No $select: everything, bytes included.
    let (s, _, v) = e.get(&list).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["value"][0]["contentBytes"].is_string(), "{v}");

    // Base-type properties only: exactly those, plus @odata.type and id.
    let (s, _, v) = e
        .get(&format!("{list}?$select=name,contentType,size,isInline"))
        .await;
    assert_eq!(s, 200, "{v}");
    let items = v["value"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for a in items {
        assert_eq!(
            keys(a),
            [
                "@odata.type",
                "contentType",
                "id",
                "isInline",
                "name",
                "size"
            ],
            "{a}"
        );
        assert_eq!(a["@odata.type"], "#microsoft.graph.fileAttachment");
    }

    // contentId is a fileAttachment property: bare, Graph refuses the whole request.
    let (s, _, v) = e
        .get(&format!("{list}?$select=id,name,isInline,contentId"))
        .await;
    assert_eq!(s, 400, "{v}");
    assert_graph_error(&v, "RequestBroker--ParseUri");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'contentId' on type 'microsoft.graph.attachment'"),
        "{v}"
    );

    // Through the type cast it comes back, unqualified, and nothing else unselected does.
    let (s, _, v) = e
        .get(&format!(
            "{list}?$select=id,name,isInline,microsoft.graph.fileAttachment/contentId"
        ))
        .await;
    assert_eq!(s, 200, "{v}");
    let items = v["value"].as_array().unwrap();
    let inline = items.iter().find(|a| a["name"] == "shot.png").unwrap();
    assert_eq!(inline["contentId"], "img1");
    assert_eq!(
        keys(inline),
        ["@odata.type", "contentId", "id", "isInline", "name"]
    );
    let file = items.iter().find(|a| a["name"] == "invoice.pdf").unwrap();
    assert!(file["contentId"].is_null() && file.get("contentBytes").is_none());

    // One attachment: the same rule.
    let aid = inline["id"].as_str().unwrap();
    let (s, _, v) = e.get(&format!("{list}/{aid}?$select=name")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(keys(&v), ["@odata.type", "id", "name"]);
}

#[tokio::test]
async fn an_expired_subscription_is_gone_and_cannot_be_renewed() {
    let e = env().await;
    let (url, _store) = receiver(true).await;
    let create = |minutes: i64| {
        json!({
            "changeType": "created",
            "notificationUrl": url,
            "resource": "me/mailFolders('Inbox')/messages",
            "expirationDateTime": (chrono::Utc::now() + chrono::Duration::minutes(minutes)).to_rfc3339(),
            "clientState": "s",
        })
    };
    let mut ids = vec![];
    for _ in 0..2 {
        let (s, _, v) = e
            .send(
                reqwest::Method::POST,
                "/subscriptions",
                Some(create(10)),
                &[],
            )
            .await;
        assert_eq!(s, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (expiring, renewed) = (&ids[0], &ids[1]);
    // Renewed in time: lives on.
    let (s, _, v) = e
        .send(
            reqwest::Method::PATCH,
            &format!("/subscriptions/{renewed}"),
            Some(json!({"expirationDateTime": (chrono::Utc::now() + chrono::Duration::minutes(60)).to_rfc3339()})),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{v}");

    e.sim.advance_clock(Duration::from_secs(11 * 60));

    let later = (chrono::Utc::now() + chrono::Duration::minutes(11 + 60)).to_rfc3339();
    let (s, _, v) = e
        .send(
            reqwest::Method::PATCH,
            &format!("/subscriptions/{expiring}"),
            Some(json!({ "expirationDateTime": later })),
            &[],
        )
        .await;
    assert_eq!(s, 404, "renewing an expired subscription: {v}");
    assert_graph_error(&v, "ResourceNotFound");
    let (s, _, v) = e.get(&format!("/subscriptions/{expiring}")).await;
    assert_eq!(s, 404, "{v}");
    assert_graph_error(&v, "ResourceNotFound");
    let (s, _, v) = e.get("/subscriptions").await;
    assert_eq!(s, 200);
    let listed: Vec<&str> = v["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [renewed.as_str()]);
    assert_eq!(
        e.sim
            .subscriptions()
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        [renewed.as_str()]
    );
    // The one renewed in time can be renewed again.
    let (s, _, v) = e
        .send(
            reqwest::Method::PATCH,
            &format!("/subscriptions/{renewed}"),
            Some(json!({ "expirationDateTime": later })),
            &[],
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test]
async fn token_endpoint_throttles_with_429_and_refuses_unknown_tenants_as_invalid_request() {
    let e = env().await;
    let cfg = e.sim.config();
    let rt = e
        .sim
        .issue_tokens_for(&e.user, SCOPES)
        .refresh_token
        .unwrap();
    let refresh = |tenant: &str| {
        e.http
            .post(format!("{}/{tenant}/oauth2/v2.0/token", e.sim.base_url()))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt.as_str()),
                ("client_id", cfg.client_id.as_str()),
                ("client_secret", cfg.client_secret.as_str()),
            ])
            .send()
    };

    e.sim.set_fault(
        FaultRule::new(FaultKind::TooManyRequests {
            retry_after: Some("2.5".into()),
        })
        .path("/oauth2/v2.0/token")
        .times(1),
    );
    let r = refresh("common").await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "2.5");
    assert_eq!(r.text().await.unwrap(), "Too Many Requests");
    assert_eq!(refresh("common").await.unwrap().status(), 200);

    let r = refresh("no-such-tenant.example").await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_aad_error(&v, "invalid_request", 90002);
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("Tenant 'no-such-tenant.example' not found"),
        "{v}"
    );
}

const SHARED_SCOPES: &[&str] = &[
    "offline_access",
    "User.Read",
    "Mail.ReadWrite",
    "Mail.Send",
    "Mail.ReadWrite.Shared",
    "Mail.Send.Shared",
];

#[tokio::test]
async fn full_access_without_send_as_reads_a_shared_mailbox_but_cannot_send_as_it() {
    let mut e = env().await;
    e.token = e.sim.issue_tokens_for(&e.user, SHARED_SCOPES).access_token;
    let help = e.sim.create_shared_mailbox(
        "contoso.onmicrosoft.com",
        "help@contoso.onmicrosoft.com",
        "Help desk",
    );
    e.sim.grant_mailbox_access_without_send_as(&help, &e.user);
    let inbound = e.sim.deliver(
        &help,
        InboundMail::new("customer@example.com", "Shared question").text("?"),
    );
    let base = format!("/users/{}", help.upn);

    // Full access: the probe, reads and a reply draft all work.
    let (s, _, v) = e.get(&format!("{base}/mailFolders/inbox")).await;
    assert_eq!(s, 200, "{v}");
    let (s, _, v) = e.get(&format!("{base}/mailFolders/inbox/messages")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["value"][0]["subject"], "Shared question");
    let (s, _, draft) = e
        .send(
            reqwest::Method::POST,
            &format!("{base}/messages/{}/createReply", inbound.id),
            Some(json!({"comment": "On it."})),
            &[],
        )
        .await;
    assert_eq!(s, 201, "{draft}");
    let draft_id = draft["id"].as_str().unwrap().to_string();

    // No SendAs: every way of sending as the mailbox is refused with Graph's error body.
    let message = json!({"message": {
        "subject": "Hello",
        "body": {"contentType": "text", "content": "x"},
        "toRecipients": [{"emailAddress": {"address": "customer@example.com"}}],
    }});
    let attempts = [
        (format!("{base}/messages/{draft_id}/send"), None),
        (format!("{base}/sendMail"), Some(message)),
        (
            format!("{base}/messages/{}/reply", inbound.id),
            Some(json!({"comment": "x"})),
        ),
        (
            format!("{base}/messages/{}/replyAll", inbound.id),
            Some(json!({"comment": "x"})),
        ),
        (
            format!("{base}/messages/{}/forward", inbound.id),
            Some(
                json!({"comment": "x", "toRecipients": [{"emailAddress": {"address": "a@example.com"}}]}),
            ),
        ),
    ];
    for (path, body) in attempts {
        let (s, _, v) = e.send(reqwest::Method::POST, &path, body, &[]).await;
        assert_eq!(s, 403, "{path}: {v}");
        assert_graph_error(&v, "ErrorSendAsDenied");
    }
    assert!(e.sim.sends().is_empty(), "nothing left the mailbox");
    let (s, _, v) = e.get(&format!("{base}/messages/{draft_id}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["isDraft"], true, "the refused draft is still a draft");

    // The user's own mailbox is not affected, and granting SendAs lets the draft go.
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            "/me/sendMail",
            Some(json!({"message": {
                "subject": "Own",
                "body": {"contentType": "text", "content": "x"},
                "toRecipients": [{"emailAddress": {"address": "customer@example.com"}}],
            }})),
            &[],
        )
        .await;
    assert_eq!(s, 202, "{v}");
    e.sim.grant_mailbox_access(&help, &e.user);
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            &format!("{base}/messages/{draft_id}/send"),
            None,
            &[],
        )
        .await;
    assert_eq!(s, 202, "{v}");
}

#[tokio::test]
async fn an_address_without_a_cloud_mailbox_answers_mailbox_not_enabled_for_rest_api() {
    let mut e = env().await;
    let onprem = e.sim.create_user(
        "contoso.onmicrosoft.com",
        "onprem@contoso.onmicrosoft.com",
        "On Premises",
    );
    e.sim.set_cloud_mailbox(&onprem, false);
    e.sim.grant_mailbox_access(&onprem, &e.user);
    e.token = e.sim.issue_tokens_for(&e.user, SHARED_SCOPES).access_token;
    let base = format!("/users/{}", onprem.upn);

    // The directory entry is there; the mailbox is not, whatever the rights.
    let (s, _, v) = e.get(&base).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["userPrincipalName"], onprem.upn.as_str());
    for path in [
        format!("{base}/mailFolders/inbox"),
        format!("{base}/mailFolders/inbox/messages"),
        format!("{base}/messages"),
    ] {
        let (s, _, v) = e.get(&path).await;
        assert_eq!(s, 404, "{path}: {v}");
        assert_graph_error(&v, "MailboxNotEnabledForRESTAPI");
    }
    let (s, _, v) = e
        .send(
            reqwest::Method::POST,
            &format!("{base}/sendMail"),
            Some(json!({"message": {"subject": "x"}})),
            &[],
        )
        .await;
    assert_eq!(s, 404, "{v}");
    assert_graph_error(&v, "MailboxNotEnabledForRESTAPI");

    // The user's own token: /me works, /me's mailbox does not.
    e.token = e.sim.issue_tokens_for(&onprem, SCOPES).access_token;
    let (s, _, v) = e.get("/me").await;
    assert_eq!(s, 200, "{v}");
    let (s, _, v) = e.get("/me/mailFolders").await;
    assert_eq!(s, 404, "{v}");
    assert_graph_error(&v, "MailboxNotEnabledForRESTAPI");

    // Restored: a mailbox again.
    e.sim.set_cloud_mailbox(&onprem, true);
    let (s, _, v) = e.get("/me/mailFolders/inbox").await;
    assert_eq!(s, 200, "{v}");
}

/// A notification receiver that answers the validation handshake at once and every
/// notification with 202 after `delay`.
async fn delayed_receiver(delay: Duration) -> String {
    use poem::{EndpointExt, Route, handler, post};

    #[handler]
    async fn hook(req: &poem::Request) -> poem::Response {
        let delay = *req.data::<Duration>().unwrap();
        let q = req.uri().query().unwrap_or("");
        if let Some(raw) = q
            .split('&')
            .find_map(|p| p.strip_prefix("validationToken="))
        {
            let token = url::form_urlencoded::parse(format!("t={raw}").as_bytes())
                .next()
                .unwrap()
                .1
                .into_owned();
            return poem::Response::builder()
                .content_type("text/plain")
                .body(token);
        }
        tokio::time::sleep(delay).await;
        poem::Response::builder()
            .status(poem::http::StatusCode::ACCEPTED)
            .finish()
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
    let app = Route::new().at("/hook", post(hook).data(delay));
    tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor).run(app).await;
    });
    format!("http://{addr}/hook")
}

#[tokio::test]
async fn a_notification_answered_after_three_seconds_is_a_failed_delivery() {
    let e = env().await;
    let fast = delayed_receiver(Duration::ZERO).await;
    let slow = delayed_receiver(Duration::from_secs(4)).await;
    let exp = (chrono::Utc::now() + chrono::Duration::minutes(60)).to_rfc3339();
    for url in [&fast, &slow] {
        let (s, _, v) = e
            .send(
                reqwest::Method::POST,
                "/subscriptions",
                Some(json!({
                    "changeType": "created",
                    "notificationUrl": url,
                    "resource": "me/mailFolders('Inbox')/messages",
                    "expirationDateTime": exp,
                    "clientState": "s",
                })),
                &[],
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    e.deliver("notify both");

    // The slow receiver's answer (202 after 4 s) comes too late: a failure, so it is retried.
    let t0 = Instant::now();
    let records = loop {
        let records = e.sim.notifications();
        if records.iter().any(|r| r.url == slow && r.attempt >= 2) {
            break records;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the slow delivery was not retried: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let slow_records: Vec<_> = records.iter().filter(|r| r.url == slow).collect();
    assert!(
        slow_records.iter().all(|r| r.status.is_none()),
        "{slow_records:?}"
    );
    let fast_records: Vec<_> = records.iter().filter(|r| r.url == fast).collect();
    assert_eq!(fast_records.len(), 1, "{fast_records:?}");
    assert_eq!(fast_records[0].status, Some(202));
    assert_eq!(fast_records[0].attempt, 1);
}
