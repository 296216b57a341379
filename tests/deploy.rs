//! The deployment files under `deploy/` (container recipe, Kubernetes manifests, Helm
//! chart, docker compose) checked offline, and against the pgmux binary they deploy.
//!
//! * `tests/deploy/validate.py` (run with `tests/drivers/.venv/bin/python`, which
//!   `tests/drivers/setup.sh` installs from the pinned `tests/drivers/requirements.txt`)
//!   builds the kustomize base and overlays, renders the Helm chart for several value
//!   sets (a renderer for the small template subset the chart uses: helm is not
//!   packaged by Debian), validates every object against the Kubernetes JSON schemas of
//!   the `kubernetes-validate` package (strict, Kubernetes 1.30 and the newest it
//!   ships), checks references, security and shutdown settings, compares the chart with
//!   the kustomize base, and prints what every pgmux container is configured with.
//! * Here, the binary has the last word on that configuration: `pgmux check-config`
//!   accepts each container's environment and mounted `pgmux.toml` (with a generated
//!   certificate where a TLS Secret is mounted) and listens on the ports the manifests
//!   declare; every probe and scrape path is one a running pgmux serves; every
//!   `PGMUX_*` variable named in deploy/ or the docs is one pgmux reads; every metric
//!   name they mention is one pgmux exports.
//! * The Dockerfile builds with the documented command and runs as non-root on a
//!   distroless image that ships every shared library the binary needs (`ldd`).
//!
//! Nothing here needs Docker, a cluster, helm, PostgreSQL or the network.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use support::{describe_output, run_with_timeout, Pgmux};

/// A DATABASE_URL nobody listens on: enough for check-config and for starting pgmux.
const CLOSED_DB: &str = "postgres://u:p@127.0.0.1:1/db";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn pgmux_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgmux")
}

// ---------------------------------------------------------------------------------------
// validate.py

/// Output of `tests/deploy/validate.py`: (exit status success, parsed stdout, stderr).
fn validation() -> &'static (bool, Value, String) {
    static OUT: OnceLock<(bool, Value, String)> = OnceLock::new();
    OUT.get_or_init(|| {
        let python = repo().join("tests/drivers/.venv/bin/python");
        let setup_hint = "Install it with `bash tests/drivers/setup.sh` (python3 with the venv \
             module; Debian: `apt-get install -y python3-venv`; `.ci/run` does this): it \
             installs the pinned packages of tests/drivers/requirements.txt, \
             kubernetes-validate among them, into tests/drivers/.venv.";
        assert!(
            python.exists(),
            "{} is missing: the deployment checks need the Python venv of the driver tests.\n{setup_hint}",
            python.display()
        );
        let out = run_with_timeout(
            Command::new(&python)
                .arg(repo().join("tests/deploy/validate.py"))
                .arg(repo()),
            Duration::from_secs(120),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() == Some(3) {
            panic!("{}\n{setup_hint}", stderr.trim());
        }
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "validate.py printed no JSON ({e})\n{}",
                describe_output(&out)
            )
        });
        (out.status.success(), json, stderr)
    })
}

/// The facts about every pgmux container (also when validate.py found problems: those
/// fail `manifests_and_chart_are_valid_kubernetes_objects`, and each test here reports
/// its own findings).
fn containers() -> &'static [Value] {
    validation().1["containers"]
        .as_array()
        .expect("containers array")
}

#[test]
fn manifests_and_chart_are_valid_kubernetes_objects() {
    let (ok, json, stderr) = validation();
    assert!(*ok, "deployment files failed validation:\n{stderr}");
    let objects = json["objects"].as_object().expect("objects");
    let kinds = |build: &str| -> BTreeSet<String> {
        objects[build]
            .as_array()
            .unwrap_or_else(|| panic!("no build {build}"))
            .iter()
            .map(|o| o.as_str().unwrap().to_string())
            .collect()
    };
    let base: BTreeSet<String> = [
        "ConfigMap/pgmux-config",
        "Secret/pgmux-db",
        "Deployment/pgmux",
        "Service/pgmux",
        "Service/pgmux-peers",
        "HorizontalPodAutoscaler/pgmux",
        "PodDisruptionBudget/pgmux",
        "ServiceMonitor/pgmux",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(kinds("kustomize:base"), base);
    assert_eq!(kinds("kustomize:overlays/deployment"), base);
    assert_eq!(
        kinds("helm:like-base"),
        base,
        "helm chart vs kustomize base"
    );
    assert!(kinds("kustomize:overlays/sidecar").contains("Deployment/example-app"));
    let versions = &json["schemas"]["versions"];
    assert!(
        versions.as_array().is_some_and(|v| v.len() >= 2),
        "schemas: {versions}"
    );
    eprintln!(
        "validated with kubernetes-validate {} against Kubernetes {}; kubectl kustomize: {}",
        json["schemas"]["kubernetes_validate"], versions, json["kubectl"]
    );
}

// ---------------------------------------------------------------------------------------
// Dockerfile

/// Dockerfile instructions `(INSTRUCTION, arguments)` per stage, continuation lines
/// joined and comments dropped.
fn dockerfile_stages() -> Vec<Vec<(String, String)>> {
    let text = read("deploy/Dockerfile");
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.starts_with('#') || t.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(t);
            logical.push(std::mem::take(&mut cur));
        }
    }
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for l in logical {
        let (ins, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let ins = ins.to_ascii_uppercase();
        if ins == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("Dockerfile starts with FROM")
            .push((ins, args.split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    stages
}

/// `ENV` of the runtime stage: what every container starts with.
fn image_env() -> BTreeMap<String, String> {
    let stages = dockerfile_stages();
    let mut env = BTreeMap::new();
    for (ins, args) in stages.last().unwrap() {
        if ins == "ENV" {
            for kv in args.split_whitespace() {
                let (k, v) = kv.split_once('=').expect("ENV key=value");
                env.insert(k.to_string(), v.to_string());
            }
        }
    }
    env
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

const BUILD_COMMAND: &str = "cargo build --release --locked --bin pgmux";

#[test]
fn container_recipe_builds_the_binary_and_runs_it_as_non_root() {
    let stages = dockerfile_stages();
    assert_eq!(stages.len(), 2, "builder + runtime stages");
    let has = |stage: &[(String, String)], ins: &str, pred: &dyn Fn(&str) -> bool| {
        stage.iter().any(|(i, a)| i == ins && pred(a))
    };
    let builder = &stages[0];
    assert!(has(builder, "FROM", &|a| a == "rust:1-bookworm AS builder"));
    assert!(has(builder, "RUN", &|a| a.contains("libclang-dev")));
    assert!(
        has(builder, "RUN", &|a| a.contains(BUILD_COMMAND)),
        "the builder must run `{BUILD_COMMAND}`"
    );
    let readme = read("README.md");
    assert!(
        readme.contains(BUILD_COMMAND),
        "README documents the container build command `{BUILD_COMMAND}`"
    );

    let runtime = &stages[1];
    assert!(has(runtime, "FROM", &|a| a
        == "gcr.io/distroless/cc-debian12:nonroot"));
    let user = runtime
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.clone())
        .expect("the runtime stage sets USER");
    assert!(
        user == "nonroot" || user == "65532" || user.starts_with("65532:"),
        "runtime USER {user} is not distroless' nonroot"
    );
    assert!(has(runtime, "COPY", &|a| a.starts_with("--from=builder ")
        && a.ends_with(" /pgmux")));
    let entry = runtime
        .iter()
        .rev()
        .find(|(i, _)| i == "ENTRYPOINT")
        .map(|(_, a)| a.clone())
        .expect("ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(&entry)
        .unwrap_or_else(|_| panic!("ENTRYPOINT {entry} must be exec form (PID 1 gets SIGTERM)"));
    assert_eq!(entry, ["/pgmux"]);
    let exposed: BTreeSet<u16> = runtime
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().map(|p| p.parse::<u16>().unwrap()))
        .collect();
    let env = image_env();
    let listen: BTreeSet<u16> = ["PGMUX_LISTEN", "PGMUX_ADMIN_LISTEN"]
        .iter()
        .map(|k| port_of(env.get(*k).unwrap_or_else(|| panic!("ENV {k}"))))
        .collect();
    assert_eq!(exposed, listen, "EXPOSE vs the listen addresses in ENV");

    // Every shared library of the binary exists in distroless/cc-debian12.
    let out = Command::new("ldd")
        .arg(pgmux_bin())
        .output()
        .expect("run ldd");
    assert!(out.status.success(), "ldd: {}", describe_output(&out));
    let shipped = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
    ];
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let lib = line.split_whitespace().next().unwrap();
        let name = lib.rsplit('/').next().unwrap();
        assert!(
            shipped.contains(&name) && !line.contains("not found"),
            "pgmux links {line:?}, which distroless/cc-debian12 does not ship"
        );
    }

    // The build context keeps what the workspace needs.
    for pattern in read(".dockerignore").lines().map(str::trim) {
        let p = pattern.trim_end_matches('/');
        if p.is_empty() || p.starts_with('#') {
            continue;
        }
        for needed in [
            "Cargo.toml",
            "Cargo.lock",
            "src",
            "config",
            "proxy",
            "admin",
        ] {
            assert_ne!(p, needed, ".dockerignore excludes {needed}");
        }
    }

    // Image tags and the chart's appVersion follow the crate version.
    let version = env!("CARGO_PKG_VERSION");
    let chart = read("deploy/helm/pgmux/Chart.yaml");
    assert!(
        chart.contains(&format!("appVersion: \"{version}\"")),
        "Chart.yaml appVersion is not {version}"
    );
    assert!(read("deploy/helm/pgmux/values.yaml").contains(&format!("tag: \"{version}\"")));
    for f in [
        "deploy/kubernetes/base/deployment.yaml",
        "deploy/kubernetes/overlays/sidecar/deployment.yaml",
    ] {
        assert!(
            read(f).contains(&format!("image: pgmux:{version}")),
            "{f}: image tag is not {version}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// check-config against every container's configuration

/// `pgmux check-config` with exactly `env` (no PGMUX_*/DATABASE_URL inherited).
fn check_config(env: &BTreeMap<String, String>) -> Output {
    let mut cmd = Command::new(pgmux_bin());
    cmd.arg("check-config");
    for (k, _) in std::env::vars() {
        if k.starts_with("PGMUX_") || k == "DATABASE_URL" || k == "READ_DATABASE_URL" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env);
    run_with_timeout(&mut cmd, Duration::from_secs(30))
}

/// `listen` and `[admin] listen` from check-config's output.
fn listen_addresses(stdout: &str) -> (String, String) {
    let mut section = String::new();
    let (mut listen, mut admin) = (None, None);
    for line in stdout.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t.to_string();
        } else if let Some(v) = t.strip_prefix("listen = ") {
            let v = v.trim_matches('"').to_string();
            match section.as_str() {
                "" => listen = Some(v),
                "[admin]" => admin = Some(v),
                _ => {}
            }
        }
    }
    (
        listen.expect("check-config prints listen"),
        admin.expect("check-config prints [admin] listen"),
    )
}

#[test]
fn pgmux_accepts_every_container_configuration() {
    for c in containers() {
        let source = c["source"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Mounted files (ConfigMaps) and TLS Secrets, relocated under a temp dir.
        let mut mounts: Vec<String> = Vec::new();
        for (path, text) in c["files"].as_object().unwrap() {
            let p = dir.path().join(path.trim_start_matches('/'));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, text.as_str().unwrap()).unwrap();
            mounts.push(Path::new(path).parent().unwrap().display().to_string());
        }
        for d in c["secret_dirs"].as_array().unwrap() {
            let d = d.as_str().unwrap();
            let p = dir.path().join(d.trim_start_matches('/'));
            fs::create_dir_all(&p).unwrap();
            let ck = rcgen::generate_simple_self_signed(vec!["pgmux.example".to_string()])
                .expect("generate a certificate");
            fs::write(p.join("tls.crt"), ck.cert.pem()).unwrap();
            fs::write(p.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
            mounts.push(d.to_string());
        }
        let mut env = image_env();
        for (k, v) in c["env"].as_object().unwrap() {
            let mut v = v.as_str().unwrap().to_string();
            for m in &mounts {
                if let Some(rest) = v.strip_prefix(&format!("{m}/")) {
                    v = dir
                        .path()
                        .join(m.trim_start_matches('/'))
                        .join(rest)
                        .display()
                        .to_string();
                }
            }
            env.insert(k.clone(), v);
        }
        let out = check_config(&env);
        assert!(
            out.status.success(),
            "{source}: pgmux check-config refuses the configuration\nenv: {env:?}\n{}",
            describe_output(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (listen, admin) = listen_addresses(&stdout);
        let ports = c["ports"].as_object().unwrap();
        let declared = |name: &str| {
            ports
                .get(name)
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("{source}: no {name} port"))
        };
        assert_eq!(
            u64::from(port_of(&listen)),
            declared("postgres"),
            "{source}: pgmux listens on {listen}"
        );
        assert_eq!(
            u64::from(port_of(&admin)),
            declared("admin"),
            "{source}: admin listens on {admin}"
        );
        assert!(
            !admin.starts_with("127.") && !admin.starts_with("[::1]"),
            "{source}: admin listener {admin} is loopback: probes and scrapes cannot reach it"
        );
        for h in c["http"].as_array().unwrap() {
            assert_eq!(
                h["port"].as_u64(),
                Some(u64::from(port_of(&admin))),
                "{}: not the admin port",
                h["what"]
            );
        }
        for key in c["config_keys"].as_array().unwrap() {
            let key = key.as_str().unwrap();
            assert!(
                stdout.lines().any(|l| l.starts_with(&format!("{key} = "))
                    || l == format!("[{key}]")
                    || l.starts_with(&format!("[{key}."))),
                "{source}: check-config does not show {key}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Environment variables

/// Files whose text names variables and metrics: everything under deploy/, the
/// operations guide and the README's Deployment section.
fn referencing_texts() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo().join("deploy"), &mut files);
    files.push(repo().join("docs/operations.md"));
    let mut texts: Vec<(String, String)> = files
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.strip_prefix(repo()).unwrap().display().to_string(), text)
        })
        .collect();
    let readme = read("README.md");
    let start = readme
        .find("\n## Deployment")
        .expect("README has a Deployment section");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    texts.push((
        "README.md#deployment".to_string(),
        section[..end].to_string(),
    ));
    texts
}

/// Words of `text` that start with `prefix` and continue with `[A-Za-z0-9_]`.
fn words_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find(prefix) {
        let start = i + off;
        let before_ok = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let mut end = start + prefix.len();
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok && end > start + prefix.len() {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[test]
fn every_pgmux_variable_named_is_one_pgmux_reads() {
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in referencing_texts() {
        for w in words_with_prefix(&text, "PGMUX_") {
            names.entry(w).or_default().insert(file.clone());
        }
    }
    for c in containers() {
        for k in c["env"].as_object().unwrap().keys() {
            if k.starts_with("PGMUX_") {
                names
                    .entry(k.clone())
                    .or_default()
                    .insert(c["source"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(names.contains_key("PGMUX_ADMIN_LISTEN"), "found {names:?}");
    let base: BTreeMap<String, String> = [("DATABASE_URL".to_string(), CLOSED_DB.to_string())]
        .into_iter()
        .collect();
    let sources: String = ["src", "config/src"]
        .iter()
        .flat_map(|d| fs::read_dir(repo().join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs") && !p.ends_with("tests.rs"))
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    for (name, files) in &names {
        // A nonsense value must make pgmux complain about this very variable...
        let mut env = base.clone();
        env.insert(name.clone(), "!not-valid!".to_string());
        let out = check_config(&env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && stderr.contains(&format!("environment variable {name}")) {
            continue;
        }
        // ...or, for variables any string is valid for (lists, the log filter), the
        // binary's sources must read it.
        assert!(
            sources.contains(&format!("(\"{name}\", \""))
                || sources.contains(&format!("from_env(\"{name}\")"))
                || sources.contains(&format!("env = \"{name}\"")),
            "{name} (in {files:?}) is not a variable pgmux reads\n{}",
            describe_output(&out)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Probe paths and metric names against a running pgmux

fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read the response");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: not HTTP: {buf:?}"));
    let body = buf.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, body)
}

#[test]
fn probed_paths_and_referenced_metrics_are_served() {
    let px = Pgmux::start(&[], &[("DATABASE_URL", CLOSED_DB)]);
    let admin_port = port_of(&px.admin_url());

    let mut paths: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in containers() {
        for h in c["http"].as_array().unwrap() {
            paths
                .entry(h["path"].as_str().unwrap().to_string())
                .or_default()
                .push(h["what"].as_str().unwrap().to_string());
        }
    }
    for want in ["/healthz", "/readyz", "/metrics"] {
        assert!(paths.contains_key(want), "no manifest uses {want}");
    }
    let mut metrics_text = String::new();
    for (path, users) in &paths {
        let (status, body) = http_get(admin_port, path);
        match path.as_str() {
            "/healthz" | "/metrics" => assert_eq!(status, 200, "GET {path}: {body}"),
            // The primary is unreachable: not ready, but served.
            "/readyz" => assert!(
                status == 503 && body.contains("\"ready\":false"),
                "GET /readyz: {status} {body}"
            ),
            _ => assert!(
                status != 404 && status != 405,
                "GET {path} (used by {users:?}): {status}"
            ),
        }
        if path == "/metrics" {
            metrics_text = body;
        }
    }

    // Metric names: what /metrics shows now, plus what admin/src/metrics.rs can export
    // (per-pool series appear after the first login).
    let exported: BTreeSet<String> = metrics_text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .chain(words_with_prefix(&read("admin/src/metrics.rs"), "pgmux_"))
        .collect();
    assert!(
        exported.contains("pgmux_clients_connected"),
        "{metrics_text}"
    );
    let mut referenced = 0;
    for (file, text) in referencing_texts() {
        for name in words_with_prefix(&text, "pgmux_") {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(*b)))
                .unwrap_or(&name);
            assert!(
                exported.contains(base),
                "{file} mentions metric {name}, which pgmux does not export"
            );
            referenced += 1;
        }
    }
    assert!(referenced >= 10, "the docs should explain the metrics");
    drop(px);
}
