"""The hybrid engine's two decode speed-ups (engines/hybrid.py) against what they replace: InverseCDFSampler draws
from the same distribution as transformers' warpers + torch.multinomial, and the single-token attention equals
transformers' SDPA attention."""
import pytest
import torch

from rlhf_ds.engines.hybrid import InverseCDFSampler, _cpu_decode_attention


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (0.9, 5, 0.9)])
def test_inverse_cdf_draws_follow_the_warped_distribution(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    logits[0, 3] = float("-inf")  # a suppressed token (e.g. EOS before min_new_tokens)
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = torch.softmax(warped, -1)[0]
    n = 40000
    scores = InverseCDFSampler(temperature, top_k, top_p)(None, logits.expand(n, -1).clone())
    assert ((scores == 0).sum(-1) == 1).all() and torch.isinf(scores).sum() == n * 11  # one-hot rows
    counts = torch.bincount(scores.argmax(-1), minlength=12).float()
    assert counts[expected == 0].sum() == 0  # never a token the warpers removed
    observed = counts / n
    assert torch.allclose(observed, expected, atol=0.012), (observed, expected)
    # as close as torch.multinomial's own draws are
    reference = torch.bincount(torch.multinomial(expected, n, replacement=True), minlength=12).float() / n
    assert (observed - expected).abs().max() < (reference - expected).abs().max() + 0.01


@pytest.mark.parametrize("heads,kv_heads,mask", [(4, 4, "bool"), (6, 2, "bool"), (6, 3, "float"), (4, 2, None)])
def test_single_token_attention_equals_sdpa(heads, kv_heads, mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(1)
    b, length, dim = 3, 17, 16
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = heads // kv_heads, True, False
    q = torch.randn(b, heads, 1, dim)
    k, v = torch.randn(b, kv_heads, length, dim), torch.randn(b, kv_heads, length, dim)
    keep = torch.ones(b, 1, 1, length, dtype=torch.bool)
    keep[0, ..., :5] = False  # left padding
    keep[2, ..., :2] = False
    attention_mask = None if mask is None else keep if mask == "bool" else torch.zeros_like(keep, dtype=q.dtype
                                                                                            ).masked_fill(~keep, -1e9)
    want, _ = sdpa_attention_forward(module, q, k, v, attention_mask, scaling=0.3)
    got, weights = _cpu_decode_attention(module, q, k, v, attention_mask, scaling=0.3)
    assert weights is None and got.shape == want.shape == (b, 1, heads, dim)
    assert torch.allclose(got, want, atol=1e-6)
    # anything it does not handle goes to SDPA unchanged
    prefill = torch.randn(b, heads, 4, dim)
    assert torch.equal(_cpu_decode_attention(module, prefill, k[..., :4, :], v[..., :4, :], None)[0],
                       sdpa_attention_forward(module, prefill, k[..., :4, :], v[..., :4, :], None)[0])
