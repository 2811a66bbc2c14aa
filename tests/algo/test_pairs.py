"""Length-controlled pair metrics against plain computations: a pure length detector scores 0.5 balanced accuracy
and a rank correlation of 1 with length; a length-blind judge is not penalised."""
import pytest

from rlhf_ds.algo.pairs import pair_metrics, ranks, spearman


def test_ranks_and_spearman_match_the_textbook():
    assert ranks([10, 20, 20, 5]) == [1.0, 2.5, 2.5, 0.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = rank differences: 1 - 6 sum d^2 / (n (n^2 - 1)) without ties
    a, b = [3, 1, 4, 1.5, 5, 9, 2.6], [2, 7, 1, 8, 2.8, 1.8, 2.9]
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    assert spearman(a, b) == pytest.approx(1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1)))
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_a_pure_length_detector_is_seen_for_what_it_is():
    chosen_text = ["short", "a much longer good answer", "ok", "another long and good answer"]
    rejected_text = ["a long but bad answer here", "bad", "also long and bad, very", "no"]
    length = [float(len(t)) for t in chosen_text], [float(len(t)) for t in rejected_text]
    m = pair_metrics(*length, chosen_text, rejected_text)
    assert m["eval_chosen_shorter_pairs"] == 2
    assert m["eval_accuracy_chosen_shorter"] == 0.0 and m["eval_accuracy_chosen_longer"] == 1.0
    assert m["eval_length_balanced_accuracy"] == 0.5 and m["eval_accuracy"] == m["eval_length_baseline_accuracy"]
    assert m["eval_score_length_correlation"] == pytest.approx(1.0)
    judge = pair_metrics([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], chosen_text, rejected_text)
    assert judge["eval_length_balanced_accuracy"] == 1.0 and judge["eval_accuracy"] == 1.0
