//! TCP keepalive and user timeout on the sockets pgmux holds: every accepted client and
//! every server connection it opens (unix sockets get nothing).
//!
//! Both sides matter: a client that vanished without a FIN (a killed pod, a NAT or load
//! balancer that dropped the flow) otherwise holds its `max_client_conn` slot, and inside a
//! transaction its server, until the OS gives up hours later; a server behind a dead path
//! otherwise hangs the client linked to it. Keepalive probes find both within
//! `keepidle + keepintvl * keepcnt`; `user_timeout` (Linux `TCP_USER_TIMEOUT`) also bounds
//! how long sent data may stay unacknowledged.
//!
//! Setting an option can fail (an exotic kernel, a value the OS refuses): that is logged
//! at warn and the connection is served anyway, because a missing keepalive is no reason
//! to refuse a client.

use std::io;

use pgmux_config::TcpSettings;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Applies `s` to `stream`. Stops at the first option the OS refuses and returns its error.
pub fn apply(stream: &TcpStream, s: &TcpSettings) -> io::Result<()> {
    let sock = SockRef::from(stream);
    if s.keepalive {
        let params = TcpKeepalive::new()
            .with_time(s.keepidle)
            .with_interval(s.keepintvl)
            .with_retries(u32::try_from(s.keepcnt).unwrap_or(u32::MAX));
        sock.set_tcp_keepalive(&params)?;
    } else {
        sock.set_keepalive(false)?;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout((!s.user_timeout.is_zero()).then_some(s.user_timeout))?;
    Ok(())
}

/// [`apply`], logging a failure at warn instead of returning it. `side` names the peer
/// ("client" or "server") in the log.
pub fn apply_or_warn(stream: &TcpStream, s: &TcpSettings, side: &'static str) {
    if let Err(e) = apply(stream, s) {
        let peer = stream.peer_addr().ok();
        tracing::warn!(error = %e, ?peer, side, "cannot set TCP keepalive/user timeout; continuing without");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connected loopback pair: (client side, accepted side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (c, a) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (c.unwrap(), a.unwrap().0)
    }

    #[tokio::test]
    async fn applies_keepalive_and_user_timeout() {
        let (client, accepted) = pair().await;
        let s = TcpSettings {
            keepalive: true,
            keepidle: Duration::from_secs(7),
            keepintvl: Duration::from_secs(3),
            keepcnt: 4,
            user_timeout: Duration::from_millis(12_500),
        };
        for stream in [&client, &accepted] {
            apply(stream, &s).unwrap();
            let sock = SockRef::from(stream);
            assert!(sock.keepalive().unwrap());
            assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
            assert_eq!(
                sock.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(3)
            );
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
            #[cfg(any(target_os = "linux", target_os = "android"))]
            assert_eq!(
                sock.tcp_user_timeout().unwrap(),
                Some(Duration::from_millis(12_500))
            );
        }
    }

    #[tokio::test]
    async fn keepalive_off_and_os_default_user_timeout() {
        let (client, _accepted) = pair().await;
        // On first, so that turning it off is observable.
        apply(&client, &TcpSettings::default()).unwrap();
        assert!(SockRef::from(&client).keepalive().unwrap());
        let off = TcpSettings {
            keepalive: false,
            ..TcpSettings::default()
        };
        apply(&client, &off).unwrap();
        let sock = SockRef::from(&client);
        assert!(!sock.keepalive().unwrap());
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(sock.tcp_user_timeout().unwrap(), None, "0 = OS default");
    }

    #[tokio::test]
    async fn defaults_are_applied() {
        let (client, _accepted) = pair().await;
        apply(&client, &TcpSettings::default()).unwrap();
        let sock = SockRef::from(&client);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 6);
    }
}
