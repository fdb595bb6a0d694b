//! The worker side of the queue: graphdesk's apalis backend over `queue_jobs`.
//!
//! One [`WorkerRuntime`] per process owns what must be shared by all its queues: the LISTEN
//! connection that wakes idle fetchers, the completion flusher (completions of many jobs are
//! written in one statement), the lease heartbeat for in-flight jobs, and the reaper. Each queue
//! gets a [`PgBackend`] (what apalis polls for tasks) and a [`JobService`] (what apalis calls
//! with them) sharing one semaphore, so a process never claims more jobs than it can start.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::backend::{Backend, BackendConfig, finalize::Ephemeral};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::context::WorkerContext;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::error::DbContext;
use super::{JobError, JobKind, NOTIFY_CHANNEL, QueueError};
use crate::config::QueueSettings;
use crate::ids::{JobId, TenantId};

/// An advisory-lock key that serialises tenant slot grants, so each grant is decided on what
/// every other process holds at that moment (migrations/20261128000010_tenant_slot_grants.sql).
/// Claims themselves take no lock.
pub const TENANT_CLAIM_LOCK: i64 = 0x6772_6170_6864_6b01;

/// The longest between two grant syncs of a process (shorter with a short lease: a sync also
/// renews the grants, which lapse with the lease). New tenants' work is found at this pace
/// under load; an idle fetcher asks for a sync at once.
const GRANT_SYNC_EVERY: Duration = Duration::from_millis(200);

/// How long a process keeps a tenant's slots after it last saw the tenant's due jobs, while no
/// other process wants them: a tenant's next job then starts at once instead of after a sync
/// (enqueue-to-start went from about 1 ms to 2.6 ms when every job waited for one).
const GRANT_LINGER: Duration = Duration::from_secs(10);

/// How many tenants with due jobs one sync looks for per queue, from a random starting tenant:
/// it walks one index entry per tenant, so with thousands of tenants it covers them over
/// several syncs.
const GRANT_DISCOVER_TENANTS: i32 = 256;

/// What a handler learns about the run it is part of.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub id: JobId,
    /// 1-based: the first run is attempt 1.
    pub attempt: i32,
    pub max_attempts: i32,
    pub tenant: Option<TenantId>,
    pub worker_id: Arc<str>,
}

impl JobContext {
    #[must_use]
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

/// Application logic for one job kind. Handlers must be reconcilers: re-running one after a
/// crash at any line, or alongside a stale execution, converges on the same final state.
pub trait JobHandler<J>: Clone + Send + Sync + 'static {
    fn handle(&self, job: J, ctx: JobContext) -> impl Future<Output = Result<(), JobError>> + Send;
}

impl<J, F, Fut> JobHandler<J> for F
where
    F: Fn(J, JobContext) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send,
{
    fn handle(&self, job: J, ctx: JobContext) -> impl Future<Output = Result<(), JobError>> + Send {
        self(job, ctx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Retry,
    Dead,
    Deferred,
}

impl Outcome {
    fn status(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retry | Self::Deferred => "pending",
            Self::Dead => "dead",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retry => "retry",
            Self::Dead => "dead",
            Self::Deferred => "deferred",
        }
    }
}

#[derive(Debug)]
struct Completion {
    id: i64,
    attempt: i32,
    outcome: Outcome,
    run_at: Option<DateTime<Utc>>,
    error: Option<String>,
    /// When the attempt ended. Completions are buffered, so the flush's own clock would date
    /// an error by when it was written rather than by when it happened.
    at: DateTime<Utc>,
}

/// A claimed job this process still answers for: its lease is renewed until its completion
/// is durable, and it is handed back at shutdown while its handler is still executing.
#[derive(Debug, Clone, Copy)]
struct Inflight {
    attempt: i32,
    executing: bool,
    /// Holds one of this tenant's granted slots while the handler runs.
    tenant: Option<uuid::Uuid>,
    /// Whose fetchers a returned slot wakes: the tenant's next job is likeliest there.
    queue: &'static str,
}

/// This process's share of each tenant's limit (see [`TENANT_CLAIM_LOCK`]). `held` counts the
/// tenant's handlers running here plus slots reserved by claims on their way; it never exceeds
/// `granted`, which the database row for this process and tenant always covers. A finished
/// job's slot is free before its completion is flushed, as the process's own permits are.
#[derive(Debug, Default)]
struct GrantBook {
    tenants: HashMap<uuid::Uuid, TenantSlots>,
    /// The grants lapse in the database a lease after the sync that renewed them; past this,
    /// other processes may have been given the slots, so none is used until the next sync.
    valid_until: Option<std::time::Instant>,
    /// Where the next claim starts among the tenants, when there are more free slots than
    /// the claim can take.
    rotation: usize,
    /// Slots reserved by claims on their way (part of the tenants' `held`).
    reserved: u32,
    /// Queues that claimed while other claims held reservations, so without the slots those
    /// claims give back unused: they are theirs to try. A claim reserves every free slot,
    /// whatever the tenant's jobs' queue, so without this a tenant's first job waited for its
    /// fetcher's poll whenever another queue's claim was on its way when the grant arrived
    /// (every queue's fetchers wake on a new grant).
    starved: Vec<&'static str>,
}

/// The last job a limited claim took of a tenant here, in claim order. The tenant's next
/// descent starts after it. Every job taken from the tenant's head leaves a dead entry in the
/// pending index until vacuum, and a descent from the head visits the row behind each entry
/// it has not yet seen dead: 14-35 visits to take 2 jobs in a 200,000-job burst with two
/// processes (docs/benchmarks.md, sixteenth round). With the cursor as an index condition the
/// index itself passes them by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClaimCursor {
    priority: i16,
    run_at: DateTime<Utc>,
    id: i64,
}

impl ClaimCursor {
    fn of(row: &ClaimedRow) -> Self {
        Self {
            priority: row.priority,
            run_at: row.run_at,
            id: row.id,
        }
    }

    /// Later in claim order (priority descending, then run_at, then id).
    fn is_after(&self, other: &ClaimCursor) -> bool {
        (std::cmp::Reverse(self.priority), self.run_at, self.id)
            > (std::cmp::Reverse(other.priority), other.run_at, other.id)
    }
}

/// How long claim cursors are used before every tenant's next descent starts from its head
/// again. A job can come to lie before a cursor without a notification: one a claim passed by
/// while something else held its row lock, one of higher priority than the cursor's job that
/// falls due (scheduled, or retried after its backoff), or one of lower priority and older
/// than the cursor's job (the descent stays at or below the cursor's priority and after its
/// run_at and id). Such a job waits at most this long.
const CLAIM_CURSOR_TTL: Duration = Duration::from_millis(100);

/// This process's claim cursors per queue and tenant (see [`ClaimCursor`]).
#[derive(Debug, Default)]
struct ClaimCursors {
    at: HashMap<(&'static str, uuid::Uuid), ClaimCursor>,
    /// When the cursors were last all dropped.
    since: Option<std::time::Instant>,
}

impl ClaimCursors {
    /// The cursor of each tenant, or none; all are dropped once they are
    /// [`CLAIM_CURSOR_TTL`] old.
    fn for_claim(
        &mut self,
        queue: &'static str,
        tenants: &[uuid::Uuid],
        now: std::time::Instant,
    ) -> Vec<Option<ClaimCursor>> {
        match self.since {
            Some(since) if now.duration_since(since) < CLAIM_CURSOR_TTL => {}
            _ => {
                self.at.clear();
                self.since = Some(now);
            }
        }
        tenants
            .iter()
            .map(|t| self.at.get(&(queue, *t)).copied())
            .collect()
    }

    /// Records where a claim left each tenant it had room for. A tenant whose room it filled
    /// has more after its last job; one it did not fill may have a job before the cursor, so
    /// its next descent starts from its head.
    fn record(
        &mut self,
        queue: &'static str,
        rooms: &[(uuid::Uuid, i32)],
        claimed: &HashMap<uuid::Uuid, i32>,
        last: &HashMap<uuid::Uuid, ClaimCursor>,
    ) {
        for (tenant, room) in rooms {
            let filled = claimed.get(tenant).copied().unwrap_or(0) >= *room;
            match last.get(tenant) {
                Some(c) if filled => {
                    let at = self.at.entry((queue, *tenant)).or_insert(*c);
                    if c.is_after(at) {
                        *at = *c;
                    }
                }
                _ => {
                    self.at.remove(&(queue, *tenant));
                }
            }
        }
    }

    /// A new job may lie before a cursor (a higher priority, or the run_at of a long
    /// transaction that enqueued it): the queue's next descents start from each head.
    fn forget_queue(&mut self, queue: &str) {
        self.at.retain(|(q, _), _| *q != queue);
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct TenantSlots {
    granted: u32,
    held: u32,
}

impl GrantBook {
    /// Reserves up to `n` free slots across tenants (at most what each has free), to be
    /// settled by [`GrantBook::settle`] once the claim returns.
    fn reserve(&mut self, n: usize) -> Vec<(uuid::Uuid, i32)> {
        if self
            .valid_until
            .is_none_or(|until| std::time::Instant::now() >= until)
        {
            return Vec::new();
        }
        let len = self.tenants.len();
        if len == 0 {
            return Vec::new();
        }
        self.rotation = self.rotation.wrapping_add(1);
        let start = self.rotation % len;
        let mut left = n;
        let mut rooms = Vec::new();
        // From `start` to the end, then from the beginning: a map's iteration order is stable
        // while it is not changed, so every tenant gets its turn at the front.
        for (from, to) in [(start, len), (0, start)] {
            for (i, (tenant, slots)) in self.tenants.iter_mut().enumerate() {
                if left == 0 {
                    break;
                }
                if i < from || i >= to {
                    continue;
                }
                let free = slots.granted.saturating_sub(slots.held) as usize;
                if free > 0 {
                    let take = free.min(left);
                    slots.held += take as u32;
                    left -= take;
                    rooms.push((*tenant, take as i32));
                }
            }
        }
        self.reserved += (n - left) as u32;
        rooms
    }

    /// Reserves every free slot for a claim in `queue`. While other claims hold
    /// reservations this one goes without those slots (possibly with none at all): `queue`
    /// is then woken when they give some back.
    fn reserve_for(&mut self, queue: &'static str) -> Vec<(uuid::Uuid, i32)> {
        let others_hold_some = self.reserved > 0;
        let rooms = self.reserve(usize::MAX);
        if others_hold_some && !self.starved.contains(&queue) {
            self.starved.push(queue);
        }
        rooms
    }

    /// Whether any granted slot is in use (held by a running handler or a claim on its way).
    fn holds_any(&self) -> bool {
        self.tenants.values().any(|s| s.held > 0)
    }

    /// Gives back the reserved slots a claim did not fill. Returns the queues to wake: those
    /// that claimed without some slots meanwhile, when some slot came back, except the
    /// claim's own (its fetcher claims again itself when there may be more).
    fn settle(
        &mut self,
        queue: &'static str,
        rooms: &[(uuid::Uuid, i32)],
        claimed: &HashMap<uuid::Uuid, i32>,
    ) -> Vec<&'static str> {
        let mut returned = 0;
        for (tenant, room) in rooms {
            let used = claimed.get(tenant).copied().unwrap_or(0).min(*room);
            self.reserved = self.reserved.saturating_sub(*room as u32);
            returned += *room - used;
            self.release(*tenant, (*room - used) as u32);
        }
        if returned == 0 || self.starved.is_empty() {
            return Vec::new();
        }
        let mut wake = std::mem::take(&mut self.starved);
        wake.retain(|q| *q != queue);
        wake
    }

    /// Returns whether the tenant had no free slot before: a claim may have passed it by.
    fn release(&mut self, tenant: uuid::Uuid, n: u32) -> bool {
        let Some(slots) = self.tenants.get_mut(&tenant) else {
            return false;
        };
        let was_full = slots.held >= slots.granted;
        slots.held = slots.held.saturating_sub(n);
        was_full
    }

    /// What to report to a sync: each tenant with the most this process may hold of it until
    /// the sync's answer arrives.
    fn bounds(&self) -> (Vec<uuid::Uuid>, Vec<i32>) {
        self.tenants
            .iter()
            .filter(|(_, s)| s.granted > 0 || s.held > 0)
            .map(|(t, s)| (*t, s.granted.max(s.held) as i32))
            .unzip()
    }

    /// Applies a sync's answer; returns whether any tenant has more free slots than before.
    fn apply(
        &mut self,
        granted: &HashMap<uuid::Uuid, i32>,
        valid_until: std::time::Instant,
    ) -> bool {
        let mut grew = false;
        for (tenant, slots) in &mut self.tenants {
            let now = granted.get(tenant).copied().unwrap_or(0).max(0) as u32;
            grew |= now > slots.granted;
            slots.granted = now;
        }
        for (tenant, n) in granted {
            if !self.tenants.contains_key(tenant) {
                grew = true;
                self.tenants.insert(
                    *tenant,
                    TenantSlots {
                        granted: (*n).max(0) as u32,
                        held: 0,
                    },
                );
            }
        }
        self.tenants.retain(|_, s| s.granted > 0 || s.held > 0);
        self.valid_until = Some(valid_until);
        grew
    }
}

struct Inner {
    pool: PgPool,
    /// Claims only: their commits do not wait for the WAL flush (see [`claim_pool`]).
    claim_pool: PgPool,
    /// Completion flushes only (see [`completion_pool`]).
    completion_pool: PgPool,
    worker_id: Arc<str>,
    settings: QueueSettings,
    completions: mpsc::UnboundedSender<Completion>,
    /// Claimed jobs whose completion is not yet durable: the heartbeat renews their leases.
    inflight: Mutex<HashMap<i64, Inflight>>,
    /// Handlers running now (the `executing` entries of `inflight`).
    executing: AtomicUsize,
    /// Claims on their way to the database: their jobs are not `executing` yet, and a drain
    /// that did not wait for them stopped the flusher under jobs about to run.
    claiming: AtomicUsize,
    execution_drained: Notify,
    /// With tenant limits: this process's slots per tenant.
    grants: Mutex<GrantBook>,
    /// A fetcher found nothing it may claim: the grant sync should run now, not at its timer.
    grant_sync_wanted: Notify,
    /// With tenant limits: where each tenant's next descent starts.
    claim_cursors: Mutex<ClaimCursors>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Stops fetching; in-flight jobs go on.
    stop_fetching: CancellationToken,
    /// Stops the background tasks once in-flight work is settled.
    stop_background: CancellationToken,
}

/// The per-process queue runtime. Cheap to clone.
#[derive(Clone)]
pub struct WorkerRuntime {
    inner: Arc<Inner>,
    background: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for WorkerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerRuntime")
            .field("worker_id", &self.inner.worker_id)
            .finish_non_exhaustive()
    }
}

/// The settings of every claim connection (see [`claim_pool`]). Public so a test can plan the
/// claims as the workers do.
///
/// `synchronous_commit = off`: a claim lost in a server crash only puts its jobs back to
/// pending, so they run again: the at-least-once contract every handler already meets. In
/// exchange the claim does not wait for an fsync, which is most of the enqueue-to-start
/// latency. Completions and handlers' own writes stay synchronous.
///
/// `enable_sort = off`: a claim's order always comes from an index. On a queue never analyzed,
/// the per-tenant claim was planned as a scan of the queue's head index filtered by tenant
/// and sorted, for each tenant: 170 ms for 200 jobs of 100 tenants instead of 2-3 ms. With
/// sorts priced out the per-tenant index is the only way left. `jit = off`: that price put
/// the claim over the JIT threshold, and compiling it took 90 ms per call.
pub const CLAIM_SESSION: [(&str, &str); 3] = [
    ("synchronous_commit", "off"),
    ("enable_sort", "off"),
    ("jit", "off"),
];

/// How many claim connections a process has, and how many completion flushes it runs at once
/// (each on its own connection). Two flushes, not four: completions that arrive while both
/// are in the air wait for the next, so batches grow with the load, and each statement's
/// fixed cost is paid by more jobs. With four, a 20,000-job burst through two workers made
/// about 240 flushes of about 85 jobs; with two, about 90 of about 220, and bursts ran about
/// 8% faster (docs/benchmarks.md, sixteenth round). Two still let one commit's fsync overlap
/// the next batch.
pub const CLAIM_CONNECTIONS: u32 = 4;
pub const MAX_FLUSHES: usize = 2;

/// `application_name` of the claim and completion connections, so ops can tell them apart in
/// `pg_stat_activity`.
const CLAIM_CONNECTION_NAME: &str = "graphdesk-worker-claims";
const COMPLETION_CONNECTION_NAME: &str = "graphdesk-worker-completions";

/// Connections for claims only, with [`CLAIM_SESSION`]'s settings.
fn claim_pool(pool: &PgPool) -> PgPool {
    let options = (*pool.connect_options()).clone().options(CLAIM_SESSION);
    always_open_pool(options, CLAIM_CONNECTION_NAME, CLAIM_CONNECTIONS)
}

/// Connections for completion flushes only, one per flush in the air.
fn completion_pool(pool: &PgPool) -> PgPool {
    let options = (*pool.connect_options()).clone();
    always_open_pool(options, COMPLETION_CONNECTION_NAME, MAX_FLUSHES as u32)
}

/// A pool of `size` connections named `name`, opened at start, in the background (by
/// [`open_all`]), and kept open: `min_connections` reopens one the idle timeout recycles. A
/// burst of jobs otherwise opened them while the database was busiest: a new backend then took
/// about 100 ms to start on two busy cores, and the first completions of 20,000 no-op jobs
/// waited that long for a connection, a fifth of the whole run.
fn always_open_pool(options: sqlx::postgres::PgConnectOptions, name: &str, size: u32) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .min_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options.application_name(name))
}

/// Opens every connection of `pool` (a lazy pool opens none until asked). A database out of
/// reach is not an error here: the connections then open when first needed.
async fn open_all(pool: PgPool) {
    let size = pool.options().get_max_connections() as usize;
    let opened = futures::future::join_all((0..size).map(|_| pool.acquire())).await;
    if let Some(Err(e)) = opened.iter().find(|c| c.is_err()) {
        debug!(error = ?e, "could not open every queue connection up front");
    }
}

/// A worker name unique per host, process and start: two live workers can never share one,
/// so lease ownership (locked_by) is unambiguous.
#[must_use]
pub fn unique_worker_id(prefix: &str) -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    let nonce: u32 = rand::random();
    format!("{prefix}-{host}-{}-{nonce:08x}", std::process::id())
}

impl WorkerRuntime {
    pub fn start(pool: PgPool, settings: QueueSettings, worker_id: impl Into<String>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            claim_pool: claim_pool(&pool),
            completion_pool: completion_pool(&pool),
            pool,
            worker_id: Arc::from(worker_id.into()),
            settings,
            completions: tx,
            inflight: Mutex::new(HashMap::new()),
            executing: AtomicUsize::new(0),
            claiming: AtomicUsize::new(0),
            execution_drained: Notify::new(),
            grants: Mutex::new(GrantBook::default()),
            grant_sync_wanted: Notify::new(),
            claim_cursors: Mutex::new(ClaimCursors::default()),
            wakers: Mutex::new(HashMap::new()),
            stop_fetching: CancellationToken::new(),
            stop_background: CancellationToken::new(),
        });
        // Not among the tasks shutdown waits for: with the database out of reach they wait
        // out the pool's acquire timeout, and nothing depends on them.
        tokio::spawn(open_all(inner.claim_pool.clone()));
        tokio::spawn(open_all(inner.completion_pool.clone()));
        let mut background = vec![
            tokio::spawn(flush_loop(inner.clone(), rx)),
            tokio::spawn(listen_loop(inner.clone())),
            tokio::spawn(heartbeat_loop(inner.clone())),
            tokio::spawn(reaper_loop(inner.clone())),
        ];
        if inner.settings.tenant_concurrency.is_some() {
            background.push(tokio::spawn(grant_loop(inner.clone())));
        }
        info!(worker_id = %inner.worker_id, "queue runtime started");
        Self {
            inner,
            background: Arc::new(Mutex::new(background)),
        }
    }

    #[must_use]
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The backend and service for one job kind; register them with one apalis worker.
    pub fn worker<J: JobKind, H: JobHandler<J>>(
        &self,
        handler: H,
    ) -> (PgBackend<J>, JobService<J, H>) {
        let permits = Arc::new(Semaphore::new(self.inner.settings.worker_concurrency));
        let (tx, rx) = mpsc::channel(self.inner.settings.worker_concurrency.max(1));
        let wake = self.waker(J::QUEUE);
        // A claim waits a round trip and a commit; with room for several batches, as many
        // claims overlap so the slots do not idle meanwhile.
        let settings = &self.inner.settings;
        let fetchers = (settings.worker_concurrency / settings.batch_size.max(1)).clamp(1, 4);
        for _ in 0..fetchers {
            let handle = tokio::spawn(fetch_loop::<J>(
                self.inner.clone(),
                permits.clone(),
                tx.clone(),
                wake.clone(),
            ));
            self.background.lock().expect("poisoned").push(handle);
        }
        (
            PgBackend {
                rx,
                _marker: PhantomData,
            },
            JobService {
                inner: self.inner.clone(),
                permits,
                handler,
                _marker: PhantomData,
            },
        )
    }

    fn waker(&self, queue: &str) -> Arc<Notify> {
        self.inner
            .wakers
            .lock()
            .expect("poisoned")
            .entry(queue.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Jobs claimed by this process whose outcome is not durable yet.
    #[must_use]
    pub fn inflight(&self) -> usize {
        self.inner.inflight.lock().expect("poisoned").len()
    }

    fn executing(&self) -> usize {
        self.inner.executing.load(Ordering::SeqCst)
    }

    fn drained(&self) -> bool {
        self.inner.claiming.load(Ordering::SeqCst) == 0 && self.executing() == 0
    }

    /// Graceful stop: no new claims; in-flight jobs get `grace` to finish; whatever is still
    /// running then goes back to pending (without spending its attempt) so another worker
    /// picks it up at once instead of waiting for the lease to expire.
    pub async fn shutdown(&self, grace: Duration) {
        info!(worker_id = %self.inner.worker_id, executing = self.executing(), "draining");
        self.inner.stop_fetching.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let drained = self.inner.execution_drained.notified();
            if self.drained() {
                break;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                break;
            }
        }
        // Finished jobs are left to the flusher; only handlers still running are handed back.
        let leftovers: Vec<(i64, i32)> = self
            .inner
            .inflight
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|(_, job)| job.executing)
            .map(|(id, job)| (*id, job.attempt))
            .collect();
        if !leftovers.is_empty() {
            forget(&self.inner, &leftovers);
            match release_jobs(&self.inner, &leftovers).await {
                Ok(n) => warn!(
                    released = n,
                    "jobs still running at shutdown went back to pending"
                ),
                Err(e) => {
                    error!(error = ?e, "could not release running jobs; their leases will expire")
                }
            }
        }
        // The flusher drains what is queued before it stops.
        self.inner.stop_background.cancel();
        let handles: Vec<_> = std::mem::take(&mut *self.background.lock().expect("poisoned"));
        for h in handles {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        give_back_grants(&self.inner).await;
        info!(worker_id = %self.inner.worker_id, "queue runtime stopped");
    }

    /// Runs one reaper pass now (the reaper also runs periodically); returns jobs recovered.
    pub async fn reap_now(&self) -> Result<u64, QueueError> {
        reap_expired(&self.inner.pool).await
    }
}

/// Recovers jobs whose lease expired: their worker died or lost the database. The lease end
/// was written by the owner when it claimed or renewed, so every reaper agrees on it whatever
/// its own settings.
pub async fn reap_expired(pool: &PgPool) -> Result<u64, QueueError> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "WITH expired AS (
            SELECT id, queue, coalesce_key, attempts, max_attempts FROM queue_jobs
            WHERE status = 'running' AND lease_expires_at < now()
            ORDER BY lease_expires_at LIMIT 1000
            FOR UPDATE SKIP LOCKED
         ), decided AS (
            -- A recovered job whose coalesce key already has a pending job (or that shares its
            -- key with another recovered job) is superseded: at most one pending per key.
            SELECT e.id,
                   CASE WHEN e.attempts >= e.max_attempts THEN 'dead'
                        WHEN e.coalesce_key IS NOT NULL AND (
                             row_number() OVER (PARTITION BY e.queue, e.coalesce_key
                                                ORDER BY e.id DESC) > 1
                             OR EXISTS (SELECT 1 FROM queue_jobs p
                                        WHERE p.queue = e.queue AND p.coalesce_key = e.coalesce_key
                                          AND p.status = 'pending'))
                        THEN 'cancelled'
                        ELSE 'pending' END AS next
            FROM expired e
         )
         UPDATE queue_jobs j SET
            status = d.next,
            finished_at = CASE WHEN d.next <> 'pending' THEN now() END,
            run_at = now(), locked_by = NULL, lease_expires_at = NULL, updated_at = now(),
            last_error = 'lease expired: the worker running attempt ' || j.attempts
                         || ' stopped renewing it (crash, kill or lost connection)'
                         || CASE WHEN d.next = 'cancelled'
                                 THEN '; superseded by a pending job with the same coalesce key'
                                 ELSE '' END,
            errors = queue_errors_append(j.errors, jsonb_build_object(
                'attempt', j.attempts, 'at', now(), 'kind', 'lease_expired',
                'error', 'lease expired (worker ' || coalesce(j.locked_by, '?') || ')'))
         FROM decided d
         WHERE j.id = d.id
         RETURNING j.id, j.queue",
    )
    .fetch_all(pool)
    .await
    .ctx("reap")?;
    if !rows.is_empty() {
        let queues: std::collections::BTreeSet<&str> =
            rows.iter().map(|(_, q)| q.as_str()).collect();
        for q in queues {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(q)
                .execute(pool)
                .await
                .ctx("notify")?;
        }
        warn!(
            recovered = rows.len(),
            "reaper recovered jobs with expired leases"
        );
        metrics::counter!("graphdesk_jobs_recovered_total").increment(rows.len() as u64);
    }
    Ok(rows.len() as u64)
}

// Statements that look jobs up by a list of ids test `coalesce(status, '') = 'running'`, not
// `status = 'running'`: the plain form matches the partial indexes on running jobs, and after
// an ANALYZE taken while nothing ran (an idle queue, autovacuum) the planner believes those
// hold no rows and scans one as the outer side of a nested loop over the id list: a flush of
// 2,000 completions took 0.5 s to 7 s. The coalesce form (equivalent: status is NOT NULL)
// leaves the primary key as the only way in. They are public so a test can check their plans.

/// The start of a completion statement: `held`, the rows of `$1` (ids) still running under
/// the worker named by parameter `$worker`, locked unless another statement holds them.
///
/// Rows another statement holds are skipped, never waited for. A plain claim can hold rows it
/// does not claim: its snapshot may still see a job as pending that another claim has taken
/// since, and locking that stale version locks the newer ones too, waiting for whoever is
/// updating them, SKIP LOCKED or not. A flush that waited for such a claim while the claim
/// waited for it deadlocked (seen in the benchmark: Postgres broke it after a second, stalling
/// the flush that long and failing the claim).
macro_rules! completion_rows {
    ($worker:literal) => {
        concat!(
            "WITH held AS (
            SELECT j.id FROM queue_jobs j
            WHERE j.id = ANY ($1::bigint[]) AND coalesce(j.status, '') = 'running'
              AND j.locked_by = ",
            $worker,
            "
            FOR UPDATE SKIP LOCKED
         )"
        )
    };
}

/// The end of a completion statement: `(id, false)` for each job of `$1` still running under
/// the worker `$worker` whose row `held` could not lock, to be flushed again.
macro_rules! completions_held_elsewhere {
    ($worker:literal) => {
        concat!(
            "
         UNION ALL
         SELECT q.id, false FROM queue_jobs q
         WHERE q.id = ANY (ARRAY(SELECT u.id FROM unnest($1::bigint[]) AS u(id)
                                 EXCEPT SELECT h.id FROM held h))
           AND coalesce(q.status, '') = 'running' AND q.locked_by = ",
            $worker
        )
    };
}

/// Completes a batch: `$1..$8` the completions (id, attempt, status, refund, run_at, error,
/// kind, at), `$9` this worker. A batch of plain successes only goes through
/// [`COMPLETE_SUCCESSES`] instead. A job counts as this run's only while it is still locked
/// by this worker at that attempt: the attempt alone can repeat (a hand-back refunds it; a
/// claim lost with an unflushed commit never counted it), and a stale run's result must not
/// land on another worker's newer run. Returns `(id, applied)`: `true` for each completion
/// applied, `false` for a job still running whose row another statement holds, to be flushed
/// again; a completion in neither lost its compare-and-set.
/// Rows another statement holds are skipped, never waited for (see `completion_rows!`).
pub const COMPLETE_JOBS: &str = concat!(
    completion_rows!("$9"),
    ", c AS (
            SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::int[],
                                 $5::timestamptz[], $6::text[], $7::text[], $8::timestamptz[])
                   AS c(id, attempt, status, refund, run_at, error, kind, at)
            WHERE c.id IN (SELECT h.id FROM held h)
         ), decided AS (
            -- Going back to pending must not break the one-pending-per-coalesce-key rule: a
            -- newer pending job with the same key already covers this work, so this run is
            -- superseded instead (and of two such runs in one batch, the newest goes back).
            SELECT c.*,
                   CASE WHEN c.status = 'pending' AND j.coalesce_key IS NOT NULL AND (
                             row_number() OVER (PARTITION BY j.queue, j.coalesce_key,
                                                c.status = 'pending' ORDER BY c.id DESC) > 1
                             OR EXISTS (SELECT 1 FROM queue_jobs p
                                        WHERE p.queue = j.queue AND p.coalesce_key = j.coalesce_key
                                          AND p.status = 'pending' AND p.id <> j.id))
                        THEN 'cancelled' ELSE c.status END AS next
            FROM c JOIN queue_jobs j ON j.id = c.id
            WHERE j.attempts = c.attempt AND coalesce(j.status, '') = 'running'
         ), applied AS (
            UPDATE queue_jobs j SET
                status = d.next,
                attempts = j.attempts - d.refund,
                run_at = coalesce(d.run_at, j.run_at),
                last_error = CASE WHEN d.next = 'cancelled'
                                  THEN coalesce(d.error || '; ', '')
                                       || 'superseded by a pending job with the same coalesce key'
                                  ELSE coalesce(d.error, j.last_error) END,
                errors = CASE WHEN d.error IS NULL THEN j.errors
                         ELSE queue_errors_append(j.errors, jsonb_build_object(
                            'attempt', j.attempts, 'at', d.at, 'kind', d.kind, 'error', d.error)) END,
                finished_at = CASE WHEN d.next IN ('done', 'dead', 'cancelled') THEN now() END,
                locked_by = NULL, lease_expires_at = NULL, updated_at = now()
            FROM decided d
            WHERE j.id = d.id AND j.attempts = d.attempt AND coalesce(j.status, '') = 'running'
            RETURNING j.id
         )
         SELECT id, true FROM applied",
    completions_held_elsewhere!("$9")
);

/// [`COMPLETE_JOBS`] for a batch of plain successes only, which nearly every batch is:
/// `$1, $2` (id, attempt), `$3` this worker; the same rows held elsewhere skipped, the same
/// compare-and-set and the same answer. With nothing to decide (no error history, no coalesce
/// check) it costs less to plan (each completion connection plans a statement for its first
/// five runs, about 2 ms each for the full one on a busy server) and to run.
///
/// A job without an idempotency key leaves `queue_jobs` here and is packed into
/// `queue_jobs_done`, one row per queue per flush, as the row it would have been updated to
/// (see migrations/20261201000010_packed_finished_jobs.sql); a job with one is updated in
/// place, so that its key keeps answering. Its packed row repeats every column of
/// `queue_jobs` in order: a column added there must be added here too, which
/// `a_done_job_is_packed_and_reads_back_as_it_was` checks.
pub const COMPLETE_SUCCESSES: &str = concat!(
    completion_rows!("$3"),
    ", c AS (
            SELECT * FROM unnest($1::bigint[], $2::int[]) AS u(id, attempt)
            WHERE u.id IN (SELECT h.id FROM held h)
         ), packed AS (
            DELETE FROM queue_jobs j USING c
            WHERE j.id = c.id AND j.attempts = c.attempt AND coalesce(j.status, '') = 'running'
              AND j.idempotency_key IS NULL
            RETURNING j.id, j.queue, j.tenant_id,
                ROW(j.id, j.queue, j.tenant_id, j.email_account_id, j.payload, 'done',
                    j.priority, j.attempts, j.max_attempts, j.run_at, NULL, j.locked_at, NULL,
                    j.idempotency_key, j.coalesce_key, j.last_error, j.errors, j.created_at,
                    now(), now())::queue_jobs AS job
         ), history AS (
            INSERT INTO queue_jobs_done (queue, finished_at, job_ids, tenant_ids, jobs, job_count)
            SELECT p.queue, now(), int8range(min(p.id), max(p.id), '[]'),
                   array_remove(array_agg(DISTINCT p.tenant_id), NULL),
                   array_agg(p.job), count(*)
            FROM packed p GROUP BY p.queue
         ), kept AS (
            UPDATE queue_jobs j SET status = 'done', finished_at = now(),
                locked_by = NULL, lease_expires_at = NULL, updated_at = now()
            FROM c
            WHERE j.id = c.id AND j.attempts = c.attempt AND coalesce(j.status, '') = 'running'
              AND j.idempotency_key IS NOT NULL
            RETURNING j.id
         )
         SELECT id, true FROM packed
         UNION ALL
         SELECT id, true FROM kept",
    completions_held_elsewhere!("$3")
);

/// Renews the leases of `$1` (ids) held by worker `$3` for `$2` seconds. A row another
/// statement has locked is skipped, not waited for: that is a flush completing the job (or the
/// reaper or an ops action taking it), and the next heartbeat renews it if that rolls back.
/// Waiting deadlocked with the completion flush, which locks the same rows in another order:
/// Postgres broke it after `deadlock_timeout` (1 s), and completions stalled that long.
pub const RENEW_LEASES: &str =
    "UPDATE queue_jobs j SET lease_expires_at = now() + make_interval(secs => $2)
             WHERE j.id = ANY (ARRAY(
                 SELECT q.id FROM queue_jobs q
                 WHERE q.id = ANY ($1::bigint[]) AND coalesce(q.status, '') = 'running'
                   AND q.locked_by = $3
                 FOR UPDATE SKIP LOCKED))";

/// Hands `$1` (ids) at `$2` (attempts) held by worker `$3` back to pending, refunding the
/// attempt. Like the reaper and the completion flush it keeps one pending job per coalesce key:
/// a job whose key already has a pending job (one that covers the same work, queued while this
/// one ran) is superseded instead. Without that the unique index refused the whole statement,
/// and every job handed back at shutdown waited out its lease and spent an attempt.
pub const RELEASE_JOBS: &str = "WITH mine AS (
            SELECT j.id, j.queue, j.coalesce_key, r.attempt
            FROM unnest($1::bigint[], $2::int[]) AS r(id, attempt)
            JOIN queue_jobs j ON j.id = r.id
            WHERE j.attempts = r.attempt AND coalesce(j.status, '') = 'running'
              AND j.locked_by = $3
         ), decided AS (
            SELECT m.id, m.attempt,
                   CASE WHEN m.coalesce_key IS NOT NULL AND (
                             row_number() OVER (PARTITION BY m.queue, m.coalesce_key
                                                ORDER BY m.id DESC) > 1
                             OR EXISTS (SELECT 1 FROM queue_jobs p
                                        WHERE p.queue = m.queue AND p.coalesce_key = m.coalesce_key
                                          AND p.status = 'pending'))
                        THEN 'cancelled' ELSE 'pending' END AS next
            FROM mine m
         )
         UPDATE queue_jobs j SET status = d.next, attempts = j.attempts - 1,
                run_at = CASE WHEN d.next = 'pending' THEN now() ELSE j.run_at END,
                last_error = CASE WHEN d.next = 'cancelled'
                                  THEN 'superseded by a pending job with the same coalesce key'
                                  ELSE j.last_error END,
                finished_at = CASE WHEN d.next = 'cancelled' THEN now() END,
                locked_by = NULL, lease_expires_at = NULL, updated_at = now()
         FROM decided d
         WHERE j.id = d.id AND j.attempts = d.attempt AND coalesce(j.status, '') = 'running'
           AND j.locked_by = $3";

async fn release_jobs(inner: &Inner, jobs: &[(i64, i32)]) -> Result<u64, QueueError> {
    let ids: Vec<i64> = jobs.iter().map(|j| j.0).collect();
    let attempts: Vec<i32> = jobs.iter().map(|j| j.1).collect();
    let done = sqlx::query(RELEASE_JOBS)
        .bind(&ids)
        .bind(&attempts)
        .bind(&*inner.worker_id)
        .execute(&inner.pool)
        .await
        .ctx("release")?;
    Ok(done.rows_affected())
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: i64,
    /// Kept as text until the fetcher decodes it as its job kind: through a `Value` first,
    /// the decoding was a fifth of a worker's CPU per no-op job (a map built and dropped).
    payload: sqlx::types::Json<Box<serde_json::value::RawValue>>,
    attempts: i32,
    max_attempts: i32,
    tenant_id: Option<uuid::Uuid>,
    priority: i16,
    run_at: DateTime<Utc>,
}

/// Claims up to `$2` jobs of queue `$1` for worker `$3` with a lease of `$4` seconds, when
/// tenant limits are off. The claimed rows are found by `id = ANY(array)`, which only the
/// primary key serves: joined to `picked` instead, an analyzed queue of 20,000 jobs was
/// planned as a hash join over a sequential scan of the whole table, 20 ms per claim of 200
/// instead of 5 (the limited claim had the same hazard: see
/// migrations/20261126000030_claim_plans_with_fresh_statistics.sql). Public so a test can
/// check it.
pub const CLAIM_JOBS: &str = "WITH picked AS (
        SELECT id FROM queue_jobs
        WHERE queue = $1 AND status = 'pending' AND run_at <= now()
        ORDER BY priority DESC, run_at, id
        LIMIT $2 FOR UPDATE SKIP LOCKED)
    UPDATE queue_jobs j SET status = 'running', attempts = j.attempts + 1,
        locked_by = $3, locked_at = now(),
        lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
    WHERE j.id = ANY (ARRAY(SELECT id FROM picked)) AND coalesce(j.status, '') = 'pending'
    RETURNING j.id, j.payload, j.attempts, j.max_attempts, j.tenant_id, j.priority, j.run_at";

/// Claims, with tenant limits on, up to `$5` jobs: up to `$4[i]` of tenant `$3[i]` (this
/// process's free slots of it), tenant by tenant until the batch is full, then jobs without a
/// tenant (every production job kind has one), in queue `$1` for worker `$2` with a
/// lease of `$6` seconds. Each tenant's jobs come from its own descent of the per-tenant
/// pending index (a range, not `=`: with `=` the planner drops tenant_id from the ORDER BY as
/// a constant, and the head index, filtered by tenant, serves that order too), which starts
/// after the tenant's claim cursor (`$7[i]`, `$8[i]`, `$9[i]`: the priority, run_at and id of
/// the last job this process took of it, all NULL for none; see [`ClaimCursor`]); no count,
/// no lock, and claims of several processes run side by side. Public so a test can check its
/// plan.
pub const CLAIM_GRANTED_JOBS: &str = "WITH room AS (
        SELECT r.tenant_id, r.n, coalesce(r.after_priority, 32767::smallint) AS after_priority,
               coalesce(r.after_run_at, '-infinity'::timestamptz) AS after_run_at,
               coalesce(r.after_id, 0::bigint) AS after_id
        FROM unnest($3::uuid[], $4::int[], $7::smallint[], $8::timestamptz[], $9::bigint[])
            AS r(tenant_id, n, after_priority, after_run_at, after_id)
    ), picked AS (
        (SELECT c.id FROM room r CROSS JOIN LATERAL (
            SELECT q.id FROM queue_jobs q
            WHERE q.queue = $1 AND q.tenant_id >= r.tenant_id AND q.tenant_id <= r.tenant_id
              AND q.status = 'pending' AND q.run_at <= now()
              AND q.priority <= r.after_priority AND (q.run_at, q.id) > (r.after_run_at, r.after_id)
            ORDER BY q.tenant_id, q.priority DESC, q.run_at, q.id
            LIMIT r.n FOR UPDATE SKIP LOCKED) c
         LIMIT $5)
        UNION ALL
        SELECT u.id FROM (
            SELECT q.id FROM queue_jobs q
            WHERE $5::int > 0 AND q.queue = $1 AND q.tenant_id IS NULL AND q.status = 'pending'
              AND q.run_at <= now()
            ORDER BY q.tenant_id, q.priority DESC, q.run_at, q.id
            LIMIT $5 FOR UPDATE SKIP LOCKED) u)
    UPDATE queue_jobs j SET status = 'running', attempts = j.attempts + 1,
        locked_by = $2, locked_at = now(),
        lease_expires_at = now() + make_interval(secs => $6), updated_at = now()
    WHERE j.id = ANY (ARRAY(SELECT id FROM picked LIMIT $5)) AND coalesce(j.status, '') = 'pending'
    RETURNING j.id, j.payload, j.attempts, j.max_attempts, j.tenant_id, j.priority, j.run_at";

/// Claims up to `n` jobs. With tenant limits, also says whether every slot this process was
/// granted was in use: then an empty answer says nothing about tenants it holds no slot of.
async fn claim(
    inner: &Inner,
    queue: &'static str,
    n: usize,
) -> (Result<Vec<ClaimedRow>, QueueError>, bool) {
    let lease = inner.settings.lease.as_secs_f64();
    if inner.settings.tenant_concurrency.is_none() {
        let claimed = sqlx::query_as(CLAIM_JOBS)
            .bind(queue)
            .bind(n as i64)
            .bind(&*inner.worker_id)
            .bind(lease)
            .fetch_all(&inner.claim_pool)
            .await
            .ctx("claim");
        return (claimed, false);
    }
    // Every free slot is offered, not only as many as the batch: which tenants have due jobs
    // is only known to the claim, and a batch smaller than the free slots (16 by default)
    // otherwise missed a tenant's new job until a later claim reached that tenant.
    let (rooms, saturated) = {
        let mut book = inner.grants.lock().expect("poisoned");
        let rooms = book.reserve_for(queue);
        let saturated = rooms.is_empty() && book.holds_any();
        (rooms, saturated)
    };
    let (tenants, sizes): (Vec<uuid::Uuid>, Vec<i32>) = rooms.iter().copied().unzip();
    let after = inner.claim_cursors.lock().expect("poisoned").for_claim(
        queue,
        &tenants,
        std::time::Instant::now(),
    );
    let after_priority: Vec<Option<i16>> = after.iter().map(|c| c.map(|c| c.priority)).collect();
    let after_run_at: Vec<Option<DateTime<Utc>>> =
        after.iter().map(|c| c.map(|c| c.run_at)).collect();
    let after_id: Vec<Option<i64>> = after.iter().map(|c| c.map(|c| c.id)).collect();
    let claimed: Result<Vec<ClaimedRow>, QueueError> = sqlx::query_as(CLAIM_GRANTED_JOBS)
        .bind(queue)
        .bind(&*inner.worker_id)
        .bind(&tenants)
        .bind(&sizes)
        .bind(n as i32)
        .bind(lease)
        .bind(&after_priority)
        .bind(&after_run_at)
        .bind(&after_id)
        .fetch_all(&inner.claim_pool)
        .await
        .ctx("claim");
    let mut per_tenant: HashMap<uuid::Uuid, i32> = HashMap::new();
    let mut last: HashMap<uuid::Uuid, ClaimCursor> = HashMap::new();
    if let Ok(rows) = &claimed {
        for row in rows {
            let Some(tenant) = row.tenant_id else {
                continue;
            };
            *per_tenant.entry(tenant).or_default() += 1;
            let here = ClaimCursor::of(row);
            let at = last.entry(tenant).or_insert(here);
            if here.is_after(at) {
                *at = here;
            }
        }
        inner
            .claim_cursors
            .lock()
            .expect("poisoned")
            .record(queue, &rooms, &per_tenant, &last);
    }
    let starved = inner
        .grants
        .lock()
        .expect("poisoned")
        .settle(queue, &rooms, &per_tenant);
    for q in starved {
        wake_queue(inner, q);
    }
    (claimed, saturated)
}

async fn fetch_loop<J: JobKind>(
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<Task<J>>,
    wake: Arc<Notify>,
) {
    let batch = inner.settings.batch_size.max(1);
    let limited = inner.settings.tenant_concurrency.is_some();
    let mut failures = 0u32;
    loop {
        let first = tokio::select! {
            // Stopping wins over a free permit: unbiased, a draining fetcher went on claiming
            // half the time.
            biased;
            () = inner.stop_fetching.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        first.forget();
        let claiming = ClaimInFlight::start(&inner);
        if inner.stop_fetching.is_cancelled() {
            // The drain began between the permit and the count: it may not have seen this
            // claim, so it is not made.
            permits.add_permits(1);
            break;
        }
        let mut n = 1;
        while n < batch {
            match permits.try_acquire() {
                Ok(p) => {
                    p.forget();
                    n += 1;
                }
                Err(_) => break,
            }
        }
        let (claimed, saturated) = claim(&inner, J::QUEUE, n).await;
        let claimed = match claimed {
            Ok(rows) => {
                failures = 0;
                rows
            }
            Err(e) => {
                // A lost connection must not end the worker: back off and claim again; jobs
                // already running keep their leases through the heartbeat's own retries.
                permits.add_permits(n);
                failures = failures.saturating_add(1);
                let delay = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                warn!(queue = J::QUEUE, error = ?e, retry_in_ms = delay.as_millis() as u64, "claim failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    () = inner.stop_fetching.cancelled() => break,
                }
            }
        };
        let got = claimed.len();
        if got < n {
            permits.add_permits(n - got);
        }
        {
            let mut inflight = inner.inflight.lock().expect("poisoned");
            for row in &claimed {
                // An entry already there is this process's earlier run of the same job (its
                // lease lapsed and the job came back here): if that run is still executing,
                // its slot is freed when it returns (see `finish_execution`).
                inflight.insert(
                    row.id,
                    Inflight {
                        attempt: row.attempts,
                        executing: true,
                        tenant: row.tenant_id,
                        queue: J::QUEUE,
                    },
                );
            }
            inner.executing.fetch_add(claimed.len(), Ordering::SeqCst);
        }
        drop(claiming);
        for row in claimed {
            let id = row.id;
            match serde_json::from_str::<J>(row.payload.get()) {
                Ok(args) => {
                    let task = TaskBuilder::new(args)
                        .task_id(TaskId::Int(id as u64))
                        .attempt(row.attempts as usize)
                        .max_attempts(row.max_attempts as usize)
                        .build();
                    let mut task = task;
                    task.inject_data(ClaimInfo {
                        tenant: row.tenant_id.map(TenantId::from_uuid),
                        max_attempts: row.max_attempts,
                    });
                    if tx.send(task).await.is_err() {
                        // The apalis worker is gone; hand the rest back.
                        let _ = release_jobs(&inner, &[(id, row.attempts)]).await;
                        forget(&inner, &[(id, row.attempts)]);
                        permits.add_permits(1);
                    }
                }
                Err(e) => {
                    // A row we cannot decode is quarantined as dead; it must never stop the
                    // queue for everyone else.
                    error!(queue = J::QUEUE, job_id = id, error = %e, "poison job quarantined");
                    let completion = Completion {
                        id,
                        attempt: row.attempts,
                        outcome: Outcome::Dead,
                        run_at: None,
                        error: Some(format!("payload could not be decoded as {}: {e}", J::QUEUE)),
                        at: Utc::now(),
                    };
                    submit(&inner, completion);
                    finish_execution(&inner, id, row.attempts);
                    permits.add_permits(1);
                }
            }
        }
        // With tenant limits a short claim means every tenant with work here is at its
        // granted slots. The next claim waits for one of them to come back (a handler of this
        // queue returning the slot of a tenant that had none free; one that returned during
        // the claim counts), a local flush, an enqueue or a new grant. Waiting for the flush
        // alone, as when slots were counted in the database, left a slot idle for a commit's
        // round trip. An empty claim asks for a grant sync now, since the work may be a
        // tenant this process holds no slots of yet. Not when every granted slot was in use:
        // under load that was dozens of syncs a second per process, each a few ms of the
        // database's time under one lock, and the periodic sync finds new tenants then.
        if limited && got == 0 && !saturated {
            inner.grant_sync_wanted.notify_one();
        }
        if got == 0 || (limited && got < n) {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(inner.settings.poll_interval) => {}
                () = inner.stop_fetching.cancelled() => break,
            }
        }
    }
    debug!(queue = J::QUEUE, "fetcher stopped");
}

#[derive(Debug, Clone)]
struct ClaimInfo {
    tenant: Option<TenantId>,
    max_attempts: i32,
}

/// The handler returned: its slot is free for another job, while the job stays in flight
/// (its lease renewed) until the flusher has made its outcome durable.
/// Counts a claim as in flight until it is dropped (after its jobs count as executing, or
/// when the claim failed).
struct ClaimInFlight<'a>(&'a Inner);

impl<'a> ClaimInFlight<'a> {
    fn start(inner: &'a Inner) -> Self {
        inner.claiming.fetch_add(1, Ordering::SeqCst);
        Self(inner)
    }
}

impl Drop for ClaimInFlight<'_> {
    fn drop(&mut self) {
        if self.0.claiming.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.execution_drained.notify_waiters();
        }
    }
}

/// The run of job `id` at `attempt` has returned. In-flight entries are keyed by job id, and
/// this process may have claimed the job again meanwhile (its lease lapsed while the database
/// was out of reach, and the job came back to it): then the entry is the newer run's, which
/// stays executing, while this run's own count still comes off.
/// Its tenant slot is free from here: a tenant's limit bounds the handlers running at once.
fn finish_execution(inner: &Inner, id: i64, attempt: i32) {
    let mut inflight = inner.inflight.lock().expect("poisoned");
    let (counted, freed) = match inflight.get_mut(&id) {
        Some(job) if job.attempt == attempt => {
            let was = std::mem::replace(&mut job.executing, false);
            (was, job.tenant.filter(|_| was).map(|t| (t, job.queue)))
        }
        // A newer run of the same job (same tenant) replaced this one's entry.
        Some(job) => (true, job.tenant.map(|t| (t, job.queue))),
        // Forgotten (handed back at shutdown): its count came off then.
        None => (false, None),
    };
    drop(inflight);
    if let Some((tenant, queue)) = freed
        && inner.settings.tenant_concurrency.is_some()
    {
        let was_full = inner.grants.lock().expect("poisoned").release(tenant, 1);
        // The tenant was at its slots, so a claim of its queue may have left its jobs behind:
        // a fetcher there claims again (one claiming now finds the wake-up stored). Not for a
        // tenant with slots to spare: on a quiet queue every finished job then set off an
        // empty claim, which delayed the next job's start.
        if was_full {
            wake_queue(inner, queue);
        }
    }
    if counted && inner.executing.fetch_sub(1, Ordering::SeqCst) == 1 {
        inner.execution_drained.notify_waiters();
    }
}

/// This process no longer answers for these runs (job id, attempt). A newer run of the same
/// job that this process claimed since keeps its entry, so its lease is still renewed.
fn forget(inner: &Inner, runs: &[(i64, i32)]) {
    let mut inflight = inner.inflight.lock().expect("poisoned");
    let mut stopped = 0;
    let mut freed = Vec::new();
    for (id, attempt) in runs {
        if inflight.get(id).is_some_and(|job| job.attempt == *attempt)
            && let Some(job) = inflight.remove(id)
            && job.executing
        {
            stopped += 1;
            freed.extend(job.tenant);
        }
    }
    drop(inflight);
    if !freed.is_empty() {
        let mut grants = inner.grants.lock().expect("poisoned");
        for tenant in freed {
            grants.release(tenant, 1);
        }
    }
    if stopped > 0 && inner.executing.fetch_sub(stopped, Ordering::SeqCst) == stopped {
        inner.execution_drained.notify_waiters();
    }
}

/// Hands a completion to the flusher. The job's slot is not held for the write: the job stays
/// `running` (and its lease renewed) until the flush lands, so a crash before then re-runs it,
/// which handlers tolerate, and a stale execution still loses the compare-and-set.
fn submit(inner: &Inner, completion: Completion) {
    // Fails only once the flusher has stopped at shutdown; the lease then hands the job on.
    let _ = inner.completions.send(completion);
}

async fn flush_loop(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Completion>) {
    // Completions that arrive while flushes are in the air go out together in the next: the
    // batch grows with the load, with no timer adding latency when the queue is quiet. A few
    // flushes may overlap so one commit's fsync does not hold up the next batch.
    const MAX_BATCH: usize = 2000;
    let slots = Arc::new(Semaphore::new(MAX_FLUSHES));
    let mut flushes = tokio::task::JoinSet::new();
    loop {
        while flushes.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let first = tokio::select! {
            r = rx.recv() => r,
            () = inner.stop_background.cancelled() => {
                // Drain what is already queued, then stop.
                rx.try_recv().ok()
            }
        };
        let Some(first) = first else { break };
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let inner = inner.clone();
        flushes.spawn(async move { flush_with_retry(&inner, batch, slot).await });
    }
    while flushes.join_next().await.is_some() {}
}

/// How long a flush task keeps re-sending completions whose rows are held elsewhere once
/// shutdown has begun; after that the leases hand those jobs on (they run again).
const HELD_AT_SHUTDOWN: Duration = Duration::from_secs(5);

/// `slot` is this flush's place among the [`flush_loop`]'s concurrent flushes; it is given
/// up while the task waits for held rows, so a held row never slows other completions.
async fn flush_with_retry(inner: &Inner, mut batch: Vec<Completion>, slot: OwnedSemaphorePermit) {
    let mut slot = Some(slot);
    let mut held_since_shutdown: Option<std::time::Instant> = None;
    loop {
        let again = flush_once(inner, batch).await;
        drop(slot.take());
        if again.is_empty() {
            return;
        }
        // Held by a claim or an ops action for a moment: the jobs stay in flight (their leases
        // renewed) and go out again from this task, after a pause so that a row held for
        // longer is not retried in a tight loop. Staying in this task (not a detached one)
        // matters at shutdown: the flusher waits for its tasks, so these completions still
        // land instead of being dropped with the channel.
        debug!(
            jobs = again.len(),
            "completions wait for rows held elsewhere"
        );
        if inner.stop_background.is_cancelled() {
            let since = *held_since_shutdown.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= HELD_AT_SHUTDOWN {
                let runs: Vec<(i64, i32)> = again.iter().map(|c| (c.id, c.attempt)).collect();
                warn!(jobs = ?runs, "rows still held at shutdown; their leases will hand these jobs on");
                forget(inner, &runs);
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        batch = again;
    }
}

/// Writes one batch, retrying failed statements; returns the completions whose rows were held
/// elsewhere, still in flight, for the caller to send again.
async fn flush_once(inner: &Inner, batch: Vec<Completion>) -> Vec<Completion> {
    let mut failures = 0u32;
    let outcome = loop {
        match flush(&inner.completion_pool, &inner.worker_id, &batch).await {
            Ok(outcome) => break Some(outcome),
            Err(e) => {
                failures += 1;
                if failures > 3 && inner.stop_background.is_cancelled() {
                    error!(error = ?e, "giving up flushing completions at shutdown; leases will expire and the jobs re-run");
                    break None;
                }
                let delay = Duration::from_millis(50 * 2u64.pow(failures.min(7)));
                warn!(error = ?e, retry_in_ms = delay.as_millis() as u64, "completion flush failed");
                tokio::time::sleep(delay).await;
            }
        }
    };
    let Some(outcome) = outcome else {
        let runs: Vec<(i64, i32)> = batch.iter().map(|c| (c.id, c.attempt)).collect();
        forget(inner, &runs);
        return Vec::new();
    };
    let mut applied = std::collections::HashSet::new();
    let mut held = std::collections::HashSet::new();
    for (id, was_applied) in outcome {
        if was_applied {
            applied.insert(id);
        } else {
            held.insert(id);
        }
    }
    if !applied.is_empty() && inner.settings.tenant_concurrency.is_some() {
        // Finished jobs free tenant slots: a fetcher that found every tenant at its limit is
        // asleep and should claim again now, not at its next poll.
        wake_all(inner);
    }
    let (again, settled): (Vec<Completion>, Vec<Completion>) =
        batch.into_iter().partition(|c| held.contains(&c.id));
    let stale: Vec<i64> = settled
        .iter()
        .map(|c| c.id)
        .filter(|id| !applied.contains(id))
        .collect();
    if !stale.is_empty() {
        warn!(
            jobs = ?stale,
            "completions not applied: those jobs were recovered by another worker meanwhile"
        );
    }
    let settled: Vec<(i64, i32)> = settled.iter().map(|c| (c.id, c.attempt)).collect();
    forget(inner, &settled);
    again
}

async fn flush(
    pool: &PgPool,
    worker_id: &str,
    batch: &[Completion],
) -> Result<Vec<(i64, bool)>, QueueError> {
    // Nearly every batch is plain successes only: those go through the lean statement. A
    // batch with anything else goes whole through the full one, so it stays one commit.
    if batch
        .iter()
        .all(|c| c.outcome == Outcome::Done && c.error.is_none())
    {
        let ids: Vec<i64> = batch.iter().map(|c| c.id).collect();
        let attempts: Vec<i32> = batch.iter().map(|c| c.attempt).collect();
        return sqlx::query_as(COMPLETE_SUCCESSES)
            .bind(&ids)
            .bind(&attempts)
            .bind(worker_id)
            .fetch_all(pool)
            .await
            .ctx("complete");
    }
    let n = batch.len();
    let mut ids = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut refunds = Vec::with_capacity(n);
    let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut errors: Vec<Option<String>> = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut ats = Vec::with_capacity(n);
    for c in batch {
        ids.push(c.id);
        attempts.push(c.attempt);
        statuses.push(c.outcome.status());
        refunds.push(i32::from(c.outcome == Outcome::Deferred));
        run_ats.push(c.run_at);
        errors.push(c.error.clone());
        kinds.push(c.outcome.label());
        ats.push(c.at);
    }
    sqlx::query_as(COMPLETE_JOBS)
        .bind(&ids)
        .bind(&attempts)
        .bind(&statuses)
        .bind(&refunds)
        .bind(&run_ats)
        .bind(&errors)
        .bind(&kinds)
        .bind(&ats)
        .bind(worker_id)
        .fetch_all(pool)
        .await
        .ctx("complete")
}

async fn listen_loop(inner: Arc<Inner>) {
    let mut failures = 0u32;
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&inner.pool).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            l = listener => match l {
                Ok(l) => l,
                Err(e) => {
                    failures += 1;
                    warn!(error = ?e, "LISTEN connection failed; polling meanwhile");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(failures.min(5)))) => continue,
                        () = inner.stop_background.cancelled() => return,
                    }
                }
            },
            () = inner.stop_background.cancelled() => return,
        };
        failures = 0;
        // Anything published while we were not listening is lost: wake everyone once.
        inner.claim_cursors.lock().expect("poisoned").at.clear();
        wake_all(&inner);
        loop {
            tokio::select! {
                n = listener.recv() => match n {
                    Ok(n) => {
                        inner.claim_cursors.lock().expect("poisoned").forget_queue(n.payload());
                        wake_queue(&inner, n.payload());
                    }
                    Err(e) => {
                        warn!(error = ?e, "LISTEN connection lost; reconnecting");
                        break;
                    }
                },
                () = inner.stop_background.cancelled() => return,
            }
        }
    }
}

/// Wakes one fetcher of `queue` (or the next to wait), if this process runs it.
fn wake_queue(inner: &Inner, queue: &str) {
    let waker = inner.wakers.lock().expect("poisoned").get(queue).cloned();
    if let Some(w) = waker {
        w.notify_one();
    }
}

fn wake_all(inner: &Inner) {
    for w in inner.wakers.lock().expect("poisoned").values() {
        w.notify_one();
    }
}

/// Keeps this process's tenant slot grants: asks for slots of tenants with due jobs in its
/// queues, gives back what it no longer needs, yields a fair share to other processes that
/// want the same tenant, and renews its rows before they lapse (a lease after each sync).
async fn grant_loop(inner: Arc<Inner>) {
    let Some(default_limit) = inner.settings.tenant_concurrency else {
        return;
    };
    let ttl = inner.settings.lease;
    let every = GRANT_SYNC_EVERY.min(ttl / 4);
    let mut failures = 0u32;
    loop {
        let queues: Vec<String> = inner
            .wakers
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect();
        if !queues.is_empty() {
            let started = std::time::Instant::now();
            let (tenants, bounds) = inner.grants.lock().expect("poisoned").bounds();
            let synced: Result<Vec<(uuid::Uuid, i32)>, QueueError> = sqlx::query_as(
                "SELECT * FROM queue_sync_tenant_grants($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&*inner.worker_id)
            .bind(&queues)
            .bind(TENANT_CLAIM_LOCK)
            .bind(default_limit as i32)
            .bind(ttl.as_secs_f64())
            .bind(&tenants)
            .bind(&bounds)
            .bind(GRANT_DISCOVER_TENANTS)
            .bind(uuid::Uuid::from_u128(rand::random()))
            .bind(GRANT_LINGER.as_secs_f64())
            // Synchronous, unlike claims: a grant lost in a server crash while this process
            // went on using it would let another process be granted the same slots.
            .fetch_all(&inner.pool)
            .await
            .ctx("grant sync");
            match synced {
                Ok(granted) => {
                    failures = 0;
                    let granted: HashMap<uuid::Uuid, i32> = granted.into_iter().collect();
                    // The rows lapse a lease after the database's clock read them, which is
                    // after `started`; a margin covers a claim still on its way then.
                    let valid_until = started + ttl - ttl / 5;
                    let grew = inner
                        .grants
                        .lock()
                        .expect("poisoned")
                        .apply(&granted, valid_until);
                    if grew {
                        wake_all(&inner);
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    warn!(error = ?e, "tenant slot grant sync failed; will retry");
                }
            }
        }
        // Retried soon after a failure: the grants lapse a lease after the last sync.
        let pause = if failures > 0 {
            Duration::from_millis(50 * 2u64.pow(failures.min(6))).min(ttl / 4)
        } else {
            every
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = inner.grant_sync_wanted.notified() => {}
            () = inner.stop_background.cancelled() => break,
        }
    }
}

/// At shutdown, once the flusher has written what it could, the slots go back at once
/// instead of when the rows lapse. A row whose tenant still has a job of this process running
/// in the database (its completion or hand-back could not be written) stays: lapsed, it
/// stands for those jobs in other processes' syncs until the reaper returns them.
async fn give_back_grants(inner: &Inner) {
    if inner.settings.tenant_concurrency.is_none() {
        return;
    }
    if let Err(e) = sqlx::query(
        // One walk of the lease index (running jobs only) for all the rows, not one per row.
        "DELETE FROM queue_tenant_grants g
         WHERE g.worker_id = $1
           AND g.tenant_id NOT IN (SELECT r.tenant_id FROM queue_jobs r
                                   WHERE r.status = 'running' AND r.locked_by = $1
                                     AND r.tenant_id IS NOT NULL)",
    )
    .bind(&*inner.worker_id)
    .execute(&inner.pool)
    .await
    {
        warn!(error = ?e, "could not give back tenant slot grants; they lapse with the lease");
    }
}

async fn heartbeat_loop(inner: Arc<Inner>) {
    let every = (inner.settings.lease / 3).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = inner.stop_background.cancelled() => return,
        }
        let ids: Vec<i64> = inner
            .inflight
            .lock()
            .expect("poisoned")
            .keys()
            .copied()
            .collect();
        if ids.is_empty() {
            continue;
        }
        // Looked up by id only (see the note above `COMPLETE_JOBS`): the planner otherwise
        // ANDed a bitmap of the partial running-jobs index, which a busy queue fills with dead
        // entries (bitmap scans never mark them dead), and one renewal of 74 jobs took a second.
        let renewed = sqlx::query(RENEW_LEASES)
            .bind(&ids)
            .bind(inner.settings.lease.as_secs_f64())
            .bind(&*inner.worker_id)
            .execute(&inner.pool)
            .await;
        if let Err(e) = renewed {
            warn!(error = ?e, jobs = ids.len(), "lease renewal failed; will retry");
        }
    }
}

async fn reaper_loop(inner: Arc<Inner>) {
    let every =
        (inner.settings.lease / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
    loop {
        let jitter = Duration::from_millis(rand::random::<u64>() % 250);
        tokio::select! {
            () = tokio::time::sleep(every + jitter) => {}
            () = inner.stop_background.cancelled() => return,
        }
        if let Err(e) = reap_expired(&inner.pool).await {
            warn!(error = ?e, "reaper pass failed");
        }
    }
}

/// What apalis polls: tasks claimed by this process's fetcher for one queue.
pub struct PgBackend<J> {
    rx: mpsc::Receiver<Task<J>>,
    _marker: PhantomData<J>,
}

#[derive(Debug, thiserror::Error)]
#[error("queue backend error")]
pub struct BackendError;

impl<J: JobKind> Backend for PgBackend<J> {
    type Task = Task<J>;
    type Error = BackendError;

    fn poll_ready(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        self.rx.poll_recv(cx).map(|t| t.map(Ok))
    }

    fn poll_close(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
}

impl<J: JobKind> BackendConfig for PgBackend<J> {
    type Args = J;
    type Id = i64;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = tower::layer::util::Identity;

    fn config(&self) -> &Self::Config {
        &()
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        tower::layer::util::Identity::new()
    }
}

/// What apalis calls for each task: runs the handler on its own tokio task (so a panic or a
/// blocking handler cannot take the worker with it), under the job timeout, then records the
/// outcome durably before freeing the slot.
pub struct JobService<J, H> {
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
    handler: H,
    _marker: PhantomData<fn(J)>,
}

impl<J, H: Clone> Clone for JobService<J, H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            permits: self.permits.clone(),
            handler: self.handler.clone(),
            _marker: PhantomData,
        }
    }
}

impl<J: JobKind, H: JobHandler<J>> tower::Service<Task<J>> for JobService<J, H> {
    type Response = ();
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<(), Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: Task<J>) -> Self::Future {
        let id = match task.ctx().task_id() {
            Some(TaskId::Int(id)) => *id as i64,
            _ => -1,
        };
        let attempt = task.ctx().attempt() as i32;
        let info = task.ctx().data().get::<ClaimInfo>().cloned();
        let (args, _) = task.take();
        let ctx = JobContext {
            id: JobId::new(id),
            attempt,
            max_attempts: info.as_ref().map_or(1, |i| i.max_attempts),
            tenant: info.and_then(|i| i.tenant),
            worker_id: self.inner.worker_id.clone(),
        };
        let inner = self.inner.clone();
        let permits = self.permits.clone();
        let handler = self.handler.clone();
        let span = info_span!("job", queue = J::QUEUE, job_id = id, attempt, tenant = ?ctx.tenant);
        Box::pin(
            async move {
                let started = std::time::Instant::now();
                let timeout = inner.settings.job_timeout;
                let handler_ctx = ctx.clone();
                let mut run = tokio::spawn(
                    async move {
                        AssertUnwindSafe(handler.handle(args, handler_ctx))
                            .catch_unwind()
                            .await
                    }
                    .in_current_span(),
                );
                let result = match tokio::time::timeout(timeout, &mut run).await {
                    Ok(Ok(Ok(r))) => r,
                    Ok(Ok(Err(panic))) => Err(JobError::retry(format!(
                        "handler panicked: {}",
                        panic_message(&panic)
                    ))),
                    Ok(Err(join)) => Err(JobError::retry(format!("handler task failed: {join}"))),
                    Err(_) => {
                        // A timed-out run must not go on beside its own retry.
                        run.abort();
                        Err(JobError::retry(format!(
                            "timed out after {} s",
                            timeout.as_secs_f64()
                        )))
                    }
                };
                let completion = decide::<J>(id, &ctx, result);
                let outcome = completion.outcome;
                metrics::counter!("graphdesk_jobs_total", "queue" => J::QUEUE, "outcome" => outcome.label()).increment(1);
                metrics::histogram!("graphdesk_job_duration_seconds", "queue" => J::QUEUE)
                    .record(started.elapsed().as_secs_f64());
                match outcome {
                    Outcome::Done => debug!("job done"),
                    Outcome::Deferred => info!(error = completion.error.as_deref(), "job deferred"),
                    Outcome::Retry => warn!(error = completion.error.as_deref(), run_at = ?completion.run_at, "job failed; will retry"),
                    Outcome::Dead => error!(error = completion.error.as_deref(), "job failed permanently"),
                }
                // Queued for the flusher before the drain can see this job finished: the
                // other order let shutdown stop the flusher first, dropping the completion.
                let attempt = completion.attempt;
                submit(&inner, completion);
                finish_execution(&inner, id, attempt);
                permits.add_permits(1);
                Ok(())
            }
            .instrument(span),
        )
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

fn decide<J: JobKind>(id: i64, ctx: &JobContext, result: Result<(), JobError>) -> Completion {
    let (outcome, run_at, error) = match result {
        Ok(()) => (Outcome::Done, None, None),
        Err(JobError::Permanent { reason }) => (Outcome::Dead, None, Some(reason)),
        Err(JobError::Defer { until, reason }) => (Outcome::Deferred, Some(until), Some(reason)),
        Err(JobError::Retryable { reason, after }) => {
            if ctx.attempt >= ctx.max_attempts {
                (
                    Outcome::Dead,
                    None,
                    Some(format!("{reason} (gave up after {} attempts)", ctx.attempt)),
                )
            } else {
                let backoff = J::retry_policy().delay(ctx.attempt.max(1) as u32);
                let delay = after.map_or(backoff, |a| a.max(backoff));
                let at = Utc::now()
                    + chrono::Duration::from_std(delay)
                        .unwrap_or_else(|_| chrono::Duration::hours(1));
                (Outcome::Retry, Some(at), Some(reason))
            }
        }
    };
    Completion {
        id,
        attempt: ctx.attempt,
        outcome,
        run_at,
        error,
        at: Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn cursor(priority: i16, secs: i64, id: i64) -> ClaimCursor {
        ClaimCursor {
            priority,
            run_at: DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap(),
            id,
        }
    }

    #[test]
    fn claim_order_is_priority_first_then_run_at_then_id() {
        assert!(cursor(0, 0, 2).is_after(&cursor(0, 0, 1)));
        assert!(cursor(0, 1, 1).is_after(&cursor(0, 0, 9)));
        // A higher priority comes first whatever its run_at.
        assert!(cursor(0, 0, 1).is_after(&cursor(5, 9, 9)));
        assert!(!cursor(5, 9, 9).is_after(&cursor(0, 0, 1)));
        assert!(!cursor(0, 0, 1).is_after(&cursor(0, 0, 1)));
    }

    #[test]
    fn a_tenant_keeps_its_cursor_only_while_claims_fill_its_room() {
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let mut cursors = ClaimCursors::default();
        let now = Instant::now();
        assert_eq!(cursors.for_claim("q", &[a, b], now), vec![None, None]);
        let rooms = [(a, 2), (b, 2)];
        // a filled its room, b did not.
        let claimed = HashMap::from([(a, 2), (b, 1)]);
        let last = HashMap::from([(a, cursor(0, 0, 7)), (b, cursor(0, 0, 8))]);
        cursors.record("q", &rooms, &claimed, &last);
        assert_eq!(
            cursors.for_claim("q", &[a, b], now),
            vec![Some(cursor(0, 0, 7)), None]
        );
        // Another queue's claims of the same tenant have their own cursor.
        assert_eq!(cursors.for_claim("other", &[a], now), vec![None]);
        // A claim that ended earlier (another fetcher's, on its way meanwhile) does not move
        // the cursor back.
        let earlier = HashMap::from([(a, cursor(0, 0, 5))]);
        cursors.record("q", &[(a, 2)], &HashMap::from([(a, 2)]), &earlier);
        assert_eq!(
            cursors.for_claim("q", &[a], now),
            vec![Some(cursor(0, 0, 7))]
        );
        // Coming up short drops it: a job may lie before it.
        cursors.record("q", &[(a, 2)], &HashMap::from([(a, 1)]), &last);
        assert_eq!(cursors.for_claim("q", &[a], now), vec![None]);
    }

    #[test]
    fn cursors_lapse_after_their_ttl_and_on_a_notification_for_their_queue() {
        let a = uuid::Uuid::from_u128(1);
        let mut cursors = ClaimCursors::default();
        let start = Instant::now();
        let fill = |c: &mut ClaimCursors, q: &'static str| {
            c.record(
                q,
                &[(a, 1)],
                &HashMap::from([(a, 1)]),
                &HashMap::from([(a, cursor(0, 0, 3))]),
            );
        };
        assert_eq!(cursors.for_claim("q", &[a], start), vec![None]);
        fill(&mut cursors, "q");
        let soon = start + CLAIM_CURSOR_TTL / 2;
        assert_eq!(
            cursors.for_claim("q", &[a], soon),
            vec![Some(cursor(0, 0, 3))]
        );
        assert_eq!(
            cursors.for_claim("q", &[a], start + CLAIM_CURSOR_TTL),
            vec![None]
        );
        fill(&mut cursors, "q");
        fill(&mut cursors, "other");
        cursors.forget_queue("q");
        let later = start + CLAIM_CURSOR_TTL + CLAIM_CURSOR_TTL / 2;
        assert_eq!(cursors.for_claim("q", &[a], later), vec![None]);
        assert_eq!(
            cursors.for_claim("other", &[a], later),
            vec![Some(cursor(0, 0, 3))]
        );
    }

    fn book(granted: &[(u128, i32)]) -> GrantBook {
        let mut book = GrantBook::default();
        let granted = granted
            .iter()
            .map(|(t, n)| (uuid::Uuid::from_u128(*t), *n))
            .collect();
        book.apply(&granted, Instant::now() + Duration::from_secs(60));
        book
    }

    fn held(book: &GrantBook, tenant: u128) -> u32 {
        book.tenants
            .get(&uuid::Uuid::from_u128(tenant))
            .map_or(0, |s| s.held)
    }

    #[test]
    fn a_claim_reserves_no_more_than_each_tenants_free_slots_nor_than_it_can_take() {
        let mut book = book(&[(1, 2), (2, 3)]);
        let rooms = book.reserve(100);
        let total: i32 = rooms.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 5);
        // A concurrent claim finds nothing left.
        assert!(book.reserve(100).is_empty());
        let mut book = self::book(&[(1, 2), (2, 3)]);
        let rooms = book.reserve(4);
        assert_eq!(rooms.iter().map(|(_, n)| n).sum::<i32>(), 4);
    }

    #[test]
    fn unused_reservations_and_finished_jobs_free_their_slots() {
        let mut book = book(&[(1, 3)]);
        let rooms = book.reserve(10);
        let claimed = HashMap::from([(uuid::Uuid::from_u128(1), 1)]);
        book.settle("q", &rooms, &claimed);
        assert_eq!(held(&book, 1), 1);
        assert!(
            !book.release(uuid::Uuid::from_u128(1), 1),
            "it had slots to spare"
        );
        assert_eq!(held(&book, 1), 0);
        assert_eq!(book.reserve(10), vec![(uuid::Uuid::from_u128(1), 3)]);
        assert!(
            book.release(uuid::Uuid::from_u128(1), 1),
            "every slot was held: a claim may have passed the tenant by"
        );
    }

    /// An empty claim asks for a grant sync unless every granted slot was in use: a process
    /// with no grants (or free ones) must learn of new tenants' work at once, a saturated one
    /// leaves that to the periodic sync.
    #[test]
    fn only_a_process_with_every_slot_in_use_counts_as_saturated() {
        let mut none = GrantBook::default();
        assert!(none.reserve(usize::MAX).is_empty());
        assert!(
            !none.holds_any(),
            "no grants: an empty claim asks for a sync"
        );
        let mut book = book(&[(1, 2), (2, 1)]);
        assert_eq!(book.reserve(usize::MAX).len(), 2);
        assert!(book.reserve(usize::MAX).is_empty());
        assert!(book.holds_any(), "every slot in use: saturated");
        book.release(uuid::Uuid::from_u128(2), 1);
        assert_eq!(
            book.reserve(usize::MAX),
            vec![(uuid::Uuid::from_u128(2), 1)]
        );
    }

    /// Every queue's fetchers claim within the same slots. One that claims while another
    /// queue's claim holds some is woken when that claim gives them back unused; without
    /// that, a tenant's first job waited for its fetcher's next poll.
    #[test]
    fn a_queue_that_claimed_without_reserved_slots_is_woken_when_they_come_back() {
        let mut book = book(&[(1, 1)]);
        let mail = book.reserve_for("mail");
        assert_eq!(mail, vec![(uuid::Uuid::from_u128(1), 1)]);
        assert!(book.reserve_for("probe").is_empty());
        assert!(book.reserve_for("probe").is_empty(), "listed once");
        assert_eq!(
            book.settle("mail", &mail, &HashMap::new()),
            vec!["probe"],
            "the slot came back unused"
        );
        // Used, it does not come back: nobody is woken, and the waiting queue stays listed.
        let mail = book.reserve_for("mail");
        assert!(book.reserve_for("probe").is_empty());
        let used = HashMap::from([(uuid::Uuid::from_u128(1), 1)]);
        assert!(book.settle("mail", &mail, &used).is_empty());
        book.release(uuid::Uuid::from_u128(1), 1);
        let again = book.reserve_for("mail");
        assert_eq!(book.settle("mail", &again, &HashMap::new()), vec!["probe"]);
        // A claim's own queue is not woken by it: its fetcher claims again by itself.
        let first = book.reserve_for("probe");
        assert!(book.reserve_for("probe").is_empty());
        assert!(book.settle("probe", &first, &HashMap::new()).is_empty());
        // A claim that got some slots but not those another claim held (the tenant granted
        // while that claim was on its way) is woken too.
        let mail = book.reserve_for("mail");
        let both = HashMap::from([(uuid::Uuid::from_u128(1), 1), (uuid::Uuid::from_u128(2), 1)]);
        book.apply(&both, Instant::now() + Duration::from_secs(60));
        assert_eq!(
            book.reserve_for("probe"),
            vec![(uuid::Uuid::from_u128(2), 1)]
        );
        assert_eq!(book.settle("mail", &mail, &HashMap::new()), vec!["probe"]);
    }

    #[test]
    fn lapsed_grants_are_not_used() {
        let mut book = book(&[(1, 3)]);
        book.valid_until = Some(Instant::now() - Duration::from_millis(1));
        assert!(book.reserve(10).is_empty());
    }

    #[test]
    fn a_shrunk_grant_is_reported_at_what_may_still_be_held_until_the_jobs_finish() {
        let mut book = book(&[(1, 4)]);
        let rooms = book.reserve(10);
        book.settle("q", &rooms, &HashMap::from([(uuid::Uuid::from_u128(1), 4)]));
        // Told to keep 2: the 4 running stay reported until they finish.
        book.apply(
            &HashMap::from([(uuid::Uuid::from_u128(1), 2)]),
            Instant::now() + Duration::from_secs(60),
        );
        assert_eq!(book.bounds().1, vec![4]);
        assert!(book.reserve(10).is_empty());
        book.release(uuid::Uuid::from_u128(1), 3);
        assert_eq!(book.bounds().1, vec![2]);
        assert_eq!(book.reserve(10), vec![(uuid::Uuid::from_u128(1), 1)]);
        // Taken back entirely once nothing is held: the tenant is forgotten.
        book.apply(&HashMap::new(), Instant::now() + Duration::from_secs(60));
        assert_eq!(book.bounds().1, vec![2]);
        book.release(uuid::Uuid::from_u128(1), 2);
        book.apply(&HashMap::new(), Instant::now() + Duration::from_secs(60));
        assert!(book.tenants.is_empty());
    }

    #[test]
    fn every_tenant_gets_its_turn_when_slots_outnumber_a_claim() {
        let mut seen = std::collections::HashSet::new();
        let mut book = book(&[(1, 1), (2, 1), (3, 1)]);
        for _ in 0..3 {
            let rooms = book.reserve(1);
            seen.extend(rooms.iter().map(|(t, _)| *t));
            book.settle("q", &rooms, &HashMap::new());
        }
        assert_eq!(seen.len(), 3);
    }
}
