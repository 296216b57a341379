//! pgmux-proxy: the transaction-mode PostgreSQL proxy.
//!
//! Map:
//! * [`protocol`] — framing with length checks, the few message encoders/decoders needed.
//! * [`session`] — one task per client: startup, authentication, idle ⇄ linked loop.
//! * [`pool`] — bounded per-(database, user) pools with a synchronous core and RAII checkout.
//! * [`backend`] — server connections: connect, log in, protocol bookkeeping.
//! * [`params`] — client session parameters re-applied on every server a client meets.
//! * [`auth`] — server side of SCRAM-SHA-256 and MD5 for clients.
//! * [`cancel`] — CancelRequest routing to the server serving a client *now*.
//! * [`relay`] — per-message bookkeeping while linked (response queue, statement rewriting).
//! * [`prepared`] — named prepared statements that follow clients across servers.
//! * [`sockio`] — socket reads that learn "drained" from a short read, not an EAGAIN.
//! * [`router`] — pure SQL classification: may this text run on a read replica?
//! * [`routing`] — per-transaction choice of primary or replica, read-your-writes.
//! * [`replicas`] — replica health loops, the primary's WAL clock, route counters.
//! * [`control`] — the admin surface's view: [`pgmux_admin::Control`] for [`Shared`],
//!   the client registry, pause/resume, live limits, reload, kill.
//!
//! [`Proxy`] ties them together: it owns the [`Shared`] state (config snapshot, pools,
//! cancel registry, client count, shutdown signal) and the accept loop.

pub mod auth;
pub mod backend;
pub mod cancel;
pub mod control;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod relay;
pub mod replicas;
pub mod router;
pub mod routing;
pub mod session;
pub mod sockio;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use pgmux_config::{Config, Database, ReadRouting};
use rand::RngCore;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::ScramVerifier;
use crate::cancel::CancelRegistry;
use crate::control::{ClientEntry, PauseState, Reloader};
use crate::pool::{Pool, PoolSettings};
use crate::replicas::{HealthSettings, Topology, WriteMark};
use crate::router::Router;
use crate::routing::ReplicaSet;
use pgmux_admin::metrics::Metrics;
use pgmux_admin::Role;

/// State shared by every session. Passed as `Arc<Shared>`; there are no globals.
pub struct Shared {
    pub config: ArcSwap<Config>,
    pub pools: DashMap<(String, String), Arc<Pool>>,
    pub cancel: Arc<CancelRegistry>,
    pub clients: AtomicUsize,
    pub shutdown: CancellationToken,
    /// Classifies SQL as read-only or not, for read routing.
    pub router: Router,
    /// Per database with replicas: health and replay positions.
    pub topologies: DashMap<String, Arc<Topology>>,
    /// Per (database, user): the replica pools.
    pub replica_sets: DashMap<(String, String), Arc<ReplicaSet>>,
    /// Stops the replica health loops (after the drain).
    health_stop: CancellationToken,
    /// SCRAM verifiers derived once per (user, password), never per login.
    verifiers: DashMap<String, (String, Arc<ScramVerifier>)>,
    /// Key for the mock exchange of unknown users.
    mock_secret: [u8; 32],
    /// Prometheus recorder: pools record their histograms into it.
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// Every client connection, by id (the admin surface lists them, KILL ends them).
    pub client_list: DashMap<u64, Arc<ClientEntry>>,
    pub next_client_id: AtomicU64,
    /// Ended sessions, indexed like [`session::DisconnectReason::ALL`].
    pub disconnects: [AtomicU64; session::DisconnectReason::ALL.len()],
    /// Paused databases (or all).
    pub paused: std::sync::Mutex<PauseState>,
    /// Re-reads the configuration (file + environment), for reload. None: reload refused.
    pub reloader: std::sync::Mutex<Option<Reloader>>,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Shared> {
        Self::with_metrics(config, Arc::new(Metrics::new()))
    }

    pub fn with_metrics(config: Config, metrics: Arc<Metrics>) -> Arc<Shared> {
        let mut mock_secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut mock_secret);
        let router = Router::new(&config.write_functions);
        Arc::new(Shared {
            router,
            topologies: DashMap::new(),
            replica_sets: DashMap::new(),
            health_stop: CancellationToken::new(),
            config: ArcSwap::from_pointee(config),
            pools: DashMap::new(),
            cancel: Arc::new(CancelRegistry::default()),
            clients: AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
            verifiers: DashMap::new(),
            mock_secret,
            metrics,
            started: Instant::now(),
            client_list: DashMap::new(),
            next_client_id: AtomicU64::new(1),
            disconnects: Default::default(),
            paused: Default::default(),
            reloader: std::sync::Mutex::new(None),
        })
    }

    /// Creation settings of a pool for (database, user) in `role`.
    fn pool_settings(&self, cfg: &Config, db: &str, user: &str, role: Role) -> PoolSettings {
        PoolSettings {
            max_size: cfg.pool_size_for(db, user),
            min_size: cfg.min_pool_size,
            lifetime: cfg.server_lifetime,
            // A replica that cannot be reached is left for the primary at once.
            login_retry: match role {
                Role::Primary => cfg.server_login_retry,
                Role::Replica => Duration::ZERO,
            },
            connect_timeout: cfg.server_connect_timeout,
            histograms: self.metrics.pool_histograms(db, user, role),
            paused: self
                .paused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .covers(db),
        }
    }

    /// The pool for (database, user), created on first use.
    pub fn pool_for(&self, cfg: &Config, db: &Database, user: &str) -> Arc<Pool> {
        let key = (db.name.clone(), user.to_owned());
        if let Some(p) = self.pools.get(&key) {
            return p.clone();
        }
        self.pools
            .entry(key)
            .or_insert_with(|| {
                let password = cfg.users.get(user).and_then(|u| u.password.clone());
                Pool::new(
                    db.name.clone(),
                    user.to_owned(),
                    Role::Primary,
                    db.primary.clone(),
                    password,
                    self.pool_settings(cfg, &db.name, user, Role::Primary),
                )
            })
            .clone()
    }

    /// The replica pools for (database, user), created on first use; `None` when the
    /// database has no replicas or this user's routing is `primary_only`.
    pub fn replicas_for(&self, cfg: &Config, db: &Database, user: &str) -> Option<Arc<ReplicaSet>> {
        if db.replicas.is_empty()
            || cfg.read_routing_for(&db.name, user) == ReadRouting::PrimaryOnly
        {
            return None;
        }
        let key = (db.name.clone(), user.to_owned());
        if let Some(s) = self.replica_sets.get(&key) {
            return Some(s.clone());
        }
        let password = cfg.users.get(user).and_then(|u| u.password.clone());
        let topology = self
            .topologies
            .entry(db.name.clone())
            .or_insert_with(|| {
                // The health loops log in as the first user that needs them.
                let settings = HealthSettings {
                    user: user.to_owned(),
                    password: password.clone(),
                    interval: cfg.replica_check_interval,
                    max_lag: cfg.max_replica_lag,
                    connect_timeout: cfg.server_connect_timeout,
                };
                Topology::start(
                    &db.name,
                    &db.primary,
                    &db.replicas,
                    settings,
                    self.health_stop.clone(),
                )
            })
            .clone();
        let set = self
            .replica_sets
            .entry(key)
            .or_insert_with(|| {
                let pools = db
                    .replicas
                    .iter()
                    .map(|addr| {
                        Pool::new(
                            db.name.clone(),
                            user.to_owned(),
                            Role::Replica,
                            addr.clone(),
                            password.clone(),
                            self.pool_settings(cfg, &db.name, user, Role::Replica),
                        )
                    })
                    .collect();
                Arc::new(ReplicaSet {
                    topology,
                    pools,
                    writes: WriteMark::default(),
                })
            })
            .clone();
        Some(set)
    }

    /// Every pool: primaries, then replicas.
    pub fn all_pools(&self) -> Vec<Arc<Pool>> {
        let mut out: Vec<Arc<Pool>> = self.pools.iter().map(|p| p.value().clone()).collect();
        for s in self.replica_sets.iter() {
            out.extend(s.pools.iter().cloned());
        }
        out
    }

    /// The SCRAM verifier for a user's configured password, derived once.
    pub fn verifier(&self, user: &str, password: &str) -> Arc<ScramVerifier> {
        if let Some(e) = self.verifiers.get(user) {
            if e.0 == password {
                return e.1.clone();
            }
        }
        let v = Arc::new(ScramVerifier::derive(password));
        self.verifiers
            .insert(user.to_owned(), (password.to_owned(), v.clone()));
        v
    }
}

/// The running proxy: listener plus sessions.
pub struct Proxy {
    pub shared: Arc<Shared>,
    listener: TcpListener,
    tracker: TaskTracker,
}

impl Proxy {
    /// Binds the listen address (with SO_REUSEADDR and SO_REUSEPORT, so a new pgmux can
    /// start on the same port while an old one drains).
    pub async fn bind(config: Config) -> std::io::Result<Proxy> {
        let addr = config.listen;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        Ok(Proxy {
            shared: Shared::new(config),
            listener,
            tracker: TaskTracker::new(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts clients until shutdown, then waits up to `shutdown_timeout` for sessions to
    /// finish their transactions (idle ones are told 57P01 and closed at once).
    pub async fn run(self) {
        let shared = self.shared.clone();
        let maintenance = tokio::spawn(maintenance(shared.clone()));
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let shared = shared.clone();
                        let fut = session::run(shared, stream, peer);
                        tracing::trace!(bytes = std::mem::size_of_val(&fut), "session future size");
                        self.tracker.spawn(fut);
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        drop(self.listener);
        self.tracker.close();
        let timeout = shared.config.load().shutdown_timeout;
        tracing::info!(
            clients = self.tracker.len(),
            "draining: waiting for transactions to finish"
        );
        if tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                clients = self.tracker.len(),
                "shutdown_timeout reached; closing remaining clients"
            );
        }
        maintenance.abort();
        shared.health_stop.cancel();
        for p in shared.all_pools() {
            p.close_idle();
        }
        // Let the Terminate messages go out.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Periodic upkeep: histogram samples folded into buckets (bounded memory without
/// scrapes), idle server reaping above min_pool_size, then opening servers up to it.
async fn maintenance(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        shared.metrics.run_upkeep();
        let idle_timeout = shared.config.load().server_idle_timeout;
        for p in shared.all_pools() {
            let n = p.reap_idle(idle_timeout);
            if n > 0 {
                tracing::debug!(db = %p.database, user = %p.user, closed = n, "closed idle servers (idle_timeout, lifetime)");
            }
            p.fill_to_min();
        }
    }
}
