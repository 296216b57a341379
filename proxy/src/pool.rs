//! One bounded pool of server connections per (database, user).
//!
//! The core is synchronous: a plain mutex around the idle list, the count of connections
//! that exist or are being opened, and a FIFO of waiters; it is never held across an
//! `.await`. Capacity moves in two forms: a ready [`Server`], or a *slot* (permission to
//! open one). A checked-in server goes to the first live waiter, else onto the idle stack
//! (LIFO, so hot connections stay hot and cold ones age out). A closed server's slot goes
//! to the first waiter, else capacity shrinks.
//!
//! Checkout returns a [`PooledServer`] guard; dropping it returns the server: clean ones
//! are reused, ones idle inside a transaction are rolled back first, busy or corrupt ones
//! are cancelled and closed. A server is never handed on in a dirty state.
//!
//! A waiting checkout has no timer of its own: each waiter carries its query_wait_timeout
//! deadline and one task per pool ([`sweep_waiters`], alive while anyone waits) ends the
//! waits that are due. A checkout dropped while it waits (KILL, the drain) gives back a
//! server or slot handed to it in the meantime ([`Ticket`]), and one dropped while it
//! opens a server frees the slot ([`OpeningSlot`]): the pool never counts a server that no
//! one holds.
//!
//! Live control, all under the same mutex: a *paused* pool hands nothing out (checkouts
//! queue as waiters, servers coming back go idle) until resumed; the *generation* is
//! bumped by reconnect/kill, and a server opened before it is closed when it comes back;
//! `set_max_size` / `set_min_size` change the limits, and every close is counted with
//! its [`CloseReason`]. Each open server has a [`ServerEntry`] for the admin listings.

use std::collections::{BTreeMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use dashmap::DashMap;
use pgmux_admin::metrics::PoolHistograms;
use pgmux_admin::Role;
use pgmux_config::{Secret, ServerAddr, TcpSettings};
use tokio::sync::oneshot;

use crate::backend::{send_cancel, BackendError, Credential, ReturnState, Server};
use crate::params::ServerParams;

/// How long a ROLLBACK of an abandoned transaction may take before the server is closed.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {0:?} waiting for a server connection (query_wait_timeout)")]
    WaitTimeout(Duration),
    #[error("timed out after {0:?} waiting for a server connection: max_db_connections reached for this server (query_wait_timeout)")]
    DbLimit(Duration),
    /// Internal: while waiting under max_db_connections one of the pool's own servers
    /// turned idle; checkout takes it (never reaches a client).
    #[error("a server of the pool turned idle")]
    Retry,
    #[error(transparent)]
    Connect(#[from] BackendError),
}

enum Handoff {
    Server(Box<Server>),
    Slot,
    /// The waiter's query_wait_timeout passed (see [`Pool::expire_waiters`]).
    TimedOut,
}

/// Why a server connection was closed (logged, counted, exported as a label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Idle longer than server_idle_timeout.
    IdleTimeout,
    /// Older than server_lifetime.
    Lifetime,
    /// Above a lowered pool_size.
    PoolShrunk,
    /// Came back in an unknown protocol state, or failed under a client.
    ServerError,
    /// Found closed by PostgreSQL while idle (terminated, restarted).
    KilledByServer,
    /// Idle past server_check_delay and did not answer the liveness check in time.
    CheckFailed,
    /// A client left in the middle of a query: cancelled, then closed.
    ClientGone,
    /// The ROLLBACK of an abandoned transaction failed.
    RollbackFailed,
    /// RECONNECT recycled it.
    Reconnect,
    /// A reload changed its pool's server address or password.
    Reload,
    /// KILL closed it.
    Killed,
    /// PAUSE closed it after the pool went quiet.
    Paused,
    /// pgmux is shutting down.
    Shutdown,
    /// Idle, and closed so that another pool could open a server to the same node under
    /// `max_db_connections`.
    DbLimit,
    /// Pinned to a client that made session state on it (`session_state_action = "pin"`);
    /// closed when that client left, so the state reaches no one else.
    SessionState,
    /// A primary's server refused a write as read-only (SQLSTATE 25006): after a failover
    /// the address may lead to a standby or to the old primary back read-only.
    ReadOnly,
}

impl CloseReason {
    pub const ALL: [CloseReason; 16] = [
        CloseReason::IdleTimeout,
        CloseReason::Lifetime,
        CloseReason::PoolShrunk,
        CloseReason::ServerError,
        CloseReason::KilledByServer,
        CloseReason::CheckFailed,
        CloseReason::ClientGone,
        CloseReason::RollbackFailed,
        CloseReason::Reconnect,
        CloseReason::Reload,
        CloseReason::Killed,
        CloseReason::Paused,
        CloseReason::Shutdown,
        CloseReason::DbLimit,
        CloseReason::SessionState,
        CloseReason::ReadOnly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Lifetime => "lifetime",
            CloseReason::PoolShrunk => "pool_shrunk",
            CloseReason::ServerError => "server_error",
            CloseReason::KilledByServer => "killed_by_server",
            CloseReason::CheckFailed => "check_failed",
            CloseReason::ClientGone => "client_gone",
            CloseReason::RollbackFailed => "rollback_failed",
            CloseReason::Reconnect => "reconnect",
            CloseReason::Reload => "reload",
            CloseReason::Killed => "killed",
            CloseReason::Paused => "paused",
            CloseReason::Shutdown => "shutdown",
            CloseReason::DbLimit => "max_db_connections",
            CloseReason::SessionState => "session_state",
            CloseReason::ReadOnly => "read_only",
        }
    }
}

struct Waiter {
    since: Instant,
    /// When query_wait_timeout ends the wait; None: never (a wait too long to add).
    deadline: Option<Instant>,
    tx: oneshot::Sender<Handoff>,
}

struct Inner {
    // Boxed so a server moves between idle list, waiters and guards as one pointer.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<Server>>,
    /// Servers that exist or are being opened (idle + checked out + connecting).
    total: usize,
    waiters: VecDeque<Waiter>,
    /// PAUSE: nothing is handed out; checkouts queue as waiters.
    paused: bool,
    /// A task runs [`Pool::expire_waiters`] (see [`sweep_waiters`]).
    sweeping: bool,
}

/// An open server connection as the admin surface lists it.
#[derive(Debug)]
pub struct ServerEntry {
    pub id: u64,
    pub pid: i32,
    pub opened: Instant,
    /// Unix seconds of `opened`.
    pub opened_unix: u64,
    /// The linked client's id; 0 when idle.
    pub client: AtomicU64,
    /// Microseconds after `opened` of the last link or release.
    pub changed_us: AtomicU64,
    /// Named statements the server held at its last release.
    pub prepared: AtomicUsize,
}

impl ServerEntry {
    /// Marks the server linked to `client` (0: released) at `at`.
    pub fn link(&self, client: u64, at: Instant) {
        self.client.store(client, Ordering::Relaxed);
        self.changed_us.store(
            at.saturating_duration_since(self.opened).as_micros() as u64,
            Ordering::Relaxed,
        );
    }
}

/// Distinct (application_name, feature) pairs counted per pool.
pub const MAX_SESSION_STATE_SOURCES: usize = 64;

/// Counters kept per pool (exposed by the admin surface).
#[derive(Default, Debug)]
pub struct PoolStats {
    pub checkouts: AtomicU64,
    pub transactions: AtomicU64,
    pub wait_us: AtomicU64,
    pub servers_opened: AtomicU64,
    pub servers_closed: AtomicU64,
    pub connect_errors: AtomicU64,
    pub wait_timeouts: AtomicU64,
    /// Units sent again to another server because theirs died before answering.
    pub retried: AtomicU64,
    /// Queries cancelled by query_timeout.
    pub query_timeouts: AtomicU64,
    /// Named statements prepared on a server of this pool (Parse sent, client's or injected).
    pub statements_prepared: AtomicU64,
    /// Client Parse/Bind/Describe of a named statement the server already had.
    pub statement_cache_hits: AtomicU64,
    /// Statements closed to keep a server within max_prepared_statements.
    pub statement_evictions: AtomicU64,
    /// Session-state statements seen (`session_state_action`), by what was done.
    pub session_pins: AtomicU64,
    pub session_state_warned: AtomicU64,
    pub session_state_rejected: AtomicU64,
    /// Servers pinned to a client right now.
    pub pinned: AtomicU64,
    /// Session-state statements by (application_name, feature), at most
    /// [`MAX_SESSION_STATE_SOURCES`] entries (later ones count under `"(other)"`).
    pub session_state_sources: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// ReadyForQuery answers (queries and Syncs).
    pub queries: AtomicU64,
    /// Bytes clients sent to servers / servers sent to clients.
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub xact_us: AtomicU64,
    pub query_us: AtomicU64,
    /// ErrorResponses from servers, by SQLSTATE class (touched only on errors).
    pub errors: Mutex<BTreeMap<[u8; 2], u64>>,
    /// Server closes, indexed like [`CloseReason::ALL`].
    pub closes: [AtomicU64; CloseReason::ALL.len()],
}

impl PoolStats {
    /// Counts `n` session-state statements of kind `f` by a client called `app`.
    pub fn count_session_state(&self, app: &str, f: crate::sessionstate::Feature, n: u64) {
        let mut m = self
            .session_state_sources
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (app.to_owned(), f.as_str());
        let key = if m.contains_key(&key) || m.len() < MAX_SESSION_STATE_SOURCES {
            key
        } else {
            ("(other)".to_owned(), f.as_str())
        };
        *m.entry(key).or_insert(0) += n;
    }
}

pub struct Pool {
    pub database: String,
    pub user: String,
    pub role: Role,
    /// Where and as whom servers log in; a reload may change them (the generation is
    /// bumped so the servers opened with the old ones are replaced).
    addr: ArcSwap<ServerAddr>,
    password: ArcSwapOption<Secret>,
    max_size: AtomicUsize,
    min_size: AtomicUsize,
    /// server_lifetime in milliseconds; 0: never.
    lifetime_ms: AtomicU64,
    /// server_login_retry in milliseconds; 0: a failed connect fails the checkout.
    login_retry_ms: AtomicU64,
    /// server_check_delay in milliseconds.
    check_delay_ms: AtomicU64,
    /// Limits set live for this pool (PATCH /api/v1/pools): (pool_size, min_pool_size).
    /// They win over the configuration until a reload.
    pub overrides: Mutex<(Option<usize>, Option<usize>)>,
    /// Servers opened before the current generation are closed when released.
    generation: AtomicU64,
    /// Connections being opened now.
    connecting: AtomicUsize,
    /// Clients logged in to this pool (primary pools only).
    pub clients: AtomicUsize,
    /// Open server connections, for listings.
    pub servers: DashMap<u64, Arc<ServerEntry>>,
    pub histograms: PoolHistograms,
    /// server_connect_timeout in milliseconds (live).
    connect_timeout_ms: AtomicU64,
    /// Keepalive settings for servers opened from now on (live).
    tcp: ArcSwap<TcpSettings>,
    /// SCRAM passthrough: keys from the last client that authenticated with an auth_file
    /// SCRAM secret; used when the pool has no password.
    scram_keys: ArcSwapOption<crate::auth::ScramKeys>,
    /// Set: the login password is an RDS IAM token (see [`crate::rds_iam`]).
    rds_iam: Option<crate::rds_iam::RdsIamAuth>,
    /// Server connections per node (`max_db_connections`), shared by every pool.
    budgets: Arc<crate::budget::Budgets>,
    inner: Mutex<Inner>,
    /// ParameterStatus values of the first server that logged in: the client login burst.
    startup_params: ArcSwapOption<ServerParams>,
    /// Named prepared statements by text, shared by this pool's clients and servers. Per
    /// pool, because a text valid in one database may not be in another.
    pub statements: crate::prepared::Registry,
    pub stats: PoolStats,
    /// A reload removed the pool's database (or, for a replica pool, its replica): the
    /// pool is out of [`crate::Shared`]'s maps; its clients are told at their next
    /// transaction boundary and its servers close as they come back.
    removed: AtomicBool,
    /// Primary pools: this (database, user)'s replica pools as of the latest
    /// configuration. Sessions read it per transaction, so a reload that changes the
    /// replica list reaches logged-in clients too (through [`Pool::replicas_live`]).
    replicas: Arc<ArcSwapOption<crate::routing::ReplicaSet>>,
}

/// A session's view of its pool's replica set: one atomic load per look while the set is
/// unchanged. It keeps the set it last saw alive until it looks again.
pub type ReplicasLive = arc_swap::Cache<
    Arc<ArcSwapOption<crate::routing::ReplicaSet>>,
    Option<Arc<crate::routing::ReplicaSet>>,
>;

/// A snapshot of a pool's occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    pub idle: usize,
    /// Idle + in use + connecting.
    pub total: usize,
    pub connecting: usize,
    pub waiting: usize,
    /// Longest current wait.
    pub max_wait: Duration,
    pub max: usize,
    pub min: usize,
    pub paused: bool,
}

/// What creating a pool needs besides its identity.
pub struct PoolSettings {
    pub max_size: usize,
    pub min_size: usize,
    pub lifetime: Duration,
    pub login_retry: Duration,
    pub connect_timeout: Duration,
    /// server_check_delay: an idle server unused this long is pinged before use.
    pub check_delay: Duration,
    pub histograms: PoolHistograms,
    pub paused: bool,
    /// Keepalive and user timeout of the servers this pool opens.
    pub tcp: TcpSettings,
    /// `server_auth = "rds_iam"`: log in with an RDS IAM token instead of the password.
    pub rds_iam: Option<crate::rds_iam::RdsIamAuth>,
    /// Server connections per node, shared by every pool.
    pub budgets: Arc<crate::budget::Budgets>,
}

impl Pool {
    pub fn new(
        database: String,
        user: String,
        role: Role,
        addr: ServerAddr,
        password: Option<Secret>,
        settings: PoolSettings,
    ) -> Arc<Pool> {
        let max = settings.max_size.max(1);
        let budgets = settings.budgets.clone();
        let pool = Arc::new(Pool {
            database,
            user,
            role,
            addr: ArcSwap::from_pointee(addr),
            password: ArcSwapOption::new(password.map(Arc::new)),
            max_size: AtomicUsize::new(max),
            min_size: AtomicUsize::new(settings.min_size.min(max)),
            lifetime_ms: AtomicU64::new(settings.lifetime.as_millis() as u64),
            login_retry_ms: AtomicU64::new(settings.login_retry.as_millis() as u64),
            check_delay_ms: AtomicU64::new(settings.check_delay.as_millis() as u64),
            overrides: Mutex::new((None, None)),
            generation: AtomicU64::new(0),
            connecting: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            servers: DashMap::new(),
            histograms: settings.histograms,
            connect_timeout_ms: AtomicU64::new(settings.connect_timeout.as_millis() as u64),
            tcp: ArcSwap::from_pointee(settings.tcp),
            scram_keys: ArcSwapOption::empty(),
            rds_iam: settings.rds_iam,
            budgets: settings.budgets,
            inner: Mutex::new(Inner {
                idle: Vec::new(),
                total: 0,
                waiters: VecDeque::new(),
                paused: settings.paused,
                sweeping: false,
            }),
            startup_params: ArcSwapOption::empty(),
            statements: crate::prepared::Registry::default(),
            stats: PoolStats::default(),
            removed: AtomicBool::new(false),
            replicas: Arc::new(ArcSwapOption::empty()),
        });
        budgets.register(&pool);
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The critical sections cannot panic half-way; recover the data if one ever did.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counts(&self) -> PoolCounts {
        let g = self.lock();
        let live = g.waiters.iter().filter(|w| !w.tx.is_closed());
        let now = Instant::now();
        let (waiting, max_wait) = live.fold((0, Duration::ZERO), |(n, m), w| {
            (n + 1, m.max(now.saturating_duration_since(w.since)))
        });
        PoolCounts {
            idle: g.idle.len(),
            total: g.total,
            connecting: self.connecting.load(Ordering::Relaxed),
            waiting,
            max_wait,
            max: self.max_size.load(Ordering::Relaxed),
            min: self.min_size.load(Ordering::Relaxed),
            paused: g.paused,
        }
    }

    pub fn addr(&self) -> Arc<ServerAddr> {
        self.addr.load_full()
    }

    /// A reload changed the server address or the password: servers opened with the old
    /// ones are closed (idle ones now, busy ones when their transaction ends) and new ones
    /// log in with the new. Returns whether anything changed.
    pub fn update_target(&self, addr: &ServerAddr, password: Option<&Secret>) -> bool {
        let same_addr = *self.addr.load_full() == *addr;
        let same_password = self.password.load_full().as_deref() == password;
        if same_addr && same_password {
            return false;
        }
        self.addr.store(Arc::new(addr.clone()));
        self.password.store(password.cloned().map(Arc::new));
        self.reconnect(CloseReason::Reload);
        true
    }

    /// The password servers log in with now.
    pub fn password(&self) -> Option<Arc<Secret>> {
        self.password.load_full()
    }

    /// A reload removed what this pool serves: idle servers close now, busy ones when
    /// their transaction ends (close reason `reload`), and nothing new is kept idle.
    /// The caller has taken the pool out of the shared maps already.
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::SeqCst);
        self.replicas.store(None);
        self.reconnect(CloseReason::Reload);
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// This (database, user)'s replica pools now (primary pools; see the field).
    pub fn replicas(&self) -> Option<Arc<crate::routing::ReplicaSet>> {
        self.replicas.load_full()
    }

    /// [`Pool::replicas`] for a session that looks at every transaction.
    pub fn replicas_live(&self) -> ReplicasLive {
        arc_swap::Cache::new(self.replicas.clone())
    }

    pub fn set_replicas(&self, set: Option<Arc<crate::routing::ReplicaSet>>) {
        self.replicas.store(set);
    }

    /// Server parameters for a client's login burst, if a server has logged in already.
    pub fn startup_params(&self) -> Option<Arc<ServerParams>> {
        self.startup_params.load_full()
    }

    /// Waits up to `wait` for a server: an idle one, a new one (below the limit), or the
    /// next one released, in FIFO order with other waiters.
    pub async fn checkout(self: &Arc<Self>, wait: Duration) -> Result<PooledServer, PoolError> {
        // The clock is read only once the checkout has to wait (or open a server): an
        // idle server taken at once counts as no wait.
        let mut began: Option<Instant> = None;
        let mut start = || *began.get_or_insert_with(Instant::now);
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        loop {
            enum Next {
                Ready(Box<Server>),
                Connect,
                Wait((oneshot::Receiver<Handoff>, bool)),
            }
            let next = {
                let mut g = self.lock();
                if g.paused {
                    Next::Wait(Self::enqueue(&mut g, start(), wait))
                } else if let Some(s) = g.idle.pop() {
                    Next::Ready(s)
                } else if g.total < self.max_size.load(Ordering::Relaxed) {
                    g.total += 1;
                    Next::Connect
                } else {
                    Next::Wait(Self::enqueue(&mut g, start(), wait))
                }
            };
            let handoff = match next {
                Next::Ready(s) => Handoff::Server(s),
                Next::Connect => Handoff::Slot,
                Next::Wait((rx, spawn_sweeper)) => {
                    if spawn_sweeper {
                        tokio::spawn(sweep_waiters(Arc::downgrade(self)));
                    }
                    let mut ticket = Ticket { pool: self, rx };
                    match (&mut ticket.rx).await {
                        Ok(Handoff::TimedOut) => {
                            self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                            return Err(PoolError::WaitTimeout(wait));
                        }
                        Ok(h) => h,
                        // Not sent to (the pool let go of its waiters): ask again.
                        Err(_) => continue,
                    }
                }
            };
            match handoff {
                Handoff::Server(mut s) => {
                    if s.closed_by_peer() {
                        tracing::debug!(pool = %self.user, server = s.id, "idle server was closed by the peer; replacing it");
                        self.close(s, CloseReason::KilledByServer);
                        continue;
                    }
                    // Boxed: only a server idle past the delay pays for the future.
                    let mut taken = Instant::now();
                    if self.needs_check(&s, taken) {
                        start();
                        if !Box::pin(self.passes_check(&mut s)).await {
                            self.close(s, CloseReason::CheckFailed);
                            continue;
                        }
                        // The client's transaction starts after the check's round trip.
                        taken = Instant::now();
                    }
                    self.record_wait(began);
                    return Ok(PooledServer::new(self.clone(), s, taken));
                }
                Handoff::Slot => {
                    // Boxed: connect + login is a large future, needed only when a
                    // connection is opened; inline it would size every waiting (and so
                    // every idle) client's task for it.
                    // The server boxed at once: a `Result<Server, _>` alive across the
                    // retry sleep below would add its ~540 bytes to this future.
                    let deadline = tokio::time::Instant::from_std(start()) + wait;
                    let opened = Box::pin(self.open(Some((deadline, wait))))
                        .await
                        .map(Box::new);
                    match opened {
                        Ok(s) => {
                            self.record_wait(began);
                            return Ok(PooledServer::new(self.clone(), s, Instant::now()));
                        }
                        Err(PoolError::Retry) => continue,
                        Err(PoolError::Connect(e)) if e.is_transient() => {
                            // The server is down or restarting: wait and try again, as
                            // long as this client may wait (server_login_retry).
                            let retry =
                                Duration::from_millis(self.login_retry_ms.load(Ordering::Relaxed));
                            let now = tokio::time::Instant::now();
                            if retry.is_zero() || now + retry >= deadline {
                                return Err(PoolError::Connect(e));
                            }
                            tracing::warn!(db = %self.database, user = %self.user, error = %e, retry_in = ?retry, "server unavailable; retrying");
                            tokio::time::sleep(retry).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Handoff::TimedOut => unreachable!("only a waiter is timed out"),
            }
        }
    }

    /// Queues a checkout that began at `since` and may wait `wait`. Also whether the
    /// caller must start the sweeper ([`sweep_waiters`]): none is running.
    fn enqueue(
        g: &mut Inner,
        since: Instant,
        wait: Duration,
    ) -> (oneshot::Receiver<Handoff>, bool) {
        let (tx, rx) = oneshot::channel();
        g.waiters.push_back(Waiter {
            since,
            deadline: since.checked_add(wait),
            tx,
        });
        let spawn = !std::mem::replace(&mut g.sweeping, true);
        (rx, spawn)
    }

    /// Ends the waits whose query_wait_timeout has passed at `now` (they get
    /// [`Handoff::TimedOut`]) and drops waiters that gave up. Returns when to look again:
    /// the earliest deadline still ahead, at most [`SWEEP_INTERVAL`] away (waiters that
    /// give up are noticed no later). None when no one waits any more: then the sweeper
    /// stops (the next waiter starts another).
    fn expire_waiters(&self, now: Instant) -> Option<Instant> {
        let mut g = self.lock();
        let due = |w: &Waiter| w.tx.is_closed() || w.deadline.is_some_and(|d| d <= now);
        if g.waiters.iter().any(due) {
            for w in std::mem::take(&mut g.waiters) {
                if !due(&w) {
                    g.waiters.push_back(w);
                } else if !w.tx.is_closed() {
                    let _ = w.tx.send(Handoff::TimedOut);
                }
            }
        }
        if g.waiters.is_empty() {
            g.sweeping = false;
            return None;
        }
        let latest = now + SWEEP_INTERVAL;
        Some(
            g.waiters
                .iter()
                .filter_map(|w| w.deadline)
                .fold(latest, Instant::min),
        )
    }

    /// Counts a checkout's wait; `start` None: it did not wait.
    fn record_wait(&self, start: Option<Instant>) {
        let waited = start.map_or(Duration::ZERO, |s| s.elapsed());
        self.stats
            .wait_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        self.histograms.wait.record(waited);
    }

    /// Opens a server with a slot already counted in `total`. At the node's
    /// `max_db_connections` it waits for a permit until `wait`'s deadline (None: it
    /// does not wait).
    async fn open(
        self: &Arc<Self>,
        wait: Option<(tokio::time::Instant, Duration)>,
    ) -> Result<Server, PoolError> {
        use crate::budget::Acquired;
        // Freed on every way out but success, a dropped future included.
        let mut slot = OpeningSlot {
            pool: self,
            connecting: false,
            kept: false,
        };
        let addr = self.addr.load_full();
        let acquired = match self.budgets.try_acquire(&addr) {
            Some(p) => Acquired::Permit(p),
            None => match wait {
                Some((deadline, _)) => self.budgets.acquire(&addr, self, deadline).await,
                None => Acquired::TimedOut,
            },
        };
        let permit = match acquired {
            Acquired::Permit(p) => p,
            Acquired::OwnIdle => return Err(PoolError::Retry),
            Acquired::TimedOut => {
                if wait.is_some() {
                    self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                return Err(PoolError::DbLimit(wait.map(|(_, w)| w).unwrap_or_default()));
            }
        };
        let generation = self.generation.load(Ordering::Relaxed);
        self.connecting.fetch_add(1, Ordering::Relaxed);
        slot.connecting = true;
        let r = async {
            let password = match &self.rds_iam {
                // A token for this server and user (cached for 10 minutes).
                Some(iam) => Some(Arc::new(iam.password(&addr, &self.user).await?)),
                None => self.password.load_full(),
            };
            let keys = self.scram_keys.load_full();
            let cred = match (password.as_deref(), keys.as_deref()) {
                (Some(p), _) => Credential::Password(p),
                (None, Some(k)) => Credential::Keys(k),
                (None, None) => Credential::None,
            };
            Server::connect_as(
                &addr,
                &self.user,
                cred,
                self.connect_timeout(),
                &self.tcp.load(),
            )
            .await
        }
        .await;
        self.connecting.fetch_sub(1, Ordering::Relaxed);
        slot.connecting = false;
        match r {
            Ok(mut s) => {
                s.generation = generation;
                s.budget = Some(permit);
                if self.budgets.needs_capacity(&addr) {
                    // total_server_connections = "auto": learn the node's capacity.
                    let sql = "SELECT current_setting('max_connections')::int \
                               - current_setting('superuser_reserved_connections')::int";
                    match s.first_row(sql).await {
                        Ok(Ok(row)) => {
                            if let Some(n) = row
                                .first()
                                .and_then(|v| v.as_deref())
                                .and_then(|v| v.parse::<usize>().ok())
                            {
                                self.budgets.set_capacity(&addr, n);
                            }
                        }
                        Ok(Err(e)) => {
                            // No automatic budget for this node then (a fixed one still
                            // applies), rather than one connection for ever.
                            tracing::warn!(db = %self.database, error = %e, "cannot read max_connections for total_server_connections = \"auto\"; no automatic budget for this server");
                            self.budgets.set_capacity(&addr, usize::MAX / 2);
                        }
                        Err(e) => {
                            self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                            drop(s);
                            return Err(PoolError::Connect(BackendError::Protocol {
                                addr: crate::backend::display_addr(&addr),
                                source: e,
                            }));
                        }
                    }
                }
                self.stats.servers_opened.fetch_add(1, Ordering::Relaxed);
                let opened = Instant::now();
                let entry = Arc::new(ServerEntry {
                    id: s.id,
                    pid: s.cancel.pid,
                    opened,
                    opened_unix: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    client: AtomicU64::new(0),
                    changed_us: AtomicU64::new(0),
                    prepared: AtomicUsize::new(0),
                });
                self.servers.insert(s.id, entry.clone());
                s.entry = Some(entry);
                if self.startup_params.load().is_none() {
                    self.startup_params.store(Some(Arc::new(s.params.clone())));
                }
                tracing::debug!(db = %self.database, user = %self.user, server = s.id, pid = s.cancel.pid, "server connection opened");
                slot.kept = true;
                Ok(s)
            }
            Err(e) => {
                self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    /// A server's slot became free: hand it to the first live waiter or shrink.
    fn release_slot(&self) {
        let mut g = self.lock();
        if !g.paused && g.total <= self.max_size.load(Ordering::Relaxed) {
            while let Some(w) = g.waiters.pop_front() {
                if w.tx.send(Handoff::Slot).is_ok() {
                    return;
                }
            }
        }
        g.total -= 1;
    }

    /// Whether `server` has outlived server_lifetime. Each server gets its own limit,
    /// up to 10% shorter (from its id), so servers opened together are not all closed
    /// together.
    fn too_old(&self, server: &Server, now: Instant) -> bool {
        let ms = self.lifetime_ms.load(Ordering::Relaxed);
        if ms == 0 {
            return false;
        }
        // 0..=1023 from the id; the limit is shorter by spread/10240 of it (integer math:
        // this runs at every check-in).
        let spread = server.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54;
        let limit = ms - ms.saturating_mul(spread) / 10240;
        now.saturating_duration_since(server.created) >= Duration::from_millis(limit)
    }

    pub fn set_login_retry(&self, retry: Duration) {
        self.login_retry_ms
            .store(retry.as_millis() as u64, Ordering::Relaxed);
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed))
    }

    /// server_connect_timeout and the TCP settings, for servers opened from now on.
    pub fn set_connect_settings(&self, timeout: Duration, tcp: &TcpSettings) {
        self.connect_timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
        if **self.tcp.load() != *tcp {
            self.tcp.store(Arc::new(tcp.clone()));
        }
    }

    pub fn set_scram_keys(&self, keys: Arc<crate::auth::ScramKeys>) {
        self.scram_keys.store(Some(keys));
    }

    /// auth_query: the plain password or md5 hash found for a user pgmux has no
    /// configured secret for; None for a SCRAM verifier (its servers log in with the
    /// keys of [`Pool::set_scram_keys`]). Servers opened from now on use it; open ones
    /// stay (unlike [`Pool::update_target`], nothing is recycled). A reload keeps it, as
    /// it keeps the password of a user no longer configured.
    pub fn set_looked_up_password(&self, secret: Option<&Secret>) {
        if self.password.load().as_deref() != secret {
            self.password.store(secret.cloned().map(Arc::new));
        }
    }

    pub fn set_check_delay(&self, delay: Duration) {
        self.check_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// server_check_delay: a server idle at least that long answers a Sync before a client
    /// gets it (the socket check above cannot see a peer that vanished without a word:
    /// a failover, a network cut). False: close it and take another.
    fn needs_check(&self, server: &Server, now: Instant) -> bool {
        let delay = Duration::from_millis(self.check_delay_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(server.last_used) >= delay
    }

    async fn passes_check(&self, server: &mut Server) -> bool {
        let ok = matches!(
            tokio::time::timeout(self.connect_timeout(), server.ping()).await,
            Ok(Ok(()))
        );
        if !ok {
            tracing::info!(db = %self.database, user = %self.user, server = server.id, "idle server failed its liveness check; replacing it");
        }
        ok
    }

    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lifetime_ms
            .store(lifetime.as_millis() as u64, Ordering::Relaxed);
    }

    /// Returns a clean server: to the first live waiter, else onto the idle stack.
    fn checkin(&self, mut server: Box<Server>) {
        if server.session_state {
            // Its session state (settings, temp tables, LISTEN, locks) must not reach the
            // next client: closed politely, the slot freed at once.
            self.count_close(&server, CloseReason::SessionState);
            self.release_slot();
            spawn_or_drop(server.terminate());
            return;
        }
        if self.is_removed() {
            self.close(server, CloseReason::Reload);
            return;
        }
        if server.refused_write && self.role == Role::Primary {
            // Reused, it would refuse every write until server_lifetime; a new login goes
            // wherever the address leads now (the promoted node, once DNS has moved).
            tracing::warn!(db = %self.database, user = %self.user, server = server.id, "a server refused a write as read-only (25006); closing it rather than reusing it: after a failover the address may still lead to a standby");
            self.close(server, CloseReason::ReadOnly);
            return;
        }
        if server.generation < self.generation.load(Ordering::Relaxed) {
            self.close(server, CloseReason::Reconnect);
            return;
        }
        let now = server.released_at.take().unwrap_or_else(Instant::now);
        if self.too_old(&server, now) {
            self.close(server, CloseReason::Lifetime);
            return;
        }
        server.last_used = now;
        let mut g = self.lock();
        if g.total > self.max_size.load(Ordering::Relaxed) {
            g.total -= 1;
            drop(g);
            self.retire(server, CloseReason::PoolShrunk);
            return;
        }
        if !g.paused {
            while let Some(w) = g.waiters.pop_front() {
                match w.tx.send(Handoff::Server(server)) {
                    Ok(()) => return,
                    Err(Handoff::Server(s)) => server = s,
                    Err(_) => unreachable!("we sent a server"),
                }
            }
        }
        g.idle.push(server);
        drop(g);
        // A pool waiting for a permit on this node may close it.
        self.budgets.idle_available(self);
    }

    /// Whether an idle server is waiting in this pool.
    pub fn has_idle(&self) -> bool {
        !self.lock().idle.is_empty()
    }

    /// Closes this pool's least recently used idle server so that another pool can open
    /// one to the same node (`max_db_connections`). True if there was one.
    pub fn evict_one_idle(&self) -> bool {
        let mut g = self.lock();
        if g.idle.is_empty() {
            return false;
        }
        // The idle list is a stack: the bottom is the longest unused.
        let s = g.idle.remove(0);
        g.total -= 1;
        drop(g);
        self.retire(s, CloseReason::DbLimit);
        true
    }

    /// Forgets a server whose slot is already accounted for and closes it politely
    /// (Terminate) in the background.
    fn retire(&self, server: Box<Server>, reason: CloseReason) {
        self.count_close(&server, reason);
        spawn_or_drop(server.terminate());
    }

    fn count_close(&self, server: &Server, reason: CloseReason) {
        self.servers.remove(&server.id);
        self.stats.servers_closed.fetch_add(1, Ordering::Relaxed);
        self.stats.closes[reason as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(db = %self.database, user = %self.user, server = server.id, reason = reason.as_str(), "server connection closed");
    }

    /// Closes a server now (no Terminate: its state is unknown) and frees its slot.
    fn close(&self, server: Box<Server>, reason: CloseReason) {
        self.count_close(&server, reason);
        drop(server);
        self.release_slot();
    }

    /// Takes a server back from a client, whatever state it is in.
    fn give_back(self: &Arc<Self>, server: Box<Server>) {
        match server.state() {
            ReturnState::Clean => self.checkin(server),
            ReturnState::Broken if server.peer_closed => {
                self.close(server, CloseReason::KilledByServer)
            }
            ReturnState::Broken => self.close(server, CloseReason::ServerError),
            ReturnState::NeedsRollback => {
                let pool = self.clone();
                spawn_or_drop(async move {
                    let mut server = server;
                    let ok = matches!(
                        tokio::time::timeout(ROLLBACK_TIMEOUT, server.simple_query("ROLLBACK"))
                            .await,
                        Ok(Ok(None))
                    ) && server.state() == ReturnState::Clean;
                    if ok {
                        pool.checkin(server);
                    } else {
                        pool.close(server, CloseReason::RollbackFailed);
                    }
                });
            }
            ReturnState::Busy => {
                // A request is still running (the client vanished mid-query): stop it so
                // its locks go away now, then close the connection.
                let pool = self.clone();
                spawn_or_drop(async move {
                    let _ = send_cancel(&server.cancel, Duration::from_secs(5)).await;
                    pool.close(server, CloseReason::ClientGone);
                });
            }
        }
    }

    /// Sets the live limit. Growing lets waiters in; shrinking closes surplus idle servers
    /// now and busy ones as they come back (never mid-transaction).
    pub fn set_max_size(&self, n: usize) {
        let n = n.max(1);
        self.max_size.store(n, Ordering::Relaxed);
        if self.min_size.load(Ordering::Relaxed) > n {
            self.min_size.store(n, Ordering::Relaxed);
        }
        let mut surplus = Vec::new();
        let mut g = self.lock();
        while g.total > n {
            match g.idle.pop() {
                Some(s) => {
                    g.total -= 1;
                    surplus.push(s);
                }
                None => break,
            }
        }
        self.dispatch(&mut g);
        drop(g);
        for s in surplus {
            self.retire(s, CloseReason::PoolShrunk);
        }
    }

    /// Sets the number of servers kept open when idle (at most the pool size); the
    /// maintenance task opens the missing ones.
    pub fn set_min_size(&self, n: usize) {
        self.min_size.store(
            n.min(self.max_size.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
    }

    /// Hands idle servers and free slots to waiters (after a resume or a larger limit).
    fn dispatch(&self, g: &mut Inner) {
        if g.paused {
            return;
        }
        let max = self.max_size.load(Ordering::Relaxed);
        while !g.waiters.is_empty() {
            if let Some(s) = g.idle.pop() {
                let w = g.waiters.pop_front().expect("not empty");
                if let Err(Handoff::Server(s)) = w.tx.send(Handoff::Server(s)) {
                    g.idle.push(s);
                }
            } else if g.total < max {
                let w = g.waiters.pop_front().expect("not empty");
                if w.tx.send(Handoff::Slot).is_ok() {
                    g.total += 1;
                }
            } else {
                break;
            }
        }
    }

    /// PAUSE: new checkouts wait; running transactions go on.
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    /// RESUME: waiting checkouts go on.
    pub fn resume(&self) {
        let mut g = self.lock();
        g.paused = false;
        self.dispatch(&mut g);
    }

    /// Servers checked out (or being opened) now.
    pub fn in_use(&self) -> usize {
        let g = self.lock();
        g.total - g.idle.len()
    }

    /// Recycles every server: idle ones now, busy ones when released.
    pub fn reconnect(&self, reason: CloseReason) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.close_idle_for(reason);
    }

    /// Closes idle servers unused for longer than `idle_timeout` (0: never), keeping
    /// min_pool_size, and idle servers older than server_lifetime.
    pub fn reap_idle(&self, idle_timeout: Duration) -> usize {
        let now = Instant::now();
        let keep_min = self.min_size.load(Ordering::Relaxed);
        let mut g = self.lock();
        let mut old = Vec::new();
        // The idle stack is LIFO: the oldest are at the bottom.
        let mut i = 0;
        while i < g.idle.len() {
            let idle_long = !idle_timeout.is_zero()
                && now.duration_since(g.idle[i].last_used) >= idle_timeout
                && g.total - old.len() > keep_min;
            if idle_long {
                old.push((g.idle.remove(i), CloseReason::IdleTimeout));
            } else if g.idle[i].closed_by_peer() {
                // Terminated from outside while idle (pg_terminate_backend, a restart):
                // replaced by fill_to_min when min_pool_size wants it.
                old.push((g.idle.remove(i), CloseReason::KilledByServer));
            } else if self.too_old(&g.idle[i], now) {
                // Replaced by fill_to_min when min_pool_size wants it.
                old.push((g.idle.remove(i), CloseReason::Lifetime));
            } else {
                i += 1;
            }
        }
        g.total -= old.len();
        drop(g);
        let n = old.len();
        for (s, reason) in old {
            if reason == CloseReason::KilledByServer {
                self.count_close(&s, reason); // nobody left to say goodbye to
            } else {
                self.retire(s, reason);
            }
        }
        n
    }

    /// Closes every idle server.
    pub fn close_idle_for(&self, reason: CloseReason) {
        let mut g = self.lock();
        let idle = std::mem::take(&mut g.idle);
        g.total -= idle.len();
        drop(g);
        for s in idle {
            self.retire(s, reason);
        }
    }

    /// Closes every idle server (shutdown).
    pub fn close_idle(&self) {
        self.close_idle_for(CloseReason::Shutdown);
    }

    /// Opens servers up to min_pool_size (maintenance). Not while paused.
    pub fn fill_to_min(self: &Arc<Self>) {
        let min = self.min_size.load(Ordering::Relaxed);
        let mut g = self.lock();
        if g.paused {
            return;
        }
        let mut n = 0;
        while g.total < min {
            g.total += 1;
            n += 1;
        }
        drop(g);
        for _ in 0..n {
            let pool = self.clone();
            spawn_or_drop(async move {
                match pool.open(None).await {
                    Ok(s) => pool.checkin(Box::new(s)),
                    Err(e) => {
                        tracing::warn!(db = %pool.database, user = %pool.user, error = %e, "could not open a server for min_pool_size")
                    }
                }
            });
        }
    }
}

/// A waiting checkout's end of its hand-over. If the checkout is dropped (KILL, the
/// drain, a removed database) after a server or a slot was handed to it but before it
/// looked, they go back to the pool: otherwise the pool would count a server that no one
/// holds, for ever.
struct Ticket<'a> {
    pool: &'a Pool,
    rx: oneshot::Receiver<Handoff>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Handoff::Server(s)) => self.pool.checkin(s),
            Ok(Handoff::Slot) => self.pool.release_slot(),
            Ok(Handoff::TimedOut) | Err(_) => {}
        }
    }
}

/// A slot counted in the pool's total while a server is opened for it: freed (to the
/// next waiter, or the pool shrinks) unless the opening succeeds, also when the opening
/// future is dropped half-way.
struct OpeningSlot<'a> {
    pool: &'a Pool,
    /// Counted in `connecting`.
    connecting: bool,
    kept: bool,
}

impl Drop for OpeningSlot<'_> {
    fn drop(&mut self) {
        if self.connecting {
            self.pool.connecting.fetch_sub(1, Ordering::Relaxed);
        }
        if !self.kept {
            self.pool.release_slot();
        }
    }
}

/// The longest a waiter sweeper sleeps: a live change to a shorter query_wait_timeout
/// takes effect at most this late for the waits it starts.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Enforces query_wait_timeout for a pool's waiters while there are any, so a waiting
/// checkout needs no timer of its own (a tokio timer's registration and removal cost
/// more than the rest of a contended checkout). One per pool at a time; it ends when
/// the pool has no waiters or is gone.
async fn sweep_waiters(pool: std::sync::Weak<Pool>) {
    loop {
        let now = Instant::now();
        let Some(next) = pool.upgrade().and_then(|p| p.expire_waiters(now)) else {
            return;
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
    }
}

fn spawn_or_drop<F: std::future::Future<Output = ()> + Send + 'static>(f: F) {
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(f);
    }
}

/// A checked-out server. Dropping it gives the server back to its pool, which decides from
/// the server's protocol state whether to reuse, roll back or close it.
pub struct PooledServer {
    pool: Arc<Pool>,
    server: Option<Box<Server>>,
}

impl PooledServer {
    /// `taken`: when the client got it ([`Server::taken_at`]).
    fn new(pool: Arc<Pool>, mut server: Box<Server>, taken: Instant) -> Self {
        server.taken_at = taken;
        PooledServer {
            pool,
            server: Some(server),
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Deref for PooledServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        self.server.as_ref().expect("present until drop")
    }
}

impl DerefMut for PooledServer {
    fn deref_mut(&mut self) -> &mut Server {
        self.server.as_mut().expect("present until drop")
    }
}

impl Drop for PooledServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.pool.give_back(s);
        }
    }
}
