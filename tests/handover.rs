//! Sockets and restarts (issue 7), against real PostgreSQL and the real binary:
//! * TCP keepalive is on pgmux's client and server sockets as configured, seen the way an
//!   operator sees it (`ss -tnoi`: the kernel's keepalive timer), and off when disabled;
//! * a new pgmux started on the same port (SO_REUSEPORT), then SIGTERM to the old one,
//!   loses no client of a connect loop that runs through the whole handover.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{percent_encode, Pgmux, TestDb};

// ---------------------------------------------------------------------------------------
// TCP keepalive

/// `ss` output for the established TCP sockets of process `pid` matching `filter` (an ss
/// filter expression), one socket per line (`-H`: no header; `-o`: timers; `-i`: TCP
/// info, on the socket's line in `-H` mode after joining).
fn ss_sockets(pid: u32, filter: &str) -> Vec<String> {
    let out = Command::new("ss")
        .args([
            "-H",
            "-t",
            "-n",
            "-o",
            "-i",
            "-p",
            "state",
            "established",
            filter,
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `ss` ({e}); install iproute2 (Debian: apt-get install iproute2)")
        });
    assert!(out.status.success(), "ss failed: {out:?}");
    // With -i the TCP info follows on an indented line: join it to its socket.
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sockets: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(last) = sockets.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else if !line.trim().is_empty() {
            sockets.push(line.to_string());
        }
    }
    let owner = format!("pid={pid},");
    sockets.retain(|s| s.contains(&owner));
    sockets
}

/// The remaining time of a socket's keepalive timer (`timer:(keepalive,6.9sec,0)`), if
/// it has one.
fn keepalive_timer(socket: &str) -> Option<Duration> {
    let rest = &socket[socket.find("timer:(keepalive,")? + "timer:(keepalive,".len()..];
    let value = &rest[..rest.find(',')?];
    // ss prints e.g. "6.912sec", "950ms", "1min2sec", "1h2min"
    let mut total = Duration::ZERO;
    let mut num = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = String::from(c);
        while let Some(&u) = chars.peek() {
            if u.is_ascii_alphabetic() {
                unit.push(u);
                chars.next();
            } else {
                break;
            }
        }
        let n: f64 = num.parse().unwrap_or(0.0);
        num.clear();
        let secs = match unit.as_str() {
            "ms" => n / 1000.0,
            "sec" => n,
            "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(secs);
    }
    Some(total)
}

/// Waits (a few seconds) until pgmux (`px`) has exactly one socket to PostgreSQL
/// (`pg_port`) and one from a client (on its own port), both idle, and returns them:
/// (client side, server side). Idle: no data in flight, so no retransmission timer
/// (`timer:(on,…)`) hides the keepalive one (a socket shows one timer at a time).
fn pgmux_sockets(px: &Pgmux, pg_port: u16) -> (String, String) {
    let idle = |s: &String| !s.contains("timer:(on,") && !s.contains("timer:(persist,");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let clients = ss_sockets(px.pid(), &format!("( sport = :{} )", px.port()));
        let servers = ss_sockets(px.pid(), &format!("( dport = :{pg_port} )"));
        if clients.len() == 1 && servers.len() == 1 && idle(&clients[0]) && idle(&servers[0]) {
            return (clients[0].clone(), servers[0].clone());
        }
        assert!(
            Instant::now() < deadline,
            "expected one idle client and one idle server socket of pgmux (pid {}), got\nclients: {clients:#?}\nservers: {servers:#?}",
            px.pid()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_is_set_on_client_and_server_sockets() {
    let db = TestDb::new("keepalive");
    let pg_port = db.cluster.primary().port;

    // tcp_keepidle 7s instead of the default 60s: the timer proves the setting, not just
    // "keepalive on".
    let px = db.pgmux_env(
        &["--pool-size", "1"],
        &[
            ("PGMUX_TCP_KEEPIDLE", "7s"),
            ("PGMUX_TCP_KEEPINTVL", "3s"),
            ("PGMUX_TCP_KEEPCNT", "4"),
        ],
    );
    let client = support::connect(&db.url(&px)).await;
    let rows = client.simple_query("SELECT 1").await.expect("SELECT 1");
    assert!(!rows.is_empty());
    let (client_side, server_side) = pgmux_sockets(&px, pg_port);
    for (what, socket) in [("client", &client_side), ("server", &server_side)] {
        let timer = keepalive_timer(socket)
            .unwrap_or_else(|| panic!("pgmux's {what} socket has no keepalive timer: {socket}"));
        assert!(
            timer <= Duration::from_secs(7),
            "pgmux's {what} socket: keepalive timer {timer:?} is beyond tcp_keepidle 7s: {socket}"
        );
    }
    drop(client);

    // tcp_keepalive = false: no keepalive timer on either side.
    let px_off = db.pgmux_env(&["--pool-size", "1"], &[("PGMUX_TCP_KEEPALIVE", "false")]);
    let client = support::connect(&db.url(&px_off)).await;
    client.simple_query("SELECT 1").await.expect("SELECT 1");
    let (client_side, server_side) = pgmux_sockets(&px_off, pg_port);
    for (what, socket) in [("client", &client_side), ("server", &server_side)] {
        assert!(
            !socket.contains("keepalive"),
            "tcp_keepalive=false, yet pgmux's {what} socket has a keepalive timer: {socket}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Restart without dropped connections

/// Which pgmux served a connection of the loop: A reaches PostgreSQL over TCP, B over
/// the unix socket, so `inet_client_addr()` (NULL on a unix socket) tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    A,
    B,
}

/// Phases of the handover, as the connect loop sees them.
const BOTH: u8 = 1;
const DRAINING: u8 = 2;
const A_GONE: u8 = 3;

/// One connection of the loop: connect and log in through pgmux, one query, close.
async fn one_connection(url: &str) -> Result<Served, String> {
    let work = async {
        let client = support::try_connect(url)
            .await
            .map_err(|e| format!("connect: {e} ({e:?})"))?;
        let msgs = client
            .simple_query("SELECT inet_client_addr()::text")
            .await
            .map_err(|e| format!("query: {e} ({e:?})"))?;
        let row = msgs
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .ok_or_else(|| format!("no row in {} messages", msgs.len()))?;
        Ok(if row.get(0).is_some() {
            Served::A
        } else {
            Served::B
        })
    };
    match tokio::time::timeout(Duration::from_secs(10), work).await {
        Ok(r) => r,
        Err(_) => Err("no answer within 10s".to_string()),
    }
}

#[derive(Default)]
struct Tally {
    /// (phase, served by).
    served: Vec<(u8, Served)>,
    /// (phase, error).
    failures: Vec<(u8, String)>,
}

impl Tally {
    fn count(&self, phase: Option<u8>, by: Served) -> usize {
        self.served
            .iter()
            .filter(|(p, s)| *s == by && (phase.is_none() || phase == Some(*p)))
            .count()
    }
}

fn wait_ready(px: &Pgmux) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = ureq::get(format!("{}/readyz", px.admin_url()))
            .call()
            .map(|r| r.status().as_u16());
        if status.as_ref().is_ok_and(|s| *s == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pgmux on admin {} not ready within 10s: {status:?}",
            px.admin_url()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_on_the_same_port_drops_no_connection() {
    let db = TestDb::new("handover");
    let node = db.cluster.primary();
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");

    // A: the running pgmux, to PostgreSQL over TCP.
    let mut a = db.pgmux(&["--listen", &listen]);
    wait_ready(&a);

    // The connect loop: 4 clients that connect, query and disconnect back to back for the
    // whole test, each connection tallied by who served it or by its error.
    let url = support::pg_url(port, &db.user, &db.password, &db.db);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (url, tally, phase, stop) =
                (url.clone(), tally.clone(), phase.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let at = phase.load(Ordering::Relaxed);
                    let r = one_connection(&url).await;
                    let mut t = tally.lock().unwrap();
                    match r {
                        Ok(by) => t.served.push((at, by)),
                        Err(e) => t.failures.push((at, e)),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // B: the new pgmux on the same port, to PostgreSQL over the unix socket.
    let unix_url = format!(
        "postgres://{}:{}@{}:{}/{}",
        percent_encode(&db.user),
        percent_encode(&db.password),
        percent_encode(&node.socket_dir.display().to_string()),
        node.port,
        percent_encode(&db.db),
    );
    let b = Pgmux::start(&["--listen", &listen], &[("DATABASE_URL", &unix_url)]);
    wait_ready(&b);
    phase.store(BOTH, Ordering::Relaxed);
    // Long enough for the kernel's SO_REUSEPORT hash to send connections to both.
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The handover: SIGTERM to A, which drains and exits 0.
    phase.store(DRAINING, Ordering::Relaxed);
    a.signal(15);
    let status = a
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("pgmux A did not exit within 20s\n{}", a.log()));
    assert!(
        status.success(),
        "pgmux A exited with {status}\n{}",
        a.log()
    );
    phase.store(A_GONE, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("connect loop task");
    }
    let t = tally.lock().unwrap();
    let summary = format!(
        "A served {} (with B up: {}, draining: {}), B served {} (with A up: {}, after A exited: {}); {} failures",
        t.count(None, Served::A),
        t.count(Some(BOTH), Served::A),
        t.count(Some(DRAINING), Served::A),
        t.count(None, Served::B),
        t.count(Some(BOTH), Served::B),
        t.count(Some(A_GONE), Served::B),
        t.failures.len(),
    );
    eprintln!("handover: {summary}");
    assert!(
        t.failures.is_empty(),
        "{summary}\nfailed connections (phase: 0 A only, 1 both, 2 A draining, 3 A gone):\n{:#?}\n--- pgmux A log ---\n{}",
        t.failures,
        a.log()
    );
    assert!(
        t.count(Some(BOTH), Served::A) > 0 && t.count(Some(BOTH), Served::B) > 0,
        "while both listened, both served: {summary}"
    );
    assert!(
        t.count(Some(A_GONE), Served::B) > 0,
        "B serves alone after A exited: {summary}"
    );
    assert_eq!(
        t.count(Some(A_GONE), Served::A),
        0,
        "nothing is served by A once it exited: {summary}"
    );
    drop(b);
}
