//! The floor of any proxy on a machine: a relay that does nothing but copy bytes.
//!
//! Each client connection gets its own connection to the upstream and the bytes are
//! copied both ways (`tokio::io::copy_bidirectional`), on one current-thread runtime
//! as pgmux runs on a 2-CPU machine. No parsing, no pooling, no TLS, no auth: the
//! upstream does the authentication. What this relay costs over a direct connection is
//! what one extra process hop over loopback costs on the machine, a bound that no pooler
//! in the same place can beat (`benches/load.sh --floor` puts it in the table).
//!
//! `cargo run --release -p pgmux-proxy --example relay_floor -- LISTEN UPSTREAM`,
//! e.g. `127.0.0.1:18432 127.0.0.1:5432`.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: relay_floor LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let parse = |s: &str| -> SocketAddr {
        s.parse().unwrap_or_else(|e| {
            eprintln!("relay_floor: {s:?} is not an address (host:port): {e}");
            std::process::exit(2);
        })
    };
    let (listen, upstream) = (parse(&listen), parse(&upstream));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("relay_floor: accept: {e}");
                    continue;
                }
            };
            tokio::spawn(async move {
                let mut server = match TcpStream::connect(upstream).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("relay_floor: connect {upstream}: {e}");
                        return;
                    }
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    })
}
