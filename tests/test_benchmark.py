"""The benchmark command: the bench model's size, its FLOP count, MFU, and tiny runs
of it and of benchmarks/hf_reference.py."""

import dataclasses
import json
import math
import os
import sys

import gin
import jax
import numpy as np
import pytest
from flax import linen as nn

from conftest import REPO, SMALL_T5, main_in_process
from t5x_lite import benchmark
from t5x_lite import gin_utils
from t5x_lite import host
from t5x_lite import runs

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
  model = gin.query_parameter('runs.TrainConfig.model').scoped_configurable_fn()
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
  assert decoder.DecoderModel(decoder.GPTConfig()).computes_vocab_logits
  assert encoder.EncoderModel(encoder.BertConfig()).computes_vocab_logits
  assert not classification.BertClassificationModel(encoder.BertConfig()).computes_vocab_logits
  assert not classification.GptClassificationModel(decoder.GPTConfig()).computes_vocab_logits
  assert classification.GptClassificationModel(
      decoder.GPTConfig(), lm_weight=0.5).computes_vocab_logits


def _positive(result, key):
  value = result[key]
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_train_and_decode_on_a_small_t5(capsys):
  """The benchmark's main in this process, which conftest prepared as an entry
  point prepares its own (host.prepare)."""
  main_in_process(benchmark, [*SMALL_T5, '--mode=train,decode', '--steps', '2',
                              '--decode_runs=1', '--input_seconds=0.3', '--profile=40',
                              '--peak_flops=1e12'])
  lines = capsys.readouterr().out.strip().splitlines()
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
  assert result['host_malloc'] == ('reuse' if applies and os.environ.get('T5X_LITE_MALLOC')
                                   != 'system' else 'system')
  assert result['kernels'] == 'cpu'  # 'auto' compiling for the CPU
  assert result['peak_flops_per_second'] == 1e12
  assert result['mfu'] == pytest.approx(result['model_flops_per_second'] / 1e12)
  assert 'MFU' in lines[-2] and 'cpu kernels' in lines[-2]
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
  data = runs.Data('any', {'targets': 5}, batch_size=2)
  for model in (classification.GptClassificationModel(decoder.GPTConfig()),
                decoder.DecoderModel(decoder.GPTConfig())):
    run = runs.Run(model, data, check_data=False)
    run.dataset = tf.data.Dataset.from_tensors(batch)
    if not model.GENERATES:
      with pytest.raises(UserError, match='GptClassificationModel does not; use --mode=train'):
        benchmark.decode_batch(run)
  prompts, length = benchmark.decode_batch(run)
  assert length == 5 and prompts['decoder_input_tokens'].shape == (2, 1)


def test_peak_flops_by_device_name():
  assert benchmark.peak_flops('NVIDIA H100 80GB HBM3') == 989e12  # SXM
  assert benchmark.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert benchmark.peak_flops('NVIDIA H100 NVL') == 835e12
  assert benchmark.peak_flops('NVIDIA H200') == 989e12
  assert benchmark.peak_flops('NVIDIA H200 NVL') == 835e12
  assert benchmark.peak_flops('NVIDIA GH200 480GB') == 989e12
  assert benchmark.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
  assert benchmark.peak_flops('NVIDIA A100 80GB PCIe') == 312e12
  assert benchmark.peak_flops('NVIDIA L40S') == 362e12
  assert benchmark.peak_flops('NVIDIA L4') == 121e12  # a whole word: not L40S's
  assert benchmark.peak_flops('TPU v4') == 275e12
  assert benchmark.peak_flops('TPU v5 lite') == 197e12
  assert benchmark.peak_flops('TPU v5') == 459e12
  assert benchmark.peak_flops('TPU v6 lite') == 918e12
  for unknown in ('cpu', '1 x cpu (2 host cores)', 'NVIDIA GeForce RTX 3090', 'Tesla V100-SXM2-16GB',
                  'NVIDIA H1000'):
    assert benchmark.peak_flops(unknown) is None, unknown


def test_mfu_is_model_flops_per_second_per_device_over_the_peak():
  assert benchmark.mfu(4e12, 2.0, 1e12) == pytest.approx(2.0)
  assert benchmark.mfu(989e12, 2.0, 989e12) == pytest.approx(0.5)
  assert benchmark.mfu(8e12, 1.0, 1e12, devices=4) == pytest.approx(2.0)
  assert benchmark.mfu(8e12, 1.0, None) is None


def _hf_reference():
  """benchmarks/hf_reference.py as a module (it needs torch and transformers)."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'hf_reference', f'{REPO}/benchmarks/hf_reference.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_hf_reference_options():
  from t5x_lite.errors import UserError  # pylint: disable=g-import-not-at-top
  ref = _hf_reference()
  options, rest = ref.parse_options(['--gin_file=gin/bench_t5_cpu.gin', '--gin.BATCH_SIZE=4'])
  assert rest == ['--gin_file=gin/bench_t5_cpu.gin', '--gin.BATCH_SIZE=4']
  assert options['device'] == 'cpu' and options['modes'] == ['train', 'decode']
  assert (options['steps'], options['rounds'], options['batches']) == (10, 1, 4)
  assert options['peak_flops'] is None
  options, rest = ref.parse_options(['--device', 'gpu', '--mode=train', '--peak_flops=9.89e14',
                                     '--batches=2', '--gin_file=x.gin'])
  assert (options['device'], options['modes'], options['batches']) == ('gpu', ['train'], 2)
  assert options['peak_flops'] == 9.89e14 and rest == ['--gin_file=x.gin']
  for bad, message in (('--device=tpu', 'use cpu or gpu'), ('--mode=infer', 'use train'),
                       ('--peak_flops=-1', 'positive float'), ('--batches=0', 'positive int')):
    with pytest.raises(UserError, match=message):
      ref.parse_options([bad, '--gin_file=x.gin'])


def test_hf_reference_mirrors_precision_dropout_and_optimizer():
  import torch  # pylint: disable=g-import-not-at-top
  from t5x_lite.errors import UserError  # pylint: disable=g-import-not-at-top
  from t5x_lite.models import decoder  # pylint: disable=g-import-not-at-top
  ref = _hf_reference()
  config = decoder.GPTConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                             num_layers=1, max_positions=16, dropout_rate=0.1,
                             attention_dropout_rate=0.05)
  assert ref.precision(config) is False
  assert ref.precision(dataclasses.replace(config, dtype='bfloat16')) is True
  with pytest.raises(UserError, match='float32 params'):
    ref.precision(dataclasses.replace(config, dtype='bfloat16', param_dtype='bfloat16'))
  hf = ref.hf_config(config)
  assert (hf.resid_pdrop, hf.embd_pdrop, hf.attn_pdrop) == (0.1, 0.1, 0.05)
  assert isinstance(ref.hf_optimizer('adamw', [torch.nn.Parameter(torch.zeros(2))]),
                    torch.optim.AdamW)
  # One HF train step per (optimizer, precision) on the CPU path that --device=gpu
  # runs with synchronisation: it returns one time per timed step.
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(ref.hf_config(config))
  tokens = np.arange(2 * 8).reshape(2, 8) % 60 + 1
  batch = ref.torch_batch({'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens},
                          encoder_decoder=False)
  for optimizer in ('adafactor', 'adamw'):
    for bfloat16 in (False, True):
      times = ref.hf_train(model, [batch], 2, bfloat16=bfloat16, optimizer=optimizer)
      assert len(times) == 2 and all(t > 0 for t in times)


def test_hf_reference_bfloat16_on_cpu(monkeypatch, capsys):
  # main() as --device=gpu runs it, on the CPU: the same cached batches on both sides,
  # bfloat16 activations (HF under autocast), MFU against a given peak, greedy decoding.
  # A synthetic input pipeline stands in for the task's (test_train_and_decode_on_a_small_t5
  # runs the real one), which keeps this test to seconds.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  ref = _hf_reference()
  if jax.default_backend() != 'cpu':
    pytest.skip('--device=cpu needs JAX on its CPU platform')

  def synthetic_dataset(name, lengths, batch_size, **kwargs):
    del name, kwargs
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(2, 500, (batch_size, n)).astype(np.int32)
    batch = {'encoder_input_tokens': ids(lengths['inputs']),
             'decoder_input_tokens': ids(lengths['targets']),
             'decoder_target_tokens': ids(lengths['targets']),
             'decoder_loss_weights': np.ones((batch_size, lengths['targets']), np.int32)}
    return tf.data.Dataset.from_tensors(batch).repeat()

  monkeypatch.setattr(runs.pipeline, 'get_dataset', synthetic_dataset)
  threads = torch.get_num_threads()
  gin.clear_config()
  try:
    ref.main([*SMALL_T5, '--device=cpu', "--gin.encoder_decoder.T5Config.dtype='bfloat16'",
              '--steps=1', '--batches=2', '--threads=1', '--peak_flops=1e12'])
  finally:
    gin.clear_config()
    torch.set_num_threads(threads)
  lines = capsys.readouterr().out.strip().splitlines()
  result = json.loads(lines[-1])
  assert any(line.startswith('train: ') and 'MFU' in line for line in lines), lines
  assert (result['dtype'], result['kernels'], result['torch_device']) == ('bfloat16', 'cpu', 'cpu')
  assert all(result[k] for k in ('device', 'jax', 'torch', 'transformers'))
  assert (result['train_batches'], result['hf_optimizer']) == (2, 'adafactor')
  assert result['tokens_per_step'] == 8 * (64 + 16)
  assert result['peak_flops_per_second'] == 1e12
  flops = result['model_flops_per_step']
  assert result['ours_mfu'] == pytest.approx(flops / result['ours_seconds_per_step'] / 1e12)
  assert result['hf_mfu'] == pytest.approx(flops / result['hf_seconds_per_step'] / 1e12)
  assert (result['decode_rows'], result['decode_length']) == (8, 16)
  assert 0 <= result['greedy_tokens_agree'] <= 1
