"""The online RL trainer: PPO (GAE with a critic) and the critic-free estimators (GRPO, Dr. GRPO, RLOO,
REINFORCE++) on the same engines. `train_step` is one step, top-down; the life of the run is trainers/base.py.

launch/train_ppo.py and launch/train_grpo.py run this trainer with their own defaults (args.PPO_DEFAULTS,
args.GRPO_DEFAULTS); --advantage_estimator works in both.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import rlhf_ds
from rlhf_ds import dist
from rlhf_ds.algo.kl import kl_controller
from rlhf_ds.algo.shaping import RunningMoments, length_runaway
from rlhf_ds.args import GRPO_DEFAULTS, ONLINE_GROUPS, PPO_DEFAULTS, OnlineArguments, PolicyArguments
from rlhf_ds.flag_parsing import parse_args
from rlhf_ds.models.saving import gather_state_dict, save_causal_lm
from rlhf_ds.data.collate import train_sampler
from rlhf_ds.data.loading import load_examples, split_eval, tokenize_prompts
from rlhf_ds.data.template import resolve_template
from rlhf_ds.engines.sampling import SamplingSettings
from rlhf_ds.errors import UserError
from rlhf_ds.export import export_merged_lora
from rlhf_ds.faults import signal_if_asked
from rlhf_ds.models.finetuning import is_lora
from rlhf_ds.models.heads import read_head_meta, save_scalar_model
from rlhf_ds.models.policy import PolicyStart
from rlhf_ds.models.loading import context_length, eos_token_ids, load_tokenizer, resolve_model_path
from rlhf_ds.rewards import load_reward_fn
from rlhf_ds.trainers.base import Trainer
from rlhf_ds.trainers.online.engines import EngineBuilder
from rlhf_ds.trainers.online.evaluate import evaluate
from rlhf_ds.trainers.online.experience import ExperienceMaker, Scorer
from rlhf_ds.trainers.online.update import update

logger = logging.getLogger("rlhf_ds")


class OnlineTrainer(Trainer):
    unit = "prompts"
    log_keys = ("reward", "kl", "reward_normalized", "kl_coef", "response_length", "eos_rate", "policy_loss",
                "value_loss", "entropy", "clipfrac", "approx_kl", "uniform_group_share")
    log_every_step = True
    summed_metrics = frozenset({"tokens"})

    def __init__(self, *groups):
        super().__init__(*groups)
        self.policy_args: PolicyArguments = self.extra_args[0]
        self.online: OnlineArguments = self.extra_args[1]
        estimator = self.online.advantage_estimator
        self.name = "PPO" if estimator == "gae" else estimator.upper().replace("_PP", "++").replace("DR_", "Dr. ")

    # -------------------------------------------------------------------------------------------- one step
    def train_step(self, items: list[list[dict]]) -> dict[str, float]:
        (rows,) = items
        online = self.online
        rollout, stats = self.maker.make(rows, fused=self.fused_experience)  # generate, score, reference forward
        signal_if_asked("rollout", self.loop.step + 1)
        self.stop_point()  # a stop asked for during the rollout: save now, without the update
        t0 = time.time()
        stats.update(update(self.engines, rollout, online, self.micro_rows, self.kl_ctl.value,  # advantages and
                            self.tokenizer.pad_token_id, stats))  # the policy (and value) updates
        stats["time_training"] = time.time() - t0
        if self.engines.ref is not None:
            self.kl_ctl.update(dist.all_reduce_mean(torch.tensor([stats["kl"]]))[0].item(),
                               self.rows_per_item * online.n_samples_per_prompt)
        self.update_ema()
        step = self.loop.step + 1
        if step % self.args.logging_steps == 0 or step == 1:
            self.log_samples(step)
        return stats

    @property
    def fused_experience(self) -> bool:
        """Whether the old log-probs and values come from the first training forward: exact when the rollout makes
        a single optimizer step from a single micro-batch, since the weights have not moved before it (TRL's GRPO
        skips its old log-probs in the same case)."""
        return (self.online.fuse_experience == "auto" and self.online.ppo_epochs == 1
                and self.args.gradient_accumulation_steps == 1)

    # --------------------------------------------------------------------------------------------- checks
    def check_flags(self) -> None:
        args, online = self.args, self.online
        if not (online.reward_model or online.reward_fn):
            raise UserError("give the reward: --reward_model DIR (from train_rm.py) and/or --reward_fn (math, format, "
                            "module:function)")
        online.weights()  # refuses a wrong count now
        unused = {}
        if not online.needs_critic:
            unused.update(dict.fromkeys(("critic_learning_rate", "critic_zero_stage", "critic_gradient_checkpointing",
                                         "vf_coef", "cliprange_value", "whiten_advantages", "lam"),
                                        f"--advantage_estimator {online.advantage_estimator} builds no critic"))
        if not online.needs_reference:
            unused.update(dict.fromkeys(("ref_zero_stage", "offload_reference_model", "kl_estimator", "kl_in_loss",
                                         "target_kl", "kl_horizon"),
                                        "the KL coefficient is 0 (--init_kl_coef), so there is no reference model"))
        given = getattr(online, "given", set()) | getattr(self.policy_args, "given", set())
        if not online.reward_model:
            unused.update(dict.fromkeys(("reward_zero_stage", "offload_reward_model"), "there is no --reward_model"))
        if online.n_samples_per_prompt == 1:
            unused["drop_uniform_groups"] = "groups need --n_samples_per_prompt 2 or more"
        for flag, why in unused.items():
            if flag in given:
                raise UserError(f"--{flag} is not used by this run: {why}; remove it")
        rollout = args.per_device_train_batch_size * args.gradient_accumulation_steps
        gen = online.per_device_generation_batch_size
        if gen is not None and (gen < 1 or rollout % gen):
            raise UserError(f"--per_device_generation_batch_size {gen} must divide the rollout batch of {rollout} "
                            f"prompts per rank (--per_device_train_batch_size x --gradient_accumulation_steps)")

    def resume_config(self) -> dict[str, Any]:
        o = self.online
        stages = {f"{role}_zero_stage": stage for role, stage in self.stages().items() if role in ("actor", "critic")}
        return {**super().resume_config(), "stage": "online", "sft_model": self.policy_args.sft_model,
                "reward_model": o.reward_model, "reward_fn": o.reward_fn, "reward_weights": o.reward_weights,
                "advantage_estimator": o.advantage_estimator, "n_samples_per_prompt": o.n_samples_per_prompt,
                "ppo_epochs": o.ppo_epochs, "max_prompt_length": o.max_prompt_length,
                "max_new_tokens": o.max_new_tokens, **stages}

    def stages(self) -> dict[str, int]:
        from rlhf_ds.trainers.online.engines import role_stages

        return role_stages(self.online, self.rt, self.policy_args)

    def check_inputs(self) -> None:
        """Every model folder and compatibility check, before any engine is built."""
        online = self.online
        self.start = PolicyStart(self.base_path, self.policy_args.sft_model)
        self.start.check()
        self.tokenizer = load_tokenizer(self.start.tokenizer_dir, padding_side="left")
        self.template = resolve_template(self.tokenizer, self.model_args.template)
        self.eos_ids = eos_token_ids(self.tokenizer, self.start.weights)
        from transformers import AutoConfig

        limit = context_length(AutoConfig.from_pretrained(str(self.start.weights)))
        if limit and online.max_prompt_length + online.max_new_tokens > limit:
            raise UserError(f"--max_prompt_length {online.max_prompt_length} + --max_new_tokens "
                            f"{online.max_new_tokens} exceeds the model's context of {limit} tokens; lower one of them")
        self.rm_meta: dict[str, Any] | None = None
        if online.reward_model:
            if not Path(online.reward_model).is_dir():
                raise UserError(f"--reward_model {online.reward_model}: no such folder (the --output_dir of "
                                f"train_rm.py)")
            self.rm_meta = read_head_meta(online.reward_model)
            rm_tok = load_tokenizer(online.reward_model)
            if rm_tok.get_vocab() != self.tokenizer.get_vocab() or rm_tok.eos_token_id != self.tokenizer.eos_token_id:
                raise UserError(f"--reward_model {online.reward_model} uses a different tokenizer than the policy "
                                f"{self.model_args.model_name_or_path}; train the reward model on the same base model")
            if self.rm_meta.get("template") != self.template:
                raise UserError(f"--reward_model was trained with the {self.rm_meta.get('template')!r} prompt "
                                f"template but this run uses {self.template!r}; pass --template "
                                f"{self.rm_meta.get('template')}")
        self.reward_functions = [load_reward_fn(spec) for spec in online.reward_fns()]

    # ----------------------------------------------------------------------------------------------- data
    def setup_data(self) -> None:
        d, online = self.data_args, self.online
        self.base_path = resolve_model_path(self.model_args.model_name_or_path)
        self.check_inputs()
        load = dict(dataset_dir=d.dataset_dir, dataset_format=d.dataset_format, max_samples=d.max_samples,
                    keep_ties=True, report=self.report)
        examples = load_examples(d.dataset, "sft", **load)
        if d.eval_dataset:
            evaluation = load_examples(d.eval_dataset, "sft", **{**load, "max_samples": d.eval_samples()})
            train = examples
        elif d.val_size:
            train, evaluation = split_eval(examples, d.val_size, self.args.seed)
        else:
            train, evaluation = examples, None
        max_length = online.max_prompt_length + online.max_new_tokens
        self.train_set = tokenize_prompts(train, self.tokenizer, self.template, online.max_prompt_length, max_length,
                                          self.report)
        self.eval_set = (tokenize_prompts(evaluation, self.tokenizer, self.template, online.max_prompt_length,
                                          max_length, self.report, name="eval prompts")
                         if evaluation is not None and self.args.do_eval else None)
        self.report.add(f"{len(self.train_set)} training prompts" +
                        (f", {len(self.eval_set)} evaluation prompts" if self.eval_set is not None else "") +
                        (f"; {online.n_samples_per_prompt} answers per prompt" if online.n_samples_per_prompt > 1
                         else ""))

    def make_loader(self):
        args = self.args
        rollout = args.per_device_train_batch_size * args.gradient_accumulation_steps
        columns = self.train_set.select_columns(["prompt_ids", "prompt_text", "reference_text", "input_ids",
                                                 "prompt_len"])
        sampler = train_sampler(self.train_set, rollout, dist.rank(), dist.world_size(), args.seed, False)
        loader = DataLoader(columns, batch_size=rollout, sampler=sampler, drop_last=True,
                            collate_fn=lambda rows: rows,  # own generator: see trainers/supervised.py
                            generator=torch.Generator().manual_seed(args.seed))
        return loader, sampler, 1, rollout

    def optimizer_steps(self) -> int:
        return self.total_steps * self.online.ppo_epochs

    # -------------------------------------------------------------------------------------------- engines
    def build_engines(self) -> None:
        args, online = self.args, self.online
        self.micro_rows = args.per_device_train_batch_size * online.n_samples_per_prompt
        builder = EngineBuilder(online, self.policy_args, args, self.rt, self.ft_args, self.precision, self.start,
                                self.model_args.model_name_or_path, self.micro_rows)
        cfg = builder.configs()
        self.run_.universal_engines(cfg, [r for r in ("actor", "critic") if r in cfg])
        schedule = dict(scheduler_type=args.lr_scheduler_type, warmup_steps=self.warmup_steps,
                        total_steps=self.optimizer_steps())
        self.engines = builder.build(cfg, schedule)
        torch.manual_seed(args.seed + 1000003 * dist.rank())  # same weights everywhere, different samples per rank
        self.kl_ctl = kl_controller(online.init_kl_coef, online.target_kl, online.kl_horizon)
        self.reward_stats = RunningMoments()
        if self.rm_meta and online.normalize_reward and self.rm_meta.get("score_std") and not self.reward_functions:
            self.reward_stats = RunningMoments(self.rm_meta["score_mean"], self.rm_meta["score_std"] ** 2,
                                               float(self.rm_meta.get("score_count", 256)))
        sampling = SamplingSettings(max_new_tokens=online.max_new_tokens, eos_token_ids=self.eos_ids,
                                    pad_token_id=self.tokenizer.pad_token_id, temperature=online.temperature,
                                    top_p=online.top_p, top_k=online.top_k)
        scorer = Scorer(self.engines.reward, self.reward_functions, online.weights(), self.rm_meta)
        self.maker = ExperienceMaker(self.engines, scorer, self.tokenizer, self.eos_ids, sampling, online,
                                     args.per_device_train_batch_size, self.reward_stats)
        self.history: list[tuple[float, float]] = []  # (answer length, reward) per step, for --max_length_growth
        self.ema = None
        if online.enable_ema:
            state = gather_state_dict(self.engines.actor, trainable_only=True)
            self.ema = {k: v.float().clone() for k, v in state.items()} if state is not None else None
        if self.fused_experience:
            logger.info("one optimizer step per rollout: the old log-probs and values come from the first training "
                        "forward (--fuse_experience off to compute them separately)")

    def checkpoint_engines(self) -> dict[str, Any]:
        engines = {"actor": self.engines.actor}
        if self.engines.critic is not None:
            engines["critic"] = self.engines.critic
        return engines

    def update_ema(self) -> None:
        if not self.online.enable_ema:
            return
        current = gather_state_dict(self.engines.actor, trainable_only=True)
        if current is not None and self.ema is not None:
            beta = self.online.ema_beta
            for k, v in current.items():
                self.ema[k].mul_(beta).add_(v.float(), alpha=1 - beta)

    # ------------------------------------------------------------------------------------------ reporting
    def step_context(self, step: int) -> dict[str, float]:
        row = {"kl_coef": self.kl_ctl.value, "learning_rate": self.engines.actor.get_lr()[0],
               **super().step_context(step)}
        if self.engines.critic is not None:
            row["critic_learning_rate"] = self.engines.critic.get_lr()[0]
        return row

    def derived_figures(self, row: dict[str, float]) -> dict[str, float]:
        total = row["time_step"]
        return {"generation_share": row["time_generation"] / total if total else 0.0,
                "tokens_per_second": row["tokens"] / total if total else 0.0}

    def stop_early(self, row: dict[str, float]) -> str | None:
        """--max_length_growth: answers growing while the reward rises (the reward model paying for length)."""
        self.history.append((row["response_length"], row["reward"]))
        growth = self.online.max_length_growth
        if growth is None:
            return None
        return length_runaway([h[0] for h in self.history], [h[1] for h in self.history], growth)

    def log_line(self, step: int, row: dict[str, float]) -> None:
        total = row["time_step"]
        logger.info("step %d: E2E latency=%.2fs | Gather latency=%.2fs | Generate time=%.2fs (%.1f%%) | "
                    "Experience time=%.2fs | Training time=%.2fs (%.1f%%) | %.1f tokens/s", step, total,
                    row["time_gather"], row["time_generation"], 100 * row["generation_share"],
                    row["time_experience"], row["time_training"], 100 * row["time_training"] / total if total else 0,
                    row["tokens_per_second"])

    def log_samples(self, step: int) -> None:
        if not dist.is_main() or self.online.num_samples_to_log <= 0:
            return
        prompts, responses, scores = self.maker.last_texts
        with open(self.out / "samples.jsonl", "a", encoding="utf-8") as f:
            for p, r, s in list(zip(prompts, responses, scores))[: self.online.num_samples_to_log]:
                f.write(json.dumps({"step": step, "prompt": p, "response": r, "reward": s}, ensure_ascii=False)
                        + "\n")

    def evaluate(self, step: int) -> dict[str, Any]:
        return evaluate(self.maker, self.eval_set, step, self.rt.per_device_eval_batch_size, self.out, self.tracker,
                        self.online.num_samples_to_log, self.rt.disable_tqdm)

    # ----------------------------------------------------------------------------------------------- save
    def state_dict(self) -> dict[str, Any]:
        return {"kl_controller": self.kl_ctl.state_dict(), "reward_stats": asdict(self.reward_stats),
                "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_stats = RunningMoments(**state["reward_stats"])
        self.maker.reward_stats = self.reward_stats
        self.history = [tuple(h) for h in state.get("history", [])]

    def _resume(self) -> None:
        super()._resume()
        if self.ema is not None and dist.is_main():
            self.ema = torch.load(self.run_.resume_from / "ema.pt", weights_only=True)

    def gather_models(self):
        actor = gather_state_dict(self.engines.actor, trainable_only=is_lora(self.engines.actor.module))
        critic = None
        if self.engines.critic is not None:
            critic = gather_state_dict(self.engines.critic, trainable_only=is_lora(self.engines.critic.module))
        return actor, critic

    def write_models(self, folder: Path, gathered, final: bool) -> None:
        """actor/ (adapter or full model), actor_merged/ (LoRA, final output only: export.py makes it from any
        checkpoint; it is a whole model, about 1 GB for the default one), actor_ema/, critic/."""
        actor_state, critic_state = gathered
        actor = self.engines.actor.module
        folder.mkdir(parents=True, exist_ok=True)
        dtype = self.precision.dtype
        for name, state in (("actor", actor_state), ("actor_ema", self.ema)):
            if state is None:
                continue
            state = {k: v.to(dtype) for k, v in state.items()}
            save_causal_lm(actor, state, folder / name, self.tokenizer)
            if final and is_lora(actor):
                export_merged_lora(self.start.weights, actor.peft_config["default"], state,
                                   folder / f"{name}_merged", self.tokenizer, dtype)
        if not final and self.ema is not None:
            torch.save(self.ema, folder / "ema.pt")
        if critic_state is not None:
            meta = {"kind": "value", "base_model": self.engines.critic_base,
                    "finetuning_type": self.ft_args.finetuning_type, "template": self.template,
                    "max_length": self.online.max_prompt_length + self.online.max_new_tokens,
                    "precision": self.precision.name, "rlhf_ds_version": rlhf_ds.__version__}
            save_scalar_model(self.engines.critic.module, critic_state, folder / "critic", meta, self.tokenizer)

    def write_results(self, folder: Path) -> None:
        results = {"train_runtime": self.loop.runtime, "train_steps": self.loop.step,
                   **({"train_stopped_early": self.metrics["train_stopped_early"]}
                      if "train_stopped_early" in self.metrics else {})}
        (folder / self.finished_marker).write_text(json.dumps(results, indent=2))


def main_ppo(argv: list[str] | None = None) -> int:
    groups = parse_args(*ONLINE_GROUPS, argv=argv, unused="online", defaults=PPO_DEFAULTS)
    return OnlineTrainer(*groups).run()


def main_grpo(argv: list[str] | None = None) -> int:
    groups = parse_args(*ONLINE_GROUPS, argv=argv, unused="online", defaults=GRPO_DEFAULTS)
    return OnlineTrainer(*groups).run()
