"""`python -m dsllm consolidate --checkpoint PATH --output DIR`: one fp32 model folder (safetensors +
config + tokenizer) from a training checkpoint of any ZeRO stage and world size (`zero_to_fp32`)."""

from __future__ import annotations

from pathlib import Path

from dsllm.errors import ArgumentParser, UserError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dsllm consolidate", description=__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="checkpoints/stepNNNNNNNN folder, or a run folder (its newest complete checkpoint)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="model folder to write (new or empty)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dsllm.model_dir import load_model_dir, model_inputs, resolve_model_source, save_model_dir
    from dsllm.paths import check_output_apart
    from dsllm.tokenizer import TOKENIZER_FILE

    check_output_apart(args.output, "--output", model_inputs(args.checkpoint, "--checkpoint"))
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output}: exists and is not an empty folder; choose another --output")
    model = load_model_dir(args.checkpoint)
    home = resolve_model_source(args.checkpoint)[2]
    save_model_dir(model, output, home / TOKENIZER_FILE)
    print(f"wrote {model.config.num_parameters():,} fp32 parameters to {output}")
    return 0
