"""Orbax checkpoints: periodic save, keep the last K, resume from the latest
undamaged one, and params-only initialisation from another run.

A checkpoint `checkpoints/<step>/` holds `state` (the train-state pytree,
sharded arrays as they are on the mesh), `meta` (JSON: step, data position, and
a fingerprint of every array so damaged files are detected on restore instead
of being trained on) and, when given, `data`: each host's tf.data iterator, so
a resumed run continues the input stream where it stopped without replaying it.

What goes wrong is told apart: a damaged checkpoint (a fingerprint mismatch, a
missing, truncated or unreadable file inside it) is moved aside to
`checkpoints/<step>.damaged-<time>` and the previous one is used; a checkpoint
that does not fit the configured model, and a storage error (permission, full
disk, missing directory), stop the run with one line and touch nothing; a save
that fails stops the run with one line and leaves the earlier checkpoints as
they were.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tensorflow as tf
from etils import epath

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


class Damaged(Exception):
  """A checkpoint with a missing, truncated or unreadable file, or arrays that
  do not match their fingerprint."""


# tensorstore statuses that mean a file of the checkpoint is gone or cut short.
_DAMAGE_STATUSES = ('DATA_LOSS', 'OUT_OF_RANGE', 'NOT_FOUND')
_BAD_FILE_STATUSES = ('FAILED_PRECONDITION', 'INVALID_ARGUMENT')  # with 'Error reading <file>'
_STORAGE_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO)
_STORAGE_WORDS = tuple((w, w) for w in (
    'Permission denied', 'No space left on device', 'Read-only file system',
    'Disk quota exceeded', 'Input/output error')) + (('PERMISSION_DENIED', 'Permission denied'),)
_DAMAGED = '.damaged-'


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  line = text.splitlines()[0] if text else type(e).__name__
  return line.split(' [tensorstore_spec')[0][:300]  # tensorstore appends its whole spec


def _causes(e: BaseException):
  while e is not None:
    yield e
    e = e.__cause__


def _storage_problem(e: BaseException) -> Optional[str]:
  """What is wrong when `e` is a storage error (permission, full disk, I/O), else None."""
  for c in _causes(e):
    if isinstance(c, OSError) and c.errno in _STORAGE_ERRNOS:
      return f'{c.strerror}: {c.filename}' if c.filename else (c.strerror or _first_line(c))
    text = str(c)
    said = [label for word, label in _STORAGE_WORDS if word in text]
    if said or isinstance(c, tf.errors.PermissionDeniedError):
      path = re.search(r'"(/[^"]*)"', text)  # tensorstore quotes the file it failed on
      return f'{(said or ["Permission denied"])[0]}: {path.group(1)}' if path else _first_line(c)
  return None


def _damage_reason(e: BaseException) -> str:
  """'<file> is cut short' for tensorstore's long messages, else the first line."""
  if isinstance(e, FileNotFoundError) and e.filename:
    return f'{e.filename} is missing'
  text = str(e)
  paths = re.findall(r'"(/[^"]*)"', text)
  status = text.split(':', 1)[0]
  if paths and status.isupper():
    word = {'OUT_OF_RANGE': 'cut short', 'NOT_FOUND': 'missing', 'DATA_LOSS': 'corrupt'}
    return f'{paths[-1]} is {word.get(status, "unreadable")}'
  return _first_line(e)


def _is_damage(e: BaseException) -> bool:
  """Whether `e` says a file of the checkpoint is missing, cut short or garbled."""
  def one(c):
    if isinstance(c, (Damaged, json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError,
                      tf.errors.NotFoundError, tf.errors.DataLossError)):
      return True
    text = str(c)
    return isinstance(c, ValueError) and (text.startswith(_DAMAGE_STATUSES) or (
        text.startswith(_BAD_FILE_STATUSES) and 'Error reading' in text))
  return any(one(c) for c in _causes(e))


def _quiet_late_callbacks() -> None:
  """After a failed read or write, tensorstore's remaining callbacks land on
  orbax's closed event loop, each printing a 'RuntimeError: Event loop is
  closed' traceback: drop those (only those) so the one line stays one."""
  previous = sys.unraisablehook
  if getattr(previous, 't5x_lite_quiet', False):
    return
  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)
  hook.t5x_lite_quiet = True
  sys.unraisablehook = hook


class _OrbaxStorageErrors(logging.Filter):
  """Drops orbax's error logs (each with a traceback, from its background
  threads) about a storage error, and asyncio's 'Task exception was never
  retrieved' for an orbax read that failed on a damaged file or the storage:
  the Checkpointer reports each in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if record.name == 'asyncio':
      return record.levelno < logging.ERROR or exc is None or not (
          _is_damage(exc) or _storage_problem(exc))
    if record.levelno < logging.ERROR or f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    return not ((exc is not None and _storage_problem(exc))
                or any(w in record.getMessage() for w, _ in _STORAGE_WORDS))


def _quiet_orbax_storage_errors() -> None:
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxStorageErrors) for f in logger.filters):
      logger.addFilter(_OrbaxStorageErrors())


@contextlib.contextmanager
def _reading(step_dir: str):
  """Turns what goes wrong reading `step_dir` into Damaged (the checkpoint's
  fault) or a UserError (the storage's); any other error passes as it is."""
  try:
    yield
  except (UserError, Damaged):
    raise
  except Exception as e:  # pylint: disable=broad-except  (sorted, or raised as it is)
    problem = _storage_problem(e)
    if problem:
      raise UserError(f'cannot read checkpoint {step_dir} ({problem}); fix the permissions '
                      'or the storage, then re-run.') from None
    if not os.path.isdir(step_dir):
      raise UserError(f'checkpoint {step_dir} is missing ({_first_line(e)}); check that '
                      'nothing else is moving or deleting checkpoints, then re-run.') from None
    if _is_damage(e):
      raise Damaged(_damage_reason(e)) from e
    raise


def _key(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                  for k in path)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/encoder/...': shape} of every array (leaves without a shape are skipped)."""
  return {_key(path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(x, 'shape')}


def _stored_shapes(state_dir: str) -> dict[str, tuple[int, ...]]:
  """The array shapes orbax recorded in a saved state, without reading the arrays."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(state_dir))
  finally:
    handler.close()
  return _shapes(getattr(metadata, 'tree', metadata))


def _check_fits(step_dir: str, stored: dict, wanted: dict) -> None:
  """A UserError naming the first differing arrays when the checkpoint's tree
  or shapes differ from the configured model's."""
  diffs = sorted((k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k)),
                 key=lambda k: (not k.startswith('params/'), k))
  if not diffs:
    return
  def shape(shapes, k):
    return str(shapes[k]) if k in shapes else 'absent'
  shown = '; '.join(f'{k}: model {shape(wanted, k)}, checkpoint {shape(stored, k)}'
                    for k in diffs[:3])
  more = f' and {len(diffs) - 3} more' if len(diffs) > 3 else ''
  model_dir = os.path.dirname(os.path.dirname(step_dir))
  raise UserError(f'checkpoint {step_dir} does not fit the configured model ({shown}{more}); '
                  'the model config likely changed since it was written: run with the config '
                  f'it was written with ({model_dir}/config.gin), or give the run a new '
                  'MODEL_DIR.')


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f't5x_lite_checkpoints_{name}')


class Checkpointer:
  """Saves and restores train-state pytrees under `<model_dir>/checkpoints`."""

  def __init__(self, model_dir: str, save_period: int, keep: Optional[int] = 3,
               async_save: bool = True, meta: Optional[dict[str, Any]] = None):
    # `meta`: JSON written into every checkpoint's meta beside the step (e.g.
    # the base checkpoint of LoRA adapters); `read_meta` reads it back.
    self.directory = os.path.join(os.path.abspath(model_dir), 'checkpoints')
    self.extra_meta = dict(meta or {})
    self.save_period = save_period
    self.keep = keep
    self._checkpointable_iterator = None
    self._pending: Optional[int] = None  # the step being saved in the background
    self._failed = False
    _quiet_orbax_storage_errors()
    try:
      os.makedirs(self.directory, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=self.directory, prefix='.write-probe-'):
        pass
      # Retention is ours (see _prune): orbax's would delete old steps even
      # when the new one failed to write.
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None, create=True, cleanup_tmp_directories=True,
              enable_async_checkpointing=async_save))
    except OSError as e:
      if os.path.basename(str(e.filename)).startswith('.write-probe-'):
        e.filename = self.directory
      problem = _storage_problem(e) or _first_line(e)
      raise UserError(f'cannot write checkpoints to {self.directory} ({problem}); fix the '
                      'permissions or free space there, or choose another MODEL_DIR.') from None

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

    A save that fails on storage (now, or in the background: reported by the
    next save, `wait` or `close`) is a UserError; the earlier checkpoints are
    left as they were.
    """
    self._finish()
    meta = {**self.extra_meta, 'step': int(step), 'data_position': int(data_position),
            'fingerprint': _fingerprint_list(state),
            'shapes': {k: list(v) for k, v in _shapes(state).items()}}
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None and self._iterator_checkpointable(data_iterator):
      items['data'] = DataIterator(data_iterator)
    meta['data_iterator'] = 'data' in items
    items['meta'] = ocp.args.JsonSave(meta)
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(e)
      raise

  def _finish(self) -> None:
    """Waits for the save in progress; keeps the newest `keep` once it is on disk."""
    if self._pending is None or self._failed:
      return
    try:
      self.manager.wait_until_finished()
      if not os.path.isdir(os.path.join(self.directory, str(self._pending))):
        raise OSError(errno.EIO, 'the checkpoint was not finalized',
                      os.path.join(self.directory, str(self._pending)))
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(e)
      raise
    self._pending = None
    self._prune()

  def _prune(self) -> None:
    steps = self.all_steps()
    if self.keep is not None:
      for step in steps[:max(len(steps) - max(self.keep, 1), 0)]:
        self.manager.delete(step)

  def _save_failed(self, e: Exception) -> None:
    """For a storage error: one line naming the checkpoint that survives. The
    failed step's partial `<step>.orbax-checkpoint-tmp` directory goes when
    the next Checkpointer opens the directory (orbax's writes still in flight
    may outlive this one)."""
    step, self._failed = self._pending, True
    problem = _storage_problem(e)
    if problem is None:
      return  # not a storage error: it goes up as it is
    _quiet_late_callbacks()
    with contextlib.suppress(Exception):  # it is the failure reported below
      self.manager.close()
    if jax.process_index() == 0 and os.path.isdir(os.path.join(self.directory, str(step))):
      _rename_aside(os.path.join(self.directory, str(step)))  # in place, yet not to be trusted
    kept = sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())
    latest = f'{self.directory}/{kept[-1]}' if kept else 'none yet'
    raise UserError(f'writing checkpoint {self.directory}/{step} failed ({problem}); the '
                    f'earlier checkpoints are intact (latest: {latest}); free space or fix '
                    f'the permissions of {self.directory}, then re-run to resume.') from None

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
    None when the checkpoint holds none. A damaged checkpoint is moved aside
    (`<step>.damaged-<time>`, out of the step listing) and the previous one is
    used. A checkpoint that does not fit `abstract_state`, or a storage error,
    is a UserError, and nothing on disk is changed.
    """
    _quiet_late_callbacks()
    moved = []
    for step in reversed(self.all_steps()):
      try:
        return self._restore(step, abstract_state, new_data_iterator)
      except Damaged as e:
        moved.append(self._move_aside(step))
        log.warning('checkpoint %s/%d is damaged (%s); moved it to %s and trying the previous '
                    'one.', self.directory, step, e, moved[-1])
    if moved:
      raise UserError(f'every checkpoint in {self.directory} is damaged (moved aside: '
                      f'{", ".join(os.path.basename(m) for m in moved)}); re-run to start from '
                      'step 0, or put a checkpoint back from a backup.')
    return None

  def _restore(self, step: int, abstract_state: Any,
               new_data_iterator: Optional[Callable[[], tf.data.Iterator]]):
    step_dir = os.path.join(self.directory, str(step))
    with _reading(step_dir):
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
      if not isinstance(meta, dict) or not isinstance(meta.get('fingerprint'), list):
        raise Damaged('its meta file has no fingerprint')
      with open(os.path.join(step_dir, 'state', '_METADATA'), 'rb') as f:
        json.loads(f.read())  # orbax's tree metadata: unreadable means damaged
      stored = ({k: tuple(v) for k, v in meta['shapes'].items()}
                if isinstance(meta.get('shapes'), dict)  # else written before shapes were kept
                else _stored_shapes(os.path.join(step_dir, 'state')))
    _check_fits(step_dir, stored, _shapes(abstract_state))
    with _reading(step_dir):
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))['state']
      if meta['fingerprint'] != _fingerprint_list(state):
        raise Damaged('array contents do not match the fingerprint saved with them')
    iterator = None
    if new_data_iterator is not None and meta.get('data_iterator'):
      try:
        with _reading(step_dir):
          iterator = self.manager.restore(step, args=ocp.args.Composite(
              data=DataIterator(new_data_iterator())))['data']
      except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise UserError(f'the input pipeline position saved in {step_dir} does not fit the '
                        f'configured pipeline ({_first_line(e)}); the data config likely '
                        'changed since it was written: run with the config it was written '
                        'with, or give the run a new MODEL_DIR.') from None
    return state, meta, iterator

  def _move_aside(self, step: int) -> str:
    """Renames checkpoints/<step> to <step>.damaged-<time>, which orbax does not list."""
    src = os.path.join(self.directory, str(step))
    dst = _rename_aside(src) if jax.process_index() == 0 else f'{src}{_DAMAGED}...'
    _sync(f'move_aside_{step}')
    self.manager.reload()
    return dst

  def wait(self) -> None:
    self._finish()

  def close(self) -> None:
    if self._failed:
      return  # closed when the failure was reported
    try:
      self._finish()
    finally:
      if not self._failed:
        self.manager.close()


def _rename_aside(src: str) -> str:
  """Renames the step directory `src` to `<src>.damaged-<time>`; returns the new name."""
  dst = base = f'{src}{_DAMAGED}{time.strftime("%Y%m%d-%H%M%S")}'
  n = 1
  while os.path.exists(dst):
    n += 1
    dst = f'{base}-{n}'
  try:
    os.rename(src, dst)
  except OSError as e:
    raise UserError(f'checkpoint {src} is damaged but cannot be moved aside '
                    f'({_storage_problem(e) or _first_line(e)}); move it away yourself, '
                    'then re-run.') from None
  return dst


def read_meta(step_dir: str) -> dict[str, Any]:
  """The meta JSON of a step directory (step, data position, `Checkpointer`'s
  `meta`); {} for a step written without one."""
  path = os.path.join(step_dir, 'meta', 'metadata')
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path} ({_first_line(e)}); use another step of the run, '
                    'or put the checkpoint back from a backup.') from None
  return meta if isinstance(meta, dict) else {}


def resolve_step_dir(path: str) -> str:
  """Accepts a step directory, a `checkpoints/` directory or a model dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'state')):
    return path
  ckpt_dir = os.path.join(path, 'checkpoints') if os.path.isdir(
      os.path.join(path, 'checkpoints')) else path
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(
      ckpt_dir) else []
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
  step_dir = resolve_step_dir(path)
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
