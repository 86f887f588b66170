"""`python -m dsllm report RUN_DIR`: plots of a run and a short markdown summary next to them.

    python -m dsllm report runs/gpt2                       # -> runs/gpt2/report/{summary.md, *.png}
    python -m dsllm report runs/gpt2 --prompt "def main(" --out /tmp/report

loss.png: training and validation loss against steps and against tokens; lr.png: the learning rate;
throughput.png: tokens/s (and MFU on a known GPU); attention.png: every head of every layer attending over
the tokens of a prompt (the run's model, the final weights or newest checkpoint). Rows of metrics.jsonl that a
resumed run wrote again count once (the later one).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dsllm.errors import ArgumentParser, UserError

METRICS_FILE = "metrics.jsonl"


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records), one per step, sorted; a later line for a step replaces an earlier one.
    A training record whose log window had every step skipped (non-finite) has `"skipped": true` and no loss."""
    path = run / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run}: no {METRICS_FILE}; pass a run folder (launch/pretrain.py --out DIR)")
    train, evals = {}, {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: not a metrics record (JSON with a step); the file is damaged") from None
        if "loss" in record or record.get("skipped"):
            train[step] = record
        if "val_loss" in record:
            evals[step] = record
    if not train and not evals:
        raise UserError(f"{path}: no training or evaluation records yet; report after the first log interval")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


@contextlib.contextmanager
def recorded_attention():
    """Every scaled_dot_product_attention call made inside records its attention weights [B, H, T, S] (fp32,
    CPU) in the yielded list; the outputs stay those of the real kernel."""
    maps, original = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kwargs):
        keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1) if enable_gqa else k
        scores = (q.float() @ keys.float().transpose(-2, -1)) * (scale or 1 / math.sqrt(q.shape[-1]))
        if is_causal:
            T, S = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T), float("-inf"))
        elif attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        maps.append(scores.softmax(-1).cpu())
        return original(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
            **kwargs,
        )

    F.scaled_dot_product_attention = sdpa
    try:
        yield maps
    finally:
        F.scaled_dot_product_attention = original


def attention_maps(model, token_ids: list[int]) -> torch.Tensor:
    """[layers, heads, T, T] attention weights of `model` over one sequence."""
    model.eval()
    with torch.no_grad(), recorded_attention() as maps:
        model(torch.tensor([token_ids], device=model.lm_head.weight.device))
    return torch.stack([m[0] for m in maps])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_loss(record: dict) -> float:
    """The record's loss, or NaN for a window with every step skipped: a gap in a plotted line, never a 0."""
    loss = record.get("loss")
    return math.nan if loss is None or record.get("skipped") else float(loss)


def plot_loss(train: list[dict], evals: list[dict], path: Path) -> None:
    plt = _plt()
    fig = loss_figure(train, evals)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_figure(train: list[dict], evals: list[dict]):
    """Training (and validation) loss against steps and against tokens; skipped windows are gaps in the line."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    with_tokens = [r for r in train if r.get("tokens")]
    tokens_per_step = with_tokens[-1]["tokens"] / with_tokens[-1]["step"] if with_tokens else 1.0  # for eval steps
    losses = [training_loss(r) for r in train]
    for ax, key, label, scale in ((axes[0], "step", "step", 1), (axes[1], "tokens", "tokens seen", tokens_per_step)):
        ax.plot([r.get(key, r["step"] * scale) for r in train], losses, label="training loss", lw=1.2)
        if evals:
            ax.plot(
                [r["step"] * scale for r in evals],
                [r["val_loss"] for r in evals],
                "o-",
                label="validation loss",
                lw=1.2,
            )
        ax.set(xlabel=label, title=f"loss vs {label}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats/token)")
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_series(train: list[dict], keys: list[tuple[str, str]], path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        ax.plot(*zip(*points), lw=1.2)
        ax.set(xlabel="step", ylabel=label, title=title if len(keys) == 1 else label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(maps: torch.Tensor, tokens: list[str], path: Path) -> None:
    plt = _plt()
    layers, heads = maps.shape[:2]
    size = max(1.6, min(3.0, 24 / max(layers, heads)))
    fig, axes = plt.subplots(layers, heads, figsize=(size * heads + 1, size * layers + 1), squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle("attention over: " + "".join(tokens)[:90].replace("\n", "\\n"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(run: Path, train: list[dict], evals: list[dict], images: list[str], prompt_tokens: int) -> str:
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    model, setup = config.get("model", {}), config.get("run", {})
    lines = [f"# Run report: {run.name}", ""]
    if model:
        lines.append(
            f"- model: {model.get('n_layers')} layers, d_model {model.get('d_model')}, {model.get('n_heads')} "
            f"heads ({model.get('n_kv_heads') or model.get('n_heads')} KV), {model.get('positions')} positions, "
            f"{model.get('norm')}, {model.get('mlp')}, vocab {model.get('vocab_size')}"
        )
    if setup:
        lines.append(
            f"- run: {setup.get('world_size')} rank(s), ZeRO-{setup.get('zero_stage')}, {setup.get('precision')}, "
            f"global batch {setup.get('global_batch_size')} x {setup.get('seq_len')} tokens"
        )
    if train:
        last = train[-1]
        speeds = [r["tokens_per_second"] for r in train if r.get("tokens_per_second")]
        losses = [r for r in train if math.isfinite(training_loss(r))]
        lines += [
            f"- trained: {last['step']:,} steps, {last.get('tokens', 0):,} tokens; "
            + (
                f"final training loss {training_loss(losses[-1]):.4f} at step {losses[-1]['step']:,} "
                f"(first logged {training_loss(losses[0]):.4f})"
                if losses
                else "no training loss logged"
            ),
            f"- throughput: median {sorted(speeds)[len(speeds) // 2]:,.0f} tokens/s" if speeds else "- throughput: n/a",
        ]
        mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
        if mfus:
            lines[-1] += f", MFU {100 * sorted(mfus)[len(mfus) // 2]:.1f}%"
        skipped = last.get("skipped_steps", 0)
        if skipped:
            lines.append(f"- skipped updates (non-finite gradients): {skipped}")
        gaps = len(train) - len(losses)
        if gaps:
            lines.append(f"- log windows with every step skipped (no loss; gaps in the loss plot): {gaps}")
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        final = evals[-1]
        lines.append(
            f"- validation: final loss {final['val_loss']:.4f}, "
            f"perplexity {final.get('perplexity', math.exp(final['val_loss'])):.2f}"
            + (f", {final['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in final else "")
            + f" at step {final['step']:,}; best {best['val_loss']:.4f} at step {best['step']:,}"
        )
    lines.append("")
    titles = {
        "loss.png": "Loss",
        "lr.png": "Learning rate",
        "throughput.png": "Throughput",
        "attention.png": f"Attention maps (layers x heads, {prompt_tokens} prompt tokens)",
    }
    for image in images:
        lines += [f"## {titles[image]}", "", f"![{titles[image]}]({image})", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m dsllm report", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1]
    )
    parser.add_argument("run", metavar="RUN_DIR", help="a run folder (launch/pretrain.py --out)")
    parser.add_argument("--out", help="where the PNGs and summary.md go (default RUN_DIR/report)")
    parser.add_argument(
        "--prompt",
        help="text for the attention maps (default: the start of the run's sample text, else a fixed sentence)",
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=24, help="tokens shown in the attention maps (default %(default)s)"
    )
    parser.add_argument("--no-attention", action="store_true", help="skip the attention maps (no model is loaded)")
    args = parser.parse_args(argv)
    from dsllm.checkpoint import CHECKPOINTS_DIR, CONFIG_FILE, WEIGHTS_FILE
    from dsllm.paths import check_output_apart
    from dsllm.tokenizer import TOKENIZER_FILE

    run = Path(args.run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    if args.max_prompt_tokens < 2:
        raise UserError(f"--max-prompt-tokens {args.max_prompt_tokens}: must be 2 or more")
    out = Path(args.out) if args.out else run / "report"
    check_output_apart(
        out,
        "--out",
        [
            ("the report", run / name)
            for name in (METRICS_FILE, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CHECKPOINTS_DIR)
        ],
    )
    train, evals = read_metrics(run)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if train:
        plot_loss(train, evals, out / "loss.png")
        plot_series(train, [("lr", "learning rate")], out / "lr.png", "learning rate")
        keys = [("tokens_per_second", "tokens/s")] + ([("mfu", "MFU")] if any(r.get("mfu") for r in train) else [])
        plot_series(train, keys, out / "throughput.png", "throughput")
        images += ["loss.png", "lr.png", "throughput.png"]
    prompt_tokens = 0
    if not args.no_attention:
        from dsllm.checkpoint import load_model_dir
        from dsllm.tokenizer import load_tokenizer

        if not (run / TOKENIZER_FILE).is_file():
            raise UserError(
                f"{run}: no {TOKENIZER_FILE}; pass --no-attention, or a run folder made by launch/pretrain.py"
            )
        tokenizer = load_tokenizer(run / TOKENIZER_FILE)
        model = load_model_dir(run)
        text = args.prompt or "The quick brown fox jumps over the lazy dog because it can."
        ids = tokenizer.encode(text).ids[: min(args.max_prompt_tokens, model.config.max_seq_len)]
        if len(ids) < 2:
            raise UserError(f"--prompt {text!r}: needs at least 2 tokens for an attention map")
        plot_attention(attention_maps(model, ids), [tokenizer.decode([i]) for i in ids], out / "attention.png")
        images.append("attention.png")
        prompt_tokens = len(ids)
    (out / "summary.md").write_text(summary(run, train, evals, images, prompt_tokens))
    print(f"wrote {out / 'summary.md'} and {', '.join(images)}")
    return 0


if __name__ == "__main__":
    from dsllm.errors import run_cli

    sys.exit(run_cli(main))
