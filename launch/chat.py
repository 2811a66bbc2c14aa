#!/usr/bin/env python
"""Talk to a trained policy: a model folder, a LoRA adapter, an online run's --output_dir, or a built-in model name.

    python launch/chat.py --model out/ppo                       # interactive; /reset clears the history, Ctrl-D ends
    python launch/chat.py --model out/ppo --prompt "中国的首都是哪里？"   # one answer, printed

The logic lives in rlhf_ds/inference.py.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("chat")
