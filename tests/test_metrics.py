"""GLUE / SuperGLUE metrics against sklearn and scipy, BLEU and ROUGE against
direct sacrebleu and rouge_score calls with T5's settings, and hand-computed
cases."""

import csv
import os

import numpy as np
import pytest
import sacrebleu
import scipy.stats
from rouge_score import rouge_scorer
from rouge_score import scoring
from sklearn import metrics as sk

import conftest
from t5x_lite import metrics


def _random_labels(seed, n=200, num_classes=2, unknown_rate=0.1):
  """Targets, and predictions with some -1 / None unknowns mixed in."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(0, num_classes, n)
  predictions = rng.integers(0, num_classes, n).tolist()
  for i in np.flatnonzero(rng.random(n) < unknown_rate):
    predictions[i] = None if i % 2 else -1
  return targets.tolist(), predictions


def _wrong_binary(targets, predictions):
  """Unknowns replaced by the opposite of the target."""
  return [1 - t if p not in (0, 1) else p for t, p in zip(targets, predictions)]


def test_accuracy_counts_unknowns_wrong():
  t, p = _random_labels(0, num_classes=3)
  assert any(x is None for x in p) and -1 in p
  expected = 100 * np.mean([x is not None and x == y for x, y in zip(p, t)])
  assert metrics.accuracy(t, p)['accuracy'] == pytest.approx(expected)
  clean = [x if x in (0, 1, 2) else 0 for x in p]
  assert metrics.accuracy(t, clean)['accuracy'] == pytest.approx(
      100 * sk.accuracy_score(t, clean))


def test_matthews_corrcoef_binary_and_multiclass():
  t, p = _random_labels(1)
  # Correlated predictions so the coefficient is far from 0.
  p = [y if i % 3 else x for i, (x, y) in enumerate(zip(p, t))]
  got = metrics.matthews_corrcoef(t, p)['matthews_corrcoef']
  expected = 100 * sk.matthews_corrcoef(t, _wrong_binary(t, p))
  assert got == pytest.approx(expected) and got > 20
  # Hand case: TP=2, TN=1, FP=1, FN=1 -> (2-1)/sqrt(3*3*2*2) = 1/6.
  assert metrics.matthews_corrcoef(
      [1, 1, 1, 0, 0], [1, 1, 0, 0, 1])['matthews_corrcoef'] == pytest.approx(
          100 / 6)
  t3, p3 = _random_labels(2, num_classes=3)
  p3_ref = [-1 if x is None else x for x in p3]
  assert metrics.matthews_corrcoef(t3, p3)['matthews_corrcoef'] == (
      pytest.approx(100 * sk.matthews_corrcoef(t3, p3_ref)))


def test_f1_and_accuracy():
  t, p = _random_labels(3)
  got = metrics.f1_and_accuracy(t, p)
  fixed = _wrong_binary(t, p)
  assert got['f1'] == pytest.approx(100 * sk.f1_score(t, fixed))
  assert got['accuracy'] == pytest.approx(100 * sk.accuracy_score(t, fixed))
  # Hand case: TP=1, FP=1, FN=2 (one of them an unknown) -> F1 = 2/5.
  got = metrics.f1_and_accuracy([1, 1, 1, 0, 0], [1, 0, -1, 1, 0])
  assert got['f1'] == pytest.approx(40.0)
  assert got['accuracy'] == pytest.approx(40.0)


def test_pearson_and_spearman():
  rng = np.random.default_rng(4)
  t = rng.uniform(0, 5, 100).round(1)  # rounding makes rank ties
  p = (t + rng.normal(0, 1, 100)).round(1)
  got = metrics.pearson_and_spearman(t.tolist(), p.tolist())
  assert got['pearson_corrcoef'] == pytest.approx(
      100 * scipy.stats.pearsonr(t, p)[0])
  assert got['spearman_corrcoef'] == pytest.approx(
      100 * scipy.stats.spearmanr(t, p)[0])
  p_unknown = p.tolist()
  p_unknown[0], p_unknown[1] = None, float('nan')
  p_ref = p.copy()
  p_ref[:2] = -1.0
  assert metrics.pearson_and_spearman(t, p_unknown)['pearson_corrcoef'] == (
      pytest.approx(100 * scipy.stats.pearsonr(t, p_ref)[0]))


def test_mean_multiclass_f1():
  fn = metrics.mean_multiclass_f1(3)
  t, p = _random_labels(5, num_classes=3)
  clean = [x if x is not None and x >= 0 else (y + 1) % 3
           for x, y in zip(p, t)]
  assert fn(t, clean)['mean_3class_f1'] == pytest.approx(
      100 * sk.f1_score(t, clean, average='macro'))
  # Unknowns: a miss for the true class, a false positive for none.
  t, p = np.array(t), np.array([-1 if x is None else x for x in p])
  per_class = []
  for c in range(3):
    tp = np.sum((p == c) & (t == c))
    fp = np.sum((p == c) & (t != c))
    fn_ = np.sum((p != c) & (t == c))
    per_class.append(2 * tp / (2 * tp + fp + fn_))
  assert fn(t.tolist(), p.tolist())['mean_3class_f1'] == pytest.approx(
      100 * np.mean(per_class))
  # A class never predicted nor present scores F1 0 and still counts.
  assert fn([0, 1], [0, 1])['mean_3class_f1'] == pytest.approx(200 / 3)


def _multirc(groups, labels, preds):
  targets = [{'group': g, 'value': v} for g, v in zip(groups, labels)]
  predictions = [{'group': g, 'value': v} for g, v in zip(groups, preds)]
  return targets, predictions


def test_multirc_hand_case():
  # q1: all right; q2: one false positive; q3: its answer unknown.
  targets, predictions = _multirc(
      ['q1', 'q1', 'q1', 'q2', 'q2', 'q3'],
      [1, 0, 1, 0, 1, 1],
      [1, 0, 1, 1, 1, -1])
  # TP=3, FP=1, FN=1 -> P = R = 3/4.
  assert metrics.multirc_f1_over_all_answers(
      targets, predictions)['f1'] == pytest.approx(75.0)
  assert metrics.exact_match_over_groups(
      targets, predictions)['exact_match'] == pytest.approx(100 / 3)


def test_multirc_random_against_sklearn():
  t, p = _random_labels(6, n=120)
  groups = [i // 4 for i in range(120)]
  targets, predictions = _multirc(groups, t, p)
  assert metrics.multirc_f1_over_all_answers(targets, predictions)['f1'] == (
      pytest.approx(100 * sk.f1_score(t, _wrong_binary(t, p))))
  em = np.mean([t[i:i + 4] == p[i:i + 4] for i in range(0, 120, 4)])
  assert metrics.exact_match_over_groups(
      targets, predictions)['exact_match'] == pytest.approx(100 * em)


def test_squad_hand_cases():
  targets = [
      ['The Eiffel Tower'],         # articles and punctuation normalised away
      ['Barack Obama', 'Obama'],    # best F1 over answers: 2/3 from 'Obama'
      ['New York City', 'NYC'],     # exact match on the second answer
      ['cat'],
      ['Anna'],                     # 'an' inside a word stays
      ['an apple'],
  ]
  predictions = ['eiffel  tower!', 'President Obama', 'nyc', 'dog', 'anna',
                 None]
  got = metrics.squad(targets, predictions)
  assert got['em'] == pytest.approx(100 * 3 / 6)
  assert got['f1'] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0 + 1 + 0) / 6)
  assert metrics.normalize_squad('  The  cat, an apple &  a dog. ') == (
      'cat apple dog')
  assert metrics.normalize_squad('Anna and Theo') == 'anna and theo'


def test_deduplicate_metric_keeps_first_of_group():
  fn = metrics.deduplicate_metric(metrics.squad)
  targets = [{'group': 0, 'value': ['a b']}, {'group': 0, 'value': ['a b']},
             {'group': 1, 'value': ['c']}]
  predictions = [{'value': 'a b'}, {'value': 'a b'}, {'value': 'x'}]
  assert fn(targets, predictions)['em'] == pytest.approx(50.0)


def test_gender_parity_hand_case():
  # Pairs interleaved: p0 agrees, p1 disagrees, p2 agrees on the wrong label,
  # p3 has two unknowns (counts as disagreeing).
  groups = [0, 1, 0, 1, 2, 2, 3, 3]
  labels = [1, 0, 1, 0, 1, 1, 0, 0]
  preds = [1, 0, 1, 1, 0, 0, -1, -1]
  targets = [{'group': g, 'value': v} for g, v in zip(groups, labels)]
  predictions = [{'value': v} for v in preds]
  assert metrics.gender_parity(targets, predictions)['gender_parity'] == 50.0
  assert metrics.on_values(metrics.accuracy)(
      targets, predictions)['accuracy'] == pytest.approx(100 * 3 / 8)
  with pytest.raises(ValueError, match='pairs'):
    metrics.gender_parity(targets[:3], predictions[:3])


def test_empty_and_mismatched_inputs_raise():
  for fn in (metrics.accuracy, metrics.matthews_corrcoef,
             metrics.f1_and_accuracy, metrics.pearson_and_spearman,
             metrics.mean_multiclass_f1(3), metrics.squad,
             metrics.multirc_f1_over_all_answers,
             metrics.exact_match_over_groups, metrics.gender_parity):
    with pytest.raises(ValueError, match='No examples'):
      fn([], [])
  with pytest.raises(ValueError, match='2 targets but 1'):
    metrics.accuracy([0, 1], [0])


# Per-task columns of BERT-large's row on the GLUE leaderboard (score 80.5).
_GLUE_BERT_LARGE = {
    'glue_cola_v002': {'matthews_corrcoef': 60.5},
    'glue_sst2_v002': {'accuracy': 94.9},
    'glue_mrpc_v002_cls': {'f1': 89.3, 'accuracy': 85.4},
    'glue_stsb_v002': {'pearson_corrcoef': 87.6, 'spearman_corrcoef': 86.5},
    'glue_qqp_v002': {'f1': 72.1, 'accuracy': 89.3},
    'glue_mnli_v002': {'accuracy': 86.7},
    'glue_mnli_mismatched_v002_cls': {'accuracy': 85.9},
    'glue_qnli_v002': {'accuracy': 92.7},
    'glue_rte_v002': {'accuracy': 70.1},
    'glue_wnli_v002': {'accuracy': 65.1},
    'glue_ax_v002': {'matthews_corrcoef': 39.6},
}


def test_glue_average():
  expected = np.mean([60.5, 94.9, (89.3 + 85.4) / 2, (87.6 + 86.5) / 2,
                      (72.1 + 89.3) / 2, (86.7 + 85.9) / 2, 92.7, 70.1, 65.1])
  score, missing = metrics.glue_average(_GLUE_BERT_LARGE)
  assert score == pytest.approx(expected) and missing == []
  assert round(score, 1) == 80.5
  partial = dict(_GLUE_BERT_LARGE)
  del partial['glue_qqp_v002'], partial['glue_mnli_mismatched_v002_cls']
  score, missing = metrics.glue_average(partial)
  assert missing == ['glue_qqp_v002', 'glue_mnli_mismatched_v002']
  assert score == pytest.approx(np.mean(
      [60.5, 94.9, (89.3 + 85.4) / 2, (87.6 + 86.5) / 2, 86.7, 92.7, 70.1,
       65.1]))


def test_super_glue_average():
  results = {
      'super_glue_boolq_v102': {'accuracy': 91.2},
      'super_glue_cb_v102': {'mean_3class_f1': 93.9, 'accuracy': 96.8},
      'super_glue_copa_v102_cls': {'accuracy': 94.8},
      'super_glue_multirc_v102': {'f1': 88.1, 'exact_match': 63.3},
      'super_glue_record_v102': {'f1': 94.1, 'em': 93.4},
      'super_glue_rte_v102': {'accuracy': 92.5},
      'super_glue_wic_v102': {'accuracy': 76.9},
      'super_glue_wsc_v102': {'accuracy': 93.8},
      'super_glue_axb_v102': {'matthews_corrcoef': 67.1},
      'super_glue_axg_v102': {'gender_parity': 92.7},
  }
  score, missing = metrics.super_glue_average(results)
  assert missing == []
  assert score == pytest.approx(
      (91.2 + (93.9 + 96.8) / 2 + 94.8 + (88.1 + 63.3) / 2 +
       (94.1 + 93.4) / 2 + 92.5 + 76.9 + 93.8) / 8)
  del results['super_glue_record_v102']
  score, missing = metrics.super_glue_average(results)
  assert missing == ['super_glue_record_v102']
  assert score == pytest.approx(
      (91.2 + (93.9 + 96.8) / 2 + 94.8 + (88.1 + 63.3) / 2 + 92.5 + 76.9 +
       93.8) / 7)
  with pytest.raises(ValueError, match="lack 'em'"):
    metrics.super_glue_average({'super_glue_record_v102': {'f1': 1.0}})
  with pytest.raises(ValueError, match='No benchmark task'):
    metrics.super_glue_average({'glue_cola_v002': {'matthews_corrcoef': 1.0}})


# ------------------------------------------------------------ text generation


def _stsb_pairs(n=200):
  """(sentence1, sentence2) of the first `n` shared STS-B dev pairs."""
  path = os.path.join(conftest.require_shared_data('glue', 'STS-B'), 'dev.tsv')
  with open(path, encoding='utf-8') as f:
    rows = list(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
  return [(r['sentence1'], r['sentence2']) for r in rows[:n]]


def _sacrebleu_t5(predictions, streams):
  """sacrebleu as T5 calls it, on reference streams."""
  return sacrebleu.corpus_bleu(
      predictions, streams, smooth_method='exp', smooth_value=0.0, force=False,
      lowercase=False, tokenize='intl', use_effective_order=False).score


def test_squad_t5_corner_cases():
  # As T5's qa_utils: an answer that normalises to nothing matches an empty
  # prediction exactly, but with no tokens in common its F1 is 0.
  got = metrics.squad([['The'], ['a']], ['', 'an'])
  assert got == {'em': 100.0, 'f1': 0.0}
  # Punctuation is deleted, not replaced by a space: "don't" -> "dont".
  got = metrics.squad([["don't stop"]], ['dont stop!'])
  assert got == {'em': 100.0, 'f1': 100.0}


def test_bleu_against_sacrebleu_on_stsb_pairs():
  pairs = _stsb_pairs()
  refs, preds = [p[0] for p in pairs], [p[1] for p in pairs]
  got = metrics.bleu(refs, preds)['bleu']
  assert got == _sacrebleu_t5(preds, [refs])
  assert 20 < got < 80  # paraphrases: far from 0 and from 100
  # An empty prediction among them is scored, not dropped.
  preds[3] = ''
  assert metrics.bleu(refs, preds)['bleu'] == _sacrebleu_t5(preds, [refs])
  assert metrics.bleu(refs, preds)['bleu'] < got


def test_bleu_several_references_per_example():
  pairs = _stsb_pairs(60)
  preds = [p[1] for p in pairs]
  # Example i's references: its own sentence1 and pair i+1's sentence2;
  # every third example has only the first.
  targets = [[pairs[i][0], pairs[(i + 1) % 60][1]] if i % 3 else [pairs[i][0]]
             for i in range(60)]
  second = [t[1] if len(t) > 1 else None for t in targets]
  expected = _sacrebleu_t5(preds, [[t[0] for t in targets], second])
  assert metrics.bleu(targets, preds)['bleu'] == expected
  assert expected > _sacrebleu_t5(preds, [[t[0] for t in targets]])
  # A missing reference is absent, not an empty one (whose length 0 would be
  # the closest to a short prediction's length and drop the brevity penalty).
  long = 'p q r s t u v w x y z'
  targets, preds = [['x y z w', 'a b c d'], [long]], ['a b c d', 'p q r s']
  expected = _sacrebleu_t5(preds, [['x y z w', long], ['a b c d', None]])
  assert 0 < expected < _sacrebleu_t5(preds, [['x y z w', long],
                                              ['a b c d', '']])
  assert metrics.bleu(targets, preds)['bleu'] == expected
  # A prediction equal to any one of its references is a perfect match.
  assert metrics.bleu([['a b c d', 'e f g h']], ['e f g h'])['bleu'] == (
      pytest.approx(100))


def test_bleu_hand_cases():
  # Brevity penalty only: all n-gram precisions 1, 4 words against 6.
  assert metrics.bleu(['a b c d e f'], ['a b c d'])['bleu'] == pytest.approx(
      100 * np.exp(1 - 6 / 4))
  # 'exp' smoothing: no 4-gram matches (0/1) counts as 1/(2*1); the other
  # precisions are 3/4, 2/3, 1/2.
  assert metrics.bleu(['a b c d'], ['a b c x'])['bleu'] == pytest.approx(
      100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)
  # The 'intl' tokenizer splits Unicode symbols and punctuation off words
  # (the default '13a' does not, and scores this pair 13.1); case is kept.
  assert metrics.bleu(['Preis: 5 €, sagte er — nicht mehr.'],
                      ['Preis: 5€, sagte er—nicht mehr.'])['bleu'] == (
                          pytest.approx(100))
  assert metrics.bleu(['The cat sat on the mat'],
                      ['the cat sat on the mat'])['bleu'] < 100
  assert metrics.bleu(['a b c d'], [''])['bleu'] == 0
  with pytest.raises(ValueError, match='no reference'):
    metrics.bleu([[]], ['a'])


def _rouge_t5(targets, predictions, seed=metrics.ROUGE_SEED):
  """rouge_score as T5 calls it, the bootstrap drawn after np.random.seed."""
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeLsum'])
  aggregator = scoring.BootstrapAggregator()
  per_example = []
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(target.replace(' . ', ' .\n'),
                          prediction.replace(' . ', ' .\n'))
    aggregator.add_scores(scores)
    per_example.append({k: s.fmeasure for k, s in scores.items()})
  np.random.seed(seed)
  result = aggregator.aggregate()
  mid = {k: 100 * result[k].mid.fmeasure for k in result}
  mean = {k: 100 * np.mean([s[k] for s in per_example]) for k in mid}
  return mid, mean


def test_rouge_against_rouge_score_on_stsb_pairs():
  pairs = _stsb_pairs()
  # Two-sentence summaries joined by ' . ', as CNN/DM highlights are.
  refs = [f'{a[0][:-1]} . {b[0]}' for a, b in zip(pairs[::2], pairs[1::2])]
  preds = [f'{a[1][:-1]} . {b[1]}' for a, b in zip(pairs[::2], pairs[1::2])]
  preds[5] = ''
  got = metrics.rouge(refs, preds)
  mid, mean = _rouge_t5(refs, preds)
  assert got == mid
  for key in ('rouge1', 'rouge2', 'rougeLsum'):
    assert got[key] == pytest.approx(mean[key], abs=1.0)  # median of means
  assert 30 < got['rouge2'] < got['rouge1'] < 90


def test_rouge_is_reproducible_and_leaves_numpy_random_state():
  pairs = _stsb_pairs(40)
  refs, preds = [p[0] for p in pairs], [p[1] for p in pairs]
  np.random.seed(7)
  expected_draw = np.random.rand(3)
  np.random.seed(7)
  first = metrics.rouge(refs, preds)
  np.testing.assert_array_equal(np.random.rand(3), expected_draw)
  assert metrics.rouge(refs, preds) == first
  # An unseeded bootstrap (T5's) moves 'mid' by resampling noise only.
  assert _rouge_t5(refs, preds, seed=1)[0] != first
  for key, value in _rouge_t5(refs, preds, seed=1)[0].items():
    assert value == pytest.approx(first[key], abs=1.0)


def test_rouge_hand_cases():
  # ROUGE-1: 5 of 5 predicted words in the 6-word target (the x2, cat, on,
  # mat): P 1, R 5/6, F 10/11. ROUGE-2: 3 of 4 predicted bigrams (the cat,
  # on the, the mat) among 5: F 2/3. One example: the bootstrap is exact.
  got = metrics.rouge(['the cat sat on the mat'], ['The cat on the mat.'])
  assert got['rouge1'] == pytest.approx(100 * 10 / 11)
  assert got['rouge2'] == pytest.approx(100 * 2 / 3)
  # No stemmer (T5's default): 'cats' and 'cat' differ.
  assert metrics.rouge(['cats sat'], ['cat sat'])['rouge1'] == pytest.approx(50)


def test_rouge_lsum_sees_sentences():
  # Two sentences, swapped. ROUGE-L's one LCS over the whole text covers one
  # sentence (F 1/2); ROUGE-Lsum matches each reference sentence against
  # every predicted sentence (F 1), once ' . ' has become ' .\n'.
  target, prediction = 'a b c . d e f .', 'd e f . a b c .'
  assert metrics.rouge([target], [prediction])['rougeLsum'] == pytest.approx(100)
  plain = rouge_scorer.RougeScorer(['rougeL', 'rougeLsum'])
  unprepared = plain.score(target, prediction)
  assert unprepared['rougeL'].fmeasure == pytest.approx(0.5)
  assert unprepared['rougeLsum'].fmeasure == pytest.approx(0.5)


def test_rouge_several_references_per_example():
  targets = [['the cat sat', 'a dog ran'], ['one two three']]
  predictions = ['a dog ran', 'one two']
  got = metrics.rouge(targets, predictions)
  # Per example the best reference: F1 1 and 4/5 (mean 0.9; the bootstrap
  # median of two examples' means is that mean).
  assert got['rouge1'] == pytest.approx(100 * (1 + 4 / 5) / 2)
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeLsum'])
  aggregator = scoring.BootstrapAggregator()
  for t, p in zip(targets, predictions):
    aggregator.add_scores(scorer.score_multi(t, p))
  np.random.seed(metrics.ROUGE_SEED)
  result = aggregator.aggregate()
  assert got == {k: 100 * result[k].mid.fmeasure for k in got}


def test_generation_metrics_check_inputs():
  for fn in (metrics.bleu, metrics.rouge):
    with pytest.raises(ValueError, match='No examples'):
      fn([], [])
    with pytest.raises(ValueError, match='2 targets but 1'):
      fn(['a', 'b'], ['a'])
