"""posttrain: staged post-training for language models (SFT, GRPO, ...)."""

__version__ = "0.1.0"
