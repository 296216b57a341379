//! Command-line and configuration behaviour of the pgmux binary: `check-config`
//! output, layering precedence, error messages/exit codes and `--help`.
//! No PostgreSQL needed: every test only runs `pgmux` as a child process.

use std::path::Path;
use std::process::{Command, Output};

const APP_URL: &str = "postgres://app:s3cretpw@db-host:5432/app";

/// Runs pgmux with `args` and exactly the PGMUX_*/DATABASE_URL variables in
/// `env` (any inherited ones are removed).
fn pgmux(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgmux"));
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("PGMUX_") || k == "DATABASE_URL" || k == "READ_DATABASE_URL" {
                cmd.env_remove(k);
            }
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn pgmux {args:?}: {e}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "pgmux {args:?} -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        stdout(out),
        stderr(out)
    )
}

/// `check-config` output: (section, key) -> raw value text. Top-level keys
/// have section "". Enough for the flat TOML pgmux prints.
type Rendered = std::collections::BTreeMap<(String, String), String>;

fn parse_rendered(text: &str) -> Rendered {
    let mut map = Rendered::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unexpected check-config line {line:?} in:\n{text}"));
        map.insert(
            (section.clone(), key.trim().to_string()),
            value.trim().to_string(),
        );
    }
    map
}

fn get<'a>(map: &'a Rendered, section: &str, key: &str) -> Option<&'a str> {
    map.get(&(section.to_string(), key.to_string()))
        .map(String::as_str)
}

/// Runs `check-config` expecting success; returns the output and its parse.
fn check_config_ok(args: &[&str], env: &[(&str, &str)]) -> (String, Rendered) {
    let mut all = vec!["check-config"];
    all.extend_from_slice(args);
    let out = pgmux(&all, env);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&all, &out));
    assert!(
        !stderr(&out).contains("panicked"),
        "{}",
        describe(&all, &out)
    );
    let text = stdout(&out);
    let table = parse_rendered(&text);
    (text, table)
}

/// Runs `check-config` expecting a configuration error: exit code 2, no
/// panic, nothing on stdout. Returns stderr.
fn check_config_err(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["check-config"];
    all.extend_from_slice(args);
    let out = pgmux(&all, env);
    let text = describe(&all, &out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{text}");
    assert!(!err.trim().is_empty(), "no error message: {text}");
    err
}

fn pool_size(table: &Rendered) -> i64 {
    let raw = get(table, "", "pool_size").unwrap_or_else(|| panic!("no pool_size in {table:?}"));
    raw.parse()
        .unwrap_or_else(|e| panic!("pool_size {raw:?} is not an integer: {e}"))
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config file");
    path.to_str().expect("utf-8 temp path").to_string()
}

#[test]
fn check_config_with_only_database_url() {
    let (text, table) = check_config_ok(&[], &[("DATABASE_URL", APP_URL)]);
    assert!(
        !text.contains("s3cretpw"),
        "password leaked into check-config output:\n{text}"
    );
    assert_eq!(
        get(&table, "", "listen"),
        Some("\"0.0.0.0:6432\""),
        "{text}"
    );
    assert_eq!(pool_size(&table), 20, "{text}");

    let url = get(&table, "databases.app", "url")
        .unwrap_or_else(|| panic!("no database `app` with a url:\n{text}"));
    assert!(
        url.contains("db-host"),
        "database app url {url:?} does not name host db-host"
    );
    assert!(url.ends_with("/app\""), "url {url:?} does not name db app");

    assert!(
        text.lines().any(|l| l.trim() == "[users.app]"),
        "no user `app`:\n{text}"
    );
    if let Some(pw) = get(&table, "users.app", "password") {
        assert_eq!(pw, "\"<redacted>\"", "{text}");
    }
}

#[test]
fn pool_size_precedence_file_env_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_file(dir.path(), "pgmux.toml", "pool_size = 5\n");
    let env_url = ("DATABASE_URL", APP_URL);
    let env_pool = ("PGMUX_POOL_SIZE", "7");

    let (text, table) = check_config_ok(
        &["--config", &file, "--pool-size", "9"],
        &[env_url, env_pool],
    );
    assert_eq!(pool_size(&table), 9, "flag must win:\n{text}");

    let (text, table) = check_config_ok(&["--config", &file], &[env_url, env_pool]);
    assert_eq!(pool_size(&table), 7, "env must beat the file:\n{text}");

    let (text, table) = check_config_ok(&["--config", &file], &[env_url]);
    assert_eq!(pool_size(&table), 5, "file must beat the default:\n{text}");

    // The file also works via PGMUX_CONFIG.
    let (text, table) = check_config_ok(&[], &[env_url, ("PGMUX_CONFIG", &file)]);
    assert_eq!(pool_size(&table), 5, "PGMUX_CONFIG file:\n{text}");
}

#[test]
fn unknown_key_in_file_names_key_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_file(
        dir.path(),
        "bad.toml",
        "# pgmux config\npool_size = 5\n\nlisten = \"127.0.0.1:7000\"\npool_sise = 3\n",
    );
    let err = check_config_err(&["--config", &file], &[("DATABASE_URL", APP_URL)]);
    assert!(err.contains("pool_sise"), "key not named: {err}");
    assert!(err.contains("line 5"), "wrong/no line number: {err}");
    assert!(err.contains(&file), "file path not named: {err}");

    // Unknown key inside a database table, further down.
    let file = write_file(
        dir.path(),
        "bad_db.toml",
        "[databases.app]\nurl = \"postgres://db-host/app\"\n\n\nhots = \"x\"\n",
    );
    let err = check_config_err(&["--config", &file], &[]);
    assert!(err.contains("hots"), "key not named: {err}");
    assert!(err.contains("line 5"), "wrong/no line number: {err}");
}

#[test]
fn bad_database_url_is_reported_without_password() {
    for url in [
        "postgres://app:s3cretpw@db-host:notaport/app",
        "mysql://app:s3cretpw@db-host:5432/app",
        "postgres://app:s3cretpw@/app",
    ] {
        let err = check_config_err(&[], &[("DATABASE_URL", url)]);
        assert!(err.contains("DATABASE_URL"), "{url}: {err}");
        assert!(!err.contains("s3cretpw"), "{url}: password leaked: {err}");
    }
    // Same via the flag.
    let err = check_config_err(
        &[
            "--database-url",
            "postgres://app:s3cretpw@db-host:notaport/app",
        ],
        &[],
    );
    assert!(err.contains("--database-url"), "{err}");
    assert!(!err.contains("s3cretpw"), "password leaked: {err}");
}

#[test]
fn pool_size_zero_flag_is_rejected() {
    let err = check_config_err(&["--pool-size", "0"], &[("DATABASE_URL", APP_URL)]);
    assert!(err.contains("--pool-size"), "{err}");
    assert!(err.contains("pool_size"), "{err}");
}

#[test]
fn bad_duration_env_is_rejected() {
    let err = check_config_err(
        &[],
        &[
            ("DATABASE_URL", APP_URL),
            ("PGMUX_QUERY_WAIT_TIMEOUT", "abc"),
        ],
    );
    assert!(err.contains("PGMUX_QUERY_WAIT_TIMEOUT"), "{err}");
    assert!(err.contains("query_wait_timeout"), "{err}");
}

#[test]
fn unreadable_config_file_names_the_path() {
    let err = check_config_err(
        &["--config", "/nonexistent/pgmux.toml"],
        &[("DATABASE_URL", APP_URL)],
    );
    assert!(err.contains("/nonexistent/pgmux.toml"), "{err}");
}

#[test]
fn no_database_configured() {
    let err = check_config_err(&[], &[]);
    assert!(err.contains("DATABASE_URL"), "{err}");

    // An empty DATABASE_URL counts as unset.
    let err = check_config_err(&[], &[("DATABASE_URL", "")]);
    assert!(err.contains("DATABASE_URL"), "{err}");
}

#[test]
fn serve_mode_config_error_exits_2() {
    // Without the subcommand, a bad configuration must fail the same way
    // (and not start listening).
    let out = pgmux(
        &["--listen", "127.0.0.1:0", "--pool-size", "0"],
        &[("DATABASE_URL", APP_URL)],
    );
    let text = describe(&["--pool-size", "0"], &out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(stderr(&out).contains("--pool-size"), "{text}");
    assert!(!stderr(&out).contains("panicked"), "{text}");
}

#[test]
fn help_lists_flags_and_env() {
    let out = pgmux(&["--help"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["--help"], &out)
    );
    let text = stdout(&out);
    for needle in [
        "--database-url",
        "--pool-size",
        "--max-client-conn",
        "--listen",
        "--config",
        "check-config",
        "DATABASE_URL",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}
