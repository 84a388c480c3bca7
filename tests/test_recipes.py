"""docs/recipes.md and the recipes' reference values (nfjax/recipe_sources.py): no training, configs only."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

from nfjax import recipe_sources as rs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "recipes.md")


@pytest.fixture(scope="module")
def configs():
    return {name: rs.load(name) for name in rs.config_names()}


@pytest.mark.parametrize("name", sorted(rs.REFERENCES))
def test_config_values_equal_their_reference(name, configs):
    bad = rs.mismatches(configs[name], rs.REFERENCES[name])
    assert not bad, f"configs/{name} differs from its reference:\n  " + "\n  ".join(bad)


def test_doc_is_up_to_date():
    with open(DOC) as f:
        current = f.read()
    assert current == rs.render(), "docs/recipes.md is stale; regenerate it with: python scripts/make_recipes_doc.py"


def test_every_config_has_a_section():
    names = rs.config_names()
    covered = set(rs.REFERENCES) | set(rs.OWN_RECIPES)
    assert set(names) <= covered, f"configs without a section in docs/recipes.md: {sorted(set(names) - covered)}"
    assert covered <= set(names), f"sections for configs that do not exist: {sorted(covered - set(names))}"
    with open(DOC) as f:
        text = f.read()
    for name in names:
        assert f"## configs/{name}\n" in text


def test_rows_are_well_formed():
    for name, refs in rs.REFERENCES.items():
        keys = [r.key for r in refs]
        assert len(keys) == len(set(keys)), f"{name}: a key appears twice"
        for r in refs:
            assert any(short in r.source for short in rs.SOURCES), f"{name} {r.key}: source {r.source!r} unknown"
            assert r.label == rs.LABELS[r.key]
    assert set(rs.DIFFERENCES) <= set(rs.REFERENCES)


def test_a_changed_config_value_is_caught(configs):
    cfg = copy.deepcopy(configs["nfnet_f0.py"])
    with cfg.unlocked():
        cfg.optim.weight_decay = 1e-4
        cfg.model.kwargs.alpha = 0.5  # a model argument the config did not set
    bad = rs.mismatches(cfg, rs.REFERENCES["nfnet_f0.py"])
    assert len(bad) == 2
    assert bad[0].startswith("model.kwargs.alpha: nfjax 0.5 != reference 0.2")
    assert bad[1].startswith("optim.weight_decay: nfjax 0.0001 != reference 2e-05 (dm/experiment_nfnets.py:67")


def test_render_refuses_a_mismatch(monkeypatch):
    rows = list(rs.REFERENCES["rsb_a3.py"])
    rows[[r.key for r in rows].index("optim.eps")] = rs.ref("optim.eps", 1e-8, "timm-0.5.4 timm/optim/lamb.py:88")
    monkeypatch.setitem(rs.REFERENCES, "rsb_a3.py", rows)
    with pytest.raises(ValueError, match=r"(?s)configs/rsb_a3.py differs.*optim.eps: nfjax 1e-06 != reference 1e-08"):
        rs.render()


def test_config_value_falls_back_to_model_defaults(configs):
    cfg = configs["resnet50_bn.py"]
    assert rs.config_value(cfg, "model.kwargs.zero_init_last") is False  # set by the config
    assert rs.config_value(cfg, "model.kwargs.stochdepth_rate") == 0.0  # the constructor's default
    assert rs.config_value(configs["nfnet_f3.py"], "model.kwargs.drop_rate") == 0.4  # the model table's
    with pytest.raises(KeyError, match="no argument"):
        rs.config_value(cfg, "model.kwargs.no_such_argument")


def test_same_and_fmt():
    assert rs.same(5e-3 * 256 / 2048, 0.000625) and rs.same((30, 60), [30.0, 60.0])
    assert not rs.same(True, 1) and not rs.same(None, 0.0) and not rs.same((1,), (1, 2))
    assert rs.fmt(("(^|/)bias$",)) == "('(^\\|/)bias$',)"


def test_script_check_reports_a_stale_file(tmp_path):
    script = os.path.join(ROOT, "scripts", "make_recipes_doc.py")
    stale = tmp_path / "recipes.md"
    stale.write_text("old\n")
    run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True, timeout=120)
    proc = run("--check", "--out", str(stale))
    assert proc.returncode == 1 and "stale" in proc.stderr and "python scripts/make_recipes_doc.py" in proc.stderr
    assert run("--out", str(stale)).returncode == 0
    assert run("--check", "--out", str(stale)).returncode == 0
    assert stale.read_text() == open(DOC).read()
