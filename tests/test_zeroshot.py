"""Zero-shot evaluation: accuracy known answers and properties, prompt ensembling against a hand loop on the
real tiny model, the task assets against the shapes generator, and a checkpoint scored end to end by the quick
suite."""

import json
import socket

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from sklearn.metrics import balanced_accuracy_score

from evaluators.protocol import Batch, Context, Source, SuiteOptions
from evaluators.suite import run_suite
from evaluators.zeroshot import (
    IMAGENET_TASKS,
    SHAPES_TASKS,
    Task,
    ZeroShot,
    fill,
    label_indices,
    load_tasks,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from trainer import checkpoint, storage
from trainer.config import load_config
from trainer.data.eval_sets import EvalSet
from trainer.data.loader import iter_eval_batches
from trainer.data.shapes import COLORS, SHAPES, write_shapes
from trainer.data.tokenizer import tokenize
from trainer.models import build_model

# ---------------------------------------------------------------------------------------------------------
# zero_shot_accuracy on features given directly.


def test_accuracy_known_answer():
    # Three images, two classes; by hand, the best class of images 0, 1, 2 is 0, 1, 0.
    features = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.9, 0.8]]), dim=-1)
    classifier = torch.eye(2)
    labels = torch.tensor([0, 1, 1])
    result = zero_shot_accuracy(features, classifier, labels, topk=(1, 2))
    assert result == {"top1": pytest.approx(2 / 3), "top2": 1.0}


@given(classes=st.integers(1, 12), samples=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_one_hot_features_and_identity_classifier_are_all_right(classes, samples, seed):
    labels = torch.randint(classes, (samples,), generator=torch.Generator().manual_seed(seed))
    features = F.one_hot(labels, classes).float()
    result = zero_shot_accuracy(features, torch.eye(classes), labels)
    assert result == {"top1": 1.0, "top5": 1.0}


@given(classes=st.integers(2, 12), samples=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_a_permuted_classifier_predicts_the_permutation(classes, samples, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (samples,), generator=generator)
    perm = torch.randperm(classes, generator=generator)
    # Row j of the classifier is the one-hot of class perm[j], so an image of class i is predicted as j with
    # perm[j] == i, i.e. argsort(perm)[i].
    classifier = torch.eye(classes)[perm]
    predicted = torch.argsort(perm)[labels]
    features = F.one_hot(labels, classes).float()
    assert zero_shot_accuracy(features, classifier, predicted, topk=(1,))["top1"] == 1.0
    expected_top1 = (predicted == labels).float().mean().item()
    assert zero_shot_accuracy(features, classifier, labels, topk=(1,))["top1"] == pytest.approx(expected_top1)


@settings(deadline=None)
@given(classes=st.integers(1, 10), samples=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_topk_grows_with_k_and_is_capped_at_the_class_count(classes, samples, seed):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(samples, 8, generator=generator), dim=-1)
    classifier = F.normalize(torch.randn(classes, 8, generator=generator), dim=-1)
    labels = torch.randint(classes, (samples,), generator=generator)
    result = zero_shot_accuracy(features, classifier, labels, topk=(1, 2, 5, 50))
    assert result["top1"] <= result["top2"] <= result["top5"] <= result["top50"] == 1.0
    if classes <= 5:
        assert result["top5"] == 1.0


# ---------------------------------------------------------------------------------------------------------
# Task assets.


def test_shapes_tasks_are_well_formed():
    tasks = {task.name: task for task in load_tasks()}
    assert set(tasks) == {"shapes-color", "shapes-shape"}
    assert tasks["shapes-color"].label_key == "color" and tasks["shapes-shape"].label_key == "shape"
    for task in tasks.values():
        assert len(set(task.classnames)) == len(task.classnames) >= 2
        assert task.templates and all(template.count("{}") == 1 for template in task.templates)
    assert "synthetic shapes corpus" in json.loads(SHAPES_TASKS.read_text())["source"]


def test_task_classes_are_the_shapes_generators_words():
    tasks = {task.label_key: task for task in load_tasks()}
    assert set(tasks["color"].classnames) == set(COLORS)
    assert set(tasks["shape"].classnames) == set(SHAPES)


def test_unknown_label_names_the_task_and_label():
    task = Task("t", "color", ("red", "blue"), ("a {}.",))
    assert label_indices(task, ["blue", "red", 0]) == [1, 0, 0]
    with pytest.raises(ValueError, match="t: label 'mauve'"):
        label_indices(task, ["mauve"])
    with pytest.raises(ValueError, match="t: label '2'"):  # an index past the classes
        label_indices(task, [2])


def test_templates_take_the_class_as_ours_or_clip_benchmarks_write_it():
    assert fill("a photo of a {}.", "cat") == fill("a photo of a {c}.", "cat") == "a photo of a cat."


# ---------------------------------------------------------------------------------------------------------
# The real tiny model.


@pytest.fixture(scope="module")
def tiny():
    config = load_config("tiny-clip")
    torch.manual_seed(0)
    return build_model(config.model).eval(), config


def test_classifier_equals_a_hand_loop_over_templates(tiny):
    model, config = tiny
    task = load_tasks()[0]
    context = config.model.context_length
    classifier = zero_shot_classifier(model, task.classnames, task.templates, context)
    expected = []
    with torch.no_grad():
        for name in task.classnames:
            total = torch.zeros(config.model.embed_dim)
            for template in task.templates:  # one prompt at a time: batching must not change an embedding
                embedding = model.encode_text(tokenize([template.format(name)], context))[0]
                total += embedding / embedding.norm()
            expected.append(total / total.norm())
    torch.testing.assert_close(classifier, torch.stack(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(classifier.norm(dim=1), torch.ones(len(task.classnames)))


def test_zeroshot_matches_a_hand_argmax_on_the_tiny_model(tiny):
    model, config = tiny
    tasks = load_tasks()
    context = Context(model, config, SuiteOptions(), has_text=True)
    evaluation = ZeroShot(context, Source(EvalSet("file:///unused", "mds"), "eval"), tasks)
    generator = torch.Generator().manual_seed(1)
    size = config.model.image_size
    batches, metas = [], []
    for start in (0, 5):  # two batches of five images, labels cycling through the classes
        chunk = [{"labels": {t.label_key: t.classnames[(start + i) % len(t.classnames)] for t in tasks}}
                 for i in range(5)]
        batches.append({"image": torch.randn(5, 3, size, size, generator=generator), "meta": chunk,
                        "key": [str(start + i) for i in range(5)], "captions": [[]] * 5})
        metas += chunk
    for raw in batches:
        evaluation.collect("test", Batch(context, raw))
    metrics = evaluation.finish().metrics
    with torch.no_grad():
        features = torch.cat([model.encode_image(b["image"]) for b in batches])
    for task in tasks:
        classifier = zero_shot_classifier(model, task.classnames, task.templates, config.model.context_length)
        predicted = [task.classnames[i] for i in (features @ classifier.T).argmax(dim=1).tolist()]
        truth = [m["labels"][task.label_key] for m in metas]
        right = sum(p == t for p, t in zip(predicted, truth, strict=True))
        prefix = f"eval/zeroshot/{task.name}"
        assert metrics[f"{prefix}/top1"] == pytest.approx(right / len(metas))
        assert metrics[f"{prefix}/top1"] <= metrics[f"{prefix}/top5"]
        assert metrics[f"{prefix}/mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(truth, predicted))
        assert metrics[f"{prefix}/chance"] == 1 / len(task.classnames)
    assert len(metrics) == 4 * len(tasks)


# ---------------------------------------------------------------------------------------------------------
# A checkpoint scored end to end: shapes corpus, checkpoint, metrics.json, MLflow.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    url = f"file://{tmp_path_factory.mktemp('corpus')}"
    write_shapes(url, n_train=8, n_eval=24, seed=3, image_size=64)
    return url


def _checkpoint(tmp_path, corpus, run_id):
    config = load_config("tiny-clip", [f"data.url={corpus}", f"train.run_url=file://{tmp_path}/run"])
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(model.parameters())
    url = checkpoint.save(config.train.run_url, 7, model, optimizer, config,
                          {"samples_seen": 448, "mlflow_run_id": run_id})
    return url, model.eval(), config


def test_the_quick_suite_writes_metrics_json_and_logs_to_the_training_run(tmp_path, corpus, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("zeroshot")).info.run_id
    url, model, config = _checkpoint(tmp_path, corpus, run_id)

    metrics = run_suite(url, "quick", tracking_uri=uri, options=SuiteOptions(batch_size=10, progress_every=1))
    assert f"[eval] {corpus} (mds) split 'eval': 3 batches, 24 images" in capsys.readouterr().err

    # The same numbers as scoring the saved model directly: the checkpoint's weights were the ones evaluated.
    context = Context(model, config, SuiteOptions(), has_text=True)
    direct = ZeroShot(context, Source(EvalSet(corpus, "mds"), "eval"), load_tasks())
    for raw in iter_eval_batches(storage.join(corpus, "eval"), config, 7):
        direct.collect("test", Batch(context, raw))
    assert metrics == pytest.approx(direct.finish().metrics)
    report = json.loads(storage.read_text(storage.join(url, "metrics.json")))
    assert report["step"] == 7 and report["samples_seen"] == 448 and report["metrics"] == metrics
    assert metrics["eval/zeroshot/shapes-color/chance"] == 1 / len(load_tasks()[0].classnames)
    logged = client.get_run(run_id).data.metrics
    assert logged == pytest.approx(metrics)
    for name in metrics:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [7]


def test_an_unreachable_tracking_server_keeps_metrics_json(tmp_path, corpus, caplog):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url, _, _ = _checkpoint(tmp_path, corpus, "0123456789abcdef")
    metrics = run_suite(url, "quick", tracking_uri=f"http://127.0.0.1:{port}")
    assert json.loads(storage.read_text(storage.join(url, "metrics.json")))["metrics"] == metrics
    assert "not logged to MLflow" in caplog.text


def test_a_checkpoint_without_a_run_id_is_scored_without_mlflow(tmp_path, corpus):
    url, _, _ = _checkpoint(tmp_path, corpus, None)
    unused = tmp_path / "never.db"
    run_suite(url, "quick", tracking_uri=f"sqlite:///{unused}")
    assert not unused.exists()
    assert storage.exists(storage.join(url, "metrics.json"))


# ---------------------------------------------------------------------------------------------------------
# ImageNet assets and eval sets that are not MDS.


def test_imagenet_assets_hold_the_1000_names_and_80_templates():
    data = json.loads(IMAGENET_TASKS.read_text())
    assert "open_clip" in data["source"] and "Radford" in data["source"]
    (task,) = load_tasks(IMAGENET_TASKS)
    assert len(task.classnames) == 1000 and len(task.templates) == 80 and task.label_key == "label"
    assert task.classnames[0] == "tench" and task.classnames[-1] == "toilet paper"
    assert all(t.count("{}") == 1 for t in task.templates) and len(set(task.templates)) == 80
    assert task.templates[0] == "a bad photo of a {}."
    assert len(data["wnids"]) == 1000 and data["wnids"] == sorted(data["wnids"]) and "timm" in data["source"]
    assert data["wnids"][0] == "n01440764"  # tench, class 0
