//! One task per client connection.
//!
//! ```text
//!   accept ─► startup (SSL/GSS 'N', cancel, StartupMessage) ─► auth ─► login burst
//!                                                                        │
//!          ┌───────────────────────── idle ◄──────────────────────────────┘
//!          │  first message that needs a server: checkout (FIFO, bounded wait)
//!          ▼
//!        linked: sync client parameters, then forward both ways until the server owes no
//!          │     ReadyForQuery, has no unsynced extended messages and reports 'I'
//!          └──► server back to the pool ──► idle
//! ```
//!
//! While linked, both directions are driven by one `select!` over four cancel-safe
//! operations (read client, read server, write server, write client), each gated by a
//! buffer limit, so neither side can stall the other and memory stays bounded. Client
//! bytes are framed (lengths checked against `max_message_size` before anything is waited
//! for); what each message means for the server's state, and the rewriting of named
//! prepared statements, is in [`crate::relay`].

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use pgmux_config::{
    AuthSecret, AuthType, ClientTlsMode, Config, ReadRouting, ReadYourWrites, SessionStateAction,
};
use rand::RngCore;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::auth::{self, ScramServer};
use crate::backend::{send_cancel, BackendError, Server};
use crate::cancel::Registration;
use crate::control::{ClientEntry, ClientIdent, ClientTicket, Interrupt};
use crate::params::{self, ClientParams};
use crate::pool::{Pool, PoolError, PooledServer};
use crate::prepared::ClientStatements;
use crate::protocol::frame::{complete_frame_len, split_frame, split_startup_packet, Frame};
use crate::protocol::messages::{self as msg, ErrorFields, Severity};
use crate::protocol::{sqlstate, ProtocolError, CANCEL_REQUEST, GSSENC_REQUEST, SSL_REQUEST};
use crate::relay::{
    answer_without_server, pump_client, scan_server, take_unsolicited, Pump, StateCheck,
    Unsolicited, OUT_LIMIT,
};
use crate::routing::{self, next_unit, replayable_len, Choice, Next, ReplicaSet, Target, Unit};
use crate::sessionstate::Feature;
use crate::sockio::ClientStream;
use crate::tls::TlsCell;
use crate::Shared;
use pgmux_admin::console::{Access, Reply};

/// Largest authentication message accepted from a client (long enough for IAM tokens).
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

/// Why a session ended (logged; exported as a metric label by the admin surface).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    ClientTerminate,
    ClientClosed,
    ClientProtocolError,
    LoginFailed,
    LoginTimeout,
    TooManyClients,
    ServerUnavailable,
    ServerClosed,
    WaitTimeout,
    Shutdown,
    CancelRequest,
    /// KILL from the admin surface.
    Killed,
    /// Idle between transactions longer than client_idle_timeout.
    ClientIdleTimeout,
    /// Idle inside a transaction longer than idle_transaction_timeout.
    IdleTransactionTimeout,
    /// A query outlived query_timeout and its server did not answer the cancel.
    QueryTimeout,
    /// A reload removed the client's database.
    DatabaseRemoved,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 16] = [
        DisconnectReason::ClientTerminate,
        DisconnectReason::ClientClosed,
        DisconnectReason::ClientProtocolError,
        DisconnectReason::LoginFailed,
        DisconnectReason::LoginTimeout,
        DisconnectReason::TooManyClients,
        DisconnectReason::ServerUnavailable,
        DisconnectReason::ServerClosed,
        DisconnectReason::WaitTimeout,
        DisconnectReason::Shutdown,
        DisconnectReason::CancelRequest,
        DisconnectReason::Killed,
        DisconnectReason::ClientIdleTimeout,
        DisconnectReason::IdleTransactionTimeout,
        DisconnectReason::QueryTimeout,
        DisconnectReason::DatabaseRemoved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientTerminate => "client_terminate",
            DisconnectReason::ClientClosed => "client_closed",
            DisconnectReason::ClientProtocolError => "client_protocol_error",
            DisconnectReason::LoginFailed => "login_failed",
            DisconnectReason::LoginTimeout => "login_timeout",
            DisconnectReason::TooManyClients => "too_many_clients",
            DisconnectReason::ServerUnavailable => "server_unavailable",
            DisconnectReason::ServerClosed => "server_closed",
            DisconnectReason::WaitTimeout => "query_wait_timeout",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::CancelRequest => "cancel_request",
            DisconnectReason::Killed => "killed",
            DisconnectReason::ClientIdleTimeout => "client_idle_timeout",
            DisconnectReason::IdleTransactionTimeout => "idle_transaction_timeout",
            DisconnectReason::QueryTimeout => "query_timeout",
            DisconnectReason::DatabaseRemoved => "database_removed",
        }
    }
}

/// The client socket with its buffers.
struct Client {
    stream: ClientStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Over TLS: the `tls-server-end-point` data of the certificate the client got.
    end_point: Option<Vec<u8>>,
}

impl Client {
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await?;
        }
        // Not just clear(): the bytes may be a slice of a server's read buffer, which can
        // reuse its memory only once nobody else refers to it.
        self.wbuf = BytesMut::new();
        Ok(())
    }

    /// Sends an ErrorResponse (plus whatever was queued) and, for FATAL, closes politely.
    async fn fail(&mut self, severity: Severity, code: &str, message: &str) {
        msg::error_response(&mut self.wbuf, severity, code, message);
        let _ = self.flush().await;
        if severity == Severity::Fatal {
            let _ = self.stream.shutdown().await;
        }
    }

    /// The server failed under the client: FATAL 08006, as libpq words it, then close.
    async fn server_lost(&mut self) {
        self.fail(
            Severity::Fatal,
            sqlstate::CONNECTION_FAILURE,
            "server closed the connection unexpectedly",
        )
        .await;
    }

    /// The drain reached this client: FATAL 57P01, then close.
    async fn shutting_down(&mut self) -> DisconnectReason {
        self.fail(
            Severity::Fatal,
            sqlstate::ADMIN_SHUTDOWN,
            "pgmux is shutting down",
        )
        .await;
        DisconnectReason::Shutdown
    }

    /// KILL reached this client: FATAL 57P01, then close.
    async fn killed(&mut self) -> DisconnectReason {
        self.fail(
            Severity::Fatal,
            sqlstate::ADMIN_SHUTDOWN,
            "connection killed by the administrator",
        )
        .await;
        DisconnectReason::Killed
    }

    /// A reload removed the client's database; it is between transactions: FATAL
    /// 57P01, then close.
    async fn database_removed(&mut self, database: &str) -> DisconnectReason {
        let text = format!("database \"{database}\" was removed from the configuration");
        self.fail(Severity::Fatal, sqlstate::ADMIN_SHUTDOWN, &text)
            .await;
        DisconnectReason::DatabaseRemoved
    }

    /// A protocol violation: FATAL 08P01 with the reason, then close.
    async fn protocol_violation(&mut self, e: &(dyn std::fmt::Display + Sync)) -> DisconnectReason {
        let text = e.to_string();
        self.fail(Severity::Fatal, sqlstate::PROTOCOL_VIOLATION, &text)
            .await;
        DisconnectReason::ClientProtocolError
    }

    /// Reads what the client sent, holding no buffer while waiting: an idle client costs
    /// its task and socket only. Bytes go through a scratch array into a buffer of the
    /// size actually received (one small copy per read).
    async fn read_more(&mut self) -> std::io::Result<usize> {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        self.stream.read_drain_small(&mut self.rbuf).await
    }

    async fn read_frame(&mut self, max: usize) -> Result<Option<Frame>, ProtocolError> {
        loop {
            if let Some(f) = split_frame(&mut self.rbuf, max)? {
                return Ok(Some(f));
            }
            if self.read_more().await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// A StartupMessage's parameters, sorted by what login does with them.
pub(crate) struct Startup {
    pub user: Option<String>,
    pub database: Option<String>,
    /// Settings for the session: the packet's own and those of `options`.
    pub requested: Vec<(String, String)>,
    /// `_pq_.` protocol options, which pgmux does not know (NegotiateProtocolVersion).
    pub unknown_protocol_options: Vec<String>,
}

/// Sorts a StartupMessage's parameters; `Err` is the message of a FATAL
/// (FEATURE_NOT_SUPPORTED): a replication connection, or `options` pgmux cannot read.
/// Shared with the fuzz target (`fuzzing.rs`).
pub(crate) fn sort_startup(params: Vec<(String, String)>) -> Result<Startup, String> {
    let mut s = Startup {
        user: None,
        database: None,
        requested: Vec::new(),
        unknown_protocol_options: Vec::new(),
    };
    for (k, v) in params {
        match k.as_str() {
            "user" => s.user = Some(v),
            "database" => s.database = Some(v),
            "replication" if v != "false" && v != "off" && v != "0" => {
                return Err("replication connections are not supported through pgmux".into());
            }
            "replication" => {}
            "options" => s.requested.extend(params::parse_options(&v)?),
            _ if k.starts_with("_pq_.") => s.unknown_protocol_options.push(k),
            _ => s.requested.push((k, v)),
        }
    }
    Ok(s)
}

/// Entry point for an accepted connection.
pub async fn run(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let ticket = ClientTicket::register(&shared, peer, local);
    let reason = serve_client(&shared, stream, peer, &ticket.entry).await;
    shared.count_disconnect(reason);
}

async fn serve_client(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    entry: &Arc<ClientEntry>,
) -> DisconnectReason {
    let cfg = shared.config.load_full();
    let mut client = Client {
        stream: ClientStream::Tcp(stream),
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        end_point: None,
    };
    // Boxed: the login state machine (SCRAM exchange, first server login) is needed once,
    // and must not make every idle client's task bigger.
    let login = tokio::time::timeout(
        cfg.client_login_timeout,
        Box::pin(login(shared, &cfg, &mut client)),
    )
    .await;
    let reason = match login {
        Err(_) => {
            client
                .fail(
                    Severity::Fatal,
                    sqlstate::CONNECTION_EXCEPTION,
                    "login timed out (client_login_timeout)",
                )
                .await;
            DisconnectReason::LoginTimeout
        }
        Ok(Err(reason)) => reason,
        Ok(Ok(LoggedIn::Console {
            user,
            access,
            registration,
        })) => {
            entry.logged_in(ClientIdent::Console { user: user.into() }, registration.pid);
            return Box::pin(console(shared, &mut client, access, entry)).await;
        }
        Ok(Ok(LoggedIn::Pool(session))) => {
            let Login {
                pool,
                replicas,
                params,
                registration,
                user,
                database,
                _count,
            } = *session;
            entry.logged_in(
                ClientIdent::Pool {
                    pool: pool.clone(),
                    application_name: params.get("application_name").unwrap_or("").into(),
                },
                registration.pid,
            );
            let _in_pool = PoolClient::enter(&pool);
            let read_routing = cfg.read_routing_for(&database, &user);
            let mut s = Session {
                shared,
                cfg: &cfg,
                live: arc_swap::Cache::new(&shared.config),
                replicas_live: pool.replicas_live(),
                pool,
                replicas,
                read_routing,
                client_mark: 0,
                client,
                params,
                registration,
                statements: ClientStatements::default(),
                skip_to_sync: false,
                to_server: BytesMut::new(),
                replay: Vec::new(),
                entry,
                pin: None,
                pinned: None,
                warned: 0,
            };
            let reason = s.serve().await;
            tracing::debug!(%peer, %user, %database, reason = reason.as_str(), "client disconnected");
            drop(_count);
            return reason;
        }
    };
    tracing::debug!(%peer, reason = reason.as_str(), "client connection closed during login");
    reason
}

/// Counts a client in its pool's `clients` while it is logged in.
struct PoolClient(Arc<Pool>);

impl PoolClient {
    fn enter(pool: &Arc<Pool>) -> PoolClient {
        pool.clients.fetch_add(1, Ordering::Relaxed);
        PoolClient(pool.clone())
    }
}

impl Drop for PoolClient {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a successful login leads to.
enum LoggedIn {
    Pool(Box<Login>),
    /// The SQL admin console (database `pgbouncer` or `pgmux`).
    Console {
        user: String,
        access: Access,
        registration: Registration,
    },
}

/// A logged-in client, ready to serve.
struct Login {
    pool: Arc<Pool>,
    replicas: Option<Arc<ReplicaSet>>,
    params: ClientParams,
    registration: Registration,
    user: String,
    database: String,
    _count: ClientCount,
}

/// Counts the client against max_client_conn for as long as it lives.
struct ClientCount(Arc<Shared>);

impl ClientCount {
    fn acquire(shared: &Arc<Shared>, max: usize) -> Option<ClientCount> {
        let prev = shared.clients.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ClientCount(shared.clone()))
    }
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn login(
    shared: &Arc<Shared>,
    cfg: &Arc<Config>,
    client: &mut Client,
) -> Result<LoggedIn, DisconnectReason> {
    use DisconnectReason::*;
    // --- startup packet(s)
    let mut ssl_answered = false;
    let mut gss_answered = false;
    let (minor, startup) = loop {
        let body = loop {
            match split_startup_packet(&mut client.rbuf) {
                Ok(Some(b)) => break b,
                Ok(None) => {}
                Err(e) => {
                    return Err(client.protocol_violation(&e).await);
                }
            }
            match client.read_more().await {
                Ok(0) | Err(_) => return Err(ClientClosed),
                Ok(_) => {}
            }
        };
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        match code {
            SSL_REQUEST | GSSENC_REQUEST if body.len() == 4 => {
                let answered = if code == SSL_REQUEST {
                    &mut ssl_answered
                } else {
                    &mut gss_answered
                };
                if *answered || !client.rbuf.is_empty() {
                    // Bytes sent before our answer could be injected plaintext: refuse.
                    client
                        .fail(
                            Severity::Fatal,
                            sqlstate::PROTOCOL_VIOLATION,
                            "unexpected data after encryption request",
                        )
                        .await;
                    return Err(ClientProtocolError);
                }
                *answered = true;
                let acceptor = (code == SSL_REQUEST
                    && cfg.client_tls.mode != ClientTlsMode::Disable)
                    .then(|| shared.client_tls.acceptor())
                    .flatten();
                let Some(acceptor) = acceptor else {
                    if client.stream.write_all(b"N").await.is_err() {
                        return Err(ClientClosed);
                    }
                    continue;
                };
                if client.stream.write_all(b"S").await.is_err() {
                    return Err(ClientClosed);
                }
                let ClientStream::Tcp(tcp) =
                    std::mem::replace(&mut client.stream, ClientStream::Detached)
                else {
                    return Err(ClientProtocolError);
                };
                match acceptor.acceptor.accept(tcp).await {
                    Ok(tls) => {
                        client.stream = ClientStream::Tls(Box::new(TlsCell::new(tls)));
                        client.end_point = Some(acceptor.end_point.clone());
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "client TLS handshake failed");
                        return Err(ClientProtocolError);
                    }
                }
            }
            CANCEL_REQUEST if body.len() == 12 => {
                let pid = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
                let secret = i32::from_be_bytes([body[8], body[9], body[10], body[11]]);
                shared.cancel.cancel(pid, secret).await;
                return Err(CancelRequest);
            }
            v if v >> 16 == 3 => match msg::parse_startup_params(&body[4..]) {
                Ok(p) => break (v & 0xffff, p),
                Err(e) => {
                    return Err(client.protocol_violation(&e).await);
                }
            },
            v => {
                let text = format!(
                    "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                    (v >> 16) & 0xffff,
                    v & 0xffff
                );
                client
                    .fail(Severity::Fatal, sqlstate::FEATURE_NOT_SUPPORTED, &text)
                    .await;
                return Err(ClientProtocolError);
            }
        }
    };

    // --- who and where
    let Startup {
        user,
        database,
        requested,
        unknown_protocol_options,
    } = match sort_startup(startup) {
        Ok(s) => s,
        Err(text) => {
            client
                .fail(Severity::Fatal, sqlstate::FEATURE_NOT_SUPPORTED, &text)
                .await;
            return Err(LoginFailed);
        }
    };
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        client
            .fail(
                Severity::Fatal,
                sqlstate::INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            )
            .await;
        return Err(LoginFailed);
    };
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if cfg.client_tls.mode == ClientTlsMode::Require && !client.stream.is_tls() {
        client
            .fail(
                Severity::Fatal,
                sqlstate::INVALID_AUTHORIZATION,
                "SSL required (client_tls_mode = \"require\")",
            )
            .await;
        return Err(LoginFailed);
    }

    let Some(count) = ClientCount::acquire(shared, cfg.max_client_conn) else {
        client
            .fail(
                Severity::Fatal,
                sqlstate::TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
            )
            .await;
        return Err(TooManyClients);
    };

    if minor > 0 || !unknown_protocol_options.is_empty() {
        msg::negotiate_protocol_version(&mut client.wbuf, 0, &unknown_protocol_options);
    }

    // --- the user's secret: configuration, auth file, else auth_query
    let found = match crate::authquery::secret_for(shared, cfg, &user, &database).await {
        Ok(found) => found,
        Err((auth_db, e)) => {
            // Never a secret in `e`: PostgreSQL's error fields or pgmux's own words.
            tracing::warn!(%user, db = %auth_db, error = %e, "auth_query failed");
            let (code, reason) = if e.is_connection() {
                (sqlstate::CONNECTION_FAILURE, ServerUnavailable)
            } else {
                (sqlstate::INVALID_AUTHORIZATION, LoginFailed)
            };
            let text = format!("pgmux: auth_query failed: database \"{auth_db}\": {e}");
            client.fail(Severity::Fatal, code, &text).await;
            return Err(reason);
        }
    };

    // --- authentication
    let passthrough = match authenticate(shared, cfg, client, &user, found.secret.as_ref()).await {
        Ok(keys) => keys,
        Err(reason) => {
            if let (Some(auth_db), LoginFailed) = (&found.looked_up_in, reason) {
                // The password may have changed since the lookup: ask again next time.
                shared.auth_query.forget(auth_db, &user);
            }
            if reason == LoginFailed {
                let text = format!("password authentication failed for user \"{user}\"");
                client
                    .fail(Severity::Fatal, sqlstate::INVALID_PASSWORD, &text)
                    .await;
                tracing::info!(%user, "password authentication failed");
            }
            return Err(reason);
        }
    };

    // --- the admin console (unless a real database has that name)
    if CONSOLE_NAMES.contains(&database.as_str()) && !cfg.databases.contains_key(&database) {
        let access = if cfg.admin_users.contains(&user) {
            Access::Admin
        } else if cfg.stats_users.contains(&user) {
            Access::Stats
        } else {
            let text = format!(
                "user \"{user}\" may not use the admin console (not in admin_users or stats_users)"
            );
            client
                .fail(Severity::Fatal, sqlstate::INSUFFICIENT_PRIVILEGE, &text)
                .await;
            return Err(LoginFailed);
        };
        let registration = shared.cancel.register();
        msg::auth_ok(&mut client.wbuf);
        for (k, v) in [
            ("server_version", "15.0 (pgmux console)"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("application_name", "pgmux"),
        ] {
            msg::parameter_status(&mut client.wbuf, k, v);
        }
        msg::backend_key_data(&mut client.wbuf, registration.pid, registration.secret);
        msg::ready_for_query(&mut client.wbuf, b'I');
        if client.flush().await.is_err() {
            return Err(ClientClosed);
        }
        drop(count);
        return Ok(LoggedIn::Console {
            user,
            access,
            registration,
        });
    }

    // --- database and pool
    let Some(db) = cfg.databases.get(&database) else {
        let text = format!("database \"{database}\" does not exist");
        client
            .fail(Severity::Fatal, sqlstate::INVALID_CATALOG_NAME, &text)
            .await;
        return Err(LoginFailed);
    };
    let pool = shared.pool_for(cfg, db, &user);
    if let Some(keys) = &passthrough {
        // No password for this user anywhere in pgmux: its servers log in with the keys
        // this client's proof revealed.
        pool.set_scram_keys(keys.clone());
    }
    // auth_query found a password or md5 hash: its servers log in with it.
    let looked_up_password = match (&found.looked_up_in, &found.secret) {
        (Some(_), Some(AuthSecret::Password(p) | AuthSecret::Md5(p))) => Some(Some(p)),
        (Some(_), _) => Some(None),
        (None, _) => None,
    };
    if let Some(p) = looked_up_password {
        pool.set_looked_up_password(p);
    }
    let server_params = match pool.startup_params() {
        Some(p) => p,
        None => {
            // First client of this pool: log a server in to learn what to report.
            match pool.checkout(cfg.query_wait_timeout).await {
                Ok(s) => drop(s),
                Err(e) => {
                    report_checkout_error(client, &e).await;
                    return Err(ServerUnavailable);
                }
            }
            pool.startup_params()
                .expect("set by the first server login")
        }
    };
    let params = match ClientParams::new(&server_params, &requested) {
        Ok(p) => p,
        Err(e) => {
            client
                .fail(Severity::Fatal, sqlstate::INVALID_PARAMETER_VALUE, &e)
                .await;
            return Err(LoginFailed);
        }
    };

    // --- login burst
    let registration = shared.cancel.register();
    msg::auth_ok(&mut client.wbuf);
    for (k, v) in params.login_report(&server_params) {
        msg::parameter_status(&mut client.wbuf, k, v);
    }
    msg::backend_key_data(&mut client.wbuf, registration.pid, registration.secret);
    msg::ready_for_query(&mut client.wbuf, b'I');
    if client.flush().await.is_err() {
        return Err(ClientClosed);
    }
    let replicas = shared.replicas_for(cfg, db, &user);
    if let (Some(keys), Some(set)) = (&passthrough, &replicas) {
        for p in &set.pools {
            p.set_scram_keys(keys.clone());
        }
    }
    if let (Some(password), Some(set)) = (looked_up_password, &replicas) {
        for p in &set.pools {
            p.set_looked_up_password(password);
        }
    }
    Ok(LoggedIn::Pool(Box::new(Login {
        pool,
        replicas,
        params,
        registration,
        user,
        database,
        _count: count,
    })))
}

/// The virtual databases of the SQL admin console.
const CONSOLE_NAMES: [&str; 2] = ["pgbouncer", "pgmux"];
pub(crate) const CONSOLE_DATABASE: &str = "pgbouncer";

/// The SQL admin console: simple-protocol queries answered by [`pgmux_admin::console`].
async fn console(
    shared: &Arc<Shared>,
    client: &mut Client,
    access: Access,
    entry: &ClientEntry,
) -> DisconnectReason {
    // Commands are short; a long message is a mistake or an attack.
    const MAX_CONSOLE_MESSAGE: usize = 1024 * 1024;
    // After an extended-protocol message was refused: ignore up to Sync.
    let mut skipping = false;
    loop {
        if client.flush().await.is_err() {
            return DisconnectReason::ClientClosed;
        }
        let frame = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return client.shutting_down().await,
            _ = entry.killed() => return client.killed().await,
            f = client.read_frame(MAX_CONSOLE_MESSAGE) => f,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) | Err(ProtocolError::Io(_)) => return DisconnectReason::ClientClosed,
            Err(e) => return client.protocol_violation(&e).await,
        };
        match frame.tag {
            b'Q' => {
                let Some((sql, _)) = msg::cstr(&frame.body) else {
                    return client
                        .protocol_violation(&"invalid Query message: missing terminator")
                        .await;
                };
                let sql = String::from_utf8_lossy(sql);
                let replies = pgmux_admin::console::execute(&**shared, access, &sql).await;
                for r in replies {
                    encode_console_reply(&mut client.wbuf, r);
                }
                msg::ready_for_query(&mut client.wbuf, b'I');
            }
            b'X' => return DisconnectReason::ClientTerminate,
            b'S' => {
                skipping = false;
                msg::ready_for_query(&mut client.wbuf, b'I');
            }
            b'H' => {}
            b'P' | b'B' | b'D' | b'E' | b'C' | b'F' => {
                if !skipping {
                    msg::error_response(
                        &mut client.wbuf,
                        Severity::Error,
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console supports the simple query protocol only",
                    );
                    skipping = true;
                }
            }
            other => {
                let text = format!("invalid frontend message type {}", other);
                client
                    .fail(Severity::Fatal, sqlstate::PROTOCOL_VIOLATION, &text)
                    .await;
                return DisconnectReason::ClientProtocolError;
            }
        }
    }
}

fn encode_console_reply(buf: &mut BytesMut, reply: Reply) {
    match reply {
        Reply::Table { columns, rows, tag } => {
            let cols: Vec<(&str, u32, i16)> = columns
                .iter()
                .map(|c| (c.name, c.ty.oid(), c.ty.len()))
                .collect();
            msg::row_description(buf, &cols);
            for row in &rows {
                msg::data_row(buf, row);
            }
            msg::command_complete(buf, &tag);
        }
        Reply::Done(tag) => msg::command_complete(buf, &tag),
        Reply::Notice { message, detail } => msg::notice_response(buf, &message, detail.as_deref()),
        Reply::Error { code, message } => msg::error_response(buf, Severity::Error, code, &message),
        Reply::Empty => msg::empty_query_response(buf),
    }
}

/// Runs the configured authentication exchange. `Err(LoginFailed)` means wrong
/// credentials (the caller reports 28P01); other reasons were reported already.
/// `Ok(Some(keys))`: the user's secret is a SCRAM verifier (auth_file or auth_query),
/// and these keys log its servers in (SCRAM passthrough). `secret`: see
/// [`crate::authquery::secret_for`]; None fails like a wrong password.
async fn authenticate(
    shared: &Arc<Shared>,
    cfg: &Config,
    client: &mut Client,
    user: &str,
    secret: Option<&AuthSecret>,
) -> Result<Option<Arc<auth::ScramKeys>>, DisconnectReason> {
    use DisconnectReason::*;
    match cfg.auth_type {
        AuthType::Trust => Ok(None),
        AuthType::Md5 => {
            let mut salt = [0u8; 4];
            rand::thread_rng().fill_bytes(&mut salt);
            msg::auth_md5(&mut client.wbuf, salt);
            client.flush().await.map_err(|_| ClientClosed)?;
            let body = read_password_message(client).await?;
            let (sent, _) = msg::cstr(&body).ok_or(LoginFailed)?;
            let expected = match &secret {
                Some(AuthSecret::Password(pw)) => auth::md5_response(user, pw.expose(), salt),
                Some(AuthSecret::Md5(hash)) => auth::md5_response_from_hash(hash.expose(), salt),
                Some(AuthSecret::Scram(_)) => {
                    tracing::warn!(%user, "the user's secret (auth_file or auth_query) is a SCRAM verifier: MD5 authentication cannot use it");
                    return Err(LoginFailed);
                }
                None => return Err(LoginFailed),
            };
            if auth::constant_time_eq(sent, expected.as_bytes()) {
                Ok(None)
            } else {
                Err(LoginFailed)
            }
        }
        AuthType::ScramSha256 => {
            let mut passthrough = false;
            let verifier = match &secret {
                Some(AuthSecret::Password(pw)) => shared.verifier(user, pw.expose()),
                Some(AuthSecret::Scram(v)) => match auth::ScramVerifier::parse(v.expose()) {
                    Some(v) => {
                        passthrough = true;
                        Arc::new(v)
                    }
                    None => {
                        tracing::warn!(%user, "the user's SCRAM secret (auth_file or auth_query) cannot be decoded");
                        Arc::new(auth::ScramVerifier::impossible(user, &shared.mock_secret))
                    }
                },
                Some(AuthSecret::Md5(_)) => {
                    tracing::warn!(%user, "the user's secret (auth_file or auth_query) is an MD5 hash: SCRAM authentication cannot use it (auth_type = \"md5\" can)");
                    Arc::new(auth::ScramVerifier::impossible(user, &shared.mock_secret))
                }
                None => Arc::new(auth::ScramVerifier::impossible(user, &shared.mock_secret)),
            };
            // Over TLS, -PLUS first: clients pick the first they support.
            let binding = client.end_point.clone();
            match binding {
                Some(_) => msg::auth_sasl(
                    &mut client.wbuf,
                    &[auth::SCRAM_SHA_256_PLUS, auth::SCRAM_SHA_256],
                ),
                None => msg::auth_sasl(&mut client.wbuf, &[auth::SCRAM_SHA_256]),
            }
            client.flush().await.map_err(|_| ClientClosed)?;
            // SASLInitialResponse: mechanism\0, i32 length, data
            let body = read_password_message(client).await?;
            let (mechanism, rest) = msg::cstr(&body).ok_or(LoginFailed)?;
            let plus = binding.is_some() && mechanism == auth::SCRAM_SHA_256_PLUS.as_bytes();
            if !plus && mechanism != auth::SCRAM_SHA_256.as_bytes() {
                client
                    .fail(
                        Severity::Fatal,
                        sqlstate::PROTOCOL_VIOLATION,
                        "client selected an invalid SASL authentication mechanism",
                    )
                    .await;
                return Err(ClientProtocolError);
            }
            if rest.len() < 4 {
                return Err(LoginFailed);
            }
            let data = &rest[4..];
            let (exchange, server_first) =
                match ScramServer::start(&verifier, data, binding.as_deref(), plus) {
                    Ok(x) => x,
                    Err(e) => {
                        return Err(client.protocol_violation(&e).await);
                    }
                };
            msg::auth_sasl_continue(&mut client.wbuf, server_first.as_bytes());
            client.flush().await.map_err(|_| ClientClosed)?;
            let body = read_password_message(client).await?;
            let (server_final, client_key) = exchange.finish(&body).map_err(|_| LoginFailed)?;
            msg::auth_sasl_final(&mut client.wbuf, server_final.as_bytes());
            Ok(passthrough.then(|| {
                Arc::new(auth::ScramKeys {
                    verifier: (*verifier).clone(),
                    client_key,
                })
            }))
        }
    }
}

async fn read_password_message(client: &mut Client) -> Result<BytesMut, DisconnectReason> {
    match client.read_frame(MAX_AUTH_MESSAGE).await {
        Ok(Some(f)) if f.tag == b'p' => Ok(f.body),
        Ok(Some(f)) => {
            let text = format!(
                "expected password response, got message type {}",
                f.tag as char
            );
            client
                .fail(Severity::Fatal, sqlstate::PROTOCOL_VIOLATION, &text)
                .await;
            Err(DisconnectReason::ClientProtocolError)
        }
        Ok(None) => Err(DisconnectReason::ClientClosed),
        Err(ProtocolError::Io(_)) => Err(DisconnectReason::ClientClosed),
        Err(e) => {
            client
                .fail(
                    Severity::Fatal,
                    sqlstate::PROTOCOL_VIOLATION,
                    &e.to_string(),
                )
                .await;
            Err(DisconnectReason::ClientProtocolError)
        }
    }
}

async fn report_checkout_error(client: &mut Client, e: &PoolError) {
    match e {
        PoolError::Connect(BackendError::Server { fields, .. }) => {
            msg::error_response_from_fields(&mut client.wbuf, fields, Severity::Fatal);
            let _ = client.flush().await;
            let _ = client.stream.shutdown().await;
        }
        PoolError::WaitTimeout(_) | PoolError::DbLimit(_) | PoolError::Retry => {
            client
                .fail(Severity::Fatal, sqlstate::QUERY_CANCELED, &e.to_string())
                .await;
        }
        PoolError::Connect(e) => {
            let text = format!("pgmux: {e}");
            client
                .fail(Severity::Fatal, sqlstate::CONNECTION_FAILURE, &text)
                .await;
        }
    }
}

struct Session<'a> {
    shared: &'a Arc<Shared>,
    /// The configuration as of login (what the client's login was checked against).
    cfg: &'a Arc<Config>,
    /// The live configuration, for what a reload changes from the next transaction on. A
    /// cache: looking costs one atomic load while nothing changed. It keeps the
    /// configuration it last saw alive until it looks again.
    live: arc_swap::Cache<&'a arc_swap::ArcSwap<Config>, Arc<Config>>,
    /// The primary's pool.
    pool: Arc<Pool>,
    /// Replica pools, when the database has replicas and routing is not primary_only.
    replicas: Option<Arc<ReplicaSet>>,
    /// Where `replicas` is refreshed from at every transaction.
    replicas_live: crate::pool::ReplicasLive,
    read_routing: ReadRouting,
    /// This client's last write (read-your-writes scope `client`); 0: none.
    client_mark: u64,
    client: Client,
    params: ClientParams,
    registration: Registration,
    /// The client's named prepared statements.
    statements: ClientStatements,
    /// pgmux answered a message with an error: drop client messages up to Sync.
    skip_to_sync: bool,
    /// Bytes on their way to the linked server.
    to_server: BytesMut,
    /// A copy of the link's first unit while it may be sent again ([`Resend`]). Reused
    /// across transactions (no allocation per unit); let go of when it grew large.
    replay: Vec<u8>,
    /// This client in the registry (state for listings, kill token).
    entry: &'a ClientEntry,
    /// Session state this client made (`session_state_action = "pin"`): its server stays
    /// with it from the end of that transaction until it disconnects.
    pin: Option<Feature>,
    /// The pinned server between transactions.
    pinned: Option<PooledServer>,
    /// Features already logged for this client (`warn`), as bits of [`Feature::ALL`].
    warned: u16,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // Counted in the pool's `pinned` gauge since the pin was asked for.
        if self.pin.is_some() {
            self.pool.stats.pinned.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Resolves when `timer` fires; never without one.
async fn expired(timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// What one link moved, added to the pool's totals when it ends.
#[derive(Default)]
struct LinkCounters {
    to_server: u64,
    from_server: u64,
    query_us: u64,
    /// When the last ReadyForQuery arrived: the end of the transaction when the server
    /// is released (one clock read fewer per transaction).
    last_ready: Option<std::time::Instant>,
    /// Session-state statements seen (the first one's kind, and how many).
    state_found: Option<Feature>,
    state_count: u64,
}

/// Why forwarding stopped without the server being released normally.
enum LinkEnd {
    Released,
    Ended(DisconnectReason),
    /// The server died before answering (see [`Resend`]): the unit is routed again. True:
    /// the unit (in [`Session::replay`]) goes back in front of the client's buffer; false:
    /// nothing of the client's had been taken yet.
    Retry(bool),
}

/// The first unit of a link, kept while it may still be sent again to another server.
#[derive(Clone, Copy)]
enum Resend {
    /// A read-only unit on a replica: until its answer is complete (held back from the
    /// client until then, up to [`HOLD_LIMIT`]). A hot standby cannot write, so running
    /// it again is safe whatever happened to the first attempt.
    Answer,
    /// A unit on the primary: until the server has completed anything (a CommandComplete,
    /// an error, a COPY, a ReadyForQuery: see [`early_answer`]), and for at most
    /// [`RESEND_WINDOW`] after it was sent; the answer so far is held back meanwhile (up
    /// to [`HOLD_LIMIT`]). If the connection closes in that time, or the server's next
    /// message is the FATAL of a terminated backend (57P01 admin shutdown, 57P02 crash,
    /// 57P03 cannot connect now, 57P05 idle session timeout), the unit has not taken
    /// effect: PostgreSQL commits a statement before its CommandComplete (and an extended
    /// batch at its Sync, after the CommandComplete), and handles a termination only at
    /// points where nothing is committed, so the FATAL rolled the unit back (only what
    /// PostgreSQL never rolls back, such as a sequence's nextval, may have advanced).
    /// This is what lets pg_terminate_backend on idle backends, or a backend that died
    /// between the pool's liveness check and the client's query, cost the client nothing.
    /// A statement that was running longer when its backend was terminated gets the
    /// error: the operator may have meant to stop it.
    BeforeCompletion,
}

/// Whether `r` may still be sent again at `now`, its first write having been at `sent`.
fn resend_allowed(
    r: &Resend,
    sent: Option<std::time::Instant>,
    now: impl FnOnce() -> std::time::Instant,
) -> bool {
    match r {
        Resend::Answer => true,
        Resend::BeforeCompletion => {
            sent.is_none_or(|t| now().saturating_duration_since(t) <= RESEND_WINDOW)
        }
    }
}

/// What the answer so far says, for [`Resend::BeforeCompletion`].
#[derive(Debug, PartialEq, Eq)]
enum Early {
    /// Only messages that complete nothing (RowDescription, DataRow, ParseComplete, …),
    /// and maybe the start of another: wait for more.
    Pending,
    /// The FATAL of a terminated backend, after nothing that completed.
    Death,
    /// Something completed (or the answer is too long to hold): no resending.
    Answered,
}

/// Walks the messages at the start of `buf` without consuming them.
fn early_answer(buf: &[u8]) -> Early {
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return Early::Pending;
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len < 4 || pos + 1 + len > HOLD_LIMIT {
            return Early::Answered; // malformed (the scan reports it) or too long to hold
        }
        match tag {
            // Describe answers, rows, ParseComplete/BindComplete, parameter changes,
            // notices: nothing is completed or committed by them.
            b'T' | b'D' | b'1' | b'2' | b'n' | b't' | b'S' | b'N' => {}
            b'E' => {
                let Some(body) = buf.get(pos + 5..pos + 1 + len) else {
                    return Early::Pending;
                };
                let death = ErrorFields::parse(body).is_ok_and(|f| {
                    f.severity() == "FATAL"
                        && matches!(f.code(), "57P01" | "57P02" | "57P03" | "57P05")
                });
                return if death { Early::Death } else { Early::Answered };
            }
            _ => return Early::Answered,
        }
        pos += 1 + len;
    }
}

/// After query_timeout's cancel, how long the server has to answer before it is given up.
const QUERY_CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// Attempts of one unit after its replica died; then the client gets the error.
const MAX_UNIT_RETRIES: u32 = 3;
/// Largest [`Session::replay`] kept between transactions (an idle client's memory).
const REPLAY_KEEP: usize = 1024;
/// Largest answer to a replayable replica unit held back until it is complete.
const HOLD_LIMIT: usize = 64 * 1024;
/// How long after a unit went to the primary a dead server's goodbye still lets it run
/// again ([`Resend::BeforeCompletion`]). A backend terminated while idle (as the operator's
/// `state = 'idle'` runbook sees it) never runs the unit: PostgreSQL handles the
/// termination before it executes anything it read. But "idle" can last a while after the
/// unit arrived: on a busy host a backend may wait to be scheduled (300 ms was seen on
/// 2 cores under pgbench). A statement running longer than this when its backend was
/// terminated was visibly active: the operator may have meant to stop it, so it is not
/// sent again and the client gets the error.
const RESEND_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the drain waits for the first transaction of a client that had not started
/// one when the drain began. Such a client connected just before the SIGTERM, and during a
/// restart on the same port (SO_REUSEPORT) its connect may have reached this process
/// rather than its successor by chance: it is served once, then told 57P01 like everyone.
const FIRST_TRANSACTION_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves when something ends a client that is between transactions (see
/// [`ClientEntry::interrupted`]). The drain reaches a client that has run a transaction
/// at once, a fresh one [`FIRST_TRANSACTION_GRACE`] later (unless KILL comes first).
async fn interrupted(entry: &ClientEntry, draining: &AtomicBool, fresh: bool) -> Interrupt {
    let why = entry.interrupted(draining).await;
    if why == Interrupt::Drain && fresh {
        // Boxed: only a draining client pays for the timer, not every idle task.
        tokio::select! {
            _ = Box::pin(tokio::time::sleep(FIRST_TRANSACTION_GRACE)) => {}
            _ = entry.killed() => return Interrupt::Killed,
        }
    }
    why
}

impl<'a> Session<'a> {
    async fn serve(&mut self) -> DisconnectReason {
        let max = self.cfg.max_message_size;
        let mut retries = 0;
        // No transaction started yet: see [`FIRST_TRANSACTION_GRACE`].
        let mut fresh = true;
        'idle: loop {
            // --- idle: wait for a message that needs a server
            loop {
                match complete_frame_len(&self.client.rbuf, max) {
                    Ok(Some((tag, len))) => match tag {
                        b'X' => return DisconnectReason::ClientTerminate,
                        // Nothing to flush and no COPY in progress without a server.
                        b'H' | b'd' | b'c' | b'f' => {
                            self.client.rbuf.advance(len);
                            continue;
                        }
                        b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'F' => break,
                        other => {
                            let text = format!("invalid frontend message type {}", other);
                            self.client
                                .fail(Severity::Fatal, sqlstate::PROTOCOL_VIOLATION, &text)
                                .await;
                            return DisconnectReason::ClientProtocolError;
                        }
                    },
                    // A type no frontend message has (e.g. a second StartupMessage, whose
                    // first byte is 0): refused now, not after waiting for the length it
                    // seems to announce.
                    Ok(None)
                        if self
                            .client
                            .rbuf
                            .first()
                            .is_some_and(|t| !b"QPBDECSFXHdcf".contains(t)) =>
                    {
                        let text = format!("invalid frontend message type {}", self.client.rbuf[0]);
                        self.client
                            .fail(Severity::Fatal, sqlstate::PROTOCOL_VIOLATION, &text)
                            .await;
                        return DisconnectReason::ClientProtocolError;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        return self.client.protocol_violation(&e).await;
                    }
                }
                if self.client.flush().await.is_err() {
                    return DisconnectReason::ClientClosed;
                }
                // Boxed and only when configured: an idle client's task stays small.
                let idle_timeout = self.live.load().client_idle_timeout;
                let mut idle_timer =
                    (!idle_timeout.is_zero()).then(|| Box::pin(tokio::time::sleep(idle_timeout)));
                // A pinned server is read while idle too: LISTEN notifications go to the
                // client at once, and a backend that dies is noticed.
                let pinned_read = async {
                    match self.pinned.as_deref_mut() {
                        Some(Server { stream, buf, .. }) => {
                            poll_fn(|cx| stream.poll_read_drain(buf, cx)).await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    why = interrupted(self.entry, &self.shared.draining, fresh) => return self.interrupted(why).await,
                    _ = expired(&mut idle_timer) => {
                        self.client.fail(Severity::Fatal, sqlstate::IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout (client_idle_timeout)").await;
                        return DisconnectReason::ClientIdleTimeout;
                    }
                    r = pinned_read => {
                        if let Some(reason) = self.pinned_spoke(r).await {
                            return reason;
                        }
                    }
                    r = self.client.read_more() => match r {
                        Ok(0) | Err(_) => return DisconnectReason::ClientClosed,
                        Ok(_) => {}
                    }
                }
            }

            // Statement bookkeeping that needs no server is answered here.
            if self.cfg.max_prepared_statements > 0 {
                match answer_without_server(
                    &mut self.client.rbuf,
                    &mut self.client.wbuf,
                    &mut self.statements,
                    &self.pool.statements,
                    &self.pool.stats,
                    max,
                ) {
                    Ok(true) => continue 'idle,
                    Ok(false) => {}
                    Err(e) => {
                        return self.client.protocol_violation(&e).await;
                    }
                }
            }

            // --- a server for this transaction: the pinned one, or one from a pool
            let was_pinned = self.pin.is_some();
            let checkout = if let Some(mut server) = self.pinned.take() {
                // Read while idle (see above): a dead one shows when the unit is sent.
                server.taken_at = std::time::Instant::now();
                let primary = Choice {
                    target: Target::Primary,
                    writes: true,
                };
                Ok((server, primary, None))
            } else {
                self.entry.waiting();
                match self.checkout_now(fresh).await {
                    Ok(r) => r,
                    Err(reason) => return reason,
                }
            };
            let (server, choice, replay) = match checkout {
                Ok(s) => {
                    fresh = false;
                    s
                }
                Err(e) => {
                    report_checkout_error(&mut self.client, &e).await;
                    return match e {
                        PoolError::WaitTimeout(_) | PoolError::DbLimit(_) | PoolError::Retry => {
                            DisconnectReason::WaitTimeout
                        }
                        PoolError::Connect(_) => DisconnectReason::ServerUnavailable,
                    };
                }
            };
            // Boxed: the link (the forwarding loop's select) is the largest state of this
            // future; inline, every idle client's task would be sized for it.
            match Box::pin(self.link(server, choice, replay)).await {
                LinkEnd::Released => retries = 0,
                LinkEnd::Ended(reason) => return reason,
                LinkEnd::Retry(_) if was_pinned => {
                    // Not on another server: the session state is on the lost one.
                    self.client.server_lost().await;
                    return DisconnectReason::ServerClosed;
                }
                LinkEnd::Retry(with_unit) => {
                    retries += 1;
                    if retries > MAX_UNIT_RETRIES {
                        self.client.server_lost().await;
                        return DisconnectReason::ServerClosed;
                    }
                    if with_unit {
                        let unit = &self.replay;
                        let mut b = BytesMut::with_capacity(unit.len() + self.client.rbuf.len());
                        b.extend_from_slice(unit);
                        b.extend_from_slice(&self.client.rbuf);
                        self.client.rbuf = b;
                    }
                }
            }
            if self.replay.capacity() > REPLAY_KEEP {
                self.replay = Vec::new();
            }
        }
    }

    /// The pinned server sent something (or closed) while the client was idle: forwards
    /// notifications and notices; ends the session when the server is gone, since the
    /// client's session state went with it.
    async fn pinned_spoke(&mut self, r: std::io::Result<usize>) -> Option<DisconnectReason> {
        let server = self.pinned.as_deref_mut()?;
        let lost = match r {
            Ok(0) | Err(_) => None,
            Ok(_) => match take_unsolicited(server, &mut self.client.wbuf, &mut self.params) {
                Ok(Unsolicited::Forwarded) => return None,
                Ok(Unsolicited::Error(body)) => Some(body),
                Err(e) => {
                    tracing::warn!(error = %e, "protocol error from a pinned server");
                    None
                }
            },
        };
        if let Some(mut s) = self.pinned.take() {
            s.dirty = true;
            s.peer_closed = true;
        }
        tracing::info!(db = %self.pool.database, user = %self.pool.user, client = self.entry.id, "pinned server connection lost between transactions; the client is disconnected");
        match lost.as_deref().map(ErrorFields::parse) {
            Some(Ok(f)) => {
                msg::error_response_from_fields(&mut self.client.wbuf, &f, Severity::Fatal);
                let _ = self.client.flush().await;
            }
            _ => {
                let text = format!(
                    "pgmux: the server connection this session was pinned to (for {}) was closed; its session state is lost",
                    self.pin.map_or("session state", Feature::describe)
                );
                self.client
                    .fail(Severity::Fatal, sqlstate::CONNECTION_FAILURE, &text)
                    .await;
            }
        }
        Some(DisconnectReason::ServerClosed)
    }

    /// A pool checkout; `Err` when the session ends instead (the drain, KILL, a removed
    /// database: the client has been told).
    async fn checkout_now(
        &mut self,
        fresh: bool,
    ) -> Result<Result<(PooledServer, Choice, Option<Resend>), PoolError>, DisconnectReason> {
        tokio::select! {
            biased;
            // A client still waiting for a server when the drain starts has not begun
            // its transaction: it is told, like an idle one, and nothing runs (a fresh
            // client gets FIRST_TRANSACTION_GRACE first, as when idle).
            why = interrupted(self.entry, &self.shared.draining, fresh) => Err(self.interrupted(why).await),
            r = self.checkout() => Ok(r),
        }
    }

    /// A server for the client's next unit of work: a replica when routing allows it.
    /// For a replica, also a copy of the unit when it may be sent again elsewhere.
    async fn checkout(&mut self) -> Result<(PooledServer, Choice, Option<Resend>), PoolError> {
        // Read now, not at login: a live change applies to the next transaction.
        let wait = self.live.load().query_wait_timeout;
        // The replica set as of the latest reload (replicas added, removed or moved).
        let now = self.replicas_live.load();
        if now.as_ref().map(Arc::as_ptr) != self.replicas.as_ref().map(Arc::as_ptr) {
            self.replicas = now.clone();
        }
        let mut choice = Choice {
            target: Target::Primary,
            writes: true,
        };
        if let Some(set) = &self.replicas {
            // A malformed message is reported by the pump, on the primary.
            let next = next_unit(
                &self.client.rbuf,
                &self.statements,
                self.cfg.max_message_size,
            )
            .unwrap_or(Next {
                unit: Unit::Unknown,
                len: 0,
            });
            let decision = routing::classify(&self.shared.router, &next.unit);
            choice = set.choose(
                self.read_routing,
                self.cfg.read_your_writes,
                &decision,
                self.client_mark,
            );
            if let Target::Replica(i) = choice.target {
                match Box::pin(set.pools[i].checkout(wait)).await {
                    Ok(s) => {
                        let replay = self.replayable_unit().then_some(Resend::Answer);
                        return Ok((s, choice, replay));
                    }
                    Err(PoolError::Connect(e)) => {
                        // Down between transactions: the client does not notice.
                        set.topology.replicas[i].mark_down(&e.to_string());
                        set.topology
                            .stats
                            .kept_unhealthy
                            .fetch_add(1, Ordering::Relaxed);
                        choice.target = Target::Primary;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        // Boxed, like the link: an idle client's task is not sized for a pool wait.
        let server = Box::pin(self.pool.checkout(wait)).await?;
        Ok((
            server,
            choice,
            self.replayable_unit().then_some(Resend::BeforeCompletion),
        ))
    }

    /// Tells the client why it is disconnected between transactions.
    async fn interrupted(&mut self, why: Interrupt) -> DisconnectReason {
        match why {
            Interrupt::Drain => self.client.shutting_down().await,
            Interrupt::Killed => self.killed().await,
            Interrupt::Removed => self.client.database_removed(&self.pool.database).await,
        }
    }

    /// KILL, or the end of the drain (shutdown_timeout, SIGINT) reaching this client.
    async fn killed(&mut self) -> DisconnectReason {
        if self.shared.shutdown.is_cancelled() {
            self.client.shutting_down().await
        } else {
            self.client.killed().await
        }
    }

    /// Copies the client's next unit into [`Session::replay`] if it could run again on
    /// another server (and is at most [`HOLD_LIMIT`] long: a huge unit is not copied).
    fn replayable_unit(&mut self) -> bool {
        let rbuf = &self.client.rbuf;
        match replayable_len(rbuf, &self.statements, self.cfg.max_message_size) {
            Some(n) if n <= HOLD_LIMIT => {
                self.replay.clear();
                self.replay.extend_from_slice(&rbuf[..n]);
                true
            }
            _ => false,
        }
    }

    // Not an `async fn`: an async fn's future keeps its arguments twice (as passed, and
    // moved into its body), an `async move` block once. The link's future is boxed for
    // every transaction (see `serve`), and this keeps it under 1 KiB, where the
    // allocator serves it from its per-thread cache.
    #[allow(clippy::manual_async_fn)]
    fn link<'s>(
        &'s mut self,
        mut server: PooledServer,
        choice: Choice,
        replay: Option<Resend>,
    ) -> impl std::future::Future<Output = LinkEnd> + use<'s, 'a> {
        async move {
            let replica = match (&self.replicas, choice.target) {
                (Some(set), Target::Replica(i)) => Some(set.topology.replicas[i].clone()),
                _ => None,
            };
            if let Some(sql) = self.params.sync_sql(&server.params) {
                match server.simple_query(&sql).await {
                    Ok(None) => {
                        for (k, v) in self.params.after_sync(&mut server.params) {
                            msg::parameter_status(&mut self.client.wbuf, k, &v);
                        }
                        // The transaction starts after the parameters' round trip.
                        server.taken_at = std::time::Instant::now();
                    }
                    Ok(Some(err)) => {
                        msg::error_response_from_fields(
                            &mut self.client.wbuf,
                            &err,
                            Severity::Fatal,
                        );
                        let _ = self.client.flush().await;
                        return LinkEnd::Ended(DisconnectReason::LoginFailed);
                    }
                    Err(_) => {
                        // Nothing of the client's was sent yet: route the unit again.
                        server.dirty = true;
                        server.peer_closed = true;
                        if let (Some(r), Some(set)) = (&replica, &self.replicas) {
                            set.topology.lost_before_answer(r);
                        }
                        return LinkEnd::Retry(false);
                    }
                }
            }
            self.registration.slot.link(&server.cancel);
            if let Some(r) = &replica {
                r.outstanding.fetch_add(1, Ordering::Relaxed);
            }
            // Read by the checkout (see `Server::taken_at`).
            let started = server.taken_at;
            let server_entry = server.entry.clone();
            if let Some(e) = &server_entry {
                e.link(self.entry.id, started);
            }
            self.entry.linked(server.id, server.cancel.pid);
            let readies = server.readies;
            let pool = server.pool().clone();
            let mut counters = LinkCounters::default();
            let end = self
                .forward(&mut server, &pool, replica.is_some(), replay, &mut counters)
                .await;
            self.count_link(&mut server, &pool, replica.is_some(), &counters);
            self.registration.slot.unlink().await;
            self.entry.idle();
            let stats = &pool.stats;
            // The release's time: the last ReadyForQuery's, read when it arrived. Also
            // the server's `last_used` (pool checkin).
            let released = counters.last_ready.unwrap_or_else(std::time::Instant::now);
            if let Some(e) = &server_entry {
                e.prepared.store(server.statements.len(), Ordering::Relaxed);
                e.link(0, released);
            }
            stats
                .queries
                .fetch_add(server.readies - readies, Ordering::Relaxed);
            if matches!(end, LinkEnd::Released) {
                let took = released.saturating_duration_since(started);
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                stats
                    .xact_us
                    .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                pool.histograms.transaction.record(took);
            }
            if self.pin.is_some() && replica.is_none() && matches!(end, LinkEnd::Released) {
                // Kept for this client's next transactions; closed when it disconnects.
                if let Some(e) = &server_entry {
                    e.link(self.entry.id, released);
                }
                // Marked here too: a unit retried after its server died runs again on a new
                // one, where it is not looked for once the pin was asked for.
                server.session_state = true;
                self.pinned = Some(server);
            } else {
                server.released_at = Some(released);
                drop(server);
            }
            if let LinkEnd::Retry(_) = end {
                pool.stats.retried.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(db = %pool.database, user = %pool.user, "server died before answering; the unit runs again on another server");
            }
            if let Some(set) = &self.replicas {
                let stats = &set.topology.stats;
                match &replica {
                    Some(r) => {
                        r.outstanding.fetch_sub(1, Ordering::Relaxed);
                        if let LinkEnd::Retry(_) = end {
                            set.topology.lost_before_answer(r);
                            return end;
                        }
                        r.transactions.fetch_add(1, Ordering::Relaxed);
                        stats.replica.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        if let LinkEnd::Retry(_) = end {
                            return end;
                        }
                        stats.primary.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // After a write the scope's reads wait for a replica that replayed it. Taken
                // before the client sees the commit (its reply is flushed after this).
                if replica.is_none() && choice.writes {
                    let mark = set.topology.wal.mark();
                    match self.cfg.read_your_writes {
                        ReadYourWrites::User => set.writes.record(mark),
                        ReadYourWrites::Client => self.client_mark = self.client_mark.max(mark),
                        ReadYourWrites::Off => {}
                    }
                }
            }
            end
        }
    }

    /// Folds a link's counters into its pool's statistics (and reports the session
    /// state it saw). Separate from [`Self::forward`], and not an async wrapper around it:
    /// a wrapper future would repeat `forward`'s arguments in the link's future.
    fn count_link(
        &mut self,
        server: &mut Server,
        pool: &Pool,
        one_unit: bool,
        counters: &LinkCounters,
    ) {
        let stats = &pool.stats;
        stats
            .bytes_received
            .fetch_add(counters.to_server, Ordering::Relaxed);
        stats
            .bytes_sent
            .fetch_add(counters.from_server, Ordering::Relaxed);
        stats
            .query_us
            .fetch_add(counters.query_us, Ordering::Relaxed);
        if !server.error_classes.is_empty() {
            let mut errors = stats.errors.lock().unwrap_or_else(|e| e.into_inner());
            for class in server.error_classes.drain(..) {
                *errors.entry(class).or_insert(0) += 1;
            }
        }
        if let Some(f) = counters.state_found {
            self.session_state_seen(pool, f, counters.state_count, one_unit);
        }
    }

    /// Counts and logs session-state statements seen during a link, and asks for the
    /// server to be pinned (`session_state_action = "pin"`, on the primary).
    fn session_state_seen(&mut self, pool: &Pool, f: Feature, count: u64, replica: bool) {
        let action = self.live.load().session_state_action;
        let stats = &pool.stats;
        let app = self.params.get("application_name").unwrap_or("");
        stats.count_session_state(app, f, count);
        let counter = match action {
            SessionStateAction::Pin => &stats.session_pins,
            SessionStateAction::Warn => &stats.session_state_warned,
            SessionStateAction::Reject => &stats.session_state_rejected,
        };
        if action != SessionStateAction::Pin {
            counter.fetch_add(count, Ordering::Relaxed);
        }
        let bit = 1u16 << Feature::ALL.iter().position(|x| *x == f).unwrap_or(0);
        let first = self.warned & bit == 0;
        self.warned |= bit;
        let (db, user, client) = (&pool.database, &pool.user, self.entry.id);
        match action {
            SessionStateAction::Pin if replica => {
                // Only reads reach a replica (here: inside BEGIN READ ONLY). That server is
                // closed at release; the client's later transactions do not see the state.
                tracing::warn!(%db, %user, client, application_name = app, feature = f.as_str(), "session state made on a replica inside a read-only transaction: the replica connection is closed after it, the state is not kept");
            }
            SessionStateAction::Pin => {
                if self.pin.is_none() {
                    self.pin = Some(f);
                    counter.fetch_add(1, Ordering::Relaxed);
                    self.pool.stats.pinned.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%db, %user, client, application_name = app, feature = f.as_str(), "client made session state: its server connection stays with it until it disconnects (session_state_action = pin)");
                }
            }
            SessionStateAction::Warn if first => {
                tracing::warn!(%db, %user, client, application_name = app, feature = f.as_str(), "client made session state that stays on the pooled server connection and may reach other clients (session_state_action = warn)");
            }
            SessionStateAction::Reject if first => {
                tracing::info!(%db, %user, client, application_name = app, feature = f.as_str(), "statement refused: it would make session state (session_state_action = reject)");
            }
            SessionStateAction::Warn | SessionStateAction::Reject => {}
        }
    }

    /// Forwards both ways until the server can be released or one side ends.
    /// `one_unit`: the server was chosen for one unit of work at a time (a replica): the
    /// client's next unit waits until this one's transaction is over, so that it is
    /// routed on its own.
    ///
    /// `replay`: the first unit's bytes, when it may run again elsewhere. Its answer is
    /// held back until complete (up to [`HOLD_LIMIT`]); if the server dies before that,
    /// the link ends with [`LinkEnd::Retry`] and the client sees nothing of it. A unit on a
    /// replica has no side effects (a hot standby cannot write), so running it again is
    /// safe.
    async fn forward(
        &mut self,
        server: &mut Server,
        pool: &Pool,
        one_unit: bool,
        mut replay: Option<Resend>,
        counters: &mut LinkCounters,
    ) -> LinkEnd {
        let max = self.cfg.max_message_size;
        let histograms = &pool.histograms;
        // KILL ends the client in the middle of a transaction too.
        let entry = self.entry;
        let shutdown = &self.shared.shutdown;
        // The configuration as of this link (a live change applies from the next one).
        let live: &Config = self.live.load();
        let (idle_tx_timeout, query_timeout, state_action) = (
            live.idle_transaction_timeout,
            live.query_timeout,
            live.session_state_action,
        );
        // A pinned server is the client's already: nothing more to look for.
        let state_action = (self.pin.is_none()).then_some(state_action);
        // Armed while a request is unanswered (only when configured): at the deadline the
        // query is cancelled; if the server has not answered QUERY_CANCEL_GRACE later, it
        // is given up.
        let mut query_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let mut query_timer_for: Option<std::time::Instant> = None;
        let mut cancel_sent = false;
        // Armed while the client sits idle inside a transaction (only when configured).
        let mut idle_tx_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let mut was_idle_in_tx = false;
        let client = &mut self.client;
        let params = &mut self.params;
        let statements = &mut self.statements;
        let skip_to_sync = &mut self.skip_to_sync;
        let skip_at_start = *skip_to_sync;
        let registry = &self.pool.statements;
        let stats = &self.pool.stats;
        let max_prepared = self.cfg.max_prepared_statements;
        // Reused across transactions; empty whenever a server is released.
        let to_server = &mut self.to_server;
        to_server.clear();
        let mut client_done = false;
        // When the oldest unanswered request went out.
        let mut query_start: Option<std::time::Instant> = None;
        // One-unit mode: the unit has been pumped whole.
        let mut unit_done = false;
        let reply_start = client.wbuf.len();
        loop {
            if counters.to_server > 0
                && to_server.is_empty()
                && server.expect.is_empty()
                && !server.unsynced
                && server.pending_body == 0
                && server.status == b'I'
                && !server.buf.is_empty()
            {
                // Bytes after the transaction's last answer (scan_server leaves them): an
                // unsolicited message such as a shutting-down backend's FATAL. The server
                // goes, the client carries on.
                server.dirty = true;
                return LinkEnd::Released;
            }
            if (unit_done && server.expect.is_empty() && !server.unsynced)
                || client.wbuf.len().saturating_sub(reply_start) > HOLD_LIMIT
            {
                replay = None; // answered, or too big to hold: never sent again
            }
            if one_unit
                && unit_done
                && to_server.is_empty()
                && server.buf.is_empty()
                && server.state() == crate::backend::ReturnState::Clean
            {
                return LinkEnd::Released;
            }
            // Client frames into the server's queue.
            let server_idle = server.expect.is_empty() && !server.unsynced;
            if !client_done && to_server.len() < OUT_LIMIT && (!unit_done || server_idle) {
                // In one-unit mode an idle server inside a transaction (BEGIN READ ONLY)
                // takes the next unit.
                let mut pump = Pump {
                    server,
                    out: to_server,
                    client_out: &mut client.wbuf,
                    statements,
                    registry,
                    stats,
                    max_prepared,
                    skip_to_sync,
                    one_unit,
                    unit_ended: false,
                    state: StateCheck::new(state_action),
                    track: &live.track_extra_parameters,
                };
                let pumped = pump_client(&mut client.rbuf, &mut pump, max);
                unit_done = pump.unit_ended;
                if let Some(f) = pump.state.found {
                    counters.state_found.get_or_insert(f);
                    counters.state_count += u64::from(pump.state.count);
                    if state_action == Some(SessionStateAction::Pin) {
                        // Marked now: however the link ends, the server is not reused.
                        server.session_state = true;
                    }
                }
                match pumped {
                    Ok(false) => {}
                    Ok(true) => client_done = true, // Terminate: finish up, then end
                    Err(e) => {
                        // The server may have received part of this request: never reuse it.
                        server.dirty = true;
                        client
                            .fail(
                                Severity::Fatal,
                                sqlstate::PROTOCOL_VIOLATION,
                                &e.to_string(),
                            )
                            .await;
                        return LinkEnd::Ended(DisconnectReason::ClientProtocolError);
                    }
                }
            }
            tracing::trace!(expect = ?server.expect, unsynced = server.unsynced, status = server.status, pending = server.pending_body, "link state");
            if to_server.is_empty() && server.buf.is_empty() {
                if client_done {
                    return LinkEnd::Ended(DisconnectReason::ClientTerminate);
                }
                if server.state() == crate::backend::ReturnState::Clean {
                    return LinkEnd::Released;
                }
            }
            let idle_in_tx = !idle_tx_timeout.is_zero()
                && to_server.is_empty()
                && server.expect.is_empty()
                && !server.unsynced
                && server.status != b'I'
                && server.buf.is_empty()
                && client.rbuf.is_empty();
            if idle_in_tx && !was_idle_in_tx {
                let at = tokio::time::Instant::now() + idle_tx_timeout;
                match idle_tx_timer.as_mut() {
                    Some(t) => t.as_mut().reset(at),
                    None => idle_tx_timer = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
            was_idle_in_tx = idle_in_tx;
            if !query_timeout.is_zero() && query_start != query_timer_for {
                query_timer_for = query_start;
                cancel_sent = false;
                if let Some(t) = query_start {
                    let at = tokio::time::Instant::from_std(t + query_timeout);
                    match query_timer.as_mut() {
                        Some(timer) => timer.as_mut().reset(at),
                        None => query_timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
            }
            let query_running = query_timer_for.is_some();
            enum Ev {
                ClientRead(std::io::Result<usize>),
                ServerRead(std::io::Result<usize>),
                ServerWrite(std::io::Result<usize>),
                ClientWrite(std::io::Result<usize>),
                Killed,
                IdleInTransaction,
                QueryTimeout,
            }
            let ev = {
                let cs = &client.stream;
                let client_flush = cs.wants_flush();
                let server_flush = server.stream.wants_flush();
                let (rbuf, wbuf) = (&mut client.rbuf, &mut client.wbuf);
                let ss = &server.stream;
                let sbuf = &mut server.buf;
                let can_read_client =
                    !client_done && rbuf.len() < OUT_LIMIT && to_server.len() < OUT_LIMIT;
                let can_read_server = wbuf.len() < OUT_LIMIT;
                // A resendable unit's answer is held back: if the unit runs again the
                // client sees only the second answer.
                let hold = replay.is_some();
                let to_server = &mut *to_server;
                // Polled in order, not at random (no random number per wait): KILL and
                // the timers first, so a busy stream cannot starve them; then writes
                // before reads, so what is buffered leaves before more comes in. Every
                // read adds to a buffer the writes ahead of it drain, and stops at
                // OUT_LIMIT, so no branch stays ready for ever and the reads get polled.
                tokio::select! {
                    biased;
                    _ = entry.killed() => Ev::Killed,
                    _ = expired(&mut idle_tx_timer), if idle_in_tx => Ev::IdleInTransaction,
                    _ = expired(&mut query_timer), if query_running => Ev::QueryTimeout,
                    r = poll_fn(|cx| ss.poll_write_buf(to_server, cx)), if !to_server.is_empty() || server_flush => Ev::ServerWrite(r),
                    r = poll_fn(|cx| cs.poll_write_buf(wbuf, cx)), if (!wbuf.is_empty() || client_flush) && !hold => Ev::ClientWrite(r),
                    r = poll_fn(|cx| ss.poll_read_drain(sbuf, cx)), if can_read_server => Ev::ServerRead(r),
                    r = poll_fn(|cx| cs.poll_read_drain(rbuf, cx)), if can_read_client => Ev::ClientRead(r),
                }
            };
            match ev {
                Ev::ClientRead(Ok(0) | Err(_)) => {
                    return LinkEnd::Ended(DisconnectReason::ClientClosed)
                }
                Ev::ClientRead(Ok(_)) => {}
                Ev::ServerRead(Ok(0) | Err(_)) | Ev::ServerWrite(Err(_)) => {
                    server.dirty = true;
                    server.peer_closed = true;
                    // Sent again only when the unit cannot have taken effect: a replica's
                    // (read-only), one never written, or one the server refused with its
                    // goodbye (FATAL 57P0x: a terminated backend runs nothing it read). A
                    // connection that just ends after the unit went out may have committed
                    // it (PostgreSQL commits before it answers): the client gets the error
                    // and the outcome is unknown to it, as on a direct connection.
                    let unsent = counters.to_server == 0;
                    let goodbye = early_answer(&server.buf) == Early::Death;
                    let safe = |r: &Resend| {
                        resend_allowed(r, query_start, std::time::Instant::now)
                            && (matches!(r, Resend::Answer) || unsent || goodbye)
                    };
                    if replay.take().filter(safe).is_some() {
                        client.wbuf.truncate(reply_start);
                        *skip_to_sync = skip_at_start;
                        return LinkEnd::Retry(true);
                    }
                    tracing::info!(db = %pool.database, user = %pool.user, client = entry.id, running_for = ?query_start.map(|t| t.elapsed()), "server connection lost under a client");
                    if server.said_fatal {
                        // PostgreSQL's own FATAL went to the client: nothing follows it.
                        let _ = client.flush().await;
                    } else {
                        client.server_lost().await;
                    }
                    return LinkEnd::Ended(DisconnectReason::ServerClosed);
                }
                Ev::ServerRead(Ok(n)) => {
                    counters.from_server += n as u64;
                    // One clock read for the resend window and the query durations.
                    let mut read_at = None;
                    let mut now = || *read_at.get_or_insert_with(std::time::Instant::now);
                    if let Some(r @ Resend::BeforeCompletion) = &replay {
                        // Past the window the answer is not held any longer either.
                        let allowed = resend_allowed(r, query_start, &mut now);
                        match early_answer(&server.buf) {
                            Early::Pending if allowed => continue, // held, not yet scanned
                            Early::Pending => replay = None,
                            Early::Death if allowed => {
                                server.dirty = true;
                                server.peer_closed = true;
                                client.wbuf.truncate(reply_start);
                                *skip_to_sync = skip_at_start;
                                return LinkEnd::Retry(true);
                            }
                            Early::Death => {
                                tracing::info!(after = ?query_start.map(|t| t.elapsed()), "server terminated while running a unit; the client gets the error");
                                replay = None;
                            }
                            Early::Answered => replay = None,
                        }
                    }
                    let readies = server.readies;
                    let scanned = scan_server(server, &mut client.wbuf, params, statements);
                    if server.readies != readies {
                        // Answers complete: one query duration per ReadyForQuery.
                        let now = now();
                        counters.last_ready = Some(now);
                        if let Some(t) = query_start.take() {
                            let took = now - t;
                            counters.query_us +=
                                took.as_micros() as u64 * (server.readies - readies);
                            for _ in readies..server.readies {
                                histograms.query.record(took);
                            }
                        }
                        if !server.expect.is_empty() {
                            query_start = Some(now);
                        }
                    }
                    match scanned {
                        Ok(()) => {}
                        Err(e) => {
                            server.dirty = true;
                            tracing::warn!(error = %e, "protocol error from server");
                            client
                                .fail(
                                    Severity::Fatal,
                                    sqlstate::CONNECTION_FAILURE,
                                    "protocol error from server",
                                )
                                .await;
                            return LinkEnd::Ended(DisconnectReason::ServerClosed);
                        }
                    }
                }
                // Drop emptied buffers that share memory with the other side's read buffer,
                // so that buffer can reuse its allocation instead of growing a new one.
                Ev::ServerWrite(Ok(n)) => {
                    counters.to_server += n as u64;
                    if query_start.is_none() {
                        query_start = Some(std::time::Instant::now());
                    }
                    if to_server.is_empty() {
                        // Sent whole, it was the client's read buffer (`pump_client` takes
                        // a fully passed-through buffer as it is): it becomes that again,
                        // so the client's next statement in this transaction is read into
                        // it rather than into a fresh 8 KiB allocation. The idle wait
                        // drops it (`read_more`).
                        if client.rbuf.capacity() == 0 {
                            std::mem::swap(&mut client.rbuf, to_server);
                        } else {
                            *to_server = BytesMut::new();
                        }
                    }
                }
                Ev::ClientWrite(Ok(_)) => {
                    if client.wbuf.is_empty() {
                        client.wbuf = BytesMut::new();
                    }
                }
                Ev::ClientWrite(Err(_)) => return LinkEnd::Ended(DisconnectReason::ClientClosed),
                Ev::IdleInTransaction => {
                    // The pool rolls the transaction back and reuses the server.
                    client
                        .fail(
                            Severity::Fatal,
                            sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                            "terminating connection due to idle-in-transaction timeout (idle_transaction_timeout)",
                        )
                        .await;
                    return LinkEnd::Ended(DisconnectReason::IdleTransactionTimeout);
                }
                Ev::QueryTimeout if server.expect.is_empty() => {
                    // Everything asked was answered; the server waits for the client
                    // (an extended-protocol batch not yet synced). Nothing to cancel.
                    if let Some(t) = query_timer.as_mut() {
                        t.as_mut()
                            .reset(tokio::time::Instant::now() + query_timeout);
                    }
                }
                Ev::QueryTimeout if !cancel_sent => {
                    // Cancel it as a client's CancelRequest would: the client gets 57014
                    // and its session goes on. The cancel permit keeps the server from
                    // being released to anyone else while the cancel is in flight.
                    cancel_sent = true;
                    pool.stats.query_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(db = %pool.database, user = %pool.user, client = entry.id, timeout = ?query_timeout, "query_timeout: cancelling the query");
                    let target = server.cancel.clone();
                    if let Ok(guard) = target.lock.clone().try_acquire_owned() {
                        tokio::spawn(async move {
                            let _held = guard;
                            let _ = send_cancel(&target, QUERY_CANCEL_GRACE).await;
                        });
                    }
                    if let Some(t) = query_timer.as_mut() {
                        t.as_mut()
                            .reset(tokio::time::Instant::now() + QUERY_CANCEL_GRACE);
                    }
                }
                Ev::QueryTimeout => {
                    // No answer to the cancel either: the server is lost (a network cut,
                    // a hung host). It goes back busy: the pool cancels again and closes it.
                    client
                        .fail(
                            Severity::Fatal,
                            sqlstate::QUERY_CANCELED,
                            "canceling statement due to query_timeout (the server did not answer the cancel)",
                        )
                        .await;
                    return LinkEnd::Ended(DisconnectReason::QueryTimeout);
                }
                Ev::Killed => {
                    // The pool cancels a running query and closes the server (KILL bumped
                    // its generation); half a message sent means the stream is unusable.
                    if !to_server.is_empty() {
                        server.dirty = true;
                    }
                    if shutdown.is_cancelled() {
                        // The drain's shutdown_timeout ran out with this client
                        // mid-transaction, or a fast shutdown (SIGINT) did not wait.
                        let text = if self.shared.fast_shutdown.load(Ordering::Relaxed) {
                            "pgmux is shutting down (fast shutdown)"
                        } else {
                            "pgmux is shutting down (shutdown_timeout reached)"
                        };
                        client
                            .fail(Severity::Fatal, sqlstate::ADMIN_SHUTDOWN, text)
                            .await;
                        return LinkEnd::Ended(DisconnectReason::Shutdown);
                    }
                    return LinkEnd::Ended(client.killed().await);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_are_sorted_as_login_needs_them() {
        let p = |list: &[(&str, &str)]| {
            sort_startup(
                list.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let s = p(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "app"),
            ("options", "-c work_mem=7MB"),
            ("_pq_.x", "1"),
            ("replication", "off"),
        ])
        .expect("a plain login");
        assert_eq!(s.user.as_deref(), Some("u"));
        assert_eq!(s.database.as_deref(), Some("d"));
        assert_eq!(
            s.requested,
            vec![
                ("application_name".to_string(), "app".to_string()),
                ("work_mem".to_string(), "7MB".to_string()),
            ]
        );
        assert_eq!(s.unknown_protocol_options, vec!["_pq_.x".to_string()]);
        assert_eq!(
            p(&[("user", "u"), ("replication", "database")])
                .err()
                .as_deref(),
            Some("replication connections are not supported through pgmux")
        );
        assert!(p(&[("user", "u"), ("options", "-c")]).is_err());
    }

    #[test]
    fn early_answer_tells_death_from_completion() {
        let death = |buf: &mut BytesMut| {
            msg::error_response(
                buf,
                Severity::Fatal,
                "57P01",
                "terminating connection due to administrator command",
            )
        };
        // The FATAL alone, or after a row description and rows: nothing completed.
        let mut b = BytesMut::new();
        death(&mut b);
        assert_eq!(early_answer(&b), Early::Death);
        let mut b = BytesMut::new();
        msg::row_description(&mut b, &[("abalance", 23, 0)]);
        msg::data_row(&mut b, &[Some("1".into())]);
        death(&mut b);
        assert_eq!(early_answer(&b), Early::Death);
        // Incomplete: wait.
        assert_eq!(early_answer(&b[..b.len() - 3]), Early::Pending);
        assert_eq!(early_answer(&b[..3]), Early::Pending);
        assert_eq!(early_answer(&[]), Early::Pending);
        // A CommandComplete before it: the statement may have committed.
        let mut b = BytesMut::new();
        msg::command_complete(&mut b, "INSERT 0 1");
        death(&mut b);
        assert_eq!(early_answer(&b), Early::Answered);
        // An ordinary error, or a FATAL that is not a termination, is an answer.
        let mut b = BytesMut::new();
        msg::error_response(&mut b, Severity::Error, "23505", "duplicate key");
        assert_eq!(early_answer(&b), Early::Answered);
        let mut b = BytesMut::new();
        msg::error_response(&mut b, Severity::Fatal, "53300", "too many");
        assert_eq!(early_answer(&b), Early::Answered);
        // More than HOLD_LIMIT of rows: not held.
        let mut b = BytesMut::new();
        let big = "x".repeat(HOLD_LIMIT);
        msg::data_row(&mut b, &[Some(big)]);
        assert_eq!(early_answer(&b[..10]), Early::Answered);
    }
}
