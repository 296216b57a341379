//! The pool's accounting when a checkout is dropped half-way: the session's task drops its
//! checkout when KILL, the drain or a reload's removal of the database ends a waiting
//! client. Whatever was handed to that checkout must come back to the pool, or the pool
//! counts a server no one holds and its clients wait for ever.
//!
//! The servers log in to a stand-in (`benches/standin.rs`): these tests look at the pool's
//! bookkeeping, not at PostgreSQL's behaviour, which the workspace's integration tests
//! cover against real servers.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

#[path = "../benches/standin.rs"]
mod standin;

const WAIT: Duration = Duration::from_secs(10);

/// Polls `f` once: far enough for a checkout to queue or start connecting.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx))).await
}

#[tokio::test]
async fn a_dropped_wait_gives_back_the_server_handed_to_it() {
    let pool = standin::pool(standin::login_only_server().await, 1);
    let held = pool.checkout(WAIT).await.expect("a server");
    let mut waiting = Box::pin(pool.checkout(WAIT));
    assert!(
        poll_once(&mut waiting).await.is_pending(),
        "the pool is full"
    );
    assert_eq!(pool.counts().waiting, 1);
    // The server goes back and is handed to the waiting checkout ...
    drop(held);
    // ... which is dropped before it looks at what it got.
    drop(waiting);
    let c = pool.counts();
    assert_eq!((c.total, c.idle, c.waiting), (1, 1, 0), "{c:?}");
    let again = tokio::time::timeout(Duration::from_secs(5), pool.checkout(WAIT))
        .await
        .expect("the server came back to the pool");
    assert!(again.is_ok());
}

#[tokio::test]
async fn a_dropped_wait_gives_back_the_slot_handed_to_it() {
    let pool = standin::pool(standin::login_only_server().await, 1);
    let mut held = pool.checkout(WAIT).await.expect("a server");
    let mut waiting = Box::pin(pool.checkout(WAIT));
    assert!(
        poll_once(&mut waiting).await.is_pending(),
        "the pool is full"
    );
    // A slot (permission to open a server) is handed over when the held server closes:
    // one that comes back broken is closed.
    held.dirty = true;
    drop(held);
    drop(waiting);
    let c = pool.counts();
    assert_eq!((c.total, c.idle, c.waiting), (0, 0, 0), "{c:?}");
    let again = tokio::time::timeout(Duration::from_secs(5), pool.checkout(WAIT))
        .await
        .expect("the slot came back to the pool");
    assert!(again.is_ok());
}

#[tokio::test]
async fn a_dropped_connect_frees_its_slot() {
    // A server that accepts connections (the kernel's backlog does) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let pool = standin::pool(silent.local_addr().unwrap(), 1);
    let mut opening = Box::pin(pool.checkout(WAIT));
    assert!(poll_once(&mut opening).await.is_pending());
    // Let the connect get as far as waiting for the login's answer.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(poll_once(&mut opening).await.is_pending());
    assert_eq!(pool.counts().total, 1);
    drop(opening);
    let c = pool.counts();
    assert_eq!((c.total, c.connecting), (0, 0), "{c:?}");
}
