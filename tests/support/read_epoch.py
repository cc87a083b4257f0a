"""Run under torchrun: read one epoch of the training loader on this rank and write the keys it saw.

Usage: read_epoch.py OUT_DIR [--set key=value ...]. Writes OUT_DIR/keys-RANK.json.
"""

import json
import os
import sys

from trainer.config import load_config
from trainer.data.loader import build_train_loader

out_dir, overrides = sys.argv[1], [a for a in sys.argv[2:] if a != "--set"]
loader = build_train_loader(load_config("tiny-clip", overrides))
keys = [key for batch in loader for key in batch["key"]]
with open(os.path.join(out_dir, f"keys-{os.environ.get('RANK', '0')}.json"), "w") as handle:
    json.dump(keys, handle)
