"""export_hf: a checkpoint trained here, exported, loaded by transformers.

Each family trains two steps on the embedded corpus at a tiny size (GPT with
scanned layers), is exported by the entry point, and is then checked against
transformers: logits on padded batches within 1e-4 (float32), greedy tokens
from `generate` equal to our `predict_batch` (the Hugging Face side reads the
exported tokenizer, ours our vocabulary), tokenizer ids on held-out text, and
`hf.load` of the export giving back the very same params.
"""

import importlib.util
import os

from flax import linen as nn
import jax
import numpy as np
import pytest

from conftest import REPO, SMALL_T5, main_in_process, require
from t5x_lite import export_hf
from t5x_lite import hf
from t5x_lite import import_hf
from t5x_lite import train as train_module
from t5x_lite.errors import UserError
from t5x_lite.data import vocab
from t5x_lite.models import classification
from t5x_lite.models import encoder_decoder
from t5x_lite.models import llama
from t5x_lite.data import wordpiece

import families

torch = require('torch')
transformers = require('transformers')

TINY = ['--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=4', '--gin.CHECKPOINT_PERIOD=2',
        '--gin.train_script.train.progress_bar=False']


def _sizes(config_name, layers=('num_layers',)):
  sizes = dict(emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64)
  out = [f'--gin.{config_name}.{k}={v}' for k, v in sizes.items()]
  return out + [f'--gin.{config_name}.{k}=2' for k in layers]


RUNS = {
    't5': SMALL_T5 + ["--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"],
    'gpt': ['--gin_file=gin/gpt_tiny_lm.gin', *_sizes('decoder.GPTConfig'),
            '--gin.decoder.GPTConfig.scan_layers=True',
            "--gin.TASK_FEATURE_LENGTHS={'targets': 32}"],
    'bart': ['--gin_file=gin/bart_tiny_denoise.gin',
             *_sizes('bart.BartConfig', ('num_encoder_layers', 'num_decoder_layers')),
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}"],
    'bert': ['--gin_file=gin/bert_tiny_mlm.gin', *_sizes('encoder.BertConfig'),
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32}"],
}
HF_CLASSES = {'t5': 'AutoModelForSeq2SeqLM', 'gpt': 'AutoModelForCausalLM',
              'bart': 'AutoModelForSeq2SeqLM', 'bert': 'AutoModelForPreTraining'}


def _export_table():
  """benchmarks/export_table.py, whose comparisons these tests share."""
  spec = importlib.util.spec_from_file_location('export_table', f'{REPO}/benchmarks/export_table.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TABLE = _export_table()
HELD_OUT = ['The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey '
            'building.', 'Café crème\tand  two   spaces, naïve résumé.', 'emoji 🙂 and 東京']


@pytest.fixture(scope='module', params=sorted(RUNS))
def exported(request, tmp_path_factory):
  """(family, our model, our params, our vocabulary, export dir, printed summary)."""
  family = request.param
  root = tmp_path_factory.mktemp(family)
  model_dir, out = root / 'run', root / 'hf'
  main_in_process(train_module, [*RUNS[family], *TINY, f"--gin.MODEL_DIR='{model_dir}'"])
  argv = [f'--checkpoint_dir={model_dir}', f'--output_dir={out}']
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite import gin_utils  # pylint: disable=g-import-not-at-top
  try:
    gin.clear_config(clear_constants=True)
    gin_utils.parse_gin([str(model_dir / 'config.gin')], [], check_required=False)
    model, params, vocabulary, _, _ = export_hf.load(str(model_dir))
  finally:
    gin.clear_config(clear_constants=True)
  main_in_process(export_hf, argv)
  return family, model, params, vocabulary, str(out)


def _hf_model(family, out):
  return getattr(transformers, HF_CLASSES[family]).from_pretrained(out).eval()


def test_export_matches_transformers(exported):
  family, model, params, vocabulary, out = exported
  files = sorted(os.listdir(out))
  assert {'config.json', 'model.safetensors'} <= set(files), files
  assert ('generation_config.json' in files) == (family != 'bert')
  hf_model = _hf_model(family, out)
  batch, real = TABLE.batch(family, model, vocabulary, HELD_OUT)
  ours = np.asarray(jax.jit(model.logits)(params, batch))
  theirs = TABLE.hf_logits(family, hf_model, batch)
  assert real.sum() >= 6
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
  if family == 't5':  # untied: transformers must keep its own lm_head
    head, shared = hf_model.lm_head.weight, hf_model.shared.weight
    assert head.data_ptr() != shared.data_ptr() and not torch.equal(head, shared)
    assert not hf_model.config.scale_decoder_outputs
    np.testing.assert_array_equal(head.detach().numpy(),
                                  np.asarray(params['decoder']['logits_dense']['kernel']).T)


def test_export_round_trips_bit_exactly(exported):
  family, model, params, _, out = exported
  _, back = hf.load(out, scan_layers=model.config.scan_layers)
  ours = jax.tree_util.tree_map(np.asarray, params)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(ours)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, ours)


def test_exported_tokenizer_gives_our_ids(exported):
  """transformers' tokenizer, and ours reading the export back (hf_vocabulary)."""
  _, _, _, vocabulary, out = exported
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  back = vocab.hf_vocabulary(out)
  for text in HELD_OUT:
    ids = list(vocabulary.encode(text))
    assert tokenizer(text, add_special_tokens=False)['input_ids'] == ids, text
    assert list(back.encode(text)) == ids, text
  assert back.unk_id == vocabulary.unk_id
  assert vocabulary.eos_id is None or back.eos_id == vocabulary.eos_id  # WordPiece has none


def test_greedy_generation_equals_ours(exported):
  family, model, params, vocabulary, out = exported
  if family == 'bert':
    pytest.skip('BERT does not generate')
  hf_model = _hf_model(family, out)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  pairs = TABLE.greedy_pairs(family, model, params, vocabulary, hf_model, tokenizer,
                             TABLE.PROMPTS, steps=6)
  for ours, theirs in pairs:
    assert ours == theirs and len(theirs) >= 1, (family, pairs)


def test_bert_classifier_exports_with_its_labels(tmp_path):
  config = families.config('bert', vocab_size=wordpiece.embedded_wordpiece_vocabulary().vocab_size)
  model = classification.BertClassificationModel(config, num_classes=3)
  batch = model.dummy_batch(2, 12)
  params = jax.tree_util.tree_map(
      np.asarray, nn.unbox(model.init(jax.random.key(0), batch))['params'])
  tokens = np.random.default_rng(0).integers(5, config.vocab_size, (2, 12)).astype(np.int32)
  tokens[1, 7:] = 0
  batch.update(input_tokens=tokens, attention_mask=(tokens > 0).astype(np.int32))
  out = tmp_path / 'cls'
  export_hf.export(model, params, wordpiece.embedded_wordpiece_vocabulary(), str(out),
                   label_names=['entailment', 'neutral', 'contradiction'], max_shard_bytes=40_000)
  assert os.path.isfile(out / 'model.safetensors.index.json')  # sharded
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert hf_model.config.id2label == {0: 'entailment', 1: 'neutral', 2: 'contradiction'}
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.from_numpy(tokens).long(),
                      attention_mask=torch.from_numpy(tokens > 0).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.logits(params, batch)), theirs, atol=1e-5)
  _, back = hf.load(str(out))
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_t5_v1_0_exports_tied_and_rescaled(tmp_path):
  """T5 v1.0: ReLU MLP, the LM head tied to the embedding, decoder output * d**-0.5."""
  vocabulary = vocab.embedded_vocabulary()
  config = families.config('t5', vocab_size=vocabulary.vocab_size, mlp_activations=('relu',),
                           logits_via_embedding=True)
  model = encoder_decoder.EncoderDecoderModel(config)
  batch = model.dummy_batch(2, 10, 6)
  params = jax.tree_util.tree_map(
      np.asarray, nn.unbox(model.init(jax.random.key(1), batch))['params'])
  rng = np.random.default_rng(1)
  batch = {k: rng.integers(3, 500, v.shape).astype(np.int32) for k, v in batch.items()}
  batch['encoder_input_tokens'][1, 6:] = 0
  export_hf.export(model, params, vocabulary, str(tmp_path / 'v1_0'))
  hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / 'v1_0').eval()
  assert hf_model.config.scale_decoder_outputs and hf_model.config.feed_forward_proj == 'relu'
  assert hf_model.lm_head.weight.data_ptr() == hf_model.shared.weight.data_ptr()
  np.testing.assert_allclose(np.asarray(model.logits(params, batch)),
                             TABLE.hf_logits('t5', hf_model, batch), atol=1e-4, rtol=0)


LLAMA_CASES = {'llama': ('LlamaForCausalLM', dict(tie_word_embeddings=True)),
               'mistral': ('MistralForCausalLM', dict(sliding_window=5)),
               'qwen2': ('Qwen2ForCausalLM', dict(qkv_bias=True, num_kv_heads=1))}


@pytest.mark.parametrize('kind', sorted(LLAMA_CASES))
def test_llama_family_exports(kind, tmp_path):
  """Llama (tied head), Mistral (a window shorter than the batch) and Qwen2
  (q/k/v biases, one kv head): logits, greedy tokens and the round trip."""
  architecture, fields = LLAMA_CASES[kind]
  vocabulary = vocab.embedded_bpe_vocabulary()
  config = llama.LlamaConfig(**{**dict(vocab_size=vocabulary.vocab_size, emb_dim=32, num_heads=4,
                                       num_kv_heads=2, head_dim=8, mlp_dim=48, num_layers=2),
                                **fields})
  model = llama.LlamaModel(config)
  params = nn.unbox(model.init(jax.random.key(2), model.dummy_batch(1, 8)))['params']
  noise = iter(np.random.default_rng(2).standard_normal(10**6).astype(np.float32))
  params = jax.tree_util.tree_map(  # norms and biases away from their 1 / 0 init
      lambda x: np.asarray(x) + 0.05 * np.fromiter(noise, np.float32, x.size).reshape(x.shape),
      params)
  out = str(tmp_path / kind)
  export_hf.export(model, params, vocabulary, out)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(hf_model).__name__ == architecture
  batch, real = TABLE.batch('gpt', model, vocabulary, HELD_OUT)
  np.testing.assert_allclose(np.asarray(model.logits(params, batch))[real],
                             TABLE.hf_logits('gpt', hf_model, batch)[real], atol=1e-4, rtol=0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  if kind == 'qwen2':  # transformers swaps in its Qwen2 (byte-level) recipe for model_type qwen2
    assert type(tokenizer).__name__ == 'Qwen2Tokenizer'
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out)  # tokenizer.json as is
  for ours, theirs in TABLE.greedy_pairs('gpt', model, params, vocabulary, hf_model, tokenizer,
                                         TABLE.PROMPTS, steps=6):
    assert ours == theirs
  _, back = hf.load(out)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_imported_gpt2_exports_with_its_own_tokenizer(tmp_path):
  """import_hf (with its byte-level BPE tokenizer), then export_hf: the
  tokenizer files come back as they were, and transformers runs the export."""
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(HELD_OUT * 20, trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<|endoftext|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf_dir, imported, out = tmp_path / 'gpt2', tmp_path / 'imported', tmp_path / 'exported'
  transformers.GPT2TokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>',
                                 bos_token='<|endoftext|>').save_pretrained(hf_dir)
  config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2,
                                   n_head=2, n_positions=64, eos_token_id=0, bos_token_id=0)
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
  import_hf.import_hf(str(hf_dir), str(imported))
  model, params = hf.load(str(hf_dir))
  export_hf.export(model, params, vocab.hf_vocabulary(imported / 'tokenizer'), str(out))
  for name in os.listdir(imported / 'tokenizer'):
    assert (out / name).read_bytes() == (imported / 'tokenizer' / name).read_bytes(), name
  theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
  again = transformers.AutoTokenizer.from_pretrained(out)
  for text in HELD_OUT:
    assert again(text)['input_ids'] == theirs(text)['input_ids']
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = torch.tensor([theirs(HELD_OUT[0])['input_ids'][:20]])
  original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    assert torch.equal(reloaded(ids).logits, original(ids).logits)


def test_unsupported_model_is_one_clear_error(tmp_path):
  model = classification.GptClassificationModel(families.config('gpt'), num_classes=2)
  with pytest.raises(UserError, match='GPT-1 style classifier .* no Hugging Face counterpart'):
    export_hf.export(model, {}, None, str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')
  with pytest.raises(UserError, match='--checkpoint_dir .* not found'):
    export_hf.main([f'--checkpoint_dir={tmp_path / "nothing"}', f'--output_dir={tmp_path / "o"}'])
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'keep.txt').write_text('mine')
  with pytest.raises(UserError, match='is not empty'):
    export_hf.export(model, {}, None, str(tmp_path / 'full'))
  assert (tmp_path / 'full' / 'keep.txt').read_text() == 'mine'
