"""Run under torchrun (2 ranks) by tests/engines/test_hybrid.py: for ZeRO stages x fine-tuning types on the first
architecture (ZeRO-3 alone on the others), check the hybrid engine against plain generation and a never-switched
engine; rank 0 writes JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/hybrid_check.py OUT.json MODEL_DIR...
"""
import copy
import json
import sys

import torch

from rlhf_ds import dist
from rlhf_ds.args import FinetuningArguments
from rlhf_ds.engines.ds_config import EngineSettings, engine_config
from rlhf_ds.engines.factory import create_train_engine
from rlhf_ds.engines.sampling import SamplingSettings
from rlhf_ds.engines.ds_compat import zero3_hook_counts
from rlhf_ds.engines import hybrid as hybrid_module
from rlhf_ds.engines.hybrid import HybridEngine
from rlhf_ds.models.finetuning import apply_finetuning
from rlhf_ds.models.loading import disable_dropout


def build(model_dir: str, finetuning: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = apply_finetuning(model, FinetuningArguments(finetuning_type=finetuning, lora_dropout=0.0),
                             task_type="CAUSAL_LM")
    if finetuning == "lora":  # non-zero adapters, so merging them changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.3)
    disable_dropout(model)  # as the PPO actor does (OPT's config has dropout 0.1)
    return model


def engine_for(model, stage: int):
    cfg = engine_config(EngineSettings(micro_batch=2, lr=1e-2, stage=stage, world_size=dist.world_size(),
                                       persistence_threshold=0), trainable=True)
    return create_train_engine(model, cfg, scheduler_type="constant", warmup_steps=0, total_steps=10)


def snapshot(engine) -> list[torch.Tensor]:
    """This rank's copy of every parameter: the ZeRO-3 partition, or the whole tensor."""
    return [(p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach().clone() for p in engine.module.parameters()]


def train_step(engine, inputs: dict) -> tuple[float, list[torch.Tensor]]:
    from deepspeed.utils import safe_get_full_grad

    out = engine(**inputs)
    engine.backward(out.loss)
    grads = [safe_get_full_grad(p).clone() for p in engine.module.parameters() if p.requires_grad]
    engine.step()
    return out.loss.item(), grads


def round_trip(model_dir: str, stage: int, finetuning: str, gather_layers: int, prompts, mask,
               settings: SamplingSettings, train_inputs: dict) -> dict:
    """Generate with the hybrid engine and with plain `generate` on the same weights outside DeepSpeed, then take a
    training step and compare it with an engine that never switched. Returns every rank's findings."""
    model = build(model_dir, finetuning)
    plain = copy.deepcopy(model).eval()  # the same weights, outside DeepSpeed
    engine = engine_for(model, stage)
    hybrid = HybridEngine(engine, gather_layers=gather_layers, merge_lora="on")
    before = snapshot(engine)
    hooks = zero3_hook_counts(engine) if stage == 3 else None
    linear = torch.nn.functional.linear  # ZeRO-3's memory-efficient linear, swapped out while generating
    ours = hybrid.generate(prompts, mask, settings)
    # each prompt twice, as GRPO's groups come: the prompt is read once and its cache repeated (shared_prompt_cache)
    shared = []
    spy = hybrid_module.shared_prompt_cache
    hybrid_module.shared_prompt_cache = lambda *a: shared.append(spy(*a)) or shared[-1]
    try:
        grouped = hybrid.generate(prompts.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), settings, group=2)
    finally:
        hybrid_module.shared_prompt_cache = spy
    with torch.no_grad():
        ref = plain.generate(input_ids=prompts, attention_mask=mask, generation_config=settings.generation_config())
    ref = ref[:, prompts.shape[1]:]
    after = snapshot(engine)
    weight_diff = max((a - b).abs().max().item() for a, b in zip(before, after) if a.numel())
    hooks_after = zero3_hook_counts(engine) if stage == 3 else None
    hooks_kept = hooks == hooks_after and torch.nn.functional.linear is linear

    loss_switched, grads_switched = train_step(engine, train_inputs)
    never = engine_for(build(model_dir, finetuning), stage)
    loss_never, grads_never = train_step(never, train_inputs)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads_switched, grads_never))
    result = {"same_tokens": bool(torch.equal(ours, ref)), "new_tokens": ours.shape[1],
              "grouped_same_tokens": bool(torch.equal(grouped, ref.repeat_interleave(2, 0))),
              "prompt_shared": len(shared) == 1 and shared[0] is not None,
              "weight_diff": weight_diff, "hooks_kept": hooks_kept,
              "loss_diff": abs(loss_switched - loss_never), "grad_diff": grad_diff}
    return {k: v for k, v in zip(range(dist.world_size()), dist.all_gather_object(result))}


def check(model_dir: str, stage: int, finetuning: str, gather_layers: int = 0) -> dict:
    rank = dist.rank()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own prompts
    prompts = torch.randint(10, 1900, (2, 6), generator=g)
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # a left-padded row
    prompts[1, :2] = 0
    # ranks stop at different lengths: without collectives during decoding, nobody waits for anybody
    settings = SamplingSettings(max_new_tokens=5 + 4 * rank, eos_token_ids=[2], pad_token_id=0, do_sample=False)
    batch = torch.randint(10, 1900, (2, 8), generator=torch.Generator().manual_seed(7 + rank))
    train_inputs = {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch}
    return round_trip(model_dir, stage, finetuning, gather_layers, prompts, mask, settings, train_inputs)


def main() -> None:
    out, model_dirs = sys.argv[1], sys.argv[2:]
    dist.init_distributed()
    results = {}
    for i, model_dir in enumerate(model_dirs):
        name = model_dir.rstrip('/').split('/')[-1]
        # the first architecture under both stages and in the memory-short mode; the others under ZeRO-3, where
        # the switch does the most (gathering partitioned parameters and swapping ZeRO-3's linear)
        for stage in (2, 3) if i == 0 else (3,):
            for finetuning in ("lora", "full"):
                results[f"{name}|zero{stage}|{finetuning}"] = check(model_dir, stage, finetuning)
        if i == 0:  # memory-short mode: one block gathered at a time on every decode step (collectives while decoding)
            results[f"{name}|zero3-layers|lora"] = check(model_dir, 3, "lora", 1)
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.shutdown(0)


if __name__ == "__main__":
    main()
