"""GLUE and SuperGLUE as text-to-text seqio tasks, under T5's names.

Inputs name the task and its fields, targets are the label word, as T5 formats
them (`t5.data.preprocessors.glue` and friends):

    sst2 sentence: it 's a charming ...                    -> positive
    rte sentence1: ... sentence2: ...                      -> not_entailment
    stsb sentence1: ... sentence2: ...                     -> 3.8  (nearest 0.2)
    boolq passage: ... question: ...                       -> True
    multirc question: ... answer: ... paragraph: ...       -> False
    record query: ... entities: A, B passage: ...          -> A
    wsc text: ... * anyone * ... from # him # .            -> False

Tasks: glue_{cola,sst2,mrpc,qqp,stsb,mnli,mnli_matched,mnli_mismatched,qnli,
rte,wnli,ax}_v002 and super_glue_{boolq,cb,copa,multirc,record,rte,wic,wsc,
axb,axg}_v102. glue_mnli_v002's 'validation' / 'test' are the matched ones;
the diagnostics (glue_ax, AX-b and AX-g, read as MNLI / RTE) have a 'test'
split only. WSC is T5's `wsc` formatting of `super_glue/wsc.fixed` (the noun
span in '*', the pronoun in '#', target True / False), not the `_simple`
referent variant. ReCoRD gives one example per query: the target is the first
answer, and 'answers' keeps them all for evaluation.

Rows come from TFDS or the original files (`t5x_lite.data.glue_sources`; pick
with `glue_sources.data_settings`). Postprocessors map generated text back to
the label id (STS-B: a float; MultiRC and AX-g: {'group', 'value'} dicts;
ReCoRD targets: the list of answers); text that is no label gives -1, which
the metrics count as wrong. A classification task's registration carries its
candidate targets as task metadata (`t5x_lite.data.registry.label_words`, for
rank classification).

Mixtures `glue_v002_proportional` and `super_glue_v102_proportional` mix the
tasks by their number of training rows, capped at 2**19 (diagnostics left
out; glue_mnli_mismatched_v002 rides along at rate 0 for evaluation, and WNLI
is left out as T5 left it out).
"""

import functools
import math

import seqio
import tensorflow as tf

from t5x_lite import metrics
from t5x_lite.data import glue_sources
from t5x_lite.data import registry
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError

MAX_RATE = 2**19  # examples-proportional mixing limit K of the T5 paper


def output_features(vocabulary=None):
  """'inputs' / 'targets' with EOS, sharing one vocabulary."""
  vocabulary = vocabulary or vocab_lib.embedded_vocabulary()
  return {k: seqio.Feature(vocabulary=vocabulary, add_eos=True)
          for k in ('inputs', 'targets')}


# ----------------------------------------------------------------------------
# Formatting (tf.data maps over TFDS-shaped rows).


def _label_text(label, label_names):
  """The name of class `label`; '<unk>' for -1 (unlabelled test rows)."""
  return tf.gather(tf.constant(('<unk>',) + tuple(label_names)), label + 1)


@seqio.map_over_dataset
def glue_text(x, benchmark_name, label_names, feature_names, feature_keys=None):
  """'<benchmark> <f1>: <x[f1]> <f2>: ...' -> the label's name ('<unk>': -1).

  `feature_keys`, when given, are the row keys of the fields named
  `feature_names` (AX-b's sentence1 / sentence2 are written as RTE's premise /
  hypothesis).
  """
  parts = [benchmark_name]
  for name, key in zip(feature_names, feature_keys or feature_names):
    parts += [f'{name}:', x[key]]
  return {'inputs': tf.strings.join(parts, separator=' '),
          'targets': _label_text(x['label'], label_names),
          'idx': x['idx']}


@seqio.map_over_dataset
def stsb_text(x):
  """STS-B: the score rounded to the nearest 0.2, written '%.1f'."""
  inputs = tf.strings.join(['stsb sentence1:', x['sentence1'], 'sentence2:',
                            x['sentence2']], separator=' ')
  return {'inputs': inputs,
          'targets': tf.as_string(tf.round(x['label'] * 5) / 5, precision=1),
          'idx': x['idx']}


@seqio.map_over_dataset
def multirc_text(x):
  """MultiRC, one example per answer option, HTML markup removed."""
  inputs = tf.strings.join(['multirc question:', x['question'], 'answer:',
                            x['answer'], 'paragraph:', x['paragraph']],
                           separator=' ')
  inputs = tf.strings.regex_replace(inputs, '<br>', ' ')
  inputs = tf.strings.regex_replace(inputs, '<(/)?b>', '')
  return {'inputs': inputs,
          'targets': _label_text(x['label'], glue_sources.label_classes(
              'super_glue', 'multirc')),
          'idx/paragraph': x['idx']['paragraph'],
          'idx/question': x['idx']['question'],
          'idx/answer': x['idx']['answer']}


@seqio.map_over_dataset
def record_text(x):
  """ReCoRD, one example per query; target: the first answer ('<unk>': none)."""
  passage = tf.strings.regex_replace(
      x['passage'], r'(\.|\?|\!|\"|\')\n@highlight\n', r'\1 ')
  passage = tf.strings.regex_replace(passage, r'\n@highlight\n', '. ')
  inputs = tf.strings.join([
      'record query:', x['query'], 'entities:',
      tf.strings.reduce_join(x['entities'], separator=', '), 'passage:',
      passage], separator=' ')
  answers = x['answers']
  target = tf.concat([answers, ['<unk>']], axis=0)[0]
  return {'inputs': inputs, 'targets': target, 'answers': answers,
          'idx/passage': x['idx']['passage'], 'idx/query': x['idx']['query']}


def _mark_span(text, span_text, word_index, mark):
  """Puts `mark` around `span_text` when it starts at word `word_index`."""
  pattern = tf.strings.join([r'^((?:\S+\s){', tf.as_string(word_index),
                             r'})(\Q', span_text, r'\E)'])
  return tf.strings.regex_replace(text, pattern, rf'\1{mark} \2 {mark}')


@seqio.map_over_dataset
def wsc_text(x):
  """WSC: '* noun *' and '# pronoun #' marked in the text; True / False."""
  text = _mark_span(x['text'], x['span1_text'], x['span1_index'], '*')
  # The first mark adds two words before the pronoun when the noun precedes it.
  span2_index = x['span2_index'] + 2 * tf.cast(
      x['span1_index'] < x['span2_index'], tf.int32)
  text = _mark_span(text, x['span2_text'], span2_index, '#')
  return {'inputs': tf.strings.join(['wsc text:', text], separator=' '),
          'targets': _label_text(x['label'], ('False', 'True')),
          'idx': x['idx']}


_FIELDS = {
    ('glue', 'cola'): ('cola', ('sentence',)),
    ('glue', 'sst2'): ('sst2', ('sentence',)),
    ('glue', 'mrpc'): ('mrpc', ('sentence1', 'sentence2')),
    ('glue', 'qqp'): ('qqp', ('question1', 'question2')),
    ('glue', 'mnli'): ('mnli', ('hypothesis', 'premise')),
    ('glue', 'qnli'): ('qnli', ('question', 'sentence')),
    ('glue', 'rte'): ('rte', ('sentence1', 'sentence2')),
    ('glue', 'wnli'): ('wnli', ('sentence1', 'sentence2')),
    ('glue', 'ax'): ('mnli', ('hypothesis', 'premise')),
    ('super_glue', 'boolq'): ('boolq', ('passage', 'question')),
    ('super_glue', 'cb'): ('cb', ('hypothesis', 'premise')),
    ('super_glue', 'copa'): ('copa', ('choice1', 'choice2', 'premise',
                                      'question')),
    ('super_glue', 'rte'): ('rte', ('hypothesis', 'premise')),
    ('super_glue', 'wic'): ('wic', ('sentence1', 'sentence2', 'word')),
    ('super_glue', 'axb'): ('rte', ('hypothesis', 'premise')),
    ('super_glue', 'axg'): ('rte', ('hypothesis', 'premise')),
}
_SPECIAL = {('glue', 'stsb'): stsb_text,
            ('super_glue', 'multirc'): multirc_text,
            ('super_glue', 'record'): record_text,
            ('super_glue', 'wsc'): wsc_text,
            ('super_glue', 'wsc.fixed'): wsc_text}


def text_preprocessors(benchmark, config):
  """Preprocessors turning TFDS rows of `benchmark/config` into text pairs."""
  if config in ('mnli_matched', 'mnli_mismatched'):
    config = 'mnli'
  if (benchmark, config) in _SPECIAL:
    return [_SPECIAL[benchmark, config]]
  if (benchmark, config) not in _FIELDS:
    raise UserError(f'No text format for {benchmark}/{config}; use one of '
                    f'{sorted(_FIELDS) + sorted(_SPECIAL)}.')
  name, fields = _FIELDS[benchmark, config]
  keys = ('sentence2', 'sentence1') if config == 'axb' else None  # read as RTE
  return [functools.partial(
      glue_text, benchmark_name=name, feature_names=fields, feature_keys=keys,
      label_names=glue_sources.label_classes(benchmark, config))]


# ----------------------------------------------------------------------------
# Postprocessors: seqio's fn(output_or_target, example=None, is_target=False).


def _text(value):
  if isinstance(value, (bytes, bytearray)):
    return bytes(value).decode('utf-8', errors='replace')
  return str(value)


def string_to_label(text, label_names):
  """Index of `text` in `label_names`, or -1."""
  text = _text(text).strip()
  return label_names.index(text) if text in label_names else -1


def label_postprocessor(label_names):
  """Postprocessor: label text -> class id (-1 if none)."""
  label_names = tuple(label_names)

  def postprocess(output, example=None, is_target=False):
    del example, is_target
    return string_to_label(output, label_names)

  return postprocess


def string_to_float(output, example=None, is_target=False):
  """STS-B: text -> float, -1.0 if it is not a finite number."""
  del example, is_target
  try:
    value = float(_text(output).strip())
  except ValueError:
    return -1.0
  return value if math.isfinite(value) else -1.0


def multirc_postprocessor(output, example=None, is_target=False):
  """{'group': question idx, 'value': 0 / 1 (-1 if neither)}."""
  del is_target
  result = {'value': string_to_label(output, ('False', 'True'))}
  if example is not None:
    result['group'] = int(example['idx/question'])
  return result


def record_postprocessor(output, example=None, is_target=False):
  """Targets: every answer of the query; predictions: the text."""
  if is_target:
    return [_text(a) for a in example['answers']]
  return _text(output).strip()


def axg_postprocessor(output, example=None, is_target=False):
  """{'group': pair (idx // 2), 'value': class id}: rows 2k, 2k+1 are a pair."""
  del is_target
  result = {'value': string_to_label(output, glue_sources.label_classes(
      'super_glue', 'axg'))}
  if example is not None:
    result['group'] = int(example['idx']) // 2
  return result


# ----------------------------------------------------------------------------
# Registration.


def label_words(task_name):
  """The candidate targets of a classification task, by class id; else None."""
  return registry.label_words(task_name)


def _add(name, benchmark, config, metric_fns, splits=None, postprocess_fn=None):
  classes = glue_sources.label_classes(benchmark, config)
  if postprocess_fn is None:
    postprocess_fn = label_postprocessor(classes)
  registry.add_task(
      name,
      label_words=classes,
      source=glue_sources.make_source(benchmark, config, splits=splits,
                                      name=name),
      preprocessors=text_preprocessors(benchmark, config) + [
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=output_features(),
      postprocess_fn=postprocess_fn,
      metric_fns=metric_fns)


_MNLI_SPLITS = ('validation_matched', 'validation_mismatched', 'test_matched',
                'test_mismatched')

_add('glue_cola_v002', 'glue', 'cola', [metrics.matthews_corrcoef])
_add('glue_sst2_v002', 'glue', 'sst2', [metrics.accuracy])
_add('glue_mrpc_v002', 'glue', 'mrpc', [metrics.f1_and_accuracy])
_add('glue_qqp_v002', 'glue', 'qqp', [metrics.f1_and_accuracy])
_add('glue_stsb_v002', 'glue', 'stsb', [metrics.pearson_and_spearman],
     postprocess_fn=string_to_float)
_add('glue_mnli_v002', 'glue', 'mnli', [metrics.accuracy],
     splits={'train': 'train', 'validation': 'validation_matched',
             'test': 'test_matched', **{s: s for s in _MNLI_SPLITS}})
_add('glue_mnli_matched_v002', 'glue', 'mnli', [metrics.accuracy],
     splits={'validation': 'validation_matched', 'test': 'test_matched'})
_add('glue_mnli_mismatched_v002', 'glue', 'mnli', [metrics.accuracy],
     splits={'validation': 'validation_mismatched', 'test': 'test_mismatched'})
_add('glue_qnli_v002', 'glue', 'qnli', [metrics.accuracy])
_add('glue_rte_v002', 'glue', 'rte', [metrics.accuracy])
_add('glue_wnli_v002', 'glue', 'wnli', [metrics.accuracy])
_add('glue_ax_v002', 'glue', 'ax', [metrics.matthews_corrcoef])

_add('super_glue_boolq_v102', 'super_glue', 'boolq', [metrics.accuracy])
_add('super_glue_cb_v102', 'super_glue', 'cb',
     [metrics.mean_multiclass_f1(num_classes=3), metrics.accuracy])
_add('super_glue_copa_v102', 'super_glue', 'copa', [metrics.accuracy])
_add('super_glue_multirc_v102', 'super_glue', 'multirc',
     [metrics.multirc_f1_over_all_answers, metrics.exact_match_over_groups],
     postprocess_fn=multirc_postprocessor)
_add('super_glue_record_v102', 'super_glue', 'record', [metrics.squad],
     postprocess_fn=record_postprocessor)
_add('super_glue_rte_v102', 'super_glue', 'rte', [metrics.accuracy])
_add('super_glue_wic_v102', 'super_glue', 'wic', [metrics.accuracy])
_add('super_glue_wsc_v102', 'super_glue', 'wsc.fixed', [metrics.accuracy])
_add('super_glue_axb_v102', 'super_glue', 'axb', [metrics.matthews_corrcoef])
_add('super_glue_axg_v102', 'super_glue', 'axg',
     [metrics.gender_parity, metrics.on_values(metrics.accuracy)],
     postprocess_fn=axg_postprocessor)


# ----------------------------------------------------------------------------
# Mixtures.


def rate_num_examples(task, maximum=MAX_RATE):
  """Number of training rows (TFDS metadata or counted once), capped."""
  if 'train' not in task.splits:
    return 0.0
  return float(min(task.num_input_examples('train'), maximum))


GLUE_MIXTURE_TASKS = (
    'glue_cola_v002', 'glue_sst2_v002', 'glue_mrpc_v002', 'glue_qqp_v002',
    'glue_stsb_v002', 'glue_mnli_v002', 'glue_qnli_v002', 'glue_rte_v002',
    'glue_mnli_mismatched_v002')
SUPER_GLUE_MIXTURE_TASKS = (
    'super_glue_boolq_v102', 'super_glue_cb_v102', 'super_glue_copa_v102',
    'super_glue_multirc_v102', 'super_glue_record_v102', 'super_glue_rte_v102',
    'super_glue_wic_v102', 'super_glue_wsc_v102')

_MIXTURES = {'glue_v002_proportional': GLUE_MIXTURE_TASKS,
             'super_glue_v102_proportional': SUPER_GLUE_MIXTURE_TASKS}
for _name, _tasks in _MIXTURES.items():
  seqio.MixtureRegistry.remove(_name)
  seqio.MixtureRegistry.add(_name, [(t, rate_num_examples) for t in _tasks])
