//! Hostile clients over real sockets (issue 10): malformed lengths, truncated frames,
//! slowloris logins, crowds of connections that never authenticate, garbage around TLS
//! negotiation, protocol messages in the wrong state, console intruders and guessed
//! cancel keys, against the real pgmux binary in front of a real PostgreSQL.
//!
//! Every case checks what an operator would: the hostile client gets a clear
//! ErrorResponse (the right SQLSTATE) or a clean close; a well-behaved client running
//! queries meanwhile ([`Steady`]) keeps getting correct answers; servers are not left
//! dirty; pgmux's resident memory (VmRSS from /proc) stays bounded.
//!
//! Already covered elsewhere (not repeated here): `Q` messages with lengths 0, 3, -1 and
//! 2^31-1 after login and unknown message types (core.rs
//! `malformed_frames_get_08p01_and_a_close`), SSLRequest/GSSENCRequest answered `N` and
//! protocol 2.0 (core.rs `encryption_requests_get_n_and_bad_protocol_versions_a_clear_error`),
//! SSLRequest plus data with a certificate configured (tls.rs
//! `data_after_ssl_request_is_refused`), a login that stalls after the startup packet
//! (reaping.rs `client_login_timeout_ends_a_stalled_login`), Describe/Bind of an unknown
//! statement outside a transaction (prepared.rs `error_paths_in_pipelines`), a console
//! user in neither admin_users nor stats_users (admin.rs
//! `console_show_commands_have_pgbouncer_columns`).

mod support;
#[path = "support/tls.rs"]
mod tls_support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::{describe, first_value, raise_fd_limit, Message, Pgmux, RawConn, TestDb};
use tls_support::{verifying_config, TestCerts, ALL_VERSIONS};

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
const MIB: i64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// pgmux's resident set size in bytes (VmRSS of /proc/PID/status).
fn rss(px: &Pgmux) -> i64 {
    status_bytes(px, "VmRSS")
}

/// A size field of pgmux's /proc/PID/status, in bytes.
fn status_bytes(px: &Pgmux, field: &str) -> i64 {
    support::proc_status_kib(px.pid(), field) as i64 * 1024
}

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Prints an RSS figure (visible with `--no-capture`, and in the report of a failure).
fn note_rss(what: &str, bytes: i64) {
    eprintln!("[hostile] pgmux VmRSS {what}: {}", mib(bytes));
}

/// A well-behaved client on its own thread: logs in and runs `SELECT n` for n = 1, 2, …
/// until [`Steady::finish`], checking every answer. Its panics surface at `finish`.
struct Steady {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    handle: Option<JoinHandle<u64>>,
}

impl Steady {
    fn start(db: &TestDb, px: &Pgmux) -> Steady {
        let (port, user, password, dbname) = (
            px.port(),
            db.user.clone(),
            db.password.clone(),
            db.db.clone(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (stop2, done2) = (stop.clone(), done.clone());
        let handle = std::thread::spawn(move || {
            let mut c = RawConn::login(port, &user, &password, &dbname);
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                n += 1;
                let msgs = c.simple_query(&format!("SELECT {n}"));
                assert_eq!(
                    first_value(&msgs),
                    n.to_string(),
                    "the well-behaved client got a wrong answer: {}",
                    describe(&msgs)
                );
                done2.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            c.send(&RawConn::terminate_message());
            n
        });
        let s = Steady {
            stop,
            done,
            handle: Some(handle),
        };
        s.wait_for_progress();
        s
    }

    /// Waits until the client has run at least one more query (up to 20 s).
    fn wait_for_progress(&self) {
        let before = self.done.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.done.load(Ordering::Relaxed) <= before {
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) || Instant::now() > deadline {
                panic!("the well-behaved client made no progress (stuck at {before} queries)");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the client; its number of correct queries (panics if it failed).
    fn finish(mut self) -> u64 {
        self.wait_for_progress();
        self.stop.store(true, Ordering::Relaxed);
        let n = match self.handle.take().expect("running").join() {
            Ok(n) => n,
            Err(e) => std::panic::resume_unwind(e),
        };
        assert!(n > 0);
        n
    }
}

/// Reads the next ErrorResponse; asserts it is FATAL with `code` and that pgmux then
/// closes the connection. Returns its fields.
fn expect_fatal(c: &mut RawConn, code: &str, what: &str) -> BTreeMap<char, String> {
    let e = c
        .next_error()
        .unwrap_or_else(|| panic!("{what}: an ErrorResponse {code} expected, got a close"));
    assert_eq!(e.get(&'C').map(String::as_str), Some(code), "{what}: {e:?}");
    assert_eq!(
        e.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{what}: {e:?}"
    );
    assert!(c.is_closed(), "{what}: pgmux must close after {e:?}");
    e
}

/// The SQLSTATE of the first ErrorResponse in `msgs`.
fn sqlstate(msgs: &[Message]) -> Option<String> {
    msgs.iter()
        .find(|(t, _)| *t == b'E')
        .and_then(|(_, b)| RawConn::error_fields(b).get(&'C').cloned())
}

/// The message tags of `msgs` as a string ("TDCZ").
fn tags(msgs: &[Message]) -> String {
    msgs.iter().map(|(t, _)| char::from(*t)).collect()
}

/// The transaction status of the last ReadyForQuery in `msgs`.
fn status(msgs: &[Message]) -> char {
    let (_, body) = msgs.last().expect("messages");
    char::from(body[0])
}

/// An untagged startup-phase packet: length, then `code`, then `rest`.
fn startup_packet(code: i32, rest: &[u8]) -> Vec<u8> {
    let mut p = ((8 + rest.len()) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(rest);
    p
}

/// A tagged message header with an arbitrary length word, plus `body`.
fn header(tag: u8, len: i32, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstring(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn bind(portal: &str, stmt: &str) -> Vec<u8> {
    let mut b = cstring(portal);
    b.extend(cstring(stmt));
    b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
    b.extend_from_slice(&0i16.to_be_bytes()); // parameters
    b.extend_from_slice(&0i16.to_be_bytes()); // result formats
    RawConn::frame(b'B', &b)
}

fn execute(portal: &str) -> Vec<u8> {
    let mut b = cstring(portal);
    b.extend_from_slice(&0i32.to_be_bytes());
    RawConn::frame(b'E', &b)
}

fn parse_named(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstring(name);
    b.extend(cstring(sql));
    b.extend_from_slice(&0i16.to_be_bytes()); // no parameter types
    RawConn::frame(b'P', &b)
}

fn describe_msg(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend(cstring(name));
    RawConn::frame(b'D', &b)
}

fn close_msg(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend(cstring(name));
    RawConn::frame(b'C', &b)
}

fn sync() -> Vec<u8> {
    RawConn::frame(b'S', &[])
}

/// Backends of the test user that are not idle (pgmux's servers between transactions
/// must all be `idle`).
fn busy_backends(db: &TestDb) -> String {
    db.psql(&format!(
        "SELECT string_agg(state || ': ' || query, ' | ') FROM pg_stat_activity \
         WHERE usename = '{}' AND state IS DISTINCT FROM 'idle'",
        db.user
    ))
}

/// No server of the pool is left dirty: a new client gets default session state and every
/// backend of the test user is idle (checked until it is, for up to 5 s).
fn assert_servers_clean(db: &TestDb, px: &Pgmux) {
    let mut c = db.raw(px);
    let msgs = c.simple_query("SHOW transaction_isolation");
    assert_eq!(first_value(&msgs), "read committed");
    assert_eq!(status(&msgs), 'I');
    assert_eq!(first_value(&c.simple_query("SELECT 1")), "1");
    c.send(&RawConn::terminate_message());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let busy = busy_backends(db);
        if busy.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("backends left busy: {busy}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connects, sends `bytes`, and waits for pgmux to close (up to 10 s); returns the
/// first ErrorResponse's SQLSTATE, if any.
fn one_bad_connection(port: u16, bytes: &[u8]) -> Option<String> {
    let mut c = RawConn::connect(port);
    let _ = c.try_send(bytes);
    let mut code = None;
    let mut buf = Vec::new();
    let _ = c.stream().read_to_end(&mut buf);
    // 'N'/'S' answers are single bytes; skip them.
    let rest = match buf.first() {
        Some(b'N') | Some(b'S') => &buf[1..],
        _ => &buf[..],
    };
    // The first ErrorResponse, after whatever came before it (an authentication request).
    let mut pos = 0;
    while rest.len() >= pos + 5 {
        let len = i32::from_be_bytes([rest[pos + 1], rest[pos + 2], rest[pos + 3], rest[pos + 4]]);
        let end = (pos + 1 + len.max(4) as usize).min(rest.len());
        if rest[pos] == b'E' {
            code = RawConn::error_fields(&rest[pos + 5..end])
                .get(&'C')
                .cloned();
            break;
        }
        pos = end;
    }
    code
}

// ---------------------------------------------------------------------------
// Lengths
// ---------------------------------------------------------------------------

/// Bad lengths in the startup packet, in authentication messages and in messages other
/// than Query after login: FATAL 08P01 and a close, nothing waited for or allocated.
#[test]
fn bad_lengths_in_startup_auth_and_regular_messages_get_08p01() {
    let db = TestDb::new("hostile_len");
    let px = db.pgmux(&[]);
    let steady = Steady::start(&db, &px);
    let rss_before = rss(&px);

    // Startup packet: below the 8 bytes of a header, above PostgreSQL's 10,000, negative.
    for len in [0i32, 3, 7, 10_001, i32::MAX, -1, i32::MIN] {
        let mut c = RawConn::connect(px.port());
        let mut p = len.to_be_bytes().to_vec();
        p.extend_from_slice(&196_608i32.to_be_bytes());
        p.extend_from_slice(b"user\0x\0\0");
        c.send(&p);
        let e = expect_fatal(&mut c, "08P01", &format!("startup length {len}"));
        assert!(
            e[&'M'].contains("invalid length of startup packet"),
            "{len}: {e:?}"
        );
    }

    // SASLInitialResponse with a hostile length (limit: 64 KiB for authentication).
    for len in [0i32, 3, -1, 64 * 1024 + 1, i32::MAX] {
        let mut c = RawConn::connect(px.port());
        c.startup(&db.user, &db.db, &[]);
        let (tag, _) = c.read_message().expect("AuthenticationSASL");
        assert_eq!(tag, b'R');
        c.send(&header(b'p', len, b"SCRAM-SHA-256\0"));
        expect_fatal(&mut c, "08P01", &format!("password message length {len}"));
    }

    // After login, other message types than Query (core.rs covers Q): the idle loop,
    // the CopyData that is discarded while idle, Sync and Terminate.
    for (tag, len) in [
        (b'P', -5i32),
        (b'd', i32::MAX),
        (b'd', i32::MIN),
        (b'S', 3),
        (b'X', 0),
        (b'B', 2_000_000_000),
        (b'H', -1),
    ] {
        let mut c = db.raw(&px);
        c.send(&header(tag, len, b""));
        let e = expect_fatal(
            &mut c,
            "08P01",
            &format!("{:?} with length {len}", char::from(tag)),
        );
        assert!(
            e[&'M'].contains("length") || e[&'M'].contains("max_message_size"),
            "{e:?}"
        );
    }
    // Inside a transaction (the client is linked to a server): the same, and the
    // transaction is rolled back, the server reused.
    let mut c = db.raw(&px);
    assert_eq!(status(&c.simple_query("BEGIN")), 'T');
    c.send(&header(b'Q', i32::MAX, b"SELECT"));
    expect_fatal(&mut c, "08P01", "Q with length 2^31-1 inside a transaction");

    let rss_after = rss(&px);
    note_rss("before bad lengths", rss_before);
    note_rss("after bad lengths", rss_after);
    assert!(
        rss_after - rss_before < 64 * MIB,
        "RSS grew from {} to {}",
        mib(rss_before),
        mib(rss_after)
    );
    let n = steady.finish();
    eprintln!("[hostile] well-behaved client: {n} correct queries meanwhile");
    assert_servers_clean(&db, &px);
}

/// Truncated frames followed by a close, at every stage: pgmux closes its side, nothing
/// is left running or open on the server (pool of one server, so a dirty server would
/// show at once).
#[test]
fn truncated_frames_then_close_leave_no_dirty_server() {
    let db = TestDb::new("hostile_trunc");
    db.setup("CREATE TABLE t (v int)");
    let px = db.pgmux(&["--pool-size", "1"]);
    let steady = Steady::start(&db, &px);

    // Half a startup packet.
    let mut c = RawConn::connect(px.port());
    let full = RawConn::startup_message(&[("user", &db.user), ("database", &db.db)]);
    c.send(&full[..full.len() / 2]);
    c.shutdown_write();
    assert!(c.is_closed(), "half a startup packet, then EOF");

    // Half a SCRAM response.
    let mut c = RawConn::connect(px.port());
    c.startup(&db.user, &db.db, &[]);
    let (tag, _) = c.read_message().expect("AuthenticationSASL");
    assert_eq!(tag, b'R');
    c.send(&header(b'p', 50, b"SCRAM"));
    c.shutdown_write();
    assert!(c.is_closed(), "half a SCRAM response, then EOF");

    // After login: a Query announcing 100 bytes, 10 sent, then EOF.
    let mut c = db.raw(&px);
    c.send(&header(b'Q', 100, b"SELECT 1; "));
    c.shutdown_write();
    assert!(c.is_closed(), "truncated Query, then EOF");

    // Inside a serializable transaction that wrote a row: a truncated Query, then EOF.
    let mut c = db.raw(&px);
    c.simple_query("BEGIN ISOLATION LEVEL SERIALIZABLE");
    c.simple_query("INSERT INTO t VALUES (1)");
    c.send(&header(b'Q', 1000, b"INSERT INTO t VALUES (2"));
    c.shutdown_write();
    assert!(c.is_closed(), "truncated Query in a transaction, then EOF");

    // A truncated extended-protocol batch inside a transaction, then a plain drop.
    let mut c = db.raw(&px);
    c.simple_query("BEGIN");
    let mut b = bind("", "");
    b.truncate(b.len() - 3);
    c.send(&b);
    drop(c);

    steady.finish();
    assert_servers_clean(&db, &px);
    assert_eq!(db.psql("SELECT count(*) FROM t"), "0", "rolled back");
}

/// A message of exactly `max_message_size` is served, one byte more is refused with
/// 08P01 naming the limit; and a length within the limit that never arrives costs no
/// memory: with max_message_size = 1 GiB (the largest allowed), 48 clients announcing
/// ~1 GiB each (48 GiB if allocated up front) send a few bytes and wait.
#[test]
fn claimed_lengths_are_not_allocated_and_max_message_size_is_exact() {
    let db = TestDb::new("hostile_max");
    // A small limit: 64 KiB.
    let small = db.pgmux_env(&[], &[("PGMUX_MAX_MESSAGE_SIZE", "64kB")]);
    let max = 64 * 1024usize;
    let mut c = db.raw(&small);
    // Query body = "SELECT length('xxx…')\0": total length word = max.
    let prefix = "SELECT length('";
    let suffix = "')";
    let xs = max - 4 - prefix.len() - suffix.len() - 1;
    let sql = format!("{prefix}{}{suffix}", "x".repeat(xs));
    let msg = RawConn::query_message(&sql);
    assert_eq!(msg.len(), max + 1);
    c.send(&msg);
    assert_eq!(first_value(&c.read_until_ready()), xs.to_string());
    let sql = format!("{prefix}{}{suffix}", "x".repeat(xs + 1));
    c.send(&RawConn::query_message(&sql));
    let e = expect_fatal(&mut c, "08P01", "a Query one byte above max_message_size");
    assert!(
        e[&'M'].contains("max_message_size") && e[&'M'].contains(&max.to_string()),
        "{e:?}"
    );
    drop(small);

    // The largest limit (1 GiB): lengths just below it are waited for, not allocated.
    let px = db.pgmux_env(&[], &[("PGMUX_MAX_MESSAGE_SIZE", "1GB")]);
    let steady = Steady::start(&db, &px);
    let rss_before = rss(&px);
    // Reserved but never written memory does not show in RSS; it does in the data size.
    let data_before = status_bytes(&px, "VmData");
    let claimed = (1i32 << 30) - 16;
    let mut held = Vec::new();
    for i in 0..48 {
        let mut c = db.raw(&px);
        if i < 4 {
            // Some inside a transaction, linked to a server.
            assert_eq!(status(&c.simple_query("BEGIN")), 'T');
        }
        let tag = [b'Q', b'P', b'd', b'B'][i % 4];
        c.send(&header(
            tag,
            claimed,
            b"SELECT 1 -- and the rest never comes",
        ));
        held.push(c);
    }
    // 2^31-1, above any limit: refused at once.
    let mut c = db.raw(&px);
    c.send(&header(b'Q', i32::MAX, b"SELECT"));
    expect_fatal(&mut c, "08P01", "2^31-1 with a 1 GiB limit");
    std::thread::sleep(Duration::from_secs(2));
    let rss_held = rss(&px);
    let data_held = status_bytes(&px, "VmData");
    steady.wait_for_progress();
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss(&px);
    note_rss("before 48 clients announcing 1 GiB", rss_before);
    note_rss("while they wait", rss_held);
    note_rss("after they closed", rss_after);
    assert!(
        rss_held - rss_before < 64 * MIB,
        "claimed lengths were allocated: RSS {} -> {}",
        mib(rss_before),
        mib(rss_held)
    );
    assert!(rss_after - rss_before < 64 * MIB);
    // One claimed length reserved would add 1 GiB; threads' stacks and malloc's arenas
    // stay far below half of that.
    assert!(
        data_held - data_before < 512 * MIB,
        "claimed lengths were reserved: data size {} -> {}",
        mib(data_before),
        mib(data_held)
    );
    steady.finish();
    assert_servers_clean(&db, &px);
}

// ---------------------------------------------------------------------------
// Slow and unauthenticated clients
// ---------------------------------------------------------------------------

/// Slowloris: startup packets that never complete (3 of 8 bytes, or nothing at all) are
/// closed after client_login_timeout with FATAL 08000 "login timed out"; meanwhile a
/// well-behaved client is served.
#[test]
fn slowloris_startup_is_closed_after_client_login_timeout() {
    raise_fd_limit();
    let db = TestDb::new("hostile_slow");
    let px = db.pgmux_env(&[], &[("PGMUX_CLIENT_LOGIN_TIMEOUT", "1s")]);
    let steady = Steady::start(&db, &px);
    let rss_before = rss(&px);
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..300 {
        let mut c = RawConn::connect(px.port());
        if i % 3 != 0 {
            c.send(&RawConn::startup_message(&[("user", &db.user)])[..3]);
        }
        slow.push(c);
    }
    let rss_held = rss(&px);
    // A new well-behaved login meanwhile.
    let mut ok = db.raw(&px);
    assert_eq!(first_value(&ok.simple_query("SELECT 42")), "42");
    for (i, c) in slow.iter_mut().enumerate() {
        let e = expect_fatal(c, "08000", &format!("slowloris {i}"));
        assert!(e[&'M'].contains("client_login_timeout"), "{e:?}");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "closed after {took:?}"
    );
    drop(slow);
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = rss(&px);
    note_rss("before 300 slowloris", rss_before);
    note_rss("with 300 slowloris", rss_held);
    note_rss("after slowloris", rss_after);
    assert!(rss_held - rss_before < 64 * MIB);
    assert_eq!(first_value(&ok.simple_query("SELECT 43")), "43");
    steady.finish();
}

/// 2,000 clients send a startup packet and never answer the SCRAM challenge: a normal
/// client still logs in and runs queries; RSS stays bounded and falls back when they
/// go. With max_client_conn = 100, clients that sent a startup packet count (as
/// documented: the slot is taken when the startup packet is read, before
/// authentication), so the excess gets 53300 until they leave or their
/// client_login_timeout runs out; TCP connections that sent nothing do not count.
/// `n` clients that sent a startup packet and were asked for SCRAM (AuthenticationSASL),
/// and go no further.
fn unauthenticated_crowd(db: &TestDb, px: &Pgmux, n: usize) -> Vec<RawConn> {
    let mut crowd: Vec<RawConn> = (0..n)
        .map(|_| {
            let mut c = RawConn::connect(px.port());
            c.startup(&db.user, &db.db, &[]);
            c
        })
        .collect();
    for c in &mut crowd {
        let (tag, body) = c.read_message().expect("AuthenticationSASL");
        assert_eq!((tag, &body[..4]), (b'R', &10i32.to_be_bytes()[..]));
    }
    crowd
}

#[test]
fn unauthenticated_crowds_are_bounded_and_count_against_max_client_conn() {
    raise_fd_limit();
    let db = TestDb::new("hostile_crowd");
    let px = db.pgmux(&[]);
    let steady = Steady::start(&db, &px);
    let rss_before = rss(&px);
    let started = Instant::now();
    let crowd = unauthenticated_crowd(&db, &px, 2000);
    eprintln!(
        "[hostile] 2000 unauthenticated clients waiting after {:?}",
        started.elapsed()
    );
    let rss_held = rss(&px);
    let mut ok = db.raw(&px);
    assert_eq!(first_value(&ok.simple_query("SELECT 7")), "7");
    steady.wait_for_progress();
    drop(crowd);
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss(&px);
    note_rss("before 2000 unauthenticated", rss_before);
    note_rss("with 2000 unauthenticated", rss_held);
    note_rss("after they closed", rss_after);
    assert!(
        rss_held - rss_before < 64 * MIB,
        "{} -> {}",
        mib(rss_before),
        mib(rss_held)
    );
    assert!(rss_after - rss_before < 64 * MIB);
    // A second crowd reuses that memory: RSS stays flat (no per-connection leak).
    let crowd = unauthenticated_crowd(&db, &px, 2000);
    let rss_held2 = rss(&px);
    drop(crowd);
    std::thread::sleep(Duration::from_secs(1));
    let rss_after2 = rss(&px);
    note_rss("with a second crowd of 2000", rss_held2);
    note_rss("after the second crowd", rss_after2);
    assert!(
        rss_after2 - rss_after < 8 * MIB,
        "RSS grows with every crowd: {} after the first, {} after the second",
        mib(rss_after),
        mib(rss_after2)
    );
    assert_eq!(first_value(&ok.simple_query("SELECT 8")), "8");
    steady.finish();
    drop(ok);
    drop(px);

    let px = db.pgmux(&["--max-client-conn", "100"]);
    let steady = Steady::start(&db, &px); // one slot
                                          // 500 TCP connections that send nothing take no slot.
    let silent: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(("127.0.0.1", px.port())).expect("connect"))
        .collect();
    let mut ok = db.raw(&px); // a second slot
    assert_eq!(first_value(&ok.simple_query("SELECT 1")), "1");
    // 98 more that sent a startup packet fill the rest.
    let crowd = unauthenticated_crowd(&db, &px, 98);
    let mut refused = RawConn::connect(px.port());
    refused.startup(&db.user, &db.db, &[]);
    let e = expect_fatal(&mut refused, "53300", "client 101");
    assert!(e[&'M'].contains("too many clients"), "{e:?}");
    // Logged-in clients are not affected.
    assert_eq!(first_value(&ok.simple_query("SELECT 2")), "2");
    steady.wait_for_progress();
    // When the unauthenticated ones leave, their slots are free again.
    drop(crowd);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut late = loop {
        let mut c = RawConn::connect(px.port());
        c.startup(&db.user, &db.db, &[]);
        match c.try_scram_login(&db.user, &db.password) {
            Ok(_) => break c,
            Err(e) if e.get(&'C').map(String::as_str) == Some("53300") => {
                assert!(Instant::now() < deadline, "slots not freed");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(first_value(&late.simple_query("SELECT 3")), "3");
    drop(silent);
    steady.finish();
}

/// 10,000 short hostile connections of several kinds (bad startup length, protocol 2.0,
/// SSLRequest with data behind it, a startup packet then garbage instead of the SCRAM
/// answer): each gets its 08P01/0A000 and a close; RSS does not grow with their number;
/// the log does not get a line per connection at the default level.
#[test]
fn ten_thousand_bad_connections_leave_memory_flat() {
    raise_fd_limit();
    let db = TestDb::new("hostile_many");
    let px = db.pgmux(&[]);
    let steady = Steady::start(&db, &px);
    let port = px.port();
    let startup = RawConn::startup_message(&[("user", &db.user), ("database", &db.db)]);
    let mut ssl_then_data = startup_packet(SSL_REQUEST, b"");
    ssl_then_data.extend_from_slice(&startup);
    let mut startup_then_garbage = startup.clone();
    // A SASLInitialResponse naming a mechanism that does not exist.
    startup_then_garbage.extend_from_slice(&RawConn::frame(b'p', b"garbage\0\0\0\0\0"));
    let kinds: Arc<Vec<(Vec<u8>, &'static str)>> = Arc::new(vec![
        (i32::MAX.to_be_bytes().to_vec(), "08P01"),
        (startup_packet(2 << 16, b"user\0x\0\0"), "0A000"),
        (ssl_then_data, "08P01"),
        (startup_then_garbage, "08P01"),
    ]);
    let run = |n: usize| {
        let mut threads = Vec::new();
        for t in 0..4 {
            let kinds = kinds.clone();
            threads.push(std::thread::spawn(move || {
                for i in 0..n / 4 {
                    let (bytes, want) = &kinds[(i + t) % kinds.len()];
                    let got = one_bad_connection(port, bytes);
                    assert_eq!(
                        got.as_deref(),
                        Some(*want),
                        "kind {}",
                        (i + t) % kinds.len()
                    );
                }
            }));
        }
        for t in threads {
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        }
    };
    // Warm-up: allocator arenas, registry maps.
    run(400);
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss(&px);
    let lines_before = px.log().lines().count();
    let started = Instant::now();
    run(10_000);
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss(&px);
    let lines = px.log().lines().count() - lines_before;
    eprintln!("[hostile] 10,000 bad connections in {took:?}; {lines} log lines");
    note_rss("before 10,000 bad connections", rss_before);
    note_rss("after 10,000 bad connections", rss_after);
    assert!(
        rss_after - rss_before < 64 * MIB,
        "{} -> {}",
        mib(rss_before),
        mib(rss_after)
    );
    assert!(lines < 100, "{lines} log lines for 10,000 bad connections");
    steady.finish();
    assert_servers_clean(&db, &px);
}

// ---------------------------------------------------------------------------
// TLS negotiation
// ---------------------------------------------------------------------------

/// The first bytes of a TLS 1.2 ClientHello record.
const CLIENT_HELLO_START: &[u8] = &[
    0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x5e, 0x1f,
];

/// Without a certificate: SSLRequest is answered `N`; garbage (a TLS ClientHello sent
/// anyway) after it is 08P01; an SSLRequest or GSSENCRequest with data behind it in the
/// same packet is 08P01 "unexpected data after encryption request", and so is a second
/// SSLRequest.
#[test]
fn garbage_around_encryption_requests_without_tls() {
    let db = TestDb::new("hostile_notls");
    let px = db.pgmux(&[]);
    let steady = Steady::start(&db, &px);

    let mut c = RawConn::connect(px.port());
    c.send(&startup_packet(SSL_REQUEST, b""));
    let mut answer = [0u8; 1];
    c.stream().read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"N");
    c.send(CLIENT_HELLO_START);
    expect_fatal(&mut c, "08P01", "ClientHello after N");

    for code in [SSL_REQUEST, GSSENC_REQUEST] {
        let mut c = RawConn::connect(px.port());
        let mut bytes = startup_packet(code, b"");
        bytes.extend_from_slice(b"\x00\x00\x00\x08garbage!");
        c.send(&bytes);
        let mut buf = Vec::new();
        let _ = c.stream().read_to_end(&mut buf);
        assert_eq!(buf.first(), Some(&b'E'), "no N before the refusal: {buf:?}");
        let e = RawConn::error_fields(&buf[5..]);
        assert_eq!(e[&'C'], "08P01", "{e:?}");
        assert!(
            e[&'M'].contains("unexpected data after encryption request"),
            "{e:?}"
        );
    }

    let mut c = RawConn::connect(px.port());
    c.send(&startup_packet(SSL_REQUEST, b""));
    c.stream().read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"N");
    c.send(&startup_packet(SSL_REQUEST, b""));
    let e = expect_fatal(&mut c, "08P01", "a second SSLRequest");
    assert!(e[&'M'].contains("unexpected data after encryption request"));

    steady.finish();
    assert_servers_clean(&db, &px);
}

/// With a certificate: SSLRequest is answered `S`; then plaintext instead of a TLS
/// handshake (a StartupMessage, garbage) makes pgmux close the connection, without a
/// panic and with at most one log line each; an `S` followed by silence is closed at
/// client_login_timeout; TLS and plaintext clients keep being served.
#[test]
fn garbage_after_ssl_request_with_tls() {
    let db = TestDb::new("hostile_tls");
    let certs = TestCerts::new();
    let cert = certs.file("pgmux.crt");
    let key = certs.file("pgmux.key");
    let px = db.pgmux_env(
        &[],
        &[
            ("PGMUX_CLIENT_TLS_CERT_FILE", cert.as_str()),
            ("PGMUX_CLIENT_TLS_KEY_FILE", key.as_str()),
            ("PGMUX_CLIENT_LOGIN_TIMEOUT", "1s"),
        ],
    );
    let steady = Steady::start(&db, &px);
    let startup = RawConn::startup_message(&[("user", &db.user), ("database", &db.db)]);
    let garbage: Vec<Vec<u8>> = vec![
        startup.clone(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0u8; 64],
        vec![0xff; 4096],
    ];
    let attempts = 40;
    for i in 0..attempts {
        let mut c = RawConn::connect(px.port());
        c.send(&startup_packet(SSL_REQUEST, b""));
        let mut answer = [0u8; 1];
        c.stream().read_exact(&mut answer).expect("answer");
        assert_eq!(&answer, b"S");
        let _ = c.try_send(&garbage[i % garbage.len()]);
        // No plaintext ErrorResponse can be sent inside a failed handshake: a close
        // (maybe after a TLS alert) is the answer.
        let mut buf = Vec::new();
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let r = c.stream().read_to_end(&mut buf);
        assert!(
            r.is_ok() || matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "garbage {i}: pgmux did not close: {r:?}"
        );
        assert!(
            !buf.starts_with(b"R"),
            "garbage {i}: no authentication request may follow"
        );
    }
    // 'S', then silence, or a TLS record header announcing 16 KiB and nothing more:
    // closed at client_login_timeout.
    let mut answer = [0u8; 1];
    for tail in [&[][..], &[0x16, 0x03, 0x03, 0x40, 0x00, 0x01][..]] {
        let mut c = RawConn::connect(px.port());
        c.send(&startup_packet(SSL_REQUEST, b""));
        c.stream().read_exact(&mut answer).expect("answer");
        assert_eq!(&answer, b"S");
        c.send(tail);
        let started = Instant::now();
        let mut buf = Vec::new();
        let _ = c.stream().read_to_end(&mut buf);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_secs(6),
            "a stalled TLS handshake ({tail:?}) closed after {took:?}"
        );
    }

    // A real TLS client still logs in.
    let mut tcp = TcpStream::connect(("127.0.0.1", px.port())).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    tcp.write_all(&startup_packet(SSL_REQUEST, b""))
        .expect("send");
    tcp.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"S");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn =
        rustls::ClientConnection::new(Arc::new(verifying_config(&certs.ca, ALL_VERSIONS)), name)
            .expect("TLS client");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(&startup).expect("StartupMessage over TLS");
    let mut head = [0u8; 5];
    tls.read_exact(&mut head).expect("an answer over TLS");
    assert_eq!(head[0], b'R', "AuthenticationSASL over TLS");

    steady.finish();
    let log = px.log();
    assert!(!log.contains("panicked"), "{log}");
    let failures = log.matches("handshake failed").count();
    assert!(
        failures <= attempts + 1,
        "{failures} handshake log lines for {attempts} bad handshakes"
    );
}

// ---------------------------------------------------------------------------
// Protocol messages in the wrong state
// ---------------------------------------------------------------------------

/// Unknown portals and statements, Close of unknown names, Copy messages outside COPY,
/// Sync and Flush storms: PostgreSQL's own answers, and the session goes on. A password
/// message or a second StartupMessage after login, or messages after Terminate: 08P01
/// or a close, and nothing runs. Pool of one server, shared with a well-behaved client
/// all along; nothing is left dirty.
#[test]
fn wrong_state_messages_keep_sessions_and_servers_sane() {
    let db = TestDb::new("hostile_state");
    support::register_secret("hunter2-unasked");
    db.setup("CREATE TABLE t (v int)");
    let px = db.pgmux(&["--pool-size", "1"]);
    let steady = Steady::start(&db, &px);
    let mut c = db.raw(&px);

    // Execute / Describe of an unknown portal: PostgreSQL's 34000.
    let mut p = execute("nope");
    p.extend(sync());
    c.send(&p);
    let msgs = c.read_until_ready();
    assert_eq!(
        (tags(&msgs).as_str(), sqlstate(&msgs).as_deref()),
        ("EZ", Some("34000"))
    );
    let mut p = describe_msg(b'P', "nope");
    p.extend(sync());
    c.send(&p);
    let msgs = c.read_until_ready();
    assert_eq!(
        (tags(&msgs).as_str(), sqlstate(&msgs).as_deref()),
        ("EZ", Some("34000"))
    );
    // Close of unknown names is no error in PostgreSQL.
    let mut p = close_msg(b'S', "nope");
    p.extend(close_msg(b'P', "nope"));
    p.extend(sync());
    c.send(&p);
    let msgs = c.read_until_ready();
    assert_eq!(tags(&msgs), "33Z", "{}", describe(&msgs));
    // CopyData / CopyDone / CopyFail outside COPY are ignored (as PostgreSQL does), idle
    // and inside a transaction.
    let mut p = RawConn::frame(b'd', b"stray copy data");
    p.extend(RawConn::frame(b'c', b""));
    p.extend(RawConn::frame(b'f', b"stray\0"));
    p.extend(RawConn::query_message("SELECT 5"));
    c.send(&p);
    let msgs = c.read_until_ready();
    assert_eq!(tags(&msgs), "TDCZ", "{}", describe(&msgs));
    assert_eq!(first_value(&msgs), "5");
    c.simple_query("BEGIN");
    let mut p = RawConn::frame(b'd', b"stray copy data");
    p.extend(RawConn::frame(b'c', b""));
    p.extend(RawConn::query_message("SELECT 6"));
    c.send(&p);
    let msgs = c.read_until_ready();
    assert_eq!(first_value(&msgs), "6");
    assert_eq!(status(&msgs), 'T');
    assert_eq!(status(&c.simple_query("COMMIT")), 'I');
    // A Sync storm: one ReadyForQuery each, all idle; a Flush storm: nothing, then the
    // query's answer.
    let n = 5000;
    let storm: Vec<u8> = (0..n).flat_map(|_| sync()).collect();
    c.send(&storm);
    for i in 0..n {
        let (tag, body) = c.read_message().expect("ReadyForQuery");
        assert_eq!((tag, body[0]), (b'Z', b'I'), "Sync {i}");
    }
    let mut storm: Vec<u8> = (0..n).flat_map(|_| RawConn::frame(b'H', b"")).collect();
    storm.extend(RawConn::query_message("SELECT 7"));
    c.send(&storm);
    assert_eq!(first_value(&c.read_until_ready()), "7");
    steady.wait_for_progress();

    // A password message nobody asked for: 08P01 (PostgreSQL: invalid frontend message
    // type 112).
    let mut bad = db.raw(&px);
    bad.send(&RawConn::password_message("hunter2-unasked"));
    let e = expect_fatal(&mut bad, "08P01", "password message after login");
    assert!(e[&'M'].contains("invalid frontend message type"), "{e:?}");
    // A second StartupMessage after login. Read as a tagged message, its type byte is 0:
    // refused at once with 08P01, as PostgreSQL does (pgmux used to wait first for the
    // "length" the next four bytes seem to announce, 0x00001a00 here).
    let second = RawConn::startup_message(&[("user", &db.user)]);
    let mut bad = db.raw(&px);
    bad.send(&second);
    let e = expect_fatal(&mut bad, "08P01", "second StartupMessage");
    assert!(e[&'M'].contains("invalid frontend message type 0"), "{e:?}");
    // The same inside a transaction: the transaction is rolled back.
    let mut bad = db.raw(&px);
    bad.simple_query("BEGIN");
    bad.simple_query("INSERT INTO t VALUES (1)");
    bad.send(&RawConn::password_message("hunter2-unasked"));
    expect_fatal(&mut bad, "08P01", "password message inside a transaction");
    // Messages after Terminate are not run.
    let mut bad = db.raw(&px);
    let mut p = RawConn::terminate_message();
    p.extend(RawConn::query_message("INSERT INTO t VALUES (2)"));
    bad.send(&p);
    assert!(bad.is_closed(), "Terminate closes");

    // The first client's session went on throughout.
    assert_eq!(first_value(&c.simple_query("SELECT 8")), "8");
    steady.finish();
    assert_servers_clean(&db, &px);
    assert_eq!(db.psql("SELECT count(*) FROM t"), "0");
}

/// The sequence of [`unknown_statement_inside_a_transaction_fails_it`] on `c`: BEGIN,
/// INSERT, Bind of an unknown statement + Execute + Sync, then COMMIT. Returns (error
/// SQLSTATE, status after the Sync, COMMIT's command tag).
fn unknown_statement_in_transaction(c: &mut RawConn, bad: &[u8]) -> (Option<String>, char, String) {
    c.simple_query("BEGIN");
    c.simple_query("INSERT INTO t VALUES (1)");
    let mut p = bad.to_vec();
    p.extend(sync());
    c.send(&p);
    let msgs = c.read_until_ready();
    let code = sqlstate(&msgs);
    let st = status(&msgs);
    let msgs = c.simple_query("COMMIT");
    let tag = msgs
        .iter()
        .find(|(t, _)| *t == b'C')
        .map(|(_, b)| String::from_utf8_lossy(&b[..b.len() - 1]).into_owned())
        .unwrap_or_default();
    (code, st, tag)
}

/// An error inside a transaction aborts it in PostgreSQL: ReadyForQuery says `E` and
/// COMMIT rolls back. pgmux answers Bind/Describe of a statement the client never
/// prepared (26000) and a Parse of a name the client already uses (42P05) itself, since
/// statement names are pgmux's on the server; the server must fail as well, or COMMIT
/// would commit what PostgreSQL rolls back (a bug found by this test, fixed by sending
/// the server a message that fails in the refused message's place). Compared against
/// PostgreSQL directly.
#[test]
fn unknown_statement_inside_a_transaction_fails_it() {
    let db = TestDb::new("hostile_abort");
    db.setup("CREATE TABLE t (v int)");
    let px = db.pgmux(&[]);
    let mut wrong = Vec::new();
    let mut bind_execute = bind("", "nope");
    bind_execute.extend(execute(""));
    let mut dup = parse_named("dup", "SELECT 1");
    dup.extend(parse_named("dup", "SELECT 2"));
    for (what, bad, code) in [
        ("Bind", bind_execute, "26000"),
        ("Describe", describe_msg(b'S', "nope"), "26000"),
        ("duplicate Parse", dup, "42P05"),
    ] {
        let direct = db.cluster.primary().port;
        let mut pg = RawConn::login(direct, &db.user, &db.password, &db.db);
        let want = unknown_statement_in_transaction(&mut pg, &bad);
        assert_eq!(
            want,
            (Some(code.to_string()), 'E', "ROLLBACK".to_string()),
            "{what}: PostgreSQL itself"
        );
        assert_eq!(db.psql("SELECT count(*) FROM t"), "0");
        let mut c = db.raw(&px);
        let got = unknown_statement_in_transaction(&mut c, &bad);
        let rows = db.psql("SELECT count(*) FROM t");
        db.psql("TRUNCATE t");
        if (&got, rows.as_str()) != (&want, "0") {
            wrong.push(format!(
                "{what}: PostgreSQL answers {want:?} and keeps 0 rows; through pgmux \
                 {got:?} and {rows} row(s) committed"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

// ---------------------------------------------------------------------------
// Authentication, console, cancel
// ---------------------------------------------------------------------------

/// A password sent before pgmux asked for one, console logins with a wrong password or
/// a user pgmux has no secret for (even if listed in admin_users): refused, 08P01 or
/// 28P01, never logged in. Cancel requests with guessed keys cancel nothing and are
/// closed.
#[test]
fn intruders_on_the_login_console_and_cancel_paths() {
    let db = TestDb::new("hostile_auth");
    for secret in [
        "hunter2-unasked",
        "wrong-password-1",
        "whatever-password",
        "intruder-password",
    ] {
        support::register_secret(secret);
    }
    let px = db.pgmux_env(&[], &[("PGMUX_ADMIN_USERS", "intruder")]);
    let steady = Steady::start(&db, &px);

    // A cleartext password in the same packet as the StartupMessage.
    let mut c = RawConn::connect(px.port());
    let mut p = RawConn::startup_message(&[("user", &db.user), ("database", &db.db)]);
    p.extend(RawConn::password_message("hunter2-unasked"));
    c.send(&p);
    let mut got = Vec::new();
    while let Some(m) = c.read_message() {
        got.push(m);
    }
    assert!(
        !got.iter()
            .any(|(t, b)| *t == b'R' && b.starts_with(&0i32.to_be_bytes())),
        "AuthenticationOk for an unasked password: {}",
        describe(&got)
    );
    let code = sqlstate(&got);
    assert!(
        matches!(code.as_deref(), Some("08P01") | Some("28P01")),
        "{}",
        describe(&got)
    );

    // The console with a wrong password, as an unknown user, and as a user listed in
    // admin_users that pgmux has no secret for.
    for (user, password) in [
        (db.user.as_str(), "wrong-password-1"),
        ("nobody_here", "whatever-password"),
        ("intruder", "intruder-password"),
    ] {
        let mut c = RawConn::connect(px.port());
        c.startup(user, "pgbouncer", &[]);
        match c.try_scram_login(user, password) {
            Ok(msgs) => panic!("console login as {user}: {}", describe(&msgs)),
            Err(e) => {
                assert_eq!(e[&'C'], "28P01", "{user}: {e:?}");
                assert_eq!(e[&'S'], "FATAL", "{user}: {e:?}");
            }
        }
        assert!(c.is_closed());
    }

    // Guessed cancel keys while another client sleeps.
    let mut sleeper = db.raw(&px);
    let (pid, secret) = sleeper.backend_key.expect("BackendKeyData");
    sleeper.send(&RawConn::query_message("SELECT pg_sleep(2)"));
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let mut seed = (pid as u64) ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as i32
    };
    let mut keys: Vec<(i32, i32)> = (0..200).map(|_| (next(), next())).collect();
    keys.push((pid, secret.wrapping_add(1)));
    keys.push((pid, !secret));
    for (p, s) in keys {
        let mut conn = TcpStream::connect(("127.0.0.1", px.port())).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut body = p.to_be_bytes().to_vec();
        body.extend_from_slice(&s.to_be_bytes());
        conn.write_all(&startup_packet(CANCEL_REQUEST, &body))
            .expect("CancelRequest");
        let mut buf = Vec::new();
        let r = conn.read_to_end(&mut buf);
        assert!(
            r.is_ok() && buf.is_empty(),
            "a cancel connection is closed without an answer: {r:?} {buf:?}"
        );
    }
    let msgs = sleeper.read_until_ready();
    assert_eq!(
        sqlstate(&msgs),
        None,
        "the sleep was cancelled: {}",
        describe(&msgs)
    );
    assert!(started.elapsed() >= Duration::from_millis(1900));
    steady.finish();
}
