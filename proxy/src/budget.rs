//! Server connection budget per PostgreSQL node: `max_db_connections`, and this pgmux's
//! share of `total_server_connections` among its peers.
//!
//! Every pool holds a permit per server connection it opens (or is opening) to a node
//! (host:port), across all users, databases and roles. At the limit a pool that needs a
//! new connection first closes an idle server of another pool on the same node (the
//! freed permit goes to it), else waits, within its client's `query_wait_timeout`, for
//! a permit to be freed or for another pool's server to turn idle. A permit is freed
//! when its [`crate::backend::Server`] is dropped, so no path that closes a server can
//! forget it. Lowering the limit closes idle servers over it at once and busy ones
//! never (their transactions finish; the pool then stays below).
//!
//! The limit in force on a node is the smaller of `max_db_connections` and
//! `total / peers` (at least 1), where `peers` is the number of addresses the headless
//! Service name `peer_dns_name` resolves to (see [`crate::peers`]), re-evaluated every
//! `peer_check_interval`, and `total` is `total_server_connections`, or with `"auto"`
//! the node's own `max_connections − superuser_reserved_connections −
//! reserved_server_connections`, read on the first connection pgmux opens to it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use dashmap::DashMap;
use pgmux_config::{ServerAddr, TotalBudget};
use tokio::sync::Notify;

use crate::pool::Pool;

type NodeKey = (String, u16);

/// Open (or opening) server connections to one node.
#[derive(Default)]
pub struct NodeBudget {
    /// The limit in force on this node; 0: none.
    limit: AtomicUsize,
    /// `max_connections − superuser_reserved_connections` as the node reported it; 0:
    /// not known yet.
    capacity: AtomicUsize,
    open: AtomicUsize,
    /// Pools waiting for a permit (they are told when a server turns idle too).
    waiting: AtomicUsize,
    freed: Notify,
}

/// One server connection's share of its node's budget; freed on drop.
pub struct Permit {
    node: Arc<NodeBudget>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.node.open.fetch_sub(1, Ordering::AcqRel);
        self.node.freed.notify_one();
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

/// What waiting for a permit gave.
pub enum Acquired {
    Permit(Permit),
    /// The waiting pool has an idle server now.
    OwnIdle,
    TimedOut,
}

/// The budgets of every node, and the inputs of the limit in force.
#[derive(Default)]
pub struct Budgets {
    /// `max_db_connections`; 0: none.
    configured: AtomicUsize,
    /// `total_server_connections` when a number; 0: none.
    total: AtomicUsize,
    /// `total_server_connections = "auto"`.
    auto: std::sync::atomic::AtomicBool,
    /// `reserved_server_connections`.
    reserve: AtomicUsize,
    /// Live pgmux instances found through `peer_dns_name` (at least 1).
    peers: AtomicUsize,
    nodes: DashMap<NodeKey, Arc<NodeBudget>>,
    pools: Mutex<Vec<Weak<Pool>>>,
    /// Pools waiting for a permit on any node: while none waits, a server turning idle
    /// (every transaction's end) costs one load here, no node lookup.
    waiting: AtomicUsize,
}

impl Budgets {
    /// The limit in force on `addr`'s node (0: none).
    pub fn limit_for(&self, addr: &ServerAddr) -> usize {
        self.node(&Self::key(addr)).limit.load(Ordering::Relaxed)
    }

    /// Pgmux instances the total is divided by.
    pub fn peers(&self) -> usize {
        self.peers.load(Ordering::Relaxed).max(1)
    }

    /// Sets `max_db_connections`, `total_server_connections` and
    /// `reserved_server_connections` (config or live change) and applies the limits.
    pub fn configure(&self, max_db_connections: usize, total: TotalBudget, reserve: usize) {
        self.configured.store(max_db_connections, Ordering::Relaxed);
        let (fixed, auto) = match total {
            TotalBudget::Off => (0, false),
            TotalBudget::Fixed(n) => (n, false),
            TotalBudget::Auto => (0, true),
        };
        self.total.store(fixed, Ordering::Relaxed);
        self.auto.store(auto, Ordering::Relaxed);
        self.reserve.store(reserve, Ordering::Relaxed);
        self.apply();
    }

    /// A new count of live peers (peer discovery) and applies the resulting limits.
    pub fn set_peers(&self, peers: usize) {
        self.peers.store(peers.max(1), Ordering::Relaxed);
        self.apply();
    }

    /// `total_server_connections = "auto"` and `addr`'s node has not reported its
    /// capacity yet: the next server opened there should ask.
    pub fn needs_capacity(&self, addr: &ServerAddr) -> bool {
        self.auto.load(Ordering::Relaxed)
            && self.node(&Self::key(addr)).capacity.load(Ordering::Relaxed) == 0
    }

    /// What `addr`'s node reported: `max_connections − superuser_reserved_connections`.
    pub fn set_capacity(&self, addr: &ServerAddr, capacity: usize) {
        let key = Self::key(addr);
        let node = self.node(&key);
        node.capacity.store(capacity.max(1), Ordering::Relaxed);
        self.apply_node(&key, &node);
    }

    fn apply(&self) {
        let nodes: Vec<(NodeKey, Arc<NodeBudget>)> = self
            .nodes
            .iter()
            .map(|n| (n.key().clone(), n.value().clone()))
            .collect();
        for (key, node) in nodes {
            self.apply_node(&key, &node);
        }
    }

    /// The limit for `node` from the current inputs.
    fn compute(&self, node: &NodeBudget) -> usize {
        let configured = self.configured.load(Ordering::Relaxed);
        let total = match self.total.load(Ordering::Relaxed) {
            0 if self.auto.load(Ordering::Relaxed) => {
                match node.capacity.load(Ordering::Relaxed) {
                    // Not known yet: one connection, the one that asks.
                    0 => 1,
                    cap => cap
                        .saturating_sub(self.reserve.load(Ordering::Relaxed))
                        .max(1),
                }
            }
            n => n,
        };
        let unknown = total == 1
            && self.auto.load(Ordering::Relaxed)
            && node.capacity.load(Ordering::Relaxed) == 0;
        let share = match total {
            0 => None,
            _ if unknown => Some(1),
            t => Some((t / self.peers()).max(1)),
        };
        match (configured, share) {
            (0, None) => 0,
            (0, Some(s)) => s,
            (c, None) => c,
            (c, Some(s)) => c.min(s),
        }
    }

    fn apply_node(&self, key: &NodeKey, node: &Arc<NodeBudget>) {
        let limit = self.compute(node);
        let old = node.limit.swap(limit, Ordering::Relaxed);
        if old == limit {
            return;
        }
        tracing::info!(server = %format!("{}:{}", key.0, key.1), limit, peers = self.peers(), "server connections limit changed");
        if limit == 0 || (old != 0 && limit >= old) {
            // Raised: waiters may go on.
            node.freed.notify_waiters();
            return;
        }
        // Lowered: idle servers over the limit close now.
        while node.open.load(Ordering::Acquire) > limit {
            if !self.evict_idle(key, None) {
                break;
            }
        }
    }

    /// Registers a pool whose idle servers may be closed for another pool's benefit.
    pub fn register(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    fn node(&self, key: &NodeKey) -> Arc<NodeBudget> {
        if let Some(n) = self.nodes.get(key) {
            return n.clone();
        }
        let node = self
            .nodes
            .entry(key.clone())
            .or_insert_with(|| {
                let n = NodeBudget::default();
                n.limit.store(self.compute(&n), Ordering::Relaxed);
                Arc::new(n)
            })
            .clone();
        node
    }

    fn key(addr: &ServerAddr) -> NodeKey {
        (addr.host.clone(), addr.port)
    }

    /// Connections open (or opening) to `addr`'s node.
    pub fn open(&self, addr: &ServerAddr) -> usize {
        self.nodes
            .get(&Self::key(addr))
            .map_or(0, |n| n.open.load(Ordering::Relaxed))
    }

    /// A permit if the node is below the limit.
    pub fn try_acquire(&self, addr: &ServerAddr) -> Option<Permit> {
        let node = self.node(&Self::key(addr));
        let limit = node.limit.load(Ordering::Relaxed);
        let mut cur = node.open.load(Ordering::Acquire);
        loop {
            if limit != 0 && cur >= limit {
                return None;
            }
            match node
                .open
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(Permit { node }),
                Err(now) => cur = now,
            }
        }
    }

    /// A permit for `pool`'s node: at once below the limit; else after closing an idle
    /// server of another pool on the node, or when one is freed, until `deadline`.
    /// [`Acquired::OwnIdle`]: meanwhile one of `pool`'s own servers turned idle; the
    /// caller should take it instead of opening one.
    pub async fn acquire(
        &self,
        addr: &ServerAddr,
        pool: &Pool,
        deadline: tokio::time::Instant,
    ) -> Acquired {
        let key = Self::key(addr);
        let node = self.node(&key);
        node.waiting.fetch_add(1, Ordering::AcqRel);
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(self, &node);
        loop {
            let freed = node.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(p) = self.try_acquire(addr) {
                return Acquired::Permit(p);
            }
            if pool.has_idle() {
                return Acquired::OwnIdle;
            }
            // The permit of the closed server arrives through `freed` (it is freed when
            // the server's Terminate has been sent).
            self.evict_idle(&key, Some(pool));
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return match self.try_acquire(addr) {
                    Some(p) => Acquired::Permit(p),
                    None => Acquired::TimedOut,
                };
            }
        }
    }

    /// One of `pool`'s servers turned idle: a pool waiting for a permit on that node may
    /// close it.
    pub fn idle_available(&self, pool: &Pool) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(n) = self.nodes.get(&Self::key(&pool.addr())) {
            if n.waiting.load(Ordering::Acquire) > 0 {
                n.freed.notify_one();
            }
        }
    }

    /// Closes the least recently used idle server on `key`'s node in a pool other than
    /// `except`. True if one was closed.
    fn evict_idle(&self, key: &NodeKey, except: Option<&Pool>) -> bool {
        let pools: Vec<Arc<Pool>> = {
            let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.iter().filter_map(Weak::upgrade).collect()
        };
        pools
            .iter()
            .filter(|p| !except.is_some_and(|e| std::ptr::eq(e, &***p)))
            .filter(|p| {
                let a = p.addr();
                a.host == key.0 && a.port == key.1
            })
            .any(|p| p.evict_one_idle())
    }
}

/// Counts a waiting pool while it waits.
struct Waiting<'a>(&'a Budgets, &'a NodeBudget);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.1.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}
