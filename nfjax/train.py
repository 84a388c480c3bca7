"""Training: ``python -m nfjax.train --config configs/X.py[:key=value,...] --workdir DIR [--config.a.b=value]``.

A thin shell: the command line is parsed by :mod:`nfjax.cli`, the run is assembled by
:func:`nfjax.experiment.build_experiment` and trained by :func:`nfjax.trainer.train_and_evaluate`.
"""

from __future__ import annotations

import sys

from nfjax.allocator import restart_with_tunables
from nfjax.host_devices import configure_host_devices

if __name__ == "__main__":
    restart_with_tunables()  # first: malloc settings for XLA's per-step memory (CPU; nfjax/allocator.py)

configure_host_devices()  # before JAX starts: one XLA device per CPU core (no effect on GPU/TPU)

from nfjax.cli import run_cli
from nfjax.trainer import train_and_evaluate


def main(argv: list[str] | None = None) -> int:
    return run_cli("nfjax.train", argv, train_and_evaluate)


if __name__ == "__main__":
    sys.exit(main())
