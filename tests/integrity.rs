//! Data integrity under faults (issue "Reliability and security under faults"): 40
//! clients move money between 100 accounts through pgmux (pool much smaller than the
//! client count), each transfer a transaction that updates two balances and inserts a
//! ledger row whose id the client chose. Meanwhile a chaos thread terminates pgmux's
//! backends (`pg_terminate_backend`), kills the primary (`pg_ctl stop -m immediate`) and
//! starts it again, and resizes the pool live through the admin API.
//!
//! Clients retry with a fresh transaction (a new ledger id) after any connection-class
//! error and reconnect when their connection was closed. Each attempt ends as
//! * acknowledged: COMMIT (or the one-query transaction) answered OK;
//! * failed: an error before COMMIT was sent (or a statement error in the one-query
//!   form): it must not be in the ledger;
//! * ambiguous: the COMMIT's answer was lost (error or timeout at COMMIT, a connection
//!   error in the one-query form): it may or may not be in the ledger.
//!
//! At the end: the sum of balances is unchanged; every account's balance is its initial
//! balance plus the net flow of the ledger; every acknowledged transfer is in the ledger,
//! no failed one is, and the ledger holds nothing else (the primary key rules out a
//! transfer committed twice); no operation waited forever; pgmux's servers are the
//! user's backends again. Figures are printed (`--no-capture`).
//!
//! Three client styles share the work: one simple query per statement, tokio-postgres's
//! extended protocol (prepared statements, `Transaction`), and the whole transaction in
//! one simple query (`BEGIN; …; COMMIT`).
//!
//! The cluster runs with `synchronous_commit = off` for speed; this test's database sets
//! it `on`, since a PostgreSQL crash may otherwise lose acknowledged commits by design.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{admin_patch, quote_ident, quote_literal, Rng, TestDb};
use tokio_postgres::{Client, NoTls};

const ACCOUNTS: i64 = 100;
const INITIAL: i64 = 1000;
const CLIENTS: usize = 40;
const POOL: usize = 6;
const RUN: Duration = Duration::from_secs(20);
/// Deadline of one statement (query_wait_timeout is 15 s).
const STEP_TIMEOUT: Duration = Duration::from_secs(25);

#[derive(Default)]
struct Outcomes {
    acknowledged: Vec<i64>,
    failed: Vec<i64>,
    ambiguous: Vec<i64>,
    /// Errors by class (SQLSTATE, `closed`, `timeout`), with an example.
    errors: BTreeMap<String, (u64, String)>,
    /// Errors that are neither connection nor shutdown class (a bug: reported).
    unexpected: Vec<String>,
    /// Every error: (seconds since the start, client, detail).
    all_errors: Vec<(f64, usize, String)>,
    connects: u64,
}

fn class_of(e: &tokio_postgres::Error) -> (String, String) {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code().to_string();
        (
            code.clone(),
            format!("{} {code}: {}", db.severity(), db.message()),
        )
    } else if e.is_closed() {
        ("closed".into(), e.to_string())
    } else {
        ("other".into(), format!("{e} ({e:?})"))
    }
}

/// Errors a transfer may meet while servers are killed: connection and shutdown class,
/// pgmux's own 57014 (query_wait_timeout while the primary restarts), and PostgreSQL's
/// "cannot connect now" while it starts. Anything else is unexpected.
fn expected_class(class: &str) -> bool {
    class == "closed" || class.starts_with("08") || matches!(class, "57P01" | "57P02" | "57P03")
}

enum Step {
    /// The error came before COMMIT was sent: nothing can have committed.
    BeforeCommit,
    /// The COMMIT (or the one-query transaction) got no clear answer.
    AtCommit,
}

struct Transfer {
    id: i64,
    from: i64,
    to: i64,
    amount: i64,
}

impl Transfer {
    /// The two balance updates, lower account first (no deadlocks), and the ledger row.
    fn statements(&self) -> [String; 3] {
        let (a, b) = if self.from < self.to {
            ((self.from, -self.amount), (self.to, self.amount))
        } else {
            ((self.to, self.amount), (self.from, -self.amount))
        };
        [
            format!(
                "UPDATE accounts SET balance = balance + ({}) WHERE id = {}",
                a.1, a.0
            ),
            format!(
                "UPDATE accounts SET balance = balance + ({}) WHERE id = {}",
                b.1, b.0
            ),
            format!(
                "INSERT INTO transfers (id, src, dst, amount) VALUES ({}, {}, {}, {})",
                self.id, self.from, self.to, self.amount
            ),
        ]
    }
}

async fn step<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    at: fn() -> Step,
    label: &str,
) -> Result<T, (Step, String, String)> {
    match tokio::time::timeout(STEP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let (class, detail) = class_of(&e);
            Err((at(), class, format!("[{label}] {detail}")))
        }
        Err(_) => Err((
            at(),
            "timeout".into(),
            format!("[{label}] no answer within {STEP_TIMEOUT:?}"),
        )),
    }
}

fn before() -> Step {
    Step::BeforeCommit
}

fn at_commit() -> Step {
    Step::AtCommit
}

/// One transfer in the client's style.
async fn transfer(
    client: &mut Client,
    style: usize,
    t: &Transfer,
) -> Result<(), (Step, String, String)> {
    let [u1, u2, ins] = t.statements();
    match style {
        0 => {
            step(client.batch_execute("BEGIN"), before, "BEGIN").await?;
            step(client.batch_execute(&u1), before, "UPDATE 1").await?;
            step(client.batch_execute(&u2), before, "UPDATE 2").await?;
            step(client.batch_execute(&ins), before, "INSERT").await?;
            step(client.batch_execute("COMMIT"), at_commit, "COMMIT").await
        }
        1 => {
            let (a, b) = if t.from < t.to {
                ((t.from, -t.amount), (t.to, t.amount))
            } else {
                ((t.to, t.amount), (t.from, -t.amount))
            };
            let tx = step(client.transaction(), before, "BEGIN (extended)").await?;
            let update = "UPDATE accounts SET balance = balance + $1 WHERE id = $2";
            step(
                tx.execute(update, &[&a.1, &a.0]),
                before,
                "UPDATE 1 (extended)",
            )
            .await?;
            step(
                tx.execute(update, &[&b.1, &b.0]),
                before,
                "UPDATE 2 (extended)",
            )
            .await?;
            step(
                tx.execute(
                    "INSERT INTO transfers (id, src, dst, amount) VALUES ($1, $2, $3, $4)",
                    &[&t.id, &t.from, &t.to, &t.amount],
                ),
                before,
                "INSERT (extended)",
            )
            .await?;
            step(tx.commit(), at_commit, "COMMIT (extended)").await
        }
        _ => {
            let sql = format!("BEGIN; {u1}; {u2}; {ins}; COMMIT");
            match step(client.batch_execute(&sql), at_commit, "one query").await {
                // A statement's own error (not the connection's): the rest was skipped.
                Err((Step::AtCommit, class, detail))
                    if class != "timeout"
                        && class != "closed"
                        && !class.starts_with("08")
                        && !class.starts_with("57P") =>
                {
                    Err((Step::BeforeCommit, class, detail))
                }
                r => r,
            }
        }
    }
}

async fn client_task(
    id: usize,
    url: String,
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU64>,
    t0: Instant,
) -> Outcomes {
    let style = id % 3;
    let mut rng = Rng::new(id as u64 + 1);
    let mut out = Outcomes::default();
    let mut client: Option<Client> = None;
    // How the current connection ended (the FATAL a driver reads between requests).
    let mut ended: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut seq = 0i64;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            out.connects += 1;
            match tokio::time::timeout(STEP_TIMEOUT, tokio_postgres::connect(&url, NoTls)).await {
                Ok(Ok((c, conn))) => {
                    ended = Arc::default();
                    let e2 = ended.clone();
                    tokio::spawn(async move {
                        let why = match conn.await {
                            Ok(()) => "eof".to_string(),
                            Err(e) => match e.as_db_error() {
                                Some(db) => format!("{} {}", db.code().code(), db.message()),
                                None => e.to_string(),
                            },
                        };
                        *e2.lock().unwrap() = Some(why);
                    });
                    client = Some(c);
                }
                Ok(Err(e)) => {
                    let (class, detail) = class_of(&e);
                    let entry = out
                        .errors
                        .entry(format!("connect:{class}"))
                        .or_insert((0, detail.clone()));
                    entry.0 += 1;
                    if !expected_class(&class) {
                        out.unexpected
                            .push(format!("client {id} connect: {detail}"));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => {
                    out.unexpected
                        .push(format!("client {id}: connect took over {STEP_TIMEOUT:?}"));
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        seq += 1;
        let from = 1 + rng.below(ACCOUNTS as u64) as i64;
        let mut to = 1 + rng.below(ACCOUNTS as u64 - 1) as i64;
        if to >= from {
            to += 1;
        }
        let t = Transfer {
            id: (id as i64 + 1) * 10_000_000 + seq,
            from,
            to,
            amount: 1 + rng.below(100) as i64,
        };
        attempts.fetch_add(1, Ordering::Relaxed);
        match transfer(c, style, &t).await {
            Ok(()) => out.acknowledged.push(t.id),
            Err((at, class, mut detail)) => {
                if class == "closed" {
                    let why = ended.lock().unwrap().clone();
                    detail = format!("{detail}; the connection had ended with: {why:?}");
                }
                match at {
                    Step::BeforeCommit => out.failed.push(t.id),
                    Step::AtCommit => out.ambiguous.push(t.id),
                }
                let entry = out
                    .errors
                    .entry(class.clone())
                    .or_insert((0, detail.clone()));
                entry.0 += 1;
                out.all_errors.push((
                    t0.elapsed().as_secs_f64(),
                    id,
                    format!("style {style}: {class} {detail}"),
                ));
                if !expected_class(&class) {
                    out.unexpected.push(format!(
                        "client {id} (style {style}) transfer {}: {class} {detail}",
                        t.id
                    ));
                }
                if class == "timeout" {
                    client = None;
                } else if !c.is_closed() {
                    // Style 1's Transaction rolled back when dropped; the others end theirs.
                    let rb = tokio::time::timeout(STEP_TIMEOUT, c.batch_execute("ROLLBACK")).await;
                    if !matches!(rb, Ok(Ok(()))) {
                        client = None;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    out
}

/// What the chaos thread did.
#[derive(Default, Debug)]
struct Chaos {
    terminated: u64,
    terminate_rounds: u64,
    primary_kills: u64,
    resizes: Vec<(usize, u16)>,
    /// (seconds since the start, what), for the timeline.
    events: Vec<(f64, String)>,
}

#[test]
fn transfers_survive_kills_and_live_resizes() {
    let db = TestDb::new("integrity");
    db.setup(&format!(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL); \
         INSERT INTO accounts SELECT g, {INITIAL} FROM generate_series(1, {ACCOUNTS}) g; \
         CREATE TABLE transfers (id bigint PRIMARY KEY, src bigint NOT NULL, dst bigint NOT NULL, \
                                 amount bigint NOT NULL);"
    ));
    db.psql(&format!(
        "ALTER DATABASE {} SET synchronous_commit = on;",
        quote_ident(&db.db)
    ));
    // The setup itself committed asynchronously: flush it.
    db.cluster.primary().current_wal_lsn();
    let px = db.pgmux_env(
        &["--pool-size", &POOL.to_string()],
        &[
            ("PGMUX_QUERY_WAIT_TIMEOUT", "15s"),
            ("PGMUX_SERVER_LOGIN_RETRY", "200ms"),
        ],
    );
    let url = db.url(&px);
    let fds_at_start = support::pgmux_fds(&px);
    let rt = support::runtime();
    // Commits are durable for the clients (the database's setting reaches them).
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
        tokio::spawn(conn);
        let row = c
            .query_one("SHOW synchronous_commit", &[])
            .await
            .expect("SHOW");
        assert_eq!(row.get::<_, String>(0), "on");
    });
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|id| {
            rt.spawn(client_task(
                id,
                format!("{url}?application_name=c{id}"),
                stop.clone(),
                attempts.clone(),
                started,
            ))
        })
        .collect();

    let node = db.cluster.primary();
    let pool_path = format!("/api/v1/pools/{}/{}", db.db, db.user);
    let terminate_sql = format!(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM \
         (SELECT pid FROM pg_stat_activity WHERE usename = {} AND backend_type = 'client backend' \
          ORDER BY random() LIMIT 2) s;",
        quote_literal(&db.user)
    );
    let mut chaos = Chaos::default();
    // (at, action): resize to n, terminate two backends, kill + restart the primary.
    enum Act {
        Resize(usize),
        Terminate,
        KillPrimary,
    }
    let plan = [
        (1.5, Act::Terminate),
        (2.5, Act::Resize(2)),
        (4.0, Act::Terminate),
        (5.5, Act::Resize(8)),
        (7.0, Act::Terminate),
        (8.5, Act::KillPrimary),
        (11.5, Act::Terminate),
        (12.5, Act::Resize(3)),
        (14.0, Act::Terminate),
        (15.5, Act::Resize(POOL)),
        (17.0, Act::Terminate),
        (18.5, Act::Terminate),
    ];
    for (at, act) in plan {
        let when = started + Duration::from_secs_f64(at);
        std::thread::sleep(when.saturating_duration_since(Instant::now()));
        match act {
            Act::Resize(n) => {
                let (status, body) =
                    admin_patch(&px, &pool_path, &format!("{{\"pool_size\": {n}}}"));
                assert_eq!(status, 200, "PATCH {pool_path} pool_size {n}: {body}");
                chaos.resizes.push((n, status));
                chaos
                    .events
                    .push((started.elapsed().as_secs_f64(), format!("pool_size {n}")));
            }
            Act::Terminate => {
                chaos.terminate_rounds += 1;
                let t = started.elapsed().as_secs_f64();
                if let Ok(n) = node.try_psql("postgres", &terminate_sql) {
                    let n = n.trim().parse::<u64>().unwrap_or(0);
                    chaos.terminated += n;
                    chaos.events.push((t, format!("terminated {n} backends")));
                }
            }
            Act::KillPrimary => {
                chaos
                    .events
                    .push((started.elapsed().as_secs_f64(), "primary killed".into()));
                node.kill();
                std::thread::sleep(Duration::from_millis(500));
                node.start();
                chaos
                    .events
                    .push((started.elapsed().as_secs_f64(), "primary started".into()));
                chaos.primary_kills += 1;
            }
        }
    }
    std::thread::sleep((started + RUN).saturating_duration_since(Instant::now()));
    stop.store(true, Ordering::Relaxed);
    let outcomes: Vec<Outcomes> = rt.block_on(async {
        let mut v = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match tokio::time::timeout(STEP_TIMEOUT * 6, t).await {
                Ok(Ok(o)) => v.push(o),
                Ok(Err(e)) => panic!("client {i} panicked: {e}"),
                Err(_) => panic!("client {i} did not finish its transfer"),
            }
        }
        v
    });
    let elapsed = started.elapsed();

    // The figures.
    let mut acked: HashSet<i64> = HashSet::new();
    let mut failed: HashSet<i64> = HashSet::new();
    let mut ambiguous: HashSet<i64> = HashSet::new();
    let mut errors: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut timeline: Vec<(f64, String)> = chaos.events.clone();
    let mut connects = 0;
    for o in outcomes {
        acked.extend(o.acknowledged);
        failed.extend(o.failed);
        ambiguous.extend(o.ambiguous);
        for (k, (n, ex)) in o.errors {
            let e = errors.entry(k).or_insert((0, ex));
            e.0 += n;
        }
        unexpected.extend(o.unexpected);
        timeline.extend(
            o.all_errors
                .into_iter()
                .map(|(t, c, d)| (t, format!("  client {c}: {d}"))),
        );
        connects += o.connects;
    }
    let ledger: HashSet<i64> = db
        .psql("SELECT id FROM transfers")
        .lines()
        .map(|l| l.trim().parse().expect("ledger id"))
        .collect();
    let ambiguous_landed = ambiguous.intersection(&ledger).count();
    println!(
        "integrity: {elapsed:.1?}, {CLIENTS} clients, pool_size {POOL} resized live {:?}",
        chaos.resizes.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    println!(
        "  transactions attempted {}, acknowledged {}, failed before COMMIT {}, ambiguous {} ({} of them landed), \
         reconnects {}",
        attempts.load(Ordering::Relaxed),
        acked.len(),
        failed.len(),
        ambiguous.len(),
        ambiguous_landed,
        connects - CLIENTS as u64,
    );
    println!(
        "  faults: {} backends terminated in {} rounds, {} primary kill(s) + restart, {} live resizes",
        chaos.terminated,
        chaos.terminate_rounds,
        chaos.primary_kills,
        chaos.resizes.len()
    );
    println!("  errors seen by clients, by class:");
    for (class, (n, example)) in &errors {
        println!("    {class}: {n}  e.g. {example}");
    }
    println!("  ledger rows {}", ledger.len());
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!("  timeline (faults, and every error a client saw):");
    for (t, what) in &timeline {
        println!("    {t:6.2}s {what}");
    }

    // Nothing acknowledged is missing, nothing failed is there, nothing unknown is there.
    let lost: Vec<&i64> = acked.iter().filter(|id| !ledger.contains(id)).collect();
    let ghost: Vec<&i64> = failed.iter().filter(|id| ledger.contains(id)).collect();
    let unknown: Vec<&i64> = ledger
        .iter()
        .filter(|id| !acked.contains(id) && !ambiguous.contains(id))
        .collect();
    println!(
        "  lost acknowledged commits: {}, failed transfers present: {}, unknown ledger rows: {}",
        lost.len(),
        ghost.len(),
        unknown.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged transfers missing from the ledger: {lost:?}"
    );
    assert!(
        ghost.is_empty(),
        "transfers that failed before COMMIT are in the ledger: {ghost:?}"
    );
    assert!(
        unknown.is_empty(),
        "ledger rows no client attempted: {unknown:?}"
    );
    assert_eq!(ledger.len(), acked.len() + ambiguous_landed);

    // Money is conserved, and every balance is explained by the ledger.
    let sum: i64 = db
        .psql("SELECT sum(balance) FROM accounts")
        .trim()
        .parse()
        .expect("sum");
    println!("  sum of balances {sum} (initially {})", ACCOUNTS * INITIAL);
    assert_eq!(sum, ACCOUNTS * INITIAL, "the sum of balances changed");
    let mismatched = db.psql(&format!(
        "SELECT coalesce(string_agg(a.id || ': ' || a.balance || ' vs ' || \
           ({INITIAL} + coalesce(i.s, 0) - coalesce(o.s, 0)), ', '), '') \
         FROM accounts a \
         LEFT JOIN (SELECT dst, sum(amount) s FROM transfers GROUP BY dst) i ON i.dst = a.id \
         LEFT JOIN (SELECT src, sum(amount) s FROM transfers GROUP BY src) o ON o.src = a.id \
         WHERE a.balance <> {INITIAL} + coalesce(i.s, 0) - coalesce(o.s, 0)"
    ));
    assert!(
        mismatched.is_empty(),
        "balances the ledger does not explain: {mismatched}"
    );

    assert!(
        unexpected.is_empty(),
        "{} unexpected errors:\n{}",
        unexpected.len(),
        unexpected
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        chaos.primary_kills == 1 && chaos.terminated > 0,
        "{chaos:?}"
    );
    assert!(
        acked.len() > 500,
        "only {} transfers acknowledged",
        acked.len()
    );

    support::settled_without_leaks(&px, node, node.port, &db.user, POOL, fds_at_start);
    let log = px.log();
    assert!(!log.contains("panicked at"), "pgmux panicked:\n{log}");
}
