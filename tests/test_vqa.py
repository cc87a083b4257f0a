"""VQA probe: generated questions agree with the scene, known answers (image tokens that carry the answer give
accuracy 1 with either fusion and either question encoder), VQAv2 soft accuracy by hand on a small annotation
file, determinism, and both probes inside the default suite on a tiny CLIP trained 200 steps on shapes."""

import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from evaluators.heads import Budget
from evaluators.protocol import Context
from evaluators.questions import QUESTION_TYPES, scene_questions
from evaluators.suite import SuiteOptions, evaluate, suite_evaluations
from evaluators.vqa import (
    VqaSet,
    answer_score,
    evaluate_vqa,
    load_vqav2,
    shapes_questions,
    soft_accuracy,
    target_answer,
)
from trainer import storage
from trainer.config import load_config
from trainer.data.loader import iter_eval_batches
from trainer.data.shapes import COLORS, COUNT_WORDS, RELATIONS, make_sample, write_shapes
from trainer.data.tokenizer import tokenize
from trainer.models import build_model

BUDGET = Budget(steps=250, batch_size=32, lr=3e-3)


@settings(deadline=None, max_examples=30)
@given(index=st.integers(0, 10_000), seed=st.integers(0, 3))
def test_generated_questions_agree_with_the_scene(index, seed):
    sample = make_sample(seed, "train", index)
    meta = sample["meta"]
    questions = scene_questions(meta, sample["key"], seed)
    assert questions == scene_questions(meta, sample["key"], seed)  # the same every run
    by_type = {q.qtype: q for q in questions}
    assert len(by_type) == len(questions) and set(by_type) <= set(QUESTION_TYPES)
    kinds = {(o["color"], o["shape"]) for o in meta["objects"]}
    assert by_type["count"].answer == COUNT_WORDS[len(meta["objects"])]
    if "color" in by_type:
        shape = by_type["color"].text.split()[-1].rstrip("?")
        assert [o["color"] for o in meta["objects"] if o["shape"] == shape] == [by_type["color"].answer]
    if "relation" in by_type:
        assert by_type["relation"].answer in RELATIONS
    if len(meta["objects"]) == 1:
        assert "relation" not in by_type
    color, shape = by_type["exists"].text.removesuffix("?").split()[-2:]
    assert by_type["exists"].answer == ("yes" if (color, shape) in kinds else "no")


def test_relation_answers_of_two_object_scenes_match_the_generators_label():
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    checked = 0
    for index in range(60):
        sample = make_sample(0, "eval", index)
        meta = sample["meta"]
        if len(meta["objects"]) != 2:
            continue
        primary = f"where is the {meta['objects'][0]['color']} {meta['objects'][0]['shape']} "
        (question,) = [q for q in scene_questions(meta, sample["key"]) if q.qtype == "relation"]
        label = meta["labels"]["relation"]
        assert question.answer == (label if question.text.startswith(primary) else opposite[label])
        checked += 1
    assert checked > 10


def _answer_carrying_set(n_images: int, seed: int, text: bool) -> VqaSet:
    """Questions about shapes scenes whose image tokens carry the answers: token t holds a one-hot of the answer
    to the question of type t (zeros when the scene has no such question); questions are embedded as a
    one-hot of their type plus noise (or left to the bag of words)."""
    samples = [make_sample(seed, "train", i) for i in range(n_images)]
    questions, rows = shapes_questions([s["key"] for s in samples], [s["meta"] for s in samples], 0)
    vocabulary = [*COLORS, *COUNT_WORDS.values(), *RELATIONS, "yes", "no"]
    tokens = torch.zeros(n_images, 1 + len(QUESTION_TYPES), len(vocabulary))
    for question, row in zip(questions, rows, strict=True):
        tokens[row, 1 + QUESTION_TYPES.index(question.qtype), vocabulary.index(question.answer)] = 1.0
    generator = torch.Generator().manual_seed(seed)
    embeddings = None
    if text:
        kinds = torch.tensor([QUESTION_TYPES.index(q.qtype) for q in questions])
        embeddings = torch.nn.functional.one_hot(kinds, 8).float() + 0.05 * torch.randn(len(kinds), 8,
                                                                                         generator=generator)
    return VqaSet(tokens, torch.tensor(rows), [q.text for q in questions], [(q.answer,) for q in questions],
                  [q.qtype for q in questions], embeddings)


@pytest.mark.parametrize(("fusion", "text"), [("cross-attention", True), ("cross-attention", False),
                                              ("pooled-mlp", True)])
def test_image_tokens_that_carry_the_answer_give_accuracy_one(fusion, text):
    train, test = _answer_carrying_set(160, 1, text), _answer_carrying_set(60, 2, text)
    if fusion == "pooled-mlp":  # the pooled feature is the sum of the tokens: every answer, in its own slot
        train.images, test.images = train.images.flatten(1), test.images.flatten(1)
    metrics, predicted = evaluate_vqa(train, test, fusion, BUDGET)
    assert metrics["eval/vqa/accuracy"] >= 0.99
    assert all(metrics[f"eval/vqa/{t}/accuracy"] >= 0.99 for t in QUESTION_TYPES)
    assert all(metrics[f"eval/vqa/{t}/majority"] < 0.9 for t in QUESTION_TYPES)
    assert len(predicted) == len(test.texts)


def test_two_runs_give_identical_metrics_and_predictions():
    train, test = _answer_carrying_set(40, 3, True), _answer_carrying_set(20, 4, True)
    train.images = train.images + 0.3 * torch.randn(train.images.shape, generator=torch.Generator().manual_seed(0))
    budget = Budget(steps=15, batch_size=8)
    assert evaluate_vqa(train, test, "cross-attention", budget) == evaluate_vqa(train, test, "cross-attention",
                                                                                   budget)


def test_vqav2_soft_accuracy_matches_hand_computed_values(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id in (42, 7):
        Image.new("RGB", (8, 8)).save(images / f"COCO_val2014_{image_id:012d}.jpg")
    humans = {1: ["2"] * 4 + ["3"] * 2 + ["two"] * 4,     # "2": 4 humans → 1; "3": 2 → 2/3; "4": 0 → 0
              2: ["yes"] * 1 + ["no"] * 9,                # "yes": 1 → 1/3
              3: ["Red."] * 3 + ["blue"] * 7}             # "red": 3 → 1 after normalising
    image_of = {1: 42, 2: 42, 3: 7}
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"question_id": q, "image_id": image_of[q], "question": f"question {q}?"} for q in humans]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": q, "image_id": image_of[q], "answer_type": "other",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(h)]} for q, h in humans.items()]}))

    items = load_vqav2(tmp_path / "q.json", tmp_path / "a.json", images)
    assert [i.image_path.name for i in items] == ["COCO_val2014_000000000042.jpg"] * 2 + [
        "COCO_val2014_000000000007.jpg"]
    assert items[0].answers == tuple(humans[1]) and items[2].question == "question 3?"
    scores = {(q, a): soft_accuracy(a, items[q - 1].answers) for q, a in
              [(1, "2"), (1, "3"), (1, "4"), (2, "yes"), (2, "no"), (3, "red")]}
    assert scores == pytest.approx({(1, "2"): 1.0, (1, "3"): 2 / 3, (1, "4"): 0.0, (2, "yes"): 1 / 3,
                                    (2, "no"): 1.0, (3, "red"): 1.0})
    assert target_answer(items[0].answers) == "2"  # a tie of four goes to the alphabetically first
    assert answer_score("two", items[0].answers, soft=False) == 0.0  # exact match reads the first answer only


# --- both probes in the default suite, on a tiny CLIP trained 200 steps on shapes -------------------------

TINY = ("model.vision_width=64", "model.vision_layers=2", "model.vision_heads=2", "model.text_width=64",
        "model.text_layers=1", "model.text_heads=2", "model.embed_dim=64")
OPTIONS = SuiteOptions(batch_size=64, probe_train_samples=384, k_shots=(1,), grounding_samples=16, overlay_rows=4,
                       progress_every=2, dense_samples=384, head_budget=Budget(steps=300))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    url = f"file://{tmp_path_factory.mktemp('shapes')}"
    write_shapes(url, n_train=384, n_eval=96, seed=3, image_size=64)
    config = load_config("tiny-clip", [f"data.url={url}", *TINY])
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    batches = list(iter_eval_batches(storage.join(url, "train"), config, 16))
    model.train()
    for step in range(200):
        batch = batches[step % len(batches)]
        tokens = tokenize(batch["caption"], config.model.context_length)
        loss = model({"image": batch["image"], "tokens": tokens})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), config, url


def _default_suite(trained):
    model, config, _ = trained
    context = Context(model, config, OPTIONS, has_text=True)
    return evaluate(context, suite_evaluations(context, "default"))


def test_both_probes_run_in_the_default_suite_and_beat_the_majority_baselines(trained, capsys):
    metrics, overlays = _default_suite(trained)
    err = capsys.readouterr().err
    assert "vqa probe (cross-attention): step 300/300" in err and "segmentation probe: step 300/300" in err
    assert {f"eval/vqa/{t}/{m}" for t in QUESTION_TYPES for m in ("accuracy", "majority")} <= set(metrics)
    assert metrics["eval/vqa/accuracy"] > metrics["eval/vqa/majority"] + 0.1
    for qtype in ("color", "count"):
        assert metrics[f"eval/vqa/{qtype}/accuracy"] > metrics[f"eval/vqa/{qtype}/majority"]
    assert metrics["eval/seg/miou"] > metrics["eval/seg/majority_miou"]
    assert metrics["eval/seg/iou/background"] > 0.5
    assert {"vqa", "seg", "grounding"} <= set(overlays)
    assert overlays["seg"].size == (3 * 64, 12 + 4 * 64)
    print({k: round(v, 3) for k, v in sorted(metrics.items()) if k.split("/")[1] in ("vqa", "seg")})

    # Deterministic: a second run of the suite gives the same numbers.
    again, _ = _default_suite(trained)
    assert again == metrics


def test_questions_are_asked_about_every_kept_image_in_stream_order():
    metas = [make_sample(3, "eval", i)["meta"] for i in range(5)]
    questions, rows = shapes_questions([f"eval-{i:07d}" for i in range(5)], metas, 10)
    assert sorted(set(rows)) == list(range(10, 15))
    assert Counter(q.qtype for q in questions)["count"] == 5
