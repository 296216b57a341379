//! TLS support for the integration tests: throwaway certificate authorities and
//! certificates (rcgen) written as PEM files, PostgreSQL with `ssl = on`, and rustls
//! client configurations for tokio-postgres (`tokio-postgres-rustls`).
//!
//! Used by tests/tls.rs through `#[path = "support/tls.rs"] mod tls_support;` (so the
//! other test binaries do not compile rcgen and rustls code they never call). It only
//! uses public items of `support`; to share it, declare it with `pub mod tls;` in
//! tests/support/mod.rs and replace `crate::support::` with `super::`.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion};

use crate::support::{pg_tool, quote_literal, PgNode};

static SERIAL: AtomicU64 = AtomicU64::new(1);

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A certificate authority that can issue server certificates.
pub struct Ca {
    pub name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate with its private key, PEM-encoded.
pub struct Issued {
    /// The certificate (one PEM block).
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM ("PRIVATE KEY").
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    /// A new self-signed CA (ECDSA P-256) with common name `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "pgmux tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(next_serial());
        let key = KeyPair::generate().expect("generate CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        Ca {
            name: name.to_string(),
            issuer,
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A server certificate for `sans` (DNS names or IP addresses), signed by this CA.
    pub fn issue(&self, common_name: &str, sans: &[&str]) -> Issued {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(next_serial());
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params.signed_by(&key, &*self.issuer).expect("sign leaf");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for `sans` whose key is `key_pkcs8_pem` (e.g. an RSA key made
    /// by openssl; ring cannot generate RSA keys). `Issued::key_pem` is that PEM.
    pub fn issue_for_key(&self, common_name: &str, sans: &[&str], key_pkcs8_pem: &str) -> Issued {
        let key = KeyPair::from_pem(key_pkcs8_pem).expect("parse PKCS#8 key");
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(next_serial());
        let cert = params.signed_by(&key, &*self.issuer).expect("sign leaf");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key_pkcs8_pem.to_string(),
            der: cert.der().clone(),
        }
    }

    /// A rustls root store holding only this CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der()).expect("add CA to root store");
        roots
    }
}

fn next_serial() -> rcgen::SerialNumber {
    // Distinct serials per process and run (time-based high part).
    let n = SERIAL.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let mut bytes = vec![0x01];
    bytes.extend_from_slice(&t.to_be_bytes());
    bytes.extend_from_slice(&n.to_be_bytes());
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The certificates of one test, written as PEM files into a temp dir:
///
/// | file | what |
/// | --- | --- |
/// | `ca.crt` | the good CA |
/// | `other-ca.crt` | an unrelated CA (for "wrong CA" checks) |
/// | `pgmux.crt` / `pgmux.key` | pgmux's certificate: `localhost`, `127.0.0.1`, good CA |
/// | `pgmux-other.crt` / `pgmux-other.key` | the same names, signed by the other CA |
/// | `pg.crt` / `pg.key` | PostgreSQL's: `localhost`, `127.0.0.1`, good CA |
/// | `wronghost.crt` / `wronghost.key` | only `wronghost.example`, good CA |
pub struct TestCerts {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub other_ca: Ca,
    pub pgmux: Issued,
    pub pgmux_other: Issued,
    pub pg: Issued,
    pub wronghost: Issued,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        let dir = tempfile::Builder::new()
            .prefix("pgmux-tls-")
            .tempdir()
            .expect("temp dir for certificates");
        let ca = Ca::new("pgmux test CA");
        let other_ca = Ca::new("pgmux unrelated test CA");
        let names = ["localhost", "127.0.0.1"];
        let certs = TestCerts {
            pgmux: ca.issue("pgmux", &names),
            pgmux_other: other_ca.issue("pgmux", &names),
            pg: ca.issue("postgres", &names),
            wronghost: ca.issue("wronghost.example", &["wronghost.example"]),
            ca,
            other_ca,
            dir,
        };
        write_file(&certs.path("ca.crt"), &certs.ca.cert_pem());
        write_file(&certs.path("other-ca.crt"), &certs.other_ca.cert_pem());
        for (name, issued) in [
            ("pgmux", &certs.pgmux),
            ("pgmux-other", &certs.pgmux_other),
            ("pg", &certs.pg),
            ("wronghost", &certs.wronghost),
        ] {
            write_file(&certs.path(&format!("{name}.crt")), &issued.cert_pem);
            write_file(&certs.path(&format!("{name}.key")), &issued.key_pem);
        }
        certs
    }

    /// A file in the certificate dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The same, as &str-friendly String (for env vars, URLs and TOML).
    pub fn file(&self, name: &str) -> String {
        self.path(name)
            .to_str()
            .expect("utf-8 temp path")
            .to_string()
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        TestCerts::new()
    }
}

/// Runs `openssl ARGS` with `input` on stdin; its stdout (panics on failure). For key
/// formats rcgen does not write: `pkey -traditional` turns a PKCS#8 key into SEC1 ("EC
/// PRIVATE KEY") or PKCS#1 ("RSA PRIVATE KEY").
pub fn openssl(args: &[&str], input: &str) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl");
    child
        .stdin
        .take()
        .expect("openssl stdin")
        .write_all(input.as_bytes())
        .expect("write to openssl");
    let out = child.wait_with_output().expect("wait for openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("openssl output is text")
}

/// A new 2048-bit RSA key, PKCS#8 PEM (openssl genpkey).
pub fn rsa_key_pkcs8() -> String {
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        "",
    )
}

/// `pem` (PKCS#8) in its algorithm's traditional format: SEC1 or PKCS#1.
pub fn traditional_key(pem: &str) -> String {
    openssl(&["pkey", "-traditional"], pem)
}

pub fn write_file(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn running_as_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// PostgreSQL with ssl = on
// ---------------------------------------------------------------------------

/// Turns SSL on in a running PostgreSQL node with `cert` as its server certificate.
///
/// The certificate and key are written into the data directory (PostgreSQL insists on
/// a key file owned by the server's OS user with mode 0600: when we are root, the files
/// are given to `postgres`, the user tests/support/mod.rs runs the server binaries
/// as). Then `ALTER SYSTEM SET ssl…`, `pg_reload_conf()`, and a wait until a TCP
/// connection with `sslmode=require` really is encrypted. Call once per node.
pub fn enable_pg_ssl(node: &PgNode, cert: &Issued) {
    let crt = node.data_dir.join("pgmux-test-server.crt");
    let key = node.data_dir.join("pgmux-test-server.key");
    write_file(&crt, &cert.cert_pem);
    write_file(&key, &cert.key_pem);
    set_mode(&crt, 0o644);
    set_mode(&key, 0o600);
    if running_as_root() {
        let status = Command::new("chown")
            .arg("postgres:")
            .arg(&crt)
            .arg(&key)
            .status()
            .expect("spawn chown");
        assert!(status.success(), "chown postgres {crt:?} {key:?}: {status}");
    }
    node.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET ssl_cert_file = {};\n\
             ALTER SYSTEM SET ssl_key_file = {};\n\
             ALTER SYSTEM SET ssl = on;\n\
             SELECT pg_reload_conf();",
            quote_literal(crt.to_str().expect("utf-8 path")),
            quote_literal(key.to_str().expect("utf-8 path")),
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let shown = node.try_psql("postgres", "SHOW ssl;");
        let over_tls = pg_ssl_probe(node);
        if shown.as_deref() == Ok("on") && over_tls.as_deref() == Ok("t") {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "PostgreSQL on port {} did not turn SSL on: SHOW ssl = {shown:?}, \
                 sslmode=require probe = {over_tls:?}\n--- server log ---\n{}",
                node.port,
                node.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()` over TCP with
/// sslmode=require, as the superuser (trusted on 127.0.0.1).
fn pg_ssl_probe(node: &PgNode) -> Result<String, String> {
    let out = pg_tool("psql")
        .args(["-X", "-A", "-t", "-w", "-c"])
        .arg("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require connect_timeout=5",
            node.port
        ))
        .env_remove("PGSSLROOTCERT")
        .output()
        .map_err(|e| format!("spawn psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

// ---------------------------------------------------------------------------
// rustls client configurations and tokio-postgres over TLS
// ---------------------------------------------------------------------------

/// The ring provider (the one pgmux uses; the only one compiled in).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.2 and 1.3.
pub const ALL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
/// TLS 1.2 only.
pub const TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
/// TLS 1.3 only.
pub const TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A client configuration that verifies the server's certificate chain against `ca`
/// and its name against the host connected to (libpq's verify-full).
pub fn verifying_config(
    ca: &Ca,
    versions: &[&'static SupportedProtocolVersion],
) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(ca.root_store())
        .with_no_client_auth()
}

/// A client configuration that accepts any certificate (libpq's sslmode=require:
/// encrypted, not authenticated); handshake signatures are still checked.
pub fn accept_any_config(versions: &[&'static SupportedProtocolVersion]) -> rustls::ClientConfig {
    let provider = provider();
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth()
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects with tokio-postgres over `tls` (a key=value or URL connection string that
/// usually sets `sslmode=require`), spawns the connection task on the current runtime.
pub async fn connect_tls(
    conninfo: &str,
    tls: rustls::ClientConfig,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
    let (client, connection) = tokio_postgres::connect(conninfo, connector).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A tokio-postgres error as one line: `SQLSTATE: message` for a server error, else the
/// error with its causes (e.g. "error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer").
pub fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
