//! Real PostgreSQL client tools (psql, pgbench) through pgmux against a real
//! PostgreSQL server. Everything runs on loopback.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::{describe_output as describe, pg_tool, run_with_timeout as run, PgCluster, Pgmux};

/// A cluster with one user/database and pgmux in front of it.
struct Setup {
    pgmux: Pgmux,
    user: String,
    password: String,
    db: String,
    // Dropped last: pgmux goes away before PostgreSQL.
    cluster: PgCluster,
}

impl Setup {
    fn start(prefix: &str, args: &[&str]) -> Setup {
        let cluster = PgCluster::start();
        let (user, password, db) = cluster.create_user_db(prefix);
        let url = cluster.primary().url(&user, &password, &db);
        let pgmux = Pgmux::start(args, &[("DATABASE_URL", &url)]);
        Setup {
            pgmux,
            user,
            password,
            db,
            cluster,
        }
    }

    /// URL to pgmux *without* the password (it goes in PGPASSWORD).
    fn url_for_db(&self, db: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}?connect_timeout=10",
            support::percent_encode(&self.user),
            self.pgmux.port(),
            support::percent_encode(db)
        )
    }

    fn url(&self) -> String {
        self.url_for_db(&self.db)
    }

    /// psql through pgmux: `-X -A -t -w -v ON_ERROR_STOP=1 -d URL` plus
    /// `args`, with PGPASSWORD=`password`.
    fn psql_cmd(&self, url: &str, password: &str, args: &[&str]) -> Command {
        let mut cmd = pg_tool("psql");
        cmd.args(["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d", url])
            .args(args)
            .env("PGPASSWORD", password);
        cmd
    }

    /// Runs psql through pgmux with the right password; panics unless it
    /// succeeds; returns trimmed stdout.
    fn psql_ok(&self, args: &[&str]) -> String {
        let mut cmd = self.psql_cmd(&self.url(), &self.password, args);
        let out = run(&mut cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "psql {args:?} through pgmux failed: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn pgbench(&self, args: &[&str]) -> Output {
        let mut cmd = pg_tool("pgbench");
        cmd.args(args)
            .arg(self.url())
            .env("PGPASSWORD", &self.password);
        run(&mut cmd, Duration::from_secs(180))
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn psql_select_and_multi_statement() {
    let s = Setup::start("psql basic", &[]);
    assert_eq!(s.psql_ok(&["-c", "select 1"]), "1");

    // Several statements in one simple Query message (one implicit
    // transaction on the server).
    let out = s.psql_ok(&[
        "-q",
        "-c",
        "create table t(a int); insert into t values (1),(2); select sum(a) from t",
    ]);
    assert_eq!(out, "3");

    // The work really landed on the configured server and database.
    assert_eq!(s.cluster.primary().psql(&s.db, "select sum(a) from t"), "3");
    // And the session really was the configured user.
    assert_eq!(s.psql_ok(&["-c", "select current_user"]), s.user);
}

#[test]
fn psql_copy_in_and_out() {
    let s = Setup::start("psql copy", &[]);
    s.psql_ok(&["-q", "-c", "create table c(id int, note text)"]);

    // Enough data for many CopyData messages, with CSV quoting in it. Every
    // line is in the canonical form COPY TO CSV writes back.
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.csv");
    let output = dir.path().join("out.csv");
    let rows = 20_000;
    let mut csv = String::new();
    for i in 1..=rows {
        match i % 3 {
            0 => csv.push_str(&format!("{i},plain-{i}\n")),
            1 => csv.push_str(&format!("{i},\"with, comma {i}\"\n")),
            _ => csv.push_str(&format!("{i},\"say \"\"hi\"\" {i}\"\n")),
        }
    }
    std::fs::write(&input, &csv).expect("write input CSV");

    let copy_in = format!("\\copy c from '{}' csv", path_str(&input));
    let out = s.psql_ok(&["-c", &copy_in]);
    assert_eq!(out, format!("COPY {rows}"));

    assert_eq!(
        s.cluster.primary().psql(&s.db, "select count(*) from c"),
        rows.to_string(),
        "row count on the primary after \\copy in through pgmux"
    );

    let copy_out = format!(
        "\\copy (select * from c order by id) to '{}' csv",
        path_str(&output)
    );
    let out = s.psql_ok(&["-c", &copy_out]);
    assert_eq!(out, format!("COPY {rows}"));
    let back = std::fs::read_to_string(&output).expect("read output CSV");
    assert!(back == csv, "\\copy out differs from what was copied in");

    // Plain `\copy t to file` (no query) as well.
    let output2 = dir.path().join("out2.csv");
    let copy_out2 = format!("\\copy c to '{}' csv", path_str(&output2));
    s.psql_ok(&["-c", &copy_out2]);
    let back2 = std::fs::read_to_string(&output2).expect("read output CSV");
    let mut sorted: Vec<&str> = back2.lines().collect();
    sorted.sort_by_key(|l| l.split(',').next().and_then(|n| n.parse::<u32>().ok()));
    let expected: Vec<&str> = csv.lines().collect();
    assert!(sorted == expected, "\\copy c to file differs");

    // The session is still usable after COPY: a follow-up in the same psql.
    let out = s.psql_ok(&["-c", &copy_in, "-c", "select count(*) from c"]);
    assert_eq!(out, format!("COPY {rows}\n{}", rows * 2));
}

/// pgbench -i (COPY-based init) and a select-only run with `mode` (simple or
/// extended protocol), 8 clients on a pool of 4 server connections; samples
/// the number of server backends of the user the whole time.
fn pgbench_select_only(mode: &str) {
    let s = Setup::start(&format!("pgbench {mode}"), &["--pool-size", "4"]);
    let pg = s.cluster.primary();

    let running = AtomicBool::new(true);
    let (max_seen, samples, bench) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut max = 0;
            let mut samples = 0u32;
            while running.load(Ordering::Relaxed) {
                max = max.max(pg.backend_count(&s.user));
                samples += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (max, samples)
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let init = s.pgbench(&["-i", "-s", "1", "-q"]);
            assert!(
                init.status.success(),
                "pgbench -i through pgmux failed: {}",
                describe(&init)
            );
            s.pgbench(&["-n", "-S", "-c", "8", "-j", "2", "-t", "200", "-M", mode])
        }));
        running.store(false, Ordering::Relaxed);
        let (max, samples) = sampler.join().expect("sampler thread");
        match result {
            Ok(bench) => (max, samples, bench),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });

    let stdout = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "pgbench -M {mode} through pgmux failed: {}",
        describe(&bench)
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "pgbench -M {mode}: {}",
        describe(&bench)
    );
    assert!(
        stdout.contains("number of transactions actually processed: 1600/1600"),
        "pgbench -M {mode}: {}",
        describe(&bench)
    );
    assert_eq!(
        pg.psql(&s.db, "select count(*) from pgbench_accounts"),
        "100000"
    );

    eprintln!("pgbench -M {mode}: {samples} samples, at most {max_seen} server backends");
    assert!(samples >= 3, "only {samples} backend samples taken");
    assert!(
        max_seen <= 4,
        "pool size 4, but {max_seen} server backends of {} were seen",
        s.user
    );
    assert!(max_seen >= 1, "no server backend was ever seen");
    let after = pg.backend_count(&s.user);
    assert!(after <= 4, "{after} server backends after pgbench");
}

#[test]
fn pgbench_simple_protocol_within_pool_size() {
    pgbench_select_only("simple");
}

#[test]
fn pgbench_extended_protocol_within_pool_size() {
    pgbench_select_only("extended");
}

#[test]
fn psql_wrong_password_is_rejected() {
    let s = Setup::start("psql badpw", &[]);
    let mut cmd = s.psql_cmd(&s.url(), "definitely-wrong", &["-c", "select 1"]);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "password authentication failed for user \"{}\"",
            s.user
        )),
        "{}",
        describe(&out)
    );
    // The right password still works afterwards.
    assert_eq!(s.psql_ok(&["-c", "select 1"]), "1");
}

#[test]
fn psql_unknown_database_is_rejected() {
    let s = Setup::start("psql nodb", &[]);
    let url = s.url_for_db("no_such_db");
    let mut cmd = s.psql_cmd(&url, &s.password, &["-c", "select 1"]);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not exist"), "{}", describe(&out));
    assert!(stderr.contains("no_such_db"), "{}", describe(&out));
}
