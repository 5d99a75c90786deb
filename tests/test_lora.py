"""LoRA adapters (t5x_lite.lora): the update's math against numpy, step 0
equal to the base model, training that moves only the adapters, the
trainable-parameter count and optimizer state of the LoRA formula, merging,
and a LoRA run (with its resume) through the train entry point."""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import main_in_process, read_metrics
from t5x_lite import layers, lora, optimizers
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError
from t5x_lite.models import llama, preference
from t5x_lite.partitioning import Partitioner

import families

ROWS = 4
TARGETS = ('query', 'key', 'value', 'out', 'wi', 'wo', 'wi_0', 'wi_1')
CONFIG = lora.LoraConfig(targets=TARGETS, rank=4, alpha=8.0)


def _base(name):
  if name == 'llama':  # grouped-query: key / value kernels [D, K, H]
    return llama.LlamaModel(llama.LlamaConfig(
        vocab_size=families.VOCAB, emb_dim=16, num_heads=4, num_kv_heads=2, head_dim=8,
        mlp_dim=32, num_layers=2, max_positions=16))
  return families.tiny(name)


class _Setup:
  """A LoRA trainer over a family's tiny model, its fresh state and a batch."""

  def __init__(self, name, config=CONFIG, learning_rate=1e-2):
    self.base = _base(name)
    self.batch = families.random_batch(self.base, ROWS)
    self.model = lora.LoraModel(self.base, config)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.batch.items()}
    self.trainer = trainer_lib.Trainer(self.model, optimizers.adamw(learning_rate),
                                       Partitioner(), shapes)
    self.state = self.trainer.init_state(seed=0)


_SETUPS = {}


def setup(name):
  if name not in _SETUPS:
    _SETUPS[name] = _Setup(name)
  return _SETUPS[name]


def _kernels(params):
  """{module path: kernel shape} of every kernel, from the base params."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {'/'.join(str(p.key) for p in path[:-1]): x.shape for path, x in flat
          if str(path[-1].key) == 'kernel'}


# -----------------------------------------------------------------------------
# The math of one projection, against numpy.
# -----------------------------------------------------------------------------
def test_dense_update_is_x_w_plus_scaled_x_a_b():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 6)).astype(np.float32)
  w = rng.normal(size=(6, 5)).astype(np.float32)
  a = rng.normal(size=(6, 2)).astype(np.float32)
  b = rng.normal(size=(2, 5)).astype(np.float32)
  config = lora.LoraConfig(targets=('dense',), rank=2, alpha=3.0)
  dense = layers.DenseGeneral(5, kernel_axes=('embed', 'mlp'))
  params = {'kernel': w}
  got = dense.apply({'params': lora.attach(params, {'lora_a': a, 'lora_b': b}, config)}, x)
  want = x @ w + 1.5 * (x @ a) @ b
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  plain = dense.apply({'params': params}, x)
  np.testing.assert_allclose(np.asarray(plain), x @ w, rtol=1e-5, atol=1e-5)


def test_grouped_attention_update_matches_numpy():
  """Query, grouped key / value [D, K, H] and out adapters inside Attention
  equal attention computed in numpy with W + (alpha / r) A B."""
  d, n, k, h, r = 8, 4, 2, 3, 2
  attention = layers.Attention(num_heads=n, head_dim=h, num_kv_heads=k, scale_logits=True)
  x = np.random.default_rng(1).normal(size=(2, 5, d)).astype(np.float32)
  boxed = attention.init(jax.random.key(0), x, x)['params']
  params = nn.unbox(boxed)
  config = lora.LoraConfig(targets=('query', 'key', 'value', 'out'), rank=r, alpha=4.0)
  adapters = nn.unbox(lora.init_adapters(jax.random.key(1), boxed, config))
  rng = np.random.default_rng(2)  # B != 0, so that every update shows
  adapters = jax.tree_util.tree_map(lambda v: rng.normal(size=v.shape).astype(np.float32),
                                    adapters)
  got = attention.apply({'params': lora.attach(params, adapters, config)}, x, x)

  def w(name):
    kernel = np.asarray(params[name]['kernel']).reshape(params[name]['kernel'].shape[0], -1)
    a, b = adapters[name]['lora_a'], adapters[name]['lora_b']
    return kernel + 2.0 * a @ b.reshape(r, -1)

  q = (x @ w('query')).reshape(2, 5, n, h)
  kk = np.repeat((x @ w('key')).reshape(2, 5, k, h), n // k, axis=2)
  v = np.repeat((x @ w('value')).reshape(2, 5, k, h), n // k, axis=2)
  logits = np.einsum('btnh,bsnh->bnts', q, kk) / np.sqrt(h)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum('bnts,bsnh->btnh', p, v).reshape(2, 5, n * h) @ w('out')
  np.testing.assert_allclose(np.asarray(got), out, rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# Families.
# -----------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['t5', 'gpt', 'llama', 'gpt_scanned', 'bart'])
def test_step0_is_the_base_model_exactly(name):
  s = setup(name)
  base = s.state.frozen['base']
  want = s.base.logits(base, s.batch)
  got = s.model.logits(s.model.full_params(base, s.state.params), s.batch)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('name', ['t5', 'gpt', 'llama'])
def test_trainable_params_are_the_lora_formula(name):
  s = setup(name)
  kernels = _kernels(s.state.frozen['base'])
  targeted = [shape for path, shape in kernels.items() if path.split('/')[-1] in TARGETS]
  assert targeted
  want = sum(CONFIG.rank * (shape[0] + int(np.prod(shape[1:]))) for shape in targeted)
  assert lora.num_params(s.state.params) == want
  # The optimizer state (AdamW: mu and nu) holds the adapters' sizes, not the base's.
  sizes = [x.size for x in jax.tree_util.tree_leaves(s.state.opt_state) if x.ndim]
  assert sum(sizes) == 2 * want


@pytest.mark.parametrize('name', ['gpt', 'llama', 't5'])
def test_training_moves_only_the_adapters(name):
  s = setup(name)  # its compiled step, a state of its own
  # The synthetic task: every (non-padding) target is token 7.
  batch = {k: np.where(v > 0, 7, 0).astype(v.dtype) if k.endswith('target_tokens') else v
           for k, v in s.batch.items()}
  # A base whose (frozen) embeddings let the logits move far from flat.
  state = s.trainer.init_state(0, base=jax.tree_util.tree_map(lambda x: 3 * x,
                                                              s.state.frozen['base']))
  base_before = jax.device_get(state.frozen['base'])
  before = s.base.logits(base_before, batch)
  losses = []
  for _ in range(15):
    state, metrics = s.trainer.train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.5 * losses[0], losses
  jax.tree_util.tree_map(np.testing.assert_array_equal, base_before,
                         jax.device_get(state.frozen['base']))
  after = s.model.logits(s.model.full_params(state.frozen['base'], state.params), batch)
  assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-2
  # merge folds the trained adapters into the kernels: the base model reads them
  # (up to float32 rounding of logits that the x3 base makes large).
  merged = lora.merge(state.frozen['base'], state.params, CONFIG)
  np.testing.assert_allclose(np.asarray(s.base.logits(merged, batch)), np.asarray(after),
                             rtol=1e-4, atol=2e-4)


def test_classifier_head_trains_in_full_over_a_base_checkpoint_without_it(tmp_path):
  """LoRA of a BERT classifier: its new head (FRESH_PARAMS, by default the
  modules_to_save) trains in full beside the adapters, starting from the
  base's init; the base comes from an MLM checkpoint that has no head."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  s = setup('bert_cls')
  mlm = families.tiny('bert')
  mlm_params = nn.unbox(mlm.init(jax.random.PRNGKey(5), families.random_batch(mlm, ROWS)))
  step_dir = tmp_path / 'checkpoints' / '7'
  ocp.PyTreeCheckpointer().save(str(step_dir / 'state'), {'params': mlm_params['params']})
  base = s.trainer.base_params(0, str(step_dir), fresh=s.model.FRESH_PARAMS)
  np.testing.assert_array_equal(  # the encoder is the checkpoint's
      base['encoder']['layers_0']['attention']['query']['kernel'],
      mlm_params['params']['encoder']['layers_0']['attention']['query']['kernel'])
  state = s.trainer.init_state(0, base=base)
  head = jax.device_get(state.params['classifier'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, head,
                         jax.device_get(base['classifier']))
  kernels = _kernels(base)
  targeted = [shape for path, shape in kernels.items() if path.split('/')[-1] in TARGETS]
  adapters = sum(CONFIG.rank * (shape[0] + int(np.prod(shape[1:]))) for shape in targeted)
  assert lora.num_params(state.params) == adapters + sum(x.size for x in
                                                        jax.tree_util.tree_leaves(head))
  base_before = jax.device_get(state.frozen['base'])
  losses = []
  for _ in range(10):
    state, metrics = s.trainer.train_step(state, s.batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0]
  assert np.abs(jax.device_get(state.params['classifier']['kernel']) - head['kernel']).max() > 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, base_before,
                         jax.device_get(state.frozen['base']))
  # attach and merge put the trained head in place of the base's.
  full = s.model.full_params(state.frozen['base'], state.params)
  merged = lora.merge(state.frozen['base'], state.params, s.model.lora_config)
  np.testing.assert_array_equal(full['classifier']['kernel'],
                                state.params['classifier']['kernel'])
  np.testing.assert_allclose(np.asarray(s.base.logits(merged, s.batch)),
                             np.asarray(s.model.logits(full, s.batch)), rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match='both a LoRA target and in modules_to_save'):
    lora.LoraModel(s.base, lora.LoraConfig(targets=('query', 'classifier'),
                                           modules_to_save=('classifier',))).init(
                                               jax.random.PRNGKey(0), s.batch)


@pytest.mark.parametrize('name', ['t5', 'gpt', 'llama', 'gpt_scanned'])
def test_merged_kernels_compute_the_adapted_model(name):
  s = setup(name)
  rng = np.random.default_rng(3)  # B != 0: every update shows
  adapters = jax.tree_util.tree_map(
      lambda x: 0.1 * rng.normal(size=x.shape).astype(np.float32), s.state.params)
  base = s.state.frozen['base']
  unmerged = s.model.logits(s.model.full_params(base, adapters), s.batch)
  merged = s.base.logits(lora.merge(base, adapters, CONFIG), s.batch)
  assert np.abs(np.asarray(unmerged) - np.asarray(s.base.logits(base, s.batch))).max() > 1e-2
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), rtol=1e-5, atol=1e-5)


def test_adapter_dropout_acts_in_training_only():
  s = setup('gpt')
  config = lora.LoraConfig(targets=TARGETS, rank=4, alpha=8.0, dropout_rate=0.5)
  model = lora.LoraModel(s.base, config)
  adapters = jax.tree_util.tree_map(lambda x: x + 0.1, s.state.params)  # B != 0
  frozen = {'base': s.state.frozen['base']}
  plain = model.loss_fn(adapters, s.batch, None, frozen=frozen)[0]
  no_update = lora.LoraModel(s.base, CONFIG).loss_fn(adapters, s.batch, None, frozen=frozen)[0]
  assert float(plain) == float(no_update)
  one = model.loss_fn(adapters, s.batch, jax.random.PRNGKey(1), frozen=frozen)[0]
  again = model.loss_fn(adapters, s.batch, jax.random.PRNGKey(1), frozen=frozen)[0]
  other = model.loss_fn(adapters, s.batch, jax.random.PRNGKey(2), frozen=frozen)[0]
  assert float(one) == float(again) and float(one) != float(plain) and float(one) != float(other)


def test_dpo_reference_is_the_base_without_adapters():
  """LoRA around DPO: at step 0 the policy is the reference (the base), so
  every margin is 0 and the loss is log 2; training raises the reward accuracy."""
  gpt = families.tiny('gpt')
  one, other = families.random_batch(gpt, ROWS), families.random_batch(gpt, ROWS, seed=1)
  batch = {**{f'chosen_{k}': v for k, v in one.items()},
           **{f'rejected_{k}': v for k, v in other.items()}}
  model = lora.LoraModel(preference.DPOModel(gpt, beta=0.5), CONFIG)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  trainer = trainer_lib.Trainer(model, optimizers.adamw(1e-2), Partitioner(), shapes)
  state = trainer.init_state(seed=0)
  assert set(state.frozen) == {'base'}  # no reference copy
  losses = []
  for _ in range(5):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics['loss']))
  np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-6)
  assert losses[-1] < losses[0] - 0.05, losses


def test_bfloat16_base_under_float32_adapters():
  base = families.tiny('gpt', param_dtype='bfloat16')
  batch = families.random_batch(base, ROWS)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  trainer = trainer_lib.Trainer(lora.LoraModel(base, CONFIG), optimizers.adamw(1e-2),
                                Partitioner(), shapes)
  state = trainer.init_state(seed=0)
  base_before = jax.device_get(state.frozen['base'])
  assert {x.dtype for x in jax.tree_util.tree_leaves(base_before)} == {jnp.dtype(jnp.bfloat16)}
  for _ in range(2):
    state, metrics = trainer.train_step(state, batch)
  assert float(metrics['nonfinite_steps']) == 0.0
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert np.abs(np.asarray(state.params['decoder']['layers_0']['self_attention']['query']
                           ['lora_b'])).max() > 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, base_before,
                         jax.device_get(state.frozen['base']))


def test_config_mistakes_are_user_errors():
  with pytest.raises(UserError, match='rank'):
    lora.LoraConfig(rank=0)
  s = setup('gpt')
  boxed = jax.eval_shape(lambda: s.base.init(jax.random.key(0), s.batch))['params']
  with pytest.raises(UserError, match='match no kernel'):
    lora.init_adapters(jax.random.key(0), boxed, lora.LoraConfig(targets=('qkv',)))


def test_adapters_are_sharded_as_the_kernels_they_adapt():
  s = setup('llama')
  boxed = jax.eval_shape(lambda: s.model.init(jax.random.key(0), s.batch))['params']
  key = boxed['decoder']['layers_0']['self_attention']['key']
  assert key['lora_a'].names == ('embed', None)
  assert key['lora_b'].names == (None, 'kv_heads', 'kv')
  assert key['lora_b'].value.shape == (CONFIG.rank, 2, 8)


# -----------------------------------------------------------------------------
# The train entry point.
# -----------------------------------------------------------------------------
def _lora_run(model_dir, steps):
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  main_in_process(train, [
      '--gin_file=gin/llama_tiny_lora.gin', f"--gin.MODEL_DIR='{model_dir}'",
      f'--gin.TRAIN_STEPS={steps}', '--gin.CHECKPOINT_PERIOD=2', '--gin.WARMUP_STEPS=1',
      '--gin.INITIAL_CHECKPOINT_PATH=None', "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
      '--gin.BATCH_SIZE=4', '--gin.llama.LlamaConfig.num_layers=1',
      '--gin.train_script.train.log_every=1', '--gin.train_script.train.progress_bar=False'])
  return read_metrics(model_dir)


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """(model dir, metrics) of 3 steps of gin/llama_tiny_lora.gin over a random base."""
  model_dir = str(tmp_path_factory.mktemp('lora_run') / 'whole')
  return model_dir, _lora_run(model_dir, 3)


@pytest.mark.slow
def test_lora_gin_run_resumes_bit_exactly(lora_run, tmp_path):
  """The run resumed from its step-2 checkpoint (step 3's removed) repeats
  step 3 bit for bit; the checkpoints hold the adapters only."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  whole, rows = lora_run
  parts = str(tmp_path / 'parts')
  shutil.copytree(whole, parts)
  shutil.rmtree(os.path.join(parts, 'checkpoints', '3'))
  resumed = _lora_run(parts, 3)
  assert len(rows) == 3 and [r['loss'] for r in rows] == [r['loss'] for r in resumed]
  restore = lambda d: ocp.PyTreeCheckpointer().restore(os.path.join(d, 'checkpoints', '3',
                                                                    'state'))
  state, again = restore(whole), restore(parts)
  assert set(state) == {'step', 'params', 'opt_state', 'rng'}  # no base params
  assert _leaf_names(state['params']) == {'lora_a', 'lora_b'}
  jax.tree_util.tree_map(np.testing.assert_array_equal, state, again)


def test_lora_checkpoint_names_its_base_and_refuses_another(lora_run, tmp_path):
  """Each checkpoint's meta names the base (here the random init of seed 0);
  resuming over another base stops with one line, and the run is unchanged."""
  from t5x_lite import checkpoints  # pylint: disable=g-import-not-at-top
  whole, _ = lora_run
  meta = checkpoints.read_meta(os.path.join(whole, 'checkpoints', '3'))
  assert meta[lora.CHECKPOINT_META] == {'checkpoint': None, 'seed': 0, 'config': {
      'targets': list(TARGETS[:4]) + ['wi_0', 'wi_1', 'wo'], 'rank': 8, 'alpha': 16.0,
      'dropout_rate': 0.0, 'init': 'kaiming_uniform', 'param_dtype': 'float32',
      'modules_to_save': []}}
  copy = str(tmp_path / 'copy')
  shutil.copytree(whole, copy)
  steps = sorted(os.listdir(os.path.join(copy, 'checkpoints')))
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match='were trained over the random init of seed 0, but this '
                     'run sets the random init of seed 1; set INITIAL_CHECKPOINT_PATH back'):
    main_in_process(train, [
        '--gin_file=gin/llama_tiny_lora.gin', f"--gin.MODEL_DIR='{copy}'",
        '--gin.TRAIN_STEPS=4', '--gin.INITIAL_CHECKPOINT_PATH=None', '--gin.SEED=1',
        "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", '--gin.BATCH_SIZE=4',
        '--gin.llama.LlamaConfig.num_layers=1', '--gin.train_script.train.progress_bar=False'])
  assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == steps


def test_lora_checkpoint_infers_as_its_merged_model(lora_run, tmp_path):
  """`python -m t5x_lite.infer` on a LoRA run's checkpoint continues a prompt
  as greedy decoding (full forward passes) of the merged kernels W + (alpha/r) A B
  does, with the base and adapters read straight from their checkpoints."""
  import json  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from t5x_lite import infer  # pylint: disable=g-import-not-at-top
  whole, _ = lora_run
  prompt = 'The function returns'
  (tmp_path / 'p.txt').write_text(prompt + '\n')
  main_in_process(infer, [
      '--gin_file=configs/runs/infer.gin', f'--gin_file={whole}/config.gin',
      f"--gin.CHECKPOINT_PATH='{whole}'", f"--gin.INPUT_FILE='{tmp_path / 'p.txt'}'",
      f"--gin.MODEL_DIR='{tmp_path}'"])
  with open(tmp_path / 'infer' / 'p.jsonl') as f:
    row, = [json.loads(l) for l in f]
  # The reference: the merged kernels in the plain family model.
  base_model = llama.LlamaModel(llama.LlamaConfig(num_layers=1))  # llama_tiny.gin's, 1 layer
  batch = {'decoder_input_tokens': np.zeros([1, 32], np.int32),
           'decoder_attention_mask': np.ones([1, 32], np.int32)}
  base = nn.unbox(base_model.init(jax.random.split(jax.random.PRNGKey(0))[0], batch))['params']
  adapters = ocp.PyTreeCheckpointer().restore(
      os.path.join(whole, 'checkpoints', '3', 'state'))['params']
  merged = lora.merge(base, adapters, lora.LoraConfig(
      targets=('query', 'key', 'value', 'out', 'wi_0', 'wi_1', 'wo')))
  v = vocab_lib.embedded_bpe_vocabulary()
  ids, generated = [0] + v.encode(prompt), []
  logits = jax.jit(lambda p, t, m: base_model.logits(p, {'decoder_input_tokens': t,
                                                         'decoder_attention_mask': m}))
  for _ in range(32):
    tokens = np.zeros([1, 64], np.int32)
    tokens[0, :len(ids)] = ids
    real = (np.arange(64) < len(ids))[None].astype(np.int32)
    nxt = int(jnp.argmax(logits(merged, tokens, real)[0, len(ids) - 1]))
    if nxt == v.eos_id:
      break
    generated.append(nxt)
    ids.append(nxt)
  assert row['inputs'] == prompt and row['outputs'] == v.decode(generated)


def _leaf_names(tree):
  return {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_a_base_checkpoint_is_read_without_a_seed(tmp_path):
  """A LoRA run over INITIAL_CHECKPOINT_PATH records its base with no seed
  (`lora.checkpoint_meta`); eval, infer and export read that base back with
  `base_params(seed=None)`, which gives the checkpoint's params."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  model = _base('llama')
  batch = model.dummy_batch(1, 8)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  saved = jax.tree_util.tree_map(
      lambda x: np.random.default_rng(0).normal(size=x.shape).astype(x.dtype),
      nn.unbox(jax.eval_shape(model.init, jax.random.key(1), batch))['params'])
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(tmp_path / 'checkpoint', args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': saved})))
  assert lora.checkpoint_meta(lora.LoraConfig(), str(tmp_path / 'checkpoint'), 0)['seed'] is None
  base = trainer_lib.base_params(model, Partitioner(), shapes, None, str(tmp_path / 'checkpoint'))
  jax.tree_util.tree_map(np.testing.assert_array_equal, base, saved)
