"""Preference pairs from local files: (prompt, chosen, rejected) texts.

Every reader yields dicts {'prompt', 'chosen', 'rejected'}: the text the model
is conditioned on and the two responses, the preferred one first.

Formats (`FORMATS`):

  pairs     a JSON list or JSONL of {prompt, chosen, rejected} strings (the
            common keys of TRL, UltraFeedback-binarized exports, ...). The
            prompt is rendered with the instruction template
            (`instructions.render_prompt`), as instruction tuning sees it.
  hh        Anthropic HH-RLHF: JSONL of {chosen, rejected}, each the whole
            dialogue ("\\n\\nHuman: ... \\n\\nAssistant: ..."). The prompt is
            their shared beginning up to and including its last
            "\\n\\nAssistant:"; the rest of each text is its response.
  sharegpt  LLaMA-Factory's preference files: {conversations: [{from, value},
            ...], chosen: {from, value}, rejected: {from, value}}, roles
            system / human / gpt; the conversation is the prompt (earlier
            turns as history, see `instructions.render_prompt`).

An optional system instruction (Orca-style) is put before `pairs` and
`sharegpt` prompts. A `pairs` record may carry a number 'margin' (how
clearly the chosen response wins, e.g. Llama 2's rating gap), which a reward
model's loss subtracts; then every record of the files must have one. A
record that is not what its format needs raises `UserError` naming the file
and line; a pair whose responses are equal is one too (it carries no
preference).
"""

import os
from typing import Any, Iterator, List, Optional

from t5x_lite.data import instructions
from t5x_lite.errors import UserError

FORMATS = ('pairs', 'hh', 'sharegpt')
HH_ASSISTANT = '\n\nAssistant:'


def _pair(prompt: str, chosen: str, rejected: str, path: str, lineno: int) -> dict:
  if chosen.strip() == rejected.strip():
    raise UserError(f'{path}:{lineno}: the chosen and rejected responses are the same; '
                    'remove the pair (it carries no preference).')
  return {'prompt': prompt, 'chosen': chosen, 'rejected': rejected}


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen response, rejected response) of two HH-RLHF dialogues."""
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(HH_ASSISTANT)
  end = cut + len(HH_ASSISTANT) if cut >= 0 else 0
  return chosen[:end], chosen[end:], rejected[end:]


def read_pairs(path: str, system: Optional[str] = None) -> Iterator[dict]:
  for lineno, r in instructions._json_records(path):  # pylint: disable=protected-access
    field = lambda k: instructions._field(r, k, path, lineno)  # pylint: disable=protected-access,cell-var-from-loop
    pair = _pair(instructions.render_prompt(field('prompt'), system=system),
                 field('chosen'), field('rejected'), path, lineno)
    if 'margin' in r:
      margin = r['margin']
      if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise UserError(f"{path}:{lineno}: field 'margin' must be a number, got "
                        f'{type(margin).__name__}.')
      pair['margin'] = float(margin)
      pair['where'] = f'{path}:{lineno}'
    yield pair


def read_hh(path: str, system: Optional[str] = None) -> Iterator[dict]:
  del system  # the dialogue is the prompt as it is
  for lineno, r in instructions._json_records(path):  # pylint: disable=protected-access
    field = lambda k: instructions._field(r, k, path, lineno)  # pylint: disable=protected-access,cell-var-from-loop
    prompt, chosen, rejected = split_hh(field('chosen'), field('rejected'))
    if not prompt:
      raise UserError(f"{path}:{lineno}: the two dialogues share no '\\n\\nAssistant:' turn; "
                      "use format='hh' only for HH-RLHF style files.")
    yield _pair(prompt, chosen, rejected, path, lineno)


def _turn(message: Any, path: str, lineno: int) -> tuple[str, str]:
  role = instructions._field(message, 'from', path, lineno)  # pylint: disable=protected-access
  return role, instructions._field(message, 'value', path, lineno)  # pylint: disable=protected-access


def read_sharegpt(path: str, system: Optional[str] = None) -> Iterator[dict]:
  for lineno, r in instructions._json_records(path):  # pylint: disable=protected-access
    conversation = r.get('conversations') if isinstance(r, dict) else None
    if not isinstance(conversation, list) or not conversation:
      raise UserError(f"{path}:{lineno}: a sharegpt record needs a non-empty 'conversations' "
                      'list of {from, value}; fix the record.')
    turns = [_turn(m, path, lineno) for m in conversation]
    sys_text = system
    if turns[0][0] == 'system':
      own = turns.pop(0)[1]
      sys_text = f'{system.strip()}\n\n{own}' if system else own
    roles = [t[0] for t in turns]
    if len(turns) % 2 != 1 or roles != (['human', 'gpt'] * len(turns))[:len(turns)]:
      raise UserError(f'{path}:{lineno}: conversations must alternate human / gpt and end '
                      f'with the human turn the responses answer; got {roles}.')
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    prompt = instructions.render_prompt(turns[-1][1], system=sys_text, history=history)
    responses = []
    for key in ('chosen', 'rejected'):
      role, text = _turn(r.get(key), path, lineno)
      if role != 'gpt':
        raise UserError(f"{path}:{lineno}: the '{key}' response must be from 'gpt', got "
                        f'{role!r}; fix the record.')
      responses.append(text)
    yield _pair(prompt, *responses, path, lineno)


_READERS = {'pairs': read_pairs, 'hh': read_hh, 'sharegpt': read_sharegpt}


def read_pairs_files(paths: instructions.Paths, format: str,  # pylint: disable=redefined-builtin
                     system: Optional[str] = None) -> List[dict]:
  """All pairs of the files `paths` in `format` (see FORMATS), in order."""
  if format not in _READERS:
    raise UserError(f'Unknown preference format {format!r}; use one of {", ".join(FORMATS)}.')
  out = []
  for path in instructions.resolve_paths(paths):
    out.extend(_READERS[format](path, system=system))
  with_margin = [p.pop('where') for p in out if 'where' in p]
  if with_margin and len(with_margin) < len(out):
    raise UserError(f"{with_margin[0]} has a 'margin' but {len(out) - len(with_margin)} pairs "
                    'have none; give every pair a margin, or none.')
  return out
