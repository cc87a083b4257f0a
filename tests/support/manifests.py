"""Offline checks of Kubernetes objects that several tests run: the linters installed in .venv-tools
(tests/tools/install.sh), and Kubernetes' own schemas through kubernetes-validate, which skips custom resources,
so their pod templates are checked as ``v1 PodTemplate`` objects. A missing tool fails a test, it never skips."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".venv-tools" / "bin"
VOLCANO = ROOT / "tests" / "data" / "volcano"  # Volcano v1.15.1's CRDs and job policy, with their source


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `bash tests/tools/install.sh`")
    return str(path)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def as_pod_templates(owner: str, templates: list[dict]) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{owner}-{i}".lower()},
             "template": template} for i, template in enumerate(templates)]


def kubernetes_validate(tmp: Path, version: str, files: dict[str, list[dict]]) -> tuple[int, str]:
    """Validate each file's objects strictly against Kubernetes ``version``; (exit status, output)."""
    paths = []
    for name, docs in files.items():
        path = tmp / name
        path.write_text(yaml.safe_dump_all(docs))
        paths.append(str(path))
    result = run(tool("kubernetes-validate"), "-k", version, "--strict", "--quiet", *paths)
    return result.returncode, result.stdout + result.stderr


def strict(schema: dict) -> dict:
    """A CRD's structural schema as JSON Schema that rejects unknown fields: the API server would prune them
    silently, so a misspelt field would be lost without a word."""
    schema = dict(schema)
    if "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(sub) for sub in schema[key]]
    return schema


def crd_validator(path: Path, version: str) -> jsonschema.Draft7Validator:
    """A strict validator for the objects of the CRD at ``path``, at API ``version``."""
    crd = yaml.safe_load(path.read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))
