"""Run configuration: a plain dataclass tree, YAML presets, ``--set a.b=c`` overrides, strict validation.

A preset is a YAML file in ``trainer/configs/`` (or any path). It may name a ``base`` preset whose values it
overrides. Validation happens here, before any process is launched: an unknown key names the closest valid
key, a bad value names the allowed set or range. Errors are ``ConfigError`` (the CLI exits 2 on them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

PRESET_DIR = Path(__file__).parent / "configs"
# Schemes with an fsspec filesystem we install (file, gcsfs, s3fs).
STORAGE_SCHEMES = ("file", "gs", "s3")
OBJECTIVES = ("clip", "flip", "mae", "m3ae", "maeclip")
IMAGE_POOLS = ("cls", "map", "gap", "max")
TEXT_POOLS = ("eot", "map", "gap", "max")


class ConfigError(ValueError):
    """An invalid configuration, preset or override; the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    objective: str = "clip"
    # Image tower (ViT). ViT-B/16 at 224 px is the paper's backbone (paper-notes §1.1).
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    image_pool: str = "cls"
    # Text tower: CLIP's 12 x 512, 8 heads, 77 tokens, 49,408 BPE tokens (open_clip ViT-B-16.json).
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    text_pool: str = "eot"
    mlp_ratio: float = 4.0
    embed_dim: int = 512
    # CLIP's temperature: learnable, initialised at 1/0.07 and capped at 100 (Radford et al. 2021; open_clip).
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    # Fraction of image patches dropped before the image encoder (0 = CLIP; FLIP uses 0.5, Li et al. 2022;
    # MAE and M3AE 0.75, He et al. 2021 / m3ae_public).
    image_mask_ratio: float = 0.0
    # Image tower positions: learned (CLIP, open_clip) or fixed 2-D sin-cos (MAE util/pos_embed.py, M3AE).
    pos_embed: str = "learned"
    # Causal text tower (CLIP) or bidirectional with a key-padding mask (needed to reconstruct masked tokens).
    text_causal: bool = True
    # Heads of the MAP poolers; 0 = the tower's own head count (big_vision's MAPHead uses 12 at ViT-B).
    map_heads: int = 0
    # Reconstruction decoder: 8 blocks x 512, 16 heads (MAE mae_vit_base_patch16; M3AE dec_* defaults).
    decoder_width: int = 512
    decoder_layers: int = 8
    decoder_heads: int = 16
    # Fraction of caption words masked for token reconstruction (m3ae, maeclip); M3AE uses 0.75.
    text_mask_ratio: float = 0.0
    # Per-patch normalised pixel targets (MAE PRETRAIN.md trains with --norm_pix_loss).
    norm_pix_loss: bool = True
    # Weights of the pixel and token losses (M3AE README: image 1.0, text 0.5).
    image_loss_weight: float = 1.0
    text_loss_weight: float = 0.5
    # maeclip: contrastive loss on the masked passes the decoder reads, or on extra unmasked passes.
    contrastive_input: str = "masked"
    # maeclip: patches to mask, random (MAE) or by similarity to the caption (see
    # masking.similarity_keep_indices), the most or least similar, with Gumbel noise of this scale (our
    # choice; the paper gives none).
    image_masking: str = "random"
    similarity_mask: str = "most"
    mask_noise: float = 0.1


@dataclass
class DataConfig:
    # Corpus root URL: MDS splits live at <url>/train and <url>/eval, manifest.json at the root.
    url: str = "file://.maeclip/data/shapes"
    # Node-local cache for remote shards; empty means a folder under the system temp dir.
    cache_dir: str = ""
    batch_size: int = 32  # per rank
    num_workers: int = 2
    shuffle: bool = True
    shuffle_seed: int = 1234
    # Fixed per run so the sample order does not depend on the world size (Streaming's contract).
    num_canonical_nodes: int = 1
    # Samples each worker downloads ahead; 0 is Streaming's default, 8 x batch_size (StreamingDataset docs).
    predownload: int = 0
    # Node-local cache size ("20gb"), least-recently-used shards are evicted past it; empty keeps everything.
    cache_limit: str = ""
    # Streaming's shuffle algorithm; py1e, its default, shuffles within blocks so each rank reads few shards.
    shuffle_algo: str = "py1e"
    # Samples per shuffle block; 0 is Streaming's default, max(4M / num_canonical_nodes, 2^18).
    shuffle_block_size: int = 0
    # OpenAI CLIP's normalisation (open_clip constants.py).
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # RandomResizedCrop scale range for training; (1.0, 1.0) disables cropping.
    crop_scale: tuple[float, float] = (0.5, 1.0)


@dataclass
class OptimConfig:
    # SLIP's CLIP recipe on CC12M: AdamW, beta2 0.98, lr 5e-4 at batch 4096, wd 0.5 (SLIP README, main.py).
    lr: float = 5e-4
    weight_decay: float = 0.5
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr: float = 1e-5
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    run_url: str = "file://.maeclip/runs/default"
    steps: int = 1000
    # Length of the warmup + cosine schedule; 0 means train.steps. A pipeline that trains in segments stops each
    # at its own train.steps but keeps the whole run's schedule, so the rate does not restart every segment.
    schedule_steps: int = 0
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    # Samples per optimizer step over all ranks; 0 means data.batch_size x world size. A larger value is reached
    # by gradient accumulation and must be a multiple of data.batch_size x world size.
    global_batch_size: int = 0
    # ddp (replicated) or fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state sharded).
    parallelism: str = "ddp"
    compile: bool = False
    # Deterministic kernels (torch.use_deterministic_algorithms), for exact-resume checks on CPU.
    deterministic: bool = False
    # Upload checkpoint shards in a background thread while training goes on; committed at the next save.
    async_checkpoint: bool = False


@dataclass
class TrackingConfig:
    # Empty: $MLFLOW_TRACKING_URI, else the embedded sqlite store under .maeclip/.
    uri: str = ""
    experiment: str = "maeclip"


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def digest(self) -> str:
        """A short hash of the resolved config, recorded in every checkpoint's meta.json."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """``{"model.objective": "clip", ...}``: the form MLflow params and ``--set`` use."""
        return _flatten(self.to_dict())


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------------------------
# Building a config from nested dicts, with type checks.


def _nearest(name: str, choices: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, list | tuple) or len(value) != len(item_types):
            raise ConfigError(f"{path}: expected a list of {len(item_types)} values, got {value!r}")
        return tuple(_coerce(f"{path}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, item_types, strict=True)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported type {annotation}")  # pragma: no cover - schema bug


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown config key '{path}'{_nearest(path, valid)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of {hint.__name__} keys, got {value!r}")
            kwargs[key] = _build(hint, value, f"{path}.")
        else:
            kwargs[key] = _coerce(path, value, hint)
    return cls(**kwargs)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------------------------
# Presets and overrides.


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        names = preset_names()
        raise ConfigError(f"unknown preset '{name}'{_nearest(name, names)} (presets: {', '.join(names)})")
    if name in seen:
        raise ConfigError(f"preset '{name}' includes itself through 'base'")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"preset '{name}': expected a mapping at the top level")
    base = raw.pop("base", None)
    raw.setdefault("name", path.stem)
    if base is None:
        return raw
    return _merge(_read_preset(base, (*seen, name)), raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001). The value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': cannot read the value: {err.problem}") from err
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads '1e-3' as a string; users mean a number
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return key.strip().split("."), value


def load_config(preset: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve a preset plus ``--set`` overrides into a validated Config."""
    values = _read_preset(preset)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{key}' is not a section")
        node[keys[-1]] = value
    return from_dict(values)


def from_dict(values: dict[str, Any]) -> Config:
    config = _build(Config, values)
    validate(config)
    return config


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def from_yaml(text: str) -> Config:
    return from_dict(yaml.safe_load(text))


# ---------------------------------------------------------------------------------------------------------
# Validation of values, and storage URLs.


def _choice(path: str, value: str, allowed: typing.Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: '{value}' is not one of {', '.join(allowed)}")


def _range(path: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{path}: {value} is outside {bracket}{low}, {high}]")


def normalize_url(url: str, key: str = "url") -> str:
    """Check a storage URL and make ``file://`` (or a bare path) absolute: ``file:///abs/path``.

    Relative ``file://`` URLs are relative to the current directory, which is how the embedded defaults
    (``file://.maeclip/...``) resolve to the project's ``./.maeclip/``.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{key}: empty storage URL")
    if "://" not in url:
        if ":" in url.split("/")[0]:
            raise ConfigError(f"{key}: malformed storage URL '{url}' (expected file://, gs:// or s3://)")
        return "file://" + os.path.abspath(url)
    scheme, rest = url.split("://", 1)
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(f"{key}: unsupported storage scheme '{scheme}://' in '{url}' (allowed: file, gs, s3)")
    if scheme == "file":
        return "file://" + os.path.abspath(rest)
    parsed = urlparse(url)
    if not parsed.netloc or not all(c.isalnum() or c in "-_." for c in parsed.netloc):
        raise ConfigError(f"{key}: malformed storage URL '{url}' (expected {scheme}://BUCKET/PATH)")
    return url.rstrip("/")


def _validate_objective_model(m: ModelConfig) -> None:
    """The model keys that the objectives added: sizes, switches, and which combinations make sense."""
    _choice("model.pos_embed", m.pos_embed, ("learned", "sincos"))
    _choice("model.contrastive_input", m.contrastive_input, ("masked", "unmasked"))
    _choice("model.image_masking", m.image_masking, ("random", "similarity"))
    _choice("model.similarity_mask", m.similarity_mask, ("most", "least"))
    for key in ("decoder_width", "decoder_layers", "decoder_heads"):
        _range(f"model.{key}", getattr(m, key), 1, 1 << 20)
    if m.decoder_width % m.decoder_heads or m.decoder_width % 4:
        raise ConfigError(f"model.decoder_heads: {m.decoder_heads} (and 4, for the 2-D sin-cos table) must "
                          f"divide model.decoder_width {m.decoder_width}")
    if m.pos_embed == "sincos" and m.vision_width % 4:
        raise ConfigError(f"model.pos_embed: sincos needs a model.vision_width divisible by 4, not "
                          f"{m.vision_width}")
    _range("model.map_heads", m.map_heads, 0, 1 << 20)
    for tower in ("vision", "text"):
        if m.map_heads and getattr(m, f"{tower}_width") % m.map_heads:
            raise ConfigError(f"model.map_heads: {m.map_heads} does not divide model.{tower}_width")
    _range("model.text_mask_ratio", m.text_mask_ratio, 0.0, 0.95)
    for key in ("image_loss_weight", "text_loss_weight", "mask_noise"):
        _range(f"model.{key}", getattr(m, key), 0.0, 1e6)
    reconstructs = m.objective in ("mae", "m3ae", "maeclip")
    if reconstructs and m.image_mask_ratio == 0:
        raise ConfigError(f"model.image_mask_ratio: {m.objective} reconstructs masked patches, so it needs a "
                          "ratio > 0 (MAE and M3AE use 0.75)")
    if m.objective in ("mae", "m3ae") and m.image_pool == "map":
        raise ConfigError(f"model.image_pool: {m.objective} has no loss on the pooled feature to train a MAP "
                          "head; use one of cls, gap, max")
    if m.text_mask_ratio > 0 and m.objective not in ("m3ae", "maeclip"):
        raise ConfigError(f"model.text_mask_ratio: only m3ae and maeclip reconstruct text, not {m.objective}")
    if m.objective == "maeclip" and m.text_mask_ratio > 0 and m.text_causal:
        raise ConfigError("model.text_causal: masked-token reconstruction needs the bidirectional text "
                          "tower; set model.text_causal false or model.text_mask_ratio 0")
    if m.image_masking == "similarity" and m.objective != "maeclip":
        raise ConfigError(f"model.image_masking: similarity masking needs a caption embedding; only maeclip "
                          f"has one, not {m.objective}")


def validate(config: Config) -> None:
    m, d, o, t = config.model, config.data, config.optim, config.train
    _choice("model.objective", m.objective, OBJECTIVES)
    _choice("model.image_pool", m.image_pool, IMAGE_POOLS)
    _choice("model.text_pool", m.text_pool, TEXT_POOLS)
    for key in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
                "text_layers", "text_heads", "context_length", "vocab_size", "embed_dim"):
        _range(f"model.{key}", getattr(m, key), 1, 1 << 20)
    if m.image_size % m.patch_size:
        raise ConfigError(f"model.patch_size: {m.patch_size} does not divide model.image_size {m.image_size}")
    if m.vision_width % m.vision_heads:
        raise ConfigError(f"model.vision_heads: {m.vision_heads} does not divide model.vision_width {m.vision_width}")
    if m.text_width % m.text_heads:
        raise ConfigError(f"model.text_heads: {m.text_heads} does not divide model.text_width {m.text_width}")
    _range("model.image_mask_ratio", m.image_mask_ratio, 0.0, 0.95)
    _validate_objective_model(m)
    _range("model.logit_scale_init", m.logit_scale_init, 0.0, m.logit_scale_max, low_open=True)
    _range("data.batch_size", d.batch_size, 1, 1 << 20)
    _range("data.num_workers", d.num_workers, 0, 256)
    _range("data.num_canonical_nodes", d.num_canonical_nodes, 1, 1 << 16)
    _range("data.predownload", d.predownload, 0, 1 << 30)
    _range("data.shuffle_block_size", d.shuffle_block_size, 0, 1 << 40)
    _choice("data.shuffle_algo", d.shuffle_algo, ("py1e", "py1br", "py1s", "py2s", "naive"))
    if d.cache_limit and not re.fullmatch(r"\d+(\.\d+)?[kmgt]?b", d.cache_limit.lower()):
        raise ConfigError(f"data.cache_limit: '{d.cache_limit}' is not a size such as 500mb or 20gb")
    _range("data.crop_scale[0]", d.crop_scale[0], 0.0, d.crop_scale[1], low_open=True)
    _range("data.crop_scale[1]", d.crop_scale[1], d.crop_scale[0], 1.0)
    _range("optim.lr", o.lr, 0.0, 10.0, low_open=True)
    _range("optim.weight_decay", o.weight_decay, 0.0, 10.0)
    _range("optim.beta1", o.beta1, 0.0, 1.0)
    _range("optim.beta2", o.beta2, 0.0, 1.0)
    _range("optim.grad_clip", o.grad_clip, 0.0, 1e9)
    _range("optim.warmup_steps", o.warmup_steps, 0, 1 << 30)
    _range("train.steps", t.steps, 1, 1 << 40)
    _range("train.schedule_steps", t.schedule_steps, 0, 1 << 40)
    _range("train.checkpoint_every", t.checkpoint_every, 1, 1 << 40)
    _range("train.keep_last", t.keep_last, 1, 1 << 20)
    _range("train.log_every", t.log_every, 1, 1 << 40)
    _range("train.global_batch_size", t.global_batch_size, 0, 1 << 40)
    _choice("train.parallelism", t.parallelism, ("ddp", "fsdp"))
    if t.global_batch_size % d.batch_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not a multiple of data.batch_size "
                          f"{d.batch_size}")
    d.url = normalize_url(d.url, "data.url")
    t.run_url = normalize_url(t.run_url, "train.run_url")
    if d.cache_dir:
        d.cache_dir = os.path.abspath(d.cache_dir)


__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "TrackingConfig", "TrainConfig",
    "from_dict", "from_yaml", "load_config", "normalize_url", "parse_override", "preset_names", "to_yaml",
]
