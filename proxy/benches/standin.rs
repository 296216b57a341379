//! A stand-in for PostgreSQL that only logs clients in, and a pool of servers on it:
//! shared by the hot-path benchmark and the pool accounting tests (`tests/pool.rs`), which
//! exercise the pool's bookkeeping, never a query.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pgmux_config::ServerAddr;
use pgmux_proxy::pool::{Pool, PoolSettings};

/// Appends one protocol message (tag, length, body) to `out`.
pub fn message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32((body.len() + 4) as i32);
    out.put_slice(body);
}

/// Logs clients in (AuthenticationOk, BackendKeyData, ReadyForQuery), then reads and drops
/// what they send: enough for the pool to open servers.
pub async fn login_only_server() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut pid = 1000;
        while let Ok((mut sock, _)) = listener.accept().await {
            pid += 1;
            tokio::spawn(async move {
                // An SSLRequest first (the default sslmode is prefer): refused with 'N'.
                loop {
                    let len = sock.read_i32().await.unwrap_or(0);
                    let mut packet = vec![0; (len.clamp(8, 10_000) - 4) as usize];
                    if sock.read_exact(&mut packet).await.is_err() {
                        return;
                    }
                    if packet[..4] != pgmux_proxy::protocol::SSL_REQUEST.to_be_bytes() {
                        break;
                    }
                    if sock.write_all(b"N").await.is_err() {
                        return;
                    }
                }
                let mut out = BytesMut::new();
                message(&mut out, b'R', &0i32.to_be_bytes());
                let mut key = BytesMut::new();
                key.put_i32(pid);
                key.put_i32(7);
                message(&mut out, b'K', &key);
                message(&mut out, b'Z', b"I");
                if sock.write_all(&out).await.is_err() {
                    return;
                }
                let mut sink = [0u8; 1024];
                while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// A pool of at most `servers` connections to `at`, with no liveness ping (an idle server
/// is handed out as it is) and no lifetime.
pub fn pool(at: std::net::SocketAddr, servers: usize) -> Arc<Pool> {
    Pool::new(
        "bench".into(),
        "bench".into(),
        pgmux_admin::Role::Primary,
        ServerAddr {
            host: at.ip().to_string(),
            port: at.port(),
            dbname: "bench".into(),
            params: Default::default(),
            tls: Default::default(),
        },
        None,
        PoolSettings {
            max_size: servers,
            min_size: 0,
            lifetime: Duration::ZERO,
            login_retry: Duration::ZERO,
            connect_timeout: Duration::from_secs(5),
            check_delay: Duration::from_secs(3600),
            histograms: pgmux_admin::metrics::PoolHistograms::noop(),
            paused: false,
            tcp: Default::default(),
            rds_iam: None,
            budgets: Default::default(),
        },
    )
}
