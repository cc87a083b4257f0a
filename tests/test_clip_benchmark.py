"""Parity with clip_benchmark, the tool CLIP numbers are usually reported with: a checkpoint exported with
``to_open_clip`` and run through clip_benchmark's own webdataset reader, zero-shot classifier and retrieval metrics
gives the numbers ``maeclip eval --tasks`` gives on the same eval sets (clip_benchmark 1.6.2, run as its CLI does:
``build_dataset("wds/...")``, ``dataset.batched``, ``zeroshot_classification.evaluate``,
``zeroshot_retrieval.evaluate``)."""

import open_clip
import pytest
import torch
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from eval_sets import digits_images, photo_crops, write_clip_benchmark_wds
from torchvision.transforms.functional import pil_to_tensor

from evaluators.protocol import Context, SuiteOptions
from evaluators.suite import evaluate, run_suite
from evaluators.tasks import build, load_task_file
from evaluators.zeroshot import zero_shot_classifier
from trainer import checkpoint
from trainer.config import load_config
from trainer.data.transforms import eval_transform
from trainer.models import build_model
from trainer.models.interop import to_open_clip

DIGITS = [f"the digit {word}" for word in
          ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
TEMPLATES = ["a photo of {c}.", "a drawing of {c}.", "{c}, written by hand."]


def _open_clip_model(model, cfg) -> torch.nn.Module:
    """open_clip's CLIP of our tiny-clip's shape, holding our exported weights."""
    reference = open_clip.model.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width,
                                                 head_width=cfg.vision_width // cfg.vision_heads,
                                                 mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size,
                                                 image_size=cfg.image_size),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                             width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers,
                                             mlp_ratio=cfg.mlp_ratio),
    )
    reference.load_state_dict(to_open_clip(model), strict=True)
    return reference.eval()


def test_zero_shot_and_retrieval_match_clip_benchmark_on_the_same_exported_model(tmp_path):
    config = load_config("tiny-clip", [f"train.run_url=file://{tmp_path}/run"])
    torch.manual_seed(0)
    model = build_model(config.model)
    digits = digits_images(60)
    transform = eval_transform(config.data, config.model.image_size)
    url = checkpoint.save(config.train.run_url, 1, model, torch.optim.AdamW(model.parameters()), config,
                          {"samples_seen": 0, "mlflow_run_id": None})

    sets = tmp_path / "sets"
    write_clip_benchmark_wds(sets / "digits", "test", digits, DIGITS, TEMPLATES, shard_size=16)
    crops = photo_crops(18)
    captions = [[caption, caption.replace("a crop of the", "part of the")] for _, caption in crops]
    write_clip_benchmark_wds(sets / "photos", "test", [(png, None) for png, _ in crops],
                             retrieval_captions=captions, shard_size=5)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("""
datasets: {digits: {url: digits}, photos: {url: photos}}
evaluations:
  - {kind: zeroshot, dataset: digits}
  - {kind: retrieval, dataset: photos}
""")
    ours = run_suite(url, None, tasks=[str(tasks)], root=f"file://{sets}")

    reference = _open_clip_model(model, config.model)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=config.model.context_length)

    def pil_transform(image):  # the same pixels: PNG decoded by PIL, then our eval transform
        return transform(pil_to_tensor(image.convert("RGB")), 0)

    def loader(name: str, task: str):
        dataset = build_dataset(f"wds/{name}", root=str(sets / name), transform=pil_transform, split="test",
                                task=task)
        return dataset, torch.utils.data.DataLoader(dataset.batched(8), batch_size=None, shuffle=False)

    dataset, digits_loader = loader("digits", "zeroshot_classification")
    assert dataset.classes == DIGITS and dataset.templates == TEMPLATES
    theirs = zeroshot_classification.evaluate(reference, digits_loader, tokenizer, dataset.classes,
                                              dataset.templates, device="cpu", amp=False)
    # Identical, image by image: our evaluation's kept image features against our prompt-ensembled classifier
    # are clip_benchmark's logits (it scales them by 100), in the same order, so every image ranks the classes
    # alike; an untrained model's ranks are close together, so this is what shows the two pipelines agree.
    classifier = zeroshot_classification.zero_shot_classifier(reference, tokenizer, dataset.classes,
                                                              dataset.templates, "cpu", amp=False)
    logits, labels = zeroshot_classification.run_classification(reference, classifier, digits_loader, "cpu",
                                                                amp=False)
    assert labels.tolist() == [label for _, label in digits]
    (spec, _) = load_task_file(str(tasks), f"file://{sets}")
    context = Context(model.eval(), config, SuiteOptions(), has_text=True)
    evaluation = build(spec, context)
    evaluate(context, [evaluation])
    ours_logits = torch.cat(evaluation.features) @ zero_shot_classifier(
        model, dataset.classes, dataset.templates, config.model.context_length).T
    torch.testing.assert_close(ours_logits, logits / 100, rtol=0, atol=1e-5)
    assert ours["eval/zeroshot/digits/top1"] == pytest.approx(theirs["acc1"], abs=1e-6)
    assert ours["eval/zeroshot/digits/top5"] == pytest.approx(theirs["acc5"], abs=1e-6)
    assert ours["eval/zeroshot/digits/mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"],
                                                                               abs=1e-6)

    _, photos_loader = loader("photos", "zeroshot_retrieval")
    theirs = zeroshot_retrieval.evaluate(reference, photos_loader, tokenizer, device="cpu", amp=False,
                                         recall_k_list=[1, 5, 10])
    assert 0 < theirs["image_retrieval_recall@5"] < 1  # rankings that tell the captions apart, not all or none
    for k in (1, 5, 10):  # clip_benchmark's "image retrieval" is text→image: a caption retrieves its image
        assert ours[f"eval/retrieval/photos/text_to_image_R{k}"] == pytest.approx(
            theirs[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert ours[f"eval/retrieval/photos/image_to_text_R{k}"] == pytest.approx(
            theirs[f"text_retrieval_recall@{k}"], abs=1e-6)
