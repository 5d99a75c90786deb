"""INPUT_FILE of `python -m t5x_lite.infer`: a task's model inputs from a file
alone, formatted as the task formats its own rows, without its dataset.

The file:

  *.jsonl      one JSON object per line with the fields of the task's rows
               (GLUE / SuperGLUE: TFDS's names, e.g. {"sentence1": ...,
               "sentence2": ...} for RTE, {"premise": ..., "hypothesis": ...}
               for MNLI; instruction tasks: {"instruction", "input"}, dolly's
               {"instruction", "context"} or chat's {"messages": [...]} ending
               with the user's turn). A line that is not such an object is
               one error naming the file and line.
  other names  one input text per line: the one text field of a
               single-sentence task (SST-2, CoLA), the instruction of an
               instruction task, the prompt of a language model.

Empty lines are skipped. What each line becomes, by the task's source:

  GLUE / SuperGLUE rows  the row runs through the task's own preprocessors
                         (T5's 'sst2 sentence: ...', the `_cls` twins' text_a /
                         text_b, the Flan-style templates); 'label' is -1 and
                         'idx' 0 unless the line gives them ('idx' picks an
                         instruction template).
  instruction files      the shared prompt template with the task's system
                         prompt (`t5x_lite.data.instructions.render_prompt`;
                         SNI tasks put their task file's definition first),
                         tokenized and cut as the task does (the end kept).
  anything else          (corpora: span corruption, LM, denoising) the line is
                         the model input as is.

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
from t5x_lite.errors import UserError


@dataclasses.dataclass(frozen=True)
class Line:
  """One input of the file: its line number, its text, its JSON object (JSONL)."""
  lineno: int
  text: str
  record: Optional[dict] = None

  def show(self) -> Any:
    """The line as the output's 'inputs' shows it."""
    return self.record if self.record is not None else self.text


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
  """'encoder_decoder' (inputs -> targets), 'lm' (targets only) or 'classification'."""
  features = task.output_features
  if 'inputs' in features and 'targets' in features:
    return 'encoder_decoder'
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


def _glue_row(source, line: Line, path: str, task_name: str) -> dict:
  """The TFDS-shaped row of a GLUE / SuperGLUE source for one line."""
  signature = glue_sources.output_signature(source.benchmark, source.config)
  texts = [k for k, s in signature.items()
           if not isinstance(s, dict) and s.dtype == tf.string and s.shape.rank == 0]
  record = line.record
  if record is None:
    if len(texts) != 1:
      raise UserError(f'{_where(path, line)}: task {task_name} reads the fields '
                      f"{', '.join(texts)}; give INPUT_FILE as a .jsonl file with one object "
                      'of those fields per line, or --raw_inputs.')
    record = {texts[0]: line.text}
  unknown = sorted(set(record) - set(signature))
  if unknown:
    raise UserError(f"{_where(path, line)}: unknown field '{unknown[0]}' for task {task_name}; "
                    f"it reads {', '.join(sorted(signature))}.")
  row = {}
  for key, spec in signature.items():
    value = record.get(key)
    if isinstance(spec, dict):  # a row id of several parts: zeros unless given
      value = value if isinstance(value, dict) else {}
      row[key] = {k: np.int32(value.get(k, 0)) for k in spec}
    elif key == 'label':
      row[key] = np.asarray(-1 if value is None else value, spec.dtype.as_numpy_dtype)
    elif key == 'idx':
      row[key] = np.int32(value or 0)
    elif spec.dtype == tf.string:
      if spec.shape.rank:  # ReCoRD's entities / answers
        if value is None and key == 'answers':
          value = []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
          raise UserError(f"{_where(path, line)}: field '{key}' must be a list of strings "
                          f'for task {task_name}.')
        row[key] = np.asarray(value, dtype=object).astype(bytes).reshape([-1])
      else:
        if not isinstance(value, str):
          raise UserError(f"{_where(path, line)}: task {task_name} needs a string field "
                          f"'{key}' (it reads {', '.join(texts)}).")
        row[key] = value
    else:
      if not isinstance(value, int):
        raise UserError(f"{_where(path, line)}: task {task_name} needs an integer field '{key}'.")
      row[key] = np.asarray(value, spec.dtype.as_numpy_dtype)
  return row


def _glue_examples(task: seqio.Task, rows: Sequence[dict],
                   lengths: Mapping[str, int]) -> list[dict]:
  """The task's examples of `rows` (its preprocessors, as its `get_dataset`)."""
  signature = glue_sources.output_signature(task.source.benchmark, task.source.config)
  ds = tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=signature)
  ds = task.preprocess_precache(ds, seed=0)
  ds = task.preprocess_postcache(ds, sequence_length=dict(lengths), seed=0)
  return list(ds.as_numpy_iterator())


def _instruction_prompt(source, line: Line, path: str, task_name: str) -> str:
  """The rendered prompt of an instruction task for one line."""
  options = getattr(source, '_options', {})
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
      own = turns[0]['content']
      system = f'{system.strip()}\n\n{own}' if system else own
      turns = turns[1:]
    roles = [t.get('role') for t in turns]
    if len(turns) % 2 != 1 or roles != ['user', 'assistant'] * (len(turns) // 2) + ['user']:
      raise UserError(f'{_where(path, line)}: messages must alternate user / assistant after '
                      f'an optional system message and end with the user; got {roles}.')
    history = [(turns[i]['content'], turns[i + 1]['content']) for i in range(0, len(turns) - 1, 2)]
    return instructions.render_prompt(turns[-1]['content'], system=system, history=history)
  if fmt == 'sni':  # the task file's definition and demonstrations lead
    paths = getattr(source, '_paths')
    files = source._files(paths)  # pylint: disable=protected-access
    with open(files[0], encoding='utf-8') as f:
      definition = instructions.sni_instruction(
          json.load(f), options.get('num_positive_examples', 2))
    return instructions.render_prompt(definition, field('input', True), system)
  context = field('context') if fmt == 'dolly' and 'context' in r else field('input')
  return instructions.render_prompt(field('instruction', True), context, system)


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
  from t5x_lite.tasks import instructions as instruction_tasks  # pylint: disable=g-import-not-at-top
  return isinstance(source, instruction_tasks.InstructionSource)


def formats_inputs(task: seqio.Task) -> bool:
  """Whether the task has an input format of its own (else lines are fed as is)."""
  return isinstance(task.source, glue_sources.GlueSource) or _is_instruction_source(task.source)


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
    if how == 'encoder_decoder':
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
      prompt = _instruction_prompt(task.source, l, path, task.name)
      out.append([{'inputs': _encode(features['inputs'], prompt, lengths.get('inputs'),
                                     keep_end=True),
                   'inputs_pretokenized': prompt}])
    return out
  rows = [_glue_row(task.source, l, path, task.name) for l in lines]
  found = _glue_examples(task, rows, lengths)
  if len(found) == len(rows):
    grouped = [[ex] for ex in found]
  else:  # several examples per row (COPA, ReCoRD candidates): row by row
    grouped = [_glue_examples(task, [row], lengths) for row in rows]
  for group in grouped:
    for ex in group:
      if 'inputs_pretokenized' not in ex:
        ex['inputs_pretokenized'] = ' | '.join(
            text(ex[k]) for k in ('text_a_pretokenized', 'text_b_pretokenized') if k in ex)
  return grouped


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
