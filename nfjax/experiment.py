"""One description of a run, built once from a config; training, evaluation, prediction and the benchmarks
consume it and none re-derives it.

    exp = build_experiment(cfg)              # dataset info, mesh, model, schedule lengths; validates cfg.train
    exp.optimizer                            # built on first use only (training, benchmarks)
    state = exp.create_state()               # random init, or model.init_from's weights; or exp.restore_state(ckpt)
    step_fn, eval_fn = exp.train_step(), exp.eval_step

    run = nfjax.runs.load_run(workdir)       # evaluation / prediction: config + weights, no optimizer
    run.experiment.evaluate(run.weights)     # top-1/top-5/loss, per-class P/R/F1 of params (and EMA)

The train state is a dict of plain pytrees (see :mod:`nfjax.steps`); ``weights`` is its params / batch_stats /
ema part, which is all that evaluation and prediction restore (:meth:`nfjax.checkpoint.Checkpointer.restore_weights`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nfjax import data as data_lib
from nfjax import finetune, optim, parallel
from nfjax.checkpoint import Checkpointer, abstract_like, check_compatible
from nfjax.class_weights import ClassWeights, make_class_weights, parse_class_weights
from nfjax.eval_metrics import COUNT_KEYS, add_roc_auc, check_roc_auc_size, classification_report, roc_auc_report
from nfjax.losses import BCE_REDUCTIONS, LOSSES, make_loss_fn
from nfjax.models import create_model, lowering, model_metadata
from nfjax.steps import (
    make_eval_step,
    make_train_step,
    prestandardized_fn,
    standardize_weights,
    standardizes_weights,
)

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
NONFINITE_POLICIES = ("stop", "skip")
STEP_COUNTINGS = ("epochs", "examples")


class RunError(RuntimeError):
    """A run stopped for a reason the user must act on (non-finite loss, wrong example count, ...)."""


def compute_dtype(name: str):
    """'auto': bfloat16 on GPU/TPU, float32 on CPU (bf16 is slower than f32 on CPU). None means float32."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"train.compute_dtype must be one of {', '.join(map(repr, COMPUTE_DTYPES))}, got {name!r}")
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else None
    return jnp.bfloat16 if name == "bfloat16" else None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model of a run: what builds it and what identifies it in a checkpoint."""

    name: str
    kwargs: dict[str, Any]  # the config's constructor overrides (JSON values)
    num_classes: int
    in_channels: int
    dtype: Any = None  # compute dtype; None: float32

    @property
    def normalizer_free(self) -> bool:
        return model_metadata(self.name)["normalizer_free"]

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        extra = {"dtype": self.dtype} if self.dtype is not None else {}
        return create_model(self.name, self.num_classes, self.in_channels, rngs=rngs, **self.kwargs, **extra)

    def identity(self) -> dict[str, Any]:
        """Stored in every checkpoint and compared on resume and restore."""
        return dict(
            model=self.name, model_kwargs=self.kwargs, num_classes=self.num_classes, in_channels=self.in_channels
        )


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Schedule lengths in optimizer steps. ``steps_per_epoch`` is what the input pipeline yields per epoch (whole
    batches); ``schedule_steps_per_epoch`` is an epoch as the lr schedule counts it: the same int with
    ``train.step_counting='epochs'``, the exact ``N / B`` (a float) with ``'examples'``."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int
    schedule_steps_per_epoch: int | float


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """The train state before it exists: ``init(key)`` builds it; ``abstract`` (ShapeDtypeStructs) and
    ``shardings`` are the restore target."""

    init: Callable[[jax.Array], dict]
    abstract: dict
    shardings: dict


def _lengths(train_cfg: ml_collections.ConfigDict, info: data_lib.DatasetInfo) -> Lengths:
    """'epochs': ``round(epochs * floor(N / B))`` steps (whole batches per epoch, as timm's drop_last loader);
    'examples': ``floor(N * epochs / B)`` steps, the schedule's epoch ``N / B`` steps (DeepMind's NFNet experiment:
    ``training_steps = images_per_epoch * num_epochs // batch``). ``train.total_steps > 0`` overrides both."""
    examples, batch = info.num_train_examples, train_cfg.global_batch
    steps_per_epoch = examples // batch
    if steps_per_epoch == 0:
        raise ValueError(f"train.global_batch={batch} exceeds the {examples} training examples; use a smaller batch")
    epochs, schedule_spe = train_cfg.epochs, steps_per_epoch
    if train_cfg.get("step_counting", "epochs") == "examples":  # configs saved before the field: 'epochs'
        schedule_spe = examples / batch
        exact = float(epochs).is_integer()  # integer arithmetic where it can be, as DeepMind's
        steps = examples * int(epochs) // batch if exact else math.floor(examples * epochs / batch)
    else:
        steps = round(epochs * steps_per_epoch)
    total = train_cfg.total_steps or max(1, steps)
    every = train_cfg.eval_every_steps or max(1, round(train_cfg.eval_every_epochs * steps_per_epoch))
    return Lengths(steps_per_epoch, total, every, schedule_spe)


def _check_train(train_cfg: ml_collections.ConfigDict) -> None:
    if train_cfg.loss not in LOSSES:
        raise ValueError(f"train.loss={train_cfg.loss!r} is invalid; valid: {', '.join(LOSSES)}")
    if train_cfg.bce_reduction not in BCE_REDUCTIONS:
        raise ValueError(
            f"train.bce_reduction={train_cfg.bce_reduction!r} is invalid; valid: {', '.join(BCE_REDUCTIONS)} "
            "('mean': the BCE averaged over classes, timm's default and the RSB runs'; 'sum': summed over classes)"
        )
    if train_cfg.step_counting not in STEP_COUNTINGS:
        raise ValueError(
            f"train.step_counting={train_cfg.step_counting!r} is invalid; valid: {', '.join(STEP_COUNTINGS)} "
            "('epochs': floor(examples / batch) steps per epoch, as timm; 'examples': examples x epochs // batch "
            "steps in all with fractional epochs in the lr schedule, as DeepMind's NFNet experiment)"
        )
    if train_cfg.nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train.nonfinite={train_cfg.nonfinite!r} is invalid; valid: {', '.join(NONFINITE_POLICIES)}")
    weights = parse_class_weights(train_cfg.get("class_weights", "none"))  # absent from configs saved by older runs
    if weights.mode != "none" and train_cfg.loss == "sigmoid_bce":
        raise ValueError(
            f"train.class_weights={train_cfg.class_weights!r} applies to loss 'softmax_xent' or 'focal', not "
            "'sigmoid_bce' (its one-vs-all terms have no single class to weigh); set train.class_weights='none' "
            "or change train.loss"
        )
    fields = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "max_consecutive_nonfinite", "fsdp")
    for field in fields:
        if train_cfg[field] < 1:
            raise ValueError(f"train.{field}={train_cfg[field]} is invalid: must be >= 1")


def _check_plateau_evaluations(opt: optim.Optimizer, lengths: Lengths, train_cfg: ml_collections.ConfigDict) -> None:
    """Reduce-on-plateau acts on evaluations during training: the first sets the best value, ``patience`` more
    without improvement cut the scale, all before the last step (whose evaluation can no longer change the lr)."""
    if opt.plateau is None:
        return
    patience, every, total = opt.plateau.patience, lengths.eval_every, lengths.total_steps
    evaluations = (total - 1) // every  # those before the final one, after which the lr no longer matters
    if evaluations < patience + 1:
        field = "eval_every_steps" if train_cfg.eval_every_steps else "eval_every_epochs"
        raise ValueError(
            f"optim.plateau_patience={patience} needs evaluations during training, but train.{field}="
            f"{train_cfg[field]} evaluates every {every} steps: {evaluations} times before the end of the "
            f"{total}-step run, so the lr scale could never be cut. Evaluate more often (at least "
            f"{patience + 1} times before the end) or set optim.plateau_patience=0"
        )


class Experiment:
    """A run assembled from its config: data info, mesh, model, schedule lengths, and, built on first use,
    the optimizer, the state spec and the jitted steps."""

    def __init__(self, cfg: ml_collections.ConfigDict, info: data_lib.DatasetInfo, mesh: jax.sharding.Mesh):
        self.cfg, self.info, self.mesh = cfg, info, mesh
        kwargs = json.loads(json.dumps(cfg.model.kwargs.to_dict()))
        dtype = compute_dtype(cfg.train.compute_dtype)
        self.model = ModelSpec(cfg.model.name, kwargs, info.num_classes, info.image_shape[-1], dtype)
        self.lengths = _lengths(cfg.train, info)
        self.init_settings = finetune.init_settings(cfg.model)  # None: random init

    # ------------------------------------------------------------------------------------- model, optimizer

    @functools.cached_property
    def _abstract_model(self) -> tuple[Any, dict, dict]:
        """(graphdef, params, batch_stats) of the model as ShapeDtypeStructs: traced once, nothing allocated."""
        graphdef, params, stats = nnx.split(
            nnx.eval_shape(lambda: self.model.build(nnx.Rngs(0))), nnx.Param, nnx.BatchStat
        )
        return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    @property
    def graphdef(self):
        """The model's structure (no arrays); ``nnx.merge(graphdef, params, batch_stats)`` rebuilds it."""
        return self._abstract_model[0]

    @functools.cached_property
    def optimizer(self) -> optim.Optimizer:
        """The optimizer bundle; validating the ``optim`` section happens here, once."""
        opt = optim.build_optimizer(
            self.cfg.optim,
            steps_per_epoch=self.lengths.schedule_steps_per_epoch,
            total_steps=self.lengths.total_steps,
            global_batch=self.cfg.train.global_batch,
        )
        _check_plateau_evaluations(opt, self.lengths, self.cfg.train)
        return opt

    def checkpoint_meta(self) -> dict[str, Any]:
        return self.model.identity() | dict(dataset=self.cfg.data.dataset, global_batch=self.cfg.train.global_batch)

    # ------------------------------------------------------------------------------------------- state

    def _new_state(self, key: jax.Array, loaded: dict | None = None, source: finetune.Source | None = None) -> dict:
        """A train state from a random init; with ``loaded`` (the weights of ``source``) the params and BN
        statistics are the source's (the classifier stays the random one when ``source.reset_head``)."""
        _, params, stats = nnx.split(self.model.build(nnx.Rngs(params=key)), nnx.Param, nnx.BatchStat)
        params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
        if loaded is not None:
            params, stats = finetune.start_weights(params, stats, loaded, source)
        state = dict(step=jnp.zeros((), jnp.int32), params=params, **self.optimizer.init(params))  # EMA = params
        if stats:
            state["batch_stats"] = stats
        return state

    @functools.cached_property
    def state_spec(self) -> StateSpec:
        """State: step, params, opt_state, batch_stats (BN models), ema (when on); nothing is computed."""
        abstract = jax.eval_shape(self._new_state, jax.random.key(0))
        return StateSpec(self._new_state, abstract, parallel.param_sharding(self.mesh, abstract))

    @functools.cached_property
    def init_source(self) -> finetune.Source | None:
        """The checked source of ``model.init_from`` (its meta only; None without one): a source of another model
        is refused here, before anything is restored or written."""
        if self.init_settings is None:
            return None
        _, params, stats = self._abstract_model
        trees = dict(params=params, batch_stats=stats)
        return finetune.describe_source(self.init_settings, self.model.identity(), trees)

    def create_state(self, seed: int | None = None) -> dict:
        """A new train state, built by a jitted init straight into its shardings: random, or with
        ``model.init_from`` the source's weights (restored into this mesh's shardings; optimizer state, EMA and
        step fresh)."""
        spec, source = self.state_spec, self.init_source
        key = jax.random.key(self.cfg.train.seed if seed is None else seed)
        if source is None:
            return jax.jit(spec.init, out_shardings=spec.shardings)(key)
        step, loaded = finetune.read_source(source, self.mesh)
        start = lambda key, loaded: self._new_state(key, loaded, source)
        state = jax.jit(start, out_shardings=spec.shardings)(key, loaded)
        finetune.announce(source, step, self.model.num_classes)
        return state

    def restore_state(self, ckpt: Checkpointer) -> dict | None:
        """The train state of the newest readable checkpoint, restored into this mesh's shardings and verified
        (None when there is no checkpoint). Unreadable newer steps are reported and set aside, never deleted."""
        abstract = abstract_like(self.state_spec.abstract, self.state_spec.shardings)
        found = ckpt.newest_readable(lambda step: ckpt.restore(abstract, step), set_aside=True)
        return None if found is None else found[1]

    def abstract_weights(self, keys: list[str]) -> dict:
        """Restore target for the weight trees ``keys`` (params, batch_stats, ema) with their shardings."""
        _, params, stats = self._abstract_model
        trees = dict(params=params, batch_stats=stats)
        trees["ema"] = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)
        chosen = {k: trees[k] for k in keys}
        return abstract_like(chosen, parallel.param_sharding(self.mesh, chosen))

    def checkpointer(self, workdir: str, *, create: bool = True) -> Checkpointer:
        """The run's checkpointer; a workdir holding another model's checkpoint is refused untouched."""
        train = self.cfg.train
        ckpt = Checkpointer(workdir, train.keep_checkpoints, train.async_checkpoints and create, create=create)
        try:
            check_compatible(ckpt.newest_meta(), self.model.identity(), workdir)
        except Exception:
            ckpt.close()
            raise
        return ckpt

    # ------------------------------------------------------------------------------------------- steps

    @functools.cached_property
    def class_weights(self) -> ClassWeights | None:
        """The loss's per-class weights of ``train.class_weights`` (None for 'none'), from the training label counts
        (read once: see :func:`nfjax.data.train_label_counts`)."""
        spec = self.cfg.train.get("class_weights", "none")  # absent from configs saved by older runs
        if parse_class_weights(spec).mode == "none":
            return None
        counts = data_lib.train_label_counts(self.cfg.data)
        return make_class_weights(spec, counts, self.info.class_names)

    def train_step(self) -> Callable[[dict, dict], tuple[dict, dict]]:
        """The jitted train step: the state in and out in ``state_spec.shardings`` (donated), the batch split over
        every device, the metrics replicated. The loss is weighted by ``class_weights``; the eval loss never is."""
        train = self.cfg.train
        weights = None if self.class_weights is None else self.class_weights.weights
        loss_fn = make_loss_fn(
            train.loss, focal_gamma=train.focal_gamma, bce_reduction=train.bce_reduction, class_weights=weights
        )
        skip = train.nonfinite == "skip"
        step = make_train_step(
            self.graphdef, self.optimizer, loss_fn, seed=train.seed, mesh=self.mesh, skip_nonfinite=skip
        )
        shardings, batch = self.state_spec.shardings, parallel.batch_sharding(self.mesh)
        out = (shardings, parallel.replicated(self.mesh))  # the state stays in its layout: donation reuses it
        options = lowering.compiler_options()
        step = lowering.on_devices(step, self.mesh.size)
        return jax.jit(
            step, in_shardings=(shardings, batch), out_shardings=out, donate_argnums=0, compiler_options=options
        )

    @functools.cached_property
    def eval_step(self) -> Callable[[dict, dict, dict], dict]:
        """The jitted eval step: masked sums (count, top1, top5, loss, per-class counts) of one batch."""
        return self.tta_eval_step("none")

    @functools.cached_property
    def _eval_steps(self) -> dict[tuple[str, bool, bool], Callable[[dict, dict, dict], dict]]:
        return {}  # (test-time augmentation mode, with probabilities, prestandardized) -> its jitted eval step

    def tta_eval_step(
        self, tta: str, with_probs: bool = False, prestandardized: bool = False
    ) -> Callable[[dict, dict, dict], dict]:
        """The jitted eval step with test-time augmentation ``tta`` (see :func:`nfjax.steps.make_eval_step`).
        ``with_probs``: it also returns every example's softmax probabilities, label and mask, replicated on
        every device and host (``--roc-auc`` ranks the whole split on the host). ``prestandardized``: the step
        takes params from :meth:`inference_weights` (weight standardization done once per set of weights; pass
        :attr:`prestandardized`)."""
        key = (tta, with_probs, prestandardized)
        if key not in self._eval_steps:
            step = make_eval_step(self.graphdef, make_loss_fn("softmax_xent"), tta, with_probs)
            step = prestandardized_fn(step) if prestandardized else step
            shardings = parallel.replicated(self.mesh) if with_probs else None
            options = lowering.compiler_options()
            step = lowering.on_devices(step, self.mesh.size)
            self._eval_steps[key] = jax.jit(step, out_shardings=shardings, compiler_options=options)
        return self._eval_steps[key]

    @functools.cached_property
    def prestandardized(self) -> bool:
        """Whether inference takes this model's weights standardized once (:meth:`inference_weights`): the model
        has weight-standardized convolutions (every NF model, no BN model)."""
        return standardizes_weights(*self._abstract_model)

    @functools.cached_property
    def _standardize(self) -> Callable[[dict, dict], dict]:
        """The jitted :func:`nfjax.steps.standardize_weights` of this model."""
        fn = functools.partial(standardize_weights, self.graphdef)
        return jax.jit(fn, compiler_options=lowering.compiler_options())

    def inference_weights(self, params: dict, batch_stats: dict) -> dict:
        """The params as the steps built with ``prestandardized=`` :attr:`prestandardized` take them: for NF
        models every convolution kernel standardized once (:func:`nfjax.steps.standardize_weights`), BN models'
        params as they are. Saves evaluation the standardization of every kernel in every batch (NFNet-F0 at
        batch 8 on a 2-core CPU: 7% of the eval step, docs/performance.md)."""
        return self._standardize(params, batch_stats) if self.prestandardized else params

    def evaluate_split(
        self, params: dict, batch_stats: dict, tta: str = "none", roc_auc: bool = False
    ) -> dict[str, Any]:
        """Top-1/top-5/loss and per-class precision/recall/F1 of ``params`` over the whole eval split
        (data.eval_split, batch train.eval_batch), every example counted exactly once: the scalars of
        :data:`nfjax.eval_metrics.SUMMARY_KEYS` beside top1/top5/loss/examples, and the lists ``per_class`` and
        ``confusion_matrix`` (K <= MAX_CONFUSION_CLASSES), see :func:`nfjax.eval_metrics.classification_report`.
        ``tta``: 'none' or 'flip' (the mean softmax of each image and its mirror, see
        :func:`nfjax.steps.make_eval_step`). ``roc_auc``: also the one-vs-rest ROC-AUC
        (:func:`nfjax.eval_metrics.roc_auc_report`) of the real examples' gathered probabilities (padding rows
        left out)."""
        if roc_auc:
            check_roc_auc_size(self.info.num_classes, self.info.num_eval_examples)
        # An unknown mode fails here, before any data is read; NF kernels are then standardized once, not per batch.
        step = self.tta_eval_step(tta, roc_auc, self.prestandardized)
        params = self.inference_weights(params, batch_stats)
        global_batch = self.cfg.train.eval_batch or self.cfg.train.global_batch
        sums: dict[str, Any] = {}
        scores, labels = [], []
        for b in data_lib.build_eval_iterator(self.cfg.data, global_batch=global_batch, mesh=self.mesh):
            out = jax.device_get(step(params, batch_stats, b))
            if roc_auc:
                real = np.asarray(out.pop("mask")) > 0
                scores.append(np.asarray(out.pop("probs"))[real])
                labels.append(np.asarray(out.pop("labels"))[real])
            for k, v in out.items():
                v = np.asarray(v, np.int64) if k in COUNT_KEYS else float(v)  # per-class counts: exact integers
                sums[k] = sums[k] + v if k in sums else v
        count = int(round(sums.get("count", 0)))
        if count != self.info.num_eval_examples:
            raise RunError(f"evaluation counted {count} examples, expected {self.info.num_eval_examples}")
        report = classification_report({k: sums[k] for k in COUNT_KEYS if k in sums}, self.info.class_names)
        if roc_auc:
            report = add_roc_auc(report, roc_auc_report(np.concatenate(scores), np.concatenate(labels)))
        means = dict(top1=sums["top1"] / count, top5=sums["top5"] / count, loss=sums["loss"] / count)
        return means | dict(examples=count) | report

    def evaluate(self, weights: dict, tta: str = "none", roc_auc: bool = False) -> dict[str, dict]:
        """``{'eval': metrics of the params, 'eval_ema': metrics of the EMA weights (when present)}``; ``tta`` and
        ``roc_auc`` as in :meth:`evaluate_split`."""
        stats = weights.get("batch_stats", {})
        results = {"eval": self.evaluate_split(weights["params"], stats, tta, roc_auc)}
        if "ema" in weights:
            results["eval_ema"] = self.evaluate_split(weights["ema"], stats, tta, roc_auc)
        return results


def build_experiment(
    cfg: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    info: data_lib.DatasetInfo | None = None,
    training: bool = True,
) -> Experiment:
    """Validates the config's model/train/data parts and assembles the run. ``num_devices``: the mesh size
    (default train.num_devices for training, every device otherwise; 0 or None: every device). ``info``
    replaces the dataset's (benchmarks on synthetic data). ``training=False`` skips the check that the
    training batch splits over this mesh (evaluating on another machine) and builds a plain ``data`` mesh
    (train.fsdp is a training setting: the weights alone are restored, replicated)."""
    if training:
        _check_train(cfg.train)
    model_metadata(cfg.model.name)  # unknown model names fail here, listing the valid ones
    if info is None:
        data_lib.prepare_offline(cfg.data)
        info = data_lib.dataset_info(cfg.data)
        if training:
            data_lib.check_tensorflow_needs(cfg.data)
    fsdp = cfg.train.get("fsdp", 1) if training else 1  # absent from configs saved by older runs
    mesh = parallel.make_mesh(num_devices or (cfg.train.num_devices if training else None) or None, fsdp)
    if training:
        data_lib.check_global_batch(cfg.train.global_batch, jax.process_count(), mesh.devices.size)
    return Experiment(cfg, info, mesh)
