"""hf.load on save_pretrained directories, the torch-free weight readers, and
the import_hf CLI feeding the train entry point."""

import dataclasses
import json
import os
import subprocess
import sys
import typing

import gin
import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import REPO, main_in_process, read_metrics, require, run_env
from t5x_lite import checkpoints
from t5x_lite import hf
from t5x_lite import import_hf
from t5x_lite.errors import UserError
from t5x_lite.hf import io as hf_io

torch = require('torch')
transformers = require('transformers')
safetensors_torch = require('safetensors.torch')


def perturb(model, seed=0):
  """Non-trivial norms and biases (HF inits them to 1 / 0)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'LayerNorm' in name or 'layer_norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def numpy_state(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# --- T5 ---------------------------------------------------------------------
def tiny_t5(**kw):
  kw = dict(dict(vocab_size=97, num_layers=2, num_decoder_layers=3), **kw)
  cfg = transformers.T5Config(
      d_model=32, d_kv=8, d_ff=48, num_heads=4,
      relative_attention_num_buckets=12, relative_attention_max_distance=20,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, **kw)
  cfg._attn_implementation = 'eager'
  torch.manual_seed(1)
  return perturb(transformers.T5ForConditionalGeneration(cfg).eval())


def t5_batch(vocab_size):
  rng = np.random.default_rng(0)
  enc = rng.integers(2, vocab_size, (3, 24)).astype(np.int32)
  tgt = rng.integers(2, vocab_size, (3, 14)).astype(np.int32)
  enc[1, 13:], enc[2, 4:] = 0, 0
  tgt[1, 9:], tgt[2, 2:] = 0, 0
  dec = np.zeros_like(tgt)
  dec[:, 1:] = tgt[:, :-1]
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec,
              decoder_target_tokens=tgt)


def t5_hf_logits(model, batch):
  t = lambda x: torch.from_numpy(x).long()
  with torch.no_grad():
    return model(input_ids=t(batch['encoder_input_tokens']),
                 attention_mask=t(batch['encoder_input_tokens'] > 0),
                 decoder_input_ids=t(batch['decoder_input_tokens']),
                 decoder_attention_mask=t(batch['decoder_target_tokens'] > 0)
                 ).logits.numpy()


def assert_t5_logits_match(model, params, hf_model):
  batch = t5_batch(model.config.vocab_size)
  ours = np.asarray(jax.jit(model.logits)(params, batch))
  theirs = t5_hf_logits(hf_model, batch)
  valid = batch['decoder_target_tokens'] > 0
  assert ours.shape == theirs.shape
  assert np.abs(theirs[valid]).max() > 1.0  # a meaningful comparison
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4)


def test_t5_v1_0_relu_tied(tmp_path):
  hf_model = tiny_t5(feed_forward_proj='relu', tie_word_embeddings=True)
  hf_model.save_pretrained(tmp_path)
  model, params = hf.load(str(tmp_path))
  cfg = model.config
  assert (cfg.mlp_activations, cfg.logits_via_embedding) == (('relu',), True)
  assert 'logits_dense' not in params['decoder']
  assert set(params['encoder']['layers_0']['mlp']) == {'wi', 'wo'}
  assert_t5_logits_match(model, params, hf_model)
  # Back to HF names: exactly the HF tensors, same values.
  back = hf.family_module('t5').to_hf_state_dict(params, cfg)
  hf_sd = numpy_state(hf_model)
  for name, value in back.items():
    np.testing.assert_array_equal(value, hf_sd[name], err_msg=name)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert n_params == sum(p.numel() for p in hf_model.parameters())


def test_t5_v1_1_untied_sharded_bf16(tmp_path):
  """A T5.1.1-style directory as on the Hub: own lm_head, tie_word_embeddings
  false, sharded safetensors, bfloat16 weights."""
  hf_model = tiny_t5(feed_forward_proj='gated-gelu', tie_word_embeddings=False)
  with torch.no_grad():  # its own head (transformers 5 ties it on creation)
    hf_model.lm_head.weight = torch.nn.Parameter(
        torch.randn_like(hf_model.shared.weight))
    for p in hf_model.parameters():  # bf16-exact values, so logits can agree
      p.copy_(p.to(torch.bfloat16).float())
  hf_model.save_pretrained(tmp_path)
  config = json.loads((tmp_path / 'config.json').read_text())
  config.pop('scale_decoder_outputs', None)
  config['tie_word_embeddings'] = False
  (tmp_path / 'config.json').write_text(json.dumps(config))
  state = numpy_state(hf_model)
  os.remove(tmp_path / 'model.safetensors')
  names = sorted(state)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    shard = f'model-0000{i + 1}-of-00002.safetensors'
    safetensors_torch.save_file(  # the Hub's bf16 shards
        {k: torch.from_numpy(state[k]).to(torch.bfloat16) for k in part},
        str(tmp_path / shard))
    weight_map.update({k: shard for k in part})
  (tmp_path / 'model.safetensors.index.json').write_text(
      json.dumps({'metadata': {}, 'weight_map': weight_map}))

  raw = hf_io.read_state_dict(str(tmp_path))
  assert raw['lm_head.weight'].dtype == ml_dtypes.bfloat16
  model, params = hf.load(str(tmp_path))
  cfg = model.config
  assert cfg.mlp_activations == ('gelu', 'linear')
  assert not cfg.logits_via_embedding
  assert params['decoder']['logits_dense']['kernel'].dtype == np.float32
  np.testing.assert_array_equal(params['decoder']['logits_dense']['kernel'],
                                state['lm_head.weight'].T)
  assert_t5_logits_match(model, params, hf_model)
  _, bf16 = hf.load(str(tmp_path), dtype='bfloat16')
  assert bf16['token_embedder']['embedding'].dtype == ml_dtypes.bfloat16
  # mT5 directories have this layout under model_type 'mt5'.
  (tmp_path / 'config.json').write_text(json.dumps({**config,
                                                     'model_type': 'mt5'}))
  mt5, mt5_params = hf.load(str(tmp_path))
  assert mt5.config == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, mt5_params, params)


# --- BERT -------------------------------------------------------------------
def tiny_bert_config():
  cfg = transformers.BertConfig(
      vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, initializer_range=0.2)
  cfg._attn_implementation = 'eager'
  return cfg


def bert_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 97, (3, 40)).astype(np.int32)
  segments = np.zeros_like(tokens)
  for i, n in enumerate((40, 23, 6)):
    tokens[i, n:] = 0
    segments[i, n // 2:n] = 1
  return dict(input_tokens=tokens, segment_ids=segments)


def bert_hf_out(model, batch):
  t = lambda x: torch.from_numpy(x).long()
  with torch.no_grad():
    return model(input_ids=t(batch['input_tokens']),
                 token_type_ids=t(batch['segment_ids']),
                 attention_mask=t(batch['input_tokens'] > 0))


_NO_TORCH_LOAD = """
import sys
sys.modules['torch'] = None  # any torch import now fails
import jax
import numpy as np
from t5x_lite import hf
model, params = hf.load(sys.argv[1])
batch = {k: v for k, v in np.load(sys.argv[2]).items()}
mlm, nsp = jax.jit(model.module.apply)({'params': params}, **batch)
np.savez(sys.argv[3], mlm=np.asarray(mlm), nsp=np.asarray(nsp))
print(type(model).__name__)
"""


def test_bert_pytorch_bin_without_torch(tmp_path):
  """BertForPreTraining as pytorch_model.bin, read where torch is blocked."""
  torch.manual_seed(2)
  hf_model = perturb(transformers.BertForPreTraining(tiny_bert_config()).eval())
  hf_dir = tmp_path / 'bert'
  hf_model.save_pretrained(hf_dir)
  os.remove(hf_dir / 'model.safetensors')  # transformers 5 writes no .bin
  torch.save(hf_model.state_dict(), hf_dir / 'pytorch_model.bin')
  batch = bert_batch()
  np.savez(tmp_path / 'batch.npz', **batch)
  proc = subprocess.run(
      [sys.executable, '-c', _NO_TORCH_LOAD, str(hf_dir),
       str(tmp_path / 'batch.npz'), str(tmp_path / 'out.npz')],
      cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == 'EncoderModel'
  ours = np.load(tmp_path / 'out.npz')
  out = bert_hf_out(hf_model, batch)
  np.testing.assert_allclose(ours['mlm'], out.prediction_logits.numpy(),
                             atol=1e-4)
  np.testing.assert_allclose(ours['nsp'], out.seq_relationship_logits.numpy(),
                             atol=1e-4)


def test_bert_masked_lm_gets_fresh_heads(tmp_path, caplog):
  """BertForMaskedLM has no pooler / NSP head: they are initialised, the MLM
  logits still match."""
  torch.manual_seed(3)
  hf_model = perturb(transformers.BertForMaskedLM(tiny_bert_config()).eval())
  hf_model.save_pretrained(tmp_path)
  model, params = hf.load(str(tmp_path))
  assert model.config.activation == 'gelu_exact'
  assert 'next-sentence head' in caplog.text and 'pooler' in caplog.text
  assert 'MLM head' not in caplog.text
  batch = bert_batch()
  theirs = bert_hf_out(hf_model, batch).logits.numpy()
  ours = np.asarray(jax.jit(model.logits)(params, batch))
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


# --- the .bin and safetensors readers ---------------------------------------
def test_torch_bin_reader_strides_offsets_dtypes(tmp_path):
  base = torch.randn(5, 7)
  state = {
      'transposed': base.t(),                      # non-contiguous strides
      'slice': base[1:4, 2:6],                     # offset + strides
      'row': base[3],                              # offset into shared storage
      'bf16': base.to(torch.bfloat16),
      'fp16': torch.nn.Parameter(base.half(), requires_grad=False),
      'int64': torch.arange(6).reshape(2, 3),
      'scalar': torch.tensor(2.5),
  }
  torch.save(state, tmp_path / 'w.bin')
  got = hf_io.read_torch_bin(str(tmp_path / 'w.bin'))
  assert set(got) == set(state)
  for name, tensor in state.items():
    want = tensor.detach()
    if want.dtype == torch.bfloat16:
      want = want.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      want = want.numpy()
    assert got[name].dtype == want.dtype, name
    np.testing.assert_array_equal(got[name], want, err_msg=name)
  # Sharded .bin directory.
  torch.save({'a': base}, tmp_path / 'pytorch_model-1.bin')
  torch.save({'b': base.t()}, tmp_path / 'pytorch_model-2.bin')
  (tmp_path / 'pytorch_model.bin.index.json').write_text(json.dumps(
      {'weight_map': {'a': 'pytorch_model-1.bin', 'b': 'pytorch_model-2.bin'}}))
  sharded = hf_io.read_state_dict(str(tmp_path))
  np.testing.assert_array_equal(sharded['b'], base.numpy().T)


def test_torch_bin_reader_refuses_code(tmp_path):
  torch.save({'a': torch.zeros(2), 'f': os.getcwd}, tmp_path / 'evil.bin')
  with pytest.raises(Exception, match='not allowed in a weights file'):
    hf_io.read_torch_bin(str(tmp_path / 'evil.bin'))


# --- errors -----------------------------------------------------------------
def test_unsupported_model_type_and_missing_weights(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt_neox'}))
  with pytest.raises(UserError) as e:
    hf.load(str(tmp_path))
  assert str(e.value).count('\n') == 0
  assert "'gpt_neox'" in str(e.value)
  assert 'supported: bart, bert, gpt2, llama, mistral, mt5, qwen2, t5.' in str(e.value)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 't5'}))
  with pytest.raises(UserError, match='has no weights; looked for '
                     'model.safetensors, .*pytorch_model.bin') as e:
    hf.load(str(tmp_path))
  assert str(tmp_path) in str(e.value)
  with pytest.raises(UserError, match='no config.json'):
    hf.load(str(tmp_path / 'nowhere'))


def test_shape_mismatch_is_one_line(tmp_path):
  tiny_t5(feed_forward_proj='relu').save_pretrained(tmp_path)
  config = json.loads((tmp_path / 'config.json').read_text())
  config['d_ff'] = 64
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(UserError, match=r'DenseReluDense.wi.weight: shape'):
    hf.load(str(tmp_path))


# --- gin ---------------------------------------------------------------------
@pytest.mark.parametrize('family', ['t5', 'bert', 'gpt2', 'bart'])
def test_gin_text_rebuilds_the_model(family):
  module = hf.family_module(family)
  config_cls = typing.get_type_hints(module.config_from_hf)['return']
  fields = {f.name: getattr(config_cls(), f.name)
            for f in dataclasses.fields(config_cls)}
  fields.update(vocab_size=123, dropout_rate=0.25)  # not the defaults
  model = module.MODEL_CLS(config_cls(**fields))
  try:
    gin.parse_config(hf.gin_text(model))
    rebuilt = gin.query_parameter('%MODEL').scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert type(rebuilt) is type(model)
  assert rebuilt.config == model.config


# --- the CLI and a training run from its output -----------------------------
def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_import_hf_then_train(tmp_path, capsys):
  vocab = 8192  # the training task's vocabulary has 8100 ids
  hf_model = tiny_t5(vocab_size=vocab, num_layers=1, num_decoder_layers=1,
                     feed_forward_proj='gated-gelu', tie_word_embeddings=False)
  hf_dir, out = tmp_path / 'hf', tmp_path / 'imported'
  hf_model.save_pretrained(hf_dir)
  import_hf.main(['--hf_dir', str(hf_dir), '--output_dir', str(out)])
  summary = capsys.readouterr().out.strip().splitlines()
  assert len(summary) == 1 and 'EncoderDecoderModel' in summary[0]
  model, params = hf.load(str(hf_dir))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert f'{n_params:,} params' in summary[0]

  # restore_params (what train calls for INITIAL_CHECKPOINT_PATH) gives back
  # exactly the HF weights, on the model that model.gin configures.
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  restored = checkpoints.restore_params(str(out / 'checkpoint'), abstract)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)

  run_gin = tmp_path / 'run.gin'
  run_gin.write_text(f"""
include 'configs/runs/pretrain.gin'
include '{out / 'model.gin'}'
INITIAL_CHECKPOINT_PATH = '{out / 'checkpoint'}'
MIXTURE_OR_TASK_NAME = 'embedded_span_corruption'
TASK_FEATURE_LENGTHS = {{'inputs': 64, 'targets': 16}}
BATCH_SIZE = 8
TRAIN_STEPS = 2
train_script.train.log_every = 1
train_script.train.progress_bar = False
""")
  model_dir = tmp_path / 'run'
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  main_in_process(train, [f'--gin_file={run_gin}', f"--gin.MODEL_DIR='{model_dir}'"])
  stdout = capsys.readouterr().out
  assert f"initialised params from {out / 'checkpoint'}" in stdout
  assert f'model: {n_params:,} params' in stdout
  assert [row['step'] for row in read_metrics(model_dir)] == [1, 2]
  # It trained from them: two small steps later they have moved by < 5%.
  trained = checkpoints.restore_params(str(model_dir), abstract)
  changes = {jax.tree_util.keystr(path):
             np.abs(np.asarray(_get(trained, path)) - x).max() / np.abs(x).max()
             for path, x in jax.tree_util.tree_leaves_with_path(params)}
  assert 0 < max(changes.values()) < 0.05, changes  # a fresh init: ~1

  # A second import into the same place is refused in one line.
  with pytest.raises(SystemExit) as e:
    import_hf.run(['--hf_dir', str(hf_dir), '--output_dir', str(out)])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ')
  assert 'already exists' in err[0]
