"""export_hf of LoRA checkpoints: --merge_lora (the merged model) and
--lora_only (a PEFT adapter directory), checked against transformers + peft.

The tiny Llama (4 query heads over 2 key / value heads, adapters on every
attention and MLP projection) is trained through the real entry point, and
its checkpoint exported through the real one. T5 and BERT take adapters made
here with a random (non-zero) B. The reference is always our LoRA model
unmerged, `model.logits(lora.attach(base, adapters, config), batch)`: peft's
`PeftModel.from_pretrained(<exported base>, <adapter dir>)` and the merged
export must give its logits within 1e-4 (float32), and the adapters must
move the logits far more than that.
"""

import importlib.util
import json
import os
import shutil

from flax import linen as nn
import jax
import numpy as np
import pytest

from conftest import REPO, main_in_process, require
from t5x_lite import export_hf
from t5x_lite import hf
from t5x_lite import lora
from t5x_lite import train as train_module
from t5x_lite.data import vocab
from t5x_lite.data import wordpiece
from t5x_lite.errors import UserError

import families

torch = require('torch')
transformers = require('transformers')
peft = require('peft')

TOL = 1e-4
HELD_OUT = ['The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey '
            'building.', 'Café crème\tand  two   spaces, naïve résumé.', 'emoji 🙂 and 東京']


def _export_table():
  """benchmarks/export_table.py: its batches and transformers' logits for them."""
  spec = importlib.util.spec_from_file_location('export_table',
                                                f'{REPO}/benchmarks/export_table.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TABLE = _export_table()


def _listing(path):
  return sorted(os.listdir(path)) if os.path.exists(path) else None


def _check_against_hf(family, lora_model, base, adapters, vocabulary, hf_class, peft_dir,
                      base_dir, merged_dir=None):
  """peft over the exported base (and the merged export) vs our unmerged LoRA model."""
  model = lora_model.base_model
  batch, real = TABLE.batch(family, model, vocabulary, HELD_OUT)
  full = lora.attach(base, adapters, lora_model.lora_config)
  ours = np.asarray(jax.jit(model.logits)(full, batch))[real]
  hf_base = getattr(transformers, hf_class).from_pretrained(base_dir).eval()
  plain = TABLE.hf_logits(family, hf_base, batch)[real]
  assert real.sum() >= 6 and np.abs(ours - plain).max() > 100 * TOL  # the adapters matter
  adapted = peft.PeftModel.from_pretrained(hf_base, peft_dir).eval()
  np.testing.assert_allclose(TABLE.hf_logits(family, adapted, batch)[real], ours, atol=TOL,
                             rtol=0)
  if merged_dir is not None:
    merged = getattr(transformers, hf_class).from_pretrained(merged_dir).eval()
    np.testing.assert_allclose(TABLE.hf_logits(family, merged, batch)[real], ours, atol=TOL,
                               rtol=0)


@pytest.fixture(scope='module')
def llama_lora(tmp_path_factory):
  """(model dir, the tmp root) of 2 steps of gin/llama_tiny_lora.gin (one
  layer, every projection adapted) over the base of a random init."""
  root = tmp_path_factory.mktemp('llama_lora')
  model_dir = str(root / 'run')
  main_in_process(train_module, [
      '--gin_file=gin/llama_tiny_lora.gin', f"--gin.MODEL_DIR='{model_dir}'",
      '--gin.TRAIN_STEPS=2', '--gin.CHECKPOINT_PERIOD=2', '--gin.WARMUP_STEPS=1',
      '--gin.LEARNING_RATE=0.05', '--gin.INITIAL_CHECKPOINT_PATH=None',
      "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", '--gin.BATCH_SIZE=2',
      '--gin.llama.LlamaConfig.num_layers=1', '--gin.train_script.train.progress_bar=False'])
  return model_dir, root


def test_llama_lora_checkpoint_exports_merged_and_as_peft(llama_lora, capsys):
  """The entry point on a LoRA run's checkpoint: --lora_only (with the base)
  loads in peft, --merge_lora in transformers, both as our LoRA model."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  model_dir, root = llama_lora
  peft_dir, base_dir, merged_dir = root / 'peft', root / 'base', root / 'merged'
  main_in_process(export_hf, [f'--checkpoint_dir={model_dir}', f'--output_dir={peft_dir}',
                              '--lora_only', f'--base_output_dir={base_dir}'])
  main_in_process(export_hf, [f'--checkpoint_dir={model_dir}', f'--output_dir={merged_dir}',
                              '--merge_lora'])
  printed = capsys.readouterr().out
  assert 'as PEFT to' in printed and 'merged LoRA adapters' in printed
  assert _listing(peft_dir) == ['adapter_config.json', 'adapter_model.safetensors']
  config = json.loads((peft_dir / 'adapter_config.json').read_text())
  assert config['peft_type'] == 'LORA' and config['task_type'] == 'CAUSAL_LM'
  assert config['base_model_name_or_path'] == str(base_dir)
  assert (config['r'], config['lora_alpha'], config['fan_in_fan_out']) == (8, 16, False)
  assert sorted(config['target_modules']) == ['down_proj', 'gate_proj', 'k_proj', 'o_proj',
                                              'q_proj', 'up_proj', 'v_proj']
  # The reference: the base as exported (read back by hf.load, bit-exact as
  # test_export_hf checks) and the adapters straight from the checkpoint.
  base_model, base = hf.load(str(base_dir))
  assert base_model.config.num_kv_heads == 2 < base_model.config.num_heads
  adapters = ocp.PyTreeCheckpointer().restore(
      os.path.join(model_dir, 'checkpoints', '2', 'state'))['params']
  lora_model = lora.LoraModel(base_model, lora.LoraConfig(
      targets=('query', 'key', 'value', 'out', 'wi_0', 'wi_1', 'wo'), rank=8, alpha=16.0))
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(peft_dir / 'adapter_model.safetensors')
  key = 'base_model.model.model.layers.0.self_attn.k_proj'
  a, b = (np.asarray(adapters['decoder']['layers_0']['self_attention']['key'][n])
          for n in ('lora_a', 'lora_b'))
  np.testing.assert_array_equal(tensors[f'{key}.lora_A.weight'], a.T)  # [r, D]
  np.testing.assert_array_equal(tensors[f'{key}.lora_B.weight'], b.reshape(8, -1).T)  # [K*H, r]
  _check_against_hf('gpt', lora_model, base, adapters, vocab.embedded_bpe_vocabulary(),
                    'AutoModelForCausalLM', peft_dir, base_dir, merged_dir)


def test_lora_checkpoint_refusals_write_nothing(llama_lora):
  model_dir, root = llama_lora
  out = root / 'refused'
  cases = [
      ([], 'holds LoRA adapters; pass --merge_lora .* or --lora_only'),
      (['--merge_lora', f'--base_output_dir={root / "b"}'], '--base_output_dir goes with '
       '--lora_only'),
  ]
  for flags, message in cases:
    with pytest.raises(UserError, match=message):
      main_in_process(export_hf, [f'--checkpoint_dir={model_dir}', f'--output_dir={out}',
                                  *flags])
  full = root / 'full'
  full.mkdir()
  (full / 'keep.txt').write_text('mine')
  with pytest.raises(UserError, match='is not empty'):  # the base dir is checked before writing
    main_in_process(export_hf, [f'--checkpoint_dir={model_dir}', f'--output_dir={out}',
                                '--lora_only', f'--base_output_dir={full}'])
  assert _listing(out) is None and _listing(full) == ['keep.txt']
  assert not os.path.exists(f'{out}.partial') and _listing(root / 'b') is None
  plain = root / 'plain'  # the same run, its meta naming no base: not a LoRA checkpoint
  shutil.copytree(model_dir, plain)
  meta = plain / 'checkpoints' / '2' / 'meta' / 'metadata'
  meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                              if k != lora.CHECKPOINT_META}))
  with pytest.raises(UserError, match='holds no LoRA adapters .* export it without '
                     '--merge_lora / --lora_only'):
    main_in_process(export_hf, [f'--checkpoint_dir={plain}', f'--output_dir={out}',
                                '--merge_lora'])
  assert _listing(out) is None


def _direct(family, targets, vocabulary, seed, **overrides):
  """(LoraModel, base, adapters) of a tiny `family` model: random numbers (no
  init to compute) for the base and for both A and B (init_adapters leaves B
  zero), in the shapes the model's init gives."""
  base_model = families.tiny(family, vocab_size=vocabulary.vocab_size, **overrides)
  config = lora.LoraConfig(targets=targets, rank=4, alpha=8.0)
  lengths = (8, 4) if family in ('t5', 'bart') else (8,)
  batch = base_model.dummy_batch(1, *lengths)
  boxed = jax.eval_shape(base_model.init, jax.random.key(0), batch)['params']
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if path[-1].key == 'scale' else 0.3 * noise

  base = jax.tree_util.tree_map_with_path(draw, nn.unbox(boxed))
  adapters = jax.tree_util.tree_map_with_path(
      draw, nn.unbox(lora.init_adapters(jax.random.key(seed), boxed, config)))
  return lora.LoraModel(base_model, config), base, adapters


CASES = {  # family: (targets, HF class, transformers-side notes)
    't5': (('query', 'key', 'value', 'out', 'wi_0', 'wi_1', 'wo', 'logits_dense'),
           'AutoModelForSeq2SeqLM'),
    'bert': (('query', 'key', 'value', 'out'), 'AutoModelForPreTraining'),
    'bart': (('query', 'key', 'value', 'out', 'wi', 'wo'), 'AutoModelForSeq2SeqLM'),
}


@pytest.mark.parametrize('family', sorted(CASES))
def test_direct_adapters_export_as_peft(family, tmp_path):
  """T5 (every projection of both stacks, cross-attention and the untied LM
  head included), BART (its MLP too) and BERT (whose 'out' is the ambiguous
  `attention.output.dense`)."""
  targets, hf_class = CASES[family]
  vocabulary = {'t5': vocab.embedded_vocabulary, 'bart': vocab.embedded_bpe_vocabulary,
                'bert': wordpiece.embedded_wordpiece_vocabulary}[family]()
  overrides = dict(mlp_activations=('gelu', 'linear')) if family == 't5' else {}
  model, base, adapters = _direct(family, targets, vocabulary, 3, **overrides)
  peft_dir, base_dir, merged_dir = tmp_path / 'peft', tmp_path / 'base', tmp_path / 'merged'
  export_hf.export_lora(model, base, adapters, vocabulary, str(peft_dir), merge=False,
                        base_output_dir=str(base_dir))
  export_hf.export_lora(model, base, adapters, vocabulary, str(merged_dir), merge=True)
  config = json.loads((peft_dir / 'adapter_config.json').read_text())
  if family == 't5':
    assert config['task_type'] == 'SEQ_2_SEQ_LM'
    assert config['target_modules'] == ['k', 'lm_head', 'o', 'q', 'v', 'wi_0', 'wi_1', 'wo']
  elif family == 'bart':
    assert config['target_modules'] == ['fc1', 'fc2', 'k_proj', 'out_proj', 'q_proj', 'v_proj']
  else:  # 'dense' would also pick the MLP's and the heads' dense layers: full names
    assert 'bert.encoder.layer.1.attention.output.dense' in config['target_modules']
    assert len(config['target_modules']) == 8
  _check_against_hf(family, model, base, adapters, vocabulary, hf_class, peft_dir, base_dir,
                    merged_dir)


def test_gpt2_fused_qkv_is_refused_and_writes_nothing(tmp_path):
  """GPT-2's c_attn fuses query, key and value: no PEFT form; its Conv1D
  projections ('out', 'wi', 'wo') export with fan_in_fan_out, here from a
  scanned stack (adapters with a leading layers axis)."""
  vocabulary = vocab.embedded_bpe_vocabulary()
  model, base, adapters = _direct('gpt', ('query', 'out'), vocabulary, 4)
  out, base_dir = tmp_path / 'peft', tmp_path / 'base'
  with pytest.raises(UserError, match=r"no PEFT form: the HF tensor transformer\.h\.0\.attn"
                     r"\.c_attn\.weight .*--merge_lora"):
    export_hf.export_lora(model, base, adapters, vocabulary, str(out), merge=False,
                          base_output_dir=str(base_dir))
  assert _listing(tmp_path) == []
  model, base, adapters = _direct('gpt_scanned', ('out', 'wi', 'wo'), vocabulary, 4)
  export_hf.export_lora(model, base, adapters, vocabulary, str(out), merge=False,
                        base_output_dir=str(base_dir))
  config = json.loads((out / 'adapter_config.json').read_text())
  assert config['fan_in_fan_out'] and config['target_modules'] == ['c_fc', 'c_proj']
  _check_against_hf('gpt', model, base, adapters, vocabulary, 'AutoModelForCausalLM', out,
                    base_dir)


def test_modules_trained_in_full_are_refused_by_lora_only(tmp_path):
  """A classifier's head trained in full beside the adapters (modules_to_save)
  has no place in --lora_only's files: one line pointing to --merge_lora."""
  vocabulary = wordpiece.embedded_wordpiece_vocabulary()
  model, base, adapters = _direct('bert', ('query',), vocabulary, 5)
  adapters = dict(adapters, classifier={'kernel': np.zeros((16, 3), np.float32)})
  with pytest.raises(UserError, match=r'trains classifier in full .*--merge_lora'):
    export_hf.export_lora(model, base, adapters, vocabulary, str(tmp_path / 'peft'),
                          merge=False)
  assert _listing(tmp_path) == []
