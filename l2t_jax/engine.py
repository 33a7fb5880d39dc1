"""The unroll engine: student steps under `lax.scan`, remat policies, meta-gradients.

A student trains by a pure step `step(meta_params, state, batch) -> (state, metrics)`.
Its loss is a function of `meta_params` (whatever a teacher controls), so the gradient of
any objective of the trained student with respect to `meta_params`, taken through
`unroll`, is the exact meta-gradient. Nothing here knows which method it runs.

Memory policies (`remat`), all giving the same gradient:

* ``"none"``: plain `lax.scan`. The backward pass keeps every step's residuals
  (activations and intermediate values of the inner gradient): fastest, memory O(T).
* ``"step"``: `jax.checkpoint` around each step. Only the carry (student state) is kept
  per step and the step is recomputed in the backward pass: about one extra forward step
  per step, memory O(T * |state|). When the state (parameters plus optimizer state) is
  larger than a step's activations this can *use more* memory than ``"none"``.
* ``"sqrt"``: the T steps are cut into chunks of about sqrt(T) steps; an outer scan over
  chunks keeps only the state at chunk boundaries and each chunk is recomputed (with its
  residuals) in the backward pass: about one extra forward unroll, memory
  O(sqrt(T) * (|state| + residuals)).

`benchmarks/remat.py` measures the trade-off (`docs/remat.md`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from l2t_jax import config_checks as checks
from l2t_jax.errors import ConfigError

PyTree = Any
Batch = dict[str, jax.Array]
# loss_fn(meta_params, output, batch, state) -> scalar: `output` is the student's
# `ModelOutput` on the step's batch, `batch` the batch as the student saw it (augmented
# "x", labels "y", and the target model's `ModelOutput` as "target" when one is set),
# `state` the student before the step (its `step` counter and running stats).
LossFn = Callable[[PyTree, "ModelOutput", dict, "StudentState"], jax.Array]
# loss_metrics_fn(meta_params, output, batch, state) -> {name: scalar}: what describes the
# step's loss (e.g. the loss parameters a teacher set), with a `LossFn`'s arguments.
LossMetricsFn = Callable[[PyTree, "ModelOutput", dict, "StudentState"], dict]
# params_loss_fn(meta_params, params, batch, state) -> scalar: a term of the loss that
# reads the student's parameters themselves (differentiated), e.g. FedGen's term on the
# classifier head applied to generated features.
ParamsLossFn = Callable[[PyTree, PyTree, dict, "StudentState"], jax.Array]
StepFn = Callable[[PyTree, "StudentState", Batch], tuple["StudentState", dict]]
# objective(meta_params, final_state) -> (scalar to minimise, aux)
Objective = Callable[[PyTree, "StudentState"], tuple[jax.Array, Any]]
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]
StatsFn = Callable[["StudentState", dict], PyTree]

REMAT_POLICIES = ("none", "step", "sqrt")
# The Flax collection students `sow` their named activations into.
ACTIVATIONS_COLLECTION = "intermediates"


@flax.struct.dataclass
class ModelOutput:
    """What a network computes on a batch, as a loss sees it.

    Attributes:
        logits: (B, C) unnormalised class scores.
        activations: the named intermediate activations that were requested (see
            `student_output`), e.g. ``{"group_1": (B, H, W, C)}``; ``{}`` when none.
    """

    logits: jax.Array
    activations: dict = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class TargetModel:
    """A frozen network whose outputs are targets inside the student's loss.

    The network distilled from (a KD "teacher" in the distillation literature; here the
    *target model*, never a teacher: it is not trained and sets no loss parameters). It
    runs in eval mode, under `jax.lax.stop_gradient`, on the same augmented batch as the
    student, inside the student's step; the loss reads its `ModelOutput` as
    ``batch["target"]``.

    Attributes:
        model: its Flax module.
        variables: its variables (``{"params": ..., "batch_stats": ...}``).
        activations: names of its activations the loss reads.
    """

    model: nn.Module = flax.struct.field(pytree_node=False)
    variables: PyTree
    activations: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

    def __call__(self, x: jax.Array) -> ModelOutput:
        """Its output on inputs `x` (B, ...), gradient stopped."""
        model_state = {k: v for k, v in self.variables.items() if k != "params"}
        output, _ = student_output(self.model, self.variables["params"], model_state, x,
                                   train=False, activations=self.activations)
        return jax.lax.stop_gradient(output)


@flax.struct.dataclass
class StudentState:
    """Everything a student carries through the inner loop.

    Attributes:
        params: trainable parameters (a Flax ``params`` collection).
        model_state: the other mutable collections, e.g. ``{"batch_stats": ...}``;
            ``{}`` for a student without BatchNorm.
        opt_state: the inner optax optimizer's state.
        step: int32 scalar, inner steps taken so far.
        rng: PRNG key for augmentation and dropout; split at every step.
        stats: running statistics of the training that a loss family or teacher reads
            (e.g. a running train loss); ``{}`` when nothing is tracked.
    """

    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    step: jax.Array
    rng: jax.Array
    stats: PyTree = flax.struct.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        params: PyTree,
        rng: jax.Array,
        *,
        tx: optax.GradientTransformation | None = None,
        opt_state: PyTree = None,
        model_state: PyTree | None = None,
        stats: PyTree | None = None,
        step: int | jax.Array = 0,
    ) -> StudentState:
        """A student from given parameters (e.g. to take a meta-gradient from outside).

        Floating-point `stats` take the parameters' floating dtype (float32 stats of a
        float64 student become float64): the features a teacher reads from them are
        as precise as the student, and so are its meta-gradients. Stats already of
        that dtype are kept bit for bit.

        Args:
            params: the student's parameters (a Flax ``params`` collection).
            rng: PRNG key of its augmentation and dropout.
            tx: the inner optimizer, whose fresh state ``tx.init(params)`` the student
                gets; give this or `opt_state`.
            opt_state: the optimizer state to carry instead (e.g. a trained student's).
            model_state: the other Flax collections (``{"batch_stats": ...}``);
                default ``{}``.
            stats: running statistics (`StudentState.stats`); default ``{}``.
            step: inner steps already taken (int32).

        Returns:
            The student.

        Raises:
            ValueError: neither or both of `tx` and `opt_state`.
        """
        if (tx is None) == (opt_state is None):
            raise ValueError("StudentState.create needs tx (for a fresh optimizer state) "
                             "or opt_state, not both")
        return cls(
            params=params,
            model_state={} if model_state is None else model_state,
            opt_state=tx.init(params) if opt_state is None else opt_state,
            step=jnp.asarray(step, jnp.int32),
            rng=rng,
            stats=_floats_like({} if stats is None else stats, params),
        )


def _floats_like(tree: PyTree, like: PyTree) -> PyTree:
    """`tree` with its floating leaves cast to the floating dtype of `like`'s leaves (the
    widest, if they mix); `tree` unchanged when `like` has none."""
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(like)]
    dtypes = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    if not dtypes:
        return tree
    target = jnp.result_type(*dtypes)

    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(target) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree_util.tree_map(cast, tree)


@functools.partial(jax.jit, static_argnames=("model",))
def _init_variables(model: nn.Module, rng: jax.Array, sample_x: jax.Array) -> PyTree:
    """``model.init`` as one compiled program (eagerly, every initialiser and layer of
    the forward pass would compile on its own)."""
    return model.init(rng, sample_x, train=False)


def init_student_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    sample_x: jax.Array,
    stats: PyTree | None = None,
) -> StudentState:
    """Initialises a student's parameters, model state and optimizer state.

    Args:
        model: the Flax student.
        tx: the inner optimizer.
        rng: PRNG key; split into an init key and the state's own key.
        sample_x: one input batch (any batch size) fixing the input shape.
        stats: initial running statistics (see `StudentState.stats`); default ``{}``.
            Floating ones take the parameters' dtype (`StudentState.create`).

    Returns:
        The student at step 0.
    """
    init_rng, state_rng = jax.random.split(rng)
    variables = _init_variables(model, init_rng, sample_x)
    model_state = {k: v for k, v in variables.items()
                   if k not in ("params", ACTIVATIONS_COLLECTION)}
    return StudentState.create(variables["params"], state_rng, tx=tx,
                               model_state=model_state, stats=stats)


def student_output(
    model: nn.Module,
    params: PyTree,
    model_state: PyTree,
    x: jax.Array,
    *,
    train: bool,
    rng: jax.Array | None = None,
    activations: tuple[str, ...] = (),
) -> tuple[ModelOutput, PyTree]:
    """Runs a network and collects the named activations a loss asked for.

    Students `sow` named activations into the ``"intermediates"`` collection (e.g. the
    MLP's ``hidden_0``, the ResNets' ``group_1``); they are collected only when asked
    for, so an unrequested activation costs nothing.

    Args:
        model: the Flax network.
        params: its parameters.
        model_state: its non-trainable collections (BatchNorm statistics).
        x: inputs (B, ...).
        train: train mode (batch statistics, dropout) or eval mode.
        rng: dropout key, used in train mode.
        activations: names of the sown activations to return.

    Returns:
        ``(output, model_state)``; in eval mode the model state is unchanged.

    Raises:
        ConfigError: an activation the network does not sow.
    """
    variables = {"params": params, **model_state}
    mutable = list(model_state) if train else []
    if activations:
        mutable.append(ACTIVATIONS_COLLECTION)
    rngs = {"dropout": rng} if train and rng is not None else {}
    if not mutable and not train:
        return ModelOutput(model.apply(variables, x, train=False)), model_state
    logits, updated = model.apply(variables, x, train=train, mutable=mutable, rngs=rngs)
    updated = dict(updated)
    sown = updated.pop(ACTIVATIONS_COLLECTION, {})
    missing = [name for name in activations if name not in sown]
    if missing:
        raise ConfigError(
            f"{type(model).__name__} exposes no activation {missing[0]!r}; it exposes "
            f"{sorted(sown)}")
    output = ModelOutput(logits, {name: sown[name][-1] for name in activations})
    return output, updated if train else model_state


def apply_student(
    model: nn.Module,
    params: PyTree,
    model_state: PyTree,
    x: jax.Array,
    *,
    train: bool,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, PyTree]:
    """Runs the student; in train mode also returns its updated model state.

    Args:
        model: the Flax student.
        params: its parameters.
        model_state: its non-trainable collections (BatchNorm statistics).
        x: inputs (B, ...).
        train: train mode (batch statistics, dropout) or eval mode.
        rng: dropout key, used in train mode.

    Returns:
        ``(logits (B, C), model_state)``; in eval mode the model state is unchanged.
    """
    output, model_state = student_output(model, params, model_state, x, train=train, rng=rng)
    return output.logits, model_state


def make_student_step(
    model: nn.Module,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    augment_fn: AugmentFn | None = None,
    stats_fn: StatsFn | None = None,
    *,
    activations: tuple[str, ...] = (),
    target: TargetModel | None = None,
    self_target: bool = False,
    loss_metrics_fn: LossMetricsFn | None = None,
    params_loss_fn: ParamsLossFn | None = None,
) -> StepFn:
    """Builds the pure inner step of a student trained on a teacher-controlled loss.

    Args:
        model: the Flax student.
        loss_fn: ``loss_fn(meta_params, output, batch, state) -> scalar`` (see `LossFn`).
        tx: the inner optax optimizer.
        augment_fn: optional ``augment_fn(key, x) -> x`` applied to each batch.
        stats_fn: optional ``stats_fn(new_state, metrics) -> stats`` updating the
            running statistics after each step (otherwise they are carried unchanged).
        activations: the student's named activations the loss reads
            (``output.activations``).
        target: a frozen target model run on the same augmented batch; the loss reads
            its output as ``batch["target"]``.
        self_target: the loss reads the student's own output (train mode, the step's
            parameters, the named activations) as ``batch["target"]`` instead: computed
            outside the student's gradient, so the step treats it as a constant while a
            meta-gradient through the step still follows it. (A `jax.lax.stop_gradient`
            inside the loss would cut that path from the meta-gradient too.) Costs one
            more forward pass per step.
        loss_metrics_fn: ``loss_metrics_fn(meta_params, output, batch, state)``, scalars
            that describe the step's loss (`LossMetricsFn`: e.g. the loss parameters a
            teacher set), computed on the loss's own arguments and reported with the
            step's metrics under their own names (the step's own three win a clash).
        params_loss_fn: ``params_loss_fn(meta_params, params, batch, state)``, a term
            added to the loss that reads the parameters being trained (`ParamsLossFn`);
            None: none.

    Returns:
        ``step(meta_params, state, batch) -> (state, metrics)`` where ``batch`` has
        ``"x"`` (B, ...) and ``"y"`` (B,), and ``metrics`` has the step's ``loss``, its
        minibatch ``accuracy`` and ``cross_entropy`` (all measured before the update),
        and those of `loss_metrics_fn`.
    """

    def step(meta_params, state: StudentState, batch: Batch):
        rng, aug_rng, dropout_rng = jax.random.split(state.rng, 3)
        x = batch["x"] if augment_fn is None else augment_fn(aug_rng, batch["x"])
        seen = {**batch, "x": x}
        if target is not None:
            seen["target"] = target(x)
        if self_target:
            seen["target"] = student_output(
                model, state.params, state.model_state, x, train=True, rng=dropout_rng,
                activations=activations)[0]

        def student_loss(params):
            output, model_state = student_output(
                model, params, state.model_state, x, train=True, rng=dropout_rng,
                activations=activations,
            )
            loss_metrics = ({} if loss_metrics_fn is None
                            else loss_metrics_fn(meta_params, output, seen, state))
            loss = loss_fn(meta_params, output, seen, state)
            if params_loss_fn is not None:
                loss = loss + params_loss_fn(meta_params, params, seen, state)
            return loss, (output.logits, model_state, loss_metrics)

        (loss, (logits, model_state, loss_metrics)), grads = jax.value_and_grad(
            student_loss, has_aux=True
        )(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # Flax keeps BatchNorm statistics in float32 whatever the layer dtype; keep the
        # carry's dtypes fixed so `lax.scan` sees the same type every step.
        model_state = jax.tree_util.tree_map(
            lambda new, old: new.astype(old.dtype), model_state, state.model_state
        )
        new_state = StudentState(
            params=optax.apply_updates(state.params, updates),
            model_state=model_state,
            opt_state=opt_state,
            step=state.step + 1,
            rng=rng,
            stats=state.stats,
        )
        metrics = {
            **loss_metrics,
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
            # Cross-entropy is reported whatever the loss, so runs can be compared.
            "cross_entropy": jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
            ),
        }
        if stats_fn is not None:
            new_state = new_state.replace(stats=stats_fn(new_state, metrics))
        return new_state, metrics

    return step


def sqrt_chunk_size(num_steps: int) -> int:
    """The default chunk length of the ``"sqrt"`` policy.

    The divisor of T nearest sqrt(T) when one lies within a factor 2 of it (T = 1000 ->
    25): a chunk that divides T lets the stacked batches be reshaped without a copy,
    whereas a remainder chunk makes XLA copy nearly all of them (measured at T = 1000:
    427 MB with chunks of 32 vs 49 MB with 25). Otherwise (T prime, say) round(sqrt(T)).
    """
    root = math.sqrt(num_steps)
    divisors = [d for d in range(1, num_steps + 1) if num_steps % d == 0]
    nearest = min(divisors, key=lambda d: abs(d - root))
    return nearest if root / 2 <= nearest <= 2 * root else max(1, round(root))


def _num_steps(batches: PyTree) -> int:
    return jax.tree_util.tree_leaves(batches)[0].shape[0]


def unroll(
    step_fn: StepFn,
    meta_params: PyTree,
    state: StudentState,
    batches: PyTree,
    *,
    remat: str = "none",
    chunk_size: int | None = None,
) -> tuple[StudentState, dict]:
    """Runs T student steps with `lax.scan`; differentiable in `meta_params`.

    Args:
        step_fn: the pure inner step (see `make_student_step`).
        meta_params: the teacher-controlled parameters the loss reads.
        state: the student at the start.
        batches: a pytree of arrays stacked along a leading T axis.
        remat: memory policy, one of `REMAT_POLICIES` (see the module docstring).
        chunk_size: chunk length for ``"sqrt"``; defaults to `sqrt_chunk_size(T)`.
            T need not be a multiple of it: the remainder runs as a last short chunk.

    Returns:
        ``(final_state, metrics)`` with each metric stacked along T.
    """
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"unknown remat policy {remat!r}; choose one of {REMAT_POLICIES}")

    def body(s, batch):
        return step_fn(meta_params, s, batch)

    if remat == "none":
        return jax.lax.scan(body, state, batches)
    if remat == "step":
        # prevent_cse=False: inside scan there is nothing for XLA to CSE across steps.
        return jax.lax.scan(jax.checkpoint(body, prevent_cse=False), state, batches)

    num_steps = _num_steps(batches)
    chunk = chunk_size or sqrt_chunk_size(num_steps)
    num_chunks, remainder = divmod(num_steps, chunk)

    @jax.checkpoint
    def run_chunk(s, chunk_batches):
        return jax.lax.scan(body, s, chunk_batches)

    head = jax.tree_util.tree_map(
        lambda a: a[: num_chunks * chunk].reshape((num_chunks, chunk) + a.shape[1:]),
        batches,
    )
    state, metrics = jax.lax.scan(run_chunk, state, head)
    metrics = jax.tree_util.tree_map(
        lambda a: a.reshape((num_chunks * chunk,) + a.shape[2:]), metrics
    )
    if remainder:
        tail = jax.tree_util.tree_map(lambda a: a[num_chunks * chunk :], batches)
        state, tail_metrics = run_chunk(state, tail)
        metrics = jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a, b]), metrics, tail_metrics
        )
    return state, metrics


class MetaGradient(NamedTuple):
    """What an estimator returns.

    Attributes:
        value: the objective after the unroll (scalar).
        grad: its gradient with respect to `meta_params` (same pytree structure).
        state: the student at the end of the unroll (no gradient flows from it).
        metrics: per-step inner metrics, stacked along T.
        aux: the objective's auxiliary output.
    """

    value: jax.Array
    grad: PyTree
    state: StudentState
    metrics: dict
    aux: Any


class Estimator(Protocol):
    """Estimates d objective(unroll(meta_params, state, batches)) / d meta_params."""

    def __call__(
        self,
        step_fn: StepFn,
        objective: Objective,
        meta_params: PyTree,
        state: StudentState,
        batches: PyTree,
    ) -> MetaGradient: ...


@dataclasses.dataclass(frozen=True)
class FullBackprop:
    """Exact meta-gradient: reverse mode through all T steps.

    Attributes:
        remat: memory policy for the unroll (`REMAT_POLICIES`).
        chunk_size: chunk length for ``remat="sqrt"`` (None: about sqrt(T)).
    """

    remat: str = "none"
    chunk_size: int | None = None

    def __call__(self, step_fn, objective, meta_params, state, batches) -> MetaGradient:
        def meta_loss(mp):
            final, metrics = unroll(
                step_fn, mp, state, batches, remat=self.remat, chunk_size=self.chunk_size
            )
            value, aux = objective(mp, final)
            return value, (final, metrics, aux)

        (value, (final, metrics, aux)), grad = jax.value_and_grad(
            meta_loss, has_aux=True
        )(meta_params)
        return MetaGradient(value, grad, jax.lax.stop_gradient(final), metrics, aux)


@dataclasses.dataclass(frozen=True)
class TruncatedBackprop:
    """Meta-gradient through the last `window` of the T steps only.

    The first T - window steps run forward under the same `meta_params` but outside the
    differentiated function, so their memory is never kept; the student continues from
    there and the gradient flows through the last `window` steps. This is exact when
    window >= T and a biased, bounded-memory estimate otherwise: the usual way to teach
    over long trainings (call it on consecutive stretches of K steps to update the
    teacher every K steps while one student trains to the end).

    Attributes:
        window: how many final steps the gradient flows through (>= 1).
        remat: memory policy for the differentiated window.
        chunk_size: chunk length for ``remat="sqrt"``.
    """

    window: int
    remat: str = "none"
    chunk_size: int | None = None

    def __post_init__(self):
        if self.window < 1:
            raise ConfigError(f"truncation window must be >= 1, got {self.window}")

    def __call__(self, step_fn, objective, meta_params, state, batches) -> MetaGradient:
        num_steps = _num_steps(batches)
        prefix = max(0, num_steps - self.window)
        prefix_metrics = None
        if prefix:
            head = jax.tree_util.tree_map(lambda a: a[:prefix], batches)
            batches = jax.tree_util.tree_map(lambda a: a[prefix:], batches)
            state, prefix_metrics = unroll(
                step_fn, jax.lax.stop_gradient(meta_params), state, head
            )
        result = FullBackprop(self.remat, self.chunk_size)(
            step_fn, objective, meta_params, state, batches
        )
        if prefix_metrics is None:
            return result
        metrics = jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a, b]), prefix_metrics, result.metrics
        )
        return result._replace(metrics=metrics)


ESTIMATORS = ("full", "truncated")


def make_estimator(config) -> Estimator:
    """Builds an estimator from an ``engine`` config.

    Args:
        config: ConfigDict with ``estimator`` (``"full"`` | ``"truncated"``), ``remat``,
            optional ``chunk_size`` and, for ``"truncated"``, ``window``.

    Returns:
        The estimator.
    """
    validate_engine_config(config)
    chunk_size = config.get("chunk_size") or None
    if config.estimator == "full":
        return FullBackprop(config.remat, chunk_size)
    return TruncatedBackprop(config.window, config.remat, chunk_size)


def validate_engine_config(config) -> None:
    """Raises a one-line ConfigError for a bad ``engine`` config."""
    estimator = config.get("estimator", "full")
    chunk_size = config.get("chunk_size")
    checks.check_fields([
        checks.one_of("config.engine.remat", config.get("remat", "none"), REMAT_POLICIES),
        checks.one_of("config.engine.estimator", estimator, ESTIMATORS),
        checks.integer("config.engine.window", config.get("window", 0),
                       minimum=1 if estimator == "truncated" else 0,
                       note=f" with estimator {estimator!r} (the steps backpropagated "
                            "through)"),
        checks.integer("config.engine.chunk_size", 0 if chunk_size is None else chunk_size,
                       minimum=0, note=" (0 or None: about sqrt(T) steps per chunk)"),
    ])
