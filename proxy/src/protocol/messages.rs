//! Encoders for the messages pgmux writes itself, and decoders for the few bodies it reads.
//!
//! Encoders append to a caller-owned `BytesMut` so a whole answer (e.g. the login burst:
//! AuthenticationOk, ParameterStatus…, BackendKeyData, ReadyForQuery) goes out in one write.

use bytes::{BufMut, BytesMut};

use super::ProtocolError;

/// Appends `tag, len, body` where `body` is written by `f`.
#[inline]
fn put_msg(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    f(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early and desynchronise the peer: drop such bytes.
    buf.extend(s.bytes().filter(|b| *b != 0));
    buf.put_u8(0);
}

/// Severity of an ErrorResponse pgmux sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    put_msg(buf, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// ErrorResponse with a hint (`H`) after the message.
pub fn error_response_with_hint(
    buf: &mut BytesMut,
    severity: Severity,
    code: &str,
    message: &str,
    hint: &str,
) {
    put_msg(buf, b'E', |b| {
        for (k, v) in [
            (b'S', severity.as_str()),
            (b'V', severity.as_str()),
            (b'C', code),
            (b'M', message),
            (b'H', hint),
        ] {
            b.put_u8(k);
            put_cstr(b, v);
        }
        b.put_u8(0);
    });
}

/// Re-encodes an ErrorResponse received from a server, with the severity changed (used to
/// turn a server's login failure into the client's FATAL).
pub fn error_response_from_fields(buf: &mut BytesMut, fields: &ErrorFields, severity: Severity) {
    put_msg(buf, b'E', |b| {
        for (k, v) in &fields.fields {
            b.put_u8(*k);
            match k {
                b'S' | b'V' => put_cstr(b, severity.as_str()),
                _ => put_cstr(b, v),
            }
        }
        b.put_u8(0);
    });
}

/// NoticeResponse with severity NOTICE (code 00000).
pub fn notice_response(buf: &mut BytesMut, message: &str, detail: Option<&str>) {
    put_msg(buf, b'N', |b| {
        for (k, v) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', "00000"),
            (b'M', message),
        ] {
            b.put_u8(k);
            put_cstr(b, v);
        }
        if let Some(d) = detail {
            b.put_u8(b'D');
            put_cstr(b, d);
        }
        b.put_u8(0);
    });
}

/// RowDescription of text-format columns: (name, type oid, type length).
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, u32, i16)]) {
    put_msg(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for (name, oid, len) in columns {
            put_cstr(b, name);
            b.put_u32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(*oid);
            b.put_i16(*len);
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow of text values (None = NULL).
pub fn data_row(buf: &mut BytesMut, values: &[Option<String>]) {
    put_msg(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put_msg(buf, b'C', |b| put_cstr(b, tag));
}

pub fn empty_query_response(buf: &mut BytesMut) {
    put_msg(buf, b'I', |_| {});
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_msg(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put_msg(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    put_msg(buf, b'Z', |b| b.put_u8(status));
}

pub fn auth_ok(buf: &mut BytesMut) {
    put_msg(buf, b'R', |b| b.put_i32(0));
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    put_msg(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    put_msg(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put_msg(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put_msg(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

/// NegotiateProtocolVersion: newest minor version supported and the options not recognised.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unrecognized: &[String]) {
    put_msg(buf, b'v', |b| {
        b.put_i32(minor);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            put_cstr(b, o);
        }
    });
}

/// A simple Query message.
pub fn query(buf: &mut BytesMut, sql: &str) {
    put_msg(buf, b'Q', |b| put_cstr(b, sql));
}

pub fn terminate(buf: &mut BytesMut) {
    put_msg(buf, b'X', |_| {});
}

/// The fields of an ErrorResponse or NoticeResponse, in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    pub fn parse(body: &[u8]) -> Result<Self, ProtocolError> {
        let mut fields = Vec::new();
        let mut rest = body;
        loop {
            let (&code, tail) = rest
                .split_first()
                .ok_or(ProtocolError::Malformed("ErrorResponse"))?;
            if code == 0 {
                break;
            }
            let (value, tail) = cstr(tail).ok_or(ProtocolError::Malformed("ErrorResponse"))?;
            fields.push((code, String::from_utf8_lossy(value).into_owned()));
            rest = tail;
        }
        Ok(ErrorFields { fields })
    }

    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == code)
            .map(|(_, v)| v.as_str())
    }

    pub fn code(&self) -> &str {
        self.get(b'C').unwrap_or("XX000")
    }

    pub fn message(&self) -> &str {
        self.get(b'M').unwrap_or("")
    }

    pub fn severity(&self) -> &str {
        self.get(b'V').or_else(|| self.get(b'S')).unwrap_or("ERROR")
    }
}

impl std::fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            self.severity(),
            self.message(),
            self.code()
        )
    }
}

/// Splits a NUL-terminated string off the front of `buf`.
#[inline]
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    // Empty (the unnamed statement and portal) at once; a longer string, such as a
    // Parse's query text, with memchr: a word at a time instead of a byte.
    let nul = match buf.first() {
        Some(0) => 0,
        _ => memchr::memchr(0, buf)?,
    };
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// Decodes a ParameterStatus body into (name, value).
/// The columns of a DataRow as text (NULL as `None`; invalid UTF-8 replaced).
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ProtocolError> {
    let bad = || ProtocolError::Malformed("DataRow");
    let count = u16::from_be_bytes(
        body.get(..2)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    let mut rest = &body[2..];
    let mut cols = Vec::with_capacity(usize::from(count).min(64));
    for _ in 0..count {
        let len = i32::from_be_bytes(
            rest.get(..4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        rest = &rest[4..];
        if len < 0 {
            cols.push(None);
            continue;
        }
        let len = len as usize;
        let value = rest.get(..len).ok_or_else(bad)?;
        cols.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = &rest[len..];
    }
    Ok(cols)
}

pub fn parse_parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let bad = ProtocolError::Malformed("ParameterStatus");
    let (name, rest) = cstr(body).ok_or(ProtocolError::Malformed("ParameterStatus"))?;
    let (value, _) = cstr(rest).ok_or(bad)?;
    let name =
        std::str::from_utf8(name).map_err(|_| ProtocolError::Malformed("ParameterStatus"))?;
    let value =
        std::str::from_utf8(value).map_err(|_| ProtocolError::Malformed("ParameterStatus"))?;
    Ok((name, value))
}

/// Decodes the `name\0value\0…\0` list of a StartupMessage (after the version).
pub fn parse_startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let bad = || ProtocolError::BadStartup("malformed parameter list");
    let mut out = Vec::new();
    loop {
        match body.first() {
            None => return Err(bad()),
            Some(0) if body.len() == 1 => return Ok(out),
            Some(0) => return Err(bad()),
            Some(_) => {}
        }
        let (k, rest) = cstr(body).ok_or_else(bad)?;
        let (v, rest) = cstr(rest).ok_or_else(bad)?;
        let k = std::str::from_utf8(k).map_err(|_| bad())?;
        let v = std::str::from_utf8(v).map_err(|_| bad())?;
        out.push((k.to_owned(), v.to_owned()));
        body = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::split_frame;

    #[test]
    fn cstr_splits_at_the_first_nul() {
        assert_eq!(cstr(b"\0rest"), Some((&b""[..], &b"rest"[..])));
        assert_eq!(cstr(b"\0"), Some((&b""[..], &b""[..])));
        let long = [b"SELECT ".repeat(20).as_slice(), b"\0\0x"].concat();
        assert_eq!(cstr(&long), Some((&long[..140], &b"\0x"[..])));
        assert_eq!(cstr(b"no terminator"), None);
        assert_eq!(cstr(b""), None);
    }

    #[test]
    fn data_row_columns_and_bad_lengths() {
        let mut body = vec![0, 3];
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"ab");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes());
        assert_eq!(
            parse_data_row(&body).unwrap(),
            vec![Some("ab".to_string()), None, Some(String::new())]
        );
        // A length past the end of the message is an error, not an allocation.
        let mut bad = vec![0, 1];
        bad.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(parse_data_row(&bad).is_err());
        assert!(parse_data_row(&[0]).is_err());
    }

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        error_response(
            &mut buf,
            Severity::Fatal,
            "53300",
            "sorry, too many clients already",
        );
        let f = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'E');
        let e = ErrorFields::parse(&f.body).unwrap();
        assert_eq!(e.code(), "53300");
        assert_eq!(e.severity(), "FATAL");
        assert_eq!(e.message(), "sorry, too many clients already");
    }

    #[test]
    fn startup_params() {
        let body = b"user\0app\0database\0db\0\0";
        let p = parse_startup_params(body).unwrap();
        assert_eq!(
            p,
            vec![
                ("user".into(), "app".into()),
                ("database".into(), "db".into())
            ]
        );
        assert!(parse_startup_params(b"user\0app\0").is_err());
        assert!(parse_startup_params(b"user\0app").is_err());
        assert!(parse_startup_params(b"").is_err());
        assert_eq!(parse_startup_params(b"\0").unwrap(), vec![]);
    }

    #[test]
    fn parameter_status_round_trips() {
        let mut buf = BytesMut::new();
        parameter_status(&mut buf, "TimeZone", "UTC");
        let f = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(
            parse_parameter_status(&f.body).unwrap(),
            ("TimeZone", "UTC")
        );
    }
}
