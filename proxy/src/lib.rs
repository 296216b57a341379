//! pgmux-proxy: the transaction-mode PostgreSQL proxy.
//!
//! Map:
//! * [`protocol`] — framing with length checks, the few message encoders/decoders needed.
//! * [`session`] — one task per client: startup, authentication, idle ⇄ linked loop.
//! * [`pool`] — bounded per-(database, user) pools with a synchronous core and RAII checkout.
//! * [`backend`] — server connections: connect, log in, protocol bookkeeping.
//! * [`params`] — client session parameters re-applied on every server a client meets.
//! * [`auth`] — server side of SCRAM-SHA-256 and MD5 for clients.
//! * [`authquery`] — `auth_user`/`auth_query`: secrets looked up in PostgreSQL, cached.
//! * [`cancel`] — CancelRequest routing to the server serving a client *now*.
//! * [`relay`] — per-message bookkeeping while linked (response queue, statement rewriting).
//! * [`prepared`] — named prepared statements that follow clients across servers.
//! * [`sockio`] — socket reads that learn "drained" from a short read, not an EAGAIN.
//! * [`tcp`] — TCP keepalive and user timeout on client and server sockets.
//! * [`router`] — pure SQL classification: may this text run on a read replica?
//! * [`routing`] — per-transaction choice of primary or replica, read-your-writes.
//! * [`replicas`] — replica health loops, the primary's WAL clock, route counters.
//! * [`rds_iam`] — `server_auth = "rds_iam"`: SigV4 RDS IAM tokens, AWS credentials, token cache.
//! * [`control`] — the admin surface's view: [`pgmux_admin::Control`] for [`Shared`],
//!   the client registry, pause/resume, live limits, reload, kill.
//!
//! [`Proxy`] ties them together: it owns the [`Shared`] state (config snapshot, pools,
//! cancel registry, client count, shutdown signal) and the accept loop.

pub mod auth;
pub mod authquery;
pub mod backend;
pub mod budget;
pub mod cancel;
pub mod control;
#[doc(hidden)]
pub mod fuzzing;
pub mod params;
pub mod peers;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod rds_iam;
pub mod relay;
pub mod replicas;
pub mod router;
pub mod routing;
pub mod session;
pub mod sessionstate;
pub mod sockio;
pub mod tcp;
pub mod tls;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// SIGINT: the drain does not wait for transactions (set before `shutdown` fires).
    pub fast_shutdown: std::sync::atomic::AtomicBool,
    /// The drain has begun: set by [`Proxy::run`] when `shutdown` fires, before it wakes
    /// every client. Sessions look at this flag between transactions rather than at the
    /// token, whose `is_cancelled` locks a mutex.
    pub draining: std::sync::atomic::AtomicBool,
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
    /// Held while pools, replica sets or topologies are created (first login) or
    /// changed by a reload. Creation reads the configuration under it, so a login that
    /// began before a reload cannot put a pool of a removed database, or a replica set
    /// on an old replica list, into the maps after the reload went through them.
    layout: std::sync::Mutex<()>,
    /// RDS IAM tokens and AWS credentials, shared by every pool (`server_auth =
    /// "rds_iam"`); created by the first pool that needs it.
    rds_iam: std::sync::OnceLock<Arc<rds_iam::TokenSource>>,
    /// Secrets found by `auth_query`, per (database, user).
    pub auth_query: authquery::AuthQueryCache,
    /// The client-facing TLS acceptor, swapped when its files change.
    pub client_tls: tls::ClientTls,
    /// Server connections per PostgreSQL node (`max_db_connections`, the share of
    /// `total_server_connections`).
    pub budgets: Arc<budget::Budgets>,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Shared> {
        Self::with_metrics(config, Arc::new(Metrics::new()))
    }

    pub fn with_metrics(config: Config, metrics: Arc<Metrics>) -> Arc<Shared> {
        let mut mock_secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut mock_secret);
        let router = Router::new(&config.write_functions);
        let budgets = Arc::new(budget::Budgets::default());
        budgets.configure(
            config.max_db_connections,
            config.total_server_connections,
            config.reserved_server_connections,
        );
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
            fast_shutdown: std::sync::atomic::AtomicBool::new(false),
            draining: std::sync::atomic::AtomicBool::new(false),
            verifiers: DashMap::new(),
            mock_secret,
            metrics,
            started: Instant::now(),
            client_list: DashMap::new(),
            next_client_id: AtomicU64::new(1),
            disconnects: Default::default(),
            paused: Default::default(),
            reloader: std::sync::Mutex::new(None),
            layout: std::sync::Mutex::new(()),
            rds_iam: std::sync::OnceLock::new(),
            auth_query: Default::default(),
            client_tls: tls::ClientTls::default(),
            budgets,
        })
    }

    pub(crate) fn lock_layout(&self) -> std::sync::MutexGuard<'_, ()> {
        self.layout.lock().unwrap_or_else(|e| e.into_inner())
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
            check_delay: cfg.server_check_delay,
            histograms: self.metrics.pool_histograms(db, user, role),
            tcp: cfg.tcp.clone(),
            rds_iam: (cfg.server_auth == pgmux_config::ServerAuth::RdsIam).then(|| {
                rds_iam::RdsIamAuth {
                    tokens: self.rds_iam.get_or_init(Default::default).clone(),
                    region: cfg.aws_region.clone(),
                }
            }),
            paused: self
                .paused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .covers(db),
            budgets: self.budgets.clone(),
        }
    }

    /// The pool for (database, user), created on first use.
    ///
    /// Created from the configuration current at that moment, not from the login's
    /// snapshot `cfg`: if a reload removed the database since the login began, the pool
    /// returned is already removed (outside the maps; the client is told `57P01` at its
    /// first transaction boundary).
    pub fn pool_for(&self, cfg: &Config, db: &Database, user: &str) -> Arc<Pool> {
        let key = (db.name.clone(), user.to_owned());
        if let Some(p) = self.pools.get(&key) {
            return p.clone();
        }
        let _layout = self.lock_layout();
        let now = self.config.load();
        let Some(db_now) = now.databases.get(&db.name) else {
            let pool = self.primary_pool(cfg, db, user);
            pool.mark_removed();
            return pool;
        };
        self.pools
            .entry(key)
            .or_insert_with(|| self.primary_pool(&now, db_now, user))
            .clone()
    }

    fn primary_pool(&self, cfg: &Config, db: &Database, user: &str) -> Arc<Pool> {
        let password = cfg.server_password(user).cloned();
        Pool::new(
            db.name.clone(),
            user.to_owned(),
            Role::Primary,
            db.primary.clone(),
            password,
            self.pool_settings(cfg, &db.name, user, Role::Primary),
        )
    }

    /// The replica pools for (database, user), created on first use; `None` when the
    /// database has no replicas (or no longer exists) or this user's routing is
    /// `primary_only`. Decided on the current configuration rather than the login's
    /// snapshot (`_cfg`), which a reload may have overtaken.
    pub fn replicas_for(
        &self,
        _cfg: &Config,
        db: &Database,
        user: &str,
    ) -> Option<Arc<ReplicaSet>> {
        {
            let now = self.config.load();
            let db = now.databases.get(&db.name)?;
            if db.replicas.is_empty()
                || now.read_routing_for(&db.name, user) == ReadRouting::PrimaryOnly
            {
                return None;
            }
        }
        let key = (db.name.clone(), user.to_owned());
        if let Some(s) = self.replica_sets.get(&key) {
            return Some(s.clone());
        }
        let _layout = self.lock_layout();
        let now = self.config.load();
        let db = now.databases.get(&db.name)?;
        let set = self.replica_set(&now, db, user, None, None);
        if let Some(p) = self.pools.get(&key) {
            p.set_replicas(set.clone());
        }
        set
    }

    /// How the health loops of a topology created for `user` log in and sample.
    pub(crate) fn health_settings(&self, cfg: &Config, user: &str) -> HealthSettings {
        HealthSettings {
            user: user.to_owned(),
            password: cfg.server_password(user).cloned(),
            interval: cfg.replica_check_interval,
            max_lag: cfg.max_replica_lag,
            connect_timeout: cfg.server_connect_timeout,
            tcp: cfg.tcp.clone(),
        }
    }

    /// (database, user)'s replica set on `cfg`, from the map or created (with the
    /// database's topology if that is missing too). The caller holds the layout lock.
    ///
    /// After a reload, `old` is the set this one replaces: pools of replicas still
    /// listed, and the user's last write mark, carry over. `stopped` is the database's
    /// topology the reload stopped: the new one continues its WAL clock.
    pub(crate) fn replica_set(
        &self,
        cfg: &Config,
        db: &Database,
        user: &str,
        old: Option<&ReplicaSet>,
        stopped: Option<&Topology>,
    ) -> Option<Arc<ReplicaSet>> {
        if db.replicas.is_empty()
            || cfg.read_routing_for(&db.name, user) == ReadRouting::PrimaryOnly
        {
            return None;
        }
        let key = (db.name.clone(), user.to_owned());
        if let Some(s) = self.replica_sets.get(&key) {
            return Some(s.clone());
        }
        let password = match cfg.knows_user(user) {
            true => cfg.server_password(user).cloned(),
            // Removed from the users table while its clients are logged in: they go on
            // with what the primary pool logs in with.
            false => self
                .pools
                .get(&key)
                .and_then(|p| p.password())
                .map(|p| (*p).clone()),
        };
        let topology = self
            .topologies
            .entry(db.name.clone())
            .or_insert_with(|| {
                // The health loops log in as the first user that needs them.
                let settings = self.health_settings(cfg, user);
                let stop = self.health_stop.child_token();
                match stopped {
                    Some(t) => t.succeed(&db.primary, &db.replicas, settings, stop),
                    None => Topology::start(&db.name, &db.primary, &db.replicas, settings, stop),
                }
            })
            .clone();
        let pools = db
            .replicas
            .iter()
            .map(|addr| {
                let kept = old.and_then(|o| o.pools.iter().find(|p| *p.addr() == *addr));
                match kept {
                    Some(p) => {
                        p.update_target(addr, password.as_ref());
                        p.clone()
                    }
                    None => Pool::new(
                        db.name.clone(),
                        user.to_owned(),
                        Role::Replica,
                        addr.clone(),
                        password.clone(),
                        self.pool_settings(cfg, &db.name, user, Role::Replica),
                    ),
                }
            })
            .collect();
        let writes = WriteMark::default();
        if let Some(o) = old {
            writes.record(o.writes.get());
        }
        let set = Arc::new(ReplicaSet {
            topology,
            pools,
            writes,
        });
        self.replica_sets.insert(key, set.clone());
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

    /// Rebuilds the client TLS acceptor if its settings or files changed (every second,
    /// and at reload). A broken file is logged; the previous certificate stays.
    pub fn refresh_client_tls(&self) {
        match self.client_tls.refresh(&self.config.load().client_tls) {
            Ok(true) => tracing::info!("client TLS certificate loaded"),
            Ok(false) => {}
            Err(e) => {
                // Once per change of the error, not every second.
                if self.client_tls.note_error(&e) {
                    tracing::error!(error = %e, "client TLS certificate not reloaded; the previous one stays");
                }
            }
        }
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
        let shared = Shared::new(config);
        shared
            .client_tls
            .refresh(&shared.config.load().client_tls)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Proxy {
            shared,
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
        tokio::spawn(check_server_tls(shared.clone()));
        tokio::spawn(peers::run(shared.clone()));
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok((stream, peer)) => self.serve(stream, peer),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        // Sessions wait for the drain on their registry entry's waker (see
        // `ClientEntry::interrupted`), and see it in `draining`: set before the wake-ups,
        // so a client that registers after them finds it set.
        shared.draining.store(true, Ordering::Release);
        for c in shared.client_list.iter() {
            c.wake();
        }
        // Handover (README, "Restart without dropped connections"): with SO_REUSEPORT the
        // kernel keeps hashing new connections to this listener until it is closed, and
        // closing it resets every connection that completed its handshake but was not
        // accepted yet: a client that did nothing wrong would see "connection reset".
        // So take what is queued first, without waiting, and serve it like any other
        // client; the new connections after the close go to the other pgmux on the port.
        // (A connection that completes in the microseconds between the last accept and
        // the close is still reset unless net.ipv4.tcp_migrate_req = 1, which moves the
        // queue to another listener of the port.)
        let queued = self.accept_queued();
        drop(self.listener);
        self.tracker.close();
        let timeout = if shared
            .fast_shutdown
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            Duration::ZERO
        } else {
            shared.config.load().shutdown_timeout
        };
        if queued > 0 {
            tracing::info!(clients = queued, "accepted the clients queued at shutdown");
        }
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
                "shutdown_timeout reached; cancelling what still runs and closing the clients"
            );
            // Each remaining client is told (57P01) and its server's running query is
            // cancelled (a busy server comes back to its pool, which cancels, then
            // closes it), so nothing is left running on PostgreSQL after pgmux exits.
            for c in shared.client_list.iter() {
                c.kill();
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while shared.all_pools().iter().any(|p| p.in_use() > 0)
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        maintenance.abort();
        shared.health_stop.cancel();
        for p in shared.all_pools() {
            p.close_idle();
        }
        // Let the Terminate messages go out.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Spawns the session of an accepted client.
    fn serve(&self, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
        tcp::apply_or_warn(&stream, &self.shared.config.load().tcp, "client");
        let fut = session::run(self.shared.clone(), stream, peer);
        tracing::trace!(bytes = std::mem::size_of_val(&fut), "session future size");
        self.tracker.spawn(fut);
    }

    /// Accepts and serves every connection already in the listener's queue, without
    /// waiting for more; returns how many. A plain `accept(2)` on the (non-blocking)
    /// socket, not tokio's: tokio tries the socket only once epoll has reported it
    /// readable, and a connection that arrived just now may not have been reported yet.
    fn accept_queued(&self) -> usize {
        let sock = socket2::SockRef::from(&self.listener);
        let mut n = 0;
        loop {
            let (conn, addr) = match sock.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return n,
                Err(e) => {
                    tracing::warn!(error = %e, "accept of a queued client failed at shutdown");
                    return n;
                }
            };
            let stream = std::net::TcpStream::from(conn);
            let stream = match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register a queued client at shutdown");
                    continue;
                }
            };
            let peer = addr
                .as_socket()
                .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
            n += 1;
            self.serve(stream, peer);
        }
    }
}

/// Periodic upkeep: client TLS files looked at again, idle server reaping above
/// min_pool_size, then opening servers up to it.
/// At start-up, every server whose sslmode requires TLS gets one handshake (no login:
/// PostgreSQL does not log a connection that closes before its startup packet), so a
/// certificate that will not be accepted is reported at once, naming the server, not
/// only at the first client's login.
async fn check_server_tls(shared: Arc<Shared>) {
    let cfg = shared.config.load_full();
    let servers = cfg
        .databases
        .values()
        .flat_map(|d| std::iter::once(&d.primary).chain(d.replicas.iter()))
        .filter(|a| a.tls.mode.requires_tls())
        .cloned()
        .collect::<Vec<_>>();
    for addr in &servers {
        let name = backend::display_addr(addr);
        let check = tokio::time::timeout(
            cfg.server_connect_timeout,
            backend::ServerStream::connect_with(addr, &cfg.tcp),
        )
        .await;
        match check {
            Ok(Ok(mut stream)) => {
                tracing::info!(server = %name, sslmode = addr.tls.mode.as_str(), "server TLS handshake succeeded");
                // close_notify, then read to PostgreSQL's EOF: closing with its TLS 1.3
                // session tickets unread would reset the connection, which it logs.
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = stream.shutdown().await;
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
            Ok(Err(backend::ConnectError::Tls(e))) => {
                tracing::error!(server = %name, error = %e, "SSL connection to server failed")
            }
            // Unreachable servers are reported when pools connect.
            Ok(Err(backend::ConnectError::Io(_))) | Err(_) => {}
        }
    }
}

async fn maintenance(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        shared.refresh_client_tls();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A configured password's SCRAM keys are derived once (PBKDF2, 4096 rounds: about
    /// 3 ms of CPU that PgBouncer with a plain-text auth_file spends on every login), and
    /// again only when the password changes. Every login of the user then sees one salt.
    #[test]
    fn scram_keys_are_derived_once_per_password() {
        let shared = Shared::new(Config::default());
        let first = shared.verifier("app", "pw-1");
        assert!(Arc::ptr_eq(&first, &shared.verifier("app", "pw-1")));
        assert!(!Arc::ptr_eq(&first, &shared.verifier("other", "pw-1")));
        let changed = shared.verifier("app", "pw-2");
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_ne!(first.salt, changed.salt, "a new password gets a new salt");
        assert!(Arc::ptr_eq(&changed, &shared.verifier("app", "pw-2")));
    }

    /// Connections that completed their handshake but were not accepted yet when the drain
    /// starts are accepted and answered, not reset by the listener's close (the restart
    /// on the same port relies on it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_queued_at_shutdown_are_served_not_reset() {
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shutdown_timeout: Duration::from_millis(300),
            ..Config::default()
        };
        let proxy = Proxy::bind(config).await.unwrap();
        let addr = proxy.local_addr().unwrap();
        // In the kernel's accept queue: nothing accepts before run().
        let mut queued: Vec<std::net::TcpStream> = (0..5)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                let mut ssl_request = 8i32.to_be_bytes().to_vec();
                ssl_request.extend_from_slice(&protocol::SSL_REQUEST.to_be_bytes());
                s.write_all(&ssl_request).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s
            })
            .collect();
        proxy.shared.shutdown.cancel();
        proxy.run().await;
        for (i, s) in queued.iter_mut().enumerate() {
            let mut answer = [0u8; 1];
            s.read_exact(&mut answer)
                .unwrap_or_else(|e| panic!("queued connection {i}: {e}"));
            assert_eq!(&answer, b"N", "queued connection {i}");
        }
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "the listener is closed after the drain"
        );
    }
}
