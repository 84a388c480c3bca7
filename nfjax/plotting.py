"""What the result drivers in scripts/ share: matplotlib (an optional extra), small PNGs, the software versions.

matplotlib is the ``plots`` extra (``pip install -e '.[plots]'``); nothing in the library imports it, only the
drivers that draw (scripts/signal_propagation.py, speed_nf_vs_bn.py, batch_size_robustness.py, agc_sweep.py),
through :func:`import_pyplot`.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

PLOTS_INSTALL_HINT = "pip install -e '.[plots]'"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_DPI = 80  # with figures about 12 x 4 inches: about 1000 x 320 pixels and 40-80 KB per plot


def import_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend. Without matplotlib: SystemExit (exit status 1)
    whose one-line message gives the install command, so a driver stops before measuring and prints no
    traceback."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            f"matplotlib is not installed and this driver draws PNG plots with it; install the plots extra from "
            f"the repository root: {PLOTS_INSTALL_HINT}"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str) -> str:
    """Writes ``fig`` as a PNG at :data:`PNG_DPI` (creating the folder), closes it, returns ``path``."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=PNG_DPI)
    plt.close(fig)
    return path


def write_table(rows: list[dict], csv_path: str, json_path: str, record: dict) -> None:
    """``rows`` as a CSV (one column per key of the first row) and ``record`` as indented JSON, creating the
    folders."""
    import csv
    import json

    for path in (csv_path, json_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1)


def is_png(path: str) -> bool:
    """True when the file starts with the 8-byte PNG signature."""
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Python, package versions, JAX backend, CPU count and machine: recorded next to every result table."""
    import jax

    packages = ("jax", "jaxlib", "flax", "numpy", "matplotlib")
    return dict(
        python=sys.version.split()[0],
        **{package: _version(package) for package in packages},
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        machine=f"{platform.system()} {platform.machine()} {platform.processor() or ''}".strip(),
    )
