//! The chaos run: mail and replies flow through three worker processes while graph-sim throws
//! throttling, outages and 401s at them, access tokens keep expiring, and a worker is
//! `kill -9`ed and replaced every few seconds. At the end nothing may be lost, duplicated or
//! sent twice, no limit may have been exceeded, and every failure must say why.
//!
//! CI runs the short form. `CHAOS_LONG=1` runs the full numbers (50 tenants, 5,000
//! mails, 500 replies, a kill every 10 s), which takes several minutes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use graph_sim::{FaultKind, FaultRule, GraphSim, InboundMail};
use graphdesk_tests::{
    Endpoints, TestDb, WorkerOptions, WorkerProcess, connect_direct, spawn_sim, spawn_worker,
};
use jobs::config::QueueSettings;
use jobs::ids::{AccountId, IdempotencyKey, TenantId, TicketId};
use jobs::kinds::SyncMailbox;
use jobs::queue::{EnqueueOptions, Queue};
use jobs::sends::{NewReply, create_send};
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;

const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";
/// Microsoft's per-mailbox concurrency limit, which graphdesk must hold across processes.
const MAILBOX_LIMIT: usize = 4;
/// The first tenant's own job limit (the others use the workers' default).
const BUSY_TENANT_LIMIT: i32 = 8;
/// Replies are created in bursts, so that several of them run at once.
const BURST: usize = 5;

struct Plan {
    name: &'static str,
    tenants: usize,
    mails: usize,
    replies: usize,
    workers: usize,
    /// Mail and replies are spread over this window; workers are killed during it.
    window: Duration,
    kill_every: Duration,
    /// Access tokens live this long. graphdesk refreshes 5 minutes before expiry, so a
    /// lifetime a little over 5 minutes makes every account refresh every few seconds.
    token_lifetime_secs: u64,
    /// One random mailbox's access tokens are revoked this often (the next call gets a 401).
    expire_every: Duration,
    tenant_limit: u32,
    /// How long the system may take to settle once the chaos stops.
    settle: Duration,
}

impl Plan {
    fn from_env() -> Self {
        if std::env::var("CHAOS_LONG").is_ok_and(|v| v == "1") {
            Self {
                name: "long",
                tenants: 50,
                mails: 5000,
                replies: 500,
                workers: 3,
                window: Duration::from_secs(300),
                kill_every: Duration::from_secs(10),
                token_lifetime_secs: 420,
                expire_every: Duration::from_secs(5),
                tenant_limit: 2,
                settle: Duration::from_secs(600),
            }
        } else {
            Self {
                name: "short",
                tenants: 6,
                mails: 300,
                replies: 30,
                workers: 3,
                window: Duration::from_secs(25),
                kill_every: Duration::from_secs(3),
                token_lifetime_secs: 310,
                expire_every: Duration::from_secs(2),
                tenant_limit: 2,
                settle: Duration::from_secs(75),
            }
        }
    }
}

struct Mailbox {
    tenant: TenantId,
    account: AccountId,
    upn: String,
}

/// One customer conversation: every Message-ID in it must end on one ticket.
struct Thread {
    mailbox: usize,
    subject: String,
    customer: String,
    ids: Vec<String>,
}

/// A send the test created, and the marker that identifies it in graph-sim's send log.
struct CreatedSend {
    id: uuid::Uuid,
    marker: String,
}

/// A xorshift generator: the run needs variety, not unpredictability.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nothing_is_lost_duplicated_or_sent_twice() {
    let plan = Plan::from_env();
    let started = Instant::now();
    let db = TestDb::new().await;
    let sim = spawn_sim(REDIRECT, |c| {
        c.access_token_lifetime_secs = plan.token_lifetime_secs;
    })
    .await;
    let endpoints = Endpoints::sim(&sim, REDIRECT);
    let services = endpoints.services(&db.pool);
    // The test plays the scheduler: it asks for every mailbox's sync once a second.
    let queue = Queue::new(db.pool.clone());

    let mut mailboxes = Vec::new();
    for t in 0..plan.tenants {
        let domain = format!("t{t}.chaos.example");
        sim.create_tenant(&domain, &format!("Chaos {t}"));
        let upn = format!("support@{domain}");
        sim.create_user(domain.as_str(), &upn, "Support");
        let tenant = db.create_tenant(&format!("Chaos {t}")).await;
        let account = connect_direct(&services, &sim, tenant, &upn).await;
        mailboxes.push(Mailbox {
            tenant,
            account,
            upn,
        });
    }

    // The first tenant may run more jobs at once than its mailbox may make Graph requests, and
    // its requests are slow: bursts of replies there push against the 4-per-mailbox limit,
    // which only graphdesk's cross-process mailbox gate can then hold.
    let busy = &mailboxes[0];
    sqlx::query("UPDATE tenants SET concurrency_limit = $2 WHERE id = $1")
        .bind(busy.tenant.as_uuid())
        .bind(BUSY_TENANT_LIMIT)
        .execute(&db.pool)
        .await
        .expect("busy tenant limit");
    sim.set_fault(FaultRule::new(FaultKind::Delay { millis: 150 }).mailbox(busy.upn.as_str()));

    // 10 % of Graph calls throttled or unavailable, some 401s, and a flaky token endpoint.
    let graph = "/v1.0/";
    sim.set_fault(
        FaultRule::new(FaultKind::TooManyRequests {
            retry_after: Some("1".into()),
        })
        .path(graph)
        .probability(0.05),
    );
    sim.set_fault(
        FaultRule::new(FaultKind::ServiceUnavailable {
            retry_after: Some("0.5".into()),
        })
        .path(graph)
        .probability(0.05),
    );
    sim.set_fault(
        FaultRule::new(FaultKind::InvalidAuthenticationToken)
            .path(graph)
            .probability(0.02),
    );
    sim.set_fault(
        FaultRule::new(FaultKind::ServiceUnavailable { retry_after: None })
            .path("/oauth2/v2.0/token")
            .probability(0.05),
    );

    let worker_options = {
        let endpoints = endpoints.clone();
        let tenant_limit = plan.tenant_limit;
        move || WorkerOptions {
            queue: QueueSettings {
                poll_interval: Duration::from_millis(200),
                lease: Duration::from_secs(5),
                tenant_concurrency: Some(tenant_limit),
                ..QueueSettings::default()
            },
            endpoints: endpoints.clone(),
            shutdown_grace_secs: 5,
            ..WorkerOptions::default()
        }
    };
    let mut workers = Vec::new();
    for _ in 0..plan.workers {
        workers.push(spawn_worker(&db, worker_options()).await);
    }

    let (stop_sampling, sampling) = watch::channel(false);
    let (stop_killing, killing) = watch::channel(false);
    let tenant_peak = Arc::new(AtomicI64::new(0));
    let tenant_excess = Arc::new(AtomicI64::new(i64::MIN));
    let sampler = tokio::spawn(sample_tenant_concurrency(
        db.pool.clone(),
        i64::from(plan.tenant_limit),
        tenant_peak.clone(),
        tenant_excess.clone(),
        sampling,
    ));
    let killer = {
        let db = db.share();
        let stop = killing;
        let every = plan.kill_every;
        let opts = worker_options.clone();
        tokio::spawn(async move { kill_workers(db, workers, every, opts, stop).await })
    };

    // Drive: deliver mail, ask for syncs, create replies, expire tokens, for the window.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut threads: Vec<Thread> = Vec::new();
    let mut delivered: Vec<String> = Vec::new();
    let mut sends: Vec<CreatedSend> = Vec::new();
    let mut replays = 0usize;
    let window_start = Instant::now();
    let mut next_sync = window_start;
    let mut next_expiry = window_start;
    loop {
        let elapsed = window_start.elapsed();
        let share = (elapsed.as_secs_f64() / plan.window.as_secs_f64()).min(1.0);
        let mail_due = ((plan.mails as f64 * share).ceil() as usize).min(plan.mails);
        while delivered.len() < mail_due {
            deliver_one(&sim, &mailboxes, &mut threads, &mut delivered, &mut rng);
        }
        let reply_due = ((plan.replies as f64 * share / BURST as f64).floor() as usize * BURST)
            .min(plan.replies);
        while sends.len() < reply_due {
            // Every third burst goes to the busy tenant's mailbox.
            let only = (sends.len() / BURST)
                .is_multiple_of(3)
                .then_some(busy.tenant);
            match reply_once(&db, &mut rng, sends.len(), only).await {
                Some((send, key, body, tenant, ticket)) => {
                    if sends.len().is_multiple_of(5) {
                        // A client retrying the same request mid-chaos gets the same send.
                        let again =
                            create_send(&db.pool, tenant, ticket, "chaos-agent", &key, body)
                                .await
                                .expect("replayed reply");
                        assert!(!again.created, "a replayed Idempotency-Key made a new send");
                        assert_eq!(again.send_id.as_uuid(), send.id);
                        replays += 1;
                    }
                    sends.push(send);
                }
                None => break,
            }
        }
        if Instant::now() >= next_sync {
            next_sync += Duration::from_secs(1);
            enqueue_syncs(&queue, &mailboxes).await;
        }
        if Instant::now() >= next_expiry {
            next_expiry += plan.expire_every;
            sim.expire_access_tokens(mailboxes[rng.below(mailboxes.len())].upn.as_str());
        }
        if elapsed >= plan.window && sends.len() >= plan.replies {
            break;
        }
        assert!(
            elapsed < plan.window + plan.settle,
            "no ticket to reply to after {elapsed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_killing.send(true).expect("stop killing");
    let (workers, kills) = killer.await.expect("killer task");

    // Settle: the surviving workers finish the work, with faults still on. A sync waiting
    // out its retry backoff (run_at in the future) after the mail is stored is not work left.
    let deadline = Instant::now() + plan.settle;
    loop {
        let (stored, open_sends, busy_jobs): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM helpdesk_messages WHERE internet_message_id = ANY($1)),
                    (SELECT count(*) FROM helpdesk_outbound_sends
                     WHERE status NOT IN ('confirmed', 'failed')),
                    (SELECT count(*) FROM queue_jobs_all
                     WHERE status = 'running' OR (status = 'pending' AND run_at <= now()))",
        )
        .bind(&delivered)
        .fetch_one(&db.pool)
        .await
        .expect("progress");
        let all_stored = stored as usize >= delivered.len();
        if all_stored && open_sends == 0 && busy_jobs == 0 {
            break;
        }
        if Instant::now() >= deadline {
            let busy: Vec<(i64, String, String, i32, f64, Option<String>)> = sqlx::query_as(
                "SELECT id, queue, status, attempts,
                        extract(epoch FROM run_at - now())::float8, last_error
                 FROM queue_jobs_all WHERE status IN ('pending', 'running') ORDER BY id",
            )
            .fetch_all(&db.pool)
            .await
            .expect("busy jobs");
            panic!(
                "not settled {:?} after the chaos: {stored}/{} mails stored, {open_sends} sends open, {busy_jobs} jobs due or running: {busy:#?}",
                plan.settle,
                delivered.len()
            );
        }
        if !all_stored {
            enqueue_syncs(&queue, &mailboxes).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop_sampling.send(true).expect("stop sampling");
    sampler.await.expect("sampler");
    drop(workers);

    let figures = Figures::collect(&db, &sim, &mailboxes, &threads, &delivered, &sends).await;
    println!(
        "\nchaos run ({}): {} tenants, {} workers, {} mails in {} threads, {} replies ({} replayed keys), {} workers killed with SIGKILL, {:.0} s",
        plan.name,
        plan.tenants,
        plan.workers,
        delivered.len(),
        threads.len(),
        sends.len(),
        replays,
        kills,
        started.elapsed().as_secs_f64()
    );
    let excess = tenant_excess.load(Ordering::Relaxed);
    figures.print(
        tenant_peak.load(Ordering::Relaxed),
        excess,
        plan.tenant_limit,
    );

    // The chaos really happened.
    assert!(kills >= 1, "no worker was killed");
    assert!(
        figures.injected_throttles > 0 && figures.unauthorized > 0,
        "graph-sim injected no faults: {} 429/503, {} 401",
        figures.injected_throttles,
        figures.unauthorized
    );
    assert!(figures.refreshes > 0, "no token was refreshed");
    // Nothing lost or duplicated.
    assert_eq!(figures.lost, Vec::<String>::new(), "mails never stored");
    assert_eq!(
        figures.duplicated,
        Vec::<String>::new(),
        "mails stored twice"
    );
    assert_eq!(figures.unexpected, 0, "inbound messages nobody delivered");
    assert_eq!(
        figures.split_threads,
        Vec::<String>::new(),
        "threads spread over several tickets"
    );
    assert_eq!(
        figures.shared_tickets, 0,
        "tickets holding more than one conversation"
    );
    assert_eq!(
        figures.tickets as usize,
        threads.len(),
        "one ticket per conversation"
    );
    // Every reply left exactly once, or failed with a reason and never left.
    assert_eq!(figures.double_sends, Vec::<String>::new(), "sent twice");
    assert_eq!(
        figures.unsent_confirmed,
        Vec::<String>::new(),
        "confirmed but never sent"
    );
    assert_eq!(
        figures.failed_but_sent,
        Vec::<String>::new(),
        "marked failed although Graph sent them"
    );
    assert_eq!(
        figures.failed_without_reason, 0,
        "failed sends without a reason"
    );
    assert_eq!(
        figures.graph_sends as i64, figures.confirmed,
        "Graph sent exactly the confirmed replies"
    );
    assert_eq!(
        figures.outbound_messages, figures.confirmed,
        "each confirmed reply saved on its ticket once"
    );
    // Limits held.
    for (upn, peak) in &figures.mailbox_peaks {
        assert!(
            *peak <= MAILBOX_LIMIT,
            "{upn} saw {peak} concurrent Graph requests"
        );
    }
    assert!(
        excess <= 0,
        "a tenant was granted {excess} more slots than its limit"
    );
    // Every failure explains itself.
    assert_eq!(
        figures.dead_without_reason, 0,
        "dead jobs without last_error"
    );
    assert_eq!(
        figures.attempts_without_errors, 0,
        "jobs whose failed attempts left no error entry"
    );
}

fn deliver_one(
    sim: &GraphSim,
    mailboxes: &[Mailbox],
    threads: &mut Vec<Thread>,
    delivered: &mut Vec<String>,
    rng: &mut Rng,
) {
    let n = delivered.len();
    let id = format!("<chaos-{n}-{}@customers.example>", rng.next() % 100_000);
    // Two mails in five start a conversation; the rest answer one, with real reply headers.
    let mail = if threads.is_empty() || rng.below(5) < 2 {
        let mailbox = rng.below(mailboxes.len());
        let customer = format!("customer{}@customers.example", threads.len());
        let subject = format!("Case {}: the export fails", threads.len());
        threads.push(Thread {
            mailbox,
            subject: subject.clone(),
            customer: customer.clone(),
            ids: vec![id.clone()],
        });
        (
            mailbox,
            InboundMail::new(customer, subject)
                .message_id(id.clone())
                .text("It fails again."),
        )
    } else {
        let k = rng.below(threads.len());
        let thread = &mut threads[k];
        let mail = InboundMail::new(thread.customer.clone(), format!("RE: {}", thread.subject))
            .message_id(id.clone())
            .in_reply_to(thread.ids.last().cloned().unwrap_or_default())
            .references(thread.ids.clone())
            .text("Any news?");
        thread.ids.push(id.clone());
        (thread.mailbox, mail)
    };
    sim.deliver(mailboxes[mail.0].upn.as_str(), mail.1);
    delivered.push(id);
}

/// Creates one reply on a random live ticket; `None` while no ticket exists yet.
async fn reply_once(
    db: &TestDb,
    rng: &mut Rng,
    n: usize,
    only: Option<TenantId>,
) -> Option<(CreatedSend, IdempotencyKey, NewReply, TenantId, TicketId)> {
    let tickets: Vec<(i64, uuid::Uuid)> = sqlx::query_as(
        "SELECT id, tenant_id FROM helpdesk_tickets
         WHERE merged_into_ticket_id IS NULL AND ($1::uuid IS NULL OR tenant_id = $1)",
    )
    .bind(only.map(|t| t.as_uuid()))
    .fetch_all(&db.pool)
    .await
    .expect("tickets");
    if tickets.is_empty() {
        return None;
    }
    let (ticket, tenant) = tickets[rng.below(tickets.len())];
    let marker = format!("chaos-reply-{n}-end");
    let key = IdempotencyKey::try_from(format!("chaos-{n}")).expect("key");
    let body = NewReply {
        to: vec![],
        cc: vec![],
        body_html: format!("<p>We are on it. {marker}</p>"),
    };
    let tenant = TenantId::from_uuid(tenant);
    let ticket = TicketId::new(ticket);
    let created = create_send(&db.pool, tenant, ticket, "chaos-agent", &key, body.clone())
        .await
        .expect("create reply");
    assert!(created.created);
    Some((
        CreatedSend {
            id: created.send_id.as_uuid(),
            marker,
        },
        key,
        body,
        tenant,
        ticket,
    ))
}

async fn enqueue_syncs(queue: &Queue, mailboxes: &[Mailbox]) {
    for m in mailboxes {
        queue
            .enqueue(
                &SyncMailbox {
                    tenant: m.tenant,
                    account: m.account,
                    folder: "inbox".into(),
                },
                EnqueueOptions::default(),
            )
            .await
            .expect("enqueue sync");
    }
}

/// Every `every`, SIGKILLs one worker (round robin) and starts a replacement; returns the
/// workers alive at the end and how many were killed.
async fn kill_workers(
    db: TestDb,
    mut workers: Vec<WorkerProcess>,
    every: Duration,
    opts: impl Fn() -> WorkerOptions,
    mut stop: watch::Receiver<bool>,
) -> (Vec<WorkerProcess>, usize) {
    let mut kills = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return (workers, kills),
        }
        let i = kills % workers.len();
        let mut victim = workers.remove(i);
        victim.signal(Signal::SIGKILL);
        victim.wait_exit(Duration::from_secs(10)).await;
        kills += 1;
        let replacement = spawn_worker(&db, opts()).await;
        workers.insert(i, replacement);
    }
}

/// The highest number of running jobs any one tenant had, and the most any tenant was over
/// its own limit (`tenants.concurrency_limit`, else the workers' default), sampled from the
/// queue table. The queue counts a killed worker's jobs as running until their lease is
/// reaped, so these are the figures its per-tenant limit is enforced against.
async fn sample_tenant_concurrency(
    pool: sqlx::PgPool,
    default_limit: i64,
    peak: Arc<AtomicI64>,
    excess: Arc<AtomicI64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // The peak is of `running` rows, which also hold jobs whose handler has returned and
        // whose completion is not flushed yet, and a killed worker's jobs until the reaper
        // takes them back. The limit bounds handlers running: each process runs no more of a
        // tenant's jobs than its live grant (the runtime's unit tests), so what must stay
        // within the limit at every instant is the sum of a tenant's live grants, plus the
        // running jobs of the killed worker, whose lapsed rows stand for them.
        let (n, over): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT max(r.n) FROM (SELECT count(*) AS n FROM queue_jobs_all
                                           WHERE status = 'running' AND tenant_id IS NOT NULL
                                           GROUP BY tenant_id) r),
                    (SELECT max(g.slots - coalesce(t.concurrency_limit, $1))
                     FROM (SELECT l.tenant_id,
                                  sum(CASE WHEN l.expires_at >= now() THEN l.slots
                                      ELSE (SELECT count(*) FROM queue_jobs_all r
                                            WHERE r.tenant_id = l.tenant_id
                                              AND r.status = 'running'
                                              AND r.locked_by = l.worker_id) END) AS slots
                           FROM queue_tenant_grants l GROUP BY l.tenant_id) g
                     JOIN tenants t ON t.id = g.tenant_id)",
        )
        .bind(default_limit)
        .fetch_one(&pool)
        .await
        .unwrap_or((None, None));
        peak.fetch_max(n.unwrap_or(0), Ordering::Relaxed);
        if let Some(over) = over {
            excess.fetch_max(over, Ordering::Relaxed);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
            }
        }
    }
}

struct Figures {
    lost: Vec<String>,
    duplicated: Vec<String>,
    unexpected: i64,
    split_threads: Vec<String>,
    shared_tickets: usize,
    tickets: i64,
    merged_tickets: i64,
    confirmed: i64,
    failed: i64,
    failed_without_reason: usize,
    double_sends: Vec<String>,
    unsent_confirmed: Vec<String>,
    failed_but_sent: Vec<String>,
    graph_sends: usize,
    outbound_messages: i64,
    mailbox_peaks: BTreeMap<String, usize>,
    jobs: BTreeMap<String, i64>,
    retried_jobs: i64,
    recovered_leases: i64,
    dead: Vec<(String, String)>,
    dead_without_reason: i64,
    attempts_without_errors: i64,
    graph_requests: u64,
    injected_throttles: u64,
    unauthorized: u64,
    refreshes: u64,
}

impl Figures {
    async fn collect(
        db: &TestDb,
        sim: &GraphSim,
        mailboxes: &[Mailbox],
        threads: &[Thread],
        delivered: &[String],
        sends: &[CreatedSend],
    ) -> Self {
        let pool = &db.pool;
        let stored: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT internet_message_id, count(*), min(ticket_id) FROM helpdesk_messages
             WHERE direction = 'inbound' GROUP BY internet_message_id",
        )
        .fetch_all(pool)
        .await
        .expect("stored messages");
        let counts: HashMap<&str, (i64, i64)> = stored
            .iter()
            .map(|(id, n, t)| (id.as_str(), (*n, *t)))
            .collect();
        let lost = delivered
            .iter()
            .filter(|id| !counts.contains_key(id.as_str()))
            .cloned()
            .collect();
        let duplicated = delivered
            .iter()
            .filter(|id| counts.get(id.as_str()).is_some_and(|(n, _)| *n > 1))
            .cloned()
            .collect();
        let ours: HashSet<&str> = delivered.iter().map(String::as_str).collect();
        let unexpected = stored
            .iter()
            .filter(|(id, _, _)| !ours.contains(id.as_str()))
            .map(|(_, n, _)| n)
            .sum();

        // A ticket merged into another counts as that one (later evidence joined them).
        let merges: HashMap<i64, Option<i64>> = sqlx::query_as::<_, (i64, Option<i64>)>(
            "SELECT id, merged_into_ticket_id FROM helpdesk_tickets",
        )
        .fetch_all(pool)
        .await
        .expect("tickets")
        .into_iter()
        .collect();
        let root = |mut t: i64| {
            for _ in 0..64 {
                match merges.get(&t).copied().flatten() {
                    Some(next) => t = next,
                    None => break,
                }
            }
            t
        };
        let mut split_threads = Vec::new();
        let mut owner: HashMap<i64, usize> = HashMap::new();
        let mut shared_tickets = 0;
        for (i, thread) in threads.iter().enumerate() {
            let roots: HashSet<i64> = thread
                .ids
                .iter()
                .filter_map(|id| counts.get(id.as_str()).map(|(_, t)| root(*t)))
                .collect();
            if roots.len() > 1 {
                split_threads.push(format!("{} on tickets {roots:?}", thread.subject));
            }
            for r in roots {
                if owner.insert(r, i).is_some_and(|other| other != i) {
                    shared_tickets += 1;
                }
            }
        }
        let (tickets, merged_tickets): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE merged_into_ticket_id IS NULL),
                    count(*) FILTER (WHERE merged_into_ticket_id IS NOT NULL)
             FROM helpdesk_tickets",
        )
        .fetch_one(pool)
        .await
        .expect("ticket counts");

        let rows: Vec<(uuid::Uuid, String, Option<String>)> =
            sqlx::query_as("SELECT id, status, failure_reason FROM helpdesk_outbound_sends")
                .fetch_all(pool)
                .await
                .expect("sends");
        let status: HashMap<uuid::Uuid, (String, Option<String>)> =
            rows.into_iter().map(|(id, s, r)| (id, (s, r))).collect();
        let graph_log = sim.sends();
        let mut double_sends = Vec::new();
        let mut unsent_confirmed = Vec::new();
        let mut failed_but_sent = Vec::new();
        let (mut confirmed, mut failed, mut failed_without_reason) = (0, 0, 0);
        for s in sends {
            let times = graph_log
                .iter()
                .filter(|g| g.body.contains(&s.marker))
                .count();
            let (st, reason) = status.get(&s.id).cloned().unwrap_or_default();
            match st.as_str() {
                "confirmed" => {
                    confirmed += 1;
                    if times == 0 {
                        unsent_confirmed.push(s.marker.clone());
                    }
                }
                "failed" => {
                    failed += 1;
                    if reason.as_deref().is_none_or(str::is_empty) {
                        failed_without_reason += 1;
                    }
                    if times > 0 {
                        failed_but_sent.push(s.marker.clone());
                    }
                }
                _ => {}
            }
            if times > 1 {
                double_sends.push(format!("{} sent {times} times", s.marker));
            }
        }
        let outbound_messages: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM helpdesk_messages WHERE direction = 'outbound'",
        )
        .fetch_one(pool)
        .await
        .expect("outbound");

        let stats = sim.stats();
        let mailbox_peaks = mailboxes
            .iter()
            .map(|m| (m.upn.clone(), stats.max_concurrency_for(&m.upn)))
            .collect();

        let jobs: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
            "SELECT queue || ' ' || status, count(*) FROM queue_jobs_all GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .expect("jobs")
        .into_iter()
        .collect();
        let (retried_jobs, recovered_leases, dead_without_reason, attempts_without_errors): (
            i64,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE jsonb_array_length(errors) > 0),
                    coalesce(sum((SELECT count(*) FROM jsonb_array_elements(errors) e
                                  WHERE e->>'kind' = 'lease_expired')), 0)::bigint,
                    count(*) FILTER (WHERE status = 'dead' AND coalesce(last_error, '') = ''),
                    count(*) FILTER (WHERE attempts > 1
                                     AND jsonb_array_length(errors) < attempts - 1)
             FROM queue_jobs_all",
        )
        .fetch_one(pool)
        .await
        .expect("job figures");
        let dead = sqlx::query_as(
            "SELECT queue, coalesce(last_error, '') FROM queue_jobs_all WHERE status = 'dead'
             ORDER BY id",
        )
        .fetch_all(pool)
        .await
        .expect("dead jobs");

        Self {
            lost,
            duplicated,
            unexpected,
            split_threads,
            shared_tickets,
            tickets,
            merged_tickets,
            confirmed,
            failed,
            failed_without_reason,
            double_sends,
            unsent_confirmed,
            failed_but_sent,
            graph_sends: graph_log.len(),
            outbound_messages,
            mailbox_peaks,
            jobs,
            retried_jobs,
            recovered_leases,
            dead,
            dead_without_reason,
            attempts_without_errors,
            graph_requests: stats.total_requests,
            injected_throttles: stats.status(429) + stats.status(503),
            unauthorized: stats.status(401),
            refreshes: stats.token_requests("refresh_token"),
        }
    }

    fn print(&self, tenant_peak: i64, tenant_excess: i64, tenant_limit: u32) {
        let peak_mailbox = self.mailbox_peaks.values().max().copied().unwrap_or(0);
        println!("  Graph requests            {}", self.graph_requests);
        println!(
            "  faults answered           {} x 429/503, {} x 401; {} token refreshes",
            self.injected_throttles, self.unauthorized, self.refreshes
        );
        println!("  lost mails                {}", self.lost.len());
        println!("  mails stored twice        {}", self.duplicated.len());
        println!("  unexpected messages       {}", self.unexpected);
        println!(
            "  tickets                   {} ({} merged into others by later evidence)",
            self.tickets, self.merged_tickets
        );
        println!("  threads split             {}", self.split_threads.len());
        println!("  tickets shared by threads {}", self.shared_tickets);
        println!(
            "  replies                   {} confirmed, {} failed ({} without reason)",
            self.confirmed, self.failed, self.failed_without_reason
        );
        println!(
            "  Graph sends               {} (double sends {}, confirmed-but-unsent {}, failed-but-sent {})",
            self.graph_sends,
            self.double_sends.len(),
            self.unsent_confirmed.len(),
            self.failed_but_sent.len()
        );
        println!("  outbound messages saved   {}", self.outbound_messages);
        println!("  peak mailbox concurrency  {peak_mailbox} (limit {MAILBOX_LIMIT})");
        println!(
            "  peak tenant running rows  {tenant_peak} (limit {tenant_limit}, {BUSY_TENANT_LIMIT} for the busy tenant; most granted over a limit: {})",
            tenant_excess.max(0)
        );
        println!(
            "  jobs with failed attempts {} ({} attempts recovered from killed workers)",
            self.retried_jobs, self.recovered_leases
        );
        println!(
            "  dead jobs                 {} ({} without reason); attempts with no error entry {}",
            self.dead.len(),
            self.dead_without_reason,
            self.attempts_without_errors
        );
        for (queue, reason) in self.dead.iter().take(10) {
            println!("    dead {queue}: {reason}");
        }
        for (k, n) in &self.jobs {
            println!("    {k:<40} {n}");
        }
    }
}
