//! pgmux configuration.
//!
//! # Pipeline
//!
//! [`load`] runs three stages:
//!
//! 1. **parse** — every source is parsed into a *layer* of optional values, each
//!    tagged with the key it came from and its [`Origin`] (file + 1-based line,
//!    environment variable, or flag). Type errors (not an integer, bad duration,
//!    bad URL, bad function name, unknown key, ...) are reported here.
//! 2. **layer** — built-in defaults < TOML file < environment < command-line
//!    flags; a later source replaces the value of an earlier one.
//! 3. **validate** — range checks (`pool_size >= 1`, `max_message_size` bounds,
//!    `max_replica_lag > 0`, `replica_check_interval` bounds, at least one
//!    database, ...) run on the *layered* values, so an invalid file
//!    value that is overridden by the environment is not an error. Errors name the
//!    key and the origin of the value that actually won.
//!
//! # Invariants
//!
//! * Loading never panics; every problem is a [`ConfigError`] whose `Display`
//!   reads `"<origin>: <key>: <message>"`.
//! * Passwords are wrapped in [`Secret`] and never appear in `Debug`, `Display`,
//!   error messages or [`Config::to_redacted_toml`].
//! * A successfully loaded [`Config`] has at least one database, every pool size
//!   is `>= 1`, `max_message_size` is within `1024 ..= 1 GiB`, `max_replica_lag`
//!   is `> 0`, `replica_check_interval` is within `10ms ..= 60s`, and every
//!   `write_functions` entry is non-empty, trimmed, lowercase and made only of
//!   `[a-z0-9_.$]` (no empty part between dots).
//! * `listen` must be an IP socket address (`"0.0.0.0:6432"`, `"[::]:6432"`);
//!   the single host name `localhost` is accepted and mapped to `127.0.0.1`.
//!   No DNS resolution is performed.
//! * Sizes: `kB`/`KB`/`KiB` = 1024 bytes, `MB`/`MiB` = 1024², `GB`/`GiB` = 1024³
//!   (PostgreSQL convention), or plain integer bytes.
//! * Durations: humantime strings (`"30s"`, `"5m"`, `"250ms"`) or a plain
//!   integer number of seconds (also as a string, e.g. in environment variables).
//! * Lists (`write_functions`): a TOML array of strings, or one comma-separated
//!   string (the only form an environment variable can take; also accepted in
//!   the file). Every item is checked; an empty item is an error.
//! * Read routing: `read_routing` can be set globally, per database
//!   (`[databases.NAME]`) and per user (`[users.NAME]`); the per-user setting
//!   wins over the per-database one, which wins over the global one (see
//!   [`Config::read_routing_for`]).
//! * Admin: the `[admin]` table (`listen`, `token`, `protect_reads`; env
//!   `PGMUX_ADMIN_*`, flag `--admin-listen`), and the console's `admin_users` /
//!   `stats_users` (lists like `write_functions`). Without any `stats_users`, the
//!   `DATABASE_URL` user is the stats user. The token is a [`Secret`], at least 16
//!   characters.
//! * Live changes: [`Config::with_changes`] applies `(key, value)` pairs for the keys
//!   that can change on a running pgmux (limits and timeouts), with the same parsing and
//!   range checks as loading (origin [`Origin::Live`]); anything else is refused.
//! * `DATABASE_URL` replaces the primary of the database named by the URL's
//!   database name; that database's replicas from the file are dropped (they
//!   belong to the replaced server) while its `pool_size` and `read_routing`
//!   overrides are kept.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, time::Duration};

pub mod authfile;
mod file;
mod pgurl;
mod render;
mod scalar;
#[cfg(test)]
mod tests;

pub use authfile::AuthSecret;
use pgurl::ParsedUrl;
use scalar::{Raw, Scalars, Sourced};

/// Raw values from command-line flags (strings, so this crate validates them uniformly and names the flag).
#[derive(Debug, Default, Clone)]
pub struct Flags {
    /// `--config FILE`
    pub config: Option<PathBuf>,
    /// `--listen`
    pub listen: Option<String>,
    /// `--database-url`
    pub database_url: Option<String>,
    /// `--read-database-url` (comma-separated list)
    pub read_database_url: Option<String>,
    /// `--pool-size`
    pub pool_size: Option<String>,
    /// `--max-client-conn`
    pub max_client_conn: Option<String>,
    /// `--admin-listen`
    pub admin_listen: Option<String>,
}

/// Fully layered and validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Client listen address; default `0.0.0.0:6432`.
    pub listen: SocketAddr,
    /// Maximum concurrent client connections; default 5000, `>= 1`.
    pub max_client_conn: usize,
    /// Global default server pool size; default 20, `>= 1`.
    pub pool_size: usize,
    /// Client authentication method; default SCRAM-SHA-256.
    pub auth_type: AuthType,
    /// Default 120s.
    pub query_wait_timeout: Duration,
    /// Default 15s.
    pub server_connect_timeout: Duration,
    /// Default 60s.
    pub client_login_timeout: Duration,
    /// Default 30s.
    pub shutdown_timeout: Duration,
    /// Default 10m; zero means never.
    pub server_idle_timeout: Duration,
    /// Close clients idle between transactions this long (`57P05`); default 0 = never.
    pub client_idle_timeout: Duration,
    /// Close clients idle inside a transaction this long (`25P03`; the server's
    /// transaction is rolled back and the server reused); default 0 = never.
    pub idle_transaction_timeout: Duration,
    /// Close a server connection at release once it is this old (with up to 10% random
    /// jitter, so connections opened together do not all go together); default 1h,
    /// 0 = never.
    pub server_lifetime: Duration,
    /// While a server cannot be reached (connection refused, timed out, "starting up"),
    /// a client's checkout tries again after this long, until its `query_wait_timeout`;
    /// default 1s, 0 = fail at once.
    pub server_login_retry: Duration,
    /// An idle server unused for longer than this is checked with a round trip (a Sync)
    /// before a client gets it; one that does not answer within `server_connect_timeout`
    /// is closed and another is taken. Default 30s; 0 = check every checkout.
    pub server_check_delay: Duration,
    /// A query (or pipeline) the server has not answered within this long is cancelled
    /// (the client gets `57014`); if the server does not answer the cancel within 5s more
    /// the server is closed and the client gets a FATAL `57014`. Default 0 = never.
    pub query_timeout: Duration,
    /// TCP keepalive on client and server sockets.
    pub tcp: TcpSettings,
    /// `auth_file`: users and secrets in PgBouncer's userlist.txt format; re-read by
    /// every load (start-up, reload).
    pub auth_file: Option<PathBuf>,
    /// The auth file's entries (empty without one). A `[users.NAME] password` or a
    /// password in a URL wins over the entry for the same user.
    pub auth_users: BTreeMap<String, AuthSecret>,
    /// `auth_user`: the role pgmux logs in as to run `auth_query` for users that neither
    /// the configuration nor the auth file knows; default none (no lookup). Its own
    /// password must be configured (checked at load unless `server_auth = "rds_iam"`).
    pub auth_user: Option<String>,
    /// `auth_query`: returns (user name, secret[, VALID UNTIL]) for `$1`; default
    /// [`DEFAULT_AUTH_QUERY`]. Always contains `$1`.
    pub auth_query: String,
    /// `auth_dbname`: the pgmux database (a `[databases]` name) the lookup runs in;
    /// default none = the database the client asked for.
    pub auth_dbname: Option<String>,
    /// `auth_query_cache`: how long a looked-up secret is reused; default 10s, 0 = no cache.
    pub auth_query_cache: Duration,
    /// Default 64 MiB; `1024 ..= 1 GiB`.
    pub max_message_size: usize,
    /// Tokio worker threads; default 0 = one per core.
    pub workers: usize,
    /// Named prepared statements kept per server connection (LRU); default 500,
    /// 0 disables statement tracking (named statements then pass through untouched).
    pub max_prepared_statements: usize,
    /// Global read routing; default [`ReadRouting::Auto`]. Overridden per database
    /// and per user, see [`Config::read_routing_for`].
    pub read_routing: ReadRouting,
    /// Scope of read-your-writes after a write commits; default [`ReadYourWrites::User`].
    pub read_your_writes: ReadYourWrites,
    /// What to do when a client changes session state that cannot follow it from server
    /// to server (`SET work_mem`, `LISTEN`, session advisory locks, …); default
    /// [`SessionStateAction::Pin`].
    pub session_state_action: SessionStateAction,
    /// Parameters whose plain `SET name = value` (one statement, outside a transaction)
    /// pgmux records per client and re-applies on every server the client gets, as it does
    /// for reported parameters, instead of treating it as session state; lowercase.
    /// Default [`DEFAULT_TRACK_EXTRA_PARAMETERS`].
    pub track_extra_parameters: Vec<String>,
    /// How pgmux logs in to PostgreSQL; default [`ServerAuth::Password`]. Read when a
    /// pool is created (a reload applies it to pools created afterwards).
    pub server_auth: ServerAuth,
    /// AWS region for `server_auth = "rds_iam"` tokens; default none (the proxy then
    /// uses `AWS_REGION`, then `AWS_DEFAULT_REGION`).
    pub aws_region: Option<String>,
    /// TLS toward clients (`client_tls_mode`, `client_tls_cert_file`,
    /// `client_tls_key_file`).
    pub client_tls: ClientTls,
    /// Default sslmode toward servers whose URL has no `sslmode`; default `prefer`.
    pub server_tls_mode: SslMode,
    /// Default CA bundle toward servers whose URL has no `sslrootcert`; default none.
    pub server_tls_ca_file: Option<PathBuf>,
    /// A replica whose replay lags the primary by more than this is taken out of
    /// rotation until it catches up; default 10s, `> 0`.
    pub max_replica_lag: Duration,
    /// How often each replica's health and replay position (and the primary's WAL
    /// position) are sampled; default 100ms, `10ms ..= 60s`.
    pub replica_check_interval: Duration,
    /// Extra functions that write or take locks, so that a `SELECT` calling one of
    /// them goes to the primary; added to the router's built-in list. Trimmed and
    /// lowercased, each made of `[a-z0-9_.$]` (`"app.bump_counter"` may be
    /// schema-qualified); default empty.
    pub write_functions: Vec<String>,
    /// Server connections each pool keeps open even when idle; default 0, at most
    /// `pool_size`.
    pub min_pool_size: usize,
    /// Server connections this pgmux opens to one PostgreSQL node (host:port), all
    /// pools together; default 0 = no limit. Live.
    pub max_db_connections: usize,
    /// Server connections all pgmux instances together may open to one node: each
    /// takes `total / peers` (at least 1), peers counted through `peer_dns_name`;
    /// default off. Live.
    pub total_server_connections: TotalBudget,
    /// With `total_server_connections = "auto"`: connections of a node's
    /// `max_connections` (after `superuser_reserved_connections`) left to clients that
    /// do not go through pgmux; default 10. Live.
    pub reserved_server_connections: usize,
    /// DNS name whose addresses are the live pgmux instances (a headless Service);
    /// default none (one instance).
    pub peer_dns_name: Option<String>,
    /// Ask this DNS server (UDP, `IP:port`) instead of the system resolver; default
    /// none.
    pub peer_dns_server: Option<SocketAddr>,
    /// How often the peers are counted; default 10s.
    pub peer_check_interval: Duration,
    /// Users that may run every command of the SQL admin console (database `pgbouncer`
    /// or `pgmux`); default none.
    pub admin_users: Vec<String>,
    /// Users that may run the console's read-only `SHOW` commands; default none, or the
    /// `DATABASE_URL` user when no source sets it (the zero-config start).
    pub stats_users: Vec<String>,
    /// The admin HTTP listener (`[admin]`).
    pub admin: Admin,
    /// Key = the database name clients ask for.
    pub databases: BTreeMap<String, Database>,
    /// Key = user name.
    pub users: BTreeMap<String, User>,
}

/// The admin HTTP listener's settings (`[admin]` in the file).
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// `admin.listen`; default `127.0.0.1:9930` (set `0.0.0.0:9930` in Kubernetes).
    pub listen: SocketAddr,
    /// `admin.token`: bearer token for mutating endpoints (at least 16 characters).
    /// Without it, mutating endpoints only answer loopback peers.
    pub token: Option<Secret>,
    /// `admin.protect_reads`: read-only endpoints (and `/metrics`) need the token too;
    /// default false. Probes stay open.
    pub protect_reads: bool,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: SocketAddr::from(([127, 0, 0, 1], 9930)),
            token: None,
            protect_reads: false,
        }
    }
}

/// One effective setting, for `SHOW CONFIG` and `GET /api/v1/config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: String,
    /// The value as the configuration file would spell it; secrets are `<redacted>`.
    pub value: String,
    pub default: String,
    /// Can be changed on a running pgmux ([`Config::with_changes`]).
    pub changeable: bool,
}

/// Client authentication method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    /// `"scram-sha-256"`
    ScramSha256,
    /// `"md5"`
    Md5,
    /// `"trust"`
    Trust,
}

impl AuthType {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Md5 => "md5",
            AuthType::Trust => "trust",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scram-sha-256" => Some(AuthType::ScramSha256),
            "md5" => Some(AuthType::Md5),
            "trust" => Some(AuthType::Trust),
            _ => None,
        }
    }
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the transactions of a database or user may run, when the database has replicas.
///
/// Set globally (`read_routing`), per database and per user; see
/// [`Config::read_routing_for`] for which one applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadRouting {
    /// `"auto"` (default): transactions that are provably read-only go to a healthy
    /// replica; everything else goes to the primary.
    #[default]
    Auto,
    /// `"primary_only"`: never use replicas.
    PrimaryOnly,
    /// `"replica_only"`: every transaction of this database/user goes to a replica
    /// when one is healthy, else to the primary. Meant for read-only reporting users
    /// (a write sent this way fails: replicas are read-only).
    ReplicaOnly,
}

impl ReadRouting {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadRouting::Auto => "auto",
            ReadRouting::PrimaryOnly => "primary_only",
            ReadRouting::ReplicaOnly => "replica_only",
        }
    }

    /// Parse the configuration spelling (surrounding whitespace and case ignored).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(ReadRouting::Auto),
            "primary_only" => Some(ReadRouting::PrimaryOnly),
            "replica_only" => Some(ReadRouting::ReplicaOnly),
            _ => None,
        }
    }
}

impl fmt::Display for ReadRouting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How pgmux authenticates its own connections to PostgreSQL (`server_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerAuth {
    /// `"password"` (default): the password from the URL, `[users.NAME]` or auth file.
    #[default]
    Password,
    /// `"rds_iam"`: a fresh AWS RDS IAM token (SigV4, 15 minutes valid) as the password.
    RdsIam,
}

impl ServerAuth {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerAuth::Password => "password",
            ServerAuth::RdsIam => "rds_iam",
        }
    }

    /// Parse the configuration spelling (surrounding whitespace and case ignored).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "password" => Some(ServerAuth::Password),
            "rds_iam" => Some(ServerAuth::RdsIam),
            _ => None,
        }
    }
}

/// `total_server_connections`: the budget all pgmux instances share per node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TotalBudget {
    /// `0` (default): no shared budget.
    #[default]
    Off,
    /// A number of connections.
    Fixed(usize),
    /// `"auto"`: each node's `max_connections − superuser_reserved_connections −
    /// reserved_server_connections`, read from the node at its first connection.
    Auto,
}

impl fmt::Display for TotalBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TotalBudget::Off => f.write_str("0"),
            TotalBudget::Fixed(n) => write!(f, "{n}"),
            TotalBudget::Auto => f.write_str("auto"),
        }
    }
}

/// libpq's `sslmode`, for pgmux's own connections to PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// No TLS (libpq would try TLS after a refused plaintext login; pgmux does not).
    Allow,
    /// TLS if the server offers it, without certificate checks; else plaintext. Default.
    #[default]
    Prefer,
    /// TLS or fail; the certificate is checked against a CA only if one is configured.
    Require,
    /// TLS, certificate chain checked against the CA.
    VerifyCa,
    /// TLS, chain checked and the host name must match the certificate.
    VerifyFull,
}

impl SslMode {
    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Parse libpq's spelling (surrounding whitespace and case ignored).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether a connection sends SSLRequest first.
    pub fn tries_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Allow)
    }

    /// Whether a server that refuses TLS is an error.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// TLS toward one server: its `sslmode` and CA bundle, from the URL's `sslmode` /
/// `sslrootcert` or else `server_tls_mode` / `server_tls_ca_file`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerTls {
    pub mode: SslMode,
    /// PEM CA bundle; `system` means the operating system's bundle.
    pub root_cert: Option<PathBuf>,
}

/// `client_tls_mode`: whether clients may or must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientTlsMode {
    /// SSLRequest is answered 'N'. The default without a certificate.
    #[default]
    Disable,
    /// TLS for clients that ask, plaintext for the others (`prefer` is the same; the
    /// default with a certificate).
    Allow,
    /// TLS only: a plaintext login gets FATAL 28000.
    Require,
}

impl ClientTlsMode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientTlsMode::Disable => "disable",
            ClientTlsMode::Allow => "allow",
            ClientTlsMode::Require => "require",
        }
    }

    /// Parse the configuration spelling; `prefer` is `allow`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "disable" => ClientTlsMode::Disable,
            "allow" | "prefer" => ClientTlsMode::Allow,
            "require" => ClientTlsMode::Require,
            _ => return None,
        })
    }
}

/// Client-facing TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientTls {
    pub mode: ClientTlsMode,
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 RSA or SEC1).
    pub key_file: Option<PathBuf>,
}

/// Read-your-writes scope: after a write transaction of the scope commits on the
/// primary, that scope's reads go to the primary until a replica has replayed past
/// the commit (its WAL position), so the scope never reads data older than its own
/// writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadYourWrites {
    /// `"user"` (default): a write by any client connection of a user sends that
    /// user's reads (on every connection) to the primary until a replica catches up.
    #[default]
    User,
    /// `"client"`: only the client connection that wrote has its reads kept on the
    /// primary until a replica catches up.
    Client,
    /// `"off"`: no tracking; a read right after a write may not see it.
    Off,
}

impl ReadYourWrites {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadYourWrites::User => "user",
            ReadYourWrites::Client => "client",
            ReadYourWrites::Off => "off",
        }
    }

    /// Parse the configuration spelling (surrounding whitespace and case ignored).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "user" => Some(ReadYourWrites::User),
            "client" => Some(ReadYourWrites::Client),
            "off" => Some(ReadYourWrites::Off),
            _ => None,
        }
    }
}

/// Parameters tracked per client by default besides the reported ones: what drivers set
/// when they connect (Ruby on Rails: `client_min_messages`; older JDBC drivers:
/// `extra_float_digits`).
pub const DEFAULT_TRACK_EXTRA_PARAMETERS: &[&str] = &["client_min_messages", "extra_float_digits"];

/// What pgmux does when a client's statement changes session state that transaction
/// pooling cannot carry from one server connection to the next: `SET` of a parameter
/// pgmux does not track (work_mem, search_path, role, …), `LISTEN`, session advisory
/// locks, `WITH HOLD` cursors, temporary tables, SQL-level `PREPARE`, `LOAD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionStateAction {
    /// `"pin"` (default): the server stays with that client until it disconnects (as in
    /// session pooling), and is closed then, so the state never reaches anyone else.
    #[default]
    Pin,
    /// `"warn"`: the statement runs and the server goes back to the pool as usual;
    /// pgmux logs a warning (with the client's application_name) and counts it. The
    /// state may then be seen by other clients: for finding such statements, not for
    /// production.
    Warn,
    /// `"reject"`: the statement is refused with SQLSTATE 0A000 (feature_not_supported)
    /// and nothing of it runs.
    Reject,
}

impl SessionStateAction {
    /// The configuration-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStateAction::Pin => "pin",
            SessionStateAction::Warn => "warn",
            SessionStateAction::Reject => "reject",
        }
    }

    /// Parse the configuration spelling (surrounding whitespace and case ignored).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pin" => Some(SessionStateAction::Pin),
            "warn" => Some(SessionStateAction::Warn),
            "reject" => Some(SessionStateAction::Reject),
            _ => None,
        }
    }
}

impl fmt::Display for SessionStateAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ReadYourWrites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A logical database clients can connect to.
#[derive(Debug, Clone, PartialEq)]
pub struct Database {
    /// The name clients ask for (same as the map key).
    pub name: String,
    /// Read-write server.
    pub primary: ServerAddr,
    /// Read-only servers.
    pub replicas: Vec<ServerAddr>,
    /// Per-database pool size override, `>= 1`.
    pub pool_size: Option<usize>,
    /// Per-database read routing override (a per-user one wins over it).
    pub read_routing: Option<ReadRouting>,
}

/// A user known to the proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// User name (same as the map key).
    pub name: String,
    /// Password; users without one cannot log in with password auth.
    pub password: Option<Secret>,
    /// Per-user pool size override, `>= 1`.
    pub pool_size: Option<usize>,
    /// Per-user read routing override (wins over the per-database one).
    pub read_routing: Option<ReadRouting>,
}

/// A PostgreSQL server endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerAddr {
    /// Host name, IP, or a unix-socket directory (starts with '/').
    pub host: String,
    /// Default 5432.
    pub port: u16,
    /// Database name on the server.
    pub dbname: String,
    /// Remaining URL query parameters (e.g. `sslmode`, `application_name`).
    pub params: BTreeMap<String, String>,
    /// TLS toward this server (resolved from `params` and the global defaults).
    pub tls: ServerTls,
}

impl ServerAddr {
    /// True if `host` is a unix-socket directory.
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The server as a `postgres://` URL (never contains credentials).
    pub fn to_url(&self) -> String {
        render::server_url(self)
    }
}

/// A password or token: Debug and Display print "<redacted>"; `expose()` returns the real string.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret string.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The real secret value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A configuration error: which key, where the value came from, and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{origin}: {key}: {message}")]
pub struct ConfigError {
    /// Key path, e.g. `pool_size`, `databases.app.url`, `READ_DATABASE_URL`.
    pub key: String,
    /// Where the offending value came from.
    pub origin: Origin,
    /// Human-readable description (never contains a password).
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, origin: Origin, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            origin,
            message: message.into(),
        }
    }
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Built-in default.
    Default,
    /// The TOML config file, with the 1-based line when known.
    File {
        /// Path of the file.
        path: PathBuf,
        /// 1-based line number.
        line: Option<usize>,
    },
    /// An environment variable (its name).
    Env(String),
    /// A command-line flag (e.g. `--pool-size`).
    Flag(String),
    /// A change made on the running process (admin API or console `SET`).
    Live,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "config file {} line {line}", path.display()),
            Origin::File { path, line: None } => write!(f, "config file {}", path.display()),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Flag(name) => write!(f, "flag {name}"),
            Origin::Live => f.write_str("live change"),
        }
    }
}

/// Default client listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:6432";
/// Default maximum client connections.
pub const DEFAULT_MAX_CLIENT_CONN: usize = 5000;
/// Default global pool size.
pub const DEFAULT_POOL_SIZE: usize = 20;
/// Default maximum protocol message size (64 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
/// Smallest accepted `max_message_size`.
pub const MIN_MAX_MESSAGE_SIZE: usize = 1024;
/// Largest accepted `max_message_size` (1 GiB).
pub const MAX_MAX_MESSAGE_SIZE: usize = 1024 * 1024 * 1024;
/// Default `auth_query` (PgBouncer's).
pub const DEFAULT_AUTH_QUERY: &str =
    "SELECT usename, passwd, valuntil FROM pg_shadow WHERE usename = $1";
/// Default `auth_query_cache` (10s).
pub const DEFAULT_AUTH_QUERY_CACHE: Duration = Duration::from_secs(10);
/// Default `max_replica_lag` (10s).
pub const DEFAULT_MAX_REPLICA_LAG: Duration = Duration::from_secs(10);
/// Default `replica_check_interval` (100ms).
pub const DEFAULT_REPLICA_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Smallest accepted `replica_check_interval` (10ms).
pub const MIN_REPLICA_CHECK_INTERVAL: Duration = Duration::from_millis(10);
/// Largest accepted `replica_check_interval` (60s).
pub const MAX_REPLICA_CHECK_INTERVAL: Duration = Duration::from_secs(60);

impl Default for Config {
    /// Built-in defaults with no databases or users (not a valid config by itself).
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 6432)),
            max_client_conn: DEFAULT_MAX_CLIENT_CONN,
            pool_size: DEFAULT_POOL_SIZE,
            auth_type: AuthType::ScramSha256,
            query_wait_timeout: Duration::from_secs(120),
            server_connect_timeout: Duration::from_secs(15),
            client_login_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            server_idle_timeout: Duration::from_secs(600),
            client_idle_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            server_lifetime: Duration::from_secs(3600),
            server_login_retry: Duration::from_secs(1),
            server_check_delay: Duration::from_secs(30),
            query_timeout: Duration::ZERO,
            tcp: TcpSettings::default(),
            auth_file: None,
            auth_users: BTreeMap::new(),
            auth_user: None,
            auth_query: DEFAULT_AUTH_QUERY.to_string(),
            auth_dbname: None,
            auth_query_cache: DEFAULT_AUTH_QUERY_CACHE,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            workers: 0,
            max_prepared_statements: 500,
            read_routing: ReadRouting::Auto,
            read_your_writes: ReadYourWrites::User,
            session_state_action: SessionStateAction::Pin,
            track_extra_parameters: DEFAULT_TRACK_EXTRA_PARAMETERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            server_auth: ServerAuth::Password,
            aws_region: None,
            client_tls: ClientTls::default(),
            server_tls_mode: SslMode::Prefer,
            server_tls_ca_file: None,
            max_replica_lag: DEFAULT_MAX_REPLICA_LAG,
            replica_check_interval: DEFAULT_REPLICA_CHECK_INTERVAL,
            write_functions: Vec::new(),
            min_pool_size: 0,
            max_db_connections: 0,
            total_server_connections: TotalBudget::Off,
            reserved_server_connections: 10,
            peer_dns_name: None,
            peer_dns_server: None,
            peer_check_interval: Duration::from_secs(10),
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            admin: Admin::default(),
            databases: BTreeMap::new(),
            users: BTreeMap::new(),
        }
    }
}

impl Config {
    /// The password pgmux logs in to servers with as `user`: the `[users]` or URL
    /// password, else a plain or MD5 `auth_file` entry (an MD5 hash serves MD5 server
    /// logins only). None for a SCRAM entry: those log in with the client's keys.
    pub fn server_password(&self, user: &str) -> Option<&Secret> {
        if let Some(p) = self.users.get(user).and_then(|u| u.password.as_ref()) {
            return Some(p);
        }
        match self.auth_users.get(user)? {
            AuthSecret::Password(p) | AuthSecret::Md5(p) => Some(p),
            AuthSecret::Scram(_) => None,
        }
    }

    /// Whether `user` is configured at all: in `[users]`, a URL or the auth file.
    pub fn knows_user(&self, user: &str) -> bool {
        self.users.contains_key(user) || self.auth_users.contains_key(user)
    }

    /// Effective pool size for (database, user): database override > user override > global pool_size.
    pub fn pool_size_for(&self, database: &str, user: &str) -> usize {
        self.databases
            .get(database)
            .and_then(|d| d.pool_size)
            .or_else(|| self.users.get(user).and_then(|u| u.pool_size))
            .unwrap_or(self.pool_size)
    }

    /// Effective read routing for (database, user): user override > database override >
    /// global `read_routing`. (Unlike [`Config::pool_size_for`], the user wins: a
    /// reporting user can be sent to replicas, or an admin kept on the primary, in
    /// every database.)
    pub fn read_routing_for(&self, database: &str, user: &str) -> ReadRouting {
        self.users
            .get(user)
            .and_then(|u| u.read_routing)
            .or_else(|| self.databases.get(database).and_then(|d| d.read_routing))
            .unwrap_or(self.read_routing)
    }

    /// This configuration with live changes applied: `(key, value)` pairs in the
    /// configuration file's spelling, for the keys listed as changeable in
    /// [`Config::settings`]. All are checked before any applies; the error names the key.
    pub fn with_changes(&self, changes: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut scalars = Scalars::default();
        for (key, value) in changes {
            if !scalar::LIVE_KEYS.contains(&key.as_str()) {
                let known = scalar::SCALAR_KEYS.contains(&key.as_str())
                    || scalar::ADMIN_KEYS.contains(&key.as_str());
                let message = if known {
                    "cannot be changed on a running pgmux; edit the configuration and reload \
                     or restart"
                        .to_string()
                } else {
                    format!(
                        "unknown setting (changeable: {})",
                        scalar::LIVE_KEYS.join(", ")
                    )
                };
                return Err(ConfigError::new(key.clone(), Origin::Live, message));
            }
            scalars.set(key, Raw::Str(value), Origin::Live)?;
        }
        let mut c = self.clone();
        scalars.apply(&mut c)?;
        Ok(c)
    }

    /// Every top-level setting with its value, default and whether it can be changed
    /// live; then the databases' and users' entries (`databases.NAME.url`, …).
    pub fn settings(&self) -> Vec<Setting> {
        render::settings(self)
    }

    /// Effective configuration as TOML with every password replaced by "<redacted>"
    /// (URLs are rendered without credentials). Loading the output again yields the
    /// same non-secret values; this is what `pgmux check-config` prints.
    pub fn to_redacted_toml(&self) -> String {
        render::redacted_toml(self)
    }
}

/// TCP keepalive and user timeout, for client and server sockets.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpSettings {
    /// `tcp_keepalive`; default true.
    pub keepalive: bool,
    /// `tcp_keepidle`: idle time before the first probe; default 60s, `>= 1s`.
    pub keepidle: Duration,
    /// `tcp_keepintvl`: time between probes; default 10s, `>= 1s`.
    pub keepintvl: Duration,
    /// `tcp_keepcnt`: unanswered probes before the connection is dropped; default 6.
    pub keepcnt: usize,
    /// `tcp_user_timeout`: sent data unacknowledged this long drops the connection
    /// (Linux `TCP_USER_TIMEOUT`); default 0 = the OS default.
    pub user_timeout: Duration,
}

impl Default for TcpSettings {
    fn default() -> Self {
        TcpSettings {
            keepalive: true,
            keepidle: Duration::from_secs(60),
            keepintvl: Duration::from_secs(10),
            keepcnt: 6,
            user_timeout: Duration::ZERO,
        }
    }
}

/// Environment variables for top-level scalar keys: (variable, key).
const ENV_SCALARS: &[(&str, &str)] = &[
    ("PGMUX_LISTEN", "listen"),
    ("PGMUX_POOL_SIZE", "pool_size"),
    ("PGMUX_MAX_CLIENT_CONN", "max_client_conn"),
    ("PGMUX_AUTH_TYPE", "auth_type"),
    ("PGMUX_QUERY_WAIT_TIMEOUT", "query_wait_timeout"),
    ("PGMUX_SERVER_CONNECT_TIMEOUT", "server_connect_timeout"),
    ("PGMUX_CLIENT_LOGIN_TIMEOUT", "client_login_timeout"),
    ("PGMUX_SHUTDOWN_TIMEOUT", "shutdown_timeout"),
    ("PGMUX_SERVER_IDLE_TIMEOUT", "server_idle_timeout"),
    ("PGMUX_CLIENT_IDLE_TIMEOUT", "client_idle_timeout"),
    ("PGMUX_IDLE_TRANSACTION_TIMEOUT", "idle_transaction_timeout"),
    ("PGMUX_SERVER_LIFETIME", "server_lifetime"),
    ("PGMUX_SERVER_LOGIN_RETRY", "server_login_retry"),
    ("PGMUX_SERVER_CHECK_DELAY", "server_check_delay"),
    ("PGMUX_QUERY_TIMEOUT", "query_timeout"),
    ("PGMUX_TCP_KEEPALIVE", "tcp_keepalive"),
    ("PGMUX_TCP_KEEPIDLE", "tcp_keepidle"),
    ("PGMUX_TCP_KEEPINTVL", "tcp_keepintvl"),
    ("PGMUX_TCP_KEEPCNT", "tcp_keepcnt"),
    ("PGMUX_TCP_USER_TIMEOUT", "tcp_user_timeout"),
    ("PGMUX_MAX_MESSAGE_SIZE", "max_message_size"),
    ("PGMUX_WORKERS", "workers"),
    ("PGMUX_MAX_PREPARED_STATEMENTS", "max_prepared_statements"),
    ("PGMUX_READ_ROUTING", "read_routing"),
    ("PGMUX_READ_YOUR_WRITES", "read_your_writes"),
    ("PGMUX_SESSION_STATE_ACTION", "session_state_action"),
    ("PGMUX_TRACK_EXTRA_PARAMETERS", "track_extra_parameters"),
    ("PGMUX_SERVER_AUTH", "server_auth"),
    ("PGMUX_AWS_REGION", "aws_region"),
    ("PGMUX_MAX_REPLICA_LAG", "max_replica_lag"),
    ("PGMUX_REPLICA_CHECK_INTERVAL", "replica_check_interval"),
    ("PGMUX_WRITE_FUNCTIONS", "write_functions"),
    ("PGMUX_MIN_POOL_SIZE", "min_pool_size"),
    ("PGMUX_MAX_DB_CONNECTIONS", "max_db_connections"),
    ("PGMUX_TOTAL_SERVER_CONNECTIONS", "total_server_connections"),
    (
        "PGMUX_RESERVED_SERVER_CONNECTIONS",
        "reserved_server_connections",
    ),
    ("PGMUX_PEER_DNS_NAME", "peer_dns_name"),
    ("PGMUX_PEER_DNS_SERVER", "peer_dns_server"),
    ("PGMUX_PEER_CHECK_INTERVAL", "peer_check_interval"),
    ("PGMUX_ADMIN_USERS", "admin_users"),
    ("PGMUX_STATS_USERS", "stats_users"),
    ("PGMUX_AUTH_FILE", "auth_file"),
    ("PGMUX_AUTH_USER", "auth_user"),
    ("PGMUX_AUTH_QUERY", "auth_query"),
    ("PGMUX_AUTH_DBNAME", "auth_dbname"),
    ("PGMUX_AUTH_QUERY_CACHE", "auth_query_cache"),
    ("PGMUX_CLIENT_TLS_MODE", "client_tls_mode"),
    ("PGMUX_CLIENT_TLS_CERT_FILE", "client_tls_cert_file"),
    ("PGMUX_CLIENT_TLS_KEY_FILE", "client_tls_key_file"),
    ("PGMUX_SERVER_TLS_MODE", "server_tls_mode"),
    ("PGMUX_SERVER_TLS_CA_FILE", "server_tls_ca_file"),
    ("PGMUX_ADMIN_LISTEN", "admin.listen"),
    ("PGMUX_ADMIN_TOKEN", "admin.token"),
    ("PGMUX_ADMIN_PROTECT_READS", "admin.protect_reads"),
];

/// One database as seen by the layering stage.
#[derive(Debug)]
pub(crate) struct DbLayer {
    pub(crate) primary: Sourced<ParsedUrl>,
    pub(crate) replicas: Vec<Sourced<ParsedUrl>>,
    pub(crate) pool_size: Option<Sourced<usize>>,
    pub(crate) read_routing: Option<ReadRouting>,
}

/// One user as seen by the layering stage.
#[derive(Debug)]
pub(crate) struct UserLayer {
    pub(crate) password: Option<Sourced<Secret>>,
    pub(crate) pool_size: Option<Sourced<usize>>,
    pub(crate) read_routing: Option<ReadRouting>,
}

/// Everything the file contributes.
#[derive(Debug, Default)]
pub(crate) struct FileLayer {
    pub(crate) databases: BTreeMap<String, DbLayer>,
    pub(crate) users: BTreeMap<String, UserLayer>,
}

fn env_get<'a>(env: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// The server address with its TLS settings: the URL's `sslmode` / `sslrootcert`, else
/// `server_tls_mode` / `server_tls_ca_file`. verify-ca and verify-full need a CA.
fn resolve_tls(config: &Config, url: &Sourced<ParsedUrl>) -> Result<ServerAddr, ConfigError> {
    let mut addr = url.value.addr.clone();
    let mode = match addr.params.get("sslmode") {
        Some(m) => SslMode::parse(m).unwrap_or_default(), // validated by the URL parser
        None => config.server_tls_mode,
    };
    let root_cert = match addr.params.get("sslrootcert") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => config.server_tls_ca_file.clone(),
    };
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
        return Err(ConfigError::new(
            url.key.clone(),
            url.origin.clone(),
            format!(
                "sslmode {} for server {}:{} needs a CA: set server_tls_ca_file, or sslrootcert= in the URL (sslrootcert=system for the system's CA bundle)",
                mode.as_str(),
                addr.host,
                addr.port
            ),
        ));
    }
    if !addr.is_unix_socket() {
        addr.tls = ServerTls { mode, root_cert };
    } else {
        // libpq never uses TLS over a unix socket.
        addr.tls = ServerTls {
            mode: SslMode::Disable,
            root_cert: None,
        };
    }
    Ok(addr)
}

/// Load: file path from flags.config, else env PGMUX_CONFIG, else no file.
/// `env` is a snapshot of the process environment (main passes std::env::vars().collect()).
pub fn load(flags: &Flags, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    let mut scalars = Scalars::default();

    // --- file ---
    let file_path = match (&flags.config, env_get(env, "PGMUX_CONFIG")) {
        (Some(p), _) => Some((p.clone(), Origin::Flag("--config".into()))),
        (None, Some(p)) => Some((PathBuf::from(p), Origin::Env("PGMUX_CONFIG".into()))),
        (None, None) => None,
    };
    let mut layer = FileLayer::default();
    if let Some((path, origin)) = file_path {
        let src = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError::new(
                "config",
                origin,
                format!("cannot read config file {}: {e}", path.display()),
            )
        })?;
        layer = file::parse(&src, &path, &mut scalars)?;
    }

    // --- environment ---
    for (var, key) in ENV_SCALARS {
        if let Some(v) = env_get(env, var) {
            scalars.set(key, Raw::Str(v), Origin::Env((*var).into()))?;
        }
    }

    // --- flags ---
    let flag_scalars: [(&Option<String>, &str, &str); 4] = [
        (&flags.admin_listen, "admin.listen", "--admin-listen"),
        (&flags.listen, "listen", "--listen"),
        (&flags.pool_size, "pool_size", "--pool-size"),
        (
            &flags.max_client_conn,
            "max_client_conn",
            "--max-client-conn",
        ),
    ];
    for (value, key, flag) in flag_scalars {
        if let Some(v) = value {
            scalars.set(key, Raw::Str(v), Origin::Flag(flag.into()))?;
        }
    }

    // --- DATABASE_URL / READ_DATABASE_URL ---
    let database_url = match (&flags.database_url, env_get(env, "DATABASE_URL")) {
        (Some(v), _) => Some((v.as_str(), Origin::Flag("--database-url".into()))),
        (None, Some(v)) => Some((v, Origin::Env("DATABASE_URL".into()))),
        (None, None) => None,
    };
    let read_database_url = match (&flags.read_database_url, env_get(env, "READ_DATABASE_URL")) {
        (Some(v), _) => Some((v.as_str(), Origin::Flag("--read-database-url".into()))),
        (None, Some(v)) => Some((v, Origin::Env("READ_DATABASE_URL".into()))),
        (None, None) => None,
    };

    let mut databases = layer.databases;
    let mut url_db: Option<String> = None;
    if let Some((url, origin)) = database_url {
        let parsed = pgurl::parse(url, None)
            .map_err(|m| ConfigError::new("DATABASE_URL", origin.clone(), m))?;
        let name = parsed.addr.dbname.clone();
        let primary = Sourced::new(parsed, "DATABASE_URL", origin);
        match databases.get_mut(&name) {
            Some(db) => {
                db.primary = primary;
                db.replicas.clear();
            }
            None => {
                databases.insert(
                    name.clone(),
                    DbLayer {
                        primary,
                        replicas: Vec::new(),
                        pool_size: None,
                        read_routing: None,
                    },
                );
            }
        }
        url_db = Some(name);
    }
    if let Some((list, origin)) = read_database_url {
        const KEY: &str = "READ_DATABASE_URL";
        let target = match &url_db {
            Some(name) => name.clone(),
            None if databases.len() == 1 => databases.keys().next().cloned().unwrap_or_default(),
            None => {
                return Err(ConfigError::new(
                    KEY,
                    origin,
                    format!(
                    "cannot tell which database the replicas belong to ({} databases configured): \
                         set DATABASE_URL to name the primary",
                    databases.len()
                ),
                ))
            }
        };
        let mut replicas = Vec::new();
        for (i, item) in list.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                continue;
            }
            let parsed = pgurl::parse(item, Some(&target)).map_err(|m| {
                ConfigError::new(KEY, origin.clone(), format!("URL #{}: {m}", i + 1))
            })?;
            replicas.push(Sourced::new(parsed, KEY, origin.clone()));
        }
        if replicas.is_empty() {
            return Err(ConfigError::new(
                KEY,
                origin,
                "no URL given (expected a comma-separated list of postgres:// URLs)",
            ));
        }
        if let Some(db) = databases.get_mut(&target) {
            db.replicas = replicas;
        }
    }

    // --- validate ---
    let default_stats_users = !scalars.has_stats_users();
    let auth_origins = scalars.auth_query_origins();
    let mut config = scalars.finish()?;
    if databases.is_empty() {
        return Err(ConfigError::new(
            "databases",
            Origin::Default,
            "no database configured: set DATABASE_URL or add [databases.NAME] to the config file",
        ));
    }

    let mut users = layer.users;
    if default_stats_users {
        // Zero-config start: whoever owns DATABASE_URL may look at the console.
        if let Some(user) = url_db
            .as_ref()
            .and_then(|name| databases.get(name))
            .and_then(|db| db.primary.value.user.clone())
        {
            config.stats_users = vec![user];
        }
    }

    for (name, db) in databases {
        let pool_size = match db.pool_size {
            Some(p) => Some(p.at_least_one()?),
            None => None,
        };
        let mut implicit = |url: &Sourced<ParsedUrl>| -> Result<(), ConfigError> {
            let Some(user) = &url.value.user else {
                return Ok(());
            };
            let entry = users.entry(user.clone()).or_insert(UserLayer {
                password: None,
                pool_size: None,
                read_routing: None,
            });
            let Some(pw) = &url.value.password else {
                return Ok(());
            };
            match &entry.password {
                None => {
                    entry.password = Some(Sourced::new(pw.clone(), &url.key, url.origin.clone()));
                    Ok(())
                }
                Some(existing) if existing.value == *pw => Ok(()),
                Some(existing) => Err(ConfigError::new(
                    url.key.clone(),
                    url.origin.clone(),
                    format!(
                        "password for user {user:?} in this URL differs from the one set by {} ({})",
                        existing.key, existing.origin
                    ),
                )),
            }
        };
        implicit(&db.primary)?;
        for r in &db.replicas {
            implicit(r)?;
        }
        let primary = resolve_tls(&config, &db.primary)?;
        let replicas = db
            .replicas
            .iter()
            .map(|r| resolve_tls(&config, r))
            .collect::<Result<Vec<_>, _>>()?;
        config.databases.insert(
            name.clone(),
            Database {
                name,
                primary,
                replicas,
                pool_size,
                read_routing: db.read_routing,
            },
        );
    }

    for (
        name,
        UserLayer {
            password,
            pool_size,
            read_routing,
        },
    ) in users
    {
        let pool_size = match pool_size {
            Some(p) => Some(p.at_least_one()?),
            None => None,
        };
        config.users.insert(
            name.clone(),
            User {
                name,
                password: password.map(|p| p.value),
                pool_size,
                read_routing,
            },
        );
    }

    check_auth_query(&config, auth_origins)?;
    Ok(config)
}

/// Cross-key checks of the `auth_query` settings, once users and databases are known:
/// `auth_user` needs a password pgmux can log in with (unless RDS IAM makes one), and
/// `auth_dbname` must name a configured database. `origins`: where `auth_user` and
/// `auth_dbname` were set.
fn check_auth_query(
    config: &Config,
    (user_origin, dbname_origin): (Option<Origin>, Option<Origin>),
) -> Result<(), ConfigError> {
    if let Some(user) = &config.auth_user {
        if config.server_auth != ServerAuth::RdsIam && config.server_password(user).is_none() {
            return Err(ConfigError::new(
                "auth_user",
                user_origin.unwrap_or(Origin::Default),
                format!(
                    "no password for user {user:?}: set [users.{user}] password, a password in \
                     DATABASE_URL, or a plain or md5 auth_file entry"
                ),
            ));
        }
    }
    if let Some(name) = &config.auth_dbname {
        if !config.databases.contains_key(name) {
            return Err(ConfigError::new(
                "auth_dbname",
                dbname_origin.unwrap_or(Origin::Default),
                format!(
                    "database {name:?} is not configured (known: {})",
                    config
                        .databases
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    Ok(())
}
