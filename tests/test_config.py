"""Config: presets, overrides and strict validation with messages that name the key and what is allowed."""

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer.config import (
    IMAGE_POOLS,
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    from_dict,
    from_yaml,
    load_config,
    normalize_url,
    parse_override,
    preset_names,
    quote,
    to_yaml,
    validate,
)
from trainer.launch import check_launch, parse_nnodes


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


# ---------------------------------------------------------------------------------------------------------
# Holes that used to pass validation: non-finite numbers, keys without a range, unbounded strings.


@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf", "1e999", "-1e999"])
@pytest.mark.parametrize("key", ["optim.lr", "model.image_mask_ratio", "optim.eps", "model.mlp_ratio",
                                 "optim.grad_clip", "model.logit_scale_max"])
def test_non_finite_numbers_are_rejected(key, value):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: -?(nan|inf) is not a finite number"):
        load_config("tiny-clip", [f"{key}={value}"])


def test_non_finite_numbers_are_rejected_in_configs_built_in_code():
    for section in (OptimConfig(lr=math.nan), OptimConfig(min_lr=math.inf), DataConfig(image_std=(math.nan,) * 3)):
        name = "optim" if isinstance(section, OptimConfig) else "data"
        with pytest.raises(ConfigError, match="is not a finite number"):
            validate(Config(**{name: section}))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.eps=-1", r"optim\.eps: -1.0 is outside \(0.0, 1.0\]"),
        ("optim.eps=0", r"optim\.eps: 0.0 is outside"),
        ("model.mlp_ratio=-2", r"model\.mlp_ratio: -2.0 is outside \(0.0, 64.0\]"),
        ("model.mlp_ratio=0.001", r"model\.mlp_ratio: 0.001 gives an MLP of no units"),
        ("optim.min_lr=0.01", r"optim\.min_lr: 0.01 is outside \[0.0, 0.001\]"),  # tiny-clip's lr is 1e-3
        ("optim.min_lr=-1e-5", r"optim\.min_lr: -1e-05 is outside"),
        ("data.image_std=[0,0,0]", r"data\.image_std\[0\]: 0.0 is outside \[1e-06, 1.0\]"),
        ("data.image_std=[0.2,0.2,-1]", r"data\.image_std\[2\]: -1.0 is outside"),
        ("data.image_std=[58.4,57.1,57.4]", r"data\.image_std\[0\]: 58.4 is outside"),
        ("data.image_mean=[123.7,116.3,103.5]", r"data\.image_mean\[0\]: 123.7 is outside \[0.0, 1.0\]"),
        ("data.image_mean=[0.5,.nan,0.5]", r"data\.image_mean\[1\]: nan is not a finite number"),
        ("model.logit_scale_max=0", r"model\.logit_scale_max: 0.0 is outside \(0.0, 10000.0\]"),
        ("model.logit_scale_max=5", r"model\.logit_scale_init: 14.28\d* is outside \(0.0, 5.0\]"),
        ("model.embed_dim=0", r"model\.embed_dim: 0 is outside \[1, 65536\]"),
        ("model.vision_width=1048576", r"model\.vision_width: 1048576 is outside"),
        ("model.vision_layers=100000", r"model\.vision_layers: 100000 is outside \[1, 1024\]"),
        ("model.context_length=1", r"model\.context_length: 1 is outside \[2, 65536\]"),
        ("model.vocab_size=2", r"model\.vocab_size: 2 is outside"),
        ("model.image_size=100000", r"model\.image_size: 100000 is outside \[1, 8192\]"),
        ("optim.beta1=1", r"optim\.beta1: 1.0 is outside \[0.0, 1.0\)"),
        ("optim.beta2=1.5", r"optim\.beta2: 1.5 is outside \[0.0, 1.0\)"),
        ("optim.warmup_steps=-1", r"optim\.warmup_steps: -1 is outside"),
        ("optim.warmup_steps=2147483648", r"optim\.warmup_steps: 2147483648 is outside"),
        ("train.seed=-1", r"train\.seed: -1 is outside \[0, 4294967295\]"),
        ("data.shuffle_seed=4294967296", r"data\.shuffle_seed: 4294967296 is outside"),
        ("optim.lr=1" + "0" * 400, r"optim\.lr: <an integer of about 401 digits> is too large"),
        ("train.steps=1" + "0" * 5000, r"override 'train\.steps=1000.*…: cannot read YAML: Exceeds the limit"),
        ("name=", r"name: must not be empty"),
        ("tracking.experiment=", r"tracking\.experiment: must not be empty"),
        ('name="run\\nrm -rf"', r"name: 'run\\nrm -rf' contains control characters"),
        ('tracking.experiment="a\\u2028b"', r"tracking\.experiment: 'a\\u2028b' contains control characters"),
        ('data.cache_dir="/tmp/\\x1b[31m"', r"data\.cache_dir: '/tmp/\\x1b\[31m' contains control characters"),
        ("name=" + "x" * 257, r"name: 'x{78}… is longer than 256 characters"),
        ("data.url=file:///" + "x" * 5000, r"data\.url: 'file:///x{70}… is longer than 4096 characters"),
        ("data.url=gs://b/\x07", r"override 'data\.url=gs://b/\\x07': cannot read YAML: special characters"),
    ],
)
def test_every_key_has_a_range(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config("tiny-clip", [override])
    text = str(caught.value)
    assert "\n" not in text and len(text) < 400, text


def test_error_messages_quote_values_bounded():
    # A billion laughs built from shared references: 9^9 "lol"s; quote() must not walk them.
    laughs: list = ["lol"] * 9
    for _ in range(8):
        laughs = [laughs] * 9
    assert len(quote(laughs)) <= 80
    assert quote("x" * 10_000).endswith("…") and len(quote("x" * 10_000)) == 80
    assert quote("a\nb\u2028c\x00") == r"'a\nb\u2028c\x00'"
    assert quote(10**5000) == "<an integer of about 5001 digits>"
    with pytest.raises(ConfigError) as caught:
        from_dict({"data": {"image_mean": laughs}})
    assert len(str(caught.value)) < 200 and "\n" not in str(caught.value)


def _preset(tmp_path, text: str | bytes, name: str = "preset.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{b}: &{b} [*{a},*{a},*{a},*{a},*{a},*{a},*{a},*{a},*{a}]\n" for a, b in zip("abcde", "bcdef", strict=True)
) + "data: {image_mean: *f}\n"  # 9^6 items: small enough that the unfixed code survives it, to fail the test


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LAUGHS, r"cannot read YAML: aliases \(\*name\) are not allowed in a config \(line 2, column 8\)"),
        ("model: [1, 2\n  x: }", r"cannot read YAML: expected ',' or '\]', but got ':' \(line 2, column 4\)"),
        ("name: caf\xe9\n".encode("latin-1"), r"not UTF-8 text \(byte 9\)"),
        ("model: !!python/object/apply:os.system ['true']\n", r"cannot read YAML: could not determine a constructor"),
        ("name: !!python/name:os.system\n", r"cannot read YAML: could not determine a constructor"),
        ("a: \x07\n", r"cannot read YAML: special characters are not allowed \(character #x0007"),
        ("x: " + "[" * 100 + "]" * 100 + "\n", r"cannot read YAML: nested deeper than 32 levels"),
        ("# " + "x" * (1 << 20) + "\n", r"larger than 1048576 bytes"),
        ("- 1\n- 2\n", r"expected a mapping at the top level, got \[1, 2\]"),
        ("base: [tiny-clip]\n", r"base: expected a preset name or a YAML path, got \['tiny-clip'\]"),
    ],
)
def test_bad_preset_files_are_one_line_naming_the_file(tmp_path, text, message):
    path = _preset(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^preset '{re.escape(path)}': {message}") as caught:
        load_config(path)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_presets_may_chain_through_base(tmp_path):
    path = _preset(tmp_path, "base: tiny-clip\noptim: {lr: 0.002}\n")
    assert load_config(path).optim.lr == 0.002
    assert load_config(path).model.vision_width == 128


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=!!python/object/apply:os.system ['true']", r"could not determine a constructor"),
        ("optim.lr=[&a [1], *a]", r"aliases \(\*name\) are not allowed"),
        ("optim.lr=[1, 2", r"expected ',' or '\]'"),
    ],
)
def test_bad_override_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=rf"^override {re.escape(quote(override))}: cannot read YAML: {message}"):
        load_config("tiny-clip", [override])


@pytest.mark.parametrize("text", ["a: *b\n", "!!python/object/apply:os.system ['true']\n", "[1, 2\n", "", "- 1\n"])
def test_from_yaml_is_safe_on_untrusted_checkpoint_configs(text):
    with pytest.raises(ConfigError):
        from_yaml(text)


def test_to_yaml_writes_no_aliases():
    config = load_config("tiny-clip")
    config.data.image_std = config.data.image_mean  # the same object twice: a plain dumper emits &id001
    assert "&" not in to_yaml(config) and from_yaml(to_yaml(config)) == config


# ---------------------------------------------------------------------------------------------------------
# Launch arguments.


@pytest.mark.parametrize(
    ("overrides", "launch", "message"),
    [
        ([], {"nproc_per_node": 0}, r"--nproc-per-node: 0 is outside \[1, 1024\]"),
        ([], {"nproc_per_node": -1}, r"--nproc-per-node: -1 is outside"),
        ([], {"nproc_per_node": "2"}, r"--nproc-per-node: expected an integer, got '2'"),
        ([], {"nnodes": "abc"}, r"--nnodes: 'abc' is not N or MIN:MAX"),
        ([], {"nnodes": "0"}, r"--nnodes: '0' needs 1 <= MIN <= MAX <= 4096"),
        ([], {"nnodes": "3:2"}, r"--nnodes: '3:2' needs 1 <= MIN <= MAX"),
        ([], {"nnodes": "1:"}, r"--nnodes: '1:' is not N or MIN:MAX"),
        ([], {"nnodes": "\u0663"}, r"--nnodes: '\u0663' is not N or MIN:MAX"),  # an Arabic-Indic 3
        ([], {"scheduler": "nope"}, r"--scheduler: 'nope' is not one of local_cwd, kubernetes"),
        (["train.global_batch_size=128"], {"nproc_per_node": 3},
         r"train\.global_batch_size: 128 is not a multiple of data\.batch_size x world size = 64 x 3 = 192"),
        (["train.global_batch_size=128"], {"nnodes": "2", "nproc_per_node": 2}, r"= 64 x 4 = 256 \(2 node"),
        # Elastic 1:3 x 2: 384 suits 3 nodes (64 x 6) and 1 node, but not 2 nodes (64 x 4 = 256).
        (["train.global_batch_size=384"], {"nnodes": "1:3", "nproc_per_node": 2},
         r"= 64 x 4 = 256 \(2 node\(s\) x 2 per node, which the elastic --nnodes '1:3' allows\)"),
    ],
)
def test_bad_launch_arguments_are_named(overrides, launch, message):
    config = load_config("tiny-clip", overrides)
    with pytest.raises(ConfigError, match=message):
        check_launch(config, **{"nnodes": "1", "nproc_per_node": 2, "scheduler": "local_cwd", **launch})


@pytest.mark.parametrize(
    ("overrides", "launch"),
    [([], {}), (["train.global_batch_size=512"], {"nnodes": "2", "nproc_per_node": 4}),
     (["train.global_batch_size=768"], {"nnodes": "3", "nproc_per_node": 2}),
     (["train.global_batch_size=1536"], {"nnodes": "1:4", "nproc_per_node": 2}),
     ([], {"nnodes": "1:4096", "nproc_per_node": 1024, "scheduler": "kubernetes"})],
)
def test_good_launch_arguments_pass(overrides, launch):
    check_launch(load_config("tiny-clip", overrides),
                 **{"nnodes": "1", "nproc_per_node": 2, "scheduler": "local_cwd", **launch})
    assert parse_nnodes("2:5") == (2, 5) and parse_nnodes(3) == (3, 3)
