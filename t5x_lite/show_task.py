"""See what a task feeds the model: its examples as JSON lines.

    python -m t5x_lite.show_task --task=glue_sst2_v002 [--split=validation] \
        [--num_examples=5] [--tokens] [--gin_file=FILE.gin --gin.NAME=VALUE ...]
    python -m t5x_lite.show_task --list

Each line is one example of a registered task or mixture after the task's
preprocessors: the text of every token feature ('inputs', 'targets', or what
the task has instead: 'text_a' / 'text_b' of a classification task, 'chosen' /
'rejected' of a preference task) and the task's other plain features ('idx',
'label', ...). The text is the `<feature>_pretokenized` string seqio keeps;
a feature without one (the chunks of a language-modelling or span-corruption
task) is its token ids decoded with the feature's vocabulary, each EOS inside
written '</s>'. `--tokens` adds the ids (`<feature>_ids`, cut to the feature
lengths as the model gets them) and the numeric array features.

The data settings are the run's: gin files and `--gin.` overrides parsed as
training parses them (a gin file that reads GLUE from files applies), and
MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, SEED and VOCABULARY from gin when
they set them (`--task` and `--lengths` win). A task's examples come in their
order (unshuffled); a mixture is sampled as training samples it (shuffled with
the seed, mixed at its rates, repeating), and each line names its task. The
default split 'validation' falls back to 'train' (or the only split) where a
task has none. Nothing builds a model or compiles a step.

From Python (a notebook): `show_task.examples('glue_sst2_v002', num_examples=3)`.
"""

if __name__ == '__main__':  # a run starts here: tune the host before TensorFlow loads
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import argparse
import copy
import json
import sys
from typing import Any, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from t5x_lite import gin_utils
from t5x_lite.data import pipeline
from t5x_lite.data import registry
from t5x_lite.errors import UserError

USAGE = ('usage: python -m t5x_lite.show_task --task=NAME [--split=validation] '
         '[--num_examples=5] [--tokens] [--seed=0] [--lengths=inputs:512,targets:512] '
         '[--gin_file=FILE.gin ...] [--gin.NAME=VALUE ...]   or: --list')
DEFAULT_SPLIT = 'validation'
# Feature lengths when neither --lengths nor gin's TASK_FEATURE_LENGTHS gives them
# (T5's fine-tuning inputs; long enough to leave most examples whole).
DEFAULT_LENGTHS = {'inputs': 512, 'targets': 512}
EOS_MARK = '</s>'
TASK_KEY = 'task'  # a mixture's lines: the task the example was drawn from
_TASK_TAG = '__show_task_task__'
# The modules whose data settings a `--gin.` override may bind without a gin file.
_GIN_IMPORTS = ('from __gin__ import dynamic_registration',
                'from t5x_lite.data import glue_sources',
                'from t5x_lite.data import bart_noise')


# ----------------------------------------------------------------------------
# The task, its split and its examples.


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
  return registry.get_task_or_mixture(name, hint=' `--list` shows them all.')


def _splits(task: seqio.Task) -> tuple[str, ...]:
  try:
    return tuple(task.splits)
  except Exception:  # pylint: disable=broad-except  (a source that cannot list its splits)
    return ()


def resolve_split(name: str, split: Optional[str] = None) -> str:
  """`split`, or by default 'validation', else 'train', else the first split
  any task of `name` has (said on stderr). A split that no task of `name` has
  is a UserError naming the splits there are."""
  available = list(dict.fromkeys(s for t in registry.tasks_of(name) for s in _splits(t)))
  if not available or (split or DEFAULT_SPLIT) in available:
    return split or DEFAULT_SPLIT
  if split is None:
    fallback = next(s for s in ('train', *available) if s in available)
    print(f"note: {name} has no '{DEFAULT_SPLIT}' split; showing '{fallback}'.",
          file=sys.stderr)
    return fallback
  raise UserError(f"{name} has no '{split}' split; its splits are {', '.join(available)}: "
                  'pass one of them with --split.')


def _tag_tasks(mixture: seqio.Mixture) -> seqio.Mixture:
  """A copy of `mixture` whose examples carry the name of their task. Only a
  feature is added after each task's dataset is built: the sampling (rates,
  seed, sample_fn) is the mixture's own."""
  tagged = copy.copy(mixture)
  get_task_dataset = mixture.get_task_dataset

  def get_tagged_task_dataset(task, *args, **kwargs):
    name = tf.constant(task.name)
    return get_task_dataset(task, *args, **kwargs).map(lambda x: {**x, _TASK_TAG: name})

  tagged.get_task_dataset = get_tagged_task_dataset
  return tagged


def dataset(name: str, split: str, lengths: Mapping[str, int], *, seed: Optional[int] = 0,
            vocabulary: Optional[seqio.Vocabulary] = None) -> tf.data.Dataset:
  """The examples of task or mixture `name` before the feature converter: a
  task's in order, once; a mixture's sampled as training samples them."""
  task = pipeline.with_vocabulary(get_task_or_mixture(name), vocabulary)
  registry.check_data_available(name, split)
  shard = seqio.ShardInfo(index=0, num_shards=1)
  if isinstance(task, seqio.Mixture):
    return _tag_tasks(task).get_dataset(
        dict(lengths), split=split, use_cached=False, shuffle=True, seed=seed,
        shard_info=shard, num_epochs=None, copy_pretokenized=True,
        log_mixing_proportions=False)
  return task.get_dataset(dict(lengths), split=split, use_cached=False, shuffle=False,
                          seed=seed, shard_info=shard, num_epochs=1)


# ----------------------------------------------------------------------------
# An example as a JSON object.


def decode(vocabulary: seqio.Vocabulary, ids: Sequence[int]) -> str:
  """The text of `ids`, each EOS but a final one written EOS_MARK (a
  vocabulary's `decode` stops at the first)."""
  ids = [int(i) for i in ids]
  eos = vocabulary.eos_id
  if eos is None:
    return vocabulary.decode(ids)
  if ids and ids[-1] == eos:
    ids = ids[:-1]
  pieces, piece = [], []
  for i in ids:
    if i == eos:
      pieces.append(piece)
      piece = []
    else:
      piece.append(i)
  pieces.append(piece)
  return EOS_MARK.join(vocabulary.decode(p) for p in pieces)


def _plain(value: Any) -> Any:
  """A numpy / bytes value as JSON's (text as str)."""
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value] if value.dtype == object else value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def _is_tokens(feature: seqio.Feature) -> bool:
  return (feature.dtype == tf.int32 and feature.rank >= 1
          and not isinstance(feature.vocabulary, seqio.PassThroughVocabulary))


def to_json(example: Mapping[str, Any], features: Mapping[str, seqio.Feature],
            tokens: bool = False) -> dict[str, Any]:
  """One example (numpy values) as the JSON object show_task prints: the task
  (a mixture's), each feature's text or value, the other plain features, then
  with `tokens` the ids and the numeric arrays."""
  example = dict(example)
  row, arrays = {}, {}
  if _TASK_TAG in example:
    row[TASK_KEY] = _plain(example.pop(_TASK_TAG))
  order = sorted(features, key=lambda k: ('inputs', 'targets', k).index(k)
                 if k in ('inputs', 'targets') else 2)
  for key in order:
    value = example.pop(key, None)
    text = example.pop(f'{key}_pretokenized', None)
    if value is None and text is None:
      continue
    if not _is_tokens(features[key]):
      row[key] = _plain(value)
      continue
    row[key] = _plain(text) if text is not None else decode(features[key].vocabulary, value)
    if value is not None:
      arrays[f'{key}_ids'] = _plain(value)
  for key in sorted(example):
    value = example[key]
    if isinstance(value, np.ndarray) and value.ndim and value.dtype != object:
      arrays[key] = _plain(value)
    else:
      row[key] = _plain(value)
  if tokens:
    row.update(arrays)
  return row


def examples(name: str, split: Optional[str] = None, num_examples: int = 5, *,
             tokens: bool = False, seed: Optional[int] = 0,
             lengths: Optional[Mapping[str, int]] = None,
             vocabulary: Optional[seqio.Vocabulary] = None) -> list[dict[str, Any]]:
  """The first `num_examples` examples of `name`'s `split` as JSON objects
  (see the module doc), with the data settings in effect
  (`t5x_lite.data.settings`)."""
  if num_examples < 1:
    raise UserError(f'--num_examples={num_examples}: show at least 1 example.')
  task = pipeline.with_vocabulary(get_task_or_mixture(name), vocabulary)
  split = resolve_split(name, split)
  ds = dataset(name, split, lengths or DEFAULT_LENGTHS, seed=seed, vocabulary=vocabulary)
  return [to_json(x, task.output_features, tokens)
          for x in ds.take(num_examples).as_numpy_iterator()]


# ----------------------------------------------------------------------------
# The command line.


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UserError(f'{message}; {USAGE[len("usage: "):]}')


def _lengths(text: str) -> dict[str, int]:
  """'inputs:128,targets:16' -> {'inputs': 128, 'targets': 16}."""
  lengths = {}
  for part in filter(None, text.split(',')):
    key, _, value = part.partition(':')
    if not value.strip().isdigit():
      raise UserError(f"--lengths={text}: give FEATURE:LENGTH pairs, e.g. "
                      '--lengths=inputs:128,targets:16.')
    lengths[key.strip()] = int(value)
  return lengths


def _flags() -> _Parser:
  parser = _Parser(prog='python -m t5x_lite.show_task', add_help=False, allow_abbrev=False)
  parser.add_argument('--task')
  parser.add_argument('--split')
  parser.add_argument('--num_examples', type=int, default=5)
  parser.add_argument('--tokens', action='store_true')
  parser.add_argument('--seed', type=int)
  parser.add_argument('--lengths', type=_lengths)
  parser.add_argument('--list', action='store_true')
  return parser


def main(argv: Sequence[str]) -> None:
  """Prints the examples the flags ask for, one JSON line each."""
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import  (the built-in tasks)
  flags, gin_args = _flags().parse_known_args(list(argv))
  for before, arg in zip([None] + gin_args, gin_args):
    if not arg.startswith(('--gin_file', '--gin_bindings', '--gin.')) and before not in (
        '--gin_file', '--gin_bindings'):
      raise UserError(f"unknown argument '{arg}'; {USAGE[len('usage: '):]}")
  files, bindings = gin_utils.parse_flags(gin_args, require_file=False)
  gin.clear_config()  # only these flags configure what is shown
  gin_utils.parse_gin(files, list(_GIN_IMPORTS) + bindings, check_required=False)
  if flags.list:
    for name in sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names()):
      print(name)
    return
  name = flags.task or gin_utils.macro('MIXTURE_OR_TASK_NAME')
  if not name:
    raise UserError('no --task given (and no MIXTURE_OR_TASK_NAME in gin); e.g. '
                    '--task=glue_sst2_v002, or --list for the registered names.')
  seed = flags.seed if flags.seed is not None else gin_utils.macro('SEED')
  rows = examples(name, flags.split, flags.num_examples, tokens=flags.tokens,
                  seed=0 if seed is None else seed,
                  lengths=flags.lengths or gin_utils.macro('TASK_FEATURE_LENGTHS'),
                  vocabulary=gin_utils.macro('VOCABULARY'))
  for row in rows:
    print(json.dumps(row, ensure_ascii=False), flush=True)


if __name__ == '__main__':
  import t5x_lite.show_task as show_task_module  # pylint: disable=g-import-not-at-top
  if any(a in ('-h', '--help') for a in sys.argv[1:]):
    print(show_task_module.USAGE)
  else:
    gin_utils.run(show_task_module.main, 'show_task')
