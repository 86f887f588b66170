"""`python -m dsllm report RUN_DIR`: plots of a run and a short markdown summary next to them.

    python -m dsllm report runs/gpt2                       # -> runs/gpt2/report/{summary.md, *.png}
    python -m dsllm report runs/gpt2 --prompt "def main(" --out /tmp/report

loss.png: training and validation loss against steps and against tokens; lr.png: the learning rate at every
step from 0, replayed with the run's own scheduler from config.json (warmup included), its phases (warmup, stable,
decay) shaded and listed with their steps in summary.md, with the logged values
on it; throughput.png: tokens/s (and MFU on a known GPU) from zero; attention.png: every head of every layer
attending over the tokens of a prompt, labelled with the tokens, on one colour scale (the run's model, the
final weights or newest checkpoint); sources.png, for a run on a weighted mixture: the training tokens read from
each source (a schedule's switch is a change of slope) and each source's validation loss. Rows of metrics.jsonl
that a resumed run wrote again count once (the later one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import sys
from pathlib import Path

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
    import torch
    import torch.nn.functional as F

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


def attention_maps(model, token_ids: list[int]):
    """[layers, heads, T, T] attention weights of `model` over one sequence (a CPU tensor)."""
    import torch

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


def lr_schedule(config: dict, last_step: int = 0) -> list[tuple[int, float]] | None:
    """[(step, learning rate after that step)] for every step from 0 (before the first) to the run's max_steps,
    replayed with the scheduler the run used on a one-parameter optimizer at the run's lr: the DeepSpeed JSON's
    "scheduler" (DeepSpeed's class of that name, else torch's, as the engine picks), else the trainer's warmup +
    cosine. The trainer logs the same value (the lr after the step), so the logged points lie on this line.
    None when config.json does not say (no "train" section, or a scheduler neither library has)."""
    train, ds = config.get("train"), config.get("deepspeed") or {}
    if not isinstance(train, dict) or "max_steps" not in train:
        return None
    import torch

    lr = ds.get("optimizer", {}).get("params", {}).get("lr", train.get("lr"))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # its schedulers warn about reading the lr before step 1
    try:
        if "scheduler" in ds:
            with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints banners on import
                from deepspeed.runtime import lr_schedules
            name = ds["scheduler"].get("type", "")
            make = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
            if make is None:
                return None
            scheduler = make(optimizer, **ds["scheduler"].get("params", {}))
        else:
            schedule = recorded_schedule(config)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.factor(step))
        rates = [(0, float(optimizer.param_groups[0]["lr"]))]
        optimizer.step()  # no gradients, no change: only tells torch the optimizer steps before its scheduler
        for step in range(1, max(int(train["max_steps"]), last_step) + 1):
            scheduler.step()
            rates.append((step, float(optimizer.param_groups[0]["lr"])))
    finally:
        ds_logger.setLevel(level)
    return rates


def recorded_schedule(config: dict):
    """The run's lr phases (dsllm.schedule.Schedule): config.json's "schedule", or for a run recorded before phases
    were, the schedule its options name."""
    from dsllm.schedule import recorded_phases
    from dsllm.train_config import TrainConfig

    if config.get("schedule"):
        return recorded_phases(config["schedule"], "config.json schedule")
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    options = TrainConfig(**{key: value for key, value in config["train"].items() if key in known})
    return options.lr_schedule()


def schedule_phases(config: dict) -> list[dict]:
    """[{name, shape, start, end, from, to}] of the run's lr phases, named as a person says them (warmup, stable,
    decay, cosine, ...); [] when the DeepSpeed JSON's scheduler ran the lr or config.json does not say."""
    if "scheduler" in (config.get("deepspeed") or {}) or not isinstance(config.get("train"), dict):
        return []
    try:
        phases = recorded_schedule(config).phases
    except (UserError, TypeError, KeyError):
        return []
    named = []
    for phase in phases:
        a, b = phase.start_factor, phase.end_factor
        if phase.shape == "constant":
            name = "stable"
        elif b > a:
            name = "warmup"
        else:
            name = "decay"
        named.append({"name": name, "shape": phase.shape, "start": phase.start, "end": phase.end, "from": a, "to": b})
    return named


def lr_figure(train: list[dict], schedule: list[tuple[int, float]] | None, phases: list[dict] = ()):
    """The learning rate from step 0: the replayed schedule as a line, the logged values as points on it (the
    logged points alone, from an x axis at 0, when the schedule cannot be replayed); each phase of the schedule
    (warmup, stable, decay) a shaded band, labelled."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colours = {"warmup": "tab:orange", "stable": "tab:green", "decay": "tab:purple"}
    for phase in phases:
        if phase["end"] > phase["start"]:
            ax.axvspan(phase["start"], phase["end"], color=colours[phase["name"]], alpha=0.12, lw=0)
            ax.text(
                (phase["start"] + phase["end"]) / 2,
                0.02,
                phase["name"],
                transform=ax.get_xaxis_transform(),
                ha="center",
                fontsize=8,
            )
    logged = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
    if schedule:
        ax.plot(*zip(*schedule), lw=1.2, label="schedule (replayed from config.json)")
    if logged:
        ax.plot(*zip(*logged), "o" if schedule else "o-", ms=3, lw=1.2, label="logged")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax.grid(alpha=0.3)
    if schedule and logged:
        ax.legend()
    fig.tight_layout()
    return fig


def series_figure(train: list[dict], keys: list[tuple[str, str]], title: str):
    """One panel per (record key, label) against steps, each y axis from zero."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), lw=1.2)
        ax.set_ylim(bottom=0)  # a throughput drop reads as a drop, not as a cliff of an auto-scaled axis
        ax.set(xlabel="step", ylabel=label, title=title if len(keys) == 1 else label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def sources_figure(train: list[dict], evals: list[dict]):
    """A mixture's sources: training tokens read from each (cumulative) and its validation loss, against steps."""
    plt = _plt()
    fig, (tokens_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({name for r in train for name in r.get("sources", {})} | _by_source(evals))
    for name in names:
        read = [(r["step"], r["sources"][name]["tokens"]) for r in train if name in r.get("sources", {})]
        if read:
            tokens_ax.plot(*zip(*read), lw=1.2, label=name)
        losses = [(r["step"], r["val_loss_by_source"][name]) for r in evals if name in r.get("val_loss_by_source", {})]
        if losses:
            loss_ax.plot(*zip(*losses), "o-", lw=1.2, label=name)
    tokens_ax.set(xlabel="step", ylabel="training tokens read", title="tokens per source")
    loss_ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="validation loss per source")
    for ax in (tokens_ax, loss_ax):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    tokens_ax.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


def _by_source(evals: list[dict]) -> set[str]:
    return {name for r in evals for name in r.get("val_loss_by_source", {})}


def token_label(token: str, width: int = 10) -> str:
    """A decoded token as a tick label: whitespace made visible (space as ·, \\n, \\t), cut to `width` characters
    with an ellipsis, `$` escaped so matplotlib does not read it as math."""
    text = token.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t").replace(" ", "\u00b7")
    if len(text) > width:
        text = text[: width - 1] + "\u2026"
    return text.replace("$", r"\$")


def attention_figure(maps, tokens: list[str]):
    """Every head (columns) of every layer (rows) over the prompt: query tokens down, key tokens across, on the
    bottom row and the first column, and one colour scale for all (attention weight, 0 to 1)."""
    plt = _plt()
    layers, heads, length = maps.shape[0], maps.shape[1], maps.shape[2]
    size = max(1.6, min(3.0, 24 / max(layers, heads)))
    fig, axes = plt.subplots(
        layers,
        heads,
        figsize=(size * heads + 1.5, size * layers + 1.5),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    labels = [token_label(token) for token in tokens]
    fontsize = max(3.5, min(8.0, 0.7 * size * 72 / length))  # points: about one row of the map
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            image = ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    axes[-1][0].set_xticks(range(length), labels)  # the axes are shared: every panel gets them
    axes[-1][0].set_yticks(range(length), labels)
    for ax in axes.flat:  # shown on the bottom row (keys) and the first column (queries)
        ax.tick_params(labelsize=fontsize, length=2)
        ax.tick_params(axis="x", labelrotation=90)
    fig.colorbar(image, ax=axes, shrink=min(1.0, 4 / layers + 0.2), label="attention weight")
    fig.suptitle("attention over: " + "".join(tokens)[:90].replace("\n", "\\n").replace("$", r"\$"), fontsize=9)
    return fig


def save(fig, path: Path, dpi: int = 110) -> None:
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)


def summary(
    run: Path, config: dict, train: list[dict], evals: list[dict], images: list[str], prompt_tokens: int
) -> str:
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
        if final.get("val_loss_by_source"):
            by_source = ", ".join(f"{name} {loss:.4f}" for name, loss in final["val_loss_by_source"].items())
            lines.append(f"- validation loss by source at step {final['step']:,}: {by_source}")
    read = train[-1].get("sources") if train else None
    if read:
        lines.append(
            "- tokens read by source: "
            + ", ".join(f"{name} {s['tokens']:,} ({s['epochs']:.2f} epochs)" for name, s in read.items())
        )
    phases = schedule_phases(config)
    if phases:
        lines.append(
            "- lr schedule: "
            + ", ".join(
                f"{p['name']} steps {p['start']}-{p['end']} ({p['shape']} {p['from']:g}"
                + ("" if p["shape"] == "constant" else f" -> {p['to']:g}")
                + " x lr)"
                for p in phases
            )
        )
    lines.append("")
    titles = {
        "loss.png": "Loss",
        "lr.png": "Learning rate (from step 0, warmup included)",
        "throughput.png": "Throughput",
        "sources.png": "Mixture sources: tokens read and validation loss",
        "attention.png": f"Attention maps (layers x heads, {prompt_tokens} prompt tokens)",
    }
    for image in images:
        lines += [f"## {titles[image]}", "", f"![{titles[image]}]({image})", ""]
    return "\n".join(lines)


def read_config(run: Path) -> dict:
    """The run's config.json ({} when there is none: a run folder of another tool still gets its plots)."""
    path = run / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err}); the file is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object; the file is damaged")
    return config


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="dsllm report", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1]
    )
    parser.add_argument(
        "run", metavar="RUN_DIR", help="a run folder (launch/pretrain.py --out): metrics.jsonl, config.json, model"
    )
    parser.add_argument("--out", help="folder for the PNGs and summary.md (default: RUN_DIR/report)")
    parser.add_argument(
        "--prompt",
        help="text whose tokens the attention maps show (default: a fixed English sentence)",
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=24, help="most prompt tokens in the attention maps, 2 or more"
    )
    parser.add_argument("--no-attention", action="store_true", help="skip the attention maps (no model is loaded)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dsllm.checkpoint.store import CHECKPOINTS_DIR
    from dsllm.model_dir import CONFIG_FILE, WEIGHTS_FILE
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
    config = read_config(run)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if train:
        save(loss_figure(train, evals), out / "loss.png")
        phases = schedule_phases(config)
        save(lr_figure(train, lr_schedule(config, train[-1]["step"]), phases), out / "lr.png")
        keys = [("tokens_per_second", "tokens/s")] + ([("mfu", "MFU")] if any(r.get("mfu") for r in train) else [])
        save(series_figure(train, keys, "throughput"), out / "throughput.png")
        images += ["loss.png", "lr.png", "throughput.png"]
    if any("sources" in r for r in train) or _by_source(evals):
        save(sources_figure(train, evals), out / "sources.png")
        images.append("sources.png")
    prompt_tokens = 0
    if not args.no_attention:
        from dsllm.model_dir import load_model_dir
        from dsllm.tokenizer import load_tokenizer

        if not (run / TOKENIZER_FILE).is_file():
            raise UserError(
                f"{run}: no {TOKENIZER_FILE}; pass --no-attention, or a run folder made by launch/pretrain.py"
            )
        tokenizer = load_tokenizer(run / TOKENIZER_FILE)
        model = load_model_dir(run)
        text = args.prompt or "The quick brown fox jumps over the lazy dog because it can."
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        ids = ids[: min(args.max_prompt_tokens, model.config.max_seq_len)]
        if len(ids) < 2:
            raise UserError(f"--prompt {text!r}: needs at least 2 tokens for an attention map")
        tokens = [tokenizer.decode([i]) for i in ids]
        save(attention_figure(attention_maps(model, ids), tokens), out / "attention.png", dpi=90)
        images.append("attention.png")
        prompt_tokens = len(ids)
    (out / "summary.md").write_text(summary(run, config, train, evals, images, prompt_tokens))
    print(f"wrote {out / 'summary.md'} and {', '.join(images)}")
    return 0


if __name__ == "__main__":
    from dsllm.errors import run_cli

    sys.exit(run_cli(main))
