"""Held-out pairwise accuracy of the tiny GPT reward model (gin/gpt_reward.gin).

    python benchmarks/reward_table.py [--steps=200] [--work_dir=/tmp/reward_table]
        [--initial_checkpoint=runs/gpt_tiny_lm]

Two runs of `gin/gpt_reward.gin` (batch 8, `--steps` steps, from a random init
unless `--initial_checkpoint`), each in this process through
`t5x_lite.train.main`:

  synthetic  a text preference written to `--work_dir`: prompts of random
             words; the chosen response is words of one set (colours and
             fruits), the rejected one words of another (tools and numbers);
             1000 pairs for training and 64 held out ('pairs' format,
             registered as the task 'reward_synthetic_gpt').
  hh         the HH-RLHF harmless sample of ../shared/data (180 pairs for
             training, 20 held out): 'hh_rlhf_harmless_sample_gpt'.

Each row: the held-out pairwise accuracy (r_chosen > r_rejected), the mean
reward margin and the loss at the last eval, and at the first (step
EVAL_PERIOD).
"""

import argparse
import json
import os
import random
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('the a of to and in is it you that he was for on are with as his they be at one have '
         'this from or had by word but what some we can out other were all there when up use '
         'your how said an each she which do their time if will way about many then them').split()
CHOSEN = ('red green blue yellow purple orange apple banana cherry grape lemon peach '
          'pear plum white black').split()
REJECTED = ('hammer nail saw drill wrench screw one two three four five six seven eight '
            'nine ten').split()


def write_synthetic(path: str, n: int, seed: int = 0) -> None:
  rng = random.Random(seed)
  words = lambda pool, k: ' '.join(rng.choice(pool) for _ in range(k))
  with open(path, 'w') as f:
    for _ in range(n):
      f.write(json.dumps({'prompt': 'Say some words after: ' + words(WORDS, rng.randint(3, 8)),
                          'chosen': words(CHOSEN, rng.randint(2, 6)),
                          'rejected': words(REJECTED, rng.randint(2, 6))}) + '\n')


def run(task: str, model_dir: str, steps: int, initial_checkpoint) -> dict:
  """(first, last) eval rows of `task` from one gin/gpt_reward.gin run."""
  import gin  # pylint: disable=g-import-not-at-top
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  init = f"'{initial_checkpoint}'" if initial_checkpoint else 'None'
  train.main(['--gin_file=gin/gpt_reward.gin', f"--gin.MODEL_DIR='{model_dir}'",
              f"--gin.MIXTURE_OR_TASK_NAME='{task}'", f'--gin.TRAIN_STEPS={steps}',
              f'--gin.CHECKPOINT_PERIOD={steps}', f'--gin.INITIAL_CHECKPOINT_PATH={init}',
              '--gin.train_script.train.progress_bar=False'])
  with open(os.path.join(model_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  prefix = f'eval/{task}/'
  evals = [r for r in rows if prefix + 'accuracy' in r]
  pick = lambda r: {'step': r['step'], **{k: r[prefix + k] for k in (
      'accuracy', 'reward_margin', 'loss')}}
  return {'first': pick(evals[0]), 'last': pick(evals[-1])}


def main(argv) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--work_dir', default='/tmp/reward_table')
  parser.add_argument('--initial_checkpoint', default=None)
  args = parser.parse_args(argv)
  os.chdir(REPO)
  sys.path.insert(0, REPO)
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import
  from t5x_lite.tasks import preferences  # pylint: disable=g-import-not-at-top
  os.makedirs(args.work_dir, exist_ok=True)
  data = os.path.join(args.work_dir, 'synthetic.jsonl')
  write_synthetic(data, 1064)
  preferences.register_preference_task('reward_synthetic_gpt', data, num_validation=64)
  table = {}
  for name, task in (('synthetic', 'reward_synthetic_gpt'),
                     ('hh', 'hh_rlhf_harmless_sample_gpt')):
    table[name] = run(task, os.path.join(args.work_dir, name), args.steps,
                      args.initial_checkpoint)
  print(f"{'data':10s} {'step':>5s} {'accuracy':>9s} {'margin':>8s} {'loss':>7s}")
  for name, rows in table.items():
    for r in (rows['first'], rows['last']):
      print(f"{name:10s} {r['step']:5d} {r['accuracy']:9.3f} {r['reward_margin']:8.3f} "
            f"{r['loss']:7.3f}")


if __name__ == '__main__':
  main(sys.argv[1:])
