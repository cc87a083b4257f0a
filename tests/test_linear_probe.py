"""Linear probe: known answers (one-hot features → 100 %), parity with scikit-learn's L-BFGS logistic
regression, the weight-decay sweep, k-shot selection and the task-level metric names."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression

from evaluators.linear_probe import (
    ProbeTask,
    accuracy,
    fit_logistic,
    group_means,
    k_shot_indices,
    linear_probe,
    load_probe_tasks,
    score_probe_tasks,
    split_validation,
)
from trainer.data.shapes import RELATIONS


@settings(deadline=None, max_examples=15)
@given(classes=st.integers(2, 7), per_class=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_one_hot_features_are_probed_perfectly(classes, per_class, seed):
    order = torch.randperm(classes * per_class, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(classes).repeat(per_class)[order]
    features = F.one_hot(labels, classes).float()
    found = linear_probe(features, labels, features, labels, classes, weight_decays=(1e-4, 1e-2, 1.0))
    assert found["top1"] == 1.0


def test_k_shot_of_one_hot_features_is_perfect_from_one_example():
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    features = F.one_hot(labels, 3).float() + 0.5
    shots = k_shot_indices(labels, 1)
    assert shots.tolist() == [0, 1, 2]
    found = linear_probe(features[shots], labels[shots], features, labels, 3, weight_decays=(1e-3,))
    assert found == {"top1": 1.0, "weight_decay": 1e-3}


def test_ties_in_validation_accuracy_go_to_the_stronger_decay():
    labels = torch.arange(4).repeat(6)
    features = F.one_hot(labels, 4).float()  # every class well represented: every decay is perfect
    assert linear_probe(features, labels, features, labels, 4, weight_decays=(1.0, 1e-4, 1e-2)) == {
        "top1": 1.0, "weight_decay": 1.0}


def test_k_shot_keeps_the_first_k_of_each_class_in_order():
    assert k_shot_indices(torch.tensor([0, 1, 0, 2, 1, 0, 1]), 2).tolist() == [0, 1, 2, 3, 4]
    assert k_shot_indices(torch.tensor([1, 1, 1]), 5).tolist() == [0, 1, 2]


@given(n=st.integers(1, 60), fraction=st.floats(0.05, 0.5), seed=st.integers(0, 100))
def test_validation_split_is_a_partition_that_holds_something_out(n, fraction, seed):
    fit, val = split_validation(torch.zeros(n), fraction, seed)
    assert sorted(fit.tolist() + val.tolist()) == list(range(n))
    assert (len(val) >= 1) is (n > 1)


def test_parity_with_scikit_learn_logistic_regression():
    # Ours minimises mean CE + λ‖W‖²; sklearn minimises C·ΣCE + ½‖W‖² (intercept unpenalised in both), so
    # C = 1 / (2·n·λ) is the same problem: the same optimum, the same probabilities.
    generator = torch.Generator().manual_seed(0)
    n, dim, classes, decay = 120, 10, 3, 1e-2
    centres = torch.randn(classes, dim, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    features = centres[labels] + 1.5 * torch.randn(n, dim, generator=generator)
    probe = fit_logistic(features, labels, classes, decay, max_iter=500)
    standardised = ((features - probe.mean) / probe.std).double().numpy()
    reference = LogisticRegression(C=1 / (2 * n * decay), max_iter=5000, tol=1e-10).fit(standardised, labels)
    ours = torch.softmax(torch.from_numpy(standardised).float() @ probe.weight.T + probe.bias, dim=1)
    np.testing.assert_allclose(ours.numpy(), reference.predict_proba(standardised), atol=2e-3)
    assert accuracy(probe, features, labels) == pytest.approx(reference.score(standardised, labels.numpy()))


def test_the_sweep_picks_the_decay_that_generalises():
    # Labels are pure noise on dimension 1 and follow dimension 0 weakly: a tiny decay overfits the noise.
    generator = torch.Generator().manual_seed(3)
    n = 200
    labels = torch.randint(0, 2, (n,), generator=generator)
    signal = (labels.float() * 2 - 1)[:, None] * 0.3 + torch.randn(n, 1, generator=generator)
    features = torch.cat([signal, torch.randn(n, 40, generator=generator)], dim=1)
    found = linear_probe(features[:100], labels[:100], features[100:], labels[100:], 2,
                         weight_decays=(1e-6, 1.0), seed=1)
    assert found["weight_decay"] == 1.0


def test_task_metrics_are_named_and_unlabelled_samples_left_out():
    colors = ["red", "blue"] * 8
    relations = [None, "above", "below", None] * 4
    labels = {"color": colors, "relation": relations}
    color_1hot = F.one_hot(torch.tensor([c == "red" for c in colors]).long(), 2).float()
    relation_1hot = F.one_hot(torch.tensor([r == "above" for r in relations]).long(), 2).float()
    cls = torch.cat([color_1hot, relation_1hot], dim=1)
    features = {"cls": cls, "gap": torch.zeros_like(cls)}
    tasks = [ProbeTask("c", "color", "natural"), ProbeTask("r", "relation", "structured")]
    metrics = score_probe_tasks(features, labels, features, labels, tasks, "cls", k_shots=(1,))
    assert metrics["eval/linear/c/top1"] == 1.0 and metrics["eval/linear/r/top1"] == 1.0
    assert metrics["eval/linear/c/top1_1shot"] == 1.0
    assert metrics["eval/linear-gap/c/top1"] == 0.5  # constant features: one class for all, half are right
    assert set(metrics) == {
        "eval/linear/c/top1", "eval/linear/c/weight_decay", "eval/linear/c/top1_1shot",
        "eval/linear/r/top1", "eval/linear/r/weight_decay", "eval/linear/r/top1_1shot",
        "eval/linear-gap/c/top1", "eval/linear-gap/r/top1",
    }


def test_group_means_weigh_each_group_alike_whatever_its_size():
    grouped = [("natural", 0.2), ("natural", 0.4), ("natural", 0.6), ("structured", 1.0)]
    assert group_means(grouped) == pytest.approx({
        "eval/linear/group-natural/top1": 0.4, "eval/linear/group-structured/top1": 1.0,
        "eval/linear/groups/top1": 0.7})  # not 0.55, the mean over tasks
    assert group_means([]) == {}


def test_a_test_label_never_seen_in_training_counts_as_wrong():
    train = {"color": ["red", "blue"] * 4}
    test = {"color": ["red", "green"]}
    features = {"cls": F.one_hot(torch.tensor([0, 1] * 4), 3).float()}
    test_features = {"cls": F.one_hot(torch.tensor([0, 2]), 3).float()}
    tasks = [ProbeTask("c", "color", "natural")]
    metrics = score_probe_tasks(features, train, test_features, test, tasks, "cls")
    assert metrics["eval/linear/c/top1"] == 0.5


def test_shapes_probe_tasks_cover_colour_shape_count_and_relation():
    tasks = load_probe_tasks()
    assert {t.label_key for t in tasks} == {"color", "shape", "count", "relation"}
    assert {t.group for t in tasks} <= {"natural", "specialized", "structured"}
    assert len(RELATIONS) == 4
