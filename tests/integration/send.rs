//! SendReply against graph-sim: an agent's reply leaves exactly once, is saved, and threads
//! back; crashes at each step and concurrent executions still send one message.

use std::time::Duration;

use graph_sim::{FaultKind, FaultRule, GraphSim, InboundMail};
use graphdesk_tests::{
    Endpoints, TestApp, TestDb, TestRole, WorkerOptions, connect_direct, spawn_app_on, spawn_sim,
    spawn_worker,
};
use jobs::ids::{AccountId, IdempotencyKey, SendId, TenantId, TicketId};
use jobs::sends::{NewReply, create_send};
use jobs::services::Services;
use nix::sys::signal::Signal;

const SUPPORT: &str = "support@northwind.example";
const CUSTOMER: &str = "pat@customer.example";

struct World {
    app: TestApp,
    sim: GraphSim,
    services: Services,
    tenant: TenantId,
    account: AccountId,
    ticket: i64,
    agent: String,
}

async fn world() -> World {
    let db = TestDb::new().await;
    let sim = spawn_sim("http://127.0.0.1:9/oauth/callback", |_| {}).await;
    let t = sim.create_tenant("northwind.example", "Northwind");
    sim.create_user(&t, SUPPORT, "Support");
    let c = sim.create_tenant("customer.example", "Customer");
    sim.create_user(&c, CUSTOMER, "Pat");
    let endpoints = Endpoints::sim(&sim, "http://127.0.0.1:9/oauth/callback");
    let services = endpoints.services(&db.pool);
    let tenant = db.create_tenant("Northwind").await;
    let account = connect_direct(&services, &sim, tenant, SUPPORT).await;
    sim.deliver(
        SUPPORT,
        InboundMail::new(CUSTOMER, "Broken laptop")
            .message_id("<laptop@customer.example>")
            .text("It will not boot."),
    );
    jobs::sync::sync_folder(&services, tenant, account, "inbox")
        .await
        .unwrap()
        .unwrap();
    let ticket: i64 = sqlx::query_scalar("SELECT id FROM helpdesk_tickets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut app = spawn_app_on(db).await;
    app.endpoints = endpoints;
    let agent = app.token(tenant, TestRole::Agent);
    World {
        app,
        sim,
        services,
        tenant,
        account,
        ticket,
        agent,
    }
}

impl World {
    async fn post_reply(&self, key: &str, body: &str) -> reqwest::Response {
        self.app
            .client
            .post(
                self.app
                    .url(&format!("/api/v1/tickets/{}/replies", self.ticket)),
            )
            .bearer_auth(&self.agent)
            .header("Idempotency-Key", key)
            .json(&serde_json::json!({ "body_html": body }))
            .send()
            .await
            .unwrap()
    }

    async fn worker(&self) -> graphdesk_tests::WorkerProcess {
        spawn_worker(
            &self.app.db,
            WorkerOptions {
                endpoints: self.app.endpoints.clone(),
                ..WorkerOptions::default()
            },
        )
        .await
    }

    async fn send_status(&self, send: &str) -> (String, Option<String>) {
        sqlx::query_as(
            "SELECT status, failure_reason FROM helpdesk_outbound_sends WHERE id = $1::uuid",
        )
        .bind(send)
        .fetch_one(&self.app.db.pool)
        .await
        .unwrap()
    }

    async fn wait_send(&self, send: &str, status: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (s, reason) = self.send_status(send).await;
            if s == status {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "send stuck at {s} ({reason:?}), wanted {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A send row created directly (the API path is tested separately).
    async fn new_send(&self, key: &str) -> SendId {
        create_send(
            &self.app.db.pool,
            self.tenant,
            TicketId::new(self.ticket),
            "agent",
            &IdempotencyKey::try_from(key.to_string()).unwrap(),
            NewReply {
                to: vec![],
                cc: vec![],
                body_html: format!("<p>Answer {key}</p>"),
            },
        )
        .await
        .unwrap()
        .send_id
    }

    /// Runs a send up to `draft_created` (a fault stops it at the send step, as a crash right
    /// before `send` would) and returns the draft's id.
    async fn run_to_draft_created(&self, send: SendId) -> String {
        let fault = self.sim.set_fault(
            FaultRule::new(FaultKind::ServiceUnavailable {
                retry_after: Some("60".into()),
            })
            .path("/send"),
        );
        let first = jobs::sending::send_reply(&self.services, self.tenant, send).await;
        assert!(first.is_err(), "the send step was stopped by the fault");
        self.sim.remove_fault(&fault);
        assert_eq!(self.send_status(&send.to_string()).await.0, "draft_created");
        sqlx::query_scalar("SELECT draft_id FROM helpdesk_outbound_sends WHERE id = $1")
            .bind(send.as_uuid())
            .fetch_one(&self.app.db.pool)
            .await
            .unwrap()
    }

    fn client(&self) -> jobs::graph::GraphClient {
        jobs::accounts::graph_client(&self.services, self.tenant, self.account)
    }

    /// The send ended confirmed, and Graph sent its reply exactly once.
    async fn assert_confirmed_once(&self, send: SendId, send_marker: &str) {
        assert_eq!(self.send_status(&send.to_string()).await.0, "confirmed");
        assert_eq!(self.sends_of(send_marker), 1);
    }

    /// The send ended failed, with `reason_part` in its reason, and nothing was sent.
    async fn assert_failed_unsent(&self, send: SendId, reason_part: &str, send_marker: &str) {
        let (status, reason) = self.send_status(&send.to_string()).await;
        assert_eq!(status, "failed");
        assert!(
            reason.as_deref().is_some_and(|r| r.contains(reason_part)),
            "{reason:?}"
        );
        assert_eq!(self.sends_of(send_marker), 0);
    }

    fn sends_of(&self, send_marker: &str) -> usize {
        self.sim
            .sends()
            .iter()
            .filter(|s| s.body.contains(send_marker))
            .count()
    }
}

#[tokio::test]
async fn a_reply_leaves_once_is_saved_and_the_customers_answer_threads_back() {
    let w = world().await;
    let resp = w
        .post_reply("reply-1", "<p>Please try a hard reset.</p>")
        .await;
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    let send = body["send_id"].as_str().unwrap().to_string();
    let _worker = w.worker().await;
    w.wait_send(&send, "confirmed").await;

    let sends = w.sim.sends();
    assert_eq!(sends.len(), 1);
    let sent = &sends[0];
    assert!(
        sent.subject.contains(&format!("[#{}]", w.ticket)),
        "{}",
        sent.subject
    );
    assert_eq!(sent.to, vec![CUSTOMER.to_string()]);
    assert_eq!(
        sent.in_reply_to.as_deref(),
        Some("<laptop@customer.example>")
    );
    let (rule, status): (String, String) = sqlx::query_as(
        "SELECT m.thread_rule, t.status FROM helpdesk_messages m JOIN helpdesk_tickets t ON t.id = m.ticket_id
         WHERE m.direction = 'outbound'",
    )
    .fetch_one(&w.app.db.pool)
    .await
    .unwrap();
    assert_eq!(rule, "outbound_reply");
    assert_eq!(status, "pending", "waiting on the customer");

    // The customer answers our message; it threads onto the ticket by its Message-ID.
    w.sim.deliver(
        SUPPORT,
        InboundMail::new(CUSTOMER, "RE: Broken laptop")
            .message_id("<answer@customer.example>")
            .in_reply_to(sent.internet_message_id.clone())
            .text("That worked, thanks"),
    );
    jobs::sync::sync_folder(&w.services, w.tenant, w.account, "inbox")
        .await
        .unwrap()
        .unwrap();
    let (ticket, rule): (i64, String) = sqlx::query_as(
        "SELECT ticket_id, thread_rule FROM helpdesk_messages WHERE internet_message_id = '<answer@customer.example>'",
    )
    .fetch_one(&w.app.db.pool)
    .await
    .unwrap();
    assert_eq!((ticket, rule.as_str()), (w.ticket, "in_reply_to"));
    let status: String = sqlx::query_scalar("SELECT status FROM helpdesk_tickets WHERE id = $1")
        .bind(w.ticket)
        .fetch_one(&w.app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        status, "open",
        "the customer's answer reopens the pending ticket"
    );
}

#[tokio::test]
async fn the_same_idempotency_key_posted_50_times_at_once_is_one_send() {
    let w = world().await;
    let posts =
        futures::future::join_all((0..50).map(|_| w.post_reply("same-key", "<p>Once</p>"))).await;
    let mut ids = std::collections::HashSet::new();
    for resp in posts {
        assert_eq!(resp.status(), 202);
        ids.insert(
            resp.json::<serde_json::Value>().await.unwrap()["send_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(ids.len(), 1);
    let jobs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM queue_jobs_all WHERE queue = 'graphdesk.send_reply'",
    )
    .fetch_one(&w.app.db.pool)
    .await
    .unwrap();
    assert_eq!(jobs, 1);
    // The same key with another body is a client bug, said clearly.
    let conflict = w.post_reply("same-key", "<p>Different</p>").await;
    assert_eq!(conflict.status(), 409);
    let msg: serde_json::Value = conflict.json().await.unwrap();
    assert!(
        msg["message"].as_str().unwrap().contains("Idempotency-Key"),
        "{msg}"
    );
    let _worker = w.worker().await;
    w.wait_send(ids.iter().next().unwrap(), "confirmed").await;
    assert_eq!(w.sim.sends().len(), 1);
}

#[tokio::test]
async fn bad_reply_requests_are_refused_and_store_nothing() {
    let w = world().await;
    let cases = [
        (
            serde_json::json!({ "body_html": "" }),
            "reply-empty",
            422,
            "body_html",
        ),
        (
            serde_json::json!({ "body_html": "x", "to": ["not an address"] }),
            "reply-bad-to",
            422,
            "to: ",
        ),
        (
            serde_json::json!({ "body_html": "x".repeat(300_000) }),
            "reply-huge",
            422,
            "body_html",
        ),
        // Shape errors name the field, wherever it sits in the body.
        (
            serde_json::json!({ "to": ["a@example.com"] }),
            "reply-no-body",
            400,
            "field `body_html` is missing",
        ),
        (
            serde_json::json!({ "body_html": "x", "cc": ["a@example.com", {}] }),
            "reply-cc-object",
            400,
            "field `cc[1]`: expected a string, found an object",
        ),
        (
            serde_json::json!({ "body_html": ["x"] }),
            "reply-body-array",
            400,
            "field `body_html`: expected a string, found an array",
        ),
    ];
    for (body, key, status, says) in cases {
        let resp = w
            .app
            .client
            .post(w.app.url(&format!("/api/v1/tickets/{}/replies", w.ticket)))
            .bearer_auth(&w.agent)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{key}");
        let error: serde_json::Value = resp.json().await.unwrap();
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains(says)),
            "{key}: the error should say `{says}`: {error}"
        );
    }
    let missing_key = w
        .app
        .client
        .post(w.app.url(&format!("/api/v1/tickets/{}/replies", w.ticket)))
        .bearer_auth(&w.agent)
        .json(&serde_json::json!({ "body_html": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(missing_key.status(), 400);
    let other_tenant = w.app.token(TenantId::new(), TestRole::Agent);
    let resp = w
        .app
        .client
        .post(w.app.url(&format!("/api/v1/tickets/{}/replies", w.ticket)))
        .bearer_auth(&other_tenant)
        .header("Idempotency-Key", "k")
        .json(&serde_json::json!({ "body_html": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        404,
        "another tenant's ticket does not exist for them"
    );
    let sends: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_outbound_sends")
        .fetch_one(&w.app.db.pool)
        .await
        .unwrap();
    assert_eq!(sends, 0);
}

#[tokio::test]
async fn a_crash_between_create_reply_and_storing_the_draft_still_sends_once() {
    let w = world().await;
    let send = w.new_send("crash-1").await;
    // The crashed execution's draft exists in Graph but was never recorded.
    let client = jobs::accounts::graph_client(&w.services, w.tenant, w.account);
    let target: String =
        sqlx::query_scalar("SELECT microsoft_message_id FROM helpdesk_message_sightings LIMIT 1")
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    client
        .create_reply(
            &target.try_into().unwrap(),
            &jobs::graph::ReplyContent::Comment("<p>Answer crash-1</p>".into()),
        )
        .await
        .unwrap();
    jobs::sending::send_reply(&w.services, w.tenant, send)
        .await
        .unwrap();
    assert_eq!(w.send_status(&send.to_string()).await.0, "confirmed");
    assert_eq!(
        w.sends_of("Answer crash-1"),
        1,
        "the orphan draft is never sent"
    );
}

#[tokio::test]
async fn a_crash_between_send_and_storing_sent_does_not_send_again() {
    let w = world().await;
    let send = w.new_send("crash-2").await;
    // Run up to draft_created, then send the draft behind graphdesk's back: the state a crash
    // right after `send` leaves.
    let draft = w.run_to_draft_created(send).await;
    w.client()
        .send_draft(&draft.try_into().unwrap())
        .await
        .unwrap();
    jobs::sending::send_reply(&w.services, w.tenant, send)
        .await
        .unwrap();
    w.assert_confirmed_once(send, "Answer crash-2").await;
}

#[tokio::test]
async fn two_executions_at_once_send_once() {
    let w = world().await;
    let send = w.new_send("twice").await;
    let (a, b) = tokio::join!(
        jobs::sending::send_reply(&w.services, w.tenant, send),
        jobs::sending::send_reply(&w.services, w.tenant, send),
    );
    // Either may end early (the other owns a step); rerun until settled.
    let _ = (a, b);
    jobs::sending::send_reply(&w.services, w.tenant, send)
        .await
        .unwrap();
    w.assert_confirmed_once(send, "Answer twice").await;
}

/// The interleaving `two_executions_at_once_send_once` can only hit by chance: one execution
/// reads the draft (still a draft), another sends it, and the first's update then finds a sent
/// message.
#[tokio::test]
async fn a_draft_sent_by_another_execution_while_this_one_updates_it_is_not_a_failure() {
    let w = world().await;
    let send = w.new_send("overtaken").await;
    let draft = w.run_to_draft_created(send).await;
    // This execution's update of the draft is held up; meanwhile the other one sends it.
    w.sim.set_fault(
        FaultRule::new(FaultKind::Delay { millis: 3_000 })
            .method("PATCH")
            .times(1),
    );
    let (services, tenant) = (w.services.clone(), w.tenant);
    let slow =
        tokio::spawn(async move { jobs::sending::send_reply(&services, tenant, send).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.client()
        .send_draft(&draft.try_into().unwrap())
        .await
        .unwrap();
    slow.await.unwrap().unwrap();
    w.assert_confirmed_once(send, "Answer overtaken").await;
}

/// A deferred reply's draft deleted from the mailbox (by a person, or a retention policy)
/// before it was sent: Graph answers 404 for it. That reads as "an earlier execution sent it",
/// so the send moves on to confirming; when nothing with its Internet message id reaches Sent
/// Items, the send must end failed where people see it, not stay `sent` with nothing sent.
#[tokio::test]
async fn a_draft_deleted_before_it_was_sent_ends_the_send_failed_not_sent() {
    let w = world().await;
    let send = w.new_send("deleted-draft").await;
    let draft = w.run_to_draft_created(send).await;
    w.client()
        .delete_message(&draft.try_into().unwrap())
        .await
        .unwrap();
    let first = jobs::sending::send_reply(&w.services, w.tenant, send).await;
    assert!(
        first.is_err(),
        "nothing in Sent Items yet: confirm again later"
    );
    assert_eq!(w.send_status(&send.to_string()).await.0, "sent");
    // Ten minutes on, Sent Items still has nothing with the draft's Internet message id.
    sqlx::query(
        "UPDATE helpdesk_outbound_sends SET updated_at = now() - interval '11 minutes' WHERE id = $1",
    )
    .bind(send.as_uuid())
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    jobs::sending::send_reply(&w.services, w.tenant, send)
        .await
        .unwrap();
    w.assert_failed_unsent(send, "draft disappeared", "Answer deleted-draft")
        .await;
}

/// `ErrorInvalidRequest` is what Graph answers for sending a message that is no longer a
/// draft, but it is also Graph's generic 400. A draft that is still a draft after it was
/// refused was not sent: the send fails with Microsoft's reason. Read as "already sent", the
/// confirm step found nothing in Sent Items, put the send back to its draft after ten
/// minutes, and was refused again, for ever.
#[tokio::test]
async fn a_send_refused_with_a_generic_400_while_the_draft_stays_a_draft_fails() {
    let w = world().await;
    let send = w.new_send("refused").await;
    w.run_to_draft_created(send).await;
    w.sim.set_fault(
        FaultRule::new(FaultKind::GraphError {
            status: 400,
            code: "ErrorInvalidRequest".into(),
            message: "The request is invalid.".into(),
        })
        .path("/send"),
    );
    jobs::sending::send_reply(&w.services, w.tenant, send)
        .await
        .unwrap();
    w.assert_failed_unsent(send, "ErrorInvalidRequest", "Answer refused")
        .await;
}

/// The customer's mail was deleted from the mailbox after the last sync saw it: there is
/// nothing to reply to (createReply answers 404), but the answer still goes out, as a new
/// message to the same people, instead of failing.
#[tokio::test]
async fn a_reply_to_mail_deleted_since_the_last_sync_goes_out_as_a_new_message() {
    let w = world().await;
    let inbound: String =
        sqlx::query_scalar("SELECT microsoft_message_id FROM helpdesk_message_sightings LIMIT 1")
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    w.sim.delete_message(SUPPORT, &inbound).unwrap();
    let send = w.new_send("deleted-mail").await;
    jobs::sending::send_reply(&w.services, w.tenant, send)
        .await
        .unwrap();
    w.assert_confirmed_once(send, "Answer deleted-mail").await;
    let sent = w
        .sim
        .sends()
        .into_iter()
        .find(|s| s.body.contains("Answer deleted-mail"))
        .unwrap();
    assert!(sent.to.iter().any(|t| t == CUSTOMER), "{:?}", sent.to);
}

/// The per-minute send count is taken just before `send`. If the mailbox gate then refuses
/// that request, nothing left, and the count is given back: otherwise replies waiting on a
/// busy mailbox would use the minute's allowance up without sending anything.
#[tokio::test]
async fn a_send_the_gate_refuses_at_the_last_step_gives_its_count_back() {
    let w = world().await;
    let send = w.new_send("refused").await;
    w.run_to_draft_created(send).await;
    let sends_counted = || async {
        sqlx::query_scalar::<_, i64>("SELECT coalesce(sum(sends), 0) FROM graph_send_rate")
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap()
    };
    // The attempt stopped by the fault may have reached Microsoft, so it stays counted.
    let before = sends_counted().await;
    assert_eq!(before, 1);
    // The mailbox fills up the moment this run counts its send, after the gate has let its
    // look at the draft and its update through: only the send itself is refused.
    sqlx::raw_sql(
        "CREATE FUNCTION fill_mailbox_slots() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO graph_mailbox_slots (email_account_id, slot, holder, expires_at)
             SELECT NEW.email_account_id, s, gen_random_uuid(), now() + interval '1 hour'
             FROM generate_series(1, 4) s
             ON CONFLICT (email_account_id, slot)
             DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fill_mailbox_slots AFTER INSERT OR UPDATE ON graph_send_rate
             FOR EACH ROW EXECUTE FUNCTION fill_mailbox_slots();",
    )
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    let refused = jobs::sending::send_reply(&w.services, w.tenant, send).await;
    assert!(
        matches!(refused, Err(jobs::queue::JobError::Defer { .. })),
        "the busy mailbox defers the send: {refused:?}"
    );
    assert_eq!(w.sends_of("Answer refused"), 0);
    assert_eq!(
        sends_counted().await,
        before,
        "the refused send was given back"
    );

    sqlx::raw_sql(
        "DROP TRIGGER fill_mailbox_slots ON graph_send_rate;
         UPDATE graph_mailbox_slots SET expires_at = now() - interval '1 second';",
    )
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    jobs::sending::send_reply(&w.services, w.tenant, send)
        .await
        .unwrap();
    w.assert_confirmed_once(send, "Answer refused").await;
    assert_eq!(sends_counted().await, before + 1);
}

#[tokio::test]
async fn a_worker_killed_during_the_sent_items_lookup_confirms_after_recovery() {
    let w = world().await;
    w.sim.set_sent_items_delay(Duration::from_secs(4));
    let send = w.new_send("late-copy").await;
    let lease = |o: &mut WorkerOptions| o.queue.lease = Duration::from_secs(2);
    let mut opts = WorkerOptions {
        endpoints: w.app.endpoints.clone(),
        ..WorkerOptions::default()
    };
    lease(&mut opts);
    let mut victim = spawn_worker(&w.app.db, opts).await;
    w.wait_send(&send.to_string(), "sent").await;
    victim.signal(Signal::SIGKILL);
    victim.wait_exit(Duration::from_secs(10)).await;
    let mut opts = WorkerOptions {
        endpoints: w.app.endpoints.clone(),
        ..WorkerOptions::default()
    };
    lease(&mut opts);
    let _survivor = spawn_worker(&w.app.db, opts).await;
    w.wait_send(&send.to_string(), "confirmed").await;
    assert_eq!(w.sends_of("Answer late-copy"), 1);
    let outbound: i64 =
        sqlx::query_scalar("SELECT count(*) FROM helpdesk_messages WHERE direction = 'outbound'")
            .fetch_one(&w.app.db.pool)
            .await
            .unwrap();
    assert_eq!(outbound, 1);
}

#[tokio::test]
async fn a_429_storm_delays_but_never_duplicates_a_send() {
    let w = world().await;
    w.sim.set_fault(
        FaultRule::new(FaultKind::TooManyRequests {
            retry_after: Some("0.2".into()),
        })
        .mailbox(SUPPORT)
        .probability(0.5),
    );
    let mut sends = Vec::new();
    for i in 0..5 {
        sends.push(w.new_send(&format!("storm-{i}")).await);
    }
    let _worker = w.worker().await;
    for s in &sends {
        w.wait_send(&s.to_string(), "confirmed").await;
    }
    for i in 0..5 {
        assert_eq!(w.sends_of(&format!("Answer storm-{i}")), 1, "storm-{i}");
    }
    assert!(w.sim.stats().throttled > 0, "the storm happened");
}

#[tokio::test]
async fn a_reply_waits_out_a_busy_mailbox_without_spending_its_attempts() {
    let w = world().await;
    // A crashed worker's requests: every one of the mailbox's 4 request slots is held, and the
    // leases are far from over.
    sqlx::query(
        "INSERT INTO graph_mailbox_slots (email_account_id, slot, holder, expires_at)
         SELECT $1, s, gen_random_uuid(), now() + interval '1 hour' FROM generate_series(1, 4) s
         ON CONFLICT (email_account_id, slot)
         DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
    )
    .bind(w.account.as_uuid())
    .execute(&w.app.db.pool)
    .await
    .unwrap();
    let send = w.new_send("busy").await;
    let _worker = w.worker().await;
    let job = |pool: sqlx::PgPool| async move {
        sqlx::query_as::<_, (i32, serde_json::Value)>(
            "SELECT attempts, errors FROM queue_jobs_all WHERE queue = 'graphdesk.send_reply'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    // Each try waits a few seconds for a slot, then gives the mailbox time; twice is enough to
    // see that waiting is not failing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let errors = loop {
        let (_, errors) = job(w.app.db.pool.clone()).await;
        if errors.as_array().is_some_and(|e| e.len() >= 2) {
            break errors;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job did not try twice: {errors}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for entry in errors.as_array().unwrap() {
        assert_eq!(entry["kind"], "deferred", "{errors}");
        assert!(
            entry["error"].as_str().unwrap().contains("mailbox is busy"),
            "{errors}"
        );
    }
    assert_eq!(
        w.sends_of("Answer busy"),
        0,
        "nothing left while the mailbox was full"
    );

    // The crashed holder's leases end; the reply goes out once, on its first counted attempt.
    sqlx::query("UPDATE graph_mailbox_slots SET expires_at = now() - interval '1 second'")
        .execute(&w.app.db.pool)
        .await
        .unwrap();
    w.wait_send(&send.to_string(), "confirmed").await;
    assert_eq!(w.sends_of("Answer busy"), 1);
    let (attempts, _) = job(w.app.db.pool.clone()).await;
    assert_eq!(attempts, 1, "the waits spent no attempts");
}

#[tokio::test]
async fn a_rejected_recipient_fails_the_send_with_a_reason() {
    let w = world().await;
    let resp = w
        .app
        .client
        .post(w.app.url(&format!("/api/v1/tickets/{}/replies", w.ticket)))
        .bearer_auth(&w.agent)
        .header("Idempotency-Key", "bad-recipient")
        .json(&serde_json::json!({ "body_html": "<p>hi</p>", "to": ["someone@localhost"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let send = resp.json::<serde_json::Value>().await.unwrap()["send_id"]
        .as_str()
        .unwrap()
        .to_string();
    let _worker = w.worker().await;
    w.wait_send(&send, "failed").await;
    let (_, reason) = w.send_status(&send).await;
    assert!(reason.unwrap().contains("ErrorInvalidRecipients"));
    assert!(w.sim.sends().is_empty());
}
