"""The one config loader and parser: typed values, clear errors, and every shipped config loads and validates."""

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from nfjax import optim
from nfjax.config_lib import ConfigError, apply_override, load_config, load_config_file, parse_arg, parse_value

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize(
    "raw, current, expected",
    [
        ("true", False, True),
        ("0", True, False),
        ("3", 1.5, 3.0),
        ("4.0", 2, 4),
        ("(1,2)", (3,), (1, 2)),
        ("abc", "x", "abc"),
        ("None", None, None),
        ("[1, 2]", None, [1, 2]),
        ("sgd", None, "sgd"),
    ],
)
def test_parse_value_follows_the_field_type(raw, current, expected):
    value = parse_value(raw, current, "--config.x")
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "raw, current, needle", [("maybe", True, "true or false"), ("2.5", 3, "integer"), ("abc", 1.0, "float")]
)
def test_parse_value_refuses_the_wrong_type(raw, current, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_value(raw, current, "--config.x")


def test_recipe_arguments_and_overrides_share_the_parser_and_the_hint():
    args = parse_arg("epochs=3,seed=2", epochs=0.0, seed=0, recipe="quick")
    assert (args.epochs, args.seed, args.recipe) == (3.0, 2, "quick")
    with pytest.raises(ConfigError, match="Did you mean epochs"):
        parse_arg("epoch=3", epochs=0.0, seed=0)
    with pytest.raises(ConfigError, match="config argument seed='x': expected a int"):
        parse_arg("seed=x", seed=0)
    cfg = load_config(f"{ROOT}/configs/fmnist_nf.py", [("train.global_batch", "128")])
    assert cfg.train.global_batch == 128
    with pytest.raises(ConfigError, match="Did you mean --config.train.global_batch"):
        apply_override(cfg, "train.global_bach", "3")
    # Typed fields whose value is None parse by their declared type; None sets them back.
    apply_override(cfg, "data.cache_in_memory", "false")
    apply_override(cfg, "data.image_size", "32")
    assert cfg.data.cache_in_memory is False and cfg.data.image_size == 32
    apply_override(cfg, "data.image_size", "None")
    assert cfg.data.image_size is None
    with pytest.raises(ConfigError, match="data.cache_in_memory='maybe': expected true or false"):
        apply_override(cfg, "data.cache_in_memory", "maybe")


def test_a_config_file_with_a_syntax_error_is_one_clear_message(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def get_config(arg=None):\n    return {\n")
    with pytest.raises(ConfigError, match=r"broken.py is not valid Python: .* line 2"):
        load_config_file(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(str(tmp_path / "missing.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_optimizer_validates(path):
    cfg = load_config_file(str(path))
    assert isinstance(cfg, ml_collections.ConfigDict) and cfg.is_locked
    assert f"python -m nfjax.train --config configs/{path.name}" in path.read_text()  # the docstring's command
    opt = optim.build_optimizer(cfg.optim, steps_per_epoch=10, total_steps=10_000, global_batch=256)
    assert opt.config.name == cfg.optim.name and opt.total_steps == 10_000


def test_new_model_kwargs_are_accepted_on_a_locked_config_and_nothing_else_is():
    cfg = load_config_file(f"{ROOT}/configs/nfnet_f0.py")
    assert cfg.is_locked and "depths" not in cfg.model.kwargs
    apply_override(cfg, "model.kwargs.depths", "(1,1,1,1)")
    assert tuple(cfg.model.kwargs.depths) == (1, 1, 1, 1) and cfg.is_locked
    with pytest.raises(ConfigError, match="unknown config key --config.train.new_key"):
        apply_override(cfg, "train.new_key", "1")


def test_the_torchvision_recipe_keeps_per_gpu_bn_statistics_only_for_batches_of_32s():
    assert load_config_file(f"{ROOT}/configs/resnet50_bn.py").model.kwargs.bn_ghost_size == 32
    assert load_config_file(f"{ROOT}/configs/resnet50_bn.py:batch=512").model.kwargs.bn_ghost_size == 32
    assert load_config_file(f"{ROOT}/configs/resnet50_bn.py:batch=100").model.kwargs.bn_ghost_size == 0


def test_command_line_runs_keep_a_compilation_cache_unless_told_not_to(tmp_path):
    # In a fresh interpreter (this one's JAX already has the test session's cache folder).
    (tmp_path / "file").write_text("")
    code = (
        "import os, jax\n"
        "from nfjax.compile_cache import configure_compilation_cache as c\n"
        "os.environ['NFJAX_XLA_CACHE'] = 'off'\n"
        "print(c(), jax.config.jax_compilation_cache_dir)\n"
        "os.environ['NFJAX_XLA_CACHE'] = os.path.join(os.environ['HOME'], 'file', 'cache')  # under a file\n"
        "print(c(), jax.config.jax_compilation_cache_dir)\n"
        "del os.environ['NFJAX_XLA_CACHE']\n"
        "print(c(), jax.config.jax_persistent_cache_min_compile_time_secs, jax.config.jax_compilation_cache_max_size)\n"
        "os.environ['NFJAX_XLA_CACHE'] = os.path.join(os.environ['HOME'], 'other')\n"
        "print(c())  # JAX has a folder now: left as it is\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "JAX_PERSISTENT", "NFJAX_XLA"))}
    env["HOME"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    default = str(tmp_path / ".cache" / "nfjax" / "xla")
    assert result.stdout.splitlines() == ["None None", "None None", f"{default} 1.0 {4 * 2**30}", default]
    assert os.path.isdir(default)
    assert "no compilation cache" in result.stderr and "every run compiles afresh" in result.stderr
