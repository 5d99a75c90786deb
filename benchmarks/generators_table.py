"""What the instruction data generators keep and drop with a tiny GPT.

    python benchmarks/generators_table.py [--lm_steps=600] [--wit_steps=300] [--num=64]
        [--work_dir=/tmp/generators_table]

The chain, each step one `python -m t5x_lite...` process (printed as it
runs; a step whose output exists is not run again):

1. `gin/gpt_tiny_lm.gin` pretrains the tiny GPT on the embedded corpus;
2. from it, `gin/gpt_instruct_wit.gin` instruction-tunes M0 on the Alpaca demo
   ('alpaca_demo_gpt') and the backward model on the same pairs swapped
   ('alpaca_demo_backward_gpt');
3. Evol-Instruct (`gin/gpt_tiny_evol_instruct.gin`, M0, `--num` pool
   instructions, one round), Orca (`gin/gpt_tiny_orca.gin`, M0 the teacher,
   `--num` Alpaca instructions) and back-translation
   (`gin/gpt_tiny_back_translate.gin`, `--num` C4 segments, M0 the curator).

Prints each generator's counts from its stats JSON (generated, kept, each
filter reason), its wall time and its generation tokens/s.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ['--gin.train_script.train.progress_bar=False']


def run(module, flags, done_path):
  """Runs `python -m module flags` unless `done_path` exists; its wall seconds."""
  if os.path.exists(done_path):
    print(f'(have {done_path})', flush=True)
    return None
  cmd = [sys.executable, '-m', module, *flags]
  print('$ python -m ' + ' '.join([module, *flags]), flush=True)
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f'failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}')
  print(proc.stdout.strip().splitlines()[-1], flush=True)
  return round(time.time() - start, 1)


def train(model_dir, gin_file, steps, *flags):
  ckpt = os.path.join(model_dir, 'checkpoints', str(steps))
  run('t5x_lite.train', [f'--gin_file={gin_file}', f"--gin.MODEL_DIR='{model_dir}'",
                         f'--gin.TRAIN_STEPS={steps}', f'--gin.CHECKPOINT_PERIOD={steps}',
                         *QUIET, *flags], ckpt)
  return ckpt


def load(path):
  with open(path) as f:
    return json.load(f)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--lm_steps', type=int, default=600)
  parser.add_argument('--wit_steps', type=int, default=300)
  parser.add_argument('--num', type=int, default=64)
  parser.add_argument('--work_dir', default='/tmp/generators_table')
  args = parser.parse_args()
  w = lambda *p: os.path.join(args.work_dir, *p)
  lm = train(w('lm'), 'gin/gpt_tiny_lm.gin', args.lm_steps)
  wit = lambda name, task: train(
      w(name), 'gin/gpt_instruct_wit.gin', args.wit_steps, f"--gin.INITIAL_CHECKPOINT_PATH='{lm}'",
      f"--gin.MIXTURE_OR_TASK_NAME='{task}'", '--gin.EVAL_PERIOD=0')
  m0, backward = wit('m0', 'alpaca_demo_gpt'), wit('backward', 'alpaca_demo_backward_gpt')
  walls = {
      'evol_instruct': run('t5x_lite.evol_instruct', [
          '--gin_file=gin/gpt_tiny_evol_instruct.gin', f"--gin.CHECKPOINT_PATH='{m0}'",
          f"--gin.OUTPUT_DIR='{w('evol')}'", f'--gin.POOL_SIZE={args.num}', '--gin.NUM_ROUNDS=1'],
          w('evol', 'evol_instruct_stats.json')),
      'orca': run('t5x_lite.orca', [
          '--gin_file=gin/gpt_tiny_orca.gin', f"--gin.CHECKPOINT_PATH='{m0}'",
          f"--gin.OUTPUT_DIR='{w('orca')}'", f'--gin.NUM_INSTRUCTIONS={args.num}'],
          w('orca', 'orca_stats.json')),
      'back_translate': run('t5x_lite.back_translate', [
          '--gin_file=gin/gpt_tiny_back_translate.gin',
          f"--gin.BACKWARD_CHECKPOINT_PATH='{backward}'", f"--gin.CURATION_CHECKPOINT_PATH='{m0}'",
          f"--gin.OUTPUT_DIR='{w('bt')}'", f'--gin.NUM_SEGMENTS={args.num}'],
          w('bt', 'back_translation_stats.json')),
  }
  evol = load(w('evol', 'evol_instruct_stats.json'))
  orca = load(w('orca', 'orca_stats.json'))
  bt = load(w('bt', 'back_translation_stats.json'))
  total = evol['total']
  rows = [
      ('Evol-Instruct (1 round)', total['generated'], total['kept'],
       ', '.join(f'{k} {v}' for k, v in total['eliminated'].items() if v) or 'none',
       evol['seconds'], evol['generation']),
      ('Orca', orca['instructions'], orca['rows'], f"empty response {orca['dropped_empty']}",
       orca['seconds'], orca['generation']),
      ('Back-translation: augment', bt['instructions']['generated'],
       bt['instructions']['candidates'], f"no instruction {bt['instructions']['empty']}",
       None, bt['generation']['augment']),
      ('Back-translation: curate', bt['ratings']['rated'], bt['kept'],
       f"unparseable {bt['ratings']['unparseable']}, below {bt['ratings']['threshold']}: "
       f"{bt['ratings']['parsed'] - bt['kept']}; scores {bt['ratings']['scores']}",
       bt['seconds'], bt['generation']['curate']),
  ]
  print(f'\nTiny GPT: {args.lm_steps} LM steps, then {args.wit_steps} WIT steps '
        f'(M0 and the backward model); {args.num} inputs per generator.')
  print('| generator | generated | kept | filtered | seconds | generated tokens | tokens/s |')
  print('|---|---|---|---|---|---|---|')
  for name, generated, kept, why, seconds, usage in rows:
    print(f"| {name} | {generated} | {kept} | {why} | {seconds if seconds is not None else ''} "
          f"| {usage['tokens']} | {usage['tokens_per_second']} |")
  print('\nwall seconds per command (None: reused):', walls)
  print('segments:', bt['segments'])


if __name__ == '__main__':
  main()
