"""Learning curves and iteration cost of the RL gins on the verifiable task.

    python benchmarks/rl_table.py [--steps=60] [--every=10] [--work_dir=/tmp/rl_table]
        [--gin_files=gin/gpt_grpo.gin,gin/gpt_ppo.gin,gin/t5_grpo.gin]

Each gin file trains from random init in its own `python -m t5x_lite.train`
process, one after the other, logging every iteration; the tables come from
its metrics.jsonl. Curves: the mean reward, KL to the reference (per
response), policy entropy and clip fraction every `--every` iterations.
Cost: the seconds of an iteration's rollout (sampling, rewards, scoring)
and update phases, averaged over the iterations after the first; rollout
tokens/s counts the response tokens generated, update tokens/s the prompt +
response positions the updates read (every epoch).
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURVE = ('reward_mean', 'kl', 'entropy', 'clip_fraction')


def run(gin_file, model_dir, steps):
  cmd = [sys.executable, '-m', 't5x_lite.train', f'--gin_file={gin_file}',
         f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={steps}',
         f'--gin.CHECKPOINT_PERIOD={steps}', '--gin.train_script.train.progress_bar=False',
         '--gin.train_script.train.log_every=1']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--every', type=int, default=10)
  parser.add_argument('--work_dir', default='/tmp/rl_table')
  parser.add_argument('--gin_files', default='gin/gpt_grpo.gin,gin/gpt_ppo.gin,gin/t5_grpo.gin')
  args = parser.parse_args()
  cost = []
  for gin_file in args.gin_files.split(','):
    name = os.path.splitext(os.path.basename(gin_file))[0]
    rows = run(gin_file, os.path.join(args.work_dir, name), args.steps)
    print(f'\n{name} ({gin_file}), from random init:')
    print('| iteration | ' + ' | '.join(CURVE) + ' |')
    print('|---' * (len(CURVE) + 1) + '|')
    for r in rows:
      if r['step'] == 1 or r['step'] % args.every == 0:
        print(f"| {r['step']} | " + ' | '.join(f'{r[k]:.3f}' for k in CURVE) + ' |')
    later = rows[1:]
    mean = lambda k: sum(r[k] for r in later) / len(later)
    cost.append((name, mean('rollout_seconds'), mean('rollout_tokens_per_second'),
                 mean('update_seconds'), mean('update_tokens_per_second')))
  print('\nOne iteration (mean over iterations 2..N):')
  print('| run | rollout s | rollout tokens/s | update s | update tokens/s |')
  print('|---|---|---|---|---|')
  for name, rs, rt, us, ut in cost:
    print(f'| {name} | {rs:.3f} | {rt:,.0f} | {us:.3f} | {ut:,.0f} |')


if __name__ == '__main__':
  main()
