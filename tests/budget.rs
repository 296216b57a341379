//! The server connection budget (issue 9): `max_db_connections` across every pool of
//! one PostgreSQL node, and the share of `total_server_connections` among pgmux peers
//! counted through a DNS name (here a tiny DNS server on loopback that the test
//! controls). PostgreSQL's own `pg_stat_activity` tells how many backends pgmux opened.

mod support;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{Pgmux, TestDb};

/// Backends of `users` on the test cluster, as PostgreSQL counts them.
fn backends(db: &TestDb, users: &[&str]) -> i64 {
    let list = users
        .iter()
        .map(|u| support::quote_literal(u))
        .collect::<Vec<_>>()
        .join(",");
    db.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename IN ({list})"
    ))
    .trim()
    .parse()
    .unwrap()
}

/// `SHOW DATABASES`' max_connections column for the test database, through the console.
fn shown_limit(px: &Pgmux, db: &TestDb) -> i64 {
    let url = px.url(&db.user, &db.password, "pgbouncer");
    let out = support::run_with_timeout(
        std::process::Command::new("psql")
            .arg(&url)
            .args(["-AtF", "|", "-c", "SHOW DATABASES"]),
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{}|", db.db)))
        .unwrap_or_else(|| panic!("no row for {} in SHOW DATABASES: {text}", db.db));
    // name|host|port|database|force_user|pool_size|min_pool_size|reserve_pool|pool_mode|max_connections|…
    line.split('|').nth(9).unwrap().parse().unwrap()
}

/// Runs `n` clients of `url` at once, each `SELECT pg_sleep(secs)`, while sampling the
/// backends of `users`; returns the largest number seen. Every client must succeed.
async fn burst(db: &TestDb, url: &str, users: &[&str], n: usize, secs: f64) -> i64 {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let c = support::connect(&url).await;
            c.simple_query(&format!("SELECT pg_sleep({secs})"))
                .await
                .map(|_| ())
        }));
    }
    let mut max = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        max = max.max(tokio::task::block_in_place(|| backends(db, users)));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        t.await.unwrap().expect("every client is served, in turn");
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_caps_servers_across_pools() {
    let db = TestDb::new("budget");
    let other = format!("{}_b", db.user);
    let other_pw = "budget-Other-9";
    support::register_secret(other_pw);
    db.cluster.create_role(&other, other_pw);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgmux.toml");
    std::fs::write(
        &file,
        format!(
            "pool_size = 10\nmax_db_connections = 3\nquery_wait_timeout = \"30s\"\n\
             [admin]\ntoken = \"budget-admin-token-0123\"\n\
             [users.\"{other}\"]\npassword = \"{other_pw}\"\n"
        ),
    )
    .unwrap();
    let url = db.database_url();
    let px = Pgmux::start(
        &[],
        &[
            ("DATABASE_URL", url.as_str()),
            ("PGMUX_CONFIG", file.to_str().unwrap()),
        ],
    );
    let users = [db.user.as_str(), other.as_str()];
    assert_eq!(shown_limit(&px, &db), 3);

    // Six clients, three servers: they take turns, none fails, PostgreSQL never sees
    // more than three backends.
    let max = burst(&db, &db.url(&px), &users, 6, 0.4).await;
    assert!(max <= 3, "{max} backends with max_db_connections = 3");
    assert!(max >= 2, "the clients ran concurrently ({max} backends)");
    assert_eq!(backends(&db, &users), 3, "three idle servers stay");

    // Another pool (another user) on the same server: one of the first pool's idle
    // servers is closed to make room.
    let c = support::connect(&px.url(&other, other_pw, &db.db)).await;
    let rows = c.simple_query("SELECT current_user").await.unwrap();
    assert!(!rows.is_empty());
    assert!(backends(&db, &users) <= 3);
    assert_eq!(backends(&db, &[other.as_str()]), 1);
    drop(c);

    // Lowered live: idle servers over the limit close at once.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let r = agent
        .patch(&format!("{}/api/v1/config", px.admin_url()))
        .header("Authorization", "Bearer budget-admin-token-0123")
        .header("Content-Type", "application/json")
        .send(r#"{"max_db_connections": 1}"#)
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while backends(&db, &users) > 1 {
        assert!(
            Instant::now() < deadline,
            "idle servers over the new limit stay open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(shown_limit(&px, &db), 1);
    let max = burst(&db, &db.url(&px), &users, 3, 0.2).await;
    assert!(max <= 1, "{max} backends with max_db_connections = 1");
}

/// A DNS server on loopback answering every A query for any name with the addresses
/// `answers` holds now (`usize::MAX`: no answer at all, as a DNS outage).
fn dns_server(answers: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                return;
            };
            let n_answers = answers.load(Ordering::Relaxed);
            if n_answers == usize::MAX || n < 12 {
                continue;
            }
            let q = &buf[..n];
            let qtype = u16::from_be_bytes([q[n - 4], q[n - 3]]);
            let mut r = q.to_vec();
            r[2] = 0x81;
            r[3] = 0x80;
            let count = if qtype == 1 { n_answers } else { 0 };
            r[6..8].copy_from_slice(&(count as u16).to_be_bytes());
            for i in 0..count {
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
                r.extend_from_slice(&[10, 0, 0, i as u8 + 1]);
            }
            let _ = sock.send_to(&r, from);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_budget_is_shared_among_peers_found_in_dns() {
    let db = TestDb::new("peers");
    let answers = Arc::new(AtomicUsize::new(3));
    let dns = dns_server(answers.clone());
    let url = db.database_url();
    let dns = dns.to_string();
    let px = Pgmux::start(
        &[],
        &[
            ("DATABASE_URL", url.as_str()),
            ("PGMUX_POOL_SIZE", "10"),
            ("PGMUX_TOTAL_SERVER_CONNECTIONS", "6"),
            ("PGMUX_PEER_DNS_NAME", "pgmux-peers.test.svc.cluster.local"),
            ("PGMUX_PEER_DNS_SERVER", dns.as_str()),
            ("PGMUX_PEER_CHECK_INTERVAL", "200ms"),
        ],
    );
    let wait_limit = |want: i64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = shown_limit(&px, &db);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "limit {got}, expected {want}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let users = [db.user.as_str()];

    // Three peers: 6 / 3 = 2 servers for this one.
    wait_limit(2);
    let max = burst(&db, &db.url(&px), &users, 6, 0.3).await;
    assert!(max <= 2, "{max} backends with a share of 2");

    // A peer went away: 6 / 2 = 3.
    answers.store(2, Ordering::Relaxed);
    wait_limit(3);
    let max = burst(&db, &db.url(&px), &users, 6, 0.4).await;
    assert!(max <= 3, "{max} backends with a share of 3");
    assert!(max >= 3, "the larger share is used ({max} backends)");

    // DNS outage: the last count stays (each pod must not take the whole budget).
    answers.store(usize::MAX, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(shown_limit(&px, &db), 3);
    assert!(
        px.log().contains("peer lookup failed"),
        "the outage is logged:\n{}",
        px.log()
    );

    // Alone: the whole budget.
    answers.store(1, Ordering::Relaxed);
    wait_limit(6);
}

/// `total_server_connections = "auto"`: the budget is the node's own max_connections
/// (after superuser_reserved_connections) less `reserved_server_connections`, read on the
/// first server connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_budget_comes_from_the_servers_max_connections() {
    let db = TestDb::new("autobudget");
    let capacity: usize = db
        .psql(
            "SELECT current_setting('max_connections')::int \
             - current_setting('superuser_reserved_connections')::int",
        )
        .trim()
        .parse()
        .unwrap();
    let reserved = (capacity - 4).to_string();
    let url = db.database_url();
    let px = Pgmux::start(
        &[],
        &[
            ("DATABASE_URL", url.as_str()),
            ("PGMUX_POOL_SIZE", "10"),
            ("PGMUX_TOTAL_SERVER_CONNECTIONS", "auto"),
            ("PGMUX_RESERVED_SERVER_CONNECTIONS", reserved.as_str()),
        ],
    );
    let users = [db.user.as_str()];
    // The first client's server reads the capacity: 4 left for pgmux.
    let max = burst(&db, &db.url(&px), &users, 8, 0.3).await;
    assert_eq!(shown_limit(&px, &db), 4);
    assert!(max <= 4, "{max} backends with an automatic budget of 4");
}
