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
                },
                replicas: vec![],
                pool_size: None,
            },
        )]),
        users: BTreeMap::from([(
            "app".to_string(),
            User {
                name: "app".into(),
                password: Some(Secret::new("secret")),
                pool_size: None,
            },
        )]),
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
            "config file {} line 3: databases.app.pol_size: unknown key (expected one of: url, replicas, pool_size)",
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
        "[databases.app]\nurl = \"postgres://app:s3cr3t-url@db-host:5432/app?sslmode=verify-full\"\n\
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
