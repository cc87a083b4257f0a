"""One step's gradients do not depend on how the global batch is split: over 2 gloo ranks (DDP), over 4
accumulated micro-batches, or both, they equal one pass over the whole batch. For the contrastive objectives
that means every micro-batch's pairs are contrasted with the whole global batch (trainer/step.py)."""

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.data.tokenizer import tokenize
from trainer.models import build_model
from trainer.step import accumulate, gradient_sync, train_step

SCRIPT = Path(__file__).parent / "support" / "ddp_grads.py"
BIN = Path(sys.executable).parent
OBJECTIVES = [("tiny-clip", []), ("tiny-flip", []), ("tiny-maeclip", []),
              ("tiny-maeclip", ["model.contrastive_input=masked"]), ("tiny-mae", [])]


def _grads(out: Path, micro: int, world: int, preset: str, overrides: list[str]) -> dict:
    launcher = [sys.executable] if world == 1 else [
        str(BIN / "torchrun"), "--nproc_per_node", str(world), "--rdzv_backend", "c10d", "--rdzv_endpoint",
        "localhost:0"]
    subprocess.run([*launcher, str(SCRIPT), str(out), str(micro), preset, *overrides], check=True, timeout=300)
    return torch.load(out, weights_only=True)  # tensors and floats only: nothing to unpickle


def _assert_same(got: dict, expected: dict, losses: tuple[str, ...] | None = None) -> None:
    """The same gradients, and the same ``losses`` (all of them by default)."""
    assert got["grads"].keys() == expected["grads"].keys()
    for name, value in expected["grads"].items():
        assert value is not None, name
        torch.testing.assert_close(got["grads"][name], value, atol=1e-5, rtol=1e-4, msg=name)
    names = tuple(expected["losses"]) if losses is None else losses
    assert {n: got["losses"][n] for n in names} == pytest.approx({n: expected["losses"][n] for n in names}, abs=1e-5)


@pytest.mark.parametrize(("preset", "overrides"), OBJECTIVES)
def test_accumulated_and_distributed_gradients_equal_one_pass(tmp_path, preset, overrides):
    whole = _grads(tmp_path / "whole.pt", 1, 1, preset, overrides)
    _assert_same(_grads(tmp_path / "accumulated.pt", 4, 1, preset, overrides), whole)  # 4 x 2 on one rank
    # 2 ranks x 2 x 2: rank 0 reports its own reconstruction means; the contrastive loss is the global batch's.
    contrastive = ("loss_contrastive",) if "loss_contrastive" in whole["losses"] else ()
    _assert_same(_grads(tmp_path / "both.pt", 2, 2, preset, overrides), whole, contrastive)


def test_the_mean_of_micro_batch_contrastive_losses_is_another_objective():
    """Why the step caches features: the mean of 4 micro-batches' own contrastive losses (2 pairs each, the
    naive accumulation) is another number than the 8-pair loss, which the contrastive step reports."""
    config = load_config("tiny-clip")
    torch.manual_seed(0)
    model = build_model(config.model)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, config.model.image_size, config.model.image_size, generator=generator)
    tokens = tokenize([f"caption {i}" for i in range(8)], config.model.context_length)
    with torch.no_grad():
        whole = model({"image": images, "tokens": tokens})["loss"].item()
    micro = [{"image": images[i:i + 2], "tokens": tokens[i:i + 2]} for i in range(0, 8, 2)]
    none = contextlib.nullcontext()
    naive = accumulate(model, micro, gradient_sync(model), none)["loss"].item()
    model.zero_grad()
    cached = train_step(model, micro, gradient_sync(model), none, torch.device("cpu"), contrastive=True)
    assert cached["loss"].item() == pytest.approx(whole, abs=1e-5)
    assert abs(naive - whole) > 0.5  # log 2 against log 8 at random initialisation
