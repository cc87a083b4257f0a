"""Train-step throughput, side by side in one run: our ``clip`` vs open_clip's CLIP on the same architecture
and batch, our ``flip`` (50 % masking) vs our ``clip``, and the cost of the study's two MAE-CLIP arms
(``maeclip-shared``: one masked pass; ``maeclip``: plus an unmasked pass for the contrastive loss), and what
accumulating the same global batch in 4 micro-batches costs (``trainer.step``: one more forward per micro-batch
for the global batch's negatives).

A step is what the training loop does per batch: forward, the loss, backward and the AdamW update, with the
presets' optimiser settings. Models that are compared run in the same phase, one step each in turn
(interleaved), so that load from other processes hits them alike; each reports the median of its timed steps.
On CUDA the steps run under bf16 autocast (attention is SDPA, which takes the flash kernel there; AdamW is fused)
and the table adds MFU against the bf16 peak (``trainer.models.flops``); ``--compile`` adds ``torch.compile``.
``bench/gpu.sh`` is the prepared GPU run.

    .venv/bin/python bench/step.py                      # ViT-B/16, batch 8: minutes on 2 CPU cores
    .venv/bin/python bench/step.py --threads 1 --clock cpu --steps 5   # steadier on a busy machine
    .venv/bin/python bench/step.py --model tiny --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.loss import ClipLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, installed or not

from trainer.config import Config, ModelConfig, load_config
from trainer.models import ClipObjective, build_model
from trainer.models.flops import flops_per_sample, mfu
from trainer.optim import build_optimizer
from trainer.step import gradient_sync, train_step

# Captions of CC12M-like lengths (6 to 25 words), so that caption masking sees realistic word counts.
CAPTIONS = [
    "a red car parked on the street",
    "two dogs running through deep snow on a sunny winter morning in the mountains",
    "close-up of a bowl of ramen with egg, green onions and sliced pork on a wooden table",
    "the skyline of a large city at night",
    "a woman in a blue dress holding an umbrella while walking past a flower shop in the rain",
    "vintage illustration of a sailing ship",
    "a cat sleeping on a windowsill next to a potted plant, with soft afternoon light coming in "
    "through white curtains",
    "aerial view of a winding river through a green valley",
]


@dataclass
class Result:
    name: str
    flops: float  # training FLOPs per sample
    times: list[float] = field(default_factory=list)  # seconds per timed step

    def samples_per_s(self, batch: int) -> float:
        return batch / statistics.median(self.times)


MAECLIP_ARMS = ("maeclip-shared", "maeclip")

def make_batch(cfg: ModelConfig, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    tokens = open_clip.tokenize(captions, context_length=cfg.context_length)
    return {"image": images.to(device), "tokens": tokens.to(device)}


def ours(config: Config, batch: dict[str, torch.Tensor], autocast: contextlib.AbstractContextManager,
         micro: int = 1, compile_: bool = False) -> Callable[[], None]:
    """Our objective's step as ``trainer.train`` runs it (``trainer.step.train_step``, the batch in ``micro``
    accumulated micro-batches), less gradient clipping (open_clip has none)."""
    device = batch["image"].device
    model = build_model(config.model).to(device).train()
    optimizer = build_optimizer(model, config.optim, fused=True)
    forward = torch.compile(model) if compile_ else model
    size = len(batch["image"]) // micro
    micro_batches = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(micro)]
    contrastive = isinstance(model, ClipObjective)

    def step() -> None:
        train_step(forward, micro_batches, gradient_sync(model), autocast, device, contrastive)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def open_clip_model(cfg: ModelConfig) -> open_clip.model.CLIP:
    """open_clip's CLIP with our config's shapes; for the defaults this is model_configs/ViT-B-16.json."""
    return open_clip.model.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=cfg.vision_layers, width=cfg.vision_width, head_width=cfg.vision_width // cfg.vision_heads,
            mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size, image_size=cfg.image_size,
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
            heads=cfg.text_heads, layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio,
        ),
    )


def reference(config: Config, batch: dict[str, torch.Tensor], autocast: contextlib.AbstractContextManager,
              compile_: bool = False) -> Callable[[], None]:
    """open_clip's step as open_clip_train runs it: ``ClipLoss``, AdamW without decay on gains, biases and the
    logit scale (main.py's ``exclude``), and the logit-scale clamp after the update (train.py)."""
    model = open_clip_model(config.model).to(batch["image"].device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    optim = config.optim
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr,
                                  betas=(optim.beta1, optim.beta2), eps=optim.eps)
    loss_fn = ClipLoss()
    forward = torch.compile(model) if compile_ else model

    def step() -> None:
        with autocast:
            image_features, text_features, scale = forward(batch["image"], batch["tokens"])
            loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def time_interleaved(steps: list[Callable[[], None]], results: list[Result], args: argparse.Namespace,
                     device: torch.device) -> None:
    """One step of each model in turn, ``args.warmup`` untimed rounds, then ``args.steps`` timed rounds into
    ``results``, by wall clock or by this process's CPU time (``args.clock``)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for round_ in range(args.warmup + args.steps):
        for step, result in zip(steps, results, strict=True):
            sync()
            start = clock()
            step()
            sync()
            if round_ >= args.warmup:
                result.times.append(clock() - start)


ACCUMULATION = 4  # micro-batches of the accumulation rows


def phases(prefix: str) -> list[list[tuple[str, str, list[str], bool, int]]]:
    """(row name, preset, overrides, open_clip?, micro-batches) per model, grouped into phases that are timed
    together. At most three ViT-B models (parameters plus AdamW state, about 2 GB each) live at once."""
    return [
        [
            ("open_clip clip", f"{prefix}-clip", [], True, 1),
            ("ours clip", f"{prefix}-clip", [], False, 1),
            ("ours flip, mask 0.5", f"{prefix}-flip", ["model.image_mask_ratio=0.5"], False, 1),
        ],
        [  # the study's two MAE-CLIP arms: one shared masked pass, and the matched one (an extra unmasked pass)
            (f"ours {arm}", f"{prefix}-{arm}", [], False, 1) for arm in MAECLIP_ARMS
        ],
        [  # the same global batch in one pass and in accumulated micro-batches (the global batch's negatives)
            ("ours clip, one pass", f"{prefix}-clip", [], False, 1),
            (f"ours clip, {ACCUMULATION} micro-batches", f"{prefix}-clip", [], False, ACCUMULATION),
        ],
    ]


def run(args: argparse.Namespace) -> list[Result]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    results: list[Result] = []
    for phase in phases(args.model):
        steps, timed = [], []
        for name, preset, overrides, is_reference, micro in phase:
            config = load_config(preset, overrides)
            batch = make_batch(config.model, args.batch, device)
            torch.manual_seed(0)
            if is_reference:
                steps.append(reference(config, batch, autocast, args.compile))
            else:
                steps.append(ours(config, batch, autocast, micro, args.compile))
            timed.append(Result(name, flops_per_sample(config.model)))
        print(f"timing: {', '.join(r.name for r in timed)}", flush=True)
        time_interleaved(steps, timed, args, device)
        results += timed  # the models go with ``steps`` before the next phase builds its own
        del steps
    return results


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def report(results: list[Result], args: argparse.Namespace) -> None:
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    by_name = {r.name: r.samples_per_s(args.batch) for r in results}
    clip = by_name["ours clip"]
    print(f"\n{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, {device_name}, "
          f"{'bf16 autocast' if torch.cuda.is_available() else 'fp32'}; {args.warmup} warmup + "
          f"{args.steps} timed steps each, median {args.clock} time\n")
    header = f"{'model':38} {'s/step':>8} {'samples/s':>10} {'GFLOP/sample':>13} {'vs ours clip':>13}"
    print(header + ("  MFU" if torch.cuda.is_available() else ""))
    for r in results:
        rate = r.samples_per_s(args.batch)
        line = (f"{r.name:38} {statistics.median(r.times):8.3f} {rate:10.2f} {r.flops / 1e9:13.1f} "
                f"{rate / clip:12.2f}x")
        utilisation = mfu(rate, r.flops, device_name, 1)
        print(line + (f"  {utilisation:.1%}" if utilisation is not None else ""))
    ratio = clip / by_name["open_clip clip"]
    speedup = by_name["ours flip, mask 0.5"] / clip
    print(f"\nours / open_clip (clip step):       {ratio:.2f}  (goal >= 1.0: {verdict(ratio >= 1.0)})")
    print(f"flip 0.5 speed-up over ours clip:   {speedup:.2f}x (goal >= 1.6: {verdict(speedup >= 1.6)})")
    for arm in MAECLIP_ARMS:
        cost = clip / by_name[f"ours {arm}"]
        print(f"{arm:15} step cost:     {cost:.2f}x an ours-clip step")
    kept = by_name[f"ours clip, {ACCUMULATION} micro-batches"] / by_name["ours clip, one pass"]
    print(f"accumulation {ACCUMULATION} x {args.batch // ACCUMULATION}, rate:  {kept:.2f} of one pass of {args.batch} "
          f"(goal >= 0.75: {verdict(kept >= 0.75)})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["vit-b16", "tiny"], default="vit-b16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: this process's CPU seconds, steadier than wall time on a busy machine (with --threads 1)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (as train.compile)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and torch.cuda.is_available():
        parser.error("--clock cpu does not time GPU work")
    if args.batch % ACCUMULATION:
        parser.error(f"--batch must be a multiple of {ACCUMULATION}, the accumulation rows' micro-batches")
    torch.set_num_threads(args.threads)
    report(run(args), args)


if __name__ == "__main__":
    main()
