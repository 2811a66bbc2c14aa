"""Rule-based reward functions for tests (`--reward_fn tests/reward_fns.py:NAME`)."""


def ascii_letters(prompt: str, response: str) -> float:
    """The fraction of the response's characters that are ASCII letters: dense, and easy to raise by choosing
    Latin-script tokens over CJK ones or punctuation."""
    if not response:
        return 0.0
    return sum(ch.isascii() and ch.isalpha() for ch in response) / len(response)


def broken(prompt: str, response: str):
    return "not a number"


def constant(prompt: str, response: str) -> float:
    """The same score for every answer: whatever else shows in the logged reward comes from the shaping."""
    return 1.0
