"""The ``study`` pipeline: arms × poolings × data sizes × seeds, each variant trained the same steps, then one
report of cells (mean ± 95 % CI over seeds) and paired differences arm − baseline.

A study is a controlled experiment (docs/study.md):
- an *arm* is a preset that differs from the baseline ``clip`` only in the keys it sets (``trainer/arms.py``);
- every variant trains the same steps: in a study the gate marks each segment's checkpoint and decides what is
  registered, never how long a variant trains;
- data sizes are nested deterministic subsets of the corpus (``data.max_samples``), the same for every arm and
  seed;
- the report takes each variant's final checkpoint, so nothing is selected on the split that is reported.

Variants are planned before the run (``plan_study``): each ParallelFor item carries its preset, overrides, run
URL, gate policy, suite and its training job's cluster settings, so the grid needs no planning step of its own
at run time. (No postponed annotations here: kfp reads the pipeline functions' type hints.)
"""

from collections.abc import Sequence
from typing import Any

from kfp import dsl

from evaluators.policies import policy_for, suite_for
from evaluators.study_report import DEFAULT_METRICS
from pipelines import components
from pipelines.train_eval import DEFAULT_PLATFORM, Platform
from trainer import storage
from trainer.arms import BASELINE
from trainer.cluster import PREEMPTIBLE_PRIORITY_CLASS
from trainer.config import load_config


def grid(arms: Sequence[str], pools: Sequence[str], data_sizes: Sequence[int], seeds: Sequence[int]) -> list[dict]:
    """Every ``{arm, pool, data_size, seed}``, in a stable order (data size 0: the whole corpus)."""
    return [{"arm": a, "pool": p, "data_size": n, "seed": s}
            for a in arms for p in pools for n in data_sizes for s in seeds]


def plan_variant(variant: dict[str, Any], *, preset_pattern: str, overrides: Sequence[str], runs_url: str,
                 experiment: str, model_name: str, suite: str = "", policy: dict | None = None,
                 cluster: dict | None = None) -> dict[str, Any]:
    """What one grid point trains and how it is gated: preset, overrides, run URL, policy, suite, and the
    ``cluster`` settings of its training job (``trainer.cluster.Cluster``).

    The arm, pooling, data size and seed only ever enter as those four settings (and the run's name), so
    variants of a study differ in nothing else. The policy and suite follow the arm's objective
    (``evaluators.policies``: mae and m3ae are judged on linear probes) unless the study names its own.
    """
    arm, pool, size, seed = str(variant["arm"]), str(variant["pool"]), int(variant["data_size"]), int(variant["seed"])
    preset = preset_pattern.format(arm=arm)
    name = f"{arm}-{pool}-n{size or 'all'}"
    # The run's name in MLflow says the variant, not the preset that several variants share.
    settings = [*overrides, f"model.image_pool={pool}", f"data.max_samples={size}", f"train.seed={seed}",
                f"tracking.experiment={experiment}", f"name={name}-seed{seed}"]
    objective = load_config(preset, settings).model.objective  # also validates the variant's whole config
    return {
        "variant": {"arm": arm, "pool": pool, "data_size": size, "seed": seed},
        "preset": preset,
        "overrides": settings,
        "run_url": storage.join(runs_url, f"{name}-seed{seed}"),
        "model_name": f"{model_name}-{name}",
        "policy": policy or policy_for(objective),
        "suite": suite or suite_for(objective),
        # many, short and resumable: on a cluster, preempted first (and on spot nodes) unless the study says so
        "cluster": {"priority_class": PREEMPTIBLE_PRIORITY_CLASS, **(cluster or {})},
    }


def plan_study(arms: Sequence[str], pools: Sequence[str], data_sizes: Sequence[int], seeds: Sequence[int],
               **plan: Any) -> list[dict[str, Any]]:
    """``plan_variant`` of every grid point; the baseline must be among the arms (the report pairs with it)."""
    if BASELINE not in arms:
        raise ValueError(f"a study compares arms with the baseline '{BASELINE}': add it to the arms")
    return [plan_variant(v, **plan) for v in grid(arms, pools, data_sizes, seeds)]


def _variant_chain(segments: int, platform: Platform):
    """One variant: ``segments`` × [train → evaluate → gate (marks only)], then register its best passing one."""

    @dsl.pipeline(name=f"variant-{segments}-segments")
    def chain(preset: str, overrides: list, data_url: str, run_url: str, tracking_uri: str, nnodes: str,
              nproc_per_node: int, scheduler: str, image: str, cluster: dict, suite: str, gate_policy: dict,
              model_name: str, variant: dict) -> str:
        previous = None
        for segment in range(1, segments + 1):
            # a retry resumes a stopped or failed job from its newest checkpoint
            trained = platform.apply(components.train_segment(
                preset=preset, overrides=overrides, data_url=data_url, run_url=run_url, tracking_uri=tracking_uri,
                nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler, segment=segment,
                segments=segments, image=image, cluster=cluster), image).set_retry(num_retries=2)
            if previous is not None:
                trained.after(previous)
            evaluated = platform.apply(components.evaluate(
                checkpoint_url=trained.output, suite=suite, tracking_uri=tracking_uri), image, gpu=True)
            previous = platform.apply(components.gate(checkpoint_url=evaluated.output, policy=gate_policy), image,
                                      gate=True)
            for task in (trained, evaluated, previous):
                task.set_caching_options(False)  # side effects: checkpoints, markers, MLflow
        registered = components.register(run_url=run_url, policy=gate_policy, model_name=model_name,
                                         tracking_uri=tracking_uri, variant=variant).after(previous)
        return platform.apply(registered, image, gate=True).set_caching_options(False).output

    return chain


def make_study(segments: int = 1, platform: Platform = DEFAULT_PLATFORM):
    """``study`` whose variants each train in ``segments`` segments, every one to the same final step."""
    chain = _variant_chain(segments, platform)

    @dsl.pipeline(name="maeclip-study",
                  description="Arms × poolings × data sizes × seeds trained alike, then cells with CIs and paired "
                              "differences against the clip baseline.")
    def study(
        variants: list = [],  # noqa: B006 - kfp defaults; plan_study's output
        corpus: str = "shapes",
        data_url: str = "file://.maeclip/data/shapes",
        source_url: str = "",
        source_format: str = "",
        runs_url: str = "file://.maeclip/runs/study",
        tracking_uri: str = "",
        experiment: str = "maeclip-study",
        study_name: str = "study",
        nnodes: str = "1",
        nproc_per_node: int = 1,
        scheduler: str = "local_cwd",
        image: str = components.IMAGE,
        n_train: int = 4096,
        n_eval: int = 512,
        seed: int = 0,
        metrics: list = list(DEFAULT_METRICS),  # noqa: B006
        baseline: str = BASELINE,
    ) -> str:
        prepared = platform.apply(components.prepare_corpus(
            corpus=corpus, data_url=data_url, source_url=source_url, source_format=source_format, n_train=n_train,
            n_eval=n_eval, seed=seed), image)
        opened = platform.apply(components.open_study(tracking_uri=tracking_uri, experiment=experiment), image)
        with dsl.ParallelFor(items=variants, name="variants") as planned:
            # data_url, not prepared.output: kfp.local resolves an outer task's output inside a loop to the loop
            # item; the corpus step returns data_url unchanged, and every variant starts after it.
            chained = chain(preset=planned.preset, overrides=planned.overrides, data_url=data_url,
                            run_url=planned.run_url, tracking_uri=tracking_uri, nnodes=nnodes,
                            nproc_per_node=nproc_per_node, scheduler=scheduler, image=image,
                            cluster=planned.cluster, suite=planned.suite,
                            gate_policy=planned.policy, model_name=planned.model_name,
                            variant=planned.variant).after(prepared, opened)
        compared = components.report(records=dsl.Collected(chained.output), tracking_uri=tracking_uri,
                                     experiment=experiment, study_name=study_name, metrics=metrics,
                                     runs_url=runs_url, baseline=baseline)
        return platform.apply(compared, image).set_caching_options(False).output

    return study
