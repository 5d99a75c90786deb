"""SQuAD, CNN/DailyMail and WMT as text-to-text seqio tasks, under T5's names.

Formatted as T5's preprocessors (`t5.data.preprocessors.squad`, `summarize`,
`translate`) format them, with the same TF string ops:

    question: What is the capital of France ? context: Paris is ...  -> Paris
    squad trivia question: What is the capital of France ?           -> Paris
    summarize: <article>                                             -> <highlights>
    translate English to German: <en>                                -> <de>

SQuAD pads every punctuation character with spaces and collapses whitespace
(inputs, the first answer as target, and all answers kept in 'answers' for
the metric); T5's `qa` postprocessor turns a target into that list.

Tasks: squad_v010_allanswers and squad_v010_context_free (TFDS
`squad/v1.1:3.0.0`, metric SQuAD EM / F1), cnn_dailymail_v002
(`cnn_dailymail:3.4.0`, ROUGE-1/2/Lsum), and from English: wmt14_ende_v003,
wmt14_enfr_v003, wmt15_enfr_v003, wmt16_enro_v003, wmt19_ende_v003 and
wmt_t2t_ende_v003 (`wmtYY_translate/<xx>-en:1.0.0`, sacreBLEU). Rows come from
TFDS or the user's files (`t5x_lite.data.downstream_sources`).

Mixture `all_supervised_proportional`: every task T5 fine-tuned on at once
(GLUE, SuperGLUE, CNN/DailyMail, SQuAD, WMT En-De / En-Fr / En-Ro), mixed by
training rows capped at 2**19, as T5's `all_proportional` without its C4 task.
"""

import functools

import seqio
import tensorflow as tf

from t5x_lite import metrics
from t5x_lite.data import downstream_sources
from t5x_lite.data import registry
from t5x_lite.tasks import glue

# babel's English names of the languages, as T5's `translate` writes them.
LANGUAGE_NAMES = {'en': 'English', 'de': 'German', 'fr': 'French',
                  'ro': 'Romanian'}


# ----------------------------------------------------------------------------
# Formatting (tf.data maps over TFDS-shaped rows), as T5's preprocessors.


def pad_punctuation(text):
  """Spaces around every ASCII punctuation character, runs of space as one."""
  text = tf.strings.regex_replace(text, r'([[:punct:]])', r' \1 ')
  return tf.strings.regex_replace(text, r'\s+', ' ')


def _string_join(parts):
  joined = tf.strings.join(parts, separator=' ')
  return tf.strings.regex_replace(joined, r'\s+', ' ')


@seqio.map_over_dataset
def squad(x, include_context=True):
  """'question: <q> context: <c>' (or 'squad trivia question: <q>') -> answer."""
  answers = pad_punctuation(x['answers']['text'])
  question = pad_punctuation(x['question'])
  context = pad_punctuation(x['context'])
  if include_context:
    inputs = _string_join(['question:', question, 'context:', context])
  else:
    inputs = _string_join(['squad trivia question:', question])
  return {'inputs': inputs, 'targets': answers[0], 'id': x['id'],
          'context': context, 'question': question, 'answers': answers}


@seqio.map_over_dataset
def summarize(x, article_key, summary_key):
  """'summarize: <article>' -> the summary."""
  return {'inputs': tf.strings.join(['summarize:', x[article_key]],
                                    separator=' '),
          'targets': x[summary_key]}


@seqio.map_over_dataset
def translate(x, source_language, target_language):
  """'translate <Source> to <Target>: <source text>' -> the target text."""
  prefix = f'translate {LANGUAGE_NAMES[source_language]}'
  to = f' to {LANGUAGE_NAMES[target_language]}: '
  return {'inputs': tf.strings.join([prefix, to, x[source_language]]),
          'targets': x[target_language]}


def _text(value):
  if isinstance(value, (bytes, bytearray)):
    return bytes(value).decode('utf-8', errors='replace')
  return str(value)


def qa(answer, example=None, is_target=False):
  """T5's `postprocessors.qa`: a target is every answer of its example."""
  if is_target:
    return [_text(a) for a in example['answers']]
  return _text(answer)


# ----------------------------------------------------------------------------
# Registration.


def _add(name, source, text_preprocessor, metric_fns, postprocess_fn=None):
  registry.add_task(
      name,
      source=source,
      preprocessors=[text_preprocessor, seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=glue.output_features(),
      postprocess_fn=postprocess_fn,
      metric_fns=metric_fns)


for _name, _context in (('squad_v010_allanswers', True),
                        ('squad_v010_context_free', False)):
  _add(_name, downstream_sources.squad_source(name=_name),
       functools.partial(squad, include_context=_context), [metrics.squad],
       postprocess_fn=qa)

_add('cnn_dailymail_v002',
     downstream_sources.cnn_dailymail_source(name='cnn_dailymail_v002'),
     functools.partial(summarize, article_key='article',
                       summary_key='highlights'),
     [metrics.rouge])

# name -> (TFDS dataset, target language, the splits TFDS has).
WMT_TASKS = {
    'wmt14_ende_v003': ('wmt14_translate/de-en:1.0.0', 'de', 3),
    'wmt14_enfr_v003': ('wmt14_translate/fr-en:1.0.0', 'fr', 3),
    'wmt15_enfr_v003': ('wmt15_translate/fr-en:1.0.0', 'fr', 3),
    'wmt16_enro_v003': ('wmt16_translate/ro-en:1.0.0', 'ro', 3),
    'wmt19_ende_v003': ('wmt19_translate/de-en:1.0.0', 'de', 2),  # no test
    'wmt_t2t_ende_v003': ('wmt_t2t_translate/de-en:1.0.0', 'de', 3),
}
for _name, (_tfds_name, _target, _num_splits) in WMT_TASKS.items():
  _add(_name,
       downstream_sources.translation_source(
           _tfds_name, ('en', _target),
           splits=('train', 'validation', 'test')[:_num_splits], name=_name),
       functools.partial(translate, source_language='en',
                         target_language=_target),
       [metrics.bleu])


# ----------------------------------------------------------------------------
# The mixture of T5's supervised tasks.

# T5's `_supervised_tasks` (t5.data.mixtures): GLUE, SuperGLUE, CNN/DailyMail,
# SQuAD and three WMT pairs.
SUPERVISED_MIXTURE_TASKS = (glue.GLUE_MIXTURE_TASKS + glue.SUPER_GLUE_MIXTURE_TASKS
                            + ('cnn_dailymail_v002', 'squad_v010_allanswers',
                               'wmt_t2t_ende_v003', 'wmt15_enfr_v003',
                               'wmt16_enro_v003'))


def supervised_rate(task, maximum=glue.MAX_RATE):
  """Training rows capped at `maximum`; GLUE's RTE halved (SuperGLUE has it too),
  as T5's `_dedupe`."""
  rate = glue.rate_num_examples(task, maximum)
  return rate * 0.5 if task.name == 'glue_rte_v002' else rate


seqio.MixtureRegistry.remove('all_supervised_proportional')
seqio.MixtureRegistry.add('all_supervised_proportional',
                          [(t, supervised_rate) for t in SUPERVISED_MIXTURE_TASKS])
