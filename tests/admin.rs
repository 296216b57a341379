//! The admin surface end to end: the real pgmux binary in front of a real PostgreSQL,
//! driven by tokio-postgres clients, psql and the admin HTTP API (ureq).
//!
//! Covered, each as an operator would check it:
//! * the JSON snapshots (`/api/v1/pools`, `clients`, `servers`, `databases`, `stats`,
//!   `config`) against what the clients are doing and what `pg_stat_activity` shows;
//! * live limits (`PATCH /api/v1/pools/{db}/{user}`, `min_pool_size`) under load, and
//!   the validation of bad changes (400 naming the field, nothing changed, 404);
//! * the bearer-token rules (mutations, `protect_reads`, open probes);
//! * `/metrics` as Prometheus text: counters, gauges, real histograms;
//! * the PgBouncer-compatible SQL console (column lists of PgBouncer 1.18, stats vs
//!   admin users, `SET` going through the same path as the HTTP API);
//! * pause/resume, reconnect, kill, reload (HTTP and SIGHUP), readiness while draining;
//! * `pgmux top --frames`.
//!
//! Nothing here asserts timings; whatever settles asynchronously is polled with a
//! deadline.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    connect, describe_output, free_port, pg_tool, pg_url, quote_literal, run_with_timeout,
    try_connect, Pgmux, RawConn, TestDb,
};
use tokio_postgres::{Client, SimpleQueryMessage};

/// How long anything that settles asynchronously may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// A token long enough for `admin.token` (at least 16 characters).
const TOKEN: &str = "admin-test-token-0123456789";

// ---------------------------------------------------------------------------------------
// Helpers

/// Runs blocking work (HTTP, psql) from an async test without stalling the runtime's
/// other tasks (multi-thread runtimes only; elsewhere it just runs `f`).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// An HTTP answer.
#[derive(Debug)]
struct Resp {
    status: u16,
    body: String,
    www_authenticate: Option<String>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// A client of one pgmux's admin HTTP API. 4xx/5xx are answers, not errors.
struct Admin {
    base: String,
    agent: ureq::Agent,
}

fn with_token<B>(r: ureq::RequestBuilder<B>, token: Option<&str>) -> ureq::RequestBuilder<B> {
    match token {
        Some(t) => r.header("Authorization", format!("Bearer {t}")),
        None => r,
    }
}

impl Admin {
    /// A client of `px`'s admin API (pgmux binds it before the client port, so it is
    /// up once `Pgmux::start` returns).
    fn new(px: &Pgmux) -> Admin {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A pause may wait (its own timeout is 30 s by default).
            .timeout_global(Some(Duration::from_secs(40)))
            .build()
            .into();
        Admin {
            base: px.admin_url(),
            agent,
        }
    }

    /// One request, with `Authorization: Bearer <token>` when a token is given.
    fn send_as(&self, method: &str, path: &str, body: Option<&str>, token: Option<&str>) -> Resp {
        let url = format!("{}{path}", self.base);
        blocking(|| {
            let a = &self.agent;
            let result = match method {
                "GET" => with_token(a.get(&url), token).call(),
                "POST" | "PATCH" => {
                    let r = if method == "POST" {
                        a.post(&url)
                    } else {
                        a.patch(&url)
                    };
                    let r = with_token(r, token);
                    match body {
                        Some(b) => r.header("Content-Type", "application/json").send(b),
                        None => r.send_empty(),
                    }
                }
                other => panic!("unsupported method {other}"),
            };
            let mut resp = result.unwrap_or_else(|e| panic!("{method} {url}: request failed: {e}"));
            let status = resp.status().as_u16();
            let www_authenticate = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp
                .body_mut()
                .read_to_string()
                .unwrap_or_else(|e| panic!("{method} {url}: reading the body: {e}"));
            Resp {
                status,
                body,
                www_authenticate,
            }
        })
    }

    /// One request without a token.
    fn send(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        self.send_as(method, path, body, None)
    }

    /// GET, expecting 200 and JSON.
    fn get(&self, path: &str) -> Value {
        let r = self.send("GET", path, None);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    /// GET, expecting 200, as text.
    fn get_text(&self, path: &str) -> String {
        let r = self.send("GET", path, None);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.body
    }

    fn post(&self, path: &str) -> Resp {
        self.send("POST", path, None)
    }

    fn patch(&self, path: &str, body: &str) -> Resp {
        self.send("PATCH", path, Some(body))
    }

    /// The primary pool of (database, user), or None before its first login.
    fn try_pool(&self, database: &str, user: &str) -> Option<Value> {
        let v = self.get("/api/v1/pools");
        v["pools"]
            .as_array()
            .unwrap_or_else(|| panic!("pools is not an array: {v}"))
            .iter()
            .find(|p| p["database"] == database && p["user"] == user && p["role"] == "primary")
            .cloned()
    }

    fn pool(&self, database: &str, user: &str) -> Value {
        self.try_pool(database, user).unwrap_or_else(|| {
            panic!(
                "no primary pool {database}/{user} in {}",
                self.get("/api/v1/pools")
            )
        })
    }

    /// `config.KEY` of GET /api/v1/config.
    fn config_value(&self, key: &str) -> String {
        let v = self.get("/api/v1/config");
        v["config"][key]
            .as_str()
            .unwrap_or_else(|| panic!("no config.{key} in {v}"))
            .to_string()
    }
}

/// Polls `f` (blocking work allowed) until it returns Ok, for up to `timeout`; panics
/// with `what` and the last Err otherwise.
async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match blocking(&mut f) {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: not reached within {timeout:?}; last: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Client backends of the test user on the primary (pg_stat_activity).
fn backends(db: &TestDb) -> i64 {
    blocking(|| db.cluster.primary().backend_count(&db.user))
}

/// The pids of the test user's client backends on the primary.
fn backend_pids(db: &TestDb) -> BTreeSet<i64> {
    let out = blocking(|| {
        db.psql(&format!(
            "SELECT pid FROM pg_stat_activity \
             WHERE usename = {} AND backend_type = 'client backend';",
            quote_literal(&db.user)
        ))
    });
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|e| panic!("pid {l:?}: {e}"))
        })
        .collect()
}

/// `code: message` of a tokio-postgres error.
fn describe_err(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => format!("{e} ({e:?})"),
    }
}

/// The SQLSTATE of a tokio-postgres error ("" when it is not a server error).
fn sqlstate(e: &tokio_postgres::Error) -> &str {
    e.code().map(|c| c.code()).unwrap_or("")
}

/// Rows of a simple query as (column, value) maps; panics on error.
async fn rows(c: &Client, sql: &str) -> Vec<BTreeMap<String, Option<String>>> {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_err(&e)));
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_owned(), r.get(i).map(str::to_owned)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The first column of the first row of a simple query.
async fn scalar(c: &Client, sql: &str) -> String {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_err(&e)));
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

/// Runs the pgmux binary with `args` (PGMUX_* and DATABASE_URL not inherited).
fn pgmux_cli(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgmux"));
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("PGMUX_") || k == "DATABASE_URL" || k == "READ_DATABASE_URL" {
                cmd.env_remove(k);
            }
        }
    }
    cmd.args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(20))
}

// ---------------------------------------------------------------------------------------
// 1. Snapshots

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pools_clients_servers_reflect_what_clients_do() {
    const CLIENTS: usize = 30;
    const POOL: usize = 10;
    let db = TestDb::new("adm_snap");
    let px = db.pgmux(&["--pool-size", "10"]);
    let admin = Admin::new(&px);
    let url = format!("{}?application_name=snapshot_test", db.url(&px));

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Arc::new(connect(&url).await));
    }
    // Every client opens a transaction and holds it until released: POOL of them get a
    // server, the others wait for one.
    let (release, released) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for c in &clients {
        let c = c.clone();
        let mut released = released.clone();
        tasks.push(tokio::spawn(async move {
            c.simple_query("BEGIN").await?;
            c.simple_query("SELECT 1").await?;
            let _ = released.wait_for(|r| *r).await;
            c.simple_query("COMMIT").await?;
            Ok::<(), tokio_postgres::Error>(())
        }));
    }

    let pool = wait_for("10 servers active, 20 clients waiting", DEADLINE, || {
        let p = admin.pool(&db.db, &db.user);
        if p["servers"]["active"] == POOL && p["clients"]["waiting"] == CLIENTS - POOL {
            Ok(p)
        } else {
            Err(p.to_string())
        }
    })
    .await;
    assert_eq!(pool["limits"]["pool_size"], POOL, "{pool}");
    assert_eq!(pool["servers"]["idle"], 0, "{pool}");
    assert_eq!(pool["servers"]["connecting"], 0, "{pool}");
    assert_eq!(pool["clients"]["active"], POOL, "{pool}");
    assert_eq!(pool["paused"], false, "{pool}");
    assert_eq!(pool["pool_mode"], "transaction", "{pool}");
    assert!(u64_of(&pool["max_wait_us"]) > 0, "{pool}");

    // What PostgreSQL sees: exactly the pool's servers.
    let pg_pids = backend_pids(&db);
    assert_eq!(pg_pids.len(), POOL, "pg_stat_activity: {pg_pids:?}");

    let v = admin.get("/api/v1/clients");
    let ours: Vec<&Value> = v["clients"]
        .as_array()
        .expect("clients array")
        .iter()
        .filter(|c| c["database"] == db.db.as_str())
        .collect();
    assert_eq!(ours.len(), CLIENTS, "{v}");
    let local = format!("127.0.0.1:{}", px.port());
    assert!(
        ours.iter().all(|c| c["user"] == db.user.as_str()
            && c["application_name"] == "snapshot_test"
            && c["local_addr"] == local.as_str()),
        "{v}"
    );
    let active: Vec<&&Value> = ours.iter().filter(|c| c["state"] == "active").collect();
    let waiting: Vec<&&Value> = ours.iter().filter(|c| c["state"] == "waiting").collect();
    assert_eq!((active.len(), waiting.len()), (POOL, CLIENTS - POOL), "{v}");
    let client_server_pids: BTreeSet<i64> = active
        .iter()
        .map(|c| {
            c["server_pid"]
                .as_i64()
                .unwrap_or_else(|| panic!("active client without server_pid: {c}"))
        })
        .collect();
    assert_eq!(
        client_server_pids, pg_pids,
        "clients' server_pid vs pg_stat_activity"
    );
    for c in &waiting {
        assert!(
            c["server_pid"].is_null(),
            "waiting client with a server: {c}"
        );
        assert!(
            u64_of(&c["wait_us"]) > 0,
            "waiting client without wait: {c}"
        );
    }

    let v = admin.get("/api/v1/servers");
    let servers: Vec<&Value> = v["servers"]
        .as_array()
        .expect("servers array")
        .iter()
        .filter(|s| s["database"] == db.db.as_str())
        .collect();
    assert_eq!(servers.len(), POOL, "{v}");
    assert!(servers.iter().all(|s| s["state"] == "active"), "{v}");
    assert!(servers.iter().all(|s| s["role"] == "primary"), "{v}");
    let server_pids: BTreeSet<i64> = servers
        .iter()
        .map(|s| s["backend_pid"].as_i64().expect("backend_pid"))
        .collect();
    assert_eq!(
        server_pids, pg_pids,
        "servers' backend_pid vs pg_stat_activity"
    );
    // Links agree both ways.
    for c in &active {
        let s = servers
            .iter()
            .find(|s| s["id"] == c["server_id"])
            .unwrap_or_else(|| panic!("client {c} linked to an unlisted server: {v}"));
        assert_eq!(s["client_id"], c["id"], "{s} vs {c}");
        assert_eq!(s["backend_pid"], c["server_pid"], "{s} vs {c}");
    }

    let v = admin.get("/api/v1/databases");
    let d = v["databases"]
        .as_array()
        .expect("databases array")
        .iter()
        .find(|d| d["name"] == db.db.as_str())
        .unwrap_or_else(|| panic!("no database {} in {v}", db.db));
    assert_eq!(d["port"], db.cluster.primary().port, "{d}");
    assert_eq!(d["dbname"], db.db.as_str(), "{d}");
    assert_eq!(d["pool_size"], POOL, "{d}");
    assert_eq!(d["current_connections"], POOL, "{d}");
    assert_eq!(d["paused"], false, "{d}");

    let stats = admin.get("/api/v1/stats");
    assert_eq!(stats["clients"], CLIENTS, "{stats}");
    assert_eq!(stats["draining"], false, "{stats}");
    assert!(
        stats["version"].as_str().unwrap_or("").contains("pgmux"),
        "{stats}"
    );

    // The console tells the same story (the DATABASE_URL user is a stats user).
    let console = connect(&pg_url(px.port(), &db.user, &db.password, "pgbouncer")).await;
    let pools = rows(&console, "SHOW POOLS").await;
    let row = pools
        .iter()
        .find(|r| r["database"].as_deref() == Some(db.db.as_str()))
        .unwrap_or_else(|| panic!("no pool of {} in SHOW POOLS: {pools:?}", db.db));
    let col = |name: &str| row[name].clone().unwrap_or_default();
    assert_eq!(
        (
            col("cl_active"),
            col("cl_waiting"),
            col("sv_active"),
            col("sv_idle")
        ),
        (
            POOL.to_string(),
            (CLIENTS - POOL).to_string(),
            POOL.to_string(),
            "0".to_string()
        ),
        "{row:?}"
    );
    let maxwait_us: u64 = col("maxwait").parse::<u64>().expect("maxwait") * 1_000_000
        + col("maxwait_us").parse::<u64>().expect("maxwait_us");
    assert!(maxwait_us > 0, "{row:?}");
    drop(console);

    // Release: every transaction ends, the waiters get their turn.
    release.send(true).expect("release");
    for t in tasks {
        t.await
            .expect("client task")
            .unwrap_or_else(|e| panic!("client transaction failed: {}", describe_err(&e)));
    }
    let pool = wait_for("transactions counted, nobody waiting", DEADLINE, || {
        let p = admin.pool(&db.db, &db.user);
        if u64_of(&p["totals"]["transactions"]) >= CLIENTS as u64
            && p["clients"]["waiting"] == 0
            && p["servers"]["active"] == 0
        {
            Ok(p)
        } else {
            Err(p.to_string())
        }
    })
    .await;
    assert_eq!(pool["max_wait_us"], 0, "{pool}");
    assert!(u64_of(&pool["totals"]["wait_time_us"]) > 0, "{pool}");
    assert!(
        u64_of(&pool["totals"]["queries"]) >= 3 * CLIENTS as u64,
        "{pool}"
    );
    assert_eq!(pool["totals"]["errors"], 0, "{pool}");

    // The clients leave: the count drops and the disconnects are counted.
    drop(clients);
    // tokio-postgres sends Terminate when a client is dropped; the console session
    // ended the same way.
    wait_for("clients gone", DEADLINE, || {
        let s = admin.get("/api/v1/stats");
        if s["clients"] == 0 && s["disconnects"]["client_terminate"] == CLIENTS + 1 {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;

    let r = admin.send("GET", "/api/v1/config", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !r.body.contains(&db.password),
        "the password shows in GET /api/v1/config: {}",
        r.body
    );
    let v = r.json();
    assert_eq!(v["config"]["pool_size"], "10", "{v}");
    assert!(
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|i| i["key"] == "pool_size" && i["value"] == "10" && i["changeable"] == true),
        "{v}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Live pool size

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_pool_size_changes_under_load() {
    const LOAD: usize = 30;
    let db = TestDb::new("adm_live");
    let px = db.pgmux(&["--pool-size", "5"]);
    let admin = Admin::new(&px);
    let url = db.url(&px);

    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..LOAD {
        let (url, stop, commits, errors) =
            (url.clone(), stop.clone(), commits.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let c = match try_connect(&url).await {
                Ok(c) => c,
                Err(e) => {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("connect: {}", describe_err(&e)));
                    return;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                let tx = async {
                    c.simple_query("BEGIN").await?;
                    c.simple_query("SELECT pg_sleep(0.02)").await?;
                    c.simple_query("COMMIT").await?;
                    Ok::<(), tokio_postgres::Error>(())
                };
                match tx.await {
                    Ok(()) => {
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(describe_err(&e));
                        return;
                    }
                }
            }
        }));
    }
    let commits_now = || commits.load(Ordering::Relaxed);
    let base = wait_for("the load commits", DEADLINE, || match commits_now() {
        0 => Err("no commit yet".into()),
        n => Ok(n),
    })
    .await;
    assert!(backends(&db) <= 5, "more servers than pool_size 5");

    // Grow: waiting demand makes pgmux open up to the new size.
    let r = admin.patch(
        &format!("/api/v1/pools/{}/{}", db.db, db.user),
        r#"{"pool_size": 20}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["pool"]["limits"]["pool_size"], 20, "{v}");
    wait_for("20 server connections", DEADLINE, || {
        let p = admin.pool(&db.db, &db.user);
        let total = u64_of(&p["servers"]["active"])
            + u64_of(&p["servers"]["idle"])
            + u64_of(&p["servers"]["connecting"]);
        assert!(total <= 20, "more servers than pool_size 20: {p}");
        match backends(&db) {
            20 => Ok(()),
            n => Err(format!("{n} backends; pool {p}")),
        }
    })
    .await;
    let grown = commits_now();
    assert!(grown > base, "no commit while growing");

    // Shrink: idle servers close now, busy ones when their transaction ends.
    let r = admin.patch(
        &format!("/api/v1/pools/{}/{}", db.db, db.user),
        r#"{"pool_size": 5}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["pool"]["limits"]["pool_size"], 5, "{}", r.body);
    wait_for(
        "at most 5 server connections",
        DEADLINE,
        || match backends(&db) {
            n if n <= 5 => Ok(()),
            n => Err(format!("{n} backends")),
        },
    )
    .await;
    let shrunk = commits_now();
    wait_for("commits after shrinking", DEADLINE, || {
        if commits_now() > shrunk {
            Ok(())
        } else {
            Err("no commit".into())
        }
    })
    .await;
    assert!(shrunk > grown, "no commit while shrinking");

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    let errors = errors.lock().unwrap();
    assert!(errors.is_empty(), "the load saw errors: {errors:?}");
    let p = admin.pool(&db.db, &db.user);
    assert_eq!(p["limits"]["pool_size"], 5, "{p}");
    assert_eq!(p["totals"]["errors"], 0, "{p}");
    assert!(backends(&db) <= 5);
}

// ---------------------------------------------------------------------------------------
// 3. Validation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_patch_is_rejected_and_nothing_changes() {
    let db = TestDb::new("adm_bad");
    let px = db.pgmux(&["--pool-size", "5"]);
    let admin = Admin::new(&px);
    let c = connect(&db.url(&px)).await;
    scalar(&c, "SELECT 1").await;

    let path = format!("/api/v1/pools/{}/{}", db.db, db.user);
    let pool_before = admin.pool(&db.db, &db.user);
    let config_before = admin.get("/api/v1/config")["config"].clone();
    for (body, field) in [
        (r#"{"pool_size": 0}"#, "pool_size"),
        (r#"{"pool_size": "x"}"#, "pool_size"),
        (r#"{"pool_size": -3}"#, "pool_size"),
        (r#"{"pool_size": 100000}"#, "pool_size"),
        (r#"{"bogus": 1}"#, "bogus"),
        (r#"{"pool_size": 6, "bogus": 1}"#, "bogus"),
        (r#"{"pool_size": 6"#, "body"),
        ("not json", "body"),
        ("{}", "body"),
        (r#"{"min_pool_size": 50}"#, "min_pool_size"),
        (r#"{"pool_size": 2, "min_pool_size": 3}"#, "min_pool_size"),
    ] {
        let r = admin.patch(&path, body);
        assert_eq!(r.status, 400, "PATCH {body}: {}", r.body);
        let v = r.json();
        assert_eq!(v["field"], field, "PATCH {body}: {v}");
        assert!(v["error"].is_string(), "PATCH {body}: {v}");
    }
    for (body, field) in [
        (r#"{"query_wait_timeout": "soon"}"#, "query_wait_timeout"),
        (r#"{"listen": "0.0.0.0:1"}"#, "listen"),
        (r#"{"pool_size": 0}"#, "pool_size"),
        (r#"{"no_such_setting": 1}"#, "no_such_setting"),
        // All or nothing: the valid change is not applied either.
        (
            r#"{"max_client_conn": 77, "query_wait_timeout": "soon"}"#,
            "query_wait_timeout",
        ),
    ] {
        let r = admin.patch("/api/v1/config", body);
        assert_eq!(r.status, 400, "PATCH config {body}: {}", r.body);
        assert_eq!(r.json()["field"], field, "PATCH config {body}: {}", r.body);
    }

    let pool_after = admin.pool(&db.db, &db.user);
    assert_eq!(pool_after["limits"], pool_before["limits"]);
    assert_eq!(pool_after["limits"]["pool_size"], 5);
    assert_eq!(pool_after["limits"]["min_pool_size"], 0);
    assert_eq!(admin.get("/api/v1/config")["config"], config_before);

    // Pools that do not exist.
    for path in [
        format!("/api/v1/pools/no_such_db/{}", db.user),
        format!("/api/v1/pools/{}/no_such_user", db.db),
    ] {
        let r = admin.patch(&path, r#"{"pool_size": 3}"#);
        assert_eq!(r.status, 404, "PATCH {path}: {}", r.body);
        assert!(r.json()["error"].is_string(), "{}", r.body);
    }
    // The pool still works.
    assert_eq!(scalar(&c, "SELECT 2").await, "2");
}

// ---------------------------------------------------------------------------------------
// 4. Token rules

#[test]
fn token_protects_mutations() {
    let db = TestDb::new("adm_token");
    {
        let px = db.pgmux_env(&[], &[("PGMUX_ADMIN_TOKEN", TOKEN)]);
        let admin = Admin::new(&px);
        for token in [None, Some("wrong-token-0123456789"), Some("")] {
            let r = admin.send_as("POST", "/api/v1/reconnect", None, token);
            assert_eq!(r.status, 401, "token {token:?}: {}", r.body);
            assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"), "{r:?}");
            assert!(r.json()["error"].is_string(), "{}", r.body);
        }
        let r = admin.send_as("PATCH", "/api/v1/config", Some(r#"{"pool_size": 3}"#), None);
        assert_eq!(r.status, 401, "{}", r.body);
        let r = admin.send_as("POST", "/api/v1/reconnect", None, Some(TOKEN));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["ok"], true);
        // Reads are open by default, and the token is never shown.
        for path in [
            "/api/v1/pools",
            "/api/v1/stats",
            "/metrics",
            "/healthz",
            "/readyz",
        ] {
            let r = admin.send_as("GET", path, None, None);
            assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        }
        let r = admin.send_as("GET", "/api/v1/config", None, None);
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            !r.body.contains(TOKEN),
            "the token shows in the config: {}",
            r.body
        );
    }
    {
        let px = db.pgmux_env(
            &[],
            &[
                ("PGMUX_ADMIN_TOKEN", TOKEN),
                ("PGMUX_ADMIN_PROTECT_READS", "true"),
            ],
        );
        let admin = Admin::new(&px);
        for path in ["/api/v1/pools", "/api/v1/config", "/metrics"] {
            let r = admin.send_as("GET", path, None, None);
            assert_eq!(r.status, 401, "GET {path} without token: {}", r.body);
            let r = admin.send_as("GET", path, None, Some("wrong-token-0123456789"));
            assert_eq!(r.status, 401, "GET {path} with a wrong token: {}", r.body);
            let r = admin.send_as("GET", path, None, Some(TOKEN));
            assert_eq!(r.status, 200, "GET {path} with the token: {}", r.body);
        }
        for path in ["/healthz", "/readyz"] {
            let r = admin.send_as("GET", path, None, None);
            assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        }
        let r = admin.send_as("POST", "/api/v1/reconnect", None, None);
        assert_eq!(r.status, 401, "{}", r.body);
    }
}

// ---------------------------------------------------------------------------------------
// 5. Prometheus

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text() {
    use prometheus_parse::{Sample, Scrape, Value as PV};
    const TRANSACTIONS: u64 = 25;
    let db = TestDb::new("adm_metrics");
    let px = db.pgmux(&[]);
    let admin = Admin::new(&px);
    let c = connect(&db.url(&px)).await;
    for i in 0..TRANSACTIONS {
        assert_eq!(scalar(&c, &format!("SELECT {i}")).await, i.to_string());
    }
    let err = c
        .simple_query("SELECT * FROM no_such_table_here")
        .await
        .expect_err("query of a missing table");
    assert_eq!(sqlstate(&err), "42P01", "{}", describe_err(&err));

    // The counters move when the server is released, just after the client got its
    // answer.
    let ran = TRANSACTIONS + 1;
    let pool = wait_for("every transaction counted", DEADLINE, || {
        let p = admin.pool(&db.db, &db.user);
        if p["servers"]["active"] == 0 && p["totals"]["transactions"] == ran {
            Ok(p)
        } else {
            Err(p.to_string())
        }
    })
    .await;
    let text = admin.get_text("/metrics");
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"));
    let ours = |s: &&Sample| {
        s.labels.get("database") == Some(db.db.as_str())
            && s.labels.get("user") == Some(db.user.as_str())
            && s.labels.get("role") == Some("primary")
    };
    let find = |metric: &str, extra: &[(&str, &str)]| -> &Sample {
        scrape
            .samples
            .iter()
            .filter(ours)
            .find(|s| s.metric == metric && extra.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {metric}{extra:?} for our pool in\n{text}"))
    };

    let tx = match find("pgmux_transactions_total", &[]).value {
        PV::Counter(v) => v,
        ref other => panic!("pgmux_transactions_total is not a counter: {other:?}"),
    };
    // The failed statement was a transaction of its own too.
    assert_eq!(tx, ran as f64, "pgmux_transactions_total\n{text}");
    assert_eq!(pool["totals"]["queries"], ran, "{pool}");
    assert_eq!(
        tx,
        u64_of(&pool["totals"]["transactions"]) as f64,
        "the counter and the API disagree: {pool}"
    );
    assert!(
        matches!(find("pgmux_pool_servers", &[("state", "idle")]).value, PV::Gauge(v) if v >= 1.0),
        "pgmux_pool_servers{{state=idle}}\n{text}"
    );
    assert!(
        matches!(find("pgmux_pool_size", &[]).value, PV::Gauge(v) if v == 20.0),
        "pgmux_pool_size\n{text}"
    );
    assert!(
        matches!(find("pgmux_errors_total", &[("class", "42")]).value, PV::Counter(v) if v >= 1.0),
        "pgmux_errors_total{{class=42}}\n{text}"
    );

    // (histogram, its exact count when known): one wait per checkout, and the first
    // login's checkout (to learn the server's parameters) is a checkout too.
    for (name, exact) in [
        ("pgmux_client_wait_seconds", None),
        ("pgmux_transaction_duration_seconds", Some(ran)),
        ("pgmux_query_duration_seconds", Some(ran)),
    ] {
        let buckets = match &find(name, &[]).value {
            PV::Histogram(b) => b.clone(),
            other => panic!("{name} is not a histogram: {other:?}\n{text}"),
        };
        assert!(buckets.len() > 1, "{name}: {buckets:?}");
        let total = buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .unwrap_or_else(|| panic!("{name} has no +Inf bucket: {buckets:?}"))
            .count;
        assert!(
            total >= ran as f64,
            "{name}: {total} observations, ran {ran} transactions"
        );
        if let Some(n) = exact {
            assert_eq!(total, n as f64, "{name} observations");
        }
        // Cumulative buckets.
        let mut sorted = buckets.clone();
        sorted.sort_by(|a, b| a.less_than.total_cmp(&b.less_than));
        assert!(
            sorted.windows(2).all(|w| w[0].count <= w[1].count),
            "{name}: buckets not cumulative: {sorted:?}"
        );
        let count = find(&format!("{name}_count"), &[]);
        assert!(
            matches!(count.value, PV::Untyped(v) | PV::Counter(v) if v == total),
            "{name}_count {:?} vs +Inf bucket {total}",
            count.value
        );
    }
    assert!(
        !text.contains("quantile"),
        "summaries (quantile labels) in /metrics:\n{text}"
    );
    assert!(
        scrape
            .samples
            .iter()
            .all(|s| !matches!(s.value, PV::Summary(_))),
        "summaries in /metrics"
    );
}

// ---------------------------------------------------------------------------------------
// 6. SQL console

const POOLS_COLUMNS: &[&str] = &[
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
];
const STATS_COLUMNS: &[&str] = &[
    "database",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "avg_xact_count",
    "avg_query_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
];
const SOCKET_COLUMNS: &[&str] = &[
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
];
const DATABASES_COLUMNS: &[&str] = &[
    "name",
    "host",
    "port",
    "database",
    "force_user",
    "pool_size",
    "min_pool_size",
    "reserve_pool",
    "pool_mode",
    "max_connections",
    "current_connections",
    "paused",
    "disabled",
];
const CONFIG_COLUMNS: &[&str] = &["key", "value", "default", "changeable"];
const LISTS_COLUMNS: &[&str] = &["list", "items"];
const VERSION_COLUMNS: &[&str] = &["version"];

/// Runs one console command with psql (`-A -F '|'`): the header and the rows.
fn console_psql(px: &Pgmux, db: &TestDb, sql: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut cmd = pg_tool("psql");
    cmd.args([
        "-X",
        "-A",
        "-w",
        "-F",
        "|",
        "-P",
        "footer=off",
        "-h",
        "127.0.0.1",
    ])
    .args([
        "-p",
        &px.port().to_string(),
        "-U",
        &db.user,
        "-d",
        "pgbouncer",
    ])
    .args(["-c", sql])
    .env("PGPASSWORD", &db.password);
    let out = blocking(|| run_with_timeout(&mut cmd, Duration::from_secs(15)));
    assert!(
        out.status.success(),
        "psql -c {sql:?}: {}",
        describe_output(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout.lines();
    let split = |l: &str| l.split('|').map(str::to_owned).collect::<Vec<_>>();
    let header = split(lines.next().unwrap_or_else(|| panic!("{sql}: no output")));
    (header, lines.map(split).collect())
}

/// The row of `rows` whose `column` is `value`, as a column -> value map.
fn row_where<'a>(
    header: &'a [String],
    rows: &'a [Vec<String>],
    column: &str,
    value: &str,
) -> BTreeMap<&'a str, &'a str> {
    let i = header
        .iter()
        .position(|h| h == column)
        .unwrap_or_else(|| panic!("no column {column} in {header:?}"));
    let row = rows
        .iter()
        .find(|r| r.get(i).map(String::as_str) == Some(value))
        .unwrap_or_else(|| panic!("no row with {column} = {value} in {rows:?}"));
    header
        .iter()
        .map(String::as_str)
        .zip(row.iter().map(String::as_str))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_show_commands_have_pgbouncer_columns() {
    let db = TestDb::new("adm_console");
    // Zero-config start: the DATABASE_URL user is a stats user.
    let px = db.pgmux(&[]);
    let c = connect(&db.url(&px)).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");

    for (command, expected) in [
        ("SHOW POOLS", POOLS_COLUMNS),
        ("SHOW STATS", STATS_COLUMNS),
        ("SHOW CLIENTS", SOCKET_COLUMNS),
        ("SHOW SERVERS", SOCKET_COLUMNS),
        ("SHOW DATABASES", DATABASES_COLUMNS),
        ("SHOW CONFIG", CONFIG_COLUMNS),
        ("SHOW LISTS", LISTS_COLUMNS),
        ("SHOW VERSION", VERSION_COLUMNS),
    ] {
        let (header, rows) = console_psql(&px, &db, command);
        assert_eq!(header, expected, "{command}: columns");
        for r in &rows {
            assert_eq!(r.len(), expected.len(), "{command}: row {r:?}");
        }
        match command {
            "SHOW POOLS" => {
                let row = row_where(&header, &rows, "database", &db.db);
                assert_eq!(row["user"], db.user, "{row:?}");
                assert_eq!(row["cl_active"], "1", "{row:?}");
                assert_eq!(row["cl_waiting"], "0", "{row:?}");
                assert_eq!(row["sv_active"], "0", "{row:?}");
                let idle: u32 = row["sv_idle"].parse().expect("sv_idle");
                assert!(idle >= 1, "{row:?}");
                assert_eq!(row["maxwait"], "0", "{row:?}");
                assert_eq!(row["pool_mode"], "transaction", "{row:?}");
            }
            "SHOW STATS" => {
                let row = row_where(&header, &rows, "database", &db.db);
                let xacts: u64 = row["total_xact_count"].parse().expect("total_xact_count");
                assert!(xacts >= 1, "{row:?}");
            }
            "SHOW CLIENTS" => {
                let row = row_where(&header, &rows, "database", &db.db);
                assert_eq!(
                    (row["type"], row["user"]),
                    ("C", db.user.as_str()),
                    "{row:?}"
                );
            }
            "SHOW SERVERS" => {
                let row = row_where(&header, &rows, "database", &db.db);
                assert_eq!((row["type"], row["state"]), ("S", "idle"), "{row:?}");
                let pids = backend_pids(&db);
                let pid: i64 = row["remote_pid"].parse().expect("remote_pid");
                assert!(pids.contains(&pid), "{row:?} vs pg_stat_activity {pids:?}");
            }
            "SHOW DATABASES" => {
                let row = row_where(&header, &rows, "name", &db.db);
                assert_eq!(
                    row["port"],
                    db.cluster.primary().port.to_string(),
                    "{row:?}"
                );
                assert_eq!(row["pool_size"], "20", "{row:?}");
                assert_eq!(row["paused"], "0", "{row:?}");
            }
            "SHOW CONFIG" => {
                let row = row_where(&header, &rows, "key", "pool_size");
                assert_eq!(row["value"], "20", "{row:?}");
            }
            "SHOW LISTS" => {
                let row = row_where(&header, &rows, "list", "pools");
                assert_eq!(row["items"], "1", "{row:?}");
            }
            _ => assert!(rows[0][0].contains("pgmux"), "{rows:?}"),
        }
    }

    // The stats user may look, not touch; errors keep the session usable.
    let console_url = pg_url(px.port(), &db.user, &db.password, "pgbouncer");
    let console = connect(&console_url).await;
    let e = console
        .simple_query("PAUSE")
        .await
        .expect_err("PAUSE as a stats user");
    assert_eq!(sqlstate(&e), "42501", "{}", describe_err(&e));
    let e = console
        .simple_query(&format!("KILL {}", db.db))
        .await
        .expect_err("KILL as a stats user");
    assert_eq!(sqlstate(&e), "42501", "{}", describe_err(&e));
    let e = console
        .simple_query("FROBNICATE THE POOLS")
        .await
        .expect_err("unknown command");
    assert_eq!(sqlstate(&e), "42601", "{}", describe_err(&e));
    assert!(scalar(&console, "SHOW VERSION").await.contains("pgmux"));
    // The pool was not paused.
    assert_eq!(scalar(&c, "SELECT 3").await, "3");

    // `pgmux` is an alias of `pgbouncer`.
    let alias = connect(&pg_url(px.port(), &db.user, &db.password, "pgmux")).await;
    let pools = rows(&alias, "SHOW POOLS").await;
    assert!(
        pools
            .iter()
            .any(|r| r["database"].as_deref() == Some(db.db.as_str())),
        "{pools:?}"
    );
    drop((console, alias));

    // A user in neither list is refused at login.
    {
        let px = db.pgmux_env(&[], &[("PGMUX_STATS_USERS", "somebody_else")]);
        let e = match try_connect(&pg_url(px.port(), &db.user, &db.password, "pgbouncer")).await {
            Ok(_) => panic!("console login of a user in neither admin_users nor stats_users"),
            Err(e) => e,
        };
        assert_eq!(sqlstate(&e), "42501", "{}", describe_err(&e));
        assert_eq!(
            e.as_db_error().map(|d| d.severity()),
            Some("FATAL"),
            "{}",
            describe_err(&e)
        );
    }

    // An admin user: SET goes through the same path as PATCH /api/v1/config.
    let px = db.pgmux_env(&[], &[("PGMUX_ADMIN_USERS", &db.user)]);
    let admin = Admin::new(&px);
    let c = connect(&db.url(&px)).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    assert_eq!(admin.pool(&db.db, &db.user)["limits"]["pool_size"], 20);
    let console = connect(&pg_url(px.port(), &db.user, &db.password, "pgbouncer")).await;
    console
        .simple_query("SET default_pool_size = 7")
        .await
        .unwrap_or_else(|e| panic!("SET default_pool_size: {}", describe_err(&e)));
    assert_eq!(admin.config_value("pool_size"), "7");
    assert_eq!(admin.pool(&db.db, &db.user)["limits"]["pool_size"], 7);
    let config = rows(&console, "SHOW CONFIG").await;
    let row = config
        .iter()
        .find(|r| r["key"].as_deref() == Some("pool_size"))
        .unwrap_or_else(|| panic!("no pool_size in SHOW CONFIG: {config:?}"));
    assert_eq!(row["value"].as_deref(), Some("7"), "{row:?}");
    assert_eq!(row["changeable"].as_deref(), Some("yes"), "{row:?}");
    // A bad value is refused and changes nothing.
    let e = console
        .simple_query("SET default_pool_size = 0")
        .await
        .expect_err("SET default_pool_size = 0");
    assert_eq!(sqlstate(&e), "22023", "{}", describe_err(&e));
    assert_eq!(admin.config_value("pool_size"), "7");
    assert_eq!(scalar(&c, "SELECT 4").await, "4");
}

// ---------------------------------------------------------------------------------------
// 7. Pause / resume

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_and_resume() {
    let db = TestDb::new("adm_pause");
    let px = db.pgmux(&[]);
    let admin = Admin::new(&px);
    let url = db.url(&px);
    let a = Arc::new(connect(&url).await);
    assert_eq!(scalar(&a, "SELECT 1").await, "1");

    let r = admin.post(&format!("/api/v1/pause?database={}", db.db));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["ok"], true);
    assert_eq!(admin.pool(&db.db, &db.user)["paused"], true);
    // Pause closed the idle servers, so the database could be restarted.
    wait_for("no backends while paused", DEADLINE, || {
        match backends(&db) {
            0 => Ok(()),
            n => Err(format!("{n} backends")),
        }
    })
    .await;

    let blocked = {
        let a = a.clone();
        tokio::spawn(async move { a.simple_query("SELECT 42").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished(), "a query ran while paused");
    let pool = wait_for("a client waiting", DEADLINE, || {
        let p = admin.pool(&db.db, &db.user);
        if u64_of(&p["clients"]["waiting"]) >= 1 {
            Ok(p)
        } else {
            Err(p.to_string())
        }
    })
    .await;
    assert_eq!(pool["paused"], true, "{pool}");
    let v = admin.get("/api/v1/databases");
    assert!(
        v["databases"]
            .as_array()
            .expect("databases")
            .iter()
            .any(|d| d["name"] == db.db.as_str() && d["paused"] == true),
        "{v}"
    );
    assert_eq!(backends(&db), 0, "a server opened while paused");

    let r = admin.post(&format!("/api/v1/resume?database={}", db.db));
    assert_eq!(r.status, 200, "{}", r.body);
    let answer = tokio::time::timeout(DEADLINE, blocked)
        .await
        .expect("the blocked query completes after resume")
        .expect("task")
        .unwrap_or_else(|e| panic!("the blocked query failed: {}", describe_err(&e)));
    let value = answer.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("42"));
    assert_eq!(admin.pool(&db.db, &db.user)["paused"], false);

    // A pause cannot complete while a transaction runs; the transaction still finishes.
    let b = connect(&url).await;
    b.simple_query("BEGIN").await.expect("BEGIN");
    assert_eq!(scalar(&b, "SELECT 7").await, "7");
    let r = admin.post(&format!("/api/v1/pause?database={}&timeout=300ms", db.db));
    assert_eq!(r.status, 409, "{}", r.body);
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("transaction"), "{error}");
    assert_eq!(scalar(&b, "SELECT 8").await, "8");
    b.simple_query("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("COMMIT while pausing: {}", describe_err(&e)));
    let r = admin.post(&format!("/api/v1/resume?database={}", db.db));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(scalar(&a, "SELECT 9").await, "9");
    assert_eq!(scalar(&b, "SELECT 10").await, "10");

    // Everything paused: resuming one database is refused, resuming all works.
    let r = admin.post("/api/v1/pause?timeout=5s");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(admin.pool(&db.db, &db.user)["paused"], true);
    let metrics = admin.get_text("/metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("pgmux_pool_paused{")
            && l.contains(&format!("database=\"{}\"", db.db))
            && l.ends_with(" 1")),
        "pgmux_pool_paused is not 1:\n{metrics}"
    );
    let r = admin.post(&format!("/api/v1/resume?database={}", db.db));
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(admin.pool(&db.db, &db.user)["paused"], true);
    let r = admin.post("/api/v1/resume");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(admin.pool(&db.db, &db.user)["paused"], false);
    assert_eq!(scalar(&a, "SELECT 12").await, "12");

    // Unknown databases.
    for op in ["pause", "resume", "reconnect", "kill"] {
        let r = admin.post(&format!("/api/v1/{op}?database=no_such_db"));
        assert_eq!(r.status, 404, "{op}: {}", r.body);
    }
}

// ---------------------------------------------------------------------------------------
// 8. Reconnect and kill

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_recycles_servers_and_kill_ends_clients() {
    let db = TestDb::new("adm_kill");
    let px = db.pgmux(&["--pool-size", "1"]);
    let admin = Admin::new(&px);
    let url = db.url(&px);
    let c = connect(&url).await;
    let pid1 = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_eq!(scalar(&c, "SELECT pg_backend_pid()").await, pid1);

    let r = admin.post("/api/v1/reconnect");
    assert_eq!(r.status, 200, "{}", r.body);
    let pid2 = c
        .simple_query("SELECT pg_backend_pid()")
        .await
        .unwrap_or_else(|e| panic!("query after RECONNECT: {}", describe_err(&e)));
    let pid2 = pid2
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a pid");
    assert_ne!(pid2, pid1, "RECONNECT did not recycle the server");
    let stats = admin.get("/api/v1/stats");
    assert!(u64_of(&stats["server_closes"]["reconnect"]) >= 1, "{stats}");
    // Per database too.
    let r = admin.post(&format!("/api/v1/reconnect?database={}", db.db));
    assert_eq!(r.status, 200, "{}", r.body);
    let pid3 = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(pid3, pid2);

    // A transaction is never cut: its server is recycled when the transaction ends.
    c.simple_query("BEGIN").await.expect("BEGIN");
    assert_eq!(scalar(&c, "SELECT pg_backend_pid()").await, pid3);
    let r = admin.post("/api/v1/reconnect");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        scalar(&c, "SELECT pg_backend_pid()").await,
        pid3,
        "RECONNECT changed the server inside a transaction"
    );
    c.simple_query("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("COMMIT after RECONNECT: {}", describe_err(&e)));
    assert_ne!(scalar(&c, "SELECT pg_backend_pid()").await, pid3);

    // KILL: every client of the database is disconnected at once, also one inside a
    // transaction (rolled back), and every server connection closes.
    blocking(|| db.setup("CREATE TABLE killed_rows (x int);"));
    let t = connect(&url).await;
    t.simple_query("BEGIN").await.expect("BEGIN");
    t.simple_query("INSERT INTO killed_rows VALUES (1)")
        .await
        .expect("INSERT");
    let mut raw = blocking(|| db.raw(&px));
    let r = admin.post(&format!("/api/v1/kill?database={}", db.db));
    assert_eq!(r.status, 200, "{}", r.body);
    let (tag, body) = blocking(|| raw.read_message()).expect("a message before the close");
    assert_eq!(tag, b'E', "expected an ErrorResponse");
    let fields = RawConn::error_fields(&body);
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("57P01"),
        "{fields:?}"
    );
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{fields:?}"
    );
    assert!(
        blocking(|| raw.is_closed()),
        "the killed connection stays open"
    );
    let e = c
        .simple_query("SELECT 1")
        .await
        .expect_err("a killed client's next query");
    let code = sqlstate(&e);
    assert!(
        code.is_empty() || code == "57P01",
        "unexpected error: {}",
        describe_err(&e)
    );
    let e = t
        .simple_query("COMMIT")
        .await
        .expect_err("COMMIT of a killed transaction");
    let code = sqlstate(&e);
    assert!(
        code.is_empty() || code == "57P01",
        "unexpected error: {}",
        describe_err(&e)
    );
    let stats = wait_for("kills counted", DEADLINE, || {
        let s = admin.get("/api/v1/stats");
        if s["disconnects"]["killed"].as_u64().unwrap_or(0) >= 3 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    assert_eq!(stats["clients"], 0, "{stats}");
    wait_for("no backends after KILL", DEADLINE, || match backends(&db) {
        0 => Ok(()),
        n => Err(format!("{n} backends")),
    })
    .await;
    // New connections work, and the killed transaction left nothing behind.
    let fresh = connect(&url).await;
    assert_eq!(
        scalar(&fresh, "SELECT count(*) FROM killed_rows").await,
        "0"
    );
}

// ---------------------------------------------------------------------------------------
// 9. Reload

fn write_config(path: &std::path::Path, db: &TestDb, pool_size: &str) {
    write_config_with(path, db, pool_size, "");
}

/// A configuration file with `pool_size`, the test database and `tables` (more TOML
/// tables, e.g. `[admin]`).
fn write_config_with(path: &std::path::Path, db: &TestDb, pool_size: &str, tables: &str) {
    let url = db.database_url();
    std::fs::write(
        path,
        format!(
            "pool_size = {pool_size}\n{tables}\n[databases.{}]\nurl = \"{url}\"\n",
            db.db
        ),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_file_changes_and_rejects_invalid() {
    let db = TestDb::new("adm_reload");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pgmux.toml");
    write_config(&file, &db, "3");
    let file_arg = file.to_str().expect("utf-8 path").to_string();
    let px = Pgmux::start(&["--config", &file_arg], &[]);
    let admin = Admin::new(&px);
    let c = connect(&db.url(&px)).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    assert_eq!(admin.pool(&db.db, &db.user)["limits"]["pool_size"], 3);
    assert_eq!(admin.config_value("pool_size"), "3");

    write_config(&file, &db, "6");
    let r = admin.post("/api/v1/reload");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(admin.pool(&db.db, &db.user)["limits"]["pool_size"], 6);
    assert_eq!(admin.config_value("pool_size"), "6");

    // An invalid file is rejected; the running configuration stays.
    write_config(&file, &db, "0");
    let r = admin.post("/api/v1/reload");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["field"], "pool_size", "{}", r.body);
    assert_eq!(admin.pool(&db.db, &db.user)["limits"]["pool_size"], 6);
    assert_eq!(admin.config_value("pool_size"), "6");
    assert_eq!(scalar(&c, "SELECT 2").await, "2");
    let c2 = connect(&db.url(&px)).await;
    assert_eq!(scalar(&c2, "SELECT 3").await, "3");

    // A live override lasts until the next reload: the file is the truth again.
    let r = admin.patch(
        &format!("/api/v1/pools/{}/{}", db.db, db.user),
        r#"{"pool_size": 9}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(admin.pool(&db.db, &db.user)["limits"]["pool_size"], 9);

    // SIGHUP reloads too.
    write_config(&file, &db, "4");
    px.signal(1);
    wait_for("pool_size 4 after SIGHUP", DEADLINE, || {
        let p = admin.pool(&db.db, &db.user);
        if p["limits"]["pool_size"] == 4 {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;
    assert_eq!(admin.config_value("pool_size"), "4");
    assert_eq!(scalar(&c, "SELECT 4").await, "4");

    // A token set by a reload applies at once.
    write_config_with(
        &file,
        &db,
        "4",
        &format!("\n[admin]\ntoken = \"{TOKEN}\"\n"),
    );
    let r = admin.post("/api/v1/reload");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = admin.post("/api/v1/reload");
    assert_eq!(r.status, 401, "reload after setting a token: {}", r.body);
    let r = admin.send_as("POST", "/api/v1/reload", None, Some(TOKEN));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = admin.send("GET", "/api/v1/config", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !r.body.contains(TOKEN),
        "the token shows in the config: {}",
        r.body
    );
}

// ---------------------------------------------------------------------------------------
// 10. Readiness

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_not_ready_during_drain() {
    let db = TestDb::new("adm_ready");
    let mut px = db.pgmux(&[]);
    let admin = Admin::new(&px);
    let r = admin.send("GET", "/healthz", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = admin.send("GET", "/readyz", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["ready"], true, "{}", r.body);

    let c = connect(&db.url(&px)).await;
    c.simple_query("BEGIN").await.expect("BEGIN");
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    px.signal(15);
    let r = wait_for("/readyz 503 while draining", DEADLINE, || {
        let r = admin.send("GET", "/readyz", None);
        if r.status == 503 {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.body))
        }
    })
    .await;
    let v = r.json();
    assert_eq!(v["ready"], false, "{v}");
    assert!(
        v["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .any(|s| s.as_str().unwrap_or("").contains("draining")),
        "{v}"
    );
    assert_eq!(admin.get("/api/v1/stats")["draining"], true);
    let r = admin.send("GET", "/healthz", None);
    assert_eq!(r.status, 200, "{}", r.body);
    // The open transaction finishes.
    assert_eq!(scalar(&c, "SELECT 2").await, "2");
    c.simple_query("COMMIT")
        .await
        .unwrap_or_else(|e| panic!("COMMIT while draining: {}", describe_err(&e)));
    let status = blocking(|| px.wait_exit(DEADLINE)).expect("pgmux exits after the drain");
    assert!(status.success(), "pgmux exited with {status}");

    // A primary that cannot be reached: alive, not ready, and the reason names it.
    let port = free_port();
    let px = Pgmux::start(
        &[],
        &[(
            "DATABASE_URL",
            &format!("postgres://nobody:pw@127.0.0.1:{port}/unreachable_db"),
        )],
    );
    let admin = Admin::new(&px);
    let r = admin.send("GET", "/readyz", None);
    assert_eq!(r.status, 503, "{}", r.body);
    let v = r.json();
    assert_eq!(v["ready"], false, "{v}");
    assert!(
        v["reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .any(|s| s.as_str().unwrap_or("").contains("unreachable_db")),
        "{v}"
    );
    let r = admin.send("GET", "/healthz", None);
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---------------------------------------------------------------------------------------
// 11. min_pool_size

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_keeps_servers_warm() {
    let db = TestDb::new("adm_min");
    let px = db.pgmux(&["--pool-size", "5"]);
    let admin = Admin::new(&px);
    let c = connect(&db.url(&px)).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    assert_eq!(backends(&db), 1);

    let r = admin.patch(
        &format!("/api/v1/pools/{}/{}", db.db, db.user),
        r#"{"min_pool_size": 3}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["pool"]["limits"]["min_pool_size"], 3, "{}", r.body);
    wait_for("3 warm servers", DEADLINE, || match backends(&db) {
        3 => Ok(()),
        n => Err(format!("{n} backends")),
    })
    .await;
    let p = wait_for("3 idle servers listed", DEADLINE, || {
        let p = admin.pool(&db.db, &db.user);
        if p["servers"]["idle"] == 3 {
            Ok(p)
        } else {
            Err(p.to_string())
        }
    })
    .await;
    assert_eq!(p["limits"]["pool_size"], 5, "{p}");
    // It stays at the minimum (not above).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(backends(&db), 3);
    assert_eq!(scalar(&c, "SELECT 2").await, "2");

    // PAUSE closes them, and the maintenance task does not reopen them while paused
    // (the point of a pause is that the database can be restarted).
    let r = admin.post(&format!("/api/v1/pause?database={}", db.db));
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("no backends while paused", DEADLINE, || {
        match backends(&db) {
            0 => Ok(()),
            n => Err(format!("{n} backends")),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(backends(&db), 0, "servers reopened while paused");
    let r = admin.post(&format!("/api/v1/resume?database={}", db.db));
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("3 warm servers after resume", DEADLINE, || {
        match backends(&db) {
            3 => Ok(()),
            n => Err(format!("{n} backends")),
        }
    })
    .await;
    assert_eq!(scalar(&c, "SELECT 3").await, "3");
}

// ---------------------------------------------------------------------------------------
// 12. pgmux top

#[test]
fn top_shows_the_pools() {
    let db = TestDb::new("adm_top");
    let px = db.pgmux(&[]);
    let mut raw = db.raw(&px);
    let msgs = raw.simple_query("SELECT 1");
    assert!(msgs.iter().all(|(tag, _)| *tag != b'E'), "SELECT 1 failed");

    let admin_url = px.admin_url();
    let args = [
        "top",
        "--admin",
        admin_url.as_str(),
        "--frames",
        "2",
        "--interval",
        "200ms",
    ];
    let out = pgmux_cli(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgmux {args:?}: {}",
        describe_output(&out)
    );
    for needle in [
        "DATABASE",
        "USER",
        "CL_WAIT",
        "TPS",
        "WAIT_P99",
        db.db.as_str(),
        db.user.as_str(),
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    assert!(
        !text.contains("\x1b[2J"),
        "--frames clears the screen:\n{text}"
    );

    // An unreachable admin listener fails in --frames mode.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = pgmux_cli(&["top", "--admin", &dead, "--frames", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe_output(&out));
}
