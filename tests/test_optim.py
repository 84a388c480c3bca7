"""Tests for nfjax.optim: AGC + decay + SGD/LAMB against NumPy references, masks, schedules, EMA,
accumulation, data parallelism and SAM."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nfjax import optim

# ----------------------------------------------------------------------------- a tiny NF-like model


class Conv(nnx.Module):
    """A WS-conv-shaped layer (kernel HWIO, gain, bias); the standardization itself is not needed."""

    def __init__(self, cin, cout, size, *, groups=1, zero=False, rngs):
        shape = (size, size, cin // groups, cout)
        kernel = jnp.zeros(shape) if zero else jax.random.normal(rngs.params(), shape) / math.sqrt(cin)
        self.kernel, self.gain, self.bias = nnx.Param(kernel), nnx.Param(jnp.ones(cout)), nnx.Param(jnp.zeros(cout))
        self.groups = groups

    def __call__(self, x):
        w = self.kernel[...] * self.gain[...]
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims, feature_group_count=self.groups)
        return y + self.bias[...]


class SE(nnx.Module):
    def __init__(self, ch, rngs):
        self.fc0, self.fc1 = nnx.Linear(ch, ch // 2, rngs=rngs), nnx.Linear(ch // 2, ch, rngs=rngs)

    def __call__(self, x):
        return x * jax.nn.sigmoid(self.fc1(jax.nn.relu(self.fc0(x.mean((1, 2), keepdims=True)))))


class Block(nnx.Module):
    def __init__(self, ch, zero_init, rngs):
        self.conv1 = Conv(ch, ch, 3, groups=4, rngs=rngs)
        self.se = SE(ch, rngs)
        self.conv2 = Conv(ch, ch, 1, zero=zero_init, rngs=rngs)
        self.skip_gain = nnx.Param(jnp.zeros(()) if zero_init else jnp.ones(()))

    def __call__(self, x):
        return x + self.skip_gain[...] * self.conv2(self.se(jax.nn.gelu(self.conv1(x))))


class TinyNF(nnx.Module):
    def __init__(self, zero_init=True, seed=0):
        rngs = nnx.Rngs(seed)
        self.stem = nnx.Dict(conv0=Conv(3, 8, 3, rngs=rngs))
        self.blocks = nnx.List([Block(8, zero_init, rngs)])
        self.classifier = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        x = self.blocks[0](jax.nn.gelu(self.stem["conv0"](x)))
        return self.classifier(x.mean((1, 2)))


def init_value(path, shape, rng, zero_init):
    """NumPy init by path (eager or jitted NNX init costs ~10 s on a busy 2-core CPU)."""
    name = "/".join(map(str, path))
    if name.endswith("gain") and not (name.endswith("skip_gain") and zero_init):
        return np.ones(shape)
    if name.endswith(("bias", "skip_gain")) or (zero_init and name == "blocks/0/conv2/kernel"):
        return np.zeros(shape)
    return rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))  # fan-in scaled


@functools.cache
def split_model(zero_init=True):
    """(graphdef, params) of TinyNF: the structure from nnx.eval_shape, values from NumPy."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TinyNF(zero_init)), nnx.Param)
    rng = np.random.default_rng(0)
    init = lambda kp, x: jnp.asarray(init_value(optim.param_path(kp), x.shape, rng, zero_init), jnp.float32)
    return graphdef, jax.tree_util.tree_map_with_path(init, abstract)


def make_grad_fn(graphdef):
    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    return jax.value_and_grad(loss_fn, has_aux=True)


def make_batch(n, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"image": jax.random.normal(k1, (n, 6, 6, 3)), "label": jax.random.randint(k2, (n,), 0, 5)}


def flat(tree):
    """{'/'-joined path: numpy float64 array} for any params pytree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(map(str, optim.param_path(kp))): np.asarray(x, np.float64) for kp, x in leaves}


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


def config(**overrides):
    return {**optim.default_optim_config().to_dict(), **overrides}


# ----------------------------------------------------------------------------- NumPy references


def np_unitwise_norm(x):
    """Hand-written unit-wise norm: one norm per output unit (last axis), or the whole tensor."""
    if np.squeeze(x).ndim <= 1:
        return np.full(x.shape, np.sqrt(np.sum(x**2)))
    out = np.empty_like(x)
    for o in range(x.shape[-1]):
        out[..., o] = np.sqrt(np.sum(x[..., o] ** 2))
    return out


def np_agc(g, p, lam, eps):
    max_norm = lam * np.maximum(np_unitwise_norm(p), eps)
    g_norm = np_unitwise_norm(g)
    return np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)


def np_warmup_cosine(t, peak, warmup, total, floor=0.0):
    if t < warmup:
        return peak * t / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


NO_CLIP = {"classifier/kernel"}
DECAYED = {
    "stem/conv0/kernel",
    "blocks/0/conv1/kernel",
    "blocks/0/conv2/kernel",
    "blocks/0/se/fc0/kernel",
    "blocks/0/se/fc1/kernel",
    "classifier/kernel",
}


def np_sgd_agc(params, grads_seq, lrs, *, wd, lam, eps, m):
    """DeepMind's SGD_AGC: clip -> coupled decay -> momentum -> Nesterov -> p -= lr g."""
    p, buf = flat(params), {k: 0.0 for k in flat(params)}
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for k, g in flat(grads).items():
            g = g if k in NO_CLIP else np_agc(g, p[k], lam, eps)
            g = g + wd * p[k] if k in DECAYED else g
            buf[k] = m * buf[k] + g
            p[k] = p[k] - lr * (g + m * buf[k])
    return p


# ----------------------------------------------------------------------------- unit-wise norms, masks, AGC


def test_unitwise_norm_matches_hand_computed_values():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(3, 4))
    conv = rng.normal(size=(3, 3, 2, 5))
    grouped = rng.normal(size=(3, 3, 2, 8))  # 16 in channels, 8 groups: (H, W, I / groups, O)
    vector, scalar = rng.normal(size=(6,)), np.array(-2.5)
    expected = {
        "dense": np.broadcast_to(np.sqrt((dense**2).sum(0)), dense.shape),
        "conv": np.broadcast_to(np.sqrt((conv**2).sum((0, 1, 2))), conv.shape),
        "grouped": np.broadcast_to(np.sqrt((grouped**2).sum((0, 1, 2))), grouped.shape),
        "vector": np.full(vector.shape, np.linalg.norm(vector)),
        "scalar": np.array(2.5),
    }
    arrays = {"dense": dense, "conv": conv, "grouped": grouped, "vector": vector, "scalar": scalar}
    for name, x in arrays.items():
        got = optim.unitwise_norm(jnp.asarray(x, jnp.float32))
        chex.assert_shape(got, x.shape)
        np.testing.assert_allclose(got, expected[name], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(got, np_unitwise_norm(x), rtol=1e-6, err_msg=name)
    assert float(optim.unitwise_norm(jnp.float32(dense[0, 0]))) == pytest.approx(abs(dense[0, 0]))


def test_masks_by_path_on_nnx_state_and_plain_dict():
    _, params = split_model()
    for tree in (params, nnx.to_pure_dict(params)):
        clip = flat(optim.clip_mask()(tree))
        decay = flat(optim.decay_mask()(tree))
        assert {k for k, v in clip.items() if not v} == NO_CLIP
        assert {k for k, v in decay.items() if v} == DECAYED
        assert "blocks/0/skip_gain" in clip and "stem/conv0/gain" in decay
    custom = flat(optim.clip_mask(exclude=(r"(^|/)se/",))(params))
    assert {k for k, v in custom.items() if not v} == {
        "blocks/0/se/fc0/kernel",
        "blocks/0/se/fc0/bias",
        "blocks/0/se/fc1/kernel",
        "blocks/0/se/fc1/bias",
    }
    assert optim.param_path(jax.tree_util.tree_leaves_with_path(params)[0][0])[-1] != "value"
    # The rank rule holds whatever the name: a vector is never decayed unless decay_min_ndim allows it.
    extra = {"stem": {"alpha": jnp.ones(4), "proj": jnp.ones((2, 4))}, "blocks": [{"w": jnp.ones((3, 3))}]}
    assert flat(optim.decay_mask()(extra)) == {"stem/alpha": 0, "stem/proj": 1, "blocks/0/w": 1}
    assert all(flat(optim.decay_mask(min_ndim=0)(extra)).values())


@pytest.mark.parametrize("name", ["nfnet_f0", "resnet_small"])
def test_default_masks_on_the_model_zoo(name):
    """Only the classifier kernel escapes AGC; only conv/SE/classifier kernels are decayed."""
    models = pytest.importorskip("nfjax.models")
    if name not in models.list_models():
        pytest.skip(f"{name} not in the model zoo")
    model = nnx.eval_shape(lambda: models.create_model(name, num_classes=10, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    clip, decay = flat(optim.clip_mask()(params)), flat(optim.decay_mask()(params))
    assert [k for k, v in clip.items() if not v] == ["classifier/kernel"]
    assert all(k.endswith("kernel") for k, v in decay.items() if v)
    assert all(v for k, v in decay.items() if k.endswith("kernel"))


def synthetic_grads(params, step):
    """Per-leaf gradient scales chosen to hit every AGC case (see test docstrings)."""
    scales = {
        "classifier/kernel": 1e3,
        "stem/conv0/kernel": 10.0,
        "stem/conv0/gain": 10.0,
        "blocks/0/se/fc0/kernel": 10.0,
        "blocks/0/conv1/kernel": 1e-6,
        "blocks/0/skip_gain": 1.0,
        "blocks/0/conv2/kernel": 1.0,
    }
    rng = np.random.default_rng(100 + step)

    def grad(kp, p):
        name = "/".join(map(str, optim.param_path(kp)))
        return jnp.asarray(scales.get(name, 1e-9) * rng.normal(size=p.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(grad, params)


def test_agc_mask_groups():
    """Head unclipped; conv, SE, gain clipped to lambda*|p|; small grads bit-identical; eps floor."""
    _, params = split_model(zero_init=True)
    grads = synthetic_grads(params, 0)
    clip = optim.adaptive_clip(0.01, 1e-3, (optim.CLASSIFIER_KERNEL,))
    clipped, _ = jax.jit(clip.update)(grads, clip.init(params), params)
    g, c, p = flat(grads), flat(clipped), flat(params)
    assert np.array_equal(c["classifier/kernel"], g["classifier/kernel"])
    for name in ("stem/conv0/kernel", "stem/conv0/gain", "blocks/0/se/fc0/kernel"):
        assert not np.allclose(c[name], g[name]), name
        np.testing.assert_allclose(np_unitwise_norm(c[name]), 0.01 * np_unitwise_norm(p[name]), rtol=1e-5)
    for name in ("blocks/0/conv1/kernel", "stem/conv0/bias", "blocks/0/se/fc1/kernel"):
        assert np.array_equal(c[name], g[name]), name  # below the threshold: untouched
    for name in ("blocks/0/skip_gain", "blocks/0/conv2/kernel"):  # zero-init: clipped to lambda * eps
        np.testing.assert_allclose(np_unitwise_norm(c[name]), 0.01 * 1e-3, rtol=1e-5)


def test_agc_reports_the_fraction_it_clipped_and_equals_optax():
    """The clip fraction in the AGC state is the share of clipped parameters (NumPy count over the clipped
    groups, head excluded); the clipped gradients equal optax.adaptive_grad_clip under optax.masked."""
    _, params = split_model(zero_init=True)
    grads = synthetic_grads(params, 0)
    exclude = (optim.CLASSIFIER_KERNEL,)
    clip = optim.adaptive_clip(0.01, 1e-3, exclude)
    clipped, state = jax.jit(clip.update)(grads, clip.init(params), params)
    g, p, mask = flat(grads), flat(params), flat(optim.clip_mask(exclude)(params))
    hits = [np.sum(np_unitwise_norm(g[k]) >= 0.01 * np.maximum(np_unitwise_norm(p[k]), 1e-3)) for k in g if mask[k]]
    expected = sum(hits) / sum(g[k].size for k in g if mask[k])
    assert 0 < expected < 1
    assert float(optim.clip_fraction(state)) == pytest.approx(expected, rel=1e-6)
    reference = optax.masked(optax.adaptive_grad_clip(0.01, eps=1e-3), optim.clip_mask(exclude))
    ref, _ = jax.jit(reference.update)(grads, reference.init(params), params)
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(ref), strict=True):
        assert np.array_equal(a, b)
    chain = optim.build_optimizer({"clipping": "none"}, steps_per_epoch=10, total_steps=100, global_batch=256).tx
    assert float(optim.clip_fraction(chain.init(params))) == 0.0  # no AGC in the chain: reported as 0


def test_sgd_agc_three_steps_match_numpy_reference():
    _, params = split_model(zero_init=True)
    cfg = config(weight_decay=0.05, warmup_steps=1)
    opt = optim.build_optimizer(cfg, steps_per_epoch=2, total_steps=6, global_batch=512)
    tx, schedule = opt.tx, opt.schedule
    state, new = tx.init(params), params
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    grads_seq = [synthetic_grads(params, t) for t in range(3)]
    for grads in grads_seq:  # fixed gradients: the test isolates the optimizer
        updates, state = step(grads, state, new)
        new = optax.apply_updates(new, updates)
    lrs = [np_warmup_cosine(t, 0.2, 1, 6) for t in range(3)]
    assert lrs[0] == 0 and [float(schedule(t)) for t in range(3)] == pytest.approx(lrs, rel=1e-6)
    ref = np_sgd_agc(params, grads_seq, lrs, wd=0.05, lam=0.01, eps=1e-3, m=0.9)
    got = flat(new)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for k in ("blocks/0/skip_gain", "blocks/0/conv2/kernel"):  # zero-init params moved
        assert np.all(got[k] != 0), k
    assert np.abs(got["classifier/kernel"] - flat(params)["classifier/kernel"]).max() > 10  # unclipped


# ----------------------------------------------------------------------------- LAMB / RSB A2, schedules


def test_rsb_a2_lamb_hyper_parameters_from_config_dict():
    rsb_a2 = {
        "name": "lamb",
        "base_lr": 5e-3 * 256 / 2048,
        "scale_lr_by_batch": True,
        "weight_decay": 0.02,
        "warmup_epochs": 5.0,
        "schedule": "warmup_cosine",
        "end_lr_factor": 0.0,
        "clipping": "global_norm",
        "max_grad_norm": 1.0,
        "eps": 1e-6,
        "ema_decay": 0.0,
    }
    spe, epochs = 625, 300  # ImageNet-1k at batch 2048
    cfg = optim.validate_optim_config(rsb_a2, steps_per_epoch=spe, total_steps=epochs * spe, global_batch=2048)
    assert cfg.decay_mode == "auto" and cfg.b1 == 0.9 and cfg.b2 == 0.999
    sched = optim.build_optimizer(rsb_a2, steps_per_epoch=spe, total_steps=epochs * spe, global_batch=2048).schedule
    total, warmup = epochs * spe, 5 * spe
    assert float(sched(0)) == 0.0
    assert float(sched(warmup)) == pytest.approx(5e-3, rel=1e-6)
    assert float(sched(1000)) == pytest.approx(5e-3 * 1000 / warmup, rel=1e-5)
    assert float(sched(total - 1)) == pytest.approx(
        np_warmup_cosine(total - 1, 5e-3, warmup, total), rel=1e-3, abs=1e-12
    )
    assert float(sched(total)) == pytest.approx(0.0, abs=1e-10)
    half = optim.build_optimizer(rsb_a2, steps_per_epoch=spe, total_steps=total, global_batch=1024).schedule
    assert float(half(warmup)) == pytest.approx(2.5e-3, rel=1e-6)


def test_lamb_step_matches_reference():
    """Global-norm clip -> Adam -> decoupled decay + trust ratio on the decay group only -> -lr u."""
    params = {
        "fc": {
            "kernel": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32),
            "bias": jnp.full((3,), 0.5, jnp.float32),
        }
    }
    cfg = config(
        name="lamb",
        base_lr=0.01,
        scale_lr_by_batch=False,
        weight_decay=0.1,
        schedule="constant",
        warmup_steps=0,
        warmup_epochs=0.0,
        clipping="global_norm",
        max_grad_norm=1.0,
        eps=1e-6,
    )
    tx = optim.build_optimizer(cfg, steps_per_epoch=1, total_steps=10, global_batch=256).tx
    state, new, p = tx.init(params), params, flat(params)
    mu, nu = {k: 0.0 for k in p}, {k: 0.0 for k in p}
    for t in range(1, 3):
        grads = jax.tree.map(lambda x, t=t: jnp.sin(t * 3 + x * 7) * 2, new)
        g = flat(grads)
        scale = min(1.0, 1.0 / math.sqrt(sum((v**2).sum() for v in g.values())))
        for k in p:
            gk = g[k] * scale
            mu[k], nu[k] = 0.9 * mu[k] + 0.1 * gk, 0.999 * nu[k] + 0.001 * gk**2
            u = (mu[k] / (1 - 0.9**t)) / (np.sqrt(nu[k] / (1 - 0.999**t)) + 1e-6)
            if k == "fc/kernel":
                u = u + 0.1 * p[k]
                u = u * np.linalg.norm(p[k]) / np.linalg.norm(u)
            p[k] = p[k] - 0.01 * u
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    for k, v in flat(new).items():
        np.testing.assert_allclose(v, p[k], rtol=1e-5, atol=1e-7, err_msg=k)


# timm's Lamb (timm/optim/lamb.py, the same in 0.5.4, the RSB era, and 1.0) as train.py builds it for RSB: two
# parameter groups, weight_decay for the matrices and 0 for biases and 1-D params (no trust ratio there), the
# global gradient norm clipped to max_grad_norm=1.0 inside the optimizer, eps 1e-6, decoupled_decay=False.
LAMB_TREE_SHAPES = {
    "conv/kernel": (3, 3, 2, 4),
    "bn/scale": (4,),
    "bn/bias": (4,),
    "fc/kernel": (4, 3),
    "fc/bias": (3,),
    "zero/kernel": (2, 3),  # a zero-initialized matrix: |p| = 0, trust ratio 1
}


def lamb_tree(seed=0):
    rng = np.random.default_rng(seed)
    flat_values = {
        k: np.zeros(s) if k.startswith("zero") else rng.normal(size=s) * (0.5 if k.endswith("bias") else 1.0)
        for k, s in LAMB_TREE_SHAPES.items()
    }
    tree = {}
    for k, v in flat_values.items():
        outer, inner = k.split("/")
        tree.setdefault(outer, {})[inner] = jnp.asarray(v, jnp.float32)
    return tree


def lamb_grads(step, params):
    """Step 1 and 3: global norm far above 1 (clipped); step 2: below 1 (left alone)."""
    scale = {1: 5.0, 2: 0.05, 3: 3.0}[step]
    rng = np.random.default_rng(10 + step)
    return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), params)


def np_timm_lamb(params, grads_seq, *, lr, wd, b1=0.9, b2=0.999, eps=1e-6, max_grad_norm=1.0):
    """timm's Lamb.step, written out for NumPy: clip the raw gradient by the global norm, Adam moments with bias
    correction, + wd * p in the decayed group, trust ratio |p| / |u| there (1 when either norm is 0), p -= lr u."""
    p = flat(params)
    m, v = {k: np.zeros_like(x) for k, x in p.items()}, {k: np.zeros_like(x) for k, x in p.items()}
    decayed = {k for k, x in p.items() if x.ndim > 1 and not k.endswith("bias")}  # timm's param_groups_weight_decay
    for step, grads in enumerate(grads_seq, start=1):
        g = flat(grads)
        global_norm = np.sqrt(sum((x**2).sum() for x in g.values()))
        clip = max(global_norm / max_grad_norm, 1.0)
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        for k in p:
            gk = g[k] / clip
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            update = (m[k] / bc1) / (np.sqrt(v[k]) / np.sqrt(bc2) + eps)
            if k in decayed:
                update = update + wd * p[k]
                w_norm, u_norm = np.linalg.norm(p[k]), np.linalg.norm(update)
                update = update * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            p[k] = p[k] - lr * update
    return p


def nfjax_lamb_steps(params, grads_seq, *, lr, wd):
    cfg = config(
        name="lamb",
        base_lr=lr,
        scale_lr_by_batch=False,
        weight_decay=wd,
        eps=1e-6,
        clipping="global_norm",
        max_grad_norm=1.0,
        schedule="constant",
        warmup_epochs=0.0,
    )
    opt = optim.build_optimizer(cfg, steps_per_epoch=1, total_steps=10, global_batch=256)
    assert opt.config.decay_mode == "auto"  # decoupled for LAMB: wd * p joins the Adam update, as timm's default
    state, new = opt.tx.init(params), params
    update = jax.jit(opt.tx.update)
    for grads in grads_seq:
        updates, state = update(grads, state, new)
        new = optax.apply_updates(new, updates)
    return new


def test_lamb_with_global_norm_clipping_matches_timms_lamb_in_numpy():
    """optim.clipping='global_norm', max_grad_norm=1.0 in front of the LAMB chain is timm's in-optimizer clip:
    g * 1 / max(|g|_global, 1) on the raw gradient (all parameters, both groups), before the moments and the
    decay. Three steps: clipped, not clipped, clipped; bias correction; trust ratio only where decayed."""
    params = lamb_tree()
    grads_seq = [lamb_grads(t, params) for t in (1, 2, 3)]
    norms = [float(optax.tree.norm(g)) for g in grads_seq]
    assert norms[0] > 1 > norms[1] and norms[2] > 1
    got, want = (
        flat(nfjax_lamb_steps(params, grads_seq, lr=5e-3, wd=0.02)),
        np_timm_lamb(params, grads_seq, lr=5e-3, wd=0.02),
    )
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert np.all(got["zero/kernel"] != 0)  # the zero matrix moved: trust ratio 1, not 0
    unclipped = np_timm_lamb(params, grads_seq, lr=5e-3, wd=0.02, max_grad_norm=1e9)
    assert not np.allclose(unclipped["fc/bias"], want["fc/bias"], rtol=1e-4)  # the clip matters here


def test_lamb_matches_timm_optim_lamb():
    pytest.importorskip("torch")
    try:
        from nfjax.benchmark_train import import_timm

        import_timm()
    except ImportError:
        pytest.skip("timm is not installed")
    import torch
    from timm.optim import Lamb

    params = lamb_tree()
    grads_seq = [lamb_grads(t, params) for t in (1, 2, 3)]
    torch_params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for k, v in flat(params).items()}
    decay = [p for k, p in torch_params.items() if p.ndim > 1 and not k.endswith("bias")]
    no_decay = [p for k, p in torch_params.items() if not (p.ndim > 1 and not k.endswith("bias"))]
    opt = Lamb([{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}], lr=5e-3)
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["max_grad_norm"] == 1.0  # timm's defaults, used by RSB
    for grads in grads_seq:
        for k, g in flat(grads).items():
            torch_params[k].grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    got = flat(nfjax_lamb_steps(params, grads_seq, lr=5e-3, wd=0.02))
    for k, p in torch_params.items():
        np.testing.assert_allclose(got[k], p.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=k)


def sched(**overrides):
    cfg = optim.validate_optim_config(config(**overrides), steps_per_epoch=10, total_steps=100, global_batch=256)
    return optim.build_schedule(cfg, steps_per_epoch=10, total_steps=100, global_batch=256)


def test_schedules_match_reference_formulas():
    cos = sched(base_lr=0.4, scale_lr_by_batch=False, warmup_epochs=2.0, end_lr_factor=0.1)
    for t in (0, 5, 20, 21, 60, 99, 100):
        assert float(cos(t)) == pytest.approx(np_warmup_cosine(t, 0.4, 20, 100, 0.04), rel=1e-5), t
    no_warmup = sched(base_lr=0.4, scale_lr_by_batch=False, warmup_epochs=0.0)
    assert float(no_warmup(0)) == pytest.approx(0.4) and float(no_warmup(100)) == pytest.approx(0.0)
    step = sched(schedule="step", warmup_steps=5, step_boundaries_epochs=(3.0, 6.0), step_decay_factor=0.5)
    got = [float(step(t)) for t in (0, 1, 5, 29, 30, 59, 60, 99)]
    assert got == pytest.approx([0.0, 0.02, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rel=1e-6)
    const = sched(schedule="constant", warmup_steps=4, base_lr=0.2)  # x 256/256
    assert [float(const(t)) for t in (0, 2, 4, 99)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert float(sched(schedule="constant", warmup_epochs=0.0)(0)) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- EMA


def test_ema_matches_closed_form():
    assert float(optim.ema_decay_at(0, 0.99999)) == pytest.approx(0.1)
    assert float(optim.ema_decay_at(10**9, 0.99999)) == pytest.approx(0.99999)
    params = {"w": jnp.full((3,), 2.0, jnp.bfloat16)}
    ema0 = optim.init_ema({"w": jnp.full((3,), -1.0, jnp.bfloat16)})
    chex.assert_trees_all_equal_dtypes(ema0, {"w": jnp.zeros(3, jnp.float32)})
    n, ema = 7, ema0
    for t in range(n):
        ema = optim.update_ema(ema, params, t, 0.99999)
    prod = math.factorial(9) * math.factorial(n) / math.factorial(n + 9)  # prod_{t<n} (1+t)/(10+t)
    np.testing.assert_allclose(ema["w"], prod * -1.0 + (1 - prod) * 2.0, rtol=1e-6)
    # Varying params and a cap that binds: ema_n = D ema_0 + sum_t (1 - d_t) prod_{s>t} d_s p_t.
    d = [min(0.5, (1 + t) / (10 + t)) for t in range(n)]
    ema = optim.init_ema({"w": jnp.zeros(())})
    for t in range(n):
        ema = optim.update_ema(ema, {"w": jnp.float32(t + 1)}, t, 0.5)
    closed = sum((1 - d[t]) * math.prod(d[t + 1 :]) * (t + 1) for t in range(n))
    assert float(ema["w"]) == pytest.approx(closed, rel=1e-6)


# ----------------------------------------------------------------------------- accumulation, 8 devices


def test_accumulated_microbatches_equal_full_batch():
    graphdef, params = split_model(zero_init=False)
    grad_fn, batch = make_grad_fn(graphdef), make_batch(16)
    (loss, aux), full = jax.jit(grad_fn)(params, batch)
    (acc_loss, acc_aux), acc = jax.jit(lambda p, b: optim.accumulated_grads(grad_fn, p, b, 4))(params, batch)
    assert float(acc_loss) == pytest.approx(float(loss), rel=1e-5)
    assert float(acc_aux["accuracy"]) == pytest.approx(float(aux["accuracy"]))
    assert_trees_close(acc, full)
    tx = optim.build_optimizer(config(warmup_steps=1), steps_per_epoch=5, total_steps=10, global_batch=16).tx
    update = jax.jit(tx.update)
    state = update(full, tx.init(params), params)[1]  # step 0 has lr 0; compare the second update
    assert_trees_close(update(acc, state, params)[0], update(full, state, params)[0])
    with pytest.raises(ValueError, match="accum_steps=3"):
        optim.accumulated_grads(grad_fn, params, batch, 3)


def test_rng_is_folded_per_micro_batch_and_per_device():
    def grad_fn(params, batch, rng):  # value = one uniform draw per call
        return jax.random.uniform(rng), jax.tree.map(jnp.zeros_like, params)

    params, batch, rng = {"w": jnp.ones(2)}, {"x": jnp.zeros((16, 1))}, jax.random.key(3)
    value, _ = jax.jit(lambda p, b, r: optim.accumulated_grads(grad_fn, p, b, 4, rng=r))(params, batch, rng)
    draws = [jax.random.uniform(jax.random.fold_in(rng, j)) for j in range(4)]
    assert float(value) == pytest.approx(float(np.mean(draws)), rel=1e-6)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    run = lambda p, b, r: optim.sam_grads(grad_fn, p, b, rho=0.1, fraction=0.5, mesh=mesh, rng=r)
    value, _ = jax.jit(run)(params, batch, rng)
    draws = [jax.random.uniform(jax.random.fold_in(rng, d)) for d in range(8)]
    assert float(value) == pytest.approx(float(np.mean(draws)), rel=1e-6)


def make_train_step(graphdef, tx, accum_steps):
    grad_fn = make_grad_fn(graphdef)

    def train_step(params, opt_state, batch):
        (loss, _), grads = optim.accumulated_grads(grad_fn, params, batch, accum_steps)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step)


def run_steps(step, params, state, batches):
    for batch in batches:
        params, state, loss = step(params, state, batch)
    return params, loss


def test_data_parallel_step_on_8_devices_equals_1_device():
    assert jax.device_count() == 8
    graphdef, params = split_model(zero_init=False)
    tx = optim.build_optimizer(
        config(warmup_steps=1, base_lr=1.0), steps_per_epoch=3, total_steps=9, global_batch=32
    ).tx
    step = make_train_step(graphdef, tx, accum_steps=2)
    batches = [make_batch(32, seed) for seed in range(2)]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ref, ref_loss = run_steps(
        step, *jax.device_put((params, tx.init(params)), one), [jax.device_put(b, one) for b in batches]
    )
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    got, loss = run_steps(
        step, *jax.device_put((params, tx.init(params)), replicated), [jax.device_put(b, sharded) for b in batches]
    )
    assert len(jax.tree.leaves(got)[0].sharding.device_set) == 8
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert_trees_close(got, ref, rtol=1e-4, atol=1e-6)
    assert not np.allclose(flat(got)["classifier/kernel"], flat(params)["classifier/kernel"])


# ----------------------------------------------------------------------------- SAM


def linear_grad_fn(params, batch):
    """Softmax regression on a plain dict of params: nonlinear enough for SAM to matter."""

    def loss_fn(p):
        logits = batch["x"] @ p["classifier"]["kernel"] + p["classifier"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return jax.value_and_grad(loss_fn)(params)


def linear_problem(n, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"classifier": {"kernel": jax.random.normal(k[0], (5, 3)), "bias": jax.random.normal(k[1], (3,))}}
    return params, {"x": jax.random.normal(k[2], (n, 5)) * 3, "y": jax.random.randint(k[3], (n,), 0, 3)}


@jax.jit
def ref_grads(params, batch):
    return linear_grad_fn(params, batch)[1]


def ref_perturbation(params, batch, rho, n_ascent):
    g = ref_grads(params, jax.tree.map(lambda x: x[:n_ascent], batch))
    return jax.tree.map(lambda x: rho * x / optax.tree.norm(g), g)


def sam(params, batch, mesh, rho, fraction=0.5, fn=optim.sam_grads):
    run = lambda p, b: fn(linear_grad_fn, p, b, rho=rho, fraction=fraction, mesh=mesh)
    return jax.jit(run)(params, batch)


def test_sam_with_rho_zero_is_the_plain_gradient():
    params, batch = linear_problem(16)
    loss, plain = linear_grad_fn(params, batch)
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.array(devices), ("data",))
        sam_loss, grads = sam(params, batch, mesh, rho=0.0)
        assert float(sam_loss) == pytest.approx(float(loss), rel=1e-6)
        assert_trees_close(grads, plain, rtol=1e-5, atol=1e-7)


def test_sam_on_one_device_matches_reference():
    params, batch = linear_problem(10)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    e = ref_perturbation(params, batch, rho=0.3, n_ascent=2)  # fraction 0.2 of 10 examples
    expected = ref_grads(jax.tree.map(jnp.add, params, e), batch)
    _, grads = sam(params, batch, mesh, rho=0.3, fraction=0.2)
    assert_trees_close(grads, expected, rtol=1e-5, atol=1e-7)
    plain = ref_grads(params, batch)
    assert not np.allclose(flat(grads)["classifier/kernel"], flat(plain)["classifier/kernel"], atol=1e-3)


def test_sam_ascent_is_per_device_on_8_devices():
    params, batch = linear_problem(32, seed=1)  # 4 different examples per device
    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = [jax.tree.map(lambda x, d=d: x[4 * d : 4 * d + 4], batch) for d in range(8)]
    e_ref = [ref_perturbation(params, b, rho=0.5, n_ascent=2) for b in local]
    e_got = sam(params, batch, mesh, rho=0.5, fn=optim.sam_perturbations)
    chex.assert_shape(e_got["classifier"]["kernel"], (8, 5, 3))
    for d in range(8):
        assert_trees_close(jax.tree.map(lambda x, d=d: x[d], e_got), e_ref[d], rtol=1e-5, atol=1e-7)
    kernels = np.asarray(e_got["classifier"]["kernel"])
    assert all(not np.allclose(kernels[0], kernels[d]) for d in range(1, 8))
    descent = [ref_grads(jax.tree.map(jnp.add, params, e), b) for e, b in zip(e_ref, local, strict=True)]
    _, grads = sam(params, batch, mesh, rho=0.5)
    assert_trees_close(grads, jax.tree.map(lambda *g: sum(g) / 8, *descent), rtol=1e-5, atol=1e-7)
    synced_e = ref_perturbation(params, batch, rho=0.5, n_ascent=32)  # what a synchronized ascent would do
    synced = ref_grads(jax.tree.map(jnp.add, params, synced_e), batch)
    assert not np.allclose(flat(grads)["classifier/kernel"], flat(synced)["classifier/kernel"], atol=1e-4)


# ----------------------------------------------------------------------------- validation

STEPS = {"steps_per_epoch": 10, "total_steps": 100, "global_batch": 256}
BAD_CONFIGS = [
    ({"name": "adam"}, ["optim.name", "'sgd'", "'lamb'", "'adamw'"]),
    ({"schedule": "linear"}, ["optim.schedule", "'warmup_cosine'", "'step'", "'constant'"]),
    ({"clipping": "agc2"}, ["optim.clipping", "'agc'", "'global_norm'", "'none'"]),
    ({"decay_mode": "l2"}, ["optim.decay_mode", "'coupled'", "'decoupled'", "'auto'"]),
    ({"base_lr": -0.1}, ["optim.base_lr", "> 0"]),
    ({"base_lr": "fast"}, ["optim.base_lr", "float"]),
    ({"agc_lambda": 0.0}, ["optim.agc_lambda", "> 0"]),
    ({"agc_eps": 0.0}, ["optim.agc_eps", "> 0"]),
    ({"momentum": 1.0}, ["optim.momentum", "[0, 1)"]),
    ({"weight_decay": -1e-4}, ["optim.weight_decay", ">= 0"]),
    ({"end_lr_factor": 2.0}, ["optim.end_lr_factor", "[0, 1]"]),
    ({"ema_decay": 1.0}, ["optim.ema_decay", "[0, 1)"]),
    ({"max_grad_norm": 0.0}, ["optim.max_grad_norm", "> 0"]),
    ({"warmup_epochs": 10.0}, ["optim.warmup_epochs", "shorter than training"]),
    ({"warmup_steps": 500}, ["optim.warmup_steps", "shorter than training"]),
    ({"accum_steps": 0}, ["optim.accum_steps", ">= 1"]),
    ({"accum_steps": 3}, ["optim.accum_steps", "must divide the global batch 256"]),
    ({"sam_rho": -0.05}, ["optim.sam_rho", ">= 0"]),
    ({"sam_fraction": 0.0}, ["optim.sam_fraction", "(0, 1]"]),
    ({"sam_fraction": 1.5}, ["optim.sam_fraction", "(0, 1]"]),
    ({"schedule": "step", "step_boundaries_epochs": (6.0, 3.0)}, ["optim.step_boundaries_epochs", "increasing"]),
    ({"schedule": "step", "step_boundaries_epochs": (3.0, 12.0)}, ["optim.step_boundaries_epochs", "10 epochs"]),
    ({"clip_exclude": ("classifier(",)}, ["optim.clip_exclude", "regular expression"]),
    ({"weigth_decay": 1e-4}, ["unknown optim field", "'weigth_decay'", "'weight_decay'"]),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_CONFIGS, ids=[str(o) for o, _ in BAD_CONFIGS])
def test_invalid_config_raises_clear_value_error(overrides, expected):
    with pytest.raises(ValueError) as err:
        optim.build_optimizer(overrides, **STEPS)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_invalid_step_counts_raise():
    with pytest.raises(ValueError, match="total_steps=0"):
        optim.build_optimizer({}, steps_per_epoch=10, total_steps=0, global_batch=256)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        optim.build_optimizer({}, steps_per_epoch=0, total_steps=10, global_batch=256)


def test_default_config_is_the_deepmind_recipe():
    c = optim.default_optim_config()
    assert (c.name, c.base_lr, c.momentum, c.nesterov, c.weight_decay) == ("sgd", 0.1, 0.9, True, 2e-5)
    assert (c.clipping, c.agc_lambda, c.agc_eps, c.ema_decay, c.sam_fraction) == ("agc", 0.01, 1e-3, 0.99999, 0.2)
    sched4096 = optim.build_optimizer(c, steps_per_epoch=312, total_steps=360 * 312, global_batch=4096).schedule
    assert float(sched4096(5 * 312)) == pytest.approx(1.6, rel=1e-6)
