//! `server_auth = "rds_iam"` end to end (issue 8): the real pgmux binary logs in to a
//! fake PostgreSQL server that asks for a cleartext password (as RDS does for IAM users)
//! and records it. The password must be an RDS IAM token for that server, user and
//! region, signed with the credentials from the environment, and neither the token nor
//! the secret key may appear in pgmux's log. (Byte-for-byte agreement with botocore is
//! checked by `proxy/src/rds_iam.rs`'s `matches_botocore`.)

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
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
        let (_, mut startup) = read_body(&mut s, false);
        if startup == [0x04, 0xd2, 0x16, 0x2f] {
            // SSLRequest (pgmux's default sslmode is prefer): no TLS here.
            s.write_all(b"N").unwrap();
            startup = read_body(&mut s, false).1;
        }
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

/// A session token of the length STS hands out to roles and web identities (about 1 KB),
/// so the login token is as long as a real one (over 1.5 KB): longer than the password
/// buffers some poolers had.
fn long_session_token() -> String {
    format!("IQoJb3JpZ2luX2VjE{}==", "Ab9+/".repeat(220))
}

#[test]
fn pool_logs_in_with_an_rds_iam_token() {
    let session = long_session_token();
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
            ("AWS_SESSION_TOKEN", session.as_str()),
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
    let encoded = session
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    assert!(
        token.contains(&format!(
            "&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
             &X-Amz-Security-Token={encoded}&X-Amz-Signature="
        )),
        "{token}"
    );
    assert!(token.len() > 1500, "{} bytes", token.len());
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
        !log.contains(&session[..40]) && !log.contains(&encoded[..40]),
        "session token in the log:\n{log}"
    );
    assert!(!err.is_empty());
}

#[path = "support/tls.rs"]
mod tls_support;

/// A fake STS over HTTPS (a certificate for `localhost` from `ca`): answers each POST
/// with credentials and sends the request body to `tx`.
fn fake_sts(l: TcpListener, cert: tls_support::Issued, tx: mpsc::Sender<String>) {
    use rustls::pki_types::pem::PemObject;
    let chain = vec![cert.der.clone()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(tls_support::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    );
    for conn in l.incoming() {
        let Ok(tcp) = conn else { return };
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let tls = rustls::ServerConnection::new(config.clone()).unwrap();
        let mut s = rustls::StreamOwned::new(tls, tcp);
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Headers, then Content-Length bytes of body.
        let body = loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break None,
                Ok(n) => n,
            };
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break Some(body.to_owned());
                }
            }
        };
        let Some(body) = body else { continue };
        let xml = "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
            <AssumeRoleWithWebIdentityResult><Credentials>\
            <AccessKeyId>ASIAWEBIDENTITY</AccessKeyId>\
            <SecretAccessKey>webid/secret+key</SecretAccessKey>\
            <SessionToken>webid-session&amp;token</SessionToken>\
            <Expiration>2099-01-01T00:00:00Z</Expiration>\
            </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>";
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        );
        let _ = s.write_all(resp.as_bytes());
        let _ = s.flush();
        s.conn.send_close_notify();
        let _ = s.flush();
        if tx.send(body).is_err() {
            return;
        }
    }
}

/// EKS IRSA: the web identity token file and role are exchanged at STS (over HTTPS,
/// verified against `SSL_CERT_FILE`) for credentials that sign the RDS token.
#[test]
fn web_identity_credentials_come_from_sts_over_https() {
    let ca = tls_support::Ca::new("sts test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eyJhbGciOi.web-identity.jwt\n").unwrap();

    let sts = TcpListener::bind("127.0.0.1:0").unwrap();
    let sts_port = sts.local_addr().unwrap().port();
    let (sts_tx, sts_rx) = mpsc::channel();
    let cert = ca.issue("localhost", &["localhost", "127.0.0.1"]);
    std::thread::spawn(move || fake_sts(sts, cert, sts_tx));

    let pg = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = pg.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || fake_server(pg, tx));

    let url = format!("postgres://app:clientpw@127.0.0.1:{port}/app");
    let endpoint = format!("https://localhost:{sts_port}/");
    let px = Pgmux::start(
        &[],
        &[
            ("DATABASE_URL", url.as_str()),
            ("PGMUX_AUTH_TYPE", "trust"),
            ("PGMUX_SERVER_AUTH", "rds_iam"),
            ("PGMUX_AWS_REGION", "eu-west-1"),
            ("PGMUX_SERVER_LOGIN_RETRY", "0"),
            ("PGMUX_LOG", "debug"),
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_SESSION_TOKEN", ""),
            ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", ""),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", ""),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/pgmux"),
            ("AWS_ROLE_SESSION_NAME", "pgmux-test"),
            ("AWS_ENDPOINT_URL_STS", endpoint.as_str()),
            ("SSL_CERT_FILE", ca_file.to_str().unwrap()),
        ],
    );
    let mut raw = RawConn::connect(px.port());
    raw.startup("app", "app", &[]);
    raw.send(&RawConn::query_message("SELECT 1"));
    let _ = raw.next_error();

    let form = sts_rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("pgmux did not call STS; log:\n{}", px.log()));
    assert!(form.contains("Action=AssumeRoleWithWebIdentity"), "{form}");
    assert!(
        form.contains("RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fpgmux"),
        "{form}"
    );
    assert!(form.contains("RoleSessionName=pgmux-test"), "{form}");
    assert!(
        form.contains("WebIdentityToken=eyJhbGciOi.web-identity.jwt"),
        "the token file's contents, trimmed: {form}"
    );
    let (user, token) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("pgmux logged in to the fake server");
    assert_eq!(user, "app");
    assert!(
        token.contains("&X-Amz-Credential=ASIAWEBIDENTITY%2F"),
        "signed with the STS credentials: {token}"
    );
    assert!(
        token.contains("%2Feu-west-1%2Frds-db%2Faws4_request"),
        "{token}"
    );
    assert!(
        token.contains("&X-Amz-Security-Token=webid-session%26token&"),
        "the session token, XML-unescaped: {token}"
    );
    let log = px.log();
    for secret in ["webid/secret+key", "webid-session", "web-identity.jwt"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}
