//! `auth_user` / `auth_query` against real PostgreSQL: users known only to PostgreSQL log
//! in through pgmux (SCRAM passthrough, MD5), wrong passwords and unknown users get the
//! same 28P01, VALID UNTIL is enforced also for cached secrets, a password change is
//! picked up, failures of the lookup itself are reported clearly, and the auth_user's
//! servers go back to the pool idle. No secret reaches the pgmux log (checked when each
//! pgmux is dropped) or `check-config`.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::{pg_tool, quote_literal, register_secret, Pgmux, TestDb};

const AUTH_USER: &str = "pgmux_auth";
const AUTH_PW: &str = "auth-Pw-7f3a";
/// The lookup through a SECURITY DEFINER function (what the README recommends), which
/// also counts its calls in `pgmux_lookups`.
const FUNCTION_QUERY: &str = "SELECT * FROM public.pgmux_lookup($1)";

/// The lookup function exactly as the README shows it.
const README_FUNCTION: &str = "
CREATE SCHEMA pgmux;
CREATE FUNCTION pgmux.user_lookup(p_user name)
  RETURNS TABLE (usename name, passwd text, valuntil timestamptz)
  LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT usename, passwd, valuntil FROM pg_catalog.pg_shadow
    WHERE usename = p_user AND NOT usesuper;   -- superusers do not log in through pgmux
  $$;
REVOKE ALL ON FUNCTION pgmux.user_lookup(name) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgmux TO pgmux_auth;
GRANT EXECUTE ON FUNCTION pgmux.user_lookup(name) TO pgmux_auth;
";

/// A database, the auth_user role, and a pgmux configuration file for it.
struct Setup {
    db: TestDb,
    dir: tempfile::TempDir,
}

impl Setup {
    /// `superuser`: the auth_user may read pg_shadow itself (PgBouncer's default query);
    /// else it may only call `pgmux_lookup`.
    fn new(prefix: &str, superuser: bool) -> Setup {
        let db = TestDb::new(prefix);
        db.cluster.create_role(AUTH_USER, AUTH_PW);
        if superuser {
            db.psql(&format!("ALTER ROLE {AUTH_USER} SUPERUSER"));
        }
        db.psql(&format!(
            "CREATE TABLE public.pgmux_lookups (at timestamptz DEFAULT now());
             CREATE FUNCTION public.pgmux_lookup(p_user name)
               RETURNS TABLE (usename name, passwd text, valuntil timestamptz)
               LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
                 INSERT INTO public.pgmux_lookups DEFAULT VALUES;
                 SELECT usename, passwd, valuntil FROM pg_catalog.pg_shadow
                 WHERE usename = p_user;
               $$;
             REVOKE ALL ON FUNCTION public.pgmux_lookup(name) FROM PUBLIC;
             GRANT EXECUTE ON FUNCTION public.pgmux_lookup(name) TO {AUTH_USER};"
        ));
        Setup {
            db,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A LOGIN role with a SCRAM password, unknown to pgmux.
    fn role(&self, name: &str, password: &str) {
        self.db.cluster.create_role(name, password);
        self.register_verifier(name);
    }

    /// The role's stored secret must not reach a log either.
    fn register_verifier(&self, name: &str) {
        let stored = self.db.psql(&format!(
            "SELECT rolpassword FROM pg_authid WHERE rolname = {}",
            quote_literal(name)
        ));
        register_secret(stored.trim());
    }

    /// Writes the configuration file (the database comes from DATABASE_URL).
    fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("pgmux.toml");
        std::fs::write(
            &path,
            format!("auth_user = \"{AUTH_USER}\"\n{extra}\n[users.{AUTH_USER}]\npassword = \"{AUTH_PW}\"\n"),
        )
        .unwrap();
        path
    }

    fn pgmux(&self, extra: &str) -> Pgmux {
        let path = self.config(extra);
        Pgmux::start(
            &["--config", path.to_str().unwrap()],
            &[("DATABASE_URL", &self.db.database_url())],
        )
    }

    fn lookups(&self) -> i64 {
        self.db
            .psql("SELECT count(*) FROM public.pgmux_lookups")
            .parse()
            .unwrap()
    }

    /// States of the auth_user's server connections (pg_stat_activity).
    fn auth_user_states(&self) -> Vec<String> {
        let out = self.db.psql(&format!(
            "SELECT state FROM pg_stat_activity WHERE usename = {} \
             AND backend_type = 'client backend' ORDER BY state",
            quote_literal(AUTH_USER)
        ));
        out.lines().map(str::to_string).collect()
    }
}

/// Logs in, runs a query; the current user, or "SQLSTATE: message".
fn login(url: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = support::try_connect(url).await.map_err(describe_error)?;
        let row = c
            .query_one("SELECT current_user::text, 6 * 7", &[])
            .await
            .map_err(describe_error)?;
        assert_eq!(row.get::<_, i32>(1), 42);
        Ok(row.get::<_, String>(0))
    })
}

fn describe_error(e: tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{}: {}", d.code().code(), d.message()))
        .unwrap_or_else(|| e.to_string())
}

fn psql_through(px: &Pgmux, user: &str, password: &str, db: &str, sql: &str) -> String {
    let url = format!(
        "postgres://{}@127.0.0.1:{}/{}?connect_timeout=10",
        support::percent_encode(user),
        px.port(),
        support::percent_encode(db)
    );
    let mut cmd = pg_tool("psql");
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-w",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        &url,
        "-c",
        sql,
    ])
    .env("PGPASSWORD", password);
    let out = support::run_with_timeout(&mut cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", support::describe_output(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn check_config(config: &std::path::Path, database_url: &str) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgmux"));
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("PGMUX_") || k == "DATABASE_URL" || k == "READ_DATABASE_URL" {
                cmd.env_remove(k);
            }
        }
    }
    cmd.args(["check-config", "--config", config.to_str().unwrap()])
        .env("DATABASE_URL", database_url);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", support::describe_output(&out));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn scram_user_known_only_to_postgres_logs_in_by_passthrough() {
    let s = Setup::new("aq_scram", true);
    let db = &s.db;
    s.role("only_in_pg", "only-Pw-1c9e");
    // PgBouncer's default query on pg_shadow, the default cache.
    let px = s.pgmux("");
    let url = |user: &str, pw: &str| px.url(user, pw, &db.db);

    // pgmux holds no secret for only_in_pg: auth_query finds the verifier, the client's
    // proof is checked against it, and the servers log in with the revealed keys.
    assert_eq!(
        login(&url("only_in_pg", "only-Pw-1c9e")).unwrap(),
        "only_in_pg"
    );
    assert_eq!(
        psql_through(
            &px,
            "only_in_pg",
            "only-Pw-1c9e",
            &db.db,
            "SELECT session_user"
        ),
        "only_in_pg"
    );
    let on_server = db.psql(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE usename = 'only_in_pg' AND backend_type = 'client backend'",
    );
    assert!(
        on_server.parse::<i64>().unwrap() >= 1,
        "a server connection of only_in_pg: {on_server}"
    );

    // A wrong password, and a user that does not exist: the same refusal.
    let wrong = login(&url("only_in_pg", "not-the-Pw")).unwrap_err();
    assert_eq!(
        wrong,
        "28P01: password authentication failed for user \"only_in_pg\""
    );
    let unknown = login(&url("no_such_role", "whatever-Pw")).unwrap_err();
    assert_eq!(
        unknown,
        "28P01: password authentication failed for user \"no_such_role\""
    );
    // A role with a NULL password likewise.
    db.psql("CREATE ROLE no_password LOGIN");
    assert_eq!(
        login(&url("no_password", "any-Pw-at-all")).unwrap_err(),
        "28P01: password authentication failed for user \"no_password\""
    );
    // The right password still works after those.
    assert_eq!(
        login(&url("only_in_pg", "only-Pw-1c9e")).unwrap(),
        "only_in_pg"
    );

    // The lookups left the auth_user's servers idle, not inside a transaction.
    let states = s.auth_user_states();
    assert!(!states.is_empty(), "the auth_user has a server");
    assert!(states.iter().all(|st| st == "idle"), "{states:?}");

    // check-config shows the keys, never a password.
    let shown = check_config(&s.config(""), &db.database_url());
    assert!(shown.contains("auth_user = \"pgmux_auth\""), "{shown}");
    assert!(shown.contains("auth_query = "), "{shown}");
    for secret in [AUTH_PW, db.password.as_str(), "only-Pw-1c9e"] {
        assert!(
            !shown.contains(secret),
            "a secret in check-config:\n{shown}"
        );
    }
}

#[test]
fn valid_until_is_checked_on_every_use_of_a_cached_secret() {
    let s = Setup::new("aq_valid", false);
    let db = &s.db;
    s.role("expiring", "exp-Pw-5d1b");
    let px = s.pgmux(&format!(
        "auth_query = \"{FUNCTION_QUERY}\"\nauth_query_cache = \"60s\""
    ));
    let url = px.url("expiring", "exp-Pw-5d1b", &db.db);

    // Expired: refused like a wrong password, and logged (without a secret).
    db.psql("ALTER ROLE expiring VALID UNTIL '2000-01-01'");
    assert_eq!(
        login(&url).unwrap_err(),
        "28P01: password authentication failed for user \"expiring\""
    );
    assert!(px.log().contains("VALID UNTIL has passed"), "{}", px.log());

    // Valid for a few more seconds: the login succeeds and its secret is cached with
    // that expiry; a second login within the TTL does not ask PostgreSQL again.
    db.psql(
        "DO $$ BEGIN EXECUTE format('ALTER ROLE expiring VALID UNTIL %L', \
         now() + interval '6 seconds'); END $$",
    );
    let before = s.lookups();
    assert_eq!(login(&url).unwrap(), "expiring");
    assert_eq!(login(&url).unwrap(), "expiring");
    assert_eq!(s.lookups(), before + 1, "the second login used the cache");

    // Past VALID UNTIL, still within the cache's 60s: refused (PgBouncer CVE-2025-2291
    // accepted the cached secret here).
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        login(&url).unwrap_err(),
        "28P01: password authentication failed for user \"expiring\""
    );

    // Extended again: PostgreSQL is asked, not a stale entry.
    db.psql("ALTER ROLE expiring VALID UNTIL 'infinity'");
    assert_eq!(login(&url).unwrap(), "expiring");
}

#[test]
fn password_change_is_picked_up_despite_the_cache() {
    let s = Setup::new("aq_change", false);
    let db = &s.db;
    s.role("changing", "old-Pw-88a2");
    let px = s.pgmux(&format!(
        "auth_query = \"{FUNCTION_QUERY}\"\nauth_query_cache = \"60s\""
    ));
    let url = |pw: &str| px.url("changing", pw, &db.db);
    assert_eq!(login(&url("old-Pw-88a2")).unwrap(), "changing");

    register_secret("new-Pw-31f0");
    db.psql("ALTER ROLE changing PASSWORD 'new-Pw-31f0'");
    s.register_verifier("changing");
    // The cached verifier is the old one: SCRAM has the client prove against the salt
    // pgmux sent, so the first attempt with the new password fails, which drops the
    // entry; the next one is checked against what PostgreSQL holds now.
    let first = login(&url("new-Pw-31f0"));
    assert_eq!(
        first.unwrap_err(),
        "28P01: password authentication failed for user \"changing\""
    );
    assert_eq!(login(&url("new-Pw-31f0")).unwrap(), "changing");
    // Servers opened from now on log in with the new keys.
    db.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'changing'");
    // Once they are gone (a backend that dies between pgmux's liveness check and a
    // driver's named Parse reports 57P01: a named Parse is not run again elsewhere).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while db.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'changing'") != "0" {
        assert!(std::time::Instant::now() < deadline, "backends still there");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(login(&url("new-Pw-31f0")).unwrap(), "changing");
    assert!(login(&url("old-Pw-88a2")).is_err());
}

#[test]
fn md5_role_with_md5_client_authentication() {
    let s = Setup::new("aq_md5", false);
    let db = &s.db;
    register_secret("md5-Pw-4e77");
    db.psql("SET password_encryption = 'md5'; CREATE ROLE md5role LOGIN PASSWORD 'md5-Pw-4e77'");
    s.register_verifier("md5role");
    // The stored password is an MD5 hash: PostgreSQL must ask pgmux for MD5.
    let node = db.cluster.primary();
    let hba = node.data_dir.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("host all md5role 127.0.0.1/32 md5\n{old}")).unwrap();
    node.reload();
    std::thread::sleep(Duration::from_millis(300));

    // The README's function: superusers are not found.
    db.psql(README_FUNCTION);
    let px = s.pgmux("auth_type = \"md5\"\nauth_query = \"SELECT * FROM pgmux.user_lookup($1)\"");
    let url = |pw: &str| px.url("md5role", pw, &db.db);
    assert_eq!(login(&url("md5-Pw-4e77")).unwrap(), "md5role");
    // A second client, and psql, share the pool logged in with the hash.
    assert_eq!(login(&url("md5-Pw-4e77")).unwrap(), "md5role");
    assert_eq!(
        psql_through(&px, "md5role", "md5-Pw-4e77", &db.db, "SELECT current_user"),
        "md5role"
    );
    assert_eq!(
        login(&url("wrong-Pw")).unwrap_err(),
        "28P01: password authentication failed for user \"md5role\""
    );
    let e = login(&px.url("postgres", "any-Pw-at-all", &db.db)).unwrap_err();
    assert!(e.starts_with("28P01"), "{e}");
    let states = s.auth_user_states();
    assert!(
        !states.is_empty() && states.iter().all(|st| st == "idle"),
        "{states:?}"
    );
}

#[test]
fn lookup_failures_are_reported_without_secrets() {
    let s = Setup::new("aq_fail", false);
    let db = &s.db;
    s.role("someone", "some-Pw-90cd");

    // A query PostgreSQL rejects: 28000 naming the database, the auth_user's servers
    // stay clean.
    let px =
        s.pgmux("auth_query = \"SELECT usename, passwd FROM missing_table WHERE usename = $1\"");
    let e = login(&px.url("someone", "some-Pw-90cd", &db.db)).unwrap_err();
    assert!(
        e.starts_with("28000: pgmux: auth_query failed: database \"")
            && e.contains(&db.db)
            && e.contains("missing_table"),
        "{e}"
    );
    assert!(px.log().contains("auth_query failed"), "{}", px.log());
    let states = s.auth_user_states();
    assert!(states.iter().all(|st| st == "idle"), "{states:?}");
    drop(px);

    // The auth_user's password is wrong: 08006, the server's refusal, no password.
    register_secret("wrong-auth-Pw");
    let path = s.dir.path().join("wrong.toml");
    std::fs::write(
        &path,
        format!("auth_user = \"{AUTH_USER}\"\n[users.{AUTH_USER}]\npassword = \"wrong-auth-Pw\"\n"),
    )
    .unwrap();
    let px = Pgmux::start(
        &["--config", path.to_str().unwrap()],
        &[("DATABASE_URL", &db.database_url())],
    );
    let e = login(&px.url("someone", "some-Pw-90cd", &db.db)).unwrap_err();
    assert!(
        e.starts_with("08006: pgmux: auth_query failed: database \"") && e.contains("28P01"),
        "{e}"
    );
    assert!(
        !e.contains("wrong-auth-Pw") && !e.contains("some-Pw-90cd"),
        "{e}"
    );
    // Users pgmux knows are not affected.
    assert_eq!(login(&db.url(&px)).unwrap(), db.user);
}

#[test]
fn auth_dbname_runs_every_lookup_in_one_database() {
    let s = Setup::new("aq_dbname", false);
    let db = &s.db;
    s.role("elsewhere_user", "else-Pw-2b6d");
    // A second database without the lookup function.
    let other = format!("{}_other", db.db);
    db.cluster.create_database(&other, &db.user);
    let port = db.cluster.primary().port;
    let px = s.pgmux(&format!(
        "auth_query = \"{FUNCTION_QUERY}\"\nauth_dbname = \"{}\"\n\
         [databases.other]\nurl = \"postgres://127.0.0.1:{port}/{other}\"",
        db.db
    ));
    let before = s.lookups();
    let url = px.url("elsewhere_user", "else-Pw-2b6d", "other");
    assert_eq!(login(&url).unwrap(), "elsewhere_user");
    assert_eq!(s.lookups(), before + 1, "the lookup ran in auth_dbname");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let current_db = rt.block_on(async {
        let c = support::connect(&url).await;
        let row = c
            .query_one("SELECT current_database()::text", &[])
            .await
            .unwrap();
        row.get::<_, String>(0)
    });
    assert_eq!(current_db, other);
}
