"""Meshes, logical-axis rules and shardings: the only module that knows about devices.

Model code names logical axes ('batch', 'embed', 'mlp', ...). A rule set maps
each logical name to a mesh axis (or None = replicated). The same model runs on
one CPU, on fake CPU devices, or on a TPU slice by changing the mesh and rules
here (through gin), never the model.
"""

import contextlib
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

from t5x_lite.errors import UserError

LogicalRules = Sequence[tuple[str, Optional[str]]]

# Pure data parallelism: parameters replicated, the batch split over 'data'.
DATA_PARALLEL_RULES: LogicalRules = (
    ('batch', 'data'),
    ('length', None),
    ('embed', None),
    ('vocab', None),
    ('mlp', None),
    ('heads', None),
    ('kv', None),
    ('joined_kv', None),
    ('relpos_buckets', None),
    ('layers', None),
)

# Data parallelism plus Megatron-style 1D tensor parallelism over 'model'.
MODEL_PARALLEL_RULES: LogicalRules = (
    ('batch', 'data'),
    ('length', None),
    ('embed', None),
    ('vocab', 'model'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('joined_kv', 'model'),
    ('relpos_buckets', None),
    ('layers', None),
)


RULE_SETS = {'data_parallel': DATA_PARALLEL_RULES, 'model_parallel': MODEL_PARALLEL_RULES}


def _resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  shape = list(mesh_shape)
  if shape.count(-1) > 1:
    raise UserError(f'mesh shape {tuple(mesh_shape)} has more than one -1; '
                    'set all but one axis explicitly.')
  known = math.prod(d for d in shape if d != -1)
  if -1 not in shape and known != num_devices:
    raise UserError(f'mesh shape {tuple(mesh_shape)} needs {known} devices but {num_devices} '
                    'are available; change the mesh, or use -1 for one axis to take the rest.')
  if known <= 0 or num_devices % known:
    raise UserError(f'mesh shape {tuple(mesh_shape)}: the fixed axes ({known} devices) do not '
                    f'divide the {num_devices} available devices; choose sizes that divide it.')
  if -1 in shape:
    shape[shape.index(-1)] = num_devices // known
  return tuple(shape)


class Partitioner:
  """A device mesh plus the logical-axis rules that map model axes onto it."""

  def __init__(self,
               mesh_shape: Sequence[int] = (-1, 1),
               axis_names: Sequence[str] = ('data', 'model'),
               rules: LogicalRules | str = 'data_parallel',
               devices: Optional[Sequence[Any]] = None):
    """`rules` is a rule set's name (one of RULE_SETS) or (logical, mesh axis) pairs."""
    if isinstance(rules, str):
      if rules not in RULE_SETS:
        raise UserError(f"unknown rule set '{rules}'; use one of {sorted(RULE_SETS)} "
                        'or a list of (logical axis, mesh axis) pairs.')
      rules = RULE_SETS[rules]
    devices = list(devices) if devices is not None else jax.devices()
    if len(mesh_shape) != len(axis_names):
      raise UserError(f'mesh shape {tuple(mesh_shape)} and axis names '
                      f'{tuple(axis_names)} differ in length; give one size per axis.')
    shape = _resolve_mesh_shape(mesh_shape, len(devices))
    self.mesh = jax.make_mesh(
        shape, tuple(axis_names),
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices)
    self.rules = tuple(tuple(r) for r in rules)
    mesh_axes = set(axis_names)
    for logical, mesh_axis in self.rules:
      if mesh_axis is not None and mesh_axis not in mesh_axes:
        raise UserError(f"logical axis rule ('{logical}', '{mesh_axis}') names a mesh "
                        f'axis that is not in {tuple(axis_names)}; fix the rules or the mesh.')

  @contextlib.contextmanager
  def activate(self):
    """Makes the mesh and rules current, so logical constraints take effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  @property
  def data_axes(self) -> tuple[str, ...]:
    """Mesh axes that the batch dimension is split over."""
    return tuple(mesh for logical, mesh in self.rules
                 if logical == 'batch' and mesh is not None)

  @property
  def data_parallel_size(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.data_axes)

  def sharding(self, spec: jax.P) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, spec)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return self.sharding(jax.P())

  def batch_sharding(self) -> jax.sharding.NamedSharding:
    axes = self.data_axes
    return self.sharding(jax.P(axes if len(axes) > 1 else (axes[0] if axes else None)))

  def check_batch_size(self, batch_size: int) -> None:
    n = self.data_parallel_size
    if batch_size % n:
      raise UserError(f'batch size {batch_size} is not divisible by the data-parallel '
                      f'size {n} (mesh {dict(self.mesh.shape)}); set BATCH_SIZE to a multiple of {n}.')
    if batch_size % jax.process_count():
      raise UserError(f'batch size {batch_size} is not divisible by the {jax.process_count()} '
                      'hosts; set BATCH_SIZE to a multiple of the host count.')

  def logical_shardings(self, boxed_tree: Any) -> Any:
    """NamedShardings for a tree of (possibly) logically partitioned values."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  def opt_state_shardings(self, tx: optax.GradientTransformation, abstract_params: Any,
                          param_shardings: Any) -> Any:
    """Optimizer state follows the params: same-shaped slots take the param's
    sharding; factored or scalar slots are replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)

    def follow(slot, param, sharding):
      return sharding if getattr(slot, 'shape', None) == param.shape else self.replicated

    return optax.tree_map_params(
        tx, follow, abstract_state, abstract_params, param_shardings,
        transform_non_params=lambda _: self.replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles this host's part of the batch into global arrays on the mesh."""
    sharding = self.batch_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in local_batch.items()}

  def describe(self, abstract_params: Any, shardings: Any) -> str:
    """One line per parameter: shape, PartitionSpec and bytes per device."""
    lines = []
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_s = jax.tree_util.tree_leaves(shardings)
    for (path, leaf), sharding in zip(flat, flat_s):
      shard_shape = sharding.shard_shape(leaf.shape)
      nbytes = math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
      lines.append(f'{jax.tree_util.keystr(path):70s} {str(leaf.shape):18s} '
                   f'{str(sharding.spec):30s} {nbytes:,} B/device')
    return '\n'.join(lines)
