"""`dsllm reward-model`: a scalar head on a pretrained model, trained on preference pairs (`dsllm.preference`)."""

from dsllm.errors import ArgumentParser
from dsllm.preference import build_parser as _build_parser
from dsllm.preference import main_of


def build_parser() -> ArgumentParser:
    return _build_parser("reward")


main = main_of("reward")
