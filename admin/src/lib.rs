//! pgmux-admin: the operator's surface.
//!
//! Map:
//! * [`Control`] — the small trait the proxy implements: snapshots of pools, clients and
//!   servers, and the live operations (limits, pause/resume, reload, reconnect, kill).
//!   This crate never reaches into proxy internals; it only sees these types.
//! * [`http`] — the admin listener (axum): JSON API under `/api/v1`, `/healthz`,
//!   `/readyz`, `/metrics`, bearer-token rules for mutating and (optionally) read-only
//!   endpoints.
//! * [`metrics`](mod@crate::metrics) — the Prometheus recorder: histograms the proxy
//!   records into on its hot path, counters and gauges set from a [`Control`] snapshot at
//!   scrape time.
//! * [`console`] — the PgBouncer-compatible SQL console (`SHOW POOLS`, `PAUSE`, `SET` …):
//!   parses a command and answers with a table or a command tag. The proxy's session
//!   speaks the wire protocol around it.
//!
//! The HTTP API and the console run the same [`Control`] calls, so a live change made
//! from one is the same change made from the other.
//!
//! Dependencies point one way: the proxy crate depends on this one (it implements
//! [`Control`], records into [`metrics::PoolHistograms`] and hands console queries to
//! [`console::execute`]); this crate knows nothing of the proxy's types.

pub mod console;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod metrics;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use serde::Serialize;

/// A boxed future, for the async operations of [`Control`] (which is used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the proxy exposes to the admin surface.
pub trait Control: Send + Sync + 'static {
    /// One row per pool (primary and replica pools).
    fn pools(&self) -> Vec<PoolInfo>;
    /// One row per client connection (logged in or logging in).
    fn clients(&self) -> Vec<ClientInfo>;
    /// One row per server connection (open or being opened).
    fn servers(&self) -> Vec<ServerInfo>;
    /// One row per configured database.
    fn databases(&self) -> Vec<DatabaseInfo>;
    /// One row per replica: health, lag, and where transactions were routed.
    fn replicas(&self) -> Vec<ReplicaInfo>;
    /// Process-wide figures.
    fn totals(&self) -> Totals;
    /// The effective configuration as (key, value) pairs, secrets redacted. Keys are
    /// the configuration-file keys (`pool_size`, `databases.app.url`, …).
    fn config(&self) -> Vec<ConfigItem>;

    /// Changes one pool's limits live. Validates everything before changing anything.
    fn set_pool_limits(
        &self,
        database: &str,
        user: &str,
        patch: &PoolPatch,
    ) -> Result<(), ControlError>;
    /// Changes global settings live (`max_client_conn`, `pool_size`, timeouts …), given
    /// as (key, value) in the configuration file's spelling. All or nothing.
    fn set_config(&self, changes: &[(String, String)]) -> Result<(), ControlError>;

    /// New transactions (of `database`, or all) wait; running ones finish. Resolves when
    /// no server of those pools is in use any more (their idle servers are then closed,
    /// so the database can be restarted), or with an error after `timeout`.
    fn pause(
        &self,
        database: Option<&str>,
        timeout: std::time::Duration,
    ) -> BoxFuture<'_, Result<(), ControlError>>;
    /// Lets waiting transactions go on.
    fn resume(&self, database: Option<&str>) -> Result<(), ControlError>;
    /// Re-reads the configuration file and environment and applies the difference live.
    /// An invalid configuration is rejected and the old one stays.
    fn reload(&self) -> Result<(), ControlError>;
    /// Recycles server connections (of `database`, or all): idle ones now, busy ones
    /// when their transaction ends.
    fn reconnect(&self, database: Option<&str>) -> Result<(), ControlError>;
    /// Closes every client and server connection of `database` at once.
    fn kill(&self, database: &str) -> Result<(), ControlError>;

    /// Readiness: accepting clients and the primaries reachable.
    fn ready(&self) -> BoxFuture<'_, Readiness>;
    /// pgmux's version string.
    fn version(&self) -> String;
    /// Who may use the HTTP API (read at every request, so a reload applies at once).
    fn auth(&self) -> AdminAuth;
}

/// Access rules of the admin HTTP API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAuth {
    /// `admin.token`: when set, mutating endpoints need `Authorization: Bearer <token>`;
    /// when unset they are refused from non-loopback peers.
    pub token: Option<String>,
    /// `admin.protect_reads`: read-only endpoints and `/metrics` need the token too
    /// (the probes stay open).
    pub protect_reads: bool,
}

/// A failed admin operation. `field` names the offending key for validation errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Bad input (HTTP 400): names the field.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// No such database/pool (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The operation could not complete (HTTP 409 / 503), e.g. a pause timed out or the
    /// configuration file failed to load.
    #[error("{0}")]
    Failed(String),
}

impl ControlError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ControlError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A live change of one pool's limits. Absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolPatch {
    pub pool_size: Option<usize>,
    pub min_pool_size: Option<usize>,
}

/// Role of a pool's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// One pool: occupancy now, limits, and totals since it was created.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolInfo {
    pub database: String,
    pub user: String,
    pub role: Role,
    /// `host:port` (or the unix socket directory and port) of the pool's server.
    pub server: String,
    pub pool_mode: &'static str,
    pub paused: bool,
    pub limits: PoolLimits,
    pub servers: ServerCounts,
    pub clients: ClientCounts,
    /// Longest current wait for a server, microseconds (0 when nobody waits).
    pub max_wait_us: u64,
    pub totals: PoolTotals,
}

/// Effective limits of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolLimits {
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub max_client_conn: usize,
    pub query_wait_timeout_ms: u64,
    pub server_idle_timeout_ms: u64,
    pub max_prepared_statements: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ServerCounts {
    /// Linked to a client (in a transaction).
    pub active: usize,
    pub idle: usize,
    /// Being opened (connect + login).
    pub connecting: usize,
    /// Of the active ones: held by a client between its transactions too, because it made
    /// session state (`session_state_action = "pin"`).
    pub pinned: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClientCounts {
    /// Logged in to this pool and not waiting for a server (linked or between
    /// transactions), as PgBouncer's `cl_active`.
    pub active: usize,
    /// Waiting for a server.
    pub waiting: usize,
}

/// Totals since the pool was created.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolTotals {
    pub transactions: u64,
    /// ReadyForQuery answers: one per simple query or extended-protocol Sync.
    pub queries: u64,
    /// Bytes from clients to servers.
    pub bytes_received: u64,
    /// Bytes from servers to clients.
    pub bytes_sent: u64,
    pub wait_time_us: u64,
    pub transaction_time_us: u64,
    pub query_time_us: u64,
    /// ErrorResponses sent to this pool's clients (from the server or from pgmux).
    pub errors: u64,
    /// `errors` by SQLSTATE class (the code's first two characters).
    pub errors_by_class: BTreeMap<String, u64>,
    pub servers_opened: u64,
    pub servers_closed: u64,
    pub connect_errors: u64,
    pub wait_timeouts: u64,
    /// Units run again on another server because theirs died before answering.
    pub units_retried: u64,
    /// Queries cancelled by `query_timeout`.
    pub query_timeouts: u64,
    pub statements_prepared: u64,
    pub statement_cache_hits: u64,
    pub statement_evictions: u64,
    /// Statements that make session state (`session_state_action`): clients whose server
    /// was pinned, statements let through with a warning, statements refused.
    pub session_pins: u64,
    pub session_state_warned: u64,
    pub session_state_rejected: u64,
    /// Session-state statements by client application_name and kind (`set`, `listen`,
    /// `advisory_lock`, `cursor_with_hold`, `temp_table`, `prepare`, `set_config`,
    /// `load`); at most 64 pairs, later ones under `(other)`.
    pub session_state_sources: Vec<SessionStateSource>,
}

/// One row of [`PoolTotals::session_state_sources`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionStateSource {
    pub application_name: String,
    pub feature: String,
    pub count: u64,
}

/// One client connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientInfo {
    pub id: u64,
    /// The client's address (`ip:port`).
    pub addr: String,
    /// The pgmux address it connected to.
    pub local_addr: String,
    pub user: String,
    pub database: String,
    pub application_name: String,
    /// `login`, `idle` (between transactions), `waiting` (for a server), `active`
    /// (linked to a server).
    pub state: &'static str,
    /// Unix time of the connection, seconds.
    pub connect_time: u64,
    pub age_ms: u64,
    /// Current wait for a server, microseconds (0 unless waiting).
    pub wait_us: u64,
    /// The linked server's id, when active.
    pub server_id: Option<u64>,
    /// The linked server's backend process id, when active.
    pub server_pid: Option<i32>,
    /// The key the client got in BackendKeyData (its "pid" for cancel requests).
    pub cancel_pid: i32,
    pub tls: bool,
}

/// One server connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerInfo {
    pub id: u64,
    pub database: String,
    pub user: String,
    pub role: Role,
    /// The server's address (`host:port`).
    pub addr: String,
    /// `connecting`, `idle`, `active` (linked to a client).
    pub state: &'static str,
    pub connect_time: u64,
    pub age_ms: u64,
    /// Time since it last went idle or was linked, milliseconds.
    pub idle_ms: u64,
    pub backend_pid: Option<i32>,
    /// The linked client's id, when active.
    pub client_id: Option<u64>,
    /// Named prepared statements this server holds.
    pub prepared_statements: usize,
    pub application_name: String,
    pub tls: bool,
}

/// One configured database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatabaseInfo {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// The database name on the server.
    pub dbname: String,
    pub replicas: Vec<String>,
    /// The database's pool_size override, else the global one.
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub max_client_conn: usize,
    /// Server connections open to this database, all users and roles.
    pub current_connections: usize,
    /// Server connections allowed per PostgreSQL node (`max_db_connections`, or this
    /// instance's share of `total_server_connections`); 0: no limit.
    pub max_connections: usize,
    pub paused: bool,
}

/// One replica of a database, with the routing counters of that database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaInfo {
    pub database: String,
    pub addr: String,
    pub healthy: bool,
    /// Replay lag behind the primary, milliseconds (None before the first check).
    pub lag_ms: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub replay_lsn: Option<String>,
    /// Transactions running on it now.
    pub outstanding: u64,
    /// Transactions it served.
    pub transactions: u64,
    /// Consecutive failed health checks.
    pub failures: u64,
    pub last_error: Option<String>,
}

/// Where a database's transactions went (read routing), totals since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteCounts {
    pub database: String,
    pub primary: u64,
    pub replica: u64,
    /// Kept on the primary, by reason (`write_before`, `lag`, `unhealthy`,
    /// `unparseable`, `hint`), and units sent again after a replica died (`retried`).
    pub kept: BTreeMap<String, u64>,
    pub retried: u64,
}

/// Process-wide figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub version: String,
    pub uptime_ms: u64,
    /// Clients connected now (logging in included).
    pub clients: usize,
    pub max_client_conn: usize,
    /// Ended client sessions by reason (`client_terminate`, `query_wait_timeout`, …).
    pub disconnects: BTreeMap<String, u64>,
    /// Server connections closed, by reason (`idle_timeout`, `reconnect`, `killed`, …).
    pub server_closes: BTreeMap<String, u64>,
    /// Shutting down: not accepting clients any more.
    pub draining: bool,
    /// Read routing, per database with replicas.
    pub routing: Vec<RouteCounts>,
}

/// One effective setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigItem {
    pub key: String,
    pub value: String,
    pub default: String,
    /// Can be changed live with `PATCH /api/v1/config` or `SET`.
    pub changeable: bool,
}

/// The answer of a readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Why not, when not ready (`draining`, `primary app unreachable: …`).
    pub reasons: Vec<String>,
}
