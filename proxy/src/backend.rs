//! Server connections: connect and log in to PostgreSQL, and the per-connection state the
//! session and the pool share.
//!
//! A [`Server`] carries its own read buffer and the protocol bookkeeping that decides whether
//! it may go back to the pool: the queue of responses still owed for what was sent
//! (`expect`, one [`Expect`] per message, in order), whether extended-protocol messages
//! were sent without a Sync yet (`unsynced`), the last transaction status, and whether its
//! byte stream may be corrupt (`dirty`). [`Server::state`] turns that into one answer the
//! pool acts on. It also knows which named statements the backend has prepared.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pgmux_config::{Secret, ServerAddr, TcpSettings};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::params::ServerParams;
use crate::prepared::ServerStatements;
use crate::protocol::frame::split_frame;
use crate::protocol::messages::{self, ErrorFields};
use crate::protocol::{ProtocolError, CANCEL_REQUEST, PROTOCOL_V3};
use crate::sockio;

/// Largest message accepted from a server during login.
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// A byte stream to PostgreSQL: TCP, TLS over TCP, or a unix socket.
pub enum ServerStream {
    Tcp(TcpStream),
    Tls(Box<crate::tls::ServerTlsStream>),
    Unix(UnixStream),
}

impl ServerStream {
    /// Opens a connection with no socket option but TCP_NODELAY: for short-lived ones
    /// (cancel requests, readiness probes).
    pub async fn connect(addr: &ServerAddr) -> io::Result<Self> {
        if addr.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", addr.host, addr.port);
            Ok(ServerStream::Unix(UnixStream::connect(path).await?))
        } else {
            let s = TcpStream::connect((addr.host.as_str(), addr.port)).await?;
            s.set_nodelay(true)?;
            Ok(ServerStream::Tcp(s))
        }
    }

    /// Opens a connection that may live long (pool servers, health checks): a TCP one also
    /// gets `tcp`'s keepalive and user timeout (see [`crate::tcp`]), and TLS as the
    /// server's `sslmode` says.
    pub async fn connect_with(addr: &ServerAddr, tcp: &TcpSettings) -> Result<Self, ConnectError> {
        let s = Self::connect(addr).await?;
        let ServerStream::Tcp(t) = s else {
            return Ok(s);
        };
        crate::tcp::apply_or_warn(&t, tcp, "server");
        Ok(match crate::tls::connect(t, addr).await? {
            crate::tls::Negotiated::Tls(t) => ServerStream::Tls(t),
            crate::tls::Negotiated::Plain(t) => ServerStream::Tcp(t),
        })
    }

    /// `tls-server-end-point` channel binding data, on a TLS connection.
    pub fn end_point(&self) -> Option<Vec<u8>> {
        match self {
            ServerStream::Tls(t) => t.end_point(),
            _ => None,
        }
    }

    /// Writes all of `bytes` and flushes (TLS keeps records until flushed).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await?;
        self.flush().await
    }

    /// Non-blocking check of an idle connection: true if the peer closed it or sent
    /// something unsolicited (e.g. a FATAL after pg_terminate_backend).
    pub fn looks_dead(&self) -> bool {
        let mut probe = [0u8; 1];
        let r = match self {
            ServerStream::Tcp(s) => s.try_read(&mut probe),
            ServerStream::Tls(s) => return s.looks_dead(),
            ServerStream::Unix(s) => s.try_read(&mut probe),
        };
        match r {
            Ok(_) => true, // EOF (0) or unexpected bytes: either way unusable
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }
}

impl ServerStream {
    /// See [`sockio::poll_read_drain`].
    pub fn poll_read_drain(
        &self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match self {
            ServerStream::Tcp(s) => sockio::poll_read_drain(s, buf, cx),
            ServerStream::Tls(s) => s.poll_read_buf(buf, cx),
            ServerStream::Unix(s) => sockio::poll_read_drain(s, buf, cx),
        }
    }

    /// See [`sockio::poll_write_buf`].
    pub fn poll_write_buf(
        &self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match self {
            ServerStream::Tcp(s) => sockio::poll_write_buf(s, buf, cx),
            ServerStream::Tls(s) => s.poll_write_buf(buf, cx),
            ServerStream::Unix(s) => sockio::poll_write_buf(s, buf, cx),
        }
    }

    /// Whether the write side must be polled although nothing is queued (TLS records
    /// rustls could not hand to the socket yet).
    pub fn wants_flush(&self) -> bool {
        match self {
            ServerStream::Tls(s) => s.wants_flush(),
            _ => false,
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opening a server connection failed: the socket, or TLS.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] crate::tls::ServerTlsError),
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("SSL connection to server {addr} failed: {source}")]
    Tls {
        addr: String,
        source: crate::tls::ServerTlsError,
    },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(String),
    #[error("server {addr} rejected the login: {fields}")]
    Server { addr: String, fields: ErrorFields },
    #[error("server {addr} requested a password, but none is configured for user \"{user}\"")]
    NoPassword { addr: String, user: String },
    #[error("server {addr} asked for unsupported authentication: {what}")]
    UnsupportedAuth { addr: String, what: String },
    #[error("protocol error from server {addr}: {source}")]
    Protocol { addr: String, source: ProtocolError },
    #[error("server {addr} closed the connection during login")]
    Eof { addr: String },
    /// `server_auth = "rds_iam"` and no token could be made (credentials, region).
    #[error("RDS IAM authentication: {0}")]
    RdsIam(#[from] crate::rds_iam::RdsIamError),
}

impl BackendError {
    /// The server may accept a login soon: it is down, restarting, starting up, full or
    /// shutting down. Wrong credentials, a missing database or a protocol problem are not.
    pub fn is_transient(&self) -> bool {
        match self {
            BackendError::Connect { .. }
            | BackendError::ConnectTimeout(_)
            | BackendError::Eof { .. } => true,
            BackendError::Server { fields, .. } => {
                matches!(fields.code(), "57P03" | "53300" | "57P01" | "57P02")
            }
            _ => false,
        }
    }
}

/// Where and how to cancel what a server is running.
#[derive(Clone)]
pub struct CancelTarget {
    pub addr: Arc<ServerAddr>,
    pub pid: i32,
    pub secret: i32,
    /// One permit, held while a cancel for this server is in flight; the server is not
    /// handed to anyone else until it is back (a late cancel must never hit a stranger's
    /// query). A semaphore rather than a mutex: the check at the end of every transaction
    /// is one load of its permit count, with no acquire and release.
    pub lock: Arc<tokio::sync::Semaphore>,
}

/// What the pool may do with a server coming back from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnState {
    /// Idle, outside a transaction, nothing owed: reuse as is.
    Clean,
    /// Idle inside a (possibly failed) transaction: ROLLBACK, then reuse.
    NeedsRollback,
    /// A request is still running: cancel it and close.
    Busy,
    /// The byte stream cannot be trusted: close.
    Broken,
}

/// What the server owes for one message pgmux sent it (or a response pgmux makes itself),
/// kept in send order. A server is released only when nothing is owed.
#[derive(Debug)]
pub enum Expect {
    /// ParseComplete. `swallow`: pgmux injected this Parse and the client must not see the
    /// answer. `stmt`: the statement id and, for a client's own Parse, the client's name
    /// (undone if the Parse fails).
    Parse {
        swallow: bool,
        stmt: Option<(std::sync::Arc<crate::prepared::Statement>, Option<String>)>,
    },
    /// BindComplete, for a Bind of statement `stmt` (None: unnamed).
    Bind { stmt: Option<u64> },
    /// RowDescription or NoData (after ParameterDescription for a statement).
    Describe,
    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// CloseComplete; `swallow` and `stmt` for a Close pgmux injected (eviction).
    Close { swallow: bool, stmt: Option<u64> },
    /// ReadyForQuery for a Sync.
    Sync,
    /// Everything up to ReadyForQuery for a simple Query.
    Query,
    /// A simple Query that is a plain `SET`/`RESET` of a parameter pgmux follows
    /// (`track_extra_parameters`), sent outside a transaction: if it succeeds (no error
    /// before its ReadyForQuery 'I') the client's and the server's records take it.
    TrackedSet {
        change: crate::params::ParamChange,
        failed: bool,
    },
    /// Everything up to ReadyForQuery for a FunctionCall.
    Function,
    /// A response pgmux makes itself (CloseComplete for a Close it answers, ParseComplete
    /// for a statement the server already has, an error); released to the client when
    /// everything before it has arrived.
    Synthetic { bytes: Bytes, undo: Undo },
    /// A message pgmux sent to fail on purpose (Describe of a portal no client can name),
    /// standing for a client message pgmux refused itself (unknown or duplicate statement
    /// name): PostgreSQL's error aborts its transaction and skips to Sync exactly as the
    /// client's message would have; the client sees `error` in place of that error.
    Fail { error: Bytes },
}

/// What to take back in the client's statement names if a synthetic response is discarded
/// because the backend skipped to Sync after an earlier error (PostgreSQL would not have
/// processed that message either).
#[derive(Debug)]
pub enum Undo {
    Nothing,
    /// The client's Parse of this name was answered by pgmux: forget the name again.
    Forget(String, u64),
    /// The client's Close of this name was answered by pgmux: restore the name.
    Restore(String, std::sync::Arc<crate::prepared::Statement>),
}

impl Expect {
    /// Whether this entry is closed by a ReadyForQuery.
    pub fn ends_at_ready(&self) -> bool {
        matches!(
            self,
            Expect::Sync | Expect::Query | Expect::TrackedSet { .. } | Expect::Function
        )
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Server {
    pub id: u64,
    pub stream: ServerStream,
    /// Bytes read from the server and not yet scanned/forwarded.
    pub buf: BytesMut,
    pub params: ServerParams,
    pub cancel: CancelTarget,
    pub created: Instant,
    /// When the server was last given back to its pool (idle since then).
    pub last_used: Instant,
    /// When a client last took it from the pool (read once by the checkout, then the
    /// link's start for the transaction statistics: one clock read fewer per transaction).
    pub taken_at: Instant,
    /// When its link released it (the last ReadyForQuery), which the pool's checkin
    /// takes for `last_used` instead of reading the clock again; `None` when given back
    /// by another path.
    pub released_at: Option<Instant>,
    /// Responses still owed, in order.
    pub expect: VecDeque<Expect>,
    /// After an extended-protocol error the backend ignores everything up to Sync.
    pub skipping: bool,
    /// In COPY FROM STDIN: the backend ignores Sync and Flush until CopyDone/CopyFail.
    pub copy_in: bool,
    /// Named statements this backend has prepared.
    pub statements: ServerStatements,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// Transaction status from the last ReadyForQuery: b'I', b'T' or b'E'.
    pub status: u8,
    /// The stream may be mid-message or in an unknown state.
    pub dirty: bool,
    /// The server closed the connection (or sent its FATAL goodbye): counted as
    /// killed_by_server when it is closed.
    pub peer_closed: bool,
    /// Bytes of a message being streamed through that have not arrived yet.
    pub pending_body: usize,
    /// ReadyForQuery messages received (one per query or Sync): read by the session
    /// for the query counters.
    pub readies: u64,
    /// SQLSTATE classes of ErrorResponses received and not yet counted by the session.
    pub error_classes: Vec<[u8; 2]>,
    /// The pool's generation when this server was opened; an older one is closed at
    /// release (RECONNECT, KILL).
    pub generation: u64,
    /// This connection as the admin surface lists it (set by the pool that opened it).
    pub entry: Option<Arc<crate::pool::ServerEntry>>,
    /// This connection's share of its node's budget (`max_db_connections`), freed when
    /// the server is dropped.
    pub budget: Option<crate::budget::Permit>,
    /// A client made session state here and had the server pinned
    /// (`session_state_action = "pin"`): closed when it comes back, never reused.
    pub session_state: bool,
    /// A FATAL (or PANIC) ErrorResponse of this server went to a client: the connection
    /// ends, and the client needs no second error from pgmux.
    pub said_fatal: bool,
    /// Refused a write as read-only (SQLSTATE 25006): after a failover the node behind
    /// the address may be a standby, or the old primary back read-only. A primary pool
    /// closes such a server when it comes back instead of reusing it, so clients reach the
    /// writable node as soon as the address leads there.
    pub refused_write: bool,
}

impl Server {
    /// An idle server PostgreSQL closed or wrote to unasked (a terminated backend's
    /// FATAL): unusable.
    pub fn closed_by_peer(&self) -> bool {
        self.stream.looks_dead() || !self.buf.is_empty()
    }

    /// Records a ParameterStatus the server sent outside a client's link.
    fn note_parameter_status(&mut self, body: &[u8]) -> Result<(), ProtocolError> {
        let (k, v) = messages::parse_parameter_status(body)?;
        self.params.reported(k, v);
        Ok(())
    }

    pub fn state(&self) -> ReturnState {
        if self.dirty {
            ReturnState::Broken
        } else if !self.expect.is_empty() || self.unsynced || self.pending_body > 0 {
            ReturnState::Busy
        } else if !self.buf.is_empty() {
            ReturnState::Broken
        } else if self.status == b'I' {
            ReturnState::Clean
        } else {
            ReturnState::NeedsRollback
        }
    }

    /// A server around an already-open stream, before any login: what [`Server::connect`]
    /// starts from, and what benchmarks use to drive the relay without PostgreSQL.
    pub fn detached(stream: ServerStream, addr: Arc<ServerAddr>) -> Server {
        let now = Instant::now();
        Server {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            buf: BytesMut::with_capacity(8192),
            params: ServerParams::default(),
            cancel: CancelTarget {
                addr,
                pid: 0,
                secret: 0,
                lock: Arc::new(tokio::sync::Semaphore::new(1)),
            },
            created: now,
            last_used: now,
            taken_at: now,
            released_at: None,
            expect: VecDeque::new(),
            skipping: false,
            copy_in: false,
            statements: ServerStatements::default(),
            unsynced: false,
            status: b'I',
            dirty: false,
            peer_closed: false,
            pending_body: 0,
            readies: 0,
            error_classes: Vec::new(),
            generation: 0,
            entry: None,
            budget: None,
            session_state: false,
            said_fatal: false,
            refused_write: false,
        }
    }

    /// Connects and logs in as `user` to `addr`.
    pub async fn connect(
        addr: &Arc<ServerAddr>,
        user: &str,
        password: Option<&Secret>,
        connect_timeout: Duration,
        tcp: &TcpSettings,
    ) -> Result<Server, BackendError> {
        let cred = match password {
            Some(p) => Credential::Password(p),
            None => Credential::None,
        };
        Self::connect_as(addr, user, cred, connect_timeout, tcp).await
    }

    /// [`Server::connect`] with any kind of credential (SCRAM passthrough keys too).
    pub async fn connect_as(
        addr: &Arc<ServerAddr>,
        user: &str,
        cred: Credential<'_>,
        connect_timeout: Duration,
        tcp: &TcpSettings,
    ) -> Result<Server, BackendError> {
        let name = display_addr(addr);
        let fut = async {
            let stream = ServerStream::connect_with(addr, tcp)
                .await
                .map_err(|e| match e {
                    ConnectError::Io(source) => BackendError::Connect {
                        addr: name.clone(),
                        source,
                    },
                    ConnectError::Tls(crate::tls::ServerTlsError::Io(source)) => {
                        BackendError::Connect {
                            addr: name.clone(),
                            source,
                        }
                    }
                    ConnectError::Tls(source) => BackendError::Tls {
                        addr: name.clone(),
                        source,
                    },
                })?;
            login(stream, addr, &name, user, cred).await
        };
        match tokio::time::timeout(connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::ConnectTimeout(name)),
        }
    }

    /// Runs a simple query and reads up to its ReadyForQuery, recording ParameterStatus.
    /// Returns the first error the server reported, if any.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Option<ErrorFields>, ProtocolError> {
        Ok(self.query_rows(sql, None).await?.err())
    }

    /// Runs a simple query and returns the text of the first row's columns (NULL as
    /// `None`; no row: empty), or the first error the server reported.
    pub async fn first_row(
        &mut self,
        sql: &str,
    ) -> Result<Result<Vec<Option<String>>, ErrorFields>, ProtocolError> {
        let mut row = Vec::new();
        Ok(self.query_rows(sql, Some(&mut row)).await?.map(|()| row))
    }

    async fn query_rows(
        &mut self,
        sql: &str,
        mut first_row: Option<&mut Vec<Option<String>>>,
    ) -> Result<Result<(), ErrorFields>, ProtocolError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        messages::query(&mut out, sql);
        self.stream.send(&out).await?;
        let mut error = None;
        let mut rows = 0;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'S' => self.note_parameter_status(&frame.body)?,
                b'D' if rows == 0 => {
                    rows += 1;
                    if let Some(row) = first_row.as_deref_mut() {
                        *row = messages::parse_data_row(&frame.body)?;
                    }
                }
                b'E' if error.is_none() => error = Some(ErrorFields::parse(&frame.body)?),
                b'Z' => {
                    self.status = frame.body.first().copied().unwrap_or(b'E');
                    return Ok(match error {
                        Some(e) => Err(e),
                        None => Ok(()),
                    });
                }
                _ => {}
            }
        }
    }

    /// One round trip that proves the server is alive and idle: a Sync, answered by
    /// ReadyForQuery. Anything else (a FATAL, EOF, a transaction status other than idle)
    /// is an error; the server must then be closed.
    pub async fn ping(&mut self) -> Result<(), ProtocolError> {
        self.stream.send(&[b'S', 0, 0, 0, 4]).await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'S' => self.note_parameter_status(&frame.body)?,
                b'N' => {}
                b'Z' if frame.body.first() == Some(&b'I') => return Ok(()),
                _ => return Err(ProtocolError::Malformed("answer to a liveness check")),
            }
        }
    }

    /// The next whole message (at most 1 MiB: login and internal queries only).
    pub(crate) async fn read_frame(
        &mut self,
    ) -> Result<crate::protocol::frame::Frame, ProtocolError> {
        loop {
            if let Some(f) = split_frame(&mut self.buf, MAX_LOGIN_MESSAGE)? {
                return Ok(f);
            }
            self.buf.reserve(4096);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
    }

    /// Polite close: Terminate, then drop the socket.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        messages::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.send(&out)).await;
    }
}

pub fn display_addr(addr: &ServerAddr) -> String {
    format!("{}:{}/{}", addr.host, addr.port, addr.dbname)
}

/// What pgmux logs in to a server with.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    /// A password, or a stored `md5…` hash (usable for MD5 logins only).
    Password(&'a Secret),
    /// SCRAM passthrough: the keys a client's proof revealed.
    Keys(&'a crate::auth::ScramKeys),
    None,
}

async fn login(
    stream: ServerStream,
    addr: &Arc<ServerAddr>,
    name: &str,
    user: &str,
    cred: Credential<'_>,
) -> Result<Server, BackendError> {
    let password = match cred {
        Credential::Password(p) => Some(p),
        _ => None,
    };
    let proto = |source| BackendError::Protocol {
        addr: name.to_owned(),
        source,
    };
    let mut server = Server::detached(stream, addr.clone());
    let mut out = BytesMut::with_capacity(256);
    startup_message(&mut out, &[("user", user), ("database", &addr.dbname)]);
    server
        .stream
        .send(&out)
        .await
        .map_err(|e| proto(e.into()))?;

    // Over TLS, SCRAM binds to the server's certificate when the server offers -PLUS.
    let binding = server.stream.end_point();
    let mut scram: Option<ScramSha256> = None;
    let mut keyed: Option<crate::auth::ScramKeyClient> = None;
    let mut startup = Vec::new();
    let need_password = || match password {
        Some(p) => Ok(p.expose()),
        None => Err(BackendError::NoPassword {
            addr: name.to_owned(),
            user: user.to_owned(),
        }),
    };
    loop {
        let frame = match server.read_frame().await {
            Ok(f) => f,
            Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(BackendError::Eof {
                    addr: name.to_owned(),
                })
            }
            Err(e) => return Err(proto(e)),
        };
        let body = &frame.body[..];
        match frame.tag {
            b'R' => {
                if body.len() < 4 {
                    return Err(proto(ProtocolError::Malformed("Authentication")));
                }
                let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let data = &body[4..];
                out.clear();
                match code {
                    0 => continue,
                    3 => password_message(&mut out, need_password()?.as_bytes()),
                    5 => {
                        let salt: [u8; 4] = data.try_into().map_err(|_| {
                            proto(ProtocolError::Malformed("AuthenticationMD5Password"))
                        })?;
                        let pw = need_password()?;
                        let hash = if crate::auth::is_md5_hash(pw) {
                            crate::auth::md5_response_from_hash(pw, salt)
                        } else {
                            crate::auth::md5_response(user, pw, salt)
                        };
                        password_message(&mut out, hash.as_bytes());
                    }
                    10 => {
                        let offers =
                            |name: &str| data.split(|b| *b == 0).any(|m| m == name.as_bytes());
                        let bind = binding
                            .as_deref()
                            .filter(|_| offers(crate::auth::SCRAM_SHA_256_PLUS));
                        let mechanism = match bind {
                            Some(_) => crate::auth::SCRAM_SHA_256_PLUS,
                            None => crate::auth::SCRAM_SHA_256,
                        };
                        if bind.is_none() && !offers(crate::auth::SCRAM_SHA_256) {
                            return Err(BackendError::UnsupportedAuth {
                                addr: name.to_owned(),
                                what: format!(
                                    "SASL mechanisms {:?}",
                                    String::from_utf8_lossy(data)
                                ),
                            });
                        }
                        if let Credential::Keys(keys) = cred {
                            let (k, first) = crate::auth::ScramKeyClient::start(keys, bind);
                            sasl_initial_response(&mut out, mechanism, first.as_bytes());
                            keyed = Some(k);
                        } else {
                            let channel = match bind {
                                Some(data) => ChannelBinding::tls_server_end_point(data.to_vec()),
                                None => ChannelBinding::unsupported(),
                            };
                            let s = ScramSha256::new(need_password()?.as_bytes(), channel);
                            sasl_initial_response(&mut out, mechanism, s.message());
                            scram = Some(s);
                        }
                    }
                    11 => {
                        if let Some(k) = keyed.as_mut() {
                            let fin = k.update(data).map_err(|e| BackendError::UnsupportedAuth {
                                addr: name.to_owned(),
                                what: format!("SCRAM passthrough: {e} (the server's verifier differs from the auth source's)"),
                            })?;
                            sasl_response(&mut out, fin.as_bytes());
                        } else {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| proto(ProtocolError::Malformed("SASLContinue")))?;
                            s.update(data).map_err(|e| proto(ProtocolError::Io(e)))?;
                            sasl_response(&mut out, s.message());
                        }
                    }
                    12 => {
                        if let Some(k) = keyed.take() {
                            k.finish(data).map_err(|_| {
                                proto(ProtocolError::Malformed("server SCRAM signature"))
                            })?;
                        } else {
                            let mut s = scram
                                .take()
                                .ok_or_else(|| proto(ProtocolError::Malformed("SASLFinal")))?;
                            s.finish(data).map_err(|e| proto(ProtocolError::Io(e)))?;
                        }
                    }
                    other => {
                        return Err(BackendError::UnsupportedAuth {
                            addr: name.to_owned(),
                            what: format!("authentication request {other}"),
                        })
                    }
                }
                if !out.is_empty() {
                    server
                        .stream
                        .send(&out)
                        .await
                        .map_err(|e| proto(e.into()))?;
                }
            }
            b'S' => {
                let (k, v) = messages::parse_parameter_status(body).map_err(proto)?;
                startup.push((k.to_owned(), v.to_owned()));
            }
            b'K' => {
                if body.len() < 8 {
                    return Err(proto(ProtocolError::Malformed("BackendKeyData")));
                }
                server.cancel.pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                server.cancel.secret = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
            }
            b'E' => {
                let fields = ErrorFields::parse(body).map_err(proto)?;
                return Err(BackendError::Server {
                    addr: name.to_owned(),
                    fields,
                });
            }
            b'Z' => {
                server.params = ServerParams::from_startup(startup);
                server.status = body.first().copied().unwrap_or(b'I');
                return Ok(server);
            }
            _ => {} // NoticeResponse, NegotiateProtocolVersion: nothing to do
        }
    }
}

fn startup_message(out: &mut BytesMut, params: &[(&str, &str)]) {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&PROTOCOL_V3.to_be_bytes());
    for (k, v) in params {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&[0]);
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(&[0]);
    }
    out.extend_from_slice(&[0]);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn password_message(out: &mut BytesMut, data: &[u8]) {
    out.extend_from_slice(b"p");
    out.extend_from_slice(&((data.len() + 5) as i32).to_be_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&[0]);
}

/// SASLResponse: like PasswordMessage but the data carries no terminator.
fn sasl_response(out: &mut BytesMut, data: &[u8]) {
    out.extend_from_slice(b"p");
    out.extend_from_slice(&((data.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(data);
}

fn sasl_initial_response(out: &mut BytesMut, mechanism: &str, data: &[u8]) {
    out.extend_from_slice(b"p");
    let len = 4 + mechanism.len() + 1 + 4 + data.len();
    out.extend_from_slice(&(len as i32).to_be_bytes());
    out.extend_from_slice(mechanism.as_bytes());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(data.len() as i32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Sends a CancelRequest for `target` and waits until PostgreSQL closes the connection
/// (which it does after signalling the backend).
pub async fn send_cancel(target: &CancelTarget, timeout: Duration) -> io::Result<()> {
    let fut = async {
        let mut s = ServerStream::connect(&target.addr).await?;
        let mut pkt = Vec::with_capacity(16);
        pkt.extend_from_slice(&16i32.to_be_bytes());
        pkt.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        pkt.extend_from_slice(&target.pid.to_be_bytes());
        pkt.extend_from_slice(&target.secret.to_be_bytes());
        s.write_all(&pkt).await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "cancel request timed out",
        )),
    }
}
