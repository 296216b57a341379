//! RDS IAM authentication (`server_auth = "rds_iam"`): the password of every server
//! login is a short-lived token, a SigV4-presigned `connect` URL for the `rds-db`
//! service, byte-for-byte what botocore's `generate_db_auth_token` produces.
//!
//! * [`generate_token`] — pure: credentials + endpoint + user + region + clock → token.
//!   Matches botocore (checked by a test against the real botocore in the driver venv):
//!   URL query in botocore's order (`Action`, `DBUser`, the `X-Amz-*` auth parameters,
//!   `X-Amz-Security-Token` last, then `X-Amz-Signature`), the canonical query sorted,
//!   every value percent-encoded except `A-Za-z0-9-_.~`, the signed `host` header
//!   lowercased and without the port when it is 443, no scheme in the result.
//! * [`load_credentials`] — the credential chain: environment variables, then the
//!   ECS/EKS container credentials endpoint (plain HTTP). Web identity (IRSA) needs an
//!   HTTPS call to STS, which pgmux cannot make yet (no TLS client): it is reported as
//!   an error instead of silently skipped.
//! * [`TokenSource`] — the cache the pools use: one token per (region, host, port,
//!   user), regenerated when 10 minutes old (tokens are valid for 15), credentials
//!   re-fetched when their `Expiration` is less than 15 minutes away.
//!
//! Tokens and secret keys are kept in [`Secret`]s: they never reach logs or `Debug`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use pgmux_config::Secret;
use sha2::{Digest, Sha256};

/// Tokens are valid for this long (botocore's `expires_in=900`).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// A cached token older than this is replaced.
pub const TOKEN_REFRESH_AFTER: Duration = Duration::from_secs(600);
/// Credentials whose expiration is closer than this are re-fetched (a token must not
/// outlive the credentials that signed it).
pub const CREDENTIALS_REFRESH_BEFORE: Duration = Duration::from_secs(900);
/// The ECS/EKS credentials endpoint gets this long to answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` is relative to this.
const ECS_HOST: &str = "http://169.254.170.2";

/// AWS credentials. `Debug` shows the access key id only.
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    /// When temporary credentials stop working (container credentials); None: never.
    pub expiration: Option<SystemTime>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// Why no token could be made.
#[derive(Debug, thiserror::Error)]
pub enum RdsIamError {
    #[error("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where AWS_CONTAINER_CREDENTIALS_FULL_URI / AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN is set)")]
    NoCredentials,
    #[error("web identity (STS AssumeRoleWithWebIdentity at {url}): {msg}")]
    WebIdentity { url: String, msg: String },
    #[error("AWS credentials: {0}")]
    Invalid(String),
    #[error("container credentials endpoint {url}: {msg}")]
    Container { url: String, msg: String },
    #[error(
        "no AWS region for RDS IAM authentication: set aws_region (PGMUX_AWS_REGION) or AWS_REGION"
    )]
    NoRegion,
}

// --- signing ----------------------------------------------------------------------

/// SigV4 URI encoding: everything but `A-Za-z0-9-_.~` as `%XX` (upper-case hex) of the
/// UTF-8 bytes (botocore's `percent_encode` with `safe='-._~'`).
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// `yyyymmddThhmmssZ` (UTC) of `t`; times before 1970 are taken as 1970.
fn amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The RDS IAM token for `user` at `host:port` in `region`, signed at `now`: what
/// botocore's `RDSClient.generate_db_auth_token(host, port, user, region)` returns with
/// the same credentials and clock (`host:port/?Action=connect&DBUser=...&X-Amz-Signature=...`).
pub fn generate_token(
    host: &str,
    port: u16,
    user: &str,
    region: &str,
    creds: &AwsCredentials,
    now: SystemTime,
) -> String {
    const SERVICE: &str = "rds-db";
    let date_time = amz_date(now);
    let date = &date_time[..8];
    let scope = format!("{date}/{region}/{SERVICE}/aws4_request");
    let credential = format!("{}/{scope}", creds.access_key_id);
    let expires = TOKEN_LIFETIME.as_secs().to_string();

    // botocore's order in the URL: operation parameters, then the auth parameters with
    // the security token appended last.
    let mut params: Vec<(&str, &str)> = vec![
        ("Action", "connect"),
        ("DBUser", user),
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Credential", &credential),
        ("X-Amz-Date", &date_time),
        ("X-Amz-Expires", &expires),
        ("X-Amz-SignedHeaders", "host"),
    ];
    if let Some(t) = &creds.session_token {
        params.push(("X-Amz-Security-Token", t.expose()));
    }
    let encoded: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    let join = |pairs: &[(String, String)]| {
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    };
    let query = join(&encoded);
    let mut sorted = encoded;
    sorted.sort();
    let canonical_query = join(&sorted);

    // The signed host header: lower case, port left out when it is https's default.
    let host_header = if port == 443 {
        host.to_ascii_lowercase()
    } else {
        format!("{}:{port}", host.to_ascii_lowercase())
    };
    let empty_payload = hex(&Sha256::digest(b""));
    let canonical_request =
        format!("GET\n/\n{canonical_query}\nhost:{host_header}\n\nhost\n{empty_payload}");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let k_secret = format!("AWS4{}", creds.secret_access_key.expose());
    let k_date = hmac_sha256(k_secret.as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, SERVICE.as_bytes());
    let k_signing = hmac_sha256(&k_service, b"aws4_request");
    let signature = hex(&hmac_sha256(&k_signing, string_to_sign.as_bytes()));
    format!("{host}:{port}/?{query}&X-Amz-Signature={signature}")
}

// --- credentials --------------------------------------------------------------------

/// Looks up an environment variable (a closure so tests need not touch the process env).
pub type EnvLookup = dyn Fn(&str) -> Option<String> + Send + Sync;

/// The process environment, empty values treated as unset.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The region to sign for: `configured` (`aws_region`), else `AWS_REGION`, else
/// `AWS_DEFAULT_REGION`.
pub fn resolve_region(configured: Option<&str>, env: &EnvLookup) -> Option<String> {
    configured
        .map(str::to_owned)
        .filter(|r| !r.trim().is_empty())
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
}

/// The credential chain (blocking: may make one HTTP request):
/// 1. `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`);
/// 2. container credentials: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` (on
///    `http://169.254.170.2`) or `AWS_CONTAINER_CREDENTIALS_FULL_URI`, with the
///    `Authorization` header from `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` or
///    `AWS_CONTAINER_AUTHORIZATION_TOKEN`;
/// 3. web identity (EKS IRSA): `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`
///    (+ `AWS_ROLE_SESSION_NAME`), exchanged at STS `AssumeRoleWithWebIdentity` over
///    HTTPS (see [`web_identity_credentials`]).
pub fn load_credentials(env: &EnvLookup) -> Result<AwsCredentials, RdsIamError> {
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => {
            return Ok(AwsCredentials {
                access_key_id: id,
                secret_access_key: Secret::new(secret),
                session_token: env("AWS_SESSION_TOKEN").map(Secret::new),
                expiration: None,
            })
        }
        (Some(_), None) => {
            return Err(RdsIamError::Invalid(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(RdsIamError::Invalid(
                "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into(),
            ))
        }
        (None, None) => {}
    }
    if let Some(url) = container_url(env)? {
        return container_credentials(&url, container_auth(env)?.as_ref());
    }
    if let Some(token_file) = env("AWS_WEB_IDENTITY_TOKEN_FILE") {
        return web_identity_credentials(env, &token_file);
    }
    Err(RdsIamError::NoCredentials)
}

/// The container credentials URL, if the environment names one. The relative URI wins
/// (as in the AWS SDKs); a full URI must be plain HTTP to a loopback address or one of
/// the ECS/EKS agent addresses.
fn container_url(env: &EnvLookup) -> Result<Option<String>, RdsIamError> {
    if let Some(rel) = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        let sep = if rel.starts_with('/') { "" } else { "/" };
        return Ok(Some(format!("{ECS_HOST}{sep}{rel}")));
    }
    let Some(full) = env("AWS_CONTAINER_CREDENTIALS_FULL_URI") else {
        return Ok(None);
    };
    let bad = |msg: &str| RdsIamError::Container {
        url: full.clone(),
        msg: msg.into(),
    };
    let Some(rest) = full.strip_prefix("http://") else {
        return Err(bad(if full.starts_with("https://") {
            "https endpoints need TLS support (issue 8, not yet built)"
        } else {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI must be an http:// URL"
        }));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    let allowed = host == "localhost"
        || host == "169.254.170.2"
        || host == "169.254.170.23"
        || host.eq_ignore_ascii_case("fd00:ec2::23")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !allowed {
        return Err(bad(
            "host must be a loopback address, 169.254.170.2, 169.254.170.23 or fd00:ec2::23",
        ));
    }
    Ok(Some(full))
}

/// The `Authorization` header value for the container endpoint: the token file wins.
fn container_auth(env: &EnvLookup) -> Result<Option<Secret>, RdsIamError> {
    if let Some(path) = env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
        let t = std::fs::read_to_string(&path).map_err(|e| {
            RdsIamError::Invalid(format!(
                "cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {path}: {e}"
            ))
        })?;
        return Ok(Some(Secret::new(t.trim())));
    }
    Ok(env("AWS_CONTAINER_AUTHORIZATION_TOKEN").map(Secret::new))
}

/// GET the container credentials endpoint and parse
/// `{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}`.
pub fn container_credentials(
    url: &str,
    authorization: Option<&Secret>,
) -> Result<AwsCredentials, RdsIamError> {
    let err = |msg: String| RdsIamError::Container {
        url: url.to_owned(),
        msg,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(HTTP_TIMEOUT))
        .build()
        .into();
    let mut req = agent.get(url).header("Accept", "application/json");
    if let Some(a) = authorization {
        req = req.header("Authorization", a.expose());
    }
    let mut resp = req.call().map_err(|e| err(e.to_string()))?;
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| err(e.to_string()))?;
    parse_container_response(&body).map_err(err)
}

/// The STS endpoint: `AWS_ENDPOINT_URL_STS`, else `AWS_ENDPOINT_URL`, else the regional
/// one (`AWS_REGION` / `AWS_DEFAULT_REGION`), else the global one.
fn sts_endpoint(env: &EnvLookup) -> String {
    if let Some(u) = env("AWS_ENDPOINT_URL_STS").or_else(|| env("AWS_ENDPOINT_URL")) {
        return u;
    }
    match resolve_region(None, env) {
        Some(r) => format!("https://sts.{r}.amazonaws.com/"),
        None => "https://sts.amazonaws.com/".to_owned(),
    }
}

/// `AssumeRoleWithWebIdentity` (an unsigned STS call: the token is the proof) with the
/// token read from `token_file` now (Kubernetes rotates it), over HTTPS verified against
/// the system CA bundle (`SSL_CERT_FILE` first).
pub fn web_identity_credentials(
    env: &EnvLookup,
    token_file: &str,
) -> Result<AwsCredentials, RdsIamError> {
    let url = sts_endpoint(env);
    let err = |msg: String| RdsIamError::WebIdentity {
        url: url.clone(),
        msg,
    };
    let role = env("AWS_ROLE_ARN")
        .ok_or_else(|| err("AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not".into()))?;
    let token = std::fs::read_to_string(token_file).map_err(|e| {
        err(format!(
            "cannot read AWS_WEB_IDENTITY_TOKEN_FILE {token_file}: {e}"
        ))
    })?;
    let session = env("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        format!("pgmux-{}", t.as_secs())
    });
    let roots = crate::tls::system_roots().map_err(err)?;
    let roots: Vec<ureq::tls::Certificate<'static>> = roots
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .unversioned_rustls_crypto_provider(crate::tls::crypto_provider())
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(HTTP_TIMEOUT))
        .tls_config(tls)
        .http_status_as_error(false)
        .build()
        .into();
    let form = format!(
        "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}&WebIdentityToken={}",
        uri_encode(&role),
        uri_encode(&session),
        uri_encode(token.trim())
    );
    let mut resp = agent
        .post(&url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Accept", "application/xml")
        .send(form.as_bytes())
        .map_err(|e| err(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| err(e.to_string()))?;
    if !status.is_success() {
        // STS errors are <Error><Code>…</Code><Message>…</Message></Error>; no secrets.
        let code = xml_text(&body, "Code").unwrap_or_default();
        let message = xml_text(&body, "Message").unwrap_or_default();
        return Err(err(format!("HTTP {}: {code} {message}", status.as_u16())));
    }
    parse_sts_response(&body).map_err(err)
}

/// The text of the first `<tag>…</tag>`, with XML's five entities decoded.
fn xml_text(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let end = start + body[start..].find(&close)?;
    Some(
        body[start..end]
            .trim()
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

fn parse_sts_response(body: &str) -> Result<AwsCredentials, String> {
    let creds = body
        .find("<Credentials>")
        .map(|i| &body[i..])
        .ok_or("response has no Credentials")?;
    credentials_from(
        |t| xml_text(creds, t).filter(|v| !v.is_empty()),
        "SessionToken",
    )
}

fn parse_container_response(body: &str) -> Result<AwsCredentials, String> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("response is not JSON: {e}"))?;
    credentials_from(
        |k| {
            v.get(k)
                .and_then(|x| x.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        },
        "Token",
    )
}

/// Credentials from a response's fields (STS and the container endpoint name them alike,
/// but for the session token's).
fn credentials_from(
    field: impl Fn(&str) -> Option<String>,
    token_field: &str,
) -> Result<AwsCredentials, String> {
    let (Some(id), Some(secret)) = (field("AccessKeyId"), field("SecretAccessKey")) else {
        return Err("response lacks AccessKeyId or SecretAccessKey".into());
    };
    let expiration = match field("Expiration") {
        Some(e) => Some(
            humantime::parse_rfc3339_weak(e.trim_end_matches('Z'))
                .map_err(|x| format!("bad Expiration {e:?}: {x}"))?,
        ),
        None => None,
    };
    Ok(AwsCredentials {
        access_key_id: id,
        secret_access_key: Secret::new(secret),
        session_token: field(token_field).map(Secret::new),
        expiration,
    })
}

// --- cache --------------------------------------------------------------------------

struct CachedToken {
    token: Secret,
    /// Replace the token after this (10 minutes, or earlier if the credentials expire).
    fresh_until: SystemTime,
}

/// Tokens for the pools, cached per (region, host, port, user).
pub struct TokenSource {
    env: Box<EnvLookup>,
    credentials: Mutex<Option<AwsCredentials>>,
    tokens: Mutex<HashMap<(String, String, u16, String), CachedToken>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSource { .. }")
    }
}

impl Default for TokenSource {
    fn default() -> Self {
        Self::new(Box::new(process_env))
    }
}

impl TokenSource {
    /// A source reading credentials through `env`.
    pub fn new(env: Box<EnvLookup>) -> Self {
        TokenSource {
            env,
            credentials: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The region to sign for (see [`resolve_region`]).
    pub fn region(&self, configured: Option<&str>) -> Option<String> {
        resolve_region(configured, &*self.env)
    }

    /// A token for `user` at `host:port`: the cached one while fresh, else a new one.
    /// Blocking (may fetch credentials over HTTP): call from a blocking context, or use
    /// [`TokenSource::token`].
    pub fn token_blocking(
        &self,
        region: &str,
        host: &str,
        port: u16,
        user: &str,
        now: SystemTime,
    ) -> Result<Secret, RdsIamError> {
        let key = (region.to_owned(), host.to_owned(), port, user.to_owned());
        if let Some(t) = lock(&self.tokens).get(&key) {
            if now < t.fresh_until {
                return Ok(t.token.clone());
            }
        }
        let creds = self.credentials(now)?;
        let token = Secret::new(generate_token(host, port, user, region, &creds, now));
        let mut fresh_until = now + TOKEN_REFRESH_AFTER;
        if let Some(exp) = creds.expiration {
            fresh_until = fresh_until.min(exp.checked_sub(TOKEN_LIFETIME).unwrap_or(now));
        }
        lock(&self.tokens).insert(
            key,
            CachedToken {
                token: token.clone(),
                fresh_until,
            },
        );
        Ok(token)
    }

    /// [`TokenSource::token_blocking`] on tokio's blocking pool.
    pub async fn token(
        self: &std::sync::Arc<Self>,
        region: &str,
        host: &str,
        port: u16,
        user: &str,
    ) -> Result<Secret, RdsIamError> {
        let (me, region, host, user) = (
            self.clone(),
            region.to_owned(),
            host.to_owned(),
            user.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            me.token_blocking(&region, &host, port, &user, SystemTime::now())
        })
        .await
        .map_err(|e| RdsIamError::Invalid(format!("token task failed: {e}")))?
    }

    /// Cached credentials, re-fetched when they expire within
    /// [`CREDENTIALS_REFRESH_BEFORE`]. A failed re-fetch keeps using credentials that
    /// are still valid for a token's lifetime.
    fn credentials(&self, now: SystemTime) -> Result<AwsCredentials, RdsIamError> {
        let cached = lock(&self.credentials).clone();
        let needs_refresh = |c: &AwsCredentials| {
            c.expiration
                .is_some_and(|e| e <= now + CREDENTIALS_REFRESH_BEFORE)
        };
        match cached {
            Some(c) if !needs_refresh(&c) => Ok(c),
            old => match load_credentials(&*self.env) {
                Ok(c) => {
                    *lock(&self.credentials) = Some(c.clone());
                    Ok(c)
                }
                Err(e) => match old {
                    Some(c) if c.expiration.is_some_and(|x| x > now + TOKEN_LIFETIME) => {
                        tracing::warn!(error = %e, "refreshing AWS credentials failed; using the current ones until they expire");
                        Ok(c)
                    }
                    _ => Err(e),
                },
            },
        }
    }
}

/// What a pool needs to log in with tokens: the shared [`TokenSource`] and the
/// configured region (`aws_region`; None: `AWS_REGION` / `AWS_DEFAULT_REGION`).
#[derive(Clone, Debug)]
pub struct RdsIamAuth {
    pub tokens: std::sync::Arc<TokenSource>,
    pub region: Option<String>,
}

impl RdsIamAuth {
    /// The password for `user` at `addr`: a (cached) token.
    pub async fn password(
        &self,
        addr: &pgmux_config::ServerAddr,
        user: &str,
    ) -> Result<Secret, RdsIamError> {
        let region = self
            .tokens
            .region(self.region.as_deref())
            .ok_or(RdsIamError::NoRegion)?;
        self.tokens
            .token(&region, &addr.host, addr.port, user)
            .await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::path::Path;
    use std::process::Command;

    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const HOST: &str = "mydb.123456789012.us-east-1.rds.amazonaws.com";

    fn creds(token: Option<&str>) -> AwsCredentials {
        AwsCredentials {
            access_key_id: AKID.into(),
            secret_access_key: Secret::new(SECRET),
            session_token: token.map(Secret::new),
            expiration: None,
        }
    }

    fn env_of(pairs: &[(&str, &str)]) -> Box<EnvLookup> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Box::new(move |k| map.get(k).cloned())
    }

    #[test]
    fn dates() {
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_440_938_160); // 2015-08-30T12:36:00Z
        assert_eq!(amz_date(t), "20150830T123600Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_825_599); // 2000-02-29T11:59:59Z
        assert_eq!(amz_date(leap), "20000229T115959Z");
    }

    #[test]
    fn token_shape_and_secrets_stay_out_of_debug() {
        let t = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let c = creds(Some("tok/en+="));
        let tok = generate_token(HOST, 5432, "app user+1@x", "us-east-1", &c, t);
        assert!(tok.starts_with(&format!("{HOST}:5432/?Action=connect&DBUser=app%20user%2B1%40x&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Security-Token=tok%2Fen%2B%3D&X-Amz-Signature=")), "{tok}");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(SECRET) && !dbg.contains("tok/en"), "{dbg}");
    }

    /// The python interpreter of tests/drivers/.venv (created by tests/drivers/setup.sh,
    /// which `.ci/run` runs before the tests).
    fn venv_python() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/drivers/.venv/bin/python")
    }

    /// Byte-for-byte against botocore's `generate_db_auth_token`, clock pinned.
    #[test]
    fn matches_botocore() {
        let py = venv_python();
        assert!(
            py.exists(),
            "{} is missing: run `bash tests/drivers/setup.sh` (it installs botocore from \
             tests/drivers/requirements.txt; `.ci/run` does this) — this test compares \
             pgmux's RDS IAM tokens with botocore's and must not be skipped",
            py.display()
        );
        let script = r#"
import datetime, json, sys
import botocore.auth, botocore.session
req = json.load(sys.stdin)
fixed = datetime.datetime(2015, 8, 30, 12, 36, 0)
botocore.auth.get_current_datetime = lambda *a, **k: fixed
out = []
for case in req:
    s = botocore.session.Session()
    s.set_credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", case["token"])
    c = s.create_client("rds", region_name="us-east-1")
    out.append(c.generate_db_auth_token(case["host"], case["port"], case["user"], case["region"]))
print(json.dumps(out))
"#;
        let t = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let mut cases = Vec::new();
        for token in [None, Some("FQoGZXIvYXdzEXAMPLE/+token==")] {
            for user in ["app", "app user+1@x", "ünï/cødé"] {
                for (host, port, region) in [
                    (HOST, 5432, "us-east-1"),
                    (
                        "MyDB.cluster-xyz.eu-west-1.rds.amazonaws.com",
                        443,
                        "eu-west-1",
                    ),
                ] {
                    cases.push((host, port, user, region, token));
                }
            }
        }
        let input = serde_json::Value::Array(
            cases
                .iter()
                .map(|(h, p, u, r, t)| {
                    serde_json::json!({"host": h, "port": p, "user": u, "region": r, "token": t})
                })
                .collect(),
        );
        let mut child = Command::new(&py)
            .arg("-c")
            .arg(script)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the venv python");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "botocore script failed (is botocore in tests/drivers/requirements.txt installed? \
             run `bash tests/drivers/setup.sh`): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(expected.len(), cases.len());
        for ((host, port, user, region, token), want) in cases.iter().zip(&expected) {
            let got = generate_token(host, *port, user, region, &creds(*token), t);
            assert_eq!(
                &got, want,
                "host {host} port {port} user {user:?} token {token:?}"
            );
        }
    }

    /// One HTTP request answered with `body`; returns the request head it received.
    fn one_shot_server(body: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                head.push_str(&line);
            }
            let mut s = s;
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let _ = s.flush();
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            head
        });
        (format!("http://{addr}"), h)
    }

    #[test]
    fn container_credentials_with_token_file() {
        let (base, server) = one_shot_server(
            r#"{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"s3cr3t","Token":"sess","Expiration":"2030-01-02T03:04:05Z"}"#,
        );
        let dir = std::env::temp_dir().join(format!("pgmux-rds-iam-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok_file = dir.join("token");
        std::fs::write(&tok_file, "Bearer abc123\n").unwrap();
        let env = env_of(&[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                &format!("{base}/v2/creds"),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                tok_file.to_str().unwrap(),
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "ignored-when-file-set"),
        ]);
        let c = load_credentials(&*env).unwrap();
        let head = server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(head.starts_with("GET /v2/creds HTTP/1.1\r\n"), "{head}");
        assert!(
            head.lines()
                .any(|l| l.eq_ignore_ascii_case("authorization: Bearer abc123")),
            "{head}"
        );
        assert_eq!(c.access_key_id, "ASIAEXAMPLE");
        assert_eq!(c.secret_access_key.expose(), "s3cr3t");
        assert_eq!(c.session_token.as_ref().map(Secret::expose), Some("sess"));
        assert_eq!(
            c.expiration,
            Some(UNIX_EPOCH + Duration::from_secs(1_893_553_445))
        );
    }

    #[test]
    fn container_credentials_with_token_env() {
        let (base, server) =
            one_shot_server(r#"{"AccessKeyId":"A","SecretAccessKey":"B","Token":"C"}"#);
        let env = env_of(&[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &base),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "xyz"),
        ]);
        let c = load_credentials(&*env).unwrap();
        let head = server.join().unwrap();
        assert!(
            head.lines()
                .any(|l| l.eq_ignore_ascii_case("authorization: xyz")),
            "{head}"
        );
        assert_eq!(c.access_key_id, "A");
        assert_eq!(c.expiration, None);
    }

    #[test]
    fn chain_order_and_errors() {
        // Environment keys win over container credentials (no request is made).
        let env = env_of(&[
            ("AWS_ACCESS_KEY_ID", "K"),
            ("AWS_SECRET_ACCESS_KEY", "S"),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/"),
        ]);
        let c = load_credentials(&*env).unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.session_token.is_none()),
            ("K", true)
        );
        let e = load_credentials(&*env_of(&[("AWS_ACCESS_KEY_ID", "K")])).unwrap_err();
        assert!(e.to_string().contains("AWS_SECRET_ACCESS_KEY"), "{e}");
        let e = load_credentials(&*env_of(&[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/nonexistent/token"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/x"),
            ("AWS_REGION", "eu-west-1"),
        ]))
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("cannot read AWS_WEB_IDENTITY_TOKEN_FILE"),
            "{text}"
        );
        assert!(
            text.contains("https://sts.eu-west-1.amazonaws.com/"),
            "{text}"
        );
        let e = load_credentials(&*env_of(&[("AWS_WEB_IDENTITY_TOKEN_FILE", "/t")])).unwrap_err();
        assert!(e.to_string().contains("AWS_ROLE_ARN"), "{e}");
        let e = load_credentials(&*env_of(&[(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://10.0.0.1/creds",
        )]))
        .unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        assert!(matches!(
            load_credentials(&*env_of(&[])),
            Err(RdsIamError::NoCredentials)
        ));
        let env = env_of(&[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/x")]);
        assert_eq!(
            container_url(&*env).unwrap().as_deref(),
            Some("http://169.254.170.2/v2/x")
        );
        // Region: configured, then AWS_REGION, then AWS_DEFAULT_REGION.
        let env = env_of(&[
            ("AWS_REGION", "eu-west-1"),
            ("AWS_DEFAULT_REGION", "us-east-2"),
        ]);
        assert_eq!(
            resolve_region(Some("ap-south-1"), &*env).unwrap(),
            "ap-south-1"
        );
        assert_eq!(resolve_region(None, &*env).unwrap(), "eu-west-1");
        let env = env_of(&[("AWS_DEFAULT_REGION", "us-east-2")]);
        assert_eq!(resolve_region(None, &*env).unwrap(), "us-east-2");
        assert_eq!(resolve_region(None, &*env_of(&[])), None);
    }

    #[test]
    fn token_cache_refreshes_after_ten_minutes() {
        let src = TokenSource::new(env_of(&[
            ("AWS_ACCESS_KEY_ID", AKID),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
        ]));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let a = src
            .token_blocking("us-east-1", HOST, 5432, "app", t0)
            .unwrap();
        let b = src
            .token_blocking(
                "us-east-1",
                HOST,
                5432,
                "app",
                t0 + Duration::from_secs(599),
            )
            .unwrap();
        assert_eq!(a.expose(), b.expose(), "reused within 10 minutes");
        let other = src
            .token_blocking("us-east-1", HOST, 5432, "other", t0)
            .unwrap();
        assert_ne!(a.expose(), other.expose(), "one token per user");
        let c = src
            .token_blocking(
                "us-east-1",
                HOST,
                5432,
                "app",
                t0 + Duration::from_secs(600),
            )
            .unwrap();
        assert_ne!(a.expose(), c.expose(), "regenerated at 10 minutes");
        assert!(c.expose().contains("X-Amz-Date=20150830T124600Z"));
        assert_eq!(format!("{src:?}"), "TokenSource { .. }");
    }

    #[test]
    fn expiring_credentials_are_refetched() {
        // Credentials that expire 20 minutes after t0: at t0 + 6 min they are within
        // 15 minutes of expiring and are fetched again (here: the same env, new object).
        let t0 = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let src = TokenSource::new(env_of(&[
            ("AWS_ACCESS_KEY_ID", AKID),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
        ]));
        *lock(&src.credentials) = Some(AwsCredentials {
            access_key_id: "OLD".into(),
            secret_access_key: Secret::new("x"),
            session_token: None,
            expiration: Some(t0 + Duration::from_secs(1200)),
        });
        let a = src
            .token_blocking("us-east-1", HOST, 5432, "app", t0)
            .unwrap();
        assert!(
            a.expose().contains("Credential=OLD%2F"),
            "still valid at t0"
        );
        // The token was marked stale at expiration - 15 min = t0 + 5 min.
        let b = src
            .token_blocking(
                "us-east-1",
                HOST,
                5432,
                "app",
                t0 + Duration::from_secs(360),
            )
            .unwrap();
        assert!(
            b.expose().contains("Credential=AKIDEXAMPLE%2F"),
            "refreshed"
        );
    }
}
