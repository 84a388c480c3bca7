"""timm state dicts <-> nfjax (nfjax/convert/timm_layout.py): logits of tiny timm models (tests/data/timm, written
by scripts/make_timm_fixtures.py) reproduced, each layout option shown to matter, exact export round trip, every
mismatch named, detection, export names, the NFNet-L parameter counts. No torch needed; with timm installed the
exported state dicts also load into timm strictly and give the same logits."""

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from nfjax.convert import timm_layout as tl
from nfjax.convert.errors import ConversionError
from nfjax.convert.safetensors_io import read_safetensors
from nfjax.models import create_model
from nfjax.models import layers as L
from nfjax.models.summary import abstract_model, count_params

DATA = Path(__file__).parent / "data" / "timm"
FIXTURES = ("dm_nfnet", "nf_resnet", "eca_nfnet", "resnet")


@functools.cache
def fixture(name: str) -> tuple[dict, dict, np.ndarray]:
    """(record, timm state dict, timm logits) of a fixture."""
    record = json.loads((DATA / f"{name}.json").read_text())
    return record, read_safetensors(str(DATA / f"{name}.safetensors")), np.load(DATA / f"{name}.npy")


@functools.cache
def images() -> np.ndarray:
    return np.load(DATA / "inputs.npy")


@functools.cache
def converted(name: str) -> tuple[dict, int]:
    record, state, _ = fixture(name)
    return tl.timm_to_nfjax(state, record["timm_model"], model_kwargs=record["model_kwargs"])


def nfjax_kwargs(record: dict, **extra) -> dict:
    return {**record["timm_overrides"], **record["model_kwargs"], **extra}


def logits_of(record: dict, weights: dict, classes: int, **extra) -> np.ndarray:
    kwargs = nfjax_kwargs(record, **extra)
    # Abstract (no eager random init, slow op by op): every leaf is replaced by a converted tensor below.
    model = nnx.eval_shape(lambda: create_model(record["nfjax_model"], classes, rngs=nnx.Rngs(0), **kwargs))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    shapes = lambda tree: jax.tree.map(np.shape, tree)  # noqa: E731
    assert shapes(nnx.to_pure_dict(params)) == shapes(weights["params"])  # 0-d stays 0-d, nothing broadcasts
    nnx.replace_by_pure_dict(params, weights["params"])
    if "batch_stats" in weights:
        nnx.replace_by_pure_dict(stats, weights["batch_stats"])
    forward = jax.jit(lambda params, stats, x: nnx.merge(graphdef, params, stats)(x))
    return np.asarray(forward(params, stats, images()))


def tree_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("name", FIXTURES)
def test_converted_weights_reproduce_timm_logits(name):
    record, _, expected = fixture(name)
    weights, classes = converted(name)
    assert classes == 10 and ("batch_stats" in weights) == (name == "resnet")
    got = logits_of(record, weights, classes)
    assert np.abs(expected).max() > 0.5  # logits of order one: 1e-4 is a real bound
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name,wrong",
    [
        ("eca_nfnet", dict(padding="same")),
        ("eca_nfnet", dict(gamma_in_conv=False)),
        ("nf_resnet", dict(shortcut="conv")),
        ("dm_nfnet", dict(padding="symmetric")),
    ],
)
def test_each_layout_option_changes_the_logits(name, wrong):
    """The fixtures are sensitive to the options the conversion relies on: a wrong one is far off."""
    record, _, expected = fixture(name)
    weights, classes = converted(name)
    assert np.abs(logits_of(record, weights, classes, **wrong) - expected).max() > 1e-2


@pytest.mark.parametrize("name", FIXTURES)
def test_export_round_trip_is_exact(name):
    record, state, _ = fixture(name)
    weights, classes = converted(name)
    exported = tl.nfjax_to_timm(weights, record["nfjax_model"], nfjax_kwargs(record), classes)
    assert sorted(exported) == sorted(state)  # num_batches_tracked included, for strict loading
    for key, value in state.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    back, back_classes = tl.timm_to_nfjax(exported, record["timm_model"], model_kwargs=record["model_kwargs"])
    assert back_classes == classes and tree_equal(back, weights)


def test_deepmind_eps_convention_is_compensated_in_the_gains():
    """timm adds eps 1e-5 to the variance, DeepMind floors fan_in * var at 1e-4: importing into (exporting from)
    the DeepMind convention refolds the gains so the convolutions compute the same kernels."""
    record, state, expected = fixture("dm_nfnet")
    floor = dict(ws_eps_mode="floor", ws_eps=1e-4)
    weights, classes = tl.timm_to_nfjax(state, "dm_nfnet_f0", model_kwargs={**record["model_kwargs"], **floor})
    np.testing.assert_allclose(logits_of(record, weights, classes, **floor), expected, atol=1e-4, rtol=0)
    unfolded, _ = converted("dm_nfnet")
    assert np.abs(logits_of(record, unfolded, classes, **floor) - expected).max() > 1e-3
    # DeepMind's layout in full (tanh GELU too) exports to dm_nfnet with only the GELU approximation left.
    deepmind = dict(activation="gelu", **floor)
    np.testing.assert_allclose(logits_of(record, weights, classes, **deepmind), expected, atol=2e-3, rtol=0)
    back = tl.nfjax_to_timm(weights, "nfnet_f0", nfjax_kwargs(record, **floor), classes)
    for key, value in state.items():
        np.testing.assert_allclose(back[key], value, rtol=1e-6, atol=0, err_msg=key)


def test_every_mismatch_is_named():
    record, state, _ = fixture("dm_nfnet")
    broken = dict(state)
    del broken["stages.1.1.conv2b.gain"]
    broken["stages.0.0.extra.weight"] = np.zeros(3, np.float32)
    broken["final_conv.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ConversionError) as info:
        tl.timm_to_nfjax(broken, "dm_nfnet_f0", model_kwargs=record["model_kwargs"])
    message = str(info.value)
    assert "1 missing: stages.1.1.conv2b.gain" in message
    assert "1 unexpected: stages.0.0.extra.weight" in message
    assert "final_conv.bias (7,) (expected (128,))" in message
    with pytest.raises(ConversionError, match="no classifier"):
        tl.timm_to_nfjax({k: v for k, v in state.items() if not k.startswith("head")}, "dm_nfnet_f0")
    with pytest.raises(ConversionError, match="unknown timm model 'dm_nfnet_f9'"):
        tl.timm_to_nfjax(state, "dm_nfnet_f9")


def zero_state_dict(timm_name: str, num_classes: int = 1000) -> dict:
    """A full-size state dict of broadcast zeros: the right names and shapes, no memory."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in tl._expected_shapes(timm_name, num_classes).items()}


@pytest.mark.parametrize("timm_name", ["dm_nfnet_f0", "eca_nfnet_l0", "nfnet_l0", "nf_resnet50", "resnet50"])
def test_detects_full_size_models_and_names_them_in_errors(timm_name):
    state = zero_state_dict(timm_name, num_classes=7)
    assert tl.detect_timm_model(state) == timm_name
    other = "eca_nfnet_l1" if timm_name != "eca_nfnet_l1" else "nfnet_l0"
    with pytest.raises(ConversionError, match=f"looks like timm's {timm_name}: use --model {timm_name}"):
        tl.timm_to_nfjax(state, other)


def test_detection_declines_what_it_does_not_know():
    assert tl.detect_timm_model({}) is None
    assert tl.detect_timm_model(fixture("eca_nfnet")[1]) is None  # a reduced model is no released one
    state = zero_state_dict("resnet50")
    state["layer1.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    assert tl.detect_timm_model(state) is None


def test_timm_name_for_export():
    for timm_name, (model, overrides) in tl.TIMM_MODELS.items():
        assert tl.timm_name_for(model, overrides) == timm_name
    # Training-only arguments do not matter; DeepMind's layout runs in timm's DeepMind-compatible model.
    assert tl.timm_name_for("nfnet_f0", {"drop_rate": 0.5, "stochdepth_rate": 0.25}) == "dm_nfnet_f0"
    assert tl.timm_name_for("nfnet_f3", {}) == "dm_nfnet_f3"
    assert tl.timm_name_for("nf_resnet50", {}) is None  # DeepMind's NF-ResNet: SkipInit scalars, strided shortcut
    assert tl.timm_name_for("nfnet_f0plus", {}) is None
    assert tl.timm_name_for("nfnet_f0", {"depths": [1, 1, 1, 1]}) is None
    assert tl.timm_name_for("eca_nfnet_l0", {"padding": "same"}) is None
    assert tl.timm_name_for("no_such_model", {}) is None


@pytest.mark.parametrize(
    "name,count",
    [
        ("eca_nfnet_l0", 24_143_924),
        ("eca_nfnet_l1", 41_407_728),
        ("eca_nfnet_l2", 56_722_348),
        ("nfnet_l0", 35_074_488),
    ],
)
def test_nfnet_l_parameter_counts_equal_timm(name, count):
    assert count_params(abstract_model(name)) == count


def test_timm_layouts_of_the_zoo_models_count_like_timm():
    assert count_params(abstract_model("nf_resnet50", **tl.NF_RESNET)) == 25_557_032  # 16 SkipInit scalars fewer
    assert count_params(abstract_model("nfnet_f0", **tl.DM_NFNET)) == 71_489_284


def test_timm_layout_pieces():
    assert L.resolve_padding("symmetric", (7, 7), (2, 2)) == ((3, 3), (3, 3))
    assert L.resolve_padding("symmetric", (3, 3), (2, 2)) == ((1, 1), (1, 1))
    assert L.resolve_padding("symmetric", (1, 1), (1, 1)) == ((0, 0), (0, 0))
    assert L.resolve_padding("SAME", (3, 3), (2, 2)) == "SAME"
    conv = L.WSConv(4, 8, 1, gain_init=0.0, rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(conv.gain[...]))
    assert [L.make_divisible(v, 8) for v in (768.0, 384.0, 16.0, 12.0, 3.0)] == [768, 384, 16, 16, 8]
    block = abstract_model("eca_nfnet_l0").blocks[0]
    assert block.skip_gain is None and block.se is None and block.eca.kernel.shape == (5,)
    assert block.conv0.gamma == L.GAMMA["silu"] and block.conv0.padding == ((0, 0), (0, 0))
    with pytest.raises(ValueError, match="padding must be"):
        create_model("nfnet_f0", padding="valid")
    with pytest.raises(ValueError, match="attention must be"):
        abstract_model("nfnet_f0", attention="cbam")


def test_eca_kernel_size_follows_the_channel_count():
    assert [L.eca_kernel_size(c) for c in (32, 64, 96, 128, 256, 512, 1536)] == [3, 3, 3, 5, 5, 5, 5]


def test_eca_gate_is_a_zero_padded_cross_correlation_over_channels():
    eca = L.EfficientChannelAttention(6, rngs=nnx.Rngs(0))
    eca.kernel[...] = np.array([1.0, 2.0, 3.0], np.float32)
    x = np.arange(6, dtype=np.float32).reshape(1, 1, 1, 6) * np.ones((1, 2, 2, 1), np.float32)
    gate = np.asarray(eca(x))[0, 0, 0]
    h = np.pad(np.arange(6.0), 1)
    expected = 1 / (1 + np.exp(-np.array([h[c] + 2 * h[c + 1] + 3 * h[c + 2] for c in range(6)])))
    np.testing.assert_allclose(gate, expected, rtol=1e-6)


# ---- with timm (optional): exported state dicts load strictly into timm and give nfjax's logits ----


def import_timm_or_skip():
    pytest.importorskip("torch")
    try:
        from nfjax.benchmark_train import import_timm

        return import_timm()
    except ImportError:
        pytest.skip("timm is not installed")


def timm_model(timm, record: dict):
    """The reduced timm model of a fixture, from the timm configuration recorded with it."""
    config = record["timm_config"]
    if record["timm_model"].startswith("resnet"):
        from timm.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, num_classes=10, **config)
    import dataclasses

    from timm.models.nfnet import NormFreeNet, model_cfgs

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return NormFreeNet(dataclasses.replace(model_cfgs[record["timm_model"]], **config), num_classes=10)


@pytest.mark.parametrize("name", FIXTURES)
def test_exported_weights_load_strictly_into_timm_with_the_same_logits(name):
    timm = import_timm_or_skip()
    import torch

    record, _, _ = fixture(name)
    weights, classes = converted(name)
    # Move away from timm's own weights so the check is about export, not about reading the fixture back.
    rng = np.random.default_rng(5)
    weights = jax.tree.map(lambda w: (w + 0.05 * rng.standard_normal(w.shape)).astype(np.float32), weights)
    if "batch_stats" in weights:
        weights["batch_stats"] = jax.tree.map(np.abs, weights["batch_stats"])
    exported = tl.nfjax_to_timm(weights, record["nfjax_model"], nfjax_kwargs(record), classes)
    model = timm_model(timm, record).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
    with torch.no_grad():
        expected = model(torch.from_numpy(images()).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(logits_of(record, weights, classes), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("timm_name", sorted(tl.TIMM_MODELS))
def test_released_timm_models_have_exactly_the_mapped_names_and_shapes(timm_name):
    timm = import_timm_or_skip()
    import torch

    with torch.device("meta"):  # shapes only, no memory
        model = timm.create_model(timm_name, pretrained=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes == tl._expected_shapes(timm_name, 1000)
