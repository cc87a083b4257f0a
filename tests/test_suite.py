"""Suites end to end on tiny checkpoints: every metric of a suite, metrics.json merged across suites, MLflow
metrics at the checkpoint's step with the grounding overlay PNG, text-free objectives, and watch mode."""

import json
import math

import pytest
import torch
from mlflow import MlflowClient

from evaluators.features import vision_tower
from evaluators.heads import Budget
from evaluators.protocol import Batch, Context
from evaluators.suite import SuiteOptions, run_suite, suite_evaluations
from evaluators.watch import DONE, pending, training_done, watch
from evaluators.zeroshot import ZeroShot, load_tasks
from pipelines.cli import main
from trainer import checkpoint, storage
from trainer.config import load_config
from trainer.data.loader import iter_eval_batches
from trainer.data.shapes import write_shapes
from trainer.models import build_model

OPTIONS = SuiteOptions(batch_size=12, probe_train_samples=48, k_shots=(1,), grounding_samples=12,
                       overlay_rows=4, progress_every=1, head_budget=Budget(steps=20))
PROBES = ("shapes-color", "shapes-shape", "shapes-count", "shapes-relation")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    url = f"file://{tmp_path_factory.mktemp('corpus')}"
    write_shapes(url, n_train=48, n_eval=24, seed=5, image_size=64)
    return url


def _save(tmp_path, corpus, step, *, preset="tiny-clip", run_id=None, extra=()):
    config = load_config(preset, [f"data.url={corpus}", f"train.run_url=file://{tmp_path}/run", *extra])
    torch.manual_seed(0)
    model = build_model(config.model)
    url = checkpoint.save(config.train.run_url, step, model, torch.optim.AdamW(model.parameters()), config,
                          {"samples_seen": step * 8, "mlflow_run_id": run_id})
    return url, model.eval(), config


def _expected_default() -> set[str]:
    names = {f"eval/zeroshot/{t}/{m}" for t in ("shapes-color", "shapes-shape")
             for m in ("top1", "top5", "mean_per_class_recall", "chance")}
    names |= {f"eval/linear/{t}/{m}" for t in PROBES for m in ("top1", "weight_decay", "top1_1shot")}
    names |= {"eval/linear/group-natural/top1", "eval/linear/group-structured/top1", "eval/linear/groups/top1"}
    names |= {f"eval/retrieval/corpus/{d}_R{k}" for d in ("image_to_text", "text_to_image")
              for k in (1, 5, 10)}
    names |= {f"eval/grounding/{m}/{s}" for m in ("patch-text", "gradcam")
              for s in ("pointing_game", "mask_iou")}
    names |= {f"eval/vqa/{t}{m}" for t in ("", "color/", "count/", "relation/", "exists/")
              for m in ("accuracy", "majority")}
    names |= {f"eval/seg/{m}" for m in ("miou", "pixel_accuracy", "majority_miou", "majority_pixel_accuracy")}
    names |= {f"eval/seg/iou/{c}" for c in ("background", "circle", "square", "triangle", "star")}
    return names


def test_default_suite_writes_every_metric_to_metrics_json_and_the_training_run(tmp_path, corpus, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("suite")).info.run_id
    url, model, config = _save(tmp_path, corpus, 9, run_id=run_id)

    metrics = run_suite(url, "default", tracking_uri=uri, options=OPTIONS)
    assert set(metrics) == _expected_default()
    assert all(math.isfinite(v) for v in metrics.values())
    assert all(0 <= v <= 1 for k, v in metrics.items() if not k.endswith("weight_decay"))
    err = capsys.readouterr().err
    # Each split streamed once for every evaluation reading it: the probes' train split up to its limit.
    assert err.count(f"[eval] {corpus} (mds) split 'eval': 2 batches, 24 images") == 1
    assert err.count(f"[eval] {corpus} (mds) split 'train': 4 batches, 48 images") == 1
    assert "[eval] skipped" not in err
    groups = [metrics[f"eval/linear/group-{g}/top1"] for g in ("natural", "structured")]
    assert metrics["eval/linear/groups/top1"] == pytest.approx(sum(groups) / 2)
    assert metrics["eval/linear/group-natural/top1"] == pytest.approx(
        (metrics["eval/linear/shapes-color/top1"] + metrics["eval/linear/shapes-shape/top1"]) / 2)

    # Parity: the suite's zero-shot numbers are those of the zero-shot evaluation alone, in other batches.
    context = Context(model, config, OPTIONS, has_text=True)
    alone = ZeroShot(context, suite_evaluations(context, "quick")[0].source, load_tasks())
    for raw in iter_eval_batches(storage.join(corpus, "eval"), config, 5):
        alone.collect("test", Batch(context, raw))
    zeroshot = alone.finish().metrics
    assert {k: metrics[k] for k in zeroshot} == pytest.approx(zeroshot)

    report = json.loads(storage.read_text(storage.join(url, "metrics.json")))
    assert report["metrics"] == metrics and report["step"] == 9 and report["suites"] == ["default"]
    assert client.get_run(run_id).data.metrics == pytest.approx(metrics)
    assert {m.step for m in client.get_metric_history(run_id, "eval/grounding/gradcam/mask_iou")} == {9}
    for name in ("grounding", "vqa", "seg"):
        artifacts = [a.path for a in client.list_artifacts(run_id, f"{name}/step-000000009")]
        assert artifacts == [f"{name}/step-000000009/overlays.png"]

    # A later quick suite merges into metrics.json: the default suite's numbers stay.
    run_suite(url, "quick", tracking_uri=uri, options=OPTIONS)
    merged = json.loads(storage.read_text(storage.join(url, "metrics.json")))
    assert merged["suites"] == ["default", "quick"] and set(merged["metrics"]) == set(metrics)


def test_full_suite_on_a_text_free_objective_probes_every_pooling(tmp_path, corpus, capsys):
    url, _, _ = _save(tmp_path, corpus, 3, preset="tiny-mae", extra=("model.image_pool=gap",))
    metrics = run_suite(url, "full", options=OPTIONS)
    err = capsys.readouterr().err
    assert "no text embedding" in err and "questions are encoded by a learned bag of words" in err
    assert {k.split("/")[1] for k in metrics} == {"linear", "linear-cls", "linear-max", "vqa", "seg"}
    assert {f"eval/linear-{p}/{t}/top1" for p in ("cls", "max") for t in PROBES} <= set(metrics)


def test_an_unknown_suite_is_refused(tmp_path, corpus, capsys):
    url, _, _ = _save(tmp_path, corpus, 1)
    with pytest.raises(ValueError, match="unknown suite 'huge'"):
        run_suite(url, "huge")
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--checkpoint", url, "--suite", "huge"])
    assert exited.value.code == 2 and "unknown suite" in capsys.readouterr().err


def test_watch_evaluates_each_checkpoint_as_it_lands_and_stops_when_training_is_done(tmp_path, corpus):
    first, _, _ = _save(tmp_path, corpus, 10, extra=("train.steps=1000",))
    run_url = f"file://{tmp_path}/run"
    assert not training_done(run_url)
    landed = []

    def evaluate_while_training(url, suite, **kwargs):
        metrics = run_suite(url, suite, **kwargs)
        if not landed:  # training goes on while the first checkpoint is scored: one more, then DONE
            landed.append(_save(tmp_path, corpus, 20, extra=("train.steps=1000",))[0])
            storage.write_text(storage.join(run_url, DONE), "")
        return metrics

    seen = list(watch(run_url, "quick", options=OPTIONS, poll_s=0.1, timeout_s=120,
                      evaluate=evaluate_while_training))
    assert [url for url, _ in seen] == [first, landed[0]]
    assert all("eval/zeroshot/shapes-color/top1" in metrics for _, metrics in seen)
    assert pending(run_url, "quick") == []  # a restarted watcher has nothing left to do
    assert list(watch(run_url, "quick", options=OPTIONS, poll_s=0.1)) == []


def test_reaching_the_configured_steps_also_ends_training(tmp_path, corpus):
    _save(tmp_path, corpus, 5, extra=("train.steps=10",))
    assert not training_done(f"file://{tmp_path}/run")
    _save(tmp_path, corpus, 10, extra=("train.steps=10",))
    assert training_done(f"file://{tmp_path}/run")


def test_maeclip_eval_watch_prints_a_line_per_checkpoint(tmp_path, corpus, capsys):
    first, _, _ = _save(tmp_path, corpus, 4, extra=("train.steps=8",))
    last, _, _ = _save(tmp_path, corpus, 8, extra=("train.steps=8",))
    main(["eval", "--checkpoint", f"file://{tmp_path}/run", "--suite", "quick", "--watch", "--poll-s", "0.1",
          "--batch-size", "12"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["checkpoint"] for line in lines] == [first, last]
    assert all(set(line["metrics"]) >= {"eval/zeroshot/shapes-shape/top1"} for line in lines)


def test_streamed_features_own_their_memory_so_it_grows_with_width_not_tokens(tmp_path, corpus):
    """What a pass keeps per batch is (B, D) features that own their storage: a view such as CLS pooling's
    ``tokens[:, 0]`` would keep the batch's every token alive, and memory would grow with each batch by tokens."""
    from evaluators.suite import _stream

    _, model, config = _save(tmp_path, corpus, 1)
    assert vision_tower(model).pool == "cls"
    context = Context(model, config, SuiteOptions(batch_size=6), has_text=True)
    zeroshot, linear, retrieval = (suite_evaluations(context, "full")[i] for i in (0, 1, 2))
    test = retrieval.source
    _stream(context, test, [(zeroshot, "test", None), (linear, "test", None), (retrieval, "test", None)])
    held = zeroshot.features + retrieval.images + retrieval.texts
    held += [t for pool in linear.features["test"].values() for t in pool]
    assert len(held) == 4 * 3 + 4 * 3  # 4 batches: image embeddings twice, caption embeddings, 3 poolings
    for tensor in held:
        assert tensor.dim() == 2 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
