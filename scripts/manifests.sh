#!/usr/bin/env bash
# Checks the deployment manifests offline:
# - every Kubernetes manifest (deploy/k8s/) against the Kubernetes schemas, strictly (no unknown
#   field), with kubernetes-validate (installed into .tools/manifests on first use);
# - the Cloud Run services (Knative resources, not in those schemas) for what the distributor
#   needs of them: the gRPC one HTTP/2 end to end with gRPC health probes, the browsers' one
#   (web.yaml) HTTP/1 with TCP probes and its origins set; both with --max-stream-age below the
#   request timeout, --drain-timeout inside Cloud Run's 10 s, secrets not inlined.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.tools/manifests"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==1.37.*" pyyaml
fi
"$venv/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml
echo "deploy/k8s: $(ls deploy/k8s/*.yaml | wc -l) files valid against Kubernetes $("$venv/bin/kubernetes-validate" --version)"
for manifest in deploy/cloudrun/service.yaml deploy/cloudrun/web.yaml; do
"$venv/bin/python" - "$manifest" <<'PY'
import re, sys, yaml

path = sys.argv[1]
web = path.endswith("web.yaml")
service = yaml.safe_load(open(path))
problems = []
def need(ok, what):
    if not ok:
        problems.append(what)

def seconds(value):
    units = {"s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"(\d+)([smh])", value)
    if not m:
        raise SystemExit(f"{path}: cannot read the duration {value!r}")
    return int(m.group(1)) * units[m.group(2)]

need(service.get("apiVersion") == "serving.knative.dev/v1" and service.get("kind") == "Service", "a Knative Service")
spec = service["spec"]["template"]["spec"]
(container,) = spec["containers"]
env = {e["name"]: e for e in container.get("env", [])}
front = "http1" if web else "h2c"
need([p.get("name") for p in container["ports"]] == [front], f"one port, named {front}")
port = container["ports"][0]["containerPort"]
timeout = spec["timeoutSeconds"]
need(timeout <= 3600, "timeoutSeconds at most 3600")
age = seconds(env["DISTRIBUTOR_MAX_STREAM_AGE"]["value"])
need(age < timeout, f"--max-stream-age ({age} s) below the request timeout ({timeout} s)")
drain = seconds(env["DISTRIBUTOR_DRAIN_TIMEOUT"]["value"])
need(drain < 10, f"--drain-timeout ({drain} s) inside Cloud Run's 10 s after SIGTERM")
probe_kind = "tcpSocket" if web else "grpc"
for probe in ("startupProbe", "livenessProbe"):
    need(container.get(probe, {}).get(probe_kind, {}).get("port") == port, f"{probe} by {probe_kind}, port {port}")
if web:
    need(env.get("DISTRIBUTOR_WS_ORIGINS", {}).get("value"), "DISTRIBUTOR_WS_ORIGINS set: the pages that may open sockets")
for name in ("DISTRIBUTOR_AUTH_SECRET", "DISTRIBUTOR_CLUSTER_KEY", "DISTRIBUTOR_NATS_PASSWORD"):
    need("secretKeyRef" in env.get(name, {}).get("valueFrom", {}), f"{name} from Secret Manager, not inlined")
annotations = service["spec"]["template"]["metadata"]["annotations"]
need(annotations.get("run.googleapis.com/cpu-throttling") == "false", "CPU always allocated")
if problems:
    print(f"{path}:", *problems, sep="\n  ")
    sys.exit(1)
print(f"{path}: {front}, stream age {age} s < timeout {timeout} s, drain {drain} s < 10 s, {probe_kind} probes, secrets by reference")
PY
done
