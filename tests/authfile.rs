//! `auth_file` (PgBouncer's userlist.txt format) against real PostgreSQL: plain, MD5 and
//! SCRAM entries; SCRAM passthrough logs a user in to PostgreSQL although pgmux holds no
//! password for it; the file is re-read on reload; secrets never reach the log.

mod support;

use std::time::Duration;

use support::{quote_literal, TestDb};

fn current_user_via(url: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = support::try_connect(url).await.map_err(|e| {
            e.as_db_error()
                .map(|d| format!("{}: {}", d.code().code(), d.message()))
                .unwrap_or_else(|| e.to_string())
        })?;
        let row = c
            .query_one("SELECT current_user::text", &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, String>(0))
    })
}

fn role_secret(db: &TestDb, role: &str) -> String {
    db.psql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = {}",
        quote_literal(role)
    ))
    .trim()
    .to_string()
}

#[test]
fn auth_file_plain_md5_and_scram_entries() {
    let db = TestDb::new("authfile");
    let node = db.cluster.primary();
    db.psql(
        "CREATE ROLE plainuser LOGIN PASSWORD 'plain-Pw-1'; \
         CREATE ROLE scramuser LOGIN PASSWORD 'scram-Pw-2'; \
         SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5-Pw-3';",
    );
    // md5user's stored password is an MD5 hash: PostgreSQL must ask it for MD5.
    let hba = node.data_dir.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("host all md5user 127.0.0.1/32 md5\n{old}")).unwrap();
    node.reload();
    std::thread::sleep(Duration::from_millis(300));

    let scram_secret = role_secret(&db, "scramuser");
    assert!(scram_secret.starts_with("SCRAM-SHA-256$"), "{scram_secret}");
    let md5_secret = role_secret(&db, "md5user");
    assert!(md5_secret.starts_with("md5"), "{md5_secret}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("userlist.txt");
    std::fs::write(
        &file,
        format!(
            "; pgmux test users\n\"plainuser\" \"plain-Pw-1\"\n\"scramuser\" \"{scram_secret}\"\n\"md5user\" \"{md5_secret}\"\n"
        ),
    )
    .unwrap();
    let file_str = file.to_str().unwrap();
    let px = db.pgmux_env(&[], &[("PGMUX_AUTH_FILE", file_str)]);
    let url = |user: &str, pw: &str| px.url(user, pw, &db.db);

    // Plain entry: SCRAM to pgmux, pgmux logs in with the password.
    assert_eq!(
        current_user_via(&url("plainuser", "plain-Pw-1")).unwrap(),
        "plainuser"
    );
    // SCRAM entry: pgmux holds no password for scramuser; it checks the client's proof
    // against the verifier and logs in to PostgreSQL with the keys the proof revealed.
    assert_eq!(
        current_user_via(&url("scramuser", "scram-Pw-2")).unwrap(),
        "scramuser"
    );
    let e = current_user_via(&url("scramuser", "wrong")).unwrap_err();
    assert!(e.starts_with("28P01"), "{e}");
    // A second client shares the pool's servers (logged in by passthrough).
    assert_eq!(
        current_user_via(&url("scramuser", "scram-Pw-2")).unwrap(),
        "scramuser"
    );
    // MD5 entry: with SCRAM client authentication it cannot be used.
    let e = current_user_via(&url("md5user", "md5-Pw-3")).unwrap_err();
    assert!(e.starts_with("28P01"), "{e}");

    // auth_type = md5: the MD5 entry authenticates the client, and logs in to
    // PostgreSQL's MD5 method with the stored hash.
    let px_md5 = db.pgmux_env(
        &[],
        &[("PGMUX_AUTH_FILE", file_str), ("PGMUX_AUTH_TYPE", "md5")],
    );
    let url5 = |user: &str, pw: &str| px_md5.url(user, pw, &db.db);
    assert_eq!(
        current_user_via(&url5("md5user", "md5-Pw-3")).unwrap(),
        "md5user"
    );
    let e = current_user_via(&url5("md5user", "nope")).unwrap_err();
    assert!(e.starts_with("28P01"), "{e}");
    assert_eq!(
        current_user_via(&url5("plainuser", "plain-Pw-1")).unwrap(),
        "plainuser"
    );

    // Re-read on reload: a user added to the file can log in after SIGHUP.
    db.psql("CREATE ROLE lateuser LOGIN PASSWORD 'late-Pw-4'");
    assert!(current_user_via(&url("lateuser", "late-Pw-4")).is_err());
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("\"lateuser\" \"late-Pw-4\"\n");
    std::fs::write(&file, text).unwrap();
    px.signal(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match current_user_via(&url("lateuser", "late-Pw-4")) {
            Ok(u) => {
                assert_eq!(u, "lateuser");
                break;
            }
            Err(e) if std::time::Instant::now() > deadline => panic!("after reload: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }

    // No secret of the file reaches the logs.
    for log in [px.log(), px_md5.log()] {
        for secret in [
            "plain-Pw-1",
            "scram-Pw-2",
            "md5-Pw-3",
            "late-Pw-4",
            &scram_secret,
            &md5_secret,
        ] {
            assert!(!log.contains(secret), "a secret in the log:\n{log}");
        }
    }
}
