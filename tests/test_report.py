"""The report's length verdict: whether the reward rose without the answers growing, and which reading of growth
fits the reward (a learnt judge can be paid in length; a rule reward cannot)."""
from rlhf_ds.report import LENGTH_GROWTH_FLAG, length_verdict


def test_length_verdict_says_whether_the_reward_rose_without_the_answers_growing():
    steady = length_verdict("PPO", 40.0, 40.0 * (1 + LENGTH_GROWTH_FLAG / 2), reward_rose=True)
    assert "the reward rose without the answers growing" in steady and "judge" not in steady

    judged = length_verdict("PPO", 40.0, 60.0, reward_rose=True)
    assert "the reward rose with the answers growing" in judged and "+50%" in judged
    assert "judge that likes length" in judged

    rule = length_verdict("GRPO", 17.5, 31.6, reward_rose=True, rule_reward=True)
    assert "rule reward does not pay for length" in rule and "judge" not in rule and "+81%" in rule

    flat = length_verdict("GRPO", 20.0, 20.0, reward_rose=False)
    assert "the reward did not rise" in flat
    assert length_verdict("PPO", None, 3.0) == "PPO: no answer lengths recorded."
