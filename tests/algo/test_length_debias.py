"""The pieces that keep a reward model (and the policy trained on it) from paying for length, each against a plain
formula: the weighted Bradley-Terry loss, the ODIN loss, the length slope and its correction, the balance weights,
the length-matched negatives, the length penalty and the runaway stop."""
import math

import pytest
import torch

from rlhf_ds.algo.losses import head_cosine, length_slope, odin_loss, pairwise_loss, pearson, weighted_pairwise_loss
from rlhf_ds.algo.shaping import length_penalty, length_runaway


def test_weighted_pairwise_loss_is_a_weighted_mean_of_the_plain_terms():
    c, r, w = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 3.0, 2.0])
    terms = [-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(c.tolist(), r.tolist())]
    want = sum(x * y for x, y in zip(terms, w.tolist())) / sum(w.tolist())
    assert weighted_pairwise_loss(c, r, w).item() == pytest.approx(want, rel=1e-5)
    assert weighted_pairwise_loss(c, r, torch.ones(3)).item() == pytest.approx(pairwise_loss(c, r).item(), rel=1e-6)


def test_odin_loss_penalises_a_quality_head_that_tracks_length():
    lengths = torch.tensor([30.0, 10.0, 12.0, 28.0])  # chosen rows, then rejected rows
    head_q, head_l = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # orthogonal heads: no cosine term
    length_part = 0.1 * lengths
    blind = torch.tensor([1.0, 2.0, 0.0, 0.5])
    tracking = 0.05 * lengths
    loss_blind, parts = odin_loss(blind, length_part, lengths, head_cosine(head_q, head_l), coef=1.0)
    total = blind + length_part
    rank = -torch.nn.functional.logsigmoid(total[:2] - total[2:]).mean()
    rho_q = float(pearson(blind, lengths))
    assert loss_blind.item() == pytest.approx(rank.item() + abs(rho_q) - 1.0, rel=1e-5)  # the length head: rho 1
    assert parts["length_head_corr"].item() == pytest.approx(1.0, abs=1e-6)
    loss_tracking, parts = odin_loss(tracking, length_part, lengths, head_cosine(head_q, head_l), coef=1.0)
    assert parts["quality_length_corr"].item() == pytest.approx(1.0, abs=1e-6)
    total = tracking + length_part
    rank_tracking = -torch.nn.functional.logsigmoid(total[:2] - total[2:]).mean()
    assert loss_tracking.item() - rank_tracking.item() == pytest.approx(0.0, abs=1e-5)  # |rho_q| 1 costs a full 1
    assert loss_blind.item() - rank.item() == pytest.approx(abs(rho_q) - 1.0, abs=1e-5) and abs(rho_q) < 0.5
    same, _ = odin_loss(blind, length_part, lengths, head_cosine(head_q, head_q), coef=1.0)
    assert same.item() == pytest.approx(loss_blind.item() + 1.0, rel=1e-5)  # parallel heads: cosine 1 added


def test_length_slope_is_the_least_squares_slope_and_the_correction_removes_it():
    from rlhf_ds.models.heads import length_corrected

    lengths = [10, 20, 30, 40, 50]
    scores = [0.3 * x + 1.0 + e for x, e in zip(lengths, (0.1, -0.1, 0.0, 0.1, -0.1))]
    slope = length_slope(scores, lengths)
    mean_x, mean_y = sum(lengths) / 5, sum(scores) / 5
    want = sum((x - mean_x) * (y - mean_y) for x, y in zip(lengths, scores)) / sum((x - mean_x) ** 2 for x in lengths)
    assert slope == pytest.approx(want) and slope == pytest.approx(0.3, abs=0.01)
    assert length_slope([1.0, 2.0], [5, 5]) == 0.0  # no spread in length: nothing to fit
    corrected = length_corrected(torch.tensor(scores), torch.tensor(lengths), {"length_slope_per_token": slope})
    assert abs(length_slope(corrected.tolist(), lengths)) < 1e-5
    assert torch.equal(length_corrected(torch.tensor(scores), torch.tensor(lengths), {}), torch.tensor(scores))


def test_balance_weights_give_each_kind_of_pair_the_same_total_weight():
    from rlhf_ds.trainers.rm import balance_weights

    chosen, rejected = ["long answer", "long answer", "long answer", "s"], ["s", "s", "s", "long answer"]
    w = balance_weights(chosen, rejected)
    assert w[:3] == pytest.approx([4 / 6] * 3) and w[3] == pytest.approx(2.0)
    assert sum(w[:3]) == pytest.approx(w[3]) and sum(w) == pytest.approx(len(w))  # mean weight 1
    assert balance_weights(["a", "b"], ["cc", "dd"]) == [1.0, 1.0]


def test_length_negatives_make_the_longer_answer_the_rejected_one():
    import datasets

    from rlhf_ds.trainers.rm import length_negatives

    examples = datasets.Dataset.from_dict({"prompt": [f"q{i}" for i in range(10)],
                                           "chosen": [f"good answer {i}" for i in range(10)],
                                           "rejected": [f"bad {i}" for i in range(10)]})
    made = length_negatives(examples, 0.5, seed=3)
    assert len(made) == 5
    for row in made:
        assert row["rejected"].startswith(row["chosen"]) and len(row["rejected"]) > len(row["chosen"])
        assert row["chosen"] == f"good answer {row['prompt'][1:]}"  # kept with its own prompt
    assert length_negatives(examples, 0.5, seed=3)["rejected"] == made["rejected"]  # seeded


def test_length_penalty_and_the_runaway_stop():
    assert length_penalty(torch.tensor([10, 20]), 0.01).tolist() == pytest.approx([0.1, 0.2])
    steady = length_runaway([20, 21, 20, 22, 21, 20], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], growth=0.5)
    assert steady is None
    grows_rewarded = length_runaway([20, 20, 20, 35, 36, 40], [0.1, 0.1, 0.1, 0.5, 0.6, 0.7], growth=0.5)
    assert grows_rewarded is not None and "grew from 20.0 to 37.0 tokens" in grows_rewarded
    grows_unrewarded = length_runaway([20, 20, 20, 35, 36, 40], [0.5, 0.5, 0.5, 0.1, 0.1, 0.1], growth=0.5)
    assert grows_unrewarded is None
    assert length_runaway([20, 40], [0.0, 1.0], growth=0.1) is None  # too few steps to tell
