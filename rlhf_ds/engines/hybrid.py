"""The hybrid engine: switch the actor between a fast generation mode and ZeRO training mode on every PPO step.

Under ZeRO-3 a plain `generate` all-gathers every layer on every decode step, through ZeRO's module hooks. Here the
actor instead enters a generation mode once per rollout:

  1. eval mode, gradient checkpointing off;
  2. ZeRO-3: gather the partitioned parameters once (the whole model, or `gather_layers` layers at a time when
     memory is short) and take ZeRO's forward/backward hooks off the modules;
  3. LoRA: merge the adapters into the (gathered) weights, so decoding runs plain matrix products (when the
     rollout is long enough for that to pay: see MERGE_MIN_TOKENS);
  4. generate with the KV cache (`synced_gpus` only when decoding still needs collectives), drawing each token
     by inverse CDF and, on CPU, running single-token attention on SDPA's math kernel (see `decode_speedups`);
and leaves it exactly as it found it: adapters unmerged and the weights they touched restored bit for bit,
gathered memory released (ZeRO re-partitions without writing back), hooks re-registered, train mode and
checkpointing back on. No parameter, optimizer state or hook is left changed.

This works for any Hugging Face causal LM (no per-architecture kernels). DeepSpeed's own hybrid engine
(`--hybrid_engine deepspeed`) is available where it can run: `deepspeed_hybrid_problem` says why not otherwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator

import torch

from rlhf_ds.engines.ds_compat import hybrid_gather_latency, plain_linear, remove_zero3_hooks, restore_zero3_hooks
from rlhf_ds.engines.sampling import SamplingSettings
from rlhf_ds.models.finetuning import decoder_layers, hf_model, is_lora, on_attention_interface


# Merging LoRA costs a fixed time per rollout (measured on 2 CPU cores with SmolLM2-135M, rank 8 on every linear
# layer: about 0.3 s to merge and restore) and saves time on every generated token (2.32 -> 1.82 s for 4 x 32
# tokens). It pays off from about 80 generated tokens per call; "auto" merges from 128.
MERGE_MIN_TOKENS = 128


class HybridEngine:
    """Generation mode around a DeepSpeed actor engine. `generate` has the plain generator's signature."""

    def __init__(self, engine, gather_layers: int = 0, merge_lora: str = "auto"):
        self.engine = engine
        self.model = engine.module
        self.zero3 = bool(engine.zero_optimization_partition_weights())
        self.gather_layers = gather_layers if self.zero3 else 0
        # with layer-by-layer gathering the adapters' base weights are not all gathered at once: never merge
        self.merge_lora = "off" if self.gather_layers else merge_lora
        self.is_peft = is_lora(self.model)
        self.timings = {"gather": 0.0, "generation": 0.0}

    # ---------------------------------------------------------------------------------------- ZeRO-3 hooks
    def _remove_zero_hooks(self) -> None:
        remove_zero3_hooks(self.engine, self.model)

    def _restore_zero_hooks(self) -> None:
        restore_zero3_hooks(self.engine)

    # --------------------------------------------------------------------------------------------- gathering
    def _gather_whole(self, stack: contextlib.ExitStack) -> None:
        import deepspeed

        stack.enter_context(deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None))
        self._remove_zero_hooks()
        stack.callback(self._restore_zero_hooks)

    def _gather_by_groups(self, stack: contextlib.ExitStack) -> None:
        """Everything outside the transformer blocks stays gathered for the rollout; each group of
        `gather_layers` blocks is gathered just before it runs and released right after, on every decode step."""
        import deepspeed

        layers = decoder_layers(hf_model(self.model))
        in_layers = {id(p) for p in layers.parameters()}
        rest = [p for p in self.model.parameters() if id(p) not in in_layers]
        stack.enter_context(deepspeed.zero.GatheredParameters(rest, modifier_rank=None))
        self._remove_zero_hooks()
        stack.callback(self._restore_zero_hooks)
        handles = []
        k = self.gather_layers
        for start in range(0, len(layers), k):
            group = list(layers[start:start + k])
            params = [p for block in group for p in block.parameters()]
            box: list = []

            def gather(module, args, params=params, box=box):
                ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                ctx.__enter__()
                box.append(ctx)

            def release(module, args, output, box=box):
                box.pop().__exit__(None, None, None)

            handles.append(group[0].register_forward_pre_hook(gather))
            handles.append(group[-1].register_forward_hook(release))
        stack.callback(lambda: [h.remove() for h in handles])

    # ---------------------------------------------------------------------------------------------- LoRA
    def _merge(self, stack: contextlib.ExitStack) -> None:
        """Merge every LoRA adapter into its base weight for the rollout, and restore the weights exactly after:
        a merged-then-unmerged weight differs from the original in its last bits, so the touched weights are
        copied first, except gathered ZeRO-3 ones, whose partitions the release leaves untouched anyway."""
        from peft.tuners.lora import LoraLayer

        saved = []
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                if not self.zero3 or getattr(weight, "ds_persist", False):
                    saved.append((weight, weight.data.clone()))
        self.model.merge_adapter()

        def unmerge() -> None:
            self.model.unmerge_adapter()
            for weight, data in saved:
                weight.data.copy_(data)

        stack.callback(unmerge)

    # ------------------------------------------------------------------------------------------ the switch
    @contextlib.contextmanager
    def generation_mode(self, merge: bool = True) -> Iterator[None]:
        t0 = time.time()
        hf = hf_model(self.model)
        was_training = self.model.training
        checkpointing = bool(getattr(hf, "is_gradient_checkpointing", False))
        stack = contextlib.ExitStack()
        try:
            if checkpointing:
                hf.gradient_checkpointing_disable()
            self.model.eval()
            if self.zero3:
                (self._gather_by_groups if self.gather_layers else self._gather_whole)(stack)
                stack.enter_context(plain_linear())
            if self.is_peft and merge:
                self._merge(stack)
            self.timings["gather"] = time.time() - t0
            yield
        finally:
            t1 = time.time()
            stack.close()
            self.model.train(was_training)
            if checkpointing:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.timings["gather"] += time.time() - t1

    @property
    def synced_gpus(self) -> bool:
        """Collectives during decoding only when blocks are gathered step by step."""
        import torch.distributed as tdist

        return self.zero3 and self.gather_layers > 0 and tdist.is_initialized() and tdist.get_world_size() > 1

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 settings: SamplingSettings, group: int = 1) -> torch.Tensor:
        """Continuations of left-padded prompts. `group`: the rows come in runs of `group` copies of one prompt
        (GRPO's N answers to a prompt), whose prompt is then read once (shared_prompt_cache)."""
        tokens = input_ids.shape[0] * settings.max_new_tokens
        merge = self.merge_lora == "on" or (self.merge_lora == "auto" and tokens >= MERGE_MIN_TOKENS)
        greedy, processors = decode_speedups(settings)
        with self.generation_mode(merge), cpu_decode_attention(hf_model(self.model)):
            t0 = time.time()
            cache = shared_prompt_cache(self.model, input_ids, attention_mask, group)
            sequences = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            generation_config=greedy.generation_config(),
                                            logits_processor=processors, synced_gpus=self.synced_gpus,
                                            **({"past_key_values": cache} if cache is not None else {}))
            self.timings["generation"] = time.time() - t0
        return sequences[:, input_ids.shape[1]:]


def shared_prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, group: int):
    """When the rows are runs of `group` copies of one prompt: the KV cache of each prompt but its last token,
    computed once per prompt and repeated for its copies, for generate() to go on from (it then reads only the
    last prompt token per row). None where that does not apply: no groups, a prompt of one token, rows of a run
    that differ, or a model outside transformers' attention interface (ChatGLM's own code keeps its own cache).
    generate() itself would prefill every copy: N times the prompt's compute for GRPO's N answers."""
    from transformers import DynamicCache

    from rlhf_ds.algo.sequence import position_ids_from_mask

    rows, width = input_ids.shape
    if group <= 1 or rows % group or width < 2 or not on_attention_interface(model):
        return None
    ids, mask = input_ids[::group], attention_mask[::group]
    if not (torch.equal(ids.repeat_interleave(group, 0), input_ids) and
            torch.equal(mask.repeat_interleave(group, 0), attention_mask)) or mask[:, :-1].sum(-1).min() < 1:
        return None
    cache = DynamicCache(config=hf_model(model).config)
    prefix = mask[:, :-1]
    model(input_ids=ids[:, :-1], attention_mask=prefix, position_ids=position_ids_from_mask(prefix),
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(group)
    return cache


# ------------------------------------------------------------------------------------------ decode speed-ups
# Measured on this project's 2-core CPU box (bench_ppo's 7M OPT, 4 x 64 new tokens, one thread): of 0.45 s of
# generation, torch.multinomial spent 40 ms drawing 8192 exponentials per row per token, and SDPA's flash kernel
# 211 us per single-token attention call where its math kernel takes 98 us. Neither can be swapped through a
# generate() option, so the hybrid engine brings its own two pieces and leaves the rest of generate() alone.

class InverseCDFSampler:
    """A logits processor that draws the next token itself and hands generate() a one-hot score row, so that a
    greedy generate() samples: temperature, top-k and top-p (transformers' own warpers), then one uniform number
    per row against the cumulative distribution instead of torch.multinomial's one exponential per vocabulary
    entry. The draw has the same distribution as multinomial's (tests/engines/test_decode_sampling.py)."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        self.temperature = temperature
        self.warpers = ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


CPU_DECODE_ATTENTION = "rlhf_ds_cpu_decode"


_PLAIN_KWARGS = {"dropout", "scaling", "is_causal", "position_ids", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k",
                 "max_length_q", "max_length_k"}


def _cpu_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except for a single-token query (a decode step) with nothing special about it
    (no position bias, soft-capping, sinks or paged cache): two small matrix products, as transformers' eager
    attention computes them, grouped-query heads folded into the batch instead of repeated."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = all(k in _PLAIN_KWARGS or v is None or v is False for k, v in kwargs.items())
    if query.shape[2] != 1 or not plain or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    q = query.reshape(b, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (dim ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, :length]  # [B, 1, 1, L]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)  # [B, kv_heads, groups, D]
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def _register_cpu_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_DECODE_ATTENTION, _cpu_decode_attention)
    AttentionMaskInterface.register(CPU_DECODE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def cpu_decode_attention(hf) -> Iterator[bool]:
    """Switch a CPU model on SDPA attention to `_cpu_decode_attention` for the rollout (yields whether it did)."""
    config = hf.config
    usable = (next(hf.parameters()).device.type == "cpu" and getattr(config, "_attn_implementation", None) ==
              "sdpa" and on_attention_interface(hf))
    if not usable:
        yield False
        return
    _register_cpu_decode_attention()
    hf.set_attn_implementation(CPU_DECODE_ATTENTION)
    try:
        yield True
    finally:
        hf.set_attn_implementation("sdpa")


def decode_speedups(settings: SamplingSettings) -> tuple[SamplingSettings, list]:
    """The greedy settings and the logits processors that make generate() sample with InverseCDFSampler."""
    if not settings.do_sample:
        return settings, []
    return (dataclasses.replace(settings, do_sample=False),
            [InverseCDFSampler(settings.temperature, settings.top_k, settings.top_p)])


# --------------------------------------------------------------------------------- DeepSpeed's hybrid engine

# Decoder-layer classes for which DeepSpeed 0.19 has a hybrid-engine container (module_inject/containers).
DEEPSPEED_HYBRID_LAYERS = ("OPTDecoderLayer", "GPTJBlock", "GPTNeoBlock", "GPTNeoXLayer", "BloomBlock",
                           "LlamaDecoderLayer", "InternLMDecoderLayer")


def deepspeed_hybrid_problem(model) -> str | None:
    """Why DeepSpeed's own hybrid engine cannot run this model here, or None if it may."""
    import inspect

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cuda":
        return ("DeepSpeed's hybrid engine needs its CUDA inference kernels, and this machine runs DeepSpeed on "
                f"'{get_accelerator().device_name()}'")
    classes = {type(m).__name__: type(m) for m in model.modules()}
    covered = [name for name in DEEPSPEED_HYBRID_LAYERS if name in classes]
    if not covered:
        return (f"DeepSpeed's hybrid engine has no container for this architecture ({type(hf_model(model)).__name__}"
                f"); it covers {', '.join(DEEPSPEED_HYBRID_LAYERS)}")
    if covered == ["OPTDecoderLayer"]:
        params = inspect.signature(classes["OPTDecoderLayer"].forward).parameters
        if "cache_position" in params or "past_key_values" in params:
            import transformers

            return (f"DeepSpeed's hybrid engine skips OPT layers with the cache interface of transformers "
                    f"{transformers.__version__} (it implements only the legacy tuple cache), so it would find "
                    f"nothing to run")
    return None


class DeepSpeedHybridGenerator:
    """Generation through DeepSpeed's own hybrid engine (`"hybrid_engine": {"enabled": true}` in the actor's
    config): its generate() swaps in the inference kernels and prints its own latency line."""

    def __init__(self, engine):
        self.engine = engine
        self.timings = {"gather": 0.0, "generation": 0.0}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 settings: SamplingSettings, group: int = 1) -> torch.Tensor:
        t0 = time.time()  # (`group` does not apply: DeepSpeed's kernels keep their own cache)
        self.engine.eval()
        try:
            sequences = self.engine.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             generation_config=settings.generation_config(), synced_gpus=False)
        finally:
            self.engine.train()
        self.timings["gather"] = hybrid_gather_latency(self.engine)
        self.timings["generation"] = time.time() - t0 - self.timings["gather"]
        return sequences[:, input_ids.shape[1]:]
