//! TLS (issue 8) against real PostgreSQL and real clients: psql (libpq) and tokio-postgres
//! (rustls) to pgmux over TLS with `client_tls_*`; pgmux to PostgreSQL over TLS with
//! `server_tls_*` and libpq's `sslmode` / `sslrootcert` URL parameters; SCRAM-SHA-256-PLUS
//! channel binding (and its downgrade check); certificate rotation without a restart;
//! key formats; start-up configuration errors; cancel, bulk data and SCRAM passthrough
//! across two TLS hops; replicas' own sslmode.
//!
//! The first test, `harness_…`, checks the harness alone (PostgreSQL with the test
//! certificates, psql, tokio-postgres-rustls, openssl s_client): if it fails, the others
//! say nothing about pgmux.
//!
//! Every test has its own PostgreSQL cluster (TestDb); a test that needs PostgreSQL to
//! speak TLS turns `ssl` on in its cluster with a certificate from a throwaway CA.

mod support;
#[path = "support/tls.rs"]
mod tls_support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use support::{describe_output, percent_encode, pg_tool, run_with_timeout, Pgmux, RawConn, TestDb};
use tls_support::{
    accept_any_config, connect_tls, enable_pg_ssl, error_text, verifying_config, TestCerts,
    ALL_VERSIONS, TLS12_ONLY, TLS13_ONLY,
};

/// Is pgmux's server connection (the one that runs this query) encrypted? `t` or `f`.
const SERVER_SSL_SQL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// How long a client waits for an answer before the test calls it a hang (well below
/// pgmux's default query_wait_timeout of 120 s: an error must come, not a wait).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// libpq environment that would change TLS behaviour (not in support::LIBPQ_ENV).
const LIBPQ_TLS_ENV: &[&str] = &[
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGSSLCRL",
    "PGSSLCRLDIR",
    "PGSSLSNI",
    "PGSSLNEGOTIATION",
    "PGSSLMINPROTOCOLVERSION",
    "PGSSLMAXPROTOCOLVERSION",
    "PGCHANNELBINDING",
    "PGGSSENCMODE",
    "PGREQUIREAUTH",
];

/// psql through pgmux as the test user: `-c sql` with a keyword/value connection string
/// made of `port`, the test user and database, `host=127.0.0.1` (unless `params` has a
/// host) and `params`. The password goes in PGPASSWORD.
fn psql(port: u16, db: &TestDb, params: &[(&str, &str)], sql: &str) -> Output {
    let mut conninfo = format!(
        "port={port} user={} dbname={} connect_timeout=10",
        conn_value(&db.user),
        conn_value(&db.db)
    );
    if !params.iter().any(|(k, _)| *k == "host") {
        conninfo.push_str(" host=127.0.0.1");
    }
    for (k, v) in params {
        conninfo.push_str(&format!(" {k}={}", conn_value(v)));
    }
    let mut cmd = pg_tool("psql");
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-w",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
        "-d",
    ])
    .arg(&conninfo)
    .env("PGPASSWORD", &db.password);
    for var in LIBPQ_TLS_ENV {
        cmd.env_remove(var);
    }
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

/// Runs [`psql`], panics unless it succeeds; trimmed stdout.
fn psql_ok(port: u16, db: &TestDb, params: &[(&str, &str)], sql: &str) -> String {
    let out = psql(port, db, params, sql);
    assert!(
        out.status.success(),
        "psql {params:?} -c {sql:?} through pgmux (port {port}) failed: {}",
        describe_output(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs [`psql`], panics if it succeeds; stderr.
fn psql_err(port: u16, db: &TestDb, params: &[(&str, &str)], sql: &str) -> String {
    let out = psql(port, db, params, sql);
    assert!(
        !out.status.success(),
        "psql {params:?} -c {sql:?} through pgmux (port {port}) should have failed: {}",
        describe_output(&out)
    );
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// A value for a libpq keyword/value connection string, quoted.
fn conn_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// tokio-postgres keyword/value connection string to pgmux (`host`) for the test user,
/// plus `extra` (e.g. `sslmode=require`).
fn conninfo(px: &Pgmux, db: &TestDb, host: &str, extra: &str) -> String {
    conninfo_port(px.port(), db, host, extra)
}

/// Like [`conninfo`], to any port (PostgreSQL's, for the harness self-check).
fn conninfo_port(port: u16, db: &TestDb, host: &str, extra: &str) -> String {
    format!(
        "host={host} port={port} user={} password={} dbname={} connect_timeout=10 {extra}",
        conn_value(&db.user),
        conn_value(&db.password),
        conn_value(&db.db)
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// First column of the first row of `sql` (simple query protocol), as text.
async fn first_text(client: &tokio_postgres::Client, sql: &str) -> Result<String, String> {
    let msgs = client.simple_query(sql).await.map_err(|e| error_text(&e))?;
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
            return Ok(row.get(0).unwrap_or("NULL").to_string());
        }
    }
    Err(format!("{sql}: no row"))
}

/// Plaintext (NoTls) tokio-postgres: connect to `url`, run `sql`, first value. Errors of
/// the login and of the query alike come back as text.
fn query_plain(url: &str, sql: &str) -> Result<String, String> {
    runtime().block_on(async {
        tokio::time::timeout(CLIENT_TIMEOUT, async {
            let client = support::try_connect(url)
                .await
                .map_err(|e| error_text(&e))?;
            first_text(&client, sql).await
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CLIENT_TIMEOUT:?}")))
    })
}

/// tokio-postgres over rustls (`tls`): connect with `conninfo`, run `sql`, first value.
fn query_tls(conninfo: &str, tls: rustls::ClientConfig, sql: &str) -> Result<String, String> {
    runtime().block_on(async {
        tokio::time::timeout(CLIENT_TIMEOUT, async {
            let client = connect_tls(conninfo, tls)
                .await
                .map_err(|e| error_text(&e))?;
            first_text(&client, sql).await
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CLIENT_TIMEOUT:?}")))
    })
}

/// The first byte pgmux answers an SSLRequest with ('S' or 'N').
fn ssl_request_answer(port: u16) -> char {
    use std::io::{Read, Write};
    let mut conn = RawConn::connect(port);
    let mut msg = 8i32.to_be_bytes().to_vec();
    msg.extend_from_slice(&80_877_103i32.to_be_bytes());
    conn.stream().write_all(&msg).expect("send SSLRequest");
    let mut answer = [0u8; 1];
    conn.stream()
        .read_exact(&mut answer)
        .expect("read the answer to SSLRequest");
    char::from(answer[0])
}

/// `openssl s_client -starttls postgres` to 127.0.0.1:`port` with `args`: a TLS handshake
/// with a client that can be told to offer old protocol versions. Succeeds (exit 0) when
/// the handshake does.
fn s_client(port: u16, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["s_client", "-starttls", "postgres", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(30))
}

/// `postgres://user:password@host:port/db?params` for the test user on the primary.
fn server_url(db: &TestDb, host: &str, params: &str) -> String {
    let mut url = format!(
        "postgres://{}:{}@{host}:{}/{}",
        percent_encode(&db.user),
        percent_encode(&db.password),
        db.cluster.primary().port,
        percent_encode(&db.db)
    );
    if !params.is_empty() {
        url.push('?');
        url.push_str(params);
    }
    url
}

/// pgmux in front of `db` with DATABASE_URL = `url` plus `env`.
fn pgmux_with_url(url: &str, env: &[(&str, &str)]) -> Pgmux {
    let mut all = vec![("DATABASE_URL", url)];
    all.extend_from_slice(env);
    Pgmux::start(&[], &all)
}

/// pgmux presenting the good CA's `pgmux.crt` to clients (cert and key by environment),
/// plus `env`.
fn pgmux_with_cert(db: &TestDb, certs: &TestCerts, env: &[(&str, &str)]) -> Pgmux {
    let cert = certs.file("pgmux.crt");
    let key = certs.file("pgmux.key");
    let mut all = vec![
        ("PGMUX_CLIENT_TLS_CERT_FILE", cert.as_str()),
        ("PGMUX_CLIENT_TLS_KEY_FILE", key.as_str()),
    ];
    all.extend_from_slice(env);
    db.pgmux_env(&[], &all)
}

/// Asserts that a query through `px` fails because pgmux did not accept PostgreSQL's
/// certificate: the client's error says "certificate" and names `host:port`. pgmux's
/// log must say so too: a log without it is noted in `log_problems` (checked at the end
/// of the test, so that one missing log line does not hide the checks after it).
fn assert_server_cert_rejected(
    px: &Pgmux,
    db: &TestDb,
    host: &str,
    what: &str,
    log_problems: &mut Vec<String>,
) {
    let addr = format!("{host}:{}", db.cluster.primary().port);
    let e = match query_plain(&db.url(px), "SELECT 1") {
        Ok(v) => panic!(
            "{what}: the query should fail (certificate not accepted), got {v:?}\n{}",
            px.log()
        ),
        Err(e) => e,
    };
    assert!(
        e.to_lowercase().contains("certificate"),
        "{what}: the client's error should say the certificate was not accepted: {e}"
    );
    assert!(
        e.contains(&addr),
        "{what}: the client's error should name the server {addr}: {e}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = px.log();
        if log.to_lowercase().contains("certificate") && log.contains(&addr) {
            return;
        }
        if Instant::now() > deadline {
            log_problems.push(format!(
                "{what}: pgmux's log should say {addr}'s certificate was not accepted \
                 (the client was told: {e}); the log:\n{log}"
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fails the test if [`assert_server_cert_rejected`] noted missing log lines.
fn assert_no_log_problems(log_problems: &[String]) {
    assert!(
        log_problems.is_empty(),
        "{} rejected server certificate(s) not logged by pgmux:\n{}",
        log_problems.len(),
        log_problems.join("\n")
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------

/// Self-check of the test harness, without pgmux: PostgreSQL with the test certificate
/// accepts psql with verify-full, tokio-postgres verifying against the test CA with
/// channel binding, and openssl s_client; the wrong CA is refused. When this fails, the
/// other tests' failures say nothing about pgmux.
#[test]
fn harness_postgres_speaks_tls_with_the_test_certificates() {
    let db = TestDb::new("tls_harness");
    let certs = TestCerts::new();
    let pg = db.cluster.primary();
    enable_pg_ssl(pg, &certs.pg);
    let ca = certs.file("ca.crt");
    for host in ["localhost", "127.0.0.1"] {
        let params = [
            ("host", host),
            ("sslmode", "verify-full"),
            ("sslrootcert", ca.as_str()),
            ("channel_binding", "require"),
        ];
        assert_eq!(psql_ok(pg.port, &db, &params, SERVER_SSL_SQL), "t");
        let v = query_tls(
            &conninfo_port(
                pg.port,
                &db,
                host,
                "sslmode=require channel_binding=require",
            ),
            verifying_config(&certs.ca, ALL_VERSIONS),
            SERVER_SSL_SQL,
        );
        assert_eq!(
            v,
            Ok("t".to_string()),
            "tokio-postgres to PostgreSQL via {host}"
        );
    }
    let other = certs.file("other-ca.crt");
    let e = psql_err(
        pg.port,
        &db,
        &[("sslmode", "verify-ca"), ("sslrootcert", other.as_str())],
        "SELECT 1",
    );
    assert!(e.contains("certificate"), "{e}");
    let e = query_tls(
        &conninfo_port(pg.port, &db, "localhost", "sslmode=require"),
        verifying_config(&certs.other_ca, ALL_VERSIONS),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    let out = s_client(pg.port, &["-tls1_2"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pgmux test CA"), "{text}");
}

// ---------------------------------------------------------------------------
// Clients to pgmux
// ---------------------------------------------------------------------------

/// A certificate and key configured, no mode: `prefer`. psql connects with
/// sslmode=require and verify-full (by name and by IP address), plaintext still works,
/// only TLS 1.2 and 1.3 are spoken; pgmux reaches PostgreSQL (ssl on) over TLS by default.
#[test]
fn psql_over_tls_with_the_default_mode() {
    let db = TestDb::new("tls_psql");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    let px = pgmux_with_cert(&db, &certs, &[]);
    let port = px.port();
    let ca = certs.file("ca.crt");

    assert_eq!(ssl_request_answer(port), 'S', "SSLRequest gets 'S'");

    assert_eq!(
        psql_ok(port, &db, &[("sslmode", "require")], "SELECT 1"),
        "1"
    );
    let info = psql_ok(port, &db, &[("sslmode", "require")], "\\conninfo");
    assert!(info.contains("SSL connection"), "{info}");

    // verify-full: our CA, the name psql connected to must be in pgmux's certificate.
    for host in ["localhost", "127.0.0.1"] {
        let params = [
            ("host", host),
            ("sslmode", "verify-full"),
            ("sslrootcert", ca.as_str()),
        ];
        assert_eq!(psql_ok(port, &db, &params, "SELECT 1"), "1", "host {host}");
    }
    // An unrelated CA: psql refuses pgmux's certificate.
    let other = certs.file("other-ca.crt");
    let e = psql_err(
        port,
        &db,
        &[
            ("host", "localhost"),
            ("sslmode", "verify-ca"),
            ("sslrootcert", other.as_str()),
        ],
        "SELECT 1",
    );
    assert!(e.contains("certificate"), "{e}");

    // Plaintext clients are still accepted (prefer).
    assert_eq!(
        psql_ok(port, &db, &[("sslmode", "disable")], "SELECT 2"),
        "2"
    );
    let info = psql_ok(port, &db, &[("sslmode", "disable")], "\\conninfo");
    assert!(!info.contains("SSL connection"), "{info}");

    // TLS 1.2 and 1.3, nothing older.
    let info = psql_ok(
        port,
        &db,
        &[
            ("sslmode", "require"),
            ("ssl_max_protocol_version", "TLSv1.2"),
        ],
        "\\conninfo",
    );
    assert!(info.contains("TLSv1.2"), "{info}");
    let info = psql_ok(
        port,
        &db,
        &[
            ("sslmode", "require"),
            ("ssl_min_protocol_version", "TLSv1.3"),
        ],
        "\\conninfo",
    );
    assert!(info.contains("TLSv1.3"), "{info}");
    // libpq will not offer TLS 1.1 (its minimum is 1.2); openssl s_client will.
    let out = s_client(port, &["-tls1_2"]);
    assert!(out.status.success(), "TLS 1.2: {}", describe_output(&out));
    let out = s_client(port, &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]);
    assert!(
        !out.status.success(),
        "TLS 1.1 must be refused: {}",
        describe_output(&out)
    );
    let out = s_client(port, &["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"]);
    assert!(
        !out.status.success(),
        "TLS 1.0 must be refused: {}",
        describe_output(&out)
    );

    // server_tls_mode defaults to prefer: PostgreSQL has ssl on, so pgmux's server
    // connections are encrypted, whether the client's is or not.
    assert_eq!(
        psql_ok(port, &db, &[("sslmode", "require")], SERVER_SSL_SQL),
        "t"
    );
    assert_eq!(
        psql_ok(port, &db, &[("sslmode", "disable")], SERVER_SSL_SQL),
        "t"
    );
}

/// server_tls_mode = "disable": pgmux speaks plaintext to a PostgreSQL that has ssl on,
/// while its clients use TLS.
#[test]
fn server_tls_mode_disable_keeps_server_connections_plaintext() {
    let db = TestDb::new("tls_srv_off");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    let px = pgmux_with_cert(&db, &certs, &[("PGMUX_SERVER_TLS_MODE", "disable")]);
    assert_eq!(
        psql_ok(px.port(), &db, &[("sslmode", "require")], SERVER_SSL_SQL),
        "f"
    );
}

/// tokio-postgres with rustls: verifying pgmux's certificate against our CA (by name and
/// by IP address), TLS 1.2 only and 1.3 only, sslmode=require without verification;
/// an unrelated CA fails the handshake.
#[test]
fn tokio_postgres_over_tls() {
    let db = TestDb::new("tls_tokio");
    let certs = TestCerts::new();
    let px = pgmux_with_cert(&db, &certs, &[]);

    for host in ["localhost", "127.0.0.1"] {
        for (versions, name) in [
            (ALL_VERSIONS, "1.2+1.3"),
            (TLS12_ONLY, "1.2"),
            (TLS13_ONLY, "1.3"),
        ] {
            let v = query_tls(
                &conninfo(&px, &db, host, "sslmode=require"),
                verifying_config(&certs.ca, versions),
                "SELECT 40 + 2",
            )
            .unwrap_or_else(|e| panic!("verify-full, {host}, TLS {name}: {e}\n{}", px.log()));
            assert_eq!(v, "42");
        }
    }
    // sslmode=require: encrypted, certificate not checked.
    let v = query_tls(
        &conninfo(&px, &db, "127.0.0.1", "sslmode=require"),
        accept_any_config(ALL_VERSIONS),
        "SELECT current_user::text",
    )
    .unwrap_or_else(|e| panic!("sslmode=require: {e}\n{}", px.log()));
    assert_eq!(v, db.user);

    // The wrong CA: the client refuses pgmux's certificate.
    let e = query_tls(
        &conninfo(&px, &db, "localhost", "sslmode=require"),
        verifying_config(&certs.other_ca, ALL_VERSIONS),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // A wrong password over TLS is still a wrong password (28P01), not a TLS failure.
    let bad = format!(
        "host=127.0.0.1 port={} user={} password='not-the-password' dbname={} sslmode=require",
        px.port(),
        db.user,
        db.db
    );
    let e = query_tls(&bad, accept_any_config(ALL_VERSIONS), "SELECT 1").unwrap_err();
    assert!(e.starts_with("28P01"), "{e}");
}

/// pgmux reads its key as PKCS#8, SEC1 ("EC PRIVATE KEY") or PKCS#1 ("RSA PRIVATE KEY"),
/// ECDSA or RSA: clients verifying against the CA get in with each.
#[test]
fn client_key_formats() {
    let db = TestDb::new("tls_keys");
    let certs = TestCerts::new();
    let names = ["localhost", "127.0.0.1"];
    let rsa_pkcs8 = tls_support::rsa_key_pkcs8();
    let rsa = certs.ca.issue_for_key("pgmux-rsa", &names, &rsa_pkcs8);
    let ecdsa = &certs.pgmux;
    let cases = [
        (
            "ECDSA SEC1",
            &ecdsa.cert_pem,
            tls_support::traditional_key(&ecdsa.key_pem),
            "EC PRIVATE KEY",
        ),
        (
            "RSA PKCS#8",
            &rsa.cert_pem,
            rsa_pkcs8.clone(),
            "BEGIN PRIVATE KEY",
        ),
        (
            "RSA PKCS#1",
            &rsa.cert_pem,
            tls_support::traditional_key(&rsa_pkcs8),
            "RSA PRIVATE KEY",
        ),
    ];
    for (what, cert_pem, key_pem, marker) in cases {
        assert!(
            key_pem.contains(marker),
            "{what}: {marker} expected in the key file"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let cert = dir.path().join("server.crt");
        let key = dir.path().join("server.key");
        tls_support::write_file(&cert, cert_pem);
        tls_support::write_file(&key, &key_pem);
        let px = db.pgmux_env(
            &[],
            &[
                ("PGMUX_CLIENT_TLS_CERT_FILE", path_str(&cert)),
                ("PGMUX_CLIENT_TLS_KEY_FILE", path_str(&key)),
            ],
        );
        let v = query_tls(
            &conninfo(
                &px,
                &db,
                "localhost",
                "sslmode=require channel_binding=require",
            ),
            verifying_config(&certs.ca, ALL_VERSIONS),
            "SELECT 1",
        )
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", px.log()));
        assert_eq!(v, "1", "{what}");
        let ca = certs.file("ca.crt");
        let params = [
            ("host", "localhost"),
            ("sslmode", "verify-full"),
            ("sslrootcert", ca.as_str()),
        ];
        assert_eq!(psql_ok(px.port(), &db, &params, "SELECT 2"), "2", "{what}");
    }
}

/// client_tls_mode = "require": a plaintext client gets FATAL 28000 "SSL required"; TLS
/// clients get in.
#[test]
fn client_tls_mode_require_refuses_plaintext_clients() {
    let db = TestDb::new("tls_req");
    let certs = TestCerts::new();
    let px = pgmux_with_cert(&db, &certs, &[("PGMUX_CLIENT_TLS_MODE", "require")]);
    let port = px.port();

    let e = psql_err(port, &db, &[("sslmode", "disable")], "SELECT 1");
    assert!(e.contains("SSL required"), "{e}");

    let mut raw = RawConn::connect(port);
    raw.startup(&db.user, &db.db, &[]);
    let fields = raw
        .next_error()
        .expect("an ErrorResponse for a plaintext client");
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("28000"),
        "{fields:?}"
    );
    assert_eq!(
        fields.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{fields:?}"
    );
    assert!(
        fields.get(&'M').is_some_and(|m| m.contains("SSL required")),
        "{fields:?}"
    );

    assert_eq!(
        psql_ok(port, &db, &[("sslmode", "require")], "SELECT 1"),
        "1"
    );
    // libpq's default (prefer) upgrades to TLS and gets in too.
    assert_eq!(
        psql_ok(port, &db, &[("sslmode", "prefer")], "SELECT 2"),
        "2"
    );
    let v = query_tls(
        &conninfo(&px, &db, "localhost", "sslmode=require"),
        verifying_config(&certs.ca, ALL_VERSIONS),
        "SELECT 3",
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", px.log()));
    assert_eq!(v, "3");
}

/// client_tls_mode = "allow" with a certificate: TLS and plaintext clients alike; "disable"
/// with a certificate: SSLRequest gets 'N'.
#[test]
fn client_tls_modes_allow_and_disable() {
    let db = TestDb::new("tls_modes");
    let certs = TestCerts::new();

    let allow = pgmux_with_cert(&db, &certs, &[("PGMUX_CLIENT_TLS_MODE", "allow")]);
    assert_eq!(ssl_request_answer(allow.port()), 'S');
    let info = psql_ok(allow.port(), &db, &[("sslmode", "require")], "\\conninfo");
    assert!(info.contains("SSL connection"), "{info}");
    assert_eq!(
        psql_ok(allow.port(), &db, &[("sslmode", "disable")], "SELECT 1"),
        "1"
    );

    let disable = pgmux_with_cert(&db, &certs, &[("PGMUX_CLIENT_TLS_MODE", "disable")]);
    assert_eq!(ssl_request_answer(disable.port()), 'N');
    let e = psql_err(disable.port(), &db, &[("sslmode", "require")], "SELECT 1");
    assert!(e.contains("server does not support SSL"), "{e}");
    let info = psql_ok(disable.port(), &db, &[("sslmode", "prefer")], "\\conninfo");
    assert!(!info.contains("SSL connection"), "{info}");
}

/// No certificate configured: client TLS is off (SSLRequest gets 'N'); psql's default
/// sslmode=prefer connects in plaintext, sslmode=require fails.
#[test]
fn without_a_certificate_clients_use_plaintext() {
    let db = TestDb::new("tls_nocert");
    let px = db.pgmux(&[]);
    assert_eq!(ssl_request_answer(px.port()), 'N');
    assert_eq!(
        psql_ok(px.port(), &db, &[("sslmode", "prefer")], "SELECT 1"),
        "1"
    );
    let info = psql_ok(px.port(), &db, &[("sslmode", "prefer")], "\\conninfo");
    assert!(!info.contains("SSL connection"), "{info}");
    let e = psql_err(px.port(), &db, &[("sslmode", "require")], "SELECT 1");
    assert!(e.contains("server does not support SSL"), "{e}");
    let e = query_tls(
        &conninfo(&px, &db, "127.0.0.1", "sslmode=require"),
        accept_any_config(ALL_VERSIONS),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(e.to_lowercase().contains("tls"), "{e}");
}

/// SCRAM-SHA-256-PLUS: over TLS pgmux offers channel binding (tls-server-end-point), so
/// psql and tokio-postgres with channel_binding=require get in; without TLS there is
/// nothing to bind to and they refuse. pgmux's own connections to PostgreSQL are TLS too.
#[test]
fn channel_binding_through_pgmux() {
    let db = TestDb::new("tls_cb");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    let px = pgmux_with_cert(&db, &certs, &[]);
    let port = px.port();

    let out = psql_ok(
        port,
        &db,
        &[("sslmode", "require"), ("channel_binding", "require")],
        SERVER_SSL_SQL,
    );
    assert_eq!(out, "t");
    let ca = certs.file("ca.crt");
    assert_eq!(
        psql_ok(
            port,
            &db,
            &[
                ("host", "localhost"),
                ("sslmode", "verify-full"),
                ("sslrootcert", ca.as_str()),
                ("channel_binding", "require"),
            ],
            "SELECT 1",
        ),
        "1"
    );
    let e = psql_err(
        port,
        &db,
        &[("sslmode", "disable"), ("channel_binding", "require")],
        "SELECT 1",
    );
    assert!(e.contains("channel binding"), "{e}");

    // tokio-postgres computes the binding from pgmux's certificate too.
    let v = query_tls(
        &conninfo(
            &px,
            &db,
            "localhost",
            "sslmode=require channel_binding=require",
        ),
        verifying_config(&certs.ca, ALL_VERSIONS),
        "SELECT 5",
    )
    .unwrap_or_else(|e| panic!("tokio-postgres channel_binding=require: {e}\n{}", px.log()));
    assert_eq!(v, "5");
    // A wrong password with channel binding is still 28P01.
    let bad = format!(
        "host=127.0.0.1 port={port} user={} password='wrong-password' dbname={} \
         sslmode=require channel_binding=require",
        db.user, db.db
    );
    let e = query_tls(&bad, accept_any_config(ALL_VERSIONS), "SELECT 1").unwrap_err();
    assert!(e.starts_with("28P01"), "{e}");
}

// ---------------------------------------------------------------------------
// pgmux to PostgreSQL
// ---------------------------------------------------------------------------

/// sslmode=verify-full with the right CA (URL parameters, by IP address and by name),
/// and server_tls_mode / server_tls_ca_file as keys: queries work over TLS.
#[test]
fn server_verify_full_with_the_right_ca() {
    let db = TestDb::new("tls_vfull");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    let ca = certs.file("ca.crt");

    for host in ["127.0.0.1", "localhost"] {
        let url = server_url(
            &db,
            host,
            &format!("sslmode=verify-full&sslrootcert={}", percent_encode(&ca)),
        );
        let px = pgmux_with_url(&url, &[]);
        assert_eq!(
            query_plain(&db.url(&px), SERVER_SSL_SQL),
            Ok("t".to_string()),
            "verify-full to {host}\n{}",
            px.log()
        );
    }

    // The same through the configuration keys.
    let url = server_url(&db, "127.0.0.1", "");
    let px = pgmux_with_url(
        &url,
        &[
            ("PGMUX_SERVER_TLS_MODE", "verify-full"),
            ("PGMUX_SERVER_TLS_CA_FILE", ca.as_str()),
        ],
    );
    assert_eq!(
        query_plain(&db.url(&px), SERVER_SSL_SQL),
        Ok("t".to_string()),
        "server_tls_mode = verify-full\n{}",
        px.log()
    );

    // require: encrypted without a CA.
    let px = pgmux_with_url(&url, &[("PGMUX_SERVER_TLS_MODE", "require")]);
    assert_eq!(
        query_plain(&db.url(&px), SERVER_SSL_SQL),
        Ok("t".to_string()),
        "server_tls_mode = require\n{}",
        px.log()
    );
}

/// verify-full or verify-ca with an unrelated CA: the client's error and pgmux's log say
/// the server's certificate was not accepted, naming the server.
#[test]
fn server_certificate_from_the_wrong_ca_is_refused() {
    let db = TestDb::new("tls_wrongca");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    let other = certs.file("other-ca.crt");
    let mut log_problems = Vec::new();

    for mode in ["verify-full", "verify-ca"] {
        let url = server_url(
            &db,
            "127.0.0.1",
            &format!("sslmode={mode}&sslrootcert={}", percent_encode(&other)),
        );
        let px = pgmux_with_url(&url, &[]);
        // pgmux tries a handshake with such servers at start-up: the problem is in the
        // log before any client comes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !px.log().to_lowercase().contains("certificate") {
            if Instant::now() > deadline {
                log_problems.push(format!(
                    "URL sslmode={mode}: no certificate problem in the log after start-up:\n{}",
                    px.log()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_server_cert_rejected(
            &px,
            &db,
            "127.0.0.1",
            &format!("URL sslmode={mode}"),
            &mut log_problems,
        );
    }

    // Through the keys, with the host name form of the address.
    let url = server_url(&db, "localhost", "");
    let px = pgmux_with_url(
        &url,
        &[
            ("PGMUX_SERVER_TLS_MODE", "verify-full"),
            ("PGMUX_SERVER_TLS_CA_FILE", other.as_str()),
        ],
    );
    assert_server_cert_rejected(
        &px,
        &db,
        "localhost",
        "server_tls_ca_file",
        &mut log_problems,
    );

    // sslrootcert in the URL wins over server_tls_ca_file.
    let good = certs.file("ca.crt");
    let url = server_url(
        &db,
        "127.0.0.1",
        &format!("sslrootcert={}", percent_encode(&good)),
    );
    let px = pgmux_with_url(
        &url,
        &[
            ("PGMUX_SERVER_TLS_MODE", "verify-full"),
            ("PGMUX_SERVER_TLS_CA_FILE", other.as_str()),
        ],
    );
    assert_eq!(
        query_plain(&db.url(&px), SERVER_SSL_SQL),
        Ok("t".to_string()),
        "URL sslrootcert over server_tls_ca_file\n{}",
        px.log()
    );
    assert_no_log_problems(&log_problems);
}

/// PostgreSQL presents a certificate for `wronghost.example` (from the right CA):
/// verify-full to 127.0.0.1 / localhost fails, verify-ca works.
#[test]
fn server_host_name_mismatch() {
    let db = TestDb::new("tls_name");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.wronghost);
    let ca = percent_encode(&certs.file("ca.crt"));
    let mut log_problems = Vec::new();

    for host in ["127.0.0.1", "localhost"] {
        let url = server_url(&db, host, &format!("sslmode=verify-full&sslrootcert={ca}"));
        let px = pgmux_with_url(&url, &[]);
        assert_server_cert_rejected(
            &px,
            &db,
            host,
            &format!("verify-full to {host}"),
            &mut log_problems,
        );
    }

    let url = server_url(
        &db,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    let px = pgmux_with_url(&url, &[]);
    assert_eq!(
        query_plain(&db.url(&px), SERVER_SSL_SQL),
        Ok("t".to_string()),
        "verify-ca ignores the name\n{}",
        px.log()
    );
    assert_no_log_problems(&log_problems);
}

/// PostgreSQL without ssl: sslmode=require (URL or key) fails with a clear error and
/// no plaintext fallback; prefer (the default) and allow use plaintext; a URL's
/// sslmode=disable wins over server_tls_mode = "require".
#[test]
fn server_without_ssl() {
    let db = TestDb::new("tls_nossl");
    let node = db.cluster.primary();
    let socket_url = format!(
        "postgres://{}:{}@{}:{}/{}",
        percent_encode(&db.user),
        percent_encode(&db.password),
        percent_encode(path_str(&node.socket_dir)),
        node.port,
        percent_encode(&db.db)
    );

    for (what, url, env) in [
        (
            "URL sslmode=require",
            server_url(&db, "127.0.0.1", "sslmode=require"),
            vec![],
        ),
        (
            "server_tls_mode = require",
            server_url(&db, "127.0.0.1", ""),
            vec![("PGMUX_SERVER_TLS_MODE", "require")],
        ),
    ] {
        let px = pgmux_with_url(&url, &env);
        let e = query_plain(&db.url(&px), "SELECT 1")
            .err()
            .unwrap_or_else(|| panic!("{what}: no plaintext fallback\n{}", px.log()));
        let lower = e.to_lowercase();
        assert!(
            lower.contains("ssl") || lower.contains("tls"),
            "{what}: the error should say the server does not do SSL/TLS: {e}"
        );
        let addr = format!("127.0.0.1:{}", db.cluster.primary().port);
        assert!(
            e.contains(&addr),
            "{what}: the error should name {addr}: {e}"
        );
        // Nothing of the test user reached PostgreSQL in plaintext.
        assert_eq!(db.cluster.primary().backend_count(&db.user), 0, "{what}");
    }

    for (what, url, env) in [
        ("default (prefer)", server_url(&db, "127.0.0.1", ""), vec![]),
        (
            "URL sslmode=prefer",
            server_url(&db, "127.0.0.1", "sslmode=prefer"),
            vec![],
        ),
        (
            "URL sslmode=allow",
            server_url(&db, "127.0.0.1", "sslmode=allow"),
            vec![],
        ),
        (
            "URL sslmode=disable over server_tls_mode = require",
            server_url(&db, "127.0.0.1", "sslmode=disable"),
            vec![("PGMUX_SERVER_TLS_MODE", "require")],
        ),
        (
            "unix socket with server_tls_mode = require (never TLS)",
            socket_url,
            vec![("PGMUX_SERVER_TLS_MODE", "require")],
        ),
    ] {
        let px = pgmux_with_url(&url, &env);
        assert_eq!(
            query_plain(&db.url(&px), SERVER_SSL_SQL),
            Ok("f".to_string()),
            "{what}\n{}",
            px.log()
        );
    }
}

/// A configuration file: top-level TLS keys, a `[databases]` url whose sslmode wins
/// over server_tls_mode.
#[test]
fn tls_keys_in_the_configuration_file() {
    let db = TestDb::new("tls_file");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pgmux.toml");
    let write = |server_mode: &str, url_params: &str| {
        std::fs::write(
            &file,
            format!(
                "client_tls_cert_file = \"{}\"\n\
                 client_tls_key_file = \"{}\"\n\
                 client_tls_mode = \"require\"\n\
                 server_tls_mode = \"{server_mode}\"\n\
                 server_tls_ca_file = \"{}\"\n\
                 [databases.{}]\n\
                 url = \"{}\"\n",
                certs.file("pgmux.crt"),
                certs.file("pgmux.key"),
                certs.file("ca.crt"),
                db.db,
                server_url(&db, "localhost", url_params)
            ),
        )
        .expect("write pgmux.toml");
    };

    write("disable", "sslmode=verify-full");
    let px = Pgmux::start(&["--config", path_str(&file)], &[]);
    assert_eq!(
        psql_ok(px.port(), &db, &[("sslmode", "require")], SERVER_SSL_SQL),
        "t",
        "[databases] url sslmode=verify-full over server_tls_mode = disable"
    );
    let e = psql_err(px.port(), &db, &[("sslmode", "disable")], "SELECT 1");
    assert!(e.contains("SSL required"), "{e}");
    drop(px);

    write("verify-full", "sslmode=disable");
    let px = Pgmux::start(&["--config", path_str(&file)], &[]);
    assert_eq!(
        psql_ok(px.port(), &db, &[("sslmode", "require")], SERVER_SSL_SQL),
        "f",
        "[databases] url sslmode=disable over server_tls_mode = verify-full"
    );

    // `pgmux check-config` accepts the file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .args(["check-config", "--config", path_str(&file)])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run pgmux check-config");
    assert!(out.status.success(), "{}", describe_output(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("client_tls_mode"), "{text}");
    assert!(
        !text.contains(&db.password),
        "check-config shows a password:\n{text}"
    );
}

// ---------------------------------------------------------------------------
// Certificate rotation
// ---------------------------------------------------------------------------

/// Kubernetes / cert-manager style secret volume: `tls.crt` and `tls.key` are symlinks
/// into `..data/`, itself a symlink to a timestamped directory; an update writes a new
/// directory and renames a new `..data` link over the old one (both files change at once).
struct SecretVolume {
    dir: tempfile::TempDir,
    generation: u32,
}

impl SecretVolume {
    fn new(cert_pem: &str, key_pem: &str) -> SecretVolume {
        let dir = tempfile::Builder::new()
            .prefix("pgmux-secret-")
            .tempdir()
            .expect("temp dir");
        let mut v = SecretVolume { dir, generation: 0 };
        v.update(cert_pem, key_pem);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), v.dir.path().join(name))
                .expect("symlink");
        }
        v
    }

    fn update(&mut self, cert_pem: &str, key_pem: &str) {
        self.generation += 1;
        let gen_name = format!("..gen_{}", self.generation);
        let gen_dir = self.dir.path().join(&gen_name);
        std::fs::create_dir(&gen_dir).expect("create generation dir");
        tls_support::write_file(&gen_dir.join("tls.crt"), cert_pem);
        tls_support::write_file(&gen_dir.join("tls.key"), key_pem);
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&gen_name, &tmp).expect("symlink ..data_tmp");
        std::fs::rename(&tmp, self.dir.path().join("..data")).expect("rename ..data");
    }

    fn file(&self, name: &str) -> String {
        path_str(&self.dir.path().join(name)).to_string()
    }
}

/// pgmux starts with a certificate from CA 1; it is replaced (atomically, by a symlink
/// swap) with one from CA 2: within seconds new TLS clients see the new certificate, an
/// open TLS connection goes on undisturbed. A broken replacement is logged and the last
/// good certificate stays. A plain rename over the files and SIGHUP work too.
#[test]
fn client_certificate_rotation() {
    let db = TestDb::new("tls_rotate");
    let certs = TestCerts::new();
    let mut volume = SecretVolume::new(&certs.pgmux.cert_pem, &certs.pgmux.key_pem);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("pgmux.toml");
    std::fs::write(
        &file,
        format!(
            "client_tls_cert_file = \"{}\"\nclient_tls_key_file = \"{}\"\n",
            volume.file("tls.crt"),
            volume.file("tls.key")
        ),
    )
    .expect("write pgmux.toml");
    let url = db.database_url();
    let px = Pgmux::start(
        &["--config", path_str(&file)],
        &[("DATABASE_URL", url.as_str())],
    );
    let info = conninfo(&px, &db, "localhost", "sslmode=require");
    let ca1 = || verifying_config(&certs.ca, ALL_VERSIONS);
    let ca2 = || verifying_config(&certs.other_ca, ALL_VERSIONS);

    let rt = runtime();
    // A long-lived TLS connection made with the first certificate.
    let old = rt
        .block_on(connect_tls(&info, ca1()))
        .unwrap_or_else(|e| panic!("first TLS connection: {}\n{}", error_text(&e), px.log()));
    assert_eq!(rt.block_on(first_text(&old, "SELECT 1")), Ok("1".into()));
    assert!(
        query_tls(&info, ca2(), "SELECT 1").is_err(),
        "CA 2 before rotation"
    );

    // Rotate to CA 2.
    volume.update(&certs.pgmux_other.cert_pem, &certs.pgmux_other.key_pem);
    wait_for_certificate(&px, &info, &ca2, "after the symlink swap to CA 2");
    let e = query_tls(&info, ca1(), "SELECT 1").unwrap_err();
    assert!(
        e.to_lowercase().contains("certificate"),
        "CA 1 after rotation: {e}"
    );
    // The old connection still works, in and out of a transaction.
    assert_eq!(rt.block_on(first_text(&old, "SELECT 2")), Ok("2".into()));
    rt.block_on(old.batch_execute("BEGIN; SELECT 1; COMMIT"))
        .unwrap_or_else(|e| panic!("old connection after rotation: {}", error_text(&e)));

    // A broken replacement: logged, the CA 2 certificate stays.
    let log_before = px.log().len();
    volume.update(
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
        "garbage",
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        query_tls(&info, ca2(), "SELECT 3"),
        Ok("3".into()),
        "a broken file keeps the last good certificate\n{}",
        px.log()
    );
    let new_log = px.log()[log_before..].to_lowercase();
    assert!(
        new_log.contains("tls.crt") || new_log.contains("certificate"),
        "the broken certificate file should be logged:\n{new_log}"
    );

    // Back to CA 1 by plain files written aside and renamed over the paths pgmux was
    // given (they become regular files), without a signal: the poll sees them.
    let rename_over = |issued: &tls_support::Issued| {
        for (name, pem) in [("tls.key", &issued.key_pem), ("tls.crt", &issued.cert_pem)] {
            let tmp = volume.dir.path().join(format!(".{name}.tmp"));
            tls_support::write_file(&tmp, pem);
            std::fs::rename(&tmp, volume.dir.path().join(name)).expect("rename over");
        }
    };
    rename_over(&certs.pgmux);
    wait_for_certificate(&px, &info, &ca1, "after rename-over back to CA 1");
    assert_eq!(rt.block_on(first_text(&old, "SELECT 4")), Ok("4".into()));

    // Once more to CA 2, with SIGHUP right after (reload re-reads the files too).
    rename_over(&certs.pgmux_other);
    px.signal(1);
    wait_for_certificate(&px, &info, &ca2, "after rename-over + SIGHUP to CA 2");
    let e = query_tls(&info, ca1(), "SELECT 1").unwrap_err();
    assert!(
        e.to_lowercase().contains("certificate"),
        "CA 1 at the end: {e}"
    );
    assert_eq!(rt.block_on(first_text(&old, "SELECT 5")), Ok("5".into()));
    drop(old);
    drop(rt);
}

/// Polls (up to 10 s) until a new TLS connection verifying with `tls()` gets in.
fn wait_for_certificate(
    px: &Pgmux,
    info: &str,
    tls: &dyn Fn() -> rustls::ClientConfig,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match query_tls(info, tls(), "SELECT 1") {
            Ok(v) => {
                assert_eq!(v, "1");
                return;
            }
            Err(e) if Instant::now() > deadline => {
                panic!(
                    "{what}: new connections still fail after 10 s: {e}\n{}",
                    px.log()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

// ---------------------------------------------------------------------------
// Protocol details at the TLS boundary
// ---------------------------------------------------------------------------

/// Reads one backend message (tag, body) from any stream; None at EOF.
fn read_msg(s: &mut impl std::io::Read) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    if s.read_exact(&mut header).is_err() {
        return None;
    }
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    assert!((4..1 << 24).contains(&len), "bad message length {len}");
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body).ok()?;
    Some((header[0], body))
}

/// A blocking TLS connection to pgmux on 127.0.0.1:`port` (SSLRequest, 'S', then the
/// handshake on first use), for raw protocol checks.
fn raw_tls(
    port: u16,
    tls: rustls::ClientConfig,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set_read_timeout");
    let mut msg = 8i32.to_be_bytes().to_vec();
    msg.extend_from_slice(&80_877_103i32.to_be_bytes());
    tcp.write_all(&msg).expect("send SSLRequest");
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).expect("answer to SSLRequest");
    assert_eq!(char::from(answer[0]), 'S');
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(tls), name).expect("TLS client");
    rustls::StreamOwned::new(conn, tcp)
}

/// The mechanisms of an AuthenticationSASL message body.
fn sasl_mechanisms(body: &[u8]) -> Vec<String> {
    assert_eq!(
        &body[..4],
        &10i32.to_be_bytes(),
        "AuthenticationSASL expected"
    );
    body[4..]
        .split(|&b| b == 0)
        .filter(|m| !m.is_empty())
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect()
}

/// Over TLS pgmux offers SCRAM-SHA-256-PLUS before SCRAM-SHA-256, in plaintext only
/// SCRAM-SHA-256. A TLS client that picks SCRAM-SHA-256 while claiming it could bind
/// ("y": it thinks the server cannot) is refused: that is a downgrade.
#[test]
fn scram_mechanisms_over_tls_and_the_downgrade_check() {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
    use std::io::Write;

    let db = TestDb::new("tls_mech");
    let certs = TestCerts::new();
    let px = pgmux_with_cert(&db, &certs, &[]);
    let startup = RawConn::startup_message(&[("user", &db.user), ("database", &db.db)]);

    let mut plain = RawConn::connect(px.port());
    plain.send(&startup);
    let (tag, body) = plain.read_message().expect("an authentication request");
    assert_eq!(char::from(tag), 'R');
    assert_eq!(sasl_mechanisms(&body), ["SCRAM-SHA-256"], "plaintext");

    let mut s = raw_tls(px.port(), verifying_config(&certs.ca, ALL_VERSIONS));
    s.write_all(&startup).expect("send StartupMessage over TLS");
    let (tag, body) = read_msg(&mut s).expect("an authentication request over TLS");
    assert_eq!(char::from(tag), 'R');
    assert_eq!(
        sasl_mechanisms(&body),
        ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"],
        "over TLS"
    );
    // The downgrade: SCRAM-SHA-256 with gs2 flag "y".
    let scram = ScramSha256::new(db.password.as_bytes(), ChannelBinding::unrequested());
    let first = scram.message();
    assert!(
        first.starts_with(b"y,,"),
        "{:?}",
        String::from_utf8_lossy(first)
    );
    let mut b = SCRAM_SHA_256.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(&(first.len() as i32).to_be_bytes());
    b.extend_from_slice(first);
    s.write_all(&RawConn::frame(b'p', &b))
        .expect("send SASLInitialResponse");
    let mut got = Vec::new();
    while let Some((tag, body)) = read_msg(&mut s) {
        assert!(
            !(tag == b'R' && body.starts_with(&0i32.to_be_bytes())),
            "a downgraded SCRAM exchange must not log in"
        );
        if tag == b'E' {
            got.push(RawConn::error_fields(&body));
            break;
        }
        if tag == b'R' && body.starts_with(&11i32.to_be_bytes()) {
            // SASLContinue: answer it; the refusal may come at the proof.
            let mut scram = ScramSha256::new(db.password.as_bytes(), ChannelBinding::unrequested());
            let _ = scram.message();
            if scram.update(&body[4..]).is_ok() {
                let _ = s.write_all(&RawConn::frame(b'p', scram.message()));
            }
        }
    }
    assert_eq!(got.len(), 1, "an ErrorResponse for the downgrade");
    assert_eq!(
        got[0].get(&'S').map(String::as_str),
        Some("FATAL"),
        "{got:?}"
    );

    // Control: the same message with gs2 flag "n" (the client does not bind, as libpq's
    // channel_binding=disable) is accepted: the exchange goes on with SASLContinue.
    let mut s = raw_tls(px.port(), verifying_config(&certs.ca, ALL_VERSIONS));
    s.write_all(&startup).expect("send StartupMessage over TLS");
    let (tag, _) = read_msg(&mut s).expect("AuthenticationSASL");
    assert_eq!(char::from(tag), 'R');
    let scram = ScramSha256::new(db.password.as_bytes(), ChannelBinding::unsupported());
    let first = scram.message();
    assert!(first.starts_with(b"n,,"));
    let mut b = SCRAM_SHA_256.as_bytes().to_vec();
    b.push(0);
    b.extend_from_slice(&(first.len() as i32).to_be_bytes());
    b.extend_from_slice(first);
    s.write_all(&RawConn::frame(b'p', &b))
        .expect("send SASLInitialResponse");
    let (tag, body) = read_msg(&mut s).expect("an answer to SCRAM-SHA-256 with \"n\"");
    let what = if tag == b'E' {
        format!("{:?}", RawConn::error_fields(&body))
    } else {
        format!("{:?}", char::from(tag))
    };
    assert!(
        tag == b'R' && body.starts_with(&11i32.to_be_bytes()),
        "SASLContinue expected, got {what}"
    );
}

/// Bytes sent together with the SSLRequest (before pgmux's answer) could be plaintext
/// injected ahead of the handshake (CVE-2021-23214 for PostgreSQL): refused with 08P01.
#[test]
fn data_after_ssl_request_is_refused() {
    use std::io::Read;
    let db = TestDb::new("tls_inject");
    let certs = TestCerts::new();
    let px = pgmux_with_cert(&db, &certs, &[]);
    let mut conn = RawConn::connect(px.port());
    let mut bytes = 8i32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&80_877_103i32.to_be_bytes());
    bytes.extend_from_slice(&RawConn::startup_message(&[
        ("user", &db.user),
        ("database", &db.db),
    ]));
    conn.send(&bytes);
    let mut answer = Vec::new();
    let _ = conn.stream().read_to_end(&mut answer);
    let rest = match answer.first() {
        Some(b'S') | Some(b'N') => &answer[1..],
        _ => &answer[..],
    };
    assert_eq!(rest.first(), Some(&b'E'), "an ErrorResponse: {answer:?}");
    let fields = RawConn::error_fields(&rest[5..]);
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("08P01"),
        "{fields:?}"
    );
}

/// auth_file with a SCRAM verifier (pgmux holds no password): the client logs in to
/// pgmux over TLS with channel binding, pgmux logs in to PostgreSQL over TLS with the
/// keys the client's proof revealed (SCRAM-SHA-256-PLUS toward PostgreSQL).
#[test]
fn scram_passthrough_over_tls_on_both_sides() {
    let db = TestDb::new("tls_passthru");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    let secret = db.psql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = {}",
        support::quote_literal(&db.user)
    ));
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    support::register_secret(&secret);
    let dir = tempfile::tempdir().expect("temp dir");
    let userlist = dir.path().join("userlist.txt");
    std::fs::write(&userlist, format!("\"{}\" \"{secret}\"\n", db.user)).expect("userlist");
    // The URL carries no password: the login to PostgreSQL can only be passthrough.
    let url = format!(
        "postgres://{}@127.0.0.1:{}/{}?sslmode=verify-full&sslrootcert={}",
        percent_encode(&db.user),
        db.cluster.primary().port,
        percent_encode(&db.db),
        percent_encode(&certs.file("ca.crt"))
    );
    let cert = certs.file("pgmux.crt");
    let key = certs.file("pgmux.key");
    let px = pgmux_with_url(
        &url,
        &[
            ("PGMUX_AUTH_FILE", path_str(&userlist)),
            ("PGMUX_CLIENT_TLS_CERT_FILE", cert.as_str()),
            ("PGMUX_CLIENT_TLS_KEY_FILE", key.as_str()),
        ],
    );
    let v = query_tls(
        &conninfo(
            &px,
            &db,
            "localhost",
            "sslmode=require channel_binding=require",
        ),
        verifying_config(&certs.ca, ALL_VERSIONS),
        SERVER_SSL_SQL,
    )
    .unwrap_or_else(|e| panic!("passthrough over TLS: {e}\n{}", px.log()));
    assert_eq!(v, "t");
    // A second client (plaintext, no binding) shares the pool's servers.
    assert_eq!(
        psql_ok(px.port(), &db, &[("sslmode", "disable")], SERVER_SSL_SQL),
        "t"
    );
    // And a wrong password is still refused.
    let bad = format!(
        "host=localhost port={} user={} password='wrong-password' dbname={} sslmode=require",
        px.port(),
        db.user,
        db.db
    );
    let e = query_tls(&bad, verifying_config(&certs.ca, ALL_VERSIONS), "SELECT 1").unwrap_err();
    assert!(e.starts_with("28P01"), "{e}");
}

/// A client connected over TLS cancels its running query (tokio-postgres sends the
/// CancelRequest over TLS too); PostgreSQL is reached over TLS.
#[test]
fn cancel_over_tls() {
    let db = TestDb::new("tls_cancel");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    let px = pgmux_with_cert(&db, &certs, &[]);
    let info = conninfo(&px, &db, "localhost", "sslmode=require");
    let tls = verifying_config(&certs.ca, ALL_VERSIONS);
    runtime().block_on(async {
        let client = connect_tls(&info, tls.clone())
            .await
            .unwrap_or_else(|e| panic!("{}", error_text(&e)));
        let token = client.cancel_token();
        let started = Instant::now();
        let mut sleeper = tokio::spawn(async move {
            let r = client.simple_query("SELECT pg_sleep(30)").await;
            (r.map(|_| ()).map_err(|e| error_text(&e)), client)
        });
        // Cancel until the query ends (a cancel that arrives before the query is a no-op).
        let mut ended = None;
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token
                .cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone()))
                .await
                .unwrap_or_else(|e| panic!("cancel over TLS: {}", error_text(&e)));
            if let Ok(done) = tokio::time::timeout(Duration::from_secs(2), &mut sleeper).await {
                ended = Some(done.expect("join"));
                break;
            }
        }
        let (r, client) = ended.expect("pg_sleep(30) did not end after cancel requests");
        let e = r.expect_err("pg_sleep(30) should be cancelled");
        assert!(e.starts_with("57014"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(20));
        // The connection goes on.
        assert_eq!(first_text(&client, "SELECT 1").await, Ok("1".into()));
    });
}

/// Bulk data across both TLS hops: a 16 MB value, a 200 000-row COPY out and a COPY in
/// from psql; many pipelined queries on one tokio-postgres connection.
#[test]
fn bulk_data_over_tls_on_both_sides() {
    let db = TestDb::new("tls_bulk");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    let px = pgmux_with_cert(&db, &certs, &[("PGMUX_SERVER_TLS_MODE", "require")]);
    let port = px.port();
    let tls = [("sslmode", "require")];

    let big = psql_ok(port, &db, &tls, "SELECT repeat('x', 16 * 1024 * 1024)");
    assert_eq!(big.len(), 16 * 1024 * 1024);
    assert!(big.bytes().all(|b| b == b'x'));

    let out = psql_ok(
        port,
        &db,
        &tls,
        "COPY (SELECT g, md5(g::text) FROM generate_series(1, 200000) g) TO STDOUT",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 200_000);
    assert!(lines[199_999].starts_with("200000\t"), "{}", lines[199_999]);

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("in.tsv");
    std::fs::write(&file, format!("{out}\n")).expect("write COPY input");
    psql_ok(port, &db, &tls, "CREATE TABLE t(g int, h text)");
    psql_ok(
        port,
        &db,
        &tls,
        &format!("\\copy t FROM '{}'", path_str(&file)),
    );
    assert_eq!(
        psql_ok(
            port,
            &db,
            &tls,
            "SELECT count(*) || ' ' || bool_and(h = md5(g::text)) FROM t"
        ),
        "200000 true"
    );

    let info = conninfo(&px, &db, "localhost", "sslmode=require");
    runtime().block_on(async {
        let client = connect_tls(&info, verifying_config(&certs.ca, ALL_VERSIONS))
            .await
            .unwrap_or_else(|e| panic!("{}", error_text(&e)));
        let stmt = client
            .prepare("SELECT $1::int * 2, repeat('y', $1::int)")
            .await
            .unwrap_or_else(|e| panic!("{}", error_text(&e)));
        let queries = (0..300).map(|i| {
            let client = &client;
            let stmt = &stmt;
            async move {
                let row = client
                    .query_one(stmt, &[&(i * 100)])
                    .await
                    .unwrap_or_else(|e| panic!("query {i}: {}", error_text(&e)));
                assert_eq!(row.get::<_, i32>(0), i * 200);
                assert_eq!(row.get::<_, String>(1).len(), (i * 100) as usize);
            }
        });
        futures::future::join_all(queries).await;
    });
}

/// Configuration errors at start-up: a certificate file that is not PEM, a key that does
/// not go with the certificate, verify-full without a CA. `pgmux check-config` exits 2
/// naming the key, and pgmux does not start.
#[test]
fn tls_configuration_errors() {
    let certs = TestCerts::new();
    let garbage = certs.path("garbage.pem");
    tls_support::write_file(&garbage, "not a certificate\n");
    let pgmux_crt = certs.file("pgmux.crt");
    let other_key = certs.file("pg.key");
    let garbage = path_str(&garbage).to_string();
    type Env<'a> = Vec<(&'a str, &'a str)>;
    let cases: Vec<(&str, Env, &str)> = vec![
        (
            "certificate file not PEM",
            vec![
                ("PGMUX_CLIENT_TLS_CERT_FILE", garbage.as_str()),
                ("PGMUX_CLIENT_TLS_KEY_FILE", other_key.as_str()),
            ],
            "client_tls_cert_file",
        ),
        (
            "key of another certificate",
            vec![
                ("PGMUX_CLIENT_TLS_CERT_FILE", pgmux_crt.as_str()),
                ("PGMUX_CLIENT_TLS_KEY_FILE", other_key.as_str()),
            ],
            "client_tls_key_file",
        ),
        (
            "verify-full without a CA",
            vec![("PGMUX_SERVER_TLS_MODE", "verify-full")],
            "verify-full",
        ),
    ];
    for (what, env, key) in cases {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgmux"));
        cmd.arg("check-config")
            .env("DATABASE_URL", "postgres://u:secret-pw@127.0.0.1:5432/db");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what}: {}",
            describe_output(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(key),
            "{what}: the error should name {key}: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
}

/// READ_DATABASE_URL's own sslmode applies to the replica, DATABASE_URL's to the
/// primary: a replica read is encrypted while the primary's connections are not.
#[test]
fn read_database_url_sslmode_applies_to_its_replica() {
    let mut db = TestDb::new("tls_replica");
    let certs = TestCerts::new();
    enable_pg_ssl(db.cluster.primary(), &certs.pg);
    // The replica is a copy of the primary: ssl on, with the same certificate.
    db.cluster.keep_wal_for_replicas();
    db.cluster.add_replica();
    let replica = &db.cluster.replicas()[0];
    let ca = percent_encode(&certs.file("ca.crt"));
    let primary_url = server_url(&db, "127.0.0.1", "sslmode=disable");
    let replica_url = format!(
        "{}?sslmode=verify-full&sslrootcert={ca}",
        replica.url(&db.user, &db.password, &db.db)
    );
    let px = Pgmux::start(
        &[],
        &[
            ("DATABASE_URL", primary_url.as_str()),
            ("READ_DATABASE_URL", replica_url.as_str()),
        ],
    );
    let sql = "SELECT pg_is_in_recovery()::text || ' ' || ssl::text \
               FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    // Reads go to the replica once pgmux has found it healthy.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = query_plain(&db.url(&px), sql);
        match v.as_deref() {
            Ok("true true") => break,
            Ok("false false") if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => panic!(
                "a replica read: expected \"true true\", got {other:?}\n{}",
                px.log()
            ),
        }
    }
    assert_eq!(
        query_plain(&db.url(&px), &format!("/* pgmux:primary */ {sql}")),
        Ok("false false".to_string()),
        "the primary, sslmode=disable\n{}",
        px.log()
    );
}
