"""Evol-Instruct (WizardLM): instructions made harder, round by round, by one of
our checkpoints.

Xu et al., "WizardLM: Empowering Large Language Models to Follow Complex
Instructions" (arXiv:2304.12244, ICLR 2024).

    python -m t5x_lite.evol_instruct --gin_file=gin/gpt_tiny_evol_instruct.gin \\
        --gin.CHECKPOINT_PATH="'runs/gpt_instruct_wit/checkpoints/300'"

The pool starts from an instruction file (POOL: 'alpaca' or 'self_instruct'
for the shared samples, or a JSON / JSONL file of records with 'instruction'
and an optional 'input'). Each round evolves every pool instruction with one
operation drawn at random (seeded by SEED, the round and the instruction's
place in the pool):

  in-depth  the paper's "Prompt Rewriter" prompt, which asks for a harder
            rewrite of #Given Prompt# that humans can still understand and
            answer, by one method: 'constraints' (add a constraint or
            requirement), 'deepening' (deepen and widen the inquiry),
            'concretizing' (specific concepts for general ones) or
            'reasoning' (ask for multiple-step reasoning);
  in-breadth 'breadth': the paper's "Prompt Creator" prompt, a new and rarer
            prompt in the same domain, of similar length and difficulty.

The model answers each evolved instruction, and the eliminator drops failed
evolutions, by the paper's four rules (the first one without its LLM judge):

  no_gain        no information gain over the original: ROUGE-L precision
                 of the evolved instruction against the original at least
                 NO_GAIN_PRECISION (0.9), i.e. at most a tenth of the evolved
                 words are new. An instruction equal to the original after
                 normalisation (case, punctuation, spacing) has precision 1;
                 so has a cut-down copy, which loses information. Precision
                 (not F) keeps the in-depth rewrites, which keep the original
                 words and add 10 to 20 (their F against a short original
                 stays high), while near-copies with a word or two changed or
                 added go;
  sorry / short  the model struggled: the response says "sorry" and has
                 fewer than MIN_RESPONSE_WORDS (80) words (STRUGGLE_RULE
                 'and', the paper's rule); with 'or' either one drops it
                 ('sorry' or 'short');
  stopwords_only the response is only punctuation and stop words (or empty);
  copied_prompt  the evolved instruction copies the evolving prompt's words
                 ('given prompt', 'rewritten prompt', 'created prompt', with
                 or without their # marks);

and 'empty' when the model gave no instruction text at all. Instructions are
checked before they are answered (a failed one costs no answer). A kept
evolution replaces its original in the pool; a failed one leaves the original
there to be evolved again next round.

Writes OUTPUT_DIR/evol_instruct.jsonl (the kept evolutions of every round as
Alpaca rows: instruction, input '', output), OUTPUT_DIR/evol_instruct_stats.json
(per round and per operation: generated, kept and each elimination reason;
instruction length and pool depth per round; tokens/s) and
OUTPUT_DIR/evol_instruct_log.jsonl (every evolution: round, index, operation,
source, instruction, output, reason). The log is written as each batch
finishes: the same command run again skips what it holds (and NUM_ROUNDS may
grow); other settings are refused. `t5x_lite.tasks.instructions.register_instruction_task(
'my_evol_gpt', 'OUTPUT_DIR/evol_instruct.jsonl')` trains on the output.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import collections
import json
import os
import random
import re
import statistics
import time
from typing import Optional, Sequence

import gin
from rouge_score import rouge_scorer

from t5x_lite import gin_utils
from t5x_lite.data import instructions
from t5x_lite.errors import UserError
from t5x_lite.generation import GenerateFn
from t5x_lite.generation import ResumableLog

IN_DEPTH = ('constraints', 'deepening', 'concretizing', 'reasoning')
OPERATIONS = IN_DEPTH + ('breadth',)
REASONS = ('empty', 'copied_prompt', 'no_gain', 'stopwords_only', 'sorry', 'short')
PROMPT_FORMATS = ('instruction', 'raw')
STRUGGLE_RULES = ('and', 'or')
MIN_RESPONSE_WORDS = 80
NO_GAIN_PRECISION = 0.9
# The shared samples by name, under t5x_lite.tasks.instructions.data_dir().
SHARED_POOLS = {'alpaca': os.path.join('alpaca', 'alpaca_en_demo.json'),
                'self_instruct': os.path.join('self_instruct', 'seed_tasks.jsonl')}

# The paper's in-depth prompt (its appendix), with one method per operation.
DEPTH_METHODS = {
    'constraints': 'Please add one more constraints/requirements into #Given Prompt#',
    'deepening': ('If #Given Prompt# contains inquiries about certain issues, the depth and '
                  'breadth of the inquiry can be increased.'),
    'concretizing': 'Please replace general concepts with more specific concepts.',
    'reasoning': ('If #Given Prompt# can be solved with just a few simple thinking processes, '
                  'you can rewrite it to explicitly request multiple-step reasoning.'),
}
DEPTH_TEMPLATE = (
    'I want you act as a Prompt Rewriter.\n'
    'Your objective is to rewrite a given prompt into a more complex version to make those '
    'famous AI systems (e.g., ChatGPT and GPT4) a bit harder to handle.\n'
    'But the rewritten prompt must be reasonable and must be understood and responded by '
    'humans.\n'
    'Your rewriting cannot omit the non-text parts such as the table and code in '
    '#Given Prompt#:. Also, please do not omit the input in #Given Prompt#.\n'
    'You SHOULD complicate the given prompt using the following method:\n'
    '{method}\n'
    'You should try your best not to make the #Rewritten Prompt# become verbose, '
    '#Rewritten Prompt# can only add 10 to 20 words into #Given Prompt#.\n'
    "'#Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' are not "
    'allowed to appear in #Rewritten Prompt#\n'
    '#Given Prompt#:\n{instruction}\n'
    '#Rewritten Prompt#:\n')
# The paper's in-breadth prompt.
BREADTH_TEMPLATE = (
    'I want you act as a Prompt Creator.\n'
    'Your goal is to draw inspiration from the #Given Prompt# to create a brand new prompt.\n'
    'This new prompt should belong to the same domain as the #Given Prompt# but be even more '
    'rare.\n'
    'The LENGTH and difficulty level of the #Created Prompt# should be similar to that of the '
    '#Given Prompt#.\n'
    'The #Created Prompt# must be reasonable and must be understood and responded by humans.\n'
    "'#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created prompt' are not allowed "
    'to appear in #Created Prompt#\n'
    '#Given Prompt#:\n{instruction}\n'
    '#Created Prompt#:\n')
PROMPT_WORDS = ('given prompt', 'rewritten prompt', 'created prompt')
STOP_WORDS = frozenset((
    'a about above after again against all am an and any are as at be because been before '
    'being below between both but by can could did do does doing down during each few for '
    'from further had has have having he her here hers herself him himself his how i if in '
    'into is it its itself just let me more most my myself no nor not now of off on once '
    'only or other ought our ours ourselves out over own same she should so some such than '
    'that the their theirs them themselves then there these they this those through to too '
    'under until up very was we were what when where which while who whom why will with '
    'would you your yours yourself yourselves s t d ll m o re ve y don isn aren wasn weren '
    "hasn haven hadn doesn didn won wouldn shan shouldn couldn mustn mightn needn ain ma "
    'also yes ok okay oh well').split())


# ---- the pool ----

def load_pool(pool: str, size: Optional[int] = None) -> tuple[str, list[str]]:
  """(the file read, its first `size` instructions (all for None)).

  `pool`: 'alpaca' or 'self_instruct' (the shared samples), or a JSON list /
  JSONL of records with 'instruction' and optional 'input' (Alpaca; a
  Self-Instruct seed task gives its first instance's input). An input goes on
  the instruction's next line: the evolved instruction carries it along.
  """
  path = pool
  if pool in SHARED_POOLS:
    from t5x_lite.tasks import instructions as tasks  # pylint: disable=g-import-not-at-top
    path = os.path.join(tasks.data_dir(), SHARED_POOLS[pool])
    if not os.path.isfile(path):
      raise UserError(f'{path} is missing; set {tasks.DATA_DIR_ENV} to the '
                      f'instruction samples directory, or point --gin.POOL at your own JSONL.')
  elif not os.path.isfile(path):
    raise UserError(f"POOL {path} does not exist; give 'alpaca', 'self_instruct' or a JSON / "
                    'JSONL file of {instruction, input} records.')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if text.lstrip().startswith('['):
    try:
      records = list(enumerate(json.loads(text), 1))
    except ValueError as e:
      raise UserError(f'{path} is not valid JSON ({e}); fix the file.') from None
    where = 'record'
  else:
    records, where = [], 'line'
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          records.append((n, json.loads(line)))
        except ValueError:
          raise UserError(f'{path}:{n} is not valid JSON; fix or remove the line.') from None
  out = []
  for n, r in records[:size]:
    instances = r.get('instances') if isinstance(r, dict) else None
    first = instances[0] if isinstance(instances, list) and instances else {}
    inst = r.get('instruction') if isinstance(r, dict) else None
    inp = r.get('input', first.get('input', '') if isinstance(first, dict) else '')
    if not isinstance(inst, str) or not inst.strip() or not isinstance(inp, (str, type(None))):
      raise UserError(f"{path} {where} {n} needs a non-empty string 'instruction' (and a string "
                      "'input' if any); fix the record.")
    out.append(inst.strip() + (f'\n{inp.strip()}' if inp and inp.strip() else ''))
  if not out:
    raise UserError(f'POOL {path} holds no instruction.')
  return path, out


# ---- prompts ----

def evolution_prompt(operation: str, instruction: str) -> str:
  """The paper's prompt that evolves `instruction` by `operation`."""
  if operation == 'breadth':
    return BREADTH_TEMPLATE.format(instruction=instruction.strip())
  return DEPTH_TEMPLATE.format(method=DEPTH_METHODS[operation], instruction=instruction.strip())


def model_prompt(text: str, prompt_format: str) -> str:
  """What the model reads: `text` in the instruction template ('instruction',
  for instruction-tuned checkpoints) or as it is ('raw', for a base LM, which
  continues after '#Rewritten Prompt#:')."""
  return instructions.render_prompt(text) if prompt_format == 'instruction' else text


def parse_generation(text: str) -> str:
  """A continuation up to the next template block ('\\n###'), stripped."""
  return text.split('\n###', 1)[0].strip()


def draw_operation(seed: int, round_: int, index: int, operations: Sequence[str]) -> str:
  """The operation of pool slot `index` in round `round_`: the same in every
  run with this seed, whatever was generated before."""
  return random.Random(f'{seed}:{round_}:{index}').choice(list(operations))


# ---- the eliminator ----

def make_scorer() -> rouge_scorer.RougeScorer:
  return rouge_scorer.RougeScorer(['rougeL'], use_stemmer=False)


def instruction_reason(source: str, evolved: str, scorer: Optional[rouge_scorer.RougeScorer] = None,
                       no_gain_precision: float = NO_GAIN_PRECISION) -> Optional[str]:
  """Why the evolution of `source` into `evolved` failed ('empty',
  'copied_prompt', 'no_gain'), or None."""
  if not re.search(r'\w', evolved):
    return 'empty'
  flat = ' '.join(re.sub(r'[#\s]+', ' ', evolved.lower()).split())
  if any(words in flat for words in PROMPT_WORDS):
    return 'copied_prompt'
  precision = (scorer or make_scorer()).score(source, evolved)['rougeL'].precision
  if precision >= no_gain_precision:
    return 'no_gain'
  return None


def response_reason(response: str, min_response_words: int = MIN_RESPONSE_WORDS,
                    struggle_rule: str = 'and') -> Optional[str]:
  """Why the response shows a failed evolution ('stopwords_only', 'sorry',
  'short'), or None."""
  lowered = response.lower()
  if all(w in STOP_WORDS for w in re.findall(r'[a-z0-9]+', lowered)):
    return 'stopwords_only'
  sorry = re.search(r'\bsorry\b', lowered) is not None
  short = len(response.split()) < min_response_words
  if struggle_rule == 'and':
    return 'sorry' if sorry and short else None
  return 'sorry' if sorry else 'short' if short else None


# ---- the rounds ----

def _counts() -> dict:
  return {'generated': 0, 'kept': 0, 'eliminated': collections.OrderedDict((r, 0) for r in REASONS)}


def _add(counts: dict, record: dict) -> None:
  counts['generated'] += 1
  if record['reason']:
    counts['eliminated'][record['reason']] += 1
  else:
    counts['kept'] += 1


def _words(texts: Sequence[str]) -> dict:
  lengths = [len(t.split()) for t in texts]
  if not lengths:
    return {'mean': None, 'min': None, 'max': None}
  return {'mean': round(statistics.mean(lengths), 2), 'min': min(lengths), 'max': max(lengths)}


def _evolve_batch(generate: GenerateFn, jobs: Sequence[dict], *, prompt_format: str,
                  scorer: rouge_scorer.RougeScorer, no_gain_precision: float,
                  min_response_words: int, struggle_rule: str) -> list[dict]:
  """Evolves and answers `jobs` ({round, index, operation, source, depth}): one
  record each, with the evolved instruction, the response and the reason."""
  prompts = [model_prompt(evolution_prompt(j['operation'], j['source']), prompt_format)
             for j in jobs]
  records = []
  for job, text in zip(jobs, generate(prompts)):
    evolved = parse_generation(text)
    records.append(dict(job, instruction=evolved, output=None,
                        reason=instruction_reason(job['source'], evolved, scorer,
                                                  no_gain_precision)))
  to_answer = [r for r in records if not r['reason']]
  if to_answer:
    answers = generate([instructions.render_prompt(r['instruction']) for r in to_answer])
    for record, text in zip(to_answer, answers):
      record['output'] = parse_generation(text)
      record['reason'] = response_reason(record['output'], min_response_words, struggle_rule)
  return records


def evolve(pool: Sequence[str], generate: GenerateFn, log: ResumableLog, *, num_rounds: int,
           seed: int = 0, operations: Sequence[str] = OPERATIONS,
           prompt_format: str = 'instruction', min_response_words: int = MIN_RESPONSE_WORDS,
           struggle_rule: str = 'and', no_gain_precision: float = NO_GAIN_PRECISION,
           chunk_size: int = 8) -> tuple[list[dict], dict]:
  """Runs the rounds over `pool`; `chunk_size` slots at a time, each chunk's
  records appended to `log` (keyed by round and index) before the next, and
  read back from it where a former run wrote them.

  Returns (the records of every round, in order; stats). A record's 'depth'
  is the number of kept evolutions behind its instruction, itself included.
  """
  scorer = make_scorer()
  slots = [{'instruction': p, 'depth': 0} for p in pool]
  records, rounds = [], []
  total = dict(_counts(), operations={op: _counts() for op in operations})
  resumed = 0
  for round_ in range(1, num_rounds + 1):
    this_round = []
    for start in range(0, len(slots), chunk_size):
      chunk = range(start, min(start + chunk_size, len(slots)))
      jobs = [{'round': round_, 'index': i,
               'operation': draw_operation(seed, round_, i, operations),
               'source': slots[i]['instruction'], 'depth': slots[i]['depth'] + 1}
              for i in chunk if (round_, i) not in log]
      resumed += len(chunk) - len(jobs)
      if jobs:
        log.append(_evolve_batch(generate, jobs, prompt_format=prompt_format, scorer=scorer,
                                 no_gain_precision=no_gain_precision,
                                 min_response_words=min_response_words,
                                 struggle_rule=struggle_rule))
      for i in chunk:
        record = log.get((round_, i))
        if record['source'] != slots[i]['instruction']:
          raise UserError(f'{log.path} holds another evolution of pool slot {i} in round '
                          f'{round_}; it was written from another pool: delete it to start over.')
        this_round.append(record)
    stats = dict(_counts(), round=round_, operations={op: _counts() for op in operations})
    for record in this_round:
      _add(stats, record)
      _add(stats['operations'][record['operation']], record)
      _add(total, record)
      _add(total['operations'][record['operation']], record)
      if not record['reason']:
        slots[record['index']] = {'instruction': record['instruction'], 'depth': record['depth']}
    kept = [r for r in this_round if not r['reason']]
    depths = [s['depth'] for s in slots]
    stats['instruction_words'] = {'source': _words([r['source'] for r in this_round]),
                                  'kept': _words([r['instruction'] for r in kept])}
    stats['response_words'] = _words([r['output'] for r in kept])
    stats['pool_depth'] = {'mean': round(statistics.mean(depths), 3), 'max': max(depths),
                           'counts': {str(d): depths.count(d) for d in sorted(set(depths))}}
    rounds.append(stats)
    records.extend(this_round)
  return records, {'pool': len(pool), 'rounds': rounds, 'total': total, 'resumed': resumed}


# ---- the entry point ----

@gin.configurable
def evol_instruct(*,
                  generate: GenerateFn,
                  output_dir: str,
                  pool: str = 'alpaca',
                  pool_size: Optional[int] = None,
                  num_rounds: int = 1,
                  operations: Sequence[str] = OPERATIONS,
                  prompt_format: str = 'instruction',
                  min_response_words: int = MIN_RESPONSE_WORDS,
                  struggle_rule: str = 'and',
                  no_gain_precision: float = NO_GAIN_PRECISION,
                  seed: int = 0,
                  chunk_size: int = 8,
                  resume: bool = True) -> dict:
  """Runs Evol-Instruct with `generate` (prompts -> continuations; gin:
  `@generation.model_generator()`) and writes the JSONL, the log and the stats.

  `pool_size` takes the pool file's first instructions (None: all).
  `resume` False starts the log over. Returns the stats (with the output
  paths under 'files').
  """
  unknown = sorted(set(operations) - set(OPERATIONS))
  if unknown or not operations:
    raise UserError(f'OPERATIONS {list(operations)} must be a non-empty subset of '
                    f'{list(OPERATIONS)}; fix the names {unknown}.')
  for name, value, allowed in (('PROMPT_FORMAT', prompt_format, PROMPT_FORMATS),
                               ('STRUGGLE_RULE', struggle_rule, STRUGGLE_RULES)):
    if value not in allowed:
      raise UserError(f'{name}={value!r} is unknown; use one of {", ".join(allowed)}.')
  if num_rounds < 1 or chunk_size < 1 or (pool_size is not None and pool_size < 1):
    raise UserError(f'NUM_ROUNDS={num_rounds}, POOL_SIZE={pool_size} and chunk_size='
                    f'{chunk_size} must be at least 1 (POOL_SIZE None: the whole file).')
  if not 0 < no_gain_precision <= 1:
    raise UserError(f'NO_GAIN_PRECISION={no_gain_precision} must lie in (0, 1].')
  start = time.time()
  path, texts = load_pool(pool, pool_size)
  settings = dict(pool=os.path.abspath(path), pool_size=pool_size, seed=seed,
                  operations=list(operations), prompt_format=prompt_format,
                  min_response_words=min_response_words, struggle_rule=struggle_rule,
                  no_gain_precision=no_gain_precision,
                  generator=generate.settings() if hasattr(generate, 'settings') else None)
  os.makedirs(output_dir, exist_ok=True)
  files = {name: os.path.join(output_dir, f'evol_instruct{suffix}') for name, suffix in (
      ('data', '.jsonl'), ('log', '_log.jsonl'), ('stats', '_stats.json'))}
  log = ResumableLog(files['log'], ('round', 'index'), settings, fresh=not resume)
  records, stats = evolve(texts, generate, log, num_rounds=num_rounds, seed=seed,
                          operations=operations, prompt_format=prompt_format,
                          min_response_words=min_response_words, struggle_rule=struggle_rule,
                          no_gain_precision=no_gain_precision, chunk_size=chunk_size)
  rows = [{'instruction': r['instruction'], 'input': '', 'output': r['output']}
          for r in records if not r['reason']]
  stats['rows'] = len(rows)
  stats['seconds'] = round(time.time() - start, 2)
  stats['generation'] = generate.usage() if hasattr(generate, 'usage') else None
  stats['files'] = files
  with open(files['data'], 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  with open(files['stats'], 'w', encoding='utf-8') as f:
    json.dump(stats, f, indent=2)
  total = stats['total']
  eliminated = ' '.join(f'{k}={v}' for k, v in total['eliminated'].items() if v)
  print(f'evol_instruct: {num_rounds} rounds over {len(texts)} instructions, '
        f'{total["generated"]} evolutions ({stats["resumed"]} from the log), {total["kept"]} kept '
        f'({eliminated or "none eliminated"}); {len(rows)} rows -> {files["data"]}')
  return stats


def main(argv: Sequence[str]) -> None:
  gin_utils.call_configured(evol_instruct, argv)


if __name__ == '__main__':
  import t5x_lite.evol_instruct as evol_instruct_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(evol_instruct_module.main, 'evol_instruct')
