"""Checkpoints from storage are untrusted input. DCP's own reader ``pickle.load``s ``.metadata`` before any
planner runs, so a ``.metadata`` swapped for a code-running pickle is the attack: resume, ``maeclip train``,
``eval`` and ``export`` must refuse it (exit 2, one line, nothing launched) on file://, gs:// and s3:// without
ever running it, and treat malformed config.yaml / meta.json / weights the same way. Honest checkpoints still
work, and export writes a state dict that open_clip loads strictly."""

from __future__ import annotations

import json
import os
import pickle

import open_clip
import pytest
import safetensors.torch
import torch
from small_models import make_tokens
from torch.distributed.checkpoint.filesystem import FileSystemReader

from pipelines import cli
from trainer import checkpoint, storage
from trainer.checkpoint import CheckpointRefused, parse_dcp_metadata, safe_storage_reader
from trainer.config import load_config
from trainer.data.shapes import write_shapes
from trainer.models import build_model

SMALL = ["model.image_size=16", "model.patch_size=8", "model.vision_width=64", "model.vision_layers=1",
         "model.vision_heads=2", "model.text_width=64", "model.text_layers=1", "model.text_heads=2",
         "model.context_length=8", "model.vocab_size=60", "model.embed_dim=16"]


class _OpensFile:
    """Unpickling this creates a file: ``open(path, "w")``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class _RunsShell:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    url = f"file://{tmp_path_factory.mktemp('corpus')}"
    write_shapes(url, n_train=8, n_eval=8, seed=0, image_size=16)
    return url


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the pickle payload ran"


def _overrides(run_url: str, corpus: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    return [*SMALL, f"train.run_url={run_url}", *([f"data.url={corpus}"] if corpus else []), *extra]


def _trained(config, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()  # AdamW moments and step in the DCP state, as after real training
    return model, optimizer


def _save(run_url: str, step: int, *, corpus: str | None = None, extra: tuple[str, ...] = (), seed: int = 0):
    config = load_config("tiny-clip", _overrides(run_url, corpus, extra))
    model, optimizer = _trained(config, seed)
    return checkpoint.save(run_url, step, model, optimizer, config, {"samples_seen": step}), model, config


def _tamper_metadata(url: str, payload: object) -> None:
    """Replace ``.metadata`` by our honest Metadata carrying ``payload`` inside it (planner_data is Any)."""
    metadata_url = storage.join(url, ".metadata")
    metadata = parse_dcp_metadata(storage.read_bytes(metadata_url), metadata_url)  # our own save
    metadata.planner_data = {"model.visual.cls_token": payload}
    storage.write_bytes(metadata_url, pickle.dumps(metadata))


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("maeclip: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    return exited.value.code


# ---------------------------------------------------------------------------------------------------------
# A code-running .metadata, on every storage backend and through every entry point.


def test_resume_refuses_a_code_running_metadata_rather_than_falling_back(run_url, marker):
    _save(run_url, 1)
    url, _, config = _save(run_url, 2, seed=1)
    _tamper_metadata(url, _OpensFile(str(marker)))
    model, optimizer = _trained(config, seed=3)
    with pytest.raises(CheckpointRefused, match=r"refusing checkpoint .*step-000000002/\.metadata"):
        checkpoint.resume(run_url, model, optimizer)  # never quietly back to step 1


def test_train_refuses_a_code_running_metadata_and_launches_nothing(run_url, corpus, marker, monkeypatch, capsys):
    import trainer.launch

    launched = []
    monkeypatch.setattr(trainer.launch, "launch_training", lambda *args, **kwargs: launched.append(args))
    url, _, _ = _save(run_url, 1, corpus=corpus)
    argv = ["train", "--config", "tiny-clip", *(f"--set={o}" for o in _overrides(run_url, corpus))]
    cli.main(argv)  # an honest checkpoint: preflight passes and training is launched
    assert len(launched) == 1 and capsys.readouterr().out.strip() == url
    _tamper_metadata(url, _RunsShell(str(marker)))
    assert _exit_code(argv) == 2
    _one_error_line(capsys, "refusing checkpoint", "step-000000001/.metadata", "is not part of DCP metadata")
    assert len(launched) == 1


def test_eval_refuses_a_code_running_metadata(run_url, marker, tmp_path, capsys):
    url, _, _ = _save(run_url, 1)
    _tamper_metadata(url, _OpensFile(str(marker)))
    assert _exit_code(["eval", "--checkpoint", url, "--tracking-uri", f"file://{tmp_path}/mlruns"]) == 2
    _one_error_line(capsys, "refusing checkpoint", url)
    assert not storage.exists(storage.join(url, "metrics.json"))


def test_export_refuses_a_code_running_metadata(run_url, marker, tmp_path, capsys):
    url, _, _ = _save(run_url, 1)
    _tamper_metadata(url, _RunsShell(str(marker)))
    out = tmp_path / "open_clip.safetensors"
    assert _exit_code(["export", "--checkpoint", run_url, "--out", str(out)]) == 2  # a run URL: its newest
    _one_error_line(capsys, "refusing checkpoint", url)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# What the safe reader admits and refuses, byte by byte.


@pytest.fixture(scope="module")
def honest_metadata(tmp_path_factory) -> bytes:
    run = f"file://{tmp_path_factory.mktemp('honest')}/run"
    url, _, _ = _save(run, 1)
    return storage.read_bytes(storage.join(url, ".metadata"))


def _with(metadata_bytes: bytes, change) -> bytes:
    metadata = parse_dcp_metadata(metadata_bytes, "honest/.metadata")
    change(metadata)
    return pickle.dumps(metadata)


def _traversal(metadata) -> None:
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../../etc/passwd"


@pytest.mark.parametrize(
    ("make", "reason"),
    [(lambda m, path: pickle.dumps(_RunsShell(path)), "posix.system is not part of DCP metadata"),
     (lambda m, path: pickle.dumps(_OpensFile(path)), "io.open is not part of DCP metadata"),
     (lambda m, path: _with(m, lambda md: setattr(md, "storage_meta", _OpensFile(path))), "io.open"),
     (lambda m, path: pickle.dumps({"state_dict_metadata": {}}), "not a DCP Metadata but dict"),
     (lambda m, path: m[: len(m) // 2], "truncated"),
     (lambda m, path: b"garbage", "UnpicklingError"),
     (lambda m, path: _with(m, _traversal), "is not a file of this checkpoint"),
     (lambda m, path: pickle.dumps(m, protocol=0), "is not part of DCP metadata")],
    ids=["os-system", "open", "nested-in-metadata", "not-metadata", "truncated", "garbage", "path-traversal",
         "protocol-0"],
)
def test_safe_reader_refuses_anything_but_dcp_metadata(honest_metadata, marker, make, reason):
    with pytest.raises(CheckpointRefused, match=reason):
        parse_dcp_metadata(make(honest_metadata, str(marker)), "x/.metadata")


def test_safe_reader_reads_honest_metadata_as_dcp_does(honest_metadata, tmp_path):
    (tmp_path / ".metadata").write_bytes(honest_metadata)  # DCP's own reader is the peer for an honest save
    ours, theirs = safe_storage_reader(f"file://{tmp_path}"), FileSystemReader(str(tmp_path))
    ours.load_id = theirs.load_id  # each reader stamps the metadata with its own load id
    assert ours.read_metadata() == theirs.read_metadata()


def test_oversized_metadata_is_refused_before_it_is_parsed(monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_METADATA_BYTES", 10)
    with pytest.raises(CheckpointRefused, match="larger than 10 bytes"):
        parse_dcp_metadata(b"x" * 11, "x/.metadata")


# ---------------------------------------------------------------------------------------------------------
# Malformed config.yaml, meta.json and weights: eval (which goes through load_for_eval) says so on one line.


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


MALFORMED = {
    "config-not-yaml": ("config.yaml", lambda data: b"model: [unclosed\n  : -\n", "config.yaml"),
    "config-bad-utf8": ("config.yaml", lambda data: b"\xff\xfe\x00model", "UnicodeDecodeError"),
    "config-invalid": ("config.yaml", lambda data: b"model:\n  vision_widht: 3\n", "invalid config"),
    "config-not-a-mapping": ("config.yaml", lambda data: b"- 1\n- 2\n", "config.yaml"),
    "meta-not-json": ("meta.json", lambda data: b"{step: 1", "not JSON"),
    "meta-not-an-object": ("meta.json", lambda data: b"[1, 2]", "not a JSON object"),
    "meta-step-not-int": ("meta.json", lambda data: json.dumps({"step": "1"}).encode(), "'step' is '1'"),
    "weights-truncated": ("weights.safetensors", _truncate, "truncated"),
    "weights-garbage": ("weights.safetensors", lambda data: b"\x00" * 64, "bad header length"),
    "weights-bad-header": ("weights.safetensors", lambda data: (8).to_bytes(8, "little") + b"{not json", "JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_eval_refuses_a_malformed_checkpoint_on_one_line(case, tmp_path, capsys):
    name, corrupt, needle = MALFORMED[case]
    url, _, _ = _save(f"file://{tmp_path}/run", 1)
    part = storage.join(url, name)
    storage.write_bytes(part, corrupt(storage.read_bytes(part)))
    assert _exit_code(["eval", "--checkpoint", url, "--tracking-uri", f"file://{tmp_path}/mlruns"]) == 2
    _one_error_line(capsys, f"refusing checkpoint {part}", needle)
    with pytest.raises(CheckpointRefused, match=needle):
        checkpoint.load_for_eval(url)


@pytest.mark.parametrize(
    ("name", "caps"),
    [("config.yaml", {"MAX_TEXT_BYTES": 16}),
     ("meta.json", {"MAX_TEXT_BYTES": 16, "_checked_config": lambda url: None}),  # config.yaml is read first
     ("weights.safetensors", {"MAX_WEIGHTS_BYTES": 1024})],
)
def test_oversized_parts_are_refused_by_size(name, caps, tmp_path, monkeypatch):
    url, _, _ = _save(f"file://{tmp_path}/run", 1)
    for attribute, value in caps.items():
        monkeypatch.setattr(checkpoint, attribute, value)
    with pytest.raises(CheckpointRefused, match=rf"{name}: (larger than|size \d+ is not within)"):
        checkpoint.verify_checkpoint(url)


def test_truncated_weights_are_refused_on_object_stores(run_url, tmp_path, capsys):
    url, _, _ = _save(run_url, 1)
    weights = storage.join(url, "weights.safetensors")
    storage.write_bytes(weights, _truncate(storage.read_bytes(weights)))
    assert _exit_code(["eval", "--checkpoint", url, "--tracking-uri", f"file://{tmp_path}/mlruns"]) == 2
    _one_error_line(capsys, f"refusing checkpoint {weights}", "truncated")


# ---------------------------------------------------------------------------------------------------------
# Export of an honest checkpoint: open_clip loads it strictly and computes the same embeddings.


def _open_clip_model(cfg) -> torch.nn.Module:
    """open_clip's model of the same shape, through its own factory (offline: no pretrained weights)."""
    return open_clip.create_model(
        "ViT-B-32", pretrained=None, embed_dim=cfg.embed_dim,
        vision_cfg={"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
                    "layers": cfg.vision_layers, "head_width": cfg.vision_width // cfg.vision_heads,
                    "mlp_ratio": cfg.mlp_ratio},
        text_cfg={"context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
                  "heads": cfg.text_heads, "layers": cfg.text_layers, "mlp_ratio": cfg.mlp_ratio},
    )


def test_export_writes_a_state_dict_open_clip_loads_strictly(run_url, tmp_path, capsys):
    url, model, config = _save(run_url, 1)
    out = f"file://{tmp_path}/export/open_clip.safetensors"
    cli.main(["export", "--checkpoint", url, "--out", out])
    assert capsys.readouterr().out.strip() == out
    reference = _open_clip_model(config.model)
    reference.load_state_dict(safetensors.torch.load_file(storage.local_path(out)), strict=True)
    model.eval()
    reference.eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tokens = make_tokens(2, 8, 60, torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images, normalize=True))
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens, normalize=True))
    # never overwritten
    assert _exit_code(["export", "--checkpoint", url, "--out", out]) == 2
    _one_error_line(capsys, "exists")


@pytest.mark.parametrize(
    ("preset", "extra", "needle"),
    [("tiny-mae", (), "objective 'mae'"), ("tiny-clip", ("model.image_pool=gap",), "open_clip")],
)
def test_export_refuses_what_open_clip_cannot_hold_on_one_line(preset, extra, needle, tmp_path, capsys):
    run = f"file://{tmp_path}/run"
    config = load_config(preset, [*SMALL, f"train.run_url={run}", *extra])
    model, optimizer = _trained(config)
    url = checkpoint.save(run, 1, model, optimizer, config, {})
    out = tmp_path / "open_clip.safetensors"
    assert _exit_code(["export", "--checkpoint", url, "--out", str(out)]) == 2
    _one_error_line(capsys, needle)
    assert not out.exists()
