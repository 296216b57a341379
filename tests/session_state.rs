//! Session isolation and `session_state_action` (issue 10), against real PostgreSQL:
//! session state a client makes (untracked SET, LISTEN, advisory locks, temp tables,
//! WITH HOLD cursors, SQL PREPARE, set_config) never reaches another client. With the
//! default `pin` the server stays with its client (notifications arrive while it is
//! idle) and is closed when it leaves; `warn` lets it through and reports it; `reject`
//! refuses it with 0A000 and nothing of it runs. Reported parameters (TimeZone, …) are
//! re-applied per client and never pin.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{describe, first_value, Message, Pgmux, RawConn, TestDb};

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("timed out waiting for {what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn get_json(px: &Pgmux, path: &str) -> Value {
    let text = ureq::get(format!("{}{path}", px.admin_url()))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .into_body()
        .read_to_string()
        .expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
}

/// The primary pool of the test user, from GET /api/v1/pools.
fn pool(px: &Pgmux, db: &TestDb) -> Value {
    let v = get_json(px, "/api/v1/pools");
    v["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .find(|p| {
            p["database"] == db.db.as_str()
                && p["user"] == db.user.as_str()
                && p["role"] == "primary"
        })
        .cloned()
        .unwrap_or_else(|| panic!("no pool in {v}"))
}

fn metrics(px: &Pgmux) -> String {
    ureq::get(format!("{}/metrics", px.admin_url()))
        .call()
        .expect("GET /metrics")
        .into_body()
        .read_to_string()
        .expect("metrics body")
}

/// The sum of a Prometheus series over the lines whose labels contain `label`.
fn metric(px: &Pgmux, name: &str, label: &str) -> u64 {
    metrics(px)
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn login_as(db: &TestDb, px: &Pgmux, app: &str) -> RawConn {
    let mut c = RawConn::connect(px.port());
    c.startup(&db.user, &db.db, &[("application_name", app)]);
    c.scram_login(&db.user, &db.password);
    c
}

fn error_of(msgs: &[Message]) -> Option<BTreeMap<char, String>> {
    msgs.iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| RawConn::error_fields(b))
}

/// Runs `sql`, which must succeed, and returns its first value.
fn value(c: &mut RawConn, sql: &str) -> String {
    let msgs = c.simple_query(sql);
    assert!(error_of(&msgs).is_none(), "{sql}: {}", describe(&msgs));
    first_value(&msgs)
}

fn ok(c: &mut RawConn, sql: &str) {
    let msgs = c.simple_query(sql);
    assert!(error_of(&msgs).is_none(), "{sql}: {}", describe(&msgs));
}

fn backend_alive(db: &TestDb, pid: &str) -> bool {
    db.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
    )) == "1"
}

#[test]
fn pinned_state_stays_with_its_client_and_never_reaches_another() {
    let db = TestDb::new("pin");
    db.setup("CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.secrets (v text); INSERT INTO tenant_a.secrets VALUES ('a-only')");
    // Two servers: one for the pinned client, one shared by everybody else.
    let px = db.pgmux(&["--pool-size", "2"]);
    let mut a = login_as(&db, &px, "worker-a");
    let mut b = login_as(&db, &px, "worker-b");
    let default_path = value(&mut b, "SHOW search_path");
    let default_work_mem = value(&mut b, "SHOW work_mem");

    // A makes every kind of session state, in autocommit and inside a transaction.
    ok(&mut a, "SET search_path = tenant_a, public");
    ok(&mut a, "BEGIN; SET work_mem = '7MB'; COMMIT");
    ok(&mut a, "CREATE TEMP TABLE scratch (x int)");
    ok(&mut a, "INSERT INTO scratch VALUES (1)");
    ok(&mut a, "SELECT pg_advisory_lock(42)");
    ok(
        &mut a,
        "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g; COMMIT",
    );
    ok(&mut a, "PREPARE two AS SELECT 2");
    ok(&mut a, "LISTEN jobs");
    let a_pid = value(&mut a, "SELECT pg_backend_pid()");

    for i in 0..20 {
        // A keeps all of it, on the same backend.
        assert_eq!(value(&mut a, "SELECT pg_backend_pid()"), a_pid, "round {i}");
        assert_eq!(value(&mut a, "SELECT v FROM secrets"), "a-only");
        assert_eq!(value(&mut a, "SHOW work_mem"), "7MB");
        assert_eq!(value(&mut a, "SELECT count(*) FROM scratch"), "1");
        if i < 3 {
            assert_eq!(value(&mut a, "FETCH 1 FROM held"), (i + 1).to_string());
        }
        assert_eq!(value(&mut a, "EXECUTE two"), "2");
        // B sees none of it.
        assert_ne!(value(&mut b, "SELECT pg_backend_pid()"), a_pid);
        assert_eq!(value(&mut b, "SHOW search_path"), default_path);
        assert_eq!(value(&mut b, "SHOW work_mem"), default_work_mem);
        assert_eq!(value(&mut b, "SELECT to_regclass('secrets') IS NULL"), "t");
        assert_eq!(
            value(&mut b, "SELECT to_regclass('pg_temp.scratch') IS NULL"),
            "t"
        );
        assert_eq!(
            value(&mut b, "SELECT count(*) FROM pg_prepared_statements"),
            "0"
        );
        assert_eq!(value(&mut b, "SELECT count(*) FROM pg_cursors"), "0");
        assert_eq!(
            value(&mut b, "SELECT count(*) FROM pg_listening_channels()"),
            "0"
        );
        if i == 0 {
            // The lock is A's (a session lock held by its pinned backend).
            assert_eq!(value(&mut b, "SELECT pg_try_advisory_xact_lock(42)"), "f");
        }
    }

    // A notification reaches A while it is idle, without A sending anything.
    ok(&mut b, "NOTIFY jobs, 'job 1'");
    let (tag, body) = a.read_message().expect("notification");
    assert_eq!(tag, b'A', "expected NotificationResponse");
    assert!(
        String::from_utf8_lossy(&body).contains("job 1"),
        "{:?}",
        String::from_utf8_lossy(&body)
    );

    let p = pool(&px, &db);
    assert_eq!(p["servers"]["pinned"], 1, "{p}");
    assert_eq!(
        p["totals"]["session_pins"], 1,
        "one client pinned once: {p}"
    );
    let sources = p["totals"]["session_state_sources"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        sources
            .iter()
            .any(|s| s["application_name"] == "worker-a" && s["feature"] == "set"),
        "{sources:?}"
    );
    assert!(metric(&px, "pgmux_pool_servers_pinned", "") == 1);
    assert!(
        metric(
            &px,
            "pgmux_session_state_statements_total",
            "application_name=\"worker-a\""
        ) >= 1
    );
    assert!(
        px.log().contains("its server connection stays with it"),
        "{}",
        px.log()
    );

    // A leaves: its backend is closed with everything on it, the lock is free.
    a.send(&RawConn::terminate_message());
    drop(a);
    wait_until("the pinned backend to go", Duration::from_secs(10), || {
        if backend_alive(&db, &a_pid) {
            Err("still there".into())
        } else {
            Ok(())
        }
    });
    assert_eq!(value(&mut b, "SELECT pg_try_advisory_xact_lock(42)"), "t");
    wait_until(
        "the pinned gauge to drop",
        Duration::from_secs(5),
        || match pool(&px, &db)["servers"]["pinned"].as_u64() {
            Some(0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(
        metric(&px, "pgmux_server_closes_total", "reason=\"session_state\""),
        1
    );
    // The pool goes on with fresh servers: several clients, none sees A's settings.
    for _ in 0..3 {
        let mut c = db.raw(&px);
        assert_eq!(value(&mut c, "SHOW search_path"), default_path);
        assert_eq!(value(&mut c, "SHOW work_mem"), default_work_mem);
    }
}

#[test]
fn reject_refuses_session_state_with_0a000_and_runs_nothing_of_it() {
    let db = TestDb::new("reject");
    db.setup("CREATE TABLE t (x int)");
    let px = db.pgmux_env(
        &["--pool-size", "1"],
        &[("PGMUX_SESSION_STATE_ACTION", "reject")],
    );
    let mut a = login_as(&db, &px, "app-r");
    let default_work_mem = value(&mut a, "SHOW work_mem");
    for sql in [
        "SET work_mem = '7MB'",
        "SET search_path = x",
        "LISTEN jobs",
        "SELECT pg_advisory_lock(1)",
        "CREATE TEMP TABLE tt (x int)",
        "PREPARE p AS SELECT 1",
        "SELECT set_config('work_mem', '7MB', false)",
        // A text with a state change anywhere is refused whole: the INSERT does not run.
        "INSERT INTO t VALUES (1); SET work_mem = '7MB'",
    ] {
        let msgs = a.simple_query(sql);
        let e = error_of(&msgs).unwrap_or_else(|| panic!("{sql}: {}", describe(&msgs)));
        assert_eq!(e[&'C'], "0A000", "{sql}: {e:?}");
        assert!(e[&'M'].contains("session_state_action = reject"), "{e:?}");
        assert!(e.contains_key(&'H'), "a hint: {e:?}");
        assert_eq!(msgs.last().unwrap(), &(b'Z', vec![b'I']), "{sql}");
    }
    assert_eq!(value(&mut a, "SHOW work_mem"), default_work_mem);
    assert_eq!(value(&mut a, "SELECT count(*) FROM t"), "0");
    // What is allowed still is: SET LOCAL, tracked parameters, xact locks, ON COMMIT DROP.
    ok(&mut a, "BEGIN; SET LOCAL work_mem = '8MB'; SELECT pg_advisory_xact_lock(1); CREATE TEMP TABLE d (x int) ON COMMIT DROP; COMMIT");
    ok(&mut a, "SET TimeZone = 'Asia/Tokyo'");

    // Inside a transaction the refusal aborts it, as PostgreSQL's own error would.
    ok(&mut a, "BEGIN");
    ok(&mut a, "INSERT INTO t VALUES (2)");
    let msgs = a.simple_query("SET search_path = x");
    assert_eq!(error_of(&msgs).unwrap()[&'C'], "0A000");
    assert_eq!(msgs.last().unwrap(), &(b'Z', vec![b'E']));
    let msgs = a.simple_query("SELECT 1");
    assert_eq!(
        error_of(&msgs).unwrap()[&'C'],
        "25P02",
        "{}",
        describe(&msgs)
    );
    ok(&mut a, "ROLLBACK");
    assert_eq!(value(&mut a, "SELECT count(*) FROM t"), "0");

    let p = pool(&px, &db);
    assert_eq!(p["totals"]["session_state_rejected"], 9, "{p}");
    assert_eq!(p["totals"]["session_pins"], 0, "{p}");
    assert_eq!(p["servers"]["pinned"], 0, "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_and_pin_through_the_extended_protocol() {
    let db = TestDb::new("ext");
    let px = db.pgmux_env(
        &["--pool-size", "2"],
        &[("PGMUX_SESSION_STATE_ACTION", "reject")],
    );
    let url = db.url(&px);
    let c = support::connect(&url).await;
    // Parse of a state-making text: refused at prepare, with 0A000.
    let e = c
        .prepare("SELECT pg_advisory_lock($1)")
        .await
        .expect_err("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e:?}");
    let e = c
        .execute("SET work_mem = '7MB'", &[])
        .await
        .expect_err("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e:?}");
    // The connection is fine afterwards; work_mem unchanged.
    let row = c
        .query_one("SELECT current_setting('work_mem')", &[])
        .await
        .unwrap();
    assert_ne!(row.get::<_, String>(0), "7MB");

    // Now as pin (a live change): a named statement that sets session state pins its
    // client, also when a second client's Parse of it is answered without a server.
    let admin = format!("{}/api/v1/config", px.admin_url());
    let r = ureq::patch(&admin)
        .header("Content-Type", "application/json")
        .send(r#"{"session_state_action": "pin"}"#)
        .expect("PATCH config");
    assert_eq!(r.status().as_u16(), 200);
    let sql = "SELECT set_config('app.tenant', $1, false)";
    let x = support::connect(&url).await;
    let y = support::connect(&url).await;
    let sx = x.prepare(sql).await.unwrap();
    x.query_one(&sx, &[&"x"]).await.unwrap();
    let sy = y.prepare(sql).await.unwrap();
    y.query_one(&sy, &[&"y"]).await.unwrap();
    for _ in 0..5 {
        let vx: String = x
            .query_one("SELECT current_setting('app.tenant')", &[])
            .await
            .unwrap()
            .get(0);
        let vy: String = y
            .query_one("SELECT current_setting('app.tenant')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!((vx.as_str(), vy.as_str()), ("x", "y"));
    }
    let p = tokio::task::spawn_blocking({
        let px_url = px.admin_url();
        move || {
            let text = ureq::get(format!("{px_url}/api/v1/pools"))
                .call()
                .unwrap()
                .into_body()
                .read_to_string()
                .unwrap();
            serde_json::from_str::<Value>(&text).unwrap()
        }
    })
    .await
    .unwrap();
    let p = p["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "primary")
        .cloned()
        .unwrap();
    assert_eq!(p["servers"]["pinned"], 2, "{p}");
    assert_eq!(p["totals"]["session_pins"], 2, "{p}");
    // A third client waits for a server: both are pinned. It gets one when x leaves.
    drop(x);
    let z = support::connect(&url).await;
    let v: String = z
        .query_one(
            "SELECT coalesce(current_setting('app.tenant', true), '')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "", "x's setting went with its server");
}

#[test]
fn warn_lets_state_through_and_says_who() {
    let db = TestDb::new("warn");
    let px = db.pgmux_env(
        &["--pool-size", "1"],
        &[("PGMUX_SESSION_STATE_ACTION", "warn")],
    );
    let mut a = login_as(&db, &px, "legacy-app");
    let mut b = login_as(&db, &px, "other-app");
    let default_work_mem = value(&mut b, "SHOW work_mem");
    ok(&mut a, "SET work_mem = '7MB'");
    ok(&mut a, "SET work_mem = '9MB'");
    // One server: B gets the one A changed. This is what warn is for finding.
    assert_eq!(value(&mut b, "SHOW work_mem"), "9MB");
    assert_ne!(default_work_mem, "9MB");
    let p = pool(&px, &db);
    assert_eq!(p["totals"]["session_state_warned"], 2, "{p}");
    assert_eq!(p["servers"]["pinned"], 0, "{p}");
    let log = px.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("may reach other clients"))
        .collect();
    assert_eq!(warned.len(), 1, "logged once per client and kind: {log}");
    assert!(
        warned[0].contains("legacy-app") && warned[0].contains("set"),
        "{}",
        warned[0]
    );
}

#[test]
fn reported_parameters_follow_each_client_and_never_pin() {
    let db = TestDb::new("tracked");
    let px = db.pgmux(&["--pool-size", "1"]);
    let mut a = db.raw(&px);
    let mut b = db.raw(&px);
    let tz = value(&mut b, "SHOW TimeZone");
    let style = value(&mut b, "SHOW DateStyle");
    ok(&mut a, "SET TimeZone = 'Asia/Tokyo'");
    ok(&mut a, "SET DateStyle = 'SQL, DMY'");
    ok(&mut a, "SET application_name = 'renamed'");
    ok(&mut a, "SET default_transaction_read_only = on");
    for _ in 0..5 {
        assert_eq!(value(&mut a, "SHOW TimeZone"), "Asia/Tokyo");
        assert_eq!(value(&mut a, "SHOW DateStyle"), "SQL, DMY");
        assert_eq!(value(&mut a, "SHOW default_transaction_read_only"), "on");
        assert_eq!(value(&mut b, "SHOW TimeZone"), tz);
        assert_eq!(value(&mut b, "SHOW DateStyle"), style);
        assert_ne!(value(&mut b, "SHOW application_name"), "renamed");
        // b never chose it: the node's default, not a's read-only sessions.
        assert_eq!(value(&mut b, "SHOW default_transaction_read_only"), "off");
    }
    let p = pool(&px, &db);
    assert_eq!(p["totals"]["session_pins"], 0, "{p}");
}

#[test]
fn a_pinned_backend_killed_while_idle_ends_its_client_with_a_clear_error() {
    let db = TestDb::new("pinkill");
    let px = db.pgmux(&["--pool-size", "2"]);
    let mut a = db.raw(&px);
    ok(&mut a, "LISTEN jobs");
    let pid = value(&mut a, "SELECT pg_backend_pid()");
    db.psql(&format!("SELECT pg_terminate_backend({pid})"));
    // Told at once, while idle: PostgreSQL's FATAL, then the end of the connection.
    let e = a.next_error().expect("an error before the close");
    assert_eq!(e[&'S'], "FATAL", "{e:?}");
    assert_eq!(e[&'C'], "57P01", "{e:?}");
    assert!(a.read_message().is_none(), "closed after the error");
    // Nothing is left behind and others carry on.
    wait_until("the pin to go", Duration::from_secs(5), || {
        match pool(&px, &db)["servers"]["pinned"].as_u64() {
            Some(0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let mut b = db.raw(&px);
    assert_eq!(value(&mut b, "SELECT 1"), "1");
}

/// What drivers SET when they connect (Rails: client_min_messages) is followed per client,
/// like the reported parameters: no pin, so more such clients than servers all get served,
/// and each sees its own value.
#[test]
fn followed_parameters_are_reapplied_per_client_and_never_pin() {
    let db = TestDb::new("follow");
    let px = db.pgmux(&["--pool-size", "2"]);
    let mut probe = db.raw(&px);
    let default_level = value(&mut probe, "SHOW client_min_messages");
    let default_digits = value(&mut probe, "SHOW extra_float_digits");
    drop(probe);
    // Ten Rails-like connections on two servers, each with its own settings.
    let mut conns: Vec<RawConn> = (0..10).map(|_| db.raw(&px)).collect();
    let levels = ["warning", "error", "notice", "log", "debug1"];
    for (i, c) in conns.iter_mut().enumerate() {
        ok(
            c,
            &format!("SET client_min_messages TO '{}'", levels[i % 5]),
        );
        ok(c, &format!("SET extra_float_digits = {}", i as i32 % 3 - 1));
    }
    for _ in 0..3 {
        for (i, c) in conns.iter_mut().enumerate() {
            assert_eq!(
                value(c, "SHOW client_min_messages"),
                levels[i % 5],
                "client {i}"
            );
            assert_eq!(
                value(c, "SHOW extra_float_digits"),
                (i as i32 % 3 - 1).to_string(),
                "client {i}"
            );
        }
    }
    // A failed SET changes nothing; a RESET goes back to the default.
    let c = &mut conns[0];
    let msgs = c.simple_query("SET client_min_messages = bogus");
    assert_eq!(
        error_of(&msgs).unwrap()[&'C'],
        "22023",
        "{}",
        describe(&msgs)
    );
    assert_eq!(value(c, "SHOW client_min_messages"), "warning");
    ok(c, "RESET client_min_messages");
    for _ in 0..3 {
        assert_eq!(
            value(&mut conns[0], "SHOW client_min_messages"),
            default_level
        );
        assert_eq!(value(&mut conns[1], "SHOW client_min_messages"), "error");
    }
    // A client without settings sees the defaults.
    let mut fresh = db.raw(&px);
    assert_eq!(value(&mut fresh, "SHOW client_min_messages"), default_level);
    assert_eq!(value(&mut fresh, "SHOW extra_float_digits"), default_digits);
    let p = pool(&px, &db);
    assert_eq!(p["totals"]["session_pins"], 0, "{p}");
    assert_eq!(p["servers"]["pinned"], 0, "{p}");

    // Inside a transaction the SET could be rolled back: that is session state (pinned).
    let mut t = db.raw(&px);
    ok(&mut t, "BEGIN; SET client_min_messages = error; COMMIT");
    assert_eq!(pool(&px, &db)["servers"]["pinned"], 1);
}

/// `track_extra_parameters` makes a parameter such as search_path followed too.
#[test]
fn track_extra_parameters_follows_search_path_when_asked() {
    let db = TestDb::new("follow_path");
    db.setup("CREATE SCHEMA tenant_a; CREATE TABLE tenant_a.secrets (v text); INSERT INTO tenant_a.secrets VALUES ('a-only')");
    let px = db.pgmux_env(
        &["--pool-size", "1"],
        &[(
            "PGMUX_TRACK_EXTRA_PARAMETERS",
            "client_min_messages,search_path",
        )],
    );
    let mut a = db.raw(&px);
    let mut b = db.raw(&px);
    let default_path = value(&mut b, "SHOW search_path");
    ok(&mut a, "SET search_path TO tenant_a");
    for _ in 0..5 {
        // One server for both: pgmux sets and resets it at every switch.
        assert_eq!(value(&mut a, "SELECT v FROM secrets"), "a-only");
        assert_eq!(value(&mut b, "SHOW search_path"), default_path);
        assert_eq!(value(&mut b, "SELECT to_regclass('secrets') IS NULL"), "t");
    }
    let p = pool(&px, &db);
    assert_eq!(p["totals"]["session_pins"], 0, "{p}");
    // A list is not a plain value: that one still pins.
    ok(&mut b, "SET search_path = tenant_a, public");
    assert_eq!(pool(&px, &db)["servers"]["pinned"], 1);
}

/// A list in a startup parameter (`options=-c search_path=…`, or `search_path` itself, as
/// JDBC's `currentSchema` sends it) is the list PostgreSQL makes of it on a direct
/// connection, on every server the client meets, and never reaches another client; a
/// plain `SET search_path` followed by `track_extra_parameters` is one schema, as
/// PostgreSQL stores it.
#[test]
fn a_search_path_list_from_startup_stays_a_list_on_every_server() {
    let db = TestDb::new("path_list");
    db.setup(
        "CREATE SCHEMA a; CREATE SCHEMA \"B c\"; \
         CREATE TABLE a.only_in_a (v text); INSERT INTO a.only_in_a VALUES ('in a'); \
         CREATE TABLE \"B c\".only_in_b (v text); INSERT INTO \"B c\".only_in_b VALUES ('in b')",
    );
    // One server: every switch between the clients re-applies or resets the path.
    let px = db.pgmux_env(
        &["--pool-size", "1"],
        &[("PGMUX_TRACK_EXTRA_PARAMETERS", "search_path")],
    );
    let mut other = db.raw(&px);
    let default_path = value(&mut other, "SHOW search_path");
    let direct_port = db.cluster.primary().port;
    for startup in [
        [("options", "-c search_path=a,\"B\\ c\"")],
        [("search_path", "a,\"B c\"")],
    ] {
        let login = |port: u16| {
            let mut c = RawConn::connect(port);
            c.startup(&db.user, &db.db, &startup);
            c.scram_login(&db.user, &db.password);
            c
        };
        let want = value(&mut login(direct_port), "SHOW search_path");
        assert_eq!(want, "a,\"B c\"", "{startup:?}: PostgreSQL's own reading");
        let mut c = login(px.port());
        for round in 0..3 {
            assert_eq!(
                value(&mut c, "SHOW search_path"),
                want,
                "{startup:?} {round}"
            );
            assert_eq!(value(&mut c, "SELECT v FROM only_in_a"), "in a");
            assert_eq!(value(&mut c, "SELECT v FROM only_in_b"), "in b");
            assert_eq!(value(&mut other, "SHOW search_path"), default_path);
            assert_eq!(
                value(&mut other, "SELECT to_regclass('only_in_b') IS NULL"),
                "t"
            );
        }
    }
    // A SET of one schema whose name needs quoting, followed across servers.
    ok(&mut other, "SET search_path = 'B c'");
    for _ in 0..3 {
        let mut c = db.raw(&px);
        assert_eq!(value(&mut c, "SHOW search_path"), default_path);
        assert_eq!(value(&mut other, "SHOW search_path"), "\"B c\"");
        assert_eq!(value(&mut other, "SELECT v FROM only_in_b"), "in b");
    }
    assert_eq!(pool(&px, &db)["totals"]["session_pins"], 0);
}
