"""seqio data sources: the embedded corpus and local text / JSONL files.

Every source yields examples with one string feature, 'text'.

- `embedded_source()`: the stdlib documentation corpus of
  `t5x_lite.data.corpus`, splits 'train' and 'validation'.
- `text_file_source(split_to_paths)`: plain text, ONE DOCUMENT PER LINE; empty
  (whitespace-only) lines are skipped.
- `jsonl_file_source(split_to_paths, text_key)`: JSON Lines, one object per
  line; the document is the string field `text_key`. Blank lines are skipped.

Paths may be files or glob patterns (anything `tf.io.gfile` reads, so gs://
works). A path that matches nothing raises `UserError` at once; a malformed
JSONL line raises `UserError` naming the file and line number when the
dataset is built (every file is checked once per process before reading).
"""

import functools
import json

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import corpus
from t5x_lite.errors import UserError


def _shuffle_seed(seed):
  return None if seed is None else int(seed) % (2**31)


class FunctionSource(seqio.FunctionDataSource):
  """seqio.FunctionDataSource whose dataset_fn shuffles by seed itself.

  Same behaviour, minus seqio's warning that uncached function sources shuffle
  poorly: ours shuffle their documents / files with the given seed.
  """

  def get_dataset(self, split='train', shuffle=True, seed=None,
                  shard_info=None, **unused_kwargs):
    if shard_info and shard_info.num_shards > 1:
      raise ValueError('FunctionSource does not support low-level sharding.')
    return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed)


# ----------------------------------------------------------------------------
# Embedded corpus.


def _embedded_dataset_fn(split, shuffle_files, seed=None):
  docs = corpus.split_documents(split)
  if shuffle_files:  # a fixed permutation per seed: cheap and deterministic
    rng = np.random.default_rng(_shuffle_seed(seed))
    docs = [docs[i] for i in rng.permutation(len(docs))]
  return tf.data.Dataset.from_tensor_slices({'text': tf.constant(docs)})


def embedded_source():
  """The embedded corpus as a seqio source ('train' / 'validation')."""
  return FunctionSource(
      dataset_fn=_embedded_dataset_fn, splits=('train', 'validation'))


# ----------------------------------------------------------------------------
# Local files.


def resolve_paths(paths):
  """Sorted files matching `paths` (a path, glob or a list of them)."""
  if isinstance(paths, (str, bytes)) or hasattr(paths, '__fspath__'):
    paths = [paths]
  files = []
  for pattern in paths:
    pattern = str(pattern)
    matched = sorted(tf.io.gfile.glob(pattern))
    matched = [m for m in matched if not tf.io.gfile.isdir(m)]
    if not matched:
      raise UserError(
          f'Data file not found: {pattern}; check the path (globs are '
          'allowed) or create the file.')
    files.extend(matched)
  return files


def _read_lines(files, shuffle_files, seed):
  files = list(files)
  if shuffle_files:
    rng = np.random.default_rng(_shuffle_seed(seed))
    files = [files[i] for i in rng.permutation(len(files))]
  return tf.data.TextLineDataset(files)


def text_file_source(split_to_paths):
  """Plain-text files, one document per line, as a seqio source."""
  split_to_files = {s: resolve_paths(p) for s, p in split_to_paths.items()}

  def dataset_fn(split, shuffle_files, seed=None):
    ds = _read_lines(split_to_files[split], shuffle_files, seed)
    ds = ds.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
    return ds.map(lambda line: {'text': line})

  return FunctionSource(
      dataset_fn=dataset_fn, splits=tuple(split_to_files))


def _jsonl_text(line, path, lineno, text_key):
  try:
    row = json.loads(line)
  except ValueError as e:
    raise UserError(
        f'Malformed JSON at {path} line {lineno}: {e}; fix or remove the '
        'line.') from None
  if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
    raise UserError(
        f'{path} line {lineno} has no string field {text_key!r}; set '
        'text_key to the field that holds the document text.')
  return row[text_key]


@functools.lru_cache(maxsize=None)
def validate_jsonl(path, text_key, size, mtime):
  """Checks every line of a JSONL file once (keyed by size / mtime)."""
  del size, mtime  # cache key only
  with tf.io.gfile.GFile(path, 'r') as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        _jsonl_text(line, path, lineno, text_key)


def jsonl_file_source(split_to_paths, text_key='text'):
  """JSON Lines files (document = field `text_key`) as a seqio source."""
  split_to_files = {s: resolve_paths(p) for s, p in split_to_paths.items()}

  def dataset_fn(split, shuffle_files, seed=None):
    files = split_to_files[split]
    for path in files:
      stat = tf.io.gfile.stat(path)
      validate_jsonl(path, text_key, stat.length, stat.mtime_nsec)
    ds = _read_lines(files, shuffle_files, seed)
    ds = ds.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)

    def parse(line):
      return _jsonl_text(line.numpy().decode('utf-8'), '<jsonl>', 0, text_key)

    def to_example(line):
      text = tf.py_function(parse, [line], tf.string)
      text.set_shape([])
      return {'text': text}

    return ds.map(to_example)

  return FunctionSource(
      dataset_fn=dataset_fn, splits=tuple(split_to_files))


# ----------------------------------------------------------------------------
# TFDS, never downloading.


def tfds_data_dir(configured=None):
  """The TFDS data dir in use: `configured`, else $TFDS_DATA_DIR, else ~."""
  if configured:
    return configured
  return tfds_constants().get_default_data_dir()


def tfds_constants():
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
  return constants


def tfds_prepared_dirs(tfds_name, data_dir):
  """Prepared directories of `tfds_name` ('name/config:version') in data_dir."""
  name, _, version = tfds_name.partition(':')
  version = version or '*'
  pattern = '/'.join([data_dir.rstrip('/'), name, version, 'dataset_info.json'])
  try:
    return sorted(tf.io.gfile.glob(pattern))
  except tf.errors.OpError:
    return []


class PreparedTfdsDataSource(seqio.TfdsDataSource):
  """A TfdsDataSource that reads only prepared data and never downloads.

  Before any read it checks that the dataset is prepared under the data dir
  (`tfds_data_dir`, or $TFDS_DATA_DIR at call time, or ~/tensorflow_datasets)
  and otherwise raises `UserError` with `missing_hint` appended.
  """

  def __init__(self, tfds_name, splits, tfds_data_dir=None, missing_hint=''):
    super().__init__(tfds_name, splits=splits, tfds_data_dir=tfds_data_dir,
                     read_only=True)
    self._tfds_name = tfds_name
    self._configured_dir = tfds_data_dir
    self._missing_hint = missing_hint
    self._loaders = {}

  @property
  def tfds_name(self):
    return self._tfds_name

  def check_available(self, split=None):
    """Raises UserError unless the dataset is prepared; returns the data dir."""
    del split  # a prepared dataset has all of its splits
    data_dir = tfds_data_dir(self._configured_dir)
    if not tfds_prepared_dirs(self._tfds_name, data_dir):
      raise UserError(
          f'TFDS dataset {self._tfds_name} not found in data dir {data_dir} '
          '(set by TFDS_DATA_DIR, default ~/tensorflow_datasets); '
          f'{self._missing_hint}'.rstrip('; '))
    return data_dir

  @property
  def tfds_dataset(self):
    data_dir = self.check_available()
    if data_dir not in self._loaders:
      split_map = {k: k for k in self._splits} if self._splits else None
      self._loaders[data_dir] = seqio.utils.LazyTfdsLoader(
          self._tfds_name, data_dir=data_dir, split_map=split_map,
          read_only=True)
    return self._loaders[data_dir]

  def __str__(self):
    return f'{type(self).__name__}({self._tfds_name})'

  __repr__ = __str__
