//! TLS on both sides: rustls with the ring provider, TLS 1.2 and 1.3 only.
//!
//! - **Clients** ([`ClientTls`]): the acceptor is built from `client_tls_cert_file` and
//!   `client_tls_key_file` once, and swapped atomically when the files' contents change
//!   (checked every second by the maintenance task, so a cert-manager rotation needs no
//!   signal) or at a reload. A handshake uses the acceptor current when it starts; open
//!   connections keep theirs. A new file that does not parse is logged and the old
//!   certificate stays.
//! - **Servers** ([`connect`]): libpq's `sslmode` semantics, per server. The rustls
//!   client configuration for a (mode, CA file) pair is built once and kept while the CA
//!   file is unchanged (a small process-wide cache: a pool opens servers often, and a CA
//!   bundle such as RDS's has over a hundred certificates to parse).
//! - **Streams** ([`TlsCell`]): the forwarding loop reads and writes a socket through
//!   shared references in one task (see [`crate::sockio`]); a TLS stream needs `&mut` for
//!   both, so it sits behind a mutex that is never contended (one task) and never held
//!   across an await. rustls may keep encrypted bytes it could not write yet: the cell
//!   remembers that ([`TlsCell::wants_flush`]) so the loop keeps polling the write side.
//! - **Channel binding** ([`end_point_hash`]): `tls-server-end-point` (RFC 5929) data for
//!   SCRAM-SHA-256-PLUS, the hash of the server's certificate with the hash function of
//!   its signature (SHA-256 for MD5, SHA-1 and SHA-256 signatures), as PostgreSQL does.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{ready, Context, Poll};

use arc_swap::ArcSwapOption;
use bytes::{Buf, BytesMut};
use pgmux_config::{ClientTls as ClientTlsSettings, ServerAddr, SslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::sockio::READ_CHUNK;

/// The crypto provider of every TLS connection pgmux makes (also the HTTPS client's).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    provider()
}

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

// ---------------------------------------------------------------------------------------
// Streams

/// A TLS stream usable through `&self` by one task (see the module docs).
pub struct TlsCell<S> {
    inner: Mutex<S>,
    /// rustls holds encrypted bytes the socket did not take yet.
    unflushed: AtomicBool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsCell<S> {
    pub fn new(s: S) -> Self {
        TlsCell {
            inner: Mutex::new(s),
            unflushed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, S> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads decrypted bytes into `buf` (growing it like [`crate::sockio::poll_read_drain`]).
    pub fn poll_read_buf(
        &self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        let mut s = self.lock();
        tokio_util::io::poll_read_buf(Pin::new(&mut *s), cx, buf)
    }

    /// Reads through a stack buffer, appending exactly what arrived.
    pub fn poll_read_small(
        &self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut scratch = [0u8; READ_CHUNK];
        let mut rb = ReadBuf::new(&mut scratch);
        let mut s = self.lock();
        ready!(Pin::new(&mut *s).poll_read(cx, &mut rb))?;
        buf.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    }

    /// Writes from the front of `buf` and consumes what rustls took; then pushes what
    /// rustls holds to the socket. `Ok(0)`: nothing to write and everything flushed.
    pub fn poll_write_buf(
        &self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut s = self.lock();
        let mut wrote = 0;
        while buf.has_remaining() {
            match Pin::new(&mut *s).poll_write(cx, buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    buf.advance(n);
                    wrote += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        match Pin::new(&mut *s).poll_flush(cx) {
            Poll::Ready(Ok(())) => self.unflushed.store(false, Ordering::Relaxed),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => self.unflushed.store(true, Ordering::Relaxed),
        }
        if wrote > 0 || !self.unflushed.load(Ordering::Relaxed) {
            Poll::Ready(Ok(wrote))
        } else {
            Poll::Pending
        }
    }

    /// Encrypted bytes wait for the socket: keep polling the write side.
    pub fn wants_flush(&self) -> bool {
        self.unflushed.load(Ordering::Relaxed)
    }

    /// Non-blocking check of an idle connection: true if the peer closed it or sent
    /// application data unasked (records rustls handles itself, such as TLS 1.3 session
    /// tickets, do not count).
    pub fn looks_dead(&self) -> bool {
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut s = self.lock();
        // EOF, data or an error: unusable.
        Pin::new(&mut *s).poll_read(&mut cx, &mut rb).is_ready()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TlsCell<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = self
            .get_mut()
            .inner
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        Pin::new(s).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TlsCell<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let s = self
            .get_mut()
            .inner
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        Pin::new(s).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let s = this.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        let r = ready!(Pin::new(s).poll_flush(cx));
        if r.is_ok() {
            this.unflushed.store(false, Ordering::Relaxed);
        }
        Poll::Ready(r)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let s = self
            .get_mut()
            .inner
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        Pin::new(s).poll_shutdown(cx)
    }
}

pub type ClientTlsStream = TlsCell<tokio_rustls::server::TlsStream<TcpStream>>;
pub type ServerTlsStream = TlsCell<tokio_rustls::client::TlsStream<TcpStream>>;

impl ServerTlsStream {
    /// `tls-server-end-point` data of the server's certificate.
    pub fn end_point(&self) -> Option<Vec<u8>> {
        let s = self.lock();
        let cert = s.get_ref().1.peer_certificates()?.first()?;
        Some(end_point_hash(cert))
    }
}

// ---------------------------------------------------------------------------------------
// Channel binding

/// `tls-server-end-point` channel binding data of a DER certificate: its hash with the
/// signature's hash function, SHA-256 for MD5 and SHA-1 (RFC 5929 §4.1) and for anything
/// not recognised.
pub fn end_point_hash(cert_der: &[u8]) -> Vec<u8> {
    // signatureAlgorithm OIDs (DER contents) whose hash is not SHA-256.
    const SHA384: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    let oid = signature_oid(cert_der).unwrap_or_default();
    if SHA384.contains(&oid) {
        sha2::Sha384::digest(cert_der).to_vec()
    } else if SHA512.contains(&oid) {
        sha2::Sha512::digest(cert_der).to_vec()
    } else {
        sha2::Sha256::digest(cert_der).to_vec()
    }
}

/// One DER element: (tag, contents, rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, … }, … }
fn signature_oid(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, cert, _) = der(cert)? else {
        return None;
    };
    let (_, _tbs, rest) = der(cert)?;
    let (0x30, alg, _) = der(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der(alg)? else {
        return None;
    };
    Some(oid)
}

// ---------------------------------------------------------------------------------------
// Client side

/// The acceptor clients' handshakes use, with its certificate's channel binding data.
pub struct Acceptor {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub end_point: Vec<u8>,
}

/// The settings and the certificate and key file contents an acceptor was made of.
type Loaded = (ClientTlsSettings, Vec<u8>, Vec<u8>);

/// The client-facing TLS state: the current acceptor and the file contents it was made of.
#[derive(Default)]
pub struct ClientTls {
    current: ArcSwapOption<Acceptor>,
    loaded: Mutex<Option<Loaded>>,
    last_error: Mutex<Option<String>>,
}

impl ClientTls {
    /// Records a refresh error; true if it differs from the last one (worth a log line).
    pub fn note_error(&self, e: &str) -> bool {
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.as_deref() == Some(e) {
            return false;
        }
        *last = Some(e.to_owned());
        true
    }

    /// The acceptor for a handshake starting now (None: TLS is not configured).
    pub fn acceptor(&self) -> Option<Arc<Acceptor>> {
        self.current.load_full()
    }

    /// Builds the acceptor from `settings` if they or the files' contents changed since
    /// the last load. Errors name the key; the previous acceptor then stays.
    /// `Ok(true)`: a new acceptor (or none) is in place.
    pub fn refresh(&self, settings: &ClientTlsSettings) -> Result<bool, String> {
        let (Some(cert_path), Some(key_path)) = (&settings.cert_file, &settings.key_file) else {
            let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
            let had = loaded.take().is_some();
            self.current.store(None);
            return Ok(had);
        };
        let cert = std::fs::read(cert_path).map_err(|e| {
            format!(
                "client_tls_cert_file: cannot read {}: {e}",
                cert_path.display()
            )
        })?;
        let key = std::fs::read(key_path).map_err(|e| {
            format!(
                "client_tls_key_file: cannot read {}: {e}",
                key_path.display()
            )
        })?;
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((s, c, k)) = loaded.as_ref() {
            if s == settings && *c == cert && *k == key {
                return Ok(false);
            }
        }
        let acceptor = build_acceptor(&cert, &key, cert_path, key_path)?;
        self.current.store(Some(Arc::new(acceptor)));
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        *loaded = Some((settings.clone(), cert, key));
        Ok(true)
    }
}

fn build_acceptor(
    cert: &[u8],
    key: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<Acceptor, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "client_tls_cert_file: {}: not a PEM certificate file: {e:?}",
                cert_path.display()
            )
        })?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "client_tls_cert_file: {}: no certificate in the file",
            cert_path.display()
        ));
    };
    let end_point = end_point_hash(leaf);
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        format!(
            "client_tls_key_file: {}: no PEM private key in the file: {e:?}",
            key_path.display()
        )
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "client_tls_key_file: {} does not go with the certificate in {}: {e}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    Ok(Acceptor {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        end_point,
    })
}

// ---------------------------------------------------------------------------------------
// Server side

/// Why a TLS connection to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("the server does not support SSL, but sslmode is {0}")]
    Refused(&'static str),
    #[error("the server's certificate was not accepted (sslmode {mode}): {reason}")]
    Certificate { mode: &'static str, reason: String },
    #[error("cannot load the CA bundle {path}: {reason}")]
    Roots { path: String, reason: String },
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The result of negotiating TLS on a fresh TCP connection to a server.
pub enum Negotiated {
    Tls(Box<ServerTlsStream>),
    Plain(TcpStream),
}

/// SSLRequest and the handshake, as `addr.tls.mode` says. `Plain` when the mode does not
/// try TLS, or the server refused and the mode allows plaintext.
pub async fn connect(mut tcp: TcpStream, addr: &ServerAddr) -> Result<Negotiated, ServerTlsError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mode = addr.tls.mode;
    if !mode.tries_tls() {
        return Ok(Negotiated::Plain(tcp));
    }
    let config = client_config(mode, addr.tls.root_cert.as_deref())?;
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if !mode.requires_tls() => return Ok(Negotiated::Plain(tcp)),
        b'N' => return Err(ServerTlsError::Refused(mode.as_str())),
        _ => {
            return Err(ServerTlsError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected answer to SSLRequest",
            )))
        }
    }
    let name =
        ServerName::try_from(addr.host.clone()).map_err(|_| ServerTlsError::Certificate {
            mode: mode.as_str(),
            reason: format!("{:?} is not a valid host name", addr.host),
        })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match connector.connect(name, tcp).await {
        Ok(s) => Ok(Negotiated::Tls(Box::new(TlsCell::new(s)))),
        Err(e) => {
            let cert = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .filter(|r| matches!(r, rustls::Error::InvalidCertificate(_)))
                .map(|r| r.to_string());
            Err(match cert {
                Some(reason) => ServerTlsError::Certificate {
                    mode: mode.as_str(),
                    reason,
                },
                None => ServerTlsError::Handshake(e),
            })
        }
    }
}

type ConfigKey = (SslMode, Option<PathBuf>);
type Stamp = Option<(std::time::SystemTime, u64)>;
type ConfigCache = Mutex<HashMap<ConfigKey, (Stamp, Arc<rustls::ClientConfig>)>>;

fn stamp(path: Option<&Path>) -> Stamp {
    let m = std::fs::metadata(path?).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The rustls client configuration for (mode, CA file), cached while the file is the same.
fn client_config(
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, ServerTlsError> {
    static CACHE: OnceLock<ConfigCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (mode, root_cert.map(Path::to_path_buf));
    let file = root_cert.map(system_bundle);
    let now = stamp(file.as_deref());
    if let Some((s, c)) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
    {
        if *s == now {
            return Ok(c.clone());
        }
    }
    let roots = match &file {
        Some(path) => Some(Arc::new(load_roots(path)?)),
        None => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::VerifyFull, Some(r)) => webpki(r)?,
        (SslMode::VerifyCa | SslMode::Require, Some(r)) => Arc::new(IgnoreName(webpki(r)?)),
        _ => Arc::new(AnyCertificate),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| ServerTlsError::Io(io::Error::other(e)))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let config = Arc::new(config);
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key, (now, config.clone()));
    Ok(config)
}

/// `sslrootcert=system`: the operating system's bundle (`SSL_CERT_FILE` first).
fn system_bundle(path: &Path) -> PathBuf {
    if path != Path::new("system") {
        return path.to_path_buf();
    }
    if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
        return PathBuf::from(f);
    }
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"))
}

/// The operating system's CA certificates (`SSL_CERT_FILE` first), for HTTPS calls.
pub fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let path = system_bundle(Path::new("system"));
    let pem = std::fs::read(&path).map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA bundle {}: {e:?}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("CA bundle {}: no certificate", path.display()));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, ServerTlsError> {
    let err = |reason: String| ServerTlsError::Roots {
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(format!("{e:?}")))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(roots)
}

fn webpki(
    roots: Arc<RootCertStore>,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, ServerTlsError> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| ServerTlsError::Io(io::Error::other(e)))
}

/// verify-ca (and require with a CA): the chain must lead to the CA; the name may differ.
#[derive(Debug)]
struct IgnoreName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // The name is checked after the chain: this error means the chain was good.
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer and require without a CA (libpq: encryption, no authentication of the server).
/// The handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_walk_finds_the_signature_algorithm() {
        // SEQUENCE { SEQUENCE {} (tbs), SEQUENCE { OID sha384WithRSAEncryption }, BIT STRING }
        let oid = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(&oid);
        let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
        body.extend_from_slice(&alg);
        body.extend_from_slice(&[0x03, 0x01, 0x00]);
        let mut cert = vec![0x30, body.len() as u8];
        cert.extend_from_slice(&body);
        assert_eq!(signature_oid(&cert), Some(&oid[..]));
        assert_eq!(end_point_hash(&cert).len(), 48);
        // Anything unparsable falls back to SHA-256, never panics.
        assert_eq!(end_point_hash(&[0x30, 0x85, 0xff]).len(), 32);
        assert_eq!(end_point_hash(&[]).len(), 32);
        for n in 0..cert.len() {
            let _ = end_point_hash(&cert[..n]);
        }
    }
}
