"""BERT [CLS] and GPT-1 [EXTRACT] classifiers, their converters and `_cls` tasks."""

import os

import gin
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from flax import linen as nn
from t5x_lite import checkpoints
from t5x_lite import hf as t5x_lite_hf
from t5x_lite.data import cls_features
from t5x_lite.data import glue_sources
from t5x_lite.data import settings
from t5x_lite.data import wordpiece
from t5x_lite.hf import bert as hf_bert
from t5x_lite.models import classification as cls
from t5x_lite.models import decoder as dec
from t5x_lite.models import encoder as enc

import families
from conftest import SHARED_DATA, require, require_shared_data

# The sizes of the HF reference models; the GPT reads the embedded vocabulary.
HF_SIZES = dict(vocab_size=97, emb_dim=32, num_heads=4, mlp_dim=48, max_positions=40)
SMALL_BERT = families.config('bert', **HF_SIZES)
SMALL_GPT = families.config('gpt', **{**HF_SIZES, 'vocab_size': 8192}, num_layers=1)


def _rows(converter, rows, length):
  ds = tf.data.Dataset.from_generator(
      lambda: iter(rows), output_signature={
          k: tf.TensorSpec([None] * np.ndim(v), tf.as_dtype(np.asarray(v).dtype))
          for k, v in rows[0].items()})
  return list(converter(ds, {'inputs': length}).as_numpy_iterator())


def _truncate_seq_pair(a, b, max_length):
  """BERT's loop (run_classifier.py), the reference for the converters."""
  a, b = list(a), list(b)
  while len(a) + len(b) > max_length:
    (a if len(a) > len(b) else b).pop()
  return a, b


# --- BERT against Hugging Face ---------------------------------------------

@pytest.mark.parametrize('num_classes', [3, 1])
def test_bert_logits_and_loss_match_hf(num_classes, tmp_path):
  torch = require('torch')
  transformers = require('transformers')
  cfg = SMALL_BERT
  torch.manual_seed(0)
  hf = transformers.BertForSequenceClassification(transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
      max_position_embeddings=cfg.max_positions, hidden_act='gelu', hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, attn_implementation='eager', initializer_range=0.2,
      num_labels=num_classes)).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for name, p in hf.named_parameters():
      if name.endswith('bias') or 'LayerNorm' in name:
        p.add_(0.1 * torch.randn_like(p))
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  params = hf_bert.classifier_from_hf_state_dict(state, cfg)
  # Head dropout (HF's classifier_dropout) is off without a dropout rng.
  model = cls.BertClassificationModel(cfg, num_classes=num_classes, classifier_dropout_rate=0.5)
  # The converted tree is exactly the model's own.
  want = jax.eval_shape(model.init, jax.random.key(0), model.dummy_batch(1, 8))
  assert (jax.tree_util.tree_structure(nn.unbox(want)['params']) ==
          jax.tree_util.tree_structure(params))

  rng = np.random.default_rng(0)
  tokens = rng.integers(1, cfg.vocab_size, (4, 24)).astype(np.int32)
  segments = np.zeros_like(tokens)
  for i, n in enumerate((24, 17, 9, 5)):
    tokens[i, n:] = 0
    segments[i, n // 2:n] = 1
  labels = (rng.normal(size=4).astype(np.float32) if num_classes == 1
            else np.array([0, 2, 1, 2], np.int32))
  batch = dict(input_tokens=tokens, segment_ids=segments,
               attention_mask=(tokens > 0).astype(np.int32), label=labels)

  @jax.jit
  def run(params, batch):  # one compile: logits, loss and loss with dropout
    return (model.class_logits(params, batch), model.predict_batch(params, batch),
            model.loss_fn(params, batch, None), model.loss_fn(params, batch, jax.random.key(0)))

  ours, predicted, (loss, metrics), (dropped, _) = run(params, batch)
  ours = np.asarray(ours)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(tokens).long(),
             token_type_ids=torch.from_numpy(segments).long(),
             attention_mask=torch.from_numpy(batch['attention_mask']).long(),
             labels=torch.from_numpy(labels if num_classes == 1 else labels.astype(np.int64)))
  assert ours.shape == (4, num_classes)
  assert np.abs(ours).max() > 0.1  # not trivially near 0
  np.testing.assert_allclose(ours, out.logits.numpy(), atol=1e-4)
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
  assert ('mse' if num_classes == 1 else 'accuracy') in metrics
  assert abs(float(dropped) - float(loss)) > 1e-4
  expected = out.logits.numpy()[:, 0] if num_classes == 1 else out.logits.numpy().argmax(-1)
  np.testing.assert_allclose(np.asarray(predicted), expected, atol=1e-4)

  back = hf_bert.classifier_to_hf_state_dict(params, cfg)
  assert set(back) == set(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)

  # `hf.load` of the saved directory gives the classifier, its head included.
  hf.save_pretrained(tmp_path)
  loaded, loaded_params = t5x_lite_hf.load(tmp_path)
  assert isinstance(loaded, cls.BertClassificationModel)
  assert loaded.num_classes == num_classes
  np.testing.assert_allclose(np.asarray(jax.jit(loaded.class_logits)(loaded_params, batch)),
                             out.logits.numpy(), atol=1e-4)


def test_loss_is_hand_computed_cross_entropy_and_mse():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-3.0, 1.0, 4.0]], np.float32)
  labels = np.array([0, 2, 1])
  loss, metrics = cls.classification_loss(logits, labels)
  ce = [np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits.astype(np.float64), labels)]
  np.testing.assert_allclose(float(loss), np.mean(ce), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['accuracy']), 1 / 3)  # only row 0 is right
  assert float(metrics['num_examples']) == 3

  scores = np.array([[0.5], [3.0], [-1.0]], np.float32)
  targets = np.array([1.0, 2.5, 0.0], np.float32)
  loss, metrics = cls.classification_loss(scores, targets)
  np.testing.assert_allclose(float(loss), (0.25 + 0.25 + 1.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['mse']), float(loss))
  np.testing.assert_array_equal(cls.predictions(logits), [0, 0, 2])
  np.testing.assert_array_equal(cls.predictions(scores), [0.5, 3.0, -1.0])


# --- converters --------------------------------------------------------------

def test_bert_converter_layout_and_truncation():
  vocab = wordpiece.embedded_wordpiece_vocabulary()
  c, s = vocab.cls_id, vocab.sep_id
  converter = cls_features.BertClassificationFeatureConverter()
  pair = {'text_a': np.array([10, 11, 12, 13, 14]), 'text_b': np.array([20, 21]),
          'label': np.int64(1)}
  (row,) = _rows(converter, [pair], 8)  # 5 + 2 > 8 - 3: A (the longer) loses 2
  np.testing.assert_array_equal(row['input_tokens'], [c, 10, 11, 12, s, 20, 21, s])
  np.testing.assert_array_equal(row['segment_ids'], [0, 0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(row['attention_mask'], [1] * 8)
  assert row['label'] == 1 and row['label'].dtype == np.int32

  (row,) = _rows(converter, [pair], 12)  # fits: padded
  np.testing.assert_array_equal(row['input_tokens'],
                                [c, 10, 11, 12, 13, 14, s, 20, 21, s, 0, 0])
  np.testing.assert_array_equal(row['segment_ids'], [0] * 7 + [1] * 3 + [0, 0])
  np.testing.assert_array_equal(row['attention_mask'], [1] * 10 + [0, 0])

  (row,) = _rows(converter, [{'text_a': np.arange(10, 20), 'label': np.float32(2.5)}], 6)
  np.testing.assert_array_equal(row['input_tokens'], [c, 10, 11, 12, 13, s])
  np.testing.assert_array_equal(row['segment_ids'], [0] * 6)
  assert row['label'].dtype == np.float32 and row['label'] == 2.5

  # The model's converter knows its classes: a label beyond them fails.
  converter_of_model = cls.BertClassificationModel(SMALL_BERT, num_classes=2).FEATURE_CONVERTER_CLS
  with pytest.raises(tf.errors.InvalidArgumentError, match='num_classes'):
    _rows(converter_of_model(pack=False), [dict(pair, label=np.int64(2))], 8)

  # Every pair of lengths against BERT's own truncation loop.
  rows, expected = [], []
  for la in range(0, 9):
    for lb in range(1, 9):
      a, b = np.arange(100, 100 + la), np.arange(200, 200 + lb)
      rows.append({'text_a': a, 'text_b': b, 'label': np.int64(0)})
      ta, tb = _truncate_seq_pair(a, b, 10 - 3)
      ids = [c, *ta, s, *tb, s]
      expected.append(ids + [0] * (10 - len(ids)))
  got = [r['input_tokens'].tolist() for r in _rows(converter, rows, 10)]
  assert got == expected


def test_gpt_layout_head_at_extract_and_auxiliary_lm_loss():
  start, delim, extract = cls_features.gpt_special_ids()
  assert (start, delim, extract) == (8000, 8001, 8002)  # <extra_id_99/98/97>
  converter = cls_features.GptClassificationFeatureConverter()
  rows = [{'text_a': np.array([10, 11, 12, 13, 14]), 'text_b': np.array([20, 21]),
           'label': np.int64(1)},
          {'text_a': np.array([30, 31]), 'text_b': np.arange(40, 48),
           'label': np.int64(0)}]
  got = _rows(converter, rows, 12)
  np.testing.assert_array_equal(got[0]['decoder_input_tokens'],
                                [start, 10, 11, 12, 13, 14, delim, 20, 21, extract, 0, 0])
  np.testing.assert_array_equal(got[0]['decoder_attention_mask'], [1] * 10 + [0, 0])
  assert got[0]['extract_position'] == 9
  a, b = _truncate_seq_pair([30, 31], range(40, 48), 9)  # B loses 1
  np.testing.assert_array_equal(got[1]['decoder_input_tokens'],
                                [start, *a, delim, *b, extract])
  assert got[1]['extract_position'] == 11

  model = cls.GptClassificationModel(SMALL_GPT, num_classes=3, lm_weight=0.5)
  batch = {k: np.stack([r[k] for r in got]) for k in got[0]}
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']
  assert sorted(params) == ['classifier', 'decoder', 'position_embedder', 'token_embedder']
  class_logits = jax.jit(model.class_logits)  # one compile for the three batches
  logits = np.asarray(class_logits(params, batch))
  # The head is the classifier on the final hidden state at EXTRACT.

  @jax.jit
  def network(params, tokens, mask):  # GPTNetwork's own hidden states and LM logits
    apply = lambda method: model.module.apply({'params': params}, tokens,
                                              decoder_attention_mask=mask, method=method)
    return apply(dec.GPTNetwork.hidden_states), apply(dec.GPTNetwork.__call__)

  hidden, lm = network(params, batch['decoder_input_tokens'], batch['decoder_attention_mask'])
  at_extract = np.asarray(hidden)[np.arange(2), batch['extract_position']]
  kernel, bias = params['classifier']['kernel'], params['classifier']['bias']
  np.testing.assert_allclose(logits, at_extract @ kernel + bias, atol=1e-5)
  # Tokens after EXTRACT (padding) do not matter; tokens before it do.
  padded = dict(batch, decoder_input_tokens=batch['decoder_input_tokens'].copy())
  padded['decoder_input_tokens'][0, 10:] = [7, 8]
  padded['decoder_attention_mask'] = np.ones_like(batch['decoder_attention_mask'])
  np.testing.assert_allclose(class_logits(params, padded), logits, atol=1e-6)
  changed = dict(batch, decoder_input_tokens=batch['decoder_input_tokens'].copy())
  changed['decoder_input_tokens'][:, 1] = 99
  assert np.abs(np.asarray(class_logits(params, changed)) - logits).max() > 1e-4

  # loss = CE + 0.5 * mean next-token loss over the real tokens.
  loss, metrics = jax.jit(model.loss_fn)(params, batch, None)
  lm = np.asarray(lm, np.float64)
  logp = lm - np.log(np.exp(lm).sum(-1, keepdims=True))
  tokens = batch['decoder_input_tokens']
  lm_terms = [-logp[i, t, tokens[i, t + 1]] for i, n in enumerate((10, 12)) for t in range(n - 1)]
  ce = [np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits.astype(np.float64), [1, 0])]
  np.testing.assert_allclose(float(metrics['lm_loss']), np.mean(lm_terms), rtol=1e-5)
  np.testing.assert_allclose(float(loss), np.mean(ce) + 0.5 * np.mean(lm_terms), rtol=1e-5)


def test_every_param_has_logical_names():
  from conftest import assert_logical_names  # pylint: disable=g-import-not-at-top
  allowed = {'vocab', 'embed', 'heads', 'kv', 'joined_kv', 'mlp', 'abspos'}
  for model in (cls.BertClassificationModel(SMALL_BERT, num_classes=3),
                cls.GptClassificationModel(SMALL_GPT, num_classes=3)):
    # The classes are the one unnamed (replicated) axis.
    assert_logical_names(model, model.dummy_batch(2, 4), allowed,
                         unnamed_last_axis=('classifier',))


# --- training, checkpoints, gin --------------------------------------------

def test_tiny_bert_classifier_learns_separable_task():
  cfg = families.config('bert', emb_dim=32, head_dim=16, mlp_dim=64, num_layers=1)
  model = cls.BertClassificationModel(cfg, num_classes=2)
  rng = np.random.default_rng(0)
  tokens = rng.integers(10, 64, (64, 10)).astype(np.int32)
  tokens[:, 0] = 2
  labels = (tokens[:, 3] >= 37).astype(np.int32)  # class = a token's half of the vocab
  batch = dict(input_tokens=tokens, segment_ids=np.zeros_like(tokens),
               attention_mask=np.ones_like(tokens), label=labels)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))['params']
  tx = optax.adam(optax.cosine_decay_schedule(1e-2, 30))

  @jax.jit
  def step(params, opt_state, rng):
    grads, metrics = jax.grad(model.loss_fn, has_aux=True)(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state = tx.init(params)
  first = None
  for i in range(30):
    params, opt_state, metrics = step(params, opt_state, jax.random.key(i))
    first = first or float(metrics['loss'])
  # The last step's metrics are those of the params before its update (dropout is 0).
  assert float(metrics['loss']) < first / 4
  assert float(metrics['accuracy']) == 1.0


def test_pretrained_bert_checkpoint_restores_all_but_the_head(tmp_path):
  rng = np.random.default_rng(0)
  random_like = lambda tree: jax.tree_util.tree_map(
      lambda x: rng.normal(size=x.shape).astype(x.dtype), tree)
  pretrain = enc.EncoderModel(SMALL_BERT)
  pretrained = random_like(nn.unbox(jax.eval_shape(
      pretrain.init, jax.random.key(1), pretrain.dummy_batch(1, 8)))['params'])
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(os.path.join(tmp_path, 'checkpoint'), args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': pretrained})))
  model = cls.BertClassificationModel(SMALL_BERT, num_classes=4)
  fresh = random_like(nn.unbox(jax.eval_shape(
      model.init, jax.random.key(2), model.dummy_batch(1, 8)))['params'])
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
  restored = checkpoints.restore_params(os.path.join(tmp_path, 'checkpoint'), abstract,
                                        fresh=model.FRESH_PARAMS)
  assert isinstance(restored['classifier']['kernel'], jax.ShapeDtypeStruct)  # left to init
  params = dict(restored, classifier=fresh['classifier'])
  assert set(pretrained) - set(params) == {'mlm_head', 'nsp_head'}
  assert set(params) - set(pretrained) == {'classifier'}
  for k in set(params) & set(pretrained):
    jax.tree_util.tree_map(np.testing.assert_array_equal, params[k], pretrained[k])
  jax.tree_util.tree_map(np.testing.assert_array_equal, params['classifier'],
                         fresh['classifier'])


def test_models_are_gin_configurable():
  gin.clear_config()
  gin.parse_config("""
      from __gin__ import dynamic_registration
      from t5x_lite.models import classification
      from t5x_lite.models import decoder
      MODEL = @classification.GptClassificationModel()
      classification.GptClassificationModel:
        config = @decoder.GPTConfig()
        num_classes = 3
        classifier_dropout_rate = 0.2
        lm_weight = 0.5
      decoder.GPTConfig.emb_dim = 16
  """)
  model = gin.query_parameter('%MODEL').scoped_configurable_fn()
  gin.clear_config()
  assert (model.num_classes, model.classifier_dropout_rate, model.lm_weight) == (3, 0.2, 0.5)
  assert model.config.emb_dim == 16


# --- `_cls` tasks on real rows ------------------------------------------------

@pytest.fixture(scope='module')
def shared_files():
  settings.use(glue=glue_sources.data_settings(
      source='files', glue_dir=require_shared_data('glue'),
      super_glue_dir=require_shared_data('super_glue')))
  yield SHARED_DATA
  settings.use()


def _first(task_name, n):
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset({'inputs': 64}, split='validation', shuffle=False,
                        use_cached=False, num_epochs=1)
  return task, ds, list(ds.take(n).as_numpy_iterator())


def test_cls_tasks_read_real_rows(shared_files):
  import csv  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from t5x_lite.tasks import glue_cls  # pylint: disable=g-import-not-at-top
  vocab = wordpiece.embedded_wordpiece_vocabulary()
  encode = lambda text: vocab.encode(text)

  with open(os.path.join(shared_files, 'glue/SST-2/dev.tsv'), encoding='utf-8') as f:
    sst2 = list(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE))[:3]
  task, ds, got = _first('glue_sst2_v002_cls', 3)
  assert set(task.output_features) == {'text_a'} and glue_cls.num_classes(task.name) == 2
  for row, ex in zip(sst2, got):
    assert ex['text_a'].tolist() == encode(row['sentence'])
    assert ex['label'] == int(row['label'])
  (bert,) = cls_features.BertClassificationFeatureConverter()(ds.take(1), {'inputs': 64}) \
      .as_numpy_iterator()
  ids = [vocab.cls_id, *encode(sst2[0]['sentence']), vocab.sep_id]
  assert bert['input_tokens'].tolist() == ids + [0] * (64 - len(ids))
  assert task.postprocess_fn(1, example=got[0], is_target=True) == 1

  with open(os.path.join(shared_files, 'glue/RTE/dev.tsv'), encoding='utf-8') as f:
    rte = list(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE))[:2]
  _, _, got = _first('glue_rte_v002_cls', 2)
  for row, ex in zip(rte, got):
    assert ex['text_a'].tolist() == encode(row['sentence1'])
    assert ex['text_b'].tolist() == encode(row['sentence2'])
    assert ex['label'] == ('entailment', 'not_entailment').index(row['label'])

  with open(os.path.join(shared_files, 'super_glue/BoolQ/val.jsonl'), encoding='utf-8') as f:
    boolq = [json.loads(line) for line in f][:2]
  task, _, got = _first('super_glue_boolq_v102_cls', 2)
  for row, ex in zip(boolq, got):
    assert ex['text_a'].tolist() == encode(row['question'])
    assert ex['text_b'].tolist() == encode(row['passage'])
    assert ex['label'] == int(str(row['label']).lower() == 'true')
  twin = glue_cls.seqio.TaskRegistry.get('super_glue_boolq_v102')
  assert task.metric_fns == twin.metric_fns


def test_grouped_candidates_decide_per_question():
  from t5x_lite.tasks import glue_cls  # pylint: disable=g-import-not-at-top
  row = {'passage': 'Anna met Bob in Paris.\n@highlight\nBob stayed',
         'query': 'Later, @placeholder went home.', 'entities': ['Anna', 'Bob', 'Paris'],
         'answers': ['Bob'], 'idx': {'passage': np.int32(3), 'query': np.int32(7)}}
  rows = list(glue_cls.record_text(tf.data.Dataset.from_tensors(row)).as_numpy_iterator())
  assert [r['text_b'] for r in rows] == [b'Later, Anna went home.', b'Later, Bob went home.',
                                         b'Later, Paris went home.']
  assert [r['label'] for r in rows] == [0, 1, 0]
  assert rows[0]['text_a'] == b'Anna met Bob in Paris. Bob stayed'
  post = glue_cls._GROUPED['record'][0]  # pylint: disable=protected-access
  targets = [post(int(r['label']), example=r, is_target=True) for r in rows]
  right = [post(p, example=r) for p, r in zip([0, 1, 1], rows)]
  wrong = [post(p, example=r) for p, r in zip([1, 1, 0], rows)]
  assert glue_cls.record_squad(targets, right) == {'em': 100.0, 'f1': 100.0}
  assert glue_cls.record_squad(targets, wrong) == {'em': 0.0, 'f1': 0.0}

  # COPA: questions 0 (answer choice2) and 1 (answer choice1), two rows each.
  targets = [{'group': g, 'value': v} for g, v in ((0, 0), (0, 1), (1, 1), (1, 0))]
  preds = [{'group': g, 'value': v} for g, v in ((0, 0), (0, 1), (1, 0), (1, 0))]
  assert glue_cls.copa_accuracy(targets, preds) == {'accuracy': 50.0}
  # With the model's log p(class 1) per candidate, the best-scored one is chosen
  # even when several (or none) are predicted 1.
  scored = [dict(p, score=s) for p, s in zip(preds, (-0.1, -2.0, -3.0, -0.5))]
  assert glue_cls.copa_accuracy(targets, scored) == {'accuracy': 0.0}
  scored = [dict(p, score=s) for p, s in zip(preds, (-2.0, -0.1, -0.5, -3.0))]
  assert glue_cls.copa_accuracy(targets, scored) == {'accuracy': 100.0}
  best_bob = [dict(post(p, example=r), score=s)
              for p, r, s in zip([1, 1, 1], rows, (-0.9, -0.2, -0.7))]
  assert glue_cls.record_squad(targets=[post(int(r['label']), example=r, is_target=True)
                                        for r in rows], predictions=best_bob)['em'] == 100.0
