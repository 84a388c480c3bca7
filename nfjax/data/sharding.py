"""Who reads what: batch-size checks, per-host example ranges, the deterministic epoch order, seeds,
host batches -> globally sharded jax arrays."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class HostPlan:
    """This host's view of a global batch: host ``process_index`` of ``process_count`` reads
    ``local_batch = global_batch / process_count`` examples per step."""

    global_batch: int
    process_index: int
    process_count: int

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count


def check_global_batch(global_batch: int, process_count: int, device_count: int) -> None:
    """Fails with a message that says what to choose when the batch cannot be split evenly."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    if global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} is not divisible by {process_count} processes (hosts); "
            f"choose a multiple of {process_count}"
        )
    if global_batch % device_count:
        raise ValueError(
            f"global batch {global_batch} is not divisible by {device_count} devices; "
            f"choose a multiple of {device_count}"
        )


def make_host_plan(global_batch: int, process_index=None, process_count=None, device_count=None) -> HostPlan:
    """Defaults come from JAX (jax.process_index/process_count/device_count); tests override them."""
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    device_count = jax.device_count() if device_count is None else device_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
    check_global_batch(global_batch, process_count, device_count)
    return HostPlan(global_batch, process_index, process_count)


BALANCED_SALT = 0xBA1  # seeds the class-balanced draws of an epoch: (seed, epoch, BALANCED_SALT)


def derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (seed, epoch, ...); stable across runs and platforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch; the remainder of each epoch is dropped (it is reshuffled next epoch)."""
    steps = num_examples // global_batch
    if steps == 0:
        raise ValueError(f"global batch {global_batch} is larger than the {num_examples} training examples")
    return steps


def epoch_order(
    num_examples: int, seed: int, epoch: int, repeats: int = 1, probs: np.ndarray | None = None
) -> np.ndarray:
    """Example indices [num_examples] in the order epoch ``epoch`` visits them (a function of seed, epoch).

    With repeated augmentation (timm's RepeatAugSampler) each index of a permutation appears ``repeats``
    times in a row and the list is cut back to the epoch length, so an epoch covers about 1/repeats of the
    images, each seen ``repeats`` times with independent augmentations, in neighbouring slots of one global
    batch (timm spreads the copies over ranks of the same step; under one global batch that is the same).

    With ``probs`` [num_examples] (class-balanced sampling, :func:`balanced_probs`) the epoch is instead
    ``num_examples`` independent draws with replacement, index i with probability ``probs[i]``, from a generator
    of its own seeded by (seed, epoch); ``repeats`` then repeats each draw the same way.
    """
    if probs is None:
        order = np.random.default_rng(derive_seed(seed, epoch, 0x5EED)).permutation(num_examples)
    else:
        rng = np.random.default_rng(derive_seed(seed, epoch, BALANCED_SALT))
        order = rng.choice(num_examples, size=num_examples, replace=True, p=probs)
    if repeats > 1:
        order = np.repeat(order, repeats)[:num_examples]
    return order


def balanced_probs(labels: np.ndarray, exponent: float) -> np.ndarray:
    """float64 [N]: the probability of drawing example i, proportional to ``n_{y_i} ** -q`` (q = ``exponent``)
    where ``n_c`` counts the labels ``c`` in ``labels`` [N]. Class c is then drawn with probability
    ``n_c^(1 - q) / sum_k n_k^(1 - q)``: 1/K of the non-empty classes for q = 1, the data's frequencies for q = 0."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels).astype(np.float64)
    weights = counts[labels] ** -float(exponent)
    return weights / weights.sum()


def host_step_slices(order: np.ndarray, plan: HostPlan, first_step: int, num_steps: int) -> np.ndarray:
    """Positions in ``order`` this host reads for steps [first_step, first_step + num_steps) of an epoch:
    int64 [num_steps * local_batch]. Step s of the global batch is order[s*G:(s+1)*G]; host h takes the
    h-th contiguous block of local_batch of it."""
    local = plan.local_batch
    steps = np.arange(first_step, first_step + num_steps)[:, None]
    positions = steps * plan.global_batch + plan.process_index * local + np.arange(local)[None, :]
    return positions.reshape(-1)


def eval_host_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of the contiguous block of eval examples this host evaluates (sizes differ by <= 1)."""
    bounds = [num_examples * i // process_count for i in range(process_count + 1)]
    return int(bounds[process_index]), int(bounds[process_index + 1])


def eval_steps(num_examples: int, plan: HostPlan) -> int:
    """Steps every host runs so that the largest host block is covered (the rest is padded and masked)."""
    largest = max(
        end - start
        for start, end in (eval_host_range(num_examples, i, plan.process_count) for i in range(plan.process_count))
    )
    return max(1, -(-largest // plan.local_batch))


def train_host_range(num_examples: int, plan: HostPlan) -> tuple[int, int]:
    """Streaming path: equal, disjoint blocks of floor(N / processes) examples per host."""
    per_host = num_examples // plan.process_count
    return plan.process_index * per_host, (plan.process_index + 1) * per_host


def to_global_batch(batch: dict, mesh, data_axis: str | tuple | None = None) -> dict:
    """Host-local numpy batch -> dict of jax.Arrays sharded along ``data_axis`` of ``mesh`` over all hosts.

    Each host passes its own local_batch rows; the result has the global batch as its leading dimension.
    ``data_axis`` None: every axis of the mesh together (``'data'``, or ``('data', 'fsdp')`` with FSDP), so the
    rows go to the devices in the mesh's device order, whatever its shape.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from nfjax.parallel import batch_axes

    data_axis = batch_axes(mesh) if data_axis is None else data_axis
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
