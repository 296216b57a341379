//! Socket reads and writes for the forwarding loop, one syscall each.
//!
//! tokio learns that a socket has nothing more to read only from a `recv()` that returns
//! `EAGAIN`, so a plain read loop spends one such empty `recv()` per message exchange on
//! each side. A transaction on this proxy is four data syscalls (read client, write
//! server, read server, write client); the empty reads made it six.
//!
//! [`poll_read_drain`] avoids them: a stream socket's `recv()` returns fewer bytes than
//! asked only when its receive queue is empty, so after such a short read the socket is
//! marked not-readable (through `try_io`, whose `WouldBlock` clears tokio's readiness with
//! the same tick check a real `EAGAIN` gets: data that arrives after the read raises a new
//! epoll edge and wakes the task again). The next poll then waits for epoll instead of
//! trying the socket.

use std::io;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// Room guaranteed in a read buffer before each read.
pub const READ_CHUNK: usize = 8192;

/// The readiness-based primitives of tokio's TCP and unix streams.
pub trait Sock {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

macro_rules! impl_sock {
    ($t:ty) => {
        impl Sock for $t {
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
            fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
                <$t>::try_read_buf(self, buf)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
        }
    };
}
impl_sock!(TcpStream);
impl_sock!(UnixStream);

/// One read attempt through `read`, which fills at most `room` bytes. A short read
/// (0 < n < room) also clears the socket's read readiness. `Ok(None)`: not readable.
fn read_once<S: Sock>(
    s: &S,
    room: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> io::Result<Option<usize>> {
    let mut got = 0;
    let r = s.try_io(Interest::READABLE, || {
        let n = read()?;
        got = n;
        if n > 0 && n < room {
            // Drained: report WouldBlock so tokio forgets the readiness; `got` carries n.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((got > 0).then_some(got)),
        Err(e) => Err(e),
    }
}

/// Reads what the socket has into `buf` (growing it by [`READ_CHUNK`] when nearly full).
/// `Ok(0)` is end of stream.
pub fn poll_read_drain<S: Sock>(
    s: &S,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(s.poll_read_ready(cx))?;
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        let room = buf.capacity() - buf.len();
        let read = {
            let b = &mut *buf;
            read_once(s, room, || s.try_read_buf(b))
        };
        if let Some(n) = read? {
            return Poll::Ready(Ok(n));
        }
    }
}

thread_local! {
    /// The scratch array of [`read_drain_small`], one per runtime thread: zeroed once
    /// rather than on every read (8 KiB of `memset` per client message).
    static SCRATCH: std::cell::RefCell<[u8; READ_CHUNK]> =
        const { std::cell::RefCell::new([0; READ_CHUNK]) };
}

/// Like [`poll_read_drain`] but through a scratch buffer, appending exactly what arrived:
/// an idle client holds no read buffer while it waits.
pub async fn read_drain_small<S: Sock>(s: &S, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| loop {
        ready!(s.poll_read_ready(cx))?;
        let read = SCRATCH.with_borrow_mut(|scratch| {
            let read = read_once(s, scratch.len(), || s.try_read(&mut scratch[..]))?;
            if let Some(n) = read {
                buf.extend_from_slice(&scratch[..n]);
            }
            io::Result::Ok(read)
        })?;
        if let Some(n) = read {
            return Poll::Ready(Ok(n));
        }
    })
    .await
}

/// Writes from the front of `buf` and consumes what was written.
pub fn poll_write_buf<S: Sock>(
    s: &S,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(s.poll_write_ready(cx))?;
        match s.try_write(buf) {
            Ok(n) => {
                buf.advance(n);
                return Poll::Ready(Ok(n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// A client's byte stream: TCP, or TLS over TCP after an SSLRequest.
pub enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<crate::tls::ClientTlsStream>),
    /// Momentarily, while the TCP stream is handed to the TLS handshake.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream detached")
}

impl ClientStream {
    /// See [`poll_read_drain`].
    pub fn poll_read_drain(
        &self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match self {
            ClientStream::Tcp(s) => poll_read_drain(s, buf, cx),
            ClientStream::Tls(s) => s.poll_read_buf(buf, cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    /// See [`read_drain_small`].
    pub async fn read_drain_small(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            ClientStream::Tcp(s) => read_drain_small(s, buf).await,
            ClientStream::Tls(s) => std::future::poll_fn(|cx| s.poll_read_small(buf, cx)).await,
            ClientStream::Detached => Err(detached()),
        }
    }

    /// See [`poll_write_buf`].
    pub fn poll_write_buf(
        &self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match self {
            ClientStream::Tcp(s) => poll_write_buf(s, buf, cx),
            ClientStream::Tls(s) => s.poll_write_buf(buf, cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    /// Whether the write side must be polled although nothing is queued.
    pub fn wants_flush(&self) -> bool {
        match self {
            ClientStream::Tls(s) => s.wants_flush(),
            _ => false,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

impl tokio::io::AsyncWrite for ClientStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => std::pin::Pin::new(&mut **s).poll_write(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => std::pin::Pin::new(&mut **s).poll_flush(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => std::pin::Pin::new(&mut **s).poll_shutdown(cx),
            ClientStream::Detached => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A short read leaves the socket not-readable, yet bytes that arrive later still
    /// wake the reader, and a read that fills the buffer keeps readiness for the rest.
    #[tokio::test]
    async fn short_reads_clear_readiness_without_losing_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut writer = TcpStream::connect(addr).await.unwrap();
        let (reader, _) = listener.accept().await.unwrap();

        writer.write_all(b"hello").await.unwrap();
        let mut buf = BytesMut::new();
        let n = std::future::poll_fn(|cx| poll_read_drain(&reader, &mut buf, cx))
            .await
            .unwrap();
        assert_eq!(&buf[..n], b"hello");
        // Readiness is gone: a poll does not try the socket and is pending.
        let pending = std::future::poll_fn(|cx| {
            Poll::Ready(poll_read_drain(&reader, &mut buf, cx).is_pending())
        })
        .await;
        assert!(pending);

        // More bytes than one read takes: the first read is full, the rest follows.
        let big = vec![7u8; 3 * READ_CHUNK];
        writer.write_all(&big).await.unwrap();
        buf.clear();
        while buf.len() < big.len() {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                std::future::poll_fn(|cx| poll_read_drain(&reader, &mut buf, cx)),
            )
            .await
            .expect("later bytes wake the reader")
            .unwrap();
        }
        assert_eq!(&buf[..], &big[..]);

        let mut small = BytesMut::new();
        writer.write_all(b"x").await.unwrap();
        assert_eq!(read_drain_small(&reader, &mut small).await.unwrap(), 1);
        drop(writer);
        assert_eq!(read_drain_small(&reader, &mut small).await.unwrap(), 0);
        assert_eq!(&small[..], b"x");
    }
}
