//! Client-facing authentication: the server side of SCRAM-SHA-256 (RFC 5802/7677 as
//! PostgreSQL speaks it) and MD5.
//!
//! A SCRAM verifier (salt, StoredKey, ServerKey) is derived **once per configured password**
//! and cached by the caller: deriving costs 4096 HMAC rounds (milliseconds of CPU), checking
//! a login costs two HMACs and a hash. Unknown users get a mock exchange with a verifier
//! nobody can satisfy, so a login failure does not reveal whether the user exists.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// SCRAM with `tls-server-end-point` channel binding, over TLS only.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The gs2 header of a client that binds to the server's certificate.
const GS2_END_POINT: &str = "p=tls-server-end-point";

/// What a client must prove knowledge of, in PostgreSQL's `SCRAM-SHA-256$iter:salt$stored:server` form.
#[derive(Clone)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(<redacted>)")
    }
}

impl ScramVerifier {
    /// Derives a verifier from a plain-text password with a fresh random salt.
    pub fn derive(password: &str) -> Self {
        let s = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&s).expect("postgres-protocol produces a valid verifier")
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations = iter.parse().ok()?;
        let salt = B64.decode(salt).ok()?;
        let stored_key: [u8; 32] = B64.decode(stored).ok()?.try_into().ok()?;
        let server_key: [u8; 32] = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// A verifier no password matches (for unknown users).
    pub fn impossible(user: &str, secret: &[u8; 32]) -> Self {
        // Deterministic per user so that repeated probes see the same salt, like a real one.
        let mut mac = HmacSha256::new_from_slice(secret).expect("any key length");
        mac.update(user.as_bytes());
        let salt = mac.finalize().into_bytes()[..16].to_vec();
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut stored_key);
        rand::thread_rng().fill_bytes(&mut server_key);
        ScramVerifier {
            iterations: 4096,
            salt,
            stored_key,
            server_key,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported on this connection")]
    ChannelBinding,
    #[error("SCRAM proof does not match")]
    BadProof,
}

/// Server side of one SCRAM-SHA-256 exchange.
pub struct ScramServer<'a> {
    verifier: &'a ScramVerifier,
    client_first_bare: String,
    /// What the client must send back base64-encoded in `c=`: its gs2 header, plus the
    /// channel binding data when it bound to the channel.
    channel: Vec<u8>,
    server_first: String,
    nonce: String,
}

impl<'a> ScramServer<'a> {
    /// Handles client-first-message; returns the exchange and server-first-message.
    /// `binding`: the connection's `tls-server-end-point` data (TLS only; then
    /// SCRAM-SHA-256-PLUS was offered). `plus`: the client chose SCRAM-SHA-256-PLUS.
    pub fn start(
        verifier: &'a ScramVerifier,
        client_first: &[u8],
        binding: Option<&[u8]>,
        plus: bool,
    ) -> Result<(Self, String), ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Malformed("gs2 header"))?;
        let bound = match (flag, plus, binding) {
            (GS2_END_POINT, true, Some(data)) => Some(data),
            (_, true, _) => return Err(ScramError::ChannelBinding),
            ("n", false, _) => None,
            // "y": the client could bind but thinks the server cannot. This server
            // offered -PLUS, so something removed it on the way: refuse (RFC 5802 §6).
            ("y", false, None) => None,
            ("y", false, Some(_)) => return Err(ScramError::ChannelBinding),
            (f, false, _) if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("gs2 cbind flag")),
        };
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("gs2 header"))?;
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err(ScramError::Malformed("authzid"));
        }
        let mut channel = format!("{flag},{authzid},").into_bytes();
        if let Some(data) = bound {
            channel.extend_from_slice(data);
        }
        // client-first-bare: [reserved-mext ","] username "," nonce ["," extensions]
        let mut client_nonce = None;
        for attr in bare.split(',') {
            if let Some(n) = attr.strip_prefix("r=") {
                client_nonce = Some(n);
                break;
            }
            if attr.starts_with("m=") {
                return Err(ScramError::Malformed("mandatory extension not supported"));
            }
        }
        let client_nonce = client_nonce.ok_or(ScramError::Malformed("missing nonce"))?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed("invalid nonce"));
        }
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ScramServer {
                verifier,
                client_first_bare: bare.to_owned(),
                channel,
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Handles client-final-message; returns server-final-message and the ClientKey the
    /// proof revealed (for SCRAM passthrough) on success.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, [u8; 32]), ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let channel = channel.ok_or(ScramError::Malformed("missing channel binding"))?;
        let channel = B64
            .decode(channel)
            .map_err(|_| ScramError::Malformed("channel binding"))?;
        if !constant_time_eq(&channel, &self.channel) {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

/// What SCRAM passthrough logs in to a server with: the verifier's salt, iterations and
/// ServerKey, and the ClientKey a client's proof revealed. Never logged.
pub struct ScramKeys {
    pub verifier: ScramVerifier,
    pub client_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(<redacted>)")
    }
}

/// Client side of SCRAM-SHA-256 with keys instead of a password (passthrough). The
/// server's salt and iterations must be the verifier's: the keys derive from them.
pub struct ScramKeyClient<'a> {
    keys: &'a ScramKeys,
    /// base64 of the gs2 header (and channel binding data) for `c=`.
    channel: String,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl<'a> ScramKeyClient<'a> {
    /// Returns the client and client-first-message. `binding`: the server's
    /// `tls-server-end-point` data, to use SCRAM-SHA-256-PLUS.
    pub fn start(keys: &'a ScramKeys, binding: Option<&[u8]>) -> (Self, String) {
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        let client_first_bare = format!("n=,r={nonce}");
        let gs2 = match binding {
            Some(_) => format!("{GS2_END_POINT},,"),
            None => "n,,".to_owned(),
        };
        let first = format!("{gs2}{client_first_bare}");
        let mut channel = gs2.into_bytes();
        channel.extend_from_slice(binding.unwrap_or_default());
        (
            ScramKeyClient {
                keys,
                channel: B64.encode(channel),
                client_first_bare,
                nonce,
                auth_message: None,
            },
            first,
        )
    }

    /// Handles server-first-message; returns client-final-message.
    pub fn update(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let msg =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attr in msg.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = Some(v);
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = Some(v);
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("missing nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let salt = B64
            .decode(salt.ok_or(ScramError::Malformed("missing salt"))?)
            .map_err(|_| ScramError::Malformed("salt"))?;
        let iterations: u32 = iterations
            .and_then(|i| i.parse().ok())
            .ok_or(ScramError::Malformed("iterations"))?;
        if salt != self.keys.verifier.salt || iterations != self.keys.verifier.iterations {
            // The server holds a different verifier than the auth source: the keys
            // cannot answer it.
            return Err(ScramError::BadProof);
        }
        let without_proof = format!("c={},r={nonce}", self.channel);
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let client_signature = hmac(&self.keys.verifier.stored_key, auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for (i, p) in proof.iter_mut().enumerate() {
            *p = self.keys.client_key[i] ^ client_signature[i];
        }
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final-message (the server's signature).
    pub fn finish(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let msg =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let sig = msg
            .strip_prefix("v=")
            .ok_or(ScramError::Malformed("server signature"))?;
        let sig = B64
            .decode(sig)
            .map_err(|_| ScramError::Malformed("server signature"))?;
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or(ScramError::Malformed("out of order"))?;
        let expected = hmac(&self.keys.verifier.server_key, auth_message.as_bytes());
        if constant_time_eq(&sig, &expected) {
            Ok(())
        } else {
            Err(ScramError::BadProof)
        }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `md5…` string a client sends for AuthenticationMD5Password, from a stored
/// `md5<hex>` hash (PostgreSQL's md5(password + user)) instead of the password.
pub fn md5_response_from_hash(hash: &str, salt: [u8; 4]) -> String {
    use md5::{Digest as _, Md5};
    let hex = hash.strip_prefix("md5").unwrap_or(hash);
    let mut h = Md5::new();
    h.update(hex.as_bytes());
    h.update(salt);
    let digest = h.finalize();
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Whether `s` is a stored MD5 hash (`md5` + 32 lowercase hex digits).
pub fn is_md5_hash(s: &str) -> bool {
    s.len() == 35
        && s.starts_with("md5")
        && s[3..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The `md5…` string a client sends for AuthenticationMD5Password.
pub fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(password_server: &str, password_client: &str) -> Result<(), ScramError> {
        let verifier = ScramVerifier::derive(password_server);
        let mut client =
            ScramSha256::new(password_client.as_bytes(), ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(&verifier, client.message(), None, false)?;
        client.update(first.as_bytes()).unwrap();
        let (fin, _) = server.finish(client.message())?;
        client
            .finish(fin.as_bytes())
            .expect("client accepts the server signature");
        Ok(())
    }

    #[test]
    fn passthrough_keys_log_in_where_the_password_would() {
        // A client authenticates against a verifier; the ClientKey its proof reveals
        // then answers a second exchange (the "server") holding the same verifier.
        let verifier = ScramVerifier::derive("s3cret");
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(&verifier, client.message(), None, false).unwrap();
        client.update(first.as_bytes()).unwrap();
        let (_, client_key) = server.finish(client.message()).unwrap();
        let keys = ScramKeys {
            verifier: verifier.clone(),
            client_key,
        };
        let (mut pass, first) = ScramKeyClient::start(&keys, None);
        let (upstream, server_first) =
            ScramServer::start(&verifier, first.as_bytes(), None, false).unwrap();
        let fin = pass.update(server_first.as_bytes()).unwrap();
        let (server_final, _) = upstream.finish(fin.as_bytes()).unwrap();
        pass.finish(server_final.as_bytes()).unwrap();
        // Another verifier of the same password (another salt): the keys do not fit.
        let other = ScramVerifier::derive("s3cret");
        let (mut pass, first) = ScramKeyClient::start(&keys, None);
        let (_, server_first) = ScramServer::start(&other, first.as_bytes(), None, false).unwrap();
        assert_eq!(
            pass.update(server_first.as_bytes()),
            Err(ScramError::BadProof)
        );
        // A wrong server signature is refused.
        let (mut pass, first) = ScramKeyClient::start(&keys, None);
        let (_, server_first) =
            ScramServer::start(&verifier, first.as_bytes(), None, false).unwrap();
        pass.update(server_first.as_bytes()).unwrap();
        assert!(pass.finish(b"v=AAAA").is_err());
    }

    #[test]
    fn channel_binding_plus_with_a_real_client() {
        let verifier = ScramVerifier::derive("s3cret");
        let data = b"certificate hash".to_vec();
        let mut client = ScramSha256::new(
            b"s3cret",
            ChannelBinding::tls_server_end_point(data.clone()),
        );
        let (server, first) =
            ScramServer::start(&verifier, client.message(), Some(&data), true).unwrap();
        client.update(first.as_bytes()).unwrap();
        let (fin, client_key) = server.finish(client.message()).unwrap();
        client.finish(fin.as_bytes()).unwrap();
        // Bound to another certificate (a man in the middle): refused.
        let mut client = ScramSha256::new(
            b"s3cret",
            ChannelBinding::tls_server_end_point(b"other".to_vec()),
        );
        let (server, first) =
            ScramServer::start(&verifier, client.message(), Some(&data), true).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(
            server.finish(client.message()).map(|_| ()),
            Err(ScramError::ChannelBinding)
        );
        // "y" (client could bind, thinks we cannot) while we offered -PLUS: refused.
        assert!(ScramServer::start(&verifier, b"y,,n=,r=abc", Some(&data), false).is_err());
        assert!(ScramServer::start(&verifier, b"y,,n=,r=abc", None, false).is_ok());
        // -PLUS without channel data, or a binding type we do not have: refused.
        assert!(
            ScramServer::start(&verifier, b"p=tls-server-end-point,,n=,r=a", None, true).is_err()
        );
        assert!(ScramServer::start(&verifier, b"p=tls-unique,,n=,r=a", Some(&data), true).is_err());
        // Passthrough keys bind too.
        let keys = ScramKeys {
            verifier: verifier.clone(),
            client_key,
        };
        let (mut pass, first) = ScramKeyClient::start(&keys, Some(&data));
        let (upstream, server_first) =
            ScramServer::start(&verifier, first.as_bytes(), Some(&data), true).unwrap();
        let fin = pass.update(server_first.as_bytes()).unwrap();
        let (server_final, _) = upstream.finish(fin.as_bytes()).unwrap();
        pass.finish(server_final.as_bytes()).unwrap();
    }

    #[test]
    fn md5_from_hash_matches_md5_from_password() {
        let salt = [1, 2, 3, 4];
        let hash = postgres_protocol::password::md5(b"pw", "alice");
        assert!(is_md5_hash(&hash));
        assert_eq!(
            md5_response_from_hash(&hash, salt),
            md5_response("alice", "pw", salt)
        );
    }

    #[test]
    fn scram_accepts_the_right_password_with_a_real_client() {
        run("s3cret", "s3cret").unwrap();
    }

    #[test]
    fn scram_rejects_a_wrong_password() {
        assert_eq!(run("s3cret", "guess"), Err(ScramError::BadProof));
    }

    #[test]
    fn scram_rejects_garbage() {
        let v = ScramVerifier::derive("x");
        assert!(ScramServer::start(&v, b"", None, false).is_err());
        assert!(ScramServer::start(&v, b"p=tls-server-end-point,,n=,r=abc", None, false).is_err());
        assert!(ScramServer::start(&v, b"n,,n=,", None, false).is_err());
        let (s, _) = ScramServer::start(&v, b"n,,n=,r=abc", None, false).unwrap();
        assert!(s.finish(b"c=biws,r=abc,p=AAAA").is_err());
    }

    #[test]
    fn verifier_parse_round_trip() {
        let v = ScramVerifier::derive("pw");
        assert_eq!(v.iterations, 4096);
        assert!(ScramVerifier::parse("md5abc").is_none());
    }
}
