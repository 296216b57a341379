//! `pgmux demo`: the binary starts its own PostgreSQL primary and replica, prints a URL
//! that works (writes, reads on the replica, the console), serves the admin API it
//! prints, and on SIGINT exits 0 with the servers stopped and their directory gone.

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{connect, free_port, pg_bindir};

/// How long the demo may take to print its URL (initdb on a cold cache, a base backup).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `pgmux demo` as a child process; killed (and its cluster left to the OS temp
/// cleaner) only if a test fails before the SIGINT.
struct Demo {
    child: Child,
    stdout: String,
    stderr_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let dir = tempfile::Builder::new()
            .prefix("pgmux-demo-test-")
            .tempdir()
            .expect("temp dir");
        let stderr_file = dir.path().join("stderr.log");
        let stderr = fs::File::create(&stderr_file).expect("create stderr log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgmux"));
        for (key, _) in std::env::vars_os() {
            if let Some(k) = key.to_str() {
                if k.starts_with("PGMUX_") || k == "DATABASE_URL" || k == "READ_DATABASE_URL" {
                    cmd.env_remove(k);
                }
            }
        }
        cmd.arg("demo")
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = child.stdout.take().expect("stdout pipe");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut demo = Demo {
            child,
            stdout: String::new(),
            stderr_file,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    demo.stdout.push_str(&line);
                    demo.stdout.push('\n');
                    if line.starts_with("Ctrl-C to stop") {
                        // Keep draining stdout so the child never blocks on it.
                        std::thread::spawn(move || while rx.recv().is_ok() {});
                        return demo;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = demo.child.wait().expect("wait");
                    panic!(
                        "pgmux demo exited with {status} before printing its URL\n{}",
                        demo.output()
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() > deadline {
                panic!(
                    "pgmux demo printed no URL within {START_TIMEOUT:?}\n{}",
                    demo.output()
                );
            }
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }

    fn output(&self) -> String {
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout,
            self.stderr()
        )
    }

    /// The rest of the line that starts (after indentation) with `prefix`.
    fn line_after(&self, prefix: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in\n{}", self.stdout))
            .trim()
            .to_string()
    }

    fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("spawn kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM first: the demo then stops its PostgreSQL servers itself.
            self.signal(15);
            if self.wait_exit(Duration::from_secs(30)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

fn http_get(url: &str) -> (u16, String) {
    let mut resp = ureq::get(url)
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().expect("read body");
    (status, body)
}

/// PIDs of running processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test]
async fn demo_serves_primary_replica_admin_and_cleans_up_on_sigint() {
    // Fails with the installation hint when PostgreSQL is missing (never skips).
    pg_bindir();
    let port = free_port();
    let admin_port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let admin_listen = format!("127.0.0.1:{admin_port}");
    let mut demo = Demo::start(&["--listen", &listen, "--admin-listen", &admin_listen]);

    // What it prints.
    let url = demo.line_after("DATABASE_URL=");
    assert!(
        url.starts_with("postgres://demo:") && url.ends_with(&format!("@127.0.0.1:{port}/demo")),
        "{url}"
    );
    let password = url["postgres://demo:".len()..url.rfind('@').expect("@")].to_string();
    assert!(password.len() >= 16, "{password:?}");
    let pools_url = demo.line_after("Admin API:");
    assert_eq!(
        pools_url,
        format!("http://127.0.0.1:{admin_port}/api/v1/pools")
    );
    let metrics_url = demo.line_after("Metrics:");
    assert_eq!(
        metrics_url,
        format!("http://127.0.0.1:{admin_port}/metrics")
    );
    let console = demo.line_after("Console:");
    assert_eq!(
        console,
        format!("psql postgres://demo:{password}@127.0.0.1:{port}/pgbouncer -c 'SHOW POOLS'")
    );
    assert!(demo
        .stdout
        .contains(&format!("pgmux top --admin http://127.0.0.1:{admin_port}")));
    let data_line = demo.line_after("pgmux demo: PostgreSQL primary on port");
    let root = PathBuf::from(
        data_line
            .rsplit("data in ")
            .next()
            .expect("data dir")
            .trim(),
    );
    assert!(root.is_dir(), "{}", root.display());
    assert!(!processes_mentioning(&root.display().to_string()).is_empty());

    // The banner is printed before pgmux binds its port: wait for its start line.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !demo.stderr().contains("pgmux accepting connections") {
        assert!(
            Instant::now() < deadline,
            "pgmux did not start: {}",
            demo.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Writes go to the primary, the demo table is there.
    let client = connect(&url).await;
    let id: i64 = client
        .query_one(
            "INSERT INTO items (name, price) VALUES ('from the test', 2.50) RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    assert!(id > 1000, "{id}");
    let count: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .expect("count")
        .get(0);
    assert!(count >= 1001, "{count}");

    // Reads can be served by the replica once its health check has put it in rotation.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_one("/* pgmux:replica */ SELECT pg_is_in_recovery()", &[])
            .await
            .expect("replica read");
        if row.get::<_, bool>(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no read served by a replica within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(client);

    // The console admits the demo user (a stats user by default).
    let console_client = connect(&format!(
        "postgres://demo:{password}@127.0.0.1:{port}/pgbouncer"
    ))
    .await;
    let rows = console_client
        .simple_query("SHOW POOLS")
        .await
        .expect("SHOW POOLS");
    let pools = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert!(pools >= 1, "SHOW POOLS returned no rows");
    drop(console_client);

    // The admin URLs it printed.
    let (status, body) = tokio::task::spawn_blocking(move || http_get(&pools_url))
        .await
        .expect("join");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"database\":\"demo\""), "{body}");
    let (status, body) = tokio::task::spawn_blocking(move || http_get(&metrics_url))
        .await
        .expect("join");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("pgmux_"), "{body}");

    // Ctrl-C: pgmux drains, the servers stop, the directory goes, exit 0.
    demo.signal(2);
    let status = demo.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "pgmux demo still running 30 s after SIGINT\n{}",
            demo.output()
        )
    });
    assert!(status.success(), "exit status {status}\n{}", demo.output());
    assert!(
        !Path::new(&root).exists(),
        "{} still exists",
        root.display()
    );
    let left = processes_mentioning(&root.display().to_string());
    assert!(
        left.is_empty(),
        "processes still running on {}: {left:?}",
        root.display()
    );
    let stderr = demo.stderr();
    assert!(stderr.contains("PostgreSQL stopped"), "{stderr}");
    assert!(
        !stderr.contains(&password),
        "the log contains the demo password:\n{stderr}"
    );
}

#[test]
fn demo_refuses_a_busy_listen_address_before_starting_postgresql() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let admin = format!("127.0.0.1:{}", free_port());
    let out = support::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_pgmux"))
            .env_remove("PGMUX_LISTEN")
            .env_remove("PGMUX_CONFIG")
            .args(["demo", "--listen", &addr, "--admin-listen", &admin]),
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        support::describe_output(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(!stderr.contains("starting a PostgreSQL"), "{stderr}");
}
