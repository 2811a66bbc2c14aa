"""Masked statistics, log-probs, KL estimators and controllers, reward shaping and the PPO losses against plain
Python loops over random numbers, including the edge cases: the reward on the last real token, masks after EOS,
responses of length 1, rows with no response token, whitening with masks."""
import math
import random

import pytest
import torch

from rlhf_ds.algo import core, kl, policy, shaping
from rlhf_ds.algo.losses import sft_loss

B, T = 5, 7


def lists(x: torch.Tensor) -> list:
    return x.tolist()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 3, 1, 0, 5]  # full, short, a single token (EOS right away), nothing, mid
    mask = torch.tensor([[1 if t < n else 0 for t in range(T)] for n in lengths], dtype=torch.float32)
    return {
        "mask": mask, "lengths": lengths,
        "logp": -torch.rand(B, T, generator=g) * 3, "ref": -torch.rand(B, T, generator=g) * 3,
        "values": torch.randn(B, T, generator=g), "scores": torch.randn(B, generator=g),
        "adv": torch.randn(B, T, generator=g), "old_logp": -torch.rand(B, T, generator=g) * 3,
        "returns": torch.randn(B, T, generator=g), "old_values": torch.randn(B, T, generator=g),
    }


def test_response_mask_keeps_tokens_up_to_and_including_first_eos():
    eos = 2
    resp = torch.tensor([[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 6, 7, 8, 9], [5, 2, 7, 2, 0]])
    mask = core.response_mask(resp, [eos])
    expected = []
    for row in resp.tolist():
        out, ended = [], False
        for tok in row:
            out.append(0 if ended else 1)
            ended = ended or tok == eos
        expected.append(out)
    assert mask.tolist() == expected
    assert core.has_eos(resp, mask, [eos]).tolist() == [True, True, False, True]
    assert core.response_mask(torch.tensor([[5, 9, 3]]), [9, 3]).tolist() == [[1, 1, 0]]  # several EOS ids


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_estimators(batch, name):
    ref = {"k1": lambda p, q: p - q, "k2": lambda p, q: 0.5 * (p - q) ** 2,
           "k3": lambda p, q: math.exp(q - p) - 1 - (q - p)}[name]
    got = kl.KL_ESTIMATORS[name](batch["logp"], batch["ref"])
    for b in range(B):
        for t in range(T):
            assert got[b, t].item() == pytest.approx(ref(batch["logp"][b, t].item(), batch["ref"][b, t].item()),
                                                     rel=1e-5, abs=1e-6)


def test_rewards_put_the_score_on_the_last_real_token_and_nothing_after_eos(batch):
    coef = 0.1
    placed = shaping.place_scores(batch["scores"], batch["mask"])
    rewards = kl.kl_reward_penalty(placed, batch["logp"], batch["ref"], batch["mask"], coef, "k1")
    per_token = kl.kl_per_token(batch["logp"], batch["ref"], batch["mask"], "k1")
    for b, n in enumerate(batch["lengths"]):
        for t in range(T):
            expected = 0.0
            if t < n:
                expected = -coef * (batch["logp"][b, t].item() - batch["ref"][b, t].item())
                if t == n - 1:
                    expected += batch["scores"][b].item()
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6), (b, t)
            if t >= n:
                assert per_token[b, t].item() == 0.0
    assert rewards[3].abs().sum() == 0  # no response token: no score anywhere
    assert rewards[2, 0].item() == pytest.approx(
        batch["scores"][2].item() - coef * (batch["logp"][2, 0] - batch["ref"][2, 0]).item(), abs=1e-6)


def test_masked_whiten_and_stats(batch):
    x, mask = batch["adv"], batch["mask"]
    vals = [x[b, t].item() for b in range(B) for t in range(T) if mask[b, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    assert core.masked_mean(x, mask).item() == pytest.approx(mean, abs=1e-6)
    assert core.masked_var(x, mask).item() == pytest.approx(var, rel=1e-5)
    white = core.masked_whiten(x, mask)
    for b in range(B):
        for t in range(T):
            want = (x[b, t].item() - mean) / math.sqrt(var + 1e-8) if mask[b, t] else 0.0
            assert white[b, t].item() == pytest.approx(want, abs=1e-5)
    kept = core.masked_whiten(x, mask, shift_mean=False)  # rescaled, mean kept
    for b in range(B):
        for t in range(T):
            want = (x[b, t].item() - mean) / math.sqrt(var + 1e-8) + mean if mask[b, t] else 0.0
            assert kept[b, t].item() == pytest.approx(want, abs=1e-5)
    assert core.masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0  # empty mask: 0, not NaN


def test_policy_loss_matches_a_plain_loop(batch):
    clip = 0.2
    per_token, stats = policy.ppo_clip(batch["logp"], batch["old_logp"], batch["adv"], batch["mask"], clip, clip)
    loss = policy.aggregate(per_token, batch["mask"], "token_mean")
    terms, clipped, kls = [], [], []
    for b in range(B):
        for t in range(T):
            if not batch["mask"][b, t]:
                continue
            ratio = math.exp(batch["logp"][b, t].item() - batch["old_logp"][b, t].item())
            a = batch["adv"][b, t].item()
            u, c = -a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip)
            terms.append(max(u, c))
            clipped.append(1.0 if c > u else 0.0)
            kls.append((ratio - 1) - math.log(ratio))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped), abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(sum(kls) / len(kls), rel=1e-4)


def test_policy_loss_gradient_vanishes_where_clipped():
    logp = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratios e^0.5 and e^-0.5 against old 0
    per_token, _ = policy.ppo_clip(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2, 0.2)
    loss = policy.aggregate(per_token, torch.ones(1, 2), "token_mean")
    loss.backward()
    assert logp.grad.abs().sum().item() == 0.0  # both are beyond the clip in the direction of the advantage


def test_value_loss_matches_a_plain_loop(batch):
    c = 0.2
    values = batch["old_values"] + torch.randn(B, T) * 0.5
    loss, stats = policy.value_loss(values, batch["old_values"], batch["returns"], batch["mask"], c)
    terms, frac = [], []
    for b in range(B):
        for t in range(T):
            if not batch["mask"][b, t]:
                continue
            v, old, r = values[b, t].item(), batch["old_values"][b, t].item(), batch["returns"][b, t].item()
            vc = old + min(max(v - old, -c), c)
            terms.append(max((v - r) ** 2, (vc - r) ** 2))
            frac.append(1.0 if (vc - r) ** 2 > (v - r) ** 2 else 0.0)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-5)
    assert stats["vf_clipfrac"].item() == pytest.approx(sum(frac) / len(frac), abs=1e-6)


def test_logprobs_use_the_sampling_temperature():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    got = core.logprobs_from_logits(logits, tokens, temperature=0.7)
    for b in range(2):
        for t in range(3):
            row = [v / 0.7 for v in logits[b, t].tolist()]
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            assert got[b, t].item() == pytest.approx(row[tokens[b, t]] - lse, abs=1e-5)
    ent = core.entropy_from_logits(logits, 0.7)
    p = torch.softmax(logits[0, 0] / 0.7, -1).tolist()
    assert ent[0, 0].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-5)


def test_sft_loss_counts_only_answer_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 5, 9, generator=g)
    tokens = torch.tensor([[3, 4, 5, 6, 0]])
    answer = torch.tensor([[0, 0, 1, 1, 0]])  # tokens 5 and 6 are the answer; 0 is a pad
    nll = []
    for t in (2, 3):
        row = logits[0, t - 1].tolist()
        m = max(row)
        nll.append(-(row[tokens[0, t]] - m - math.log(sum(math.exp(v - m) for v in row))))
    assert sft_loss(logits, tokens, answer).item() == pytest.approx(sum(nll) / 2, rel=1e-5)


def test_adaptive_kl_controller_follows_the_reference_formula():
    ctl = kl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    value = 0.1
    for measured in (3.0, 12.0, 6.0, 100.0):
        ctl.update(measured, n_steps=256)
        value *= 1 + min(max(measured / 6.0 - 1, -0.2), 0.2) * 256 / 10000
        assert ctl.value == pytest.approx(value)
    fixed = kl.kl_controller(0.05, None, 10000)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


def test_running_moments_equal_the_statistics_of_everything_seen():
    rng = random.Random(0)
    seen = [rng.gauss(3, 2) for _ in range(10)]
    rm = shaping.RunningMoments(mean=sum(seen) / 10, var=sum((x - sum(seen) / 10) ** 2 for x in seen) / 10, count=10)
    for _ in range(4):
        batch = [rng.gauss(-1, 0.5) for _ in range(7)]
        seen += batch
        rm.update(torch.tensor(batch))
    mean = sum(seen) / len(seen)
    assert rm.mean == pytest.approx(mean)
    assert rm.var == pytest.approx(sum((x - mean) ** 2 for x in seen) / len(seen))
    assert rm.count == len(seen)


def test_explained_variance(batch):
    mask = batch["mask"]
    ret = batch["returns"]
    assert core.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    mean_only = torch.full_like(ret, core.masked_mean(ret, mask).item())
    assert core.explained_variance(mean_only, ret, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_asymmetric_clipping_and_the_clip_fractions_at_each_bound():
    # ratios e^0.25 (above 1 + 0.2, below 1 + 0.3) and e^-0.25 (below 1 - 0.2)
    logp = torch.tensor([[0.25, -0.25, 0.25, -0.25]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4)
    per_token, stats = policy.ppo_clip(logp, torch.zeros(1, 4), adv, mask, cliprange_low=0.2, cliprange_high=0.3)
    policy.aggregate(per_token, mask, "token_mean").backward()
    # token 0: A > 0 and ratio 1.28 < 1.3: not clipped (clip-higher lets it grow); token 1: A < 0, ratio 0.78 < 0.8:
    # clipped at the low bound; tokens 2 and 3 move against their advantage: never clipped
    assert logp.grad[0].tolist() == pytest.approx([-math.exp(0.25) / 4, 0.0, math.exp(0.25) / 4,
                                                   -math.exp(-0.25) / 4], rel=1e-5)
    assert stats["clipfrac_low"].item() == pytest.approx(0.25) and stats["clipfrac_high"].item() == 0.0
    _, symmetric = policy.ppo_clip(logp.detach(), torch.zeros(1, 4), adv, mask, 0.2, 0.2)
    assert symmetric["clipfrac_high"].item() == pytest.approx(0.25)  # with 0.2 above, token 0 is clipped too


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_loss_aggregations_match_plain_loops(batch, mode):
    loss, mask = batch["adv"], batch["mask"]
    rows = [[loss[b, t].item() for t in range(T) if mask[b, t]] for b in range(B)]
    if mode == "token_mean":
        flat = [x for r in rows for x in r]
        want = sum(flat) / len(flat)
    elif mode == "seq_mean_token_mean":
        want = sum(sum(r) / max(len(r), 1) for r in rows) / B
    else:
        want = sum(sum(r) for r in rows) / B
    assert policy.aggregate(loss, mask, mode).item() == pytest.approx(want, rel=1e-5)


def test_length_penalties():
    lengths = torch.tensor([10, 12, 14, 16])
    # buffer 4 before the limit of 16: nothing up to 12, then linear to -2 at 16
    assert shaping.overlong_penalty(lengths, 16, 4, 2.0).tolist() == pytest.approx([0.0, 0.0, -1.0, -2.0])
    assert shaping.overlong_penalty(lengths, 16, 0, 2.0).tolist() == [0.0] * 4
    scores = torch.tensor([1.0, 1.0])
    assert shaping.missing_eos_penalty(scores, torch.tensor([True, False]), 0.5).tolist() == [1.0, 0.5]


def test_logprobs_and_entropy_in_one_pass_equal_the_two_functions():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 13, generator=g, requires_grad=True)
    tokens = torch.randint(0, 13, (2, 4), generator=g)
    logp, ent = core.logprobs_and_entropy(logits, tokens, 0.8)
    torch.testing.assert_close(logp, core.logprobs_from_logits(logits, tokens, 0.8))
    torch.testing.assert_close(ent, core.entropy_from_logits(logits, 0.8))
    assert logp.requires_grad and not ent.requires_grad


def test_logprobs_row_by_row_equal_the_whole_batch_on_a_slice_with_the_same_gradient():
    """The trainers pass logits[:, :-1] (not contiguous), in bf16 or fp32: the row-by-row log-softmax gives the
    values and the gradient of the whole batch's, and an empty batch gives an empty answer."""
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        full = torch.randn(3, 6, 17, generator=g).to(dtype).requires_grad_(True)
        tokens = torch.randint(0, 17, (3, 5), generator=g)
        got = core.logprobs_from_logits(full[:, :-1], tokens, 0.9)
        want = torch.log_softmax(full[:, :-1].float() / 0.9, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (grad_got,) = torch.autograd.grad(got.sum(), full)
        (grad_want,) = torch.autograd.grad(want.sum(), full)
        torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=0)
        assert got.dtype == torch.float32
    empty = core.logprobs_from_logits(torch.zeros(0, 4, 17), torch.zeros(0, 4, dtype=torch.long))
    assert empty.shape == (0, 4)
