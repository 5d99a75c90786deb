"""Train state and the jitted, sharded train step.

The step is one `jax.jit` with explicit in/out shardings over the partitioner's
mesh and a donated state. Model families plug in through their Model wrapper's
pure `init` and `loss_fn`; nothing here knows which family it trains.
"""

import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from t5x_lite import checkpoints
from t5x_lite import optimizers
from t5x_lite.partitioning import Partitioner


# The shape of a raw PRNG key, for shape-only evaluation (nothing runs on a device).
_ABSTRACT_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  # A frozen copy of the initial params (DPO's reference model), or None.
  reference: Any = None

  def to_dict(self) -> dict[str, Any]:
    d = {'step': self.step, 'params': self.params, 'opt_state': self.opt_state,
         'rng': self.rng}
    if self.reference is not None:
      d['reference'] = self.reference
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'TrainState':
    return cls(step=d['step'], params=d['params'], opt_state=d['opt_state'], rng=d['rng'],
               reference=d.get('reference'))


def abstract_params(model: Any, partitioner: Partitioner,
                    batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> tuple[Any, Any]:
  """(shapes and dtypes, shardings) of the model's params, computing nothing."""
  with partitioner.activate():  # abstract keys: the mesh's devices may be elsewhere (AOT)
    boxed = jax.eval_shape(lambda rng: model.init(rng, batch_shapes), _ABSTRACT_KEY)
    shardings = partitioner.logical_shardings(boxed)['params']
  return nn.unbox(boxed)['params'], shardings


class Trainer:
  """Builds the sharded train state and compiles the train step once.

  A model whose `uses_reference_params` is true (DPO) gets a frozen copy of
  the initial params in the state, passed to its `loss_fn` as
  `reference_params`.
  """

  def __init__(self, model: Any, optimizer: optax.GradientTransformation,
               partitioner: Partitioner, batch_shapes: dict[str, jax.ShapeDtypeStruct]):
    self.model = model
    self.tx = optimizer
    self.partitioner = partitioner
    self.batch_shapes = batch_shapes
    self._init_variables = lambda rng: model.init(rng, batch_shapes)
    self.abstract_params, self.param_shardings = abstract_params(model, partitioner, batch_shapes)
    self.opt_shardings = partitioner.opt_state_shardings(
        self.tx, self.abstract_params, self.param_shardings)
    replicated = partitioner.replicated
    self.keeps_reference = getattr(model, 'uses_reference_params', False)
    self.state_shardings = TrainState(
        step=replicated, params=self.param_shardings, opt_state=self.opt_shardings,
        rng=replicated, reference=self.param_shardings if self.keeps_reference else None)
    self.batch_sharding = partitioner.batch_sharding()
    self._compiled_step = None
    self._compiled_eval = None

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without computing it."""
    abstract = jax.eval_shape(self._make_state, _ABSTRACT_KEY, self.abstract_params)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, self.state_shardings)

  def _make_state(self, rng, params):
    reference = jax.tree_util.tree_map(jnp.copy, params) if self.keeps_reference else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=rng, reference=reference)

  def init_state(self, seed: int, params: Optional[Any] = None) -> TrainState:
    """A fresh state, created already sharded (no full copy on one device).

    `params`, when given (fine-tuning from a checkpoint), replace the random
    ones; a leaf given as a ShapeDtypeStruct (a new head) keeps its random init.
    """
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    is_fresh = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    given = None if params is None else jax.tree_util.tree_map(
        lambda x: None if is_fresh(x) else x, params, is_leaf=is_fresh)

    def make(init_rng, state_rng, given):
      p = nn.unbox(self._init_variables(init_rng))['params']
      if given is not None:
        p = jax.tree_util.tree_map(lambda g, x: x if g is None else g, given, p,
                                   is_leaf=lambda g: g is None)
      return self._make_state(state_rng, p)

    with self.partitioner.activate():
      return jax.jit(make, out_shardings=self.state_shardings)(init_rng, state_rng, given)

  def initial_state(self, seed: int, initial_checkpoint_path: Optional[str] = None,
                    fresh: Sequence[str] = ()) -> TrainState:
    """`init_state` with the params of `initial_checkpoint_path` when given
    (subtrees named in `fresh` may be missing from it and start at random)."""
    params = None
    if initial_checkpoint_path:
      params = checkpoints.restore_params(initial_checkpoint_path, self.abstract_params,
                                          fresh=fresh)
    return self.init_state(seed, params)

  def _loss_kwargs(self, state: TrainState) -> dict:
    return {'reference_params': state.reference} if self.keeps_reference else {}

  def _step(self, state: TrainState, batch: dict[str, jax.Array]):
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(self.model.loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, batch, dropout_rng, **self._loss_kwargs(state))
    with jax.named_scope('optimizer'):
      updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, learning_rate=optimizers.learning_rate(opt_state))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

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
        return self.model.loss_fn(state.params, batch, None, **self._loss_kwargs(state))[1]
      with self.partitioner.activate():
        self._compiled_eval = jax.jit(
            metrics, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=self.partitioner.replicated)
    with self.partitioner.activate():
      return self._compiled_eval(state, batch)

  @property
  def train_step(self) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
    if self._compiled_step is None:
      self.compile()
    return self._compiled_step


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Averages per-step device metrics over a logging interval (one host sync)."""
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.mean(jnp.stack(xs)), *history)
  return {k: float(v) for k, v in jax.device_get(stacked).items()}
