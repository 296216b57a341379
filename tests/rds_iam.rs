//! `server_auth = "rds_iam"` end to end (issue 8): the real pgmux binary logs in to a
//! fake PostgreSQL server that asks for a cleartext password (as RDS does for IAM users)
//! and records it. The password must be an RDS IAM token for that server, user and
//! region, signed with the credentials from the environment, and neither the token nor
//! the secret key may appear in pgmux's log. (Byte-for-byte agreement with botocore is
//! checked by `proxy/src/rds_iam.rs`'s `matches_botocore`.)

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use support::{Pgmux, RawConn};

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

/// Reads one length-prefixed message body (after `tag`, if any).
fn read_body(s: &mut TcpStream, tagged: bool) -> (u8, Vec<u8>) {
    let mut tag = [0u8; 1];
    if tagged {
        s.read_exact(&mut tag).unwrap();
    }
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; i32::from_be_bytes(len) as usize - 4];
    s.read_exact(&mut body).unwrap();
    (tag[0], body)
}

/// A fake PostgreSQL server: every login gets AuthenticationCleartextPassword, its
/// password is sent to `tx`, then a FATAL 28P01.
fn fake_server(l: TcpListener, tx: mpsc::Sender<(String, String)>) {
    for conn in l.incoming() {
        let Ok(mut s) = conn else { return };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (_, startup) = read_body(&mut s, false);
        // protocol version, then key\0value\0 pairs.
        let params: Vec<&[u8]> = startup[4..].split(|b| *b == 0).collect();
        let user = params
            .chunks(2)
            .find(|kv| kv[0] == b"user")
            .map(|kv| String::from_utf8_lossy(kv[1]).into_owned())
            .unwrap_or_default();
        s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).unwrap();
        let (tag, body) = read_body(&mut s, true);
        assert_eq!(tag, b'p');
        let password = String::from_utf8(body[..body.len() - 1].to_vec()).unwrap();
        let mut fields = Vec::new();
        for (t, v) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "PAM authentication failed for user"),
        ] {
            fields.push(t);
            fields.extend_from_slice(v.as_bytes());
            fields.push(0);
        }
        fields.push(0);
        let mut msg = vec![b'E'];
        msg.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
        msg.extend_from_slice(&fields);
        let _ = s.write_all(&msg);
        if tx.send((user, password)).is_err() {
            return;
        }
    }
}

#[test]
fn pool_logs_in_with_an_rds_iam_token() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || fake_server(l, tx));

    let url = format!("postgres://app:clientpw@127.0.0.1:{port}/app");
    let px = Pgmux::start(
        &[],
        &[
            ("DATABASE_URL", url.as_str()),
            ("PGMUX_AUTH_TYPE", "trust"),
            ("PGMUX_SERVER_AUTH", "rds_iam"),
            ("PGMUX_AWS_REGION", "us-east-1"),
            ("PGMUX_SERVER_LOGIN_RETRY", "0"),
            ("PGMUX_LOG", "debug"),
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_SESSION_TOKEN", "session+token/1="),
            // Nothing else from the test environment's AWS settings may interfere.
            ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", ""),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", ""),
        ],
    );
    let mut raw = RawConn::connect(px.port());
    raw.startup("app", "app", &[]);
    raw.send(&RawConn::query_message("SELECT 1"));
    let err = raw
        .next_error()
        .expect("the client gets the server's login failure");

    let (user, token) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("pgmux logged in to the fake server");
    assert_eq!(user, "app");
    let prefix = format!(
        "127.0.0.1:{port}/?Action=connect&DBUser=app&X-Amz-Algorithm=AWS4-HMAC-SHA256\
         &X-Amz-Credential=AKIDEXAMPLE%2F"
    );
    assert!(token.starts_with(&prefix), "{token}");
    assert!(
        token.contains("%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date="),
        "{token}"
    );
    assert!(
        token.contains(
            "&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
             &X-Amz-Security-Token=session%2Btoken%2F1%3D&X-Amz-Signature="
        ),
        "{token}"
    );
    let sig = token.rsplit("X-Amz-Signature=").next().unwrap();
    assert!(
        sig.len() == 64 && sig.bytes().all(|b| b.is_ascii_hexdigit()),
        "{token}"
    );
    assert_ne!(token, "clientpw", "the configured password is not used");

    let log = px.log();
    assert!(!log.contains(SECRET), "secret key in the log:\n{log}");
    assert!(!log.contains(sig), "token in the log:\n{log}");
    assert!(
        !log.contains("session+token"),
        "session token in the log:\n{log}"
    );
    assert!(!err.is_empty());
}
