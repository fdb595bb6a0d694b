//! SyncMailbox against graph-sim: mail becomes tickets exactly once, on the right ticket.

use std::time::Duration;

use graph_sim::{GeneratorSpec, GraphSim, InboundMail};
use graphdesk_tests::{
    Endpoints, TestApp, TestDb, TestRole, WorkerOptions, connect_direct, spawn_app_on, spawn_sim,
    spawn_worker,
};
use jobs::ids::{AccountId, TenantId};
use jobs::services::Services;
use jobs::sync::{SyncReport, sync_folder};

struct World {
    db: TestDb,
    sim: GraphSim,
    services: Services,
    tenant: TenantId,
    account: AccountId,
}

const MAILBOX: &str = "support@fabrikam.example";

async fn world() -> World {
    let db = TestDb::new().await;
    let sim = spawn_sim("http://127.0.0.1:9/oauth/callback", |_| {}).await;
    let t = sim.create_tenant("fabrikam.example", "Fabrikam");
    sim.create_user(&t, MAILBOX, "Support");
    let services = Endpoints::sim(&sim, "http://127.0.0.1:9/oauth/callback").services(&db.pool);
    let tenant = db.create_tenant("Fabrikam").await;
    let account = connect_direct(&services, &sim, tenant, MAILBOX).await;
    World {
        db,
        sim,
        services,
        tenant,
        account,
    }
}

impl World {
    async fn sync(&self) -> SyncReport {
        self.sync_folder("inbox").await
    }
    async fn sync_folder(&self, folder: &str) -> SyncReport {
        sync_folder(&self.services, self.tenant, self.account, folder)
            .await
            .expect("sync succeeds")
            .expect("no concurrent sync")
    }
    async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
    /// (ticket id, thread rule) of the message with this Message-ID.
    async fn placed(&self, message_id: &str) -> (i64, String) {
        sqlx::query_as(
            "SELECT ticket_id, thread_rule FROM helpdesk_messages WHERE internet_message_id = $1",
        )
        .bind(message_id)
        .fetch_one(&self.db.pool)
        .await
        .unwrap_or_else(|e| panic!("{message_id} not stored: {e}"))
    }
}

impl World {
    /// Two tickets from two separate syncs, then a reply whose headers name both: the
    /// second ticket is merged into the first. Returns the two tickets.
    async fn two_tickets_then_a_reply_naming_both(&self) -> (i64, i64) {
        self.sim.deliver(
            MAILBOX,
            mail("fay@contoso.example", "Printer", "<a@contoso.example>").conversation("c1"),
        );
        self.sim.deliver(
            MAILBOX,
            mail("fay@contoso.example", "Scanner", "<b@contoso.example>").conversation("c2"),
        );
        self.sync().await;
        let a = self.placed("<a@contoso.example>").await.0;
        let b = self.placed("<b@contoso.example>").await.0;
        assert_ne!(a, b);
        self.sim.deliver(
            MAILBOX,
            mail("fay@contoso.example", "Re: both", "<c@contoso.example>")
                .in_reply_to("<b@contoso.example>")
                .references(["<a@contoso.example>", "<b@contoso.example>"])
                .conversation("c3"),
        );
        self.sync().await;
        (a, b)
    }
}

fn mail(from: &str, subject: &str, id: &str) -> InboundMail {
    InboundMail::new(from, subject).message_id(id).text("Hello")
}

#[tokio::test]
async fn a_generated_mailbox_of_5000_messages_becomes_the_right_tickets_once() {
    let w = world().await;
    let summary = w.sim.generate_mailbox(
        MAILBOX,
        GeneratorSpec {
            seed: 7,
            messages: 5000,
            days: 10,
            ..GeneratorSpec::default()
        },
    );
    let first = w.sync().await;
    assert_eq!(first.ingested, 5000, "{first:?}");
    assert_eq!(first.duplicates, 0);
    let tickets = w
        .count("SELECT count(*) FROM helpdesk_tickets WHERE merged_into_ticket_id IS NULL")
        .await;
    assert_eq!(tickets as usize, summary.threads, "{summary:?}");
    let auto = w
        .count("SELECT count(*) FROM helpdesk_messages WHERE is_auto_reply")
        .await;
    assert_eq!(auto as usize, summary.auto_replies);

    // A re-sync of the unchanged mailbox creates nothing.
    let again = w.sync().await;
    assert_eq!((again.ingested, again.new_tickets), (0, 0), "{again:?}");
    // Even a full resync from scratch only finds duplicates.
    sqlx::query("UPDATE helpdesk_sync_state SET delta_link = NULL, next_link = NULL")
        .execute(&w.db.pool)
        .await
        .unwrap();
    let full = w.sync().await;
    assert_eq!(full.ingested, 0);
    assert_eq!(full.duplicates, 5000);
    assert_eq!(
        w.count("SELECT count(*) FROM helpdesk_messages").await,
        5000
    );
    let (ingested, dups): (i64, i64) =
        sqlx::query_as("SELECT messages_ingested, duplicates_skipped FROM helpdesk_email_accounts")
            .fetch_one(&w.db.pool)
            .await
            .unwrap();
    assert_eq!((ingested, dups), (5000, 5000));
}

#[tokio::test]
async fn threading_rules_place_each_mail_and_say_why() {
    let w = world().await;
    w.sim.deliver(
        MAILBOX,
        mail(
            "ann@contoso.example",
            "Invoice",
            "<inv-ann@contoso.example>",
        ),
    );
    w.sim.deliver(
        MAILBOX,
        mail(
            "bob@tailspin.example",
            "Invoice",
            "<inv-bob@tailspin.example>",
        ),
    );
    w.sync().await;
    // "Re: Invoice" from two different customers stays two tickets (headerless replies).
    w.sim.deliver(
        MAILBOX,
        mail(
            "ann@contoso.example",
            "AW: Invoice",
            "<re-ann@contoso.example>",
        )
        .conversation("conv-ann-2"),
    );
    w.sim.deliver(
        MAILBOX,
        mail(
            "bob@tailspin.example",
            "RE: Invoice",
            "<re-bob@tailspin.example>",
        )
        .conversation("conv-bob-2"),
    );
    // A reply with headers.
    w.sim.deliver(
        MAILBOX,
        mail(
            "ann@contoso.example",
            "Re: Invoice",
            "<re2-ann@contoso.example>",
        )
        .in_reply_to("<inv-ann@contoso.example>")
        .conversation("conv-ann-3"),
    );
    // Junk ids are ignored: this one falls through to a new ticket.
    w.sim.deliver(
        MAILBOX,
        mail(
            "carol@litware.example",
            "Question",
            "<q-carol@litware.example>",
        )
        .in_reply_to("<1234567>"),
    );
    w.sync().await;
    let ann = w.placed("<inv-ann@contoso.example>").await.0;
    let bob = w.placed("<inv-bob@tailspin.example>").await.0;
    assert_ne!(ann, bob);
    assert_eq!(
        w.placed("<re-ann@contoso.example>").await,
        (ann, "subject".into())
    );
    assert_eq!(
        w.placed("<re-bob@tailspin.example>").await,
        (bob, "subject".into())
    );
    assert_eq!(
        w.placed("<re2-ann@contoso.example>").await,
        (ann, "in_reply_to".into())
    );
    let (carol, rule) = w.placed("<q-carol@litware.example>").await;
    assert!(carol != ann && carol != bob);
    assert_eq!(rule, "new_ticket");

    // A ticket token in the subject wins even without headers.
    w.sim.deliver(
        MAILBOX,
        mail(
            "dave@other.example",
            &format!("Follow-up [#{bob}]"),
            "<tok@other.example>",
        ),
    );
    w.sync().await;
    assert_eq!(
        w.placed("<tok@other.example>").await,
        (bob, "ticket_token".into())
    );
}

#[tokio::test]
async fn a_reply_that_arrives_before_its_parent_ends_on_one_ticket() {
    let w = world().await;
    w.sim.deliver(
        MAILBOX,
        mail(
            "erin@contoso.example",
            "Re: Outage",
            "<child@contoso.example>",
        )
        .in_reply_to("<parent@contoso.example>")
        .conversation("c-child"),
    );
    w.sync().await;
    w.sim.deliver(
        MAILBOX,
        mail("erin@contoso.example", "Outage", "<parent@contoso.example>").conversation("c-parent"),
    );
    w.sync().await;
    let (child, _) = w.placed("<child@contoso.example>").await;
    let (parent, rule) = w.placed("<parent@contoso.example>").await;
    assert_eq!(parent, child);
    assert_eq!(rule, "referenced_by");
    assert_eq!(w.count("SELECT count(*) FROM helpdesk_tickets").await, 1);
}

#[tokio::test]
async fn headers_pointing_at_two_tickets_merge_them_consistently() {
    let w = world().await;
    let (a, b) = w.two_tickets_then_a_reply_naming_both().await;
    let survivor = a.min(b);
    for id in [
        "<a@contoso.example>",
        "<b@contoso.example>",
        "<c@contoso.example>",
    ] {
        assert_eq!(w.placed(id).await.0, survivor, "{id}");
    }
    let merged: Option<i64> =
        sqlx::query_scalar("SELECT merged_into_ticket_id FROM helpdesk_tickets WHERE id = $1")
            .bind(a.max(b))
            .fetch_one(&w.db.pool)
            .await
            .unwrap();
    assert_eq!(merged, Some(survivor));
}

#[tokio::test]
async fn a_merge_within_one_page_moves_the_pages_earlier_messages_and_keeps_the_merged_ticket_closed()
 {
    let w = world().await;
    // All three arrive in one delta page, in this order: the third names both tickets the
    // first two made.
    let at = |minutes: i64| chrono::Utc::now() - chrono::TimeDelta::minutes(minutes);
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Printer", "<a@contoso.example>")
            .conversation("c1")
            .received_at(at(3)),
    );
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Scanner", "<b@contoso.example>")
            .conversation("c2")
            .received_at(at(2)),
    );
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Re: both", "<c@contoso.example>")
            .in_reply_to("<b@contoso.example>")
            .references(["<a@contoso.example>", "<b@contoso.example>"])
            .conversation("c3")
            .received_at(at(1)),
    );
    w.sync().await;
    let survivor = w.placed("<a@contoso.example>").await.0;
    for id in ["<b@contoso.example>", "<c@contoso.example>"] {
        assert_eq!(w.placed(id).await.0, survivor, "{id}");
    }
    let merged: Vec<(i64, String, Option<i64>)> = sqlx::query_as(
        "SELECT id, status, merged_into_ticket_id FROM helpdesk_tickets WHERE id <> $1",
    )
    .bind(survivor)
    .fetch_all(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(merged.len(), 1, "{merged:?}");
    assert_eq!(merged[0].1, "closed", "{merged:?}");
    assert_eq!(merged[0].2, Some(survivor), "{merged:?}");
    assert_eq!(
        w.count("SELECT count(*) FROM helpdesk_messages WHERE ticket_id <> (SELECT min(id) FROM helpdesk_tickets)").await,
        0
    );
}

#[tokio::test]
async fn an_archived_ticket_stays_archived_when_later_replies_name_it_beside_its_successor() {
    let w = world().await;
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Printer", "<m1@contoso.example>").conversation("c1"),
    );
    w.sync().await;
    let archived = w.placed("<m1@contoso.example>").await.0;
    sqlx::query("UPDATE helpdesk_tickets SET status = 'archived' WHERE id = $1")
        .bind(archived)
        .execute(&w.db.pool)
        .await
        .unwrap();
    // A reply to the archived ticket starts a new one, linked to it...
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Re: Printer", "<r1@contoso.example>")
            .in_reply_to("<m1@contoso.example>")
            .conversation("c2"),
    );
    w.sync().await;
    let successor = w.placed("<r1@contoso.example>").await.0;
    assert_ne!(successor, archived);
    // ...and the next reply, naming both, joins the new one without swallowing the old.
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Re: Printer", "<r2@contoso.example>")
            .in_reply_to("<r1@contoso.example>")
            .references(["<m1@contoso.example>", "<r1@contoso.example>"])
            .conversation("c2"),
    );
    w.sync().await;
    assert_eq!(w.placed("<r2@contoso.example>").await.0, successor);
    assert_eq!(w.placed("<m1@contoso.example>").await.0, archived);
    let (status, merged): (String, Option<i64>) =
        sqlx::query_as("SELECT status, merged_into_ticket_id FROM helpdesk_tickets WHERE id = $1")
            .bind(archived)
            .fetch_one(&w.db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), merged), ("archived", None));
}

#[tokio::test]
async fn a_ticket_token_naming_a_merged_ticket_leads_to_its_survivor() {
    let w = world().await;
    let (a, b) = w.two_tickets_then_a_reply_naming_both().await;
    let (survivor, merged) = (a.min(b), a.max(b));
    // Headers stripped, another sender, a new conversation: only the token links it.
    w.sim.deliver(
        MAILBOX,
        mail(
            "gus@contoso.example",
            &format!("Question [#{merged}]"),
            "<d@contoso.example>",
        )
        .conversation("c4"),
    );
    w.sync().await;
    assert_eq!(
        w.placed("<d@contoso.example>").await,
        (survivor, "ticket_token".to_string())
    );
}

#[tokio::test]
async fn a_sync_cut_short_by_its_timeout_leaves_no_folder_lock_behind() {
    let w = world().await;
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Printer", "<a@contoso.example>"),
    );
    let slow = w.sim.set_fault(
        graph_sim::FaultRule::new(graph_sim::FaultKind::Delay { millis: 3_000 })
            .path("/messages/delta"),
    );
    // What the job runtime does at its timeout: the handler's future is dropped mid-round.
    let cut = tokio::time::timeout(
        Duration::from_millis(300),
        sync_folder(&w.services, w.tenant, w.account, "inbox"),
    )
    .await;
    assert!(cut.is_err(), "the sync was still waiting for Graph");
    w.sim.remove_fault(&slow);
    // The folder's session lock went with its connection; pooled, it would stay held.
    let held = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
             WHERE l.locktype = 'advisory' AND d.datname = current_database()",
        )
        .fetch_one(&w.db.pool)
        .await
        .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while held().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a folder lock outlived the sync that took it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w.sync().await.ingested, 1);
}

#[tokio::test]
async fn back_filled_mail_threads_by_subject_within_the_window_of_its_own_time() {
    let w = world().await;
    let days_ago = |days: i64| chrono::Utc::now() - chrono::TimeDelta::days(days);
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Printer", "<p@contoso.example>")
            .conversation("c1")
            .received_at(days_ago(26)),
    );
    w.sync().await;
    // A day later by its own clock, headers stripped, another conversation: only the
    // subject rule can place it, and 25 days ago the ticket was a day old.
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Re: Printer", "<q@contoso.example>")
            .conversation("c2")
            .received_at(days_ago(25)),
    );
    w.sync().await;
    let first = w.placed("<p@contoso.example>").await.0;
    assert_eq!(
        w.placed("<q@contoso.example>").await,
        (first, "subject".to_string())
    );
}

#[tokio::test]
async fn a_throttled_mailbox_shows_until_when_and_a_sync_that_works_clears_it() {
    let w = world().await;
    w.sim.deliver(
        MAILBOX,
        mail("fay@contoso.example", "Printer", "<a@contoso.example>"),
    );
    let throttle = w.sim.set_fault(
        graph_sim::FaultRule::new(graph_sim::FaultKind::TooManyRequests {
            retry_after: Some("120".into()),
        })
        .path("/messages/delta"),
    );
    let err = sync_folder(&w.services, w.tenant, w.account, "inbox")
        .await
        .expect_err("Graph throttles the delta request");
    assert!(err.to_string().contains("throttled"), "{err}");
    let until = || async {
        sqlx::query_scalar::<_, Option<f64>>(
            "SELECT extract(epoch FROM throttled_until - now())::float8
             FROM helpdesk_email_accounts WHERE id = $1",
        )
        .bind(w.account.as_uuid())
        .fetch_one(&w.db.pool)
        .await
        .unwrap()
    };
    let left = until().await.expect("throttled_until is set");
    assert!((100.0..=120.0).contains(&left), "{left} s left");
    w.sim.remove_fault(&throttle);
    w.sync().await;
    assert_eq!(until().await, None);
}

#[tokio::test]
async fn auto_replies_are_flagged_html_is_sanitised_and_attachments_recorded() {
    let w = world().await;
    w.sim.deliver(
        MAILBOX,
        InboundMail::new("ooo@contoso.example", "Automatic reply: Invoice")
            .message_id("<ooo@contoso.example>")
            .header("Auto-Submitted", "auto-replied")
            .text("I am away"),
    );
    w.sim.deliver(
        MAILBOX,
        InboundMail::new("gil@contoso.example", "Screenshot")
            .message_id("<html@contoso.example>")
            .html("<p onclick=\"x()\">Look <script>alert(1)</script><img src=\"https://tracker.example/p.gif\"><img src=\"cid:img1\"></p>")
            .attachment(graph_sim::InboundAttachment {
                is_inline: true,
                content_id: Some("img1".into()),
                ..graph_sim::InboundAttachment::file("shot.png", "image/png", &[1, 2, 3])
            }),
    );
    w.sync().await;
    let (auto, reason): (bool, Option<String>) = sqlx::query_as(
        "SELECT is_auto_reply, auto_reply_reason FROM helpdesk_messages WHERE internet_message_id = '<ooo@contoso.example>'",
    )
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert!(auto);
    assert_eq!(reason.as_deref(), Some("auto-submitted:auto-replied"));
    let (html, attachments): (String, serde_json::Value) = sqlx::query_as(
        "SELECT body_html, attachments FROM helpdesk_messages WHERE internet_message_id = '<html@contoso.example>'",
    )
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert!(
        !html.contains("script") && !html.contains("onclick"),
        "{html}"
    );
    assert!(
        !html.contains("tracker.example"),
        "remote images dropped: {html}"
    );
    assert!(html.contains("cid:img1"), "{html}");
    let a = &attachments[0];
    assert_eq!(a["name"], "shot.png");
    assert_eq!(a["content_type"], "image/png");
    assert!(a["size"].as_u64().unwrap() >= 3, "{a}");
    assert_eq!(a["is_inline"], true);
}

#[tokio::test]
async fn an_evicted_delta_token_triggers_a_full_resync_without_duplicates() {
    let w = world().await;
    for i in 0..30 {
        w.sim.deliver(
            MAILBOX,
            mail(
                "hal@contoso.example",
                &format!("Case {i}"),
                &format!("<case{i}@contoso.example>"),
            ),
        );
    }
    w.sync().await;
    for i in 30..40 {
        w.sim.deliver(
            MAILBOX,
            mail(
                "hal@contoso.example",
                &format!("Case {i}"),
                &format!("<case{i}@contoso.example>"),
            ),
        );
    }
    w.sim.evict_delta_tokens(MAILBOX);
    let report = w.sync().await;
    assert_eq!(report.full_resyncs, 1, "{report:?}");
    assert_eq!(report.ingested, 10);
    assert_eq!(report.duplicates, 30);
    assert_eq!(w.count("SELECT count(*) FROM helpdesk_messages").await, 40);
}

#[tokio::test]
async fn a_message_moved_between_synced_folders_is_not_duplicated() {
    let w = world().await;
    let d = w.sim.deliver(
        MAILBOX,
        mail("ivy@contoso.example", "Move me", "<move@contoso.example>"),
    );
    w.sync_folder("inbox").await;
    w.sync_folder("archive").await;
    w.sim.move_message(MAILBOX, &d.immutable_id, "archive");
    let inbox = w.sync_folder("inbox").await;
    assert_eq!(inbox.removed, 1);
    let archive = w.sync_folder("archive").await;
    assert_eq!(
        (archive.ingested, archive.duplicates),
        (0, 1),
        "{archive:?}"
    );
    assert_eq!(w.count("SELECT count(*) FROM helpdesk_messages").await, 1);
    let folder: String = sqlx::query_scalar("SELECT folder FROM helpdesk_message_sightings")
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
    assert_eq!(folder, "archive");
}

#[tokio::test]
async fn the_same_mail_in_two_mailboxes_of_a_tenant_is_one_message_even_when_synced_at_once() {
    let w = world().await;
    let t = w.sim.tenants()[0].clone();
    w.sim.create_user(&t, "sales@fabrikam.example", "Sales");
    let second = connect_direct(&w.services, &w.sim, w.tenant, "sales@fabrikam.example").await;
    for i in 0..40 {
        let m = mail(
            "jo@contoso.example",
            &format!("Both {i}"),
            &format!("<both{i}@contoso.example>"),
        )
        .to(MAILBOX)
        .to("sales@fabrikam.example");
        w.sim.deliver(MAILBOX, m.clone());
        w.sim.deliver("sales@fabrikam.example", m);
    }
    let (a, b) = tokio::join!(
        sync_folder(&w.services, w.tenant, w.account, "inbox"),
        sync_folder(&w.services, w.tenant, second, "inbox"),
    );
    a.unwrap().unwrap();
    b.unwrap().unwrap();
    assert_eq!(w.count("SELECT count(*) FROM helpdesk_messages").await, 40);
    assert_eq!(w.count("SELECT count(*) FROM helpdesk_tickets").await, 40);
    assert_eq!(
        w.count("SELECT count(*) FROM helpdesk_message_sightings")
            .await,
        80
    );
}

/// graph-contract: the client tolerates replays and duplicates. An item repeated inside one
/// delta page whose mail is already stored from another mailbox used to make the page's
/// sightings upsert touch one row twice: the page failed, and so did every retry of it.
#[tokio::test]
async fn a_delta_page_that_repeats_its_items_is_ingested_once() {
    let w = world().await;
    let t = w.sim.tenants()[0].clone();
    w.sim.create_user(&t, "sales@fabrikam.example", "Sales");
    let second = connect_direct(&w.services, &w.sim, w.tenant, "sales@fabrikam.example").await;
    let m = mail("jo@contoso.example", "Both", "<both@contoso.example>")
        .to(MAILBOX)
        .to("sales@fabrikam.example");
    w.sim.deliver(MAILBOX, m.clone());
    w.sim.deliver("sales@fabrikam.example", m);
    w.sim.deliver(
        "sales@fabrikam.example",
        mail("kim@contoso.example", "Only here", "<only@contoso.example>"),
    );
    w.sync().await;
    w.sim.set_fault(
        graph_sim::FaultRule::new(graph_sim::FaultKind::ReplayDeltaItems)
            .mailbox("sales@fabrikam.example"),
    );
    let report = sync_folder(&w.services, w.tenant, second, "inbox")
        .await
        .expect("the repeated page is ingested")
        .expect("no concurrent sync");
    assert_eq!(report.ingested, 1);
    assert_eq!(w.count("SELECT count(*) FROM helpdesk_messages").await, 2);
    assert_eq!(
        w.count("SELECT count(*) FROM helpdesk_message_sightings")
            .await,
        3
    );
}

#[tokio::test]
async fn racing_syncs_of_one_folder_create_nothing_twice() {
    let w = world().await;
    for i in 0..120 {
        w.sim.deliver(
            MAILBOX,
            mail(
                "kim@contoso.example",
                &format!("Race {i}"),
                &format!("<race{i}@contoso.example>"),
            ),
        );
    }
    let runs = futures::future::join_all(
        (0..4).map(|_| sync_folder(&w.services, w.tenant, w.account, "inbox")),
    )
    .await;
    let ran = runs
        .into_iter()
        .map(|r| r.unwrap())
        .filter(Option::is_some)
        .count();
    assert!(ran >= 1);
    w.sync().await;
    assert_eq!(w.count("SELECT count(*) FROM helpdesk_messages").await, 120);
    assert_eq!(w.count("SELECT count(*) FROM helpdesk_tickets").await, 120);
}

#[tokio::test]
async fn a_sync_enqueued_over_http_runs_in_a_worker_process() {
    let w = world().await;
    w.sim.deliver(
        MAILBOX,
        mail("lee@contoso.example", "Over HTTP", "<http@contoso.example>"),
    );
    let endpoints = Endpoints::sim(&w.sim, "http://127.0.0.1:9/oauth/callback");
    let _worker = spawn_worker(
        &w.db,
        WorkerOptions {
            endpoints,
            ..WorkerOptions::default()
        },
    )
    .await;
    let app: TestApp = spawn_app_on(w.db.share()).await;
    let admin = app.token(w.tenant, TestRole::Admin);
    let resp: serde_json::Value = app
        .client
        .post(app.url(&format!("/api/v1/accounts/{}/sync", w.account)))
        .bearer_auth(&admin)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = resp["job_id"].as_i64().unwrap();
    app.wait_for_job(&admin, job, &["done"], Duration::from_secs(30))
        .await;
    assert_eq!(w.placed("<http@contoso.example>").await.1, "new_ticket");

    // The tickets API shows it, with the rule that placed each message.
    let agent = app.token(w.tenant, TestRole::Agent);
    let list: serde_json::Value = app
        .client
        .get(app.url("/api/v1/tickets?status=open&q=Over%20HTTP"))
        .bearer_auth(&agent)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tickets = list["tickets"].as_array().unwrap();
    assert_eq!(tickets.len(), 1, "{list}");
    let id = tickets[0]["id"].as_i64().unwrap();
    let detail: serde_json::Value = app
        .client
        .get(app.url(&format!("/api/v1/tickets/{id}")))
        .bearer_auth(&agent)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(detail["messages"][0]["thread_rule"], "new_ticket");
    assert_eq!(
        detail["messages"][0]["internet_message_id"],
        "<http@contoso.example>"
    );
    // Another tenant sees nothing of it.
    let stranger = app.token(TenantId::new(), TestRole::Agent);
    let resp = app
        .client
        .get(app.url(&format!("/api/v1/tickets/{id}")))
        .bearer_auth(&stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let status: serde_json::Value = app
        .client
        .get(app.url(&format!("/api/v1/accounts/{}", w.account)))
        .bearer_auth(&agent)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["messages_ingested"], 1, "{status}");
    assert!(status["last_sync_success_at"].is_string(), "{status}");
}
