"""What the library asks of seqio's task registry.

A task or mixture by name, the tasks under it, whether the data they read is
present, and what a registration says beyond seqio's Task (the candidate label
words of a classification task). Nothing here registers a task: an entry point
imports the modules that do (`t5x_lite.tasks` for the built-in ones; a user's
own module by an `import` line in gin).
"""

import dataclasses
import difflib
from typing import Optional, Protocol, runtime_checkable

import seqio

from t5x_lite.data import sources
from t5x_lite.errors import UserError


def get_task_or_mixture(name: str, hint: str = '') -> seqio.Task | seqio.Mixture:
  """The registered task or mixture `name`; an unknown name is a UserError
  with the closest registered names (and `hint`, where to find them all)."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
    by_key = {k.lower(): k for k in known}
    close = [by_key[k] for k in difflib.get_close_matches(name.lower(), list(by_key), n=3)]
    found = (f"did you mean {', '.join(close)}?" if close
             else f'no registered name is close (there are {len(known)}).')
    raise UserError(
        f"no task or mixture named '{name}'; {found}{hint} A task of your own is "
        'registered by an `import` of its module in a --gin_file (`import t5x_lite.tasks` '
        'for the built-in ones).') from None


def tasks_of(name: str) -> list[seqio.Task]:
  """The task `name`, or the tasks a mixture `name` mixes."""
  task_or_mixture = get_task_or_mixture(name)
  if isinstance(task_or_mixture, seqio.Mixture):
    return list(task_or_mixture.tasks)
  return [task_or_mixture]


# ----------------------------------------------------------------------------
# Data availability.


@runtime_checkable
class CheckedSource(Protocol):
  """A source whose data may be missing, and says so before anything is built."""

  def check_available(self, split: Optional[str] = None) -> None:
    """Raises UserError unless the data (of `split`, if given) can be read."""


def check_data_available(task_or_mixture_name: str, split: Optional[str] = None) -> None:
  """Raises UserError if any data a task or mixture reads (of `split`, when
  given) is missing.

  Call it before building models or compiling steps; a no-op for tasks whose
  data is always present (the embedded corpus) or checked when registered (files).
  """
  for task in tasks_of(task_or_mixture_name):
    source = task.source
    if isinstance(source, CheckedSource):
      source.check_available(split)
    elif isinstance(source, seqio.TfdsDataSource):
      tfds_name = source.tfds_dataset.name
      data_dir = sources.tfds_data_dir(source.tfds_dataset.data_dir)
      if tfds_name and not sources.tfds_prepared_dirs(tfds_name, data_dir):
        raise UserError(
            f'TFDS dataset {tfds_name} for task {task.name} not found in data '
            f'dir {data_dir}; prepare it with tfds into TFDS_DATA_DIR.')


# ----------------------------------------------------------------------------
# Task metadata.


@dataclasses.dataclass(frozen=True)
class TaskMetadata:
  """What a registration says about a task beyond seqio's Task.

  label_words: the candidate targets of a text-to-text classification task, by
    class id (rank classification scores each); None for other tasks.
  """
  label_words: Optional[tuple[str, ...]] = None


_METADATA: dict[str, TaskMetadata] = {}


def add_task(name: str, *, label_words=None, **task_kwargs) -> seqio.Task:
  """`seqio.TaskRegistry.add(name, **task_kwargs)` with this task's metadata,
  replacing a task (and its metadata) already registered as `name`."""
  seqio.TaskRegistry.remove(name)
  _METADATA.pop(name, None)
  task = seqio.TaskRegistry.add(name, **task_kwargs)
  if label_words:
    _METADATA[name] = TaskMetadata(label_words=tuple(label_words))
  return task


def metadata(task: seqio.Task | str) -> TaskMetadata:
  """The metadata of a task (or task name); empty when its registration gave none."""
  return _METADATA.get(task if isinstance(task, str) else task.name, TaskMetadata())


def label_words(task: seqio.Task | str) -> Optional[list[str]]:
  """The candidate targets of a classification task, by class id; else None."""
  words = metadata(task).label_words
  return list(words) if words else None
