"""Device mesh, shardings and multi-host start-up. Data parallelism is ``jax.jit`` over a 1-D ``data`` mesh.

The batch is sharded on ``data``; parameters and optimizer state are replicated (``param_sharding`` is the hook
for sharding large parameters later). No pmap: host-local batches become global arrays in
``nfjax.data.to_global_batch`` (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = None,
) -> None:
    """Starts ``jax.distributed`` when asked to, or when the environment describes a multi-process job.

    Explicit arguments win; otherwise JAX's own cluster detection reads TPU pod metadata, SLURM or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables. Single-process runs
    (nothing given, no cluster environment) skip it. ``cpu_collectives='gloo'`` enables cross-process
    collectives between CPU processes (loopback tests).
    """
    env_multi = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))
    if coordinator_address is None and num_processes is None and not env_multi:
        return
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over all (or the first ``num_devices``) global devices."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, tree):
    """Sharding for parameters / optimizer state: replicated today; the single place to shard big weights."""
    return jax.tree.map(lambda _: replicated(mesh), tree)
