"""Property: every invalid config value or launch argument stops ``maeclip train`` with exit status 2 and one
line on stderr, before anything is launched or any storage is touched.

For every key of ``Config().flat()`` the test generates values that no range may accept (NaN, ±inf, wrong
types, numbers out of every key's range, huge or control-character strings, plus known-bad values per key),
and invalid launch arguments. The CLI runs in-process with ``trainer.launch.launch_training`` replaced by a
recorder; the data and run URLs point into a fresh temporary folder that must stay empty.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import trainer.checkpoint
import trainer.data.loader
import trainer.launch
from pipelines.cli import main
from trainer import storage
from trainer.config import Config

FLAT = Config().flat()
KEYS = list(FLAT)
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values (as --set YAML text) that are invalid for the key on top of tiny-clip (batch 64, widths 128 with 4
# heads, lr 1e-3), chosen by hand from what the model and the optimizer can run: the tables in
# trainer/config.py are not consulted, so a key whose range went missing fails here.
OUT_OF_RANGE: dict[str, list[str]] = {
    "model.image_size": ["0", "-64", "100000", "60"],
    "model.patch_size": ["0", "-8", "7", "128"],
    "model.vision_width": ["0", "-128", "1048576", "130"],
    "model.vision_layers": ["0", "-1", "100000"],
    "model.vision_heads": ["0", "-4", "3", "256"],
    "model.text_width": ["0", "-1", "1048576", "130"],
    "model.text_layers": ["0", "-1", "100000"],
    "model.text_heads": ["0", "-1", "3"],
    "model.context_length": ["0", "1", "-5", "1000000"],
    "model.vocab_size": ["0", "2", "-1", "100000000"],
    "model.mlp_ratio": ["0", "-2", "1e6", "0.001"],
    "model.embed_dim": ["0", "-1", "1000000"],
    "model.logit_scale_init": ["0", "-1", "101", "1e5"],
    "model.logit_scale_max": ["0", "-1", "1e5", "1"],
    "model.image_mask_ratio": ["-0.1", "0.96", "1.0", "1.5"],
    "model.map_heads": ["-1", "3", "1000000"],
    "model.decoder_width": ["0", "-1", "1000000", "510"],
    "model.decoder_layers": ["0", "-1", "100000"],
    "model.decoder_heads": ["0", "-1", "3"],
    "model.text_mask_ratio": ["-0.1", "0.5", "0.99"],
    "model.image_loss_weight": ["-1", "1e7"],
    "model.text_loss_weight": ["-1", "1e7"],
    "model.mask_noise": ["-0.1", "1e7"],
    "data.batch_size": ["0", "-1", "10000000"],
    "data.num_workers": ["-1", "1000"],
    "data.shuffle_seed": ["-1", "4294967296", "18446744073709551616"],
    "data.num_canonical_nodes": ["0", "-1", "1000000"],
    "data.predownload": ["-1", "2147483648"],
    "data.max_samples": ["-1", "2199023255552"],
    "data.shuffle_block_size": ["-1", "2199023255552"],
    "data.image_mean": ["[-0.1, 0.5, 0.5]", "[255, 0, 0]", "[0.5, 0.5]", "[0.5, 0.5, 0.5, 0.5]"],
    "data.image_std": ["[0, 0, 0]", "[-1, 0.2, 0.2]", "[58.4, 57.1, 57.4]", "[0.2]"],
    "data.crop_scale": ["[0, 1]", "[0.9, 0.5]", "[0.5, 1.5]", "[-0.1, 1.0]", "[1.0]"],
    "optim.lr": ["0", "-1", "11", "1e3"],
    "optim.weight_decay": ["-0.1", "11"],
    "optim.beta1": ["-0.1", "1", "1.5"],
    "optim.beta2": ["-0.1", "1", "2"],
    "optim.eps": ["0", "-1", "2"],
    "optim.warmup_steps": ["-1", "2147483648"],
    "optim.min_lr": ["-1e-5", "0.01", "1"],
    "optim.grad_clip": ["-1", "1e10"],
    "optim.reference_batch": ["-1", "2199023255552"],
    "train.steps": ["0", "-1", "2199023255552"],
    "train.schedule_steps": ["-1", "2199023255552"],
    "train.checkpoint_every": ["0", "-1", "2199023255552"],
    "train.keep_last": ["0", "-1", "2097152"],
    "train.log_every": ["0", "-1", "2199023255552"],
    "train.seed": ["-1", "4294967296", "18446744073709551616"],
    "train.global_batch_size": ["-1", "100", "32", "2199023255552"],
}
BAD_STRINGS: dict[str, list[str]] = {
    "name": ["''"],
    "model.objective": ["simclr", "CLIP"],
    "model.image_pool": ["avg"],
    "model.text_pool": ["cls"],
    "model.pos_embed": ["rope"],
    "model.contrastive_input": ["both"],
    "model.image_masking": ["block"],
    "model.similarity_mask": ["some"],
    "data.url": ["ftp://host/x", "gs://", "s3://bad bucket/x", "http://host/x", "''", "c:data"],
    "data.cache_limit": ["lots", "20 gb", "-1gb"],
    "data.shuffle_algo": ["py3"],
    "train.run_url": ["ftp://host/x", "gs://", "s3://b@d/x", "''"],
    "train.parallelism": ["tp"],
    "optim.lr_scaling": ["cubic", "Linear"],
    "optim.decay_rule": ["none", "NDIM"],
    "tracking.experiment": ["''"],
}
# Strings that no string key may take: line breaks, terminal escapes, NUL, surrogates (as YAML escapes).
CONTROL = [r'"a\nb"', r'"a\x07b"', r'"\x00"', r'"x\u2028y"', r'"\x1b[31mred"', r'"tab\there"', r'"\udc80"']
UNPRINTABLE = st.characters(categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"], exclude_characters=" ")
NON_FINITE = [".nan", ".NaN", ".NAN", ".inf", "-.inf", "+.inf", "1e999", "-1e999"]
WRONG_TYPE = {
    bool: ["3", "maybe", "0.5", "[true]", "{a: 1}", "''", "~"],
    int: ["1.5", "abc", "true", "[1]", "{a: 1}", "~", "nan", "inf"],
    float: ["abc", "true", "[1]", "{a: 1}", "~", "nan", "inf"],
    str: ["12", "1.5", "true", "[a]", "{a: b}", "~", "2020-01-01"],
    list: ["5", "abc", "true", "[]", "{a: 1}", "~", "[a, b, c]"],
}


def test_the_tables_cover_every_key():
    numeric = {k for k, v in FLAT.items() if isinstance(v, int | float | list) and not isinstance(v, bool)}
    assert numeric == set(OUT_OF_RANGE)
    assert set(BAD_STRINGS) <= {k for k, v in FLAT.items() if isinstance(v, str)}


def _invalid_values(key: str) -> st.SearchStrategy[str]:
    """YAML text no value check may accept for ``key``."""
    default = FLAT[key]
    kind = type(default)
    fixed = [*WRONG_TYPE[kind], *OUT_OF_RANGE.get(key, []), *BAD_STRINGS.get(key, [])]
    if kind is not str:
        fixed += NON_FINITE
    strategies = [st.sampled_from(fixed)]
    if kind in (int, float):
        # Every numeric key is non-negative and bounded by 2^40 (ints) or 1e9 (floats).
        strategies += [st.integers(max_value=-1).map(str), st.integers(min_value=1 << 41).map(str),
                       st.floats(max_value=-1e-9, allow_infinity=False).map(repr),
                       st.floats(min_value=1e10).map(repr)]
    elif kind is list:
        n = len(default)
        bad_item = st.one_of(st.sampled_from([".nan", ".inf", "-.inf", "abc", "[1]"]),
                             st.floats(max_value=-1e-9).map(repr), st.floats(min_value=2.0).map(repr))
        strategies.append(st.tuples(st.integers(0, n - 1), bad_item).map(
            lambda c: "[" + ", ".join(c[1] if i == c[0] else "0.5" for i in range(n)) + "]"))
    elif kind is str:
        strategies += [
            st.sampled_from(CONTROL),
            # Any text around a character that is not printable, written as a JSON (= YAML) string.
            st.tuples(st.text(max_size=8), UNPRINTABLE, st.text(max_size=8)).map(lambda t: json.dumps("".join(t))),
            st.integers(4097, 20_000).map(lambda n: "x" * n),
            st.booleans().map(str), st.integers().map(str),
        ]
    return st.one_of(strategies)


@pytest.fixture
def launches(monkeypatch) -> list:
    """Calls of launch_training and of the storage checks, which are stubbed to pass: so an invalid value that
    validation let through would reach the (recorded) launch instead of failing on the missing dataset."""
    calls: list = []
    monkeypatch.setattr(trainer.launch, "launch_training", lambda *a, **k: calls.append(("launch", a, k)) or "h")
    monkeypatch.setattr(trainer.launch, "dataset_size", lambda url, n=0: calls.append(("dataset", url)) or 64)
    monkeypatch.setattr(storage, "check_writable", lambda url: calls.append(("writable", url)))
    monkeypatch.setattr(trainer.launch, "claim_run", lambda url: calls.append(("claim", url)))
    monkeypatch.setattr(trainer.launch, "latest_checkpoint", lambda url: f"{url}/step-000000001")
    return calls


def _train(tmp: Path, *args: str) -> tuple[int | str | None, str, str]:
    """Run ``maeclip train`` in-process on tiny-clip with storage under ``tmp``; (exit status, stdout, stderr)."""
    argv = ["train", "--config", "tiny-clip", "--set", f"data.url=file://{tmp}/data",
            "--set", f"train.run_url=file://{tmp}/run", *args]
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def _assert_rejected(tmp: Path, launches: list, *args: str) -> None:
    code, _, stderr = _train(tmp, *args)
    lines = stderr.strip().splitlines()
    assert code == 2, (args, stderr)
    assert len(lines) == 1 and lines[0].startswith("maeclip: error: "), (args, stderr)
    assert len(stderr) < 1000, stderr
    assert not launches, args  # rejected before the dataset check, and nothing launched
    assert not list(tmp.iterdir()), args  # neither the dataset nor the run URL was touched


@pytest.mark.parametrize("key", KEYS)
@PROPERTY
@given(data=st.data())
def test_every_invalid_value_of_every_key_exits_2_with_one_line(tmp_path, launches, key, data):
    value = data.draw(_invalid_values(key), label="value")
    _assert_rejected(tmp_path, launches, "--set", f"{key}={value}")


@pytest.mark.parametrize("key", KEYS)
def test_nan_and_inf_are_invalid_for_every_key(tmp_path, launches, key):
    for value in NON_FINITE:
        _assert_rejected(tmp_path, launches, "--set", f"{key}={value}")


VALID_NNODES = r"[1-9][0-9]{0,3}(:[1-9][0-9]{0,3})?"


@PROPERTY
@given(args=st.one_of(
    st.sampled_from(["0", "-1", "abc", "0:1", "3:2", "1:", ":2", "1:2:3", " 1", "1.5", "", "\u0663", "4097",
                     "1:4097", "99999999999"]).map(lambda v: [f"--nnodes={v}"]),
    st.text(max_size=12).filter(lambda s: not (s.isascii() and s.replace(":", "", 1).isdigit()))
    .map(lambda v: [f"--nnodes={v}"]),
    st.integers(max_value=0).map(lambda n: [f"--nproc-per-node={n}"]),
    st.integers(min_value=1025).map(lambda n: [f"--nproc-per-node={n}"]),
    st.sampled_from(["abc", "1.5", "", "2x"]).map(lambda v: [f"--nproc-per-node={v}"]),
    st.text(max_size=16).filter(lambda s: s not in ("local_cwd", "kubernetes")).map(lambda v: [f"--scheduler={v}"]),
))
def test_invalid_launch_arguments_exit_2_with_one_line(tmp_path, launches, args):
    _assert_rejected(tmp_path, launches, *args)


@PROPERTY
@given(batch=st.integers(1, 64), nproc=st.integers(1, 8), nodes=st.integers(1, 4), elastic=st.booleans(),
       multiple=st.integers(1, 200))
def test_a_global_batch_the_world_size_does_not_divide_exits_2(tmp_path, launches, batch, nproc, nodes, elastic,
                                                               multiple):
    # A multiple of the per-rank batch (so the config alone is valid) that the largest world size misses.
    world = nodes * nproc
    assume(world > 1)
    multiple = multiple if multiple % world else multiple * world + 1
    nnodes = f"1:{nodes}" if elastic else str(nodes)
    _assert_rejected(tmp_path, launches, "--set", f"data.batch_size={batch}",
                     "--set", f"train.global_batch_size={batch * multiple}",
                     f"--nnodes={nnodes}", f"--nproc-per-node={nproc}")


def test_valid_arguments_do_launch(tmp_path, launches):
    """The control: with valid input the same harness sees the storage checks and the launch."""
    code, stdout, stderr = _train(tmp_path, "--set", "train.global_batch_size=512", "--nnodes=1:2",
                                  "--nproc-per-node=4")
    assert code == 0, stderr
    assert stdout.strip() == f"file://{tmp_path}/run/step-000000001"
    assert [call[0] for call in launches] == ["dataset", "writable", "claim", "launch"]
    kwargs = launches[-1][2]
    assert (kwargs["nnodes"], kwargs["nproc_per_node"], kwargs["plan"].scheduler) == ("1:2", 4, "local_cwd")
