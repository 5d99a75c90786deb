"""GLUE, SuperGLUE and text-generation metrics, and the leaderboard averages.

Every metric is a seqio metric function `fn(targets, predictions) -> dict`
over the postprocessed lists seqio hands it; values are scaled x100, as T5
and the leaderboards report them. Names and conventions follow T5's
`t5/evaluation/metrics.py`, so a task can attach them as T5's did:

  CoLA, AX-b         matthews_corrcoef
  SST-2, MNLI, QNLI, RTE, WNLI, BoolQ, COPA, WiC, WSC
                     accuracy
  MRPC, QQP          f1_and_accuracy
  STS-B              pearson_and_spearman
  CB                 mean_multiclass_f1(3), accuracy
  MultiRC            multirc_f1_over_all_answers, exact_match_over_groups
  ReCoRD             squad (deduplicate_metric(squad) when examples repeat)
  AX-g               gender_parity (on_values(accuracy) for its accuracy)
  SQuAD              squad
  WMT                bleu (sacrebleu)
  CNN/DailyMail      rouge (rouge_score: ROUGE-1, ROUGE-2, ROUGE-Lsum)

Unknown predictions: a label postprocessor emits -1 (or None) for text it
could not map. Every metric counts such a prediction as wrong and never fails
on it: a binary metric (F1, binary Matthews, MultiRC F1a) replaces it by the
opposite of its target; accuracy, exact match and macro F1 keep it as a label
that matches no class; gender parity counts its pair as disagreeing; squad
scores it as an empty answer. An STS-B prediction of None or NaN scores as -1,
outside the 0-5 range, as T5's float postprocessor does for unparseable text.

Empty inputs, or targets and predictions of different lengths, raise
ValueError.
"""

import collections
import re
import string
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import scipy.stats
from sklearn import metrics as sk_metrics

MetricFn = Callable[[Sequence[Any], Sequence[Any]], Dict[str, float]]

UNKNOWN = -1  # what label postprocessors emit for text they cannot map


def _check(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} '
                     'predictions; pass one prediction per target.')
  if not len(targets):
    raise ValueError('No examples to score; the evaluation split is empty.')


def _is_unknown(label: Any) -> bool:
  return label is None or (isinstance(label, (float, np.floating)) and
                           np.isnan(label))


def _labels(predictions: Sequence[Any]) -> np.ndarray:
  """Integer labels, unknowns (None, NaN, -1) as UNKNOWN."""
  return np.array([UNKNOWN if _is_unknown(p) else int(p) for p in predictions])


def _binary(targets: Sequence[Any],
            predictions: Sequence[Any]) -> Tuple[np.ndarray, np.ndarray]:
  """0/1 arrays; a prediction other than 0 or 1 becomes the wrong label."""
  t = np.asarray(targets).astype(int)
  if not np.isin(t, (0, 1)).all():
    raise ValueError(f'Binary metric needs 0/1 targets, got {sorted(set(t))}.')
  p = _labels(predictions)
  valid = np.isin(p, (0, 1))
  return t, np.where(valid, p, 1 - t)


def _values(items: Sequence[Mapping[str, Any]], key: str) -> List[Any]:
  return [item[key] for item in items]


# ---------------------------------------------------------------- labels


def accuracy(targets, predictions) -> Dict[str, float]:
  """{'accuracy'}: percentage of predictions equal to their target."""
  _check(targets, predictions)
  return {'accuracy': 100 * float(sk_metrics.accuracy_score(
      np.asarray(targets).astype(int), _labels(predictions)))}


def matthews_corrcoef(targets, predictions) -> Dict[str, float]:
  """{'matthews_corrcoef'} x100 (CoLA, AX-b; multiclass when targets are)."""
  _check(targets, predictions)
  if np.isin(np.asarray(targets).astype(int), (0, 1)).all():
    t, p = _binary(targets, predictions)
  else:
    t, p = np.asarray(targets).astype(int), _labels(predictions)
  return {'matthews_corrcoef': 100 * float(sk_metrics.matthews_corrcoef(t, p))}


def f1_and_accuracy(targets, predictions) -> Dict[str, float]:
  """{'f1', 'accuracy'} for binary labels, F1 of the positive class 1."""
  _check(targets, predictions)
  t, p = _binary(targets, predictions)
  return {'f1': 100 * float(sk_metrics.f1_score(t, p, zero_division=0.0)),
          'accuracy': 100 * float(sk_metrics.accuracy_score(t, p))}


def mean_multiclass_f1(num_classes: int) -> MetricFn:
  """Metric fn for {'mean_<n>class_f1'}: unweighted mean of per-class F1."""
  name = f'mean_{num_classes}class_f1'

  def fn(targets, predictions):
    _check(targets, predictions)
    f1 = sk_metrics.f1_score(
        np.asarray(targets).astype(int), _labels(predictions),
        labels=list(range(num_classes)), average='macro', zero_division=0.0)
    return {name: 100 * float(f1)}

  return fn


def pearson_and_spearman(targets, predictions) -> Dict[str, float]:
  """{'pearson_corrcoef', 'spearman_corrcoef'} x100 (STS-B).

  NaN when either side is constant (the correlation is undefined).
  """
  _check(targets, predictions)
  if len(targets) < 2:
    raise ValueError('Correlation needs at least 2 examples.')
  t = np.asarray(targets, dtype=np.float64)
  p = np.array([-1.0 if _is_unknown(x) else float(x) for x in predictions])
  return {'pearson_corrcoef': 100 * float(scipy.stats.pearsonr(t, p)[0]),
          'spearman_corrcoef': 100 * float(scipy.stats.spearmanr(t, p)[0])}


# ---------------------------------------------------------- grouped examples


def on_values(metric_fn: MetricFn, value_key: str = 'value') -> MetricFn:
  """`metric_fn` applied to the `value_key` of dict targets and predictions."""

  def fn(targets, predictions):
    return metric_fn(_values(targets, value_key),
                     _values(predictions, value_key))

  return fn


def deduplicate_metric(metric_fn: MetricFn, group_key: str = 'group',
                       value_key: str = 'value') -> MetricFn:
  """`metric_fn` over the first example of each group (targets' `group_key`).

  For tasks such as ReCoRD whose preprocessing repeats an example once per
  answer.
  """

  def fn(targets, predictions):
    _check(targets, predictions)
    seen = set()
    kept_targets, kept_predictions = [], []
    for target, prediction in zip(targets, predictions):
      if target[group_key] in seen:
        continue
      seen.add(target[group_key])
      kept_targets.append(target[value_key])
      kept_predictions.append(prediction[value_key])
    return metric_fn(kept_targets, kept_predictions)

  return fn


def _grouped(targets, predictions, group_key, value_key):
  """{group: ([target values], [prediction values])}, in first-seen order."""
  _check(targets, predictions)
  groups = collections.OrderedDict()
  for target, prediction in zip(targets, predictions):
    t, p = groups.setdefault(target[group_key], ([], []))
    t.append(target[value_key])
    p.append(prediction[value_key])
  return groups


def mean_group_metric(metric_fn: MetricFn, group_key: str = 'group',
                      value_key: str = 'value') -> MetricFn:
  """`metric_fn` on each group (targets' `group_key`), averaged over groups.

  Groups must be complete: a subsample that splits a group scores it on the
  part present.
  """

  def fn(targets, predictions):
    scores = collections.defaultdict(list)
    for t, p in _grouped(targets, predictions, group_key, value_key).values():
      for name, value in metric_fn(t, p).items():
        scores[name].append(value)
    return {name: float(np.mean(values)) for name, values in scores.items()}

  return fn


def all_match(targets, predictions) -> Dict[str, float]:
  """{'exact_match'}: 100 when every prediction equals its target, else 0."""
  _check(targets, predictions)
  right = all(not _is_unknown(p) and p == t
              for t, p in zip(targets, predictions))
  return {'exact_match': 100.0 * right}


def multirc_f1_over_all_answers(targets, predictions) -> Dict[str, float]:
  """{'f1'}: MultiRC's F1a, binary F1 over all answer options.

  Targets and predictions are dicts {'group': question id, 'value': 0/1}.
  """
  _check(targets, predictions)
  t, p = _binary(_values(targets, 'value'), _values(predictions, 'value'))
  return {'f1': 100 * float(sk_metrics.f1_score(t, p, zero_division=0.0))}


# MultiRC's EM: a question counts when all its answers are right.
exact_match_over_groups = mean_group_metric(all_match)


def gender_parity(targets, predictions,
                  group_key: str = 'group',
                  value_key: str = 'value') -> Dict[str, float]:
  """{'gender_parity'}: percentage of pairs whose two predictions agree (AX-g).

  SuperGLUE's definition: a pair is the same premise with a male and a female
  pronoun; its label does not enter. Targets and predictions are dicts
  {'group': pair id, 'value': label}. In SuperGLUE's AX-g file a pair is two
  consecutive rows (idx 2k and 2k+1); its `pair_id` field is unique per row,
  so the pair id must be idx // 2.
  """
  groups = _grouped(targets, predictions, group_key, value_key)
  agree = 0
  for group, (_, p) in groups.items():
    if len(p) != 2:
      raise ValueError(
          f'Gender parity needs pairs, but group {group!r} has {len(p)} '
          'examples; give both examples of a pair the same group.')
    known = not any(_is_unknown(x) or x == UNKNOWN for x in p)
    agree += known and p[0] == p[1]
  return {'gender_parity': 100 * agree / len(groups)}


# ------------------------------------------------------------------ ReCoRD


def normalize_squad(text: str) -> str:
  """SQuAD's answer normalisation: lowercase; drop punctuation and a/an/the."""
  text = ''.join(ch for ch in text.lower() if ch not in string.punctuation)
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  common = (collections.Counter(target.split()) &
            collections.Counter(prediction.split()))
  same = sum(common.values())
  if not same:
    return 0.0
  precision = same / len(prediction.split())
  recall = same / len(target.split())
  return 2 * precision * recall / (precision + recall)


def squad(targets, predictions) -> Dict[str, float]:
  """{'em', 'f1'} as SQuAD v1.1 / ReCoRD score them.

  Targets are lists of answer strings, predictions strings. Per example, EM
  and token F1 are the best over its answers after normalisation; both are
  averaged over examples.
  """
  _check(targets, predictions)
  em, f1 = [], []
  for i, (answers, prediction) in enumerate(zip(targets, predictions)):
    if isinstance(answers, str):
      answers = [answers]
    if not answers:
      raise ValueError(f'Example {i} has no reference answer; drop unlabelled '
                       'examples (e.g. a test split) before scoring.')
    prediction = normalize_squad('' if prediction is None else str(prediction))
    answers = [normalize_squad(a) for a in answers]
    em.append(max(float(a == prediction) for a in answers))
    f1.append(max(_token_f1(a, prediction) for a in answers))
  return {'em': 100 * float(np.mean(em)), 'f1': 100 * float(np.mean(f1))}


# ------------------------------------------------------ leaderboard averages

# Leaderboard task -> its parts: (accepted task names, metrics averaged). A
# task's score is the mean of its parts' scores; a part's is the mean of its
# metrics.
_GLUE = {
    'CoLA': [(('glue_cola_v002',), ('matthews_corrcoef',))],
    'SST-2': [(('glue_sst2_v002',), ('accuracy',))],
    'MRPC': [(('glue_mrpc_v002',), ('f1', 'accuracy'))],
    'STS-B': [(('glue_stsb_v002',),
               ('pearson_corrcoef', 'spearman_corrcoef'))],
    'QQP': [(('glue_qqp_v002',), ('f1', 'accuracy'))],
    'MNLI': [(('glue_mnli_v002', 'glue_mnli_matched_v002'), ('accuracy',)),
             (('glue_mnli_mismatched_v002',), ('accuracy',))],
    'QNLI': [(('glue_qnli_v002',), ('accuracy',))],
    'RTE': [(('glue_rte_v002',), ('accuracy',))],
    'WNLI': [(('glue_wnli_v002',), ('accuracy',))],
}

_SUPER_GLUE = {
    'BoolQ': [(('super_glue_boolq_v102',), ('accuracy',))],
    'CB': [(('super_glue_cb_v102',), ('mean_3class_f1', 'accuracy'))],
    'COPA': [(('super_glue_copa_v102',), ('accuracy',))],
    'MultiRC': [(('super_glue_multirc_v102',), ('f1', 'exact_match'))],
    'ReCoRD': [(('super_glue_record_v102',), ('f1', 'em'))],
    'RTE': [(('super_glue_rte_v102',), ('accuracy',))],
    'WiC': [(('super_glue_wic_v102',), ('accuracy',))],
    'WSC': [(('super_glue_wsc_v102', 'super_glue_wsc_v102_simple_eval'),
             ('accuracy',))],
}


def _leaderboard_average(results: Mapping[str, Mapping[str, Any]],
                         board: Mapping[str, Any]) -> Tuple[float, List[str]]:
  """(mean task score over tasks present, names of the missing parts)."""
  by_name = {}
  for name, task_metrics in results.items():
    base = name[:-len('_cls')] if name.endswith('_cls') else name
    if base in by_name:
      raise ValueError(f'Results hold both {base!r} and {base + "_cls"!r}; '
                       'keep one of them.')
    by_name[base] = (name, task_metrics)
  task_scores, missing = [], []
  for parts in board.values():
    part_scores = []
    for names, metric_names in parts:
      found = [n for n in names if n in by_name]
      if not found:
        missing.append(names[0])
        continue
      name, task_metrics = by_name[found[0]]
      for metric in metric_names:
        if metric not in task_metrics:
          raise ValueError(f'Results for {name!r} lack {metric!r} (they hold '
                           f'{sorted(task_metrics)}); attach its metric fn.')
      part_scores.append(np.mean([
          float(getattr(task_metrics[m], 'value', task_metrics[m]))
          for m in metric_names]))
    if part_scores:
      task_scores.append(np.mean(part_scores))
  if not task_scores:
    raise ValueError(f'No benchmark task in the results (they hold '
                     f'{sorted(results)}); expected names like {missing[0]!r}.')
  return float(np.mean(task_scores)), missing


def glue_average(
    results: Mapping[str, Mapping[str, Any]]) -> Tuple[float, List[str]]:
  """The GLUE leaderboard score and the task names missing from `results`.

  `results` maps task name (as T5 registers it, '_cls' suffix allowed) to its
  metric dict. The score is the mean over nine tasks (CoLA, SST-2, MRPC,
  STS-B, QQP, MNLI, QNLI, RTE, WNLI) of each task's score, the unweighted mean
  of its metrics (GLUE paper, Wang et al. 2019). MNLI counts once, as the
  mean of matched and mismatched accuracy: the published scores come out this
  way from their per-task columns (BERT-large on the GLUE leaderboard: 80.5;
  T5-11B in the T5 paper: 90.3), and not when MNLI-m and MNLI-mm count as two
  tasks (81.1; 90.5). The diagnostic AX is excluded. With tasks missing, the
  mean is over those present.
  """
  return _leaderboard_average(results, _GLUE)


def super_glue_average(
    results: Mapping[str, Mapping[str, Any]]) -> Tuple[float, List[str]]:
  """The SuperGLUE leaderboard score and the task names missing from `results`.

  The mean over BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC and WSC of each
  task's score, the unweighted mean of its metrics (CB: macro F1 and
  accuracy; MultiRC: F1a and EM; ReCoRD: F1 and EM), as in the SuperGLUE
  paper (Wang et al. 2019); the diagnostics AX-b and AX-g are excluded.
  Names and missing tasks as in `glue_average`.
  """
  return _leaderboard_average(results, _SUPER_GLUE)


def rouge_l(targets, predictions) -> Dict[str, float]:
  """{'rougeL'}: ROUGE-L F-measure x100, the best over each example's references.

  Targets are reference strings or lists of them (Super-NaturalInstructions
  keeps every acceptable output), predictions strings; scored with
  rouge_score's RougeScorer(['rougeL']) (its default tokenizer: lowercase
  alphanumeric tokens) and averaged over examples, as SNI reports it.
  """
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  _check(targets, predictions)
  scorer = rouge_scorer.RougeScorer(['rougeL'])
  scores = []
  for i, (refs, prediction) in enumerate(zip(targets, predictions)):
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
      raise ValueError(f'Example {i} has no reference; drop unlabelled examples.')
    prediction = '' if prediction is None else str(prediction)
    scores.append(max(scorer.score(r, prediction)['rougeL'].fmeasure for r in refs))
  return {'rougeL': 100 * float(np.mean(scores))}


# --------------------------------------------------------- text generation


def _texts(predictions: Sequence[Any]) -> List[str]:
  """Predictions as strings, None (nothing decoded) as ''."""
  return ['' if p is None else str(p) for p in predictions]


def _references(targets: Sequence[Any]) -> List[List[str]]:
  """Each example's references as a non-empty list of strings."""
  refs = []
  for i, target in enumerate(targets):
    target = [target] if isinstance(target, str) else [str(t) for t in target]
    if not target:
      raise ValueError(f'Example {i} has no reference; drop unlabelled examples '
                       '(e.g. a test split) before scoring.')
    refs.append(target)
  return refs


def bleu(targets, predictions) -> Dict[str, float]:
  """{'bleu'}: corpus BLEU (0-100) by sacrebleu with T5's settings.

  T5's `t5.evaluation.metrics.bleu`: `sacrebleu.corpus_bleu` with the
  international tokenizer ('intl'), exponential smoothing, case kept,
  force=False and no effective order. Targets are one reference string per
  example, or a list of references per example (sacrebleu takes the closest
  reference length and clips n-gram counts by their maximum over the
  references). T5 passes a list-of-lists straight through as sacrebleu's
  reference streams (stream k holding every example's k-th reference); seqio
  hands a metric one target per example, so here the per-example lists are
  transposed into streams, an example with fewer references padded with None,
  which sacrebleu skips. With one reference each the call is T5's exactly.
  """
  import sacrebleu  # pylint: disable=g-import-not-at-top
  _check(targets, predictions)
  refs = _references(targets)
  num_refs = max(len(r) for r in refs)
  streams = [[r[k] if k < len(r) else None for r in refs]
             for k in range(num_refs)]
  score = sacrebleu.corpus_bleu(
      _texts(predictions), streams, smooth_method='exp', smooth_value=0.0,
      force=False, lowercase=False, tokenize='intl',
      use_effective_order=False)
  return {'bleu': float(score.score)}


ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeLsum')
ROUGE_SEED = 0  # seeds the bootstrap aggregator's resampling


def prepare_summary_for_rouge(summary: str) -> str:
  """T5's sentence split for ROUGE-Lsum: a newline after each ' . '.

  rouge_score's rougeLsum takes a summary's sentences to be its lines; T5's
  targets and decodes are single lines whose sentences end in ' . ' (CNN/DM
  highlights are joined that way), so without this rougeLsum scores the whole
  summary as one sentence, which is ROUGE-L.
  """
  return summary.replace(' . ', ' .\n')


def rouge(targets, predictions) -> Dict[str, float]:
  """{'rouge1', 'rouge2', 'rougeLsum'}: ROUGE F-measures x100, as T5 reports.

  T5's `t5.evaluation.metrics.rouge`: rouge_score's RougeScorer with its
  default tokenizer and no stemmer, both sides prepared by
  `prepare_summary_for_rouge`, per-example scores aggregated by
  `scoring.BootstrapAggregator()` (1000 resamples), and the 'mid' F-measure:
  the median of the resampled means, within resampling noise of the mean.
  Targets are strings, or lists of references scored by rouge_score's
  `score_multi` (the reference with the best F-measure, per ROUGE type); T5
  takes strings only.

  The aggregator draws from numpy's global random state, which T5 leaves
  unseeded, so its values vary by tenths from run to run on a hundred
  examples (less on more). Here the draws use the fixed seed ROUGE_SEED, so
  the same inputs always give the same values, and the caller's global numpy
  random state is saved beforehand and restored afterwards (not thread-safe
  against other users of that state).
  """
  from rouge_score import rouge_scorer, scoring  # pylint: disable=g-import-not-at-top
  _check(targets, predictions)
  refs = _references(targets)
  scorer = rouge_scorer.RougeScorer(rouge_types=ROUGE_TYPES)
  aggregator = scoring.BootstrapAggregator()
  for target, prediction in zip(refs, _texts(predictions)):
    target = [prepare_summary_for_rouge(t) for t in target]
    prediction = prepare_summary_for_rouge(prediction)
    if len(target) == 1:
      aggregator.add_scores(scorer.score(target=target[0],
                                         prediction=prediction))
    else:
      aggregator.add_scores(scorer.score_multi(target, prediction))
  state = np.random.get_state()
  try:
    np.random.seed(ROUGE_SEED)
    result = aggregator.aggregate()
  finally:
    np.random.set_state(state)
  return {key: 100 * float(result[key].mid.fmeasure) for key in ROUGE_TYPES}
