"""Config: presets, overrides and strict validation with messages that name the key and what is allowed."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer.config import (
    IMAGE_POOLS,
    ConfigError,
    from_yaml,
    load_config,
    normalize_url,
    parse_override,
    preset_names,
    to_yaml,
)


def test_presets_all_load_and_round_trip_through_yaml():
    assert "tiny-clip" in preset_names()
    for name in preset_names():
        config = load_config(name)
        assert from_yaml(to_yaml(config)) == config
        assert from_yaml(to_yaml(config)).digest() == config.digest()


def test_override_sets_nested_values_with_yaml_types():
    config = load_config("tiny-clip", ["optim.lr=0.002", "model.image_pool=gap", "data.shuffle=false",
                                       "data.crop_scale=[0.9, 1.0]"])
    assert config.optim.lr == 0.002
    assert config.model.image_pool == "gap"
    assert config.data.shuffle is False
    assert config.data.crop_scale == (0.9, 1.0)


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.image_pol'.*did you mean 'model\.image_pool'"):
        load_config("tiny-clip", ["model.image_pol=gap"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimm'.*'optim'"):
        load_config("tiny-clip", ["optimm.lr=1"])


# Words YAML 1.1 reads as booleans or null; they get the type error instead.
YAML_BOOLEANS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
    lambda s: s not in IMAGE_POOLS and s not in YAML_BOOLEANS))
def test_bad_pool_names_the_allowed_set(value):
    with pytest.raises(ConfigError, match=rf"model\.image_pool: '{value}' is not one of cls, map, gap, max"):
        load_config("tiny-clip", [f"model.image_pool={value}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", r"optim\.lr: -1.0 is outside \(0.0, 10.0\]"),
        ("model.image_mask_ratio=1.5", r"model\.image_mask_ratio: 1.5 is outside"),
        ("model.patch_size=7", r"model\.patch_size: 7 does not divide model\.image_size 64"),
        ("train.steps=ten", r"train\.steps: expected an integer, got 'ten'"),
        ("data.shuffle=3", r"data\.shuffle: expected true or false"),
        ("model.objective=simclr", r"model\.objective: 'simclr' is not one of clip, flip, mae, m3ae, maeclip"),
        ("train.run_url=ftp://host/x", r"train\.run_url: unsupported storage scheme 'ftp://'"),
        ("data.url=gs://", r"data\.url: malformed storage URL 'gs://'"),
        ("optim.lr", r"not of the form key\.path=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-clip", [override])


def test_unknown_preset_names_the_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny-clp'; did you mean 'tiny-clip'"):
        load_config("tiny-clp")


def test_file_urls_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_url("file://.maeclip/x") == f"file://{tmp_path}/.maeclip/x"
    assert normalize_url("runs/a") == f"file://{tmp_path}/runs/a"
    assert normalize_url("gs://bucket/a/") == "gs://bucket/a"


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=1e-3") == (["a", "b"], 0.001)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=s3://b/c") == (["a"], "s3://b/c")


def test_flat_params_cover_every_leaf():
    flat = load_config("tiny-clip").flat()
    assert flat["model.objective"] == "clip"
    assert flat["optim.lr"] == 0.001
    assert all(not isinstance(v, dict) for v in flat.values())
