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
