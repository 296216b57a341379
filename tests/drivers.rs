//! Driver compatibility: real client drivers, each in its default
//! configuration, through pgmux in front of a real PostgreSQL.
//!
//! asyncpg, SQLAlchemy (async engine on asyncpg), psycopg 3 with
//! `prepare_threshold=0` and node-postgres named queries all use *named*
//! protocol-level prepared statements. Many clients share a pool of 4 server
//! connections, so a statement prepared on one server is executed on
//! another: pgmux has to re-prepare it there. pgbench `-M prepared` does the
//! same with libpq.
//!
//! The driver workloads live in `tests/drivers/*.{py,js}`; each takes its
//! connection URL from `PGMUX_TEST_URL`, checks every result itself and exits
//! non-zero on any error. The Python packages (tests/drivers/.venv) and node
//! modules (tests/drivers/node_modules) are installed by
//! `tests/drivers/setup.sh`, which these tests run (under a lock) when needed;
//! if it fails the tests fail with instructions, never skip.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use support::{
    describe_output as describe, pg_tool, run_with_timeout as run, PgCluster, Pgmux, LIBPQ_ENV,
};

/// Server connections per (database, user): far fewer than the drivers'
/// client connections, so prepared statements must move between servers.
const POOL_SIZE: &str = "4";

/// A driver script is killed after this long.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

fn venv_python() -> PathBuf {
    drivers_dir().join(".venv/bin/python")
}

/// Runs `tests/drivers/setup.sh` once per test process, serialised across
/// processes with `flock` on a lock file (nextest runs tests in parallel
/// processes). setup.sh is idempotent and returns at once when the venv and
/// node_modules match the pinned versions. Panics with install instructions
/// if it fails.
fn ensure_drivers_installed() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = DONE.get_or_init(|| {
        let lock = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pgmux-drivers-setup.lock");
        let script = drivers_dir().join("setup.sh");
        let mut cmd = Command::new("flock");
        cmd.arg(&lock).arg("bash").arg(&script);
        let out = run(&mut cmd, Duration::from_secs(600));
        if !out.status.success() {
            return Err(describe(&out));
        }
        let missing: Vec<String> = [venv_python(), drivers_dir().join("node_modules/pg")]
            .into_iter()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "setup.sh succeeded but {} still missing\n{}",
                missing.join(", "),
                describe(&out)
            ))
        }
    });
    if let Err(e) = result {
        panic!(
            "installing the driver-test dependencies failed.\n\
             Install them with `bash tests/drivers/setup.sh` (needs python3 with the venv \
             module and node + npm; on Debian: `apt-get install -y python3-venv nodejs npm`, \
             plus access to PyPI and the npm registry). `.ci/run` does this.\n\
             setup.sh output: {e}"
        );
    }
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A cluster with one user/database and pgmux (pool of 4) in front of it.
struct Setup {
    pgmux: Pgmux,
    /// pgmux's `--pool-size`.
    pool_size: i64,
    user: String,
    password: String,
    db: String,
    // Dropped last: pgmux goes away before PostgreSQL.
    cluster: PgCluster,
}

impl Setup {
    fn start(prefix: &str) -> Setup {
        let cluster = PgCluster::start();
        let (user, password, db) = cluster.create_user_db(prefix);
        let url = cluster.primary().url(&user, &password, &db);
        let pgmux = Pgmux::start(&["--pool-size", POOL_SIZE], &[("DATABASE_URL", &url)]);
        Setup {
            pgmux,
            pool_size: POOL_SIZE.parse().expect("pool size"),
            user,
            password,
            db,
            cluster,
        }
    }

    /// `postgres://user:password@127.0.0.1:<pgmux>/db`.
    fn url(&self) -> String {
        self.pgmux.url(&self.user, &self.password, &self.db)
    }

    /// Runs a driver script with PGMUX_TEST_URL pointing at pgmux; panics
    /// (with the script's output and pgmux's log) unless it exits 0 and
    /// prints an `"ok": true` summary. Returns the summary line.
    fn run_driver(&self, what: &str, program: &Path, script: &str) -> String {
        let mut cmd = Command::new(program);
        cmd.arg(drivers_dir().join(script))
            .current_dir(drivers_dir())
            .env("PGMUX_TEST_URL", self.url())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        for var in LIBPQ_ENV {
            cmd.env_remove(var);
        }
        let out = run(&mut cmd, SCRIPT_TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = stdout.lines().last().unwrap_or("").trim().to_string();
        let ok = summary.contains("\"ok\": true") || summary.contains("\"ok\":true");
        assert!(
            out.status.success() && ok,
            "{what} through pgmux (pool size {}) failed: {}\n--- pgmux log (last 100 lines) ---\n{}",
            self.pool_size,
            describe(&out),
            tail(&self.pgmux.log(), 100)
        );
        eprintln!("{what}: {summary}");
        self.assert_pool_bounded();
        summary
    }

    /// pgmux never opened more server connections than its pool allows.
    fn assert_pool_bounded(&self) {
        let backends = self.cluster.primary().backend_count(&self.user);
        assert!(
            backends <= self.pool_size,
            "{backends} server backends of {} after the workload; pool size is {}",
            self.user,
            self.pool_size
        );
    }

    fn pgbench(&self, args: &[&str]) -> Output {
        let mut cmd = pg_tool("pgbench");
        for var in LIBPQ_ENV {
            cmd.env_remove(var);
        }
        cmd.args(args)
            .arg(format!(
                "postgres://{}@127.0.0.1:{}/{}?connect_timeout=10",
                support::percent_encode(&self.user),
                self.pgmux.port(),
                support::percent_encode(&self.db)
            ))
            .env("PGPASSWORD", &self.password);
        run(&mut cmd, Duration::from_secs(180))
    }

    /// `pgbench -i -s 1 -q` through pgmux (COPY-based initialisation).
    fn pgbench_init(&self) {
        let out = self.pgbench(&["-i", "-s", "1", "-q"]);
        assert!(
            out.status.success(),
            "pgbench -i through pgmux failed: {}\n--- pgmux log (last 100 lines) ---\n{}",
            describe(&out),
            tail(&self.pgmux.log(), 100)
        );
    }

    /// A pgbench run through pgmux; panics unless it exits 0, processed all
    /// `clients * transactions` transactions and reports no failed ones.
    /// (pgbench prints "failed transactions: 0" even when clients aborted,
    /// so the processed count and the exit status are checked too.)
    fn pgbench_ok(&self, args: &[&str], clients: u32, transactions: u32) -> String {
        let out = self.pgbench(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let total = clients * transactions;
        let processed = format!("number of transactions actually processed: {total}/{total}");
        assert!(
            out.status.success()
                && stdout.contains(&processed)
                && stdout.contains("number of failed transactions: 0 "),
            "pgbench {args:?} through pgmux (pool size {}) failed \
             (want exit 0, \"{processed}\", no failed transactions): {}\n\
             --- pgmux log (last 100 lines) ---\n{}",
            self.pool_size,
            describe(&out),
            tail(&self.pgmux.log(), 100)
        );
        stdout
    }
}

fn python_driver(prefix: &str, script: &str) {
    ensure_drivers_installed();
    let s = Setup::start(prefix);
    s.run_driver(script, &venv_python(), script);
}

#[test]
fn asyncpg_default_statement_cache() {
    python_driver("asyncpg", "asyncpg_test.py");
}

#[test]
fn sqlalchemy_async_engine_on_asyncpg() {
    python_driver("sqlalchemy", "sqlalchemy_asyncpg_test.py");
}

#[test]
fn psycopg_prepare_threshold_0_and_pipeline() {
    python_driver("psycopg", "psycopg_test.py");
}

#[test]
fn node_postgres_named_queries() {
    ensure_drivers_installed();
    let s = Setup::start("node pg");
    s.run_driver("node_pg_test.js", Path::new("node"), "node_pg_test.js");
}

/// pgbench -i, then select-only with `-M prepared` (libpq named statements
/// P0_0, ...), 16 clients on a pool of 4.
#[test]
fn pgbench_prepared_mode() {
    let s = Setup::start("pgbench prepared");
    s.pgbench_init();
    s.pgbench_ok(
        &[
            "-n", "-M", "prepared", "-S", "-c", "16", "-j", "2", "-t", "300",
        ],
        16,
        300,
    );
    s.assert_pool_bounded();
}

/// The default tpcb-like script (BEGIN; 3 UPDATEs, SELECT, INSERT; END) with
/// `-M prepared`: named statements used inside and across transactions.
#[test]
fn pgbench_prepared_mode_tpcb_like() {
    let s = Setup::start("pgbench tpcb prepared");
    s.pgbench_init();
    s.pgbench_ok(
        &["-M", "prepared", "-c", "8", "-j", "2", "-t", "100"],
        8,
        100,
    );
    assert_eq!(
        s.cluster
            .primary()
            .psql(&s.db, "select count(*) from pgbench_history"),
        "800",
        "every tpcb-like transaction inserts one pgbench_history row"
    );
    s.assert_pool_bounded();
}

/// Smallest known trigger for a hang seen with `-M prepared` tpcb-like:
/// a custom script `BEGIN; END;` with two clients on a pool of one. pgbench
/// prepares each statement (Parse+Sync) right before its first use, so `END;`
/// is prepared inside the transaction that `BEGIN;` opened, while the other
/// client's Parse of the same `BEGIN;` waits for the only server.
/// `query_wait_timeout` is shortened so a hang fails in seconds.
#[test]
fn pgbench_prepared_begin_end_pool_of_one() {
    let cluster = PgCluster::start();
    let (user, password, db) = cluster.create_user_db("pgbench begin end");
    let url = cluster.primary().url(&user, &password, &db);
    let pgmux = Pgmux::start(
        &["--pool-size", "1"],
        &[("DATABASE_URL", &url), ("PGMUX_QUERY_WAIT_TIMEOUT", "10s")],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("begin_end.sql");
    std::fs::write(&script, "BEGIN;\nEND;\n").expect("write pgbench script");
    let s = Setup {
        pgmux,
        pool_size: 1,
        user,
        password,
        db,
        cluster,
    };
    let file = script.to_str().expect("utf-8 path");
    for _round in 0..5 {
        s.pgbench_ok(
            &["-n", "-M", "prepared", "-f", file, "-c", "2", "-t", "20"],
            2,
            20,
        );
    }
}
