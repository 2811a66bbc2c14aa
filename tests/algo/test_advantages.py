"""Every advantage estimator against a plain loop: GAE (PPO), GRPO, Dr. GRPO, RLOO, REINFORCE++ and its
group-baseline variant; the batch normalisation over ranks; the groups that carry no signal."""
import math

import pytest
import torch

from rlhf_ds.algo.advantages import ADVANTAGE_ESTIMATORS, uniform_groups
from rlhf_ds.algo.core import global_moments

G, T = 3, 6
LENGTHS = [6, 2, 4, 1, 6, 3, 5, 5, 2]  # 3 groups of 3 answers


def setup():
    g = torch.Generator().manual_seed(7)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in LENGTHS])
    rewards = torch.randn(len(LENGTHS), T, generator=g) * mask
    values = torch.randn(len(LENGTHS), T, generator=g)
    return rewards, mask, values


def totals(rewards, mask):
    return [sum(rewards[b, t].item() for t in range(T) if mask[b, t]) for b in range(len(LENGTHS))]


def check_broadcast(adv, mask, per_answer):
    for b, n in enumerate(LENGTHS):
        for t in range(T):
            want = per_answer[b] if t < n else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5), (b, t)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.5)])
def test_gae_matches_a_plain_loop(gamma, lam):
    rewards, mask, values = setup()
    adv, ret = ADVANTAGE_ESTIMATORS["gae"](rewards, mask, values=values, gamma=gamma, lam=lam)
    for b, n in enumerate(LENGTHS):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist()
        expected, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0  # terminal after the last real token
            last = r[t] + gamma * next_v - v[t] + gamma * lam * last
            expected[t] = last
        for t in range(T):
            assert adv[b, t].item() == pytest.approx(expected[t] if t < n else 0.0, abs=1e-5), (b, t)
            assert ret[b, t].item() == pytest.approx(expected[t] + v[t] if t < n else 0.0, abs=1e-5), (b, t)


def test_grpo_dr_grpo_and_rloo_match_plain_loops():
    rewards, mask, _ = setup()
    s = totals(rewards, mask)
    grpo, drgrpo, rloo = [], [], []
    for start in range(0, len(s), G):
        group = s[start:start + G]
        mean = sum(group) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))  # unbiased, as torch.std
        for i, x in enumerate(group):
            grpo.append((x - mean) / (std + 1e-6))
            drgrpo.append(x - mean)
            rloo.append(x - (sum(group) - x) / (G - 1))
    for name, want in (("grpo", grpo), ("dr_grpo", drgrpo), ("rloo", rloo)):
        adv, _ = ADVANTAGE_ESTIMATORS[name](rewards, mask, group_size=G)
        check_broadcast(adv, mask, want)
        assert not ADVANTAGE_ESTIMATORS[name].needs_critic and ADVANTAGE_ESTIMATORS[name].grouped


def returns_loop(rewards, mask, gamma):
    out = []
    for b, n in enumerate(LENGTHS):
        row, running = [0.0] * T, 0.0
        for t in reversed(range(n)):
            running = rewards[b, t].item() + gamma * running
            row[t] = running
        out.append(row)
    return out


def whiten_loop(rows):
    vals = [rows[b][t] for b, n in enumerate(LENGTHS) for t in range(n)]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return [[(rows[b][t] - mean) / math.sqrt(var + 1e-8) if t < n else 0.0 for t in range(T)]
            for b, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_and_its_group_baseline_match_plain_loops(gamma):
    rewards, mask, _ = setup()
    rows = returns_loop(rewards, mask, gamma)
    adv, ret = ADVANTAGE_ESTIMATORS["reinforce_pp"](rewards, mask, gamma=gamma)
    for b in range(len(LENGTHS)):
        assert ret[b].tolist() == pytest.approx(rows[b], abs=1e-5)
    want = whiten_loop(rows)
    for b in range(len(LENGTHS)):
        assert adv[b].tolist() == pytest.approx(want[b], abs=1e-4)
    centred = []
    for start in range(0, len(rows), G):
        baseline = sum(rows[b][0] for b in range(start, start + G)) / G  # the group mean of the whole returns
        centred += [[r - baseline if t < LENGTHS[b] else 0.0 for t, r in enumerate(rows[b])]
                    for b in range(start, start + G)]
    adv, _ = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](rewards, mask, group_size=G, gamma=gamma)
    want = whiten_loop(centred)
    for b in range(len(LENGTHS)):
        assert adv[b].tolist() == pytest.approx(want[b], abs=1e-4)


def test_batch_normalisation_spans_ranks():
    """Two ranks' halves, reduced with a sum over both, give the statistics of the whole batch."""
    rewards, mask, _ = setup()
    halves = [(rewards[:4], mask[:4]), (rewards[4:], mask[4:])]
    partial = [torch.stack([m.sum(), (x * m).sum(), (x ** 2 * m).sum()]).double() for x, m in halves]
    both = partial[0] + partial[1]
    mean, var = global_moments(rewards[:4], mask[:4], all_reduce_sum=lambda t: both)
    whole_mean, whole_var = global_moments(rewards, mask)
    assert mean.item() == pytest.approx(whole_mean.item()) and var.item() == pytest.approx(whole_var.item())


def test_uniform_groups_are_found():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    assert uniform_groups(scores, 3).tolist() == [True, False, True]
    rewards = torch.zeros(9, 2)
    rewards[:, 0] = scores
    adv, _ = ADVANTAGE_ESTIMATORS["grpo"](rewards, torch.tensor([[1.0, 0.0]] * 9), group_size=3)
    assert adv[:3].abs().sum() == 0 and adv[6:].abs().sum() == 0  # no signal in a uniform group


def test_rloo_needs_two_answers():
    with pytest.raises(ValueError, match="at least 2"):
        ADVANTAGE_ESTIMATORS["rloo"](torch.zeros(2, 3), torch.ones(2, 3), group_size=1)
