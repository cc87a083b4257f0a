"""Task files end to end on real-pixel eval sets, one per format: ``maeclip eval --tasks FILE --root ROOT`` gives
the metrics the file names, with the values of a hand computation on the same model and images; ImageNet wnid
folders get the shipped names; VTAB-style groups are averaged per group and over groups; labels a set lacks
are skipped and the rest goes on; bad task files are one line, before any checkpoint is read."""

import json
from pathlib import Path

import pytest
import torch
from eval_sets import (
    digits_images,
    photo_crops,
    write_clip_benchmark_wds,
    write_imagefolder,
    write_karpathy,
    write_mds,
)

from evaluators.linear_probe import linear_probe
from evaluators.retrieval import recall_at_k
from evaluators.suite import run_suite
from evaluators.tasks import classnames_of, load_task_file, shipped_task_files, templates_of
from evaluators.zeroshot import IMAGENET_TASKS, zero_shot_accuracy, zero_shot_classifier
from pipelines.cli import main
from trainer import checkpoint
from trainer.config import ConfigError, load_config
from trainer.data.eval_sets import EvalSet, iter_eval_set
from trainer.data.tokenizer import tokenize
from trainer.models import build_model

DIGITS = [f"the digit {word}" for word in
          ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A committed tiny-clip checkpoint (random weights: the numbers are checked against a hand computation)."""
    folder = tmp_path_factory.mktemp("run")
    config = load_config("tiny-clip", [f"train.run_url=file://{folder}"])
    torch.manual_seed(0)
    model = build_model(config.model)
    url = checkpoint.save(config.train.run_url, 4, model, torch.optim.AdamW(model.parameters()), config,
                          {"samples_seen": 32, "mlflow_run_id": None})
    return url, model.eval(), config


def _task_file(folder: Path, text: str) -> str:
    path = folder / "tasks.yaml"
    path.write_text(text)
    return str(path)


def _cli(capsys, *args: str) -> tuple[dict[str, float], str]:
    """``maeclip eval ARGS``: the metrics it prints and its stderr."""
    main(["eval", *args])
    out, err = capsys.readouterr()
    return json.loads(out), err


@torch.no_grad()
def _features(model, config, eval_set: EvalSet, split: str) -> tuple[torch.Tensor, list[list[str]], list]:
    """(image embeddings, captions, labels) of a split, read as the evaluators read it."""
    embeddings, captions, labels = [], [], []
    for batch in iter_eval_set(eval_set, split, config, 7):
        embeddings.append(model.encode_image(batch["image"]))
        captions += batch["captions"]
        labels += [m["labels"].get("label") for m in batch["meta"]]
    return torch.cat(embeddings), captions, labels


def _zeroshot_by_hand(model, config, eval_set, split, classnames, templates) -> dict[str, float]:
    features, _, labels = _features(model, config, eval_set, split)
    classifier = zero_shot_classifier(model, classnames, templates, config.model.context_length)
    return zero_shot_accuracy(features, classifier, torch.tensor(labels))


@torch.no_grad()
def _retrieval_by_hand(model, config, eval_set, split) -> dict[str, float]:
    images, captions, _ = _features(model, config, eval_set, split)
    texts = model.encode_text(tokenize([c for cs in captions for c in cs], config.model.context_length))
    owner = torch.tensor([i for i, cs in enumerate(captions) for _ in cs])
    return recall_at_k(images, texts, owner)


def test_an_image_folder_gets_zero_shot_and_linear_probe_metrics_of_the_task_file(tmp_path, saved, capsys):
    url, model, config = saved
    digits = digits_images(60)
    write_imagefolder(tmp_path / "digits", "train", digits[:40], DIGITS)
    write_imagefolder(tmp_path / "digits", "test", digits[40:], DIGITS)
    tasks = _task_file(tmp_path, """
datasets:
  digits: {}
evaluations:
  - {kind: zeroshot, dataset: digits, templates: ["a photo of {}.", "a picture of {}."]}
  - {kind: linear, dataset: digits, name: digits-probe, k_shots: [1], group: natural}
""")
    metrics, _ = _cli(capsys, "--checkpoint", url, "--tasks", tasks, "--root", str(tmp_path / "digits"))
    assert set(metrics) == {
        *(f"eval/zeroshot/digits/{m}" for m in ("top1", "top5", "mean_per_class_recall", "chance")),
        *(f"eval/linear/digits-probe/{m}" for m in ("top1", "weight_decay", "top1_1shot")),
        "eval/linear/group-natural/top1", "eval/linear/groups/top1"}
    digits_set = EvalSet(f"file://{tmp_path}/digits", "imagefolder")
    # Classes are the sorted folder names, as torchvision's ImageFolder has them.
    hand = _zeroshot_by_hand(model, config, digits_set, "test", sorted(DIGITS), ["a photo of {}.", "a picture of {}."])
    assert metrics["eval/zeroshot/digits/top1"] == pytest.approx(hand["top1"])
    assert metrics["eval/zeroshot/digits/top5"] == pytest.approx(hand["top5"])
    assert metrics["eval/zeroshot/digits/chance"] == pytest.approx(0.1)

    # The probe: the tower's pooled features of the train folder fit it, the test folder scores it.
    pooled = {}
    for split in ("train", "test"):
        features, labels = [], []
        with torch.no_grad():
            for batch in iter_eval_set(digits_set, split, config, 16):
                features.append(model.visual.pool_tokens(model.visual.forward_tokens(batch["image"])))
                labels += [m["labels"]["label"] for m in batch["meta"]]
        pooled[split] = torch.cat(features), torch.tensor(labels)
    hand = linear_probe(*pooled["train"], *pooled["test"], num_classes=10)
    assert metrics["eval/linear/digits-probe/top1"] == pytest.approx(hand["top1"])
    assert metrics["eval/linear/groups/top1"] == metrics["eval/linear/digits-probe/top1"]


def test_a_clip_benchmark_webdataset_on_object_storage_gets_zero_shot_and_retrieval(run_url, tmp_path, saved, capsys):
    from eval_sets import upload

    url, model, config = saved
    local = tmp_path / "sets"
    templates = ["a photo of {c}.", "an image of {c}."]  # clip_benchmark's placeholder
    write_clip_benchmark_wds(local / "digits", "test", digits_images(20), DIGITS, templates, shard_size=6)
    crops = photo_crops(12)
    write_clip_benchmark_wds(local / "photos", "test", [(png, None) for png, _ in crops],
                             retrieval_captions=[[c, c.replace("a crop", "part")] for _, c in crops])
    root = upload(local, run_url)
    tasks = _task_file(tmp_path, """
datasets:
  digits: {url: digits}
  photos: {url: photos}
evaluations:
  - {kind: zeroshot, dataset: digits}
  - {kind: retrieval, dataset: photos}
""")
    metrics, _ = _cli(capsys, "--checkpoint", url, "--tasks", tasks, "--root", root)
    hand = _zeroshot_by_hand(model, config, EvalSet(f"{root}/digits", "webdataset"), "test", DIGITS,
                             [t.replace("{c}", "{}") for t in templates])
    assert metrics["eval/zeroshot/digits/top1"] == pytest.approx(hand["top1"])
    retrieval = _retrieval_by_hand(model, config, EvalSet(f"{root}/photos", "webdataset"), "test")
    assert {k.removeprefix("eval/retrieval/photos/"): v for k, v in metrics.items() if "retrieval" in k} == \
        pytest.approx(retrieval)
    assert len(retrieval) == 6


def test_karpathy_captions_give_retrieval_over_five_captions_an_image(tmp_path, saved, capsys):
    url, model, config = saved
    crops = photo_crops(18)
    images = [(png, [caption, *(f"{caption}, take {k}" for k in range(4))], "test" if i % 3 else "train")
              for i, (png, caption) in enumerate(crops)]
    write_karpathy(tmp_path / "coco", "coco", images)
    metrics, _ = _cli(capsys, "--checkpoint", url, "--tasks", "coco-karpathy", "--root", str(tmp_path / "coco"))
    coco = EvalSet(f"file://{tmp_path}/coco", "karpathy", "dataset_coco.json")
    _, captions, _ = _features(model, config, coco, "test")
    assert len(captions) == 12 and all(len(c) == 5 for c in captions)  # the test split only, five captions each
    hand = _retrieval_by_hand(model, config, coco, "test")
    assert {k.removeprefix("eval/retrieval/coco-karpathy/"): v for k, v in metrics.items()} == pytest.approx(hand)


def test_an_mds_caption_corpus_gets_retrieval_and_its_absent_labels_are_skipped(tmp_path, saved, capsys):
    url, model, config = saved
    crops = photo_crops(10)
    samples = [{"key": f"k{i}", "image": png, "caption": caption, "meta": json.dumps({"labels": {}})}
               for i, (png, caption) in enumerate(crops)]
    write_mds(f"file://{tmp_path}/corpus", "eval", samples)
    tasks = _task_file(tmp_path, """
datasets:
  corpus: {format: mds}
evaluations:
  - {kind: zeroshot, dataset: corpus, split: eval, classnames: [china, flower]}
  - {kind: retrieval, dataset: corpus, split: eval}
""")
    metrics, err = _cli(capsys, "--checkpoint", url, "--tasks", tasks, "--root", f"file://{tmp_path}/corpus")
    assert set(metrics) == {f"eval/retrieval/corpus/{d}_R{k}" for d in ("image_to_text", "text_to_image")
                            for k in (1, 5, 10)}
    assert "[eval] zeroshot: skipping corpus: the eval split has no 'label' labels" in err
    assert "[eval] skipped 1: zeroshot: skipping corpus" in err
    hand = _retrieval_by_hand(model, config, EvalSet(f"file://{tmp_path}/corpus", "mds"), "eval")
    assert {k.removeprefix("eval/retrieval/corpus/"): v for k, v in metrics.items()} == pytest.approx(hand)


def test_imagenet_wnid_folders_get_the_shipped_names_in_order(tmp_path):
    imagenet = json.loads(IMAGENET_TASKS.read_text())
    png, _ = digits_images(1)[0]
    for wnid in imagenet["wnids"]:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        (tmp_path / "val" / wnid / "ILSVRC2012_val.png").write_bytes(png)
    (spec, probe) = load_task_file("imagenet1k", f"file://{tmp_path}")
    assert classnames_of(spec) == tuple(imagenet["tasks"][0]["classnames"])
    assert classnames_of(spec)[:2] == ("tench", "goldfish") and len(templates_of(spec)) == 80
    assert (probe.kind, probe.options["train_samples"], probe.options["group"]) == ("linear", 50000, "natural")
    # A tree whose folders are not all 1,000 wnids keeps its own folder names.
    (tmp_path / "val" / "n99999999").mkdir()
    (tmp_path / "val" / "n99999999" / "x.png").write_bytes(png)
    assert classnames_of(spec)[-1] == "n99999999" and len(classnames_of(spec)) == 1001


def test_vtab_groups_are_averaged_per_group_and_over_groups(tmp_path, saved, capsys):
    url, _, _ = saved
    digits = digits_images(48)
    for name, keep in (("all", range(10)), ("low", range(5)), ("even", range(0, 10, 2))):
        chosen = [(png, label) for png, label in digits if label in keep]
        relabel = {label: i for i, label in enumerate(keep)}
        chosen = [(png, relabel[label]) for png, label in chosen]
        write_imagefolder(tmp_path / name, "train", chosen[::2], [f"c{i}" for i in range(len(keep))])
        write_imagefolder(tmp_path / name, "test", chosen[1::2], [f"c{i}" for i in range(len(keep))])
    tasks = _task_file(tmp_path, """
datasets: {all: {url: all}, low: {url: low}, even: {url: even}}
evaluations:
  - {kind: linear, dataset: all, group: natural, k_shots: []}
  - {kind: linear, dataset: low, group: natural, k_shots: []}
  - {kind: linear, dataset: even, group: structured, k_shots: []}
""")
    metrics, _ = _cli(capsys, "--checkpoint", url, "--tasks", tasks, "--root", str(tmp_path))
    top1 = {name: metrics[f"eval/linear/{name}/top1"] for name in ("all", "low", "even")}
    natural = (top1["all"] + top1["low"]) / 2
    assert metrics["eval/linear/group-natural/top1"] == pytest.approx(natural)
    assert metrics["eval/linear/group-structured/top1"] == pytest.approx(top1["even"])
    assert metrics["eval/linear/groups/top1"] == pytest.approx((natural + top1["even"]) / 2)


def test_the_shipped_task_files_load_with_a_root_and_name_their_metrics(tmp_path):
    assert shipped_task_files() == ["cifar10", "cifar100", "coco-karpathy", "flickr30k-karpathy", "imagenet1k"]
    kinds = {name: [(s.kind, s.name, s.eval_set.format, s.split) for s in load_task_file(name, "file:///data")]
             for name in shipped_task_files()}
    assert kinds["cifar10"] == [("zeroshot", "cifar10", "webdataset", "test"), ("linear", "cifar10", "webdataset",
                                                                                 "test")]
    assert kinds["coco-karpathy"] == [("retrieval", "coco-karpathy", "karpathy", "test")]
    assert kinds["flickr30k-karpathy"] == [("retrieval", "flickr30k-karpathy", "karpathy", "test")]
    assert load_task_file("flickr30k-karpathy", "file:///data")[0].eval_set.images == "flickr30k-images"


def test_the_readme_example_task_file_is_a_valid_one(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("### Real eval sets: task files", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    specs = load_task_file(_task_file(tmp_path, example), "file:///data")
    assert [(s.kind, s.name, s.eval_set.format) for s in specs] == [
        ("zeroshot", "pets", "imagefolder"), ("linear", "pets", "imagefolder"), ("linear", "eurosat", "webdataset"),
        ("zeroshot", "eurosat", "webdataset"), ("retrieval", "coco-karpathy", "karpathy"),
        ("retrieval", "corpus", "mds"), ("zeroshot", "cifar10", "webdataset"), ("linear", "cifar10", "webdataset")]
    assert specs[0].eval_set.url == "file:///data/oxford-pets" and specs[2].eval_set.url == "gs://bucket/wds_vtab-eurosat"


@pytest.mark.parametrize(("text", "message"), [
    ("evaluations: [{kind: segment, dataset: d}]\ndatasets: {d: {}}", r"kind 'segment' is not one of"),
    ("evaluations: [{kind: zeroshot, dataset: e}]\ndatasets: {d: {}}", r"dataset 'e' is not one of .*\['d'\]"),
    ("evaluations: [{kind: zeroshot, dataset: d, group: natural}]\ndatasets: {d: {}}",
     r"unknown keys \['group'\] for kind zeroshot"),
    ("evaluations: [{kind: linear, dataset: d, group: nature}]\ndatasets: {d: {}}", r"'nature' is not one of"),
    ("evaluations: [{kind: linear, dataset: d, train_samples: 1}]\ndatasets: {d: {}}", r"train_samples"),
    ("datasets: {d: {colour: red}}\nevaluations: []", r"datasets.d: unknown keys \['colour'\]"),
    ("datasets: {d: {format: parquet}}\nevaluations: []", r"unknown eval set format 'parquet'"),
    ("datasets: {}\nevaluations: []", r"no evaluations"),
    ("include: [tasks.yaml]", r"includes nest deeper than"),
    ("a: &x [1]\nb: *x", r"cannot read YAML"),
])
def test_a_bad_task_file_is_one_line_before_any_checkpoint_is_read(tmp_path, text, message, capsys):
    tasks = _task_file(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        load_task_file(tasks, f"file://{tmp_path}")
    with pytest.raises(SystemExit) as exited:  # the checkpoint is never looked at
        main(["eval", "--checkpoint", f"file://{tmp_path}/no-such-run", "--tasks", tasks, "--root", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and "Traceback" not in err[0]


def test_a_probe_is_never_fitted_on_the_split_it_is_scored_on(tmp_path, saved):
    write_imagefolder(tmp_path / "one-split", "", digits_images(20), DIGITS)  # no train/ and test/ folders
    tasks = _task_file(tmp_path, "datasets: {d: {url: one-split}}\nevaluations: [{kind: linear, dataset: d}]")
    with pytest.raises(ConfigError, match=r"the train split 'train' and the split 'test' are the same samples"):
        run_suite(saved[0], None, tasks=[tasks], root=f"file://{tmp_path}")


def test_a_dataset_without_a_url_needs_a_root(tmp_path, saved):
    tasks = _task_file(tmp_path, "datasets: {d: {format: imagefolder}}\nevaluations: [{kind: zeroshot, dataset: d}]")
    with pytest.raises(ConfigError, match=r"no url, and no --root"):
        run_suite(saved[0], None, tasks=[tasks])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run_suite(saved[0], None)
