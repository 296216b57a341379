//! Top-level scalar keys: parsing from any source, layering, range validation.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    AuthType, ClientTlsMode, Config, ConfigError, Origin, ReadRouting, ReadYourWrites, Secret,
    ServerAuth, SessionStateAction, SslMode, TotalBudget, MAX_MAX_MESSAGE_SIZE,
    MAX_REPLICA_CHECK_INTERVAL, MIN_MAX_MESSAGE_SIZE, MIN_REPLICA_CHECK_INTERVAL,
};

/// A value plus the key and origin it came from.
#[derive(Debug, Clone)]
pub(crate) struct Sourced<T> {
    pub(crate) value: T,
    pub(crate) key: String,
    pub(crate) origin: Origin,
}

impl<T> Sourced<T> {
    pub(crate) fn new(value: T, key: impl Into<String>, origin: Origin) -> Self {
        Sourced {
            value,
            key: key.into(),
            origin,
        }
    }

    pub(crate) fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.key.clone(), self.origin.clone(), message)
    }
}

impl Sourced<usize> {
    pub(crate) fn at_least_one(self) -> Result<usize, ConfigError> {
        if self.value == 0 {
            Err(self.err("must be at least 1"))
        } else {
            Ok(self.value)
        }
    }
}

/// An untyped value from any source.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Raw<'a> {
    Str(&'a str),
    Int(i64),
    /// A TOML boolean.
    Bool(bool),
    /// A TOML array (its items); only list keys accept it.
    Array(&'a [Raw<'a>]),
    /// Any other TOML type (its name), always a type error.
    Other(&'static str),
}

impl Raw<'_> {
    /// The type name, without the value (for secrets).
    fn kind(&self) -> &'static str {
        match self {
            Raw::Str(_) => "a string",
            Raw::Int(_) => "an integer",
            Raw::Bool(_) => "a boolean",
            Raw::Array(_) => "an array",
            Raw::Other(t) => t,
        }
    }

    fn describe(&self) -> String {
        match self {
            Raw::Str(s) => format!("string {s:?}"),
            Raw::Int(i) => format!("integer {i}"),
            Raw::Bool(_) => "a boolean".to_string(),
            Raw::Array(_) => "an array".to_string(),
            Raw::Other(t) => (*t).to_string(),
        }
    }
}

/// All top-level scalar keys; `None` = not set by any source so far.
#[derive(Debug, Default)]
pub(crate) struct Scalars {
    listen: Option<Sourced<SocketAddr>>,
    max_client_conn: Option<Sourced<usize>>,
    pool_size: Option<Sourced<usize>>,
    auth_type: Option<Sourced<AuthType>>,
    query_wait_timeout: Option<Sourced<Duration>>,
    server_connect_timeout: Option<Sourced<Duration>>,
    client_login_timeout: Option<Sourced<Duration>>,
    shutdown_timeout: Option<Sourced<Duration>>,
    server_idle_timeout: Option<Sourced<Duration>>,
    client_idle_timeout: Option<Sourced<Duration>>,
    idle_transaction_timeout: Option<Sourced<Duration>>,
    server_lifetime: Option<Sourced<Duration>>,
    server_login_retry: Option<Sourced<Duration>>,
    server_check_delay: Option<Sourced<Duration>>,
    query_timeout: Option<Sourced<Duration>>,
    tcp_keepalive: Option<Sourced<bool>>,
    tcp_keepidle: Option<Sourced<Duration>>,
    tcp_keepintvl: Option<Sourced<Duration>>,
    tcp_keepcnt: Option<Sourced<usize>>,
    tcp_user_timeout: Option<Sourced<Duration>>,
    max_message_size: Option<Sourced<usize>>,
    workers: Option<Sourced<usize>>,
    max_prepared_statements: Option<Sourced<usize>>,
    read_routing: Option<Sourced<ReadRouting>>,
    read_your_writes: Option<Sourced<ReadYourWrites>>,
    session_state_action: Option<Sourced<SessionStateAction>>,
    track_extra_parameters: Option<Sourced<Vec<String>>>,
    server_auth: Option<Sourced<ServerAuth>>,
    aws_region: Option<Sourced<Option<String>>>,
    max_replica_lag: Option<Sourced<Duration>>,
    replica_check_interval: Option<Sourced<Duration>>,
    write_functions: Option<Sourced<Vec<String>>>,
    min_pool_size: Option<Sourced<usize>>,
    max_db_connections: Option<Sourced<usize>>,
    total_server_connections: Option<Sourced<TotalBudget>>,
    reserved_server_connections: Option<Sourced<usize>>,
    peer_dns_name: Option<Sourced<Option<String>>>,
    peer_dns_server: Option<Sourced<Option<SocketAddr>>>,
    peer_check_interval: Option<Sourced<Duration>>,
    admin_users: Option<Sourced<Vec<String>>>,
    auth_file: Option<Sourced<String>>,
    auth_user: Option<Sourced<Option<String>>>,
    auth_query: Option<Sourced<String>>,
    auth_dbname: Option<Sourced<Option<String>>>,
    auth_query_cache: Option<Sourced<Duration>>,
    client_tls_mode: Option<Sourced<ClientTlsMode>>,
    client_tls_cert_file: Option<Sourced<String>>,
    client_tls_key_file: Option<Sourced<String>>,
    server_tls_mode: Option<Sourced<SslMode>>,
    server_tls_ca_file: Option<Sourced<String>>,
    stats_users: Option<Sourced<Vec<String>>>,
    admin_listen: Option<Sourced<SocketAddr>>,
    admin_token: Option<Sourced<Secret>>,
    admin_protect_reads: Option<Sourced<bool>>,
}

/// All top-level scalar key names.
pub(crate) const SCALAR_KEYS: &[&str] = &[
    "listen",
    "max_client_conn",
    "pool_size",
    "auth_type",
    "query_wait_timeout",
    "server_connect_timeout",
    "client_login_timeout",
    "shutdown_timeout",
    "server_idle_timeout",
    "client_idle_timeout",
    "idle_transaction_timeout",
    "server_lifetime",
    "server_login_retry",
    "server_check_delay",
    "query_timeout",
    "tcp_keepalive",
    "tcp_keepidle",
    "tcp_keepintvl",
    "tcp_keepcnt",
    "tcp_user_timeout",
    "max_message_size",
    "workers",
    "max_prepared_statements",
    "read_routing",
    "read_your_writes",
    "session_state_action",
    "track_extra_parameters",
    "server_auth",
    "aws_region",
    "max_replica_lag",
    "replica_check_interval",
    "write_functions",
    "min_pool_size",
    "max_db_connections",
    "total_server_connections",
    "reserved_server_connections",
    "peer_dns_name",
    "peer_dns_server",
    "peer_check_interval",
    "admin_users",
    "stats_users",
    "auth_file",
    "auth_user",
    "auth_query",
    "auth_dbname",
    "auth_query_cache",
    "client_tls_mode",
    "client_tls_cert_file",
    "client_tls_key_file",
    "server_tls_mode",
    "server_tls_ca_file",
];

/// Keys of the `[admin]` table.
pub(crate) const ADMIN_KEYS: &[&str] = &["admin.listen", "admin.token", "admin.protect_reads"];

/// Keys that can be changed on a running pgmux (`PATCH /api/v1/config`, console `SET`).
pub(crate) const LIVE_KEYS: &[&str] = &[
    "max_client_conn",
    "pool_size",
    "min_pool_size",
    "query_wait_timeout",
    "server_connect_timeout",
    "client_login_timeout",
    "shutdown_timeout",
    "server_idle_timeout",
    "client_idle_timeout",
    "idle_transaction_timeout",
    "server_lifetime",
    "server_login_retry",
    "server_check_delay",
    "query_timeout",
    "read_your_writes",
    "session_state_action",
    "max_replica_lag",
    "max_db_connections",
    "total_server_connections",
    "reserved_server_connections",
];

impl Scalars {
    /// Set `key` from `raw` (later calls win). Errors on an unknown key or a type error.
    pub(crate) fn set(
        &mut self,
        key: &str,
        raw: Raw<'_>,
        origin: Origin,
    ) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new(key, origin.clone(), m);
        fn wrap<T>(
            r: Result<T, String>,
            key: &str,
            origin: &Origin,
        ) -> Result<Option<Sourced<T>>, ConfigError> {
            match r {
                Ok(v) => Ok(Some(Sourced::new(v, key, origin.clone()))),
                Err(m) => Err(ConfigError::new(key, origin.clone(), m)),
            }
        }
        match key {
            "listen" => self.listen = wrap(parse_listen(raw), key, &origin)?,
            "max_client_conn" => self.max_client_conn = wrap(parse_usize(raw), key, &origin)?,
            "pool_size" => self.pool_size = wrap(parse_usize(raw), key, &origin)?,
            "workers" => self.workers = wrap(parse_usize(raw), key, &origin)?,
            "max_prepared_statements" => {
                self.max_prepared_statements = wrap(parse_usize(raw), key, &origin)?
            }
            "max_message_size" => self.max_message_size = wrap(parse_size(raw), key, &origin)?,
            "auth_type" => {
                self.auth_type = wrap(
                    parse_choice(
                        raw,
                        "expected \"scram-sha-256\", \"md5\" or \"trust\"",
                        AuthType::parse,
                    ),
                    key,
                    &origin,
                )?
            }
            "read_routing" => self.read_routing = wrap(parse_read_routing(raw), key, &origin)?,
            "read_your_writes" => {
                self.read_your_writes = wrap(parse_read_your_writes(raw), key, &origin)?
            }
            "track_extra_parameters" => {
                self.track_extra_parameters = wrap(parse_parameter_names(raw), key, &origin)?
            }
            "session_state_action" => {
                self.session_state_action =
                    wrap(parse_session_state_action(raw), key, &origin)?
            }
            "server_auth" => self.server_auth = wrap(parse_server_auth(raw), key, &origin)?,
            "aws_region" => self.aws_region = wrap(parse_aws_region(raw), key, &origin)?,
            "write_functions" => {
                self.write_functions = wrap(parse_function_names(raw), key, &origin)?
            }
            "min_pool_size" => self.min_pool_size = wrap(parse_usize(raw), key, &origin)?,
            "max_db_connections" => {
                self.max_db_connections = wrap(parse_usize(raw), key, &origin)?
            }
            "total_server_connections" => {
                let v = match raw {
                    Raw::Str(s) if s.trim().eq_ignore_ascii_case("auto") => TotalBudget::Auto,
                    other => match parse_usize(other) {
                        Ok(0) => TotalBudget::Off,
                        Ok(n) => TotalBudget::Fixed(n),
                        Err(e) => return Err(err(format!("{e}, or \"auto\""))),
                    },
                };
                self.total_server_connections = Some(Sourced::new(v, key, origin.clone()));
            }
            "reserved_server_connections" => {
                self.reserved_server_connections = wrap(parse_usize(raw), key, &origin)?
            }
            "peer_dns_name" => {
                let Raw::Str(name) = raw else {
                    return Err(err(format!("expected a DNS name, got {}", raw.describe())));
                };
                let name = name.trim();
                if !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err(err(format!(
                        "expected a DNS name (letters, digits, '-' and '.'), got {name:?}"
                    )));
                }
                let v = (!name.is_empty()).then(|| name.to_owned());
                self.peer_dns_name = Some(Sourced::new(v, key, origin.clone()));
            }
            "peer_dns_server" => {
                let Raw::Str(a) = raw else {
                    return Err(err(format!("expected \"IP:port\", got {}", raw.describe())));
                };
                let a = a.trim();
                let v = if a.is_empty() {
                    None
                } else {
                    Some(a.parse::<SocketAddr>().map_err(|_| {
                        err(format!(
                            "expected \"IP:port\" (e.g. \"10.96.0.10:53\"), got {a:?}"
                        ))
                    })?)
                };
                self.peer_dns_server = Some(Sourced::new(v, key, origin.clone()));
            }
            "tcp_keepalive" => self.tcp_keepalive = wrap(parse_bool(raw), key, &origin)?,
            "tcp_keepcnt" => self.tcp_keepcnt = wrap(parse_usize(raw), key, &origin)?,
            "admin_users" => self.admin_users = wrap(parse_user_names(raw), key, &origin)?,
            "auth_file" => {
                let Raw::Str(path) = raw else {
                    return Err(err(format!("expected a file path, got {}", raw.describe())));
                };
                self.auth_file = Some(Sourced::new(path.trim().to_string(), key, origin.clone()));
            }
            "auth_user" | "auth_dbname" => {
                let Raw::Str(name) = raw else {
                    return Err(err(format!("expected a name, got {}", raw.describe())));
                };
                // Empty: none (so an environment variable can unset the file's value).
                let name = name.trim();
                let v = Some(Sourced::new(
                    (!name.is_empty()).then(|| name.to_string()),
                    key,
                    origin.clone(),
                ));
                match key {
                    "auth_user" => self.auth_user = v,
                    _ => self.auth_dbname = v,
                }
            }
            "auth_query" => {
                let Raw::Str(sql) = raw else {
                    return Err(err(format!(
                        "expected an SQL query, got {}",
                        raw.describe()
                    )));
                };
                let sql = sql.trim();
                if !sql.contains("$1") {
                    return Err(err(
                        "must contain $1 (the user name is passed as that parameter)".into(),
                    ));
                }
                self.auth_query = Some(Sourced::new(sql.to_string(), key, origin.clone()));
            }
            "client_tls_mode" => {
                self.client_tls_mode = wrap(
                    parse_choice(
                        raw,
                        "expected \"disable\", \"allow\", \"prefer\" or \"require\"",
                        ClientTlsMode::parse,
                    ),
                    key,
                    &origin,
                )?
            }
            "server_tls_mode" => {
                self.server_tls_mode = wrap(
                    parse_choice(
                        raw,
                        "expected \"disable\", \"allow\", \"prefer\", \"require\", \"verify-ca\" or \"verify-full\"",
                        SslMode::parse,
                    ),
                    key,
                    &origin,
                )?
            }
            "client_tls_cert_file" | "client_tls_key_file" | "server_tls_ca_file" => {
                let Raw::Str(path) = raw else {
                    return Err(err(format!("expected a file path, got {}", raw.describe())));
                };
                let v = Some(Sourced::new(path.trim().to_string(), key, origin.clone()));
                match key {
                    "client_tls_cert_file" => self.client_tls_cert_file = v,
                    "client_tls_key_file" => self.client_tls_key_file = v,
                    _ => self.server_tls_ca_file = v,
                }
            }
            "stats_users" => self.stats_users = wrap(parse_user_names(raw), key, &origin)?,
            "admin.listen" => self.admin_listen = wrap(parse_listen(raw), key, &origin)?,
            "admin.protect_reads" => {
                self.admin_protect_reads = wrap(parse_bool(raw), key, &origin)?
            }
            "admin.token" => {
                // The value itself is never echoed in messages.
                let Raw::Str(t) = raw else {
                    return Err(err(format!("expected a string, got {}", raw.kind())));
                };
                let t = t.trim();
                if t.len() < 16 {
                    return Err(err("must be at least 16 characters long".into()));
                }
                self.admin_token = Some(Sourced::new(Secret::new(t), key, origin.clone()));
            }
            "query_wait_timeout"
            | "server_connect_timeout"
            | "client_login_timeout"
            | "shutdown_timeout"
            | "server_idle_timeout"
            | "client_idle_timeout"
            | "idle_transaction_timeout"
            | "server_lifetime"
            | "server_login_retry"
            | "server_check_delay"
            | "query_timeout"
            | "tcp_keepidle"
            | "tcp_keepintvl"
            | "tcp_user_timeout"
            | "max_replica_lag"
            | "replica_check_interval"
            | "peer_check_interval"
            | "auth_query_cache" => {
                let d = Some(Sourced::new(
                    parse_duration(raw).map_err(err)?,
                    key,
                    origin.clone(),
                ));
                match key {
                    "query_wait_timeout" => self.query_wait_timeout = d,
                    "server_connect_timeout" => self.server_connect_timeout = d,
                    "client_login_timeout" => self.client_login_timeout = d,
                    "shutdown_timeout" => self.shutdown_timeout = d,
                    "max_replica_lag" => self.max_replica_lag = d,
                    "replica_check_interval" => self.replica_check_interval = d,
                    "peer_check_interval" => self.peer_check_interval = d,
                    "auth_query_cache" => self.auth_query_cache = d,
                    "client_idle_timeout" => self.client_idle_timeout = d,
                    "idle_transaction_timeout" => self.idle_transaction_timeout = d,
                    "server_lifetime" => self.server_lifetime = d,
                    "server_login_retry" => self.server_login_retry = d,
                    "server_check_delay" => self.server_check_delay = d,
                    "query_timeout" => self.query_timeout = d,
                    "tcp_keepidle" => self.tcp_keepidle = d,
                    "tcp_keepintvl" => self.tcp_keepintvl = d,
                    "tcp_user_timeout" => self.tcp_user_timeout = d,
                    _ => self.server_idle_timeout = d,
                }
            }
            _ => return Err(err("unknown key".into())),
        }
        Ok(())
    }

    /// The TLS keys: files must be readable (their PEM is checked by the proxy when it
    /// builds the acceptor), a certificate needs its key, and a mode that offers TLS
    /// needs both.
    fn apply_tls(&mut self, c: &mut Config) -> Result<(), ConfigError> {
        let readable = |v: &Sourced<String>| -> Result<PathBuf, ConfigError> {
            if v.value.is_empty() {
                return Err(v.err("must not be empty"));
            }
            let path = PathBuf::from(&v.value);
            std::fs::File::open(&path)
                .map_err(|e| v.err(format!("cannot read {}: {e}", path.display())))?;
            Ok(path)
        };
        if let Some(v) = self.server_tls_mode.take() {
            c.server_tls_mode = v.value;
        }
        if let Some(v) = self.server_tls_ca_file.take() {
            c.server_tls_ca_file = Some(if v.value == "system" {
                PathBuf::from("system")
            } else {
                readable(&v)?
            });
        }
        let cert = self.client_tls_cert_file.take();
        let key = self.client_tls_key_file.take();
        match (&cert, &key) {
            (Some(cv), None) => {
                return Err(cv.err("needs client_tls_key_file too"));
            }
            (None, Some(kv)) => {
                return Err(kv.err("needs client_tls_cert_file too"));
            }
            (Some(cv), Some(kv)) => {
                c.client_tls.cert_file = Some(readable(cv)?);
                c.client_tls.key_file = Some(readable(kv)?);
                c.client_tls.mode = ClientTlsMode::Allow;
            }
            (None, None) => {}
        }
        if let Some(v) = self.client_tls_mode.take() {
            if v.value != ClientTlsMode::Disable && c.client_tls.cert_file.is_none() {
                return Err(v.err(format!(
                    "\"{}\" needs a certificate: set client_tls_cert_file and client_tls_key_file",
                    v.value.as_str()
                )));
            }
            c.client_tls.mode = v.value;
        }
        Ok(())
    }

    /// True when any source set `stats_users`.
    pub(crate) fn has_stats_users(&self) -> bool {
        self.stats_users.is_some()
    }

    /// Where `auth_user` and `auth_dbname` were set, for the checks that need the users
    /// and databases (after [`Scalars::finish`]).
    pub(crate) fn auth_query_origins(&self) -> (Option<Origin>, Option<Origin>) {
        (
            self.auth_user.as_ref().map(|v| v.origin.clone()),
            self.auth_dbname.as_ref().map(|v| v.origin.clone()),
        )
    }

    /// Apply defaults and range checks; returns a config without databases/users.
    pub(crate) fn finish(self) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        self.apply(&mut c)?;
        Ok(c)
    }

    /// Writes the values set here over `c`, with range checks (also across keys, against
    /// the values `c` already has).
    pub(crate) fn apply(mut self, c: &mut Config) -> Result<(), ConfigError> {
        self.apply_tls(c)?;
        if let Some(v) = self.listen {
            c.listen = v.value;
        }
        if let Some(v) = self.max_client_conn {
            c.max_client_conn = v.at_least_one()?;
        }
        if let Some(v) = self.pool_size {
            c.pool_size = v.at_least_one()?;
        }
        if let Some(v) = self.auth_type {
            c.auth_type = v.value;
        }
        let durations = [
            (self.query_wait_timeout, &mut c.query_wait_timeout),
            (self.server_connect_timeout, &mut c.server_connect_timeout),
            (self.client_login_timeout, &mut c.client_login_timeout),
            (self.shutdown_timeout, &mut c.shutdown_timeout),
            (self.server_idle_timeout, &mut c.server_idle_timeout),
            (self.client_idle_timeout, &mut c.client_idle_timeout),
            (
                self.idle_transaction_timeout,
                &mut c.idle_transaction_timeout,
            ),
            (self.server_lifetime, &mut c.server_lifetime),
            (self.server_login_retry, &mut c.server_login_retry),
            (self.server_check_delay, &mut c.server_check_delay),
            (self.query_timeout, &mut c.query_timeout),
            (self.tcp_user_timeout, &mut c.tcp.user_timeout),
        ];
        for (src, dst) in durations {
            if let Some(v) = src {
                *dst = v.value;
            }
        }
        if let Some(v) = self.tcp_keepalive {
            c.tcp.keepalive = v.value;
        }
        for (src, dst) in [
            (self.tcp_keepidle, &mut c.tcp.keepidle),
            (self.tcp_keepintvl, &mut c.tcp.keepintvl),
        ] {
            if let Some(v) = src {
                if v.value < Duration::from_secs(1) {
                    return Err(v.err(format!(
                        "must be at least 1s, got {}",
                        humantime::format_duration(v.value)
                    )));
                }
                *dst = v.value;
            }
        }
        if let Some(v) = self.tcp_keepcnt {
            c.tcp.keepcnt = v.at_least_one()?;
        }
        if let Some(v) = self.max_message_size {
            if !(MIN_MAX_MESSAGE_SIZE..=MAX_MAX_MESSAGE_SIZE).contains(&v.value) {
                return Err(v.err(format!(
                    "must be between 1024 bytes and 1GiB, got {} bytes",
                    v.value
                )));
            }
            c.max_message_size = v.value;
        }
        if let Some(v) = self.workers {
            c.workers = v.value;
        }
        if let Some(v) = self.max_prepared_statements {
            c.max_prepared_statements = v.value;
        }
        if let Some(v) = self.read_routing {
            c.read_routing = v.value;
        }
        if let Some(v) = self.read_your_writes {
            c.read_your_writes = v.value;
        }
        if let Some(v) = self.session_state_action {
            c.session_state_action = v.value;
        }
        if let Some(v) = self.track_extra_parameters {
            c.track_extra_parameters = v.value;
        }
        if let Some(v) = self.server_auth {
            c.server_auth = v.value;
        }
        if let Some(v) = self.aws_region {
            c.aws_region = v.value;
        }
        if let Some(v) = self.max_replica_lag {
            if v.value.is_zero() {
                return Err(v.err("must be greater than zero"));
            }
            c.max_replica_lag = v.value;
        }
        if let Some(v) = self.replica_check_interval {
            if !(MIN_REPLICA_CHECK_INTERVAL..=MAX_REPLICA_CHECK_INTERVAL).contains(&v.value) {
                return Err(v.err(format!(
                    "must be between 10ms and 60s, got {}",
                    humantime::format_duration(v.value)
                )));
            }
            c.replica_check_interval = v.value;
        }
        if let Some(v) = self.write_functions {
            c.write_functions = v.value;
        }
        if let Some(v) = self.auth_user {
            c.auth_user = v.value;
        }
        if let Some(v) = self.auth_query {
            c.auth_query = v.value;
        }
        if let Some(v) = self.auth_dbname {
            c.auth_dbname = v.value;
        }
        if let Some(v) = self.auth_query_cache {
            c.auth_query_cache = v.value;
        }
        if let Some(v) = self.auth_file {
            let path = std::path::PathBuf::from(&v.value);
            c.auth_users = crate::authfile::read(&path).map_err(|m| v.err(m))?;
            c.auth_file = Some(path);
        }
        if let Some(v) = self.max_db_connections {
            c.max_db_connections = v.value;
        }
        if let Some(v) = self.total_server_connections {
            c.total_server_connections = v.value;
        }
        if let Some(v) = self.reserved_server_connections {
            c.reserved_server_connections = v.value;
        }
        if let Some(v) = self.peer_dns_name {
            c.peer_dns_name = v.value;
        }
        if let Some(v) = self.peer_dns_server {
            c.peer_dns_server = v.value;
        }
        if let Some(v) = self.peer_check_interval {
            if v.value < Duration::from_millis(100) {
                return Err(v.err(format!(
                    "must be at least 100ms, got {}",
                    humantime::format_duration(v.value)
                )));
            }
            c.peer_check_interval = v.value;
        }
        if let Some(v) = self.admin_users {
            c.admin_users = v.value;
        }
        if let Some(v) = self.stats_users {
            c.stats_users = v.value;
        }
        if let Some(v) = self.admin_listen {
            c.admin.listen = v.value;
        }
        if let Some(v) = self.admin_token {
            c.admin.token = Some(v.value);
        }
        if let Some(v) = self.admin_protect_reads {
            c.admin.protect_reads = v.value;
        }
        if let Some(v) = self.min_pool_size {
            if v.value > c.pool_size {
                return Err(v.err(format!(
                    "must not exceed pool_size ({}), got {}",
                    c.pool_size, v.value
                )));
            }
            c.min_pool_size = v.value;
        } else if c.min_pool_size > c.pool_size {
            return Err(ConfigError::new(
                "pool_size",
                Origin::Live,
                format!(
                    "must be at least min_pool_size ({}), got {}",
                    c.min_pool_size, c.pool_size
                ),
            ));
        }
        Ok(())
    }
}

pub(crate) fn parse_usize(raw: Raw<'_>) -> Result<usize, String> {
    match raw {
        Raw::Int(i) => {
            usize::try_from(i).map_err(|_| format!("expected a non-negative integer, got {i}"))
        }
        Raw::Str(s) => s
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("expected a non-negative integer, got {s:?}")),
        other => Err(format!(
            "expected a non-negative integer, got {}",
            other.describe()
        )),
    }
}

fn parse_listen(raw: Raw<'_>) -> Result<SocketAddr, String> {
    let Raw::Str(s) = raw else {
        return Err(format!(
            "expected an address like \"0.0.0.0:6432\", got {}",
            raw.describe()
        ));
    };
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    Err(format!(
        "expected an IP address and port like \"0.0.0.0:6432\" or \"[::]:6432\", got {s:?}"
    ))
}

pub(crate) fn parse_duration(raw: Raw<'_>) -> Result<Duration, String> {
    match raw {
        Raw::Int(i) => u64::try_from(i)
            .map(Duration::from_secs)
            .map_err(|_| format!("expected a non-negative number of seconds, got {i}")),
        Raw::Str(s) => {
            let s = s.trim();
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                return s
                    .parse::<u64>()
                    .map(Duration::from_secs)
                    .map_err(|e| format!("invalid number of seconds {s:?}: {e}"));
            }
            humantime::parse_duration(s).map_err(|e| {
                format!("invalid duration {s:?} ({e}); expected e.g. \"30s\", \"5m\", \"250ms\"")
            })
        }
        other => Err(format!(
            "expected a duration like \"30s\" or an integer number of seconds, got {}",
            other.describe()
        )),
    }
}

pub(crate) fn parse_read_routing(raw: Raw<'_>) -> Result<ReadRouting, String> {
    parse_choice(
        raw,
        "expected \"auto\", \"primary_only\" or \"replica_only\"",
        ReadRouting::parse,
    )
}

fn parse_server_auth(raw: Raw<'_>) -> Result<ServerAuth, String> {
    parse_choice(
        raw,
        "expected \"password\" or \"rds_iam\"",
        ServerAuth::parse,
    )
}

/// An AWS region name like `"us-east-1"` (lower-case letters, digits, dashes); an
/// empty string means none.
fn parse_aws_region(raw: Raw<'_>) -> Result<Option<String>, String> {
    let Raw::Str(s) = raw else {
        return Err(format!(
            "expected a region name like \"us-east-1\", got {}",
            raw.describe()
        ));
    };
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "expected a region name like \"us-east-1\" (lower-case letters, digits, dashes), got {s:?}"
        ));
    }
    Ok(Some(s.to_owned()))
}

/// One of a fixed set of names (`parse` knows them); `expected` lists them for errors.
fn parse_choice<T>(
    raw: Raw<'_>,
    expected: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<T, String> {
    match raw {
        Raw::Str(s) => parse(s).ok_or_else(|| format!("{expected}, got {s:?}")),
        other => Err(format!("{expected}, got {}", other.describe())),
    }
}

fn parse_read_your_writes(raw: Raw<'_>) -> Result<ReadYourWrites, String> {
    parse_choice(
        raw,
        "expected \"user\", \"client\" or \"off\"",
        ReadYourWrites::parse,
    )
}

fn parse_session_state_action(raw: Raw<'_>) -> Result<SessionStateAction, String> {
    parse_choice(
        raw,
        "expected \"pin\", \"warn\" or \"reject\"",
        SessionStateAction::parse,
    )
}

/// An array of function names, or one comma-separated string of them.
fn parse_function_names(raw: Raw<'_>) -> Result<Vec<String>, String> {
    parse_list(
        raw,
        "a function name",
        "an array of function names like [\"my_audit_fn\", \"app.bump_counter\"]",
        function_name,
    )
}

fn parse_parameter_names(raw: Raw<'_>) -> Result<Vec<String>, String> {
    parse_list(
        raw,
        "a parameter name",
        "an array of parameter names like [\"client_min_messages\"]",
        parameter_name,
    )
}

/// One parameter name (item `i`, 0-based): trimmed, lowercased, `[a-z0-9_.]` only, not
/// starting with a digit.
fn parameter_name((i, item): (usize, &str)) -> Result<String, String> {
    let n = i + 1;
    let name = item.trim();
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'))
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && !name.split('.').any(str::is_empty);
    if !valid {
        return Err(format!(
            "item #{n}: invalid parameter name {name:?} (ASCII letters, digits, '_' and '.')"
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// A list: an array of strings, or one comma-separated string (the only form an
/// environment variable can take). `item` checks each entry, given its 0-based index;
/// `item_kind` and `expected` word the type errors.
fn parse_list(
    raw: Raw<'_>,
    item_kind: &str,
    expected: &str,
    item: impl Fn((usize, &str)) -> Result<String, String>,
) -> Result<Vec<String>, String> {
    match raw {
        Raw::Str(s) => s.split(',').enumerate().map(item).collect(),
        Raw::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, entry)| match entry {
                Raw::Str(s) => item((i, s)),
                other => Err(format!(
                    "item #{}: expected {item_kind} (a string), got {}",
                    i + 1,
                    other.describe()
                )),
            })
            .collect(),
        other => Err(format!(
            "expected {expected} or a comma-separated string, got {}",
            other.describe()
        )),
    }
}

/// One function name (item `i`, 0-based): trimmed, lowercased, `[a-z0-9_.$]` only.
fn function_name((i, item): (usize, &str)) -> Result<String, String> {
    let n = i + 1;
    let name = item.trim();
    if name.is_empty() {
        return Err(format!("item #{n}: empty function name"));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.')))
    {
        return Err(format!(
            "item #{n}: invalid function name {name:?}: character {c:?} is not allowed \
             (only ASCII letters, digits, '_', '$', and '.' after a schema name)"
        ));
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!(
            "item #{n}: invalid function name {name:?}: empty name part around '.' \
             (expected \"function\" or \"schema.function\")"
        ));
    }
    Ok(name.to_ascii_lowercase())
}

pub(crate) fn parse_size(raw: Raw<'_>) -> Result<usize, String> {
    let s = match raw {
        Raw::Int(_) => return parse_usize(raw),
        Raw::Str(s) => s.trim(),
        other => {
            return Err(format!(
                "expected a size like \"64MiB\" or integer bytes, got {}",
                other.describe()
            ))
        }
    };
    let bad = || {
        format!("invalid size {s:?}; expected e.g. \"64MiB\", \"512kB\", \"1GiB\" or integer bytes")
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: usize = num.parse().map_err(|_| bad())?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" | "KiB" | "kiB" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    num.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_bool(raw: Raw<'_>) -> Result<bool, String> {
    match raw {
        Raw::Bool(b) => Ok(b),
        Raw::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" | "1" => Ok(true),
            "false" | "off" | "no" | "0" => Ok(false),
            _ => Err(format!("expected true or false, got {s:?}")),
        },
        other => Err(format!("expected true or false, got {}", other.describe())),
    }
}

/// User names: an array, or one comma-separated string. Trimmed; none empty.
fn parse_user_names(raw: Raw<'_>) -> Result<Vec<String>, String> {
    if let Raw::Str(s) = raw {
        if s.trim().is_empty() {
            return Ok(Vec::new());
        }
    }
    let one = |(i, s): (usize, &str)| {
        let s = s.trim();
        if s.is_empty() {
            Err(format!("item #{}: empty user name", i + 1))
        } else {
            Ok(s.to_string())
        }
    };
    parse_list(raw, "a user name", "an array of user names", one)
}
