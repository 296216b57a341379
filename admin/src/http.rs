//! The admin HTTP listener.
//!
//! * `/healthz` (process alive) and `/readyz` (accepting clients, primaries reachable)
//!   are for orchestrators' probes, which carry no credentials: always open.
//! * `/metrics` and the read-only `GET /api/v1/*` snapshots are open by default so a
//!   scraper or a dashboard needs no secret; `admin.protect_reads` puts them behind the
//!   token when the snapshots (client addresses, configuration) are sensitive.
//! * Every `PATCH`/`POST` changes the running proxy, so it needs
//!   `Authorization: Bearer <admin.token>`; without a configured token only loopback
//!   peers may use them (a local operator, never the network by accident).
//!
//! The rules are read from [`Control::auth`] on every request, so a reload that sets or
//! rotates the token applies at once. Errors are JSON `{"error": …, "field": …}` (field
//! only for validation errors) and bodies are parsed here, not by axum's `Json`, so a
//! bad request names the offending field.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, MockConnectInfo};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::{Control, ControlError, PoolPatch, Role};

#[derive(Clone)]
struct AppState {
    control: Arc<dyn Control>,
    metrics: Arc<Metrics>,
}

/// The admin API's routes, with access rules applied. Peers are taken from
/// `ConnectInfo<SocketAddr>` (or `MockConnectInfo` in tests); without either a peer
/// counts as non-loopback.
pub fn router(control: Arc<dyn Control>, metrics: Arc<Metrics>) -> Router {
    let state = AppState { control, metrics };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/pools", get(pools))
        .route("/api/v1/pools/{database}/{user}", patch(patch_pool))
        .route("/api/v1/clients", get(clients))
        .route("/api/v1/servers", get(servers))
        .route("/api/v1/databases", get(databases))
        .route("/api/v1/replicas", get(replicas))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/config", get(config).patch(patch_config))
        .route("/api/v1/pause", post(pause))
        .route("/api/v1/resume", post(resume))
        .route("/api/v1/reload", post(reload))
        .route("/api/v1/reconnect", post(reconnect))
        .route("/api/v1/kill", post(kill))
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .route_layer(middleware::from_fn_with_state(state.clone(), access))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not found") })
        .with_state(state)
}

/// Serves until `shutdown` is cancelled (graceful), with `ConnectInfo<SocketAddr>` so the
/// peer address is known.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Arc<dyn Control>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(control, metrics).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

// ---------------------------------------------------------------------------------------
// Errors

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            field: None,
        }
    }

    fn invalid(field: impl Into<String>, error: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: error.into(),
            field: Some(field.into()),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Invalid { field, message } => ApiError::invalid(field, message),
            ControlError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            ControlError::Failed(m) => ApiError::new(StatusCode::CONFLICT, m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.field {
            Some(field) => json!({ "error": self.error, "field": field }),
            None => json!({ "error": self.error }),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok() -> ApiResult {
    Ok(Json(json!({ "ok": true })).into_response())
}

// ---------------------------------------------------------------------------------------
// Access rules

async fn access(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(req).await;
    }
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let auth = state.control.auth();
    let peer = peer_addr(&req);
    let verdict = match (&auth.token, read) {
        (Some(token), false) => bearer_ok(req.headers(), token),
        (Some(token), true) if auth.protect_reads => bearer_ok(req.headers(), token),
        (_, true) => Ok(()),
        (None, false) if peer.is_some_and(|p| is_loopback(p.ip())) => Ok(()),
        (None, false) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "mutating the admin API from a non-loopback address needs a token: \
             set admin.token (or PGMUX_ADMIN_TOKEN)",
        )),
    };
    if let Err(e) = verdict {
        tracing::warn!(?peer, method = %req.method(), path, status = %e.status, "admin request refused");
        return e.into_response();
    }
    if !read {
        tracing::info!(?peer, method = %req.method(), uri = %req.uri(), "admin request");
    }
    next.run(req).await
}

fn peer_addr(req: &Request) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .or_else(|| ext.get::<MockConnectInfo<SocketAddr>>().map(|m| m.0))
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Checks `Authorization: Bearer <token>`. An empty presented token never matches.
fn bearer_ok(headers: &HeaderMap, token: &str) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty());
    match presented {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <admin.token>)",
        )),
        Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid token")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------
// Read-only endpoints

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(s): State<AppState>) -> Response {
    let r = s.control.ready().await;
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    let body = s.metrics.render(&*s.control);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn pools(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "pools": s.control.pools() }))
}

async fn clients(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "clients": s.control.clients() }))
}

async fn servers(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "servers": s.control.servers() }))
}

async fn databases(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "databases": s.control.databases() }))
}

async fn replicas(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "replicas": s.control.replicas() }))
}

async fn stats(State(s): State<AppState>) -> Json<crate::Totals> {
    Json(s.control.totals())
}

fn config_map(control: &dyn Control) -> (Map<String, Value>, Vec<crate::ConfigItem>) {
    let items = control.config();
    let map = items
        .iter()
        .map(|i| (i.key.clone(), Value::String(i.value.clone())))
        .collect();
    (map, items)
}

async fn config(State(s): State<AppState>) -> Json<Value> {
    let (map, items) = config_map(&*s.control);
    Json(json!({ "config": map, "items": items }))
}

// ---------------------------------------------------------------------------------------
// Mutating endpoints

/// Parses a request body as a JSON object.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid("body", "expected a JSON object")),
        Err(e) => Err(ApiError::invalid("body", format!("invalid JSON: {e}"))),
    }
}

/// Deserializes a [`PoolPatch`]; on failure, names the first key that fails on its own
/// (an unknown field or a wrong type), else "body".
fn parse_pool_patch(body: &[u8]) -> Result<PoolPatch, ApiError> {
    let obj = json_object(body)?;
    match serde_json::from_value::<PoolPatch>(Value::Object(obj.clone())) {
        Ok(p) if p == PoolPatch::default() => Err(ApiError::invalid("body", "nothing to change")),
        Ok(p) => Ok(p),
        Err(e) => {
            let field = obj
                .iter()
                .find(|(k, v)| {
                    let one = Map::from_iter([((*k).clone(), (*v).clone())]);
                    serde_json::from_value::<PoolPatch>(Value::Object(one)).is_err()
                })
                .map_or("body", |(k, _)| k.as_str());
            Err(ApiError::invalid(field, strip_position(&e.to_string())))
        }
    }
}

/// serde_json's messages end with " at line L column C", meaningless for a `Value`.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

async fn patch_pool(
    State(s): State<AppState>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let Path((database, user)) =
        path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let patch = parse_pool_patch(&body)?;
    s.control.set_pool_limits(&database, &user, &patch)?;
    let pool = s
        .control
        .pools()
        .into_iter()
        .find(|p| p.database == database && p.user == user && p.role == Role::Primary);
    Ok(Json(json!({ "ok": true, "pool": pool })).into_response())
}

async fn patch_config(
    State(s): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let obj = json_object(&body)?;
    if obj.is_empty() {
        return Err(ApiError::invalid("body", "nothing to change"));
    }
    let mut pairs = Vec::with_capacity(obj.len());
    for (key, value) in obj {
        let value = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(ApiError::invalid(
                    key,
                    "expected a string, number or boolean",
                ))
            }
        };
        pairs.push((key, value));
    }
    s.control.set_config(&pairs)?;
    let (map, _) = config_map(&*s.control);
    Ok(Json(json!({ "ok": true, "config": map })).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct OpQuery {
    database: Option<String>,
    timeout: Option<String>,
}

impl OpQuery {
    fn database(&self) -> Option<&str> {
        self.database.as_deref().filter(|d| !d.is_empty())
    }
}

type QueryResult = Result<Query<OpQuery>, axum::extract::rejection::QueryRejection>;

fn query(q: QueryResult) -> Result<OpQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::invalid("query", e.body_text()))
}

const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

async fn pause(State(s): State<AppState>, q: QueryResult) -> ApiResult {
    let q = query(q)?;
    let timeout = match q.timeout.as_deref() {
        None | Some("") => DEFAULT_PAUSE_TIMEOUT,
        Some(t) => parse_duration(t).ok_or_else(|| {
            ApiError::invalid(
                "timeout",
                format!("invalid duration {t:?} (e.g. 30s, 500ms, 2m)"),
            )
        })?,
    };
    s.control.pause(q.database(), timeout).await?;
    ok()
}

async fn resume(State(s): State<AppState>, q: QueryResult) -> ApiResult {
    s.control.resume(query(q)?.database())?;
    ok()
}

async fn reload(State(s): State<AppState>) -> ApiResult {
    s.control.reload()?;
    ok()
}

async fn reconnect(State(s): State<AppState>, q: QueryResult) -> ApiResult {
    s.control.reconnect(query(q)?.database())?;
    ok()
}

async fn kill(State(s): State<AppState>, q: QueryResult) -> ApiResult {
    let q = query(q)?;
    let db = q
        .database()
        .ok_or_else(|| ApiError::invalid("database", "kill needs ?database=NAME"))?;
    s.control.kill(db)?;
    ok()
}

/// Parses `30s`, `500ms`, `1m30s`, `1.5h` or plain (possibly fractional) seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let unit_end = rest[num_end..]
            .find(|c: char| c.is_ascii_digit() || c == '.' || c == ' ')
            .map_or(rest.len(), |i| num_end + i);
        let n: f64 = rest[..num_end].parse().ok()?;
        let scale = match &rest[num_end..unit_end] {
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            _ => return None,
        };
        total = total.checked_add(Duration::try_from_secs_f64(n * scale).ok()?)?;
        rest = rest[unit_end..].trim_start();
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use std::sync::Mutex;

    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[derive(Default)]
    struct Fake {
        auth: Mutex<AdminAuth>,
        not_ready: bool,
        error: Mutex<Option<ControlError>>,
        calls: Mutex<Vec<String>>,
        config: Mutex<Vec<ConfigItem>>,
    }

    impl Fake {
        fn new() -> Arc<Fake> {
            let f = Fake::default();
            *f.config.lock().unwrap() = vec![ConfigItem {
                key: "pool_size".into(),
                value: "20".into(),
                default: "20".into(),
                changeable: true,
            }];
            Arc::new(f)
        }
        fn with_auth(token: Option<&str>, protect_reads: bool) -> Arc<Fake> {
            let f = Fake::new();
            *f.auth.lock().unwrap() = AdminAuth {
                token: token.map(String::from),
                protect_reads,
            };
            f
        }
        fn call(&self, c: String) -> Result<(), ControlError> {
            self.calls.lock().unwrap().push(c);
            self.error.lock().unwrap().clone().map_or(Ok(()), Err)
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn pool(database: &str, role: Role, active: usize) -> PoolInfo {
        PoolInfo {
            database: database.into(),
            user: "u".into(),
            role,
            server: "db:5432".into(),
            pool_mode: "transaction",
            paused: false,
            limits: PoolLimits {
                pool_size: 20,
                min_pool_size: 0,
                max_client_conn: 100,
                query_wait_timeout_ms: 1000,
                server_idle_timeout_ms: 1000,
                max_prepared_statements: 100,
            },
            servers: ServerCounts {
                active,
                idle: 2,
                connecting: 0,
                pinned: 0,
            },
            clients: ClientCounts::default(),
            max_wait_us: 0,
            totals: PoolTotals::default(),
        }
    }

    impl Control for Fake {
        fn pools(&self) -> Vec<PoolInfo> {
            vec![pool("app", Role::Primary, 3), pool("app", Role::Replica, 1)]
        }
        fn clients(&self) -> Vec<ClientInfo> {
            vec![ClientInfo {
                id: 1,
                addr: "10.0.0.1:5000".into(),
                local_addr: "0.0.0.0:6432".into(),
                user: "u".into(),
                database: "app".into(),
                application_name: "psql".into(),
                state: "idle",
                connect_time: 0,
                age_ms: 5,
                wait_us: 0,
                server_id: None,
                server_pid: None,
                cancel_pid: 7,
                tls: false,
            }]
        }
        fn servers(&self) -> Vec<ServerInfo> {
            vec![]
        }
        fn databases(&self) -> Vec<DatabaseInfo> {
            vec![DatabaseInfo {
                name: "app".into(),
                host: "db".into(),
                port: 5432,
                dbname: "app".into(),
                replicas: vec!["r1:5432".into()],
                pool_size: 20,
                min_pool_size: 0,
                max_client_conn: 100,
                current_connections: 4,
                max_connections: 0,
                paused: false,
            }]
        }
        fn replicas(&self) -> Vec<ReplicaInfo> {
            vec![]
        }
        fn totals(&self) -> Totals {
            Totals {
                version: "0.1.0".into(),
                clients: 1,
                ..Totals::default()
            }
        }
        fn config(&self) -> Vec<ConfigItem> {
            self.config.lock().unwrap().clone()
        }
        fn set_pool_limits(&self, db: &str, user: &str, p: &PoolPatch) -> Result<(), ControlError> {
            self.call(format!("set_pool_limits {db} {user} {p:?}"))
        }
        fn set_config(&self, changes: &[(String, String)]) -> Result<(), ControlError> {
            self.call(format!("set_config {changes:?}"))?;
            let mut cfg = self.config.lock().unwrap();
            for (k, v) in changes {
                if let Some(i) = cfg.iter_mut().find(|i| &i.key == k) {
                    i.value = v.clone();
                }
            }
            Ok(())
        }
        fn pause(&self, db: Option<&str>, t: Duration) -> BoxFuture<'_, Result<(), ControlError>> {
            let r = self.call(format!("pause {db:?} {t:?}"));
            Box::pin(async move { r })
        }
        fn resume(&self, db: Option<&str>) -> Result<(), ControlError> {
            self.call(format!("resume {db:?}"))
        }
        fn reload(&self) -> Result<(), ControlError> {
            self.call("reload".into())
        }
        fn reconnect(&self, db: Option<&str>) -> Result<(), ControlError> {
            self.call(format!("reconnect {db:?}"))
        }
        fn kill(&self, db: &str) -> Result<(), ControlError> {
            self.call(format!("kill {db}"))
        }
        fn ready(&self) -> BoxFuture<'_, Readiness> {
            let r = if self.not_ready {
                Readiness {
                    ready: false,
                    reasons: vec!["draining".into()],
                }
            } else {
                Readiness {
                    ready: true,
                    reasons: vec![],
                }
            };
            Box::pin(async move { r })
        }
        fn version(&self) -> String {
            "0.1.0".into()
        }
        fn auth(&self) -> AdminAuth {
            self.auth.lock().unwrap().clone()
        }
    }

    const LOCAL: [u8; 4] = [127, 0, 0, 1];
    const REMOTE: [u8; 4] = [10, 1, 2, 3];

    struct Resp {
        status: StatusCode,
        headers: HeaderMap,
        text: String,
    }

    impl Resp {
        fn json(&self) -> Value {
            serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
        }
    }

    async fn send_with(
        fake: &Arc<Fake>,
        metrics: Arc<Metrics>,
        peer: [u8; 4],
        req: axum::http::request::Builder,
        body: &str,
    ) -> Resp {
        let app =
            router(fake.clone(), metrics).layer(MockConnectInfo(SocketAddr::from((peer, 40000))));
        let resp = app
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Resp {
            status,
            headers,
            text: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    async fn send(fake: &Arc<Fake>, peer: [u8; 4], method: &str, uri: &str, body: &str) -> Resp {
        let req = axum::http::Request::builder().method(method).uri(uri);
        send_with(fake, Arc::new(Metrics::new()), peer, req, body).await
    }

    #[tokio::test]
    async fn get_shapes() {
        let f = Fake::new();
        let r = send(&f, REMOTE, "GET", "/healthz", "").await;
        assert_eq!(
            (r.status, r.json()),
            (StatusCode::OK, json!({"status": "ok"}))
        );
        let r = send(&f, REMOTE, "GET", "/readyz", "").await;
        assert_eq!(
            (r.status, r.json()),
            (StatusCode::OK, json!({"ready": true, "reasons": []}))
        );

        let v = send(&f, REMOTE, "GET", "/api/v1/pools", "").await.json();
        assert_eq!(v["pools"].as_array().unwrap().len(), 2);
        assert_eq!(v["pools"][0]["role"], "primary");
        assert_eq!(v["pools"][0]["servers"]["active"], 3);
        assert_eq!(v["pools"][1]["limits"]["pool_size"], 20);
        let v = send(&f, REMOTE, "GET", "/api/v1/clients", "").await.json();
        assert_eq!(v["clients"][0]["addr"], "10.0.0.1:5000");
        let v = send(&f, REMOTE, "GET", "/api/v1/servers", "").await.json();
        assert_eq!(v, json!({"servers": []}));
        let v = send(&f, REMOTE, "GET", "/api/v1/databases", "")
            .await
            .json();
        assert_eq!(v["databases"][0]["replicas"], json!(["r1:5432"]));
        let v = send(&f, REMOTE, "GET", "/api/v1/replicas", "").await.json();
        assert_eq!(v, json!({"replicas": []}));
        let v = send(&f, REMOTE, "GET", "/api/v1/stats", "").await.json();
        assert_eq!(
            (v["version"].clone(), v["clients"].clone()),
            (json!("0.1.0"), json!(1))
        );
        assert!(v["routing"].is_array());
        let v = send(&f, REMOTE, "GET", "/api/v1/config", "").await.json();
        assert_eq!(v["config"], json!({"pool_size": "20"}));
        assert_eq!(v["items"][0]["changeable"], true);
        assert!(f.calls().is_empty());
    }

    #[tokio::test]
    async fn unknown_path_and_method() {
        let f = Fake::new();
        let r = send(&f, LOCAL, "GET", "/nope", "").await;
        assert_eq!(
            (r.status, r.json()),
            (StatusCode::NOT_FOUND, json!({"error": "not found"}))
        );
        let r = send(&f, LOCAL, "DELETE", "/api/v1/pools", "").await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers[header::ALLOW], "GET,HEAD");
        assert!(r.json()["error"].is_string());
    }

    #[tokio::test]
    async fn patch_pool_ok() {
        let f = Fake::new();
        let r = send(
            &f,
            LOCAL,
            "PATCH",
            "/api/v1/pools/app/u",
            r#"{"pool_size": 5}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let v = r.json();
        assert_eq!(v["ok"], true);
        assert_eq!(v["pool"]["role"], "primary");
        assert_eq!(v["pool"]["database"], "app");
        assert_eq!(
            f.calls(),
            vec!["set_pool_limits app u PoolPatch { pool_size: Some(5), min_pool_size: None }"]
        );
        let r = send(
            &f,
            LOCAL,
            "PATCH",
            "/api/v1/pools/other/u",
            r#"{"min_pool_size": 1}"#,
        )
        .await;
        assert_eq!(r.json(), json!({"ok": true, "pool": null}));
    }

    #[tokio::test]
    async fn patch_pool_bad_bodies() {
        let f = Fake::new();
        for (body, field) in [
            (r#"{"foo": 1}"#, "foo"),
            (r#"{"pool_size": 3, "foo": 1}"#, "foo"),
            (r#"{"pool_size": "x"}"#, "pool_size"),
            (r#"{"min_pool_size": -1}"#, "min_pool_size"),
            (r#"{"pool_size": 3"#, "body"),
            ("", "body"),
            ("[1]", "body"),
            ("{}", "body"),
            (r#"{"pool_size": null}"#, "body"),
        ] {
            let r = send(&f, LOCAL, "PATCH", "/api/v1/pools/app/u", body).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
            let v = r.json();
            assert_eq!(v["field"], field, "{body}: {v}");
            if field != "body" {
                // Positions are noise once the body parsed as JSON.
                assert!(!v["error"].as_str().unwrap().contains(" at line "), "{v}");
            }
        }
        assert!(f.calls().is_empty());
    }

    #[tokio::test]
    async fn control_error_mapping() {
        let f = Fake::new();
        for (err, status, body) in [
            (
                ControlError::invalid("pool_size", "too big"),
                StatusCode::BAD_REQUEST,
                json!({"error": "too big", "field": "pool_size"}),
            ),
            (
                ControlError::NotFound("no pool app/u".into()),
                StatusCode::NOT_FOUND,
                json!({"error": "no pool app/u"}),
            ),
            (
                ControlError::Failed("pause timed out".into()),
                StatusCode::CONFLICT,
                json!({"error": "pause timed out"}),
            ),
        ] {
            *f.error.lock().unwrap() = Some(err);
            let r = send(
                &f,
                LOCAL,
                "PATCH",
                "/api/v1/pools/app/u",
                r#"{"pool_size": 5}"#,
            )
            .await;
            assert_eq!((r.status, r.json()), (status, body.clone()));
            let r = send(&f, LOCAL, "POST", "/api/v1/pause", "").await;
            assert_eq!((r.status, r.json()), (status, body));
        }
    }

    #[tokio::test]
    async fn patch_config() {
        let f = Fake::new();
        let r = send(
            &f,
            LOCAL,
            "PATCH",
            "/api/v1/config",
            r#"{"pool_size": 30, "log_connections": true, "query_wait_timeout": "5s", "x": 1.5}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json(), json!({"ok": true, "config": {"pool_size": "30"}}));
        let call = f.calls().remove(0);
        for pair in [
            r#"("pool_size", "30")"#,
            r#"("log_connections", "true")"#,
            r#"("query_wait_timeout", "5s")"#,
            r#"("x", "1.5")"#,
        ] {
            assert!(call.contains(pair), "{call}");
        }
        for (body, field) in [
            ("{}", "body"),
            (r#"{"a": {"b": 1}}"#, "a"),
            (r#"{"a": 1, "b": [1]}"#, "b"),
            (r#"{"a": null}"#, "a"),
            ("nope", "body"),
        ] {
            let r = send(&f, LOCAL, "PATCH", "/api/v1/config", body).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(r.json()["field"], field, "{body}");
        }
        assert_eq!(f.calls().len(), 1);
    }

    #[tokio::test]
    async fn operations() {
        let f = Fake::new();
        for (uri, call) in [
            ("/api/v1/pause", "pause None 30s"),
            (
                "/api/v1/pause?database=app&timeout=500ms",
                "pause Some(\"app\") 500ms",
            ),
            ("/api/v1/pause?timeout=2", "pause None 2s"),
            ("/api/v1/pause?timeout=1m30s", "pause None 90s"),
            ("/api/v1/resume", "resume None"),
            ("/api/v1/resume?database=app", "resume Some(\"app\")"),
            ("/api/v1/reload", "reload"),
            ("/api/v1/reconnect?database=app", "reconnect Some(\"app\")"),
            ("/api/v1/kill?database=app", "kill app"),
        ] {
            let r = send(&f, LOCAL, "POST", uri, "").await;
            assert_eq!(
                (r.status, r.json()),
                (StatusCode::OK, json!({"ok": true})),
                "{uri}"
            );
            assert_eq!(f.calls().last().map(String::as_str), Some(call));
        }
        let n = f.calls().len();
        for (uri, field) in [
            ("/api/v1/kill", "database"),
            ("/api/v1/kill?database=", "database"),
            ("/api/v1/pause?timeout=soon", "timeout"),
            ("/api/v1/pause?timeout=-1", "timeout"),
            ("/api/v1/pause?timeout=5x", "timeout"),
        ] {
            let r = send(&f, LOCAL, "POST", uri, "").await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}");
            assert_eq!(r.json()["field"], field, "{uri}");
        }
        assert_eq!(f.calls().len(), n);
    }

    #[tokio::test]
    async fn token_rules() {
        let f = Fake::with_auth(Some("s3cret"), false);
        let post = |auth: Option<&'static str>| {
            let mut b = axum::http::Request::builder()
                .method("POST")
                .uri("/api/v1/reload");
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b
        };
        for auth in [
            None,
            Some("Bearer wrong!"),
            Some("Bearer s3cre"),
            Some("Basic s3cret"),
            Some("Bearer "),
        ] {
            // The token is required even from loopback.
            let r = send_with(&f, Arc::new(Metrics::new()), LOCAL, post(auth), "").await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}");
            assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
            assert!(r.json()["error"].is_string());
        }
        assert!(f.calls().is_empty());
        let r = send_with(
            &f,
            Arc::new(Metrics::new()),
            REMOTE,
            post(Some("Bearer s3cret")),
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(f.calls(), vec!["reload"]);
        // Reads stay open without protect_reads.
        assert_eq!(
            send(&f, REMOTE, "GET", "/api/v1/pools", "").await.status,
            StatusCode::OK
        );
        assert_eq!(
            send(&f, REMOTE, "GET", "/metrics", "").await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn no_token_loopback_only() {
        let f = Fake::new();
        let r = send(&f, REMOTE, "POST", "/api/v1/reload", "").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.json()["error"].as_str().unwrap().contains("admin.token"));
        let r = send(
            &f,
            REMOTE,
            "PATCH",
            "/api/v1/pools/app/u",
            r#"{"pool_size": 1}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(f.calls().is_empty());
        assert_eq!(
            send(&f, REMOTE, "GET", "/api/v1/stats", "").await.status,
            StatusCode::OK
        );
        assert_eq!(
            send(&f, LOCAL, "POST", "/api/v1/reload", "").await.status,
            StatusCode::OK
        );

        assert!(is_loopback("::1".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.2".parse().unwrap()));
        assert!(is_loopback("127.9.9.9".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!is_loopback("10.1.2.3".parse().unwrap()));
    }

    #[tokio::test]
    async fn protect_reads() {
        let f = Fake::with_auth(Some("t"), true);
        for uri in ["/api/v1/pools", "/api/v1/config", "/metrics"] {
            let r = send(&f, LOCAL, "GET", uri, "").await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{uri}");
            assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
            let req = axum::http::Request::builder()
                .uri(uri)
                .header("Authorization", "bearer t");
            let r = send_with(&f, Arc::new(Metrics::new()), REMOTE, req, "").await;
            assert_eq!(r.status, StatusCode::OK, "{uri}");
        }
        assert_eq!(
            send(&f, REMOTE, "GET", "/healthz", "").await.status,
            StatusCode::OK
        );
        assert_eq!(
            send(&f, REMOTE, "GET", "/readyz", "").await.status,
            StatusCode::OK
        );
        // protect_reads without a token: nothing to check against, reads open.
        let f = Fake::with_auth(None, true);
        assert_eq!(
            send(&f, REMOTE, "GET", "/api/v1/pools", "").await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn readyz_not_ready() {
        let f = Arc::new(Fake {
            not_ready: true,
            ..Fake::default()
        });
        let r = send(&f, LOCAL, "GET", "/readyz", "").await;
        assert_eq!(
            (r.status, r.json()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "reasons": ["draining"]})
            )
        );
    }

    #[tokio::test]
    async fn metrics_scrape() {
        use prometheus_parse::{Scrape, Value as PV};
        let f = Fake::new();
        let metrics = Arc::new(Metrics::new());
        let h = metrics.pool_histograms("app", "u", Role::Primary);
        h.query.record(std::time::Duration::from_millis(2));
        h.query.record(std::time::Duration::from_millis(300));
        let req = axum::http::Request::builder().uri("/metrics");
        let r = send_with(&f, metrics, REMOTE, req, "").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.headers[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let scrape = Scrape::parse(r.text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let active = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "pgmux_pool_servers"
                    && s.labels.get("role") == Some("primary")
                    && s.labels.get("state") == Some("active")
            })
            .unwrap_or_else(|| panic!("{}", r.text));
        assert!(matches!(active.value, PV::Gauge(v) if v == 3.0));
        let hist = scrape
            .samples
            .iter()
            .find(|s| s.metric == "pgmux_query_duration_seconds")
            .unwrap_or_else(|| panic!("{}", r.text));
        match &hist.value {
            PV::Histogram(buckets) => {
                assert_eq!(buckets.len(), crate::metrics::BUCKETS.len() + 1);
                let le_5ms = buckets.iter().find(|b| b.less_than == 0.005).unwrap();
                assert_eq!(le_5ms.count, 1.0);
                assert_eq!(buckets.last().unwrap().count, 2.0);
            }
            other => panic!("not a histogram: {other:?}"),
        }
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration(s);
        assert_eq!(d("30s"), Some(Duration::from_secs(30)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(d("2m 5s"), Some(Duration::from_secs(125)));
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "s", "-1", "1x", "NaN", "inf", "1e400", "..s", "5 s"] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn serve_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            Fake::new(),
            Arc::new(Metrics::new()),
            shutdown.clone(),
        ));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        conn.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.ends_with(r#"{"status":"ok"}"#), "{resp}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve stops when cancelled")
            .unwrap()
            .unwrap();
    }
}
