"""GLUE and SuperGLUE rows as seqio sources, from TFDS or the original files.

Rows always carry the features of TFDS `glue/<config>` / `super_glue/<config>`
(names and dtypes: text as tf.string, `label` int64 class ids or float32 for
STS-B, `idx` int32 or a dict of int32), wherever they come from, so one set of
preprocessors serves both. Test splits have label -1, as in TFDS.

Where rows come from is decided when a dataset is built, by the run's
`settings.glue()` (see `t5x_lite.data.settings`), bound in gin as:

    from t5x_lite.data import glue_sources
    glue_sources.data_settings.source = 'files'     # default 'tfds'
    glue_sources.data_settings.glue_dir = '/data/glue_data'
    glue_sources.data_settings.super_glue_dir = '/data/super_glue'
    glue_sources.data_settings.on_bad_row = 'skip'  # default 'raise'

- 'tfds': prepared TFDS data under `tfds_data_dir` (else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets); nothing is ever downloaded.
- 'files': the distributions as released. GLUE: `<glue_dir>/<CoLA|SST-2|MRPC|
  STS-B|QQP|MNLI|QNLI|RTE|WNLI>/{train,dev,test}.tsv` (MNLI: dev_matched,
  dev_mismatched, test_matched, test_mismatched; the diagnostic:
  `diagnostic/diagnostic-full.tsv` (labelled) or `diagnostic/diagnostic.tsv`).
  SuperGLUE: `<super_glue_dir>/<BoolQ|CB|COPA|MultiRC|ReCoRD|RTE|WiC|WSC>/
  {train,val,test}.jsonl`, `AX-b/AX-b.jsonl`, `AX-g/AX-g.jsonl`. MultiRC gives
  one row per answer option and ReCoRD one row per query, as TFDS does.

Splits are TFDS's: 'train', 'validation', 'test' (glue/mnli:
'validation_matched', 'validation_mismatched', 'test_matched',
'test_mismatched'). A malformed row raises `UserError` naming file and line;
with on_bad_row='skip' it is dropped and one warning counts the dropped rows.
Shards (`shard_info`) take every k-th line of a file; a MultiRC paragraph or a
ReCoRD passage is one line, so its rows stay in one shard.
"""

import array
import dataclasses
import functools
import logging
import os
from typing import Mapping, Optional, Sequence

import tensorflow as tf

from t5x_lite.data import settings as settings_lib
from t5x_lite.data import tfds_or_files
from t5x_lite.errors import UserError

# The settings' type and gin-bound constructor, by their names in gin files.
DataSettings = settings_lib.DataSettings
data_settings = settings_lib.data_settings

log = logging.getLogger(__name__)

_BOOL = ('False', 'True')
_NLI3 = ('entailment', 'neutral', 'contradiction')
_NLI2 = ('entailment', 'not_entailment')

LABEL_CLASSES = {
    'glue': {
        'cola': ('unacceptable', 'acceptable'),
        'sst2': ('negative', 'positive'),
        'mrpc': ('not_equivalent', 'equivalent'),
        'qqp': ('not_duplicate', 'duplicate'),
        'stsb': None,
        'mnli': _NLI3, 'mnli_matched': _NLI3, 'mnli_mismatched': _NLI3,
        'qnli': _NLI2,
        'rte': _NLI2,
        'wnli': ('not_entailment', 'entailment'),
        'ax': _NLI3,
    },
    'super_glue': {
        'boolq': _BOOL,
        'cb': ('entailment', 'contradiction', 'neutral'),
        'copa': ('choice1', 'choice2'),
        'multirc': _BOOL,
        'record': None,
        'rte': _NLI2,
        'wic': _BOOL,
        'wsc': _BOOL, 'wsc.fixed': _BOOL,
        'axb': _NLI2,
        'axg': _NLI2,
    },
}


def label_classes(benchmark, config):
  """TFDS class names of `label`, by id; None for STS-B and ReCoRD."""
  _check_config(benchmark, config)
  return LABEL_CLASSES[benchmark][config]


def _check_config(benchmark, config):
  if benchmark not in LABEL_CLASSES or config not in LABEL_CLASSES[benchmark]:
    known = ', '.join(f'{b}/{c}' for b, cs in LABEL_CLASSES.items() for c in cs)
    raise UserError(f'Unknown benchmark config {benchmark}/{config}; use one '
                    f'of {known}.')


# ----------------------------------------------------------------------------
# Layouts of the original files.


@dataclasses.dataclass(frozen=True)
class _Tsv:
  """A GLUE directory: feature -> candidate column names, split -> files."""
  dirname: str
  text: Mapping[str, Sequence[str]]
  label: Sequence[str]
  files: Mapping[str, Sequence[str]]
  headerless: Sequence[str] = ()  # splits without a header (CoLA)


def _std(dirname, text, label='label'):
  return _Tsv(dirname, {k: (v,) for k, v in text.items()}, (label,),
              {'train': ('train.tsv',), 'validation': ('dev.tsv',),
               'test': ('test.tsv',)})


def _mnli(files):
  return _Tsv('MNLI', {'premise': ('sentence1',), 'hypothesis': ('sentence2',)},
              ('gold_label',), {k: (v,) for k, v in files.items()})


_COLA_COLUMNS = ('source', 'label', 'original_label', 'sentence')

GLUE_FILES = {
    'cola': dataclasses.replace(_std('CoLA', {'sentence': 'sentence'}),
                                headerless=('train', 'validation')),
    'sst2': _std('SST-2', {'sentence': 'sentence'}),
    'mrpc': _std('MRPC', {'sentence1': '#1 String', 'sentence2': '#2 String'},
                 'Quality'),
    'qqp': _std('QQP', {'question1': 'question1', 'question2': 'question2'},
                'is_duplicate'),
    'stsb': _std('STS-B', {'sentence1': 'sentence1', 'sentence2': 'sentence2'},
                 'score'),
    'mnli': _mnli({'train': 'train.tsv',
                   'validation_matched': 'dev_matched.tsv',
                   'validation_mismatched': 'dev_mismatched.tsv',
                   'test_matched': 'test_matched.tsv',
                   'test_mismatched': 'test_mismatched.tsv'}),
    'mnli_matched': _mnli({'validation': 'dev_matched.tsv',
                           'test': 'test_matched.tsv'}),
    'mnli_mismatched': _mnli({'validation': 'dev_mismatched.tsv',
                              'test': 'test_mismatched.tsv'}),
    'qnli': _std('QNLI', {'question': 'question', 'sentence': 'sentence'}),
    'rte': _std('RTE', {'sentence1': 'sentence1', 'sentence2': 'sentence2'}),
    'wnli': _std('WNLI', {'sentence1': 'sentence1', 'sentence2': 'sentence2'}),
    'ax': _Tsv('diagnostic', {'premise': ('sentence1', 'Premise'),
                              'hypothesis': ('sentence2', 'Hypothesis')},
               ('Label',),
               {'test': ('diagnostic-full.tsv', 'diagnostic.tsv')}),
}

_SG_SPLITS = {'train': ('train.jsonl',), 'validation': ('val.jsonl',),
              'test': ('test.jsonl',)}
SUPER_GLUE_DIRS = {
    'boolq': 'BoolQ', 'cb': 'CB', 'copa': 'COPA', 'multirc': 'MultiRC',
    'record': 'ReCoRD', 'rte': 'RTE', 'wic': 'WiC', 'wsc': 'WSC',
    'wsc.fixed': 'WSC', 'axb': 'AX-b', 'axg': 'AX-g',
}
# Text and int32 features of the flat SuperGLUE configs (besides label, idx).
_SG_TEXT = {
    'boolq': ('question', 'passage'),
    'cb': ('premise', 'hypothesis'),
    'copa': ('premise', 'choice1', 'choice2', 'question'),
    'rte': ('premise', 'hypothesis'),
    'wic': ('word', 'sentence1', 'sentence2'),
    'wsc': ('text', 'span1_text', 'span2_text'),
    'wsc.fixed': ('text', 'span1_text', 'span2_text'),
    'axb': ('sentence1', 'sentence2'),
    'axg': ('premise', 'hypothesis'),
}
_SG_INTS = {
    'wic': ('start1', 'start2', 'end1', 'end2'),
    'wsc': ('span1_index', 'span2_index'),
    'wsc.fixed': ('span1_index', 'span2_index'),
}


def _split_files(benchmark, config):
  """split -> candidate file names (relative to the benchmark's directory)."""
  if benchmark == 'glue':
    layout = GLUE_FILES[config]
    return {s: tuple(os.path.join(layout.dirname, f) for f in files)
            for s, files in layout.files.items()}
  dirname = SUPER_GLUE_DIRS[config]
  if config in ('axb', 'axg'):
    return {'test': (os.path.join(dirname, dirname + '.jsonl'),)}
  return {s: tuple(os.path.join(dirname, f) for f in files)
          for s, files in _SG_SPLITS.items()}


def splits_of(benchmark, config):
  """The TFDS split names of a config, e.g. ('train', 'validation', 'test')."""
  _check_config(benchmark, config)
  return tuple(_split_files(benchmark, config))


def output_signature(benchmark, config):
  """tf.TensorSpec per feature, as TFDS decodes `benchmark/config`."""
  _check_config(benchmark, config)
  text = tf.TensorSpec([], tf.string)
  i32 = tf.TensorSpec([], tf.int32)
  if benchmark == 'glue':
    sig = {k: text for k in GLUE_FILES[config].text}
    sig['label'] = tf.TensorSpec(
        [], tf.float32 if config == 'stsb' else tf.int64)
    sig['idx'] = i32
    return sig
  if config == 'multirc':
    return {'paragraph': text, 'question': text, 'answer': text,
            'label': tf.TensorSpec([], tf.int64),
            'idx': {'paragraph': i32, 'question': i32, 'answer': i32}}
  if config == 'record':
    return {'passage': text, 'query': text,
            'entities': tf.TensorSpec([None], tf.string),
            'answers': tf.TensorSpec([None], tf.string),
            'idx': {'passage': i32, 'query': i32}}
  sig = {k: text for k in _SG_TEXT[config]}
  sig.update({k: i32 for k in _SG_INTS.get(config, ())})
  sig['label'] = tf.TensorSpec([], tf.int64)
  sig['idx'] = i32
  return sig


# ----------------------------------------------------------------------------
# Row parsing. A parser maps one line to a list of examples or raises _BadRow.


_BadRow = tfds_or_files.BadRow


def _class_id(value, classes):
  if value in classes:
    return classes.index(value)
  try:
    label = int(value)
  except ValueError:
    label = -2
  if not 0 <= label < len(classes):
    raise _BadRow(f'label {value!r} is not one of {", ".join(classes)} '
                  f'(or 0..{len(classes) - 1})')
  return label


class _TsvParser:
  """Parses the lines of one GLUE TSV file (after its header, if any)."""

  def __init__(self, config, split, header):
    self._config = config
    layout = GLUE_FILES[config]
    if header is None:  # CoLA train / dev
      header = list(_COLA_COLUMNS)
    self._width = len(header)
    self._text = {}
    for feature, candidates in layout.text.items():
      found = [c for c in candidates if c in header]
      if not found:
        raise _BadRow(f'header has no column {" or ".join(candidates)} (it has '
                      f'{", ".join(header)}); is this the GLUE file for '
                      f'{config}?')
      self._text[feature] = header.index(found[0])
    labels = [c for c in layout.label if c in header]
    self._label = header.index(labels[0]) if labels else None
    self._classes = LABEL_CLASSES['glue'][config]

  def __call__(self, line, row):
    fields = line.split('\t')
    if len(fields) != self._width:
      raise _BadRow(f'{len(fields)} tab-separated fields, the header has '
                    f'{self._width}')
    example = {k: fields[i] for k, i in self._text.items()}
    if self._label is None:
      label = -1 if self._classes else -1.0
    elif self._classes is None:
      try:
        label = float(fields[self._label])
      except ValueError:
        raise _BadRow(f'score {fields[self._label]!r} is not a number') from None
    else:
      label = _class_id(fields[self._label], self._classes)
    example['label'] = label
    example['idx'] = row
    return [example]


def _bool_label(value):
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int) and value in (0, 1):
    return value
  if isinstance(value, str) and value.lower() in ('true', 'false'):
    return int(value.lower() == 'true')
  raise _BadRow(f'label {value!r} is not true / false')


def _int(obj, key):
  value = obj.get(key) if isinstance(obj, dict) else None
  if isinstance(value, bool) or value is None:
    raise _BadRow(f'field {key!r} is missing or not an integer')
  try:
    return int(value)
  except (TypeError, ValueError):
    raise _BadRow(f'field {key!r} = {value!r} is not an integer') from None


def _str(obj, key):
  value = obj.get(key) if isinstance(obj, dict) else None
  if not isinstance(value, str):
    raise _BadRow(f'field {key!r} is missing or not a string')
  return value


def _fix_wsc_span(example, span):
  """wsc.fixed: makes a span's text match the text, as TFDS's fixed config."""
  span_text, text = example[span + '_text'], example['text']
  if span_text in text:
    return
  words = text.split()
  index = example[span + '_index']
  first = words[index] if 0 <= index < len(words) else span_text
  head = span_text[:1].lower() if first[:1].islower() else span_text[:1].upper()
  example[span + '_text'] = (head + span_text[1:]).rstrip('.').replace('\n', ' ')


class _JsonlParser:
  """Parses the lines of one SuperGLUE JSONL file."""

  def __init__(self, config, split):
    self._config = config
    self._split = split
    self._classes = LABEL_CLASSES['super_glue'][config]

  def _label(self, obj):
    if obj.get('label') is None:
      if self._split != 'test':
        raise _BadRow(f"no 'label' in a {self._split} row")
      return -1
    value = obj['label']
    if self._classes == _BOOL or self._config == 'copa':
      return _bool_label(value)  # COPA: 0 / 1 is choice1 / choice2
    if value not in self._classes:
      raise _BadRow(f'label {value!r} is not one of {", ".join(self._classes)}')
    return self._classes.index(value)

  def __call__(self, line, row):
    del row  # SuperGLUE rows carry their own idx
    obj = tfds_or_files.json_object(line)
    if self._config == 'multirc':
      return self._multirc(obj)
    if self._config == 'record':
      return self._record(obj)
    if self._config.startswith('wsc'):
      obj = {**obj, **obj.get('target', {})}
    example = {k: _str(obj, k) for k in _SG_TEXT[self._config]}
    example.update({k: _int(obj, k) for k in _SG_INTS.get(self._config, ())})
    if self._config == 'wsc.fixed':
      _fix_wsc_span(example, 'span1')
      _fix_wsc_span(example, 'span2')
    example['label'] = self._label(obj)
    example['idx'] = _int(obj, 'idx')
    return [example]

  def _multirc(self, obj):
    passage = obj.get('passage')
    paragraph, questions = _str(passage, 'text'), passage.get('questions')
    if not isinstance(questions, list):
      raise _BadRow("passage has no list 'questions'")
    examples = []
    for q in questions:
      answers = q.get('answers') if isinstance(q, dict) else None
      if not isinstance(answers, list):
        raise _BadRow("a question has no list 'answers'")
      for a in answers:
        examples.append({
            'paragraph': paragraph, 'question': _str(q, 'question'),
            'answer': _str(a, 'text'), 'label': self._label(a),
            'idx': {'paragraph': _int(obj, 'idx'), 'question': _int(q, 'idx'),
                    'answer': _int(a, 'idx')}})
    return examples

  def _record(self, obj):
    passage = obj.get('passage')
    text = _str(passage, 'text')
    spans = passage.get('entities')
    if not isinstance(spans, list):
      raise _BadRow("passage has no list 'entities'")
    entities = sorted({text[_int(e, 'start'):_int(e, 'end') + 1] for e in spans})
    qas = obj.get('qas')
    if not isinstance(qas, list):
      raise _BadRow("no list 'qas'")
    examples = []
    for qa in qas:
      answers = qa.get('answers', []) if isinstance(qa, dict) else None
      if not isinstance(answers, list):
        raise _BadRow("'answers' is not a list")
      examples.append({
          'passage': text, 'query': _str(qa, 'query'), 'entities': entities,
          'answers': sorted({_str(a, 'text') for a in answers}),
          'idx': {'passage': _int(obj, 'idx'), 'query': _int(qa, 'idx')}})
    return examples


# ----------------------------------------------------------------------------
# Reading a file: one checking pass (cached), then lazy reading by offsets.


@dataclasses.dataclass(frozen=True)
class _Scan:
  offsets: array.array  # byte offset of each good data line
  rows: array.array     # its data-row number (TSV idx)
  num_examples: int
  bad: tuple             # ((lineno, message), ...)
  header: Optional[list]


def _parser(benchmark, config, split, header):
  if benchmark == 'glue':
    return _TsvParser(config, split, header)
  return _JsonlParser(config, split)


def _has_header(benchmark, config, split):
  return benchmark == 'glue' and split not in GLUE_FILES[config].headerless


@functools.lru_cache(maxsize=64)
def _scan(path, benchmark, config, split, size, mtime):
  """Parses every line once; keyed by the file's size and mtime."""
  del size, mtime  # cache key only
  offsets, rows = array.array('q'), array.array('q')
  bad, header, parse, count, row = [], None, None, 0, 0
  for offset, lineno, raw in tfds_or_files.iter_lines(path):
    try:
      line = tfds_or_files.decode(raw, first=lineno == 1)
      if not line.strip():
        continue
      if parse is None:
        if _has_header(benchmark, config, split):
          header = line.split('\t')
          parse = _parser(benchmark, config, split, header)
          continue
        parse = _parser(benchmark, config, split, None)
      count += len(parse(line, row))
    except _BadRow as e:
      if parse is None:  # the header itself: nothing can be read
        raise UserError(f'{path} line {lineno}: {e}.') from None
      bad.append((lineno, str(e)))
    else:
      offsets.append(offset)
      rows.append(row)
    row += 1
  return _Scan(offsets, rows, count, tuple(bad), header)


def _checked_scan(path, benchmark, config, split, on_bad_row):
  stat = tf.io.gfile.stat(path)
  scan = _scan(path, benchmark, config, split, stat.length, stat.mtime_nsec)
  if scan.bad:
    lineno, message = scan.bad[0]
    tfds_or_files.report_bad(
        log, len(scan.bad), on_bad_row, f'{path}:{lineno}: {message}',
        'fix or delete the line', path, f'first at line {lineno}: {message}')
  return scan


# ----------------------------------------------------------------------------
# The source.


class GlueSource(tfds_or_files.TfdsOrFilesSource):
  """Rows of one GLUE / SuperGLUE config from TFDS or the original files.

  The place is read from `settings` or, when None, from the run's
  `settings.glue()` each time a dataset is built or counted.
  """

  def __init__(self, benchmark, config, splits=None, settings=None,
               name=None):
    _check_config(benchmark, config)
    self.benchmark, self.config = benchmark, config
    tfds_name = f'{benchmark}/{config}'
    known = splits_of(benchmark, config)
    if splits is None:
      splits = {s: s for s in known}
    elif not isinstance(splits, Mapping):
      splits = {s: s for s in splits}
    for split, real in splits.items():
      if real not in known:
        raise UserError(f'{tfds_name} has no split {real!r} (for '
                        f"{split!r}); its splits are {', '.join(known)}.")
    super().__init__(tfds_name, splits, name=name, settings=settings)

  @property
  def split_map(self):
    """{split name here: the config's split}, e.g. {'validation': ...}."""
    return dict(self._split_map)

  @property
  def output_signature(self):
    return output_signature(self.benchmark, self.config)

  def local_path(self, split, settings=None):
    """The file read for `split` with source='files'; UserError if absent."""
    settings = settings or self.settings()
    real = self._real_split(split)
    flag = 'glue_dir' if self.benchmark == 'glue' else 'super_glue_dir'
    root = getattr(settings, flag)
    if not root:
      raise UserError(
          f'No {flag} set for {self._what} with source=files; bind '
          f"glue_sources.data_settings.{flag} = '/path/to/data'.")
    candidates = [os.path.join(root, f)
                  for f in _split_files(self.benchmark, self.config)[real]]
    for path in candidates:
      if tf.io.gfile.exists(path):
        return path
    directory = os.path.dirname(candidates[0])
    if not tf.io.gfile.isdir(directory):
      raise UserError(
          f'Directory not found: {directory} (for {self._what}); check '
          f'glue_sources.data_settings.{flag} or unpack the data there.')
    present = ', '.join(sorted(tf.io.gfile.listdir(directory))) or 'nothing'
    raise UserError(
        f"No {real!r} split of {self._what}: looked for "
        f"{' or '.join(candidates)}; {directory} has {present}. Add the file, "
        'or use a split (or task) whose file is present.')

  def _check_files(self, split, settings):
    for s in ([split] if split else self.splits):
      self.local_path(s, settings)

  def _files_hint(self):
    return ("the original files: glue_sources.data_settings.source = 'files' "
            "and glue_dir / super_glue_dir = '/path/to/data'")

  def _file_rows(self, split, settings):
    """(good lines, fn(order) -> their examples); a line may hold several."""
    real = self._real_split(split)
    path = self.local_path(split, settings)
    scan = _checked_scan(path, self.benchmark, self.config, real,
                         settings.on_bad_row)
    benchmark, config = self.benchmark, self.config

    def read(order):
      parse = _parser(benchmark, config, real, scan.header)
      with tfds_or_files.open_binary(path) as f:
        for i in order:
          line = tfds_or_files.read_line(f, scan.offsets[i])
          yield from parse(line, scan.rows[i])

    return len(scan.offsets), read

  def _num_file_examples(self, split, settings):
    path = self.local_path(split, settings)
    return _checked_scan(path, self.benchmark, self.config,
                         self._real_split(split),
                         settings.on_bad_row).num_examples


def make_source(benchmark, config, splits=None, settings=None, name=None):
  """A seqio source of `benchmark` ('glue' / 'super_glue') config `config`.

  Args:
    benchmark: 'glue' or 'super_glue'.
    config: the TFDS config name, e.g. 'sst2', 'mnli', 'multirc', 'wsc.fixed'.
    splits: None (all of the config's splits), a list of them, or a mapping
      from the split names to expose to the config's splits, e.g.
      {'validation': 'validation_mismatched'}.
    settings: a fixed DataSettings; None reads the run's `settings.glue()`
      each time a dataset is built.
    name: the task's name, for messages.

  Returns:
    A GlueSource (a seqio.DataSource).
  """
  return GlueSource(benchmark, config, splits=splits, settings=settings,
                    name=name)
