"""Benchmarks behind launch/bench_generation.py and launch/bench_ppo.py. Each prints one JSON line of figures.

Generation: the same model, prompts and settings, in one run, generated three ways — (a) `engine.module.generate`
of a ZeRO-3 engine (plain), (b) our hybrid engine around the same engine, (c) plain Hugging Face generate of the
same weights without DeepSpeed — reported as tokens/s over all ranks and the ratios b/a and b/c.

PPO step: a fixed tiny workload that other trainers can run too — a random OPT-style model (vocab 8192, hidden
256, 6 layers, 4 heads, FFN 1024, about 7M parameters) as actor and reference, the same backbone with a scalar
head as critic and reward; per process 4 prompts of 64 tokens, 64 new tokens with EOS suppressed, one PPO epoch
over one micro-batch, bf16, OMP_NUM_THREADS=1; 2 warm-up steps, then the median of 10 steps.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dataclasses import dataclass

import torch

from rlhf_ds import dist
from rlhf_ds.engines.sampling import SamplingSettings

@dataclass
class FixedLengthSampling(SamplingSettings):
    """Benchmarks only: EOS suppressed, so every answer runs to max_new_tokens and both sides time the same work."""

    def generation_kwargs(self) -> dict:
        return {**super().generation_kwargs(), "suppress_tokens": list(self.eos_token_ids), "eos_token_id": None,
                "min_new_tokens": self.max_new_tokens}


OPT_7M = dict(arch="opt", hidden=256, layers=6, heads=4, ffn=1024, max_positions=512)
VOCAB = 8192


def workload_model(root: Path) -> tuple[Path, Path]:
    """The benchmark's random OPT-style policy and a reward model on the same backbone (rank 0 builds them)."""
    from rlhf_ds.models import tiny
    from rlhf_ds.models.heads import ScalarHeadModel, save_scalar_model
    from rlhf_ds.models.loading import load_backbone, load_tokenizer

    policy, reward = root / "policy", root / "reward"
    if not (reward / "value_head.json").exists():
        tiny.train_tokenizer(root / "tokenizer", vocab_size=VOCAB, chat=False)
        tiny.make_model(policy, root / "tokenizer", **OPT_7M)
        torch.manual_seed(1)
        model = ScalarHeadModel(load_backbone(policy, torch.float32))
        save_scalar_model(model, model.state_dict(), reward,
                          {"kind": "reward", "base_model": str(policy), "finetuning_type": "full",
                           "template": "plain", "max_length": 128, "precision": "bf16"}, load_tokenizer(policy))
    return policy, reward


def machine() -> dict[str, Any]:
    """What a figure was measured on, recorded in every benchmark line: the device, and for a CPU its model name,
    the flags that decide matrix speed and whether oneDNN has bf16 kernels for it."""
    from rlhf_ds.engines.precision import cpu_description, on_cuda

    if on_cuda():
        return {"device": torch.cuda.get_device_name()}
    return {"device": "cpu", "cpu": cpu_description()}


def _timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() over all ranks (each run starts and ends at a barrier)."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.time()
        fn()
        dist.barrier()
        times.append(time.time() - t0)
    return statistics.median(times)


def bench_generation(model: str, batch: int, prompt: int, new_tokens: int, repeats: int, bf16: bool,
                     persistence_threshold: int, samples: int = 1) -> dict[str, Any]:
    """With `samples` > 1 each of the `batch` prompts comes `samples` times (GRPO's groups), and the hybrid engine
    is timed reading each prompt once (its default) against prefilling every copy."""
    from transformers import AutoModelForCausalLM

    from rlhf_ds.engines.ds_config import EngineSettings, engine_config
    from rlhf_ds.engines.factory import create_train_engine
    from rlhf_ds.engines.precision import resolve_precision
    from rlhf_ds.engines.generation import PlainGenerator
    from rlhf_ds.engines.hybrid import HybridEngine
    from rlhf_ds.models.loading import load_tokenizer, resolve_model_path

    dist.init_distributed()
    root = Path(tempfile.gettempdir()) / "rlhf_ds_bench"
    with dist.main_process_first():
        path = workload_model(root)[0] if model == "opt-7m" else resolve_model_path(model)
    precision = resolve_precision(bf16=bf16, model_dir=path)
    dtype = precision.dtype
    net = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tok = load_tokenizer(path)
    # the Hugging Face baseline runs where the prompts are (on CUDA: the GPU; the engine below moves `net` itself)
    plain_hf = copy.deepcopy(net).to(dist.device()).eval()
    cfg = engine_config(EngineSettings(micro_batch=batch, precision=precision.name, stage=3, lr=1e-5,
                                       world_size=dist.world_size(), persistence_threshold=persistence_threshold),
                        trainable=True)
    engine = create_train_engine(net, cfg, scheduler_type="constant", warmup_steps=0, total_steps=1)
    g = torch.Generator().manual_seed(dist.rank())
    ids = torch.randint(10, len(tok) - 10, (batch, prompt), generator=g).repeat_interleave(samples, 0)
    ids = ids.to(dist.device())
    mask = torch.ones_like(ids)
    settings = FixedLengthSampling(max_new_tokens=new_tokens, eos_token_ids=[tok.eos_token_id],
                                   pad_token_id=tok.pad_token_id, do_sample=False)
    plain, hybrid = PlainGenerator(engine), HybridEngine(engine)
    config = settings.generation_config()

    def hf() -> None:
        with torch.no_grad():
            plain_hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    runs = {"zero3_plain": lambda: plain.generate(ids, mask, settings),
            "zero3_hybrid": lambda: hybrid.generate(ids, mask, settings), "hf_plain": hf}
    if samples > 1:  # the shared prefill against none, both through the hybrid engine
        runs = {"zero3_hybrid": lambda: hybrid.generate(ids, mask, settings, group=samples),
                "zero3_hybrid_every_copy": lambda: hybrid.generate(ids, mask, settings)}
    seconds = {}
    for name, fn in runs.items():
        fn()  # warm-up
        seconds[name] = _timed(fn, repeats)
    tokens = batch * samples * new_tokens * dist.world_size()
    tps = {k: tokens / v for k, v in seconds.items()}
    result = {"bench": "generation", "model": model, "parameters": sum(p.numel() for p in plain_hf.parameters()),
              "world_size": dist.world_size(), "zero_stage": 3,
              "stage3_param_persistence_threshold": persistence_threshold, "batch_per_rank": batch,
              "samples_per_prompt": samples, "prompt_tokens": prompt, "new_tokens": new_tokens,
              **precision.record(), **machine(), "tokens_per_second": {k: round(v, 1) for k, v in tps.items()},
              "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    if samples > 1:
        return {**result, "shared_prefill_speedup": round(tps["zero3_hybrid"] / tps["zero3_hybrid_every_copy"], 2)}
    return {**result, "hybrid_over_zero3_plain": round(tps["zero3_hybrid"] / tps["zero3_plain"], 2),
            "hybrid_over_hf": round(tps["zero3_hybrid"] / tps["hf_plain"], 2)}


def bench_ppo_worker(stage: int, hybrid: str, steps: int, warmup: int, algo: str = "ppo") -> dict[str, Any]:
    """One configuration of the step benchmark, run through the real online trainer: PPO (GAE, critic, KL in the
    reward) or GRPO (4 answers per prompt, no critic, no reference: the KL coefficient is 0 as in TRL's default)."""
    from dataclasses import asdict

    from rlhf_ds.args import GRPO_DEFAULTS, ONLINE_GROUPS, PPO_DEFAULTS
    from rlhf_ds.flag_parsing import parse_args
    from rlhf_ds.trainers.online.trainer import OnlineTrainer

    dist.init_distributed()
    root = Path(tempfile.gettempdir()) / "rlhf_ds_bench"
    with dist.main_process_first():
        policy, reward = workload_model(root)
    out = root / f"{algo}-zero{stage}-{hybrid}-{dist.world_size()}"
    samples = 4 if algo == "grpo" else 1
    argv = ["--model_name_or_path", str(policy), "--reward_model", str(reward), "--do_train", "--dataset",
            "alpaca_gpt4_zh", "--max_samples", "64", "--output_dir", str(out), "--overwrite_output_dir",
            "--finetuning_type", "full", "--template", "plain", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--ppo_epochs", "1", "--max_prompt_length", "64",
            "--max_new_tokens", "64", "--bf16", "--zero_stage", str(stage), "--hybrid_engine", hybrid,
            "--max_steps", str(steps + warmup), "--save_steps", "0", "--disable_tqdm", "--learning_rate", "1e-5",
            "--logging_steps", str(10 ** 6), "--n_samples_per_prompt", str(samples)]
    defaults = GRPO_DEFAULTS if algo == "grpo" else PPO_DEFAULTS
    trainer = OnlineTrainer(*parse_args(*ONLINE_GROUPS, argv=argv, unused="online",
                                        defaults=defaults))
    trainer.setup()
    trainer.maker.sampling = FixedLengthSampling(**asdict(trainer.maker.sampling))  # every answer 64 tokens
    g = torch.Generator().manual_seed(dist.rank())
    rows_by_key: dict[str, list[float]] = {"generation": [], "experience": [], "training": [], "total": []}
    for step in range(warmup + steps):
        rows = [{"prompt_ids": torch.randint(10, VOCAB - 10, (64,), generator=g).tolist(), "prompt_text": "",
                 "reference_text": "", "input_ids": [1, 2], "prompt_len": 1} for _ in range(4)]
        dist.barrier()
        t0 = time.time()
        stats = trainer.train_step([rows])
        dist.barrier()
        total = time.time() - t0
        assert stats["tokens"] == 4 * samples * 64, "every answer must have 64 tokens"
        if step >= warmup:
            rows_by_key["generation"].append(stats["time_gather"] + stats["time_generation"])
            rows_by_key["experience"].append(stats["time_experience"])
            rows_by_key["training"].append(stats["time_training"])
            rows_by_key["total"].append(total)
    medians = {f"{k}_s": round(statistics.median(v), 3) for k, v in rows_by_key.items()}
    return {"system": "rlhf_ds", "algo": algo, "zero_stage": stage, "world_size": dist.world_size(),
            "hybrid_engine": hybrid, "prompts_per_rank": 4, "samples_per_prompt": samples, **medians,
            **trainer.precision.record(), **machine()}


def bench_dpo_worker(stage: int, steps: int, warmup: int, precompute: bool = True,
                     share_prompt: str = "auto") -> dict[str, Any]:
    """One DPO optimizer step on the fixed workload: per rank 4 pairs of 64 prompt + 64 answer tokens (random ids),
    full fine-tuning of the random OPT-style model, DPO's sigmoid loss, the reference a frozen copy. With
    `precompute` the reference's log-probabilities come with the batch (train_dpo.py's default: computed once
    before training, not timed here); without it a reference forward runs every step."""
    from rlhf_ds.args import DPO_GROUPS
    from rlhf_ds.flag_parsing import parse_args
    from rlhf_ds.trainers.dpo import DPOTrainer

    dist.init_distributed()
    root = Path(tempfile.gettempdir()) / "rlhf_ds_bench"
    with dist.main_process_first():
        policy, _ = workload_model(root)
    out = root / f"dpo-zero{stage}-{dist.world_size()}"
    argv = ["--model_name_or_path", str(policy), "--do_train", "--dataset", "comparison_gpt4_en", "--max_samples",
            "64", "--output_dir", str(out), "--overwrite_output_dir", "--finetuning_type", "full", "--template",
            "plain", "--per_device_train_batch_size", "4", "--max_length", "128", "--bf16", "--zero_stage",
            str(stage), "--max_steps", str(steps + warmup), "--save_steps", "0", "--disable_tqdm",
            "--learning_rate", "1e-5", "--logging_steps", str(10 ** 6), "--no_precompute_ref_logps",
            "--share_prompt", share_prompt]
    trainer = DPOTrainer(*parse_args(*DPO_GROUPS, argv=argv))
    trainer.setup()
    g = torch.Generator().manual_seed(dist.rank())
    times = []
    for step in range(warmup + steps):
        rows = []
        for _ in range(4):
            prompt = torch.randint(10, VOCAB - 10, (64,), generator=g).tolist()
            rows.append({"chosen_ids": prompt + torch.randint(10, VOCAB - 10, (64,), generator=g).tolist(),
                         "rejected_ids": prompt + torch.randint(10, VOCAB - 10, (64,), generator=g).tolist(),
                         "chosen_prompt_len": 64, "rejected_prompt_len": 64})
        batch = trainer.collator(rows)
        if precompute:  # what --precompute_ref_logps put in the dataset before training
            device_batch = {k: v.to(dist.device()) for k, v in batch.items()}
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = trainer.reference.logprobs(
                device_batch).float().cpu().chunk(2)
        dist.barrier()
        t0 = time.time()
        trainer.train_step([batch])
        dist.barrier()
        if step >= warmup:
            times.append(time.time() - t0)
    return {"system": "rlhf_ds", "algo": "dpo", "zero_stage": stage, "world_size": dist.world_size(),
            "pairs_per_rank": 4, "reference": "precomputed" if precompute else "forward every step",
            "share_prompt": share_prompt,
            "step_s": round(statistics.median(times), 3), **trainer.precision.record(), **machine()}


def run_ppo_matrix(stages: list[int], worlds: list[int], hybrids: list[str], steps: int, warmup: int,
                   algo: str = "ppo", reference: str = "precomputed", share_prompt: str = "auto") -> dict:
    """Start one torchrun per configuration (OMP_NUM_THREADS=1) and collect their JSON lines."""
    results = []
    for world in worlds:
        for stage in stages:
            for hybrid in hybrids:
                with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                    result_file = f.name
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                       "--master_addr", "127.0.0.1", "--master_port", str(dist.free_port()), "-m", "rlhf_ds.cli",
                       "bench-ppo", "--worker", "--algo", algo, "--reference", reference, "--zero_stage", str(stage),
                       "--hybrid_engine", hybrid, "--share_prompt", share_prompt,
                       "--steps", str(steps), "--warmup", str(warmup), "--result_file", result_file]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", ""),
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
                env = {k: v for k, v in env.items() if v != "" and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                results.append(json.loads(Path(result_file).read_text()))
                Path(result_file).unlink()
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return {"bench": f"{algo}_step", "workload": "opt-7m, 4 prompts x 64 tokens per process, 64 new tokens, --bf16 "
                                             "(bf16 where the processor runs it fast, else fp32), "
                                             "OMP_NUM_THREADS=1, median of steps after warm-up",
            "steps": steps, "warmup": warmup, "results": results}


def main_generation(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bench_generation.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-7m", help="opt-7m (random, built here), a folder or a built-in name")
    parser.add_argument("--batch", type=int, default=4, help="prompts per rank")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per prompt (EOS suppressed)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    parser.add_argument("--samples_per_prompt", type=int, default=1,
                        help="each prompt this many times (GRPO): time the hybrid engine's shared prefill against none")
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of --bf16 (bf16 where it is fast)")
    parser.add_argument("--stage3_param_persistence_threshold", type=int, default=10000)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    result = bench_generation(args.model, args.batch, args.prompt, args.new_tokens, args.repeats, not args.fp32,
                              args.stage3_param_persistence_threshold, args.samples_per_prompt)
    if dist.is_main():
        print(json.dumps(result), flush=True)
    return 0


def main_ppo(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bench_ppo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="ppo", choices=("ppo", "grpo", "dpo"))
    parser.add_argument("--reference", default="precomputed", choices=("precomputed", "forward"),
                        help="dpo: reference log-probs precomputed (train_dpo.py's default) or a forward every step")
    parser.add_argument("--share_prompt", default="auto", choices=("auto", "on", "off"),
                        help="dpo: train_dpo.py's --share_prompt (a pair's prompt computed once)")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--hybrid", default="off,on", help="hybrid engine modes to compare")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero_stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--hybrid_engine", default="on", help=argparse.SUPPRESS)
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker and args.algo == "dpo":
        result = bench_dpo_worker(args.zero_stage, args.steps, args.warmup, args.reference == "precomputed",
                                  args.share_prompt)
        if dist.is_main():
            Path(args.result_file).write_text(json.dumps(result))
        return 0
    if args.worker:
        result = bench_ppo_worker(args.zero_stage, args.hybrid_engine, args.steps, args.warmup, args.algo)
        if dist.is_main():
            Path(args.result_file).write_text(json.dumps(result))
        return 0
    summary = run_ppo_matrix([int(s) for s in args.stages.split(",")], [int(w) for w in args.worlds.split(",")],
                             ["on"] if args.algo == "dpo" else args.hybrid.split(","), args.steps, args.warmup,
                             args.algo, args.reference, args.share_prompt)
    print(json.dumps(summary), flush=True)
    return 0
