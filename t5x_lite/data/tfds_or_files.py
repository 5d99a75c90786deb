"""The seqio source whose rows come from prepared TFDS data or the user's files.

GLUE / SuperGLUE (`glue_sources`) and SQuAD / CNN-DailyMail / WMT
(`downstream_sources`) are read alike: the run's `settings.glue()` says, each
time a dataset is built or counted, whether rows come from TFDS (never
downloading) or from files. A file is checked once, then read lazily by byte
offsets, in an order of which a shard takes every k-th row and which a seed
shuffles. `TfdsOrFilesSource` holds what the two share (split lookup, the TFDS
loader and its messages, `get_dataset`, `num_input_examples`,
`check_available`); a subclass says where its files are and how their rows
are read. The helpers below read lines and batch examples into columns.
"""

import json

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import settings as settings_lib
from t5x_lite.data import sources
from t5x_lite.errors import UserError

# Where the settings are bound in gin, for messages.
SETTING = 'glue_sources.data_settings'


class BadRow(ValueError):
  """A row that cannot be read; the message says what is wrong with it."""


# ----------------------------------------------------------------------------
# Lines of files.


def open_binary(path):
  """A binary file: Python's own for local paths (fast seeks), else gfile."""
  return tf.io.gfile.GFile(path, 'rb') if '://' in path else open(path, 'rb')


def decode(raw, first=False):
  """A line's text without its newline (nor, on a first line, the BOM)."""
  if first and raw.startswith(b'\xef\xbb\xbf'):
    raw = raw[3:]
  try:
    return raw.decode('utf-8').rstrip('\r\n')
  except UnicodeDecodeError as e:
    raise BadRow(f'not UTF-8 ({e})') from None


def iter_lines(path):
  """(byte offset, line number, raw bytes) of every line of a file."""
  offset = 0
  with open_binary(path) as f:
    for lineno, raw in enumerate(f, start=1):
      start, offset = offset, offset + len(raw)
      yield start, lineno, raw


def read_line(f, offset):
  """The decoded line at byte `offset` of the open binary file `f`."""
  f.seek(offset)
  return decode(f.readline(), first=offset == 0)


def json_object(line):
  """A JSONL line's object; BadRow unless the line is one JSON object."""
  try:
    obj = json.loads(line)
  except ValueError as e:
    raise BadRow(f'malformed JSON ({e})') from None
  if not isinstance(obj, dict):
    raise BadRow('not a JSON object')
  return obj


def report_bad(log, count, on_bad_row, where, fix, files, first):
  """Raises 'Malformed row at `where`; `fix`, ...', or with on_bad_row='skip'
  logs one warning counting the `count` dropped rows of `files`."""
  if not count:
    return
  if on_bad_row == 'raise':
    raise UserError(f'Malformed row at {where}; {fix}, or set '
                    f"{SETTING}.on_bad_row = 'skip'.")
  log.warning('Skipped %d malformed row(s) of %s (%s).', count, files, first)


def row_order(num_rows, shuffle, seed, shard_info):
  """Row positions to read: a shard's every k-th row, shuffled by `seed`."""
  order = np.arange(num_rows)
  if shard_info:
    order = order[shard_info.index::shard_info.num_shards]
  if shuffle:
    seed = None if seed is None else int(seed) % 2**31
    order = np.random.default_rng(seed).permutation(order)
  return order.tolist()


# ----------------------------------------------------------------------------
# Batching examples into columns (from_generator is slow one by one).


def _batched(signature):
  """The signature of `_columns` batches: a leading batch axis, ragged lists."""
  if isinstance(signature, dict):
    return {k: _batched(v) for k, v in signature.items()}
  if signature.shape.rank:
    return tf.RaggedTensorSpec([None, None], signature.dtype, ragged_rank=1,
                               row_splits_dtype=tf.int64)
  return tf.TensorSpec([None], signature.dtype)


def _columns(examples, signature):
  """A list of examples as one batch of columns."""
  columns = {}
  for key, spec in signature.items():
    values = [ex[key] for ex in examples]
    if isinstance(spec, dict):
      columns[key] = _columns(values, spec)
    elif spec.shape.rank:
      flat = tf.constant([v for vs in values for v in vs], spec.dtype,
                         shape=[sum(len(vs) for vs in values)])
      columns[key] = tf.RaggedTensor.from_row_lengths(
          flat, np.array([len(vs) for vs in values], np.int64))
    else:
      columns[key] = np.array(values, object if spec.dtype == tf.string
                              else spec.dtype.as_numpy_dtype)
  return columns


def _has_lists(signature):
  return any(_has_lists(v) if isinstance(v, dict) else v.shape.rank
             for v in signature.values())


def dataset(examples_fn, signature, batch_size=256):
  """A dataset of the examples `examples_fn()` yields, batched to columns."""

  def generate():
    batch = []
    for example in examples_fn():
      batch.append(example)
      if len(batch) >= batch_size:
        yield _columns(batch, signature)
        batch = []
    if batch:
      yield _columns(batch, signature)

  ds = tf.data.Dataset.from_generator(
      generate, output_signature=_batched(signature)).unbatch()
  if _has_lists(signature):
    ds = ds.map(lambda x: x)  # unbatch() leaves lists ragged: make them plain
  return ds


def version_key(version):
  """'1.0.10' -> (1, 0, 10), to order TFDS versions; () if not numeric."""
  try:
    return tuple(int(p) for p in version.split('.'))
  except ValueError:
    return ()


# ----------------------------------------------------------------------------
# The source.


class TfdsOrFilesSource(seqio.DataSource):
  """Rows of one dataset from prepared TFDS data or files, as settings say.

  A subclass gives `output_signature`, `_file_rows` (and, where a file's rows
  are not its examples, `_num_file_examples`), `_check_files` and
  `_files_hint`; it may pick the TFDS version (`_tfds_version`).

  Args:
    tfds_name: the TFDS dataset, without version, e.g. 'glue/sst2'.
    split_map: {split name here: the dataset's split}.
    name: the task's name, for messages.
    settings: a fixed DataSettings; None reads the run's `settings.glue()`
      each time a dataset is built or counted.
  """

  def __init__(self, tfds_name, split_map, name=None, settings=None):
    self.tfds_name = tfds_name
    self._what = f'{name} ({tfds_name})' if name else tfds_name
    self._split_map = dict(split_map)
    self._settings = settings
    self._loaders = {}
    super().__init__(splits=tuple(self._split_map))

  @property
  def supports_arbitrary_sharding(self):
    return True

  def settings(self):
    return self._settings or settings_lib.glue()

  def list_shards(self, split):
    return [f'{self.tfds_name}:{self._real_split(split)}']

  def _real_split(self, split):
    if split not in self._split_map:
      raise UserError(f'{self._what} has no split {split!r}; use one '
                      f"of {', '.join(self._split_map)}.")
    return self._split_map[split]

  # What a subclass says.

  @property
  def output_signature(self):
    """tf.TensorSpec per feature, as TFDS decodes the dataset."""
    raise NotImplementedError

  def _file_rows(self, split, settings):
    """(number of rows, fn(row positions) -> iterator of their examples)."""
    raise NotImplementedError

  def _num_file_examples(self, split, settings):
    return self._file_rows(split, settings)[0]

  def _check_files(self, split, settings):
    """Raises UserError unless the files (of `split`, if given) are there."""
    raise NotImplementedError

  def _files_hint(self):
    """How to read files instead, ending the message of a missing dataset."""
    raise NotImplementedError

  def _tfds_version(self, versions, data_dir):
    """The version to read, of those prepared in `data_dir`: the newest."""
    del data_dir  # for messages of overrides
    return max(versions, key=version_key)

  # Files.

  def _file_dataset(self, split, shuffle, seed, shard_info, settings):
    num_rows, read = self._file_rows(split, settings)
    order = row_order(num_rows, shuffle, seed, shard_info)
    return dataset(lambda: read(order), self.output_signature)

  # TFDS.

  def _loader(self, settings):
    data_dir = sources.tfds_data_dir(settings.tfds_data_dir)
    if data_dir not in self._loaders:
      prepared = sources.tfds_prepared_dirs(self.tfds_name, data_dir)
      if not prepared:
        raise UserError(
            f'TFDS dataset {self._what} not found in data dir {data_dir} (set '
            f'by {SETTING}.tfds_data_dir or TFDS_DATA_DIR, default '
            '~/tensorflow_datasets); prepare it with `tfds build '
            f'{self.tfds_name} --data_dir={data_dir}`, or read '
            f'{self._files_hint()}.')
      version = self._tfds_version(
          [p.rstrip('/').split('/')[-2] for p in prepared], data_dir)
      self._loaders[data_dir] = seqio.utils.LazyTfdsLoader(
          f'{self.tfds_name}:{version}', data_dir=data_dir, read_only=True)
    return self._loaders[data_dir]

  def _tfds_split(self, loader, split):
    real = self._real_split(split)
    if real not in loader.info.splits:
      raise UserError(
          f'The prepared TFDS dataset {self.tfds_name} has no split {real!r} '
          f"(it has {', '.join(loader.info.splits)}).")
    return real

  def check_available(self, split=None):
    """Raises UserError unless the data (of `split`, if given) can be read."""
    settings = self.settings()
    if settings.source == 'tfds':
      loader = self._loader(settings)
      if split is not None:
        self._tfds_split(loader, split)
    else:
      self._check_files(split, settings)

  # seqio.DataSource.

  def get_dataset(self, split='train', shuffle=True, seed=None,
                  shard_info=None, *, sequence_length=None, use_cached=False,
                  num_epochs=1):
    del sequence_length, use_cached, num_epochs  # unused, as in seqio
    settings = self.settings()
    if settings.source == 'files':
      return self._file_dataset(split, shuffle, seed, shard_info, settings)
    loader = self._loader(settings)
    ds = loader.load(self._tfds_split(loader, split), shuffle_files=shuffle,
                     seed=seed)
    if shard_info and shard_info.num_shards > 1:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds

  def num_input_examples(self, split):
    """Rows in `split`: TFDS metadata, or counted once from the files."""
    settings = self.settings()
    if settings.source == 'files':
      return self._num_file_examples(split, settings)
    loader = self._loader(settings)
    return loader.size(self._tfds_split(loader, split))

  def __repr__(self):
    return (f'{type(self).__name__}({self.tfds_name}, '
            f'splits={list(self.splits)})')
