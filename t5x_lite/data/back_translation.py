"""Instruction back-translation's data: unlabelled text as segments, the
backward and rating prompts, and the parses of what the models write.

Li et al., "Self-Alignment with Instruction Backtranslation" (ICLR 2024,
arXiv:2308.06259). The backward model reads a segment as the input of
BACKWARD_INSTRUCTION and writes an instruction, with an '### Input:' block if
it has one (`instruction_block`, the target of `t5x_lite.tasks.back_translation`'s
backward tasks); the curation model rates the pair with the paper's prompt
(RATING_PROMPT, its Table 19), and `parse_rating` reads the 5-point score. The
pipeline and its entry point are `t5x_lite.back_translate`.
"""

import collections
import glob
import json
import os
import re
from typing import Iterator, Optional, Sequence

from t5x_lite.data import instructions
from t5x_lite.errors import UserError

# What the backward model is asked; the segment goes in the input block. The
# paper fine-tunes on (output, instruction) pairs without publishing a
# template; this wording is ours.
BACKWARD_INSTRUCTION = 'Write the instruction that the following text is a response to.'
INPUT_MARK = '### Input:'

# The paper's self-curation prompt (Table 19), followed by the candidate pair.
RATING_PROMPT = (
    "Below is an instruction from an user and a candidate answer. Evaluate whether or not "
    "the answer is a good example of how AI Assistant should respond to the user's "
    'instruction. Please assign a score using the following 5-point scale:\n'
    '1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly '
    'what the user asked for. For example, some content seems missing, numbered list does '
    "not start from the beginning, the opening sentence repeats user's question. Or the "
    "response is from another person's perspective with their personal experience (e.g. "
    'taken from blog posts), or looks like an answer from a forum. Or it contains '
    'promotional text, navigation text, or other irrelevant information.\n'
    '2: It means the answer addresses most of the asks from the user. It does not directly '
    "address the user's question. For example, it only provides a high-level methodology "
    "instead of the exact solution to user's question.\n"
    '3: It means the answer is helpful but not written by an AI Assistant. It addresses all '
    'the basic asks from the user. It is complete and self contained with the drawback that '
    "the response is not written from an AI assistant's perspective, but from other "
    "people's perspective. The content looks like an excerpt from a blog post, web page, "
    'or web search results. For example, it contains personal experience or opinion, '
    'mentions comments section, or share on social media, etc.\n'
    "4: It means the answer is written from an AI assistant's perspective with a clear "
    'focus of addressing the instruction. It provide a complete, clear, and comprehensive '
    "response to user's question or instruction without missing or irrelevant information. "
    'It is well organized, self-contained, and written in a helpful tone. It has minor room '
    'for improvement, e.g. more concise and focused.\n'
    '5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being '
    'a helpful AI Assistant, where the response looks like intentionally written to address '
    "the user's question or instruction without any irrelevant sentences. The answer "
    'provides high quality content, demonstrating expert knowledge in the area, is very '
    'well written, logical, easy-to-follow, engaging and insightful.\n'
    'Please first provide a brief reasoning you used to derive the rating score, and then '
    'write "Score: <rating>" in the last line.')
# The paper keeps pairs rated at least this on its 5-point scale.
SCORE_THRESHOLD = 4.5
SEGMENT_REASONS = ('too_short', 'too_long', 'duplicate')

TEXT_DIR_ENV = 'T5X_LITE_TEXT_DIR'
# Named unlabelled text in the shared samples: (file under text_dir(), format).
SHARED_TEXT = {'c4': ('c4/c4_en_train_first1000.jsonl', 'jsonl'),
               'wikitext': ('wikitext-2/valid.txt', 'wikitext')}
TEXT_FORMATS = ('jsonl', 'text', 'wikitext')
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def text_dir() -> str:
  """Where the named shared text samples are read from."""
  return os.environ.get(TEXT_DIR_ENV) or os.path.normpath(
      os.path.join(_REPO, '..', 'shared', 'data', 'text'))


# ---- unlabelled text -> segments ----

def resolve_text(text, text_format: Optional[str] = None) -> tuple[list[str], str]:
  """(files, format) of TEXT: 'c4', 'wikitext', or a path / glob / list of them.

  The format of a path is `text_format`, else 'jsonl' for .jsonl / .json
  files and 'text' (one document per line) for others.
  """
  if isinstance(text, str) and text in SHARED_TEXT:
    rel, fmt = SHARED_TEXT[text]
    path = os.path.join(text_dir(), rel)
    if not os.path.isfile(path):
      raise UserError(f"TEXT '{text}' reads {path}, which is missing; set {TEXT_DIR_ENV} to "
                      'the shared text directory or point --gin.TEXT at your own file.')
    return [path], text_format or fmt
  patterns = [text] if isinstance(text, str) else list(text or ())
  files = []
  for pattern in patterns:
    found = sorted(glob.glob(os.path.expanduser(pattern)))
    if not found:
      raise UserError(f"No text file matches TEXT {pattern!r}; give 'c4', 'wikitext' or "
                      'a path / glob of .txt or .jsonl files.')
    files.extend(found)
  if not files:
    raise UserError("TEXT is empty; give 'c4', 'wikitext' or a path.")
  fmt = text_format or ('jsonl' if files[0].endswith(('.jsonl', '.json')) else 'text')
  if fmt not in TEXT_FORMATS:
    raise UserError(f'TEXT_FORMAT {fmt!r} is unknown; use one of {", ".join(TEXT_FORMATS)}.')
  return files, fmt


def detokenize_wikitext(line: str) -> str:
  """WikiText's tokenized text (' @-@ ', ' , ', '( x )') as plain text."""
  line = re.sub(r' @(.)@ ', r'\1', line.strip())
  line = re.sub(r' ([.,;:!?)\]}]|\'s\b|n\'t\b)', r'\1', line)
  return re.sub(r'([(\[{]) ', r'\1', line)


def read_documents(files: Sequence[str], text_format: str,
                   text_key: str = 'text') -> Iterator[list[str]]:
  """Documents as lists of paragraphs: a JSONL object's `text_key` split at
  newlines, a text file's line, a WikiText article's paragraphs (headings
  start a new document)."""
  for path in files:
    with open(path, encoding='utf-8') as f:
      if text_format == 'jsonl':
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            doc = json.loads(line)[text_key]
            if not isinstance(doc, str):
              raise TypeError(type(doc).__name__)
          except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: no string field '{text_key}' ({e!r}); set "
                            '--gin.TEXT_KEY or fix the line.') from None
          yield [p.strip() for p in doc.split('\n') if p.strip()]
      elif text_format == 'text':
        for line in f:
          if line.strip():
            yield [line.strip()]
      else:
        paragraphs = []
        for line in f:
          if re.fullmatch(r'\s*=.*=\s*', line):
            if paragraphs:
              yield paragraphs
            paragraphs = []
          elif line.strip():
            paragraphs.append(detokenize_wikitext(line))
        if paragraphs:
          yield paragraphs


def split_segments(paragraphs: Sequence[str], max_chars: int) -> list[str]:
  """Consecutive paragraphs joined by newlines, each piece at most
  `max_chars` where it can be: a longer paragraph is cut at sentence ends,
  a longer sentence is a piece of its own (and too long)."""
  pieces = []  # (text, what joins it to the piece before)
  for p in paragraphs:
    sentences = [p] if len(p) <= max_chars else re.split(r'(?<=[.!?])\s+', p)
    pieces += [(s, '\n' if i == 0 else ' ') for i, s in enumerate(sentences)]
  segments, current = [], ''
  for text, joiner in pieces:
    if current and len(current) + len(joiner) + len(text) <= max_chars:
      current += joiner + text
    else:
      if current:
        segments.append(current)
      current = text
  if current:
    segments.append(current)
  return segments


def read_segments(files: Sequence[str], text_format: str, *, num_segments: int,
                  min_chars: int, max_chars: int, text_key: str = 'text'
                  ) -> tuple[list[str], dict]:
  """The first `num_segments` segments (in file order) of `min_chars` to
  `max_chars` characters, not seen before; and their counts."""
  stats = {'documents': 0, 'read': 0, 'used': 0,
           'filtered': collections.OrderedDict((k, 0) for k in SEGMENT_REASONS)}
  segments, seen = [], set()
  for doc in read_documents(files, text_format, text_key):
    stats['documents'] += 1
    for segment in split_segments(doc, max_chars):
      stats['read'] += 1
      reason = ('too_short' if len(segment) < min_chars else
                'too_long' if len(segment) > max_chars else
                'duplicate' if segment in seen else None)
      if reason:
        stats['filtered'][reason] += 1
        continue
      seen.add(segment)
      segments.append(segment)
      if len(segments) == num_segments:
        stats['used'] = len(segments)
        return segments, stats
  stats['used'] = len(segments)
  return segments, stats


# ---- prompts and parsing ----

def backward_prompt(segment: str) -> str:
  """The backward model's prompt: the segment as the input of BACKWARD_INSTRUCTION."""
  return instructions.render_prompt(BACKWARD_INSTRUCTION, segment)


def instruction_block(instruction: str, input_text: str = '') -> str:
  """The backward model's target: the instruction, then its input block if any
  (as `render_prompt` writes them)."""
  block = instruction.strip()
  if input_text and input_text.strip():
    block += f'\n\n{INPUT_MARK}\n{input_text.strip()}'
  return block


def parse_instruction_block(text: str) -> tuple[str, str]:
  """(instruction, input) of a backward model's continuation; text from a
  '### Response:' or '### Instruction:' header on is not part of it."""
  text = re.split(r'###\s*(?:Response|Instruction)\s*:', text)[0]
  instruction, _, input_text = text.partition(INPUT_MARK)
  return instruction.strip(), input_text.strip()


def rating_prompt(instruction: str, input_text: str, output: str) -> str:
  """RATING_PROMPT as an instruction whose input block is the candidate pair
  ('Instruction:', 'Input:' if it has one, 'Answer:')."""
  pair = f'Instruction: {instruction.strip()}'
  if input_text and input_text.strip():
    pair += f'\nInput: {input_text.strip()}'
  pair += f'\n\nAnswer: {output.strip()}'
  return instructions.render_prompt(RATING_PROMPT, pair)


_NUMBER = r'(\d+(?:\.\d+)?|one|two|three|four|five)\b'
_WORDS = {'one': 1.0, 'two': 2.0, 'three': 3.0, 'four': 4.0, 'five': 5.0}
# In order of preference; the last match of the first pattern that matches counts.
_RATING_PATTERNS = (
    re.compile(r'\bscore\s*(?:is|of|=|:)?\s*[*"\'(\[]*\s*' + _NUMBER, re.I),  # Score: 4
    re.compile(r'\b(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*(?:5|five)\b', re.I),  # 4/5, 5 out of 5
    re.compile(r'\brat(?:e|ed|ing)\b[^\d\n.]{0,30}?' + _NUMBER, re.I),  # I would rate it a 4
)


def parse_rating(text: str) -> Optional[float]:
  """The 1-5 score in a rating continuation, or None if it has none.

  'Score: <n>' (the prompt's last line) wins, its last occurrence; else
  'n/5' or 'n out of 5'; else a number after 'rate' / 'rating'. A number
  outside 1..5 is no score.
  """
  for pattern in _RATING_PATTERNS:
    found = pattern.findall(text or '')
    if found:
      value = found[-1].lower()
      score = _WORDS[value] if value in _WORDS else float(value)
      return score if 1.0 <= score <= 5.0 else None
  return None


def score_key(score: float) -> str:
  """A score as a key of the distribution: '4', '4.5'."""
  return f'{score:g}'
