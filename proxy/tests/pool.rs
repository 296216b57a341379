//! The pool's accounting when a checkout is dropped half-way: the session's task drops its
//! checkout when KILL, the drain or a reload's removal of the database ends a waiting
//! client. Whatever was handed to that checkout must come back to the pool, or the pool
//! counts a server no one holds and its clients wait for ever. Also: the waits' shared
//! sweeper ends every wait on time.
//!
//! The servers log in to a stand-in (`benches/standin.rs`): these tests look at the pool's
//! bookkeeping, not at PostgreSQL's behaviour, which the workspace's integration tests
//! cover against real servers.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use pgmux_proxy::pool::Pool;

#[path = "../benches/standin.rs"]
mod standin;

const WAIT: Duration = Duration::from_secs(10);

/// Polls `f` once: far enough for a checkout to queue or start connecting.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx))).await
}

/// Takes the only server of a pool of one, queues a second checkout, gives the server back
/// (`broken`: it comes back broken and is closed, so a slot, permission to open a server,
/// is handed over instead) and drops the queued checkout before it looks at what it got.
async fn drop_a_wait_that_was_handed_something(broken: bool) -> Arc<Pool> {
    let pool = standin::pool(standin::login_only_server().await, 1);
    let mut held = pool.checkout(WAIT).await.expect("a server");
    let mut waiting = Box::pin(pool.checkout(WAIT));
    assert!(
        poll_once(&mut waiting).await.is_pending(),
        "the pool is full"
    );
    assert_eq!(pool.counts().waiting, 1);
    held.dirty = broken;
    // The server (or its slot) goes to the waiting checkout ...
    drop(held);
    // ... which is dropped before it looks at what it got.
    drop(waiting);
    pool
}

/// A new checkout gets a server within a few seconds (`what` came back to the pool).
async fn checkout_again(pool: &Arc<Pool>, what: &str) {
    let again = tokio::time::timeout(Duration::from_secs(5), pool.checkout(WAIT))
        .await
        .unwrap_or_else(|_| panic!("{what} did not come back to the pool"));
    assert!(again.is_ok());
}

#[tokio::test]
async fn a_dropped_wait_gives_back_the_server_handed_to_it() {
    let pool = drop_a_wait_that_was_handed_something(false).await;
    let c = pool.counts();
    assert_eq!((c.total, c.idle, c.waiting), (1, 1, 0), "{c:?}");
    checkout_again(&pool, "the server").await;
}

#[tokio::test]
async fn a_dropped_wait_gives_back_the_slot_handed_to_it() {
    let pool = drop_a_wait_that_was_handed_something(true).await;
    let c = pool.counts();
    assert_eq!((c.total, c.idle, c.waiting), (0, 0, 0), "{c:?}");
    checkout_again(&pool, "the slot").await;
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

/// The waits share one sweeper, which sleeps until the earliest deadline it has seen. A
/// wait that starts while it sleeps towards a far deadline (a live change to a shorter
/// query_wait_timeout) still ends on time, give or take the sweeper's longest sleep
/// (100 ms), not when the far deadline comes.
#[tokio::test]
async fn a_short_wait_behind_a_long_one_ends_on_time() {
    let pool = standin::pool(standin::login_only_server().await, 1);
    let _held = pool.checkout(WAIT).await.expect("a server");
    let mut long = Box::pin(pool.checkout(WAIT));
    assert!(poll_once(&mut long).await.is_pending(), "the pool is full");
    // The sweeper starts and goes to sleep.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = std::time::Instant::now();
    let short = tokio::time::timeout(
        Duration::from_secs(5),
        pool.checkout(Duration::from_millis(300)),
    )
    .await
    .expect("the short wait ended long before the long one");
    let waited = start.elapsed();
    assert!(short.is_err(), "no server was free");
    assert!(
        (Duration::from_millis(300)..Duration::from_millis(1500)).contains(&waited),
        "a 300 ms wait took {waited:?}"
    );
    assert_eq!(pool.counts().waiting, 1, "the long wait goes on");
}
