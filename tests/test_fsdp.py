"""FSDP (``train.fsdp``): the (data, fsdp) mesh, which leaves are split, a few steps equal to plain data parallelism
on the same 8 devices, and a checkpoint written under FSDP restored (into FSDP shardings and onto a plain mesh).

The tiny models' leaves are far below :data:`nfjax.parallel.FSDP_MIN_SIZE`, so this module lowers it to 128
elements: every kernel but the stem's (72 elements) and the classifier are then split, the vectors stay replicated.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from nfjax import optim, parallel
from nfjax.config_lib import base_config
from nfjax.data import DatasetInfo, to_global_batch
from nfjax.experiment import build_experiment
from nfjax.runs import load_run, save_config

TINY = dict(widths=(8, 16, 16), stem_width=8)
INFO = DatasetInfo(64, 16, 10, (8, 8, 1), tuple(f"c{i}" for i in range(10)))
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def small_shard_threshold():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parallel, "FSDP_MIN_SIZE", 128)
        yield


def experiment(fsdp, model="nf_resnet_small", kwargs=TINY, **optim):
    cfg = base_config(model, dict(kwargs))
    cfg.train.update(global_batch=16, total_steps=10, async_checkpoints=False, fsdp=fsdp)
    cfg.optim.update(warmup_epochs=0.0, base_lr=1.0, ema_decay=0.9, **optim)
    return build_experiment(cfg, info=INFO)


def train(exp):
    """STEPS train steps on fixed random batches; returns (state, losses)."""
    rng = np.random.default_rng(0)
    state, step, losses = exp.create_state(), exp.train_step(), []
    for _ in range(STEPS):
        images = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
        batch = dict(image=images, label=rng.integers(0, 10, 16).astype(np.int32))
        state, metrics = step(state, to_global_batch(batch, exp.mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


def assert_close(a, b):
    """Equal up to reordered float sums; a wrong layout or a lost gradient shard moves far more than this."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def fsdp_run():
    """The NF model with EMA and 2 accumulated micro-batches, fsdp=4 (mesh 2x4); (experiment, state, losses)."""
    exp = experiment(4, accum_steps=2)
    return (exp, *train(exp))


# ------------------------------------------------------------------------------------------- layout


def test_leaf_spec_splits_the_largest_divisible_dimension_of_large_leaves():
    assert parallel.leaf_spec((3, 3, 256, 512), 8) == P(None, None, None, "fsdp")
    assert parallel.leaf_spec((3072, 1000), 8) == P("fsdp")  # both divide: the larger
    assert parallel.leaf_spec((3, 3, 256, 256), 8) == P(None, None, None, "fsdp")  # a tie: the later
    assert parallel.leaf_spec((3, 3, 128, 1000), 16) == P(None, None, "fsdp")  # 1000 % 16: the next
    assert parallel.leaf_spec((1000, 1001), 8) == P("fsdp")
    assert parallel.leaf_spec((999, 1001), 8) == P()  # nothing divides
    assert parallel.leaf_spec((64,), 8) == P()  # below FSDP_MIN_SIZE
    assert parallel.leaf_spec((), 8) == P()
    assert parallel.leaf_spec((3, 3, 256, 512), 1) == P()


def test_mesh_is_data_by_fsdp_and_a_size_that_does_not_divide_is_refused():
    mesh = parallel.make_mesh(8, fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert parallel.batch_axes(mesh) == ("data", "fsdp")
    assert mesh.devices.ravel().tolist() == jax.devices()  # batch rows go to the devices in the 1-D order
    assert parallel.make_mesh(8).axis_names == ("data",)  # fsdp=1: today's mesh
    with pytest.raises(ValueError, match=r"train.fsdp=3 must divide the 8 devices .* choose one of 1, 2, 4, 8$"):
        parallel.make_mesh(8, fsdp=3)


def test_state_leaves_are_split_over_fsdp(fsdp_run):
    exp, state, _ = fsdp_run
    path = "['blocks'][0]['conv1']['kernel']"
    leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(state) if jax.tree_util.keystr(p).endswith(path)]
    assert len(leaves) == 3  # params, EMA, SGD momentum
    for leaf in leaves:
        assert leaf.shape == (3, 3, 8, 8)
        assert leaf.sharding.spec == P(None, None, None, "fsdp")
        assert {s.data.shape for s in leaf.addressable_shards} == {(3, 3, 8, 2)}
    assert state["params"]["classifier"]["kernel"].sharding.spec == P("fsdp")
    assert state["params"]["classifier"]["bias"].sharding.spec == P()
    assert state["params"]["stem_conv"]["kernel"].sharding.spec == P()  # 72 elements: below the threshold
    same = jax.tree.map(lambda x, s: x.sharding == s, state, exp.state_spec.shardings)
    assert all(jax.tree.leaves(same))  # the jitted step returns the state in the layout it was given


# ------------------------------------------------------------------------------------- equal training


def test_fsdp_steps_equal_data_parallel(fsdp_run):
    _, state, losses = fsdp_run
    reference, reference_losses = train(experiment(1, accum_steps=2))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-6)
    for key in ("params", "ema", "opt_state", "step"):
        assert_close(state[key], reference[key])


def linear_grad_fn(params, batch, rng):
    """Softmax regression, plus a per-device random term (the rng each device folds in must match too)."""

    def loss_fn(p):
        logits = batch["x"] @ p["kernel"] + p["bias"]
        noise = jax.random.uniform(rng) * 1e-2
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean() + noise

    return jax.value_and_grad(loss_fn)(params)


def test_sam_under_fsdp_equals_data_parallel():
    """SAM's unsynchronized ascent runs per device over both mesh axes: the same 8 ascents as on the 1-D mesh,
    with the kernel sharded over fsdp going in."""
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"kernel": jax.random.normal(keys[0], (32, 8)), "bias": jax.random.normal(keys[1], (8,))}
    batch = {"x": 3 * jax.random.normal(keys[2], (32, 32)), "y": jax.random.randint(keys[3], (32,), 0, 8)}
    opt = optim.build_optimizer(dict(sam_rho=0.5, warmup_steps=1), steps_per_epoch=5, total_steps=10, global_batch=32)
    results = []
    for fsdp in (1, 4):
        mesh = parallel.make_mesh(8, fsdp)
        placed = jax.device_put(params, parallel.param_sharding(mesh, params))
        grads_fn = jax.jit(lambda p, b, r, mesh=mesh: opt.gradients(linear_grad_fn, p, b, r, mesh))
        results.append(grads_fn(placed, to_global_batch(batch, mesh), jax.random.key(1)))
    assert placed["kernel"].sharding.spec == P("fsdp")
    assert_close(results[1], results[0])
    # The check has teeth: an ascent per data-axis group (4 devices sharing 16 examples) is another gradient.
    sam = dict(rho=0.5, fraction=opt.config.sam_fraction, mesh=mesh, axis="data")
    run = lambda p, b, r: optim.sam_grads(linear_grad_fn, p, b, rng=r, **sam)
    _, grouped = jax.jit(run)(placed, to_global_batch(batch, mesh), jax.random.key(1))
    assert not np.allclose(grouped["kernel"], results[0][1]["kernel"], rtol=1e-3)


# ------------------------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_written_under_fsdp_restores(fsdp_run, tmp_path):
    exp, state, _ = fsdp_run
    ckpt = exp.checkpointer(str(tmp_path))
    ckpt.save(STEPS, state, exp.checkpoint_meta())
    ckpt.close()
    save_config(exp.cfg, str(tmp_path))
    ckpt = exp.checkpointer(str(tmp_path), create=False)
    restored = exp.restore_state(ckpt)  # resume: straight into the FSDP layout
    ckpt.close()
    assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, restored, exp.state_spec.shardings)))
    assert_close(restored, state)
    run = load_run(str(tmp_path), info=INFO)  # evaluation: the weights alone, on a plain data mesh
    assert run.experiment.mesh.axis_names == ("data",) and run.step == STEPS
    assert {x.sharding.spec for x in jax.tree.leaves(run.weights)} == {P()}
    assert_close(run.weights["params"], state["params"])
    assert_close(run.weights["ema"], state["ema"])


def test_weights_standardized_for_evaluation_keep_the_fsdp_layout(fsdp_run):
    """Evaluation's copy of the weights (kernels standardized once) is split like the params, not gathered."""
    exp, state, _ = fsdp_run
    weights = exp.inference_weights(state["params"], state.get("batch_stats", {}))
    assert exp.prestandardized
    split = 0
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(weights), strict=True):
        assert b.sharding.is_equivalent_to(a.sharding, a.ndim), (a.shape, a.sharding, b.sharding)
        split += a.sharding.spec != jax.sharding.PartitionSpec()
    assert split > 0
