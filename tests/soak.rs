//! Soak (issue 10): a mixed workload with churn runs through pgmux (pool_size 5) for a
//! while; every second pgmux's RSS, open file descriptors and server count, and
//! PostgreSQL's backend count for the test user, are sampled and printed as a table.
//!
//! * 20 long-lived clients: simple-protocol transactions, tokio-postgres prepared
//!   statements (some dropped again), extended-protocol transactions, deliberate
//!   division by zero inside a transaction followed by ROLLBACK, `SET application_name` /
//!   `SET TimeZone` checked by the next query.
//! * churn: ~10 connects a second, each 1–3 queries; a quarter vanish without Terminate
//!   (idle, idle in a transaction, or in the middle of a query).
//! * a cancel every ~1 s: `SELECT pg_sleep(5)` cancelled after 100 ms (57014).
//!
//! Checks: no task panicked and no error other than the deliberate ones; pgmux never has
//! more than pool_size servers; after the workload pgmux's servers are exactly
//! PostgreSQL's backends of the user, all `idle`; RSS is flat (last third vs second third
//! of the samples); pgmux's fds not accounted for by servers are back where they started.
//!
//! `soak_short_is_flat` (20 s) runs with the suite; `soak_long` is the report:
//! `PGMUX_SOAK_SECS=600 cargo test --test soak -- --ignored soak_long --nocapture`.

mod support;

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Rng, TestDb};
use tokio::task::JoinSet;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

const POOL_SIZE: usize = 5;
const LONG_CLIENTS: usize = 20;
const ROWS: i32 = 50;
/// Churn connects per second.
const CHURN_PER_SEC: u64 = 10;

/// RSS growth allowed between the second and the last third of the samples: the larger
/// of this many KiB and [`RSS_GROWTH_PCT`] percent of the second third's median.
const RSS_GROWTH_KIB: u64 = 2048;
const RSS_GROWTH_PCT: u64 = 10;
/// pgmux fds not accounted for by its servers may differ from before the workload by
/// at most this many (an admin HTTP connection being accepted or closed, a server
/// socket being closed between two reads of /proc).
const FD_SLACK: i64 = 2;

/// What the workload did, and what went wrong.
#[derive(Default)]
struct Stats {
    transactions: AtomicU64,
    prepared_queries: AtomicU64,
    division_errors: AtomicU64,
    settings_checked: AtomicU64,
    cancels: AtomicU64,
    cancel_requests: AtomicU64,
    churn_connects: AtomicU64,
    abrupt_drops: AtomicU64,
    unexpected: Mutex<Vec<String>>,
    unexpected_count: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn unexpected(&self, what: String) {
        self.unexpected_count.fetch_add(1, Ordering::Relaxed);
        let mut v = self.unexpected.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < 30 {
            v.push(what);
        }
    }

    fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "transactions {}, prepared queries {}, division errors {}, settings checked {}, \
             cancels {} ({} cancel requests), churn connects {} ({} abrupt), unexpected errors {}",
            g(&self.transactions),
            g(&self.prepared_queries),
            g(&self.division_errors),
            g(&self.settings_checked),
            g(&self.cancels),
            g(&self.cancel_requests),
            g(&self.churn_connects),
            g(&self.abrupt_drops),
            g(&self.unexpected_count),
        )
    }
}

fn err(e: tokio_postgres::Error) -> String {
    match e.code() {
        Some(code) => format!("{} ({e})", code.code()),
        None => format!("{e} ({e:?})"),
    }
}

/// A tokio-postgres connection whose connection task the caller keeps, so that it can
/// vanish without Terminate by aborting it.
async fn open(url: &str) -> Result<(Client, tokio::task::JoinHandle<()>), String> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("connect: {}", err(e)))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client, task))
}

/// The first column of the first row of a simple query.
async fn simple_value(client: &Client, sql: &str) -> Result<String, String> {
    let msgs = client.simple_query(sql).await.map_err(err)?;
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_owned()),
            _ => None,
        })
        .ok_or_else(|| format!("{sql}: no row"))
}

/// BEGIN; UPDATE; SELECT; COMMIT as four simple queries.
async fn simple_txn(client: &Client, rng: &mut Rng) -> Result<(), String> {
    let id = 1 + rng.below(ROWS as u64);
    client.simple_query("BEGIN").await.map_err(err)?;
    client
        .simple_query(&format!("UPDATE soak SET n = n + 1 WHERE id = {id}"))
        .await
        .map_err(err)?;
    let n = simple_value(client, &format!("SELECT n FROM soak WHERE id = {id}")).await?;
    if n.parse::<i64>().map_or(true, |n| n < 1) {
        return Err(format!("row {id}: n = {n:?} after an UPDATE"));
    }
    client.simple_query("COMMIT").await.map_err(err)?;
    Ok(())
}

/// A prepared statement (one of 30 texts, cached per client, sometimes dropped so that
/// tokio-postgres closes it), then a query with it.
async fn prepared(
    client: &Client,
    rng: &mut Rng,
    cache: &mut Vec<(u64, Statement)>,
) -> Result<(), String> {
    let variant = rng.below(30);
    let stmt = match cache.iter().find(|(v, _)| *v == variant) {
        Some((_, s)) => s.clone(),
        None => {
            let sql = format!("SELECT id, n, {variant}::bigint AS v FROM soak WHERE id = $1");
            let s = client.prepare(&sql).await.map_err(err)?;
            cache.push((variant, s.clone()));
            s
        }
    };
    let id = 1 + rng.below(ROWS as u64) as i32;
    let rows = client.query(&stmt, &[&id]).await.map_err(err)?;
    let ok = rows.len() == 1
        && rows[0].get::<_, i32>(0) == id
        && rows[0].get::<_, i64>(2) == variant as i64;
    if !ok {
        return Err(format!(
            "prepared variant {variant}, id {id}: wrong rows {rows:?}"
        ));
    }
    if rng.below(4) == 0 {
        cache.retain(|(v, _)| *v != variant);
    }
    Ok(())
}

/// An extended-protocol transaction (tokio-postgres prepares and closes the unnamed
/// statements of `execute`/`query_one` itself).
async fn extended_txn(client: &mut Client, rng: &mut Rng) -> Result<(), String> {
    let id = 1 + rng.below(ROWS as u64) as i32;
    let tx = client.transaction().await.map_err(err)?;
    tx.execute("UPDATE soak SET n = n + 1 WHERE id = $1", &[&id])
        .await
        .map_err(err)?;
    let row = tx
        .query_one("SELECT n FROM soak WHERE id = $1", &[&id])
        .await
        .map_err(err)?;
    if row.get::<_, i64>(0) < 1 {
        return Err(format!("row {id}: n < 1 after an UPDATE"));
    }
    tx.commit().await.map_err(err)?;
    Ok(())
}

/// Division by zero inside a transaction (simple or extended protocol), then ROLLBACK.
async fn division(client: &Client, rng: &mut Rng, stats: &Stats) -> Result<(), String> {
    client.simple_query("BEGIN").await.map_err(err)?;
    client
        .simple_query("UPDATE soak SET n = n + 1 WHERE id = 1")
        .await
        .map_err(err)?;
    let r = if rng.below(2) == 0 {
        client.simple_query("SELECT 1/0").await.map(|_| ())
    } else {
        client.query("SELECT 1/$1::int", &[&0i32]).await.map(|_| ())
    };
    match r {
        Err(e) if e.code() == Some(&SqlState::DIVISION_BY_ZERO) => {
            Stats::add(&stats.division_errors)
        }
        Err(e) => return Err(format!("1/0: {}", err(e))),
        Ok(()) => return Err("1/0 succeeded".into()),
    }
    client.simple_query("ROLLBACK").await.map_err(err)?;
    Ok(())
}

/// `SET application_name` or `SET TimeZone` outside a transaction, then a query (which
/// may run on another server) must see it.
async fn set_and_check(client: &Client, id: usize, n: u64, rng: &mut Rng) -> Result<(), String> {
    let (param, value) = if rng.below(2) == 0 {
        ("application_name", format!("soak_{id}_{n}"))
    } else {
        let zones = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"];
        (
            "TimeZone",
            zones[rng.below(zones.len() as u64) as usize].to_owned(),
        )
    };
    client
        .simple_query(&format!("SET {param} = '{value}'"))
        .await
        .map_err(err)?;
    let got: String = if rng.below(2) == 0 {
        simple_value(client, &format!("SHOW {param}")).await?
    } else {
        client
            .query_one("SELECT current_setting($1)", &[&param])
            .await
            .map_err(err)?
            .get(0)
    };
    if got != value {
        return Err(format!(
            "SET {param} = '{value}', then the session has {got:?}"
        ));
    }
    Ok(())
}

async fn long_client(id: usize, url: String, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    let mut rng = Rng::new(id as u64 + 1);
    let (mut client, _task) = open(&url)
        .await
        .unwrap_or_else(|e| panic!("long client {id}: {e}"));
    let mut cache = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let op = rng.below(10);
        let r = match op {
            0..=2 => simple_txn(&client, &mut rng).await,
            3..=5 => {
                let r = prepared(&client, &mut rng, &mut cache).await;
                if r.is_ok() {
                    Stats::add(&stats.prepared_queries);
                }
                r
            }
            6 | 7 => extended_txn(&mut client, &mut rng).await,
            8 => division(&client, &mut rng, &stats).await,
            _ => {
                let r = set_and_check(&client, id, n, &mut rng).await;
                if r.is_ok() {
                    Stats::add(&stats.settings_checked);
                }
                r
            }
        };
        match r {
            Ok(()) => {
                if matches!(op, 0..=2 | 6 | 7) {
                    Stats::add(&stats.transactions);
                }
            }
            Err(e) => {
                stats.unexpected(format!("long client {id}, op {op}: {e}"));
                if client.is_closed() {
                    cache.clear();
                    (client, _) = open(&url)
                        .await
                        .unwrap_or_else(|e| panic!("long client {id}: reconnect: {e}"));
                } else {
                    let _ = client.simple_query("ROLLBACK").await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5 + rng.below(20))).await;
    }
}

/// One churn connection: 1–3 queries and a clean close, or (a quarter of them) vanish
/// without Terminate: idle, idle in a transaction, or while a query runs.
async fn churn(n: u64, url: String, stats: Arc<Stats>) -> Result<(), String> {
    let mut rng = Rng::new(1_000_000 + n);
    let (client, task) = open(&url).await?;
    Stats::add(&stats.churn_connects);
    if rng.below(4) == 0 {
        let id = 1 + rng.below(ROWS as u64);
        match rng.below(3) {
            0 => {
                client.simple_query("BEGIN").await.map_err(err)?;
                client
                    .simple_query(&format!("UPDATE soak SET n = n + 1 WHERE id = {id}"))
                    .await
                    .map_err(err)?;
            }
            1 => {
                if rng.below(2) == 0 {
                    client.simple_query("BEGIN").await.map_err(err)?;
                }
                // The query is sent; give up on it after 50 ms (it runs 500 ms).
                let q = client.simple_query("SELECT pg_sleep(0.5)");
                if let Ok(r) = tokio::time::timeout(Duration::from_millis(50), q).await {
                    r.map_err(err)?;
                }
            }
            _ => {
                client.simple_query("SELECT 1").await.map_err(err)?;
            }
        }
        // Drops the socket: no Terminate.
        task.abort();
        let _ = task.await;
        drop(client);
        Stats::add(&stats.abrupt_drops);
        return Ok(());
    }
    for i in 0..1 + rng.below(3) {
        if i % 2 == 0 {
            simple_value(&client, "SELECT count(*) FROM soak").await?;
        } else {
            let v: i32 = client
                .query_one("SELECT $1::int + 1", &[&(i as i32)])
                .await
                .map_err(err)?
                .get(0);
            if v != i as i32 + 1 {
                return Err(format!("SELECT {i} + 1 gave {v}"));
            }
        }
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

async fn churner(url: String, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / CHURN_PER_SEC));
    let mut n = 0u64;
    let reap = |r: Result<Result<(), String>, tokio::task::JoinError>, stats: &Stats| match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => stats.unexpected(format!("churn client: {e}")),
        Err(e) => stats.unexpected(format!("churn client task: {e}")),
    };
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        tasks.spawn(churn(n, url.clone(), stats.clone()));
        while let Some(r) = tasks.try_join_next() {
            reap(r, &stats);
        }
    }
    while let Some(r) = tasks.join_next().await {
        reap(r, &stats);
    }
}

/// `SELECT pg_sleep(5)`, cancelled after ~100 ms. pgmux forwards a cancel only while
/// the client holds a server, so the cancel is repeated every 500 ms until the query
/// ends (it can still be waiting for a server when the first one arrives).
async fn canceller(url: String, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    let mut rng = Rng::new(7);
    let (client, _task) = open(&url)
        .await
        .unwrap_or_else(|e| panic!("cancel client: {e}"));
    let client = Arc::new(client);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1000))).await;
        let token = client.cancel_token();
        let c = client.clone();
        let mut q = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(5)").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let result = loop {
            Stats::add(&stats.cancel_requests);
            if let Err(e) = token.cancel_query(NoTls).await {
                stats.unexpected(format!("cancel request: {}", err(e)));
            }
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), &mut q).await {
                break r.expect("pg_sleep task panicked");
            }
        };
        match result {
            Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => Stats::add(&stats.cancels),
            Err(e) => stats.unexpected(format!("cancelled pg_sleep(5): {}", err(e))),
            Ok(_) => stats.unexpected("pg_sleep(5) was not cancelled".into()),
        }
    }
}

#[derive(Clone, Debug)]
struct Sample {
    secs: f64,
    rss_kib: u64,
    fds: i64,
    /// pgmux's servers: active + idle + connecting over every pool.
    servers: usize,
    server_active: usize,
    /// pgmux's clients (active + waiting).
    clients: usize,
    /// PostgreSQL's backends of the test user, and how many of them are not `idle`.
    backends: usize,
    backends_busy: usize,
}

struct Sampler<'a> {
    db: &'a TestDb,
    pid: u32,
    pools_url: String,
    agent: ureq::Agent,
    start: Instant,
}

impl Sampler<'_> {
    fn rss_kib(&self) -> u64 {
        support::proc_status_kib(self.pid, "VmRSS")
    }

    fn fds(&self) -> i64 {
        fs::read_dir(format!("/proc/{}/fd", self.pid))
            .unwrap_or_else(|e| panic!("read /proc/{}/fd: {e}", self.pid))
            .count() as i64
    }

    /// (servers, active servers, clients) over pgmux's pools.
    fn pools(&self) -> (usize, usize, usize, Value) {
        let body = self
            .agent
            .get(&self.pools_url)
            .call()
            .unwrap_or_else(|e| panic!("GET {}: {e}", self.pools_url))
            .into_body()
            .read_to_string()
            .expect("pools body");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        let n = |x: &Value| x.as_u64().unwrap_or_else(|| panic!("not a number in {v}")) as usize;
        let (mut servers, mut active, mut clients) = (0, 0, 0);
        for p in v["pools"]
            .as_array()
            .unwrap_or_else(|| panic!("no pools: {v}"))
        {
            let s = &p["servers"];
            servers += n(&s["active"]) + n(&s["idle"]) + n(&s["connecting"]);
            active += n(&s["active"]);
            clients += n(&p["clients"]["active"]) + n(&p["clients"]["waiting"]);
        }
        (servers, active, clients, v)
    }

    /// (backends, backends not idle, their states and queries) of the test user.
    fn backends(&self) -> (usize, usize, String) {
        let out = self.db.psql(&format!(
            "SELECT count(*), count(*) FILTER (WHERE state IS DISTINCT FROM 'idle'), \
             coalesce(string_agg(pid || ' ' || coalesce(state, '?') || ' ' || left(query, 40), '; '), '') \
             FROM pg_stat_activity WHERE usename = {}",
            support::quote_literal(&self.db.user)
        ));
        let mut parts = out.splitn(3, '|');
        let mut num = || parts.next().and_then(|s| s.trim().parse().ok());
        let total = num().unwrap_or_else(|| panic!("pg_stat_activity: {out:?}"));
        let busy = num().unwrap_or_else(|| panic!("pg_stat_activity: {out:?}"));
        let detail = out.splitn(3, '|').nth(2).unwrap_or("").to_owned();
        (total, busy, detail)
    }

    /// The server and client churn counters of /metrics (for the report).
    fn churn_metrics(&self, text: &str) -> String {
        text.lines()
            .filter(|l| {
                [
                    "pgmux_server_connections_",
                    "pgmux_server_connect_errors_total",
                    "pgmux_server_closes_total",
                    "pgmux_client_disconnects_total",
                    "pgmux_errors_total",
                    "pgmux_prepared_statements_",
                ]
                .iter()
                .any(|m| l.starts_with(m))
                    && !l.ends_with(" 0")
            })
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn metrics(&self) -> String {
        let url = self.pools_url.replace("/api/v1/pools", "/metrics");
        self.agent
            .get(&url)
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .into_body()
            .read_to_string()
            .expect("metrics body")
    }

    fn sample(&self) -> Sample {
        let secs = self.start.elapsed().as_secs_f64();
        let rss_kib = self.rss_kib();
        // The admin request first: its keep-alive connection (if any) is then open at
        // every fd count alike.
        let (servers, server_active, clients, _) = self.pools();
        let fds = self.fds();
        let (backends, backends_busy, _) = self.backends();
        Sample {
            secs,
            rss_kib,
            fds,
            servers,
            server_active,
            clients,
            backends,
            backends_busy,
        }
    }
}

fn print_row(label: &str, s: &Sample) {
    println!(
        "{label:>6} {:>7.1} {:>9} {:>5} {:>8} {:>7} {:>8} {:>9} {:>8}",
        s.secs,
        s.rss_kib,
        s.fds,
        s.servers,
        s.server_active,
        s.clients,
        s.backends,
        s.backends_busy
    );
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Runs the workload for `duration` and checks it (see the module comment).
fn soak(duration: Duration) {
    support::raise_fd_limit();
    let db = TestDb::new("soak");
    db.setup(&format!(
        "CREATE TABLE soak (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0); \
         INSERT INTO soak (id) SELECT generate_series(1, {ROWS});"
    ));
    let pool_size = POOL_SIZE.to_string();
    let px = db.pgmux_env(
        &["--pool-size", &pool_size],
        &[("PGMUX_QUERY_WAIT_TIMEOUT", "30s")],
    );
    let url = db.url(&px);
    let sampler = Sampler {
        db: &db,
        pid: px.pid(),
        pools_url: format!("{}/api/v1/pools", px.admin_url()),
        agent: ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into(),
        start: Instant::now(),
    };
    let before = sampler.sample();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    println!(
        "soak: {} s, {LONG_CLIENTS} long clients, {CHURN_PER_SEC} connects/s, pool_size {POOL_SIZE}, pgmux pid {}",
        duration.as_secs(),
        px.pid()
    );
    println!(
        "{:>6} {:>7} {:>9} {:>5} {:>8} {:>7} {:>8} {:>9} {:>8}",
        "", "t (s)", "RSS (KiB)", "fds", "servers", "active", "clients", "backends", "pg busy"
    );
    print_row("before", &before);

    let workload_done = AtomicBool::new(false);
    let samples: Vec<Sample> = std::thread::scope(|scope| {
        let sampling = scope.spawn(|| {
            let mut samples = Vec::new();
            let mut next = Instant::now() + Duration::from_secs(1);
            while !workload_done.load(Ordering::Relaxed) {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                next += Duration::from_secs(1);
                if workload_done.load(Ordering::Relaxed) {
                    break;
                }
                let s = sampler.sample();
                print_row("", &s);
                samples.push(s);
            }
            samples
        });
        // Stops the sampler even if the workload panics (the scope waits for it).
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let done = Done(&workload_done);
        rt.block_on(async {
            let mut tasks = Vec::new();
            for id in 0..LONG_CLIENTS {
                tasks.push((
                    format!("long client {id}"),
                    tokio::spawn(long_client(id, url.clone(), stop.clone(), stats.clone())),
                ));
            }
            tasks.push((
                "churn".into(),
                tokio::spawn(churner(url.clone(), stop.clone(), stats.clone())),
            ));
            tasks.push((
                "cancel".into(),
                tokio::spawn(canceller(url.clone(), stop.clone(), stats.clone())),
            ));
            tokio::time::sleep(duration).await;
            stop.store(true, Ordering::Relaxed);
            for (name, task) in tasks {
                match tokio::time::timeout(Duration::from_secs(30), task).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("{name} panicked: {e}"),
                    Err(_) => panic!("{name} did not stop within 30 s"),
                }
            }
        });
        drop(done);
        sampling.join().expect("sampler thread panicked")
    });
    drop(rt);
    println!("workload: {}", stats.summary());

    // Settle: every client is gone; pgmux's servers must be PostgreSQL's backends of the
    // user, all idle.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let s = sampler.sample();
        let settled = s.clients == 0
            && s.server_active == 0
            && s.servers == s.backends
            && s.backends_busy == 0;
        if settled {
            break s;
        }
        if Instant::now() >= deadline {
            print_row("after", &s);
            let (_, _, _, pools) = sampler.pools();
            let (_, _, detail) = sampler.backends();
            panic!(
                "pgmux did not settle within 10 s after the workload: {s:?}\n\
                 pools: {pools}\nbackends: {detail}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    print_row("after", &after);
    let metrics = sampler.metrics();
    println!("pgmux counters:\n{}", sampler.churn_metrics(&metrics));
    // pgmux's own bookkeeping: servers opened - closed = servers it has.
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let opened = counter("pgmux_server_connections_opened_total");
    let closed = counter("pgmux_server_connections_closed_total");
    assert_eq!(
        opened.checked_sub(closed),
        Some(after.servers as u64),
        "pgmux opened {opened} servers and closed {closed}, but has {}",
        after.servers
    );

    let unexpected = stats.unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "{} unexpected errors, e.g.:\n{}",
        stats.unexpected_count.load(Ordering::Relaxed),
        unexpected.join("\n")
    );
    assert!(
        stats.cancels.load(Ordering::Relaxed) > 0,
        "no query was cancelled"
    );
    assert!(
        stats.abrupt_drops.load(Ordering::Relaxed) > 0,
        "no abrupt drop"
    );
    assert!(
        samples.len() >= 9,
        "only {} samples in {} s",
        samples.len(),
        duration.as_secs()
    );

    let most = samples.iter().map(|s| s.servers).max().unwrap_or(0);
    let most_backends = samples.iter().map(|s| s.backends).max().unwrap_or(0);
    println!("max servers {most} (pgmux), {most_backends} (PostgreSQL backends)");
    assert!(
        most <= POOL_SIZE,
        "pgmux had {most} servers, pool_size is {POOL_SIZE}"
    );
    // A server pgmux closed (its client vanished mid-query) may still be a backend for a
    // few milliseconds after its replacement logged in: one more is tolerated.
    assert!(
        most_backends <= POOL_SIZE + 1,
        "PostgreSQL had {most_backends} backends of the user, pool_size is {POOL_SIZE}"
    );

    let third = samples.len() / 3;
    let rss = |range: &[Sample]| median(range.iter().map(|s| s.rss_kib).collect());
    let (first, second, last) = (
        rss(&samples[..third]),
        rss(&samples[third..2 * third]),
        rss(&samples[2 * third..]),
    );
    let allowed = RSS_GROWTH_KIB.max(second * RSS_GROWTH_PCT / 100);
    println!(
        "RSS medians (KiB): first third {first}, second {second}, last {last}; growth {} (allowed {allowed})",
        last as i64 - second as i64
    );
    let fds_before = before.fds - before.servers as i64;
    let fds_after = after.fds - after.servers as i64;
    println!(
        "fds: before {} ({} servers), after {} ({} servers); max during {}",
        before.fds,
        before.servers,
        after.fds,
        after.servers,
        samples.iter().map(|s| s.fds).max().unwrap_or(0)
    );
    assert!(
        last <= second + allowed,
        "pgmux RSS grew from {second} KiB (median of the second third) to {last} KiB (last third); allowed {allowed} KiB"
    );
    assert!(
        (fds_after - fds_before).abs() <= FD_SLACK,
        "pgmux fds besides servers: {fds_before} before the workload, {fds_after} after"
    );
}

#[test]
fn soak_short_is_flat() {
    soak(Duration::from_secs(20));
}

#[test]
#[ignore = "long soak: PGMUX_SOAK_SECS=600 cargo test --test soak -- --ignored soak_long --nocapture"]
fn soak_long() {
    let secs = std::env::var("PGMUX_SOAK_SECS")
        .ok()
        .map(|s| s.parse().expect("PGMUX_SOAK_SECS: seconds"))
        .unwrap_or(300);
    soak(Duration::from_secs(secs));
}
