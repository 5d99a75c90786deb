"""GLUE and SuperGLUE as classification tasks (BERT [CLS] / GPT-1 [EXTRACT] heads).

Every text-to-text task of `t5x_lite.tasks.glue` has a `_cls` twin (glue_sst2_v002_cls
... super_glue_axg_v102_cls) over the same rows (`data.glue_sources`) whose
examples are `text_a`, optional `text_b` (token ids, no EOS), `label` (the
TFDS class id, int64; STS-B: the float32 score) and the row ids; the feature
converters of `data.cls_features` frame them for the model.

  single sentence  CoLA, SST-2                        A = sentence
  pairs            MRPC, QQP, STS-B, RTE, WNLI        A = sentence1 / question1,
                                                      B = sentence2 / question2
                   MNLI, AX, CB, SuperGLUE RTE, AX-g  A = premise, B = hypothesis
                   AX-b                               A = sentence1, B = sentence2
                   QNLI                               A = question, B = sentence
                   BoolQ                              A = question, B = passage
  WiC              A = word + ' ' + sentence1, B = sentence2 (the word first,
                   so truncation never drops it)
  WSC              A = text, B = span1_text + ' ' + span2_text (wsc.fixed, as
                   the twin)
  COPA             two binary examples per question: A = premise + ' What was
                   the cause?' / ' What happened as a result?', B = a choice;
                   label 1 for the right choice
  MultiRC          per answer option: A = paragraph, B = question + ' ' +
                   answer; label 1 if the answer is true
  ReCoRD           per candidate entity: A = passage, B = the query with
                   @placeholder replaced by the entity; label 1 if the entity
                   is an answer

Metrics are the twins' metric functions. Postprocessing is the identity on
predicted / target labels, wrapped as {'group', 'value'} dicts for grouped
tasks (MultiRC: question idx; AX-g: idx // 2; COPA: idx; ReCoRD: query idx).
COPA and ReCoRD decide per question among its candidates: the answer is the
one the model scores highest for class 1 (the evaluator adds that 'score'
to each prediction; without scores, the first candidate predicted 1, none
scored wrong); then accuracy (COPA) or SQuAD EM / F1 against all answers
(ReCoRD) apply as for the twins. Class counts for the model's `num_classes`: `num_classes(name)`.

The tasks tokenize with the embedded WordPiece vocabulary (BERT). For the
GPT-1 classifier, train with the BPE one (`VOCABULARY =
@vocab.embedded_bpe_vocabulary()` in gin), whose extra ids give the
converter's [START] / [DELIM] / [EXTRACT]; or register twins over another
vocabulary with `register_cls_task(twin_name, benchmark, config, vocabulary,
name)`.
"""

import functools

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite import metrics
from t5x_lite.data import glue_sources
from t5x_lite.data import wordpiece
from t5x_lite.tasks import glue  # noqa: F401  (registers the twins, whose metric fns we reuse)

_NUM_CLASSES = {}


def cls_output_features(pair: bool, vocabulary=None):
  """`text_a` (and `text_b`) token ids over one vocabulary, no EOS."""
  vocabulary = vocabulary or wordpiece.embedded_wordpiece_vocabulary()
  keys = ('text_a', 'text_b') if pair else ('text_a',)
  return {k: seqio.Feature(vocabulary=vocabulary, add_eos=False) for k in keys}


def num_classes(task_name: str) -> int:
  """The classifier width a `_cls` task needs (1 = regression: STS-B)."""
  return _NUM_CLASSES[task_name]


# ----------------------------------------------------------------------------
# Rows -> text_a / text_b / label.


def _join(*parts):
  return tf.strings.join(list(parts), separator=' ')


@seqio.map_over_dataset
def pair_text(x, a, b=None):
  """A = x[a] (or ' '-joined x[a...]), B likewise; label and idx kept."""
  field = lambda keys: _join(*[x[k] for k in keys]) if isinstance(keys, tuple) else x[keys]
  out = {'text_a': field(a), 'label': x['label'], 'idx': x['idx']}
  if b is not None:
    out['text_b'] = field(b)
  return out


def _multirc_clean(text):
  text = tf.strings.regex_replace(text, '<br>', ' ')
  return tf.strings.regex_replace(text, '<(/)?b>', '')


@seqio.map_over_dataset
def multirc_text(x):
  """MultiRC, one example per answer option."""
  return {'text_a': _multirc_clean(x['paragraph']),
          'text_b': _multirc_clean(_join(x['question'], x['answer'])),
          'label': x['label'],
          'idx/paragraph': x['idx']['paragraph'],
          'idx/question': x['idx']['question'],
          'idx/answer': x['idx']['answer']}


def copa_text(dataset):
  """COPA, two examples per question: (premise + question, choice), 0 / 1."""

  def expand(x):
    question = tf.where(tf.equal(x['question'], 'cause'), 'What was the cause?',
                        'What happened as a result?')
    label = x['label']
    return tf.data.Dataset.from_tensor_slices({
        'text_a': tf.stack([_join(x['premise'], question)] * 2),
        'text_b': tf.stack([x['choice1'], x['choice2']]),
        'label': tf.where(label < 0, tf.constant([-1, -1], tf.int64),
                          tf.cast(tf.equal(tf.range(2, dtype=tf.int64), label), tf.int64)),
        'idx': tf.stack([x['idx']] * 2)})

  return dataset.flat_map(expand)


def record_text(dataset):
  """ReCoRD, one example per (query, candidate entity)."""

  def expand(x):
    passage = tf.strings.regex_replace(
        x['passage'], r'(\.|\?|\!|\"|\')\n@highlight\n', r'\1 ')
    passage = tf.strings.regex_replace(passage, r'\n@highlight\n', '. ')
    entities = x['entities']
    n = tf.size(entities)
    queries = tf.map_fn(
        lambda e: tf.strings.regex_replace(x['query'], '@placeholder', tf.strings.regex_replace(
            e, r'\\', r'\\\\')),
        entities, fn_output_signature=tf.string)
    is_answer = tf.reduce_any(tf.equal(entities[:, None], x['answers'][None, :]), axis=1)
    return tf.data.Dataset.from_tensor_slices({
        'text_a': tf.fill([n], passage),
        'text_b': queries,
        'label': tf.cast(is_answer, tf.int64),
        'entity': entities,
        'answers': tf.tile(tf.expand_dims(x['answers'], 0), [n, 1]),
        'idx/passage': tf.fill([n], x['idx']['passage']),
        'idx/query': tf.fill([n], x['idx']['query'])})

  return dataset.flat_map(expand)


# (benchmark, config) -> (A field(s), B field(s) or None).
_FIELDS = {
    ('glue', 'cola'): ('sentence', None),
    ('glue', 'sst2'): ('sentence', None),
    ('glue', 'mrpc'): ('sentence1', 'sentence2'),
    ('glue', 'qqp'): ('question1', 'question2'),
    ('glue', 'stsb'): ('sentence1', 'sentence2'),
    ('glue', 'mnli'): ('premise', 'hypothesis'),
    ('glue', 'qnli'): ('question', 'sentence'),
    ('glue', 'rte'): ('sentence1', 'sentence2'),
    ('glue', 'wnli'): ('sentence1', 'sentence2'),
    ('glue', 'ax'): ('premise', 'hypothesis'),
    ('super_glue', 'boolq'): ('question', 'passage'),
    ('super_glue', 'cb'): ('premise', 'hypothesis'),
    ('super_glue', 'rte'): ('premise', 'hypothesis'),
    ('super_glue', 'wic'): (('word', 'sentence1'), 'sentence2'),
    ('super_glue', 'wsc.fixed'): ('text', ('span1_text', 'span2_text')),
    ('super_glue', 'axb'): ('sentence1', 'sentence2'),
    ('super_glue', 'axg'): ('premise', 'hypothesis'),
}
_SPECIAL = {'multirc': multirc_text, 'copa': copa_text, 'record': record_text}


def cls_preprocessors(benchmark, config):
  """Preprocessors turning TFDS rows of `benchmark/config` into `_cls` examples."""
  if config in _SPECIAL and benchmark == 'super_glue':
    steps = [_SPECIAL[config]]
  else:
    a, b = _FIELDS[benchmark, config]
    steps = [functools.partial(pair_text, a=a, b=b)]
  return steps + [seqio.preprocessors.tokenize]


# ----------------------------------------------------------------------------
# Postprocessors and grouped metrics.


def identity_postprocessor(output, example=None, is_target=False):
  """The label as is (an int class id, or the STS-B float)."""
  del example, is_target
  return output


def group_postprocessor(group_fn, *extra_keys):
  """{'group': group_fn(example), 'value': label, **example[extra_keys]}."""

  def postprocess(output, example=None, is_target=False):
    del is_target
    result = {'value': output}
    if example is not None:
      result['group'] = group_fn(example)
      for k in extra_keys:
        result[k] = example[k]
    return result

  return postprocess


def _choice(predictions) -> int:
  """The chosen candidate of a group: the best 'score' (log p(class 1)) when
  the predictions carry one, else the first predicted 1 (-1: none)."""
  if predictions and all(p.get('score') is not None for p in predictions):
    return int(np.argmax([p['score'] for p in predictions]))
  values = [p['value'] for p in predictions]
  return values.index(1) if 1 in values else metrics.UNKNOWN


def _decisions(targets, predictions):
  """{group: ([target rows], [prediction dicts])} in first-seen order."""
  groups = {}
  for t, p in zip(targets, predictions):
    rows, predicted = groups.setdefault(t['group'], ([], []))
    rows.append(t)
    predicted.append(p)
  return groups


def copa_accuracy(targets, predictions):
  """Twin's accuracy over questions: the chosen candidate (see `_choice`)."""
  right, chosen = [], []
  for rows, predicted in _decisions(targets, predictions).values():
    labels = [r['value'] for r in rows]
    right.append(labels.index(1) if 1 in labels else metrics.UNKNOWN)
    chosen.append(_choice(predicted))
  return metrics.accuracy(right, chosen)


def _text(x):
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def record_squad(targets, predictions):
  """Twin's SQuAD EM / F1 per query: the answer is the chosen entity (see `_choice`)."""
  answers, chosen = [], []
  for rows, predicted in _decisions(targets, predictions).values():
    answers.append([_text(a) for a in rows[0]['answers']])
    choice = _choice(predicted)
    chosen.append(_text(rows[choice]['entity']) if choice >= 0 else '')
  return metrics.squad(answers, chosen)


# ----------------------------------------------------------------------------
# Registration: one `_cls` twin per text-to-text task.

_TWINS = (
    # twin, benchmark, TFDS config
    ('glue_cola_v002', 'glue', 'cola'),
    ('glue_sst2_v002', 'glue', 'sst2'),
    ('glue_mrpc_v002', 'glue', 'mrpc'),
    ('glue_qqp_v002', 'glue', 'qqp'),
    ('glue_stsb_v002', 'glue', 'stsb'),
    ('glue_mnli_v002', 'glue', 'mnli'),
    ('glue_mnli_matched_v002', 'glue', 'mnli'),
    ('glue_mnli_mismatched_v002', 'glue', 'mnli'),
    ('glue_qnli_v002', 'glue', 'qnli'),
    ('glue_rte_v002', 'glue', 'rte'),
    ('glue_wnli_v002', 'glue', 'wnli'),
    ('glue_ax_v002', 'glue', 'ax'),
    ('super_glue_boolq_v102', 'super_glue', 'boolq'),
    ('super_glue_cb_v102', 'super_glue', 'cb'),
    ('super_glue_copa_v102', 'super_glue', 'copa'),
    ('super_glue_multirc_v102', 'super_glue', 'multirc'),
    ('super_glue_record_v102', 'super_glue', 'record'),
    ('super_glue_rte_v102', 'super_glue', 'rte'),
    ('super_glue_wic_v102', 'super_glue', 'wic'),
    ('super_glue_wsc_v102', 'super_glue', 'wsc.fixed'),
    ('super_glue_axb_v102', 'super_glue', 'axb'),
    ('super_glue_axg_v102', 'super_glue', 'axg'),
)

_MNLI_SPLITS = ('validation_matched', 'validation_mismatched', 'test_matched',
                'test_mismatched')
# The twins' split maps (the others expose the config's own splits).
_SPLITS = {
    'glue_mnli_v002': {'train': 'train', 'validation': 'validation_matched',
                       'test': 'test_matched', **{s: s for s in _MNLI_SPLITS}},
    'glue_mnli_matched_v002': {'validation': 'validation_matched', 'test': 'test_matched'},
    'glue_mnli_mismatched_v002': {'validation': 'validation_mismatched',
                                  'test': 'test_mismatched'},
}

_GROUPED = {
    'multirc': (group_postprocessor(lambda ex: int(ex['idx/question'])), None),
    'axg': (group_postprocessor(lambda ex: int(ex['idx']) // 2), None),
    'copa': (group_postprocessor(lambda ex: int(ex['idx'])), [copa_accuracy]),
    'record': (group_postprocessor(lambda ex: int(ex['idx/query']), 'entity', 'answers'),
               [record_squad]),
}


def _num_classes(benchmark, config):
  if config in ('copa', 'record'):
    return 2  # per-candidate binary
  classes = glue_sources.label_classes(benchmark, config)
  return 1 if classes is None else len(classes)


def register_cls_task(twin_name, benchmark, config, vocabulary=None, name=None):
  """Registers the `_cls` twin of text-to-text task `twin_name`; returns it."""
  twin = seqio.TaskRegistry.get(twin_name)
  name = name or f'{twin_name}_cls'
  postprocess_fn, metric_fns = _GROUPED.get(config, (identity_postprocessor, None))
  pair = not (benchmark == 'glue' and config in ('cola', 'sst2'))
  seqio.TaskRegistry.remove(name)
  _NUM_CLASSES[name] = _num_classes(benchmark, config)
  return seqio.TaskRegistry.add(
      name,
      source=glue_sources.make_source(benchmark, config, splits=_SPLITS.get(twin_name),
                                      name=name),
      preprocessors=cls_preprocessors(benchmark, config),
      output_features=cls_output_features(pair, vocabulary),
      postprocess_fn=postprocess_fn,
      metric_fns=metric_fns or list(twin.metric_fns))


for _twin, _benchmark, _config in _TWINS:
  register_cls_task(_twin, _benchmark, _config)
