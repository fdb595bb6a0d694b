//! The per-mailbox Graph gate across processes: two connection pools on one database stand for
//! two worker processes, since the gate's only shared state is in PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DurationRound, TimeDelta, Utc};
use graph_sim::{FaultKind, FaultRule, InboundMail};
use graphdesk_tests::{Endpoints, TestDb, connect_direct, spawn_sim};
use jobs::accounts::gate::PgMailboxGate;
use jobs::graph::{GateError, RequestGate};
use jobs::ids::AccountId;
use sqlx::PgPool;

async fn two_processes(db: &TestDb) -> (PgPool, PgPool) {
    let other = PgPool::connect(&db.url).await.expect("second pool");
    (db.pool.clone(), other)
}

/// The gate waits its few seconds for a slot, then refuses: the mailbox is busy.
async fn assert_refused_as_busy(gate: &PgMailboxGate, while_: &str) {
    match gate.acquire().await {
        Err(GateError::Busy { .. }) => {}
        Err(e) => panic!("expected Busy while {while_}, got {e}"),
        Ok(_) => panic!("a slot was handed out while {while_}"),
    }
}

#[tokio::test]
async fn forty_requests_from_two_processes_never_exceed_four_at_once() {
    let db = TestDb::new().await;
    let (a, b) = two_processes(&db).await;
    let account = AccountId::new();
    let holders = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..40 {
        let pool = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (holders, max) = (holders.clone(), max.clone());
        tasks.push(tokio::spawn(async move {
            let gate = PgMailboxGate::new(pool, account, 4, 10_000);
            // The gate gives up after a few seconds of waiting so a job can be deferred; a
            // loaded test machine may hit that, and it is not what this test measures.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let permit = loop {
                match gate.acquire().await {
                    Ok(p) => break p,
                    Err(GateError::Busy { .. }) if tokio::time::Instant::now() < deadline => {}
                    Err(e) => panic!("acquire failed: {e}"),
                }
            };
            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            holders.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        max.load(Ordering::SeqCst),
        4,
        "at most 4 holders, and the 4 slots were used"
    );
}

#[tokio::test]
async fn the_eleventh_request_of_a_ten_request_budget_is_refused_until_the_window_ends() {
    let db = TestDb::new().await;
    let (a, b) = two_processes(&db).await;
    // A fresh account per try: if the run straddles a 10-minute boundary the budget resets
    // mid-test, which says nothing about the gate; that try is discarded.
    for _ in 0..2 {
        let account = AccountId::new();
        let window = |at: chrono::DateTime<Utc>| at.duration_trunc(TimeDelta::minutes(10)).unwrap();
        let started = window(Utc::now());
        let gate_a = PgMailboxGate::new(a.clone(), account, 4, 10);
        let gate_b = PgMailboxGate::new(b.clone(), account, 4, 10);
        for i in 0..10 {
            let gate = if i % 2 == 0 { &gate_a } else { &gate_b };
            let permit = gate
                .acquire()
                .await
                .unwrap_or_else(|e| panic!("request {} within the budget: {e}", i + 1));
            drop(permit);
        }
        let eleventh = gate_a.acquire().await;
        if window(Utc::now()) != started {
            continue;
        }
        match eleventh {
            Err(GateError::Busy {
                retry_after: Some(after),
            }) => {
                assert!(
                    after > Duration::ZERO && after <= Duration::from_secs(600),
                    "retry after {after:?}"
                );
            }
            Err(e) => panic!("expected Busy with a retry_after, got {e}"),
            Ok(_) => panic!("the 11th request was admitted"),
        }
        return;
    }
    panic!("two tries straddled a 10-minute boundary");
}

#[tokio::test]
async fn a_request_refused_for_want_of_a_slot_spends_none_of_the_budget() {
    let db = TestDb::new().await;
    let (a, b) = two_processes(&db).await;
    let account = AccountId::new();
    // One slot and a budget of two requests.
    let first = PgMailboxGate::new(a, account, 1, 2);
    let waiting = PgMailboxGate::new(b, account, 1, 2);
    let held = first.acquire().await.expect("the first request");
    assert_refused_as_busy(&waiting, "the only slot is held").await;
    drop(held);
    // The refusal sent nothing to Microsoft, so the second request of the budget is still
    // there (jobs waiting on a busy mailbox must not use its budget up).
    let second = waiting.acquire().await;
    assert!(
        second.is_ok(),
        "the budget's second request: {:?}",
        second.err()
    );
    let spent: i32 = sqlx::query_scalar(
        "SELECT sum(requests)::int FROM graph_mailbox_budget WHERE email_account_id = $1",
    )
    .bind(account.as_uuid())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(spent, 2, "two requests made, two spent");
}

#[tokio::test]
async fn a_holder_that_dies_mid_request_loses_its_slot_when_the_lease_ends() {
    let db = TestDb::new().await;
    let account = AccountId::new();
    // A process of its own, killed mid-request: its runtime goes away with the permit never
    // released and the lease never renewed again.
    let url = db.url.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let pool = PgPool::connect(&url).await.unwrap();
            let crashed = PgMailboxGate::new(pool, account, 1, 10_000)
                .with_slot_lease(Duration::from_secs(1));
            std::mem::forget(crashed.acquire().await.expect("first acquire"));
        });
        drop(runtime);
    })
    .join()
    .unwrap();
    let held: bool = sqlx::query_scalar(
        "SELECT holder IS NOT NULL AND expires_at > now() FROM graph_mailbox_slots
         WHERE email_account_id = $1",
    )
    .bind(account.as_uuid())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(held, "the dead holder's slot is still taken");
    let survivor = PgMailboxGate::new(db.pool.clone(), account, 1, 10_000);
    let permit = survivor.acquire().await;
    assert!(
        permit.is_ok(),
        "the slot comes back once the lease ends: {:?}",
        permit.err()
    );
}

#[tokio::test]
async fn a_slot_is_kept_through_a_request_longer_than_its_lease() {
    let db = TestDb::new().await;
    let (a, b) = two_processes(&db).await;
    let account = AccountId::new();
    let lease = Duration::from_secs(1);
    let slow = PgMailboxGate::new(a, account, 1, 10_000).with_slot_lease(lease);
    let other = PgMailboxGate::new(b, account, 1, 10_000).with_slot_lease(lease);
    let held = slow.acquire().await.expect("first acquire");
    // The request runs for several leases; its holder renews the slot, so another process
    // waiting the whole time (a few seconds) never gets it.
    tokio::time::sleep(2 * lease).await;
    assert_refused_as_busy(&other, "the slow request runs").await;
    drop(held);
    let permit = other.acquire().await;
    assert!(
        permit.is_ok(),
        "the slot is free once the request ends: {:?}",
        permit.err()
    );
}

#[tokio::test]
async fn concurrent_syncs_and_validations_of_one_mailbox_stay_within_graphs_limit() {
    const MAILBOX: &str = "support@northwind.example";
    let db = TestDb::new().await;
    let sim = spawn_sim("http://127.0.0.1:9/oauth/callback", |_| {}).await;
    let t = sim.create_tenant("northwind.example", "Northwind");
    sim.create_user(&t, MAILBOX, "Support");
    let endpoints = Endpoints::sim(&sim, "http://127.0.0.1:9/oauth/callback");
    // Two Services on separate pools: two worker processes.
    let services = |n: u32| {
        let options = (*db.pool.connect_options()).clone();
        let app = jobs::db::lazy_pool_as(options.clone(), n, Some("graphdesk_app".into()));
        let system = jobs::db::lazy_pool_as(options, n, Some("graphdesk_system".into()));
        jobs::services::Services::new(app, &endpoints.integration())
            .expect("services")
            .with_system_pool(system)
    };
    let (one, two) = (services(8), services(8));
    let tenant = db.create_tenant("Northwind").await;
    let account = connect_direct(&one, &sim, tenant, MAILBOX).await;
    for i in 0..25 {
        sim.deliver(
            MAILBOX,
            InboundMail::new(format!("c{i}@example.org"), format!("Order {i}"))
                .text("Where is it?"),
        );
        sim.deliver(
            MAILBOX,
            InboundMail::new(format!("d{i}@example.org"), format!("Old order {i}"))
                .text("Never mind")
                .into_folder("archive"),
        );
    }
    // Every request is held a while, so requests of different jobs overlap at the mailbox.
    sim.set_fault(FaultRule::new(FaultKind::Delay { millis: 40 }).mailbox(MAILBOX));

    let mut work = Vec::new();
    for (i, folder) in ["inbox", "archive", "sentitems"].into_iter().enumerate() {
        let s = if i % 2 == 0 { one.clone() } else { two.clone() };
        work.push(tokio::spawn(async move {
            jobs::sync::sync_folder(&s, tenant, account, folder)
                .await
                .map(|r| assert!(r.is_some(), "{folder}: no other sync of it runs"))
                .map_err(|e| format!("sync {folder}: {e}"))
        }));
    }
    for i in 0..8 {
        let s = if i % 2 == 0 { one.clone() } else { two.clone() };
        work.push(tokio::spawn(async move {
            jobs::accounts::validate::validate_account(&s, tenant, account)
                .await
                .map(drop)
                .map_err(|e| format!("validation {i}: {e}"))
        }));
    }
    for w in work {
        w.await.expect("task").expect("every job succeeds");
    }

    let tickets: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_tickets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(tickets, 50, "both folders were synced");
    let stats = sim.stats();
    let peak = stats.max_concurrency_for(MAILBOX);
    assert!(
        peak <= 4,
        "Graph saw {peak} requests at once on the mailbox"
    );
    assert!(
        peak >= 2,
        "the jobs did overlap at the mailbox (peak {peak})"
    );
    let throttled: Vec<_> = sim
        .request_log()
        .into_iter()
        .filter(|e| e.status == 429 && e.error_code.as_deref() == Some("ApplicationThrottled"))
        .collect();
    assert!(
        throttled.is_empty(),
        "{} requests got MailboxConcurrency 429s: {:?}",
        throttled.len(),
        throttled.first()
    );
}

#[tokio::test]
async fn more_concurrent_syncs_than_the_pool_has_connections_all_complete() {
    // A sync holds one connection for its folder lock and needs others for its pages. With
    // a pool of two and six syncs at once, two syncs held both connections and each waited
    // for a second one until the acquire timeout: every sync failed and no mail came in.
    const SYNCS: usize = 6;
    let db = TestDb::new().await;
    let sim = spawn_sim("http://127.0.0.1:9/oauth/callback", |_| {}).await;
    let endpoints = Endpoints::sim(&sim, "http://127.0.0.1:9/oauth/callback");
    let options = (*db.pool.connect_options()).clone();
    let app = jobs::db::lazy_pool_as(options.clone(), 2, Some("graphdesk_app".into()));
    let system = jobs::db::lazy_pool_as(options, 2, Some("graphdesk_system".into()));
    let services = jobs::services::Services::new(app, &endpoints.integration())
        .expect("services")
        .with_system_pool(system);
    let tenant = db.create_tenant("Northwind").await;
    let t = sim.create_tenant("northwind.example", "Northwind");
    let mut accounts = Vec::new();
    for i in 0..SYNCS {
        let upn = format!("desk{i}@northwind.example");
        sim.create_user(&t, &upn, "Desk");
        accounts.push(connect_direct(&services, &sim, tenant, &upn).await);
        sim.deliver(
            &upn,
            InboundMail::new(format!("c{i}@example.org"), format!("Order {i}")).text("Where?"),
        );
    }
    // Graph answers slowly, so every sync is still holding its lock when the others start.
    sim.set_fault(FaultRule::new(FaultKind::Delay { millis: 200 }));

    let mut work = Vec::new();
    for account in accounts {
        let s = services.clone();
        work.push(tokio::spawn(async move {
            jobs::sync::sync_folder(&s, tenant, account, "inbox")
                .await
                .map_err(|e| format!("{e:#}"))
        }));
    }
    for w in work {
        let report = w.await.expect("task");
        assert!(matches!(report, Ok(Some(_))), "{report:?}");
    }
    let tickets: i64 = sqlx::query_scalar("SELECT count(*) FROM helpdesk_tickets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(tickets, SYNCS as i64);
}
