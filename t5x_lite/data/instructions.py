"""Instruction data from local files, rendered into (prompt, response) pairs.

Every reader yields dicts {'prompt', 'response', 'references', 'task',
'system'}: 'prompt' is the rendered text the model is conditioned on,
'response' the text it learns to produce, 'references' every acceptable
response (for evaluation; `[response]` except for Super-NaturalInstructions),
'task' a name (the file's task, category or format) and 'system' the system
message the prompt starts with ('' for none).

Formats (`FORMATS`):

  alpaca         a JSON list or JSONL of {instruction, input, output} and
                 an optional 'system' message (Stanford Alpaca, Alpaca-GPT4,
                 LLaMA-Factory's demos, `t5x_lite.orca`'s output).
  dolly          JSONL of {instruction, context, response, category}
                 (databricks-dolly-15k); 'task' is the category.
  chat           a JSON list or JSONL of {messages: [{role, content}, ...]},
                 roles system / user / assistant. The last message is the
                 assistant's response; the earlier turns form the prompt.
  sni            Super-NaturalInstructions task files (one task per JSON
                 file: Definition, Positive Examples, Instances). Each
                 instance gives one example; its first output is the
                 response and all its outputs are the references.
  self_instruct  Self-Instruct seed tasks (JSONL of {name, instruction,
                 instances: [{input, output}]}), one example per instance.

The prompt template, shared by all formats (`render_prompt`), is Alpaca's
without its one-sentence preamble (short prompts suit small models):

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:

The '### Input' block is left out when the input is empty; the response
follows the final newline. An optional system message (Orca-style, e.g.
"You are a helpful assistant. Think step by step.") is put before the whole
prompt, followed by a blank line (`with_system`); a task's system prompt
comes before a record's own (a chat 'system' turn, an Alpaca 'system' field).
Chat turns before the last one are written as earlier '### Instruction' /
'### Response' blocks.

Super-NaturalInstructions examples put Tk-Instruct's task description in the
instruction slot and the instance in the input slot:

    ### Instruction:
    Definition: <Definition>

    Positive Example 1-
    Input: <example input>
    Output: <example output>

    Now complete the following example-

    ### Input:
    <instance input>

    ### Response:

with `num_positive_examples` demonstrations (0 leaves out the example
blocks and the "Now complete" line).

A record that is not what its format needs raises `UserError` naming the
file and line.
"""

import glob
import json
import os
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Union

from t5x_lite.errors import UserError

FORMATS = ('alpaca', 'dolly', 'chat', 'sni', 'self_instruct')

Paths = Union[str, Sequence[str]]


def render_prompt(instruction: str, input_text: str = '',
                  system: Optional[str] = None, history: Sequence[Sequence[str]] = ()) -> str:
  """The shared prompt template (see the module docstring).

  Args:
    instruction: what to do.
    input_text: optional context; its block is left out when empty.
    system: optional system instruction put before the prompt.
    history: earlier (instruction, response) turns of a conversation.

  Returns:
    The prompt, ending with '### Response:\n'.
  """
  parts = []
  for user, assistant in history:
    parts.append(f'### Instruction:\n{user.strip()}\n\n### Response:\n{assistant.strip()}\n\n')
  parts.append(f'### Instruction:\n{instruction.strip()}\n\n')
  if input_text and input_text.strip():
    parts.append(f'### Input:\n{input_text.strip()}\n\n')
  parts.append('### Response:\n')
  return with_system(''.join(parts), system)


def with_system(prompt: str, system: Optional[str]) -> str:
  """The template's system block: `system` (stripped) and a blank line before
  `prompt`; `prompt` alone when `system` is empty."""
  if system and system.strip():
    return f'{system.strip()}\n\n{prompt}'
  return prompt


def join_system(task_system: Optional[str], own: Optional[str]) -> str:
  """A task's system prompt followed by a record's own system message."""
  parts = [t.strip() for t in (task_system, own) if t and t.strip()]
  return '\n\n'.join(parts)


def sni_instruction(task: Mapping[str, Any], num_positive_examples: int = 2) -> str:
  """Tk-Instruct's task description: the definition and k positive examples."""
  definition = task['Definition']
  if isinstance(definition, list):
    definition = definition[0]
  text = f'Definition: {definition.strip()}'
  examples = task.get('Positive Examples', [])[:num_positive_examples]
  for i, ex in enumerate(examples, 1):
    text += (f"\n\nPositive Example {i}-\nInput: {ex['input'].strip()}\n"
             f"Output: {ex['output'].strip()}")
  if examples:
    text += '\n\nNow complete the following example-'
  return text


# ----------------------------------------------------------------------------
# Reading.


def resolve_paths(paths: Paths) -> List[str]:
  """The files matching `paths` (a path, a glob, or a list of them), sorted."""
  if isinstance(paths, str):
    paths = [paths]
  files = []
  for pattern in paths:
    found = sorted(glob.glob(os.path.expanduser(pattern)))
    if not found:
      raise UserError(f'No instruction file matches {pattern!r}; check the path '
                      '(or the data_dir the task was registered with).')
    files.extend(found)
  return files


def _line(text: str, offset: int) -> int:
  return text.count('\n', 0, offset) + 1


def _json_records(path: str) -> Iterator[tuple]:
  """(line number, parsed value) per record of a JSON list or a JSONL file."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  start = len(text) - len(text.lstrip())
  if not text[start:start + 1] == '[':  # JSONL
    for lineno, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{path}:{lineno}: not valid JSON ({e.msg}); fix or remove '
                        'the line.') from None
    return
  decoder = json.JSONDecoder()
  pos = start + 1
  while True:
    while pos < len(text) and text[pos] in ' \t\r\n,':
      pos += 1
    if pos >= len(text):
      raise UserError(f'{path}:{_line(text, pos)}: the JSON list is not closed; '
                      "end the file with ']'.")
    if text[pos] == ']':
      return
    try:
      value, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise UserError(f'{path}:{_line(text, e.pos)}: not valid JSON ({e.msg}); fix the '
                      'record.') from None
    yield _line(text, pos), value
    pos = end


def _field(record: Any, key: str, path: str, lineno: int, required: bool = True) -> str:
  """record[key] as a string ('' when absent and not required)."""
  if not isinstance(record, dict):
    raise UserError(f'{path}:{lineno}: a record must be a JSON object, got '
                    f'{type(record).__name__}; check the file format.')
  if key not in record or record[key] is None:
    if required:
      raise UserError(f"{path}:{lineno}: the record has no '{key}' field (it has "
                      f'{sorted(record)}); check the file format.')
    return ''
  value = record[key]
  if not isinstance(value, str):
    raise UserError(f"{path}:{lineno}: field '{key}' must be a string, got "
                    f'{type(value).__name__}; fix the record.')
  return value


def _example(prompt: str, response: str, task: str, references=None,
             system: Optional[str] = None) -> dict:
  return {'prompt': prompt, 'response': response, 'task': task,
          'references': list(references) if references else [response],
          'system': (system or '').strip()}


def _task_name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def alpaca_rows(path: str, require_output: bool = True) -> Iterator[tuple]:
  """(line number, {'instruction', 'input', 'output', 'system'}) per record
  of an Alpaca file; absent optional fields are ''."""
  for lineno, r in _json_records(path):
    yield lineno, {'instruction': _field(r, 'instruction', path, lineno),
                   'input': _field(r, 'input', path, lineno, required=False),
                   'output': _field(r, 'output', path, lineno, required=require_output),
                   'system': _field(r, 'system', path, lineno, required=False)}


def read_alpaca(path: str, system: Optional[str] = None) -> Iterator[dict]:
  for _, r in alpaca_rows(path):
    sys_text = join_system(system, r['system'])
    yield _example(render_prompt(r['instruction'], r['input'], sys_text), r['output'],
                   _task_name(path), system=sys_text)


def read_dolly(path: str, system: Optional[str] = None) -> Iterator[dict]:
  for lineno, r in _json_records(path):
    category = _field(r, 'category', path, lineno, required=False)
    yield _example(render_prompt(_field(r, 'instruction', path, lineno),
                                 _field(r, 'context', path, lineno, required=False), system),
                   _field(r, 'response', path, lineno), category or _task_name(path),
                   system=system)


def read_chat(path: str, system: Optional[str] = None) -> Iterator[dict]:
  for lineno, r in _json_records(path):
    if not isinstance(r, dict) or not isinstance(r.get('messages'), list) or not r['messages']:
      raise UserError(f"{path}:{lineno}: a chat record needs a non-empty 'messages' list "
                      'of {role, content}; fix the record.')
    turns = []
    for m in r['messages']:
      role, content = _field(m, 'role', path, lineno), _field(m, 'content', path, lineno)
      if role not in ('system', 'user', 'assistant'):
        raise UserError(f"{path}:{lineno}: unknown role {role!r}; use 'system', 'user' or "
                        "'assistant'.")
      turns.append((role, content))
    sys_text = system
    if turns[0][0] == 'system':
      sys_text = join_system(system, turns.pop(0)[1])
    roles = [t[0] for t in turns]
    if len(turns) < 2 or len(turns) % 2 or roles != ['user', 'assistant'] * (len(turns) // 2):
      raise UserError(f'{path}:{lineno}: messages must alternate user / assistant after an '
                      f'optional system message and end with the assistant; got {roles}.')
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
    yield _example(render_prompt(pairs[-1][0], system=sys_text, history=pairs[:-1]),
                   pairs[-1][1], _task_name(path), system=sys_text)


def read_sni(path: str, system: Optional[str] = None,
             num_positive_examples: int = 2) -> Iterator[dict]:
  """One example per instance of a Super-NaturalInstructions task file."""
  if num_positive_examples < 0:
    raise UserError(f'num_positive_examples={num_positive_examples} must be >= 0.')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  try:
    task = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f'{path}:{_line(text, e.pos)}: not valid JSON ({e.msg}).') from None
  for key in ('Definition', 'Instances'):
    if not isinstance(task, dict) or key not in task:
      raise UserError(f"{path}:1: not a Super-NaturalInstructions task (no '{key}'); "
                      "use format='sni' only for task JSON files.")
  try:
    instruction = sni_instruction(task, num_positive_examples)
  except (KeyError, TypeError, AttributeError, IndexError):
    raise UserError(f'{path}:1: malformed Definition or Positive Examples; each example '
                    'needs string input and output.') from None
  name = _task_name(path)
  for i, inst in enumerate(task['Instances']):
    outputs = inst.get('output') if isinstance(inst, dict) else None
    if isinstance(outputs, str):
      outputs = [outputs]
    if (not isinstance(inst, dict) or not isinstance(inst.get('input'), str) or not outputs
        or not all(isinstance(o, str) for o in outputs)):
      needle = json.dumps(inst.get('id'))[1:-1] if isinstance(inst, dict) and 'id' in inst else None
      lineno = _line(text, text.find(needle)) if needle and needle in text else 1
      raise UserError(f'{path}:{lineno}: instance {i} needs a string input and a non-empty '
                      'list of string outputs; fix or remove it.')
    yield _example(render_prompt(instruction, inst['input'], system), outputs[0], name,
                   references=outputs, system=system)


def read_self_instruct(path: str, system: Optional[str] = None) -> Iterator[dict]:
  for lineno, r in _json_records(path):
    instruction = _field(r, 'instruction', path, lineno)
    instances = r.get('instances')
    if not isinstance(instances, list) or not instances:
      raise UserError(f"{path}:{lineno}: a seed task needs a non-empty 'instances' list; "
                      'fix the record.')
    for inst in instances:
      yield _example(render_prompt(instruction, _field(inst, 'input', path, lineno, False),
                                   system),
                     _field(inst, 'output', path, lineno), r.get('name') or _task_name(path),
                     system=system)


_READERS = {'alpaca': read_alpaca, 'dolly': read_dolly, 'chat': read_chat,
            'sni': read_sni, 'self_instruct': read_self_instruct}


def read_examples(paths: Paths, format: str, system: Optional[str] = None,  # pylint: disable=redefined-builtin
                  num_positive_examples: int = 2) -> List[dict]:
  """All examples of the files `paths` in `format` (see FORMATS), in order."""
  if format not in _READERS:
    raise UserError(f'Unknown instruction format {format!r}; use one of {", ".join(FORMATS)}.')
  out = []
  for path in resolve_paths(paths):
    kwargs = {'num_positive_examples': num_positive_examples} if format == 'sni' else {}
    out.extend(_READERS[format](path, system=system, **kwargs))
  return out
