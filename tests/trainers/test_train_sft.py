"""The SFT stage: only answer tokens count in the loss, and a tiny model learns through launch/train_sft.py."""
import json

import torch

from conftest import check_ok, read_jsonl
from rlhf_ds.algo.losses import sft_loss
from rlhf_ds.data.collate import SFTCollator


def test_loss_mask_covers_the_answer_tokens_only():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "prompt_len": 3}, {"input_ids": [5, 6, 7], "prompt_len": 1}]
    batch = SFTCollator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]


def test_prompt_and_padding_positions_do_not_change_the_loss():
    batch = SFTCollator(pad_id=0)([{"input_ids": [5, 6, 7, 8, 9], "prompt_len": 3},
                                   {"input_ids": [5, 6, 7], "prompt_len": 1}])
    logits = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    base = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    # logits at position t predict token t+1: positions 0-1 of row 0 predict prompt tokens, 3-4 of row 1 are padding
    changed = logits.clone()
    changed[0, :2] += 5.0
    changed[1, 2:] -= 3.0
    changed[0, 4] += 9.0  # the last position predicts nothing
    assert torch.allclose(sft_loss(changed, batch["input_ids"], batch["loss_mask"]), base)
    changed[0, 2, 8] += 4.0  # predicts the first answer token of row 0: counts
    assert not torch.allclose(sft_loss(changed, batch["input_ids"], batch["loss_mask"]), base)


def test_sft_learns_and_writes_what_ppo_takes(tiny_llama, forked_cli, tmp_path):
    # the random tiny model's logits are near zero, so the adapters must reach lm_head for the loss to move fast
    out = tmp_path / "sft"
    check_ok(forked_cli.run(
        "train_sft.py", "--model_name_or_path", str(tiny_llama), "--do_train", "--dataset", "alpaca_gpt4_zh",
        "--finetuning_type", "lora", "--lora_target", "q_proj,v_proj,down_proj,lm_head", "--output_dir", str(out),
        "--do_eval",
        "--eval_before_train", "--val_size", "32", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
        "--num_train_epochs", "1", "--logging_steps", "1", "--max_length", "128", "--disable_tqdm", "--plot_loss"))
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, losses
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_perplexity"] < results["init_eval_perplexity"] and results["eval_samples"] == 32
    assert (out / "adapter_config.json").exists() and (out / "train_results.json").exists()
