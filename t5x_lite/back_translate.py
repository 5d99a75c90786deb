"""Instruction back-translation (Humpback): instruction data from unlabelled text.

Li et al., "Self-Alignment with Instruction Backtranslation" (ICLR 2024,
arXiv:2308.06259), with our checkpoints:

1. A backward model, trained on seed (instruction, output) pairs with the
   fields swapped (`t5x_lite.tasks.back_translation`, e.g.
   'alpaca_demo_backward_gpt'), learns p(instruction | output).
2. Self-augmentation: it writes an instruction for each unlabelled text
   segment (the shared C4 sample, WikiText, or the user's text / JSONL),
   giving candidate (instruction, segment) pairs.
3. Self-curation: a model trained on the seed data rates each pair with the
   paper's 5-point prompt (its Table 19); pairs scoring at least THRESHOLD are
   kept.
4. Iteration: seed + kept pairs train the next model, which re-rates the same
   candidates (CANDIDATES = the previous run's candidates file).

    python -m t5x_lite.back_translate --gin_file=gin/gpt_tiny_back_translate.gin \
        --gin.BACKWARD_CHECKPOINT_PATH="'runs/humpback_backward/checkpoints/300'" \
        --gin.CURATION_CHECKPOINT_PATH="'runs/humpback_m0/checkpoints/300'"

Writes OUTPUT_DIR/back_translation.jsonl (kept pairs as Alpaca rows:
instruction, input, output), OUTPUT_DIR/back_translation_candidates.jsonl
(every candidate with its rating text and parsed score),
OUTPUT_DIR/back_translation_stats.json (counts per stage, the score
distribution, generation time and tokens/s) and
OUTPUT_DIR/back_translation_log.jsonl (what the models wrote, batch by batch:
the same command run again resumes from it). Segments, prompts and the parses
of what the models write are `t5x_lite.data.back_translation`'s.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import collections
import json
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

import gin

from t5x_lite import generation
from t5x_lite import gin_utils
from t5x_lite.data import back_translation as data
from t5x_lite.errors import UserError

GenerateFn = generation.GenerateFn
SCORE_THRESHOLD = data.SCORE_THRESHOLD

# ---- the pipeline ----

class Metered:
  """A GenerateFn that adds up what it generated: prompts, tokens and seconds.

  With `usage` (a `generation.ModelGenerator`'s), tokens, generation seconds,
  compile seconds and prompts cut to fit come from the model generator's own
  counts; otherwise tokens are the continuations encoded with `count_tokens`
  and seconds the wall time of the calls.
  """

  _USAGE = ('tokens', 'seconds', 'compile_seconds', 'truncated_prompts')

  def __init__(self, generate: GenerateFn, count_tokens: Callable[[str], int],
               usage: Optional[Callable[[], dict]] = None):
    self.generate, self.count_tokens, self.usage = generate, count_tokens, usage
    self.totals = dict.fromkeys(('prompts', 'wall_seconds') + self._USAGE, 0)

  def __call__(self, prompts: Sequence[str]) -> list[str]:
    before = self.usage() if self.usage else None
    start = time.time()
    out = list(self.generate(list(prompts)))
    wall = time.time() - start
    if len(out) != len(prompts):
      raise ValueError(f'the generator gave {len(out)} continuations for {len(prompts)} prompts')
    t = self.totals
    t['prompts'] += len(prompts)
    t['wall_seconds'] += wall
    if before is None:
      t['tokens'] += sum(self.count_tokens(text) for text in out)
      t['seconds'] += wall
    else:
      after = self.usage()
      for k in self._USAGE:
        t[k] += after[k] - before[k]
    return out

  def stats(self) -> dict:
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.totals.items()}
    out['tokens_per_second'] = (round(self.totals['tokens'] / self.totals['seconds'], 1)
                                if self.totals['seconds'] else None)
    return out


def augment(segments: Sequence[str], generate: GenerateFn) -> tuple[list[dict], dict]:
  """Self-augmentation: an instruction for each segment.

  Returns (candidates [{instruction, input, output, generation}], counts); a
  continuation whose instruction has no letter is counted as 'empty' and
  dropped.
  """
  texts = generate([data.backward_prompt(s) for s in segments]) if segments else []
  candidates, empty = [], 0
  for segment, text in zip(segments, texts):
    instruction, input_text = data.parse_instruction_block(text)
    if not re.search(r'[^\W\d_]', instruction):
      empty += 1
      continue
    candidates.append({'instruction': instruction, 'input': input_text, 'output': segment,
                       'generation': text})
  return candidates, {'generated': len(texts), 'empty': empty,
                      'candidates': len(candidates)}


def curate(candidates: Sequence[dict], rate: GenerateFn,
           threshold: float = SCORE_THRESHOLD) -> tuple[list[dict], list[dict], dict]:
  """Self-curation: rates each candidate; keeps those scoring >= threshold.

  Returns (Alpaca rows of the kept pairs, the candidates with 'rating' (the
  text), 'score' (its parse, None if unparseable) and 'kept', counts).
  """
  ratings = rate([data.rating_prompt(c['instruction'], c['input'], c['output'])
                  for c in candidates]) if candidates else []
  scores = collections.Counter()
  rated, rows, unparseable = [], [], 0
  for cand, text in zip(candidates, ratings):
    score = data.parse_rating(text)
    kept = score is not None and score >= threshold
    if score is None:
      unparseable += 1
    else:
      scores[score] += 1
    rated.append({**cand, 'rating': text, 'score': score, 'kept': kept})
    if kept:
      rows.append({k: cand[k] for k in ('instruction', 'input', 'output')})
  stats = {'rated': len(ratings), 'parsed': len(ratings) - unparseable,
           'unparseable': unparseable,
           'scores': {data.score_key(s): scores[s] for s in sorted(scores)},
           'threshold': threshold, 'kept': len(rows)}
  return rows, rated, stats


def read_candidates(path: str) -> list[dict]:
  """The candidates of an earlier run (its back_translation_candidates.jsonl)."""
  if not os.path.isfile(path):
    raise UserError(f'CANDIDATES {path} does not exist; give an earlier run\'s '
                    'back_translation_candidates.jsonl, or None to generate candidates.')
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        out.append({'instruction': str(row['instruction']), 'input': str(row.get('input', '')),
                    'output': str(row['output']), 'generation': row.get('generation', '')})
      except (ValueError, KeyError, TypeError) as e:
        raise UserError(f'{path}:{n} is not a candidate row ({e!r}); each line needs '
                        'instruction and output.') from None
  return out


# ---- the entry point ----

@gin.configurable
def back_translate(*,
                   model: Any,
                   backward_checkpoint_path: Optional[str],
                   curation_checkpoint_path: Optional[str],
                   output_dir: str,
                   text: Any = 'c4',
                   text_format: Optional[str] = None,
                   text_key: str = 'text',
                   num_segments: int = 64,
                   min_segment_chars: int = 200,
                   max_segment_chars: int = 2000,
                   candidates_path: Optional[str] = None,
                   threshold: float = SCORE_THRESHOLD,
                   batch_size: int = 8,
                   prompt_length: int = 384,
                   max_decode_length: int = 64,
                   rating_decode_length: int = 64,
                   temperature: float = 0.7,
                   top_p: float = 0.9,
                   top_k: int = 0,
                   seed: int = 0,
                   vocabulary: Any = None,
                   resume: bool = True,
                   generate: Optional[GenerateFn] = None,
                   rate: Optional[GenerateFn] = None) -> dict:
  """Runs self-augmentation and self-curation; writes the JSONL files and stats.

  The backward model (at `backward_checkpoint_path`) samples an instruction
  for each segment of `text`; the curation model (at
  `curation_checkpoint_path`, same architecture `model`) rates each pair
  greedily. With `candidates_path` (an earlier run's candidates file) only the
  curation runs: the paper's next iteration re-rates the same candidates with
  the model trained on the curated data. Generated instructions and ratings
  go to OUTPUT_DIR/back_translation_log.jsonl as each batch finishes, so the
  same command run again after an interruption generates only the rest
  (`resume` False starts over); THRESHOLD is applied afterwards, so a rerun
  with another threshold generates nothing. `generate` / `rate` (prompts ->
  continuations) replace the models when given. Returns the stats.
  """
  if not 1.0 <= threshold <= 5.0:
    raise UserError(f'THRESHOLD {threshold} is off the 5-point scale; give 1 to 5 '
                    f'(the paper: {SCORE_THRESHOLD}).')
  if min(num_segments, min_segment_chars, max_segment_chars) <= 0 or (
      min_segment_chars > max_segment_chars):
    raise UserError(f'NUM_SEGMENTS ({num_segments}), MIN_SEGMENT_CHARS ({min_segment_chars}) '
                    f'and MAX_SEGMENT_CHARS ({max_segment_chars}) must be positive, min <= max.')
  if (generate is None or rate is None) and not model.DECODER_ONLY:
    raise UserError(f'back_translate generates with decoder-only models (GPT, Llama); '
                    f'{type(model).__name__} is not one. Include a decoder model gin.')
  longest = prompt_length + max(max_decode_length, rating_decode_length) - 1
  if model.max_length and longest > model.max_length:
    raise UserError(f'PROMPT_LENGTH {prompt_length} + the longer of MAX_DECODE_LENGTH '
                    f'{max_decode_length} and RATING_DECODE_LENGTH {rating_decode_length} '
                    f'exceeds the model max_positions={model.max_length}; lower one.')
  start = time.time()
  if vocabulary is None:
    from t5x_lite.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
    vocabulary = vocab_lib.embedded_bpe_vocabulary()
  generators = {}

  def generator(checkpoint_path):  # one per checkpoint: the same one loads once
    if checkpoint_path not in generators:
      generators[checkpoint_path] = generation.model_generator(
          model, checkpoint_path, vocabulary=vocabulary, batch_size=batch_size,
          prompt_length=prompt_length, max_decode_length=max_decode_length, seed=seed,
          temperature=temperature, top_p=top_p, top_k=top_k)
    return generators[checkpoint_path]

  count_tokens = lambda s: len(vocabulary.encode(s))
  backward_usage = rating_usage = None
  stats = collections.OrderedDict()
  os.makedirs(output_dir, exist_ok=True)
  paths = {name: os.path.join(output_dir, f'back_translation{suffix}') for name, suffix in (
      ('data', '.jsonl'), ('candidates', '_candidates.jsonl'), ('log', '_log.jsonl'),
      ('stats', '_stats.json'))}
  settings = dict(text=text, text_format=text_format, text_key=text_key,
                  num_segments=num_segments, min_segment_chars=min_segment_chars,
                  max_segment_chars=max_segment_chars, candidates=candidates_path,
                  backward_checkpoint_path=backward_checkpoint_path,
                  curation_checkpoint_path=curation_checkpoint_path, batch_size=batch_size,
                  prompt_length=prompt_length, max_decode_length=max_decode_length,
                  rating_decode_length=rating_decode_length, temperature=temperature,
                  top_p=top_p, top_k=top_k, seed=seed)
  log = generation.ResumableLog(paths['log'], ('stage', 'index'), settings, fresh=not resume)

  def logged(stage, fn):  # the stage's continuations through the log
    return lambda prompts: generation.generate_logged(
        fn, prompts, log, batch_size, [{'stage': stage, 'index': i} for i in range(len(prompts))])
  if candidates_path:
    candidates = read_candidates(candidates_path)
    stats['candidates_from'] = candidates_path
    stats['segments'] = None
    stats['instructions'] = {'generated': 0, 'empty': 0, 'candidates': len(candidates)}
    augmenter = None
  else:
    files, fmt = data.resolve_text(text, text_format)
    segments, stats['segments'] = data.read_segments(
        files, fmt, num_segments=num_segments, min_chars=min_segment_chars,
        max_chars=max_segment_chars, text_key=text_key)
    if generate is None:
      backward = generator(backward_checkpoint_path)
      generate = lambda prompts: backward(prompts, max_decode_length=max_decode_length)
      backward_usage = backward.usage
    augmenter = Metered(generate, count_tokens, backward_usage)
    candidates, stats['instructions'] = augment(segments, logged('augment', augmenter))
  if rate is None:
    rater = generator(curation_checkpoint_path)
    rate = lambda prompts: rater(prompts, method='greedy', max_decode_length=rating_decode_length)
    rating_usage = rater.usage
  curator = Metered(rate, count_tokens, rating_usage)
  rows, rated, stats['ratings'] = curate(candidates, logged('curate', curator), threshold)
  stats['kept'] = len(rows)
  stats['resumed'] = log.resumed
  stats['generation'] = {'augment': augmenter.stats() if augmenter else None,
                         'curate': curator.stats()}
  stats['seconds'] = round(time.time() - start, 2)
  stats['files'] = paths
  with open(paths['data'], 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  with open(paths['candidates'], 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(c) + '\n' for c in rated)
  with open(paths['stats'], 'w', encoding='utf-8') as f:
    json.dump(stats, f, indent=2)
  seg, ins, rat = stats['segments'], stats['instructions'], stats['ratings']
  read = f'{seg["used"]} segments of {seg["read"]} read; ' if seg else ''
  print(f'back_translate: {read}{ins["candidates"]} candidates; {rat["parsed"]} ratings parsed, '
        f'{rat["unparseable"]} unparseable, scores {rat["scores"]}; {len(rows)} kept '
        f'(score >= {threshold:g}) -> {paths["data"]}')
  if not rows:
    print('warning: no pair was kept; a curation model trained on the seed data (see the '
          'README) writes "Score: <n>" lines, or lower THRESHOLD.')
  return stats


def main(argv: Sequence[str]) -> None:
  gin_utils.call_configured(back_translate, argv)


if __name__ == '__main__':
  import t5x_lite.back_translate as back_translate_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(back_translate_module.main, 'back_translate')
