"""Which engines an online algorithm needs, and building them: each role a DeepSpeed engine with its own ZeRO
stage and offload.

  actor      the policy being trained (always); generates through the hybrid engine
  critic     the value model, only for estimators that read values (GAE); initialised from the reward model
  reference  a frozen copy of the initial policy, only when the KL coefficient is above 0
  reward     the frozen reward model, only with --reward_model (rule rewards need no engine)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_ds import dist
from rlhf_ds.args import OnlineArguments, PolicyArguments, RuntimeArguments, TrainingArguments
from rlhf_ds.models.saving import is_adapter_dir
from rlhf_ds.engines.ds_config import EngineSettings, engine_config
from rlhf_ds.engines.factory import create_inference_engine, create_train_engine
from rlhf_ds.engines.generation import build_generator
from rlhf_ds.engines.hybrid import deepspeed_hybrid_problem
from rlhf_ds.errors import UserError
from rlhf_ds.models.finetuning import apply_finetuning, count_parameters
from rlhf_ds.models.heads import ScalarHeadModel, load_scalar_model
from rlhf_ds.models.loading import disable_dropout, load_backbone
from rlhf_ds.models.policy import PolicyStart, load_policy

logger = logging.getLogger("rlhf_ds")


def needed_roles(online: OnlineArguments) -> list[str]:
    roles = ["actor"]
    if online.needs_critic:
        roles.append("critic")
    if online.needs_reference:
        roles.append("reference")
    if online.reward_model:
        roles.append("reward")
    return roles


def role_stages(online: OnlineArguments, rt: RuntimeArguments, policy: PolicyArguments) -> dict[str, int]:
    """Each role's ZeRO stage: actor and critic from their flags (or --zero_stage); the frozen reference follows the
    actor and the reward model the critic (the actor without a critic): 3 if that one is 3, else 0 (a full copy)."""
    actor = online.actor_zero_stage or rt.zero_stage
    critic = online.critic_zero_stage or rt.zero_stage
    ref = policy.ref_zero_stage if policy.ref_zero_stage is not None else (3 if actor == 3 else 0)
    follows = critic if online.needs_critic else actor
    reward = online.reward_zero_stage if online.reward_zero_stage is not None else (3 if follows == 3 else 0)
    # DeepSpeed offloads parameters only under ZeRO-3, so offloading a frozen model means partitioning it.
    if policy.offload_reference_model and ref != 3:
        logger.info("--offload_reference_model: the reference engine runs under ZeRO-3 with its parameters in CPU "
                    "memory (DeepSpeed offloads parameters only under ZeRO-3)")
        ref = 3
    if online.offload_reward_model and reward != 3:
        logger.info("--offload_reward_model: the reward engine runs under ZeRO-3 with its parameters in CPU memory "
                    "(DeepSpeed offloads parameters only under ZeRO-3)")
        reward = 3
    stages = {"actor": actor, "critic": critic, "reference": ref, "reward": reward}
    return {role: stages[role] for role in needed_roles(online)}


@dataclass
class Engines:
    actor: Any
    generator: Any
    critic: Any = None
    ref: Any = None
    reward: Any = None
    critic_base: str | None = None  # recorded with the saved critic


@dataclass
class EngineBuilder:
    """Everything building the engines needs from the run."""

    online: OnlineArguments
    policy: PolicyArguments
    args: TrainingArguments
    rt: RuntimeArguments
    ft_args: Any
    precision: Any
    start: PolicyStart  # where the policy starts
    model_name: str
    rollout_rows: int  # answers per micro-batch (prompts x samples)

    def settings(self, stage: int, lr: float = 0.0, explicit: bool = False) -> EngineSettings:
        a = self.args
        return EngineSettings(micro_batch=self.rollout_rows, grad_accum=a.gradient_accumulation_steps,
                              precision=self.precision.name, max_grad_norm=a.max_grad_norm, lr=lr,
                              betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon, weight_decay=a.weight_decay,
                              stage=stage, world_size=dist.world_size(),
                              persistence_threshold=self.rt.stage3_param_persistence_threshold,
                              stage_is_explicit=explicit)

    def configs(self) -> dict[str, dict]:
        online, rt, args = self.online, self.rt, self.args
        stages = role_stages(online, rt, self.policy)
        cfg = {}
        for role, stage in stages.items():
            if role in ("actor", "critic"):
                lr = (online.actor_learning_rate if role == "actor" else online.critic_learning_rate) or \
                    args.learning_rate
                explicit = (online.actor_zero_stage if role == "actor" else online.critic_zero_stage) is not None
                cfg[role] = engine_config(self.settings(stage, lr, explicit), True, rt.offload, rt.deepspeed)
            else:
                offload = self.policy.offload_reference_model if role == "reference" else \
                    online.offload_reward_model
                cfg[role] = engine_config(self.settings(stage), False, offload)
        return cfg

    def build(self, cfg: dict[str, dict], schedule: dict[str, Any]) -> Engines:
        online = self.online
        actor = self.load_policy(cfg["actor"], trainable=True)
        if online.hybrid_engine == "deepspeed":
            problem = deepspeed_hybrid_problem(actor)
            if problem:
                raise UserError(f"--hybrid_engine deepspeed: {problem}; use --hybrid_engine on, which works for "
                                f"any causal LM")
            cfg["actor"]["hybrid_engine"] = {"enabled": True, "max_out_tokens": online.max_prompt_length +
                                             online.max_new_tokens, "inference_tp_size": 1, "pin_parameters": True,
                                             "release_inference_cache": False, "tp_gather_partition_size": 8}
        engines = Engines(actor=create_train_engine(actor, cfg["actor"], **schedule), generator=None)
        engines.generator = build_generator(engines.actor, online.hybrid_engine, online.hybrid_gather_layers,
                                            online.hybrid_merge_lora)
        if "reference" in cfg:
            engines.ref = create_inference_engine(self.load_policy(cfg["reference"], trainable=False),
                                                  cfg["reference"])
        if "critic" in cfg:
            critic, engines.critic_base = self.load_critic(cfg["critic"])
            engines.critic = create_train_engine(critic, cfg["critic"], **schedule)
        if "reward" in cfg:
            stage3 = cfg["reward"]["zero_optimization"]["stage"] == 3
            model, _ = load_scalar_model(online.reward_model, self.precision.dtype, cfg["reward"] if stage3 else None,
                                         merge_lora=not stage3)
            engines.reward = create_inference_engine(model, cfg["reward"])
        built = [(role, getattr(engines, attr)) for role, attr in (("actor", "actor"), ("critic", "critic"),
                                                                  ("reference", "ref"), ("reward", "reward"))]
        for role, engine in built:
            if engine is not None:
                trainable, total = count_parameters(engine.module)
                logger.info("%-9s ZeRO-%d %s: %s of %s parameters train", role, engine.zero_optimization_stage(),
                            self.precision.name, f"{trainable:,}", f"{total:,}")
        logger.info("engines: %s (%s)", ", ".join(f"{r} ZeRO-{e.zero_optimization_stage()}" for r, e in built if e),
                    "; ".join(f"no {r}: {why}" for r, why in self.skipped().items()) or "all four roles")
        return engines

    def skipped(self) -> dict[str, str]:
        online, out = self.online, {}
        if not online.needs_critic:
            out["critic"] = f"{online.advantage_estimator} needs no value model"
        if not online.needs_reference:
            out["reference"] = "the KL coefficient is 0"
        if not online.reward_model:
            out["reward"] = "rule rewards"
        return out

    def load_policy(self, ds_config: dict, trainable: bool):
        return load_policy(self.start, self.precision.dtype, ds_config, self.ft_args, trainable,
                           self.online.actor_gradient_checkpointing)

    def load_critic(self, ds_config: dict) -> tuple[ScalarHeadModel, str]:
        """The value model: the reward model by default (its adapter keeps training under LoRA), else the policy's
        base model with a zero value head. Returns it and the base model to record with it."""
        online = self.online
        lora = self.ft_args.finetuning_type == "lora"
        stage3 = ds_config["zero_optimization"]["stage"] == 3
        if online.reward_model:
            rm_is_lora = is_adapter_dir(online.reward_model)
            continue_adapter = lora and rm_is_lora
            model, meta = load_scalar_model(online.reward_model, self.precision.dtype,
                                            ds_config if (stage3 and (continue_adapter or not rm_is_lora)) else None,
                                            trainable=continue_adapter, merge_lora=rm_is_lora and not continue_adapter)
            base = meta["base_model"] if continue_adapter else str(Path(online.reward_model).resolve())
            if not continue_adapter:
                model.backbone = apply_finetuning(model.backbone, self.ft_args)
        else:
            backbone = apply_finetuning(load_backbone(self.start.base, self.precision.dtype, ds_config), self.ft_args)
            model = ScalarHeadModel(backbone, head_init="zero")
            base = self.model_name
        for p in model.value_head.parameters():
            p.requires_grad_(True)
        if online.critic_gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable_dropout(model)
        return model, base
