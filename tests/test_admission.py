"""The admission rules a Volcano job meets on the cluster, evaluated offline with a CEL evaluator (cel-python):
maeclip's own ValidatingAdmissionPolicy (k8s/base/admission.yaml: pods as maeclip-trainer, at a training priority,
with no Secret or volume but their own) and Volcano v1.15.1's job validation policy, against the jobs maeclip
renders and against jobs that must be refused."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import celpy
import pytest
import yaml
from celpy import celtypes

from trainer.launch import dryrun_training

ROOT = Path(__file__).resolve().parents[1]
OURS = ROOT / "k8s" / "base" / "admission.yaml"
VOLCANO = ROOT / "tests" / "data" / "volcano" / "jobs-validating.yaml"

# Kubernetes' CEL library (k8s.io/apiserver pkg/cel/library) as far as Volcano's policy uses it: lists' sum(),
# strings' join(), and the format library, whose validate() gives an optional list of errors.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _label_errors(value: str) -> list[str]:
    return [] if len(value) <= 63 and _DNS1123_LABEL.fullmatch(value) else ["not a DNS-1123 label"]


def _qualified_name_errors(value: str) -> list[str]:
    prefix, _, name = value.rpartition("/")
    prefix_ok = (len(prefix) <= 253 and _SUBDOMAIN.fullmatch(prefix)) if "/" in value else True
    ok = len(name) <= 63 and _QUALIFIED.fullmatch(name) and prefix_ok
    return [] if ok else ["not a qualified name"]


FORMATS: dict[str, Callable[[str], list[str]]] = {"dns1123Label": _label_errors,
                                                  "qualifiedName": _qualified_name_errors}
SHIMS = {
    "sum": lambda items: celtypes.IntType(sum(items)),
    "join": lambda items, sep: celtypes.StringType(str(sep).join(items)),
    **{name: (lambda _format, name=name: celtypes.StringType(name)) for name in FORMATS},
    # An optional as a list of errors: empty is "no value".
    "validate": lambda fmt, value: celtypes.ListType(map(celtypes.StringType, FORMATS[str(fmt)](str(value)))),
    "hasValue": lambda optional: celtypes.BoolType(len(optional) > 0),
    "orValue": lambda optional, default: optional if len(optional) else default,
}


def refusals(policy: dict, job: dict, operation: str = "CREATE") -> list[str]:
    """The messages of the policy's validations that ``job`` fails, as the API server would evaluate them."""
    env = celpy.Environment()

    def evaluate(expression: str, activation: dict):
        try:
            return env.program(env.compile(expression), functions=SHIMS).evaluate(activation)
        except celpy.CELEvalError as err:
            return err

    activation = {"object": celpy.json_to_cel(job), "oldObject": celpy.json_to_cel(None),
                  "request": celpy.json_to_cel({"operation": operation}),
                  "format": celtypes.StringType("format")}  # the format library's root
    variables = {}
    for variable in policy["spec"].get("variables", []):
        variables[variable["name"]] = evaluate(variable["expression"], {**activation, "variables": variables})
    activation["variables"] = celtypes.MapType({celtypes.StringType(k): v for k, v in variables.items()})
    # Anything but true refuses, an evaluation error included (failurePolicy: Fail).
    return [v["message"] for v in policy["spec"]["validations"]
            if not _is_true(evaluate(v["expression"], activation))]


def _is_true(result) -> bool:
    return isinstance(result, celtypes.BoolType) and bool(result)


@pytest.fixture(scope="module")
def ours() -> dict:
    policy, binding = yaml.safe_load_all(OURS.read_text())
    assert (policy["kind"], binding["kind"]) == ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    return policy


@pytest.fixture(scope="module")
def volcano() -> dict:
    return next(doc for doc in yaml.safe_load_all(VOLCANO.read_text()) if doc["kind"] == "ValidatingAdmissionPolicy")


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict]:
    return {"tiny-clip 1x1": dryrun_training("tiny-clip", nnodes="1", nproc_per_node=1, environ={}),
            "vit-b16-maeclip-gap 2:4x8": dryrun_training("vit-b16-maeclip-gap", nnodes="2:4", nproc_per_node=8,
                                                         environ={})}


def test_the_policy_guards_volcano_jobs_in_maeclip_only(ours):
    constraints = ours["spec"]["matchConstraints"]
    assert constraints["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "maeclip"}}
    assert constraints["resourceRules"] == [{"apiGroups": ["batch.volcano.sh"], "apiVersions": ["v1alpha1"],
                                             "operations": ["CREATE", "UPDATE"], "resources": ["jobs"]}]
    assert ours["spec"]["failurePolicy"] == "Fail"


@pytest.mark.parametrize("name", ["tiny-clip 1x1", "vit-b16-maeclip-gap 2:4x8"])
def test_the_jobs_maeclip_renders_are_admitted_by_its_policy_and_volcanos(ours, volcano, jobs, name):
    assert refusals(ours, jobs[name]) == []
    assert refusals(volcano, jobs[name]) == []


SERVICE_ACCOUNT = "the pods of a Volcano job in maeclip run as the service account maeclip-trainer"
PRIORITY = "a Volcano job in maeclip runs at priority class maeclip-train or maeclip-study, it and its pods"
SECRETS = "the pods of a Volcano job in maeclip read no Secret but mlflow-trainer and maeclip-storage"
VOLUMES = "the pods of a Volcano job in maeclip mount only emptyDir volumes and run only their own containers"


def _pod(job: dict) -> dict:
    return job["spec"]["tasks"][0]["template"]["spec"]


def _container(job: dict) -> dict:
    return _pod(job)["containers"][0]


# (what the job tries, how, the one rule that refuses it)
REFUSED: list[tuple[str, Callable[[dict], object], str]] = [
    ("MLflow's service account", lambda j: _pod(j).update(serviceAccountName="maeclip-mlflow"), SERVICE_ACCOUNT),
    ("the namespace's default account", lambda j: _pod(j).pop("serviceAccountName"), SERVICE_ACCOUNT),
    ("the deprecated field", lambda j: _pod(j).update(serviceAccount="maeclip-mlflow"), SERVICE_ACCOUNT),
    ("MLflow's priority", lambda j: j["spec"].update(priorityClassName="maeclip-service"), PRIORITY),
    ("no priority", lambda j: j["spec"].pop("priorityClassName"), PRIORITY),
    ("a pod above its job", lambda j: _pod(j).update(priorityClassName="maeclip-service"), PRIORITY),
    ("MLflow's passwords", lambda j: _container(j)["env"].append(
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "admin-password"}}}), SECRETS),
    ("every key of a Secret", lambda j: _container(j).update(envFrom=[{"secretRef": {"name": "mlflow-db"}}]),
     SECRETS),
    ("a Secret volume", lambda j: _pod(j)["volumes"].append({"name": "x", "secret": {"secretName": "mlflow-auth"}}),
     VOLUMES),
    ("MLflow's artifact volume", lambda j: _pod(j)["volumes"].append(
        {"name": "x", "persistentVolumeClaim": {"claimName": "mlflow-artifacts"}}), VOLUMES),
    ("the node's disk", lambda j: _pod(j)["volumes"].append({"name": "x", "hostPath": {"path": "/"}}), VOLUMES),
    ("a volume claim of the job", lambda j: j["spec"].update(volumes=[{"mountPath": "/d", "volumeClaimName": "c"}]),
     VOLUMES),
    ("an init container", lambda j: _pod(j).update(initContainers=[{"name": "i", "image": "busybox:1.37"}]),
     VOLUMES),
]


@pytest.mark.parametrize(("what", "change", "rule"), REFUSED, ids=[case[0] for case in REFUSED])
def test_a_job_that_reaches_beyond_its_identity_is_refused_by_exactly_its_rule(ours, jobs, what, change, rule):
    job = copy.deepcopy(jobs["vit-b16-maeclip-gap 2:4x8"])
    change(job)
    assert refusals(ours, job) == [rule]


def test_volcanos_own_rules_refuse_what_they_should(volcano, jobs):
    """The shims and the evaluator are not vacuous: Volcano's policy refuses a job it must refuse."""
    job = copy.deepcopy(jobs["tiny-clip 1x1"])
    job["spec"]["tasks"][0]["name"] = "Train_0"
    assert refusals(volcano, job) == [
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters"]
    job = copy.deepcopy(jobs["tiny-clip 1x1"])
    job["spec"]["minAvailable"] = 2  # more than the one task can make
    assert refusals(volcano, job) == ["job 'minAvailable' should not be greater than total replicas in tasks"]
