//! Read routing end to end: pgmux in front of a primary with two streaming
//! replicas (READ_DATABASE_URL), driven by tokio-postgres.
//!
//! Where a statement ran is read from the statement itself:
//! `pg_is_in_recovery()` is true on a replica, and `current_setting('port')`
//! tells which server answered. Replicas join the rotation only after their
//! first health check, which starts when the first client of the database
//! logs in, so every test first waits (with a deadline) until reads actually
//! reach a replica.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{connect, try_connect, Pgmux, TestDb};
use tokio_postgres::{Client, SimpleQueryMessage};

/// How long a replica may take to (re)join the rotation in these tests.
const ROTATION_DEADLINE: Duration = Duration::from_secs(10);

/// `code: message` of a tokio-postgres error (Display only says "db error").
fn describe_err(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => format!("{e} ({e:?})"),
    }
}

/// The first row of the first result of a simple query, as (column name,
/// text value) pairs. Panics on error or when no row comes back.
async fn first_row(c: &Client, sql: &str) -> Vec<(String, Option<String>)> {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe_err(&e)));
    for m in msgs {
        if let SimpleQueryMessage::Row(r) = m {
            return r
                .columns()
                .iter()
                .enumerate()
                .map(|(i, col)| (col.name().to_owned(), r.get(i).map(str::to_owned)))
                .collect();
        }
    }
    panic!("{sql}: no row returned");
}

/// The text value of column `name` in `row`.
fn column<'a>(row: &'a [(String, Option<String>)], name: &str, sql: &str) -> &'a str {
    row.iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_deref())
        .unwrap_or_else(|| panic!("{sql}: no non-null column {name:?} in {row:?}"))
}

fn parse_bool(v: &str, sql: &str) -> bool {
    match v {
        "t" => true,
        "f" => false,
        other => panic!("{sql}: expected a boolean, got {other:?}"),
    }
}

/// Runs `sql` with the simple protocol; its first result row has a
/// `pg_is_in_recovery` column. True if it ran on a replica.
async fn on_replica(c: &Client, sql: &str) -> bool {
    let row = first_row(c, sql).await;
    parse_bool(column(&row, "pg_is_in_recovery", sql), sql)
}

/// Polls `SELECT pg_is_in_recovery()` until a read is served by a replica.
async fn wait_for_replica_reads(c: &Client, px: &Pgmux) {
    let deadline = Instant::now() + ROTATION_DEADLINE;
    while !on_replica(c, "SELECT pg_is_in_recovery()").await {
        assert!(
            Instant::now() < deadline,
            "reads were not routed to a replica within {ROTATION_DEADLINE:?}\n--- pgmux log ---\n{}",
            px.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls reads until every port in `ports` has served one.
async fn wait_for_ports(c: &Client, px: &Pgmux, ports: &[u16]) {
    let deadline = Instant::now() + ROTATION_DEADLINE;
    let mut seen = BTreeMap::new();
    loop {
        let sql = "SELECT current_setting('port') AS port";
        let port: u16 = column(&first_row(c, sql).await, "port", sql)
            .parse()
            .expect("port");
        *seen.entry(port).or_insert(0u32) += 1;
        if ports.iter().all(|p| seen.contains_key(p)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reads did not reach every replica {ports:?} within {ROTATION_DEADLINE:?}; served by {seen:?}\n--- pgmux log ---\n{}",
            px.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. Routing rules
// ---------------------------------------------------------------------------

/// Every rule of the classification, one assertion each. read_your_writes is
/// off here so that each statement's placement depends only on its own text
/// (read-your-writes has its own tests below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_replicas_and_everything_else_to_the_primary() {
    let env = TestDb::with_replicas("route rules", 2);
    env.setup(
        "CREATE TABLE t(id int);
         INSERT INTO t VALUES (0);
         CREATE SEQUENCE s;
         CREATE FUNCTION my_writer() RETURNS int LANGUAGE sql AS 'SELECT 1';
         CREATE FUNCTION my_reader() RETURNS int LANGUAGE sql AS 'SELECT 2';",
    );
    env.cluster.sync_replicas();
    let px = env.pgmux_with_replicas(
        &[],
        &[
            ("PGMUX_WRITE_FUNCTIONS", "my_writer"),
            ("PGMUX_READ_YOUR_WRITES", "off"),
        ],
    );
    let c = connect(&env.url(&px)).await;
    wait_for_replica_reads(&c, &px).await;
    let replica_ports = env.cluster.replica_ports();

    // --- To a replica.
    for sql in [
        "SELECT pg_is_in_recovery()",
        "SELECT pg_is_in_recovery() FROM t",
        "SELECT pg_is_in_recovery(), my_reader()",
        "/* pgmux:replica */ SELECT pg_is_in_recovery()",
        "SELECT pg_is_in_recovery(); SELECT 1",
    ] {
        assert!(on_replica(&c, sql).await, "{sql}: expected a replica");
    }
    let sql = "SHOW port";
    let port: u16 = column(&first_row(&c, sql).await, "port", sql)
        .parse()
        .unwrap();
    assert!(
        replica_ports.contains(&port),
        "{sql}: served by port {port}, expected a replica {replica_ports:?}"
    );
    let sql = "VALUES (pg_is_in_recovery())";
    let row = first_row(&c, sql).await;
    assert_eq!(
        column(&row, "column1", sql),
        "t",
        "{sql}: expected a replica"
    );
    // Extended protocol, unnamed statement (Parse/Bind/Execute/Sync).
    for _ in 0..3 {
        let rows = c
            .query_typed("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap();
        assert!(
            rows[0].get::<_, bool>(0),
            "unnamed extended read: expected a replica"
        );
    }
    // Extended protocol, named prepared statement, executed several times.
    let stmt = c
        .prepare("SELECT pg_is_in_recovery(), current_setting('port')::int")
        .await
        .unwrap();
    for _ in 0..5 {
        let row = c.query_one(&stmt, &[]).await.unwrap();
        assert!(
            row.get::<_, bool>(0),
            "named prepared read: expected a replica"
        );
        let port = row.get::<_, i32>(1) as u16;
        assert!(replica_ports.contains(&port), "served by port {port}");
    }
    // `query` with a text: prepare + execute + close, with a parameter.
    let row = c
        .query_one("SELECT pg_is_in_recovery(), $1::int + 1", &[&41i32])
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "query(text) read: expected a replica"
    );
    assert_eq!(row.get::<_, i32>(1), 42);

    // BEGIN READ ONLY: the whole transaction stays on one replica.
    c.simple_query("BEGIN READ ONLY").await.unwrap();
    let first = first_row(
        &c,
        "SELECT pg_is_in_recovery(), current_setting('port') AS port",
    )
    .await;
    let second = first_row(
        &c,
        "SELECT pg_is_in_recovery(), current_setting('port') AS port",
    )
    .await;
    c.simple_query("COMMIT").await.unwrap();
    assert_eq!(column(&first, "pg_is_in_recovery", "BEGIN READ ONLY"), "t");
    assert_eq!(
        column(&first, "port", "BEGIN READ ONLY"),
        column(&second, "port", "BEGIN READ ONLY"),
        "a read-only transaction moved between servers"
    );
    // START TRANSACTION with other modes before READ ONLY.
    c.simple_query("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .unwrap();
    let row = first_row(
        &c,
        "SELECT pg_is_in_recovery(), current_setting('transaction_isolation') AS iso",
    )
    .await;
    c.simple_query("COMMIT").await.unwrap();
    assert_eq!(
        column(&row, "pg_is_in_recovery", "START TRANSACTION … READ ONLY"),
        "t"
    );
    assert_eq!(
        column(&row, "iso", "START TRANSACTION … READ ONLY"),
        "repeatable read"
    );
    // BEGIN READ ONLY and a read in one simple query, COMMIT on its own.
    assert!(
        on_replica(&c, "BEGIN READ ONLY; SELECT pg_is_in_recovery()").await,
        "BEGIN READ ONLY; SELECT … in one query: expected a replica"
    );
    c.simple_query("COMMIT").await.unwrap();
    // tokio-postgres' read-only transaction builder, extended-protocol reads inside.
    {
        let mut c2 = connect(&env.url(&px)).await;
        let tx = c2
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .unwrap();
        for _ in 0..2 {
            let row = tx
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .unwrap();
            assert!(
                row.get::<_, bool>(0),
                "read-only Transaction: expected a replica"
            );
        }
        tx.commit().await.unwrap();
    }

    // --- To the primary.
    c.simple_query("BEGIN").await.unwrap();
    let in_write_txn = on_replica(&c, "SELECT pg_is_in_recovery()").await;
    c.simple_query("COMMIT").await.unwrap();
    assert!(
        !in_write_txn,
        "SELECT inside BEGIN … COMMIT: expected the primary"
    );
    {
        let mut c2 = connect(&env.url(&px)).await;
        let tx = c2.transaction().await.unwrap();
        let row = tx
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert!(
            !row.get::<_, bool>(0),
            "tokio-postgres Transaction: expected the primary"
        );
    }
    for sql in [
        "SELECT nextval('s'), pg_is_in_recovery()",
        "SELECT pg_is_in_recovery() FROM t FOR UPDATE",
        "SELECT x.pg_is_in_recovery FROM (SELECT pg_is_in_recovery() FROM t FOR SHARE) x",
        "WITH x AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT pg_is_in_recovery() FROM x",
        "/* pgmux:primary */ SELECT pg_is_in_recovery()",
        "-- pgmux:primary\nSELECT pg_is_in_recovery()",
        "SELECT pg_is_in_recovery(), pg_try_advisory_xact_lock(1)",
        "SELECT pg_is_in_recovery(), txid_current()",
        "SELECT my_writer(), pg_is_in_recovery()",
        "SELECT pg_is_in_recovery(); INSERT INTO t VALUES (2)",
    ] {
        assert!(!on_replica(&c, sql).await, "{sql}: expected the primary");
    }
    // SELECT … INTO creates a table: it must have run on the primary (on a
    // replica it fails with 25006), and it recorded where it ran.
    c.simple_query("SELECT pg_is_in_recovery() AS ran_on_replica INTO into_target")
        .await
        .unwrap_or_else(|e| panic!("SELECT … INTO: {}", describe_err(&e)));
    assert_eq!(env.psql("SELECT ran_on_replica FROM into_target"), "f");
    // Extended protocol: write functions and row locks in a Parse text.
    for sql in [
        "SELECT nextval('s'), pg_is_in_recovery()",
        "SELECT pg_is_in_recovery() FROM t WHERE id = 0 FOR UPDATE",
        "SELECT my_writer(), pg_is_in_recovery()",
    ] {
        let rows = c.query_typed(sql, &[]).await.unwrap();
        assert!(
            !rows[0].get::<_, bool>("pg_is_in_recovery"),
            "{sql} (extended): expected the primary"
        );
        let row = c.query_one(sql, &[]).await.unwrap();
        assert!(
            !row.get::<_, bool>("pg_is_in_recovery"),
            "{sql} (named statement): expected the primary"
        );
    }
    // --- Writes work, and replicas serve them once replayed.
    c.simple_query("INSERT INTO t VALUES (42)").await.unwrap();
    c.execute("INSERT INTO t VALUES ($1)", &[&43i32])
        .await
        .unwrap();
    env.cluster.sync_replicas();
    let sql = "SELECT pg_is_in_recovery(), count(*) AS n FROM t WHERE id IN (42, 43)";
    let row = first_row(&c, sql).await;
    assert_eq!(column(&row, "pg_is_in_recovery", sql), "t");
    assert_eq!(column(&row, "n", sql), "2");
    assert_eq!(env.psql("SELECT count(*) FROM t WHERE id IN (42, 43)"), "2");
}

/// A whole read-only transaction sent as one simple query (what `psql -c`
/// or a driver's batch sends) is a `BEGIN READ ONLY` transaction too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transaction_sent_as_one_query_runs_on_a_replica() {
    let env = TestDb::with_replicas("route ro batch", 2);
    let px = env.pgmux_with_replicas(&[], &[("PGMUX_READ_YOUR_WRITES", "off")]);
    let c = connect(&env.url(&px)).await;
    wait_for_replica_reads(&c, &px).await;
    for sql in [
        "BEGIN READ ONLY; SELECT pg_is_in_recovery(); COMMIT",
        "START TRANSACTION READ ONLY; SELECT pg_is_in_recovery(); COMMIT;",
    ] {
        assert!(on_replica(&c, sql).await, "{sql}: expected a replica");
    }
}

/// Text pgmux cannot classify goes to the primary: a syntax error (the
/// server reports it, the client goes on), and a statement PostgreSQL runs
/// fine but whose tree is deeper than pgmux's parser output decoder accepts
/// (`1 + 1 + … + 1`, documented as unparseable from about 50 terms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_statements_go_to_the_primary() {
    let env = TestDb::with_replicas("route unparseable", 2);
    let px = env.pgmux_with_replicas(&[], &[("PGMUX_READ_YOUR_WRITES", "off")]);
    let c = connect(&env.url(&px)).await;
    wait_for_replica_reads(&c, &px).await;

    let err = c
        .simple_query("SELEC pg_is_in_recovery()")
        .await
        .unwrap_err();
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("42601"),
        "{}",
        describe_err(&err)
    );
    // The error does not take the client (or a replica) out of routing.
    wait_for_replica_reads(&c, &px).await;

    for terms in [60, 100, 300] {
        let sum = vec!["1"; terms].join(" + ");
        let sql = format!("SELECT pg_is_in_recovery(), {sum} AS total");
        let rows = match c.simple_query(&sql).await {
            Ok(rows) => rows,
            Err(e) => panic!(
                "{terms} terms: {}\n--- pgmux log ---\n{}",
                describe_err(&e),
                px.log()
            ),
        };
        let row = rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .expect("a row");
        assert_eq!(row.get("total"), Some(terms.to_string().as_str()));
        assert_eq!(
            row.get("pg_is_in_recovery"),
            Some("f"),
            "{terms} terms: expected the primary"
        );
    }
    // Ordinary reads still go to replicas.
    assert!(on_replica(&c, "SELECT pg_is_in_recovery()").await);
}

/// read_routing from the environment (primary_only, replica_only) and from a
/// config file, per database and per user (the user's setting wins).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_routing_modes_from_env_and_config_file() {
    let env = TestDb::with_replicas("route modes", 2);
    env.setup("CREATE TABLE t(id int)");
    let reporter = format!("{}_reporter", env.user);
    let reporter_pw = "reporter-secret";
    env.cluster.create_role(&reporter, reporter_pw);
    env.cluster.sync_replicas();

    // primary_only: nothing reaches a replica, whatever the text says.
    {
        let px = env.pgmux_with_replicas(&[], &[("PGMUX_READ_ROUTING", "primary_only")]);
        let c = connect(&env.url(&px)).await;
        for _ in 0..20 {
            assert!(
                !on_replica(&c, "SELECT pg_is_in_recovery()").await,
                "primary_only: autocommit read"
            );
        }
        assert!(
            !on_replica(&c, "/* pgmux:replica */ SELECT pg_is_in_recovery()").await,
            "primary_only: replica hint"
        );
        assert!(
            !on_replica(&c, "BEGIN READ ONLY; SELECT pg_is_in_recovery(); COMMIT").await,
            "primary_only: BEGIN READ ONLY"
        );
        let row = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap();
        assert!(!row.get::<_, bool>(0), "primary_only: extended read");
    }

    // replica_only: even a plain BEGIN transaction runs on a replica, and a
    // write there fails as on any replica.
    {
        let px = env.pgmux_with_replicas(&[], &[("PGMUX_READ_ROUTING", "replica_only")]);
        let c = connect(&env.url(&px)).await;
        wait_for_replica_reads(&c, &px).await;
        c.simple_query("BEGIN").await.unwrap();
        let in_txn = on_replica(&c, "SELECT pg_is_in_recovery()").await;
        c.simple_query("COMMIT").await.unwrap();
        assert!(
            in_txn,
            "replica_only: SELECT inside a plain BEGIN: expected a replica"
        );
        let err = c
            .simple_query("INSERT INTO t VALUES (1)")
            .await
            .expect_err("replica_only: an INSERT cannot succeed on a replica");
        assert_eq!(
            err.code().map(|c| c.code()),
            Some("25006"),
            "{}",
            describe_err(&err)
        );
    }

    // Config file: the database says primary_only, one user says replica_only.
    {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgmux.toml");
        let replicas: Vec<String> = env
            .cluster
            .replica_ports()
            .iter()
            .map(|p| format!("\"postgres://127.0.0.1:{p}/{}\"", env.db))
            .collect();
        let text = format!(
            "[databases.{db}]\n\
             url = \"{url}\"\n\
             replicas = [{replicas}]\n\
             read_routing = \"primary_only\"\n\
             \n\
             [users.{reporter}]\n\
             password = \"{reporter_pw}\"\n\
             read_routing = \"replica_only\"\n",
            db = env.db,
            url = env.database_url(),
            replicas = replicas.join(", "),
        );
        std::fs::write(&file, text).unwrap();
        let px = Pgmux::start(&["--config", file.to_str().unwrap()], &[]);
        let owner = connect(&env.url(&px)).await;
        let rep = connect(&px.url(&reporter, reporter_pw, &env.db)).await;
        wait_for_replica_reads(&rep, &px).await;
        rep.simple_query("BEGIN").await.unwrap();
        let in_txn = on_replica(&rep, "SELECT pg_is_in_recovery()").await;
        rep.simple_query("COMMIT").await.unwrap();
        assert!(
            in_txn,
            "user read_routing = replica_only: expected a replica"
        );
        for _ in 0..10 {
            assert!(
                !on_replica(&owner, "SELECT pg_is_in_recovery()").await,
                "database read_routing = primary_only: expected the primary"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 2. Read-your-writes
// ---------------------------------------------------------------------------

const APPLY_DELAY: &str = "2s";

/// A cluster whose replicas apply WAL 2 s late, with table `items(id int)`
/// owned by the test user.
fn delayed_replicas(prefix: &str) -> TestDb {
    let env = TestDb::with_replicas(prefix, 2);
    env.setup("CREATE TABLE items(id int)");
    env.cluster.sync_replicas();
    for r in env.cluster.replicas() {
        r.set_conf("recovery_min_apply_delay", APPLY_DELAY);
    }
    for r in env.cluster.replicas() {
        r.wait_setting(
            "recovery_min_apply_delay",
            APPLY_DELAY,
            Duration::from_secs(10),
        );
    }
    env
}

/// (in_recovery, rows with this id) for a read of `items`.
async fn read_item(c: &Client, id: i32) -> (bool, i64) {
    let sql = format!("SELECT pg_is_in_recovery(), count(*) AS n FROM items WHERE id = {id}");
    let row = first_row(c, &sql).await;
    (
        parse_bool(column(&row, "pg_is_in_recovery", &sql), &sql),
        column(&row, "n", &sql).parse().unwrap(),
    )
}

/// Default scope (user): a client reads its own writes at once, and so does
/// another connection of the same user; once the replicas have replayed the
/// writes, the user's reads go back to the replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_user_scope_with_lagging_replicas() {
    let env = delayed_replicas("ryw user");
    let px = env.pgmux_with_replicas(&[], &[]);
    let writer = connect(&env.url(&px)).await;
    let other = connect(&env.url(&px)).await;
    wait_for_replica_reads(&writer, &px).await;
    let direct_replica =
        connect(&env.cluster.replicas()[0].url(&env.user, &env.password, &env.db)).await;

    // (a) The writer reads its row right after each INSERT (simple and
    // extended protocol).
    let mut id = 0;
    for i in 0..25 {
        id += 1;
        let started = Instant::now();
        if i % 2 == 0 {
            writer
                .simple_query(&format!("INSERT INTO items VALUES ({id})"))
                .await
                .unwrap();
            let (on_replica, n) = read_item(&writer, id).await;
            assert_eq!(
                n, 1,
                "iteration {i}: the writer does not see its row (read on replica: {on_replica})"
            );
        } else {
            writer
                .execute("INSERT INTO items VALUES ($1)", &[&id])
                .await
                .unwrap();
            let row = writer
                .query_one(
                    "SELECT pg_is_in_recovery(), count(*) FROM items WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            assert_eq!(
                row.get::<_, i64>(1),
                1,
                "iteration {i} (extended): the writer does not see its row (read on replica: {})",
                row.get::<_, bool>(0)
            );
        }
        if i == 0 {
            // Control: the replicas really lag, so the read above would
            // have missed the row there.
            let n: i64 = direct_replica
                .query_one("SELECT count(*) FROM items WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            if started.elapsed() < Duration::from_millis(1500) {
                assert_eq!(
                    n, 0,
                    "the replica applied the INSERT in under {APPLY_DELAY}"
                );
            }
        }
    }

    // (b) Another connection of the same user reads right after the
    // writer's INSERT.
    for i in 0..25 {
        id += 1;
        writer
            .simple_query(&format!("INSERT INTO items VALUES ({id})"))
            .await
            .unwrap();
        let (on_replica, n) = read_item(&other, id).await;
        assert_eq!(n, 1, "iteration {i}: the user's other connection does not see the row (read on replica: {on_replica})");
    }

    // (d) Once the replicas have replayed the writes, the user's reads are
    // served by replicas again, and they show everything written.
    for round in 0..3 {
        let last_write = Instant::now();
        let deadline = last_write + Duration::from_secs(10);
        loop {
            let sql = "SELECT pg_is_in_recovery(), count(*) AS n FROM items";
            let row = first_row(&writer, sql).await;
            let n: i64 = column(&row, "n", sql).parse().unwrap();
            assert_eq!(
                n,
                i64::from(id),
                "round {round}: a read of the writer's user missed rows: {row:?}"
            );
            if parse_bool(column(&row, "pg_is_in_recovery", sql), sql) {
                eprintln!(
                    "round {round}: the user's reads are back on a replica {:?} after its last write",
                    last_write.elapsed()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the writer's reads stayed on the primary for 10 s after its last write\n--- pgmux log ---\n{}",
                px.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Back on the replicas: a new write is again read back at once, by
        // the writer and by the user's other connection.
        id += 1;
        writer
            .simple_query(&format!("INSERT INTO items VALUES ({id})"))
            .await
            .unwrap();
        let (other_on_replica, other_n) = read_item(&other, id).await;
        let (writer_on_replica, writer_n) = read_item(&writer, id).await;
        assert_eq!(
            other_n, 1,
            "round {round}: other connection (on replica: {other_on_replica})"
        );
        assert_eq!(
            writer_n, 1,
            "round {round}: writer (on replica: {writer_on_replica})"
        );
    }
}

/// Scope client: only the writing connection waits for its writes; another
/// connection of the same user keeps reading from the (stale) replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_client_scope_leaves_other_clients_on_replicas() {
    let env = delayed_replicas("ryw client");
    let px = env.pgmux_with_replicas(&[], &[("PGMUX_READ_YOUR_WRITES", "client")]);
    let writer = connect(&env.url(&px)).await;
    let other = connect(&env.url(&px)).await;
    wait_for_replica_reads(&other, &px).await;
    wait_for_replica_reads(&writer, &px).await;

    for id in 1..=10 {
        let started = Instant::now();
        writer
            .simple_query(&format!("INSERT INTO items VALUES ({id})"))
            .await
            .unwrap();
        let (other_on_replica, other_n) = read_item(&other, id).await;
        let elapsed = started.elapsed();
        let (writer_on_replica, writer_n) = read_item(&writer, id).await;
        assert!(
            other_on_replica,
            "row {id}: another client's read went to the primary under read_your_writes = client"
        );
        // The replicas apply commits 2 s late: a read this soon cannot see it.
        if elapsed < Duration::from_millis(1500) {
            assert_eq!(
                other_n, 0,
                "row {id}: visible on a replica after {elapsed:?}"
            );
        }
        assert_eq!(
            writer_n, 1,
            "row {id}: the writer does not see its own row (read on replica: {writer_on_replica})"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Failover
// ---------------------------------------------------------------------------

/// One read of the workload.
#[derive(Clone, Copy, Debug)]
struct Served {
    started: Instant,
    port: u16,
    in_recovery: bool,
}

#[derive(Default)]
struct Workload {
    served: Mutex<Vec<Served>>,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Workload {
    /// Reads started after `since`, in completion order.
    fn since(&self, since: Instant) -> Vec<Served> {
        self.served
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.started >= since)
            .copied()
            .collect()
    }

    fn count_by_port(reads: &[Served]) -> BTreeMap<u16, usize> {
        let mut out = BTreeMap::new();
        for r in reads {
            *out.entry(r.port).or_insert(0) += 1;
        }
        out
    }
}

async fn read_loop(url: String, w: Arc<Workload>, t0: Instant, task: usize) {
    let sql = "SELECT pg_is_in_recovery(), current_setting('port')";
    let mut client: Option<Client> = None;
    while !w.stop.load(Ordering::Relaxed) {
        let c = match &client {
            Some(c) => c,
            None => match try_connect(&url).await {
                Ok(c) => client.insert(c),
                Err(e) => {
                    w.errors.lock().unwrap().push(format!(
                        "task {task} at {:?}: connect: {}",
                        t0.elapsed(),
                        describe_err(&e)
                    ));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        match c.simple_query(sql).await {
            Ok(msgs) => {
                let row = msgs
                    .iter()
                    .find_map(|m| match m {
                        SimpleQueryMessage::Row(r) => Some(r),
                        _ => None,
                    })
                    .expect("a row");
                w.served.lock().unwrap().push(Served {
                    started,
                    in_recovery: row.get(0) == Some("t"),
                    port: row.get(1).unwrap().parse().unwrap(),
                });
            }
            Err(e) => {
                w.errors.lock().unwrap().push(format!(
                    "task {task}: query started at {:?} failed at {:?}: {}",
                    started - t0,
                    t0.elapsed(),
                    describe_err(&e)
                ));
                // Every error here ends the connection (the workload's
                // statement is valid): reconnect rather than count the same
                // loss again on the next query.
                client = None;
            }
        }
    }
}

/// Polls until `done(reads started after since)` holds.
async fn wait_for_reads(
    w: &Workload,
    px: &Pgmux,
    since: Instant,
    what: &str,
    done: impl Fn(&[Served]) -> bool,
) {
    let deadline = Instant::now() + ROTATION_DEADLINE;
    loop {
        let reads = w.since(since);
        if done(&reads) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not reached within {ROTATION_DEADLINE:?}; reads since by port: {:?}; errors: {:#?}\n--- pgmux log ---\n{}",
                Workload::count_by_port(&reads),
                w.errors.lock().unwrap(),
                px.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replicas stopped and started under a read workload: reads move to the
/// remaining replica, then to the primary, then back; no client sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_going_down_and_up_under_a_read_workload() {
    let env = TestDb::with_replicas("failover", 2);
    let px = env.pgmux_with_replicas(&[], &[]);
    let primary_port = env.cluster.primary().port;
    let [r0, r1] = [&env.cluster.replicas()[0], &env.cluster.replicas()[1]];
    let t0 = Instant::now();
    let w = Arc::new(Workload::default());
    let tasks: Vec<_> = (0..4)
        .map(|i| tokio::spawn(read_loop(env.url(&px), w.clone(), t0, i)))
        .collect();
    const WINDOW: usize = 200;
    // The last `WINDOW` reads all came from `port` (and pg_is_in_recovery()
    // agrees on whether that is a replica).
    let settled_on = |port: u16| {
        move |reads: &[Served]| {
            reads.len() >= WINDOW
                && reads[reads.len() - WINDOW..]
                    .iter()
                    .all(|r| r.port == port && r.in_recovery == (port != primary_port))
        }
    };

    wait_for_reads(&w, &px, t0, "both replicas in rotation", |reads| {
        let by_port = Workload::count_by_port(reads);
        by_port.contains_key(&r0.port) && by_port.contains_key(&r1.port)
    })
    .await;

    // One replica down: the other serves the reads.
    eprintln!("stopping replica {} at {:?}", r0.port, t0.elapsed());
    r0.stop();
    eprintln!("replica {} stopped at {:?}", r0.port, t0.elapsed());
    let after = Instant::now();
    wait_for_reads(
        &w,
        &px,
        after,
        "reads served by the remaining replica",
        settled_on(r1.port),
    )
    .await;

    // Both down: the primary serves the reads.
    eprintln!("stopping replica {} at {:?}", r1.port, t0.elapsed());
    r1.stop();
    eprintln!("replica {} stopped at {:?}", r1.port, t0.elapsed());
    let after = Instant::now();
    wait_for_reads(
        &w,
        &px,
        after,
        "reads served by the primary",
        settled_on(primary_port),
    )
    .await;

    // Both back: both are used again.
    r0.start();
    r1.start();
    let after = Instant::now();
    wait_for_reads(&w, &px, after, "both replicas back in rotation", |reads| {
        let by_port = Workload::count_by_port(reads);
        by_port.get(&r0.port).is_some_and(|n| *n >= 20)
            && by_port.get(&r1.port).is_some_and(|n| *n >= 20)
    })
    .await;

    w.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let total = w.served.lock().unwrap().len();
    let by_port = Workload::count_by_port(&w.served.lock().unwrap());
    eprintln!(
        "{total} reads, by port: {by_port:?} (primary {primary_port}, replicas {}, {})",
        r0.port, r1.port
    );
    let errors = w.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} client errors during failover ({total} reads ok):\n{}\n--- pgmux log ---\n{}",
        errors.len(),
        errors.join("\n"),
        px.log()
    );
}

// ---------------------------------------------------------------------------
// 4. Load balancing
// ---------------------------------------------------------------------------

/// With both replicas healthy, reads spread over both, from one client and
/// from many concurrent ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_are_spread_over_healthy_replicas() {
    let env = TestDb::with_replicas("balance", 2);
    let px = env.pgmux_with_replicas(&[], &[]);
    let ports = env.cluster.replica_ports();
    let c = connect(&env.url(&px)).await;
    wait_for_ports(&c, &px, &ports).await;

    let sql = "SELECT current_setting('port') AS port";
    // One client, one read at a time: ties are broken at random.
    let mut sequential = BTreeMap::new();
    for _ in 0..200 {
        let port: u16 = column(&first_row(&c, sql).await, "port", sql)
            .parse()
            .unwrap();
        *sequential.entry(port).or_insert(0usize) += 1;
    }
    // Eight clients at once.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = env.url(&px);
            tokio::spawn(async move {
                let c = connect(&url).await;
                let mut ports = Vec::new();
                for _ in 0..100 {
                    let row = c
                        .query_one("SELECT current_setting('port')::int", &[])
                        .await
                        .unwrap();
                    ports.push(row.get::<_, i32>(0) as u16);
                }
                ports
            })
        })
        .collect();
    let mut concurrent = BTreeMap::new();
    for t in tasks {
        for port in t.await.unwrap() {
            *concurrent.entry(port).or_insert(0usize) += 1;
        }
    }
    for (what, counts, total) in [
        ("sequential", &sequential, 200),
        ("concurrent", &concurrent, 800),
    ] {
        let on_replicas: usize = ports
            .iter()
            .map(|p| counts.get(p).copied().unwrap_or(0))
            .sum();
        assert_eq!(
            on_replicas, total,
            "{what}: reads not served by a replica: {counts:?} (replicas {ports:?})"
        );
        for p in &ports {
            let n = counts.get(p).copied().unwrap_or(0);
            assert!(
                n * 5 >= total,
                "{what}: replica {p} served {n} of {total} reads: {counts:?}"
            );
        }
    }
}
