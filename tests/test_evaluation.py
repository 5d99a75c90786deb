"""The evaluator's plumbing: order, padding, postprocessing and the tasks' metrics.

Stub models stand in for the network so that each expected figure is known
independently (sklearn on the raw labels), whatever the model zoo does.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import sklearn.metrics
import tensorflow as tf

from t5x_lite import evaluation
from t5x_lite import metrics
from t5x_lite.data import registry
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError
from t5x_lite.partitioning import Partitioner

WORDS = ('negative', 'positive')
LABELS = [int(i % 3 == 0) for i in range(37)]  # 37 rows: the last batch of 8 is padded


def _dataset(split, shuffle_files=False, seed=None):
  del split, shuffle_files, seed
  return tf.data.Dataset.from_tensor_slices({'label': LABELS, 'idx': list(range(len(LABELS)))})


def _format(ex):
  word = tf.gather(tf.constant(WORDS), ex['label'])
  return {'inputs': tf.strings.join(['echo: ', word]), 'targets': word, 'label': ex['label'],
          'idx': ex['idx']}


def _postprocess(text, example=None, is_target=False):
  del example, is_target
  return WORDS.index(text) if text in WORDS else -1


TASK = 'test_evaluation_echo'
if TASK not in seqio.TaskRegistry.names():
  vocab = vocab_lib.embedded_vocabulary()
  registry.add_task(
      TASK,
      label_words=WORDS,  # the candidates of rank classification
      source=seqio.FunctionDataSource(_dataset, splits=('train', 'validation')),
      preprocessors=[seqio.map_over_dataset(_format), seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features={k: seqio.Feature(vocab, add_eos=True) for k in ('inputs', 'targets')},
      postprocess_fn=_postprocess,
      metric_fns=[metrics.accuracy])


class _StubModel:
  """Generates a fixed word, or echoes the input after 'echo:'; scores 'negative' best."""
  FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter
  DECODER_ONLY = False
  GENERATES = True

  def __init__(self, word=None):
    self.vocab = vocab_lib.embedded_vocabulary()
    self.word = word
    self.prefix = len(self.vocab.encode('echo:'))

  def predict_batch(self, params, batch, rng=None, *, max_decode_length, **kwargs):
    del params, rng, kwargs
    tokens = batch['encoder_input_tokens']
    if self.word is None:
      out = tokens[:, self.prefix:self.prefix + max_decode_length]
    else:
      ids = jnp.asarray(self.vocab.encode(self.word) + [1], jnp.int32)
      out = jnp.zeros((tokens.shape[0], max_decode_length), jnp.int32)
      out = out.at[:, :len(ids)].set(ids)
    return out, jnp.zeros(tokens.shape[0])

  def score(self, params, batch):
    del params
    first = jnp.asarray(self.vocab.encode('negative')[0])
    return (batch['decoder_target_tokens'][:, 0] == first).astype(jnp.float32)


def _evaluator(**kwargs):
  return evaluation.Evaluator(_StubModel(kwargs.pop('word', None)), Partitioner(),
                              {'inputs': 16, 'targets': 8}, batch_size=8, **kwargs)


def _task():
  return seqio.get_mixture_or_task(TASK)


def test_echo_model_scores_100_so_rows_stay_aligned_across_padded_batches():
  result = _evaluator().evaluate(None, _task())
  assert result.metrics == {'accuracy': 100.0}
  assert len(result.rows) == len(LABELS)
  assert [r['prediction'] for r in result.rows] == [WORDS[l] for l in LABELS]


def test_constant_prediction_gives_the_class_share():
  result = _evaluator(word='positive').evaluate(None, _task())
  expected = 100 * sklearn.metrics.accuracy_score(LABELS, np.ones(len(LABELS)))
  assert result.metrics['accuracy'] == pytest.approx(expected)


def test_unknown_text_counts_wrong():
  result = _evaluator(word='maybe').evaluate(None, _task())
  assert result.metrics['accuracy'] == 0.0


def test_rank_mode_picks_the_best_scored_label_word():
  result = _evaluator(mode='rank').evaluate(None, _task())
  expected = 100 * sklearn.metrics.accuracy_score(LABELS, np.zeros(len(LABELS)))
  assert result.metrics['accuracy'] == pytest.approx(expected)


def test_rank_mode_reads_the_label_words_from_the_task_metadata():
  twin = _task().replace(name='test_evaluation_echo_no_words')  # same rows, no metadata
  with pytest.raises(UserError, match="'test_evaluation_echo_no_words' has no candidate label"):
    _evaluator(mode='rank').evaluate(None, twin)


def test_num_examples_limits_the_split():
  result = _evaluator(num_examples=10).evaluate(None, _task())
  assert len(result.rows) == 10


def test_bad_settings_are_user_errors():
  with pytest.raises(UserError, match='mode'):
    _evaluator(mode='vote')
  with pytest.raises(UserError, match='few_shot_k'):
    _evaluator(few_shot_k=2)
  with pytest.raises(UserError, match='split'):
    evaluation.eval_tasks(TASK, 'test')


def test_few_shot_prompts_prepend_k_seeded_train_demonstrations():
  task = _task()
  vocab = task.output_features['inputs'].vocabulary

  def prompts(seed):
    evaluator = evaluation.Evaluator(_StubModel(), Partitioner(), {'inputs': 64, 'targets': 8},
                                     batch_size=8, mode='rank', few_shot_k=2, seed=seed)
    examples = evaluator._examples(task, 'validation')[:4]  # pylint: disable=protected-access
    ids = evaluator._with_demonstrations(task, examples, vocab)  # pylint: disable=protected-access
    return [vocab.decode(x[:-1]) for x in ids], examples

  texts, examples = prompts(seed=0)
  for text, ex in zip(texts, examples):
    # Two 'inputs targets' demonstrations, then the query (this vocabulary folds
    # the newlines between them into spaces).
    *demos, query = text.split('echo: ')[1:]
    assert len(demos) == 2
    assert 'echo: ' + query == ex['inputs_pretokenized'].decode()
    for demo in demos:
      words = demo.split()
      assert len(words) == 2 and words[0] == words[1] and words[0] in WORDS
  assert prompts(seed=0)[0] == texts
  assert prompts(seed=1)[0] != texts
  result = evaluation.Evaluator(_StubModel(), Partitioner(), {'inputs': 64, 'targets': 8},
                                batch_size=8, mode='rank', few_shot_k=2).evaluate(None, task)
  expected = 100 * sklearn.metrics.accuracy_score(LABELS, np.zeros(len(LABELS)))
  assert result.metrics['accuracy'] == pytest.approx(expected)


class _StubDecoderOnly(_StubModel):
  """A decoder-only stub: echoes its prompt after 'echo:', unless anything of the
  targets is visible in the batch (then it generates nothing)."""
  FEATURE_CONVERTER_CLS = seqio.DecoderFeatureConverter
  DECODER_ONLY = True

  def predict_batch(self, params, batch, rng=None, *, max_decode_length, **kwargs):
    del params, rng, kwargs
    tokens, prompt = batch['decoder_input_tokens'], batch['decoder_causal_attention']
    leaked = jnp.sum(tokens * (1 - prompt), axis=1, keepdims=True) > 0
    start = 1 + self.prefix  # BOS, then 'echo:'
    out = jnp.where(leaked, 0, tokens[:, start:start + max_decode_length])
    return out, jnp.zeros(tokens.shape[0])


def test_decoder_only_generation_sees_the_prompt_and_not_the_targets():
  evaluator = evaluation.Evaluator(_StubDecoderOnly(), Partitioner(),
                                   {'inputs': 16, 'targets': 8}, batch_size=8)
  result = evaluator.evaluate(None, _task())
  assert result.metrics == {'accuracy': 100.0}
