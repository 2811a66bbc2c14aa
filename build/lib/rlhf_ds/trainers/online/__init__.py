"""The online RL trainers: the actor generates, the answers are scored, and the policy is updated on them.

    engines.py     which engines an algorithm needs (actor, critic, reference, reward) and building them
    experience.py  a rollout: generate N answers per prompt, score them, reference (and critic) forwards
    update.py      advantages through algo/'s registry, then the policy (and value) updates
    evaluate.py    greedy answers to held-out prompts
    trainer.py     OnlineTrainer: one step top-down; train_ppo.py and train_grpo.py
"""
