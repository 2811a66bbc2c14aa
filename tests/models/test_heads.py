"""The reward/value head scores the last real token, whatever the padding, and survives save and reload."""
import pytest
import torch

from rlhf_ds.algo.sequence import pad_sequences
from rlhf_ds.models.heads import ScalarHeadModel, load_scalar_model, save_scalar_model
from rlhf_ds.models.loading import load_backbone, load_tokenizer


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_score_is_independent_of_padding_side(fixture, request):
    path = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    model = ScalarHeadModel(load_backbone(path, torch.float32)).eval()
    seqs = [[11, 12, 13, 14, 15, 16], [21, 22], [31, 32, 33, 34]]
    with torch.no_grad():
        alone = torch.stack([model.score(*pad_sequences([s], 0, "right")) for s in seqs]).squeeze(-1)
        right = model.score(*pad_sequences(seqs, 0, "right"))
        left = model.score(*pad_sequences(seqs, 0, "left"))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)


def test_head_depends_on_the_last_token_only_through_the_backbone(tiny_gpt2):
    """Changing a pad token id must not change the score (pads are masked); changing the last real token must."""
    model = ScalarHeadModel(load_backbone(tiny_gpt2, torch.float32)).eval()
    ids, mask = pad_sequences([[5, 6, 7], [8, 9]], 0, "right")
    with torch.no_grad():
        base = model.score(ids, mask)
        ids2 = ids.clone()
        ids2[1, 2] = 77  # a pad position
        assert torch.allclose(model.score(ids2, mask), base, atol=1e-6)
        ids3 = ids.clone()
        ids3[1, 1] = 77  # the last real token of row 1
        assert not torch.allclose(model.score(ids3, mask)[1], base[1])


def test_pad_token_is_never_eos(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"


def test_save_and_reload_full_and_lora(tiny_llama, tmp_path):
    from rlhf_ds.args import FinetuningArguments
    from rlhf_ds.models.finetuning import apply_finetuning

    ids, mask = pad_sequences([[5, 6, 7], [8, 9]], 0, "right")
    for ft in ("full", "lora"):
        torch.manual_seed(1)
        backbone = apply_finetuning(load_backbone(tiny_llama, torch.float32), FinetuningArguments(finetuning_type=ft))
        model = ScalarHeadModel(backbone).eval()
        if ft == "lora":  # make the adapter matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0, 0.1)
        out = tmp_path / ft
        save_scalar_model(model, model.state_dict(), out, {"base_model": str(tiny_llama), "template": "chat"})
        loaded, meta = load_scalar_model(out, torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval().score(ids, mask), model.score(ids, mask))
        assert (out / "adapter_config.json").exists() == (ft == "lora")
