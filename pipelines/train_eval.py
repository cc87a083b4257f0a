"""The ``train_eval`` pipeline: corpus → K segments of [train → evaluate → gate] → register the best checkpoint.

K is fixed at compile time (``make_train_eval(segments)``). kfp has no loops with early exit, so the chain is
nested: segment k is its own sub-pipeline whose ``dsl.If(gate passed)`` branch holds segment k + 1 (or, for
the last one, the register step) and whose ``dsl.Else`` branch registers at once. A failed gate therefore
stops every later segment, and exactly one register step runs per chain; it registers the best checkpoint the
gate passed so far, or nothing when none did. Each segment's output is the register record, passed up with
``dsl.OneOf`` so a study can ``dsl.Collected`` whole chains.
"""


from dataclasses import dataclass, field

from kfp import dsl, kubernetes

from evaluators.policies import policy_for
from pipelines import components

# The default preset's policy; the CLI passes the preset's own (evaluators/policies.py) for other objectives.
DEFAULT_POLICY = policy_for("clip")


@dataclass(frozen=True)
class Platform:
    """Where the components run on a Kubernetes cluster (ignored by ``kfp.local``).

    Evaluation steps go to GPU nodes (node selector, toleration of the GPU taint, accelerator count) with a
    memory-backed /dev/shm for data-loader workers; training steps only launch the TorchX job, whose pods
    Volcano schedules (``trainer/cluster.py``), so they hold no GPU. Every step gets the image (a
    pipeline parameter, which the TorchX training job runs too), the secrets mapped to environment
    variables (e.g. storage credentials) and an MLflow identity: the gate's for the steps that gate and
    register, the one every other step shares for the rest, so that only the gate can move registry aliases
    (k8s/README.md, "Identities").
    """

    gpu_node_selector: dict[str, str] = field(
        default_factory=lambda: {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"})
    gpu_toleration: dict[str, str] = field(
        default_factory=lambda: {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    accelerator_type: str = "nvidia.com/gpu"
    gpus: int = 1
    shm_size: str = "16Gi"
    # secret name -> {secret key: environment variable}; optional, so clusters using workload identity need none
    secrets: dict[str, dict[str, str]] = field(default_factory=lambda: {
        "maeclip-storage": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}})
    # The MLflow users of the pipeline's steps and of its gate: Secrets with keys username and password in the
    # pipeline's namespace; required, since the MLflow server refuses anonymous clients.
    tracking_secret: str = "mlflow-pipeline"
    gate_tracking_secret: str = "mlflow-gate"

    def apply(self, task: dsl.PipelineTask, image, *, gpu: bool = False, gate: bool = False) -> dsl.PipelineTask:
        """Set image, secrets and MLflow identity (with ``gate``, the gate's) on ``task``; with ``gpu``, also GPU
        nodes, accelerators and /dev/shm."""
        task.set_container_image(image)
        for name, keys in self.secrets.items():
            kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=keys, optional=True)
        kubernetes.use_secret_as_env(task, secret_name=self.gate_tracking_secret if gate else self.tracking_secret,
                                     secret_key_to_env={"username": "MLFLOW_TRACKING_USERNAME",
                                                        "password": "MLFLOW_TRACKING_PASSWORD"})
        if gpu:
            task.set_accelerator_type(self.accelerator_type).set_accelerator_limit(self.gpus)
            for label, value in self.gpu_node_selector.items():
                kubernetes.add_node_selector(task, label_key=label, label_value=value)
            kubernetes.add_toleration(task, **self.gpu_toleration)
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=self.shm_size)
        return task


DEFAULT_PLATFORM = Platform()


def _segment_pipeline(segment: int, segments: int, platform: Platform):
    """Segment ``segment`` of ``segments`` and, behind its gate, the rest of the chain."""
    rest = _segment_pipeline(segment + 1, segments, platform) if segment < segments else None

    @dsl.pipeline(name=f"segment-{segment}-of-{segments}")
    def chain(preset: str, overrides: list, data_url: str, run_url: str, tracking_uri: str, nnodes: str,
              nproc_per_node: int, scheduler: str, image: str, cluster: dict, suite: str, gate_policy: dict,
              model_name: str) -> str:
        trained = platform.apply(components.train_segment(
            preset=preset, overrides=overrides, data_url=data_url, run_url=run_url, tracking_uri=tracking_uri,
            nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler, segment=segment,
            segments=segments, image=image, cluster=cluster), image).set_retry(num_retries=2)
        # a launcher (TorchX schedules the training job's pods); a retry resumes a stopped or failed job
        evaluated = platform.apply(components.evaluate(
            checkpoint_url=trained.output, suite=suite, tracking_uri=tracking_uri), image, gpu=True)
        gated = platform.apply(components.gate(checkpoint_url=evaluated.output, policy=gate_policy), image,
                               gate=True)
        for task in (trained, evaluated, gated):
            task.set_caching_options(False)  # side effects: checkpoints, markers, MLflow
        with dsl.If(gated.output == True, name="gate-passed"):  # noqa: E712 - a kfp condition, not a bool test
            if rest is None:
                done = _register(platform, image, run_url, gate_policy, model_name, tracking_uri)
            else:
                done = rest(preset=preset, overrides=overrides, data_url=data_url, run_url=run_url,
                            tracking_uri=tracking_uri, nnodes=nnodes, nproc_per_node=nproc_per_node,
                            scheduler=scheduler, image=image, cluster=cluster, suite=suite,
                            gate_policy=gate_policy, model_name=model_name)
        with dsl.Else(name="gate-failed"):
            stopped = _register(platform, image, run_url, gate_policy, model_name, tracking_uri)
        return dsl.OneOf(done.output, stopped.output)

    return chain


def _register(platform: Platform, image, run_url, gate_policy, model_name, tracking_uri) -> dsl.PipelineTask:
    task = components.register(run_url=run_url, policy=gate_policy, model_name=model_name,
                               tracking_uri=tracking_uri)
    return platform.apply(task, image, gate=True).set_caching_options(False)


def make_chain(segments: int, platform: Platform = DEFAULT_PLATFORM):
    """The gated chain of ``segments`` training segments as a sub-pipeline (``study`` runs one per variant)."""
    if segments < 1:
        raise ValueError(f"segments must be at least 1, got {segments}")
    return _segment_pipeline(1, segments, platform)


def make_train_eval(segments: int = 2, platform: Platform = DEFAULT_PLATFORM):
    """``train_eval`` with ``segments`` gated training segments."""
    chain = make_chain(segments, platform)

    @dsl.pipeline(name="maeclip-train-eval",
                  description=f"Corpus (shapes, existing or ingested), then {segments} segment(s) of train → "
                              "evaluate → gate; the best passing checkpoint is registered.")
    def train_eval(
        preset: str = "tiny-clip",
        overrides: list = [],  # noqa: B006 - kfp takes pipeline defaults from the signature
        corpus: str = "shapes",
        data_url: str = "file://.maeclip/data/shapes",
        source_url: str = "",
        source_format: str = "",
        run_url: str = "file://.maeclip/runs/tiny-clip",
        tracking_uri: str = "",
        nnodes: str = "1",
        nproc_per_node: int = 2,
        scheduler: str = "local_cwd",
        image: str = components.IMAGE,
        cluster: dict = {},  # noqa: B006 - trainer.cluster.Cluster settings of the training job
        n_train: int = 4096,
        n_eval: int = 512,
        seed: int = 0,
        suite: str = "quick",
        gate_policy: dict = DEFAULT_POLICY,
        model_name: str = "maeclip",
    ) -> str:
        prepared = platform.apply(components.prepare_corpus(
            corpus=corpus, data_url=data_url, source_url=source_url, source_format=source_format, n_train=n_train,
            n_eval=n_eval, seed=seed), image)
        return chain(preset=preset, overrides=overrides, data_url=prepared.output, run_url=run_url,
                     tracking_uri=tracking_uri, nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler,
                     image=image, cluster=cluster, suite=suite, gate_policy=gate_policy, model_name=model_name).output

    return train_eval
