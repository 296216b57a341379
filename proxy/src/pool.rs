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

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use pgmux_config::{Secret, ServerAddr};
use tokio::sync::oneshot;

use crate::backend::{send_cancel, BackendError, ReturnState, Server};
use crate::params::ServerParams;

/// How long a ROLLBACK of an abandoned transaction may take before the server is closed.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {0:?} waiting for a server connection (query_wait_timeout)")]
    WaitTimeout(Duration),
    #[error(transparent)]
    Connect(#[from] BackendError),
}

enum Handoff {
    Server(Box<Server>),
    Slot,
}

struct Inner {
    // Boxed so a server moves between idle list, waiters and guards as one pointer.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<Server>>,
    /// Servers that exist or are being opened (idle + checked out + connecting).
    total: usize,
    waiters: VecDeque<oneshot::Sender<Handoff>>,
}

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
    /// Named statements prepared on a server of this pool (Parse sent, client's or injected).
    pub statements_prepared: AtomicU64,
    /// Client Parse/Bind/Describe of a named statement the server already had.
    pub statement_cache_hits: AtomicU64,
    /// Statements closed to keep a server within max_prepared_statements.
    pub statement_evictions: AtomicU64,
}

pub struct Pool {
    pub database: String,
    pub user: String,
    addr: Arc<ServerAddr>,
    password: Option<Secret>,
    max_size: AtomicUsize,
    connect_timeout: Duration,
    inner: Mutex<Inner>,
    /// ParameterStatus values of the first server that logged in: the client login burst.
    startup_params: ArcSwapOption<ServerParams>,
    /// Named prepared statements by text, shared by this pool's clients and servers. Per
    /// pool, because a text valid in one database may not be in another.
    pub statements: crate::prepared::Registry,
    pub stats: PoolStats,
}

/// A snapshot of a pool's occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    pub idle: usize,
    pub total: usize,
    pub waiting: usize,
    pub max: usize,
}

impl Pool {
    pub fn new(
        database: String,
        user: String,
        addr: ServerAddr,
        password: Option<Secret>,
        max_size: usize,
        connect_timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            database,
            user,
            addr: Arc::new(addr),
            password,
            max_size: AtomicUsize::new(max_size.max(1)),
            connect_timeout,
            inner: Mutex::new(Inner {
                idle: Vec::new(),
                total: 0,
                waiters: VecDeque::new(),
            }),
            startup_params: ArcSwapOption::empty(),
            statements: crate::prepared::Registry::default(),
            stats: PoolStats::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The critical sections cannot panic half-way; recover the data if one ever did.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counts(&self) -> PoolCounts {
        let g = self.lock();
        PoolCounts {
            idle: g.idle.len(),
            total: g.total,
            waiting: g.waiters.iter().filter(|w| !w.is_closed()).count(),
            max: self.max_size.load(Ordering::Relaxed),
        }
    }

    pub fn addr(&self) -> &Arc<ServerAddr> {
        &self.addr
    }

    /// Server parameters for a client's login burst, if a server has logged in already.
    pub fn startup_params(&self) -> Option<Arc<ServerParams>> {
        self.startup_params.load_full()
    }

    /// Waits up to `wait` for a server: an idle one, a new one (below the limit), or the
    /// next one released, in FIFO order with other waiters.
    pub async fn checkout(self: &Arc<Self>, wait: Duration) -> Result<PooledServer, PoolError> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + wait;
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        loop {
            enum Next {
                Ready(Box<Server>),
                Connect,
                Wait(oneshot::Receiver<Handoff>),
            }
            let next = {
                let mut g = self.lock();
                if let Some(s) = g.idle.pop() {
                    Next::Ready(s)
                } else if g.total < self.max_size.load(Ordering::Relaxed) {
                    g.total += 1;
                    Next::Connect
                } else {
                    let (tx, rx) = oneshot::channel();
                    g.waiters.push_back(tx);
                    Next::Wait(rx)
                }
            };
            let handoff = match next {
                Next::Ready(s) => Handoff::Server(s),
                Next::Connect => Handoff::Slot,
                Next::Wait(mut rx) => match tokio::time::timeout_at(deadline, &mut rx).await {
                    Ok(Ok(h)) => h,
                    Ok(Err(_)) => continue,
                    Err(_) => {
                        // Something may have been handed over just as the wait ran out.
                        rx.close();
                        match rx.try_recv() {
                            Ok(h) => h,
                            Err(_) => {
                                self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                                return Err(PoolError::WaitTimeout(wait));
                            }
                        }
                    }
                },
            };
            match handoff {
                Handoff::Server(s) => {
                    if s.stream.looks_dead() || !s.buf.is_empty() {
                        tracing::debug!(pool = %self.user, server = s.id, "idle server was closed by the peer; replacing it");
                        self.close(s);
                        continue;
                    }
                    self.record_wait(start);
                    return Ok(PooledServer::new(self.clone(), s));
                }
                Handoff::Slot => {
                    let s = Box::new(self.open().await?);
                    self.record_wait(start);
                    return Ok(PooledServer::new(self.clone(), s));
                }
            }
        }
    }

    fn record_wait(&self, start: Instant) {
        self.stats
            .wait_us
            .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Opens a server with a slot already counted in `total`.
    async fn open(self: &Arc<Self>) -> Result<Server, PoolError> {
        match Server::connect(
            &self.addr,
            &self.user,
            self.password.as_ref(),
            self.connect_timeout,
        )
        .await
        {
            Ok(s) => {
                self.stats.servers_opened.fetch_add(1, Ordering::Relaxed);
                if self.startup_params.load().is_none() {
                    self.startup_params.store(Some(Arc::new(s.params.clone())));
                }
                tracing::debug!(db = %self.database, user = %self.user, server = s.id, pid = s.cancel.pid, "server connection opened");
                Ok(s)
            }
            Err(e) => {
                self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                self.release_slot();
                Err(e.into())
            }
        }
    }

    /// A server's slot became free: hand it to the first live waiter or shrink.
    fn release_slot(&self) {
        let mut g = self.lock();
        while let Some(w) = g.waiters.pop_front() {
            if w.send(Handoff::Slot).is_ok() {
                return;
            }
        }
        g.total -= 1;
    }

    /// Returns a clean server: to the first live waiter, else onto the idle stack.
    fn checkin(&self, mut server: Box<Server>) {
        server.last_used = Instant::now();
        let mut g = self.lock();
        while let Some(w) = g.waiters.pop_front() {
            match w.send(Handoff::Server(server)) {
                Ok(()) => return,
                Err(Handoff::Server(s)) => server = s,
                Err(Handoff::Slot) => unreachable!("we sent a server"),
            }
        }
        if g.total > self.max_size.load(Ordering::Relaxed) {
            g.total -= 1;
            drop(g);
            self.stats.servers_closed.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(server.terminate());
            return;
        }
        g.idle.push(server);
    }

    /// Closes a server now and frees its slot.
    fn close(&self, server: Box<Server>) {
        self.stats.servers_closed.fetch_add(1, Ordering::Relaxed);
        drop(server);
        self.release_slot();
    }

    /// Takes a server back from a client, whatever state it is in.
    fn give_back(self: &Arc<Self>, server: Box<Server>) {
        match server.state() {
            ReturnState::Clean => self.checkin(server),
            ReturnState::Broken => self.close(server),
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
                        pool.close(server);
                    }
                });
            }
            ReturnState::Busy => {
                // A request is still running (the client vanished mid-query): stop it so
                // its locks go away now, then close the connection.
                let pool = self.clone();
                spawn_or_drop(async move {
                    let _ = send_cancel(&server.cancel, Duration::from_secs(5)).await;
                    pool.close(server);
                });
            }
        }
    }

    /// Sets the live limit. Growing lets waiters in; shrinking closes surplus idle servers
    /// now and busy ones as they come back.
    pub fn set_max_size(&self, n: usize) {
        let n = n.max(1);
        self.max_size.store(n, Ordering::Relaxed);
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
        while g.total < n {
            match g.waiters.pop_front() {
                Some(w) => {
                    if w.send(Handoff::Slot).is_ok() {
                        g.total += 1;
                    }
                }
                None => break,
            }
        }
        drop(g);
        for s in surplus {
            self.stats.servers_closed.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(s.terminate());
        }
    }

    /// Closes idle servers unused for longer than `idle_timeout`.
    pub fn reap_idle(&self, idle_timeout: Duration) -> usize {
        let now = Instant::now();
        let mut g = self.lock();
        let before = g.idle.len();
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut g.idle)
            .into_iter()
            .partition(|s| now.duration_since(s.last_used) >= idle_timeout);
        g.idle = keep;
        g.total -= old.len();
        drop(g);
        let n = old.len();
        debug_assert!(n <= before);
        for s in old {
            self.stats.servers_closed.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(s.terminate());
        }
        n
    }

    /// Closes every idle server (shutdown).
    pub fn close_idle(&self) {
        self.reap_idle(Duration::ZERO);
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
    fn new(pool: Arc<Pool>, server: Box<Server>) -> Self {
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
