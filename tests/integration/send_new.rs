//! SendReply from a mailbox that holds no customer message to reply to: the reply goes out as a
//! new message, still exactly once, and is confirmed and stored like a reply.

use std::time::Duration;

use graph_sim::{GraphSim, InboundMail};
use graphdesk_tests::{
    Endpoints, TestDb, WorkerOptions, connect_direct, spawn_sim, spawn_worker, wait_for_count,
};
use jobs::ids::{AccountId, IdempotencyKey, SendId, TenantId, TicketId};
use jobs::sends::{NewReply, create_send};
use jobs::services::Services;

const SALES: &str = "sales@northwind.example";
const SUPPORT: &str = "support@northwind.example";
const CUSTOMER: &str = "pat@customer.example";

struct World {
    db: TestDb,
    sim: GraphSim,
    endpoints: Endpoints,
    services: Services,
    tenant: TenantId,
    sales: AccountId,
    support: AccountId,
    ticket: i64,
}

/// The customer wrote to sales only; the ticket is ingested from the sales mailbox.
async fn world() -> World {
    let db = TestDb::new().await;
    let sim = spawn_sim("http://127.0.0.1:9/oauth/callback", |_| {}).await;
    let t = sim.create_tenant("northwind.example", "Northwind");
    sim.create_user(&t, SALES, "Sales");
    sim.create_user(&t, SUPPORT, "Support");
    let c = sim.create_tenant("customer.example", "Customer");
    sim.create_user(&c, CUSTOMER, "Pat");
    let endpoints = Endpoints::sim(&sim, "http://127.0.0.1:9/oauth/callback");
    let services = endpoints.services(&db.pool);
    let tenant = db.create_tenant("Northwind").await;
    let sales = connect_direct(&services, &sim, tenant, SALES).await;
    let support = connect_direct(&services, &sim, tenant, SUPPORT).await;
    sim.deliver(
        SALES,
        InboundMail::new(CUSTOMER, "Broken laptop")
            .message_id("<laptop@customer.example>")
            .text("It will not boot."),
    );
    jobs::sync::sync_folder(&services, tenant, sales, "inbox")
        .await
        .expect("sync")
        .expect("no concurrent sync");
    let ticket: i64 = sqlx::query_scalar("SELECT id FROM helpdesk_tickets")
        .fetch_one(&db.pool)
        .await
        .expect("one ticket");
    World {
        db,
        sim,
        endpoints,
        services,
        tenant,
        sales,
        support,
        ticket,
    }
}

impl World {
    async fn new_send(&self, key: &str, body_html: &str) -> SendId {
        create_send(
            &self.db.pool,
            self.tenant,
            TicketId::new(self.ticket),
            "agent",
            &IdempotencyKey::try_from(key.to_string()).unwrap(),
            NewReply {
                to: vec![],
                cc: vec![],
                body_html: body_html.to_string(),
            },
        )
        .await
        .expect("create send")
        .send_id
    }

    async fn send_status(&self, send: SendId) -> (String, Option<String>) {
        sqlx::query_as("SELECT status, failure_reason FROM helpdesk_outbound_sends WHERE id = $1")
            .bind(send.as_uuid())
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// The one message Graph sent for `marker`, checked as a new message (not a reply) from
    /// `mailbox` to the customer, with the ticket token.
    fn assert_sent_once_as_new_message(&self, marker: &str, mailbox: &str) {
        let sends: Vec<_> = self
            .sim
            .sends()
            .into_iter()
            .filter(|s| s.body.contains(marker))
            .collect();
        assert_eq!(sends.len(), 1, "sent exactly once: {sends:?}");
        let sent = &sends[0];
        assert_eq!(sent.kind, "send", "a draft that was sent");
        assert!(
            sent.user_upn.eq_ignore_ascii_case(mailbox),
            "{}",
            sent.user_upn
        );
        assert_eq!(sent.to, vec![CUSTOMER.to_string()]);
        assert_eq!(
            sent.subject,
            format!("RE: Broken laptop [#{}]", self.ticket)
        );
        assert_eq!(
            sent.in_reply_to, None,
            "nothing in this mailbox to reply to"
        );
    }

    async fn outbound_on_ticket(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM helpdesk_messages WHERE ticket_id = $1 AND direction = 'outbound'",
        )
        .bind(self.ticket)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn a_reply_from_a_mailbox_that_never_saw_the_customer_goes_out_once_as_a_new_message() {
    let w = world().await;
    // The ticket is answered from support, which never received the customer's mail.
    sqlx::query("UPDATE helpdesk_tickets SET email_account_id = $1 WHERE id = $2")
        .bind(w.support.as_uuid())
        .bind(w.ticket)
        .execute(&w.db.pool)
        .await
        .unwrap();
    let seen_by_support: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM helpdesk_message_sightings WHERE email_account_id = $1",
    )
    .bind(w.support.as_uuid())
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(seen_by_support, 0);
    let send = w
        .new_send("new-1", "<p>Marker new-1: try a hard reset.</p>")
        .await;
    let _worker = spawn_worker(
        &w.db,
        WorkerOptions {
            endpoints: w.endpoints.clone(),
            ..WorkerOptions::default()
        },
    )
    .await;
    wait_for_count(
        &w.db.pool,
        "SELECT count(*) FROM helpdesk_outbound_sends WHERE status IN ('confirmed', 'failed')",
        1,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(w.send_status(send).await, ("confirmed".to_string(), None));
    w.assert_sent_once_as_new_message("Marker new-1", SUPPORT);
    assert_eq!(w.outbound_on_ticket().await, 1, "stored on the ticket");
    assert!(
        w.sim
            .sends()
            .iter()
            .all(|s| !s.user_upn.eq_ignore_ascii_case(SALES)),
        "nothing left through the mailbox that saw the customer"
    );
}

#[tokio::test]
async fn two_executions_at_once_send_a_new_message_once_when_the_customer_mail_was_deleted() {
    let w = world().await;
    // The customer's mail was deleted from the mailbox after it became a ticket.
    let removed = sqlx::query(
        "UPDATE helpdesk_message_sightings SET removed_at = now() WHERE email_account_id = $1",
    )
    .bind(w.sales.as_uuid())
    .execute(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(removed.rows_affected(), 1);
    let send = w
        .new_send("new-2", "<p>Marker new-2: a replacement ships today.</p>")
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Two executions of the same job at once, as after a lease takeover; each run picks
        // up from whatever the other recorded.
        let (a, b) = tokio::join!(
            jobs::sending::send_reply(&w.services, w.tenant, send),
            jobs::sending::send_reply(&w.services, w.tenant, send),
        );
        let (status, reason) = w.send_status(send).await;
        if status == "confirmed" || status == "failed" {
            assert_eq!((status.as_str(), reason), ("confirmed", None));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "send stuck at {status}: {a:?} {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.assert_sent_once_as_new_message("Marker new-2", SALES);
    assert_eq!(w.outbound_on_ticket().await, 1, "stored on the ticket once");
}
