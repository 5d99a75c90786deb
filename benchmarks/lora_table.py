"""LoRA against full fine-tuning of the tiny Llama, on the same instruction
steps from the same base.

    python benchmarks/lora_table.py [--base_steps=300] [--steps=100]
        [--work_dir=/tmp/lora_table]

1. The base: gin/llama_tiny_lm.gin trained `--base_steps` steps on the
   embedded corpus (skipped when `--work_dir`/base already holds a checkpoint).
2. From that checkpoint, `--steps` steps of WIT instruction tuning on the SNI
   training tasks (needs ../shared/data), each run in its own
   `python -m t5x_lite.train` process: gin/llama_tiny_instruct_wit.gin (every
   param trained) and gin/llama_tiny_instruct_lora.gin (rank-8 adapters on
   every projection, base frozen), the same batches in the same order.

Each row: trainable params (and their share of the model), the bytes of the
optimizer state in the final checkpoint, the process's peak RSS, seconds per
step over the last logged interval, and the training loss there. Both runs
take place in one sitting; the seconds compare only on a machine otherwise
idle.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = (('full', 'gin/llama_tiny_instruct_wit.gin'), ('LoRA', 'gin/llama_tiny_instruct_lora.gin'))


def train(gin_file, model_dir, steps, *bindings):
  """The `done:` line and the `model:` line of one train process."""
  cmd = [sys.executable, '-m', 't5x_lite.train', f'--gin_file={gin_file}',
         f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={steps}',
         f'--gin.CHECKPOINT_PERIOD={steps}', '--gin.train_script.train.progress_bar=False',
         *bindings]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  lines = proc.stdout.splitlines()
  return (next(l for l in lines if l.startswith('done:')),
          next(l for l in lines if l.startswith('model:')))


def opt_state_bytes(model_dir, step):
  """Bytes of the optimizer state saved at `step` (float32 moments, int32 counts)."""
  with open(os.path.join(model_dir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
    shapes = json.load(f)['shapes']
  return sum(4 * math.prod(s) for k, s in shapes.items() if k.startswith('opt_state'))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--base_steps', type=int, default=300)
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--work_dir', default='/tmp/lora_table')
  args = parser.parse_args()
  base = os.path.join(args.work_dir, 'base')
  if not os.path.isdir(os.path.join(base, 'checkpoints')):
    done, _ = train('gin/llama_tiny_lm.gin', base, args.base_steps)
    print(f'base: {done}')
  rows = []
  for name, gin_file in RUNS:
    model_dir = os.path.join(args.work_dir, name.lower())
    done, model = train(gin_file, model_dir, args.steps,
                        f"--gin.INITIAL_CHECKPOINT_PATH='{base}'", '--gin.EVAL_PERIOD=0')
    trainable = int(re.search(r'model: ([\d,]+) params', model).group(1).replace(',', ''))
    loss = float(re.search(r'loss ([\d.]+)', done).group(1))
    seconds = float(re.search(r'([\d.]+) s/step', done).group(1))
    rss = float(re.search(r'peak RSS ([\d.]+) GiB', done).group(1))
    rows.append((name, trainable, opt_state_bytes(model_dir, args.steps), rss, seconds, loss))
  print(f'\n{args.steps} WIT steps from {base}:')
  print('| run | trainable params | optimizer state | peak RSS | s/step | final loss |')
  print('|---|---|---|---|---|---|')
  total = rows[0][1]  # the full fine-tune trains every param
  for name, trainable, opt, rss, seconds, loss in rows:
    print(f'| {name} | {trainable:,} ({100 * trainable / total:.2f}%) | '
          f'{opt / 2**20:.2f} MiB | {rss:.2f} GiB | {seconds:.3f} | {loss:.4f} |')


if __name__ == '__main__':
  main()
