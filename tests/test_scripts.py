"""scripts/fmnist_compare.py: the report it builds from runs' metrics (no training here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "fmnist_compare.py")


def _write_run(workdir, evals, wall=None):
    """Two train logs before each evaluation; losses chosen so that the window means are known."""
    os.makedirs(workdir, exist_ok=True)
    t, step, lines = 1000.0, 0, []
    for i, top1 in enumerate(evals):
        for loss in (2.0 - i, 1.0 - i / 2):
            step += 10
            t += 30
            lines.append(
                dict(
                    step=step,
                    split="train",
                    time=t,
                    loss=loss,
                    epoch=step / 20,
                    img_per_sec=100.0 + i,
                    step_time=0.5 + i / 10,
                )
            )
        lines.append(
            dict(step=step, split="eval", time=t + 6, top1=top1, top5=0.99, loss=0.3 - i / 100, examples=10000)
        )
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    if wall is not None:
        with open(os.path.join(workdir, "wall_time.json"), "w") as f:
            json.dump({"command": "x", "wall_seconds": wall}, f)


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_report_only_tabulates_both_twins_with_curves(tmp_path):
    out = str(tmp_path)
    _write_run(os.path.join(out, "nf"), [0.90, 0.94], wall=3600.0)
    _write_run(os.path.join(out, "bn"), [0.89, 0.9412])
    proc = _run("--recipe", "long", "--out", out, "--report-only")
    assert proc.returncode == 0, proc.stderr
    text = open(os.path.join(out, "report.md")).read()
    assert "| nf | 0.9400 | 0.9900 | 0.2900 | 10000 | 40 | 60.0 min |" in text
    assert "| bn | 0.9412 |" in text and "not recorded" in text
    # second evaluation of nf: train losses 1.0 and 0.5 since the first one, 96 s after the first record
    assert "| 40 | 2.0 | 0.9400 | 0.2900 | 0.7500 | 1.6 |" in text
    rows = json.load(open(os.path.join(out, "report.json")))
    assert [r["twin"] for r in rows] == ["nf", "bn"]
    assert rows[0]["curve"][0]["train_loss"] == 1.5
    assert rows[0]["step_time_median"] == 0.6


def test_report_only_without_a_run_fails_clearly(tmp_path):
    proc = _run("--out", str(tmp_path), "--report-only", "--twins", "nf")
    assert proc.returncode == 2
    assert "no run of the nf twin" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "report.md"))


def test_unknown_twin_is_refused(tmp_path):
    proc = _run("--out", str(tmp_path), "--twins", "nf,resnet")
    assert proc.returncode == 2 and "--twins takes" in proc.stderr
