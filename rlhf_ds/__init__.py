"""rlhf_ds: a DeepSpeed-native RLHF trainer (SFT -> reward model -> PPO)."""
import os as _os

__version__ = "0.1.0"

# DeepSpeed picks its accelerator when first imported. On a machine without CUDA, say so up front so that it
# does not print a warning in every process and so that the choice is the same in every rank.
if "DS_ACCELERATOR" not in _os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            _os.environ["DS_ACCELERATOR"] = "cpu"
    except ImportError:  # torch missing: the import of deepspeed will say so
        pass


def _readable_cuda_arch_list() -> None:
    """DeepSpeed 0.19's JIT op builder reads TORCH_CUDA_ARCH_LIST entries as numbers and fails inside
    deepspeed.initialize (ValueError: invalid literal for int() ... '0a') on an architecture suffix such as
    Hopper's "9.0a", which CUDA images set (seen on an H200 machine). The ops it builds for rlhf_ds (FusedAdam,
    CPU Adam) use no suffix-only instructions, so this process builds them for the plain architecture instead."""
    import re
    import sys

    value = _os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return
    plain = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)
    if plain != value:
        _os.environ["TORCH_CUDA_ARCH_LIST"] = plain
        print(f"[rlhf_ds] TORCH_CUDA_ARCH_LIST={value!r}: DeepSpeed 0.19 cannot read architecture suffixes; its ops "
              f"are built for {plain!r}", file=sys.stderr)


_readable_cuda_arch_list()
