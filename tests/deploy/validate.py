#!/usr/bin/env python3
"""Offline checks of pgmux's deployment files, run by tests/deploy.rs.

Builds every Kubernetes object set that deploy/ defines, without a cluster or network:

* the kustomize base and both overlays (deploy/kubernetes), resolved here (resources
  only: the kustomization files are kept that simple on purpose). When `kubectl` is on
  PATH, its `kubectl kustomize` output is compared with this resolver's;
* the Helm chart (deploy/helm/pgmux), rendered here for several value sets by a small
  renderer of the subset of Go templates the chart uses (helm is not packaged by
  Debian, so the suite cannot depend on it). Anything outside that subset is an error,
  so the chart cannot drift into syntax this renderer would get wrong;
* deploy/compose/docker-compose.yml and its prometheus.yml.

Then it checks:

* every built-in object against the Kubernetes OpenAPI JSON schemas shipped by the
  `kubernetes-validate` package (strict: unknown fields are errors), for the oldest
  supported Kubernetes version (1.30, for lifecycle.preStop.sleep) and the newest the
  package knows; the ServiceMonitor custom resource for its required fields;
* references inside each build: selectors match pod labels, Service target ports and
  probe ports name container ports, ConfigMaps and Secrets exist, the HPA and PDB point
  at the Deployment, the ServiceMonitor selects a Service with its port;
* the security and shutdown settings: non-root, read-only root fs, no capabilities,
  terminationGracePeriodSeconds > preStop sleep + shutdown_timeout;
* that the Helm chart (release "pgmux") produces the kustomize base's objects: same
  kinds and names, probes, ports, environment variable names, pgmux.toml keys.

It prints one JSON document on stdout with what the Rust test checks against the real
binary (environment, configuration files, probe paths and ports of every pgmux
container), and exits 1 with the list of problems on stderr if any check failed.
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.parse

try:
    import yaml
    import kubernetes_validate
    from kubernetes_validate import utils as kv_utils
except ImportError as e:  # pragma: no cover - reported by tests/deploy.rs
    print(
        f"validate.py: missing Python package ({e}); run tests/drivers/setup.sh, which "
        "installs tests/drivers/requirements.txt into tests/drivers/.venv",
        file=sys.stderr,
    )
    sys.exit(3)

MIN_K8S = "1.30"
PGMUX_IMAGE_DIRS = ("/etc/pgmux",)

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


# ---------------------------------------------------------------------------------------
# YAML


def load_docs(text, where):
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SystemExit(f"validate.py: {where}: invalid YAML: {e}")


def obj_key(o):
    return (o.get("kind"), o.get("metadata", {}).get("name"))


# ---------------------------------------------------------------------------------------
# kustomize (resources only)

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources"}


def kustomize(path):
    kfile = os.path.join(path, "kustomization.yaml")
    with open(kfile) as f:
        k = yaml.safe_load(f)
    extra = set(k) - KUSTOMIZATION_KEYS
    if extra:
        raise SystemExit(
            f"validate.py: {kfile}: unsupported kustomization keys {sorted(extra)} "
            "(this resolver handles `resources` only; extend it along with the files)"
        )
    if k.get("kind") != "Kustomization":
        problem(kfile, "kind is not Kustomization")
    objs = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(path, r))
        if os.path.isdir(p):
            objs.extend(kustomize(p))
        elif os.path.isfile(p):
            with open(p) as f:
                objs.extend(load_docs(f.read(), p))
        else:
            problem(kfile, f"resource {r} does not exist")
    seen = set()
    for o in objs:
        if obj_key(o) in seen:
            problem(kfile, f"duplicate object {obj_key(o)}")
        seen.add(obj_key(o))
    return objs


def kubectl_kustomize(path):
    exe = shutil.which("kubectl")
    if not exe:
        return None
    out = subprocess.run(
        [exe, "kustomize", path], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        problem(path, f"kubectl kustomize failed: {out.stderr.strip()}")
        return []
    return load_docs(out.stdout, f"kubectl kustomize {path}")


# ---------------------------------------------------------------------------------------
# A renderer for the subset of Go templates the Helm chart uses:
#   {{ .Values.a.b }}  {{ .Release.Name }}  {{ .Chart.Version }}
#   {{ if X }} / {{ if not X }} / {{ else }} / {{ end }}
#   pipelines: | quote, | toYaml, | nindent N, | indent N
# with {{- and -}} whitespace trimming.

ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)


class TemplateError(Exception):
    pass


def tokenize(text):
    out = []
    pos = 0
    for m in ACTION.finditer(text):
        out.append(["text", text[pos : m.start()]])
        if m.group(1) and out[-1][0] == "text":
            out[-1][1] = out[-1][1].rstrip(" \t\r\n")
        out.append(["action", m.group(2).strip(), bool(m.group(3))])
        pos = m.end()
    out.append(["text", text[pos:]])
    # right trims strip the following text's leading whitespace
    for i, t in enumerate(out):
        if t[0] == "action" and t[2] and i + 1 < len(out):
            out[i + 1][1] = out[i + 1][1].lstrip(" \t\r\n")
    return out


def parse(tokens):
    root = []
    stack = [("root", root, None)]
    for t in tokens:
        if t[0] == "text":
            stack[-1][1].append(("text", t[1]))
            continue
        expr = t[1]
        if expr.startswith("/*"):
            continue
        word = expr.split(None, 1)[0] if expr else ""
        if word == "if":
            node = {"cond": expr[2:].strip(), "then": [], "else": []}
            stack[-1][1].append(("if", node))
            stack.append(("if", node["then"], node))
        elif word == "else":
            if expr != "else" or stack[-1][0] != "if":
                raise TemplateError(f"unsupported or misplaced {{{{ {expr} }}}}")
            _, _, node = stack.pop()
            stack.append(("else", node["else"], node))
        elif word == "end":
            if len(stack) == 1:
                raise TemplateError("{{ end }} without {{ if }}")
            stack.pop()
        elif word in ("range", "with", "define", "template", "include", "block", "tpl"):
            raise TemplateError(f"{{{{ {word} }}}} is outside the supported subset")
        else:
            stack[-1][1].append(("expr", expr))
    if len(stack) != 1:
        raise TemplateError("{{ if }} without {{ end }}")
    return root


def split_pipeline(expr):
    parts, cur, quoted = [], "", False
    for ch in expr:
        if ch == '"':
            quoted = not quoted
        if ch == "|" and not quoted:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def lookup(ctx, field):
    if not field.startswith("."):
        raise TemplateError(f"unsupported operand {field!r}")
    v = ctx
    for part in field[1:].split("."):
        if not isinstance(v, dict) or part not in v:
            raise TemplateError(f"{field}: no such value (add it to values.yaml)")
        v = v[part]
    return v


def truthy(v):
    return not (v is None or v is False or v == 0 or v == "" or v == [] or v == {})


def go_str(v):
    if v is None:
        raise TemplateError("a null value would print as <no value>")
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if abs(v) >= 1e6:
            raise TemplateError(
                f"{v}: helm prints numbers >= 1e6 in scientific notation; quote it"
            )
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)
    if isinstance(v, str):
        return v
    raise TemplateError(f"cannot print {type(v).__name__} {v!r} without toYaml")


def to_yaml(v):
    if v in ({}, []):
        return "{}" if v == {} else "[]"
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


def indent(n, s):
    pad = " " * n
    return pad + s.replace("\n", "\n" + pad)


def eval_expr(expr, ctx):
    cmds = split_pipeline(expr)
    first = cmds[0].split()
    if len(first) == 1 and first[0].startswith('"'):
        v = json.loads(first[0])
    elif len(first) == 1:
        v = lookup(ctx, first[0])
    elif len(first) == 2 and first[0] == "not":
        v = not truthy(lookup(ctx, first[1]))
    else:
        raise TemplateError(f"unsupported expression {cmds[0]!r}")
    for c in cmds[1:]:
        words = c.split()
        if words == ["quote"]:
            v = json.dumps(go_str(v), ensure_ascii=False)
        elif words == ["toYaml"]:
            v = to_yaml(v)
        elif len(words) == 2 and words[0] in ("nindent", "indent") and words[1].isdigit():
            s = indent(int(words[1]), go_str(v))
            v = "\n" + s if words[0] == "nindent" else s
        else:
            raise TemplateError(f"unsupported pipeline command {c!r}")
    return v


def render_nodes(nodes, ctx, out):
    for kind, n in nodes:
        if kind == "text":
            out.append(n)
        elif kind == "expr":
            out.append(go_str(eval_expr(n, ctx)))
        else:
            branch = n["then"] if truthy(eval_expr(n["cond"], ctx)) else n["else"]
            render_nodes(branch, ctx, out)


def render_template(text, ctx):
    out = []
    render_nodes(parse(tokenize(text)), ctx, out)
    return "".join(out)


def deep_merge(base, over):
    r = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(r.get(k), dict):
            r[k] = deep_merge(r[k], v)
        else:
            r[k] = copy.deepcopy(v)
    return r


def helm_render(chart, release, namespace, overrides):
    with open(os.path.join(chart, "Chart.yaml")) as f:
        meta = yaml.safe_load(f)
    with open(os.path.join(chart, "values.yaml")) as f:
        values = yaml.safe_load(f)
    ctx = {
        "Values": deep_merge(values, overrides),
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {
            "Name": meta["name"],
            "Version": meta["version"],
            "AppVersion": meta["appVersion"],
        },
    }
    tdir = os.path.join(chart, "templates")
    objs, notes = [], None
    for name in sorted(os.listdir(tdir)):
        path = os.path.join(tdir, name)
        with open(path) as f:
            text = f.read()
        try:
            rendered = render_template(text, ctx)
        except TemplateError as e:
            raise SystemExit(f"validate.py: {path}: {e}")
        if name == "NOTES.txt":
            notes = rendered
        elif name.startswith("_"):
            continue
        elif name.endswith((".yaml", ".yml")):
            objs.extend(load_docs(rendered, f"{path} (rendered)"))
    return objs, notes


# ---------------------------------------------------------------------------------------
# Schema validation


def schema_versions():
    latest = kubernetes_validate.latest_version()
    return sorted({MIN_K8S, kv_utils.major_minor(latest)}, key=lambda v: tuple(map(int, v.split("."))))


def validate_schema(where, o):
    if o.get("apiVersion") == "monitoring.coreos.com/v1":
        check_servicemonitor(where, o)
        return
    for v in schema_versions():
        try:
            kubernetes_validate.validate(o, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problem(where, f"Kubernetes {v} schema: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problem(where, f"Kubernetes {v}: {e.message}")


DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")


def check_servicemonitor(where, o):
    if o.get("kind") != "ServiceMonitor":
        problem(where, "only ServiceMonitor is expected from monitoring.coreos.com/v1")
        return
    if not o.get("metadata", {}).get("name"):
        problem(where, "metadata.name missing")
    spec = o.get("spec")
    if not isinstance(spec, dict):
        problem(where, "spec missing")
        return
    allowed = {"selector", "endpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
               "targetLabels", "sampleLimit"}
    if set(spec) - allowed:
        problem(where, f"unknown spec fields {sorted(set(spec) - allowed)}")
    sel = spec.get("selector")
    if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
        problem(where, "spec.selector needs matchLabels or matchExpressions")
    eps = spec.get("endpoints")
    if not isinstance(eps, list) or not eps:
        problem(where, "spec.endpoints must be a non-empty list")
        return
    ep_allowed = {"port", "targetPort", "path", "interval", "scrapeTimeout", "scheme",
                  "authorization", "bearerTokenSecret", "honorLabels", "relabelings",
                  "metricRelabelings", "tlsConfig", "params"}
    for i, ep in enumerate(eps):
        w = f"{where} endpoints[{i}]"
        if set(ep) - ep_allowed:
            problem(w, f"unknown fields {sorted(set(ep) - ep_allowed)}")
        if not isinstance(ep.get("port"), str) and "targetPort" not in ep:
            problem(w, "needs port (a Service port name) or targetPort")
        if not str(ep.get("path", "/metrics")).startswith("/"):
            problem(w, "path must start with /")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not DURATION.match(str(ep[k])):
                problem(w, f"{k} {ep[k]!r} is not a Prometheus duration")


# ---------------------------------------------------------------------------------------
# Consistency inside one build


def parse_duration(s):
    total = 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    if re.fullmatch(r"\d+", s):
        return float(s)
    for num, unit in re.findall(r"(\d+)(ms|s|m|h)", s):
        total += int(num) * units[unit]
    return total


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def pod_specs(objs):
    for o in objs:
        if o["kind"] == "Deployment":
            yield o, o["spec"]["template"]


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def resolve_port(container, port):
    for p in container.get("ports", []):
        if port in (p.get("name"), p.get("containerPort")):
            return p["containerPort"]
    return None


def is_pgmux(c):
    image = c.get("image", "")
    return c["name"] == "pgmux" or image.split("/")[-1].split(":")[0] == "pgmux"


def check_build(name, objs, external_secrets=()):
    """Checks one set of objects; returns the facts about its pgmux containers."""
    names = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    for o in objs:
        validate_schema(f"{name} {o['kind']}/{o['metadata']['name']}", o)
    facts = []
    for d, tpl in pod_specs(objs):
        w = f"{name} Deployment/{d['metadata']['name']}"
        labels = tpl["metadata"].get("labels", {})
        if not selects(d["spec"]["selector"].get("matchLabels"), labels):
            problem(w, "selector does not match the pod template's labels")
        spec = tpl["spec"]
        init = spec.get("initContainers", [])
        containers = spec.get("containers", [])
        for c in init + containers:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ("Secret", ref["name"]) not in names and ref["name"] not in external_secrets:
                    problem(w, f"env {e['name']}: Secret {ref['name']} is not in the build")
                elif ref and ("Secret", ref["name"]) in names and not ref.get("optional"):
                    data = secret_data(names[("Secret", ref["name"])])
                    if ref["key"] not in data:
                        problem(w, f"env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
        for v in spec.get("volumes", []):
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
                problem(w, f"volume {v['name']}: ConfigMap {v['configMap']['name']} missing")
        pgmuxes = [(c, "initContainers") for c in init if is_pgmux(c)] + [
            (c, "containers") for c in containers if is_pgmux(c)
        ]
        if not pgmuxes:
            problem(w, "no pgmux container")
        for c, where_in in pgmuxes:
            facts.append(check_pgmux_container(f"{w} {where_in}/{c['name']}", d, spec, c, where_in, names, external_secrets))
        # Sidecar: the app must reach pgmux on loopback.
        if any(wi == "initContainers" for _, wi in pgmuxes):
            listen = env_value(pgmuxes[0][0], "PGMUX_LISTEN", names)
            for c in containers:
                url = env_value(c, "DATABASE_URL", names)
                if url is None:
                    problem(w, f"container {c['name']}: no DATABASE_URL")
                    continue
                u = urllib.parse.urlsplit(url)
                if f"{u.hostname}:{u.port}" != listen:
                    problem(w, f"container {c['name']}: DATABASE_URL points at {u.hostname}:{u.port}, pgmux listens on {listen}")
                facts[-1]["ports"].setdefault("postgres", u.port)
    for s in by_kind(objs, "Service"):
        w = f"{name} Service/{s['metadata']['name']}"
        pods = [(d, t) for d, t in pod_specs(objs) if selects(s["spec"].get("selector"), t["metadata"].get("labels", {}))]
        if not pods:
            problem(w, "selects no pod template of the build")
        for p in s["spec"].get("ports", []):
            for d, t in pods:
                cs = t["spec"].get("containers", []) + t["spec"].get("initContainers", [])
                if not any(resolve_port(c, p.get("targetPort", p["port"])) for c in cs):
                    problem(w, f"port {p.get('name')}: targetPort {p.get('targetPort')} is no container port")
    for h in by_kind(objs, "HorizontalPodAutoscaler"):
        ref = h["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) not in names:
            problem(f"{name} HPA/{h['metadata']['name']}", f"scale target {ref['name']} missing")
        if h["spec"].get("minReplicas", 1) < 2:
            problem(f"{name} HPA/{h['metadata']['name']}", "minReplicas below 2")
    for p in by_kind(objs, "PodDisruptionBudget"):
        if not any(selects(p["spec"]["selector"].get("matchLabels"), t["metadata"]["labels"]) for _, t in pod_specs(objs)):
            problem(f"{name} PDB/{p['metadata']['name']}", "selects no pod template")
    for m in by_kind(objs, "ServiceMonitor"):
        w = f"{name} ServiceMonitor/{m['metadata']['name']}"
        svcs = [s for s in by_kind(objs, "Service") if selects(m["spec"]["selector"].get("matchLabels"), s["metadata"].get("labels", {}))]
        if len(svcs) != 1:
            problem(w, f"selects {len(svcs)} Services (want exactly one: no double scrapes)")
        for ep in m["spec"]["endpoints"]:
            for s in svcs:
                sp = [p for p in s["spec"]["ports"] if p.get("name") == ep.get("port")]
                if not sp:
                    problem(w, f"Service {s['metadata']['name']} has no port {ep.get('port')}")
                    continue
                for f in facts:
                    port = f["ports"].get(sp[0]["targetPort"]) if isinstance(sp[0]["targetPort"], str) else sp[0]["targetPort"]
                    if port:
                        f["http"].append({"what": f"{w} scrape", "path": ep.get("path", "/metrics"), "port": port})
    return facts


def secret_data(secret):
    data = dict(secret.get("stringData", {}))
    for k in secret.get("data", {}):
        data.setdefault(k, None)
    return data


def env_value(c, var, names):
    for e in c.get("env", []):
        if e["name"] != var:
            continue
        if "value" in e:
            return e["value"]
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and ("Secret", ref["name"]) in names:
            return secret_data(names[("Secret", ref["name"])]).get(ref["key"])
    return None


PLACEHOLDER = {"DATABASE_URL": "postgres://u:p@127.0.0.1:1/db"}


def check_pgmux_container(w, d, spec, c, where_in, names, external_secrets):
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            problem(w, f"env {e['name']}: only value and secretKeyRef are expected")
            continue
        secret = names.get(("Secret", ref["name"]))
        if secret is not None and ref["key"] in secret_data(secret):
            env[e["name"]] = secret_data(secret)[ref["key"]]
        elif not ref.get("optional"):
            if e["name"] not in PLACEHOLDER:
                problem(w, f"env {e['name']}: required key {ref['key']} of external Secret {ref['name']}")
            else:
                env[e["name"]] = PLACEHOLDER[e["name"]]
    # Files: ConfigMaps mounted into the container, and Secret volumes (TLS).
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    files, secret_dirs = {}, []
    for m in c.get("volumeMounts", []):
        v = vols.get(m["name"])
        if v is None:
            problem(w, f"volumeMount {m['name']}: no such volume")
        elif "configMap" in v:
            cm = names.get(("ConfigMap", v["configMap"]["name"]), {})
            for k, text in cm.get("data", {}).items():
                files[f"{m['mountPath'].rstrip('/')}/{k}"] = text
        elif "secret" in v:
            secret_dirs.append(m["mountPath"].rstrip("/"))
        if not m.get("readOnly"):
            problem(w, f"volumeMount {m['name']} is not readOnly")
    cfg_path = env.get("PGMUX_CONFIG")
    config = None
    if cfg_path:
        if cfg_path not in files:
            problem(w, f"PGMUX_CONFIG={cfg_path} is not a mounted ConfigMap key")
        else:
            try:
                config = tomllib.loads(files[cfg_path])
            except tomllib.TOMLDecodeError as e:
                problem(w, f"{cfg_path}: invalid TOML: {e}")
    # Probes: liveness /healthz, readiness /readyz, on a declared port.
    http = []
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        p = c.get(kind)
        if p is None:
            continue
        g = p.get("httpGet")
        if g is None:
            problem(w, f"{kind} is not an httpGet probe")
            continue
        port = resolve_port(c, g["port"])
        if port is None:
            problem(w, f"{kind}: port {g['port']} is not a container port")
        http.append({"what": f"{w} {kind}", "path": g["path"], "port": port})
    if (c.get("livenessProbe") or {}).get("httpGet", {}).get("path") != "/healthz":
        problem(w, "livenessProbe must be GET /healthz")
    if (c.get("readinessProbe") or {}).get("httpGet", {}).get("path") != "/readyz":
        problem(w, "readinessProbe must be GET /readyz")
    if where_in == "initContainers" and c.get("restartPolicy") != "Always":
        problem(w, "a pgmux init container must be a native sidecar (restartPolicy: Always)")
    # Security.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    if not (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        problem(w, "runAsNonRoot is not set")
    if csc.get("runAsUser", psc.get("runAsUser")) == 0:
        problem(w, "runs as root")
    if not csc.get("readOnlyRootFilesystem"):
        problem(w, "readOnlyRootFilesystem is not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        problem(w, "allowPrivilegeEscalation is not false")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        problem(w, "capabilities do not drop ALL")
    if "resources" not in c or "requests" not in c["resources"] or "limits" not in c["resources"]:
        problem(w, "needs resources.requests and resources.limits")
    # Shutdown: the kubelet's SIGKILL must come after preStop + shutdown_timeout.
    grace = spec.get("terminationGracePeriodSeconds", 30)
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    shutdown = parse_duration(str((config or {}).get("shutdown_timeout", env.get("PGMUX_SHUTDOWN_TIMEOUT", "30s"))))
    if not grace > pre + shutdown:
        problem(w, f"terminationGracePeriodSeconds {grace} <= preStop {pre}s + shutdown_timeout {shutdown}s")
    if where_in == "containers" and pre == 0:
        problem(w, "no preStop sleep: clients would still be routed to a draining pod")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    return {
        "source": w,
        "env": env,
        "files": files,
        "secret_dirs": secret_dirs,
        "ports": ports,
        "http": http,
        "config_keys": sorted((config or {}).keys()),
    }


# ---------------------------------------------------------------------------------------
# Helm chart against the kustomize base


def summary(objs):
    s = {}
    for o in objs:
        key = (o["kind"], o["metadata"]["name"])
        item = {}
        if o["kind"] == "Deployment":
            c = [c for c in o["spec"]["template"]["spec"]["containers"] if is_pgmux(c)][0]
            item = {
                "ports": sorted((p["name"], p["containerPort"]) for p in c["ports"]),
                "env": sorted(e["name"] for e in c.get("env", [])),
                "probes": sorted((k, c[k]["httpGet"]["path"], c[k]["httpGet"]["port"]) for k in ("livenessProbe", "readinessProbe") if k in c),
                "mounts": sorted(m["mountPath"] for m in c.get("volumeMounts", [])),
                "grace": o["spec"]["template"]["spec"].get("terminationGracePeriodSeconds"),
            }
        elif o["kind"] == "Service":
            item = {
                "ports": sorted((p["name"], p["port"], p.get("targetPort")) for p in o["spec"]["ports"]),
                "headless": o["spec"].get("clusterIP") == "None",
            }
        elif o["kind"] == "ConfigMap":
            item = {k: sorted(tomllib.loads(v).keys()) for k, v in o.get("data", {}).items()}
        elif o["kind"] == "Secret":
            item = sorted(secret_data(o).keys())
        elif o["kind"] == "HorizontalPodAutoscaler":
            item = {"min": o["spec"]["minReplicas"], "max": o["spec"]["maxReplicas"], "metrics": o["spec"]["metrics"]}
        elif o["kind"] == "PodDisruptionBudget":
            item = {"minAvailable": o["spec"].get("minAvailable")}
        elif o["kind"] == "ServiceMonitor":
            item = o["spec"]["endpoints"]
        s[key] = item
    return s


def compare(a_name, a, b_name, b):
    sa, sb = summary(a), summary(b)
    for k in sorted(set(sa) | set(sb), key=str):
        if k not in sa:
            problem(a_name, f"has no {k[0]}/{k[1]} ({b_name} has)")
        elif k not in sb:
            problem(b_name, f"has no {k[0]}/{k[1]} ({a_name} has)")
        elif sa[k] != sb[k]:
            problem(f"{a_name} vs {b_name}", f"{k[0]}/{k[1]} differs: {sa[k]} != {sb[k]}")


# ---------------------------------------------------------------------------------------
# docker compose


def check_compose(repo):
    base = os.path.join(repo, "deploy/compose")
    path = os.path.join(base, "docker-compose.yml")
    with open(path) as f:
        c = yaml.safe_load(f)
    services = c.get("services", {})
    for want in ("postgres-primary", "postgres-replica", "pgmux", "prometheus"):
        if want not in services:
            problem(path, f"no service {want}")
    for name, s in services.items():
        for dep in s.get("depends_on", {}):
            if dep not in services:
                problem(path, f"{name} depends on unknown service {dep}")
        for vol in s.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith("."):
                if not os.path.exists(os.path.normpath(os.path.join(base, src))):
                    problem(path, f"{name}: volume source {src} does not exist")
    px = services.get("pgmux", {})
    build = px.get("build", {})
    ctx = os.path.normpath(os.path.join(base, build.get("context", ".")))
    dockerfile = os.path.normpath(os.path.join(ctx, build.get("dockerfile", "Dockerfile")))
    if dockerfile != os.path.join(repo, "deploy/Dockerfile"):
        problem(path, f"pgmux is not built from deploy/Dockerfile (got {dockerfile})")
    if not os.path.exists(os.path.join(ctx, "Cargo.lock")):
        problem(path, "pgmux's build context is not the repository root")
    env = px.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    env = {k: str(v) for k, v in env.items()}
    for var, svc in (("DATABASE_URL", "postgres-primary"), ("READ_DATABASE_URL", "postgres-replica")):
        u = urllib.parse.urlsplit(env.get(var, ""))
        if u.hostname != svc:
            problem(path, f"pgmux {var} does not point at {svc}")
    ports = {}
    for p in px.get("ports", []):
        host, _, cport = str(p).rpartition(":")
        ports[int(cport)] = host
    http = []
    with open(os.path.join(base, "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    found = False
    for job in prom.get("scrape_configs", []):
        for sc in job.get("static_configs", []):
            for t in sc.get("targets", []):
                host, _, port = t.rpartition(":")
                if host == "pgmux":
                    found = True
                    http.append({"what": f"{path} prometheus job {job.get('job_name')}", "path": job.get("metrics_path", "/metrics"), "port": int(port)})
    if not found:
        problem(path, "prometheus.yml does not scrape pgmux")
    return {
        "source": path,
        "env": env,
        "files": {},
        "secret_dirs": [],
        "ports": {"postgres": 6432 if 6432 in ports else None, "admin": 9930 if 9930 in ports else None},
        "http": http,
        "config_keys": [],
    }


# ---------------------------------------------------------------------------------------


def main():
    repo = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
    kdir = os.path.join(repo, "deploy/kubernetes")
    chart = os.path.join(repo, "deploy/helm/pgmux")
    containers, builds, kubectl = [], {}, "not found on PATH: not compared"

    for sub in ("base", "overlays/deployment", "overlays/sidecar"):
        path = os.path.join(kdir, sub)
        objs = kustomize(path)
        builds[f"kustomize:{sub}"] = objs
        theirs = kubectl_kustomize(path)
        if theirs is not None:
            kubectl = shutil.which("kubectl")
            mine = sorted(json.dumps(o, sort_keys=True) for o in objs)
            if sorted(json.dumps(o, sort_keys=True) for o in theirs) != mine:
                problem(path, "kubectl kustomize builds something else than this resolver")
        containers += check_build(f"kustomize:{sub}", objs)

    base = builds["kustomize:base"]
    if summary(base) != summary(builds["kustomize:overlays/deployment"]):
        problem("overlays/deployment", "differs from the base it should use as is")

    values_full = {
        "database": {
            "url": "postgres://app:secret@db-primary:5432/app",
            "readUrl": "postgres://app:secret@db-replica:5432/app",
            "adminToken": "0123456789abcdef0123",
        },
        "tls": {"enabled": True, "secretName": "pgmux-tls", "mode": "require"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "pgmux": {"extraConfig": 'read_routing = "auto"\n\n[users.reporting]\npool_size = 5\n'},
        "podAnnotations": {"example.com/team": "db"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
        "imagePullSecrets": [{"name": "registry"}],
        "extraEnv": [
            {"name": "PGMUX_SERVER_TLS_MODE", "value": "verify-full"},
            {"name": "PGMUX_SERVER_TLS_CA_FILE", "value": "/etc/pgmux-ca/tls.crt"},
        ],
        "extraVolumes": [{"name": "ca", "secret": {"secretName": "db-ca"}}],
        "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/pgmux-ca", "readOnly": True}],
        "service": {"annotations": {"example.com/lb": "internal"}},
        "connectionBudget": {"totalServerConnections": "auto", "reservedServerConnections": 20, "maxDbConnections": 60},
    }
    variants = {
        "defaults": ("pgmux", {}),
        "like-base": ("pgmux", {
            "serviceMonitor": {"enabled": True},
            "database": {
                "url": "postgres://app:CHANGE_ME@db-primary.example.internal:5432/app",
                "readUrl": "postgres://app:CHANGE_ME@db-replica.example.internal:5432/app",
                "adminToken": "CHANGE_ME-to-a-random-token-of-32-chars",
            },
        }),
        "full": ("edge", values_full),
        "existing-secret": ("edge", {
            "database": {"existingSecret": "my-db"},
            "hpa": {"enabled": False},
            "pdb": {"enabled": False},
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["db"]}]}]}}},
        }),
    }
    notes = {}
    for vname, (release, overrides) in variants.items():
        objs, notes[vname] = helm_render(chart, release, "db", overrides)
        builds[f"helm:{vname}"] = objs
        external = ("my-db",) if vname == "existing-secret" else ()
        facts = check_build(f"helm:{vname}", objs, external)
        if vname != "defaults":  # defaults: DATABASE_URL is empty until the user sets it
            containers += facts
        for o in objs:
            n = o["metadata"]["name"]
            if n != release and not n.startswith(release + "-"):
                problem(f"helm:{vname}", f"{o['kind']}/{n} is not prefixed with the release name")
        if not notes[vname] or "{{" in notes[vname]:
            problem(f"helm:{vname}", "NOTES.txt did not render")
    compare("kustomize:base", base, "helm:like-base", builds["helm:like-base"])
    if "WARNING" not in notes["defaults"]:
        problem("helm:defaults", "NOTES.txt does not warn about the missing database.url")
    if any(o["kind"] == "Secret" for o in builds["helm:existing-secret"]):
        problem("helm:existing-secret", "creates a Secret although database.existingSecret is set")
    d = [o for o in builds["helm:existing-secret"] if o["kind"] == "Deployment"][0]
    if d["spec"].get("replicas") != 2:
        problem("helm:existing-secret", "replicas not taken from replicaCount with the HPA off")

    containers.append(check_compose(repo))

    print(json.dumps({
        "containers": containers,
        "objects": {k: [f"{o['kind']}/{o['metadata']['name']}" for o in v] for k, v in builds.items()},
        "schemas": {"kubernetes_validate": kubernetes_validate.__version__ if hasattr(kubernetes_validate, "__version__") else kv_utils.__version__, "versions": schema_versions()},
        "kubectl": kubectl,
        "problems": problems,
    }, indent=1))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
