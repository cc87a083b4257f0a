"""Ingest: the four source formats with a bad sample of every kind, buckets, kill-and-rerun, CLI errors."""

import io
import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
from corpora import MAX_PIXELS, ingest_options, jpeg, make_corpus, stored_samples
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.cli import main
from trainer import storage
from trainer.config import load_config
from trainer.data.ingest import REASONS, SkippedSample, ingest, judge
from trainer.data.loader import iter_eval_batches
from trainer.data.sources import RawRecord

MAECLIP = str(Path(sys.executable).parent / "maeclip")
FORMATS = ("webdataset", "parquet", "csv", "imagefolder")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_keeps_good_samples_and_counts_bad_ones_by_reason(fmt, tmp_path):
    expected = make_corpus(fmt, tmp_path / "src")
    manifest = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/out", ingest_options(fmt))
    counts = manifest["counts"]
    assert counts["written"] == len(expected["good"])
    assert counts["read"] == counts["written"] + sum(counts["skipped"].values())
    assert counts["skipped"] == {r: n for r in REASONS if (n := list(expected["bad"].values()).count(r))}
    assert {k["key"]: k["reason"] for k in manifest["skipped_keys"]} == expected["bad"]
    assert sum(s["samples"] for s in manifest["shards"]) == counts["written"] == manifest["splits"]["train"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    stored = stored_samples(tmp_path / "out")
    assert {k: s["caption"] for k, s in stored.items()} == expected["good"]
    for sample in stored.values():
        with Image.open(io.BytesIO(sample["image"])) as image:
            assert min(image.size) <= 32 and image.format in ("JPEG", "PNG")
        assert sample["meta"]["source"] == fmt


def test_on_error_fail_names_the_key_and_reason(tmp_path):
    make_corpus("parquet", tmp_path / "src")
    with pytest.raises(SkippedSample, match=r"part-0.parquet: sample 'bad-oversized' is oversized \(160x160\)"):
        ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/out", ingest_options("parquet"), on_error="fail")


@given(caption=st.binary(max_size=24), with_image=st.booleans())
@settings(max_examples=60, deadline=None)
def test_judge_classifies_captions(caption, with_image):
    sample, reason, _ = judge(RawRecord("k", jpeg(0) if with_image else None, caption), ingest_options("csv"))
    if not with_image:
        assert reason == "unpaired"
        return
    try:  # control characters (Unicode category Cc: C0, DEL, C1) count as spaces
        text = " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in caption.decode()).split())
    except UnicodeDecodeError:
        assert reason == "non_utf8_caption"
        return
    assert (reason, sample and sample["caption"]) == (("empty_caption", None) if not text else ("", text))


def test_small_jpeg_is_stored_byte_for_byte_and_large_one_resized(tmp_path):
    small, large = jpeg(1, (30, 20)), jpeg(2, (120, 64))
    options = ingest_options("csv")
    assert judge(RawRecord("a", small, b"x"), options)[0]["image"] == small
    with Image.open(io.BytesIO(judge(RawRecord("b", large, b"x"), options)[0]["image"])) as image:
        assert image.size == (60, 32)


def test_rerun_is_a_no_op_and_splits_add_up(tmp_path):
    make_corpus("webdataset", tmp_path / "src")
    make_corpus("csv", tmp_path / "eval-src", shards=1, per_shard=3)
    src, out = f"file://{tmp_path}/src", f"file://{tmp_path}/out"
    first = ingest(src, out, ingest_options("webdataset"))
    done = tmp_path / "out" / "train" / "00000" / "done.json"
    stamp = done.stat().st_mtime_ns
    assert ingest(src, out, ingest_options("webdataset")) == first
    assert done.stat().st_mtime_ns == stamp  # the committed shard was not rewritten
    both = ingest(f"file://{tmp_path}/eval-src", out, ingest_options("csv", split="eval"))
    assert both["splits"] == {"eval": 3, "train": first["counts"]["written"]}
    assert both["counts"]["read"] == first["counts"]["read"] + 3 + 5
    assert set(stored_samples(tmp_path / "out", "eval")) == {f"00000{i:04d}" for i in range(3)}
    config = load_config("tiny-clip", [f"data.url={out}"])
    assert len([k for b in iter_eval_batches(f"{out}/train", config, 4) for k in b["key"]]) == 12


@pytest.mark.parametrize(("where", "workers"), [("gs", 1), ("s3", 2)])
def test_ingest_to_a_bucket_is_readable_by_the_loader(where, workers, tmp_path, request, unique):
    out = request.getfixturevalue({"gs": "gcs_emulator", "s3": "s3_server"}[where]) + f"/{unique}"
    expected = make_corpus("webdataset", tmp_path / "src")
    ingest(f"file://{tmp_path}/src", out, ingest_options("webdataset"), workers=workers)
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["counts"]["written"] == 12
    assert {k["key"] for k in manifest["skipped_keys"]} == set(expected["bad"])
    config = load_config("tiny-clip", [f"data.url={out}", f"data.cache_dir={tmp_path / 'cache'}"])
    batches = list(iter_eval_batches(f"{out}/train", config, batch_size=5))
    assert {c for b in batches for c in b["caption"]} == set(expected["good"].values())
    assert sorted(k for b in batches for k in b["key"]) == sorted(expected["good"])


def _cli_ingest(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([MAECLIP, "data", "ingest", str(src), "--format", "webdataset", "--out", str(out),
                             "--resize", "32", "--max-pixels", str(MAX_PIXELS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_ingest_reruns_to_the_same_shards_without_duplicates(tmp_path):
    expected = make_corpus("webdataset", tmp_path / "src", shards=5, per_shard=400)
    reference = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/clean", ingest_options("webdataset"))
    killed = _cli_ingest(tmp_path / "src", tmp_path / "out")
    first_done = tmp_path / "out" / "train" / "00000" / "done.json"
    deadline = time.monotonic() + 240
    while not first_done.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert first_done.exists() and not (tmp_path / "out" / "train" / "00004" / "done.json").exists()
    assert not (tmp_path / "out" / "train" / "index.json").exists()  # no index before all shards are committed
    assert _cli_ingest(tmp_path / "src", tmp_path / "out").wait(300) == 0
    rerun = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert rerun["shards"] == reference["shards"] and rerun["counts"] == reference["counts"]
    assert set(stored_samples(tmp_path / "out")) == set(expected["good"])


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["data", "ingest", *args])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maeclip: error:"), lines
    return lines[0]


def test_bad_invocations_stop_with_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    make_corpus("csv", tmp_path / "src", shards=1, per_shard=1)
    src, out = str(tmp_path / "src"), ["--format", "csv", "--out", str(tmp_path / "out")]
    assert "no such source" in _cli_error(capsys, str(tmp_path / "missing"), *out)
    assert "holds no csv input shards" in _cli_error(capsys, str(tmp_path / "empty"), *out)
    assert "cannot write" in _cli_error(capsys, src, "--format", "csv", "--out", f"file://{tmp_path}/a-file/x")
    assert "unsupported storage scheme 'hdfs://'" in _cli_error(capsys, src, "--format", "csv", "--out",
                                                                  "hdfs://namenode/corpus")


def test_pipeline_ingest_step_runs_the_cli_ingest_under_kfp_local(tmp_path):
    import kfp.local

    from pipelines import components

    expected = make_corpus("webdataset", tmp_path / "src")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    task = components.ingest_corpus(source_url=f"file://{tmp_path}/src", source_format="webdataset",
                                    out_url=f"file://{tmp_path}/out", split="train", on_error="skip", workers=1)
    assert task.output == f"file://{tmp_path}/out"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # the step keeps ingest's defaults, under which the 160 x 160 "oversized" image is an ordinary one
    bad = {key: reason for key, reason in expected["bad"].items() if reason != "oversized"}
    assert {k["key"]: k["reason"] for k in manifest["skipped_keys"]} == bad
    assert set(stored_samples(tmp_path / "out")) == set(expected["good"]) | (expected["bad"].keys() - bad.keys())
