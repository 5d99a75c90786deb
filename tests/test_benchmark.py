"""The benchmark command: the bench model's size, its FLOP count, and one tiny run."""

import json
import math
import subprocess
import sys

import gin
import jax
import pytest
from flax import linen as nn

from conftest import REPO, SMALL_T5, run_env
from t5x_lite import benchmark
from t5x_lite import gin_utils
from t5x_lite import host

BENCH_PARAMS = 25_892_608
TRAIN_KEYS = ('seconds_per_step', 'seconds_per_step_min', 'seconds_per_step_max',
              'tokens_per_second', 'compile_seconds', 'model_flops_per_step',
              'xla_flops_per_step', 'roofline_flops_per_second', 'peak_host_bytes',
              'input_examples_per_second', 'input_to_step_ratio', 'steps')
DECODE_KEYS = ('greedy_tokens_per_second', 'beam4_tokens_per_second',
               'greedy_compile_seconds', 'beam4_compile_seconds')


def test_bench_gin_is_the_25_9m_t5_and_its_flop_count():
  gin.clear_config()
  gin_utils.parse_gin(['gin/bench_t5_cpu.gin'], [])
  model = gin.query_parameter('train_script.train.model').scoped_configurable_fn()
  lengths = gin.query_parameter('TASK_FEATURE_LENGTHS/gin.macro.value')
  batch_size = gin.query_parameter('BATCH_SIZE/gin.macro.value')
  assert (lengths, batch_size) == ({'inputs': 512, 'targets': 114}, 8)
  batch = model.dummy_batch(batch_size, lengths['inputs'], lengths['targets'])
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch))['params']
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == BENCH_PARAMS

  # Dense FLOPs from the real kernels: 6 x size x the tokens each one sees
  # (the decoder's cross-attention keys and values see the encoder's).
  enc_tokens, dec_tokens = batch_size * lengths['inputs'], batch_size * lengths['targets']
  dense = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if not name.endswith("['kernel']"):
      continue
    on_encoder = name.startswith("['encoder']") or (
        'encoder_decoder_attention' in name and ("['key']" in name or "['value']" in name))
    dense += 6 * leaf.size * (enc_tokens if on_encoder else dec_tokens)
  cfg = model.config
  a, le, ld = cfg.num_heads * cfg.head_dim, lengths['inputs'], lengths['targets']
  attention = 12 * a * batch_size * 4 * (le * le + ld * ld + ld * le)  # 4 layers each
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  assert benchmark.model_flops_per_step(cfg, shapes) == dense + attention
  output_layer = 6 * cfg.emb_dim * cfg.vocab_size * dec_tokens
  assert benchmark.model_flops_per_step(cfg, shapes, vocab_logits=False) == (
      dense - output_layer + attention)


def test_only_lm_steps_count_an_output_layer_over_the_vocabulary():
  from t5x_lite.models import classification, decoder, encoder  # pylint: disable=g-import-not-at-top
  assert benchmark.computes_vocab_logits(decoder.DecoderModel(decoder.GPTConfig()))
  assert benchmark.computes_vocab_logits(encoder.EncoderModel(encoder.BertConfig()))
  assert not benchmark.computes_vocab_logits(
      classification.BertClassificationModel(encoder.BertConfig()))
  assert not benchmark.computes_vocab_logits(
      classification.GptClassificationModel(decoder.GPTConfig()))
  assert benchmark.computes_vocab_logits(
      classification.GptClassificationModel(decoder.GPTConfig(), lm_weight=0.5))


def _positive(result, key):
  value = result[key]
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_train_and_decode_on_a_small_t5():
  env = run_env()
  # The test checks the report, not the speed: skip LLVM's slow optimisations.
  env['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
  proc = subprocess.run(
      [sys.executable, '-m', 't5x_lite.benchmark', *SMALL_T5, '--mode=train,decode', '--steps', '2',
       '--decode_runs=1', '--input_seconds=0.3', '--profile=40'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert 'tokens/s' in lines[-2]
  for key in TRAIN_KEYS + DECODE_KEYS:
    assert _positive(result, key), (key, result.get(key))
  assert result['steps'] == 2
  assert result['seconds_per_step_min'] <= result['seconds_per_step'] <= (
      result['seconds_per_step_max'])
  assert result['tokens_per_second'] == pytest.approx(
      8 * (64 + 16) / result['seconds_per_step'])  # encoder + decoder tokens
  assert result['peak_device_bytes'] is None or result['peak_device_bytes'] > 0
  ratio = result['xla_flops_per_step'] / result['model_flops_per_step']
  assert 1 / 3 < ratio < 3, ratio
  assert result['decode_length'] == 16 and result['decode_batch_size'] == 8
  applies = sys.platform.startswith('linux') and not host.host_has_accelerator()
  assert result['host_malloc'] == ('reuse' if applies and env.get('T5X_LITE_MALLOC') != 'system'
                                   else 'system')
  # The profile: the costliest parts of the step, named by model code, within the step time.
  parts = result['profile']
  assert len(parts) == 40 and all(p[0] > 0 for p in parts), parts
  assert [p[0] for p in parts] == sorted((p[0] for p in parts), reverse=True)
  assert all(p[1].startswith(('fwd ', 'bwd ', 'optimizer/')) for p in parts), parts
  for scope in ('fwd Transformer.encode/', 'bwd Transformer.decode/', 'fwd cross_entropy/',
                'bwd cross_entropy/', 'optimizer/'):
    assert any(p[1].startswith(scope) for p in parts), (scope, parts)
  assert sum(p[0] for p in parts) < 1e3 * result['seconds_per_step_max'] * 1.5


def test_profile_counts_overlapping_thread_spans_once():
  # Two threads run one operation over [0, 10) and [5, 15); later it runs over [20, 25).
  assert benchmark._covered([(20, 25), (5, 15), (0, 10)]) == 20
  assert benchmark._covered([(0, 10), (2, 3)]) == 10
  assert benchmark._covered([]) == 0


def test_decode_mode_needs_a_generating_model():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from t5x_lite.errors import UserError  # pylint: disable=g-import-not-at-top
  from t5x_lite.models import classification, decoder  # pylint: disable=g-import-not-at-top
  batch = {'decoder_input_tokens': tf.zeros((2, 5), tf.int32)}
  run = benchmark._Run(classification.GptClassificationModel(decoder.GPTConfig()), None,
                       tf.data.Dataset.from_tensors(batch), {}, 2, 0)
  with pytest.raises(UserError, match='GptClassificationModel does not; use --mode=train'):
    benchmark.decode_batch(run)
  run = run._replace(model=decoder.DecoderModel(decoder.GPTConfig()))
  prompts, length = benchmark.decode_batch(run)
  assert length == 5 and prompts['decoder_input_tokens'].shape == (2, 1)
