use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tempfile::TempDir;

use crate::*;

/// A temp config file; the directory is removed on drop.
struct TmpFile {
    _dir: TempDir,
    path: PathBuf,
}

fn tmp(contents: &str) -> TmpFile {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pgmux.toml");
    std::fs::write(&path, contents).expect("write");
    TmpFile { _dir: dir, path }
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn flags_with(file: &TmpFile) -> Flags {
    Flags {
        config: Some(file.path.clone()),
        ..Flags::default()
    }
}

fn load_file(contents: &str) -> (TmpFile, Result<Config, ConfigError>) {
    let f = tmp(contents);
    let r = load(&flags_with(&f), &BTreeMap::new());
    (f, r)
}

fn file_origin(f: &TmpFile, line: usize) -> Origin {
    Origin::File {
        path: f.path.clone(),
        line: Some(line),
    }
}

const DB: &str = "[databases.app]\nurl = \"postgres://db-host/app\"\n";

#[test]
fn defaults() {
    let c = Config::default();
    assert_eq!(c.listen, "0.0.0.0:6432".parse().unwrap());
    assert_eq!(c.max_client_conn, 5000);
    assert_eq!(c.pool_size, 20);
    assert_eq!(c.auth_type, AuthType::ScramSha256);
    assert_eq!(c.query_wait_timeout, Duration::from_secs(120));
    assert_eq!(c.server_connect_timeout, Duration::from_secs(15));
    assert_eq!(c.client_login_timeout, Duration::from_secs(60));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.server_idle_timeout, Duration::from_secs(600));
    assert_eq!(c.max_message_size, 64 << 20);
    assert_eq!(c.workers, 0);
    assert_eq!(c.read_routing, ReadRouting::Auto);
    assert_eq!(c.read_your_writes, ReadYourWrites::User);
    assert_eq!(c.max_replica_lag, Duration::from_secs(10));
    assert_eq!(c.replica_check_interval, Duration::from_millis(100));
    assert!(c.write_functions.is_empty());

    // Loaded without any setting: the same defaults, no overrides.
    let c = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", "postgres://app@h/app")]),
    )
    .unwrap();
    assert_eq!(c.read_routing, ReadRouting::Auto);
    assert_eq!(c.read_your_writes, ReadYourWrites::User);
    assert_eq!(c.max_replica_lag, DEFAULT_MAX_REPLICA_LAG);
    assert_eq!(c.replica_check_interval, DEFAULT_REPLICA_CHECK_INTERVAL);
    assert!(c.write_functions.is_empty());
    assert_eq!(c.databases["app"].read_routing, None);
    assert_eq!(c.users["app"].read_routing, None);
    assert_eq!(c.read_routing_for("app", "app"), ReadRouting::Auto);
}

#[test]
fn zero_config_database_url_only() {
    let c = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", "postgres://app:secret@db-host:5432/app")]),
    )
    .unwrap();
    let expected = Config {
        databases: BTreeMap::from([(
            "app".to_string(),
            Database {
                name: "app".into(),
                primary: ServerAddr {
                    host: "db-host".into(),
                    port: 5432,
                    dbname: "app".into(),
                    params: BTreeMap::new(),
                    tls: Default::default(),
                },
                replicas: vec![],
                pool_size: None,
                read_routing: None,
            },
        )]),
        users: BTreeMap::from([(
            "app".to_string(),
            User {
                name: "app".into(),
                password: Some(Secret::new("secret")),
                pool_size: None,
                read_routing: None,
            },
        )]),
        // The zero-config start lets the DATABASE_URL user read the console.
        stats_users: vec!["app".into()],
        ..Config::default()
    };
    assert_eq!(c, expected);
}

#[test]
fn database_url_dbname_defaults_to_user_and_flag_wins() {
    let c = load(
        &Flags {
            database_url: Some("postgresql://bob@h2".into()),
            ..Flags::default()
        },
        &env(&[("DATABASE_URL", "postgres://app:secret@db-host/app")]),
    )
    .unwrap();
    assert_eq!(c.databases.keys().collect::<Vec<_>>(), ["bob"]);
    assert_eq!(c.databases["bob"].primary.host, "h2");
    assert_eq!(c.databases["bob"].primary.port, 5432);
    assert_eq!(c.users["bob"].password, None);

    let e = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", "postgres://db-host")]),
    )
    .unwrap_err();
    assert_eq!(e.key, "DATABASE_URL");
    assert_eq!(e.origin, Origin::Env("DATABASE_URL".into()));
}

#[test]
fn no_database_is_an_error() {
    let e = load(&Flags::default(), &BTreeMap::new()).unwrap_err();
    assert_eq!(e.key, "databases");
    assert!(e.message.contains("DATABASE_URL"), "{e}");
}

#[test]
fn full_file_example() {
    let (_f, r) = load_file(
        r#"
listen = "127.0.0.1:7000"
pool_size = 21
max_client_conn = 100
auth_type = "md5"
query_wait_timeout = "30s"
server_connect_timeout = 5
client_login_timeout = "1m"
shutdown_timeout = "250ms"
server_idle_timeout = "0s"
max_message_size = "16MiB"
workers = 4

[databases.app]
url = "postgres://app:secret@db-host:5432/app?sslmode=require&application_name=pgmux"
replicas = ["postgres://db-replica:5433/app", "postgres://db-replica2"]
pool_size = 30

[users.app]
password = "secret"
pool_size = 10
"#,
    );
    let c = r.unwrap();
    assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
    assert_eq!(c.pool_size, 21);
    assert_eq!(c.max_client_conn, 100);
    assert_eq!(c.auth_type, AuthType::Md5);
    assert_eq!(c.query_wait_timeout, Duration::from_secs(30));
    assert_eq!(c.server_connect_timeout, Duration::from_secs(5));
    assert_eq!(c.client_login_timeout, Duration::from_secs(60));
    assert_eq!(c.shutdown_timeout, Duration::from_millis(250));
    assert_eq!(c.server_idle_timeout, Duration::ZERO);
    assert_eq!(c.max_message_size, 16 << 20);
    assert_eq!(c.workers, 4);
    let db = &c.databases["app"];
    assert_eq!(db.pool_size, Some(30));
    assert_eq!(db.primary.params["sslmode"], "require");
    assert_eq!(db.primary.params["application_name"], "pgmux");
    assert_eq!(db.replicas.len(), 2);
    assert_eq!(db.replicas[0].port, 5433);
    // replica without a path: dbname = database key
    assert_eq!(db.replicas[1].dbname, "app");
    assert_eq!(db.replicas[1].host, "db-replica2");
    assert_eq!(c.users["app"].password.as_ref().unwrap().expose(), "secret");
    assert_eq!(c.users["app"].pool_size, Some(10));
}

#[test]
fn layering_file_env_flag() {
    let f = tmp(&format!(
        "pool_size = 5\nlisten = \"127.0.0.1:1000\"\nquery_wait_timeout = \"10s\"\nmax_client_conn = 7\n{DB}"
    ));
    let e = env(&[
        ("PGMUX_POOL_SIZE", "6"),
        ("PGMUX_LISTEN", "127.0.0.1:2000"),
        ("PGMUX_QUERY_WAIT_TIMEOUT", "20s"),
    ]);
    let fl = Flags {
        pool_size: Some("7".into()),
        ..flags_with(&f)
    };
    let c = load(&fl, &e).unwrap();
    assert_eq!(c.pool_size, 7); // flag
    assert_eq!(c.listen, "127.0.0.1:2000".parse().unwrap()); // env
    assert_eq!(c.query_wait_timeout, Duration::from_secs(20)); // env
    assert_eq!(c.max_client_conn, 7); // file
    assert_eq!(c.shutdown_timeout, Duration::from_secs(30)); // default

    let c = load(&flags_with(&f), &e).unwrap();
    assert_eq!(c.pool_size, 6);
    let c = load(&flags_with(&f), &BTreeMap::new()).unwrap();
    assert_eq!(c.pool_size, 5);
    assert_eq!(c.listen, "127.0.0.1:1000".parse().unwrap());

    let fl = Flags {
        listen: Some("127.0.0.1:3000".into()),
        max_client_conn: Some("9".into()),
        ..flags_with(&f)
    };
    let c = load(&fl, &e).unwrap();
    assert_eq!(c.listen, "127.0.0.1:3000".parse().unwrap());
    assert_eq!(c.max_client_conn, 9);
}

#[test]
fn config_path_from_env_and_empty_env_is_unset() {
    let f = tmp(&format!("pool_size = 5\n{DB}"));
    let e = env(&[
        ("PGMUX_CONFIG", f.path.to_str().unwrap()),
        ("PGMUX_POOL_SIZE", ""),
        ("DATABASE_URL", ""),
    ]);
    let c = load(&Flags::default(), &e).unwrap();
    assert_eq!(c.pool_size, 5);
    assert_eq!(c.databases["app"].primary.host, "db-host");
}

#[test]
fn invalid_file_value_overridden_later_is_fine() {
    let f = tmp(&format!("pool_size = 0\n{DB}"));
    let c = load(&flags_with(&f), &env(&[("PGMUX_POOL_SIZE", "3")])).unwrap();
    assert_eq!(c.pool_size, 3);
}

#[test]
fn unknown_keys_name_key_and_line() {
    let (f, r) = load_file(&format!("pool_size = 1\npol_size = 2\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "pol_size");
    assert_eq!(e.origin, file_origin(&f, 2));

    let (f, r) = load_file(&format!("{DB}pol_size = 30\n"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "databases.app.pol_size");
    assert_eq!(e.origin, file_origin(&f, 3));
    assert_eq!(
        e.to_string(),
        format!(
            "config file {} line 3: databases.app.pol_size: unknown key (expected one of: url, replicas, pool_size, read_routing)",
            f.path.display()
        )
    );

    let (f, r) = load_file(&format!(
        "{DB}\n[users.app]\npassword = \"x\"\npasswd = \"y\"\n"
    ));
    let e = r.unwrap_err();
    assert_eq!(e.key, "users.app.passwd");
    assert_eq!(e.origin, file_origin(&f, 6));
    assert!(!e.message.contains("\"y\""), "{e}");
}

#[test]
fn toml_syntax_error_has_line() {
    let (f, r) = load_file("pool_size = 1\nlisten = \n");
    let e = r.unwrap_err();
    assert_eq!(e.key, "config");
    assert_eq!(e.origin, file_origin(&f, 2));
    assert!(e.message.starts_with("invalid TOML"), "{e}");
}

#[test]
fn bad_url_errors_never_show_password() {
    let cases = [
        ("url = \"mysql://u:hunter2@h/db\"", "scheme"),
        ("url = \"postgres://u:hunter2@h:99999/db\"", "port"),
        ("url = \"postgres://u:hunter2@/db\"", "host"),
        (
            "url = \"postgres://u:hunter2@h/db?sslmode=bogus\"",
            "sslmode",
        ),
        ("url = 5", "expected a string"),
    ];
    for (line, needle) in cases {
        let (f, r) = load_file(&format!("\n[databases.app]\n{line}\n"));
        let e = r.unwrap_err();
        assert_eq!(e.key, "databases.app.url", "{line}");
        assert_eq!(e.origin, file_origin(&f, 3), "{line}");
        assert!(e.message.contains(needle), "{line}: {e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    let (f, r) = load_file("[databases.app]\nurl = \"postgres://h/app\"\nreplicas = [\n  \"postgres://h2/app\",\n  \"http://x:hunter2@h3/app\",\n]\n");
    let e = r.unwrap_err();
    assert_eq!(e.key, "databases.app.replicas[1]");
    assert_eq!(e.origin, file_origin(&f, 5));
    assert!(!e.to_string().contains("hunter2"));

    let e = load(
        &Flags {
            database_url: Some("postgres://u:hunter2@:5432/db".into()),
            ..Flags::default()
        },
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert_eq!(e.key, "DATABASE_URL");
    assert_eq!(e.origin, Origin::Flag("--database-url".into()));
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn missing_url_in_database() {
    let (f, r) = load_file("pool_size = 3\n[databases.app]\npool_size = 3\n");
    let e = r.unwrap_err();
    assert_eq!(e.key, "databases.app.url");
    assert_eq!(e.origin, file_origin(&f, 2));
}

#[test]
fn pool_size_zero_from_each_source() {
    let (f, r) = load_file(&format!("\n\npool_size = 0\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("pool_size", &file_origin(&f, 3))
    );

    let (f, r) = load_file(&format!("{DB}pool_size = 0\n"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "databases.app.pool_size");
    assert_eq!(e.origin, file_origin(&f, 3));

    let (f, r) = load_file(&format!("{DB}[users.bob]\npool_size = 0\n"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "users.bob.pool_size");
    assert_eq!(e.origin, file_origin(&f, 4));

    let (f, r) = load_file(&format!("max_client_conn = 0\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "max_client_conn");
    assert_eq!(e.origin, file_origin(&f, 1));

    let db = ("DATABASE_URL", "postgres://h/app");
    let e = load(&Flags::default(), &env(&[db, ("PGMUX_POOL_SIZE", "0")])).unwrap_err();
    assert_eq!(e.key, "pool_size");
    assert_eq!(e.origin, Origin::Env("PGMUX_POOL_SIZE".into()));
    assert_eq!(
        e.to_string(),
        "environment variable PGMUX_POOL_SIZE: pool_size: must be at least 1"
    );

    let fl = Flags {
        pool_size: Some("0".into()),
        ..Flags::default()
    };
    let e = load(&fl, &env(&[db])).unwrap_err();
    assert_eq!(e.origin, Origin::Flag("--pool-size".into()));
    assert_eq!(
        e.to_string(),
        "flag --pool-size: pool_size: must be at least 1"
    );

    let fl = Flags {
        max_client_conn: Some("many".into()),
        ..Flags::default()
    };
    let e = load(&fl, &env(&[db])).unwrap_err();
    assert_eq!(e.key, "max_client_conn");
    assert_eq!(e.origin, Origin::Flag("--max-client-conn".into()));

    let (f, r) = load_file(&format!("pool_size = -1\n{DB}"));
    assert_eq!(r.unwrap_err().origin, file_origin(&f, 1));
}

#[test]
fn unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let e = load(
        &Flags {
            config: Some(missing.clone()),
            ..Flags::default()
        },
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert_eq!(e.key, "config");
    assert_eq!(e.origin, Origin::Flag("--config".into()));
    assert!(e.message.contains(&missing.display().to_string()), "{e}");
    assert!(e.to_string().starts_with("flag --config: config: "), "{e}");

    let e = load(
        &Flags::default(),
        &env(&[("PGMUX_CONFIG", missing.to_str().unwrap())]),
    )
    .unwrap_err();
    assert_eq!(e.key, "config");
    assert_eq!(e.origin, Origin::Env("PGMUX_CONFIG".into()));
    assert!(e.message.contains(&missing.display().to_string()));

    // A directory cannot be read as a file either.
    let e = load(
        &Flags {
            config: Some(dir.path().to_path_buf()),
            ..Flags::default()
        },
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert_eq!(e.key, "config");
}

#[test]
fn bad_duration() {
    let (f, r) = load_file(&format!("\nshutdown_timeout = \"5 parsecs\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "shutdown_timeout");
    assert_eq!(e.origin, file_origin(&f, 2));

    let (f, r) = load_file(&format!("server_idle_timeout = true\n{DB}"));
    assert_eq!(r.unwrap_err().origin, file_origin(&f, 1));

    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://h/app"),
            ("PGMUX_SERVER_CONNECT_TIMEOUT", "soon"),
        ]),
    )
    .unwrap_err();
    assert_eq!(e.key, "server_connect_timeout");
    assert_eq!(e.origin, Origin::Env("PGMUX_SERVER_CONNECT_TIMEOUT".into()));

    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://h/app"),
            ("PGMUX_SERVER_CONNECT_TIMEOUT", "7"),
            ("PGMUX_CLIENT_LOGIN_TIMEOUT", "1h"),
        ]),
    )
    .unwrap();
    assert_eq!(c.server_connect_timeout, Duration::from_secs(7));
    assert_eq!(c.client_login_timeout, Duration::from_secs(3600));
}

#[test]
fn other_scalar_errors() {
    let (f, r) = load_file(&format!("\n\n\nauth_type = \"plain\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("auth_type", &file_origin(&f, 4))
    );

    let (f, r) = load_file(&format!("listen = \"example.com:6432\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!((e.key.as_str(), &e.origin), ("listen", &file_origin(&f, 1)));

    let (f, r) = load_file(&format!("max_message_size = \"2GiB\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "max_message_size");
    assert_eq!(e.origin, file_origin(&f, 1));

    let (_f, r) = load_file(&format!("max_message_size = 100\n{DB}"));
    assert_eq!(r.unwrap_err().key, "max_message_size");

    let (f, r) = load_file(&format!("max_message_size = \"12 parsecs\"\n{DB}"));
    assert_eq!(r.unwrap_err().origin, file_origin(&f, 1));

    let db = ("DATABASE_URL", "postgres://h/app");
    let e = load(
        &Flags::default(),
        &env(&[db, ("PGMUX_AUTH_TYPE", "kerberos")]),
    )
    .unwrap_err();
    assert_eq!(e.origin, Origin::Env("PGMUX_AUTH_TYPE".into()));
    let fl = Flags {
        listen: Some("nonsense".into()),
        ..Flags::default()
    };
    let e = load(&fl, &env(&[db])).unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("listen", &Origin::Flag("--listen".into()))
    );
}

#[test]
fn scalar_parsing_variants() {
    let db = ("DATABASE_URL", "postgres://h/app");
    for (s, n) in [
        ("64MB", 64 << 20),
        ("16MiB", 16 << 20),
        ("1GiB", 1 << 30),
        ("512kB", 512 << 10),
        ("4096", 4096),
    ] {
        let c = load(
            &Flags::default(),
            &env(&[db, ("PGMUX_MAX_MESSAGE_SIZE", s)]),
        )
        .unwrap();
        assert_eq!(c.max_message_size, n, "{s}");
    }
    let c = load(
        &Flags::default(),
        &env(&[
            db,
            ("PGMUX_AUTH_TYPE", "trust"),
            ("PGMUX_LISTEN", "localhost:7432"),
            ("PGMUX_WORKERS", "3"),
        ]),
    )
    .unwrap();
    assert_eq!(c.auth_type, AuthType::Trust);
    assert_eq!(c.listen, "127.0.0.1:7432".parse().unwrap());
    assert_eq!(c.workers, 3);
    let c = load(
        &Flags::default(),
        &env(&[db, ("PGMUX_LISTEN", "[::1]:6000")]),
    )
    .unwrap();
    assert_eq!(c.listen, "[::1]:6000".parse().unwrap());
}

#[test]
fn redaction() {
    let f = tmp(
        "[databases.app]\nurl = \"postgres://app:s3cr3t-url@db-host:5432/app?sslmode=verify-full&sslrootcert=system\"\n\
         replicas = [\"postgres://app:s3cr3t-url@replica/app?password=s3cr3t-url\"]\n\
         [databases.other]\nurl = \"postgres://%2Ftmp%2Fpg:5433/other\"\n\
         [users.bob]\npassword = \"s3cr3t-file\"\npool_size = 4\n\
         [users.carol]\n",
    );
    let c = load(&flags_with(&f), &BTreeMap::new()).unwrap();
    assert_eq!(
        c.users["app"].password.as_ref().unwrap().expose(),
        "s3cr3t-url"
    );
    assert_eq!(
        c.users["bob"].password.as_ref().unwrap().expose(),
        "s3cr3t-file"
    );
    assert!(!c.databases["app"].replicas[0]
        .params
        .contains_key("password"));

    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cr3t"), "{debug}");
    assert!(debug.contains("<redacted>"));
    assert_eq!(Secret::new("x").to_string(), "<redacted>");
    assert_eq!(format!("{:?}", Secret::new("x")), "<redacted>");

    let out = c.to_redacted_toml();
    assert!(!out.contains("s3cr3t"), "{out}");
    assert!(out.contains("<redacted>"), "{out}");
    assert!(!out.contains('@'), "URLs must not carry credentials: {out}");

    // Round trip: the rendered TOML loads back to the same non-secret values.
    let f2 = tmp(&out);
    let c2 = load(&flags_with(&f2), &BTreeMap::new()).unwrap();
    let mut expected = c.clone();
    for u in expected.users.values_mut() {
        if u.password.is_some() {
            u.password = Some(Secret::new("<redacted>"));
        }
    }
    assert_eq!(c2, expected, "{out}");
}

#[test]
fn redacted_toml_round_trips_all_scalars() {
    let f = tmp(
        "listen = \"[::1]:7000\"\npool_size = 3\nmax_client_conn = 9\nauth_type = \"md5\"\n\
         query_wait_timeout = \"1500ms\"\nserver_connect_timeout = \"2h\"\nclient_login_timeout = 1\n\
         shutdown_timeout = \"0s\"\nserver_idle_timeout = \"90s\"\nmax_message_size = 1500\nworkers = 2\n\
         [databases.\"odd name\"]\nurl = \"postgres://[::1]:6000/we%20ird?application_name=a%26b\"\npool_size = 2\n",
    );
    let c = load(&flags_with(&f), &BTreeMap::new()).unwrap();
    assert_eq!(c.databases["odd name"].primary.dbname, "we ird");
    assert_eq!(c.databases["odd name"].primary.host, "::1");
    assert_eq!(
        c.databases["odd name"].primary.params["application_name"],
        "a&b"
    );
    let out = c.to_redacted_toml();
    let f2 = tmp(&out);
    assert_eq!(
        load(&flags_with(&f2), &BTreeMap::new()).unwrap(),
        c,
        "{out}"
    );
}

#[test]
fn read_database_url_list() {
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://app:pw@primary/app"),
            (
                "READ_DATABASE_URL",
                "postgres://app:pw@r1:5433/app, postgres://r2 ,",
            ),
        ]),
    )
    .unwrap();
    let db = &c.databases["app"];
    assert_eq!(db.primary.host, "primary");
    let hosts: Vec<_> = db
        .replicas
        .iter()
        .map(|r| (r.host.as_str(), r.port))
        .collect();
    assert_eq!(hosts, [("r1", 5433), ("r2", 5432)]);
    assert_eq!(db.replicas[1].dbname, "app");

    // Without DATABASE_URL: attach to the only database in the file, replacing its replicas.
    let f = tmp(&format!("{DB}replicas = [\"postgres://old/app\"]\n"));
    let fl = Flags {
        read_database_url: Some("postgres://new1/app,postgres://new2/app".into()),
        ..flags_with(&f)
    };
    let c = load(
        &fl,
        &env(&[("READ_DATABASE_URL", "postgres://ignored/app")]),
    )
    .unwrap();
    let hosts: Vec<_> = c.databases["app"]
        .replicas
        .iter()
        .map(|r| r.host.as_str())
        .collect();
    assert_eq!(hosts, ["new1", "new2"]);

    // Zero databases.
    let e = load(
        &Flags::default(),
        &env(&[("READ_DATABASE_URL", "postgres://r1/app")]),
    )
    .unwrap_err();
    assert_eq!(e.key, "READ_DATABASE_URL");
    assert_eq!(e.origin, Origin::Env("READ_DATABASE_URL".into()));
    assert!(e.message.contains("DATABASE_URL"));

    // Several databases.
    let f = tmp(&format!("{DB}[databases.b]\nurl = \"postgres://h/b\"\n"));
    let e = load(
        &flags_with(&f),
        &env(&[("READ_DATABASE_URL", "postgres://r1/app")]),
    )
    .unwrap_err();
    assert_eq!(e.key, "READ_DATABASE_URL");
    assert!(e.message.contains("DATABASE_URL"));

    // Bad entry, and an empty list.
    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://h/app"),
            (
                "READ_DATABASE_URL",
                "postgres://r1/app,mysql://u:hunter2@r2/app",
            ),
        ]),
    )
    .unwrap_err();
    assert_eq!(e.key, "READ_DATABASE_URL");
    assert!(e.message.contains("#2"), "{e}");
    assert!(!e.to_string().contains("hunter2"));
    let fl = Flags {
        read_database_url: Some(" , ".into()),
        database_url: Some("postgres://h/app".into()),
        ..Flags::default()
    };
    let e = load(&fl, &BTreeMap::new()).unwrap_err();
    assert_eq!(e.origin, Origin::Flag("--read-database-url".into()));
}

#[test]
fn database_url_replaces_file_database() {
    let f = tmp(&format!(
        "{DB}replicas = [\"postgres://old-replica/app\"]\npool_size = 8\n[databases.other]\nurl = \"postgres://o/other\"\n"
    ));
    let c = load(
        &flags_with(&f),
        &env(&[("DATABASE_URL", "postgres://new-host:6000/app")]),
    )
    .unwrap();
    let db = &c.databases["app"];
    assert_eq!(
        (db.primary.host.as_str(), db.primary.port),
        ("new-host", 6000)
    );
    assert!(db.replicas.is_empty());
    assert_eq!(db.pool_size, Some(8));
    assert!(c.databases.contains_key("other"));
}

#[test]
fn unix_socket_hosts() {
    let c = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", "postgres://u:p@%2Ftmp%2Fpg:5433/db")]),
    )
    .unwrap();
    let a = &c.databases["db"].primary;
    assert_eq!(
        (a.host.as_str(), a.port, a.dbname.as_str()),
        ("/tmp/pg", 5433, "db")
    );
    assert!(a.is_unix_socket());
    assert_eq!(c.users["u"].password.as_ref().unwrap().expose(), "p");

    let c = load(
        &Flags::default(),
        &env(&[(
            "DATABASE_URL",
            "postgresql:///app?host=/var/run/postgresql&sslmode=disable",
        )]),
    )
    .unwrap();
    let a = &c.databases["app"].primary;
    assert_eq!(a.host, "/var/run/postgresql");
    assert_eq!(
        a.params,
        BTreeMap::from([("sslmode".into(), "disable".into())])
    );
    assert_eq!(
        a.to_url(),
        "postgres://%2Fvar%2Frun%2Fpostgresql:5432/app?sslmode=disable"
    );
}

#[test]
fn percent_decoding_of_credentials() {
    let c = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", "postgres://us%40er:p%3Aw%2Fd@h/my%2Ddb")]),
    )
    .unwrap();
    assert!(c.databases.contains_key("my-db"));
    assert_eq!(
        c.users["us@er"].password.as_ref().unwrap().expose(),
        "p:w/d"
    );
}

#[test]
fn implicit_users_from_urls() {
    // Declared without password: URL fills it in; pool_size kept.
    let (_f, r) = load_file(
        "[databases.app]\nurl = \"postgres://app:pw@h/app\"\n[users.app]\npool_size = 3\n",
    );
    let c = r.unwrap();
    assert_eq!(c.users["app"].password.as_ref().unwrap().expose(), "pw");
    assert_eq!(c.users["app"].pool_size, Some(3));

    // Same password: fine.
    let (_f, r) = load_file(
        "[databases.app]\nurl = \"postgres://app:pw@h/app\"\n[users.app]\npassword = \"pw\"\n",
    );
    assert!(r.is_ok());

    // Different password: error naming the URL key, without either password.
    let (f, r) = load_file(
        "[databases.app]\nurl = \"postgres://app:pw1@h/app\"\n[users.app]\npassword = \"pw2\"\n",
    );
    let e = r.unwrap_err();
    assert_eq!(e.key, "databases.app.url");
    assert_eq!(e.origin, file_origin(&f, 2));
    assert!(e.message.contains("users.app.password"), "{e}");
    assert!(!e.to_string().contains("pw1") && !e.to_string().contains("pw2"));

    // DATABASE_URL conflicts with the file.
    let f = tmp("[users.app]\npassword = \"pw2\"\n");
    let e = load(
        &flags_with(&f),
        &env(&[("DATABASE_URL", "postgres://app:pw1@h/app")]),
    )
    .unwrap_err();
    assert_eq!(e.key, "DATABASE_URL");
    assert_eq!(e.origin, Origin::Env("DATABASE_URL".into()));

    // URL user without password: declared, cannot log in.
    let (_f, r) = load_file("[databases.app]\nurl = \"postgres://reader@h/app\"\n");
    let c = r.unwrap();
    assert_eq!(c.users["reader"].password, None);
}

#[test]
fn pool_size_for_precedence() {
    let (_f, r) = load_file(
        "pool_size = 20\n\
         [databases.big]\nurl = \"postgres://h/big\"\npool_size = 50\n\
         [databases.plain]\nurl = \"postgres://h/plain\"\n\
         [users.alice]\npool_size = 5\n\
         [users.bob]\n",
    );
    let c = r.unwrap();
    assert_eq!(c.pool_size_for("big", "alice"), 50); // db > user
    assert_eq!(c.pool_size_for("big", "bob"), 50);
    assert_eq!(c.pool_size_for("plain", "alice"), 5); // user > global
    assert_eq!(c.pool_size_for("plain", "bob"), 20); // global
    assert_eq!(c.pool_size_for("missing", "nobody"), 20);
    assert_eq!(c.databases["big"].pool_size, Some(50));
    assert_eq!(c.users["alice"].pool_size, Some(5));
}

#[test]
fn origin_display() {
    let o = Origin::File {
        path: "/etc/pgmux.toml".into(),
        line: Some(4),
    };
    assert_eq!(o.to_string(), "config file /etc/pgmux.toml line 4");
    let o = Origin::File {
        path: "/x.toml".into(),
        line: None,
    };
    assert_eq!(o.to_string(), "config file /x.toml");
    assert_eq!(
        Origin::Env("PGMUX_POOL_SIZE".into()).to_string(),
        "environment variable PGMUX_POOL_SIZE"
    );
    assert_eq!(
        Origin::Flag("--pool-size".into()).to_string(),
        "flag --pool-size"
    );
    assert_eq!(Origin::Default.to_string(), "built-in default");
}

#[test]
fn wrong_types_in_tables() {
    let (f, r) = load_file("databases = 3\n");
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("databases", &file_origin(&f, 1))
    );

    let (f, r) = load_file("[databases]\napp = \"postgres://h/app\"\n");
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("databases.app", &file_origin(&f, 2))
    );

    let (f, r) = load_file(&format!("{DB}replicas = \"postgres://r/app\"\n"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "databases.app.replicas");
    assert_eq!(e.origin, file_origin(&f, 3));

    let (f, r) = load_file(&format!("{DB}[users.app]\npassword = 1234\n"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "users.app.password");
    assert_eq!(e.origin, file_origin(&f, 4));
    assert!(!e.message.contains("1234"));
}

#[test]
fn read_routing_enums_parse_and_print() {
    for r in [
        ReadRouting::Auto,
        ReadRouting::PrimaryOnly,
        ReadRouting::ReplicaOnly,
    ] {
        assert_eq!(ReadRouting::parse(r.as_str()), Some(r));
        assert_eq!(r.to_string(), r.as_str());
    }
    assert_eq!(
        ReadRouting::parse(" Primary_Only "),
        Some(ReadRouting::PrimaryOnly)
    );
    assert_eq!(ReadRouting::parse("sometimes"), None);
    assert_eq!(ReadRouting::default(), ReadRouting::Auto);
    for r in [
        ReadYourWrites::User,
        ReadYourWrites::Client,
        ReadYourWrites::Off,
    ] {
        assert_eq!(ReadYourWrites::parse(r.as_str()), Some(r));
        assert_eq!(r.to_string(), r.as_str());
    }
    assert_eq!(ReadYourWrites::parse("session"), None);
    assert_eq!(ReadYourWrites::default(), ReadYourWrites::User);
}

#[test]
fn read_routing_keys_from_file() {
    let (_f, r) = load_file(
        "read_routing = \"primary_only\"\nread_your_writes = \"client\"\n\
         max_replica_lag = \"2s\"\nreplica_check_interval = \"250ms\"\n\
         write_functions = [\"my_audit_fn\", \" App.Bump_Counter \", \"f$1\"]\n\
         [databases.app]\nurl = \"postgres://h/app\"\nreplicas = [\"postgres://r/app\"]\n\
         read_routing = \"auto\"\n\
         [users.report]\nread_routing = \"replica_only\"\n",
    );
    let c = r.unwrap();
    assert_eq!(c.read_routing, ReadRouting::PrimaryOnly);
    assert_eq!(c.read_your_writes, ReadYourWrites::Client);
    assert_eq!(c.max_replica_lag, Duration::from_secs(2));
    assert_eq!(c.replica_check_interval, Duration::from_millis(250));
    assert_eq!(
        c.write_functions,
        ["my_audit_fn", "app.bump_counter", "f$1"]
    );
    assert_eq!(c.databases["app"].read_routing, Some(ReadRouting::Auto));
    assert_eq!(
        c.users["report"].read_routing,
        Some(ReadRouting::ReplicaOnly)
    );

    // Boundaries, an integer number of seconds, an empty list, a comma-separated string.
    for (line, lag, interval, fns) in [
        (
            "replica_check_interval = \"10ms\"\nmax_replica_lag = \"1ms\"\nwrite_functions = []",
            Duration::from_millis(1),
            Duration::from_millis(10),
            vec![],
        ),
        (
            "replica_check_interval = \"60s\"\nmax_replica_lag = 30\nwrite_functions = \"a, b.c\"",
            Duration::from_secs(30),
            Duration::from_secs(60),
            vec!["a", "b.c"],
        ),
        (
            "replica_check_interval = \"1m\"\nmax_replica_lag = \"1h\"\nwrite_functions = [\n  \"x\",\n  \"y\",\n]",
            Duration::from_secs(3600),
            Duration::from_secs(60),
            vec!["x", "y"],
        ),
    ] {
        let (_f, r) = load_file(&format!("{line}\n{DB}"));
        let c = r.unwrap();
        assert_eq!(c.max_replica_lag, lag, "{line}");
        assert_eq!(c.replica_check_interval, interval, "{line}");
        assert_eq!(c.write_functions, fns, "{line}");
    }
}

#[test]
fn read_routing_keys_from_env_beat_file() {
    let f = tmp(&format!(
        "read_routing = \"primary_only\"\nread_your_writes = \"client\"\n\
         max_replica_lag = \"2s\"\nreplica_check_interval = \"250ms\"\n\
         write_functions = [\"from_file\"]\n{DB}"
    ));
    let e = env(&[
        ("PGMUX_READ_ROUTING", "replica_only"),
        ("PGMUX_READ_YOUR_WRITES", "off"),
        ("PGMUX_MAX_REPLICA_LAG", "500ms"),
        ("PGMUX_REPLICA_CHECK_INTERVAL", "1s"),
        ("PGMUX_WRITE_FUNCTIONS", " My_Audit_Fn , app.bump_counter"),
    ]);
    let c = load(&flags_with(&f), &e).unwrap();
    assert_eq!(c.read_routing, ReadRouting::ReplicaOnly);
    assert_eq!(c.read_your_writes, ReadYourWrites::Off);
    assert_eq!(c.max_replica_lag, Duration::from_millis(500));
    assert_eq!(c.replica_check_interval, Duration::from_secs(1));
    assert_eq!(c.write_functions, ["my_audit_fn", "app.bump_counter"]);

    // Only the file.
    let c = load(&flags_with(&f), &BTreeMap::new()).unwrap();
    assert_eq!(c.read_routing, ReadRouting::PrimaryOnly);
    assert_eq!(c.read_your_writes, ReadYourWrites::Client);
    assert_eq!(c.max_replica_lag, Duration::from_secs(2));
    assert_eq!(c.replica_check_interval, Duration::from_millis(250));
    assert_eq!(c.write_functions, ["from_file"]);

    // Only the environment; an integer number of seconds; a single name; empty = unset.
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://h/app"),
            ("PGMUX_READ_ROUTING", "PRIMARY_ONLY"),
            ("PGMUX_MAX_REPLICA_LAG", "3"),
            ("PGMUX_WRITE_FUNCTIONS", "bump"),
            ("PGMUX_READ_YOUR_WRITES", ""),
        ]),
    )
    .unwrap();
    assert_eq!(c.read_routing, ReadRouting::PrimaryOnly);
    assert_eq!(c.max_replica_lag, Duration::from_secs(3));
    assert_eq!(c.write_functions, ["bump"]);
    assert_eq!(c.read_your_writes, ReadYourWrites::User);

    // An invalid file value overridden by the environment is not an error.
    let f = tmp(&format!(
        "max_replica_lag = \"0s\"\nreplica_check_interval = \"1ms\"\n{DB}"
    ));
    let c = load(
        &flags_with(&f),
        &env(&[
            ("PGMUX_MAX_REPLICA_LAG", "1s"),
            ("PGMUX_REPLICA_CHECK_INTERVAL", "50ms"),
        ]),
    )
    .unwrap();
    assert_eq!(c.max_replica_lag, Duration::from_secs(1));
    assert_eq!(c.replica_check_interval, Duration::from_millis(50));
}

#[test]
fn read_routing_for_precedence() {
    let (_f, r) = load_file(
        "read_routing = \"primary_only\"\n\
         [databases.reports]\nurl = \"postgres://h/reports\"\nread_routing = \"replica_only\"\n\
         [databases.plain]\nurl = \"postgres://h/plain\"\n\
         [users.analyst]\nread_routing = \"auto\"\n\
         [users.admin]\nread_routing = \"primary_only\"\n\
         [users.bob]\npool_size = 2\n",
    );
    let c = r.unwrap();
    // user > database
    assert_eq!(c.read_routing_for("reports", "analyst"), ReadRouting::Auto);
    assert_eq!(
        c.read_routing_for("reports", "admin"),
        ReadRouting::PrimaryOnly
    );
    // database > global
    assert_eq!(
        c.read_routing_for("reports", "bob"),
        ReadRouting::ReplicaOnly
    );
    assert_eq!(
        c.read_routing_for("reports", "nobody"),
        ReadRouting::ReplicaOnly
    );
    // user > global
    assert_eq!(c.read_routing_for("plain", "analyst"), ReadRouting::Auto);
    // global
    assert_eq!(c.read_routing_for("plain", "bob"), ReadRouting::PrimaryOnly);
    assert_eq!(
        c.read_routing_for("missing", "nobody"),
        ReadRouting::PrimaryOnly
    );
    assert_eq!(c.users["bob"].read_routing, None);
    assert_eq!(c.databases["plain"].read_routing, None);

    // The environment changes only the global setting.
    let f = tmp(
        "[databases.reports]\nurl = \"postgres://h/reports\"\nread_routing = \"replica_only\"\n\
         [databases.plain]\nurl = \"postgres://h/plain\"\n",
    );
    let c = load(
        &flags_with(&f),
        &env(&[("PGMUX_READ_ROUTING", "primary_only")]),
    )
    .unwrap();
    assert_eq!(c.read_routing_for("reports", "x"), ReadRouting::ReplicaOnly);
    assert_eq!(c.read_routing_for("plain", "x"), ReadRouting::PrimaryOnly);

    // DATABASE_URL replacing a file database keeps its read_routing override.
    let c = load(
        &flags_with(&f),
        &env(&[("DATABASE_URL", "postgres://new-host/reports")]),
    )
    .unwrap();
    assert_eq!(c.databases["reports"].primary.host, "new-host");
    assert_eq!(
        c.databases["reports"].read_routing,
        Some(ReadRouting::ReplicaOnly)
    );
}

#[test]
fn read_routing_key_errors() {
    // Top-level enums: file line, env var.
    let (f, r) = load_file(&format!("\nread_routing = \"sometimes\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("read_routing", &file_origin(&f, 2))
    );
    assert_eq!(
        e.message,
        "expected \"auto\", \"primary_only\" or \"replica_only\", got \"sometimes\""
    );
    let (f, r) = load_file(&format!("read_routing = true\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(e.origin, file_origin(&f, 1));
    assert!(e.message.ends_with("got a boolean"), "{e}");

    let (f, r) = load_file(&format!("read_your_writes = \"session\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("read_your_writes", &file_origin(&f, 1))
    );
    assert!(e.message.contains("\"user\", \"client\" or \"off\""), "{e}");

    let db = ("DATABASE_URL", "postgres://h/app");
    let e = load(
        &Flags::default(),
        &env(&[db, ("PGMUX_READ_ROUTING", "replicas")]),
    )
    .unwrap_err();
    assert_eq!(e.key, "read_routing");
    assert_eq!(e.origin, Origin::Env("PGMUX_READ_ROUTING".into()));
    let e = load(
        &Flags::default(),
        &env(&[db, ("PGMUX_READ_YOUR_WRITES", "always")]),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "environment variable PGMUX_READ_YOUR_WRITES: read_your_writes: \
         expected \"user\", \"client\" or \"off\", got \"always\""
    );

    // Per-database and per-user: the dotted key and the value's line.
    let (f, r) = load_file(&format!("{DB}read_routing = \"sometimes\"\n"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "databases.app.read_routing");
    assert_eq!(e.origin, file_origin(&f, 3));
    assert!(e.message.contains("got \"sometimes\""), "{e}");
    let (f, r) = load_file(&format!("{DB}[users.bob]\n\nread_routing = 1\n"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "users.bob.read_routing");
    assert_eq!(e.origin, file_origin(&f, 5));
    assert!(e.message.ends_with("got integer 1"), "{e}");

    // Unknown per-database / per-user keys still error, listing read_routing.
    let (f, r) = load_file(&format!("{DB}read_routng = \"auto\"\n"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "databases.app.read_routng");
    assert_eq!(e.origin, file_origin(&f, 3));
    assert!(e.message.starts_with("unknown key"), "{e}");
    let (f, r) = load_file(&format!("{DB}[users.bob]\nread_your_writes = \"off\"\n"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "users.bob.read_your_writes");
    assert_eq!(e.origin, file_origin(&f, 4));
    assert_eq!(
        e.message,
        "unknown key (expected one of: password, pool_size, read_routing)"
    );
    // ... and an unknown top-level key lists the new ones.
    let (_f, r) = load_file(&format!("read_routings = \"auto\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "read_routings");
    for k in [
        "read_routing",
        "read_your_writes",
        "max_replica_lag",
        "replica_check_interval",
        "write_functions",
    ] {
        assert!(e.message.contains(k), "{e}");
    }
}

#[test]
fn replica_duration_errors() {
    let (f, r) = load_file(&format!("\n\nmax_replica_lag = \"0s\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("max_replica_lag", &file_origin(&f, 3))
    );
    assert_eq!(e.message, "must be greater than zero");
    let (f, r) = load_file(&format!("max_replica_lag = 0\n{DB}"));
    assert_eq!(r.unwrap_err().origin, file_origin(&f, 1));
    let (f, r) = load_file(&format!("max_replica_lag = \"soon\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("max_replica_lag", &file_origin(&f, 1))
    );

    let (f, r) = load_file(&format!("replica_check_interval = \"1ms\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("replica_check_interval", &file_origin(&f, 1))
    );
    assert_eq!(e.message, "must be between 10ms and 60s, got 1ms");
    let (_f, r) = load_file(&format!("replica_check_interval = \"9ms\"\n{DB}"));
    assert_eq!(r.unwrap_err().key, "replica_check_interval");
    let (_f, r) = load_file(&format!("replica_check_interval = \"60001ms\"\n{DB}"));
    assert!(r.unwrap_err().message.contains("got 1m 1ms"));

    let db = ("DATABASE_URL", "postgres://h/app");
    let e = load(
        &Flags::default(),
        &env(&[db, ("PGMUX_MAX_REPLICA_LAG", "0")]),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "environment variable PGMUX_MAX_REPLICA_LAG: max_replica_lag: must be greater than zero"
    );
    let e = load(
        &Flags::default(),
        &env(&[db, ("PGMUX_REPLICA_CHECK_INTERVAL", "2m")]),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "environment variable PGMUX_REPLICA_CHECK_INTERVAL: replica_check_interval: \
         must be between 10ms and 60s, got 2m"
    );
}

#[test]
fn write_functions_errors() {
    let cases = [
        ("write_functions = [\"bad name\"]", "\"bad name\""),
        ("write_functions = [\"ok\", \"semi;colon\"]", "item #2"),
        ("write_functions = [\"\"]", "empty function name"),
        ("write_functions = [\"  \"]", "empty function name"),
        ("write_functions = [\"app.\"]", "empty name part"),
        ("write_functions = [\"a..b\"]", "empty name part"),
        ("write_functions = [\"f()\"]", "'('"),
        ("write_functions = [\"fünf\"]", "'ü'"),
        (
            "write_functions = [\"ok\", 3]",
            "item #2: expected a function name (a string), got integer 3",
        ),
        ("write_functions = [[\"nested\"]]", "got an array"),
        ("write_functions = 3", "expected an array of function names"),
        ("write_functions = true", "got a boolean"),
        ("write_functions = \"a,,b\"", "item #2: empty function name"),
    ];
    for (line, needle) in cases {
        let (f, r) = load_file(&format!("\n{line}\n{DB}"));
        let e = r.unwrap_err();
        assert_eq!(e.key, "write_functions", "{line}");
        assert_eq!(e.origin, file_origin(&f, 2), "{line}");
        assert!(e.message.contains(needle), "{line}: {e}");
    }
    let (_f, r) = load_file(&format!("write_functions = 3\n{DB}"));
    assert_eq!(
        r.unwrap_err().message,
        "expected an array of function names like [\"my_audit_fn\", \"app.bump_counter\"] \
         or a comma-separated string, got integer 3"
    );
    let (_f, r) = load_file(&format!("write_functions = [\"bad name\"]\n{DB}"));
    assert_eq!(
        r.unwrap_err().message,
        "item #1: invalid function name \"bad name\": character ' ' is not allowed \
         (only ASCII letters, digits, '_', '$', and '.' after a schema name)"
    );

    // Arrays are still a type error for the other keys.
    let (f, r) = load_file(&format!("pool_size = [1]\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("pool_size", &file_origin(&f, 1))
    );
    assert_eq!(e.message, "expected a non-negative integer, got an array");
    let (_f, r) = load_file(&format!("read_routing = [\"auto\"]\n{DB}"));
    assert!(r.unwrap_err().message.ends_with("got an array"));

    let db = ("DATABASE_URL", "postgres://h/app");
    for (value, needle) in [
        (
            "my_audit_fn,bad name",
            "item #2: invalid function name \"bad name\"",
        ),
        ("a,", "item #2: empty function name"),
        (" ", "item #1: empty function name"),
        ("x-y", "'-'"),
    ] {
        let e = load(
            &Flags::default(),
            &env(&[db, ("PGMUX_WRITE_FUNCTIONS", value)]),
        )
        .unwrap_err();
        assert_eq!(e.key, "write_functions", "{value}");
        assert_eq!(
            e.origin,
            Origin::Env("PGMUX_WRITE_FUNCTIONS".into()),
            "{value}"
        );
        assert!(e.message.contains(needle), "{value}: {e}");
    }
}

#[test]
fn render_read_routing_keys() {
    // Defaults are printed; per-database/per-user read_routing only when set.
    let c = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", "postgres://app@h/app")]),
    )
    .unwrap();
    let out = c.to_redacted_toml();
    for line in [
        "read_routing = \"auto\"",
        "read_your_writes = \"user\"",
        "max_replica_lag = \"10s\"",
        "replica_check_interval = \"100ms\"",
        "write_functions = []",
    ] {
        assert!(out.lines().any(|l| l == line), "{line}:\n{out}");
    }
    assert_eq!(out.matches("read_routing").count(), 1, "{out}");

    let f = tmp(
        "read_routing = \"primary_only\"\nread_your_writes = \"off\"\n\
         max_replica_lag = \"1500ms\"\nreplica_check_interval = \"2s\"\n\
         write_functions = [\"My_Audit_Fn\", \"app.bump_counter\"]\n\
         [databases.app]\nurl = \"postgres://h/app\"\nreplicas = [\"postgres://r/app\"]\n\
         read_routing = \"replica_only\"\n\
         [databases.other]\nurl = \"postgres://h/other\"\n\
         [users.report]\nread_routing = \"replica_only\"\n\
         [users.plain]\npool_size = 3\n",
    );
    let c = load(&flags_with(&f), &BTreeMap::new()).unwrap();
    let out = c.to_redacted_toml();
    for line in [
        "read_routing = \"primary_only\"",
        "read_your_writes = \"off\"",
        "max_replica_lag = \"1s 500ms\"",
        "replica_check_interval = \"2s\"",
        "write_functions = [\"my_audit_fn\", \"app.bump_counter\"]",
        "read_routing = \"replica_only\"",
    ] {
        assert!(out.lines().any(|l| l == line), "{line}:\n{out}");
    }
    // Global + databases.app + users.report; not databases.other or users.plain.
    assert_eq!(out.matches("read_routing").count(), 3, "{out}");

    // Round trip.
    let f2 = tmp(&out);
    assert_eq!(
        load(&flags_with(&f2), &BTreeMap::new()).unwrap(),
        c,
        "{out}"
    );
}

#[test]
fn admin_table_and_console_users() {
    let (_f, r) = load_file(&format!(
        "admin_users = [\"ops\"]\nstats_users = \"mon, grafana\"\nmin_pool_size = 2\n\
         [admin]\nlisten = \"0.0.0.0:9931\"\ntoken = \"0123456789abcdef0123\"\nprotect_reads = true\n{DB}"
    ));
    let c = r.unwrap();
    assert_eq!(c.admin_users, vec!["ops".to_string()]);
    assert_eq!(
        c.stats_users,
        vec!["mon".to_string(), "grafana".to_string()]
    );
    assert_eq!(c.min_pool_size, 2);
    assert_eq!(c.admin.listen, "0.0.0.0:9931".parse().unwrap());
    assert_eq!(
        c.admin.token.as_ref().map(|t| t.expose()),
        Some("0123456789abcdef0123")
    );
    assert!(c.admin.protect_reads);
    let toml = c.to_redacted_toml();
    assert!(!toml.contains("0123456789abcdef0123"), "{toml}");
    assert!(toml.contains("<redacted>"), "{toml}");

    // Environment and flag override the file.
    let f = tmp(&format!("[admin]\nlisten = \"127.0.0.1:1\"\n{DB}"));
    let mut flags = flags_with(&f);
    let c = load(&flags, &env(&[("PGMUX_ADMIN_LISTEN", "127.0.0.1:2")])).unwrap();
    assert_eq!(c.admin.listen.port(), 2);
    flags.admin_listen = Some("127.0.0.1:3".into());
    let c = load(&flags, &env(&[("PGMUX_ADMIN_LISTEN", "127.0.0.1:2")])).unwrap();
    assert_eq!(c.admin.listen.port(), 3);
}

#[test]
fn admin_key_errors_name_the_key() {
    let cases = [
        ("[admin]\nport = 1\n", "admin.port", "unknown key"),
        (
            "[admin]\ntoken = \"short\"\n",
            "admin.token",
            "at least 16 characters",
        ),
        (
            "[admin]\ntoken = 12\n",
            "admin.token",
            "expected a string, got an integer",
        ),
        (
            "[admin]\nprotect_reads = \"maybe\"\n",
            "admin.protect_reads",
            "expected true or false",
        ),
        (
            "[admin]\nlisten = \"nowhere\"\n",
            "admin.listen",
            "expected an IP address",
        ),
        (
            "min_pool_size = 30\n",
            "min_pool_size",
            "must not exceed pool_size (20)",
        ),
        ("stats_users = [\"a\", 1]\n", "stats_users", "item #2"),
    ];
    for (text, key, needle) in cases {
        let (_f, r) = load_file(&format!("{text}{DB}"));
        let e = r.unwrap_err();
        assert_eq!(e.key, key, "{text}");
        assert!(e.message.contains(needle), "{text}: {e}");
        assert!(!e.to_string().contains("short\""), "token echoed: {e}");
    }
}

#[test]
fn live_changes_are_validated_all_or_nothing() {
    let (_f, r) = load_file(DB);
    let c = r.unwrap();
    let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let n = c
        .with_changes(&pairs(&[
            ("pool_size", "40"),
            ("query_wait_timeout", "5"),
            ("min_pool_size", "3"),
        ]))
        .unwrap();
    assert_eq!(n.pool_size, 40);
    assert_eq!(n.query_wait_timeout, Duration::from_secs(5));
    assert_eq!(n.min_pool_size, 3);
    assert_eq!(n.databases, c.databases);

    let e = c.with_changes(&pairs(&[("pool_size", "0")])).unwrap_err();
    assert_eq!(
        (e.key.as_str(), e.origin.clone()),
        ("pool_size", Origin::Live)
    );
    let e = c.with_changes(&pairs(&[("pool_size", "x")])).unwrap_err();
    assert_eq!(e.key, "pool_size");
    let e = c
        .with_changes(&pairs(&[("listen", "0.0.0.0:1")]))
        .unwrap_err();
    assert!(
        e.message.contains("cannot be changed on a running pgmux"),
        "{e}"
    );
    let e = c.with_changes(&pairs(&[("bogus", "1")])).unwrap_err();
    assert_eq!(e.key, "bogus");
    assert!(e.message.contains("unknown setting"), "{e}");
    let e = n.with_changes(&pairs(&[("pool_size", "2")])).unwrap_err();
    assert_eq!(e.key, "pool_size");
    assert!(e.message.contains("at least min_pool_size (3)"), "{e}");
    assert_eq!(
        e.to_string(),
        "live change: pool_size: must be at least min_pool_size (3), got 2"
    );
}

#[test]
fn settings_list_values_defaults_and_what_is_live() {
    let (_f, r) = load_file(&format!(
        "pool_size = 7\n[admin]\ntoken = \"0123456789abcdef\"\n{DB}"
    ));
    let c = r.unwrap();
    let s = c.settings();
    let get = |k: &str| {
        s.iter()
            .find(|x| x.key == k)
            .unwrap_or_else(|| panic!("{k} missing"))
    };
    assert_eq!(get("pool_size").value, "7");
    assert_eq!(get("pool_size").default, "20");
    assert!(get("pool_size").changeable);
    assert!(!get("listen").changeable);
    assert_eq!(get("query_wait_timeout").value, "2m");
    assert_eq!(get("admin.token").value, "<redacted>");
    assert_eq!(
        get("databases.app.url").value,
        "postgres://db-host:5432/app"
    );
    assert!(s.iter().all(|x| !x.value.contains("0123456789abcdef")));
}

#[test]
fn client_timeouts_and_server_lifetime() {
    let c = Config::default();
    assert_eq!(c.client_idle_timeout, Duration::ZERO);
    assert_eq!(c.idle_transaction_timeout, Duration::ZERO);
    assert_eq!(c.server_lifetime, Duration::from_secs(3600));
    assert_eq!(c.server_login_retry, Duration::from_secs(1));
    let (_f, r) = load_file(&format!(
        "client_idle_timeout = \"5m\"\nidle_transaction_timeout = 30\nserver_lifetime = \"0\"\n{DB}"
    ));
    let c = r.unwrap();
    assert_eq!(c.client_idle_timeout, Duration::from_secs(300));
    assert_eq!(c.idle_transaction_timeout, Duration::from_secs(30));
    assert_eq!(c.server_lifetime, Duration::ZERO);
    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://u:p@h/app"),
            ("PGMUX_IDLE_TRANSACTION_TIMEOUT", "soon"),
        ]),
    )
    .unwrap_err();
    assert_eq!(e.key, "idle_transaction_timeout");
    assert_eq!(
        e.origin,
        Origin::Env("PGMUX_IDLE_TRANSACTION_TIMEOUT".into())
    );
    let live = c
        .with_changes(&[("server_lifetime".to_string(), "30m".to_string())])
        .unwrap();
    assert_eq!(live.server_lifetime, Duration::from_secs(1800));
    let get = |k: &str| c.settings().into_iter().find(|s| s.key == k).unwrap();
    assert_eq!(get("server_lifetime").default, "1h");
    assert!(get("client_idle_timeout").changeable);
}

#[test]
fn reaping_and_tcp_keys() {
    let c = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", "postgres://u:p@h/d")]),
    )
    .unwrap();
    assert_eq!(c.server_check_delay, Duration::from_secs(30));
    assert_eq!(c.query_timeout, Duration::ZERO);
    assert_eq!(c.tcp, tcp_defaults());

    let (_f, r) = load_file(&format!(
        "server_check_delay = \"0s\"\nquery_timeout = \"2s\"\ntcp_keepalive = false\n\
         tcp_keepidle = \"30s\"\ntcp_keepintvl = \"5s\"\ntcp_keepcnt = 3\ntcp_user_timeout = \"20s\"\n{DB}"
    ));
    let c = r.unwrap();
    assert_eq!(c.server_check_delay, Duration::ZERO);
    assert_eq!(c.query_timeout, Duration::from_secs(2));
    assert!(!c.tcp.keepalive);
    assert_eq!(c.tcp.keepidle, Duration::from_secs(30));
    assert_eq!(c.tcp.keepintvl, Duration::from_secs(5));
    assert_eq!(c.tcp.keepcnt, 3);
    assert_eq!(c.tcp.user_timeout, Duration::from_secs(20));
    let shown = c.to_redacted_toml();
    assert!(shown.contains("tcp_keepidle = \"30s\""), "{shown}");

    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://u:p@h/d"),
            ("PGMUX_TCP_KEEPIDLE", "0s"),
        ]),
    )
    .unwrap_err();
    assert_eq!(e.key, "tcp_keepidle");
    assert!(e.message.contains("at least 1s"), "{e}");
    let (_f, r) = load_file(&format!("tcp_keepcnt = 0\n{DB}"));
    assert_eq!(r.unwrap_err().key, "tcp_keepcnt");
    let (_f, r) = load_file(&format!("tcp_keepalive = \"maybe\"\n{DB}"));
    assert_eq!(r.unwrap_err().key, "tcp_keepalive");
}

fn tcp_defaults() -> crate::TcpSettings {
    crate::TcpSettings {
        keepalive: true,
        keepidle: Duration::from_secs(60),
        keepintvl: Duration::from_secs(10),
        keepcnt: 6,
        user_timeout: Duration::ZERO,
    }
}

#[test]
fn auth_file_is_read_and_its_errors_name_the_key_and_line() {
    let users = tmp("\"app\" \"hunter2\"\n\"old\" \"md50123456789abcdef0123456789abcdef\"\n");
    let path = users.path.to_str().unwrap().to_string();
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://u:p@h/d"),
            ("PGMUX_AUTH_FILE", &path),
        ]),
    )
    .unwrap();
    assert_eq!(c.auth_users.len(), 2);
    assert!(
        matches!(&c.auth_users["app"], crate::AuthSecret::Password(p) if p.expose() == "hunter2")
    );
    let shown = c.to_redacted_toml();
    assert!(
        shown.contains("auth_file") && !shown.contains("hunter2"),
        "{shown}"
    );

    let bad = tmp("\"app\" \"hunter2\"\napp hunter2\n");
    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://u:p@h/d"),
            ("PGMUX_AUTH_FILE", bad.path.to_str().unwrap()),
        ]),
    )
    .unwrap_err();
    assert_eq!(e.key, "auth_file");
    assert!(e.message.contains("line 2"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://u:p@h/d"),
            ("PGMUX_AUTH_FILE", "/nonexistent/x"),
        ]),
    )
    .unwrap_err();
    assert_eq!(e.key, "auth_file");
    assert!(e.message.contains("cannot read"), "{e}");
}

#[test]
fn server_auth_and_aws_region() {
    // Defaults.
    let (_f, r) = load_file("[databases.app]\nurl = \"postgres://h/app\"\n");
    let c = r.unwrap();
    assert_eq!(c.server_auth, ServerAuth::Password);
    assert_eq!(c.aws_region, None);

    // From the file.
    let (_f, r) = load_file(
        "server_auth = \"rds_iam\"\naws_region = \"eu-west-1\"\n\
         [databases.app]\nurl = \"postgres://h/app\"\n",
    );
    let c = r.unwrap();
    assert_eq!(c.server_auth, ServerAuth::RdsIam);
    assert_eq!(c.aws_region.as_deref(), Some("eu-west-1"));
    assert_eq!(ServerAuth::parse(" RDS_IAM "), Some(ServerAuth::RdsIam));
    assert_eq!(ServerAuth::RdsIam.as_str(), "rds_iam");

    // From the environment (over the file).
    let f = tmp("server_auth = \"password\"\n[databases.app]\nurl = \"postgres://h/app\"\n");
    let c = load(
        &flags_with(&f),
        &env(&[
            ("PGMUX_SERVER_AUTH", "rds_iam"),
            ("PGMUX_AWS_REGION", "us-east-1"),
        ]),
    )
    .unwrap();
    assert_eq!(c.server_auth, ServerAuth::RdsIam);
    assert_eq!(c.aws_region.as_deref(), Some("us-east-1"));

    // Errors name the key.
    for (text, key, needle) in [
        (
            "server_auth = \"iam\"",
            "server_auth",
            "expected \"password\" or \"rds_iam\"",
        ),
        (
            "server_auth = 1",
            "server_auth",
            "expected \"password\" or \"rds_iam\"",
        ),
        ("aws_region = \"US East 1\"", "aws_region", "region name"),
        ("aws_region = 5", "aws_region", "region name"),
    ] {
        let (_f, r) = load_file(&format!(
            "{text}\n[databases.app]\nurl = \"postgres://h/app\"\n"
        ));
        let e = r.unwrap_err();
        assert_eq!(e.key, key, "{text}");
        assert!(e.message.contains(needle), "{text}: {}", e.message);
        assert!(e.to_string().contains(key), "{e}");
    }
}

#[test]
fn auth_query_keys() {
    // Defaults: no auth_user (no lookup), PgBouncer's query, a 10s cache.
    let (_f, r) = load_file(DB);
    let c = r.unwrap();
    assert_eq!(c.auth_user, None);
    assert_eq!(c.auth_dbname, None);
    assert_eq!(c.auth_query, DEFAULT_AUTH_QUERY);
    assert!(c.auth_query.contains("$1"));
    assert_eq!(c.auth_query_cache, Duration::from_secs(10));

    // From the file, with the auth_user's password in [users].
    let (_f, r) = load_file(&format!(
        "auth_user = \"lookup\"\nauth_query = \"SELECT * FROM pgmux.lookup($1)\"\n\
         auth_dbname = \"app\"\nauth_query_cache = \"0\"\n\
         [users.lookup]\npassword = \"lookup-s3cret\"\n{DB}"
    ));
    let c = r.unwrap();
    assert_eq!(c.auth_user.as_deref(), Some("lookup"));
    assert_eq!(c.auth_query, "SELECT * FROM pgmux.lookup($1)");
    assert_eq!(c.auth_dbname.as_deref(), Some("app"));
    assert_eq!(c.auth_query_cache, Duration::ZERO);
    // Shown (never the password), and loading the output gives the same settings.
    let out = c.to_redacted_toml();
    assert!(
        out.contains("auth_user = \"lookup\"") && !out.contains("lookup-s3cret"),
        "{out}"
    );
    let s = c.settings();
    let get = |k: &str| {
        s.iter()
            .find(|x| x.key == k)
            .unwrap_or_else(|| panic!("{k}"))
    };
    assert_eq!(get("auth_query_cache").value, "0s");
    assert_eq!(get("auth_query_cache").default, "10s");
    assert_eq!(get("auth_query").default, DEFAULT_AUTH_QUERY);
    // Reload only: not changeable live.
    for k in ["auth_user", "auth_query", "auth_query_cache", "auth_dbname"] {
        assert!(!get(k).changeable, "{k}");
        let e = c
            .with_changes(&[(k.to_string(), "x".to_string())])
            .unwrap_err();
        assert!(e.message.contains("cannot be changed"), "{k}: {e}");
    }

    // From the environment; the DATABASE_URL user's password serves the auth_user.
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://owner:url-pw@h/app"),
            ("PGMUX_AUTH_USER", "owner"),
            ("PGMUX_AUTH_QUERY", "SELECT u, p FROM f($1)"),
            ("PGMUX_AUTH_QUERY_CACHE", "1m"),
            ("PGMUX_AUTH_DBNAME", "app"),
        ]),
    )
    .unwrap();
    assert_eq!(c.auth_user.as_deref(), Some("owner"));
    assert_eq!(c.auth_query, "SELECT u, p FROM f($1)");
    assert_eq!(c.auth_query_cache, Duration::from_secs(60));
    assert_eq!(c.auth_dbname.as_deref(), Some("app"));

    // A plain or md5 auth_file entry serves it too.
    let users = tmp("\"filer\" \"md50123456789abcdef0123456789abcdef\"\n");
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://h/app"),
            ("PGMUX_AUTH_FILE", users.path.to_str().unwrap()),
            ("PGMUX_AUTH_USER", "filer"),
        ]),
    )
    .unwrap();
    assert_eq!(c.auth_user.as_deref(), Some("filer"));

    // No password for auth_user: an error naming the key and its origin.
    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://h/app"),
            ("PGMUX_AUTH_USER", "nobody"),
        ]),
    )
    .unwrap_err();
    assert_eq!(e.key, "auth_user");
    assert_eq!(e.origin, Origin::Env("PGMUX_AUTH_USER".into()));
    assert!(e.message.contains("no password"), "{e}");
    // ... unless RDS IAM makes the password.
    load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://h/app"),
            ("PGMUX_AUTH_USER", "nobody"),
            ("PGMUX_SERVER_AUTH", "rds_iam"),
        ]),
    )
    .unwrap();

    // A query without $1, an unknown auth_dbname, wrong types.
    let (f, r) = load_file(&format!(
        "auth_query = \"SELECT usename, passwd FROM pg_shadow\"\n{DB}"
    ));
    let e = r.unwrap_err();
    assert_eq!(e.key, "auth_query");
    assert_eq!(e.origin, file_origin(&f, 1));
    assert!(e.message.contains("$1"), "{e}");
    let (_f, r) = load_file(&format!("auth_dbname = \"elsewhere\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(e.key, "auth_dbname");
    assert!(
        e.message.contains("elsewhere") && e.message.contains("app"),
        "{e}"
    );
    for (text, key) in [
        ("auth_query_cache = \"soon\"", "auth_query_cache"),
        ("auth_user = 3", "auth_user"),
        ("auth_query = true", "auth_query"),
    ] {
        let (_f, r) = load_file(&format!("{text}\n{DB}"));
        assert_eq!(r.unwrap_err().key, key, "{text}");
    }
}

#[test]
fn tls_settings() {
    use crate::{ClientTlsMode, SslMode};
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("c.pem");
    let key = dir.path().join("k.pem");
    std::fs::write(&cert, "x").unwrap();
    std::fs::write(&key, "x").unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let url = "postgres://u:p@db-host/app";
    // Defaults: prefer toward servers, no client TLS.
    let c = load(&Flags::default(), &env(&[("DATABASE_URL", url)])).unwrap();
    assert_eq!(c.client_tls.mode, ClientTlsMode::Disable);
    assert_eq!(c.databases["app"].primary.tls.mode, SslMode::Prefer);
    // A certificate turns TLS on for clients that ask.
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", url),
            ("PGMUX_CLIENT_TLS_CERT_FILE", cert),
            ("PGMUX_CLIENT_TLS_KEY_FILE", key),
        ]),
    )
    .unwrap();
    assert_eq!(c.client_tls.mode, ClientTlsMode::Allow);
    // require without a certificate names the key; a certificate without its key too.
    let e = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", url), ("PGMUX_CLIENT_TLS_MODE", "require")]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("client_tls_mode"), "{e}");
    let e = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", url), ("PGMUX_CLIENT_TLS_CERT_FILE", cert)]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("client_tls_key_file"), "{e}");
    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", url),
            ("PGMUX_CLIENT_TLS_MODE", "sometimes"),
        ]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("client_tls_mode"), "{e}");
    // The URL's sslmode wins over server_tls_mode; verify-full needs a CA.
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://u:p@db-host/app?sslmode=require"),
            ("PGMUX_SERVER_TLS_MODE", "disable"),
        ]),
    )
    .unwrap();
    assert_eq!(c.databases["app"].primary.tls.mode, SslMode::Require);
    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", url),
            ("PGMUX_SERVER_TLS_MODE", "verify-full"),
        ]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("server_tls_ca_file"), "{e}");
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", url),
            ("PGMUX_SERVER_TLS_MODE", "verify-full"),
            ("PGMUX_SERVER_TLS_CA_FILE", cert),
        ]),
    )
    .unwrap();
    assert_eq!(c.databases["app"].primary.tls.mode, SslMode::VerifyFull);
    assert_eq!(
        c.databases["app"].primary.tls.root_cert.as_deref(),
        Some(std::path::Path::new(cert))
    );
    // Unix sockets never use TLS.
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgresql:///app?host=/tmp&user=u"),
            ("PGMUX_SERVER_TLS_MODE", "require"),
        ]),
    )
    .unwrap();
    assert_eq!(c.databases["app"].primary.tls.mode, SslMode::Disable);
    let e = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", url),
            ("PGMUX_SERVER_TLS_CA_FILE", "/nonexistent/ca.pem"),
        ]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("server_tls_ca_file"), "{e}");
}

#[test]
fn connection_budget_keys() {
    let url = ("DATABASE_URL", "postgres://u:p@db-host/app");
    let c = load(
        &Flags::default(),
        &env(&[
            url,
            ("PGMUX_MAX_DB_CONNECTIONS", "40"),
            ("PGMUX_TOTAL_SERVER_CONNECTIONS", "180"),
            ("PGMUX_PEER_DNS_NAME", "pgmux-peers.prod.svc.cluster.local"),
            ("PGMUX_PEER_DNS_SERVER", "10.96.0.10:53"),
            ("PGMUX_PEER_CHECK_INTERVAL", "5s"),
        ]),
    )
    .unwrap();
    assert_eq!(c.max_db_connections, 40);
    assert_eq!(c.total_server_connections, TotalBudget::Fixed(180));
    assert_eq!(
        c.peer_dns_name.as_deref(),
        Some("pgmux-peers.prod.svc.cluster.local")
    );
    assert_eq!(c.peer_dns_server, Some("10.96.0.10:53".parse().unwrap()));
    assert_eq!(c.peer_check_interval, Duration::from_secs(5));
    // Both budgets are live keys.
    let c2 = c
        .with_changes(&[("max_db_connections".into(), "10".into())])
        .unwrap();
    assert_eq!(c2.max_db_connections, 10);
    let c3 = c
        .with_changes(&[("total_server_connections".into(), "auto".into())])
        .unwrap();
    assert_eq!(c3.total_server_connections, TotalBudget::Auto);
    for (var, value, key) in [
        (
            "PGMUX_TOTAL_SERVER_CONNECTIONS",
            "most",
            "total_server_connections",
        ),
        ("PGMUX_PEER_DNS_SERVER", "kube-dns", "peer_dns_server"),
        ("PGMUX_PEER_DNS_NAME", "bad name!", "peer_dns_name"),
        ("PGMUX_PEER_CHECK_INTERVAL", "10ms", "peer_check_interval"),
        ("PGMUX_MAX_DB_CONNECTIONS", "-1", "max_db_connections"),
    ] {
        let e = load(&Flags::default(), &env(&[url, (var, value)])).unwrap_err();
        assert!(e.to_string().contains(key), "{e}");
    }
}

#[test]
fn session_state_action_key() {
    // Default pin; file, environment and live change; a bad value names the key.
    let c = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", "postgres://app@h/app")]),
    )
    .unwrap();
    assert_eq!(c.session_state_action, SessionStateAction::Pin);
    let (_f, r) = load_file(&format!("session_state_action = \"Reject\"\n{DB}"));
    assert_eq!(r.unwrap().session_state_action, SessionStateAction::Reject);
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://h/app"),
            ("PGMUX_SESSION_STATE_ACTION", "warn"),
        ]),
    )
    .unwrap();
    assert_eq!(c.session_state_action, SessionStateAction::Warn);
    let (f, r) = load_file(&format!("session_state_action = \"leak\"\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("session_state_action", &file_origin(&f, 1))
    );
    assert!(e.message.contains("\"pin\", \"warn\" or \"reject\""), "{e}");
    for a in [
        SessionStateAction::Pin,
        SessionStateAction::Warn,
        SessionStateAction::Reject,
    ] {
        assert_eq!(SessionStateAction::parse(a.as_str()), Some(a));
    }
    let live = c
        .with_changes(&[("session_state_action".into(), "reject".into())])
        .unwrap();
    assert_eq!(live.session_state_action, SessionStateAction::Reject);
}

#[test]
fn track_extra_parameters_key() {
    let c = load(
        &Flags::default(),
        &env(&[("DATABASE_URL", "postgres://app@h/app")]),
    )
    .unwrap();
    assert_eq!(
        c.track_extra_parameters,
        ["client_min_messages", "extra_float_digits"]
    );
    let (_f, r) = load_file(&format!(
        "track_extra_parameters = [\"Search_Path\", \" work_mem \", \"app.tenant\"]\n{DB}"
    ));
    assert_eq!(
        r.unwrap().track_extra_parameters,
        ["search_path", "work_mem", "app.tenant"]
    );
    let (_f, r) = load_file(&format!("track_extra_parameters = []\n{DB}"));
    assert!(r.unwrap().track_extra_parameters.is_empty());
    let c = load(
        &Flags::default(),
        &env(&[
            ("DATABASE_URL", "postgres://h/app"),
            (
                "PGMUX_TRACK_EXTRA_PARAMETERS",
                "lock_timeout,statement_timeout",
            ),
        ]),
    )
    .unwrap();
    assert_eq!(
        c.track_extra_parameters,
        ["lock_timeout", "statement_timeout"]
    );
    let (f, r) = load_file(&format!("track_extra_parameters = [\"work mem\"]\n{DB}"));
    let e = r.unwrap_err();
    assert_eq!(
        (e.key.as_str(), &e.origin),
        ("track_extra_parameters", &file_origin(&f, 1))
    );
    assert!(e.message.contains("invalid parameter name"), "{e}");
}
