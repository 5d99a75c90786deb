"""Explanation-tuning data (Orca, Mukherjee et al. 2023): a teacher checkpoint
answers instructions under sampled system messages.

    python -m t5x_lite.orca --gin_file=gin/gpt_tiny_orca.gin \
        --gin.CHECKPOINT_PATH="'runs/gpt_instruct_wit/checkpoints/300'"

Reads INSTRUCTIONS (Alpaca JSON or JSONL: instruction, input, and an output
that is not used), samples a system message per instruction from the set
SYSTEM_MESSAGES ('orca': the paper's 16) by its task type (TASK_TYPE, or told
from the prompt; `t5x_lite.data.system_messages`), seeded and keyed by the
prompt, so the message is the one an instruction run with SYSTEM_MESSAGES
would draw for it. A row with its own 'system' keeps it. The teacher (a
decoder-only model: GPT, Llama) reads the instruction template with the
system message first, as instruction tuning renders it, and its continuation
up to EOS is the response (DECODE_METHOD 'sample' with the sampling settings
of configs/runs/generation.gin, or 'greedy'). Writes OUTPUT_DIR/orca.jsonl
(Alpaca rows: system, instruction, input, output; rows whose response is
empty are dropped), which `register_instruction_task(name, path,
format='alpaca')` trains on as it is, and OUTPUT_DIR/orca_stats.json:
instructions read, rows written, empty responses dropped, counts per system
message id and per task type, and the generator's usage (tokens, generation
and compile seconds, tokens/s), with the wall time. Responses go to
OUTPUT_DIR/orca_log.jsonl as each batch finishes: the same command run again
after an interruption generates only the rest.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import collections
import json
import os
import time
from typing import Optional, Sequence

from t5x_lite import generation
from t5x_lite import gin_utils
from t5x_lite.data import instructions
from t5x_lite.data import system_messages
from t5x_lite.errors import UserError

DECODE_METHODS = ('sample', 'greedy')


def read_instructions(path: str, limit: Optional[int] = None) -> list[dict]:
  """The first `limit` (all for None) Alpaca rows of `path`: {'instruction',
  'input', 'output', 'system'} (absent fields '')."""
  if not os.path.isfile(path):
    raise UserError(f'INSTRUCTIONS {path} does not exist; point --gin.INSTRUCTIONS at an '
                    'Alpaca JSON / JSONL file of {instruction, input, output}.')
  rows = []
  for _, row in instructions.alpaca_rows(path, require_output=False):
    if limit is not None and len(rows) >= limit:
      break
    rows.append(row)
  if not rows:
    raise UserError(f'INSTRUCTIONS {path} has no record.')
  return rows


def plan(rows: Sequence[dict], set_name: str = 'orca', seed: int = 0,
         by_task_type: bool = True, task_type: Optional[str] = None) -> list[dict]:
  """Per row: {'key' (the prompt without a system message), 'task_type',
  'system_id' ('own' for a row's own message), 'system', 'prompt' (what the
  teacher reads)}."""
  system_messages.check_task_type(task_type)
  message_set = system_messages.get_set(set_name)
  out = []
  for row in rows:
    key = instructions.render_prompt(row['instruction'], row['input'])
    kind = task_type or system_messages.task_type_of(key)
    if row['system'].strip():
      message_id, text = 'own', row['system'].strip()
    else:
      message_id = system_messages.sample_id(key, message_set.ids(kind, by_task_type), seed)
      text = message_set.text(message_id)
    out.append({'key': key, 'task_type': kind, 'system_id': str(message_id), 'system': text,
                'prompt': instructions.with_system(key, text)})
  return out


def explanation_rows(rows: Sequence[dict], planned: Sequence[dict], responses: Sequence[str],
                     set_name: str = 'orca') -> tuple[list[dict], dict]:
  """(Alpaca rows with 'system', counts): the rows whose response is not empty."""
  ids = [str(i) for i in range(1, len(system_messages.get_set(set_name).messages) + 1)]
  per_message = collections.OrderedDict((i, 0) for i in ids)
  per_type = collections.OrderedDict()
  out, dropped = [], 0
  for row, p, response in zip(rows, planned, responses):
    per_message[p['system_id']] = per_message.get(p['system_id'], 0) + 1
    per_type[p['task_type']] = per_type.get(p['task_type'], 0) + 1
    if not response.strip():
      dropped += 1
      continue
    out.append({'system': p['system'], 'instruction': row['instruction'],
                'input': row['input'], 'output': response.strip()})
  counts = {'instructions': len(planned), 'rows': len(out), 'dropped_empty': dropped,
            'per_system_message': dict(per_message), 'per_task_type': dict(per_type)}
  return out, counts


def generate_data(*,
                  generate: generation.GenerateFn,
                  output_dir: str,
                  instructions_path: Optional[str] = None,
                  num_instructions: Optional[int] = None,
                  system_message_set: str = 'orca',
                  system_message_seed: int = 0,
                  by_task_type: bool = True,
                  task_type: Optional[str] = None,
                  decode_method: str = 'sample',
                  chunk_size: int = 8,
                  resume: bool = True) -> dict:
  """Writes OUTPUT_DIR/orca.jsonl, orca_log.jsonl and orca_stats.json (see the
  module docstring); returns the stats, with the output paths under 'files'.

  `generate` is the teacher (prompts -> continuations; gin:
  `@generation.model_generator()`). `instructions_path` None reads
  alpaca/alpaca_en_demo.json of the instruction samples directory
  (`t5x_lite.tasks.instructions.data_dir()`). `resume` False starts the log
  over.
  """
  start = time.time()
  if decode_method not in DECODE_METHODS:
    raise UserError(f'DECODE_METHOD={decode_method!r} is unknown; use one of '
                    f'{", ".join(DECODE_METHODS)}.')
  if num_instructions is not None and num_instructions < 1:
    raise UserError(f'NUM_INSTRUCTIONS={num_instructions} must be >= 1 (or None for all).')
  if instructions_path is None:
    from t5x_lite.tasks import instructions as instruction_tasks  # pylint: disable=g-import-not-at-top
    instructions_path = os.path.join(instruction_tasks.data_dir(), 'alpaca',
                                     'alpaca_en_demo.json')
    if not os.path.isfile(instructions_path):
      raise UserError(f'{instructions_path} is missing; set {instruction_tasks.DATA_DIR_ENV} to a '
                      'directory holding alpaca/alpaca_en_demo.json, or point '
                      '--gin.INSTRUCTIONS at an Alpaca file.')
  rows = read_instructions(instructions_path, num_instructions)
  planned = plan(rows, system_message_set, system_message_seed, by_task_type, task_type)
  settings = dict(instructions=os.path.abspath(instructions_path),
                  num_instructions=num_instructions, system_message_set=system_message_set,
                  system_message_seed=system_message_seed, by_task_type=by_task_type,
                  task_type=task_type, decode_method=decode_method,
                  generator=generate.settings() if hasattr(generate, 'settings') else None)
  os.makedirs(output_dir, exist_ok=True)
  files = {name: os.path.join(output_dir, f'orca{suffix}') for name, suffix in (
      ('data', '.jsonl'), ('log', '_log.jsonl'), ('stats', '_stats.json'))}
  log = generation.ResumableLog(files['log'], ('index',), settings, fresh=not resume)
  teacher = generate if decode_method == 'sample' else (
      lambda prompts: generate(prompts, method=decode_method))
  responses = generation.generate_logged(teacher, [p['prompt'] for p in planned], log,
                                         chunk_size)
  out, counts = explanation_rows(rows, planned, responses, system_message_set)
  stats = {'instructions_file': instructions_path, 'system_message_set': system_message_set,
           'system_message_seed': system_message_seed, 'by_task_type': by_task_type, **counts,
           'resumed': log.resumed,
           'generation': generate.usage() if hasattr(generate, 'usage') else None,
           'seconds': round(time.time() - start, 3), 'files': files}
  with open(files['data'], 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in out)
  with open(files['stats'], 'w', encoding='utf-8') as f:
    json.dump(stats, f, indent=2)
  usage = stats['generation']
  speed = f", {usage['tokens']} tokens at {usage['tokens_per_second']} tokens/s" if usage else ''
  print(f"orca: {stats['instructions']} instructions ({log.resumed} from the log), "
        f"{stats['rows']} rows ({stats['dropped_empty']} empty responses dropped){speed} "
        f"-> {files['data']}")
  return stats


def main(argv: Sequence[str]) -> None:
  gin_utils.call_configured(generate_data, argv)


if __name__ == '__main__':
  import t5x_lite.orca as orca_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(orca_module.main, 'orca')
