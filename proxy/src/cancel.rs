//! Cancel requests: pgmux hands every client its own BackendKeyData and remembers which
//! server, if any, is serving that client *right now*.
//!
//! A cancel is forwarded only while the client is linked to a server. The forwarder takes
//! the server's one cancel permit before the link can be dropped (both under the slot's
//! mutex), and the session waits for that permit before the server goes back to the pool,
//! so a late cancel can never reach a query of another client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use rand::Rng;

use crate::auth::constant_time_eq;
use crate::backend::{send_cancel, CancelTarget};

pub struct CancelSlot {
    secret: i32,
    target: Mutex<Option<CancelTarget>>,
}

impl CancelSlot {
    fn target(&self) -> std::sync::MutexGuard<'_, Option<CancelTarget>> {
        self.target.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client is now linked to this server.
    pub fn link(&self, t: &CancelTarget) {
        *self.target() = Some(t.clone());
    }

    /// The client is done with its server; after this returns no new cancel can start, and
    /// this waits for one already in flight.
    pub async fn unlink(&self) {
        let t = self.target().take();
        if let Some(t) = t {
            // A cancel takes the permit under the slot's mutex, while the target is still
            // there: with the target gone, a free permit means none is in flight or can start.
            if t.lock.available_permits() == 0 {
                let _ = t.lock.acquire().await;
            }
        }
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: DashMap<i32, Arc<CancelSlot>>,
}

/// Removes the client's slot when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.slots.remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Allocates a unique (pid, secret) for a new client.
    pub fn register(self: &Arc<Self>) -> Registration {
        let mut rng = rand::thread_rng();
        loop {
            let pid = rng.gen_range(1..i32::MAX);
            let secret = rng.gen::<i32>();
            let slot = Arc::new(CancelSlot {
                secret,
                target: Mutex::new(None),
            });
            if let dashmap::mapref::entry::Entry::Vacant(v) = self.slots.entry(pid) {
                v.insert(slot.clone());
                return Registration {
                    registry: self.clone(),
                    pid,
                    secret,
                    slot,
                };
            }
        }
    }

    /// Handles a CancelRequest from the wire. Returns whether a cancel was forwarded.
    pub async fn cancel(&self, pid: i32, secret: i32) -> bool {
        let slot = match self.slots.get(&pid) {
            Some(s) => s.clone(),
            None => return false,
        };
        if !constant_time_eq(&slot.secret.to_be_bytes(), &secret.to_be_bytes()) {
            return false;
        }
        let (target, guard) = {
            let t = slot.target();
            let Some(t) = t.as_ref() else { return false };
            match t.lock.clone().try_acquire_owned() {
                Ok(g) => (t.clone(), g),
                Err(_) => return false, // a cancel for this query is already on its way
            }
        };
        let r = send_cancel(&target, Duration::from_secs(5)).await;
        drop(guard);
        if let Err(e) = r {
            tracing::warn!(error = %e, "forwarding cancel request failed");
        }
        true
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgmux_config::ServerAddr;

    fn target() -> CancelTarget {
        CancelTarget {
            addr: Arc::new(ServerAddr {
                host: "127.0.0.1".into(),
                port: 1,
                dbname: "db".into(),
                params: Default::default(),
                tls: Default::default(),
            }),
            pid: 1,
            secret: 2,
            lock: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// `slot.unlink()` does not return while the cancel that `in_flight` stands for is
    /// under way, and does once it is dropped.
    async fn unlink_waits_for<T>(slot: &Arc<CancelSlot>, in_flight: T) {
        let s = slot.clone();
        let unlink = tokio::spawn(async move { s.unlink().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !unlink.is_finished(),
            "the server went back while a cancel was in flight"
        );
        drop(in_flight);
        tokio::time::timeout(Duration::from_secs(5), unlink)
            .await
            .expect("unlink ends once the cancel is through")
            .unwrap();
    }

    /// The whole path: a client's CancelRequest through [`CancelRegistry::cancel`] to a
    /// server that takes its time (PostgreSQL closes the connection once it has signalled
    /// the backend). The server stays with its client until the cancel is through.
    #[tokio::test]
    async fn a_forwarded_cancel_keeps_the_server_until_it_is_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut t = target();
        t.addr = Arc::new(ServerAddr {
            port: server.local_addr().unwrap().port(),
            ..(*t.addr).clone()
        });
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut pkt = [0u8; 16];
            s.read_exact(&mut pkt[..8]).await.unwrap();
            if pkt[4..8] == 80877103i32.to_be_bytes() {
                // SSLRequest first (sslmode prefer): no TLS here.
                s.write_all(b"N").await.unwrap();
                s.read_exact(&mut pkt[..8]).await.unwrap();
            }
            s.read_exact(&mut pkt[8..]).await.unwrap();
            let _ = got_tx.send(pkt);
            let _ = close_rx.await;
        });
        let registry = Arc::new(CancelRegistry::default());
        let reg = registry.register();
        reg.slot.link(&t);
        let (pid, secret) = (reg.pid, reg.secret);
        let r = registry.clone();
        let cancel = tokio::spawn(async move { r.cancel(pid, secret).await });
        let pkt = tokio::time::timeout(Duration::from_secs(5), got_rx)
            .await
            .expect("the cancel reaches the server")
            .unwrap();
        let mut want = 16i32.to_be_bytes().to_vec();
        want.extend_from_slice(&80877102i32.to_be_bytes());
        want.extend_from_slice(&t.pid.to_be_bytes());
        want.extend_from_slice(&t.secret.to_be_bytes());
        assert_eq!(
            pkt[..],
            want[..],
            "a CancelRequest with the server's own key"
        );
        let slot = reg.slot.clone();
        let unlink = tokio::spawn(async move { slot.unlink().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !unlink.is_finished(),
            "the server went back while its cancel was in flight"
        );
        drop(close_tx);
        tokio::time::timeout(Duration::from_secs(5), unlink)
            .await
            .expect("unlink ends once the cancel is through")
            .unwrap();
        assert!(cancel.await.unwrap(), "the cancel was forwarded");
        assert_eq!(t.lock.available_permits(), 1);
    }

    #[tokio::test]
    async fn unlink_waits_for_a_cancel_in_flight_and_no_cancel_starts_after_it() {
        let registry = Arc::new(CancelRegistry::default());
        let reg = registry.register();
        let t = target();
        reg.slot.link(&t);
        // What `cancel` holds while it sends the request to the server.
        let in_flight = t.lock.clone().try_acquire_owned().unwrap();
        unlink_waits_for(&reg.slot, in_flight).await;
        // Unlinked: the right key forwards nothing, and the permit is back for the
        // server's next client.
        assert!(!registry.cancel(reg.pid, reg.secret).await);
        assert_eq!(t.lock.available_permits(), 1);
        // Without a cancel in flight, unlink returns at once.
        reg.slot.link(&t);
        tokio::time::timeout(Duration::from_secs(1), reg.slot.unlink())
            .await
            .unwrap();
    }
}
