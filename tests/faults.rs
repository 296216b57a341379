//! Faults between pgmux and PostgreSQL, against real PostgreSQL under client load
//! (issue "Reliability and security under faults"):
//!
//! * the primary is killed (`pg_ctl stop -m immediate`) and started again;
//! * a replica is killed and started again under a read load;
//! * the network between pgmux and the primary is cut (a black hole: a relay in the
//!   test stops forwarding and keeps the sockets open) and restored, then every
//!   connection through it is reset;
//! * someone else takes every connection slot of PostgreSQL (`53300 too many clients`)
//!   and gives them back.
//! * the network resets pgmux's connections after PostgreSQL committed a statement
//!   but before its answer arrived: the statement must not be run a second time.
//!
//! In each, what a user would check: no client waits forever (every operation has a
//! deadline well above pgmux's configured bounds), errors are PostgreSQL errors with a
//! SQLSTATE of the connection or shutdown class and only for work that was in flight,
//! every client works again within a bound once the fault is gone, and at quiescence
//! pgmux's server connections are exactly the test user's backends in
//! `pg_stat_activity` (same pids), within the pool size, no client connection is left
//! and pgmux's file descriptors are back to where they started: nothing leaked.
//!
//! Every client operation and its result is recorded; the figures are printed
//! (`cargo nextest run --test faults --no-capture`).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    admin_get, pgmux_server_pids, quote_literal, runtime, wait_servers_are_backends, Pgmux, TestDb,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

// ---------------------------------------------------------------------------
// Clients that record every operation
// ---------------------------------------------------------------------------

/// Why an operation failed, as a client sees it.
#[derive(Clone, Debug)]
struct Failure {
    /// The SQLSTATE; `closed:<SQLSTATE>` / `closed:eof` / `closed:<io>` when the request
    /// found the connection already closed (with what ended it); `timeout` when the
    /// operation did not finish within the test's deadline; `other` for anything else
    /// (protocol garbage, I/O errors without a PostgreSQL error).
    class: String,
    detail: String,
}

#[derive(Clone, Debug)]
struct Outcome {
    client: usize,
    /// `connect` or `op`.
    what: &'static str,
    started: Instant,
    ended: Instant,
    result: Result<String, Failure>,
}

/// Every operation of every client.
#[derive(Default)]
struct Record {
    outcomes: Mutex<Vec<Outcome>>,
}

impl Record {
    fn push(&self, o: Outcome) {
        self.outcomes.lock().unwrap().push(o);
    }

    fn all(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    /// Clients (of `0..n`) without a successful operation started at or after `since`.
    fn without_success_since(&self, n: usize, since: Instant) -> Vec<usize> {
        let v = self.outcomes.lock().unwrap();
        (0..n)
            .filter(|c| {
                !v.iter().any(|o| {
                    o.client == *c && o.what == "op" && o.result.is_ok() && o.started >= since
                })
            })
            .collect()
    }

    /// Waits until every client of `0..n` has had a successful operation that started
    /// at or after `since`; panics after `timeout` with the clients' last outcomes.
    fn wait_all_succeed_since(
        &self,
        n: usize,
        since: Instant,
        timeout: Duration,
        what: &str,
    ) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.without_success_since(n, since);
            if missing.is_empty() {
                return since.elapsed();
            }
            if Instant::now() >= deadline {
                let v = self.all();
                let last: Vec<String> = missing
                    .iter()
                    .map(|c| {
                        let o = v.iter().rev().find(|o| o.client == *c);
                        format!("client {c}: last outcome {o:?}")
                    })
                    .collect();
                panic!(
                    "{what}: {} clients had no successful operation within {timeout:?}:\n{}",
                    missing.len(),
                    last.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Failures by class, with one example detail each.
    fn failures_by_class(&self) -> BTreeMap<String, (usize, String)> {
        let mut m: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for o in self.all() {
            if let Err(f) = &o.result {
                let e = m
                    .entry(format!("{}:{}", o.what, f.class))
                    .or_insert((0, f.detail.clone()));
                e.0 += 1;
            }
        }
        m
    }

    fn summary(&self) -> String {
        let v = self.all();
        let ok = v
            .iter()
            .filter(|o| o.what == "op" && o.result.is_ok())
            .count();
        let failed = v.iter().filter(|o| o.result.is_err()).count();
        let connects = v.iter().filter(|o| o.what == "connect").count();
        let mut s = format!(
            "{} operations ok, {failed} failed, {connects} connects; failures by class:",
            ok
        );
        for (class, (n, example)) in self.failures_by_class() {
            s.push_str(&format!("\n    {class}: {n}  e.g. {example}"));
        }
        s
    }
}

/// A tokio-postgres connection whose connection task records how it ended.
struct Conn {
    client: Client,
    ended: Arc<Mutex<Option<String>>>,
}

impl Conn {
    async fn open(url: &str) -> Result<Conn, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        let ended = Arc::new(Mutex::new(None));
        let e2 = ended.clone();
        tokio::spawn(async move {
            let why = match connection.await {
                Ok(()) => "eof".to_string(),
                Err(e) => match e.as_db_error() {
                    Some(db) => format!("{} {}: {}", db.code().code(), db.severity(), db.message()),
                    None => format!("{e}"),
                },
            };
            *e2.lock().unwrap() = Some(why);
        });
        Ok(Conn { client, ended })
    }
}

fn classify(e: &tokio_postgres::Error, ended: Option<&Arc<Mutex<Option<String>>>>) -> Failure {
    if let Some(db) = e.as_db_error() {
        return Failure {
            class: db.code().code().to_string(),
            detail: format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        };
    }
    if e.is_closed() {
        let why = ended.and_then(|m| m.lock().unwrap().clone());
        let class = match &why {
            Some(w) => {
                let first = w.split_whitespace().next().unwrap_or("");
                if first.len() == 5 && first.chars().all(|c| c.is_ascii_alphanumeric()) {
                    format!("closed:{first}")
                } else if w == "eof" {
                    "closed:eof".to_string()
                } else {
                    format!("closed:{w}")
                }
            }
            None => "closed:?".to_string(),
        };
        return Failure {
            class,
            detail: format!("{e}; the connection had ended with: {why:?}"),
        };
    }
    Failure {
        class: "other".to_string(),
        detail: format!("{e} ({e:?})"),
    }
}

/// Connection-class and shutdown-class errors: what a client may see for work that was
/// in flight when its server went away (PostgreSQL's own FATAL, or pgmux's 08006).
fn is_connection_error(class: &str) -> bool {
    let code = class.strip_prefix("closed:").unwrap_or(class);
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
}

#[derive(Clone, Copy, Debug)]
enum Work {
    /// BEGIN; UPDATE t (own row); COMMIT, as three simple queries.
    Txn,
    /// `SELECT pg_is_in_recovery()`, autocommit (routed to a replica when one is usable).
    Read,
}

async fn simple_value(client: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let msgs = client.simple_query(sql).await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_owned()),
            _ => None,
        })
        .unwrap_or_default())
}

async fn run_work(work: Work, client: &Client, id: usize) -> Result<String, tokio_postgres::Error> {
    match work {
        Work::Txn => {
            client.batch_execute("BEGIN").await?;
            let n = simple_value(
                client,
                &format!("UPDATE t SET n = n + 1 WHERE id = {} RETURNING n", id + 1),
            )
            .await?;
            client.batch_execute("COMMIT").await?;
            Ok(n)
        }
        Work::Read => simple_value(client, "SELECT pg_is_in_recovery()").await,
    }
}

/// One client: connects (again, when its connection was closed) and runs `work` in a
/// loop until `stop`, every connect and operation bounded by `op_timeout`.
async fn client_loop(
    id: usize,
    url: String,
    work: Work,
    op_timeout: Duration,
    pause: Duration,
    stop: Arc<AtomicBool>,
    record: Arc<Record>,
) {
    let mut conn: Option<Conn> = None;
    while !stop.load(Ordering::Relaxed) {
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            let started = Instant::now();
            let r = tokio::time::timeout(op_timeout, Conn::open(&url)).await;
            let result = match r {
                Ok(Ok(c)) => {
                    conn = Some(c);
                    Ok(String::new())
                }
                Ok(Err(e)) => Err(classify(&e, None)),
                Err(_) => Err(Failure {
                    class: "timeout".into(),
                    detail: format!("connect took over {op_timeout:?}"),
                }),
            };
            let failed = result.is_err();
            record.push(Outcome {
                client: id,
                what: "connect",
                started,
                ended: Instant::now(),
                result,
            });
            if failed {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let c = conn.as_ref().expect("connected above");
        let started = Instant::now();
        let r = tokio::time::timeout(op_timeout, run_work(work, &c.client, id)).await;
        let result = match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(&e, Some(&c.ended))),
            Err(_) => Err(Failure {
                class: "timeout".into(),
                detail: format!("operation took over {op_timeout:?}"),
            }),
        };
        let failed = result.is_err();
        let timed_out = matches!(&result, Err(f) if f.class == "timeout");
        record.push(Outcome {
            client: id,
            what: "op",
            started,
            ended: Instant::now(),
            result,
        });
        if timed_out {
            conn = None;
        } else if failed && !c.client.is_closed() {
            // Possibly inside a failed transaction: end it (or give the connection up).
            let rb = tokio::time::timeout(op_timeout, c.client.batch_execute("ROLLBACK")).await;
            if !matches!(rb, Ok(Ok(()))) {
                conn = None;
            }
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// A set of client tasks on a runtime of their own, stopped and joined by [`Load::stop`].
struct Load {
    stop: Arc<AtomicBool>,
    record: Arc<Record>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(
        rt: &Runtime,
        n: usize,
        url: &str,
        work: Work,
        op_timeout: Duration,
        pause: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Record::default());
        let tasks = (0..n)
            .map(|id| {
                rt.spawn(client_loop(
                    id,
                    url.to_string(),
                    work,
                    op_timeout,
                    pause,
                    stop.clone(),
                    record.clone(),
                ))
            })
            .collect();
        Load {
            stop,
            record,
            tasks,
        }
    }

    /// Stops the clients; each must finish its operation within `op_timeout` + 5 s.
    fn stop(&mut self, rt: &Runtime, op_timeout: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let tasks = std::mem::take(&mut self.tasks);
        rt.block_on(async {
            for (i, t) in tasks.into_iter().enumerate() {
                match tokio::time::timeout(op_timeout + Duration::from_secs(5), t).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("client {i} panicked: {e}"),
                    Err(_) => panic!("client {i} did not stop"),
                }
            }
        });
    }
}

/// pgmux's log has no panic in it.
fn assert_no_panic(px: &Pgmux) {
    let log = px.log();
    assert!(
        !log.contains("panicked at"),
        "pgmux panicked:\n{}",
        log.lines()
            .filter(|l| l.contains("panicked") || l.contains("ERROR"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Every failure is of a class `allowed` accepts and lies within `[from, until]`; no
/// operation timed out. Panics listing the offenders.
fn assert_failures(
    record: &Record,
    allowed: impl Fn(&str) -> bool,
    from: Instant,
    until: Instant,
    what: &str,
) {
    let bad: Vec<String> = record
        .all()
        .into_iter()
        .filter_map(|o| {
            let f = o.result.as_ref().err()?;
            let in_window = o.ended >= from && o.started <= until;
            (!allowed(&f.class) || !in_window).then(|| {
                format!(
                    "client {} {} {:?} after {:?} (started {:?} from the fault's start, {}in the fault window): {} — {}",
                    o.client,
                    o.what,
                    f.class,
                    o.ended - o.started,
                    o.started.saturating_duration_since(from),
                    if in_window { "" } else { "NOT " },
                    f.class,
                    f.detail
                )
            })
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} unexpected failures:\n{}",
        bad.len(),
        bad.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Clients that saw at least one failed operation.
fn clients_with_failures(record: &Record) -> usize {
    let mut c: Vec<usize> = record
        .all()
        .iter()
        .filter(|o| o.result.is_err())
        .map(|o| o.client)
        .collect();
    c.sort_unstable();
    c.dedup();
    c.len()
}

/// Table `t` with rows 1..=n. The test clusters run with `synchronous_commit = off`,
/// so a crash (`-m immediate`) may lose the last commits (up to wal_buffers' worth of
/// WAL when the WAL writer is starved of CPU): the WAL is flushed once here, so that
/// the table itself survives the tests' crashes.
fn create_rows(db: &TestDb, n: usize) {
    db.setup(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0); \
         INSERT INTO t (id) SELECT generate_series(1, {n});"
    ));
    db.cluster.primary().current_wal_lsn();
}

// ---------------------------------------------------------------------------
// 1. The primary is killed and restarted under load
// ---------------------------------------------------------------------------

#[test]
fn primary_killed_and_restarted_under_load() {
    const CLIENTS: usize = 20;
    const POOL: usize = 5;
    let op_timeout = Duration::from_secs(25);
    let db = TestDb::new("fault_primary");
    create_rows(&db, CLIENTS);
    let px = db.pgmux_env(
        &["--pool-size", &POOL.to_string()],
        &[
            ("PGMUX_QUERY_WAIT_TIMEOUT", "15s"),
            ("PGMUX_SERVER_LOGIN_RETRY", "200ms"),
        ],
    );
    let url = db.url(&px);
    let fds_at_start = support::pgmux_fds(&px);
    let rt = runtime();
    let mut load = Load::start(
        &rt,
        CLIENTS,
        &url,
        Work::Txn,
        op_timeout,
        Duration::from_millis(2),
    );
    let t0 = Instant::now();
    load.record
        .wait_all_succeed_since(CLIENTS, t0, Duration::from_secs(15), "warm-up");

    let node = db.cluster.primary();
    let kill_at = Instant::now();
    node.kill();
    std::thread::sleep(Duration::from_millis(1000));
    node.start();
    let back_at = Instant::now();
    let outage = back_at - kill_at;
    // What was committed long before the crash survived it.
    if let Err(e) = node.try_psql(&db.db, "SELECT count(*) FROM t") {
        panic!(
            "table t is gone after the crash: {e}\n--- PostgreSQL log ---\n{}",
            node.log()
        );
    }
    let recovered = load.record.wait_all_succeed_since(
        CLIENTS,
        back_at,
        Duration::from_secs(15),
        "after the restart",
    );
    // Some more load after everybody is back: no late failures.
    std::thread::sleep(Duration::from_millis(500));
    let settled_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    load.stop(&rt, op_timeout);

    println!(
        "primary kill: outage (kill to started) {outage:?}; every client succeeded again {recovered:?} after the restart"
    );
    println!("  {}", load.record.summary());
    let with_failures = clients_with_failures(&load.record);
    println!("  clients that saw a failure: {with_failures} of {CLIENTS} (pool_size {POOL})");
    assert_failures(
        &load.record,
        is_connection_error,
        kill_at,
        settled_at,
        "primary kill",
    );
    // Only transactions in flight fail: at most one per server pgmux had.
    let failed_ops = load
        .record
        .all()
        .iter()
        .filter(|o| o.what == "op" && o.result.is_err())
        .count();
    assert!(
        failed_ops <= POOL,
        "{failed_ops} operations failed; at most {POOL} (one per server) were in flight"
    );
    support::settled_without_leaks(&px, node, node.port, &db.user, POOL, fds_at_start);
    assert_no_panic(&px);
}

// ---------------------------------------------------------------------------
// 2. A replica is killed and restarted under a read load
// ---------------------------------------------------------------------------

#[test]
fn replica_killed_and_restarted_under_read_load() {
    const CLIENTS: usize = 10;
    const POOL: usize = 4;
    let op_timeout = Duration::from_secs(20);
    let db = TestDb::with_replicas("fault_replica", 1);
    let px = db.pgmux_with_replicas(
        &["--pool-size", &POOL.to_string()],
        &[("PGMUX_QUERY_WAIT_TIMEOUT", "10s")],
    );
    let url = db.url(&px);
    let fds_at_start = support::pgmux_fds(&px);
    let rt = runtime();
    let mut load = Load::start(
        &rt,
        CLIENTS,
        &url,
        Work::Read,
        op_timeout,
        Duration::from_millis(5),
    );
    let replica_reads_since = |since: Instant| {
        load.record
            .all()
            .iter()
            .filter(|o| o.started >= since && matches!(&o.result, Ok(v) if v == "t"))
            .count()
    };
    let t0 = Instant::now();
    load.record
        .wait_all_succeed_since(CLIENTS, t0, Duration::from_secs(15), "warm-up");
    wait_for(
        "reads served by the replica",
        Duration::from_secs(15),
        || (replica_reads_since(t0) >= 200).then_some(()),
    );

    let replica = &db.cluster.replicas()[0];
    let kill_at = Instant::now();
    replica.kill();
    let killed_at = Instant::now();
    // Reads go on, on the primary, while the replica is down.
    std::thread::sleep(Duration::from_millis(300));
    let down_since = Instant::now();
    load.record.wait_all_succeed_since(
        CLIENTS,
        down_since,
        Duration::from_secs(10),
        "replica down",
    );
    std::thread::sleep(Duration::from_millis(1500));
    let reads_while_down: Vec<Outcome> = load
        .record
        .all()
        .into_iter()
        .filter(|o| o.what == "op" && o.started >= down_since && o.result.is_ok())
        .collect();
    let on_replica_while_down = reads_while_down
        .iter()
        .filter(|o| matches!(&o.result, Ok(v) if v == "t"))
        .count();
    replica.start();
    let back_at = Instant::now();
    wait_for(
        "the replica back in rotation (admin API)",
        Duration::from_secs(20),
        || {
            let v = admin_get(&px, "/api/v1/replicas");
            (v["replicas"][0]["healthy"] == true).then_some(())
        },
    );
    wait_for(
        "reads served by the replica again",
        Duration::from_secs(20),
        || (replica_reads_since(back_at) >= 20).then_some(()),
    );
    let replica_again = back_at.elapsed();
    let settled_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    load.stop(&rt, op_timeout);

    let all = load.record.all();
    let ops = |f: &dyn Fn(&Outcome) -> bool| all.iter().filter(|o| o.what == "op" && f(o)).count();
    println!(
        "replica kill: down for {:?}; reads while down: {} (on the replica: {on_replica_while_down}); \
         replica reads again {replica_again:?} after its restart",
        back_at - killed_at,
        reads_while_down.len()
    );
    println!(
        "  reads on the replica: {} before the kill, {} after the restart; on the primary: {}",
        ops(&|o| o.started < kill_at && matches!(&o.result, Ok(v) if v == "t")),
        ops(&|o| o.started >= back_at && matches!(&o.result, Ok(v) if v == "t")),
        ops(&|o| matches!(&o.result, Ok(v) if v == "f")),
    );
    println!("  {}", load.record.summary());
    let stats = admin_get(&px, "/api/v1/stats");
    println!("  routing: {}", stats["routing"]);
    println!(
        "  replicas: {}",
        admin_get(&px, "/api/v1/replicas")["replicas"]
    );
    assert!(
        !reads_while_down.is_empty(),
        "no read succeeded while the replica was down"
    );
    assert_eq!(
        on_replica_while_down, 0,
        "reads answered by a replica that was down?"
    );
    // A replica's death under a read that has not been answered is hidden by pgmux (the
    // read runs again on the primary); anything else may fail only with a connection
    // error, and only while the replica is going down.
    assert_failures(
        &load.record,
        is_connection_error,
        kill_at,
        settled_at,
        "replica kill",
    );
    let failed = ops(&|o| o.result.is_err());
    assert!(
        failed <= POOL,
        "{failed} reads failed; at most {POOL} (one per replica server) were in flight"
    );

    let p = db.cluster.primary();
    let on_primary =
        wait_servers_are_backends(&px, p, p.port, &db.user, POOL, Duration::from_secs(15));
    let on_replica = wait_servers_are_backends(
        &px,
        replica,
        replica.port,
        &db.user,
        POOL,
        Duration::from_secs(15),
    );
    println!(
        "  at quiescence: primary {on_primary} servers = backends, replica {on_replica} servers = backends"
    );
    // The replica health checks keep a connection to each node (primary and replica).
    let fds = support::wait_no_fd_leak(&px, fds_at_start, 2, Duration::from_secs(10));
    println!("  pgmux fds: {fds_at_start} at start, {fds} now: no socket leaked");
    assert_no_panic(&px);
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// 3. The network between pgmux and the primary is cut and restored
// ---------------------------------------------------------------------------

/// A loopback TCP relay in front of a PostgreSQL port. `pause` stops forwarding in both
/// directions and keeps every socket open (a black hole: what was sent stays in the
/// relay and the kernel's buffers, new connections are accepted and then hear nothing);
/// `resume` forwards again; `reset_all` resets every connection open at that moment
/// (RST on both sides, `SO_LINGER` 0).
struct Relay {
    port: u16,
    paused: watch::Sender<bool>,
    /// Holds only what PostgreSQL sends (its answers), while requests still flow.
    answers_held: watch::Sender<bool>,
    kill: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
}

impl Relay {
    fn start(rt: &Runtime, upstream: u16) -> Relay {
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let (paused, paused_rx) = watch::channel(false);
        let (answers_held, answers_rx) = watch::channel(false);
        let (kill, kill_rx) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let acc = accepted.clone();
        rt.spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::Relaxed);
                let _ = down.set_nodelay(true);
                tokio::spawn(relay_conn(
                    down,
                    upstream,
                    paused_rx.clone(),
                    answers_rx.clone(),
                    kill_rx.clone(),
                ));
            }
        });
        Relay {
            port,
            paused,
            answers_held,
            kill,
            accepted,
        }
    }

    fn pause(&self) {
        self.paused.send_replace(true);
    }

    fn resume(&self) {
        self.paused.send_replace(false);
    }

    fn hold_answers(&self, hold: bool) {
        self.answers_held.send_replace(hold);
    }

    fn reset_all(&self) {
        self.kill.send_modify(|g| *g += 1);
    }
}

async fn relay_conn(
    mut down: TcpStream,
    upstream: u16,
    paused: watch::Receiver<bool>,
    answers_held: watch::Receiver<bool>,
    mut kill: watch::Receiver<u64>,
) {
    kill.borrow_and_update();
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let killed = {
        let (dr, dw) = down.split();
        let (ur, uw) = up.split();
        tokio::select! {
            _ = async {
                tokio::join!(
                    pump(dr, uw, paused.clone(), None),
                    pump(ur, dw, paused.clone(), Some(answers_held))
                )
            } => false,
            _ = kill.changed() => true,
        }
    };
    if killed {
        let _ = down.set_zero_linger();
        let _ = up.set_zero_linger();
    }
}

async fn pump(
    mut r: ReadHalf<'_>,
    mut w: WriteHalf<'_>,
    mut paused: watch::Receiver<bool>,
    mut held: Option<watch::Receiver<bool>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(h) = held.as_mut() {
            if h.wait_for(|p| !*p).await.is_err() {
                return;
            }
        }
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        // What was read (or the EOF) is held while paused.
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if let Some(h) = held.as_mut() {
            if h.wait_for(|p| !*p).await.is_err() {
                return;
            }
        }
        if n == 0 {
            let _ = w.shutdown().await;
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[test]
fn network_black_hole_and_reset_between_pgmux_and_primary() {
    const CLIENTS: usize = 8;
    const POOL: usize = 4;
    // pgmux's bounds: a query unanswered for query_timeout is cancelled, and if the
    // cancel is not answered within 5 s more the client gets FATAL 57014; a connect +
    // login has server_connect_timeout; a wait for a server query_wait_timeout.
    let query_timeout = Duration::from_secs(1);
    let bound = query_timeout + Duration::from_secs(5) + Duration::from_secs(3);
    let op_timeout = Duration::from_secs(25);
    let db = TestDb::new("fault_network");
    create_rows(&db, CLIENTS);
    let rt = runtime();
    let node = db.cluster.primary();
    let relay = Relay::start(&rt, node.port);
    let relay_url = support::pg_url(relay.port, &db.user, &db.password, &db.db);
    let px = Pgmux::start(
        &["--pool-size", &POOL.to_string()],
        &[
            ("DATABASE_URL", relay_url.as_str()),
            ("PGMUX_QUERY_TIMEOUT", "1s"),
            ("PGMUX_SERVER_CONNECT_TIMEOUT", "1s"),
            ("PGMUX_QUERY_WAIT_TIMEOUT", "3s"),
            ("PGMUX_SERVER_LOGIN_RETRY", "200ms"),
            ("PGMUX_SERVER_CHECK_DELAY", "1s"),
        ],
    );
    let url = db.url(&px);
    let fds_at_start = support::pgmux_fds(&px);
    let mut load = Load::start(
        &rt,
        CLIENTS,
        &url,
        Work::Txn,
        op_timeout,
        Duration::from_millis(5),
    );
    let t0 = Instant::now();
    load.record
        .wait_all_succeed_since(CLIENTS, t0, Duration::from_secs(15), "warm-up");

    // (a) Black hole, longer than the bound.
    let pause_at = Instant::now();
    relay.pause();
    std::thread::sleep(bound + Duration::from_secs(2));
    let resume_at = Instant::now();
    relay.resume();
    let recovered_a = load.record.wait_all_succeed_since(
        CLIENTS,
        resume_at,
        Duration::from_secs(15),
        "after the black hole",
    );
    std::thread::sleep(Duration::from_millis(500));

    // (b) Every connection through the relay is reset.
    let reset_at = Instant::now();
    relay.reset_all();
    let recovered_b = load.record.wait_all_succeed_since(
        CLIENTS,
        reset_at,
        Duration::from_secs(15),
        "after the reset",
    );
    std::thread::sleep(Duration::from_millis(500));
    let settled_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    load.stop(&rt, op_timeout);

    let all = load.record.all();
    // Operations that overlapped the black hole.
    let in_hole: Vec<&Outcome> = all
        .iter()
        .filter(|o| o.what == "op" && o.started < resume_at && o.ended > pause_at)
        .collect();
    let slowest_in_hole = in_hole
        .iter()
        .map(|o| o.ended - o.started)
        .max()
        .unwrap_or_default();
    let failed_in_hole: Vec<&&Outcome> = in_hole.iter().filter(|o| o.result.is_err()).collect();
    let mut by_class: BTreeMap<String, (usize, Duration, Duration)> = BTreeMap::new();
    for o in &failed_in_hole {
        let took = o.ended - o.started;
        let e = by_class
            .entry(o.result.as_ref().unwrap_err().class.clone())
            .or_insert((0, Duration::MAX, Duration::ZERO));
        e.0 += 1;
        e.1 = e.1.min(took);
        e.2 = e.2.max(took);
    }
    println!(
        "network: black hole {:?}: {} operations overlapped it, {} failed, slowest {slowest_in_hole:?} \
         (bound {bound:?}); every client succeeded {recovered_a:?} after it lifted, {recovered_b:?} \
         after the reset; relay accepted {} connections",
        resume_at - pause_at,
        in_hole.len(),
        failed_in_hole.len(),
        relay.accepted.load(Ordering::Relaxed)
    );
    for (class, (n, min, max)) in &by_class {
        println!("  in the black hole: {n} x {class}, after {min:?} to {max:?}");
    }
    println!("  {}", load.record.summary());
    // Nobody hung in the black hole: every operation that overlapped it ended within
    // the bound (as an error, or a success once the network was back).
    let hung: Vec<&&Outcome> = in_hole
        .iter()
        .filter(|o| o.ended - o.started > bound)
        .collect();
    assert!(
        hung.is_empty(),
        "{} operations in the black hole took longer than {bound:?}: {:?}",
        hung.len(),
        hung.iter().take(5).collect::<Vec<_>>()
    );
    // Every client was told (the hole lasted longer than the bound).
    let mut told: Vec<usize> = failed_in_hole.iter().map(|o| o.client).collect();
    told.sort_unstable();
    told.dedup();
    assert_eq!(
        told.len(),
        CLIENTS,
        "only clients {told:?} got an error in the black hole"
    );
    // Errors: pgmux's timeouts (57014: query_timeout's unanswered cancel, or
    // query_wait_timeout) and connection errors, only from the cut onwards.
    assert_failures(
        &load.record,
        |c| is_connection_error(c) || c.trim_start_matches("closed:") == "57014",
        pause_at,
        settled_at,
        "network faults",
    );
    // After the reset (b): only transactions in flight fail (one per server at most).
    let failed_after_reset = all
        .iter()
        .filter(|o| o.what == "op" && o.started >= reset_at && o.result.is_err())
        .count();
    assert!(
        failed_after_reset <= POOL,
        "{failed_after_reset} operations failed after the reset; at most {POOL} were in flight"
    );
    assert_failures(
        &Record {
            outcomes: Mutex::new(
                all.iter()
                    .filter(|o| o.started >= reset_at)
                    .cloned()
                    .collect(),
            ),
        },
        is_connection_error,
        reset_at,
        settled_at,
        "connection reset",
    );
    support::settled_without_leaks(&px, node, relay.port, &db.user, POOL, fds_at_start);
    assert_no_panic(&px);
}

/// The network drops pgmux's connections to PostgreSQL after PostgreSQL has run and
/// committed a client's statement but before its answer reached pgmux (the answer was
/// in flight: a reset by a firewall, NAT or load balancer, a failover of the network
/// path). PostgreSQL committed: the statement must not run a second time. The client
/// may get an error (it cannot know whether its statement committed: like a direct
/// connection, it gets a connection error) but a silent second run is a double write.
/// (Found by this test: pgmux used to send such a unit again.)
#[test]
fn answer_lost_after_commit_is_not_run_twice() {
    const CLIENTS: usize = 4;
    let db = TestDb::new("fault_lost_answer");
    // No primary key: a statement run twice leaves two rows.
    db.setup("CREATE TABLE once (id bigint NOT NULL)");
    let rt = runtime();
    let node = db.cluster.primary();
    let relay = Relay::start(&rt, node.port);
    let relay_url = support::pg_url(relay.port, &db.user, &db.password, &db.db);
    let px = Pgmux::start(
        &["--pool-size", &CLIENTS.to_string()],
        &[("DATABASE_URL", relay_url.as_str())],
    );
    let url = db.url(&px);
    let conns: Vec<Conn> = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..CLIENTS {
            let c = Conn::open(&url).await.expect("connect");
            // Every client in a transaction at once: the pool opens CLIENTS servers.
            c.client.batch_execute("BEGIN").await.expect("BEGIN");
            c.client
                .batch_execute(&format!("INSERT INTO once VALUES ({})", i * 1000))
                .await
                .expect("INSERT");
            v.push(c);
        }
        for c in &v {
            c.client.batch_execute("COMMIT").await.expect("COMMIT");
        }
        v
    });
    let conns = Arc::new(conns);

    // Requests reach PostgreSQL, its answers stay in the network.
    relay.hold_answers(true);
    let sent_at = Instant::now();
    let inserts: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let conns = conns.clone();
            rt.spawn(async move {
                let c = &conns[i];
                let r = tokio::time::timeout(
                    Duration::from_secs(20),
                    c.client
                        .batch_execute(&format!("INSERT INTO once VALUES ({})", i * 1000 + 1)),
                )
                .await;
                match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(classify(&e, Some(&c.ended))),
                    Err(_) => Err(Failure {
                        class: "timeout".into(),
                        detail: "no answer within 20 s".into(),
                    }),
                }
            })
        })
        .collect();
    // PostgreSQL has committed every INSERT (seen directly, not through the relay)...
    wait_for(
        "PostgreSQL to commit the inserts",
        Duration::from_secs(5),
        || {
            let n = node.psql(&db.db, "SELECT count(*) FROM once WHERE id % 1000 = 1");
            (n == CLIENTS.to_string()).then_some(())
        },
    );
    let committed_after = sent_at.elapsed();
    // ... and then the network resets the connections before the answers arrive.
    relay.reset_all();
    // (Released once the reset connections are gone; new ones must not be held.)
    std::thread::sleep(Duration::from_millis(50));
    relay.hold_answers(false);
    let results: Vec<Result<(), Failure>> = rt.block_on(async {
        let mut v = Vec::new();
        for t in inserts {
            v.push(t.await.expect("insert task"));
        }
        v
    });
    let rows = node.psql(
        &db.db,
        "SELECT coalesce(string_agg(id || ' x' || n, ', ' ORDER BY id), '') \
         FROM (SELECT id, count(*) n FROM once WHERE id % 1000 = 1 GROUP BY id) s",
    );
    println!(
        "lost answers: the inserts were committed {committed_after:?} after they were sent; \
         the connections were then reset. Clients got: {results:?}; rows in PostgreSQL: {rows}"
    );
    let pools = admin_get(&px, "/api/v1/pools");
    println!(
        "  pgmux units_retried: {}",
        pools["pools"][0]["totals"]["units_retried"]
    );
    let twice = node.psql(
        &db.db,
        "SELECT count(*) FROM (SELECT id FROM once GROUP BY id HAVING count(*) > 1) s",
    );
    assert_eq!(
        twice,
        "0",
        "statements ran twice: rows {rows}; clients got {results:?}\npgmux log:\n{}",
        px.log()
    );
    for r in &results {
        if let Err(f) = r {
            assert!(is_connection_error(&f.class), "unclear error: {f:?}");
        }
    }
    assert_no_panic(&px);
}

// ---------------------------------------------------------------------------
// 4. Someone else takes every connection slot of PostgreSQL
// ---------------------------------------------------------------------------

#[test]
fn max_connections_exhausted_by_someone_else() {
    const CLIENTS: usize = 6;
    const POOL: usize = 4;
    let query_wait = Duration::from_secs(3);
    let op_timeout = Duration::from_secs(20);
    let db = TestDb::new("fault_full");
    create_rows(&db, CLIENTS);
    let node = db.cluster.primary();
    // A small server, so that filling it takes few processes.
    node.psql("postgres", "ALTER SYSTEM SET max_connections = 20;");
    node.stop();
    node.start();
    assert_eq!(node.show("max_connections"), "20");
    let (hog, hog_pw, _) = db.cluster.create_user_db("fault_hog");
    let px = db.pgmux_env(
        &["--pool-size", &POOL.to_string()],
        &[
            ("PGMUX_QUERY_WAIT_TIMEOUT", "3s"),
            ("PGMUX_SERVER_LOGIN_RETRY", "200ms"),
        ],
    );
    let url = db.url(&px);
    let fds_at_start = support::pgmux_fds(&px);
    let rt = runtime();
    // The pool exists and knows the server (a login), then loses its servers.
    rt.block_on(async {
        let c = Conn::open(&url).await.expect("first client");
        assert_eq!(
            simple_value(&c.client, "SELECT 1").await.expect("SELECT 1"),
            "1"
        );
    });
    node.psql(
        "postgres",
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {}",
            quote_literal(&db.user)
        ),
    );
    wait_for(
        "pgmux to notice its servers are gone",
        Duration::from_secs(10),
        || pgmux_server_pids(&px, node.port).0.is_empty().then_some(()),
    );

    // Someone else takes every slot there is.
    let hog_url = node.url(&hog, &hog_pw, "postgres");
    let (hogs, refusal) = rt.block_on(async {
        let mut hogs = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), Conn::open(&hog_url)).await {
                Ok(Ok(c)) => hogs.push(c),
                Ok(Err(e)) => break (hogs, classify(&e, None)),
                Err(_) => panic!("a direct connect to PostgreSQL hung"),
            }
            assert!(
                hogs.len() < 100,
                "max_connections = 20 but 100 connections were accepted"
            );
        }
    });
    assert_eq!(refusal.class, "53300", "{refusal:?}");
    println!(
        "max_connections: someone else holds {} connections; PostgreSQL refuses the next: {}",
        hogs.len(),
        refusal.detail
    );

    // Clients through pgmux get a clear error within query_wait_timeout, not a hang.
    let full_at = Instant::now();
    let results: Vec<(Duration, Result<String, Failure>)> = rt.block_on(async {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let r = tokio::time::timeout(op_timeout, async {
                        let c = Conn::open(&url).await.map_err(|e| classify(&e, None))?;
                        simple_value(&c.client, "SELECT 1")
                            .await
                            .map_err(|e| classify(&e, Some(&c.ended)))
                    })
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure {
                            class: "timeout".into(),
                            detail: format!("no answer within {op_timeout:?}"),
                        })
                    });
                    (started.elapsed(), r)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    });
    for (took, r) in &results {
        println!("  client through pgmux while full: {took:?} {r:?}");
    }
    for (took, r) in &results {
        let f = r
            .as_ref()
            .expect_err("a query succeeded although PostgreSQL had no free slot");
        assert!(
            matches!(f.class.as_str(), "53300" | "57014" | "08006" | "08004"),
            "unclear error while PostgreSQL is full: {f:?}"
        );
        // PostgreSQL's own message ("too many clients already", or "remaining
        // connection slots are reserved ..." once only superuser slots are left).
        assert!(
            f.detail.contains("too many") || f.detail.contains("connection slots"),
            "the error does not name the cause (PostgreSQL is full): {f:?}"
        );
        assert!(
            *took <= query_wait + Duration::from_secs(3),
            "the error took {took:?} (query_wait_timeout {query_wait:?})"
        );
    }

    // A client waiting when the slots are given back is served.
    let mut load = Load::start(
        &rt,
        CLIENTS,
        &url,
        Work::Txn,
        op_timeout,
        Duration::from_millis(5),
    );
    std::thread::sleep(Duration::from_millis(500));
    let release_at = Instant::now();
    drop(hogs);
    let recovered = load.record.wait_all_succeed_since(
        CLIENTS,
        release_at,
        Duration::from_secs(15),
        "after the release",
    );
    std::thread::sleep(Duration::from_millis(1000));
    load.stop(&rt, op_timeout);
    println!(
        "  {} clients got errors within {:?}; after the release every client succeeded within {recovered:?}",
        results.len(),
        results.iter().map(|r| r.0).max().unwrap_or_default()
    );
    println!("  load across the release: {}", load.record.summary());
    // Failures of the load: only the clear "full" error, only before the release.
    assert_failures(
        &load.record,
        |c| matches!(c, "53300" | "57014" | "08006" | "08004"),
        full_at,
        release_at + Duration::from_secs(1),
        "release",
    );
    support::settled_without_leaks(&px, node, node.port, &db.user, POOL, fds_at_start);
    wait_for(
        "the hog's connections to end",
        Duration::from_secs(10),
        || (node.backend_count(&hog) == 0).then_some(()),
    );
    assert_no_panic(&px);
}
