"""INPUT_FILE of `python -m t5x_lite.infer`: a task's model inputs from a file
alone, formatted as the task formats its own rows, without its dataset.

The file:

  *.jsonl      one JSON object per line with the fields of the task's rows
               (TFDS's names, e.g. {"sentence1": ..., "sentence2": ...} for
               RTE, {"premise": ..., "hypothesis": ...} for MNLI,
               {"question": ..., "context": ...} for SQuAD; instruction
               tasks: {"instruction", "input"}, dolly's {"instruction",
               "context"} or chat's {"messages": [...]} ending with the
               user's turn). A line that is not such an object is
               one error naming the file and line.
  other names  one input text per line: the one text field of a
               single-sentence task (SST-2, CoLA), the instruction of an
               instruction task, the prompt of a language model.

Empty lines are skipped. What each line becomes, by the task's source:

  TFDS-shaped rows       (GLUE / SuperGLUE, SQuAD, CNN/DailyMail, WMT) the row
                         runs through the task's own preprocessors (T5's
                         'sst2 sentence: ...', 'summarize: ...', 'translate
                         English to German: ...', the `_cls` twins' text_a /
                         text_b, the Flan-style templates). A plain line fills
                         the task's one input field (`input_fields`); fields
                         left out of a JSON object are empty, 'label' -1 and
                         'idx' 0 ('idx' picks an instruction template).
  instruction files      the shared prompt template with the task's system
                         prompt (`t5x_lite.data.instructions.render_prompt`;
                         an SNI task puts its task file's definition first,
                         the line being the instance), tokenized and cut as
                         the task does (the end kept). A line without a
                         system message of its own (a chat 'system' turn, an
                         Alpaca 'system' field) or of its task gets the run's
                         (infer's SYSTEM_MESSAGE; `t5x_lite.data.
                         system_messages`), as do TFDS-shaped instruction
                         rows (the Flan-style GLUE tasks) through the task's
                         preprocessors.
  anything else          (corpora: span corruption, LM, denoising) the line is
                         the model input as is.

A reward model (`SCORES_RESPONSES`) reads {"prompt", "response"} lines (or
prompt TAB response), see `response_examples`.

With `raw=True` (`--raw_inputs`) every line is the model input as is: the
encoder input (EOS added where the task adds one), the classifier's text A
(a TAB separates text B of a pair task), the decoder-only prompt.
"""

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import glue_sources
from t5x_lite.data import instructions
from t5x_lite.data import system_messages
from t5x_lite.errors import UserError


@dataclasses.dataclass(frozen=True)
class Line:
  """One input of the file: its line number, its text, its JSON object (JSONL)."""
  lineno: int
  text: str
  record: Optional[dict] = None


def read(path: str, raw: bool = False) -> list[Line]:
  """The non-empty lines of `path`; JSON objects when it ends with .jsonl (unless `raw`)."""
  if not os.path.isfile(path):
    raise UserError(f'INPUT_FILE {path} does not exist; give a text file with one input per '
                    'line (or a .jsonl file of JSON objects).')
  jsonl = path.endswith('.jsonl') and not raw
  lines = []
  with open(path, encoding='utf-8') as f:
    for lineno, content in enumerate(f, 1):
      content = content.rstrip('\r\n')
      if not content.strip():
        continue
      record = None
      if jsonl:
        try:
          record = json.loads(content)
        except json.JSONDecodeError as e:
          raise UserError(f'{path}:{lineno}: not valid JSON ({e.msg}); write one JSON object '
                          'per line, or give a file not ending in .jsonl for plain lines.') from None
        if not isinstance(record, dict):
          raise UserError(f'{path}:{lineno}: a .jsonl line must be a JSON object of the '
                          f"task's fields, got {type(record).__name__}.")
      lines.append(Line(lineno, content, record))
  if not lines:
    raise UserError(f'INPUT_FILE {path} has no non-empty line.')
  return lines


def kind(task: seqio.Task) -> str:
  """'text_to_text' (inputs -> targets: T5, BART, a GPT prompt -> response),
  'lm' (targets only: a decoder-only language model) or 'classification'."""
  features = task.output_features
  if 'inputs' in features and 'targets' in features:
    return 'text_to_text'
  if 'targets' in features:
    return 'lm'
  if 'text_a' in features:
    return 'classification'
  raise UserError(f"task '{task.name}' has features {sorted(features)}; infer reads tasks "
                  "with 'inputs' / 'targets', 'targets' (an LM) or 'text_a' (a classifier).")


# ----------------------------------------------------------------------------
# Task rows from lines.


def _where(path: str, line: Line) -> str:
  return f'{path}:{line.lineno}'


def signature(source) -> Optional[Mapping[str, Any]]:
  """The TFDS-shaped row spec of a source that has one (GLUE / SuperGLUE,
  SQuAD, CNN/DailyMail, WMT), else None."""
  if isinstance(source, glue_sources.GlueSource):
    return glue_sources.output_signature(source.benchmark, source.config)
  spec = getattr(source, 'output_signature', None)
  return spec if isinstance(spec, Mapping) else None


def _is_text(spec) -> bool:
  return not isinstance(spec, Mapping) and spec.dtype == tf.string and spec.shape.rank == 0


def input_fields(task: seqio.Task) -> tuple[str, ...]:
  """The row fields a task's inputs are made of (a plain line fills the one
  field of a single-field task); the others may be left out."""
  spec = signature(task.source)
  options = getattr(task.preprocessors[0], 'keywords', {}) if task.preprocessors else {}
  kind = getattr(task.source, 'kind', None)
  if kind == 'squad':
    return ('question', 'context') if options.get('include_context', True) else ('question',)
  if kind == 'cnn_dailymail':
    return (options.get('article_key', 'article'),)
  if kind == 'translation':
    return (options.get('source_language', task.source.languages[0]),)
  return tuple(k for k, v in spec.items() if _is_text(v))


def _default(spec) -> Any:
  """A left-out field: '' / 0, one such element for a list inside a record."""
  if isinstance(spec, Mapping):
    return {k: _default(v) for k, v in spec.items()}
  value = '' if spec.dtype == tf.string else 0
  return [value] if spec.shape.rank else value


def _row(task: seqio.Task, line: Line, path: str) -> dict:
  """The TFDS-shaped row of the task's source for one line."""
  spec = signature(task.source)
  fields = input_fields(task)
  record = line.record
  if record is None:
    if len(fields) != 1:
      raise UserError(f'{_where(path, line)}: task {task.name} reads the fields '
                      f"{', '.join(fields)}; give INPUT_FILE as a .jsonl file with one object "
                      'of those fields per line, or --raw_inputs.')
    record = {fields[0]: line.text}
  unknown = sorted(set(record) - set(spec))
  if unknown:
    raise UserError(f"{_where(path, line)}: unknown field '{unknown[0]}' for task {task.name}; "
                    f"it reads {', '.join(sorted(spec))}.")
  row = {}
  for key, field_spec in spec.items():
    value = record.get(key)
    if isinstance(field_spec, Mapping):  # a row id or SQuAD's answers: defaults unless given
      value = value if isinstance(value, Mapping) else {}
      row[key] = {k: _array(value.get(k, _default(v)), v, path, line, f'{key}.{k}')
                  for k, v in field_spec.items()}
    elif key == 'label':
      row[key] = np.asarray(-1 if value is None else value, field_spec.dtype.as_numpy_dtype)
    elif value is None and (key in fields or key == 'entities' or (
        field_spec.dtype != tf.string and key != 'idx')):  # e.g. WSC's span indices
      raise UserError(f"{_where(path, line)}: task {task.name} needs the field '{key}' "
                      f"(it reads {', '.join(sorted(spec))}).")
    elif value is None:  # a target or an id: empty
      row[key] = _array([] if field_spec.shape.rank else _default(field_spec), field_spec,
                        path, line, key)
    else:
      row[key] = _array(value, field_spec, path, line, key)
  return row


def _array(value: Any, spec, path: str, line: Line, key: str) -> Any:
  """`value` as `spec` says (a string, an integer, or a list of them)."""
  is_string = spec.dtype == tf.string
  kind, noun = (str, 'string') if is_string else (int, 'integer')
  ok = lambda v: isinstance(v, kind) and not isinstance(v, bool)
  if spec.shape.rank:
    if not isinstance(value, list) or not all(ok(v) for v in value):
      raise UserError(f"{_where(path, line)}: field '{key}' must be a list of {noun}s.")
    if is_string:
      return np.asarray([v.encode('utf-8') for v in value], dtype=object).reshape([-1])
    return np.asarray(value, spec.dtype.as_numpy_dtype).reshape([-1])
  if not ok(value):
    raise UserError(f"{_where(path, line)}: field '{key}' must be "
                    f"{'a string' if is_string else 'an integer'}.")
  return value.encode('utf-8') if is_string else np.asarray(value, spec.dtype.as_numpy_dtype)


def _row_examples(task: seqio.Task, rows: Sequence[dict],
                  lengths: Mapping[str, int]) -> list[dict]:
  """The task's examples of `rows` (its preprocessors, as its `get_dataset`)."""
  ds = tf.data.Dataset.from_generator(lambda: iter(rows),
                                      output_signature=dict(signature(task.source)))
  ds = task.preprocess_precache(ds, seed=0)
  ds = task.preprocess_postcache(ds, sequence_length=dict(lengths), seed=0)
  return list(ds.as_numpy_iterator())


def _instruction_prompt(task: seqio.Task, line: Line, path: str) -> str:
  """The rendered prompt of an instruction task for one line, with the run's
  system message where it has none of its own (`system_messages.apply`)."""
  prompt, system = _rendered(task, line, path)
  return system_messages.apply(prompt, system, system_messages.task_type_for(task))


def _rendered(task: seqio.Task, line: Line, path: str) -> tuple[str, str]:
  """(the prompt of one line by the task's template, its system message)."""
  source, task_name = task.source, task.name
  options = source.options
  system, fmt = options.get('system'), options.get('format')
  r = line.record
  if r is None:
    r = {'input': line.text} if fmt == 'sni' else {'instruction': line.text}
  def field(key, required=False):
    value = r.get(key)
    if value is None and not required:
      return ''
    if not isinstance(value, str):
      raise UserError(f"{_where(path, line)}: task {task_name} needs a string field '{key}'.")
    return value
  if 'messages' in r:
    turns = r['messages']
    if (not isinstance(turns, list) or not turns
        or not all(isinstance(t, dict) and isinstance(t.get('content'), str) for t in turns)):
      raise UserError(f"{_where(path, line)}: 'messages' must be a list of "
                      '{role, content} ending with the user\'s turn.')
    if turns[0].get('role') == 'system':
      system = instructions.join_system(system, turns[0]['content'])
      turns = turns[1:]
    roles = [t.get('role') for t in turns]
    if len(turns) % 2 != 1 or roles != ['user', 'assistant'] * (len(turns) // 2) + ['user']:
      raise UserError(f'{_where(path, line)}: messages must alternate user / assistant after '
                      f'an optional system message and end with the user; got {roles}.')
    history = [(turns[i]['content'], turns[i + 1]['content']) for i in range(0, len(turns) - 1, 2)]
    return (instructions.render_prompt(turns[-1]['content'], system=system, history=history),
            system)
  if fmt == 'sni':  # the task file's definition and demonstrations lead
    with open(source.train_files()[0], encoding='utf-8') as f:
      definition = instructions.sni_instruction(
          json.load(f), options.get('num_positive_examples', 2))
    return instructions.render_prompt(definition, field('input', True), system), system
  if fmt == 'alpaca' and 'system' in r:
    system = instructions.join_system(system, field('system'))
  context = field('context') if fmt == 'dolly' and 'context' in r else field('input')
  return instructions.render_prompt(field('instruction', True), context, system), system


def _encode(feature: seqio.Feature, text: str, length: Optional[int],
            keep_end: bool = False) -> np.ndarray:
  """`text`'s ids cut to `length` (EOS included where the feature adds one)."""
  ids = list(feature.vocabulary.encode(text))
  if length:
    room = max(length - int(feature.add_eos), 0)
    ids = (ids[-room:] if room else []) if keep_end else ids[:room]
  if feature.add_eos:
    ids.append(feature.vocabulary.eos_id)
  return np.asarray(ids, np.int32)


def _is_instruction_source(source) -> bool:
  """An instruction (or preference) file source of `t5x_lite.tasks.instructions`
  (known by its KIND: this layer does not import the task registry)."""
  return getattr(source, 'KIND', None) in ('instruction', 'preference')


def takes_system_message(task: seqio.Task) -> bool:
  """Whether a file's lines for `task` get the run's system message."""
  return _is_instruction_source(task.source) or system_messages.puts_system_message(task)


def formats_inputs(task: seqio.Task) -> bool:
  """Whether the task has an input format of its own (else lines are fed as is)."""
  return signature(task.source) is not None or _is_instruction_source(task.source)


# ----------------------------------------------------------------------------
# Examples per line.


def examples(task: seqio.Task, lines: Sequence[Line], lengths: Mapping[str, int], path: str,
             raw: bool = False) -> list[list[dict]]:
  """The task's examples of each line (one, or a grouped task's candidates).

  Each example has the task's token features ('inputs', or 'text_a' / 'text_b'
  and 'label') and 'inputs_pretokenized', the text the model reads.
  """
  how = kind(task)
  features = task.output_features
  if how == 'lm':  # a decoder-only prompt: the line, no EOS
    return [[{'inputs': _encode(dataclasses.replace(features['targets'], add_eos=False),
                                l.text, None),
              'inputs_pretokenized': l.text}] for l in lines]
  if raw or not formats_inputs(task):
    if how == 'text_to_text':
      return [[{'inputs': _encode(features['inputs'], l.text, lengths.get('inputs')),
                'inputs_pretokenized': l.text}] for l in lines]
    out = []
    for l in lines:
      parts = l.text.split('\t', 1) if 'text_b' in features else [l.text]
      if 'text_b' in features and len(parts) == 1:
        raise UserError(f'{_where(path, l)}: task {task.name} classifies pairs; with '
                        '--raw_inputs write text A, a TAB, then text B.')
      ex = {k: _encode(features[k], p, None) for k, p in zip(('text_a', 'text_b'), parts)}
      out.append([dict(ex, label=np.int64(-1), inputs_pretokenized=' | '.join(parts))])
    return out
  if _is_instruction_source(task.source):
    out = []
    for l in lines:
      prompt = _instruction_prompt(task, l, path)
      out.append([{'inputs': _encode(features['inputs'], prompt, lengths.get('inputs'),
                                     keep_end=True),
                   'inputs_pretokenized': prompt}])
    return out
  rows = [_row(task, l, path) for l in lines]
  found = _row_examples(task, rows, lengths)
  if len(found) == len(rows):
    grouped = [[ex] for ex in found]
  else:  # several examples per row (COPA, ReCoRD candidates): row by row
    grouped = [_row_examples(task, [row], lengths) for row in rows]
  for group in grouped:
    for ex in group:
      if 'inputs_pretokenized' not in ex:
        ex['inputs_pretokenized'] = ' | '.join(
            text(ex[k]) for k in ('text_a_pretokenized', 'text_b_pretokenized') if k in ex)
  return grouped


def response_examples(task: seqio.Task, lines: Sequence[Line], lengths: Mapping[str, int],
                      path: str, raw: bool = False) -> list[list[dict]]:
  """A reward model's examples of each line: {"prompt", "response"} (a .jsonl
  line) or prompt TAB response (a plain line) -> 'inputs' (the prompt as the
  task renders its prompts, unless `raw`; the end kept) and 'targets' (the
  response, cut as the task cuts its responses)."""
  features = task.output_features
  response_feature = features.get('targets', features.get('chosen'))  # a pair task's
  source = task.source
  options = source.options if _is_instruction_source(source) else {}
  out = []
  for l in lines:
    if l.record is None:
      parts = l.text.split('\t', 1)
      if len(parts) != 2:
        raise UserError(f'{_where(path, l)}: a reward model scores a prompt and a response; '
                        'write prompt TAB response, or a .jsonl of {"prompt", "response"}.')
    else:
      parts = [l.record.get(k) for k in ('prompt', 'response')]
      if not all(isinstance(p, str) for p in parts):
        raise UserError(f'{_where(path, l)}: a reward model reads string fields "prompt" and '
                        f'"response"; the line has {sorted(l.record)}.')
    prompt, response = parts
    if not raw and options and options.get('format') != 'hh':  # hh: the dialogue as it is
      prompt = instructions.render_prompt(prompt, system=options.get('system'))
    out.append([{'inputs': _encode(features['inputs'], prompt, lengths.get('inputs'),
                                   keep_end=True),
                 'targets': _encode(response_feature, response, lengths.get('targets')),
                 'inputs_pretokenized': prompt, 'targets_pretokenized': response}])
  return out


def text(x: Any) -> str:
  """A string feature's value as str."""
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def label_word(task: seqio.Task, group: Sequence[dict], outputs: Sequence[tuple]) -> tuple:
  """(output, score) of a classifier for one line: the class's label word (a
  regression's value), or for candidates the best one by its class-1 score."""
  source = task.source
  classes = None
  if isinstance(source, glue_sources.GlueSource):
    classes = glue_sources.label_classes(source.benchmark, source.config)
  if len(group) > 1:
    best = int(np.argmax([s for _, s in outputs]))
    ex = group[best]
    if 'entity' in ex:
      return text(ex['entity']), outputs[best][1]
    return (classes[best] if classes and best < len(classes) else best), outputs[best][1]
  label, score = outputs[0]
  if classes and isinstance(label, int) and 0 <= label < len(classes):
    return classes[label], score
  return label, score
