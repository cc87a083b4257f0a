"""Checkpoints: commit protocol, resume from the newest committed step, torn checkpoints skipped, tampered ones
refused, retention."""

import json

import pytest
import safetensors.torch
import torch
from small_models import model_and_optimizer

from trainer import checkpoint, storage
from trainer.config import load_config


@pytest.fixture(params=["file", "gs", "s3"])
def config(request, tmp_path, unique):
    """A run URL on local disk, on gcp-storage-emulator and on moto's S3 server: DCP's fsspec path is real."""
    root = {"file": lambda: f"file://{tmp_path}",
            "gs": lambda: request.getfixturevalue("gcs_emulator"),
            "s3": lambda: request.getfixturevalue("s3_server")}[request.param]()
    return load_config("tiny-clip", [f"train.run_url={root}/{unique}/run", "train.keep_last=2"])


def test_save_writes_every_file_and_commits_last(config):
    model, optimizer = model_and_optimizer(0)
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
    model, optimizer = model_and_optimizer(0)
    checkpoint.save(config.train.run_url, 3, model, optimizer, config, {})
    fresh_model, fresh_optimizer = model_and_optimizer(1)
    resumed = checkpoint.resume(config.train.run_url, fresh_model, fresh_optimizer)
    assert resumed is not None and resumed.step == 3
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(optimizer.state[a]["exp_avg"], fresh_optimizer.state[b]["exp_avg"], rtol=0, atol=0)


def test_directory_without_committed_is_ignored_and_torn_checkpoint_skipped(config):
    run = config.train.run_url
    model, optimizer = model_and_optimizer(0)
    checkpoint.save(run, 2, model, optimizer, config, {})
    newer, newer_optimizer = model_and_optimizer(7)
    url4 = checkpoint.save(run, 4, newer, newer_optimizer, config, {})
    # an uncommitted step-6 directory does not exist for readers
    storage.write_text(storage.join(run, "checkpoints", "step-000000006", "meta.json"), "{}")
    assert [s for s, _ in checkpoint.committed_checkpoints(run)] == [2, 4]
    # truncate step 4's shard: resume falls back to step 2 with a warning
    shard = storage.join(url4, next(n for n in storage.list_dir(url4) if n.endswith(".distcp")))
    storage.write_bytes(shard, storage.read_bytes(shard)[:10])
    target, target_optimizer = model_and_optimizer(3)
    resumed = checkpoint.resume(run, target, target_optimizer)
    assert resumed is not None and resumed.step == 2
    for a, b in zip(model.parameters(), target.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_keep_last_prunes_old_but_keeps_promoted(config):
    run = config.train.run_url
    model, optimizer = model_and_optimizer(0)
    first = checkpoint.save(run, 1, model, optimizer, config, {})
    checkpoint.mark(first, "PROMOTED")
    for step in (2, 3, 4):
        checkpoint.save(run, step, model, optimizer, config, {})
    assert [s for s, _ in checkpoint.committed_checkpoints(run)] == [1, 3, 4]
    assert checkpoint.latest_checkpoint(run).endswith("step-000000004")


def test_no_checkpoint_means_fresh_start(config):
    model, optimizer = model_and_optimizer(0)
    assert checkpoint.resume(config.train.run_url, model, optimizer) is None
    with pytest.raises(FileNotFoundError):
        checkpoint.load_for_eval(storage.join(config.train.run_url, "checkpoints", "step-000000001"))


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(config):
    model, optimizer = model_and_optimizer(0)
    url = checkpoint.save(config.train.run_url, 1, model, optimizer, config, {})
    storage.remove(storage.join(url, ".metadata"))
    with pytest.raises(RuntimeError, match="none of the 1 committed checkpoints"):
        checkpoint.resume(config.train.run_url, model, optimizer)


def test_async_save_is_invisible_until_waited_on_then_resumes_exactly(config):
    run = config.train.run_url
    model, optimizer = model_and_optimizer(0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    pending = checkpoint.save_async(run, 7, model, optimizer, config, {"samples_seen": 56})
    with torch.no_grad():  # training goes on: the checkpoint must hold the state at save time
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert checkpoint.committed_checkpoints(run) == []
    url = pending.wait()
    assert [s for s, _ in checkpoint.committed_checkpoints(run)] == [7]
    assert checkpoint.read_meta(url)["samples_seen"] == 56
    target, target_optimizer = model_and_optimizer(3)
    assert checkpoint.resume(run, target, target_optimizer).step == 7
    for name, tensor in target.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it creates a file (``open(path, "w")``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_without_running_it(config, tmp_path):
    model, optimizer = model_and_optimizer(0)
    marker = tmp_path / "payload-ran"
    optimizer.param_groups[0]["lr"] = _RunsCodeWhenUnpickled(str(marker))  # DCP pickles non-tensor leaves
    checkpoint.save(config.train.run_url, 1, model, optimizer, config, {})
    assert not marker.exists()
    target, target_optimizer = model_and_optimizer(3)
    with pytest.raises(checkpoint.CheckpointRefused, match=r"step-000000001: leaf optim\.param_groups\.0\.lr"):
        checkpoint.resume(config.train.run_url, target, target_optimizer)
    assert not marker.exists()


@pytest.mark.parametrize("tamper", ["leaf", "meta.json"])
def test_a_refused_checkpoint_is_not_skipped_for_an_older_one(config, tmp_path, tamper):
    """Unlike a torn shard, tampering stops the resume: falling back would train on from a state the attacker
    chose (by tampering with every newer checkpoint)."""
    run = config.train.run_url
    model, optimizer = model_and_optimizer(0)
    checkpoint.save(run, 2, model, optimizer, config, {})
    if tamper == "leaf":
        optimizer.param_groups[0]["lr"] = _RunsCodeWhenUnpickled(str(tmp_path / "payload-ran"))
    url4 = checkpoint.save(run, 4, model, optimizer, config, {})
    if tamper == "meta.json":
        storage.write_text(storage.join(url4, "meta.json"), '{"step": "4"}')
    target, target_optimizer = model_and_optimizer(3)
    with pytest.raises(checkpoint.CheckpointRefused, match="step-000000004"):
        checkpoint.resume(run, target, target_optimizer)
    assert not (tmp_path / "payload-ran").exists()
