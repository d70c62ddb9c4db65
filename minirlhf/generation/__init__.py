"""Generation: the batched KV-cache sampler that produces rollouts for online RL, eval and chat."""

from .responses import generate_responses
from .sampler import Rollout, SamplingConfig, filter_logits, generate, left_pad

__all__ = ["Rollout", "SamplingConfig", "filter_logits", "generate", "generate_responses", "left_pad"]
