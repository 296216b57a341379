//! Framing: the single entry point for bytes read from a socket.
//!
//! A regular message is `tag:u8, len:i32 (including itself), body`. A startup-phase packet
//! has no tag. Both readers check the declared length against a limit *before* the body is
//! waited for, so a client can never make pgmux reserve memory it did not actually send:
//! buffers only grow with bytes that really arrived.

use bytes::{Buf, BytesMut};

use super::{ProtocolError, MAX_STARTUP_PACKET};

/// One complete frontend or backend message, split off the read buffer without copying.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    /// The body, without tag and length.
    pub body: BytesMut,
}

/// Header of the next message in `buf`, if at least the 5 header bytes are there:
/// `(tag, total_len)` where `total_len` counts the tag byte too. Validates the length.
#[inline]
pub fn peek_header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength {
            tag: tag as char,
            len: len as i64,
        });
    }
    let len = len as usize;
    if len > max {
        return Err(ProtocolError::TooLarge {
            tag: tag as char,
            len,
            max,
        });
    }
    Ok(Some((tag, len + 1)))
}

/// Length in bytes of the complete frame at the start of `buf`, or `None` if it is not all
/// there yet.
#[inline]
pub fn complete_frame_len(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    match peek_header(buf, max)? {
        Some((tag, total)) if buf.len() >= total => Ok(Some((tag, total))),
        _ => Ok(None),
    }
}

/// Splits one complete tagged message off the front of `buf`.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, ProtocolError> {
    match complete_frame_len(buf, max)? {
        Some((tag, total)) => {
            let mut body = buf.split_to(total);
            body.advance(5);
            Ok(Some(Frame { tag, body }))
        }
        None => Ok(None),
    }
}

/// Splits one complete untagged startup-phase packet (`len:i32, body`) off `buf`, returning
/// its body (starting with the 4-byte protocol code).
pub fn split_startup_packet(buf: &mut BytesMut) -> Result<Option<BytesMut>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(ProtocolError::BadStartup(
            "invalid length of startup packet",
        ));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut body = buf.split_to(len);
    body.advance(4);
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn splits_complete_frames_and_waits_for_partial_ones() {
        let mut wire = msg(b'Q', b"select 1\0");
        wire.extend_from_slice(&msg(b'S', b"")[..3]);
        let mut buf = BytesMut::from(&wire[..]);
        let f = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(&f.body[..], b"select 1\0");
        assert!(split_frame(&mut buf, 1024).unwrap().is_none());
        buf.extend_from_slice(&msg(b'S', b"")[3..]);
        let f = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'S');
        assert!(f.body.is_empty());
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_bad_lengths_before_waiting_for_the_body() {
        for len in [0i32, 3, -1, i32::MIN] {
            let mut buf = BytesMut::new();
            buf.extend_from_slice(b"Q");
            buf.extend_from_slice(&len.to_be_bytes());
            assert!(matches!(
                split_frame(&mut buf, 1024),
                Err(ProtocolError::BadLength { .. })
            ));
        }
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"d");
        buf.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            split_frame(&mut buf, 1 << 20),
            Err(ProtocolError::TooLarge { .. })
        ));
        // Nothing was reserved for the announced 2 GiB.
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn startup_packet_limits() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 4][..]);
        assert!(split_startup_packet(&mut buf).is_err());
        let mut buf = BytesMut::from(&(20_000i32).to_be_bytes()[..]);
        assert!(split_startup_packet(&mut buf).is_err());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&super::super::SSL_REQUEST.to_be_bytes());
        let body = split_startup_packet(&mut buf).unwrap().unwrap();
        assert_eq!(&body[..], &super::super::SSL_REQUEST.to_be_bytes());
    }
}
