"""DDP correctness: the parameter gradients of a 2-rank run equal a 1-rank run on the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "support" / "ddp_grads.py"
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [("tiny-clip", []), ("tiny-maeclip", ["model.text_mask_ratio=0", "model.image_masking=random"])],
)
def test_two_rank_gradients_equal_one_rank_gradients(tmp_path, preset, overrides):
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one.pt"), preset, *overrides], check=True,
                   timeout=300)
    subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                    "localhost:0", str(SCRIPT), str(tmp_path / "two.pt"), preset, *overrides], check=True,
                   timeout=300)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for name in one:
        assert one[name] is not None, name
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
