"""Learning rates that follow the batch: presets state the batch their rates were published at, and a run at
another global batch gets them scaled by the documented rule (trainer/optim.py)."""

import math

import pytest

from trainer.config import ConfigError, load_config
from trainer.optim import at_batch, lr_at, lr_scale


@pytest.mark.parametrize(("preset", "published"), [("vit-b16-clip", 5e-4), ("vit-b16-mae", 2.4e-3),
                                                   ("vit-b16-m3ae", 2.4e-3), ("vit-b16-maeclip", 5e-4)])
def test_a_recipe_published_at_4096_runs_at_512_with_the_linear_rate(preset, published):
    optim = load_config(preset).optim
    assert (optim.lr, optim.reference_batch, optim.lr_scaling) == (published, 4096, "linear")
    scaled = at_batch(optim, 512)
    assert scaled.lr == pytest.approx(published / 8) and scaled.min_lr == pytest.approx(optim.min_lr / 8)
    assert scaled.reference_batch == 0 and scaled.weight_decay == optim.weight_decay
    assert at_batch(optim, 4096).lr == pytest.approx(published)  # at the recipe's batch: the recipe's rate
    # The schedule runs on the scaled rates: the warmup's end is the scaled peak, the cosine ends at the floor.
    assert lr_at(optim.warmup_steps - 1, scaled, 10_000) == pytest.approx(published / 8)
    assert lr_at(10_000, scaled, 10_000) == pytest.approx(optim.min_lr / 8)


def test_the_square_root_rule_and_no_reference():
    optim = load_config("vit-b16-mae", ["optim.lr_scaling=sqrt"]).optim
    assert lr_scale(optim, 512) == pytest.approx(math.sqrt(1 / 8))
    assert at_batch(optim, 16384).lr == pytest.approx(2.4e-3 * 2)
    tiny = load_config("tiny-clip").optim  # no published batch: the rate is used as given
    assert tiny.reference_batch == 0 and at_batch(tiny, 12345).lr == tiny.lr


def test_bad_scaling_settings_are_refused():
    with pytest.raises(ConfigError, match=r"optim\.lr_scaling"):
        load_config("tiny-clip", ["optim.lr_scaling=cubic"])
    with pytest.raises(ConfigError, match=r"optim\.reference_batch"):
        load_config("tiny-clip", ["optim.reference_batch=-1"])
