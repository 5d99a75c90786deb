"""The Hugging Face export table: each family exported, then loaded and run by
transformers against our model on the same inputs.

    python benchmarks/export_table.py [--families=t5,bert,gpt,bart] [--sizes=tiny,base]
        [--train_steps=20] [--lines=500] [--work_dir=/tmp/export_table]

tiny: the family's tiny gin (gin/*_tiny_*.gin) trained `--train_steps` steps on
the embedded corpus by `python -m t5x_lite.train`, exported by `python -m
t5x_lite.export_hf` (its own timing, without the process start). base: the
base config (configs/models/*_base.gin, GPT-2 small) from a random init,
exported in-process by `export_hf.export`. Each row: params, export seconds,
size on disk, the largest |logit difference| on a padded batch of held-out
text (float32), greedy generations equal to ours (prompts of mixed lengths,
each generated alone by transformers), and tokenizer ids equal on the first
`--lines` non-empty lines of the shared WikiText-2 test file.

Needs the test extras (torch, transformers); the project itself does not.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'text', 'wikitext-2',
                        'test.txt')

# family -> (tiny run gin, base model gin, HF auto class, vocabulary function name)
FAMILIES = {
    't5': ('gin/t5_tiny_span.gin', 'configs/models/t5_1_1_base.gin', 'AutoModelForSeq2SeqLM',
           'embedded_vocabulary'),
    'bert': ('gin/bert_tiny_mlm.gin', 'configs/models/bert_base.gin', 'AutoModelForPreTraining',
             'embedded_wordpiece_vocabulary'),
    'gpt': ('gin/gpt_tiny_lm.gin', 'configs/models/gpt2_small.gin', 'AutoModelForCausalLM',
            'embedded_bpe_vocabulary'),
    'bart': ('gin/bart_tiny_denoise.gin', 'configs/models/bart_base.gin', 'AutoModelForSeq2SeqLM',
             'embedded_bpe_vocabulary'),
}
PROMPTS = ('The tower is 324 metres (1,063 ft) tall, about the same height',
           'Café crème\tand  two   spaces', 'emoji 🙂 and 東京')


def batch(family, model, vocabulary, texts, length=16):
  """(our batch, the positions whose logits both sides define) for `texts`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = [list(vocabulary.encode(t))[:length - 2] for t in texts]
  rows = len(texts)
  if family in ('t5', 'bart'):
    enc = np.zeros((rows, length), np.int32)
    tgt = np.zeros((rows, length // 2), np.int32)
    for i, x in enumerate(ids):
      enc[i, :len(x) + 1] = x + [vocabulary.eos_id]
      n = 1 + i % (length // 2)  # targets of mixed lengths
      tgt[i, :n] = enc[i, :n]
    dec = np.zeros_like(tgt)
    dec[:, 1:] = tgt[:, :-1]
    if family == 'bart':
      dec[:, 0] = model.config.decoder_start_id
    return (dict(encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=tgt),
            tgt > 0)
  tokens = np.zeros((rows, length), np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)] = x
  if family == 'bert':
    return dict(input_tokens=tokens, segment_ids=np.zeros_like(tokens)), tokens > 0
  dec = np.zeros_like(tokens)
  dec[:, 1:] = tokens[:, :-1]
  return dict(decoder_input_tokens=dec, decoder_target_tokens=tokens), tokens > 0


def hf_logits(family, hf_model, inputs):
  """transformers' float32 logits for our batch (padding masked as ours)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  t = lambda x: torch.from_numpy(np.asarray(x)).long()
  with torch.no_grad():
    if family in ('t5', 'bart'):
      return hf_model(input_ids=t(inputs['encoder_input_tokens']),
                      attention_mask=t(inputs['encoder_input_tokens'] > 0),
                      decoder_input_ids=t(inputs['decoder_input_tokens']),
                      decoder_attention_mask=t(inputs['decoder_target_tokens'] > 0)).logits.numpy()
    if family == 'bert':
      tokens = inputs['input_tokens']
      return hf_model(input_ids=t(tokens), attention_mask=t(tokens > 0),
                      token_type_ids=t(inputs['segment_ids'])).prediction_logits.numpy()
    return hf_model(input_ids=t(inputs['decoder_input_tokens'])).logits.numpy()


def greedy_pairs(family, model, params, vocabulary, hf_model, tokenizer, prompts, steps):
  """[(ours, theirs)] greedy token lists: ours batched and padded, transformers'
  one prompt at a time from the exported tokenizer's ids (GPT rows start with
  id 0, as our decoder-only inputs do), each cut at the shorter length."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  eos = vocabulary.eos_id
  if family == 'gpt':
    ids = [list(vocabulary.encode(p)) for p in prompts]
    buffer = np.zeros((len(ids), 1 + max(map(len, ids)) + steps), np.int32)
    for i, x in enumerate(ids):
      buffer[i, 1:len(x) + 1] = x
    ours, _ = model.predict_batch(params, {'decoder_input_tokens': buffer,
                                           'decoder_prompt_lengths': np.array([len(x) for x in ids])},
                                  max_decode_length=steps, eos_id=eos)
  else:
    ids = [list(vocabulary.encode(p)) + [eos] for p in prompts]
    enc = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for i, x in enumerate(ids):
      enc[i, :len(x)] = x
    ours, _ = model.predict_batch(params, {'encoder_input_tokens': enc},
                                  max_decode_length=steps, eos_id=eos)
  pairs = []
  for i, prompt in enumerate(prompts):
    hf_ids = tokenizer(prompt, return_tensors='pt')['input_ids']
    if family == 'gpt':
      hf_ids = torch.cat([torch.zeros((1, 1), dtype=torch.long), hf_ids], 1)
    with torch.no_grad():
      out = hf_model.generate(hf_ids, attention_mask=torch.ones_like(hf_ids),
                              max_new_tokens=steps, do_sample=False, num_beams=1)
    theirs = list(out[0, hf_ids.shape[1]:] if family == 'gpt' else out[0, 1:])
    pairs.append(([int(x) for x in np.asarray(ours[i])][:len(theirs)], [int(x) for x in theirs]))
  return pairs


def _wikitext_lines(n):
  with open(WIKITEXT, encoding='utf-8') as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[:n]


def _env():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  return env


def _tiny(family, work_dir, train_steps):
  """Trains the tiny gin, exports it with the entry point: (model dir, out, seconds)."""
  model_dir, out = os.path.join(work_dir, f'{family}_tiny'), os.path.join(work_dir, f'{family}_tiny_hf')
  for path in (model_dir, out):  # a fresh run and export each time
    shutil.rmtree(path, ignore_errors=True)
  subprocess.run([sys.executable, '-m', 't5x_lite.train', f'--gin_file={FAMILIES[family][0]}',
                  f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={train_steps}',
                  f'--gin.CHECKPOINT_PERIOD={train_steps}', '--gin.BATCH_SIZE=8',
                  '--gin.train_script.train.progress_bar=False'],
                 cwd=REPO, env=_env(), check=True, capture_output=True)
  proc = subprocess.run([sys.executable, '-m', 't5x_lite.export_hf', f'--checkpoint_dir={model_dir}',
                         f'--output_dir={out}'], cwd=REPO, env=_env(), check=True,
                        capture_output=True, text=True)
  seconds = float(proc.stdout.strip().rsplit(' in ', 1)[1].split()[0])
  return model_dir, out, seconds


def _ours_from_checkpoint(model_dir):
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite import export_hf, gin_utils  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  gin_utils.parse_gin([os.path.join(model_dir, 'config.gin')], [], check_required=False)
  model, params, vocabulary, _, _ = export_hf.load(model_dir)
  return model, params, vocabulary


def _base(family, work_dir):
  """A random init of the base config, exported in-process: (model, params, vocab, out, s)."""
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from t5x_lite import export_hf, gin_utils  # pylint: disable=g-import-not-at-top
  from t5x_lite.data import vocab, wordpiece  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  gin_utils.parse_gin([FAMILIES[family][1]], [], check_required=False)
  model = gin_utils.macro('MODEL')
  name = FAMILIES[family][3]
  vocabulary = getattr(wordpiece if 'wordpiece' in name else vocab, name)()
  shapes = model.dummy_batch(1, 8, 8) if family in ('t5', 'bart') else model.dummy_batch(1, 8)
  params = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(0), shapes))['params'])
  out = os.path.join(work_dir, f'{family}_base_hf')
  shutil.rmtree(out, ignore_errors=True)
  start = time.time()
  export_hf.export(model, params, vocabulary, out)
  return model, params, vocabulary, out, time.time() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--families', default='t5,bert,gpt,bart')
  parser.add_argument('--sizes', default='tiny,base')
  parser.add_argument('--train_steps', type=int, default=20)
  parser.add_argument('--lines', type=int, default=500)
  parser.add_argument('--work_dir', default='/tmp/export_table')
  args = parser.parse_args()
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import
  os.makedirs(args.work_dir, exist_ok=True)
  lines = _wikitext_lines(args.lines)
  print('| family | size | params | export s | MiB on disk | max abs logit diff '
        '| greedy equal | tokenizer ids equal |')
  print('|---|---|---|---|---|---|---|---|')
  for family in args.families.split(','):
    for size in args.sizes.split(','):
      if size == 'tiny':
        model_dir, out, seconds = _tiny(family, args.work_dir, args.train_steps)
        model, params, vocabulary = _ours_from_checkpoint(model_dir)
      else:
        model, params, vocabulary, out, seconds = _base(family, args.work_dir)
      hf_model = getattr(transformers, FAMILIES[family][2]).from_pretrained(out).eval()
      tokenizer = transformers.AutoTokenizer.from_pretrained(out)
      inputs, real = batch(family, model, vocabulary, PROMPTS + tuple(lines[:5]))
      diff = np.abs(np.asarray(jax.jit(model.logits)(params, inputs))[real]
                    - hf_logits(family, hf_model, inputs)[real]).max()
      greedy = 'n/a'
      if family != 'bert':
        pairs = greedy_pairs(family, model, params, vocabulary, hf_model, tokenizer, PROMPTS, 8)
        greedy = f'{sum(a == b for a, b in pairs)}/{len(pairs)}'
      same = sum(tokenizer(x, add_special_tokens=False)['input_ids'] == list(vocabulary.encode(x))
                 for x in lines)
      disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20
      count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
      print(f'| {family} | {size} | {count:,} | {seconds:.1f} | {disk:.1f} | {diff:.2e} '
            f'| {greedy} | {same}/{len(lines)} |', flush=True)


if __name__ == '__main__':
  main()
