"""Orbax checkpoints: periodic save, keep the last K, resume from the latest
undamaged one, and params-only initialisation from another run.

A checkpoint `checkpoints/<step>/` holds `state` (the train-state pytree,
sharded arrays as they are on the mesh), `meta` (JSON: step, data position, and
a fingerprint of every array so damaged files are detected on restore instead
of being trained on) and, when given, `data`: each host's tf.data iterator, so
a resumed run continues the input stream where it stopped without replaying it.
"""

import dataclasses
import logging
import os
import tempfile
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tensorflow as tf

from t5x_lite import param_layout
from t5x_lite.errors import UserError

log = logging.getLogger(__name__)


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves / restores this host's tf.data iterator (tf.train.Checkpoint format)."""

  def _prefix(self, directory) -> str:
    return os.path.join(str(directory), f'process_{jax.process_index()}')

  def save(self, directory, args: 'DataIterator'):
    tf.train.Checkpoint(iterator=args.iterator).write(self._prefix(directory))

  def restore(self, directory, args: 'DataIterator'):
    tf.train.Checkpoint(iterator=args.iterator).read(self._prefix(directory)).assert_consumed()
    return args.iterator

  def metadata(self, directory):
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DataIterator(ocp.args.CheckpointArgs):
  iterator: Any


@jax.jit
def fingerprint(tree: Any) -> list[jax.Array]:
  """A position-sensitive uint32 checksum of each array in `tree`."""
  def one(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.dtype.itemsize == 4:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      bits = x.astype(jnp.uint32)
    bits = bits.reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)
  return [one(x) for x in jax.tree_util.tree_leaves(tree)]


def _fingerprint_list(tree: Any) -> list[int]:
  return [int(v) for v in jax.device_get(fingerprint(tree))]


class Checkpointer:
  """Saves and restores train-state pytrees under `<model_dir>/checkpoints`."""

  def __init__(self, model_dir: str, save_period: int, keep: Optional[int] = 3,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(model_dir), 'checkpoints')
    self.save_period = save_period
    self._checkpointable_iterator = None
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_period == 0 or self.manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_position: int,
           data_iterator: Optional[tf.data.Iterator] = None) -> None:
    """Starts saving `state` (asynchronously where orbax supports it).

    `data_iterator`, positioned after `data_position` batches, is saved too;
    an iterator that tf.data cannot checkpoint is left out with a warning (a
    resumed run then replays the input pipeline up to `data_position`).
    """
    meta = {'step': int(step), 'data_position': int(data_position),
            'fingerprint': _fingerprint_list(state)}
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None and self._iterator_checkpointable(data_iterator):
      items['data'] = DataIterator(data_iterator)
    meta['data_iterator'] = 'data' in items
    items['meta'] = ocp.args.JsonSave(meta)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _iterator_checkpointable(self, iterator: tf.data.Iterator) -> bool:
    """Whether tf.data can save this iterator (checked once, on a scratch dir)."""
    if self._checkpointable_iterator is None:
      with tempfile.TemporaryDirectory() as scratch:
        try:
          tf.train.Checkpoint(iterator=iterator).write(os.path.join(scratch, 'probe'))
          self._checkpointable_iterator = True
        except (tf.errors.OpError, ValueError, TypeError) as e:
          log.warning('the input pipeline cannot be checkpointed (%s); a resumed run will '
                      'replay it up to its data position instead.', str(e).splitlines()[0][:200])
          self._checkpointable_iterator = False
    return self._checkpointable_iterator

  def restore_latest(self, abstract_state: Any,
                     new_data_iterator: Optional[Callable[[], tf.data.Iterator]] = None
                     ) -> Optional[tuple[Any, dict, Optional[tf.data.Iterator]]]:
    """Restores the newest undamaged checkpoint onto the shardings in
    `abstract_state` (a tree of jax.ShapeDtypeStruct with .sharding).

    Returns (state, meta, data iterator), or None when there is no checkpoint.
    The iterator, made by `new_data_iterator` and set to the saved position, is
    None when the checkpoint holds none. A damaged checkpoint is reported and
    the previous one is used.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta']
        items = {'state': ocp.args.StandardRestore(abstract_state)}
        if new_data_iterator is not None and meta.get('data_iterator'):
          items['data'] = DataIterator(new_data_iterator())
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored['state']
        if meta.get('fingerprint') != _fingerprint_list(state):
          raise ValueError('array contents do not match the fingerprint saved with them')
        return state, meta, restored['data'] if 'data' in items else None
      except Exception as e:  # pylint: disable=broad-except
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning('checkpoint %s/%d is damaged (%s); trying the previous one.',
                    self.directory, step, reason[:300])
    if steps:
      raise UserError(f'every checkpoint in {self.directory} is damaged (steps {steps}); '
                      'move that directory away to start over, or restore it from a backup.')
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _resolve_step_dir(path: str) -> str:
  """Accepts a step directory, a `checkpoints/` directory or a model dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'state')):
    return path
  ckpt_dir = os.path.join(path, 'checkpoints') if os.path.isdir(
      os.path.join(path, 'checkpoints')) else path
  steps = sorted(int(d) for d in os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) and all(
      d.isdigit() for d in os.listdir(ckpt_dir)) else []
  if not steps:
    raise UserError(f'no checkpoint found at INITIAL_CHECKPOINT_PATH={path}; give a '
                    "'<model_dir>/checkpoints/<step>' directory written by t5x_lite.")
  return os.path.join(ckpt_dir, str(steps[-1]))


def _restore_params(step_dir: str, abstract_params: Any, fresh: Sequence[str] = ()) -> Any:
  abstract = {'params': abstract_params}
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, 'state'),
        args=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True))
  except (ValueError, KeyError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'checkpoint {step_dir} does not fit the model ({first[:300]}); '
                    'check that the model gin matches the one that wrote it.') from None
  missing = [jax.tree_util.keystr(path) for path, x in
             jax.tree_util.tree_leaves_with_path(restored['params'])
             if isinstance(x, jax.ShapeDtypeStruct)  # partial restore leaves them
             and not any(getattr(k, 'key', None) in fresh for k in path)]
  if missing:
    raise UserError(f'checkpoint {step_dir} has no parameter {missing[0]} of the model; '
                    'check that the model gin matches the one that wrote it (a new head '
                    "starts fresh when its name is in FRESH_PARAMS, e.g. ('classifier',)).")
  got = jax.tree_util.tree_map(lambda x: tuple(x.shape), restored['params'])
  want = jax.tree_util.tree_map(lambda x: x.shape, abstract_params)
  if got != want:
    raise UserError(f'checkpoint {step_dir} has parameter shapes that do not fit the model; '
                    'check that the model gin matches the one that wrote it.')
  return restored['params']


def restore_params(path: str, abstract_params: Any, fresh: Sequence[str] = ()) -> Any:
  """Loads only the parameters of a checkpoint (fine-tuning from a pretrained
  run): optimizer state, step and data position are not taken. A checkpoint of
  the other layer layout (a loop of `layers_{i}` vs one scanned `layers`
  stack) is converted.

  Params under a subtree named in `fresh` (a new head, e.g. 'classifier') may
  be absent from the checkpoint: they come back as their ShapeDtypeStruct, for
  the caller to initialise (see `Trainer.init_state`). Params of the
  checkpoint that the model lacks (e.g. pretraining heads) are ignored.
  """
  step_dir = _resolve_step_dir(path)
  try:
    return _restore_params(step_dir, abstract_params, fresh)
  except UserError:
    for stored_as, back in ((param_layout.unstack_layers, param_layout.stack_layers),
                            (param_layout.stack_layers, param_layout.unstack_layers)):
      other = jax.eval_shape(stored_as, abstract_params)
      if jax.tree_util.tree_structure(other) == jax.tree_util.tree_structure(abstract_params):
        continue  # no layers to convert
      try:
        return back(_restore_params(step_dir, other, fresh))
      except UserError:
        pass
    raise
