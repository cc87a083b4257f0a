"""Checkpoints: commit protocol, resume from the newest committed step, torn checkpoints skipped, retention."""

import json

import pytest
import safetensors.torch
import torch

from trainer import checkpoint, storage
from trainer.config import load_config


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture
def config(tmp_path):
    return load_config("tiny-clip", [f"train.run_url=file://{tmp_path}/run", "train.keep_last=2"])


def test_save_writes_every_file_and_commits_last(config):
    model, optimizer = _model_and_optimizer(0)
    url = checkpoint.save(config.train.run_url, 5, model, optimizer, config, {"samples_seen": 40})
    assert url.endswith("/checkpoints/step-000000005")
    names = storage.list_dir(url)
    assert {"COMMITTED", "weights.safetensors", "meta.json", "config.yaml", ".metadata"} <= set(names)
    meta = json.loads(storage.read_text(storage.join(url, "meta.json")))
    assert meta["step"] == 5 and meta["samples_seen"] == 40 and meta["config_digest"] == config.digest()
    loaded_config, weights, _ = checkpoint.load_for_eval(url)
    assert loaded_config == config
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)
    # the weights file is plain safetensors
    safetensors.torch.load(storage.read_bytes(storage.join(url, "weights.safetensors")))


def test_resume_restores_model_and_optimizer_exactly(config):
    model, optimizer = _model_and_optimizer(0)
    checkpoint.save(config.train.run_url, 3, model, optimizer, config, {})
    fresh_model, fresh_optimizer = _model_and_optimizer(1)
    resumed = checkpoint.resume(config.train.run_url, fresh_model, fresh_optimizer)
    assert resumed is not None and resumed.step == 3
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state[a]["exp_avg"], fresh_optimizer.state[b]["exp_avg"], rtol=0, atol=0)


def test_directory_without_committed_is_ignored_and_torn_checkpoint_skipped(config):
    run = config.train.run_url
    model, optimizer = _model_and_optimizer(0)
    checkpoint.save(run, 2, model, optimizer, config, {})
    newer, newer_optimizer = _model_and_optimizer(7)
    url4 = checkpoint.save(run, 4, newer, newer_optimizer, config, {})
    # an uncommitted step-6 directory does not exist for readers
    storage.write_text(storage.join(run, "checkpoints", "step-000000006", "meta.json"), "{}")
    assert [s for s, _ in checkpoint.committed_checkpoints(run)] == [2, 4]
    # truncate step 4's shard: resume falls back to step 2 with a warning
    shard = next(n for n in storage.list_dir(url4) if n.endswith(".distcp"))
    path = storage.local_path(storage.join(url4, shard))
    with open(path, "r+b") as handle:
        handle.truncate(10)
    target, target_optimizer = _model_and_optimizer(3)
    resumed = checkpoint.resume(run, target, target_optimizer)
    assert resumed is not None and resumed.step == 2
    for a, b in zip(model.parameters(), target.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_keep_last_prunes_old_but_keeps_promoted(config):
    run = config.train.run_url
    model, optimizer = _model_and_optimizer(0)
    first = checkpoint.save(run, 1, model, optimizer, config, {})
    checkpoint.mark(first, "PROMOTED")
    for step in (2, 3, 4):
        checkpoint.save(run, step, model, optimizer, config, {})
    assert [s for s, _ in checkpoint.committed_checkpoints(run)] == [1, 3, 4]
    assert checkpoint.latest_checkpoint(run).endswith("step-000000004")


def test_no_checkpoint_means_fresh_start(config):
    model, optimizer = _model_and_optimizer(0)
    assert checkpoint.resume(config.train.run_url, model, optimizer) is None
    with pytest.raises(FileNotFoundError):
        checkpoint.load_for_eval(storage.join(config.train.run_url, "checkpoints", "step-000000001"))


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(config):
    model, optimizer = _model_and_optimizer(0)
    url = checkpoint.save(config.train.run_url, 1, model, optimizer, config, {})
    storage.remove(storage.join(url, ".metadata"))
    with pytest.raises(RuntimeError, match="none of the 1 committed checkpoints"):
        checkpoint.resume(config.train.run_url, model, optimizer)
