"""Train state and the jitted, sharded train step.

The step is one `jax.jit` with explicit in/out shardings over the partitioner's
mesh and a donated state. Model families plug in through their Model wrapper's
pure `init` and `loss_fn`; nothing here knows which family it trains.
"""

import time
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

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

  def to_dict(self) -> dict[str, Any]:
    return {'step': self.step, 'params': self.params, 'opt_state': self.opt_state,
            'rng': self.rng}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'TrainState':
    return cls(step=d['step'], params=d['params'], opt_state=d['opt_state'], rng=d['rng'])


def abstract_params(model: Any, partitioner: Partitioner,
                    batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> tuple[Any, Any]:
  """(shapes and dtypes, shardings) of the model's params, computing nothing."""
  with partitioner.activate():  # abstract keys: the mesh's devices may be elsewhere (AOT)
    boxed = jax.eval_shape(lambda rng: model.init(rng, batch_shapes), _ABSTRACT_KEY)
    shardings = partitioner.logical_shardings(boxed)['params']
  return nn.unbox(boxed)['params'], shardings


class Trainer:
  """Builds the sharded train state and compiles the train step once."""

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
    self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                      opt_state=self.opt_shardings, rng=replicated)
    self.batch_sharding = partitioner.batch_sharding()
    self._compiled_step = None

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without computing it."""
    abstract = jax.eval_shape(self._make_state, _ABSTRACT_KEY, self.abstract_params)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, self.state_shardings)

  def _make_state(self, rng, params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=rng)

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

  def _step(self, state: TrainState, batch: dict[str, jax.Array]):
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(self.model.loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, batch, dropout_rng)
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

  @property
  def train_step(self) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
    if self._compiled_step is None:
      self.compile()
    return self._compiled_step


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Averages per-step device metrics over a logging interval (one host sync)."""
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.mean(jnp.stack(xs)), *history)
  return {k: float(v) for k, v in jax.device_get(stacked).items()}
