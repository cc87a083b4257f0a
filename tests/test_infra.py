"""infra/: the GKE Terraform and the container image, checked offline (no terraform binary or Docker engine here).

The HCL is parsed with the parser checkov uses (bc-python-hcl2, in .venv-tools) and checked for the settings the
design needs; checkov, hadolint and a small Dockerfile reader do the rest. A missing tool fails, never skips.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from manifests import run, tool

ROOT = Path(__file__).resolve().parents[1]
TERRAFORM = ROOT / "infra" / "terraform"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"

def strip(node):
    """Drop the parser's line markers."""
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if not k.startswith("__")}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


@pytest.fixture(scope="module")
def tf() -> dict:
    """All .tf files merged: {"resource": {type: {name: body}}, "variable": {name: body}, "output": ..., ...}.

    Attribute values come wrapped in a one-element list and blocks as lists of bodies, as the parser gives them.
    """
    script = ("import hcl2, json, pathlib, sys; print(json.dumps({p.name: hcl2.load(p.open()) "
              "for p in sorted(pathlib.Path(sys.argv[1]).glob('*.tf'))}))")
    result = run(tool("python"), "-c", script, str(TERRAFORM))
    assert result.returncode == 0, result.stderr
    merged: dict = {"resource": {}, "variable": {}, "output": {}, "locals": {}, "provider": {}, "terraform": []}
    for parsed in json.loads(result.stdout).values():
        for block in strip(parsed.get("resource", [])):
            for rtype, named in block.items():
                for name, body in named.items():
                    assert name not in merged["resource"].setdefault(rtype, {}), f"{rtype}.{name} twice"
                    merged["resource"][rtype][name] = body
        for key in ("variable", "output", "provider"):
            for block in strip(parsed.get(key, [])):
                merged[key].update(block)
        for block in strip(parsed.get("locals", [])):
            merged["locals"].update({k: v[0] for k, v in block.items()})
        merged["terraform"] += strip(parsed.get("terraform", []))
    return merged


def one(body: dict, key: str):
    """An attribute's value, or a block that occurs once."""
    values = body[key]
    assert len(values) == 1, key
    return values[0]


def resources(tf: dict, rtype: str) -> dict[str, dict]:
    return tf["resource"].get(rtype, {})


def defaults(tf: dict, text: str) -> str:
    """Substitute variables' defaults into an interpolated string."""
    return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(one(tf["variable"][m.group(1)], "default")), text)


# ---------------------------------------------------------------- cluster and node pools


def test_cluster_is_regional_private_with_workload_identity_and_network_policy(tf):
    cluster = resources(tf, "google_container_cluster")["main"]
    assert one(cluster, "location") == "${var.region}"  # a region, not a zone: regional control plane
    assert one(cluster, "remove_default_node_pool") is True
    assert one(one(cluster, "workload_identity_config"), "workload_pool") == "${var.project_id}.svc.id.goog"
    assert one(cluster, "datapath_provider") == "ADVANCED_DATAPATH"  # enforces the NetworkPolicies in k8s/
    private = one(cluster, "private_cluster_config")
    assert one(private, "enable_private_nodes") is True
    assert one(one(cluster, "node_config"), "workload_metadata_config") == {"mode": ["GKE_METADATA"]}


def node_pools(tf: dict) -> dict[str, dict]:
    return {one(body, "name"): body for body in resources(tf, "google_container_node_pool").values()}


def taints(pool: dict) -> set[tuple[str, str, str]]:
    return {(one(t, "key"), one(t, "value"), one(t, "effect")) for t in one(pool, "node_config").get("taint", [])}


def resolve_locals(tf: dict, value):
    match = re.fullmatch(r"\$\{local\.(\w+)\.(\w+)\}", value) if isinstance(value, str) else None
    return tf["locals"][match.group(1)][match.group(2)] if match else value


def test_gpu_pools_scale_from_zero_behind_taints_and_one_is_spot(tf):
    pools = node_pools(tf)
    assert set(pools) == {"system", "gpu-ondemand", "gpu-spot"}
    gpu_taint = ("nvidia.com/gpu", "present", "NO_SCHEDULE")
    for name in ("gpu-ondemand", "gpu-spot"):
        pool = pools[name]
        scaling = one(pool, "autoscaling")
        assert one(scaling, "total_min_node_count") == 0, name
        assert one(scaling, "total_max_node_count").startswith("${var."), name
        config = one(pool, "node_config")
        assert one(one(config, "guest_accelerator"), "type") == "${var.gpu_type}", name
        resolved = {tuple(resolve_locals(tf, part) for part in taint) for taint in taints(pool)}
        assert gpu_taint in resolved, name
        assert one(pool, "node_locations") == "${var.gpu_zones}", name
        assert one(config, "workload_metadata_config") == {"mode": ["GKE_METADATA"]}, name
    spot = one(pools["gpu-spot"], "node_config")
    assert one(spot, "spot") is True
    assert ("cloud.google.com/gke-spot", "true", "NO_SCHEDULE") in taints(pools["gpu-spot"])
    assert "spot" not in one(pools["gpu-ondemand"], "node_config")
    system = pools["system"]
    assert not taints(system) and "guest_accelerator" not in one(system, "node_config")
    assert one(one(system, "autoscaling"), "total_min_node_count") >= 1


# ---------------------------------------------------------------- storage and registry


def test_buckets_for_data_checkpoints_and_mlflow_are_private_with_lifecycle_rules(tf):
    buckets = resources(tf, "google_storage_bucket")
    assert set(buckets) == {"data", "checkpoints", "mlflow"}
    for name, bucket in buckets.items():
        assert one(bucket, "uniform_bucket_level_access") is True, name
        assert one(bucket, "public_access_prevention") == "enforced", name
        assert one(bucket, "name").startswith("${local.bucket_prefix}-"), name
        rules = bucket["lifecycle_rule"]
        assert any(one(one(r, "action"), "type") == "Delete" and "days_since_noncurrent_time" in one(r, "condition")
                   for r in rules), name
    # Promoted checkpoints must survive (docs/contracts.md §4): nothing there is deleted by age, only moved to Nearline.
    for rule in buckets["checkpoints"]["lifecycle_rule"]:
        action, condition = one(rule, "action"), one(rule, "condition")
        assert one(action, "type") != "Delete" or set(condition) == {"days_since_noncurrent_time"}
    assert any(one(one(r, "action"), "storage_class") == "NEARLINE"
               for r in buckets["checkpoints"]["lifecycle_rule"] if "storage_class" in one(r, "action"))


def test_artifact_registry_holds_docker_images_with_immutable_tags(tf):
    repo = resources(tf, "google_artifact_registry_repository")["images"]
    assert one(repo, "format") == "DOCKER"
    assert one(one(repo, "docker_config"), "immutable_tags") is True
    assert one(one(repo, "cleanup_policies"), "action") == "DELETE"


# ---------------------------------------------------------------- identities


def render_gke_overlay() -> list[dict]:
    result = run(tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / "gke"))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_workload_identity_binds_exactly_the_kubernetes_service_accounts_of_the_manifests(tf):
    identities = tf["locals"]["workload_identities"]
    bound = {name: defaults(tf, ident["ksa"]) for name, ident in identities.items()}
    binding = resources(tf, "google_service_account_iam_member")["workload_identity"]
    assert one(binding, "role") == "roles/iam.workloadIdentityUser"
    assert one(binding, "member") == "serviceAccount:${local.workload_pool}[${each.value.ksa}]"
    objects = render_gke_overlay()
    annotated = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o["metadata"]["annotations"]
                 for o in objects if o["kind"] == "ServiceAccount"}
    runner = next(o for o in objects if o["kind"] == "RoleBinding")["subjects"][0]
    assert bound == {"trainer": "maeclip/maeclip-trainer", "mlflow": "maeclip/maeclip-mlflow",
                     "pipeline": f"{runner['namespace']}/{runner['name']}"}
    # Each annotated KSA names the Google account bound to it (same account_id, from the default name).
    accounts = {key: defaults(tf, one(body, "account_id")) for key, body in
                resources(tf, "google_service_account").items()}
    for name in ("trainer", "mlflow"):
        email = annotated[bound[name]]["iam.gke.io/gcp-service-account"]
        assert email.split("@")[0] == accounts[name]


def test_terraform_prints_every_setting_the_gke_overlay_reads(tf):
    value = one(tf["output"]["kustomize_settings"], "value")
    printed = [line.split("=", 1)[0] for line in value.strip().splitlines()]
    settings = ROOT / "k8s" / "overlays" / "gke" / "settings.env"
    expected = [line.split("=", 1)[0] for line in settings.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert printed == expected


# ---------------------------------------------------------------- hygiene


def test_no_hard_coded_project_or_credentials(tf):
    provider = tf["provider"]["google"]
    assert one(provider, "project") == "${var.project_id}"
    assert not {"credentials", "access_token"} & set(provider)
    assert "default" not in tf["variable"]["project_id"]
    assert "google_service_account_key" not in tf["resource"]
    text = "\n".join(path.read_text() for path in sorted(TERRAFORM.glob("*.tf")))
    for pattern in (r"\.json\b", r"PRIVATE KEY", r"\bprojects/[a-z]", r"[a-z][-a-z0-9]{5,29}\.iam\.gserviceaccount"):
        assert not re.search(pattern, text), pattern
    for rtype, named in tf["resource"].items():
        for name, body in named.items():
            if "project" in body:
                assert one(body, "project") == "${var.project_id}", f"{rtype}.{name}"
    assert not list(TERRAFORM.glob("*.tfvars")), "tfvars hold a project's values: keep them out of the repository"


def test_every_variable_is_typed_described_and_used(tf):
    text = "\n".join(path.read_text() for path in sorted(TERRAFORM.glob("*.tf")) if path.name != "variables.tf")
    for name, body in tf["variable"].items():
        assert "type" in body, name
        assert len(one(body, "description")) > 15, name
        assert re.search(rf"\bvar\.{name}\b", text), f"variable {name} is never used"


def test_checkov_passes_on_terraform_and_the_dockerfile_with_justified_waivers(tmp_path):
    # One scan over copies: checkov repeats earlier directories' results when given several.
    shutil.copytree(TERRAFORM, tmp_path / "terraform")
    shutil.copytree(DOCKERFILE.parent, tmp_path / "docker")
    # A bucket with none of the required settings, in the same run, proves checkov is checking.
    bad = tmp_path / "known-bad" / "main.tf"
    bad.parent.mkdir()
    bad.write_text('resource "google_storage_bucket" "open" {\n  name = "x"\n  location = "US"\n}\n')
    result = run(tool("checkov"), "-d", str(tmp_path), "--framework", "terraform", "dockerfile", "--skip-download",
                 "--output", "json")
    reports = json.loads(result.stdout)
    assert {r["check_type"] for r in reports} == {"terraform", "dockerfile"}
    assert all(r["summary"]["parsing_errors"] == 0 and r["summary"]["resource_count"] > 0 for r in reports)
    failed = [c for r in reports for c in r["results"]["failed_checks"]]
    assert failed and {c["file_path"] for c in failed} == {"/known-bad/main.tf"}, [
        (c["check_id"], c["file_path"]) for c in failed]
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    assert {c["file_path"].split("/")[1] for c in skipped} == {"terraform", "docker"}
    for check in skipped:
        assert len(check["check_result"]["suppress_comment"]) > 20, check["check_id"]


# ---------------------------------------------------------------- the image


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            if current.strip():
                keyword, _, args = current.strip().partition(" ")
                lines.append((keyword.upper(), args.strip()))
            current = ""
    return lines


def test_dockerfile_is_multi_stage_pinned_non_root_and_installs_torch_first():
    steps = instructions(DOCKERFILE)
    bases = [args.split()[0] for op, args in steps if op == "FROM"]
    assert len(bases) >= 2
    for base in bases:
        _, _, tag = base.partition("@")[0].rpartition(":")
        assert "@sha256:" in base or re.fullmatch(r"\d+\.\d+\.\d+-[a-z-]+", tag), base
    # The venv is copied between stages: it only works on the same Python build.
    assert len(set(bases)) == 1
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    users = [args for op, args in final if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d{3,}(:[1-9]\d{3,})?", users[-1])
    runs = [args for op, args in steps if op == "RUN"]
    torch = next(i for i, cmd in enumerate(runs) if "torch torchvision" in cmd)
    package = next(i for i, cmd in enumerate(runs) if re.search(r"pip install -c constraints\.txt \.(\s|$)", cmd))
    assert torch < package and "-c constraints.txt" in runs[torch]
    for op, args in steps:
        if op in {"ENV", "ARG"}:
            assert not re.search(r"(?i)(secret|token|password|credential|_key)\b", args), args


def test_dockerignore_admits_exactly_what_the_image_copies():
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # everything is excluded, then the image's inputs are let back in
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for op, args in instructions(DOCKERFILE):
        if op == "COPY" and "--from" not in args:
            copied.update(part.rstrip("/") for part in args.split()[:-1])
    assert copied == admitted


def test_hadolint_is_clean(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    assert run(tool("hadolint"), str(bad)).returncode != 0  # the linter does reject
    result = run(tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout
