"""nfjax.convert: DeepMind files (restricted unpickling, exact names), safetensors reading, the weights folder,
the CLI's errors, and the folder read back by predict and by create_model."""

import io
import json
import os
import pickle
import struct
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from nfjax.convert import __main__ as convert_cli
from nfjax.convert import api
from nfjax.convert import deepmind as dm
from nfjax.convert import pretrained as pt
from nfjax.convert.errors import ConversionError, flatten
from nfjax.convert.safetensors_io import read_safetensors, write_safetensors
from nfjax.models import create_model

TSV = os.path.join(os.path.dirname(__file__), "data", "deepmind_f0_params.tsv")  # DeepMind's F0 release layout
SMALL_NFNET = dict(widths=(32, 64, 128, 128), depths=(1, 1, 1, 1), group_size=16, stem_widths=(4, 8, 8))


def _abstract(name: str, num_classes: int = 1000, **kwargs) -> dict:
    model = nnx.eval_shape(lambda: create_model(name, num_classes, rngs=nnx.Rngs(0), **kwargs))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _params(name: str, num_classes: int = 5, seed: int = 1, **kwargs) -> dict:
    """The model's parameter tree, every tensor drawn in NumPy (distinct values; no eager NNX init to wait for)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(x.dtype), _abstract(name, num_classes, **kwargs))


def _tree_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def small_dm_file(tmp_path_factory):
    """A reduced-width NFNet's params in DeepMind's layout, pickled like the release files."""
    params = _params("nfnet_f0", **SMALL_NFNET)
    path = tmp_path_factory.mktemp("dm") / "small_haiku.npz"
    with open(path, "wb") as f:
        pickle.dump(dm.nfjax_to_deepmind(params), f)
    return str(path), params


@pytest.fixture(scope="module")
def small_folder(small_dm_file, tmp_path_factory):
    path, _ = small_dm_file
    out = str(tmp_path_factory.mktemp("folders") / "small")
    record = api.convert_deepmind(path, "nfnet_f0", out, model_kwargs=SMALL_NFNET)
    return out, record


def _reference_names() -> dict[str, tuple[int, ...]]:
    names = {}
    with open(TSV) as f:
        for line in f:
            if line.startswith("#") or line.startswith("haiku_param"):
                continue
            name, shape = line.strip().split("\t")
            names[name] = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
    return names


def test_f0_converter_consumes_exactly_deepminds_names_and_shapes():
    reference = _reference_names()
    assert len(reference) == 233
    # Every tensor a distinct constant (broadcast: no memory), so a swapped name shows up as a wrong value.
    given: dict[str, dict] = {}
    for i, (name, shape) in enumerate(sorted(reference.items())):
        module, _, param = name.rpartition("/")
        given.setdefault(module, {})[param] = np.broadcast_to(np.float32(i), shape)
    abstract = _abstract("nfnet_f0")
    params = dm.deepmind_to_nfjax(given, abstract)
    names = dm.haiku_names(abstract)
    index = {name: i for i, name in enumerate(sorted(reference))}
    for path, value in flatten(params).items():
        assert value.shape == tuple(flatten(abstract)[path].shape)
        assert np.all(value == index["/".join(names[path])]), path
    assert api.deepmind_variant(given) == "nfnet_f0"
    # One name too many or too few, or a wrong shape: each named.
    extra = {**given, "NFNet/~/extra": {"w": np.zeros(3, np.float32)}}
    with pytest.raises(ConversionError, match="1 unexpected: NFNet/~/extra/w"):
        dm.deepmind_to_nfjax(extra, abstract)
    fewer = {k: v for k, v in given.items() if k != "NFNet/~/linear"}
    with pytest.raises(ConversionError, match="2 missing: NFNet/~/linear/"):
        dm.deepmind_to_nfjax(fewer, abstract)
    wrong = {**given, "NFNet/~/linear": {"w": np.zeros((3072, 10), np.float32), "b": given["NFNet/~/linear"]["b"]}}
    with pytest.raises(
        ConversionError, match=r"wrong shape: NFNet/~/linear/w \(3072, 10\) \(expected \(3072, 1000\)\)"
    ):
        dm.deepmind_to_nfjax(wrong, abstract)


def test_deepmind_round_trip_is_exact(small_dm_file, small_folder):
    path, params = small_dm_file
    back = dm.deepmind_to_nfjax(dm.load_deepmind_file(path), jax.eval_shape(lambda: params))
    assert _tree_equal(back, params)
    out, record = small_folder
    assert record["source"]["sha256"] == pt.sha256_of(path) and record["num_classes"] == 5
    assert record["preprocessing"]["resize"] == "deepmind"
    loaded = pt.load_weights(out)
    assert loaded.step == 0 and _tree_equal(jax.tree.map(np.asarray, loaded.weights["params"]), params)


def test_dill_written_arrays_are_admitted(monkeypatch):
    """dill (what DeepMind used) records arrays through its own constructor; the reader admits exactly that."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    fake = types.ModuleType("dill._dill")  # the names dill's pickles use, without installing dill

    def _create_array(constructor, args, state, npdict):  # pragma: no cover - never called
        raise AssertionError

    fake._create_array = _create_array
    _create_array.__module__, _create_array.__qualname__ = "dill._dill", "_create_array"
    monkeypatch.setitem(sys.modules, "dill", types.ModuleType("dill"))
    monkeypatch.setitem(sys.modules, "dill._dill", fake)

    class Created:
        def __reduce__(self):
            constructor, args, state = array.__reduce__()
            return (_create_array, (constructor, args, state, None))

    payload = pickle.dumps({"NFNet/~/linear": {"w": Created()}}, protocol=4)
    got = dm.SafeUnpickler(io.BytesIO(payload)).load()
    assert np.array_equal(got["NFNet/~/linear"]["w"], array)


class _Malicious:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "created_by_pickle"
    path = tmp_path / "F0_haiku.npz"
    with open(path, "wb") as f:
        pickle.dump({"NFNet/~/linear": {"w": _Malicious(str(target))}}, f)
    with pytest.raises(ConversionError, match=r"refused to load .*asks to load io\.open\..*no code from it ran"):
        dm.load_deepmind_file(str(path))
    assert not target.exists()
    code = convert_cli.main(["deepmind", str(path), "--model", "nfnet_f0", "--out", str(tmp_path / "out")])
    assert code == 2 and not target.exists() and not (tmp_path / "out").exists()


def test_truncated_files_give_one_clear_error(small_dm_file, tmp_path, capsys):
    path, _ = small_dm_file
    short = tmp_path / "short.npz"
    short.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(ConversionError, match="truncated"):
        dm.load_deepmind_file(str(short))
    tensors = {"a": np.arange(100, dtype=np.float32), "b": np.ones((2, 3), np.float32)}
    good = tmp_path / "t.safetensors"
    write_safetensors(str(good), tensors, {"format": "pt"})
    assert _tree_equal(read_safetensors(str(good)), tensors)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-20])
    code = convert_cli.main(["timm", str(cut), "--model", "dm_nfnet_f0", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "probably truncated" in err and "Traceback" not in err and err.count("\n") == 1
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 5) + b"{not json")
    with pytest.raises(ConversionError, match="not JSON"):
        read_safetensors(str(tmp_path / "junk.safetensors"))


def test_safetensors_reads_bfloat16_and_scalars(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw)
    assert np.array_equal(read_safetensors(str(path))["x"], values)
    write_safetensors(str(tmp_path / "s.safetensors"), {"n": np.array(0, np.int64)})
    assert read_safetensors(str(tmp_path / "s.safetensors"))["n"].shape == ()


def test_wrong_model_and_bad_arguments_are_one_paragraph(small_dm_file, tmp_path, capsys):
    path, _ = small_dm_file
    out = tmp_path / "out"
    assert convert_cli.main(["deepmind", path, "--model", "nfnet_f1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not hold nfnet_f1" in err and "Traceback" not in err and not out.exists()
    kwargs = json.dumps({**SMALL_NFNET, "widths": [32, 64, 128, 256]})
    assert convert_cli.main(["deepmind", path, "--model", "nfnet_f0", "--out", str(out), "--model-kwargs", kwargs]) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "wrong shape" in err and not out.exists()
    assert convert_cli.main(["deepmind", path, "--model", "nfnet_f0", "--out", str(out), "--model-kwargs", "{x"]) == 2
    assert "--model-kwargs is not JSON" in capsys.readouterr().err
    assert convert_cli.main(["timm", path, "--model", "no_such_net", "--out", str(out)]) == 2
    assert "unknown timm model 'no_such_net'" in capsys.readouterr().err


def test_folder_is_not_overwritten(small_dm_file, small_folder, capsys):
    path, _ = small_dm_file
    out, _ = small_folder
    before = sorted(os.listdir(out))
    code = convert_cli.main(
        ["deepmind", path, "--model", "nfnet_f0", "--out", out, "--model-kwargs", json.dumps(SMALL_NFNET)]
    )
    assert code == 2 and "is not empty" in capsys.readouterr().err and sorted(os.listdir(out)) == before


def test_predict_reads_a_converted_folder(small_folder, tmp_path):
    from PIL import Image

    from nfjax import predict

    out, _ = small_folder
    image = tmp_path / "x.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (50, 70, 3), np.uint8)).save(image)
    (top,) = predict.predict(out, [str(image)], top_k=3)
    assert [name for name, _ in top][0].startswith("class ") and len(top) == 3
    assert abs(sum(p for _, p in predict.predict(out, [str(image)], top_k=5)[0]) - 1.0) < 1e-5


def test_create_model_pretrained(small_folder):
    out, _ = small_folder
    model = create_model("nfnet_f0", pretrained=out, drop_rate=0.0)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert _tree_equal(params, pt.load_weights(out).weights["params"] | {})
    assert nnx.jit(lambda m, x: m(x))(model, np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 5)
    with pytest.raises(ValueError, match="holds nfnet_f0, not nf_resnet50"):
        create_model("nf_resnet50", pretrained=out)


def test_the_folder_config_keeps_the_weights_eval_interpolation():
    for interpolation in ("bilinear", "bicubic"):
        prep = pt.preprocessing(224, 224, resize="crop_pct", crop_pct=0.875, interpolation=interpolation)
        cfg = pt._config("resnet50", {}, prep)
        assert cfg.data.eval_interpolation == interpolation and cfg.data.eval_preprocess == "crop_pct"
