"""Generation: the batched KV-cache sampler that produces rollouts for online RL, eval and chat."""

from .sampler import Rollout, SamplingConfig, filter_logits, generate, left_pad

__all__ = ["Rollout", "SamplingConfig", "filter_logits", "generate", "left_pad"]
