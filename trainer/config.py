"""Run configuration: a plain dataclass tree, YAML presets, ``--set a.b=c`` overrides, strict validation.

A preset is a YAML file in ``trainer/configs/`` (or any path). It may name a ``base`` preset whose values it
overrides. Validation happens here, before any process is launched: an unknown key names the closest valid
key, a bad value names the allowed set or range. Every key has a range or an allowed set, numbers must be
finite, strings printable and bounded. Presets and checkpoint configs are untrusted YAML: read safe (no tags, no
aliases) and bounded in size and depth. Errors are ``ConfigError`` with one line that quotes the offending value
cut to a bounded length (the CLI exits 2 on them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import reprlib
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
    # Image tower (ViT). ViT-B/16 at 224 px is the paper's backbone (docs/models.md §1).
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
    # The towers' MLP activation: exact GELU, or OpenAI CLIP's QuickGELU for weights trained with it (OpenAI's
    # checkpoints, open_clip's ``*-quickgelu`` models; trainer/models/interop.py).
    quick_gelu: bool = False
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
    # Train on a fixed, nested subset of this many samples of the train split (0 = all of it): the data-scale
    # axis. Chosen from the sample keys alone (trainer/data/loader.py), the same for every seed and world size.
    max_samples: int = 0
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
    # The global batch that lr and min_lr were published at; a run at another batch scales them by lr_scaling
    # (linear or sqrt; trainer/optim.py). 0: they are used as given at any batch.
    reference_batch: int = 0
    lr_scaling: str = "linear"
    # Which parameters skip weight decay (docs/models.md §9): "ndim", every tensor under 2 dims (SLIP's and
    # open_clip's CLIP, MAE); "no-embeddings", also the position, class and token embeddings and the MAP probe
    # (FLIP's exclude_wd, M3AE's no_decay_list).
    decay_rule: str = "ndim"


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
# Quoting user input in messages: bounded, one line.

QUOTE_LIMIT = 80
# Bounded work whatever the value: a few items per level, a few levels (a nested list of a million items
# costs as much to show as one of five).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, QUOTE_LIMIT + 10, QUOTE_LIMIT + 10, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters with "…": safe for any value in a message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        # repr() of an int past 4300 digits raises; this many digits is out of every range anyway.
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    # A string is cut before repr, so a 100 MB one costs no more than a short one.
    text = repr(value[:limit]) if isinstance(value, str) else _one_line(_REPR.repr(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str, limit: int = 4 * QUOTE_LIMIT) -> str:
    """Free text (a YAML parser's complaint) with line breaks and control characters escaped, cut to ``limit``."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------------
# Building a config from nested dicts, with type checks.

# Longest string value per key; storage URLs and paths get PATH_MAX, everything else is a short identifier.
STR_LIMIT = 256
LONG_STR_KEYS = {"data.url": 4096, "data.cache_dir": 4096, "train.run_url": 4096, "tracking.uri": 4096}


def _nearest(name: str, choices: typing.Iterable[str]) -> str:
    # difflib is quadratic in the name's length: a typo is short, so compare only the start.
    match = difflib.get_close_matches(name[:100], list(choices), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_str(path: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise ConfigError(f"{path}: {quote(value)} is longer than {limit} characters")
    if not value.isprintable():
        # Line breaks and control characters end up in logs, env vars, MLflow and file names; nobody means them.
        raise ConfigError(f"{path}: {quote(value)} contains control characters")


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, list | tuple) or len(value) != len(item_types):
            raise ConfigError(f"{path}: expected a list of {len(item_types)} values, got {quote(value)}")
        return tuple(_coerce(f"{path}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, item_types, strict=True)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {quote(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {quote(value)}")
    if annotation is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {quote(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{path}: {quote(value)} is too large") from None
        if not math.isfinite(number):
            # NaN compares false with every bound and inf overflows the first multiply: never a valid setting.
            raise ConfigError(f"{path}: {quote(value)} is not a finite number")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {quote(value)}")
        _check_str(path, value, LONG_STR_KEYS.get(path, STR_LIMIT))
        return value
    raise ConfigError(f"{path}: unsupported type {annotation}")  # pragma: no cover - schema bug


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown config key {quote(path)}{_nearest(path, valid)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of {hint.__name__} keys, got {quote(value)}")
            kwargs[key] = _build(hint, value, f"{path}.")
        else:
            kwargs[key] = _coerce(path, value, hint)
    return cls(**kwargs)


def _recoerce(obj: Any, prefix: str = "") -> None:
    """Type-check (and convert) every field of a dataclass tree in place: validate() also gets configs built in
    code, not only through ``_build``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, hints[f.name]):
                raise ConfigError(f"{path}: expected a {hints[f.name].__name__}, got {quote(value)}")
            _recoerce(value, f"{path}.")
        else:
            setattr(obj, f.name, _coerce(path, value, hints[f.name]))


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------------------------
# Safe, bounded YAML: presets and checkpoint config.yaml files are untrusted input.

MAX_YAML_BYTES = 1 << 20  # a preset is a few hundred bytes
MAX_YAML_DEPTH = 32  # a config nests three levels (section, key, list)
MAX_BASE_CHAIN = 16


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and deep nesting.

    Aliases let a few hundred bytes stand for a structure of billions of items ("billion laughs"), which
    anything walking the result (merging, quoting it in a message) then expands; configs never need them. Depth
    is bounded so the recursive composer cannot exhaust the stack.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config",
                                              self.peek_event().start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _NoAliasDumper(yaml.SafeDumper):
    """What ``to_yaml`` writes must load with ``_BoundedLoader``: never emit anchors for repeated objects."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _yaml_problem(err: BaseException) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return _one_line(f"{err.problem or err.context or 'invalid YAML'}{where}")
    if isinstance(err, yaml.reader.ReaderError):
        code = ord(err.character) if isinstance(err.character, str) else err.character
        return _one_line(f"{err.reason} (character #x{code:04x}, position {err.position})")
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return _one_line(" ".join(str(err).split()))  # e.g. int() refusing a 5,000-digit number


def load_yaml(text: str, source: str) -> Any:
    """Parse untrusted YAML; any failure is one ConfigError line naming ``source``."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_YAML_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass: no python/* tags
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        raise ConfigError(f"{source}: cannot read YAML: {_yaml_problem(err)}") from None


def read_yaml_file(path: Path, source: str) -> Any:
    """A YAML file read as ``load_yaml`` reads text, at most ``MAX_YAML_BYTES`` of it; ConfigError otherwise."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{source}: cannot read: {_one_line(err.strerror or type(err).__name__)}") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_YAML_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not UTF-8 text (byte {err.start})") from None
    return load_yaml(text, source)


# ---------------------------------------------------------------------------------------------------------
# Presets and overrides.


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(name: Any, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(name, str) or not name or len(name) > 4096 or not name.isprintable():
        raise ConfigError(f"preset {quote(name)}: expected a preset name or a YAML path")
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        names = preset_names()
        raise ConfigError(f"unknown preset {quote(name)}{_nearest(name, names)} (presets: {', '.join(names)})")
    if name in seen:
        raise ConfigError(f"preset {quote(name)} includes itself through 'base'")
    if len(seen) >= MAX_BASE_CHAIN:
        raise ConfigError(f"preset {quote(name)}: more than {MAX_BASE_CHAIN} presets chained through 'base'")
    source = f"preset {quote(str(path), 2 * QUOTE_LIMIT)}"
    raw = read_yaml_file(path, source) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {quote(raw)}")
    base = raw.pop("base", None)
    raw.setdefault("name", path.stem)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{source}: base: expected a preset name or a YAML path, got {quote(base)}")
    return _merge(_read_preset(base, (*seen, name)), raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001). The value is read as YAML (numbers, bools, lists)."""
    if not isinstance(text, str):
        raise ConfigError(f"override {quote(text)} is not of the form key.path=value")
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k and k.isprintable() and len(k) <= STR_LIMIT for k in keys):
        raise ConfigError(f"override {quote(text)} is not of the form key.path=value")
    value = load_yaml(raw, f"override {quote(text)}") if raw.strip() else ""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads '1e-3' as a string; users mean a number
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return keys, value


def load_config(preset: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve a preset plus ``--set`` overrides into a validated Config."""
    values = _read_preset(preset)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {quote(text)}: {quote(key)} is not a section")
        node[keys[-1]] = value
    return from_dict(values)


def from_dict(values: dict[str, Any]) -> Config:
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping of Config keys, got {quote(values)}")
    config = _build(Config, values)
    validate(config)
    return config


def to_yaml(config: Config) -> str:
    return yaml.dump(config.to_dict(), Dumper=_NoAliasDumper, sort_keys=False)


def from_yaml(text: str, source: str = "config YAML") -> Config:
    """A Config from YAML text such as a checkpoint's config.yaml (untrusted: loaded safe and bounded)."""
    if not isinstance(text, str):
        raise ConfigError(f"{source}: expected text, got {quote(text)}")
    return from_dict(load_yaml(text, source))


# ---------------------------------------------------------------------------------------------------------
# Validation of values, and storage URLs.


def _choice(path: str, value: str, allowed: typing.Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: {quote(value)} is not one of {', '.join(allowed)}")


def _range(path: str, value: float, low: float, high: float, *, low_open: bool = False,
           high_open: bool = False) -> None:
    # Written so that NaN fails: every comparison with NaN is false, so test for being inside, not outside.
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        bracket = ("(" if low_open else "[", ")" if high_open else "]")
        raise ConfigError(f"{path}: {quote(value)} is outside {bracket[0]}{low}, {high}{bracket[1]}")


def normalize_url(url: str, key: str = "url") -> str:
    """Check a storage URL and make ``file://`` (or a bare path) absolute: ``file:///abs/path``.

    Relative ``file://`` URLs are relative to the current directory, which is how the embedded defaults
    (``file://.maeclip/...``) resolve to the project's ``./.maeclip/``.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{key}: empty storage URL")
    _check_str(key, url, 4096)
    if "://" not in url:
        if ":" in url.split("/")[0]:
            raise ConfigError(f"{key}: malformed storage URL {quote(url)} (expected file://, gs:// or s3://)")
        return "file://" + os.path.abspath(url)
    scheme, rest = url.split("://", 1)
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(f"{key}: unsupported storage scheme {quote(scheme + '://')} in {quote(url)} "
                          "(allowed: file, gs, s3)")
    if scheme == "file":
        return "file://" + os.path.abspath(rest)
    parsed = urlparse(url)
    if not parsed.netloc or not all(c.isalnum() or c in "-_." for c in parsed.netloc):
        raise ConfigError(f"{key}: malformed storage URL {quote(url)} (expected {scheme}://BUCKET/PATH)")
    return url.rstrip("/")


# Sizes: generous upper bounds that still stop a typo (an extra digit or two) before it allocates terabytes.
MAX_WIDTH = 1 << 16
MAX_LAYERS = 1024
MAX_IMAGE_SIZE = 8192
SEED_MAX = (1 << 32) - 1  # numpy's seed range; also keeps train.step_seed within torch.manual_seed's


def _validate_objective_model(m: ModelConfig) -> None:
    """The model keys that the objectives added: sizes, switches, and which combinations make sense."""
    _choice("model.pos_embed", m.pos_embed, ("learned", "sincos"))
    _choice("model.contrastive_input", m.contrastive_input, ("masked", "unmasked"))
    _choice("model.image_masking", m.image_masking, ("random", "similarity"))
    _choice("model.similarity_mask", m.similarity_mask, ("most", "least"))
    _range("model.decoder_width", m.decoder_width, 1, MAX_WIDTH)
    _range("model.decoder_layers", m.decoder_layers, 1, MAX_LAYERS)
    _range("model.decoder_heads", m.decoder_heads, 1, MAX_WIDTH)
    if m.decoder_width % m.decoder_heads or m.decoder_width % 4:
        raise ConfigError(f"model.decoder_heads: {m.decoder_heads} (and 4, for the 2-D sin-cos table) must "
                          f"divide model.decoder_width {m.decoder_width}")
    if m.pos_embed == "sincos" and m.vision_width % 4:
        raise ConfigError(f"model.pos_embed: sincos needs a model.vision_width divisible by 4, not "
                          f"{m.vision_width}")
    _range("model.map_heads", m.map_heads, 0, MAX_WIDTH)
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


def _validate_model(m: ModelConfig) -> None:
    _choice("model.objective", m.objective, OBJECTIVES)
    _choice("model.image_pool", m.image_pool, IMAGE_POOLS)
    _choice("model.text_pool", m.text_pool, TEXT_POOLS)
    _range("model.image_size", m.image_size, 1, MAX_IMAGE_SIZE)
    _range("model.patch_size", m.patch_size, 1, MAX_IMAGE_SIZE)
    for key in ("vision_width", "vision_heads", "text_width", "text_heads", "embed_dim"):
        _range(f"model.{key}", getattr(m, key), 1, MAX_WIDTH)
    for key in ("vision_layers", "text_layers"):
        _range(f"model.{key}", getattr(m, key), 1, MAX_LAYERS)
    # Every caption holds at least the start and end-of-text tokens; ids 0, SOT and EOT must be distinct.
    _range("model.context_length", m.context_length, 2, 1 << 16)
    _range("model.vocab_size", m.vocab_size, 3, 1 << 20)
    if m.image_size % m.patch_size:
        raise ConfigError(f"model.patch_size: {m.patch_size} does not divide model.image_size {m.image_size}")
    if m.vision_width % m.vision_heads:
        raise ConfigError(f"model.vision_heads: {m.vision_heads} does not divide model.vision_width {m.vision_width}")
    if m.text_width % m.text_heads:
        raise ConfigError(f"model.text_heads: {m.text_heads} does not divide model.text_width {m.text_width}")
    _range("model.mlp_ratio", m.mlp_ratio, 0.0, 64.0, low_open=True)
    narrowest = min(m.vision_width, m.text_width, m.decoder_width)
    if int(narrowest * m.mlp_ratio) < 1:
        raise ConfigError(f"model.mlp_ratio: {m.mlp_ratio} gives an MLP of no units at width {narrowest}")
    _range("model.image_mask_ratio", m.image_mask_ratio, 0.0, 0.95)
    _validate_objective_model(m)
    # The scale is a logit multiplier stored as its log: positive, and capped well below float overflow.
    _range("model.logit_scale_max", m.logit_scale_max, 0.0, 1e4, low_open=True)
    _range("model.logit_scale_init", m.logit_scale_init, 0.0, m.logit_scale_max, low_open=True)


def _validate_data(d: DataConfig) -> None:
    _range("data.batch_size", d.batch_size, 1, 1 << 20)
    _range("data.num_workers", d.num_workers, 0, 256)
    _range("data.shuffle_seed", d.shuffle_seed, 0, SEED_MAX)
    _range("data.num_canonical_nodes", d.num_canonical_nodes, 1, 1 << 16)
    _range("data.predownload", d.predownload, 0, 1 << 30)
    _range("data.shuffle_block_size", d.shuffle_block_size, 0, 1 << 40)
    _range("data.max_samples", d.max_samples, 0, 1 << 40)
    _choice("data.shuffle_algo", d.shuffle_algo, ("py1e", "py1br", "py1s", "py2s", "naive"))
    if d.cache_limit and not re.fullmatch(r"\d{1,15}(\.\d{1,15})?[kmgt]?b", d.cache_limit.lower()):
        raise ConfigError(f"data.cache_limit: {quote(d.cache_limit)} is not a size such as 500mb or 20gb")
    # Pixels are scaled to [0, 1] before (x - mean) / std: a mean or std outside it is the 0-255 convention by
    # mistake, and a zero std divides by zero (the loss is NaN from the first step).
    for i in range(3):
        _range(f"data.image_mean[{i}]", d.image_mean[i], 0.0, 1.0)
        _range(f"data.image_std[{i}]", d.image_std[i], 1e-6, 1.0)
    _range("data.crop_scale[0]", d.crop_scale[0], 0.0, d.crop_scale[1], low_open=True)
    _range("data.crop_scale[1]", d.crop_scale[1], d.crop_scale[0], 1.0)


def _validate_optim(o: OptimConfig) -> None:
    _range("optim.lr", o.lr, 0.0, 10.0, low_open=True)
    _range("optim.min_lr", o.min_lr, 0.0, o.lr)  # the cosine decays from lr down to min_lr
    _range("optim.weight_decay", o.weight_decay, 0.0, 10.0)
    # Adam divides by 1 - beta^t: a beta of 1 divides by zero (torch refuses it).
    _range("optim.beta1", o.beta1, 0.0, 1.0, high_open=True)
    _range("optim.beta2", o.beta2, 0.0, 1.0, high_open=True)
    _range("optim.eps", o.eps, 0.0, 1.0, low_open=True)
    _range("optim.grad_clip", o.grad_clip, 0.0, 1e9)
    _range("optim.warmup_steps", o.warmup_steps, 0, 1 << 30)
    _range("optim.reference_batch", o.reference_batch, 0, 1 << 40)
    _choice("optim.lr_scaling", o.lr_scaling, ("linear", "sqrt"))
    _choice("optim.decay_rule", o.decay_rule, ("ndim", "no-embeddings"))


def _validate_train(t: TrainConfig, d: DataConfig) -> None:
    _range("train.steps", t.steps, 1, 1 << 40)
    _range("train.schedule_steps", t.schedule_steps, 0, 1 << 40)
    _range("train.checkpoint_every", t.checkpoint_every, 1, 1 << 40)
    _range("train.keep_last", t.keep_last, 1, 1 << 20)
    _range("train.log_every", t.log_every, 1, 1 << 40)
    _range("train.seed", t.seed, 0, SEED_MAX)
    _range("train.global_batch_size", t.global_batch_size, 0, 1 << 40)
    _choice("train.parallelism", t.parallelism, ("ddp", "fsdp"))
    if t.global_batch_size % d.batch_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not a multiple of data.batch_size "
                          f"{d.batch_size}")


def validate(config: Config) -> None:
    """Check every key's type, range and the combinations; make the storage URLs absolute. Raises ConfigError."""
    if not isinstance(config, Config):
        raise ConfigError(f"config: expected a Config, got {quote(config)}")
    _recoerce(config)
    for key in ("name", "tracking.experiment"):  # names of the MLflow run and experiment
        if not config.flat()[key]:
            raise ConfigError(f"{key}: must not be empty")
    _validate_model(config.model)
    _validate_data(config.data)
    _validate_optim(config.optim)
    _validate_train(config.train, config.data)
    d, t = config.data, config.train
    d.url = normalize_url(d.url, "data.url")
    t.run_url = normalize_url(t.run_url, "train.run_url")
    if d.cache_dir:
        d.cache_dir = os.path.abspath(d.cache_dir)


__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "TrackingConfig", "TrainConfig",
    "from_dict", "from_yaml", "load_config", "normalize_url", "parse_override", "preset_names", "quote", "to_yaml",
    "validate",
]
