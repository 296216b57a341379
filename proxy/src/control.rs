//! The proxy as the admin surface sees it: [`pgmux_admin::Control`] for [`Shared`].
//!
//! Snapshots are read from the same atomics the hot path updates (pool stats, the
//! client registry, server entries), so listing costs the sessions nothing but a few
//! relaxed stores per transaction. Live operations go through the pools' own
//! synchronous cores:
//!
//! * limits (`PATCH`, `SET`, reload) call [`Pool::set_max_size`] / [`Pool::set_min_size`]:
//!   growing lets waiters in at once; shrinking closes idle servers now and busy ones
//!   when their transaction ends — never mid-transaction;
//! * pause queues new checkouts as waiters; running transactions finish; the pause
//!   completes when no server is in use, and then closes the idle ones (as PgBouncer
//!   does, so the database can be restarted);
//! * reconnect bumps a pool generation: idle servers close now, busy ones on release;
//! * kill also ends the database's clients (their sessions watch a kill token).
//! * reload applies the difference to the running configuration under the layout lock
//!   (see [`Shared`]'s `layout`): a removed database's pools leave the maps and are
//!   marked removed — their clients see it through [`ClientEntry::is_removed`] at their
//!   next transaction boundary, their servers close as they come back; a changed
//!   replica list stops the database's topology and builds successors the way a first
//!   login would, and each primary pool points at its current replica set
//!   ([`Pool::replicas`]), which sessions read per transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgmux_admin::{
    AdminAuth, BoxFuture, ClientCounts, ClientInfo, ConfigItem, Control, ControlError,
    DatabaseInfo, PoolInfo, PoolLimits, PoolPatch, PoolTotals, Readiness, ReplicaInfo, Role,
    RouteCounts, ServerCounts, ServerInfo, SessionStateSource, Totals,
};
use pgmux_config::{Config, ConfigError, ReadRouting, Secret};

use crate::backend::{display_addr, ServerStream};
use crate::pool::{CloseReason, Pool};
use crate::replicas::Topology;
use crate::routing::ReplicaSet;
use crate::session::DisconnectReason;
use crate::Shared;

/// Re-reads file + environment (given by main, which knows the flags).
pub type Reloader = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Largest pool_size accepted live (a typo must not open 100000 connections).
const MAX_LIVE_POOL_SIZE: usize = 10_000;

/// Which databases are paused.
#[derive(Debug, Default)]
pub struct PauseState {
    all: bool,
    databases: BTreeSet<String>,
}

impl PauseState {
    pub fn covers(&self, database: &str) -> bool {
        self.all || self.databases.contains(database)
    }
}

/// A client's state as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    Login = 0,
    Idle = 1,
    Waiting = 2,
    Active = 3,
}

impl ClientState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ClientState::Idle,
            2 => ClientState::Waiting,
            3 => ClientState::Active,
            _ => ClientState::Login,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ClientState::Login => "login",
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// Who a logged-in client is. Pool clients point at their pool for the names, so the
/// registry costs no string copies per client.
pub enum ClientIdent {
    Pool {
        pool: Arc<Pool>,
        application_name: Box<str>,
    },
    Console {
        user: Box<str>,
    },
}

impl ClientIdent {
    pub fn user(&self) -> &str {
        match self {
            ClientIdent::Pool { pool, .. } => &pool.user,
            ClientIdent::Console { user } => user,
        }
    }

    pub fn database(&self) -> &str {
        match self {
            ClientIdent::Pool { pool, .. } => &pool.database,
            ClientIdent::Console { .. } => crate::session::CONSOLE_DATABASE,
        }
    }

    pub fn application_name(&self) -> &str {
        match self {
            ClientIdent::Pool {
                application_name, ..
            } => application_name,
            ClientIdent::Console { .. } => "",
        }
    }
}

/// One client connection in the registry. The session updates it at each transition;
/// the admin surface reads it.
pub struct ClientEntry {
    pub id: u64,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub connected: Instant,
    pub connected_unix: u64,
    pub ident: OnceLock<ClientIdent>,
    state: AtomicU8,
    /// Microseconds after `connected` when the current wait began.
    wait_start_us: AtomicU64,
    server: AtomicU64,
    server_pid: AtomicI32,
    cancel_pid: AtomicI32,
    /// Set by KILL: the session ends. A flag and the session task's waker, rather than a
    /// cancellation token: no allocation per client and a tiny future to wait on. The
    /// waker also serves [`ClientEntry::interrupted`] (same task, so one slot is enough).
    killed: AtomicBool,
    waker: AtomicWaker,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ClientEntry {
    fn since_connect_us(&self) -> u64 {
        self.connected.elapsed().as_micros() as u64
    }

    pub fn logged_in(&self, ident: ClientIdent, cancel_pid: i32) {
        let _ = self.ident.set(ident);
        self.cancel_pid.store(cancel_pid, Ordering::Relaxed);
        self.state.store(ClientState::Idle as u8, Ordering::Relaxed);
    }

    pub fn waiting(&self) {
        self.wait_start_us
            .store(self.since_connect_us(), Ordering::Relaxed);
        self.state
            .store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    pub fn linked(&self, server: u64, pid: i32) {
        self.server.store(server, Ordering::Relaxed);
        self.server_pid.store(pid, Ordering::Relaxed);
        self.state
            .store(ClientState::Active as u8, Ordering::Relaxed);
    }

    pub fn idle(&self) {
        self.server.store(0, Ordering::Relaxed);
        self.state.store(ClientState::Idle as u8, Ordering::Relaxed);
    }

    /// KILL: the session ends at its next step (idle, waiting or linked).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves once [`ClientEntry::kill`] was called. Only the session's own task waits
    /// on it (one waker slot).
    pub fn killed(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.killed.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.killed.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// What ends a session between transactions, if anything has happened yet: the
    /// drain (`draining`, see [`crate::Shared::draining`]), KILL, or a reload that
    /// removed the database, looked at in that order.
    fn interrupt(&self, draining: &AtomicBool) -> Option<Interrupt> {
        if draining.load(Ordering::Acquire) {
            Some(Interrupt::Drain)
        } else if self.killed.load(Ordering::Acquire) {
            Some(Interrupt::Killed)
        } else if self.is_removed() {
            Some(Interrupt::Removed)
        } else {
            None
        }
    }

    /// Resolves with the first [`Interrupt`]. One future and one waker registration for
    /// the three (a session waits on it every time it goes idle). The drain is seen
    /// through the entry's waker, which [`crate::Proxy::run`] wakes for every client
    /// when the drain starts, rather than by waiting on the shutdown token, which locks
    /// the token's mutex twice (enqueue, dequeue) per wait.
    pub fn interrupted<'a>(
        &'a self,
        draining: &'a AtomicBool,
    ) -> impl std::future::Future<Output = Interrupt> + 'a {
        std::future::poll_fn(move |cx| {
            if let Some(i) = self.interrupt(draining) {
                return Poll::Ready(i);
            }
            self.waker.register(cx.waker());
            match self.interrupt(draining) {
                Some(i) => Poll::Ready(i),
                None => Poll::Pending,
            }
        })
    }

    /// Wakes the session task (it looks at the drain, KILL and removal flags again).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Whether a reload removed this client's database (its pool is marked removed).
    /// The session looks at it only between transactions (idle, or waiting for a
    /// server): a transaction in progress finishes first. Read from the pool rather than
    /// a flag of its own, so a client that logs in while the reload runs, on a pool that
    /// is removed already, is caught too.
    pub fn is_removed(&self) -> bool {
        matches!(self.ident.get(), Some(ClientIdent::Pool { pool, .. }) if pool.is_removed())
    }

    fn state(&self) -> ClientState {
        ClientState::from_u8(self.state.load(Ordering::Relaxed))
    }
}

/// Why a session between transactions must end (see [`ClientEntry::interrupted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// The drain began (SIGTERM, or the admin's shutdown).
    Drain,
    /// KILL from the console or the HTTP API.
    Killed,
    /// A reload removed the client's database.
    Removed,
}

/// A client's place in the registry, for the session's lifetime.
pub struct ClientTicket {
    shared: Arc<Shared>,
    pub entry: Arc<ClientEntry>,
}

impl ClientTicket {
    pub fn register(shared: &Arc<Shared>, peer: SocketAddr, local: SocketAddr) -> ClientTicket {
        let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ClientEntry {
            id,
            peer,
            local,
            connected: Instant::now(),
            connected_unix: unix_now(),
            ident: OnceLock::new(),
            state: AtomicU8::new(ClientState::Login as u8),
            wait_start_us: AtomicU64::new(0),
            server: AtomicU64::new(0),
            server_pid: AtomicI32::new(0),
            cancel_pid: AtomicI32::new(0),
            killed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        shared.client_list.insert(id, entry.clone());
        ClientTicket {
            shared: shared.clone(),
            entry,
        }
    }
}

impl Drop for ClientTicket {
    fn drop(&mut self) {
        self.shared.client_list.remove(&self.entry.id);
    }
}

/// The password `pool`'s servers log in with under `cfg`. A user removed from the
/// configuration keeps the one it has: its logged-in clients go on (as PgBouncer's do),
/// while new logins are refused by authentication, which reads the new users table.
fn server_password(cfg: &Config, pool: &Pool) -> Option<Arc<Secret>> {
    if cfg.knows_user(&pool.user) {
        cfg.server_password(&pool.user).cloned().map(Arc::new)
    } else {
        pool.password()
    }
}

fn invalid(e: ConfigError) -> ControlError {
    ControlError::invalid(e.key.clone(), e.to_string())
}

impl Shared {
    fn lock_paused(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pools_of(&self, database: Option<&str>) -> Vec<Arc<Pool>> {
        self.all_pools()
            .into_iter()
            .filter(|p| database.is_none_or(|d| p.database == d))
            .collect()
    }

    fn check_database(&self, database: Option<&str>) -> Result<(), ControlError> {
        match database {
            Some(d) if !self.config.load().databases.contains_key(d) => Err(
                ControlError::NotFound(format!("database \"{d}\" does not exist")),
            ),
            _ => Ok(()),
        }
    }

    /// Sets every pool's limits from `cfg` and the pool's live overrides.
    fn apply_limits(&self, cfg: &Config) {
        self.budgets.configure(
            cfg.max_db_connections,
            cfg.total_server_connections,
            cfg.reserved_server_connections,
        );
        for p in self.all_pools() {
            let (max, min) = *p.overrides.lock().unwrap_or_else(|e| e.into_inner());
            let max = max.unwrap_or_else(|| cfg.pool_size_for(&p.database, &p.user));
            p.set_max_size(max);
            p.set_min_size(min.unwrap_or(cfg.min_pool_size));
            p.set_lifetime(cfg.server_lifetime);
            p.set_check_delay(cfg.server_check_delay);
            p.set_connect_settings(cfg.server_connect_timeout, &cfg.tcp);
            if p.role == Role::Primary {
                p.set_login_retry(cfg.server_login_retry);
            }
        }
    }

    /// A reload removed these databases: their pools leave the maps (so listings and
    /// new logins no longer see them) and drain. Their clients between transactions are
    /// told `57P01` now, the others when their transaction ends; servers close as they
    /// come back. Their replica sets and topologies go in [`Shared::sync_replicas`]. A
    /// database added again later starts afresh. The caller holds the layout lock.
    fn remove_databases(&self, cfg: &Config) {
        let mut removed = Vec::new();
        self.pools.retain(|(db, _), p| {
            let keep = cfg.databases.contains_key(db);
            if !keep {
                removed.push(p.clone());
            }
            keep
        });
        if removed.is_empty() {
            return;
        }
        {
            let mut paused = self.lock_paused();
            for p in &removed {
                paused.databases.remove(&p.database);
            }
        }
        for p in &removed {
            p.mark_removed();
            tracing::info!(db = %p.database, user = %p.user, clients = p.clients.load(Ordering::Relaxed), "reload: database removed; its clients end at their next transaction boundary");
        }
        for c in self.client_list.iter() {
            if c.is_removed() {
                c.waker.wake();
            }
        }
    }

    /// Brings topologies and replica sets in line with `cfg` after a reload. A database
    /// whose primary, replica list or health-check settings changed (or that is gone)
    /// has its topology stopped; each (database, user) with a primary pool gets its set
    /// as a first login would build it, on a successor topology (pools of replicas still
    /// listed carry over), and its primary pool points at it, which is where sessions
    /// look at each transaction. Pools of replicas no longer listed drain: idle servers
    /// close now, busy ones when their transaction ends. The caller holds the layout lock.
    fn sync_replicas(&self, cfg: &Config) {
        let mut stopped: BTreeMap<String, Arc<Topology>> = BTreeMap::new();
        self.topologies.retain(|name, t| {
            let keep = cfg.databases.get(name).is_some_and(|db| {
                t.is_for(
                    &db.primary,
                    &db.replicas,
                    &self.health_settings(cfg, t.health_user()),
                )
            });
            if !keep {
                stopped.insert(name.clone(), t.clone());
            }
            keep
        });
        for t in stopped.values() {
            t.stop();
            tracing::info!(db = %t.database, "reload: replicas or their health settings changed; replica routing restarts with the new list");
        }
        let mut old_sets: BTreeMap<(String, String), Arc<ReplicaSet>> = BTreeMap::new();
        self.replica_sets.retain(|(db, user), set| {
            let current = self
                .topologies
                .get(db)
                .is_some_and(|t| Arc::ptr_eq(t.value(), &set.topology));
            let keep = current && cfg.read_routing_for(db, user) != ReadRouting::PrimaryOnly;
            if !keep {
                old_sets.insert((db.clone(), user.clone()), set.clone());
            }
            keep
        });
        let primaries: Vec<Arc<Pool>> = self.pools.iter().map(|p| p.value().clone()).collect();
        for p in primaries {
            let Some(db) = cfg.databases.get(&p.database) else {
                continue;
            };
            let key = (p.database.clone(), p.user.clone());
            let set = self.replica_set(
                cfg,
                db,
                &p.user,
                old_sets.get(&key).map(|s| &**s),
                stopped.get(&p.database).map(|t| &**t),
            );
            p.set_replicas(set);
        }
        for set in old_sets.values() {
            for pool in &set.pools {
                let reused = self
                    .replica_sets
                    .iter()
                    .any(|s| s.pools.iter().any(|q| Arc::ptr_eq(q, pool)));
                if !reused {
                    pool.mark_removed();
                    tracing::info!(db = %pool.database, user = %pool.user, replica = %display_addr(&pool.addr()), "reload: replica removed; its servers close as they come back");
                }
            }
        }
        // A changed password reaches the replica pools that stay.
        for s in self.replica_sets.iter() {
            for pool in &s.pools {
                let password = server_password(cfg, pool);
                pool.update_target(&pool.addr(), password.as_deref());
            }
        }
    }

    /// Counts a session's end.
    pub fn count_disconnect(&self, reason: DisconnectReason) {
        self.disconnects[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn pool_info(&self, p: &Pool, cfg: &Config, waiting_elsewhere: usize) -> PoolInfo {
        let c = p.counts();
        let s = &p.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let errors_by_class: BTreeMap<String, u64> = s
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), *v))
            .collect();
        let active_clients = match p.role {
            // Logged-in clients of (database, user) not waiting for any of its pools.
            Role::Primary => p
                .clients
                .load(Ordering::Relaxed)
                .saturating_sub(c.waiting + waiting_elsewhere),
            Role::Replica => 0,
        };
        PoolInfo {
            database: p.database.clone(),
            user: p.user.clone(),
            role: p.role,
            server: display_addr(&p.addr()),
            pool_mode: "transaction",
            paused: c.paused,
            limits: PoolLimits {
                pool_size: c.max,
                min_pool_size: c.min,
                max_client_conn: cfg.max_client_conn,
                query_wait_timeout_ms: cfg.query_wait_timeout.as_millis() as u64,
                server_idle_timeout_ms: cfg.server_idle_timeout.as_millis() as u64,
                max_prepared_statements: cfg.max_prepared_statements,
            },
            servers: ServerCounts {
                active: c.total.saturating_sub(c.idle + c.connecting),
                idle: c.idle,
                connecting: c.connecting,
                pinned: load(&s.pinned) as usize,
            },
            clients: ClientCounts {
                active: active_clients,
                waiting: c.waiting,
            },
            max_wait_us: c.max_wait.as_micros() as u64,
            totals: PoolTotals {
                transactions: load(&s.transactions),
                queries: load(&s.queries),
                bytes_received: load(&s.bytes_received),
                bytes_sent: load(&s.bytes_sent),
                wait_time_us: load(&s.wait_us),
                transaction_time_us: load(&s.xact_us),
                query_time_us: load(&s.query_us),
                errors: errors_by_class.values().sum(),
                errors_by_class,
                servers_opened: load(&s.servers_opened),
                servers_closed: load(&s.servers_closed),
                connect_errors: load(&s.connect_errors),
                wait_timeouts: load(&s.wait_timeouts),
                units_retried: load(&s.retried),
                query_timeouts: load(&s.query_timeouts),
                statements_prepared: load(&s.statements_prepared),
                statement_cache_hits: load(&s.statement_cache_hits),
                statement_evictions: load(&s.statement_evictions),
                session_pins: load(&s.session_pins),
                session_state_warned: load(&s.session_state_warned),
                session_state_rejected: load(&s.session_state_rejected),
                session_state_sources: s
                    .session_state_sources
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|((app, feature), n)| SessionStateSource {
                        application_name: app.clone(),
                        feature: (*feature).to_owned(),
                        count: *n,
                    })
                    .collect(),
            },
        }
    }
}

impl Control for Shared {
    fn pools(&self) -> Vec<PoolInfo> {
        let cfg = self.config.load();
        let pools = self.all_pools();
        // Clients waiting for a replica pool are not active on the primary's row.
        let mut replica_waiting: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for p in pools.iter().filter(|p| p.role == Role::Replica) {
            *replica_waiting
                .entry((p.database.as_str(), p.user.as_str()))
                .or_default() += p.counts().waiting;
        }
        let mut out: Vec<PoolInfo> = pools
            .iter()
            .map(|p| {
                let elsewhere = match p.role {
                    Role::Primary => replica_waiting
                        .get(&(p.database.as_str(), p.user.as_str()))
                        .copied()
                        .unwrap_or(0),
                    Role::Replica => 0,
                };
                self.pool_info(p, &cfg, elsewhere)
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.database, &a.user, a.role as u8, &a.server).cmp(&(
                &b.database,
                &b.user,
                b.role as u8,
                &b.server,
            ))
        });
        out
    }

    fn clients(&self) -> Vec<ClientInfo> {
        let mut out: Vec<ClientInfo> = self
            .client_list
            .iter()
            .map(|e| {
                let e = e.value();
                let state = e.state();
                let ident = e.ident.get();
                let age = e.connected.elapsed();
                let wait_us = if state == ClientState::Waiting {
                    (age.as_micros() as u64).saturating_sub(e.wait_start_us.load(Ordering::Relaxed))
                } else {
                    0
                };
                let linked = state == ClientState::Active;
                ClientInfo {
                    id: e.id,
                    addr: e.peer.to_string(),
                    local_addr: e.local.to_string(),
                    user: ident.map(|i| i.user().to_owned()).unwrap_or_default(),
                    database: ident.map(|i| i.database().to_owned()).unwrap_or_default(),
                    application_name: ident
                        .map(|i| i.application_name().to_owned())
                        .unwrap_or_default(),
                    state: state.as_str(),
                    connect_time: e.connected_unix,
                    age_ms: age.as_millis() as u64,
                    wait_us,
                    server_id: linked.then(|| e.server.load(Ordering::Relaxed)),
                    server_pid: linked.then(|| e.server_pid.load(Ordering::Relaxed)),
                    cancel_pid: e.cancel_pid.load(Ordering::Relaxed),
                    tls: false,
                }
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }

    fn servers(&self) -> Vec<ServerInfo> {
        let mut out = Vec::new();
        for p in self.all_pools() {
            let app = p
                .startup_params()
                .and_then(|sp| sp.get("application_name").map(str::to_owned))
                .unwrap_or_default();
            for e in p.servers.iter() {
                let e = e.value();
                let client = e.client.load(Ordering::Relaxed);
                let age = e.opened.elapsed();
                out.push(ServerInfo {
                    id: e.id,
                    database: p.database.clone(),
                    user: p.user.clone(),
                    role: p.role,
                    addr: {
                        let a = p.addr();
                        format!("{}:{}", a.host, a.port)
                    },
                    state: if client != 0 { "active" } else { "idle" },
                    connect_time: e.opened_unix,
                    age_ms: age.as_millis() as u64,
                    idle_ms: (age.as_micros() as u64)
                        .saturating_sub(e.changed_us.load(Ordering::Relaxed))
                        / 1000,
                    backend_pid: Some(e.pid),
                    client_id: (client != 0).then_some(client),
                    prepared_statements: e.prepared.load(Ordering::Relaxed),
                    application_name: app.clone(),
                    tls: false,
                });
            }
        }
        out.sort_by_key(|s| s.id);
        out
    }

    fn databases(&self) -> Vec<DatabaseInfo> {
        let cfg = self.config.load();
        let pools = self.all_pools();
        let paused = self.lock_paused();
        cfg.databases
            .values()
            .map(|db| {
                let current = pools
                    .iter()
                    .filter(|p| p.database == db.name)
                    .map(|p| p.counts().total)
                    .sum();
                DatabaseInfo {
                    name: db.name.clone(),
                    host: db.primary.host.clone(),
                    port: db.primary.port,
                    dbname: db.primary.dbname.clone(),
                    replicas: db.replicas.iter().map(display_addr).collect(),
                    pool_size: db.pool_size.unwrap_or(cfg.pool_size),
                    min_pool_size: cfg.min_pool_size,
                    max_client_conn: cfg.max_client_conn,
                    current_connections: current,
                    max_connections: self.budgets.limit_for(&db.primary),
                    paused: paused.covers(&db.name),
                }
            })
            .collect()
    }

    fn replicas(&self) -> Vec<ReplicaInfo> {
        let mut out = Vec::new();
        for t in self.topologies.iter() {
            for r in &t.replicas {
                let st = r.status();
                let checked = st.replay_lsn.is_some();
                out.push(ReplicaInfo {
                    database: t.database.clone(),
                    addr: st.addr,
                    healthy: st.healthy,
                    lag_ms: checked.then_some(st.lag.as_millis() as u64),
                    lag_bytes: checked.then_some(st.lag_bytes),
                    replay_lsn: st.replay_lsn,
                    outstanding: st.outstanding as u64,
                    transactions: st.transactions,
                    failures: st.failures,
                    last_error: st.last_error,
                });
            }
        }
        out.sort_by(|a, b| (&a.database, &a.addr).cmp(&(&b.database, &b.addr)));
        out
    }

    fn totals(&self) -> Totals {
        let cfg = self.config.load();
        let mut server_closes = BTreeMap::new();
        for p in self.all_pools() {
            for r in CloseReason::ALL {
                *server_closes.entry(r.as_str().to_string()).or_insert(0) +=
                    p.stats.closes[r as usize].load(Ordering::Relaxed);
            }
        }
        let disconnects = DisconnectReason::ALL
            .iter()
            .map(|r| {
                (
                    r.as_str().to_string(),
                    self.disconnects[*r as usize].load(Ordering::Relaxed),
                )
            })
            .collect();
        let mut routing: Vec<RouteCounts> = self
            .topologies
            .iter()
            .map(|t| {
                let s = &t.stats;
                let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                RouteCounts {
                    database: t.database.clone(),
                    primary: l(&s.primary),
                    replica: l(&s.replica),
                    kept: BTreeMap::from([
                        ("write_before".to_string(), l(&s.kept_write_before)),
                        ("lag".to_string(), l(&s.kept_lag)),
                        ("unhealthy".to_string(), l(&s.kept_unhealthy)),
                        ("unparseable".to_string(), l(&s.kept_unparseable)),
                        ("hint".to_string(), l(&s.kept_hint)),
                    ]),
                    retried: l(&s.retried),
                }
            })
            .collect();
        routing.sort_by(|a, b| a.database.cmp(&b.database));
        Totals {
            version: self.version(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            clients: self.client_list.len(),
            max_client_conn: cfg.max_client_conn,
            disconnects,
            server_closes,
            draining: self.shutdown.is_cancelled(),
            routing,
        }
    }

    fn config(&self) -> Vec<ConfigItem> {
        self.config
            .load()
            .settings()
            .into_iter()
            .map(|s| ConfigItem {
                key: s.key,
                value: s.value,
                default: s.default,
                changeable: s.changeable,
            })
            .collect()
    }

    fn set_pool_limits(
        &self,
        database: &str,
        user: &str,
        patch: &PoolPatch,
    ) -> Result<(), ControlError> {
        let pools: Vec<Arc<Pool>> = self
            .all_pools()
            .into_iter()
            .filter(|p| p.database == database && p.user == user)
            .collect();
        let Some(primary) = pools.iter().find(|p| p.role == Role::Primary) else {
            return Err(ControlError::NotFound(format!(
                "no pool for database \"{database}\" and user \"{user}\" (pools are created at the first login)"
            )));
        };
        let now = primary.counts();
        let max = patch.pool_size.unwrap_or(now.max);
        let min = patch.min_pool_size.unwrap_or(now.min);
        if !(1..=MAX_LIVE_POOL_SIZE).contains(&max) {
            return Err(ControlError::invalid(
                "pool_size",
                format!("must be between 1 and {MAX_LIVE_POOL_SIZE}, got {max}"),
            ));
        }
        if min > max {
            return Err(ControlError::invalid(
                "min_pool_size",
                format!("must not exceed pool_size ({max}), got {min}"),
            ));
        }
        for p in &pools {
            let mut o = p.overrides.lock().unwrap_or_else(|e| e.into_inner());
            if patch.pool_size.is_some() {
                o.0 = Some(max);
            }
            if patch.min_pool_size.is_some() {
                o.1 = Some(min);
            }
            drop(o);
            p.set_max_size(max);
            p.set_min_size(min);
        }
        tracing::info!(%database, %user, pool_size = max, min_pool_size = min, "pool limits changed live");
        Ok(())
    }

    fn set_config(&self, changes: &[(String, String)]) -> Result<(), ControlError> {
        let cfg = self.config.load_full();
        let new = cfg.with_changes(changes).map_err(invalid)?;
        self.apply_limits(&new);
        self.config.store(Arc::new(new));
        tracing::info!(?changes, "configuration changed live");
        Ok(())
    }

    fn pause(
        &self,
        database: Option<&str>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), ControlError>> {
        let database = database.map(str::to_owned);
        Box::pin(async move {
            self.check_database(database.as_deref())?;
            {
                let mut st = self.lock_paused();
                match &database {
                    Some(d) => {
                        st.databases.insert(d.clone());
                    }
                    None => st.all = true,
                }
            }
            let pools = self.pools_of(database.as_deref());
            for p in &pools {
                p.pause();
            }
            tracing::info!(database = ?database, "paused: new transactions wait");
            let deadline = Instant::now() + timeout;
            loop {
                let busy: usize = pools.iter().map(|p| p.in_use()).sum();
                if busy == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(ControlError::Failed(format!(
                        "pause did not complete within {}: {busy} server connection(s) still in a transaction; new transactions stay paused until RESUME",
                        humantime_secs(timeout)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for p in &pools {
                p.close_idle_for(CloseReason::Paused);
            }
            Ok(())
        })
    }

    fn resume(&self, database: Option<&str>) -> Result<(), ControlError> {
        self.check_database(database)?;
        {
            let mut st = self.lock_paused();
            match database {
                None => {
                    st.all = false;
                    st.databases.clear();
                }
                Some(d) => {
                    if st.all {
                        return Err(ControlError::Failed(
                            "everything is paused: RESUME without a database first".into(),
                        ));
                    }
                    st.databases.remove(d);
                }
            }
        }
        let st = self.lock_paused();
        for p in self.all_pools() {
            if !st.covers(&p.database) {
                p.resume();
            }
        }
        tracing::info!(?database, "resumed");
        Ok(())
    }

    fn reload(&self) -> Result<(), ControlError> {
        let loaded = {
            let r = self.reloader.lock().unwrap_or_else(|e| e.into_inner());
            match r.as_ref() {
                Some(f) => f(),
                None => {
                    return Err(ControlError::Failed(
                        "reload is not available in this process".into(),
                    ))
                }
            }
        };
        let new = match loaded {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reload rejected; the running configuration stays");
                return Err(invalid(e));
            }
        };
        let old = self.config.load_full();
        if new.listen != old.listen
            || new.workers != old.workers
            || new.admin.listen != old.admin.listen
        {
            tracing::warn!("reload: listen, admin.listen and workers apply at the next start");
        }
        let new = Arc::new(new);
        // The new configuration goes in first, under the layout lock: a login creating a
        // pool or replica set meanwhile either finished before (and what it made is
        // brought in line below) or reads the new configuration.
        let _layout = self.lock_layout();
        self.config.store(new.clone());
        // auth_user, auth_query or the cache's lifetime may have changed.
        self.auth_query.clear();
        // The file and environment are the truth again: live per-pool limits go.
        for p in self.all_pools() {
            *p.overrides.lock().unwrap_or_else(|e| e.into_inner()) = (None, None);
        }
        self.remove_databases(&new);
        // A primary that moved, or a changed password: that pool's servers are replaced.
        for p in self.pools.iter() {
            let p = p.value();
            if let Some(db) = new.databases.get(&p.database) {
                let password = server_password(&new, p);
                if p.update_target(&db.primary, password.as_deref()) {
                    tracing::info!(db = %p.database, user = %p.user, "reload: server address or password changed; recycling the pool's servers");
                }
            }
        }
        self.sync_replicas(&new);
        self.apply_limits(&new);
        self.refresh_client_tls();
        tracing::info!("configuration reloaded");
        Ok(())
    }

    fn reconnect(&self, database: Option<&str>) -> Result<(), ControlError> {
        self.check_database(database)?;
        for p in self.pools_of(database) {
            p.reconnect(CloseReason::Reconnect);
        }
        Ok(())
    }

    fn kill(&self, database: &str) -> Result<(), ControlError> {
        self.check_database(Some(database))?;
        for c in self.client_list.iter() {
            if c.ident.get().is_some_and(|i| i.database() == database) {
                c.kill();
            }
        }
        for p in self.pools_of(Some(database)) {
            p.reconnect(CloseReason::Killed);
        }
        tracing::info!(%database, "killed every connection of the database");
        Ok(())
    }

    fn ready(&self) -> BoxFuture<'_, Readiness> {
        Box::pin(async move {
            let mut reasons = Vec::new();
            if self.shutdown.is_cancelled() {
                reasons.push("draining: pgmux is shutting down".to_string());
            } else {
                let cfg = self.config.load_full();
                for db in cfg.databases.values() {
                    let probe = tokio::time::timeout(
                        Duration::from_secs(1),
                        ServerStream::connect(&db.primary),
                    )
                    .await;
                    // A connection that sends nothing is not logged by PostgreSQL.
                    match probe {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => reasons.push(format!(
                            "primary of database \"{}\" unreachable: {e}",
                            db.name
                        )),
                        Err(_) => reasons.push(format!(
                            "primary of database \"{}\" unreachable: connect timed out",
                            db.name
                        )),
                    }
                }
            }
            Readiness {
                ready: reasons.is_empty(),
                reasons,
            }
        })
    }

    fn version(&self) -> String {
        format!("pgmux {}", env!("CARGO_PKG_VERSION"))
    }

    fn auth(&self) -> AdminAuth {
        let cfg = self.config.load();
        AdminAuth {
            token: cfg.admin.token.as_ref().map(|t| t.expose().to_owned()),
            protect_reads: cfg.admin.protect_reads,
        }
    }
}

fn humantime_secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
