#!/usr/bin/env bash
# The GPU checks, prepared as one run of about 4 minutes on one H100/H200-class GPU with 16 cores (bench/README.md,
# "On a GPU"): the ViT-B/16 train steps under bf16 autocast with fused AdamW, SDPA flash attention and
# torch.compile (ours clip / flip 0.5 / both MAE-CLIP arms / 4-way accumulation, open_clip's clip beside them,
# MFU against the device's bf16 dense peak), then the loader alone at 224 px on the same cores, to show whether
# data feeding keeps up with the step's samples/s. Run from the repository root with the project's venv:
#   bash bench/gpu.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs a CUDA device'"
"$PY" bench/step.py --model vit-b16 --batch 128 --warmup 3 --steps 10 --compile
"$PY" bench/data.py --n 4096 --shards 8 --image-size 224 --batch-size 128 --workers 12 --epochs 2
