"""Retrieval recall@K: equal to a brute-force ranking on random similarity matrices, and known answers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluators.retrieval import recall_at_k

KS = (1, 2, 5)


def _brute_force(similarity: torch.Tensor, owner: list[int], ks) -> dict[str, float]:
    """Sort every row, wrong candidates before right ones on ties, and look for the first right one."""
    n_images, n_texts = similarity.shape

    def first_hit(scores: list[float], right: set[int]) -> int:
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j in right))
        return next(pos for pos, j in enumerate(order) if j in right)

    by_image = [first_hit(similarity[i].tolist(), {t for t in range(n_texts) if owner[t] == i})
                for i in range(n_images)]
    by_text = [first_hit(similarity[:, t].tolist(), {owner[t]}) for t in range(n_texts)]
    result = {}
    for k in ks:
        result[f"image_to_text_R{k}"] = sum(r < k for r in by_image) / n_images
        result[f"text_to_image_R{k}"] = sum(r < k for r in by_text) / n_texts
    return result


@settings(deadline=None, max_examples=60)
@given(
    n_images=st.integers(1, 9),
    extra=st.lists(st.integers(0, 8), max_size=12),
    seed=st.integers(0, 2**16),
    coarse=st.booleans(),
    block=st.integers(1, 10),
)
def test_equals_brute_force_on_random_similarities(n_images, extra, seed, coarse, block):
    # Every image gets one caption, plus extra captions for random images (COCO has five per image).
    owner = list(range(n_images)) + [e % n_images for e in extra]
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.randn(n_images, len(owner), generator=generator)
    if coarse:  # few distinct values: many ties, which must count against the model
        similarity = similarity.round()
    # Image features = the similarity matrix, text features = the identity: their product is the matrix.
    found = recall_at_k(similarity, torch.eye(len(owner)), torch.tensor(owner), KS, block=block)
    assert found == pytest.approx(_brute_force(similarity, owner, KS))


def test_matching_pairs_are_all_found_at_one():
    features = torch.eye(6)
    found = recall_at_k(features, features, torch.arange(6), (1, 5))
    assert found == {"image_to_text_R1": 1.0, "image_to_text_R5": 1.0, "text_to_image_R1": 1.0,
                     "text_to_image_R5": 1.0}


def test_a_constant_similarity_scores_only_when_k_covers_everything():
    found = recall_at_k(torch.ones(4, 3), torch.ones(4, 3), torch.arange(4), (1, 3, 4))
    assert found["image_to_text_R1"] == 0.0 and found["text_to_image_R3"] == 0.0
    assert found["image_to_text_R4"] == 1.0 and found["text_to_image_R4"] == 1.0


def test_a_known_ranking():
    # Image 0's caption ranks 2nd for it, image 1's 1st; caption 0 finds image 0 first, caption 1 second.
    similarity = torch.tensor([[0.2, 0.9], [0.1, 0.8]])
    found = recall_at_k(similarity, torch.eye(2), torch.tensor([0, 1]), (1, 2))
    assert found == {"image_to_text_R1": 0.5, "image_to_text_R2": 1.0, "text_to_image_R1": 0.5,
                     "text_to_image_R2": 1.0}


def test_an_image_without_a_caption_is_an_error():
    with pytest.raises(ValueError, match="at least one caption"):
        recall_at_k(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
