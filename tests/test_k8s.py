"""The Kubernetes manifests in k8s/: each overlay renders with kustomize, every object validates against the
Kubernetes API schemas, every pod meets the restricted Pod Security profile, the network policies allow exactly
the traffic maeclip needs, checkov and yamllint are clean, and the MLflow settings and entry point work on a real
server: cluster clients are served, anonymous ones refused, and only the gate's identity changes the registry.

The linters run from .venv-tools (tests/tools/install.sh): a missing tool fails, it never skips.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from manifests import VOLCANO, as_pod_templates, crd_validator, kubernetes_validate, run, tool
from services import free_port

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "gke")
NAMESPACE = "maeclip"
# The oldest Kubernetes these manifests support (native sidecars are GA in 1.33) and the newest schema set.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
TORCHX_POD = {"app.kubernetes.io/managed-by": "torchx.pytorch.org"}
ADMISSION_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")  # cluster-scoped


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay rendered by `kubectl kustomize`, as parsed objects."""
    out = {}
    for overlay in OVERLAYS:
        result = run(tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay))
        assert result.returncode == 0, result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def pod_specs(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    """(owner, pod spec) for every pod template, including those inside custom resources."""
    for obj in objects:
        owner = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in WORKLOAD_KINDS:
            yield owner, obj["spec"]["template"]["spec"]
        for template in custom_resource_templates(obj):
            yield owner, template["spec"]


def is_custom(obj: dict) -> bool:
    """Built-in API groups are either dotless (apps, batch) or end in k8s.io; anything else is a CRD."""
    group = obj["apiVersion"].rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def custom_resource_templates(obj: dict) -> list[dict]:
    """Pod templates inside a custom resource (a Volcano Job keeps one per task)."""
    if not is_custom(obj):
        return []
    return [task["template"] for task in obj.get("spec", {}).get("tasks", [])]


# ---------------------------------------------------------------- rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_part(rendered, overlay):
    objects = rendered[overlay]
    kinds = {obj["kind"] for obj in objects}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Queue", "PriorityClass", "Deployment",
            "Service", "ConfigMap", "NetworkPolicy", *ADMISSION_KINDS} <= kinds
    assert not [obj for obj in objects if obj["kind"] not in {"Namespace", "PriorityClass", "Queue", *ADMISSION_KINDS}
                and obj["metadata"].get("namespace") != NAMESPACE]
    assert all(obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "maeclip" for obj in objects)
    # Postgres runs in the namespace on dev only; gke uses Cloud SQL through the proxy sidecar.
    assert ("mlflow-postgres" in by_kind(objects, "StatefulSet")) == (overlay == "dev")
    sidecars = by_kind(objects, "Deployment")["mlflow"]["spec"]["template"]["spec"].get("initContainers", [])
    assert [c["name"] for c in sidecars] == (["cloud-sql-proxy"] if overlay == "gke" else [])


def torchx_training_job() -> dict:
    """The Volcano Job that maeclip's own launch path renders for training into this namespace (elastic, 1:2)."""
    from trainer.launch import dryrun_training

    return dryrun_training("tiny-clip", nnodes="1:2", nproc_per_node=1, environ={})


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(rendered, tmp_path, version):
    files: dict[str, list[dict]] = {}
    for overlay, objects in rendered.items():
        files[f"{overlay}.yaml"] = [obj for obj in objects if not is_custom(obj)]
        # kubernetes-validate skips custom resources with a warning: check their pod templates as PodTemplates.
        files[f"{overlay}-templates.yaml"] = [
            t for obj in objects for t in as_pod_templates(obj["metadata"]["name"], custom_resource_templates(obj))
        ]
    job = torchx_training_job()
    files["torchx-job-templates.yaml"] = as_pod_templates("torchx-job", custom_resource_templates(job))
    assert len(files["torchx-job-templates.yaml"]) == 2  # elastic 1:2 nodes: one task per replica
    # A known-bad template in the same run proves that strict validation rejects unknown fields.
    bad = as_pod_templates("bad", [{"spec": {"containers": [{"name": "a", "image": "a:1", "bogus": 1}]}}])
    files["known-bad.yaml"] = bad
    code, output = kubernetes_validate(tmp_path, version, files)
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    assert code != 0 and len(errors) == 1 and "known-bad.yaml" in errors[0] and "bogus" in errors[0], output


def test_custom_resources_are_known_volcano_kinds(rendered):
    """kubernetes-validate cannot check custom resources: allow only kinds this test knows the shape of."""
    for objects in rendered.values():
        custom = [obj for obj in objects if is_custom(obj)]
        assert [(obj["apiVersion"], obj["kind"]) for obj in custom] == [("scheduling.volcano.sh/v1beta1", "Queue")]
        queue = custom[0]
        assert "namespace" not in queue["metadata"]  # Queues are cluster-scoped
        assert queue["spec"] == {"weight": 1, "reclaimable": True}
        # ... and it is a Queue as Volcano 1.15.1 defines one, to the field
        schema = crd_validator(VOLCANO / "scheduling.volcano.sh_queues.yaml", "v1beta1")
        assert [e.message for e in schema.iter_errors(queue)] == []
        assert [e.message for e in schema.iter_errors({**queue, "spec": {"weigth": 1}})] == [
            "Additional properties are not allowed ('weigth' was unexpected)"]


# ---------------------------------------------------------------- pod security and resources


def restricted_violations(spec: dict) -> list[str]:
    """What the Pod Security "restricted" profile (Kubernetes docs, Pod Security Standards) would reject."""
    problems = []
    pod_ctx = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(key)
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= allowed_volumes:
            problems.append(f"volume {volume['name']}: {sorted(kinds)}")
    for container in spec.get("initContainers", []) + spec["containers"]:
        ctx = container.get("securityContext", {})
        name = container["name"]
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        capabilities = ctx.get("capabilities", {})
        if capabilities.get("drop") != ["ALL"] or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities must drop ALL")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot must be true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile must be RuntimeDefault")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


def test_restricted_checker_rejects_a_default_pod():
    spec = {"containers": [{"name": "c", "image": "a:1"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    assert restricted_violations(spec) == [
        "volume h: ['hostPath']", "c: allowPrivilegeEscalation must be false", "c: capabilities must drop ALL",
        "c: runAsNonRoot must be true", "c: seccompProfile must be RuntimeDefault"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_restricted_and_every_pod_meets_it(rendered, overlay):
    labels = by_kind(rendered[overlay], "Namespace")[NAMESPACE]["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    specs = list(pod_specs(rendered[overlay]))
    assert specs
    for owner, spec in specs:
        assert restricted_violations(spec) == [], owner


def test_training_pods_meet_restricted_with_a_read_only_root_and_their_own_identity():
    """What TorchX submits passes the namespace's profile, writes only to its emptyDir volumes and runs as the
    trainer, whose service account the manifests define (and the admission policy requires)."""
    for task in torchx_training_job()["spec"]["tasks"]:
        spec = task["template"]["spec"]
        assert restricted_violations(spec) == []
        assert spec["serviceAccountName"] == "maeclip-trainer" and spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert all("emptyDir" in volumes[m["name"]] for m in container["volumeMounts"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_probes_and_a_pinned_image(rendered, overlay):
    for owner, spec in pod_specs(rendered[overlay]):
        # Native sidecars (init containers that keep running) are long-lived like the main containers.
        long_lived = spec["containers"] + [c for c in spec.get("initContainers", []) if c.get("restartPolicy")]
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{owner}/{container['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            exact_tag = repository and "/" not in tag and tag != "latest" and re.search(r"\d", tag)
            assert "@sha256:" in image or exact_tag, where
            assert container.get("securityContext", {}).get("readOnlyRootFilesystem") is True, where
        for container in long_lived:
            assert {"readinessProbe", "livenessProbe"} <= set(container), f"{owner}/{container['name']}"


def test_service_accounts_exist_carry_no_token_and_map_to_google_identities_on_gke(rendered):
    for overlay, objects in rendered.items():
        accounts = by_kind(objects, "ServiceAccount")
        assert all(sa["automountServiceAccountToken"] is False for sa in accounts.values())
        for owner, spec in pod_specs(objects):
            assert spec["serviceAccountName"] in accounts, owner
            assert spec["automountServiceAccountToken"] is False, owner
        annotated = {name for name, sa in accounts.items()
                     if "iam.gke.io/gcp-service-account" in sa["metadata"].get("annotations", {})}
        assert annotated == ({"maeclip-trainer", "maeclip-mlflow"} if overlay == "gke" else set())


def test_priority_classes_make_study_runs_preemptible(rendered):
    classes = by_kind(rendered["dev"], "PriorityClass")
    assert classes["maeclip-service"]["value"] > classes["maeclip-train"]["value"] > classes["maeclip-study"]["value"]
    assert classes["maeclip-study"]["preemptionPolicy"] == "Never"
    assert not any(pc.get("globalDefault") for pc in classes.values())


# ---------------------------------------------------------------- RBAC


def test_runner_role_lets_torchx_launch_and_watch_volcano_jobs_in_this_namespace_only(rendered):
    for objects in rendered.values():
        assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
        role = by_kind(objects, "Role")["maeclip-runner"]
        rules = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
                 for resource in rule["resources"] for verb in rule["verbs"]}
        assert rules == {
            *(("batch.volcano.sh", "jobs", verb) for verb in ("create", "get", "list", "watch", "delete")),
            ("batch.volcano.sh", "jobs/status", "update"),  # torchx cancel marks the job Aborted
            *(("", "pods", verb) for verb in ("get", "list", "watch")),
            ("", "pods/log", "get"),
        }
        binding = by_kind(objects, "RoleBinding")["maeclip-runner"]
        assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == NAMESPACE
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "maeclip-runner"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]


# ---------------------------------------------------------------- network policies


class Peer:
    """A pod (namespace and labels) or an address outside the cluster."""

    def __init__(self, namespace: str | None = None, labels: dict | None = None, ip: str | None = None) -> None:
        self.namespace, self.labels, self.ip = namespace, labels or {}, ip


def selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {"In": present and value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
              "Exists": present, "DoesNotExist": not present}[expr["operator"]]
        if not ok:
            return False
    return True


def peer_matches(rule_peer: dict, policy_ns: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        if peer.ip is None:
            return False
        address = ipaddress.ip_address(peer.ip)
        block = rule_peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
    if peer.namespace is None:
        return False
    if "namespaceSelector" in rule_peer:
        ns_ok = selects(rule_peer["namespaceSelector"], {"kubernetes.io/metadata.name": peer.namespace})
    else:
        ns_ok = peer.namespace == policy_ns
    return ns_ok and selects(rule_peer.get("podSelector", {}), peer.labels)


def port_matches(rule_ports: list[dict] | None, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for rule_port in rule_ports:
        assert isinstance(rule_port.get("port", 0), int), "named ports are not modelled"
        if rule_port.get("protocol", "TCP") == protocol and rule_port.get("port", port) <= port <= rule_port.get(
                "endPort", rule_port.get("port", port)):
            return True
    return False


def direction_allows(policies: list[dict], pod: Peer, other: Peer, port: int, protocol: str, kind: str) -> bool:
    """NetworkPolicy semantics for one side: isolated once any policy of that kind selects the pod."""
    key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    selecting = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
                 and kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], pod.labels)]
    if not selecting:
        return True
    return any(
        (not rule.get(peers_key) or any(peer_matches(peer, pod.namespace, other) for peer in rule[peers_key]))
        and port_matches(rule.get("ports"), port, protocol)
        for policy in selecting for rule in policy["spec"].get(key, []))


def allowed(policies: list[dict], src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    egress = src.namespace is None or direction_allows(policies, src, dst, port, protocol, "Egress")
    ingress = dst.namespace is None or direction_allows(policies, dst, src, port, protocol, "Ingress")
    return egress and ingress


MLFLOW = Peer(NAMESPACE, {"app.kubernetes.io/name": "mlflow"})
POSTGRES = Peer(NAMESPACE, {"app.kubernetes.io/name": "postgres"})
TRAINER = Peer(NAMESPACE, {**TORCHX_POD, "app.kubernetes.io/name": "tiny-clip"})
STRANGER = Peer(NAMESPACE, {"app": "debug-shell"})
PIPELINE_STEP = Peer("kubeflow", {"pipelines.kubeflow.org/v2_component": "true"})
OTHER_NAMESPACE = Peer("default", {"app.kubernetes.io/managed-by": "torchx.pytorch.org"})
KUBE_DNS = Peer("kube-system", {"k8s-app": "kube-dns"})
GOOGLE_API = Peer(ip="142.250.1.207")
PRIVATE_HOST = Peer(ip="10.1.2.3")

# (source, destination, port, protocol, allowed on dev, allowed on gke)
CONNECTIONS = [
    ("trainer", TRAINER, MLFLOW, 5000, "TCP", True, True),
    ("pipeline step", PIPELINE_STEP, MLFLOW, 5000, "TCP", True, True),
    ("stranger", STRANGER, MLFLOW, 5000, "TCP", False, False),
    ("other namespace", OTHER_NAMESPACE, MLFLOW, 5000, "TCP", False, False),
    ("rendezvous", TRAINER, TRAINER, 29500, "TCP", True, True),
    ("nccl", TRAINER, TRAINER, 43817, "TCP", True, True),
    ("mlflow to trainer", MLFLOW, TRAINER, 29500, "TCP", False, False),
    ("stranger to trainer", STRANGER, TRAINER, 29500, "TCP", False, False),
    ("mlflow db", MLFLOW, POSTGRES, 5432, "TCP", True, False),
    ("trainer db", TRAINER, POSTGRES, 5432, "TCP", False, False),
    ("postgres out", POSTGRES, GOOGLE_API, 443, "TCP", False, False),
    ("dns", TRAINER, KUBE_DNS, 53, "UDP", True, True),
    ("gcs", TRAINER, GOOGLE_API, 443, "TCP", True, True),
    ("artifacts", MLFLOW, GOOGLE_API, 443, "TCP", True, True),
    ("plain http out", TRAINER, GOOGLE_API, 80, "TCP", False, False),
    ("private https", TRAINER, PRIVATE_HOST, 443, "TCP", False, False),
    ("stranger out", STRANGER, GOOGLE_API, 443, "TCP", False, False),
    ("metadata server", TRAINER, Peer(ip="169.254.169.252"), 988, "TCP", False, True),
    ("cloud sql", MLFLOW, PRIVATE_HOST, 3307, "TCP", False, True),
]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("case", CONNECTIONS, ids=[c[0] for c in CONNECTIONS])
def test_network_policies_allow_exactly_what_maeclip_needs(rendered, overlay, case):
    _, src, dst, port, protocol, on_dev, on_gke = case
    policies = list(by_kind(rendered[overlay], "NetworkPolicy").values())
    assert allowed(policies, src, dst, port, protocol) == (on_dev if overlay == "dev" else on_gke)


label_keys = st.sampled_from(["app", "app.kubernetes.io/name", "app.kubernetes.io/managed-by", "k8s-app", "role"])
label_values = st.sampled_from(["mlflow", "postgres", "torchx", "torchx.pytorch.org.x", "kube-dns", "debug", ""])


@settings(max_examples=200, deadline=None)
@given(labels=st.dictionaries(label_keys, label_values, max_size=4),
       namespace=st.sampled_from([NAMESPACE, "default", "kube-system", "kubeflow-user"]),
       port=st.integers(1, 65535))
def test_no_unlisted_pod_reaches_mlflow_or_training(rendered, labels, namespace, port):
    """Whatever its labels, a pod that is neither a training pod nor in `kubeflow` reaches neither."""
    stranger = Peer(namespace, labels)  # label_values leave out TorchX's exact label value
    for overlay in OVERLAYS:
        policies = list(by_kind(rendered[overlay], "NetworkPolicy").values())
        assert not allowed(policies, stranger, MLFLOW, port)
        assert not allowed(policies, stranger, TRAINER, port)
        assert not allowed(policies, stranger, POSTGRES, port)


CLOSED_RANGES = [ipaddress.ip_network(n) for n in
                 ("10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")]


@settings(max_examples=300, deadline=None)
@given(address=st.one_of(st.ip_addresses(v=4), *(st.ip_addresses(network=n) for n in CLOSED_RANGES)),
       port=st.one_of(st.just(443), st.integers(1, 65535)))
def test_training_pods_reach_outside_only_on_https_to_public_addresses(rendered, address, port):
    """Outside the cluster a training pod reaches HTTPS (GCS, S3), never a private, shared or link-local address."""
    policies = list(by_kind(rendered["dev"], "NetworkPolicy").values())
    expected = port == 443 and not any(address in network for network in CLOSED_RANGES)
    assert allowed(policies, TRAINER, Peer(ip=str(address)), port) == expected


def test_default_deny_covers_every_pod_both_ways(rendered):
    for objects in rendered.values():
        deny = by_kind(objects, "NetworkPolicy")["default-deny"]["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


# ---------------------------------------------------------------- linters


def test_checkov_passes_on_rendered_overlays_and_every_waiver_is_justified(rendered, tmp_path):
    for overlay, objects in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
    # A privileged pod in the same run proves checkov is checking.
    (tmp_path / "known-bad.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad", "namespace": NAMESPACE},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]}}))
    result = run(tool("checkov"), "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download",
                 "--output", "json")
    report = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["resource_count"] > 40
    failed = report["results"]["failed_checks"]
    assert failed and {check["file_path"] for check in failed} == {"/known-bad.yaml"}
    skipped = report["results"]["skipped_checks"]
    assert skipped, "the waivers in k8s/ should show as skipped checks"
    for check in skipped:
        assert len(check["check_result"]["suppress_comment"]) > 20, check["check_id"]


def test_yamllint_is_clean(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("key: value\nkey: again\n")
    result = run(tool("yamllint"), "-c", str(K8S / ".yamllint.yaml"), "--strict", "-f", "parsable", str(K8S),
                 str(bad))
    problems = result.stdout.splitlines()
    assert result.returncode != 0 and problems and all(line.startswith(str(bad)) for line in problems), problems


# ---------------------------------------------------------------- MLflow settings on a real server


def request(url: str, host: str, method: str = "GET", data: bytes | None = None,
            user: tuple[str, str] | None = None) -> int:
    """Status of a request sent with the given Host header (as a client in the cluster would send it), signed in
    as ``user`` (name, password) when given."""
    headers = {"Host": host, "Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, data, headers, method=method), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def call(base: str, user: tuple[str, str], method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """An MLflow REST call as ``user``: (status, the JSON reply, or {} on an error)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Content-Type": "application/json",
               "Authorization": "Basic " + base64.b64encode(":".join(user).encode()).decode()}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with opener.open(urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data, headers, method=method),
                         timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


# The Secret `mlflow-auth` (k8s/README.md) as the files serve.py reads; values made up per test session.
AUTH_KEYS = ("admin-password", "flask-secret-key", "trainer-password", "pipeline-password", "gate-password")
IDENTITIES = {"trainer": "maeclip-trainer", "pipeline": "maeclip-pipeline", "gate": "maeclip-gate"}


@pytest.fixture(scope="module")
def mlflow_server(rendered, tmp_path_factory) -> Iterator[tuple[str, dict[str, tuple[str, str]], Path]]:
    """The MLflow server as the dev overlay runs it: the rendered ConfigMaps' settings and entry point
    (mlflow/serve.py), on loopback instead of a pod. Yields its URL, each identity's credentials and the
    artifact folder."""
    folder = tmp_path_factory.mktemp("mlflow")
    maps = {cm["metadata"]["name"].rpartition("-")[0]: cm["data"]  # names without kustomize's hash
            for cm in rendered["dev"] if cm["kind"] == "ConfigMap"}
    (folder / "serve.py").write_text(maps["mlflow-serve"]["serve.py"])
    secrets = folder / "secrets"
    secrets.mkdir()
    for key in AUTH_KEYS:
        (secrets / key).write_text(f"{key}-{os.urandom(8).hex()}\n")  # the trailing newline of `kubectl create`
    users = {who: (name, (secrets / f"{who}-password").read_text().strip()) for who, name in IDENTITIES.items()}
    port = free_port()
    artifacts = folder / "artifacts"
    env = {**os.environ, **maps["mlflow-config"], "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "HOME": str(folder), "MLFLOW_WORKERS": "1",  # one worker starts faster on a 2-core runner
           "MAECLIP_AUTH_SECRETS": str(secrets), "MAECLIP_AUTH_DIR": str(folder),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts)}
    server = subprocess.Popen([sys.executable, str(folder / "serve.py")], cwd=folder, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not become healthy"
            with contextlib.suppress(urllib.error.URLError):
                # The kubelet probes by pod IP, a Host that the allowed list leaves out: /health is exempt, and
                # needs no user.
                if request(f"{base}/health", "10.0.0.7:5000") == 200:
                    break
            time.sleep(0.5)
        yield base, users, artifacts
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_mlflow_settings_serve_cluster_clients_and_proxy_artifacts(mlflow_server):
    base, users, artifacts = mlflow_server
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    assert request(search, "mlflow.maeclip.svc.cluster.local:5000", user=users["trainer"]) == 200
    assert request(search, "mlflow:5000", user=users["pipeline"]) == 200
    assert request(search, "attacker.example:5000", user=users["trainer"]) == 403
    assert request(search, "mlflow:5000") == 401  # no user, no answer
    assert request(search, "mlflow:5000", user=("maeclip-trainer", "a guess")) == 401
    # Artifacts go through the server to MLFLOW_ARTIFACTS_DESTINATION (a GCS URL on gke), into a run's folder.
    _, experiment = call(base, users["trainer"], "POST", "experiments/create", {"name": "k8s-artifacts"})
    _, created = call(base, users["trainer"], "POST", "runs/create", {"experiment_id": experiment["experiment_id"]})
    path = f"{experiment['experiment_id']}/{created['run']['info']['run_id']}/artifacts/report.txt"
    upload = f"{base}/api/2.0/mlflow-artifacts/artifacts/{path}"
    assert request(upload, "mlflow.maeclip:5000", "PUT", b"proxied", user=users["trainer"]) == 200
    assert (artifacts / path).read_text() == "proxied"
    assert request(upload, "mlflow.maeclip:5000", "PUT", b"anonymous") == 401


def test_only_the_gates_identity_changes_the_model_registry(mlflow_server):
    """Training pods and pipeline steps log runs and metrics anywhere, but can neither create a registered model
    (and so own it) nor move, add or delete an alias; the gate registers and moves `champion`."""
    base, users, _ = mlflow_server
    trainer, pipeline, gate = users["trainer"], users["pipeline"], users["gate"]
    status, experiment = call(base, pipeline, "POST", "experiments/create", {"name": "k8s-study"})  # open_study
    assert status == 200
    status, created = call(base, trainer, "POST", "runs/create", {"experiment_id": experiment["experiment_id"]})
    assert status == 200
    run = created["run"]["info"]["run_id"]
    for who, key in ((trainer, "train/loss"), (pipeline, "eval/zeroshot/shapes-color/top1")):
        assert call(base, who, "POST", "runs/log-metric",
                    {"run_id": run, "key": key, "value": 0.5, "timestamp": 1, "step": 10})[0] == 200
    model = "maeclip-k8s"
    assert call(base, gate, "POST", "registered-models/create", {"name": model})[0] == 200
    assert call(base, gate, "POST", "model-versions/create",
                {"name": model, "source": f"runs:/{run}/model", "run_id": run})[0] == 200
    champion = {"name": model, "alias": "champion", "version": "1"}
    assert call(base, gate, "POST", "registered-models/alias", champion)[0] == 200
    for who in (trainer, pipeline):
        assert call(base, who, "POST", "registered-models/alias", champion)[0] == 403
        assert call(base, who, "POST", "registered-models/alias", {**champion, "alias": "candidate"})[0] == 403
        assert call(base, who, "DELETE", "registered-models/alias", {"name": model, "alias": "champion"})[0] == 403
        assert call(base, who, "POST", "model-versions/create",
                    {"name": model, "source": f"runs:/{run}/model", "run_id": run})[0] == 403
        assert call(base, who, "POST", "registered-models/create", {"name": f"{model}-{who[0]}"})[0] == 403
    status, found = call(base, gate, "GET", f"registered-models/alias?name={model}&alias=champion")
    assert status == 200 and found["model_version"]["version"] == "1"
