"""Device mesh, shardings and multi-host start-up. Data parallelism is ``jax.jit`` over a ``data`` mesh.

``train.fsdp = 1`` (the default): a 1-D mesh ``data``, the batch sharded on it, parameters and optimizer state
replicated. ``train.fsdp = F > 1``: a 2-D mesh ``(data, fsdp)`` of shape ``(devices / F, F)``; the batch is split
over both axes together (every device still reads its own slice: data parallelism over all devices), and every
large leaf of the state (params, EMA, optimizer state) is split along one dimension over ``fsdp``
(:func:`param_sharding`), so each device holds 1/F of it. XLA (GSPMD) inserts the all-gathers of the weights and
the reduce-scatters of the gradients. No pmap: host-local batches become global arrays in
``nfjax.data.to_global_batch`` (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Leaves with fewer elements stay replicated under FSDP (a choice, not a measurement): below 2**16 elements (256 KiB
# in float32) a leaf saves little and would add collectives per step. Gains, biases, BN statistics, scalars and
# the smallest kernels stay whole; in NFNet-F7 they are 7 MiB per tree, 0.4% of its bytes (docs/performance.md).
FSDP_MIN_SIZE = 2**16


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


def check_fsdp(fsdp: int, device_count: int) -> None:
    """One line naming the valid choices when ``fsdp`` does not split ``device_count`` devices."""
    if fsdp < 1 or device_count % fsdp:
        choices = ", ".join(str(d) for d in range(1, device_count + 1) if device_count % d == 0)
        raise ValueError(
            f"train.fsdp={fsdp} must divide the {device_count} devices of the mesh (data = devices / fsdp); "
            f"choose one of {choices}"
        )


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
    """A mesh over all (or the first ``num_devices``) global devices: 1-D ``data`` when ``fsdp == 1``, else
    ``(data, fsdp)`` of shape ``(devices / fsdp, fsdp)``, each fsdp group ``fsdp`` consecutive devices (on one
    host when ``fsdp`` divides its device count, so the weights' all-gathers stay on the fast local links)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are visible")
        devices = devices[:num_devices]
    check_fsdp(fsdp, len(devices))
    if fsdp == 1:
        return Mesh(np.array(devices), (DATA_AXIS,))
    return Mesh(np.array(devices).reshape(-1, fsdp), (DATA_AXIS, FSDP_AXIS))


def fsdp_size(mesh) -> int:
    """Size of the mesh's ``fsdp`` axis (1 when it has none)."""
    return dict(mesh.shape).get(FSDP_AXIS, 1)


def batch_axes(mesh) -> str | tuple[str, ...]:
    """The axes the batch is split over: every axis of the mesh (``'data'``, or ``('data', 'fsdp')``), so each
    device gets its own slice; ``shard_map`` code (SAM) uses the same name for its per-device collectives."""
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis together; other axes whole."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def leaf_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """How one state leaf of ``shape`` is laid out: ``P()`` (replicated) when ``fsdp == 1``, below
    :data:`FSDP_MIN_SIZE` elements or with no dimension divisible by ``fsdp``; else ``fsdp`` on its largest
    divisible dimension (ties: the later one, the output channels of an HWIO kernel), e.g. a [3, 3, 256, 512]
    kernel with fsdp 8 -> ``P(None, None, None, 'fsdp')``, shards of [3, 3, 256, 64]."""
    divisible = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE or not divisible:
        return P()
    dim = max(divisible, key=lambda i: (shape[i], i))
    return P(*([None] * dim), FSDP_AXIS)


def param_sharding(mesh, tree):
    """Shardings of params / EMA / optimizer-state / batch-statistics leaves (arrays or ShapeDtypeStructs):
    replicated on a ``data`` mesh, split per :func:`leaf_spec` on a ``(data, fsdp)`` mesh. ``mesh`` may be an
    ``AbstractMesh`` (memory reports without devices)."""
    fsdp = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(getattr(x, "shape", ())), fsdp)), tree)
