"""Every preference loss against its paper's formula, on hand-made log-probabilities, one pair at a time."""
import math

import pytest
import torch

from rlhf_ds.algo.preference import PREFERENCE_LOSSES

# policy chosen, policy rejected, reference chosen, reference rejected (summed log-probs), answer lengths
PAIRS = [(-12.0, -15.0, -13.0, -14.0, 6, 5), (-30.5, -22.0, -29.0, -25.5, 12, 9), (-4.0, -4.0, -4.0, -4.0, 2, 2)]
BETA = 0.3


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def formula(name, pc, pr, rc, rr, lc, lr, eps=0.0, gamma=0.5):
    h = (pc - pr) - (rc - rr)
    if name == "sigmoid":
        return -(1 - eps) * logsig(BETA * h) - eps * logsig(-BETA * h), BETA * (pc - rc), BETA * (pr - rr)
    if name == "ipo":
        h_avg = (pc / lc - pr / lr) - (rc / lc - rr / lr)
        return (h_avg - 1 / (2 * BETA)) ** 2, BETA * (pc - rc), BETA * (pr - rr)
    if name == "hinge":
        return max(0.0, 1 - BETA * h), BETA * (pc - rc), BETA * (pr - rr)
    if name == "simpo":
        return -logsig(BETA * pc / lc - BETA * pr / lr - gamma), BETA * pc / lc, BETA * pr / lr
    if name == "orpo":
        def log_odds(avg):
            return avg - math.log(1 - math.exp(avg))
        ac, ar = pc / lc, pr / lr
        return -ac - BETA * logsig(log_odds(ac) - log_odds(ar)), BETA * ac, BETA * ar
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "simpo_gamma": 1.0}])
def test_each_loss_matches_its_formula(name, options):
    cols = [torch.tensor([float(p[i]) for p in PAIRS]) for i in range(6)]
    losses, chosen, rejected = PREFERENCE_LOSSES[name](*cols, beta=BETA, **options)
    for k, pair in enumerate(PAIRS):
        want = formula(name, *pair, eps=options.get("label_smoothing", 0.0), gamma=options.get("simpo_gamma", 0.5))
        assert losses[k].item() == pytest.approx(want[0], rel=1e-5, abs=1e-6), (name, k)
        assert chosen[k].item() == pytest.approx(want[1], rel=1e-5) and rejected[k].item() == pytest.approx(
            want[2], rel=1e-5)


def test_the_reference_free_losses_say_so_and_gradients_push_chosen_up():
    assert not PREFERENCE_LOSSES["simpo"].needs_reference and not PREFERENCE_LOSSES["orpo"].needs_reference
    assert PREFERENCE_LOSSES["sigmoid"].needs_reference
    for name in PREFERENCE_LOSSES:
        pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-9.0], requires_grad=True)
        losses, _, _ = PREFERENCE_LOSSES[name](pc, pr, torch.tensor([-10.0]), torch.tensor([-10.0]),
                                               torch.tensor([5.0]), torch.tensor([5.0]), beta=BETA)
        losses.sum().backward()
        assert pc.grad.item() < 0 and pr.grad.item() > 0, name  # descent raises chosen, lowers rejected
