"""The generation layer: the resumable row log, and the model generator against
greedy decoding by hand (full forward passes, no cache)."""

import json

import jax
import numpy as np
import pytest

from t5x_lite import generation
from t5x_lite.data import vocab as vocab_lib
from t5x_lite.errors import UserError
from t5x_lite.models import decoder


def test_resumable_log_skips_written_rows(tmp_path):
  path = str(tmp_path / 'out' / 'work.jsonl')
  log = generation.ResumableLog(path, ('round', 'index'), {'seed': 3, 'ops': ('a', 'b')})
  assert len(log) == 0 and log.resumed == 0 and (1, 0) not in log
  log.append([{'round': 1, 'index': 0, 'text': 'x'}, {'round': 1, 'index': 1, 'text': 'y'}])
  with pytest.raises(ValueError, match='already holds'):
    log.append([{'round': 1, 'index': 1, 'text': 'z'}])
  # The same command again: the rows are there, found by key; a tuple setting
  # compares equal to the list JSON gave back.
  again = generation.ResumableLog(path, ('round', 'index'), {'seed': 3, 'ops': ['a', 'b']})
  assert again.resumed == 2 and (1, 1) in again and (2, 0) not in again
  assert again.get((1, 0)) == {'round': 1, 'index': 0, 'text': 'x'}
  assert [r['text'] for r in again.rows()] == ['x', 'y']
  again.append([{'round': 2, 'index': 0, 'text': 'w'}])
  lines = open(path).read().splitlines()
  assert json.loads(lines[0]) == {'settings': {'seed': 3, 'ops': ['a', 'b']}}
  assert [json.loads(line)['text'] for line in lines[1:]] == ['x', 'y', 'w']
  # Other settings: one line naming what differs and the fix.
  with pytest.raises(UserError, match=r'other settings \(differing: seed\); rerun with those'):
    generation.ResumableLog(path, ('round', 'index'), {'seed': 4, 'ops': ['a', 'b']})
  # fresh starts over.
  fresh = generation.ResumableLog(path, ('round', 'index'), {'seed': 4}, fresh=True)
  assert len(fresh) == 0 and open(path).read() == '{"settings": {"seed": 4}}\n'


def test_resumable_log_drops_a_cut_last_line(tmp_path):
  path = tmp_path / 'work.jsonl'
  path.write_text('{"settings": {}}\n{"i": 0}\n{"i": 1}\n{"i": 2, "te')  # a crash mid-write
  log = generation.ResumableLog(str(path), ('i',))
  assert [r['i'] for r in log.rows()] == [0, 1]
  assert path.read_text() == '{"settings": {}}\n{"i": 0}\n{"i": 1}\n'
  log.append([{'i': 2}])
  assert path.read_text().endswith('{"i": 1}\n{"i": 2}\n')
  path.write_text('{"settings": {}}\n{"i": 0}\nnot json\n{"i": 1}\n')
  with pytest.raises(UserError, match=r'work.jsonl:3 is not a JSON row; delete the file'):
    generation.ResumableLog(str(path), ('i',))


def _greedy_by_hand(logits_fn, ids, steps, eos):
  """Argmax of a full forward pass over BOS + prompt + what is generated so
  far (one fixed width: the causal positions after it change nothing)."""
  out = []
  for _ in range(steps):
    seq = [0] + ids + out
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, :len(seq)] = seq
    nxt = int(np.argmax(logits_fn(tokens)[0, len(seq) - 1]))
    if nxt == eos:
      break
    out.append(nxt)
  return out


def test_model_generator_matches_greedy_by_hand(capsys):
  cfg = decoder.GPTConfig(vocab_size=8192, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                          num_layers=1, max_positions=32)
  model = decoder.DecoderModel(cfg)
  with pytest.raises(UserError, match='max_positions=32'):
    generation.model_generator(model, None, prompt_length=24, max_decode_length=10)
  gen = generation.model_generator(model, None, batch_size=2, prompt_length=16,
                                   max_decode_length=6, seed=1)
  assert 'random-init' in capsys.readouterr().out
  # Larger weights than an init's: the argmax is far from ties, so the cached
  # and uncached passes pick the same token.
  gen.params = jax.tree_util.tree_map(lambda x: x * 40, gen.params)
  vocab = vocab_lib.embedded_bpe_vocabulary()
  # BOS 0 is a token, not padding.
  logits_fn = jax.jit(lambda t: model.logits(gen.params, {'decoder_input_tokens': t,
                                                         'decoder_attention_mask': t * 0 + 1}))
  long_prompt = ' '.join(['the quick brown fox'] * 10)
  prompts = ['Name a colour.', 'Hello there, how are you today?', long_prompt]
  got = gen(prompts, method='greedy')
  assert len(got) == 3
  tokens = 0
  for prompt, text in zip(prompts, got):
    ids = vocab.encode(prompt)[-15:]  # the end of a long prompt
    want = _greedy_by_hand(logits_fn, ids, 6, vocab.eos_id)
    assert text == vocab.decode(want)
    tokens += len(want)
  usage = gen.usage()
  assert usage['calls'] == 1 and usage['prompts'] == 3 and usage['truncated_prompts'] == 1
  assert usage['tokens'] == tokens > 0
  assert usage['compile_seconds'] > 0 and usage['seconds'] > 0
  sampled = gen(prompts[:2])  # another method compiles its own program
  assert len(sampled) == 2 and gen.usage()['calls'] == 2
  assert gen.settings() == {'checkpoint_path': None, 'batch_size': 2, 'prompt_length': 16,
                            'max_decode_length': 6, 'seed': 1, 'temperature': 0.7,
                            'top_p': 0.9, 'top_k': 0}
