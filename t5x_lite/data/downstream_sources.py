"""SQuAD, CNN/DailyMail and WMT rows as seqio sources, from TFDS or files.

Rows always carry the features of the TFDS dataset T5 reads, wherever they
come from, so one set of preprocessors serves both:

- `squad/v1.1`: 'id', 'title', 'context', 'question' (tf.string) and
  'answers': {'text': [None] tf.string, 'answer_start': [None] tf.int32};
- `cnn_dailymail`: 'article', 'highlights', 'id', 'publisher' (tf.string);
- `wmtYY_translate/xx-en`: one tf.string per language, e.g. 'de' and 'en'.

Where rows come from is decided when a dataset is built, by the run's
`settings.glue()` (the same settings as GLUE's; see `t5x_lite.data.settings`):

    glue_sources.data_settings.source = 'files'   # default 'tfds'
    glue_sources.data_settings.squad_files = {
        'train': '/data/train-v1.1.json', 'validation': '/data/dev-v1.1.json'}
    glue_sources.data_settings.cnn_dailymail_files = {
        'validation': '/data/cnn_dm/validation.jsonl'}
    glue_sources.data_settings.translation_files = {
        'wmt16_enro_v003': {'train': '/data/wmt16/train.jsonl',
                            'validation': {'en': '/data/newsdev2016.en',
                                           'ro': '/data/newsdev2016.ro'}}}

- 'tfds': the prepared dataset at T5's version (else the newest prepared
  one, with a warning) under `tfds_data_dir` (else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets); nothing is ever downloaded.
- 'files': SQuAD's official JSON (`data` -> `paragraphs` -> `qas`), v1.1 or
  v2.0: a v2.0 question marked `is_impossible` is skipped (the count is
  logged), and answers of a repeated question id are merged, as TFDS does.
  CNN/DailyMail: JSONL rows {"article", "highlights"} (optional "id").
  Translation: JSONL rows {"translation": {"en": ..., "de": ...}} (Hugging
  Face's layout), or {language: file} of two line-aligned plain-text files,
  whose line counts must be equal.

A malformed row raises `UserError` naming the file and line (for SQuAD the
line of a JSON syntax error, else the question's place and id); with
`on_bad_row='skip'` it is dropped and one warning counts the dropped rows.
"""

import array
import dataclasses
import functools
import json
import logging
import os
from typing import Mapping

import tensorflow as tf

from t5x_lite.data import tfds_or_files
from t5x_lite.errors import UserError

log = logging.getLogger(__name__)

_SETTING = tfds_or_files.SETTING
_BadRow = tfds_or_files.BadRow


def output_signature(kind, languages=None):
  """tf.TensorSpec per feature, as TFDS decodes the dataset of `kind`."""
  text = tf.TensorSpec([], tf.string)
  if kind == 'squad':
    return {'id': text, 'title': text, 'context': text, 'question': text,
            'answers': {'text': tf.TensorSpec([None], tf.string),
                        'answer_start': tf.TensorSpec([None], tf.int32)}}
  if kind == 'cnn_dailymail':
    return {k: text for k in ('article', 'highlights', 'id', 'publisher')}
  return {lang: text for lang in languages}


# ----------------------------------------------------------------------------
# SQuAD JSON: read whole (it is one JSON document), cached by size and mtime.


@dataclasses.dataclass(frozen=True)
class _Rows:
  examples: tuple   # parsed examples, in file order
  bad: tuple        # ((where, message), ...)
  skipped: int      # unanswerable (v2.0 is_impossible) questions


def _squad_answers(qa):
  answers = qa.get('answers')
  if not isinstance(answers, list):
    raise _BadRow("no list 'answers'")
  texts, starts = [], []
  for a in answers:
    if not isinstance(a, dict) or not isinstance(a.get('text'), str):
      raise _BadRow("an answer has no string 'text'")
    start = a.get('answer_start')
    if isinstance(start, bool) or not isinstance(start, int):
      raise _BadRow("an answer has no integer 'answer_start'")
    texts.append(a['text'])
    starts.append(start)
  return texts, starts


@functools.lru_cache(maxsize=8)
def _squad_rows(path, size, mtime):
  """The answerable questions of a SQuAD JSON file, one example each."""
  del size, mtime  # cache key only
  with tf.io.gfile.GFile(path, 'rb') as f:
    raw = f.read()
  try:
    doc = json.loads(raw.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise UserError(f'{path} is not UTF-8 ({e}); is it a SQuAD JSON file?') from None
  except json.JSONDecodeError as e:
    raise UserError(f'Malformed JSON at {path}:{e.lineno}: {e.msg}; fix the '
                    'file (SQuAD JSON: data -> paragraphs -> qas).') from None
  if not isinstance(doc, dict) or not isinstance(doc.get('data'), list):
    raise UserError(f"{path} has no list 'data'; give SQuAD's official JSON "
                    '(data -> paragraphs -> qas).')
  by_id, bad, skipped = {}, [], 0
  for i, article in enumerate(doc['data']):
    paragraphs = article.get('paragraphs') if isinstance(article, dict) else None
    if not isinstance(paragraphs, list):
      bad.append((f'data[{i}]', "no list 'paragraphs'"))
      continue
    title = article.get('title', '')
    for j, paragraph in enumerate(paragraphs):
      where = f'data[{i}].paragraphs[{j}]'
      context = paragraph.get('context') if isinstance(paragraph, dict) else None
      qas = paragraph.get('qas') if isinstance(paragraph, dict) else None
      if not isinstance(context, str) or not isinstance(qas, list):
        bad.append((where, "no string 'context' or no list 'qas'"))
        continue
      for k, qa in enumerate(qas):
        qid = qa.get('id') if isinstance(qa, dict) else None
        place = f'{where}.qas[{k}]' + (f' (id {qid})' if qid else '')
        try:
          if not isinstance(qid, str) or not isinstance(qa.get('question'), str):
            raise _BadRow("no string 'id' or 'question'")
          if qa.get('is_impossible') is True:
            skipped += 1
            continue
          texts, starts = _squad_answers(qa)
          if not texts and qid not in by_id:
            raise _BadRow('no answers (and not marked is_impossible)')
        except _BadRow as e:
          bad.append((place, str(e)))
          continue
        if qid in by_id:  # a repeated id: its answers are merged, as TFDS does
          by_id[qid]['answers']['text'].extend(texts)
          by_id[qid]['answers']['answer_start'].extend(starts)
          continue
        by_id[qid] = {'id': qid, 'title': title, 'context': context,
                      'question': qa['question'],
                      'answers': {'text': texts, 'answer_start': starts}}
  if skipped:  # logged once per version of the file (this is cached)
    log.info('Skipped %d unanswerable (is_impossible) question(s) of %s: the '
             'SQuAD v1.1 tasks read the %d answerable ones.', skipped, path,
             len(by_id))
  return _Rows(tuple(by_id.values()), tuple(bad), skipped)


# ----------------------------------------------------------------------------
# Line files (JSONL, aligned plain text): one checking pass, lazy reads.


@dataclasses.dataclass(frozen=True)
class _Scan:
  offsets: array.array  # byte offset of each good line
  bad: tuple            # ((lineno, message), ...)
  num_lines: int        # every line, blank ones included


def _string(obj, key, where=''):
  value = obj.get(key) if isinstance(obj, dict) else None
  if not isinstance(value, str):
    raise _BadRow(f"field '{where}{key}' is missing or not a string")
  return value


def _parse_cnn_dailymail(line):
  obj = tfds_or_files.json_object(line)
  row_id = obj.get('id', '')
  return {'article': _string(obj, 'article'),
          'highlights': _string(obj, 'highlights'),
          'id': row_id if isinstance(row_id, str) else str(row_id),
          'publisher': ''}


def _parse_translation(line, languages):
  obj = tfds_or_files.json_object(line)
  pair = obj.get('translation')
  if not isinstance(pair, dict):
    raise _BadRow("no object 'translation'")
  return {lang: _string(pair, lang, 'translation.') for lang in languages}


def _parse_text(line):
  if not line.strip():
    raise _BadRow('blank line in a line-aligned file')
  return line


def _parser(kind, languages):
  if kind == 'cnn_dailymail':
    return _parse_cnn_dailymail
  if kind == 'translation':
    return functools.partial(_parse_translation, languages=tuple(languages))
  return _parse_text


@functools.lru_cache(maxsize=64)
def _scan(path, kind, languages, size, mtime):
  """Checks every line once. JSONL: the offsets of the good lines (blank ones
  are skipped, not counted); 'text': the offsets of every line."""
  del size, mtime  # cache key only
  parse = _parser(kind, languages)
  offsets, bad, lineno = array.array('q'), [], 0
  for start, lineno, raw in tfds_or_files.iter_lines(path):
    if kind == 'text':
      offsets.append(start)
    try:
      line = tfds_or_files.decode(raw, first=lineno == 1)
      if kind != 'text' and not line.strip():
        continue
      parse(line)
    except _BadRow as e:
      bad.append((lineno, str(e)))
      continue
    if kind != 'text':
      offsets.append(start)
  return _Scan(offsets, tuple(bad), lineno)


def _check_bad(path, bad, on_bad_row, where='line'):
  if not bad:
    return
  place, message = bad[0]
  at = f'{path}:{place}' if where == 'line' else f'{path} at {place}'
  tfds_or_files.report_bad(log, len(bad), on_bad_row, f'{at}: {message}',
                           'fix or delete it', path,
                           f'first at {place}: {message}')


def _checked_scan(path, kind, on_bad_row, languages=()):
  stat = tf.io.gfile.stat(path)
  scan = _scan(path, kind, tuple(languages), stat.length, stat.mtime_nsec)
  _check_bad(path, scan.bad, on_bad_row)
  return scan


# ----------------------------------------------------------------------------
# The source.


class DownstreamSource(tfds_or_files.TfdsOrFilesSource):
  """Rows of SQuAD, CNN/DailyMail or a WMT pair, from TFDS or files.

  Args:
    kind: 'squad', 'cnn_dailymail' or 'translation'.
    tfds_name: the TFDS dataset with T5's version, e.g. 'squad/v1.1:3.0.0'.
    splits: the split names (TFDS's).
    name: the task's name, for messages and (translation) to find its files.
    languages: translation only: the pair's language codes.
    settings: a fixed DataSettings; None reads the run's `settings.glue()`
      each time a dataset is built.
  """

  def __init__(self, kind, tfds_name, splits, name=None, languages=(),
               settings=None):
    if kind not in ('squad', 'cnn_dailymail', 'translation'):
      raise ValueError(f'unknown kind {kind!r}')
    self.kind, self.name = kind, name
    tfds_name, _, self.version = tfds_name.partition(':')
    self.languages = tuple(languages)
    super().__init__(tfds_name, {s: s for s in splits}, name=name,
                     settings=settings)

  @property
  def output_signature(self):
    return output_signature(self.kind, self.languages)

  # Files.

  def _setting_name(self):
    return {'squad': 'squad_files', 'cnn_dailymail': 'cnn_dailymail_files',
            'translation': 'translation_files'}[self.kind]

  def _split_files(self, settings):
    flag = self._setting_name()
    files = getattr(settings, flag)
    example = ("{'validation': '/data/dev-v1.1.json'}" if self.kind == 'squad'
               else "{'validation': '/data/validation.jsonl'}")
    if self.kind == 'translation':
      example = f"{{'{self.name}': {{'validation': '/data/valid.jsonl'}}}}"
      files = (files or {}).get(self.name)
    if not files:
      raise UserError(f'No {flag} set for {self._what} with source=files; bind '
                      f'{_SETTING}.{flag} = {example}.')
    return files

  def local_files(self, split, settings=None):
    """The file(s) read for `split` with source='files'; UserError if absent.

    A path (JSON / JSONL), or {language: path} of line-aligned text files.
    """
    settings = settings or self.settings()
    self._real_split(split)
    files = self._split_files(settings)
    if split not in files:
      raise UserError(
          f"No {split!r} file of {self._what} in {_SETTING}."
          f"{self._setting_name()} (it has {', '.join(files) or 'none'}); add "
          'one, or use a split that has a file.')
    paths = files[split]
    if isinstance(paths, Mapping):
      if self.kind != 'translation' or set(paths) != set(self.languages):
        raise UserError(
            f'{_SETTING}.{self._setting_name()}[{split!r}] of {self._what} '
            'must be one file' + (
                f" or {{language: file}} for {', '.join(self.languages)}"
                if self.kind == 'translation' else '') + f', not {dict(paths)}.')
      paths = {lang: os.fspath(paths[lang]) for lang in self.languages}
      todo = list(paths.values())
    else:
      paths = os.fspath(paths)
      todo = [paths]
    for path in todo:
      if not tf.io.gfile.exists(path):
        raise UserError(f'{path} not found (the {split!r} file of {self._what} '
                        f'in {_SETTING}.{self._setting_name()}); fix the path.')
    return paths

  def _aligned(self, paths, on_bad_row):
    """Scans of line-aligned files; their line counts must be equal."""
    scans = {}
    for lang, path in paths.items():
      stat = tf.io.gfile.stat(path)
      scans[lang] = _scan(path, 'text', (), stat.length, stat.mtime_nsec)
    counts = {lang: s.num_lines for lang, s in scans.items()}
    if len(set(counts.values())) > 1:
      described = ' and '.join(f'{paths[lang]} ({n} lines)'
                               for lang, n in counts.items())
      raise UserError(f'Line-aligned files of {self._what} differ in length: '
                      f'{described}; each line must translate the other '
                      "file's line.")
    bad = {}
    for lang, scan in scans.items():
      for lineno, message in scan.bad:
        bad.setdefault(lineno, f'{paths[lang]}:{lineno}: {message}')
    if bad:
      first = bad[min(bad)]
      tfds_or_files.report_bad(
          log, len(bad), on_bad_row, first,
          'fix or delete the line in both files', ' / '.join(paths.values()),
          f'first: {first}')
    good = [i for i in range(next(iter(counts.values()))) if i + 1 not in bad]
    return scans, good

  def _file_rows(self, split, settings):
    """(number of rows, fn(order) -> examples iterator)."""
    paths = self.local_files(split, settings)
    if self.kind == 'squad':
      stat = tf.io.gfile.stat(paths)
      rows = _squad_rows(paths, stat.length, stat.mtime_nsec)
      _check_bad(paths, rows.bad, settings.on_bad_row, where='place')
      examples = rows.examples
      return len(examples), lambda order: (examples[i] for i in order)
    if isinstance(paths, Mapping):
      scans, good = self._aligned(paths, settings.on_bad_row)
      # Each good pair's byte offsets: line i of each file (all lines kept).
      offsets = {lang: s.offsets for lang, s in scans.items()}

      def read_pairs(order):
        files = {lang: tfds_or_files.open_binary(p)
                 for lang, p in paths.items()}
        try:
          for i in order:
            yield {lang: tfds_or_files.read_line(files[lang],
                                                 offsets[lang][good[i]])
                   for lang in paths}
        finally:
          for f in files.values():
            f.close()

      return len(good), read_pairs
    scan = _checked_scan(paths, self.kind, settings.on_bad_row, self.languages)
    parse = _parser(self.kind, self.languages)

    def read_rows(order):
      with tfds_or_files.open_binary(paths) as f:
        for i in order:
          yield parse(tfds_or_files.read_line(f, scan.offsets[i]))

    return len(scan.offsets), read_rows

  def _check_files(self, split, settings):
    if split is None:
      files = self._split_files(settings)
      todo = [s for s in self.splits if s in files]
    else:
      todo = [split]
    for s in todo:
      self.local_files(s, settings)

  # TFDS.

  def _files_hint(self):
    return (f"your own files: {_SETTING}.source = 'files' and "
            f'{self._setting_name()}')

  def _tfds_version(self, versions, data_dir):
    """T5's version where prepared, else the newest one, with a warning."""
    versions = sorted(versions, key=tfds_or_files.version_key)
    version = self.version if self.version in versions else versions[-1]
    if self.version and version != self.version:
      log.warning('%s: T5 read version %s; using the prepared version %s '
                  'in %s.', self._what, self.version, version, data_dir)
    return version


def squad_source(name=None, settings=None):
  """SQuAD v1.1 (TFDS `squad/v1.1:3.0.0`), splits 'train' / 'validation'."""
  return DownstreamSource('squad', 'squad/v1.1:3.0.0', ('train', 'validation'),
                          name=name, settings=settings)


def cnn_dailymail_source(name=None, settings=None):
  """CNN/DailyMail (TFDS `cnn_dailymail:3.4.0`): train / validation / test."""
  return DownstreamSource('cnn_dailymail', 'cnn_dailymail:3.4.0',
                          ('train', 'validation', 'test'), name=name,
                          settings=settings)


def translation_source(tfds_name, languages,
                       splits=('train', 'validation', 'test'), name=None,
                       settings=None):
  """A WMT pair, e.g. ('wmt16_translate/ro-en:1.0.0', ('en', 'ro'))."""
  return DownstreamSource('translation', tfds_name, splits, name=name,
                          languages=languages, settings=settings)
