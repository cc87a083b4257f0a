"""Run under torchrun: read an epoch (or part of one) on this rank, optionally resuming from a saved loader state.

Usage: read_epoch.py OUT_DIR [--stop-after BATCHES] [--resume STATE_JSON] [--set key=value ...].
Writes OUT_DIR/keys-RANK.json; with --stop-after, rank 0 also writes OUT_DIR/state.json, the loader state the
trainer would put in a checkpoint (meta.json["loader_state"]).
"""

import argparse
import json
import os

from trainer.config import load_config
from trainer.data.loader import build_train_loader

parser = argparse.ArgumentParser()
parser.add_argument("out_dir")
parser.add_argument("--stop-after", type=int, default=0)
parser.add_argument("--resume", default="")
parser.add_argument("--set", dest="overrides", action="append", default=[])
args = parser.parse_args()

loader = build_train_loader(load_config("tiny-clip", args.overrides))
if args.resume:
    with open(args.resume) as handle:
        loader.load_state_dict(json.load(handle))
keys = []
for number, batch in enumerate(loader, start=1):
    keys += batch["key"]
    if number == args.stop_after:
        break
rank = os.environ.get("RANK", "0")
with open(os.path.join(args.out_dir, f"keys-{rank}.json"), "w") as handle:
    json.dump(keys, handle)
if args.stop_after and rank == "0":
    with open(os.path.join(args.out_dir, "state.json"), "w") as handle:
        json.dump(loader.state_dict(), handle)
# Shut the persistent workers down before exit: they ignore SIGTERM (loader._ignore_sigterm), and
# multiprocessing's exit hook would otherwise wait forever for the SIGTERM it sends them to take effect.
del loader
