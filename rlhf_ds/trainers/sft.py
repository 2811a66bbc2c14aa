"""SFT stage: supervised fine-tuning on instruction data, the loss on the answer tokens only.

The life of the run is trainers/base.py and its step trainers/supervised.py; this file says what is particular to
SFT. Its --output_dir (a LoRA adapter or a full model folder, with the tokenizer) is what the online trainers'
--sft_model and train_dpo.py take.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from rlhf_ds import dist
from rlhf_ds.algo.losses import sft_loss, token_nll
from rlhf_ds.algo.sequence import position_ids_from_mask
from rlhf_ds.args import STAGE_GROUPS
from rlhf_ds.flag_parsing import parse_args
from rlhf_ds.models.saving import gather_state_dict, save_causal_lm
from rlhf_ds.data.collate import SFTCollator, even_shards
from rlhf_ds.data.loading import tokenize_sft
from rlhf_ds.models.finetuning import apply_finetuning, is_lora
from rlhf_ds.models.loading import load_causal_lm
from rlhf_ds.tracking import progress
from rlhf_ds.trainers.supervised import SupervisedTrainer

logger = logging.getLogger("rlhf_ds.sft")


class SFTTrainer(SupervisedTrainer):
    name = "SFT"
    kind = "sft"
    unit = "examples"

    def tokenize(self, examples, name: str):
        return tokenize_sft(examples, self.tokenizer, self.template, self.max_length, self.report, name=name)

    def make_collator(self) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id)

    def loader_columns(self) -> list[str]:
        return ["input_ids", "prompt_len"]

    def build_model(self) -> torch.nn.Module:
        model = load_causal_lm(self.model_path, self.precision.dtype, self.ds_config)
        if self.model_args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return apply_finetuning(model, self.ft_args, task_type="CAUSAL_LM")

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        return self.engine(input_ids=batch["input_ids"], attention_mask=mask,
                           position_ids=position_ids_from_mask(mask), use_cache=False).logits

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return sft_loss(self._logits(batch), batch["input_ids"], batch["loss_mask"]), {}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Token-level loss and perplexity of the answers in the held-out split."""
        self.engine.eval()
        device = dist.device()
        batches = even_shards(len(self.eval_set), dist.rank(), dist.world_size(), self.rt.per_device_eval_batch_size)
        totals = torch.zeros(2, dtype=torch.float64)  # summed NLL, answer tokens
        bar = progress(len(batches), "evaluating", disable=self.rt.disable_tqdm, unit="batch")
        for indices, n_real in batches:
            batch = {k: v.to(device) for k, v in self.collator([self.eval_set[i] for i in indices]).items()}
            nll, mask = token_nll(self._logits(batch), batch["input_ids"], batch["loss_mask"])
            totals += torch.tensor([nll[:n_real].sum().item(), mask[:n_real].sum().item()], dtype=torch.float64)
            bar.update(1)
        bar.close()
        self.engine.train()
        nll_sum, tokens = dist.all_reduce_sum(totals).tolist()
        loss = nll_sum / max(tokens, 1)
        results = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_samples": len(self.eval_set),
                   "eval_tokens": int(tokens)}
        self.metrics.update(results)
        self.tracker.log(results, step, kind="eval")
        logger.info("eval: loss %.4f perplexity %.2f on %d examples (%d answer tokens)", loss,
                    results["eval_perplexity"], len(self.eval_set), tokens)
        return results

    def gather_models(self) -> dict[str, torch.Tensor] | None:
        return gather_state_dict(self.engine, trainable_only=is_lora(self.engine.module))

    def write_models(self, folder: Path, state: dict[str, torch.Tensor], final: bool) -> None:
        save_causal_lm(self.engine.module, state, folder if final else folder / "model", self.tokenizer)


def main(argv: list[str] | None = None) -> int:
    return SFTTrainer(*parse_args(*STAGE_GROUPS, argv=argv, unused="sft")).run()
