"""The ``study`` pipeline: the objective × pooling (× seed) grid in parallel, each a gated ``train_eval`` chain,
then one report comparing them (mean ± 95 % CI over seeds, plots, an MLflow parent run).

The grid is a run-time parameter (a list of ``{objective, pool, seed}``), fanned out with ``dsl.ParallelFor``
after the corpus and the study's MLflow experiment exist; each variant's register record is gathered with
``dsl.Collected`` into the report step.
"""


from kfp import dsl

from evaluators.study_report import DEFAULT_METRICS
from pipelines import components
from pipelines.train_eval import DEFAULT_PLATFORM, DEFAULT_POLICY, Platform, make_chain


def grid(objectives: list[str], pools: list[str], seeds: list[int]) -> list[dict]:
    """Every ``{objective, pool, seed}`` combination, in a stable order."""
    return [{"objective": o, "pool": p, "seed": s} for o in objectives for p in pools for s in seeds]


def make_study(segments: int = 1, platform: Platform = DEFAULT_PLATFORM):
    """``study`` whose variants each train in ``segments`` gated segments."""
    chain = make_chain(segments, platform)

    @dsl.pipeline(name="maeclip-study",
                  description="Objective × pooling (× seed) grid of gated train_eval chains, then a comparison.")
    def study(
        variants: list = grid(["clip", "maeclip"], ["cls", "gap"], [0]),  # noqa: B008 - kfp defaults
        preset_pattern: str = "tiny-{objective}",
        overrides: list = [],  # noqa: B006
        data_url: str = "file://.maeclip/data/shapes",
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
        suite: str = "quick",
        gate_policy: dict = DEFAULT_POLICY,
        model_name: str = "maeclip-study",
        metrics: list = list(DEFAULT_METRICS),  # noqa: B006
    ) -> str:
        corpus = platform.apply(components.shapes_corpus(out_url=data_url, n_train=n_train, n_eval=n_eval,
                                                         seed=seed), image)
        opened = platform.apply(components.open_study(tracking_uri=tracking_uri, experiment=experiment), image)
        with dsl.ParallelFor(items=variants, name="variants") as variant:
            planned = platform.apply(components.plan_variant(
                variant=variant, preset_pattern=preset_pattern, overrides=overrides, runs_url=runs_url,
                experiment=experiment, model_name=model_name), image).after(corpus, opened)
            # data_url, not corpus.output: kfp.local resolves an outer task's output inside a loop to the loop
            # item; the corpus step returns data_url unchanged, and plan-variant runs after it.
            chained = chain(preset=planned.outputs["preset"], overrides=planned.outputs["overrides"],
                            data_url=data_url, run_url=planned.outputs["run_url"], tracking_uri=tracking_uri,
                            nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler, image=image, suite=suite,
                            gate_policy=gate_policy, model_name=planned.outputs["model_name"])
        compared = components.report(records=dsl.Collected(chained.output), tracking_uri=tracking_uri,
                                     experiment=experiment, study_name=study_name, metrics=metrics)
        return platform.apply(compared, image).set_caching_options(False).output

    return study
