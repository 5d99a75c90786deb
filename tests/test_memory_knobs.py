"""Memory knobs of every model family: scanned layers, rematerialisation, dtypes."""

import dataclasses
import functools
import os

from flax import linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import families
from conftest import REPO, assert_logical_names
from t5x_lite import gin_utils
from t5x_lite import hf
from t5x_lite import layers
from t5x_lite import optimizers
from t5x_lite import param_layout
from t5x_lite import trainer
from t5x_lite.errors import UserError
from t5x_lite.models import bart
from t5x_lite.models import common
from t5x_lite.models import decoder
from t5x_lite.models import encoder
from t5x_lite.models import encoder_decoder
from t5x_lite.partitioning import Partitioner

V = 64
SIZES = dict(vocab_size=V, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64)
# Two encoder layers check the stacking order; one decoder layer keeps the
# unscanned programs (which grow with depth) quick to compile.
ENC_DEC_LAYERS = dict(num_encoder_layers=2, num_decoder_layers=1)
# The models' default dropout rates (the comparisons run without dropout).
DROPOUT = dict(dropout_rate=0.1, attention_dropout_rate=0.1)
# family -> (Model class, config, HF converter module name)
FAMILIES = {
    't5': (encoder_decoder.EncoderDecoderModel,
           families.config('t5', **SIZES, **ENC_DEC_LAYERS, dropout_rate=0.1,
                           relative_attention_num_buckets=8,
                           relative_attention_max_distance=16), 't5'),
    'bert': (encoder.EncoderModel, families.config('bert', **SIZES, **DROPOUT), 'bert'),
    'gpt': (decoder.DecoderModel, families.config('gpt', **SIZES, **DROPOUT), 'gpt2'),
    'bart': (bart.BartModel, families.config('bart', **SIZES, **ENC_DEC_LAYERS, **DROPOUT),
             'bart'),
}
ALLOWED = layers.LOGICAL_AXIS_NAMES + ('abspos',)


def _batch(family):
  """A small random batch with every feature the family reads."""
  rng = np.random.RandomState(0)
  tokens = lambda shape: rng.randint(1, V, shape).astype(np.int32)
  if family == 'bert':
    return dict(input_tokens=tokens((2, 8)),
                segment_ids=np.repeat([[0] * 4 + [1] * 4], 2, 0).astype(np.int32),
                targets=tokens((2, 8)),
                loss_weights=rng.randint(0, 2, (2, 8)).astype(np.int32),
                next_sentence_label=np.array([0, 1], np.int32))
  if family == 'gpt':
    return dict(decoder_input_tokens=tokens((2, 8)),
                decoder_target_tokens=tokens((2, 8)))
  return dict(encoder_input_tokens=tokens((2, 8)),
              decoder_input_tokens=tokens((2, 6)),
              decoder_target_tokens=tokens((2, 6)))


def _model(family, **changes):
  model_cls, config, _ = FAMILIES[family]
  return model_cls(dataclasses.replace(config, **changes))


# Tiny programs: compile fast rather than run fast.
_jit = functools.partial(jax.jit,
                         compiler_options={'xla_backend_optimization_level': 0})


def _outputs(model, params, batch):
  """(logits, loss, grads) without dropout."""
  def run(params):
    loss, grads = jax.value_and_grad(
        lambda p: model.loss_fn(p, batch, None)[0])(params)
    return model.logits(params, batch), loss, grads
  return _jit(run)(params)


@functools.lru_cache(maxsize=None)
def _reference(family):
  """(batch, unscanned params, stacked params, loop (logits, loss, grads)).

  Params are random normals of the init shapes (no init compile); the tests
  of a family share them and the outputs of the plain layer loop.
  """
  batch = _batch(family)
  loop = _model(family)
  abstract = nn.unbox(jax.eval_shape(loop.init, jax.random.key(0), batch))
  rng = np.random.RandomState(1)
  params = jax.tree_util.tree_map(
      lambda x: (0.2 * rng.randn(*x.shape)).astype(x.dtype), abstract['params'])
  return batch, params, param_layout.stack_layers(params), _outputs(loop, params, batch)


@functools.lru_cache(maxsize=None)
def _scanned_outputs(family):
  batch, _, stacked, _ = _reference(family)
  return _outputs(_model(family, scan_layers=True), stacked, batch)


def _max_diff(a, b):
  diffs = jax.tree_util.tree_map(
      lambda x, y: np.max(np.abs(np.asarray(x) - np.asarray(y))), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_scan_matches_the_layer_loop(family):
  batch, params, stacked, (logits, loss, grads) = _reference(family)
  scanned = _model(family, scan_layers=True)
  # Scanned init has exactly the stacked tree, with 'layers' named.
  abstract = jax.eval_shape(scanned.init, jax.random.key(0), batch)
  shapes = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)
  assert shapes(nn.unbox(abstract)['params']) == shapes(stacked)
  assert_logical_names(scanned, batch, ALLOWED, unnamed_last_axis=('nsp_head',))
  assert _max_diff(param_layout.unstack_layers(stacked), params) == 0.0

  s_logits, s_loss, s_grads = _scanned_outputs(family)
  assert logits.shape[-1] == V and logits.dtype == jnp.float32
  assert _max_diff(s_logits, logits) < 1e-5
  assert abs(float(s_loss - loss)) < 1e-5
  assert _max_diff(s_grads, param_layout.stack_layers(grads)) < 1e-5

  # HF converters go either way: scanned params export as the unscanned ones,
  # and import into a scanned config comes back stacked.
  convert = hf.family_module(FAMILIES[family][2])
  state_dict = convert.to_hf_state_dict(params, FAMILIES[family][1])
  assert _max_diff(convert.to_hf_state_dict(stacked, scanned.config),
                   state_dict) == 0.0
  assert _max_diff(convert.from_hf_state_dict(state_dict, scanned.config),
                   stacked) == 0.0


@pytest.mark.parametrize('family,scan_layers,remat_policy', [
    ('gpt', False, 'full'), ('t5', True, 'dots_saveable')])
def test_remat_changes_nothing_computed(family, scan_layers, remat_policy):
  batch, params, stacked, reference = _reference(family)
  if scan_layers:
    params, reference = stacked, _scanned_outputs(family)
  model = _model(family, scan_layers=scan_layers, remat_policy=remat_policy)
  logits, loss, grads = _outputs(model, params, batch)
  assert float(loss) == float(reference[1])
  assert _max_diff(logits, reference[0]) == 0.0
  assert _max_diff(grads, reference[2]) < 1e-6


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_bfloat16_activations_and_params(family):
  batch, _, stacked, (logits, _, _) = _reference(family)
  bf16_acts = _model(family, dtype='bfloat16', scan_layers=True)
  abstract = nn.unbox(jax.eval_shape(bf16_acts.init, jax.random.key(0), batch))
  assert {x.dtype for x in jax.tree_util.tree_leaves(abstract)} == {
      np.dtype('float32')}
  bf16_logits = _jit(bf16_acts.logits)(stacked, batch)
  assert bf16_logits.dtype == jnp.float32
  error = _max_diff(bf16_logits, logits)
  assert 0.0 < error < 0.05 * np.max(np.abs(logits)), error
  bf16_params = _model(family, param_dtype='bfloat16', scan_layers=True)
  abstract = nn.unbox(jax.eval_shape(bf16_params.init, jax.random.key(0), batch))
  assert {x.dtype for x in jax.tree_util.tree_leaves(abstract)} == {
      np.dtype(jnp.bfloat16)}


def _lowered_size(num_layers, scan_layers):
  model = _model('gpt', num_layers=num_layers, scan_layers=scan_layers,
                 remat_policy='full')
  batch = _batch('gpt')
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch))['params']
  grad = jax.grad(lambda p: model.loss_fn(p, batch, jax.random.key(1))[0])
  return len(jax.jit(grad).lower(params).as_text())


def test_scanned_program_does_not_grow_with_depth():
  loop2, loop8 = _lowered_size(2, False), _lowered_size(8, False)
  scan2, scan8 = _lowered_size(2, True), _lowered_size(8, True)
  assert loop8 / loop2 > 2.0, (loop2, loop8)
  assert scan8 / scan2 < 1.1, (scan2, scan8)


class _MaskLayer(nn.Module):
  """x -> 2 x + (dropout keep mask of ones), so the output encodes each mask."""
  config: object

  @nn.compact
  def __call__(self, x, deterministic):
    kept = nn.Dropout(0.5)(jnp.ones_like(x), deterministic=deterministic) / 2
    return 2 * x + kept + self.param('zero', nn.initializers.zeros, ())


@dataclasses.dataclass(frozen=True)
class _StackConfig:
  scan_layers: bool
  remat_policy: str


class _Stack(nn.Module):
  config: _StackConfig

  @nn.compact
  def __call__(self, x, deterministic):
    return common.run_layers(_MaskLayer, self.config, 2, x, deterministic)


@pytest.mark.parametrize('remat_policy', ['none', 'full'])
def test_scanned_dropout_draws_a_mask_per_layer(remat_policy):
  stack = _Stack(_StackConfig(scan_layers=True, remat_policy=remat_policy))
  x = jnp.zeros((64,))
  variables = stack.init(jax.random.key(0), x, True)
  assert variables['params']['layers']['zero'].shape == (2,)
  run = lambda seed: stack.apply(variables, x, False,
                                 rngs={'dropout': jax.random.key(seed)})
  out = np.asarray(run(1))
  np.testing.assert_array_equal(out, run(1))  # deterministic for a fixed rng
  assert not np.array_equal(out, run(2))
  first, second = out // 2, out % 2  # out = 2 * mask_0 + mask_1
  assert set(np.unique(out)) == {0.0, 1.0, 2.0, 3.0}
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(stack.apply(variables, x, True), 1.5)


def test_scanned_model_dropout_is_on_and_deterministic():
  batch, _, stacked, _ = _reference('gpt')
  model = _model('gpt', scan_layers=True, remat_policy='full',
                 dropout_rate=0.1, attention_dropout_rate=0.1)
  loss = _jit(lambda rng: model.loss_fn(stacked, batch, rng)[0])
  first, again, other = (float(loss(jax.random.key(seed))) for seed in (1, 1, 2))
  assert first == again
  assert len({first, other, float(_scanned_outputs('gpt')[1])}) == 3


def test_knobs_bind_from_gin():
  gin.clear_config()
  try:
    gin_utils.parse_gin(
        [os.path.join(REPO, 'configs/models/gpt_tiny.gin')],
        ['decoder.GPTConfig.scan_layers = True',
         "decoder.GPTConfig.remat_policy = 'dots_saveable'"])
    model = gin.query_parameter('MODEL/gin.macro.value').scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert model.config.scan_layers is True
  assert model.config.remat_policy == 'dots_saveable'


def test_unknown_remat_policy_is_a_user_error():
  with pytest.raises(UserError, match="remat_policy='some'.*use one of none"):
    _model('gpt', remat_policy='some')


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_trainer_step_with_scan_and_remat(family):
  batch, _, stacked, (_, loss, _) = _reference(family)
  grads = _scanned_outputs(family)[2]
  no_dropout = {name: 0.0 for name in ('dropout_rate', 'attention_dropout_rate')
                if hasattr(FAMILIES[family][1], name)}
  policy = 'full' if family in ('gpt', 't5') else 'dots_saveable'
  model = _model(family, scan_layers=True, remat_policy=policy, **no_dropout)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  partitioner = Partitioner((1, 1), rules='data_parallel',
                            devices=jax.devices()[:1])
  sgd = optimizers.with_learning_rate_in_state(optax.sgd, 0.5)
  t = trainer.Trainer(model, sgd, partitioner, shapes)
  state = t.init_state(0, params=stacked)
  state, metrics = t.train_step(state, partitioner.shard_batch(batch))
  assert abs(float(metrics['loss']) - float(loss)) < 1e-5
  assert int(state.step) == 1
  want = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, stacked, grads)
  assert _max_diff(state.params, want) < 1e-6


def test_weight_decay_skips_scanned_biases_and_norms():
  model = decoder.DecoderModel(families.config('gpt', num_layers=3, max_positions=8,
                                               scan_layers=True, **DROPOUT))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), model.dummy_batch(1, 4)))
  mask = optimizers._matrices(shapes['params'])  # pylint: disable=protected-access
  layer = mask['decoder']['layers']
  assert layer['mlp']['wi']['kernel'] and layer['self_attention']['out']['kernel']
  assert not layer['mlp']['wi']['bias'] and not layer['pre_mlp_layer_norm']['scale']
  assert mask['token_embedder']['embedding'] and not mask['decoder']['decoder_norm']['scale']
