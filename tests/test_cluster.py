"""The Volcano job maeclip submits, rendered by its own launch path (``trainer.launch.dryrun_training``: the
checks and rendering of ``run_training(..., scheduler="kubernetes")``, without submitting) for tiny-clip on 1 node
x 1 process and vit-b16-maeclip-gap on 2:4 nodes x 8: what of the launcher's environment reaches the pods, their
identity, priority, resources and retries, and the job against Volcano v1.15.1's Job CRD schema (strictly) and
each pod template against Kubernetes' own (kubernetes-validate)."""

from __future__ import annotations

import copy
import json
import re
import shlex

import jsonschema
import pytest
from manifests import VOLCANO, as_pod_templates, crd_validator, kubernetes_validate

from trainer.cluster import FORWARDED_ENV, Cluster
from trainer.config import ConfigError
from trainer.launch import dryrun_training

# What a laptop or a pipeline step has in its environment when it launches, each value recognisable.
LAUNCHER = {
    "PATH": "/home/launcher-user/.venv/bin:/opt/launcher/bin",
    "HOME": "/home/launcher-user",
    "VIRTUAL_ENV": "/home/launcher-user/.venv",
    "PYTHONPATH": "/home/launcher-user/src",
    "KUBECONFIG": "/home/launcher-user/.kube/config",
    "LOGLEVEL": "DEBUG",  # dist.torchrun would copy this one
    "MLFLOW_TRACKING_USERNAME": "launcher-mlflow-user",
    "MLFLOW_TRACKING_PASSWORD": "launcher-mlflow-password",
    "AWS_ACCESS_KEY_ID": "launcher-key-id",
    "AWS_SECRET_ACCESS_KEY": "launcher-secret-key",
    "GOOGLE_APPLICATION_CREDENTIALS": "/home/launcher-user/gcp-key.json",
    # the settings forwarded on purpose (trainer.cluster.FORWARDED_ENV)
    "MLFLOW_TRACKING_URI": "https://mlflow.launcher.example",
    "AWS_ENDPOINT_URL": "https://s3.launcher.example",
    "AWS_DEFAULT_REGION": "eu-launcher-1",
}
FORWARDED = {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}
# TorchX's own variables (job id, session, rank-0 host, image, tracking names), and the log level the job sets.
OWN = {"LOGLEVEL"}

RENDERS = {
    "tiny-clip 1x1": {"preset": "tiny-clip", "nnodes": "1", "nproc_per_node": 1, "cluster": {}},
    "vit-b16-maeclip-gap 2:4x8": {"preset": "vit-b16-maeclip-gap", "nnodes": "2:4", "nproc_per_node": 8,
                                  "cluster": {"priority_class": "maeclip-study", "max_retries": 5}},
}
# Worked out by hand from k8s/README.md's table, not from trainer/cluster.py.
EXPECTED = {
    # 1 agent + 1 rank + tiny-clip's 2 loader workers; shm 512 + 2 x 1024; memory 2048 + 8192 + 2 x 1024 + shm
    "tiny-clip 1x1": {"tasks": 1, "min_nodes": 1, "priority": "maeclip-train", "retries": 3,
                      "cpu": "4000m", "memory": "14848M", "gpus": "1", "shm": "2560M"},
    # 1 + 8 x (1 + ViT-B/16's 8 workers); shm 8 x (512 + 8 x 1024); memory 2048 + 8 x (8192 + 8 x 1024) + shm
    "vit-b16-maeclip-gap 2:4x8": {"tasks": 4, "min_nodes": 2, "priority": "maeclip-study", "retries": 5,
                                  "cpu": "73000m", "memory": "202752M", "gpus": "8", "shm": "69632M"},
}


def render(preset: str, nnodes: str, nproc_per_node: int, cluster: dict, **kwargs) -> dict:
    return dryrun_training(preset, kwargs.pop("overrides", ()), nnodes=nnodes, nproc_per_node=nproc_per_node,
                           cluster=Cluster.from_dict(cluster), **kwargs)


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict]:
    """Both renders, launched from an environment that holds ``LAUNCHER`` (TorchX reads os.environ itself)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in FORWARDED_ENV:  # the session's own (the storage emulators set S3_ENDPOINT_URL) do not count
            patch.delenv(name, raising=False)
        for name, value in LAUNCHER.items():
            patch.setenv(name, value)
        return {name: render(**args) for name, args in RENDERS.items()}


def pods(job: dict) -> list[dict]:
    return [task["template"]["spec"] for task in job["spec"]["tasks"]]


def container(pod: dict) -> dict:
    (only,) = pod["containers"]
    return only


def torchrun_args(pod: dict) -> list[str]:
    return shlex.split(container(pod)["command"][-1].removeprefix("exec "))


@pytest.mark.parametrize("name", RENDERS)
def test_no_variable_of_the_launcher_reaches_a_pod_but_the_forwarded_ones(jobs, name):
    job = jobs[name]
    text = json.dumps(job)
    for variable, value in LAUNCHER.items():
        assert (value in text) == (variable in FORWARDED), variable
    for pod in pods(job):
        env = container(pod)["env"]
        valued = {e["name"]: e["value"] for e in env if "value" in e}
        assert {n for n in valued if not n.startswith("TORCHX_")} == FORWARDED | OWN
        assert all(valued[n] == LAUNCHER[n] for n in FORWARDED) and valued["LOGLEVEL"] == "WARNING"
        # Credentials come from the namespace's Secrets, by reference.
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
        assert refs == {"MLFLOW_TRACKING_USERNAME": {"name": "mlflow-trainer", "key": "username"},
                        "MLFLOW_TRACKING_PASSWORD": {"name": "mlflow-trainer", "key": "password"},
                        "AWS_ACCESS_KEY_ID": {"name": "maeclip-storage", "key": "AWS_ACCESS_KEY_ID", "optional": True},
                        "AWS_SECRET_ACCESS_KEY": {"name": "maeclip-storage", "key": "AWS_SECRET_ACCESS_KEY",
                                                  "optional": True}}


@pytest.mark.parametrize("name", RENDERS)
def test_pods_run_as_the_trainer_at_the_configured_priority_in_maeclips_queue(jobs, name):
    job, expected = jobs[name], EXPECTED[name]
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    assert job["metadata"]["namespace"] == "maeclip"
    spec = job["spec"]
    assert (spec["schedulerName"], spec["queue"], spec["priorityClassName"]) == ("volcano", "maeclip",
                                                                                 expected["priority"])
    for pod in pods(job):
        assert pod["serviceAccountName"] == "maeclip-trainer" and pod["automountServiceAccountToken"] is False
        assert pod["priorityClassName"] == expected["priority"]
        assert container(pod)["image"] == "maeclip:0.1.0"
        # a preemptible (study) job may take the spot pool's nodes; a training run stays off them
        spot = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
        assert pod.get("tolerations", []) == ([spot] if expected["priority"] == "maeclip-study" else [])


@pytest.mark.parametrize("name", RENDERS)
def test_each_pod_gets_resources_for_its_processes_and_loader_workers(jobs, name):
    expected = EXPECTED[name]
    for pod in pods(jobs[name]):
        limits = container(pod)["resources"]["limits"]
        assert limits == {"cpu": expected["cpu"], "memory": expected["memory"], "nvidia.com/gpu": expected["gpus"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": expected["shm"]}
        args = torchrun_args(pod)
        assert args[args.index("--nproc_per_node") + 1] == expected["gpus"]  # one GPU per process


def test_resources_given_as_flags_or_pipeline_settings_win_over_the_derived_ones():
    # kfp hands a dict's numbers over as floats; gpus 0 is a CPU-only job.
    job = render("tiny-clip", "1", 2, {"cpu": 16.0, "memory_mb": 65536.0, "gpus": 0.0, "shm_mb": 4096.0},
                 environ={})
    for pod in pods(job):
        assert container(pod)["resources"]["limits"] == {"cpu": "16000m", "memory": "65536M"}
        assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "4096M"
    with pytest.raises(ConfigError, match=re.escape("cluster.memory_mb: 2048 MB leaves no room beside the 2560 MB")):
        render("tiny-clip", "1", 1, {"memory_mb": 2048}, environ={})
    with pytest.raises(ConfigError, match="unknown setting 'memory'; did you mean 'memory_mb'"):
        Cluster.from_dict({"memory": 1})
    with pytest.raises(ConfigError, match=re.escape("cluster.cpu: 0 is not an integer within [1, 1024]")):
        Cluster.from_dict({"cpu": 0})


def tracking_uri(job: dict) -> str:
    (value,) = {e["value"] for pod in pods(job) for e in container(pod)["env"] if e["name"] == "MLFLOW_TRACKING_URI"}
    return value


def test_the_tracking_uri_comes_from_the_config_else_the_launcher_else_the_namespaces_server():
    launcher = {"MLFLOW_TRACKING_URI": "https://mlflow.launcher.example"}
    assert tracking_uri(render("tiny-clip", "1", 1, {}, environ=launcher)) == "https://mlflow.launcher.example"
    configured = render("tiny-clip", "1", 1, {}, environ=launcher, overrides=["tracking.uri=https://cfg.example"])
    assert tracking_uri(configured) == "https://cfg.example"
    assert tracking_uri(render("tiny-clip", "1", 1, {"namespace": "research"}, environ={})) == \
        "http://mlflow.research.svc.cluster.local:5000"
    # A store on the launching machine would be a file inside each pod, lost when it ends.
    with pytest.raises(ConfigError, match=re.escape("MLFLOW_TRACKING_URI: 'sqlite:////home/me/mlflow.db' is a store")):
        render("tiny-clip", "1", 1, {}, environ={"MLFLOW_TRACKING_URI": "sqlite:////home/me/mlflow.db"})
    with pytest.raises(ConfigError, match=re.escape("tracking.uri: 'file:///tmp/mlruns' is a store on this machine")):
        render("tiny-clip", "1", 1, {}, environ=launcher, overrides=["tracking.uri=file:///tmp/mlruns"])


@pytest.mark.parametrize("name", RENDERS)
def test_an_evicted_or_failed_pod_restarts_the_job_at_max_nodes_within_its_own_budget(jobs, name):
    """k8s/README.md, "Recovery": Volcano restarts the whole job (all tasks, so back to max nodes) on PodEvicted
    and PodFailed, at most maxRetry times; torchrun's --max-restarts inside a pod is a separate budget."""
    job, expected = jobs[name], EXPECTED[name]
    tasks = job["spec"]["tasks"]
    assert job["spec"]["maxRetry"] == expected["retries"]
    assert len(tasks) == expected["tasks"] and all(task["replicas"] == 1 for task in tasks)  # max nodes
    assert sum(task.get("minAvailable", 1) for task in tasks) == expected["min_nodes"]  # the gang
    for task in tasks:
        assert task["policies"] == [{"event": "PodEvicted", "action": "RestartJob"},
                                    {"event": "PodFailed", "action": "RestartJob"}]
        assert task["maxRetry"] == expected["retries"]
        args = torchrun_args(task["template"]["spec"])
        assert args[args.index("--max-restarts") + 1] == "3"
        assert args[args.index("--nnodes") + 1] == RENDERS[name]["nnodes"]
    never = render("tiny-clip", "1", 1, {"max_retries": 0}, environ={})
    assert never["spec"]["maxRetry"] == 0 and "policies" not in never["spec"]["tasks"][0]


@pytest.mark.parametrize("name", RENDERS)
def test_pods_write_only_to_their_emptydir_volumes(jobs, name):
    for pod in pods(jobs[name]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(volumes) == {"dshm", "tmp", "home"} and all("emptyDir" in v for v in volumes.values())
        mounts = {m["mountPath"]: m["name"] for m in container(pod)["volumeMounts"]}
        assert mounts == {"/dev/shm": "dshm", "/tmp": "tmp", "/home/maeclip": "home"}
        assert container(pod)["securityContext"]["readOnlyRootFilesystem"] is True


# ---------------------------------------------------------------- schemas


@pytest.fixture(scope="module")
def volcano_job_schema() -> jsonschema.Draft7Validator:
    return crd_validator(VOLCANO / "batch.volcano.sh_jobs.yaml", "v1alpha1")


def broken(job: dict) -> dict:
    """The job with a field its pod template's container does not have, as a typo would leave it."""
    job = copy.deepcopy(job)
    container(job["spec"]["tasks"][0]["template"]["spec"])["imagePullPolicyy"] = "Always"
    return job


def test_jobs_validate_against_volcanos_crd_and_fail_when_broken(jobs, volcano_job_schema):
    for name, job in jobs.items():
        assert [e.message for e in volcano_job_schema.iter_errors(job)] == [], name
    errors = [e.message for e in volcano_job_schema.iter_errors(broken(jobs["tiny-clip 1x1"]))]
    assert len(errors) == 1 and "'imagePullPolicyy' was unexpected" in errors[0]
    wrong_type = copy.deepcopy(jobs["tiny-clip 1x1"])
    wrong_type["spec"]["maxRetry"] = "3"
    assert [e.message for e in volcano_job_schema.iter_errors(wrong_type)] == ["'3' is not of type 'integer'"]


def test_pod_templates_validate_against_kubernetes_and_fail_when_broken(jobs, tmp_path):
    files = {f"{i}.yaml": as_pod_templates(f"job-{i}", [t["template"] for t in job["spec"]["tasks"]])
             for i, job in enumerate(jobs.values())}
    files["broken.yaml"] = as_pod_templates("broken", [broken(jobs["tiny-clip 1x1"])["spec"]["tasks"][0]["template"]])
    assert sum(len(docs) for docs in files.values()) == 1 + 4 + 1
    code, output = kubernetes_validate(tmp_path, "1.33.0", files)
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    assert code != 0 and len(errors) == 1 and "broken.yaml" in errors[0] and "imagePullPolicyy" in errors[0], output
