"""Evaluation memory: a ViT-B/16-size checkpoint evaluated on growing eval splits, peak RSS against split size.

    .venv/bin/python bench/eval_memory.py [--images 1000] [--suite quick] [--preset vit-b16-clip]

Writes shapes corpora (224 px images) whose eval splits hold a quarter of ``--images`` and all of them, saves one
randomly initialised checkpoint of ``--preset`` for each, and runs ``maeclip eval --checkpoint URL --suite NAME``
on each in its own process, relaying the evaluator's progress lines (one per 10 batches) and sampling the process's
resident memory. For each it prints the RSS at the first progress line (model loaded, streaming begun), the most
reached while streaming, and the most over the process's run (loading the checkpoint included).
Then the growth of the streaming RSS from the smaller split to the larger one, beside the float32 pixels of the
extra images at the model's input size: the growth if the evaluator held the images instead of streaming them.
Random weights are enough: memory and streaming do not depend on what the model learned.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.config import load_config
from trainer.data.shapes import write_shapes
from trainer.models import build_model


def save_checkpoint(root: Path, name: str, preset: str, eval_images: int, train_images: int) -> str:
    """A shapes corpus with ``eval_images`` eval samples at 224 px and a fresh ``preset`` checkpoint on it."""
    corpus = f"file://{root}/{name}-corpus"
    write_shapes(corpus, n_train=train_images, n_eval=eval_images, seed=0, image_size=224)
    config = load_config(preset, [f"data.url={corpus}", f"train.run_url=file://{root}/{name}-run"])
    model = build_model(config.model)
    return checkpoint.save(config.train.run_url, 0, model, torch.optim.AdamW(model.parameters()), config,
                           {"samples_seen": 0})


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return None


def evaluate(url: str, suite: str, batch_size: int) -> dict[str, float]:
    """Run ``maeclip eval`` in a child process, relaying its progress and sampling its resident memory.

    Returns, in MiB, the child's RSS at the first progress line (the model is loaded and streaming has begun),
    the most it reached between the first and the last progress line, and the most over its whole run; and
    seconds. RSS is sampled every 50 ms: ``wait4``'s ``ru_maxrss`` would also count this process's memory, which
    the child holds between fork and exec.
    """
    maeclip = Path(sys.executable).parent / "maeclip"
    started = time.perf_counter()
    child = subprocess.Popen([str(maeclip), "eval", "--checkpoint", url, "--suite", suite,
                              "--batch-size", str(batch_size)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []

    def sample() -> None:
        while child.poll() is None:
            rss = _rss_mib(child.pid)
            if rss is not None:
                samples.append((time.perf_counter(), rss))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    progress = []
    for line in child.stderr:
        if line.startswith("[eval]"):
            progress.append(time.perf_counter())
            print("    " + line.rstrip(), flush=True)
    child.wait()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"maeclip eval exited {child.returncode}")
    if len(progress) < 2:
        raise SystemExit("fewer than two progress lines: use a smaller --batch-size or more --images")
    streaming = [rss for when, rss in samples if progress[0] <= when <= progress[-1]]
    return {"peak": max(rss for _, rss in samples),
            "first": next(rss for when, rss in reversed(samples) if when <= progress[0]),
            "streaming": max(streaming), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="eval images of the larger split")
    parser.add_argument("--suite", default="quick", help="quick (zero-shot), default, full")
    parser.add_argument("--preset", default="vit-b16-clip")
    parser.add_argument("--batch-size", type=int, default=8, help="small enough for several progress lines")
    parser.add_argument("--train-images", type=int, default=256, help="train split, read by probes")
    args = parser.parse_args()
    sizes = (args.images // 4, args.images)
    image_size = load_config(args.preset).model.image_size
    found: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="maeclip-bench-eval-") as tmp:
        for size in sizes:
            url = save_checkpoint(Path(tmp), f"eval{size}", args.preset, size, args.train_images)
            print(f"{args.preset} ({image_size} px), suite {args.suite}, {size} eval images, batch {args.batch_size}:",
                  flush=True)
            found[size] = evaluate(url, args.suite, args.batch_size)
            m = found[size]
            print(f"  RSS at the first progress line {m['first']:.0f} MiB, most while streaming {m['streaming']:.0f} "
                  f"MiB ({m['streaming'] - m['first']:+.0f}); most over the run {m['peak']:.0f} MiB (loading "
                  f"the checkpoint included); {m['seconds']:.0f} s", flush=True)
    extra = sizes[1] - sizes[0]
    pixels = extra * 3 * image_size**2 * 4 / 2**20
    growth = found[sizes[1]]["streaming"] - found[sizes[0]]["streaming"]
    print(f"most RSS while streaming, {sizes[0]} -> {sizes[1]} images: {growth:+.0f} MiB (holding the {extra} extra "
          f"images as float32 pixels would take {pixels:.0f} MiB)")


if __name__ == "__main__":
    main()
