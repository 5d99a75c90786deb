"""Train state and the jitted, sharded train step.

The step is one `jax.jit` with explicit in/out shardings over the partitioner's
mesh and a donated state. Models plug in through the `BaseModel` interface
(`init`, `loss_fn`, `loss_denominators`, `frozen_state`); nothing here knows
which family it trains.
"""

import dataclasses
import math
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from t5x_lite import checkpoints
from t5x_lite import optimizers
from t5x_lite.errors import UserError
from t5x_lite.models.base import BaseModel
from t5x_lite.partitioning import Partitioner


# The shape of a raw PRNG key, for shape-only evaluation (nothing runs on a device).
_ABSTRACT_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


_TRAINED = ('step', 'params', 'opt_state', 'rng')
# Frozen state that checkpoints leave out: a LoRA model's base params, which
# come from INITIAL_CHECKPOINT_PATH at every start (see Trainer.base_params).
BASE = 'base'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  # The model's frozen state (a dict, e.g. DPO's {'reference': params}), or None.
  frozen: Optional[dict[str, Any]] = None

  def to_dict(self) -> dict[str, Any]:
    """The checkpointed dict; the frozen state's entries sit beside the params
    (all but a LoRA model's base params, `BASE`)."""
    d = {'step': self.step, 'params': self.params, 'opt_state': self.opt_state,
         'rng': self.rng}
    frozen = {k: v for k, v in (self.frozen or {}).items() if k != BASE}
    return {**frozen, **d}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'TrainState':
    frozen = {k: v for k, v in d.items() if k not in _TRAINED}
    return cls(step=d['step'], params=d['params'], opt_state=d['opt_state'], rng=d['rng'],
               frozen=frozen or None)


def abstract_params(model: BaseModel, partitioner: Partitioner,
                    batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> tuple[Any, Any]:
  """(shapes and dtypes, shardings) of the model's params, computing nothing."""
  with partitioner.activate():  # abstract keys: the mesh's devices may be elsewhere (AOT)
    boxed = jax.eval_shape(lambda rng: model.init(rng, batch_shapes), _ABSTRACT_KEY)
    shardings = partitioner.logical_shardings(boxed)['params']
  return nn.unbox(boxed)['params'], shardings


def base_params(base_model: BaseModel, partitioner: Partitioner,
                batch_shapes: dict[str, jax.ShapeDtypeStruct], seed: Optional[int],
                initial_checkpoint_path: Optional[str] = None,
                fresh: Sequence[str] = ()) -> Any:
  """The frozen params a LoRA model adapts, sharded: `initial_checkpoint_path`'s,
  else `base_model`'s random init of `seed` (the same at every start, so
  that a resumed run, or an evaluation of its adapters, finds the same base)."""
  abstract, shardings = abstract_params(base_model, partitioner, batch_shapes)
  # A checkpoint's base is recorded without a seed (lora.checkpoint_meta); its init
  # then fills only subtrees the checkpoint lacks (a new head, trained as a copy).
  init_rng = jax.random.split(jax.random.PRNGKey(0 if seed is None else seed))[0]
  variables = lambda rng: nn.unbox(base_model.init(rng, batch_shapes))['params']
  is_fresh = lambda x: isinstance(x, jax.ShapeDtypeStruct)
  restored = None
  if initial_checkpoint_path:
    restored = checkpoints.restore_params(initial_checkpoint_path, abstract, fresh=fresh)
    if not any(is_fresh(x) for x in jax.tree_util.tree_leaves(restored, is_leaf=is_fresh)):
      return jax.device_put(restored, shardings)
    # Subtrees in `fresh` the checkpoint lacks (a new head) take the random init.
    restored = jax.tree_util.tree_map(lambda x: None if is_fresh(x) else x, restored,
                                      is_leaf=is_fresh)

  def make(rng, restored):
    p = variables(rng)
    if restored is None:
      return p
    return jax.tree_util.tree_map(lambda r, x: x if r is None else r, restored, p,
                                  is_leaf=lambda r: r is None)

  with partitioner.activate():
    return jax.jit(make, out_shardings=shardings)(init_rng, restored)


class Trainer:
  """Builds the sharded train state and compiles the train step once.

  The model's `frozen_state` of the initial params (DPO's reference policy)
  is kept in the state, never updated, and passed to its `loss_fn`. A model
  with a `base_model` (`lora.LoraModel`) trains its params (the adapters)
  over that model's params, kept frozen as `frozen['base']`: random, or
  INITIAL_CHECKPOINT_PATH's, and never checkpointed (see `base_params`).
  `num_microbatches` > 1 accumulates the gradients of that many equal parts
  of each batch (see `_grads`).
  """

  def __init__(self, model: BaseModel, optimizer: optax.GradientTransformation,
               partitioner: Partitioner, batch_shapes: dict[str, jax.ShapeDtypeStruct],
               num_microbatches: int = 1):
    batch_size = next(iter(batch_shapes.values())).shape[0]
    check_microbatches(batch_size, num_microbatches, partitioner.data_parallel_size)
    self.num_microbatches = num_microbatches
    self.model = model
    self.tx = optimizer
    self.partitioner = partitioner
    self.batch_shapes = batch_shapes
    self._init_variables = lambda rng: model.init(rng, batch_shapes)
    self.abstract_params, self.param_shardings = abstract_params(model, partitioner, batch_shapes)
    self.opt_shardings = partitioner.opt_state_shardings(
        self.tx, self.abstract_params, self.param_shardings)
    replicated = partitioner.replicated
    frozen_shardings = model.frozen_shardings(self.param_shardings)
    self.base_model = model.base_model
    self.abstract_base = None
    if self.base_model is not None:
      self.abstract_base, base_shardings = abstract_params(self.base_model, partitioner,
                                                           batch_shapes)
      frozen_shardings = {**(frozen_shardings or {}), BASE: base_shardings}
    self.state_shardings = TrainState(
        step=replicated, params=self.param_shardings, opt_state=self.opt_shardings,
        rng=replicated, frozen=frozen_shardings)
    self.batch_sharding = partitioner.batch_sharding()
    self._compiled_step = None
    self._compiled_eval = None

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without computing it."""
    abstract = jax.eval_shape(self._make_state, _ABSTRACT_KEY, self.abstract_params,
                              self.abstract_base)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, self.state_shardings)

  def _make_state(self, rng, params, base=None):
    frozen = self.model.frozen_state(params)
    if base is not None:
      frozen = {**(frozen or {}), BASE: base}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=rng, frozen=frozen)

  def init_state(self, seed: int, params: Optional[Any] = None,
                 base: Optional[Any] = None) -> TrainState:
    """A fresh state, created already sharded (no full copy on one device).

    `params`, when given (fine-tuning from a checkpoint), replace the random
    ones; a leaf given as a ShapeDtypeStruct (a new head) keeps its random init.
    `base` (a model with a `base_model` only): its frozen base params
    (default: `base_params(seed)`).
    """
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    is_fresh = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    given = None if params is None else jax.tree_util.tree_map(
        lambda x: None if is_fresh(x) else x, params, is_leaf=is_fresh)
    if self.base_model is not None and base is None:
      base = self.base_params(seed)

    def make(init_rng, state_rng, given, base):
      p = nn.unbox(self._init_variables(init_rng))['params']
      if given is not None:
        p = jax.tree_util.tree_map(lambda g, x: x if g is None else g, given, p,
                                   is_leaf=lambda g: g is None)
      if base is not None:
        p = self.model.initial_params(p, base)
      return self._make_state(state_rng, p, base)

    with self.partitioner.activate():
      return jax.jit(make, out_shardings=self.state_shardings)(init_rng, state_rng, given, base)

  def base_params(self, seed: int, initial_checkpoint_path: Optional[str] = None,
                  fresh: Sequence[str] = ()) -> Any:
    """The frozen base params of a model with a `base_model` (see the module
    function `base_params`), in this trainer's shardings."""
    return base_params(self.base_model, self.partitioner, self.batch_shapes, seed,
                       initial_checkpoint_path, fresh)

  def with_base(self, state: TrainState, seed: int,
                initial_checkpoint_path: Optional[str] = None,
                fresh: Sequence[str] = ()) -> TrainState:
    """A restored `state` with its base params put back (checkpoints leave
    them out); `state` itself for a model without a `base_model`."""
    if self.base_model is None:
      return state
    base = self.base_params(seed, initial_checkpoint_path, fresh)
    return state.replace(frozen={**(state.frozen or {}), BASE: base})

  def initial_state(self, seed: int, initial_checkpoint_path: Optional[str] = None,
                    fresh: Sequence[str] = ()) -> TrainState:
    """`init_state` with the params of `initial_checkpoint_path` when given
    (subtrees named in `fresh` may be missing from it and start at random).
    For a model with a `base_model` the checkpoint holds the base params; the
    adapters start fresh."""
    if self.base_model is not None:
      return self.init_state(seed, None, self.base_params(seed, initial_checkpoint_path, fresh))
    params = None
    if initial_checkpoint_path:
      params = checkpoints.restore_params(initial_checkpoint_path, self.abstract_params,
                                          fresh=fresh)
    return self.init_state(seed, params)

  def _grads(self, state: TrainState, batch: dict[str, jax.Array], dropout_rng: jax.Array):
    """(gradients, metrics) of the whole batch, summed over its microbatches.

    Each microbatch's loss divides by the whole batch's denominators, so the
    sums equal the whole batch's loss, metrics and gradients. A microbatch
    takes every k-th row, which keeps each device's rows on that device.
    """
    grad_fn = jax.value_and_grad(self.model.loss_fn, has_aux=True)
    kwargs = {'frozen': state.frozen}
    k = self.num_microbatches
    if k == 1:
      (_, metrics), grads = grad_fn(state.params, batch, dropout_rng, **kwargs)
      return grads, metrics
    denominators = self.model.loss_denominators(batch)
    spec = self.batch_sharding.spec
    micro_sharding = self.partitioner.sharding(jax.P(None, *spec))

    def split(x):
      x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    def accumulate(total, inputs):
      i, microbatch = inputs
      (_, metrics), grads = grad_fn(state.params, microbatch, jax.random.fold_in(dropout_rng, i),
                                    denominators=denominators, **kwargs)
      return jax.tree_util.tree_map(jnp.add, total, (grads, metrics)), None

    first = jax.tree_util.tree_map(lambda x: x[0], jax.tree_util.tree_map(split, batch))
    shapes = jax.eval_shape(
        lambda: grad_fn(state.params, first, dropout_rng, denominators=denominators, **kwargs))
    (_, metric_shapes), grad_shapes = shapes
    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                   (grad_shapes, metric_shapes))
    (grads, metrics), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(k), jax.tree_util.tree_map(split, batch)))
    return grads, metrics

  def _step(self, state: TrainState, batch: dict[str, jax.Array]):
    """One update (see `_update`) and the step count."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    params, opt_state, metrics = self._update(state, batch, dropout_rng)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _update(self, state: TrainState, batch: dict[str, jax.Array], dropout_rng: jax.Array):
    """(params, optimizer state, metrics) after one update on `batch`;
    skipped (params and optimizer state unchanged, as optax's
    `apply_if_finite` does) when the loss, the gradients or the new params are
    not finite, so no NaN or Inf ever reaches the state. `nonfinite_steps` is
    1 for a skipped update."""
    grads, metrics = self._grads(state, batch, dropout_rng)
    with jax.named_scope('optimizer'):
      updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      grad_norm = optax.tree.norm(grads)
      finite = (jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
                & all_finite(params))
      keep = lambda new, old: jax.tree_util.tree_map(
          lambda n, o: jnp.where(finite, n, o), new, old)
      params, new_opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics = dict(metrics, learning_rate=optimizers.learning_rate(opt_state),
                   grad_norm=grad_norm, nonfinite_steps=1.0 - finite.astype(jnp.float32))
    return params, new_opt_state, metrics

  def compile(self) -> float:
    """Compiles the train step for the state and batch shapes; returns seconds."""
    start = time.perf_counter()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
             for k, v in self.batch_shapes.items()}
    with self.partitioner.activate():
      jitted = jax.jit(self._step,
                       in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, self.partitioner.replicated),
                       donate_argnums=0)
      self._compiled_step = jitted.lower(self.abstract_state(), batch).compile()
    return time.perf_counter() - start

  def eval_metrics(self, state: TrainState, batch: dict[str, jax.Array]) -> dict:
    """The loss_fn's metrics of a batch, dropout off (jitted once per shape)."""
    if self._compiled_eval is None:
      def metrics(state, batch):
        return self.model.loss_fn(state.params, batch, None, frozen=state.frozen)[1]
      with self.partitioner.activate():
        self._compiled_eval = jax.jit(
            metrics, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=self.partitioner.replicated)
    with self.partitioner.activate():
      return self._compiled_eval(state, batch)

  @property
  def tokens_per_batch(self) -> int:
    """Tokens the model reads per step: every *input_tokens stream (encoder
    and decoder)."""
    return sum(math.prod(v.shape) for k, v in self.batch_shapes.items()
               if k.endswith('input_tokens'))

  def memory(self) -> 'StepMemory':
    """XLA's memory estimate of the compiled train step, per device."""
    return StepMemory.of(self.compiled_step)

  @property
  def compiled_step(self) -> Any:
    """The compiled XLA program of the step (its cost and memory analyses)."""
    if self._compiled_step is None:
      self.compile()
    return self._compiled_step

  def step_jaxpr(self) -> Any:
    """The jaxpr of the step, for shapes only (precompile's FLOP count)."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.batch_shapes.items()}
    with self.partitioner.activate():
      return jax.make_jaxpr(self._step)(self.abstract_state(), batch).jaxpr

  @property
  def train_step(self) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
    if self._compiled_step is None:
      self.compile()
    return self._compiled_step


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """What a compiled program's buffer assignment allocates per device (XLA's
  `memory_analysis`): its arguments (for the train step the state and the
  batch), outputs (less those that reuse a donated argument's buffer, `alias`),
  temporaries and generated code."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int

  @classmethod
  def of(cls, compiled: Any) -> 'StepMemory':
    m = compiled.memory_analysis()
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
               m.temp_size_in_bytes, m.generated_code_size_in_bytes)

  @property
  def total_bytes(self) -> int:
    """All of it: what a device holds while the program runs."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def running_bytes(self) -> int:
    """What running it allocates beyond its arguments and loaded code: the
    temporaries and the outputs that do not reuse an argument's buffer."""
    return self.output_bytes - self.alias_bytes + self.temp_bytes


def check_microbatches(batch_size: int, num_microbatches: int, data_parallel_size: int) -> None:
  """Raises UserError unless the batch splits into equal microbatches that
  still split over the data-parallel devices."""
  if num_microbatches < 1 or batch_size % (num_microbatches * data_parallel_size):
    raise UserError(
        f'NUM_MICROBATCHES={num_microbatches} must be >= 1 and divide the batch of '
        f'{batch_size} into microbatches that split over the {data_parallel_size} '
        f'data-parallel devices; use a divisor of {batch_size // data_parallel_size}.')


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every array of `tree` is finite (a scalar bool)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


# Metrics that count (summed over a logging interval) rather than average.
COUNTS = ('nonfinite_steps',)


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Averages per-step device metrics over a logging interval (one host sync);
  the COUNTS are summed."""
  reduce = lambda k: jnp.sum if k in COUNTS else jnp.mean
  stacked = {k: reduce(k)(jnp.stack([h[k] for h in history])) for k in history[0]}
  return {k: float(v) for k, v in jax.device_get(stacked).items()}
