"""Meshes, logical-axis rules and shardings: the only module that knows about devices.

Model code names logical axes ('batch', 'embed', 'mlp', ...). A rule set maps
each logical name to mesh axes (or None = replicated). The same model runs on
one CPU, on fake CPU devices, or on a TPU slice by changing the mesh and rules
here (through gin), never the model.

The mesh has up to three axes, slowest first:
  data   plain data parallelism: the batch is split, parameters replicated;
  fsdp   the batch is split AND parameters / optimizer state are sharded
         (ZeRO-3 / FSDP); XLA gathers each layer's weights when it runs;
  model  Megatron-style tensor parallelism: heads, MLP and vocabulary split.
`jax.make_mesh` places the last axis on the fastest interconnect, so 'model'
(which communicates every layer) comes last.
"""

import contextlib
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax

from t5x_lite.errors import UserError

MeshAxes = Optional[str | tuple[str, ...]]
LogicalRules = Sequence[tuple[str, MeshAxes]]

AXIS_NAMES = ('data', 'fsdp', 'model')
# Mesh axes the batch is split over, in every built-in rule set.
BATCH_AXES = ('data', 'fsdp')


def _rule_set(fsdp: bool, model: bool) -> LogicalRules:
  """Batch over data+fsdp; with `fsdp`, every parameter's 'embed' dimension
  (which every large parameter has) over 'fsdp'; with `model`, heads, MLP and
  vocabulary over 'model'. An activation's 'embed' stays unsharded because its
  batch dimension already takes 'fsdp' (a mesh axis is used once per array).
  'kv_heads' (grouped-query attention's key / value heads) goes over 'model'
  too, where 'model' divides it (see REPLICATED_IF_INDIVISIBLE)."""
  tensor = 'model' if model else None
  return (
      ('batch', BATCH_AXES),
      ('length', None),
      ('embed', 'fsdp' if fsdp else None),
      ('vocab', tensor),
      ('mlp', tensor),
      ('heads', tensor),
      ('kv_heads', tensor),
      ('kv', None),
      ('joined_kv', tensor),
      ('relpos_buckets', None),
      ('abspos', None),
      ('layers', None),
  )


# Logical axes a parameter keeps unsharded (replicated) where its rule's mesh
# axes do not divide it, instead of failing: grouped-query attention may have
# fewer key / value heads than the 'model' axis has devices (2 in Qwen2.5-0.5B).
REPLICATED_IF_INDIVISIBLE = ('kv_heads',)

RULE_SETS: dict[str, LogicalRules] = {
    'data_parallel': _rule_set(fsdp=False, model=False),
    'fsdp': _rule_set(fsdp=True, model=False),
    'model_parallel': _rule_set(fsdp=False, model=True),
    'fsdp_model_parallel': _rule_set(fsdp=True, model=True),
}


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


def _fit_rules(rules: LogicalRules, axis_names: Sequence[str]) -> tuple[tuple[str, MeshAxes], ...]:
  """Drops the members of a tuple of mesh axes that the mesh lacks (so the
  built-in sets run on a ('data', 'model') mesh too); a single mesh axis that
  the mesh lacks is an error."""
  fitted = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, (tuple, list)):
      kept = tuple(a for a in mesh_axes if a in axis_names)
      mesh_axes = kept if len(kept) > 1 else (kept[0] if kept else None)
    elif mesh_axes is not None and mesh_axes not in axis_names:
      raise UserError(f"logical axis rule ('{logical}', '{mesh_axes}') names a mesh axis "
                      f'that is not in {tuple(axis_names)}; fix the rules or the mesh.')
    fitted.append((logical, mesh_axes))
  return tuple(fitted)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return tuple(mesh_axes) if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)


class Partitioner:
  """A device mesh plus the logical-axis rules that map model axes onto it."""

  def __init__(self,
               mesh_shape: Sequence[int] = (-1, 1, 1),
               axis_names: Optional[Sequence[str]] = None,
               rules: LogicalRules | str = 'data_parallel',
               devices: Optional[Sequence[Any]] = None):
    """Builds the mesh over `devices` (default: all).

    Args:
      mesh_shape: one size per axis; one -1 takes the devices left over by the
        fixed sizes, which must divide the device count (so (-1, 1, 2) is
        data=4 x model=2 on 8 devices and cannot run on 1).
      axis_names: default ('data', 'fsdp', 'model'), or ('data', 'model') for
        a two-axis `mesh_shape`.
      rules: a rule set's name (one of RULE_SETS) or (logical axis, mesh axes)
        pairs; mesh axes are a name, a tuple of names, or None.
      devices: the devices of the mesh.
    """
    if isinstance(rules, str):
      if rules not in RULE_SETS:
        raise UserError(f"unknown rule set '{rules}'; use one of {sorted(RULE_SETS)} "
                        'or a list of (logical axis, mesh axis) pairs.')
      rules = RULE_SETS[rules]
    if axis_names is None:
      axis_names = ('data', 'model') if len(mesh_shape) == 2 else AXIS_NAMES
    devices = list(devices) if devices is not None else jax.devices()
    if len(mesh_shape) != len(axis_names):
      raise UserError(f'mesh shape {tuple(mesh_shape)} and axis names '
                      f'{tuple(axis_names)} differ in length; give one size per axis.')
    self.rules = _fit_rules(rules, axis_names)
    shape = _resolve_mesh_shape(mesh_shape, len(devices))
    self.mesh = jax.make_mesh(
        shape, tuple(axis_names),
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices)

  @contextlib.contextmanager
  def activate(self):
    """Makes the mesh and rules current, so logical constraints take effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  @property
  def data_axes(self) -> tuple[str, ...]:
    """Mesh axes that the batch dimension is split over."""
    return tuple(a for logical, mesh in self.rules if logical == 'batch'
                 for a in _as_tuple(mesh))

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

  def check_divisible(self, boxed_tree: Any) -> None:
    """Raises a UserError naming the first array dimension (of a tree of
    logically partitioned values) that its mesh axes do not divide."""
    boxes = jax.tree_util.tree_leaves_with_path(
        boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for path, box in boxes:
      if not isinstance(box, nn.Partitioned):
        continue  # unnamed: replicated
      names = box.names
      if path and getattr(path[0], 'key', None) == 'params':
        path = path[1:]  # a variables tree: name the parameter as the model does
      mesh_specs = nn.logical_to_mesh_axes(names, self.rules)
      for name, mesh_axes, size in zip(names, mesh_specs, box.value.shape):
        axes = _as_tuple(mesh_axes)
        n = math.prod(self.mesh.shape[a] for a in axes)
        if size % n and name not in REPLICATED_IF_INDIVISIBLE:
          where = ' x '.join(f"'{a}'" for a in axes)
          raise UserError(
              f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')} has "
              f"logical axis '{name}' of size {size}, which mesh axis {where} of size {n} "
              f"does not divide; make '{name}' a multiple of {n} in the model config, or "
              'change the mesh or the rules.')

  def check(self, boxed_params: Any, batch_size: int) -> None:
    """All layout checks that can fail before compiling (one-line UserErrors)."""
    self.check_batch_size(batch_size)
    self.check_divisible(boxed_params)

  def logical_shardings(self, boxed_tree: Any) -> Any:
    """NamedShardings for a tree of (possibly) logically partitioned values.

    Raises a UserError if a mesh axis does not divide the dimension it shards.
    """
    self.check_divisible(boxed_tree)
    specs = jax.tree_util.tree_map(
        self._logical_spec, boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  def _logical_spec(self, leaf: Any) -> jax.P:
    """The leaf's logical PartitionSpec (`nn.get_partition_spec`'s), with the
    REPLICATED_IF_INDIVISIBLE axes that the mesh does not divide set to None."""
    if (not isinstance(leaf, nn.Partitioned) or
        not set(leaf.names) & set(REPLICATED_IF_INDIVISIBLE)):
      return nn.get_partition_spec(leaf)
    names = list(leaf.names)
    for i, (name, size) in enumerate(zip(names, leaf.value.shape)):
      if name in REPLICATED_IF_INDIVISIBLE:
        axes = _as_tuple(nn.logical_to_mesh_axes((name,), self.rules)[0])
        if size % math.prod(self.mesh.shape[a] for a in axes):
          names[i] = None
    return leaf.replace(names=tuple(names)).get_partition_spec()

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
