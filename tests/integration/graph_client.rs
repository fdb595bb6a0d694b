//! The production Graph and identity clients against the Graph simulator: only the base URLs
//! differ from a real deployment. No database is involved.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use graph_sim::{FaultKind, FaultRule, GraphSim, InboundMail, SimConfig, SimUser};
use jobs::graph::{
    AccessTokenSource, DeltaChange, DeltaOptions, ErrorClass, GraphClient, GraphConfig, GraphError,
    IdentityClient, IdentityConfig, ItemBody, ListMessagesQuery, LocalConcurrencyGate,
    MailboxProbe, MessagePatch, NoGate, Page, ReplyContent, RequestGate, RetryPolicy,
    TenantSegment, TokenError, TokenSourceError, WellKnownFolder, build_http_client,
};
use jobs::ids::MicrosoftMessageId;
use secrecy::{ExposeSecret as _, SecretString};

const SCOPES: &[&str] = &["offline_access", "User.Read", "Mail.ReadWrite", "Mail.Send"];

struct World {
    sim: GraphSim,
    user: SimUser,
    identity: IdentityClient,
    tokens: Arc<SimTokens>,
    graph: GraphClient,
}

/// An access-token source backed by the real identity client: refreshes through the
/// simulator's token endpoint and keeps the rotated refresh token, as the database-backed
/// source does.
struct SimTokens {
    identity: IdentityClient,
    state: Mutex<(SecretString, SecretString)>,
    refreshes: Mutex<u32>,
}

impl AccessTokenSource for SimTokens {
    fn access_token(&self) -> BoxFuture<'_, Result<SecretString, TokenSourceError>> {
        Box::pin(async move { Ok(self.state.lock().unwrap().0.clone()) })
    }

    fn force_refresh<'a>(
        &'a self,
        _rejected: &'a SecretString,
    ) -> BoxFuture<'a, Result<SecretString, TokenSourceError>> {
        Box::pin(async move {
            let refresh = self.state.lock().unwrap().1.clone();
            let set = self
                .identity
                .refresh(&TenantSegment::common(), &refresh)
                .await?;
            let new_refresh = set.refresh_token.unwrap_or(refresh);
            *self.state.lock().unwrap() = (set.access_token.clone(), new_refresh);
            *self.refreshes.lock().unwrap() += 1;
            Ok(set.access_token)
        })
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_inline_wait: Duration::from_secs(5),
    }
}

async fn world() -> World {
    world_with_scopes(SCOPES).await
}

async fn world_with_scopes(scopes: &[&str]) -> World {
    let sim = GraphSim::start(SimConfig::default()).await.unwrap();
    let cfg = sim.config();
    let user = sim.create_user("contoso.com", "adele@contoso.com", "Adele Vance");
    let http = build_http_client().unwrap();
    let identity = IdentityClient::new(
        http.clone(),
        Arc::new(
            IdentityConfig::new(
                &sim.base_url(),
                cfg.client_id.clone(),
                SecretString::from(cfg.client_secret.clone()),
                url::Url::parse(&cfg.redirect_uris[0]).unwrap(),
            )
            .unwrap(),
        ),
    );
    let issued = sim.issue_tokens_for(&user, scopes);
    let tokens = Arc::new(SimTokens {
        identity: identity.clone(),
        state: Mutex::new((
            SecretString::from(issued.access_token),
            SecretString::from(
                issued
                    .refresh_token
                    .expect("offline_access gives a refresh token"),
            ),
        )),
        refreshes: Mutex::new(0),
    });
    let config = GraphConfig::new(&sim.graph_base_url())
        .unwrap()
        .with_retry(fast_retry());
    let graph = GraphClient::new(http, Arc::new(config), tokens.clone());
    World {
        sim,
        user,
        identity,
        tokens,
        graph,
    }
}

fn deliver(w: &World, n: usize) {
    for i in 0..n {
        w.sim.deliver(
            &w.user,
            InboundMail::new("customer@fabrikam.com", format!("Printer broken {i}"))
                .text(format!("body {i}")),
        );
    }
}

#[tokio::test]
async fn integer_retry_after_is_waited() {
    let w = world().await;
    w.sim.set_fault(
        FaultRule::new(FaultKind::TooManyRequests {
            retry_after: Some("1".into()),
        })
        .path("/v1.0/me")
        .method("GET")
        .times(1),
    );
    let started = Instant::now();
    let me = w.graph.get_me().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(me.user_principal_name.as_deref(), Some("adele@contoso.com"));
    assert_eq!(w.sim.stats().by_status.get(&429), Some(&1));
    w.sim.shutdown().await;
}

#[tokio::test]
async fn decimal_retry_after_is_waited() {
    let w = world().await;
    w.sim.set_fault(
        FaultRule::new(FaultKind::TooManyRequests {
            retry_after: Some("0.249".into()),
        })
        .path("/v1.0/me")
        .times(2),
    );
    let started = Instant::now();
    w.graph.get_me().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(498));
    let log = w.sim.request_log();
    assert_eq!(log.len(), 3);
    // Retries of one call keep its client-request-id.
    assert!(log[0].client_request_id.is_some());
    assert!(
        log.iter()
            .all(|e| e.client_request_id == log[0].client_request_id)
    );
    w.sim.shutdown().await;
}

#[tokio::test]
async fn long_retry_after_defers_instead_of_sleeping() {
    let w = world().await;
    w.sim.set_fault(
        FaultRule::new(FaultKind::TooManyRequests {
            retry_after: Some("90".into()),
        })
        .path("/v1.0/me")
        .times(1),
    );
    let err = w.graph.get_me().await.unwrap_err();
    assert_eq!(
        err.class(),
        ErrorClass::Retryable {
            after: Some(Duration::from_secs(90))
        }
    );
    w.sim.shutdown().await;
}

#[tokio::test]
async fn expired_access_token_mid_call_refreshes_once() {
    let w = world().await;
    deliver(&w, 1);
    w.graph.get_me().await.unwrap();
    let old_refresh = w.tokens.state.lock().unwrap().1.expose_secret().to_owned();
    w.sim.expire_access_tokens(&w.user);
    let page = w
        .graph
        .list_messages(
            &WellKnownFolder::Inbox.into(),
            &ListMessagesQuery::default(),
        )
        .await
        .unwrap();
    assert_eq!(page.value.len(), 1);
    assert_eq!(*w.tokens.refreshes.lock().unwrap(), 1);
    assert_ne!(
        w.tokens.state.lock().unwrap().1.expose_secret(),
        old_refresh
    );

    // A 401 that survives the refresh is returned, not looped on.
    w.sim.set_fault(
        FaultRule::new(FaultKind::InvalidAuthenticationToken)
            .path("/v1.0/me")
            .times(2),
    );
    let err = w.graph.get_me().await.unwrap_err();
    assert!(matches!(err, GraphError::Unauthorized { .. }), "{err}");
    assert_eq!(*w.tokens.refreshes.lock().unwrap(), 2);
    w.sim.shutdown().await;
}

#[tokio::test]
async fn paging_follows_next_links_to_the_end() {
    let w = world().await;
    deliver(&w, 7);
    let query = ListMessagesQuery {
        select: vec!["id".into(), "subject".into(), "receivedDateTime".into()],
        top: Some(3),
        ..ListMessagesQuery::default()
    };
    let mut page = w
        .graph
        .list_messages(&WellKnownFolder::Inbox.into(), &query)
        .await
        .unwrap();
    let mut ids = Vec::new();
    let mut pages = 1;
    loop {
        ids.extend(page.value.iter().map(|m| m.id.clone()));
        let Some(link) = page.next_link.take() else {
            break;
        };
        page = w.graph.next_page(&link).await.unwrap();
        pages += 1;
    }
    assert_eq!(ids.len(), 7);
    assert_eq!(pages, 3);
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    ids.dedup();
    assert_eq!(ids.len(), 7);
    w.sim.shutdown().await;
}

#[tokio::test]
async fn delta_rounds_and_eviction_gives_sync_state_not_found() {
    let w = world().await;
    deliver(&w, 4);
    let options = DeltaOptions {
        max_page_size: Some(2),
        ..DeltaOptions::default()
    };
    let mut round = w
        .graph
        .delta_round(WellKnownFolder::Inbox.into(), None, options.clone());
    let mut upserts = 0;
    while let Some(page) = round.next_page().await.unwrap() {
        upserts += page
            .changes
            .iter()
            .filter(|c| matches!(c, DeltaChange::Upsert(_)))
            .count();
    }
    assert_eq!(upserts, 4);
    let delta_link = round.delta_link().unwrap().to_owned();

    let delivered = w.sim.deliver(
        &w.user,
        InboundMail::new("customer@fabrikam.com", "Follow-up").text("more"),
    );
    let mut round = w.graph.delta_round(
        WellKnownFolder::Inbox.into(),
        Some(delta_link.clone()),
        options.clone(),
    );
    let mut changes = Vec::new();
    while let Some(page) = round.next_page().await.unwrap() {
        changes.extend(page.changes);
    }
    assert_eq!(changes.len(), 1);
    match &changes[0] {
        DeltaChange::Upsert(m) => assert_eq!(m.id.as_str(), delivered.immutable_id),
        other => panic!("unexpected change {other:?}"),
    }

    w.sim.evict_delta_tokens(&w.user);
    let next = round.delta_link().unwrap().to_owned();
    let err = w
        .graph
        .delta_page(&WellKnownFolder::Inbox.into(), Some(&next), &options)
        .await
        .unwrap_err();
    assert!(matches!(err, GraphError::SyncStateNotFound { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::Resync);
    w.sim.shutdown().await;
}

#[tokio::test]
async fn reply_flow_create_patch_send_and_find_in_sent_items() {
    let w = world().await;
    let inbound = w.sim.deliver(
        &w.user,
        InboundMail::new("customer@fabrikam.com", "Printer broken").text("It jams."),
    );
    let original = MicrosoftMessageId::try_from(inbound.immutable_id.clone()).unwrap();
    let full = w.graph.get_message(&original).await.unwrap();
    assert!(
        full.internet_message_headers.is_some(),
        "internet mail carries its headers"
    );

    let draft = w
        .graph
        .create_reply(&original, &ReplyContent::Comment("Looking into it".into()))
        .await
        .unwrap();
    assert_eq!(draft.is_draft, Some(true));
    let internet_id = draft
        .internet_message_id()
        .expect("draft has an internetMessageId");
    let patched = w
        .graph
        .update_message(
            &draft.id,
            &MessagePatch {
                subject: Some("RE: Printer broken [#42]".into()),
                body: Some(ItemBody::html("<p>Looking into it</p>")),
                ..MessagePatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.subject.as_deref(), Some("RE: Printer broken [#42]"));
    w.graph.send_draft(&draft.id).await.unwrap();

    let mut found = None;
    for _ in 0..20 {
        found = w
            .graph
            .find_sent_by_internet_message_id(&internet_id)
            .await
            .unwrap();
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = found.expect("the sent copy appears in Sent Items");
    // Immutable ids survive the move from Drafts to Sent Items.
    assert_eq!(sent.id, draft.id);
    let sends = w.sim.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].internet_message_id, internet_id.as_str());
    assert_eq!(sends[0].subject, "RE: Printer broken [#42]");
    w.sim.shutdown().await;
}

#[tokio::test]
async fn refresh_rotates_the_refresh_token() {
    let w = world().await;
    let first = w.tokens.state.lock().unwrap().1.clone();
    let set = w
        .identity
        .refresh(&TenantSegment::common(), &first)
        .await
        .unwrap();
    let second = set.refresh_token.expect("a rotated refresh token");
    assert_ne!(second.expose_secret(), first.expose_secret());
    assert!(set.expires_at > chrono::Utc::now() + chrono::TimeDelta::seconds(3000));
    assert_eq!(
        w.sim.stats().token_requests_by_grant.get("refresh_token"),
        Some(&1)
    );
    w.sim.shutdown().await;
}

#[tokio::test]
async fn revoked_refresh_token_needs_reauth() {
    let w = world().await;
    let refresh = w.tokens.state.lock().unwrap().1.clone();
    w.sim.revoke_refresh_tokens(&w.user, 70008);
    let err = w
        .identity
        .refresh(&TenantSegment::common(), &refresh)
        .await
        .unwrap_err();
    assert!(matches!(err, TokenError::InvalidGrant { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::NeedsReauth);
    assert_eq!(err.aadsts_codes(), &[70008]);
    assert!(!err.to_string().contains(refresh.expose_secret()));

    // Through the Graph client: a 401 whose refresh is refused surfaces as NeedsReauth.
    w.sim.expire_access_tokens(&w.user);
    let err = w.graph.get_me().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::NeedsReauth, "{err}");
    w.sim.shutdown().await;
}

#[tokio::test]
async fn invalid_client_is_a_configuration_error() {
    let w = world().await;
    w.sim
        .set_fault(FaultRule::new(FaultKind::InvalidClient).path("/oauth2/v2.0/token"));
    let refresh = w.tokens.state.lock().unwrap().1.clone();
    let err = w
        .identity
        .refresh(&TenantSegment::common(), &refresh)
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Configuration, "{err}");
    w.sim.shutdown().await;
}

#[tokio::test]
async fn every_request_prefers_immutable_ids() {
    let w = world().await;
    let delivered = w.sim.deliver(
        &w.user,
        InboundMail::new("customer@fabrikam.com", "Move me").text("x"),
    );
    let archive = w.sim.create_folder(&w.user, "msgfolderroot", "Handled");
    w.sim.move_message(&w.user, &delivered.id, &archive);
    // With ImmutableId the id seen before the move still addresses the message.
    let id = MicrosoftMessageId::try_from(delivered.immutable_id.clone()).unwrap();
    let m = w.graph.get_message(&id).await.unwrap();
    assert_eq!(m.id, id);
    let page: Page<jobs::graph::Message> = w
        .graph
        .list_messages(
            &jobs::graph::FolderRef::Id(archive.clone()),
            &ListMessagesQuery::default(),
        )
        .await
        .unwrap();
    assert_eq!(page.value[0].id, id);
    w.sim.shutdown().await;
}

#[tokio::test]
async fn unavailable_without_retry_after_backs_off() {
    let w = world().await;
    w.sim.set_fault(
        FaultRule::new(FaultKind::ServiceUnavailable { retry_after: None })
            .path("/v1.0/me")
            .times(2),
    );
    let started = Instant::now();
    w.graph.get_me().await.unwrap();
    // 50 ms then 100 ms of backoff (plus jitter) from the test policy.
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(w.sim.stats().by_status.get(&503), Some(&2));
    w.sim.shutdown().await;
}

const INBOX_LISTING: &str = "GET /me/mailFolders/{id}/messages";

/// Eight inbox listings at once through `gate`, each held 200 ms inside graph-sim's
/// MailboxConcurrency window (a mailbox-scoped route, so the simulator counts and limits it).
async fn eight_overlapping_inbox_listings(gate: Arc<dyn RequestGate>) -> World {
    let w = world().await;
    deliver(&w, 1);
    w.sim.set_fault(
        FaultRule::new(FaultKind::Delay { millis: 200 })
            .path("/messages")
            .method("GET"),
    );
    let graph = w.graph.clone().with_gate(gate);
    let query = ListMessagesQuery::default();
    let inbox: jobs::graph::FolderRef = WellKnownFolder::Inbox.into();
    let calls = (0..8).map(|_| graph.list_messages(&inbox, &query));
    for result in futures::future::join_all(calls).await {
        // Without a gate some calls are throttled first; the client waits out Retry-After.
        assert_eq!(result.unwrap().value.len(), 1);
    }
    w
}

#[tokio::test]
async fn a_local_gate_keeps_within_mailbox_concurrency() {
    // Control: no gate. The mailbox sees more than 4 requests at once and graph-sim throttles
    // the ones over the limit with 429 ApplicationThrottled.
    let open = eight_overlapping_inbox_listings(Arc::new(NoGate)).await;
    let stats = open.sim.stats();
    assert!(
        stats.max_concurrency_for(&open.user.upn) > 4,
        "control run never went over the limit: {stats:?}"
    );
    assert!(stats.route_status(INBOX_LISTING, 429) > 0, "{stats:?}");
    let throttled: Vec<_> = open
        .sim
        .request_log()
        .into_iter()
        .filter(|e| e.status == 429)
        .collect();
    assert!(!throttled.is_empty());
    assert!(
        throttled
            .iter()
            .all(|e| e.error_code.as_deref() == Some("ApplicationThrottled")),
        "{throttled:?}"
    );
    open.sim.shutdown().await;

    // A local gate of 4: exactly 4 at once (the gate is used to the full), none throttled.
    let gated = eight_overlapping_inbox_listings(Arc::new(LocalConcurrencyGate::new(4))).await;
    let stats = gated.sim.stats();
    assert_eq!(stats.max_concurrency_for(&gated.user.upn), 4, "{stats:?}");
    assert_eq!(stats.throttled, 0, "{stats:?}");
    assert_eq!(stats.route_status(INBOX_LISTING, 200), 8, "{stats:?}");
    assert_eq!(stats.route(INBOX_LISTING), 8, "{stats:?}");
    gated.sim.shutdown().await;
}

#[tokio::test]
async fn attachment_listing_carries_the_inline_content_id() {
    let w = world().await;
    let delivered = w.sim.deliver(
        &w.user,
        InboundMail::new("customer@fabrikam.com", "Screenshot")
            .html("<p>Look <img src=\"cid:img1\"></p>")
            .attachment(graph_sim::InboundAttachment {
                is_inline: true,
                content_id: Some("img1".into()),
                ..graph_sim::InboundAttachment::file("shot.png", "image/png", &[1, 2, 3])
            })
            .attachment(graph_sim::InboundAttachment::file(
                "invoice.pdf",
                "application/pdf",
                &[4, 5],
            )),
    );
    let id = MicrosoftMessageId::try_from(delivered.immutable_id.clone()).unwrap();
    let list = w.graph.list_attachments(&id).await.unwrap();
    assert_eq!(list.len(), 2);
    let inline = list
        .iter()
        .find(|a| a.name.as_deref() == Some("shot.png"))
        .unwrap();
    // What the body's `cid:img1` names: the link between the HTML and the stored attachment.
    assert_eq!(inline.content_id.as_deref(), Some("img1"));
    assert_eq!(inline.is_inline, Some(true));
    assert_eq!(
        inline.odata_type.as_deref(),
        Some("#microsoft.graph.fileAttachment")
    );
    let file = list
        .iter()
        .find(|a| a.name.as_deref() == Some("invoice.pdf"))
        .unwrap();
    assert_eq!(file.content_id, None);
    assert_eq!(file.is_inline, Some(false));
    // Metadata only: the one request selected no content bytes.
    let log = w.sim.request_log();
    let listing = log
        .iter()
        .find(|e| e.route == "GET /me/messages/{id}/attachments")
        .unwrap();
    assert_eq!(listing.status, 200);
    assert!(!listing.query.contains("contentBytes"), "{}", listing.query);
    w.sim.shutdown().await;
}

#[tokio::test]
async fn a_throttled_token_endpoint_is_retryable_after_its_retry_after() {
    let w = world().await;
    w.sim.set_fault(
        FaultRule::new(FaultKind::TooManyRequests {
            retry_after: Some("2.5".into()),
        })
        .path("/oauth2/v2.0/token")
        .times(1),
    );
    let refresh = w.tokens.state.lock().unwrap().1.clone();
    let err = w
        .identity
        .refresh(&TenantSegment::common(), &refresh)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TokenError::Transient { status: 429, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.class(),
        ErrorClass::Retryable {
            after: Some(Duration::from_millis(2500))
        }
    );
    // The fault fired once; the same refresh token still works.
    w.identity
        .refresh(&TenantSegment::common(), &refresh)
        .await
        .unwrap();
    w.sim.shutdown().await;
}

#[tokio::test]
async fn an_unknown_tenant_is_a_configuration_error_not_a_reconnect() {
    let w = world().await;
    let refresh = w.tokens.state.lock().unwrap().1.clone();
    let tenant = TenantSegment::parse("no-such-tenant.example").unwrap();
    let err = w.identity.refresh(&tenant, &refresh).await.unwrap_err();
    assert!(
        matches!(&err, TokenError::Rejected { status: 400, error, .. } if error == "invalid_request"),
        "{err:?}"
    );
    assert_eq!(err.aadsts_codes(), [90002]);
    // The user's grant is fine; the deployment's authority is wrong. Reconnecting would not help.
    assert_eq!(err.class(), ErrorClass::Configuration, "{err}");
    assert!(!err.to_string().contains(refresh.expose_secret()));
    w.sim.shutdown().await;
}

#[tokio::test]
async fn probing_shared_mailboxes() {
    let w = world_with_scopes(&[
        "offline_access",
        "User.Read",
        "Mail.ReadWrite",
        "Mail.Send",
        "Mail.ReadWrite.Shared",
        "Mail.Send.Shared",
    ])
    .await;
    let shared = w
        .sim
        .create_shared_mailbox("contoso.com", "help@contoso.com", "Help desk");
    let other = w
        .sim
        .create_shared_mailbox("contoso.com", "finance@contoso.com", "Finance");
    w.sim.grant_mailbox_access(&shared, &w.user);

    assert!(matches!(
        w.graph.probe_mailbox("help@contoso.com").await.unwrap(),
        MailboxProbe::Accessible(_)
    ));
    assert_eq!(
        w.graph.probe_mailbox(&other.upn).await.unwrap(),
        MailboxProbe::NoAccess
    );
    assert_eq!(
        w.graph.probe_mailbox("nobody@contoso.com").await.unwrap(),
        MailboxProbe::NoMailbox
    );

    w.sim.deliver(
        &shared,
        InboundMail::new("customer@fabrikam.com", "Shared question").text("?"),
    );
    let help = w
        .graph
        .for_mailbox(jobs::graph::Mailbox::User("help@contoso.com".into()));
    let page = help
        .list_messages(
            &WellKnownFolder::Inbox.into(),
            &ListMessagesQuery::default(),
        )
        .await
        .unwrap();
    assert_eq!(page.value.len(), 1);
    assert_eq!(page.value[0].subject.as_deref(), Some("Shared question"));
    w.sim.shutdown().await;
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
async fn sending_as_a_shared_mailbox_without_send_as_is_a_permanent_clearly_worded_error() {
    let w = world_with_scopes(SHARED_SCOPES).await;
    let shared = w
        .sim
        .create_shared_mailbox("contoso.com", "help@contoso.com", "Help desk");
    w.sim.grant_mailbox_access_without_send_as(&shared, &w.user);
    let inbound = w.sim.deliver(
        &shared,
        InboundMail::new("customer@fabrikam.com", "Shared question").text("?"),
    );
    let help = w
        .graph
        .for_mailbox(jobs::graph::Mailbox::User("help@contoso.com".into()));

    // Full access: the probe opens it and a reply draft can be made.
    assert!(matches!(
        w.graph.probe_mailbox("help@contoso.com").await.unwrap(),
        MailboxProbe::Accessible(_)
    ));
    let target = MicrosoftMessageId::try_from(inbound.id.clone()).unwrap();
    let draft = help
        .create_reply(&target, &ReplyContent::Comment("On it.".into()))
        .await
        .unwrap();

    let err = help.send_draft(&draft.id).await.unwrap_err();
    assert!(err.is_send_as_denied(), "{err:?}");
    assert!(
        !err.is_access_denied(),
        "not a plain access denial: {err:?}"
    );
    assert_eq!(err.status(), Some(403));
    assert_eq!(err.class(), ErrorClass::Permanent);
    let text = err.to_string();
    assert!(
        text.contains("ErrorSendAsDenied") && text.contains("does not have the right to send"),
        "{text}"
    );
    let err = help
        .send_mail(
            &jobs::graph::OutgoingMessage {
                fields: MessagePatch {
                    subject: Some("Hello".into()),
                    body: Some(ItemBody::html("<p>x</p>".to_string())),
                    to_recipients: Some(vec![jobs::graph::Recipient::new(
                        "customer@fabrikam.com",
                        None,
                    )]),
                    ..MessagePatch::default()
                },
                attachments: vec![],
            },
            true,
        )
        .await
        .unwrap_err();
    assert!(err.is_send_as_denied(), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Permanent);
    // A permanent error: each refusal was asked once, nothing was sent.
    let stats = w.sim.stats();
    assert_eq!(stats.route_status("POST /me/messages/{id}/send", 403), 1);
    assert_eq!(stats.route_status("POST /me/sendMail", 403), 1);
    assert!(w.sim.sends().is_empty());
    w.sim.shutdown().await;
}

#[tokio::test]
async fn an_address_without_a_cloud_mailbox_probes_as_no_mailbox() {
    let w = world_with_scopes(SHARED_SCOPES).await;
    let onprem = w
        .sim
        .create_user("contoso.com", "onprem@contoso.com", "On Premises");
    w.sim.set_cloud_mailbox(&onprem, false);
    assert_eq!(
        w.graph.probe_mailbox(&onprem.upn).await.unwrap(),
        MailboxProbe::NoMailbox
    );
    // Any other mailbox call says so too, and is not worth retrying.
    let err = w
        .graph
        .for_mailbox(jobs::graph::Mailbox::User(onprem.upn.clone()))
        .list_mail_folders()
        .await
        .unwrap_err();
    assert!(err.is_mailbox_not_enabled(), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Permanent);
    w.sim.shutdown().await;
}
