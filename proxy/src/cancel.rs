//! Cancel requests: pgmux hands every client its own BackendKeyData and remembers which
//! server, if any, is serving that client *right now*.
//!
//! A cancel is forwarded only while the client is linked to a server. The forwarder takes
//! the server's cancel lock before the link can be dropped (both under the slot's mutex),
//! and the session waits for that lock before the server goes back to the pool, so a
//! late cancel can never reach a query of another client.

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
            if t.lock.try_lock().is_err() {
                let _ = t.lock.lock().await;
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
            match t.lock.clone().try_lock_owned() {
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
