"""Training FLOPs per sample of each objective, and model FLOPs utilisation (MFU).

Counting rules (as in open_clip's ``docs/model_profile.csv``, which counts 2 FLOPs per multiply-accumulate,
and nanoGPT's ``estimate_mfu``, after PaLM appendix B):
- Only matrix products count: linear layers, the patch-embedding conv and the attention products. Norms,
  activations, softmax, embedding look-ups and the B×B contrastive logits (B × embed_dim × 2 FLOPs a sample
  forward: 34 MFLOP even at a 32k batch and width 512) are left out.
- A transformer block over T tokens of width d with MLP ratio m: (4 + 2m)·d²·T MACs in its linear layers
  (12·d²·T at m = 4) plus 2·T²·d in QKᵀ and AV, causal or not.
- Training = 3 × forward (the backward costs twice the forward); passes run without gradient (similarity
  masking's scoring pass) count once.

Token counts follow the objectives' code: the patch embedding runs on every patch before masking, the image
encoder on CLS + ``num_kept`` patches, decoders on every position. Where the count depends on the captions
(masked-caption encoders, the token head), we take the upper bound of captions that fill the context.
Check: ViT-B/16 image tower forward = 35.1 GFLOPs and the 12 × 512 text tower = 5.96, open_clip's profile.
"""

from __future__ import annotations

import math

from trainer.config import ModelConfig
from trainer.models.masking import num_kept

# Dense bf16 peak TFLOP/s per device, without 2:4 sparsity (NVIDIA's 1,979 headline for H100 SXM is sparse),
# from torchtitan ``tools/utils.py:get_peak_flops`` and composer ``speed_monitor.py``. H100 PCIe
# and NVL are listed so that their names do not fall through to the SXM figure.
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "H100 PCIe": 756, "H100 NVL": 835}


def block_macs(width: int, tokens: int, mlp_ratio: float) -> int:
    """Multiply-accumulates of one pre-norm transformer block's forward over ``tokens`` tokens."""
    linear = (4 * width + 2 * int(width * mlp_ratio)) * width * tokens
    return linear + 2 * tokens**2 * width


def stack_macs(layers: int, width: int, tokens: int, mlp_ratio: float) -> int:
    return layers * block_macs(width, tokens, mlp_ratio)


def pool_macs(kind: str, width: int, tokens: int) -> int:
    """MAP's key/value projection over the pooled tokens, its attention, output projection and one-token MLP
    (4 × width, ``pooling.AttentionPool``); its query projection runs once per batch and is left out.
    CLS/EOT, GAP and MAX have no matrix products."""
    if kind != "map":
        return 0
    return 2 * width**2 * tokens + 2 * width * tokens + width**2 + 2 * 4 * width**2


def _kept_words(cfg: ModelConfig, ratio: float) -> int:
    """Caption positions a masked text encoder sees when the caption fills the context: start and EOT plus
    the kept share of the words (``masking.text_keep_indices``)."""
    return 2 + math.floor((cfg.context_length - 2) * (1.0 - ratio) + 1e-6)


def _patches(cfg: ModelConfig) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


def image_macs(cfg: ModelConfig, mask_ratio: float, head: bool = True, extra_tokens: int = 0) -> int:
    """Image tower forward: the patch embedding of every patch, then the blocks over CLS + the kept patches
    (+ ``extra_tokens``, M3AE's caption), then with ``head`` the pooler and the projection."""
    patches = _patches(cfg)
    kept = num_kept(patches, mask_ratio) if mask_ratio > 0 else patches
    width = cfg.vision_width
    macs = patches * 3 * cfg.patch_size**2 * width
    macs += stack_macs(cfg.vision_layers, width, 1 + kept + extra_tokens, cfg.mlp_ratio)
    if head:
        macs += pool_macs(cfg.image_pool, width, kept) + width * cfg.embed_dim
    return macs


def text_macs(cfg: ModelConfig, tokens: int, head: bool = True) -> int:
    """Text tower forward over ``tokens`` positions, then with ``head`` the pooler and the projection."""
    width = cfg.text_width
    macs = stack_macs(cfg.text_layers, width, tokens, cfg.mlp_ratio)
    if head:
        macs += pool_macs(cfg.text_pool, width, tokens) + width * cfg.embed_dim
    return macs


def decoder_macs(cfg: ModelConfig, inputs: int, text_tokens: int, predicted_tokens: int) -> int:
    """The reconstruction decoder: ``inputs`` MACs of projections into its width, its blocks over CLS, every
    patch and ``text_tokens`` caption positions, the pixel head on every patch and the vocabulary head on
    ``predicted_tokens`` masked caption tokens."""
    width = getattr(cfg, "decoder_width", 512)
    layers = getattr(cfg, "decoder_layers", 8)
    patches = _patches(cfg)
    blocks = stack_macs(layers, width, 1 + patches + text_tokens, cfg.mlp_ratio)
    heads = patches * width * 3 * cfg.patch_size**2 + predicted_tokens * width * cfg.vocab_size
    return inputs * width + blocks + heads


def _forward_macs(cfg: ModelConfig) -> tuple[int, int]:
    """(MACs of the passes that train, MACs of the passes without gradient) in one sample's forward,
    following each objective's ``forward``."""
    ratio = cfg.image_mask_ratio
    text_ratio = getattr(cfg, "text_mask_ratio", 0.0)
    visible = 1 + (num_kept(_patches(cfg), ratio) if ratio > 0 else _patches(cfg))
    seen = _kept_words(cfg, text_ratio) if text_ratio > 0 else cfg.context_length
    predicted = cfg.context_length - seen
    if cfg.objective in ("clip", "flip"):
        return image_macs(cfg, ratio) + text_macs(cfg, cfg.context_length), 0
    if cfg.objective == "mae":
        return image_macs(cfg, ratio, head=False) + decoder_macs(cfg, visible * cfg.vision_width, 0, 0), 0
    if cfg.objective == "m3ae":  # one joint encoder over image and caption, one decoder_embed
        encoder = image_macs(cfg, ratio, head=False, extra_tokens=seen)
        inputs = (visible + seen) * cfg.vision_width
        return encoder + decoder_macs(cfg, inputs, cfg.context_length, predicted), 0
    if cfg.objective == "maeclip":
        unmasked = getattr(cfg, "contrastive_input", "masked") == "unmasked"
        full_text = unmasked and text_ratio > 0
        trained = text_macs(cfg, seen, head=not full_text) + image_macs(cfg, ratio, head=not unmasked)
        if unmasked:  # the contrastive loss reads a full image pass, and a full caption pass if it is masked
            trained += image_macs(cfg, 0.0) + (text_macs(cfg, cfg.context_length) if full_text else 0)
        inputs = visible * cfg.vision_width + seen * cfg.text_width
        trained += decoder_macs(cfg, inputs, cfg.context_length, predicted)
        scoring = 0
        if getattr(cfg, "image_masking", "random") == "similarity":  # scored without gradient
            scoring = _patches(cfg) * cfg.vision_width * cfg.embed_dim
            scoring += 0 if unmasked else image_macs(cfg, 0.0, head=False)
        return trained, scoring
    raise ValueError(f"no FLOPs formula for objective '{cfg.objective}'")


def forward_flops(cfg: ModelConfig) -> float:
    """FLOPs of one sample's forward in training mode, every pass counted once (what a FLOP counter sees)."""
    trained, scoring = _forward_macs(cfg)
    return 2.0 * (trained + scoring)


def flops_per_sample(cfg: ModelConfig) -> float:
    """Training FLOPs of one sample: 3 × the forward of the passes that train, plus the no-gradient passes,
    at 2 FLOPs per multiply-accumulate."""
    trained, scoring = _forward_macs(cfg)
    return 2.0 * (3 * trained + scoring)


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of the longest ``PEAK_BF16_TFLOPS`` key in ``device_name``
    (``torch.cuda.get_device_name``, e.g. "NVIDIA H100 80GB HBM3"), or None for a device not in the table."""
    matches = [key for key in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


def mfu(samples_per_s: float, flops_per_sample: float, device_name: str, n_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s of ``samples_per_s`` (all devices together) over the bf16
    peak of ``n_devices`` devices named ``device_name``; None when the peak is unknown (CPU, unlisted GPU)."""
    peak = peak_tflops(device_name)
    if peak is None:
        return None
    return samples_per_s * flops_per_sample / (peak * 1e12 * n_devices)
