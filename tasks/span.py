"""Span-corruption tasks: embedded corpus, C4, and local files."""

import functools

import seqio

from t5x_lite.data import preprocessors
from t5x_lite.data import sources
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError

C4_TFDS_NAME = 'c4/en:3.1.0'
C4_MISSING_HINT = (
    'prepare c4/en 3.x with tfds into TFDS_DATA_DIR (e.g. `tfds build c4/en '
    '--data_dir=$TFDS_DATA_DIR`, a large download), or use '
    'gin/t5_tiny_span.gin to pretrain on the embedded corpus.')


def span_corruption_output_features(vocabulary=None):
  """inputs / targets features, EOS added, sharing one vocabulary."""
  vocabulary = vocabulary or vocab_lib.embedded_vocabulary()
  return {
      'inputs': seqio.Feature(vocabulary=vocabulary, add_eos=True,
                              required=False),
      'targets': seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def span_corruption_preprocessors():
  """text -> targets -> tokens -> span corruption -> EOS."""
  return [
      functools.partial(seqio.preprocessors.rekey,
                        key_map={'inputs': None, 'targets': 'text'}),
      seqio.preprocessors.tokenize,
      preprocessors.span_corruption,
      seqio.preprocessors.append_eos_after_trim,
  ]


def _add(name, source, vocabulary=None):
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=span_corruption_preprocessors(),
      output_features=span_corruption_output_features(vocabulary),
      metric_fns=[])


def register_span_corruption_task(name, paths, file_format='text',
                                  text_key='text', vocabulary=None,
                                  validation_paths=None):
  """Registers a T5 span-corruption task over local files.

  Args:
    name: the task name (use it as MIXTURE_OR_TASK_NAME).
    paths: training file(s): a path, a glob, or a list of them.
    file_format: 'text': ONE DOCUMENT PER LINE (empty lines skipped);
      'jsonl': one JSON object per line, the document is field `text_key`.
    text_key: JSONL field holding the text.
    vocabulary: a seqio vocabulary with sentinels (default: the embedded one).
    validation_paths: optional file(s) for the 'validation' split.

  Returns:
    The registered seqio.Task (re-registering a name replaces it).

  Raises:
    UserError: a path matches no file, or the format is unknown. A malformed
      JSONL line raises UserError (file and line) when the dataset is built.
  """
  split_to_paths = {'train': paths}
  if validation_paths is not None:
    split_to_paths['validation'] = validation_paths
  if file_format == 'text':
    source = sources.text_file_source(split_to_paths)
  elif file_format == 'jsonl':
    source = sources.jsonl_file_source(split_to_paths, text_key=text_key)
  else:
    raise UserError(
        f"Unknown file_format {file_format!r} for task {name}; use 'text' or "
        "'jsonl'.")
  seqio.TaskRegistry.remove(name)
  _add(name, source, vocabulary)
  return seqio.get_mixture_or_task(name)


_add('embedded_span_corruption', sources.embedded_source())
_add('c4_v220_span_corruption',
     sources.PreparedTfdsDataSource(
         C4_TFDS_NAME, splits=('train', 'validation'),
         missing_hint=C4_MISSING_HINT))
