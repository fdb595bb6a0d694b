//! The client's HTTP behaviour against a scripted local server: retries, Retry-After, the
//! 401 refresh, paging, delta and the token endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use secrecy::{ExposeSecret as _, SecretString};
use url::Url;

use super::stub::{Reply, Stub};
use super::*;
use crate::ids::MicrosoftMessageId;

/// Hands out `t1`, and `t2`, `t3`, ... on each forced refresh.
#[derive(Default)]
struct RotatingTokens {
    refreshes: AtomicUsize,
}

impl AccessTokenSource for RotatingTokens {
    fn access_token(&self) -> BoxFuture<'_, Result<SecretString, TokenSourceError>> {
        Box::pin(async move {
            let n = self.refreshes.load(Ordering::SeqCst) + 1;
            Ok(SecretString::from(format!("t{n}")))
        })
    }

    fn force_refresh<'a>(
        &'a self,
        rejected: &'a SecretString,
    ) -> BoxFuture<'a, Result<SecretString, TokenSourceError>> {
        Box::pin(async move {
            let n = self.refreshes.fetch_add(1, Ordering::SeqCst) + 2;
            assert_ne!(rejected.expose_secret(), format!("t{n}"));
            Ok(SecretString::from(format!("t{n}")))
        })
    }
}

fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        max_inline_wait: Duration::from_secs(2),
    }
}

fn client_for(stub: &Stub, tokens: Arc<RotatingTokens>) -> GraphClient {
    let config = GraphConfig::new(&format!("{}/v1.0", stub.base))
        .unwrap()
        .with_retry(fast_policy());
    GraphClient::new(build_http_client().unwrap(), Arc::new(config), tokens)
}

fn msg_id(s: &str) -> MicrosoftMessageId {
    MicrosoftMessageId::try_from(s.to_owned()).unwrap()
}

const ME: &str =
    r#"{"id":"u1","displayName":"Adele","mail":null,"userPrincipalName":"adele@contoso.com"}"#;

#[tokio::test]
async fn decimal_retry_after_is_honoured_and_headers_are_sent() {
    let stub = Stub::start(vec![
        Reply::json(
            429,
            r#"{"error":{"code":"ApplicationThrottled","message":"Application is over its MailboxConcurrency limit."}}"#,
        )
        .with_header("retry-after", "0.249"),
        Reply::json(200, ME),
    ])
    .await;
    let graph = client_for(&stub, Arc::default());
    let started = Instant::now();
    let me = graph.get_me().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(249));
    assert_eq!(me.user_principal_name.as_deref(), Some("adele@contoso.com"));
    assert_eq!(me.mail, None);

    let reqs = stub.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs[1].at.duration_since(reqs[0].at) >= Duration::from_millis(249));
    for r in &reqs {
        assert_eq!(r.target, "/v1.0/me");
        assert_eq!(r.header("authorization"), Some("Bearer t1"));
        assert_eq!(r.header("prefer"), Some("IdType=\"ImmutableId\""));
        assert!(r.header("client-request-id").is_some());
    }
    // One logical request, one correlation id across its retries.
    assert_eq!(
        reqs[0].header("client-request-id"),
        reqs[1].header("client-request-id")
    );
}

#[tokio::test]
async fn unavailable_without_retry_after_backs_off_and_attempts_are_bounded() {
    let unavailable = || {
        Reply::json(
            503,
            r#"{"error":{"code":"serviceNotAvailable","message":"x"}}"#,
        )
    };
    let stub = Stub::start(vec![unavailable(), unavailable(), Reply::json(200, ME)]).await;
    let graph = client_for(&stub, Arc::default());
    let started = Instant::now();
    graph.get_me().await.unwrap();
    // 20 ms then 40 ms (plus jitter).
    assert!(started.elapsed() >= Duration::from_millis(60));
    assert_eq!(stub.requests().len(), 3);

    let stub = Stub::start((0..6).map(|_| unavailable()).collect()).await;
    let graph = client_for(&stub, Arc::default());
    let err = graph.get_me().await.unwrap_err();
    assert!(matches!(err, GraphError::Unavailable { status: 503, .. }));
    assert_eq!(err.class(), ErrorClass::Retryable { after: None });
    assert_eq!(stub.requests().len(), 4);
}

#[tokio::test]
async fn long_retry_after_is_not_slept_but_returned() {
    let stub = Stub::start(vec![
        Reply::json(429, r#"{"error":{"code":"TooManyRequests","message":"x"}}"#)
            .with_header("retry-after", "120"),
        Reply::json(200, ME),
    ])
    .await;
    let graph = client_for(&stub, Arc::default());
    let started = Instant::now();
    let err = graph.get_me().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        err.class(),
        ErrorClass::Retryable {
            after: Some(Duration::from_secs(120))
        }
    );
    assert_eq!(stub.requests().len(), 1);
}

#[tokio::test]
async fn a_401_refreshes_once_then_gives_up() {
    let expired = || {
        Reply::json(
            401,
            r#"{"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid."}}"#,
        )
        .with_header("www-authenticate", "Bearer realm=\"\"")
    };
    let stub = Stub::start(vec![expired(), Reply::json(200, ME)]).await;
    let tokens = Arc::new(RotatingTokens::default());
    let graph = client_for(&stub, Arc::clone(&tokens));
    graph.get_me().await.unwrap();
    assert_eq!(tokens.refreshes.load(Ordering::SeqCst), 1);
    let reqs = stub.requests();
    assert_eq!(reqs[0].header("authorization"), Some("Bearer t1"));
    assert_eq!(reqs[1].header("authorization"), Some("Bearer t2"));

    let stub = Stub::start(vec![expired(), expired(), Reply::json(200, ME)]).await;
    let tokens = Arc::new(RotatingTokens::default());
    let graph = client_for(&stub, Arc::clone(&tokens));
    let err = graph.get_me().await.unwrap_err();
    assert!(matches!(err, GraphError::Unauthorized { .. }));
    assert_eq!(tokens.refreshes.load(Ordering::SeqCst), 1);
    assert_eq!(stub.requests().len(), 2);
    assert!(!err.to_string().contains("t2"));
}

#[tokio::test]
async fn gateway_timeout_on_send_is_not_repeated() {
    let stub = Stub::start(vec![Reply::empty(504), Reply::empty(202)]).await;
    let graph = client_for(&stub, Arc::default());
    let err = graph.send_draft(&msg_id("AAMkDraft=")).await.unwrap_err();
    assert!(err.outcome_unknown());
    let reqs = stub.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].target, "/v1.0/me/messages/AAMkDraft=/send");
    assert_eq!(reqs[0].header("content-length"), Some("0"));
}

#[tokio::test]
async fn paging_follows_next_link_verbatim_and_refuses_foreign_links() {
    let stub = Stub::start(vec![
        Reply::json(
            200,
            r#"{"@odata.context":"x","value":[{"id":"m1","subject":"a"}],"@odata.nextLink":"{base}/v1.0/me/mailFolders/inbox/messages?%24top=1&%24skip=1"}"#,
        ),
        Reply::json(200, r#"{"value":[{"id":"m2","subject":"b"}]}"#),
    ])
    .await;
    let graph = client_for(&stub, Arc::default());
    let query = ListMessagesQuery {
        select: vec!["id".into(), "subject".into()],
        top: Some(1),
        filter: Some("isRead eq false".into()),
        orderby: None,
    };
    let first = graph
        .list_messages(&WellKnownFolder::Inbox.into(), &query)
        .await
        .unwrap();
    assert_eq!(first.value[0].id.as_str(), "m1");
    let link = first.next_link.unwrap();
    let second: Page<Message> = graph.next_page(&link).await.unwrap();
    assert_eq!(second.value[0].id.as_str(), "m2");
    assert!(second.next_link.is_none());
    let reqs = stub.requests();
    assert_eq!(
        reqs[0].target,
        "/v1.0/me/mailFolders/inbox/messages?$select=id,subject&$top=1&$filter=isRead%20eq%20false"
    );
    assert_eq!(
        reqs[0].header("prefer"),
        Some("IdType=\"ImmutableId\", outlook.body-content-type=\"html\"")
    );
    assert_eq!(
        reqs[1].target,
        "/v1.0/me/mailFolders/inbox/messages?%24top=1&%24skip=1"
    );

    let err = graph
        .next_page::<Message>("https://attacker.example/v1.0/me/messages")
        .await
        .unwrap_err();
    assert!(matches!(err, GraphError::UntrustedLink { .. }));
    assert_eq!(stub.requests().len(), 2);
}

#[tokio::test]
async fn delta_round_then_sync_state_not_found() {
    let stub = Stub::start(vec![
        Reply::json(
            200,
            r#"{"value":[{"id":"m1","subject":"hello","internetMessageId":"<a@x>","receivedDateTime":"2024-05-01T10:00:00Z"}],"@odata.nextLink":"{base}/v1.0/me/mailFolders/inbox/messages/delta?$skiptoken=s1"}"#,
        ),
        Reply::json(200, r#"{"value":[],"@odata.nextLink":"{base}/v1.0/me/mailFolders/inbox/messages/delta?$skiptoken=s2"}"#),
        Reply::json(
            200,
            r#"{"value":[{"id":"m1","isRead":true},{"id":"m0","@removed":{"reason":"deleted"}}],"@odata.deltaLink":"{base}/v1.0/me/mailFolders/inbox/messages/delta?$deltatoken=d1"}"#,
        ),
        Reply::json(
            410,
            r#"{"error":{"code":"SyncStateNotFound","message":"The sync state generation is not found."}}"#,
        ),
    ])
    .await;
    let graph = client_for(&stub, Arc::default());
    let mut round = graph.delta_round(WellKnownFolder::Inbox.into(), None, DeltaOptions::default());
    let mut changes = Vec::new();
    while let Some(page) = round.next_page().await.unwrap() {
        changes.extend(page.changes);
    }
    let delta_link = round.delta_link().unwrap().to_owned();
    assert!(delta_link.ends_with("$deltatoken=d1"));
    assert_eq!(changes.len(), 3);
    match &changes[0] {
        DeltaChange::Upsert(m) => {
            assert_eq!(m.internet_message_id().unwrap().as_str(), "<a@x>");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(&changes[1], DeltaChange::Upsert(m) if m.is_read == Some(true) && m.subject.is_none())
    );
    assert!(
        matches!(&changes[2], DeltaChange::Removed { id, reason } if id.as_str() == "m0" && reason == "deleted")
    );

    let reqs = stub.requests();
    assert!(
        reqs[0]
            .target
            .starts_with("/v1.0/me/mailFolders/inbox/messages/delta?$select=id,")
    );
    assert_eq!(
        reqs[0].header("prefer"),
        Some("IdType=\"ImmutableId\", outlook.body-content-type=\"html\", odata.maxpagesize=50")
    );
    assert_eq!(
        reqs[1].target,
        "/v1.0/me/mailFolders/inbox/messages/delta?$skiptoken=s1"
    );

    let err = graph
        .delta_page(
            &WellKnownFolder::Inbox.into(),
            Some(&delta_link),
            &DeltaOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, GraphError::SyncStateNotFound { .. }));
    assert_eq!(err.class(), ErrorClass::Resync);
}

#[tokio::test]
async fn reply_flow_and_sent_items_lookup() {
    let stub = Stub::start(vec![
        Reply::json(
            201,
            r#"{"id":"draft1","isDraft":true,"subject":"RE: help","conversationId":"c1","internetMessageId":"<d+1@contoso.com>"}"#,
        ),
        Reply::json(200, r#"{"id":"draft1","isDraft":true,"subject":"RE: help [#7]"}"#),
        Reply::empty(202),
        Reply::json(
            200,
            r#"{"value":[{"id":"sent1","internetMessageId":"<d+1@contoso.com>"}]}"#,
        ),
    ])
    .await;
    let graph =
        client_for(&stub, Arc::default()).for_mailbox(Mailbox::User("help@contoso.com".into()));
    let draft = graph
        .create_reply(&msg_id("orig1"), &ReplyContent::Comment("Thanks".into()))
        .await
        .unwrap();
    assert_eq!(draft.is_draft, Some(true));
    let imid = draft.internet_message_id().unwrap();
    graph
        .update_message(
            &draft.id,
            &MessagePatch {
                subject: Some("RE: help [#7]".into()),
                body: Some(ItemBody::html("<p>Hi</p>")),
                ..MessagePatch::default()
            },
        )
        .await
        .unwrap();
    graph.send_draft(&draft.id).await.unwrap();
    let sent = graph
        .find_sent_by_internet_message_id(&imid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sent.id.as_str(), "sent1");

    let reqs = stub.requests();
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(
        reqs[0].target,
        "/v1.0/users/help@contoso.com/messages/orig1/createReply"
    );
    assert_eq!(reqs[0].body, r#"{"comment":"Thanks"}"#);
    assert_eq!(reqs[1].method, "PATCH");
    assert_eq!(
        reqs[1].body,
        r#"{"subject":"RE: help [#7]","body":{"contentType":"html","content":"<p>Hi</p>"}}"#
    );
    assert_eq!(
        reqs[2].target,
        "/v1.0/users/help@contoso.com/messages/draft1/send"
    );
    assert!(reqs[3].target.starts_with(
        "/v1.0/users/help@contoso.com/mailFolders/sentitems/messages?$filter=internetMessageId%20eq%20%27%3Cd%2B1%40contoso.com%3E%27"
    ));
}

#[tokio::test]
async fn probe_mailbox_maps_the_three_answers() {
    let stub = Stub::start(vec![
        Reply::json(200, r#"{"id":"inbox1","displayName":"Inbox"}"#),
        Reply::json(
            403,
            r#"{"error":{"code":"ErrorAccessDenied","message":"Access is denied."}}"#,
        ),
        Reply::json(
            404,
            r#"{"error":{"code":"MailboxNotEnabledForRESTAPI","message":"The mailbox is either inactive, soft-deleted, or is hosted on-premise."}}"#,
        ),
    ])
    .await;
    let graph = client_for(&stub, Arc::default());
    assert!(matches!(
        graph.probe_mailbox("help@contoso.com").await.unwrap(),
        MailboxProbe::Accessible(f) if f.id == "inbox1"
    ));
    assert_eq!(
        graph.probe_mailbox("x@contoso.com").await.unwrap(),
        MailboxProbe::NoAccess
    );
    assert_eq!(
        graph.probe_mailbox("y@contoso.com").await.unwrap(),
        MailboxProbe::NoMailbox
    );
    assert_eq!(
        stub.requests()[0].target,
        "/v1.0/users/help@contoso.com/mailFolders/inbox"
    );
}

fn identity_for(stub: &Stub) -> IdentityClient {
    IdentityClient::new(
        build_http_client().unwrap(),
        Arc::new(
            IdentityConfig::new(
                &stub.base,
                "app-1",
                SecretString::from("client-s3cret"),
                Url::parse("https://desk.example/oauth/callback").unwrap(),
            )
            .unwrap(),
        ),
    )
}

#[tokio::test]
async fn token_endpoint_exchange_refresh_and_errors() {
    let stub = Stub::start(vec![
        Reply::json(
            200,
            r#"{"token_type":"Bearer","scope":"Mail.ReadWrite Mail.Send User.Read","expires_in":3599,"ext_expires_in":3599,"access_token":"at-1","refresh_token":"rt-1"}"#,
        ),
        Reply::json(
            200,
            r#"{"token_type":"Bearer","scope":"Mail.ReadWrite","expires_in":"120","access_token":"at-2","refresh_token":"rt-2"}"#,
        ),
        Reply::json(
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS700082: The refresh token has expired due to inactivity.","error_codes":[700082],"trace_id":"tr","correlation_id":"co"}"#,
        ),
        Reply::json(
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#,
        ),
        Reply::json(503, r#"{"error":"temporarily_unavailable"}"#).with_header("retry-after", "5"),
    ])
    .await;
    let identity = identity_for(&stub);
    let tenant = TenantSegment::common();
    let before = chrono::Utc::now();
    let set = identity
        .exchange_code(
            &tenant,
            &SecretString::from("code-abc"),
            &SecretString::from("verifier-xyz"),
        )
        .await
        .unwrap();
    assert_eq!(set.access_token.expose_secret(), "at-1");
    assert_eq!(set.refresh_token.as_ref().unwrap().expose_secret(), "rt-1");
    assert!(set.expires_at >= before + chrono::TimeDelta::seconds(3599));
    assert!(set.expires_at <= chrono::Utc::now() + chrono::TimeDelta::seconds(3599));
    assert!(!format!("{set:?}").contains("at-1"));

    let refreshed = identity
        .refresh(&tenant, &SecretString::from("rt-1"))
        .await
        .unwrap();
    assert_eq!(refreshed.refresh_token.unwrap().expose_secret(), "rt-2");
    assert!(refreshed.expires_at <= chrono::Utc::now() + chrono::TimeDelta::seconds(120));

    let revoked = identity
        .refresh(&tenant, &SecretString::from("rt-2"))
        .await
        .unwrap_err();
    assert_eq!(revoked.class(), ErrorClass::NeedsReauth);
    assert!(!revoked.to_string().contains("rt-2"));

    let bad_client = identity
        .refresh(&tenant, &SecretString::from("rt-2"))
        .await
        .unwrap_err();
    assert_eq!(bad_client.class(), ErrorClass::Configuration);
    assert!(!bad_client.to_string().contains("client-s3cret"));

    let busy = identity
        .refresh(&tenant, &SecretString::from("rt-2"))
        .await
        .unwrap_err();
    assert_eq!(
        busy.class(),
        ErrorClass::Retryable {
            after: Some(Duration::from_secs(5))
        }
    );

    let reqs = stub.requests();
    assert_eq!(reqs[0].target, "/common/oauth2/v2.0/token");
    assert_eq!(
        reqs[0].header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(reqs[0].body.as_bytes())
            .into_owned()
            .collect();
    assert_eq!(form["grant_type"], "authorization_code");
    assert_eq!(form["code"], "code-abc");
    assert_eq!(form["code_verifier"], "verifier-xyz");
    assert_eq!(form["client_secret"], "client-s3cret");
    assert_eq!(form["client_id"], "app-1");
    assert_eq!(form["redirect_uri"], "https://desk.example/oauth/callback");
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(reqs[1].body.as_bytes())
            .into_owned()
            .collect();
    assert_eq!(form["grant_type"], "refresh_token");
    assert_eq!(form["refresh_token"], "rt-1");
    assert!(!form.contains_key("code"));
    assert_eq!(stub.remaining(), 0);
}

/// Six calls the server holds for 150 ms each, sent at once. Without a gate the server sees
/// them overlap beyond 2; with a gate of 2 it sees exactly 2 at a time, because the permit is
/// held for the whole request, not just while it is being sent.
#[tokio::test]
async fn gate_is_held_per_request() {
    const CALLS: usize = 6;
    let held = || {
        (0..CALLS)
            .map(|_| Reply::json(200, ME).with_delay(Duration::from_millis(150)))
            .collect::<Vec<_>>()
    };

    let open = Stub::start(held()).await;
    let ungated = client_for(&open, Arc::default()).with_gate(Arc::new(NoGate));
    for r in futures::future::join_all((0..CALLS).map(|_| ungated.get_me())).await {
        r.unwrap();
    }
    assert!(
        open.max_in_flight() > 2,
        "control: without a gate the calls overlap ({} at once)",
        open.max_in_flight()
    );

    let stub = Stub::start(held()).await;
    let gate = Arc::new(LocalConcurrencyGate::new(2));
    let graph = client_for(&stub, Arc::default()).with_gate(gate);
    let started = Instant::now();
    for r in futures::future::join_all((0..CALLS).map(|_| graph.get_me())).await {
        r.unwrap();
    }
    assert_eq!(stub.requests().len(), CALLS);
    assert_eq!(
        stub.max_in_flight(),
        2,
        "the gate admits 2 requests at a time"
    );
    // Three waves of two, 150 ms each.
    assert!(started.elapsed() >= Duration::from_millis(450));
}
