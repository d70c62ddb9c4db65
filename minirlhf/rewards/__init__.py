"""Rewards: anything with `score(prompts, completions, meta) -> tensor (batch,)`.

Rule rewards check verifiable answers; reward-model rewards read a trained Bradley–Terry model; AI-judge
rewards ask a judge model; `WeightedSum` mixes several. `build_reward("answer:1,format:0.2", ...)` builds
one from a config string.
"""

from .base import AnswerReward, FormatReward, RewardFunction, RewardModelReward, WeightedSum, build_reward

__all__ = ["AnswerReward", "FormatReward", "RewardFunction", "RewardModelReward", "WeightedSum", "build_reward"]
