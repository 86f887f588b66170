"""dsllm: pretrain GPT-style language models from scratch on DeepSpeed."""

__version__ = "0.1.0"
