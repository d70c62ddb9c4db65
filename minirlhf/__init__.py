"""minirlhf: align small language models with SFT, reward models, DPO, PPO, GRPO, SPO and RLAIF."""

__version__ = "0.1.0"
