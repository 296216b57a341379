//! Shared support code for pgmux integration tests.
//!
//! Every integration test file does `mod support;` and uses a subset of this
//! module, hence the blanket `dead_code` allowance.
//!
//! * [`PgCluster`] / [`PgNode`]: throwaway PostgreSQL clusters (a primary plus
//!   optional streaming replicas), from the `pgcluster` crate (pgcluster/, shared
//!   with `pgmux demo`) and re-exported here with its helpers. `initdb` runs once
//!   per machine/PG version; the resulting template data directory is cached under
//!   the cargo target dir and copied for every test.
//! * [`Pgmux`]: the pgmux binary under test as a child process.
//! * [`connect`]: tokio-postgres connect helper.
//! * [`RawConn`]: a tiny blocking wire-protocol client for hostile-input tests.
//!
//! When the tests run as root (euid 0), every PostgreSQL server binary is run
//! as the `postgres` OS user via `runuser`, because PostgreSQL refuses to run
//! as root (pgcluster does that).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

#[allow(unused_imports)]
pub use pgcluster::{
    free_port, percent_encode, pg_bindir, pg_tool, pg_url, quote_ident, quote_literal, PgCluster,
    PgNode, LIBPQ_ENV,
};

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// Pgmux child process
// ---------------------------------------------------------------------------

/// The pgmux binary under test, running as a child process.
pub struct Pgmux {
    child: Child,
    port: u16,
    /// Port of the admin HTTP listener.
    admin_port: u16,
    log_file: PathBuf,
    _dir: TempDir,
}

impl Pgmux {
    /// Starts `pgmux` with `args` and `env`. PGMUX_*, DATABASE_URL and
    /// READ_DATABASE_URL are not inherited from the test environment
    /// (exception: `PGMUX_TEST_LOG=<filter>` is passed on as PGMUX_LOG, for
    /// debugging). Adds `--listen 127.0.0.1:<free port>` unless `args`
    /// contain `--listen` or `env` sets PGMUX_LISTEN. stdout+stderr go to a
    /// log file. Waits up to 10 s for the port to accept TCP connections,
    /// else panics with the log.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Pgmux {
        let dir = tempfile::Builder::new()
            .prefix("pgmux-run-")
            .tempdir()
            .expect("create pgmux temp dir");
        let log_file = dir.path().join("pgmux.log");
        let log = fs::File::create(&log_file).expect("create pgmux log");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgmux"));
        for (key, _) in std::env::vars_os() {
            if let Some(k) = key.to_str() {
                if k.starts_with("PGMUX_") || k == "DATABASE_URL" || k == "READ_DATABASE_URL" {
                    cmd.env_remove(k);
                }
            }
        }
        if let Ok(filter) = std::env::var("PGMUX_TEST_LOG") {
            cmd.env("PGMUX_LOG", filter);
        }
        cmd.env("RUST_BACKTRACE", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }

        let listen = listen_value(args).or_else(|| {
            env.iter()
                .rev()
                .find(|(k, _)| *k == "PGMUX_LISTEN")
                .map(|(_, v)| v.to_string())
        });
        let port = match listen {
            Some(addr) => addr
                .parse::<SocketAddr>()
                .map(|a| a.port())
                .or_else(|_| addr.rsplit(':').next().unwrap_or("").parse::<u16>())
                .unwrap_or_else(|_| panic!("cannot find the port in listen address {addr:?}")),
            None => {
                let port = free_port();
                cmd.arg("--listen").arg(format!("127.0.0.1:{port}"));
                port
            }
        };
        // The admin listener gets a free port too, unless the test chose one.
        let admin_value = args
            .iter()
            .position(|a| *a == "--admin-listen")
            .and_then(|i| args.get(i + 1).map(|v| v.to_string()))
            .or_else(|| {
                env.iter()
                    .rev()
                    .find(|(k, _)| *k == "PGMUX_ADMIN_LISTEN")
                    .map(|(_, v)| v.to_string())
            });
        let admin_port = match admin_value {
            Some(addr) => addr
                .rsplit(':')
                .next()
                .unwrap_or("")
                .parse::<u16>()
                .unwrap_or(0),
            None => {
                let p = free_port();
                cmd.arg("--admin-listen").arg(format!("127.0.0.1:{p}"));
                p
            }
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut pgmux = Pgmux {
            child,
            port,
            admin_port,
            log_file,
            _dir: dir,
        };

        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Ok(Some(status)) = pgmux.child.try_wait() {
                panic!(
                    "pgmux exited during startup with {status}\nargs: {args:?}\n--- pgmux log ---\n{}",
                    pgmux.log()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return pgmux;
            }
            if Instant::now() > deadline {
                panic!(
                    "pgmux did not accept connections on {addr} within 10 s\nargs: {args:?}\n--- pgmux log ---\n{}",
                    pgmux.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<admin port>`: the admin HTTP API.
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// `postgres://user:password@127.0.0.1:<pgmux port>/db`.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        pg_url(self.port, user, password, db)
    }

    /// Current content of pgmux's stdout+stderr log.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal number `sig` (e.g. 1 = SIGHUP, 2 = SIGINT, 15 = SIGTERM)
    /// via the `kill` command.
    pub fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("spawn kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Waits up to `timeout` for pgmux to exit; None if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait pgmux") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The value given to `--listen` (as `--listen X` or `--listen=X`).
fn listen_value(args: &[&str]) -> Option<String> {
    let mut it = args.iter();
    let mut found = None;
    while let Some(a) = it.next() {
        if *a == "--listen" {
            found = it.next().map(|v| v.to_string());
        } else if let Some(v) = a.strip_prefix("--listen=") {
            found = Some(v.to_string());
        }
    }
    found
}

/// Passwords of the roles tests create: no pgmux log may contain one (checked when a
/// [`Pgmux`] is dropped, so every test that runs pgmux checks its log).
static TEST_SECRETS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Adds a secret that must never appear in a pgmux log.
pub fn register_secret(secret: &str) {
    if secret.len() >= 6 {
        let mut v = TEST_SECRETS.lock().unwrap_or_else(|e| e.into_inner());
        if !v.iter().any(|s| s == secret) {
            v.push(secret.to_owned());
        }
    }
}

impl Drop for Pgmux {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() {
            let log = self.log();
            let mut secrets = TEST_SECRETS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            // Passwords of the roles PgCluster::create_role made.
            secrets.extend(
                pgcluster::role_passwords()
                    .into_iter()
                    .filter(|p| p.len() >= 6),
            );
            if let Some(s) = secrets.iter().find(|s| log.contains(s.as_str())) {
                panic!(
                    "the pgmux log (port {}) contains the password {s:?} of a test role:\n{}",
                    self.port,
                    tail(&log, 50)
                );
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- pgmux log (port {}, last 200 lines) ---\n{}",
                self.port,
                tail(&self.log(), 200)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// tokio-postgres helpers
// ---------------------------------------------------------------------------

/// Connects with tokio-postgres (NoTls), spawns the connection task on the
/// current tokio runtime and returns the client. Panics with context.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    match try_connect(url).await {
        Ok(client) => client,
        Err(e) => panic!("connect to {url} failed: {e} ({e:?})"),
    }
}

/// Like [`connect`], but returns the error (for tests expecting failure).
pub async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        // Errors surface to the client as closed-connection errors.
        let _ = connection.await;
    });
    Ok(client)
}

/// Raises the RLIMIT_NOFILE soft limit to the hard limit.
pub fn raise_fd_limit() {
    rlimit::increase_nofile_limit(u64::MAX).expect("raise RLIMIT_NOFILE");
}

// ---------------------------------------------------------------------------
// RawConn: minimal blocking wire-protocol client
// ---------------------------------------------------------------------------

/// One backend message: (type byte, body without the length word).
pub type Message = (u8, Vec<u8>);

/// A raw PostgreSQL v3 protocol connection over a blocking TcpStream with a
/// 10 s read timeout. Reads that time out panic (tests must not hang).
pub struct RawConn {
    stream: TcpStream,
    startup_sent: bool,
    /// (process id, secret key) from BackendKeyData, once logged in.
    pub backend_key: Option<(i32, i32)>,
}

pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

impl RawConn {
    /// Connects to 127.0.0.1:`port`.
    pub fn connect(port: u16) -> RawConn {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("RawConn: connect to 127.0.0.1:{port}: {e}"));
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("set_read_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        RawConn {
            stream,
            startup_sent: false,
            backend_key: None,
        }
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Writes raw bytes; panics on error (see [`RawConn::try_send`]).
    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).expect("RawConn: send");
    }

    /// Writes raw bytes, returning the error (e.g. EPIPE after the peer
    /// closed the connection).
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Sends a v3 StartupMessage with `user`, `database` and `extra` params.
    pub fn startup(&mut self, user: &str, db: &str, extra: &[(&str, &str)]) {
        let mut params = vec![("user", user), ("database", db)];
        params.extend_from_slice(extra);
        let msg = Self::startup_message(&params);
        self.send(&msg);
        self.startup_sent = true;
    }

    /// Builds a v3 StartupMessage (protocol 3.0) from key/value params.
    pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        msg
    }

    /// A typed frontend message: tag, length (including itself), body.
    pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(body.len() + 5);
        msg.push(tag);
        msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        msg.extend_from_slice(body);
        msg
    }

    /// PasswordMessage ('p') carrying a cleartext password.
    pub fn password_message(password: &str) -> Vec<u8> {
        let mut body = password.as_bytes().to_vec();
        body.push(0);
        Self::frame(b'p', &body)
    }

    /// Simple Query ('Q') message.
    pub fn query_message(sql: &str) -> Vec<u8> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        Self::frame(b'Q', &body)
    }

    /// Terminate ('X') message.
    pub fn terminate_message() -> Vec<u8> {
        Self::frame(b'X', &[])
    }

    /// Reads one backend message. None on EOF or connection reset; panics on
    /// read timeout or other errors.
    pub fn read_message(&mut self) -> Option<Message> {
        match self.try_read_message() {
            Ok(m) => m,
            Err(e) => panic!("RawConn: read failed: {e}"),
        }
    }

    fn try_read_message(&mut self) -> io::Result<Option<Message>> {
        let mut header = [0u8; 5];
        // Distinguish "EOF before a message" from a truncated message.
        match self.stream.read(&mut header[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if is_reset(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        match self.stream.read_exact(&mut header[1..]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof || is_reset(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if !(4..=(1 << 30)).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "bad message length {len} for tag {:?}",
                    char::from(header[0])
                ),
            ));
        }
        let mut body = vec![0u8; len as usize - 4];
        match self.stream.read_exact(&mut body) {
            Ok(()) => Ok(Some((header[0], body))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof || is_reset(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads until an ErrorResponse (its fields) or the end of the connection (None).
    pub fn next_error(&mut self) -> Option<BTreeMap<char, String>> {
        while let Some((tag, body)) = self.read_message() {
            if tag == b'E' {
                return Some(Self::error_fields(&body));
            }
        }
        None
    }

    /// Reads messages up to and including ReadyForQuery ('Z'). Panics if the
    /// connection closes first (listing what was received).
    pub fn read_until_ready(&mut self) -> Vec<Message> {
        let mut msgs = Vec::new();
        loop {
            match self.read_message() {
                Some(m) => {
                    let done = m.0 == b'Z';
                    msgs.push(m);
                    if done {
                        return msgs;
                    }
                }
                None => panic!(
                    "RawConn: connection closed before ReadyForQuery; got {}",
                    describe(&msgs)
                ),
            }
        }
    }

    /// Parses an ErrorResponse/NoticeResponse body into field code -> value
    /// ('S' severity, 'C' SQLSTATE, 'M' message, ...).
    pub fn error_fields(body: &[u8]) -> BTreeMap<char, String> {
        let mut fields = BTreeMap::new();
        let mut rest = body;
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            fields.insert(
                char::from(code),
                String::from_utf8_lossy(&tail[..end]).into_owned(),
            );
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        fields
    }

    /// True if the peer has closed the connection: drains (and discards)
    /// pending messages until EOF. Returns false if the connection stays
    /// open and silent for 3 s.
    pub fn is_closed(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("set_read_timeout");
        let closed = loop {
            match self.try_read_message() {
                Ok(Some(_)) => continue,
                Ok(None) => break true,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    break false
                }
                // Garbage or other errors: treat as broken/closed.
                Err(_) => break true,
            }
        };
        let _ = self.stream.set_read_timeout(Some(READ_TIMEOUT));
        closed
    }

    /// Half-closes the write side (client sends EOF).
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Logs in with SCRAM-SHA-256 (MD5, cleartext and trust are handled too)
    /// and reads through the first ReadyForQuery. If no StartupMessage was
    /// sent yet, sends one with `database = user` (libpq's default).
    /// Returns the messages after AuthenticationOk (ParameterStatus 'S',
    /// BackendKeyData 'K', ..., ReadyForQuery 'Z'); stores the backend key.
    /// Panics on an ErrorResponse.
    pub fn scram_login(&mut self, user: &str, password: &str) -> Vec<Message> {
        match self.try_scram_login(user, password) {
            Ok(msgs) => msgs,
            Err(fields) => panic!("RawConn: login as {user} failed: {fields:?}"),
        }
    }

    /// Like [`RawConn::scram_login`], but returns the ErrorResponse fields
    /// on failure (e.g. wrong password). Panics on protocol surprises.
    pub fn try_scram_login(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<Vec<Message>, BTreeMap<char, String>> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};

        if !self.startup_sent {
            self.startup(user, user, &[]);
        }
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self
                .read_message()
                .unwrap_or_else(|| panic!("RawConn: connection closed during authentication"));
            match tag {
                b'E' => return Err(Self::error_fields(&body)),
                b'R' => {}
                b'N' => continue,
                _ => panic!(
                    "RawConn: unexpected message {:?} during authentication",
                    char::from(tag)
                ),
            }
            assert!(body.len() >= 4, "RawConn: short Authentication message");
            let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let data = &body[4..];
            match code {
                0 => break, // AuthenticationOk
                3 => self.send(&Self::password_message(password)),
                5 => {
                    let salt: [u8; 4] = data[..4].try_into().expect("md5 salt");
                    let hashed = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        password.as_bytes(),
                        salt,
                    );
                    self.send(&Self::password_message(&hashed));
                }
                10 => {
                    // AuthenticationSASL: NUL-terminated mechanism names.
                    let mechs: Vec<&[u8]> =
                        data.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                    assert!(
                        mechs.contains(&SCRAM_SHA_256.as_bytes()),
                        "RawConn: server offers no SCRAM-SHA-256: {:?}",
                        mechs
                            .iter()
                            .map(|m| String::from_utf8_lossy(m))
                            .collect::<Vec<_>>()
                    );
                    let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    let first = s.message();
                    let mut b = SCRAM_SHA_256.as_bytes().to_vec();
                    b.push(0);
                    b.extend_from_slice(&(first.len() as i32).to_be_bytes());
                    b.extend_from_slice(first);
                    self.send(&Self::frame(b'p', &b));
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().expect("SASLContinue before SASL");
                    s.update(data).expect("RawConn: SCRAM server-first");
                    let msg = Self::frame(b'p', s.message());
                    self.send(&msg);
                }
                12 => {
                    let mut s = scram.take().expect("SASLFinal before SASL");
                    s.finish(data)
                        .expect("RawConn: SCRAM server signature verification");
                }
                other => panic!("RawConn: unsupported authentication request {other}"),
            }
        }
        let mut msgs = Vec::new();
        loop {
            let m = self.read_message().unwrap_or_else(|| {
                panic!(
                    "RawConn: closed after AuthenticationOk: {}",
                    describe(&msgs)
                )
            });
            match m.0 {
                b'E' => return Err(Self::error_fields(&m.1)),
                b'K' if m.1.len() >= 8 => {
                    let b = &m.1;
                    self.backend_key = Some((
                        i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                        i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                    ));
                }
                _ => {}
            }
            let done = m.0 == b'Z';
            msgs.push(m);
            if done {
                return Ok(msgs);
            }
        }
    }

    /// startup + scram_login in one call, for a specific database.
    pub fn login(port: u16, user: &str, password: &str, db: &str) -> RawConn {
        let mut conn = RawConn::connect(port);
        conn.startup(user, db, &[]);
        conn.scram_login(user, password);
        conn
    }

    /// Sends a simple query and reads through ReadyForQuery.
    pub fn simple_query(&mut self, sql: &str) -> Vec<Message> {
        self.send(&Self::query_message(sql));
        self.read_until_ready()
    }

    /// Sends a CancelRequest for `key` to 127.0.0.1:`port` on a new
    /// connection.
    pub fn cancel(port: u16, key: (i32, i32)) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect for CancelRequest");
        let mut msg = 16i32.to_be_bytes().to_vec();
        msg.extend_from_slice(&80_877_102i32.to_be_bytes());
        msg.extend_from_slice(&key.0.to_be_bytes());
        msg.extend_from_slice(&key.1.to_be_bytes());
        s.write_all(&msg).expect("send CancelRequest");
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Short human-readable summary of messages, for panic messages.
/// The first column of the first DataRow in `msgs`, as text; panics when there is
/// none or it is NULL.
pub fn first_value(msgs: &[Message]) -> String {
    for (tag, body) in msgs {
        if *tag == b'D' {
            let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
            assert!(len >= 0, "NULL in {}", describe(msgs));
            return String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned();
        }
    }
    panic!("no DataRow in {}", describe(msgs));
}

pub fn describe(msgs: &[Message]) -> String {
    let parts: Vec<String> = msgs
        .iter()
        .map(|(tag, body)| {
            if *tag == b'E' || *tag == b'N' {
                format!("{}{:?}", char::from(*tag), RawConn::error_fields(body))
            } else {
                format!("{}({} bytes)", char::from(*tag), body.len())
            }
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

// ---------------------------------------------------------------------------
// Running client programs
// ---------------------------------------------------------------------------

/// Runs `cmd` (stdin = /dev/null) and collects its output; kills it and
/// panics if it runs longer than `timeout` (a hang must not stall the suite).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// Status, stdout and stderr of a finished command, for assertion messages.
pub fn describe_output(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// TestDb: a cluster with one user and database, and pgmux in front of it
// ---------------------------------------------------------------------------

/// A fresh primary with one LOGIN role owning one database: what most tests start from.
pub struct TestDb {
    pub cluster: PgCluster,
    pub user: String,
    pub password: String,
    pub db: String,
}

impl TestDb {
    pub fn new(prefix: &str) -> TestDb {
        let cluster = PgCluster::start();
        let (user, password, db) = cluster.create_user_db(prefix);
        TestDb {
            cluster,
            user,
            password,
            db,
        }
    }

    /// The primary's URL for the test user.
    pub fn database_url(&self) -> String {
        self.cluster
            .primary()
            .url(&self.user, &self.password, &self.db)
    }

    /// pgmux with DATABASE_URL pointing at the primary.
    pub fn pgmux(&self, args: &[&str]) -> Pgmux {
        self.pgmux_env(args, &[])
    }

    /// Like [`TestDb::pgmux`], with extra environment variables.
    pub fn pgmux_env(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Pgmux {
        let url = self.database_url();
        let mut envs = vec![("DATABASE_URL", url.as_str())];
        envs.extend_from_slice(extra_env);
        Pgmux::start(args, &envs)
    }

    /// The URL of `px` for the test user and database.
    pub fn url(&self, px: &Pgmux) -> String {
        px.url(&self.user, &self.password, &self.db)
    }

    /// As superuser, on the primary directly.
    pub fn psql(&self, sql: &str) -> String {
        self.cluster.primary().psql(&self.db, sql)
    }

    /// As the test user (so it owns what it creates), on the primary directly.
    pub fn setup(&self, sql: &str) {
        self.psql(&format!("set role \"{}\"; {sql}", self.user));
    }

    /// A raw protocol connection to `px`, logged in as the test user.
    pub fn raw(&self, px: &Pgmux) -> RawConn {
        RawConn::login(px.port(), &self.user, &self.password, &self.db)
    }
}

impl TestDb {
    /// Like [`TestDb::new`], with `n` streaming replicas. The user and
    /// database exist on the replicas too (they are created before the
    /// replicas are cloned).
    pub fn with_replicas(prefix: &str, n: usize) -> TestDb {
        let mut env = TestDb::new(prefix);
        env.cluster.keep_wal_for_replicas();
        for _ in 0..n {
            env.cluster.add_replica();
        }
        env
    }

    /// READ_DATABASE_URL for the test user: every replica, comma-separated.
    pub fn read_database_url(&self) -> String {
        self.cluster
            .replica_urls(&self.user, &self.password, &self.db)
    }

    /// pgmux with DATABASE_URL (primary) and READ_DATABASE_URL (every
    /// replica), plus `extra_env`.
    pub fn pgmux_with_replicas(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Pgmux {
        let read_url = self.read_database_url();
        let mut envs = vec![("READ_DATABASE_URL", read_url.as_str())];
        envs.extend_from_slice(extra_env);
        self.pgmux_env(args, &envs)
    }
}

// ---------------------------------------------------------------------------
// Fault tests (tests/faults.rs, tests/integrity.rs): admin API and leak checks
// ---------------------------------------------------------------------------

/// A ureq agent with a 10 s overall timeout (an admin call must not hang a test).
pub fn admin_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// `GET <admin>/path` as JSON; panics on a transport error or a non-200 answer.
pub fn admin_get(px: &Pgmux, path: &str) -> serde_json::Value {
    let url = format!("{}{path}", px.admin_url());
    let mut resp = admin_agent()
        .get(&url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().expect("admin body");
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: {e}: {body}"))
}

/// `PATCH <admin>/path` with a JSON body; returns (status, body).
pub fn admin_patch(px: &Pgmux, path: &str, body: &str) -> (u16, String) {
    let url = format!("{}{path}", px.admin_url());
    let mut resp = admin_agent()
        .patch(&url)
        .header("content-type", "application/json")
        .send(body)
        .unwrap_or_else(|e| panic!("PATCH {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// Backend pids of pgmux's open server connections to `127.0.0.1:port` (from
/// `GET /api/v1/servers`), sorted, and how many of them are `active`.
pub fn pgmux_server_pids(px: &Pgmux, port: u16) -> (Vec<i64>, usize) {
    let v = admin_get(px, "/api/v1/servers");
    let suffix = format!(":{port}");
    let mut pids = Vec::new();
    let mut active = 0;
    for s in v["servers"].as_array().expect("servers array") {
        if !s["addr"].as_str().unwrap_or("").ends_with(&suffix) {
            continue;
        }
        if s["state"] == "active" {
            active += 1;
        }
        pids.push(s["backend_pid"].as_i64().unwrap_or(-1));
    }
    pids.sort_unstable();
    (pids, active)
}

/// Pids of `user`'s client backends on `node` that serve clients, sorted: the replica
/// health-check connections pgmux keeps (recognised by their query) are left out.
pub fn user_backend_pids(node: &PgNode, user: &str) -> Vec<i64> {
    let out = node.psql(
        "postgres",
        &format!(
            "SELECT pid FROM pg_stat_activity \
             WHERE usename = {} AND backend_type = 'client backend' \
             AND query NOT LIKE 'SELECT pg_current_wal_insert_lsn()%' \
             AND query NOT LIKE 'SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()%' \
             ORDER BY pid;",
            quote_literal(user)
        ),
    );
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse().expect("pid"))
        .collect()
}

/// Waits (up to `timeout`) until pgmux's servers to `127.0.0.1:pgmux_port` are exactly
/// the backends of `user` on `node` (same pids), none of them active, and at most
/// `max_servers`. Panics with both lists otherwise. Returns the number of servers.
/// `pgmux_port` is the port pgmux connects to (the node's, or a relay's in front of it).
pub fn wait_servers_are_backends(
    px: &Pgmux,
    node: &PgNode,
    pgmux_port: u16,
    user: &str,
    max_servers: usize,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let (servers, active) = pgmux_server_pids(px, pgmux_port);
        let backends = user_backend_pids(node, user);
        if servers == backends && active == 0 && servers.len() <= max_servers {
            return servers.len();
        }
        if Instant::now() >= deadline {
            panic!(
                "after {timeout:?}, pgmux's servers to port {pgmux_port} are not the backends \
                 of {user} on port {} (max {max_servers}):\n  pgmux servers (pids): {servers:?} \
                 ({active} active)\n  pg_stat_activity: {backends:?}\n  backends in detail:\n{}",
                node.port,
                node.psql(
                    "postgres",
                    &format!(
                        "SELECT pid, state, application_name, backend_start, left(query, 60) \
                         FROM pg_stat_activity WHERE usename = {}",
                        quote_literal(user)
                    )
                )
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A size field of a process's /proc/PID/status (`VmRSS`, `VmData`, …), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// Open file descriptors of the pgmux process (`/proc/PID/fd`).
pub fn pgmux_fds(px: &Pgmux) -> i64 {
    fs::read_dir(format!("/proc/{}/fd", px.pid()))
        .unwrap_or_else(|e| panic!("read /proc/{}/fd: {e}", px.pid()))
        .count() as i64
}

/// Waits (up to `timeout`) until pgmux has no client connection and its open file
/// descriptors are `base` (counted before any client connected) plus its server
/// connections plus `extra` (e.g. replica health-check connections), give or take 2
/// (an admin HTTP connection being accepted or closed). Panics otherwise: a socket
/// leaked. Returns the final count.
pub fn wait_no_fd_leak(px: &Pgmux, base: i64, extra: i64, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let clients = admin_get(px, "/api/v1/stats")["clients"]
            .as_i64()
            .unwrap_or(-1);
        let servers = admin_get(px, "/api/v1/servers")["servers"]
            .as_array()
            .map_or(0, |a| a.len() as i64);
        let fds = pgmux_fds(px);
        let expected = base + servers + extra;
        if clients == 0 && (fds - expected).abs() <= 2 {
            return fds;
        }
        if Instant::now() >= deadline {
            let links: Vec<String> = fs::read_dir(format!("/proc/{}/fd", px.pid()))
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            format!(
                                "{} -> {}",
                                e.file_name().to_string_lossy(),
                                fs::read_link(e.path())
                                    .map(|p| p.display().to_string())
                                    .unwrap_or_default()
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            panic!(
                "after {timeout:?}: pgmux has {clients} clients and {fds} fds; expected no client and \
                 {expected} fds ({base} at start + {servers} servers + {extra}):\n{}",
                links.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The checks after a fault, once things are quiet: every server pgmux counts for `user`
/// is a real backend of `node` (reached through `pgmux_port`) and at most `max_servers`,
/// and no file descriptor leaked against `fds_at_start`. Prints both findings.
pub fn settled_without_leaks(
    px: &Pgmux,
    node: &PgNode,
    pgmux_port: u16,
    user: &str,
    max_servers: usize,
    fds_at_start: i64,
) {
    let servers = wait_servers_are_backends(
        px,
        node,
        pgmux_port,
        user,
        max_servers,
        Duration::from_secs(20),
    );
    println!("  at quiescence: {servers} pgmux servers = {servers} backends in pg_stat_activity");
    let fds = wait_no_fd_leak(px, fds_at_start, 0, Duration::from_secs(10));
    println!(
        "  pgmux fds: {fds_at_start} at start, {fds} now (with {servers} servers): no socket leaked"
    );
}

/// xorshift64*: a deterministic, dependency-free generator (one per task, seeded by it).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) % n
    }
}

/// A two-thread tokio runtime for a test's client tasks.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
