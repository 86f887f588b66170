"""The reporting side of benchmarks/throughput.py: trials summed up into rows (best trial, ratios to the plain loop,
targets), memory scaling over ranks, DeepSpeed's own estimates, and the results files (.json, .md, .png).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from throughput_measure import ds_config_name, layout

TARGETS = {"zero0": 0.97, "zero1": 0.97, "zero2": 0.90}  # tokens/s as a share of the plain loop (the CPU issue)
GPU_TARGETS = {"zero0": 0.97, "zero1": 0.97, "zero2": 0.95}  # the GPU issue's (DeepSpeed #3544: ZeRO costs ~13%)
PIPELINE_TARGET = 0.8  # ppN tokens/s as a share of the ideal 1F1B figure (the pipeline issue)
PLAN_TOLERANCE = 0.15  # peak GPU memory within 15% of `dsllm plan`'s prediction (the GPU issue)
MEMORY_TARGET = {"zero2": 0.6}  # model-state memory per rank, N ranks over 1 rank (the issue)
POINT_KEYS = ("model", "seq_len", "micro_batch_size", "checkpointing", "ranks")


def ds_estimates(model_config, ranks: int) -> dict:
    """DeepSpeed's own model-state memory estimates, printed and exact (they assume 16-bit params)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from deepspeed.runtime.zero import stage3
        from deepspeed.runtime.zero import stage_1_and_2 as stage12
    from dsllm.model import GPT

    model, printed = GPT(model_config), io.StringIO()
    with contextlib.redirect_stdout(printed):  # these print a table and return nothing
        stage12.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=ranks, num_nodes=1)
        stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=ranks, num_nodes=1)
    total, largest = stage3.model_to_params(model)

    def z2(gpus, offload):  # the bytes behind the printed rows
        host, device = stage12.estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=offload)
        return {"device_gib": device / 2**30, "host_gib": host / 2**30}

    def z3(offload):  # ZeRO-3 builds the model inside zero.Init (dsllm.engine.new_model): the zero_init=1 rows
        host, device, _ = stage3.estimate_zero3_model_states_mem_needs(
            total, largest, ranks, 1, cpu_offload=offload, cpu_offload_params=offload, zero_init=True
        )
        return {"device_gib": device / 2**30, "host_gib": host / 2**30}

    return {
        "total_params": total,
        "largest_layer_params": largest,
        "printed": printed.getvalue(),
        "per_variant": {
            "zero0": z2(1, False),
            "zero1": z2(ranks, False),
            "zero2": z2(ranks, False),
            "zero2_offload": z2(ranks, True),
            "zero3": z3(False),
            "zero3_offload": z3(True),
        },
    }


def measured(row: dict) -> bool:
    """Whether a trial or row holds a measurement (neither failed nor skipped)."""
    return "error" not in row and "skipped" not in row


def plan_prediction(model_config, point: dict, variant: str) -> float | None:
    """`dsllm plan`'s GiB per GPU for this point and variant: DeepSpeed's model-state estimate + activations
    (plain: the ZeRO-0 row, whole states on one device); None for spN, which plan has no model of."""
    from dsllm.plan import GPU, activation_gib, largest_layer_params, model_state_gib, plan
    from dsllm.plan_layouts import layout_gib

    sizes, micro, seq = layout(variant), point["micro_batch_size"], point["seq_len"]
    if sizes["sequence"] > 1:
        return None
    if sizes["stages"] > 1 or sizes["tensor"] > 1:  # plan's layout rows: ZeRO-1 over the replicas
        tensor, stages = sizes["tensor"], sizes["stages"]
        return sum(layout_gib(model_config, tensor, stages, point["ranks"], micro, seq, point["checkpointing"]))
    if sizes["experts"] > 1:  # `dsllm plan --expert-parallel E`'s ZeRO-1 row (a GPU too big to matter)
        planned = plan(
            model_config,
            point["ranks"],
            GPU("any", 1e6, 1.0),
            micro_batch=micro,
            seq_len=seq,
            host_ram_gib=1e6,
            expert_parallel=sizes["experts"],
        )
        row = next(r for r in planned["configs"] if r["config"] == "zero1")
        return row["checkpointing" if point["checkpointing"] else "no_checkpointing"]["gib_per_gpu"]
    config = ds_config_name(variant)
    ranks = 1 if variant.startswith("plain") else point["ranks"]
    micro = point["micro_batch_size"] * (point["ranks"] if variant.startswith("plain") else 1)
    params = model_config.num_parameters()
    states, _ = model_state_gib(params, largest_layer_params(model_config), config, ranks, 1)
    return states + activation_gib(model_config, micro, point["seq_len"], point["checkpointing"])


def point_label(point: dict) -> str:
    return (
        f"{point['model']} T{point['seq_len']} mb{point['micro_batch_size']}"
        f"{' ckpt' if point['checkpointing'] else ''} x{point['ranks']}"
    )


def summarize(
    trials: list[dict],
    point_list: list[dict],
    names: list[str],
    estimates: dict,
    shapes: dict,
    peak: float | None,
    plans: dict | None = None,
    gpu: bool = False,
) -> list[dict]:
    """Rows: the best trial of each point and variant, its ratios to the plain loop and targets. `plans`: `dsllm
    plan`'s GiB by (point label, variant), compared with the peak on GPU (on CPU, RSS is not what plan predicts)."""
    from dsllm.metrics import mfu

    targets = GPU_TARGETS if gpu else TARGETS

    rows = []
    for point in point_list:
        label, (_, flops, params) = point_label(point), shapes[point_label({**point, "ranks": 1})]
        mine = []
        for variant in names:
            runs = [t for t in trials if t["variant"] == variant and all(t[k] == point[k] for k in POINT_KEYS)]
            ok = [t for t in runs if measured(t)]
            if not ok:
                why = "skipped" if "skipped" in runs[0] else "error"
                mine.append({**point, "point": label, "variant": variant, why: runs[0][why]})
                continue
            best = max(ok, key=lambda t: t["tokens_per_second"])
            estimate = estimates[(point["model"], point["ranks"])]["per_variant"].get(variant.removesuffix("+compile"))
            planned = (plans or {}).get((label, variant))
            peak_gib = max(r["peak_memory_gib"] for r in best["per_rank"])
            mine.append(
                {
                    **best,
                    **point,
                    "point": label,
                    "parameters": params,
                    "flops_per_token": flops,
                    "trials_tokens_per_second": [round(t["tokens_per_second"], 1) for t in ok],
                    "tokens_per_cpu_second": max(t["tokens_per_cpu_second"] for t in ok),
                    "tokens_per_second_per_rank": [r["tokens_per_second"] for r in best["per_rank"]],
                    "peak_memory_gib": peak_gib,
                    "plan_gib": planned,
                    "peak_over_plan": peak_gib / planned if planned and gpu else None,
                    "plan_within_tolerance": (
                        abs(peak_gib / planned - 1) <= PLAN_TOLERANCE if planned and gpu else None
                    ),
                    "memory_over_baseline_gib": max(
                        r["peak_memory_gib"] - r["baseline_memory_gib"] for r in best["per_rank"]
                    ),
                    "model_state_gib": max(r["model_state_gib"] for r in best["per_rank"]),
                    "first_step_seconds": max(r["first_step_seconds"] for r in best["per_rank"]),
                    "tflops": best["tokens_per_second"] * flops / 1e12,
                    "mfu": mfu(best["tokens_per_second"], flops, peak, best["world_size"]),
                    "ds_estimate": estimate,
                    "target": targets.get(variant),
                }
            )
        reference = next(
            (r for r in mine if r["variant"] == "plain" and measured(r)),
            next((r for r in mine if r["variant"] == "plain+compile" and measured(r)), None),
        )
        for row in (r for r in mine if measured(r)):
            row["ratio_to_plain"] = row["tokens_per_second"] / reference["tokens_per_second"] if reference else None
            row["cpu_time_ratio_to_plain"] = (
                row["tokens_per_cpu_second"] / reference["tokens_per_cpu_second"] if reference else None
            )
            row["meets_target"] = (
                None if row["target"] is None or reference is None else row["ratio_to_plain"] >= row["target"]
            )
            if row.get("pipeline_stages", 1) > 1 and reference is not None:
                # 1F1B over M micro batches on P stages idles (P-1)/(M+P-1) of the time: with every process as fast
                # as the plain loop's (the same --threads), P x R processes reach P*R*M/(M+P-1) x plain at best
                stages, micro = row["pipeline_stages"], row["micro_batches"]
                row["bubble_ideal"] = (stages - 1) / (micro + stages - 1)
                row["ideal_ratio_to_plain"] = row["world_size"] * (1 - row["bubble_ideal"])
                row["ratio_to_ideal"] = row["ratio_to_plain"] / row["ideal_ratio_to_plain"]
                row["target"] = PIPELINE_TARGET
                row["meets_target"] = row["ratio_to_ideal"] >= PIPELINE_TARGET
            timed = [r for r in row["per_rank"] if r.get("comm_seconds_per_step") is not None]
            if timed:  # (tpN, spN, epN) the slowest rank's time in collectives, of the median step, and by op
                slowest = max(timed, key=lambda r: r["comm_seconds_per_step"])
                ops = slowest.get("comm_op_seconds_per_step") or {}
                row["comm_seconds_per_step"] = slowest["comm_seconds_per_step"]
                row["comm_fraction"] = row["comm_seconds_per_step"] / row["median_step_seconds"]
                row["comm_op_seconds_per_step"] = ops
                row["all_to_all_seconds_per_step"] = sum(v for op, v in ops.items() if op.startswith("all_to_all"))
                row["all_to_all_fraction"] = row["all_to_all_seconds_per_step"] / row["median_step_seconds"]
        rows += mine
    return rows


def model_ratios(rows: list[dict]) -> list[dict]:
    """With several --model: the first model's step time and tokens/s over each other model's, for every point and
    variant both ran (their trials interleaved, so a slow spell of the machine hits both alike)."""
    ok = [r for r in rows if measured(r)]
    first = next((r["model"] for r in ok), None)
    return [
        {
            "point": point_label({**row, "model": "*"}),
            "variant": row["variant"],
            "model": first,
            "other": other["model"],
            "step_seconds": row["median_step_seconds"],
            "other_step_seconds": other["median_step_seconds"],
            "tokens_per_second_ratio": row["tokens_per_second"] / other["tokens_per_second"],
        }
        for row in ok
        if row["model"] == first
        for other in ok
        if other["model"] != first
        and other["variant"] == row["variant"]
        and all(other[k] == row[k] for k in POINT_KEYS if k != "model")
    ]


def memory_scaling(rows: list[dict]) -> list[dict]:
    """Model-state memory per rank at N ranks over 1 rank, for every point and variant measured at both."""
    out = []
    for row in (r for r in rows if measured(r) and r["ranks"] > 1 and not r["variant"].startswith("plain")):
        one = next(
            (
                r
                for r in rows
                if measured(r)
                and r["ranks"] == 1
                and r["variant"] == row["variant"]
                and all(r[k] == row[k] for k in POINT_KEYS if k != "ranks")
            ),
            None,
        )
        if one is None:
            continue
        ratio = row["model_state_gib"] / one["model_state_gib"] if one["model_state_gib"] > 0 else None
        target = MEMORY_TARGET.get(row["variant"])
        out.append(
            {
                "point": point_label({**row, "ranks": 1}),
                "variant": row["variant"],
                "ranks": row["ranks"],
                "model_state_gib_1_rank": one["model_state_gib"],
                "model_state_gib_n_ranks": row["model_state_gib"],
                "ratio": ratio,
                "target": target,
                "meets_target": None if target is None or ratio is None else ratio <= target,
            }
        )
    return out


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| point | variant | ranks | tokens/s total | tokens/s per rank | x plain (target) | x plain, CPU time | "
        "TFLOP/s | MFU | peak mem/rank MiB | plan MiB (peak/plan) | model states/rank MiB | "
        "DS estimate/rank MiB (device, host) | first step s | optimizer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if not measured(r):
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['error'].splitlines()[0]}"
            lines.append(f"| {r['point']} | {r['variant']} | {why} |" + " |" * 12)
            continue
        ratio = "n/a" if r["ratio_to_plain"] is None else f"{r['ratio_to_plain']:.3f}"
        if r.get("ratio_to_ideal") is not None:
            ratio += f" = {r['ratio_to_ideal']:.2f} of the 1F1B ideal {r['ideal_ratio_to_plain']:.2f}"
        if r.get("comm_fraction") is not None:
            ratio += (
                f"; {1000 * r['comm_seconds_per_step']:.1f} ms/step in collectives ({100 * r['comm_fraction']:.0f}%)"
            )
            if r.get("all_to_all_seconds_per_step"):
                all_to_all = 1000 * r["all_to_all_seconds_per_step"]
                ratio += f", all-to-all {all_to_all:.1f} ms ({100 * r['all_to_all_fraction']:.0f}%)"
        if r["meets_target"] is not None:
            ratio += f" ({r['target']:.2f} {'ok' if r['meets_target'] else 'MISS'})"
        util = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        est = (
            "-"
            if r["ds_estimate"] is None
            else "{:,.1f}, {:,.1f}".format(*(1024 * r["ds_estimate"][k] for k in ("device_gib", "host_gib")))
        )
        per_rank = " / ".join(f"{x:,.0f}" for x in r["tokens_per_second_per_rank"])
        cpu = "n/a" if r["cpu_time_ratio_to_plain"] is None else f"{r['cpu_time_ratio_to_plain']:.3f}"
        planned = "-" if r.get("plan_gib") is None else f"{1024 * r['plan_gib']:,.0f}"
        if r.get("peak_over_plan") is not None:
            planned += f" ({r['peak_over_plan']:.2f} {'ok' if r['plan_within_tolerance'] else 'MISS'})"
        lines.append(
            f"| {r['point']} | {r['variant']} | {r['world_size']} | {r['tokens_per_second']:,.0f} | {per_rank} | "
            f"{ratio} | {cpu} | {r['tflops']:.3f} | {util} | {1024 * r['peak_memory_gib']:,.0f} | {planned} | "
            f"{1024 * r['model_state_gib']:,.1f} | {est} | {r['first_step_seconds']:.1f} | {r['optimizer']} |"
        )
    return lines


def scaling_table(scaling: list[dict]) -> list[str]:
    lines = [
        "| point | variant | ranks | model states/rank, 1 rank MiB | N ranks MiB | ratio (target) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m in scaling:
        ratio = "n/a" if m["ratio"] is None else f"{m['ratio']:.3f}"
        if m["meets_target"] is not None:
            ratio += f" (<= {m['target']:.2f} {'ok' if m['meets_target'] else 'MISS'})"
        lines.append(
            f"| {m['point']} | {m['variant']} | {m['ranks']} | {1024 * m['model_state_gib_1_rank']:,.2f} | "
            f"{1024 * m['model_state_gib_n_ranks']:,.2f} | {ratio} |"
        )
    return lines


def markdown(r: dict) -> str:
    s, hw = r["settings"], r["hardware"]
    overrides = "".join(f" --model.{k} {val}" for k, val in s["model_overrides"].items())
    loads = [t[k] for t in r["trials"] if measured(t) for k in ("load_average_before", "load_average_after")]
    ok = [row for row in r["rows"] if measured(row)]
    kinds = {row["variant"][:2] for row in r["rows"]}
    notes = [
        "point: model, T = tokens per sample, mb = micro batch per rank, "
        "ckpt = activation checkpointing of every block, "
        "xN = ranks of the ZeRO variants.",
        f"tokens/s: global tokens per step / median step time ({s['steps']} timed steps after "
        f"{s['warmup_steps']} warm-up; "
        f"a step lasts as long as its slowest rank); best of {s['repeats']} interleaved trial(s). "
        "The mean is in the JSON.",
        "x plain: over the plain PyTorch loop of the same point (torch AdamW, same param groups, cosine LR, "
        "clipping 1.0"
        + (", bf16 autocast" if s["precision"] == "bf16" else "")
        + f"); with N ranks it runs as ONE process "
        f"({'one GPU' if 'gpu' in hw else 'all cores'}) with micro batch x N, the same global batch.",
        "x plain, CPU time: global tokens per CPU-second of all the variant's processes (median step; best trial). "
        "Time a process waits descheduled while other work shares the machine is not counted, so this ratio is the "
        "steadier one on a busy machine; busy-waiting threads still count. CPU threads per process: "
        + ", ".join(sorted({f"{row['variant']} {row['threads']}" for row in ok}))
        + ".",
        f"1-min load average around the trials: {min(loads, default=0):.1f} to {max(loads, default=0):.1f} on "
        f"{hw['cores']} cores (this run's own threads count too; more means other work shared the machine).",
        (
            "peak mem: torch.cuda.max_memory_allocated per rank."
            if "gpu" in hw
            else "peak mem: peak RSS of each process (Python, torch, DeepSpeed included)."
        )
        + " model states: bytes of the distinct tensor storages alive after backward, just before the optimizer "
        "step (a gc walk: activations are freed by then, gradients are not), minus those alive before the model "
        "was built: parameters, gradients, optimizer states and DeepSpeed's buffers and partitions.",
        "DS estimate: DeepSpeed's estimate_zero2/zero3_model_states_mem_needs for the same parameter count; it assumes "
        "16-bit parameters with fp32 optimizer states (no ZeRO-0/1 estimator exists: ZeRO-0 shows the ZeRO-2 formula "
        "at 1 rank and ZeRO-1 the ZeRO-2 formula). MFU needs --peak-tflops or a known GPU.",
        "plan: `dsllm plan`'s memory per GPU for the same model, stage, micro batch, sequence and checkpointing "
        f"(DeepSpeed's model-state estimate + activations); on GPU peak/plan is checked to within "
        f"{PLAN_TOLERANCE:.0%}.",
        "ppN: N pipeline stages (DeepSpeed's PipelineEngine, ZeRO-1) x the point's ranks as replicas, M micro "
        "batches a step (--micro-batches); its 1F1B ideal is P*R*M/(M+P-1) x the plain loop (every stage as fast as "
        "the plain process, so compare at equal --threads), and the share of it reached is checked against "
        f"{PIPELINE_TARGET:.0%}.",
        "tpN: N tensor-parallel ranks (DeepSpeed's AutoTP, ZeRO-1) x the point's ranks as replicas; ideal N x R x "
        "the plain loop at equal --threads. ms/step in collectives: the slowest rank's time inside DeepSpeed's "
        "collectives per timed step, by its comms logger (each op made blocking); with one replica these are the "
        "tensor-parallel all-reduces (two per block forward, their backward twins) and the vocabulary-parallel "
        "loss's.",
        *(
            [
                "spN: N sequence-parallel ranks (DeepSpeed-Ulysses, ZeRO-1) x the point's ranks as replicas, the "
                "same global batch: each rank runs T/N tokens of every window and two all-to-alls around attention in "
                "every block (and their backward twins) trade the sequence for the heads. ms/step in collectives: "
                "those all-to-alls plus ZeRO's gradient reduction and parameter all-gather over all N x R ranks (the "
                "sequence group's loss all-reduce goes through torch.distributed and is not logged); all-to-all: "
                "DeepSpeed's all_to_all_single alone."
            ]
            if "sp" in kinds
            else []
        ),
        *(
            [
                "epN: the experts of every sparse block split over N of the point's data-parallel ranks (DeepSpeed's "
                "MoE ep_size, ZeRO-1), as many processes as zeroN: each rank holds experts/N of them and sends each "
                "the tokens routed to it with an all-to-all before the experts and one after (and their backward "
                "twins). ms/step in collectives: those all-to-alls plus ZeRO's reductions; all-to-all: the former "
                "alone. A dense model has no epN row."
            ]
            if "ep" in kinds
            else []
        ),
        "first step: seconds of the first step (torch.compile, DeepSpeed's lazy buffers), never counted in tokens/s.",
    ]
    lines = [
        f"# Training throughput and memory, {r['date'][:10]}, {hw['slug']}",
        "",
        f"- command: `{r['command']}`",
        f"- git revision: `{r['git_revision']}`",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in r["versions"].items()),
        f"- hardware: {hw['gpu'] + ' x' + str(hw['gpus']) if 'gpu' in hw else hw['cpu']}, {hw['cores']} CPU cores",
        "- models: "
        + "; ".join(
            f"`{m}{overrides}` {shape['parameters']:,} parameters"
            + (
                f" ({shape['active_parameters']:,} active per token)"
                if shape.get("active_parameters", shape["parameters"]) != shape["parameters"]
                else ""
            )
            for m, shape in s["models"].items()
        ),
        f"- {s['precision']}; data `{s['data']}`",
        "",
        *table(r["rows"]),
        "",
    ]
    if r["memory_scaling"]:
        lines += [
            "Model-state memory per rank as ranks grow (same point, same variant):",
            "",
            *scaling_table(r["memory_scaling"]),
            "",
        ]
    lines += [
        *[f"- {n}" for n in notes],
        "- trials, tokens/s: "
        + "; ".join(
            f"{row['point']} {row['variant']} {', '.join(f'{x:,.0f}' for x in row['trials_tokens_per_second'])}"
            for row in ok
        ),
    ]
    if r.get("model_ratios"):
        lines.append(
            "- models side by side (same point and variant, interleaved trials), median step and tokens/s of the "
            "first over the other: "
            + "; ".join(
                f"`{m['model']}` vs `{m['other']}` {m['point']} {m['variant']}: {m['step_seconds']:.3f} s vs "
                f"{m['other_step_seconds']:.3f} s a step, {m['tokens_per_second_ratio']:.3f}x the tokens/s"
                for m in r["model_ratios"]
            )
        )
    timed = [row for row in ok if row.get("comm_op_seconds_per_step")]
    if timed:
        lines.append(
            "- collectives per timed step by op, slowest rank: "
            + "; ".join(
                f"{row['point']} {row['variant']} "
                + ", ".join(f"{op} {1000 * sec:.1f} ms" for op, sec in sorted(row["comm_op_seconds_per_step"].items()))
                for row in timed
            )
        )
    for (model, ranks), estimate in r["ds_estimates"].items():
        lines += [
            "",
            f"DeepSpeed's printed estimates for {model} (num_gpus_per_node={ranks}, num_nodes=1):",
            "",
            "```",
            estimate["printed"].rstrip(),
            "```",
        ]
    for row in (row for row in r["rows"] if "error" in row):
        lines += ["", f"{row['point']} {row['variant']} failed:", "", "```", row["error"], "```"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # optional: no plot without matplotlib
    ok = [r for r in rows if measured(r)]
    labels = list(dict.fromkeys(r["point"] for r in ok))
    names = list(dict.fromkeys(r["variant"] for r in ok))
    width = 0.8 / max(1, len(names))
    fig, (speed, memory) = plt.subplots(2, 1, figsize=(max(6.0, 1.0 + len(labels) * (0.5 + 0.35 * len(names))), 8))
    for i, name in enumerate(names):
        xs = [labels.index(r["point"]) + (i - (len(names) - 1) / 2) * width for r in ok if r["variant"] == name]
        mine = [r for r in ok if r["variant"] == name]
        bars = speed.bar(xs, [r["tokens_per_second"] for r in mine], width, label=name)
        speed.bar_label(bars, [f"{r['ratio_to_plain']:.2f}" if r["ratio_to_plain"] else "" for r in mine], fontsize=7)
        memory.bar(xs, [r["model_state_gib"] for r in mine], width, label=name)
        estimated = [
            (x, r["ds_estimate"]["device_gib"] + r["ds_estimate"]["host_gib"])
            for x, r in zip(xs, mine)
            if r["ds_estimate"]
        ]
        if estimated:
            memory.scatter(
                *zip(*estimated),
                marker="_",
                s=200,
                color="black",
                zorder=3,
                label="DeepSpeed estimate" if i == 0 else None,
            )
    for ax in (speed, memory):
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    speed.set(ylabel="tokens/s (all ranks)", title=f"{title}\nbar labels: x plain loop")
    memory.set(ylabel="model states per rank, GiB (bars: measured)")
    speed.legend(fontsize=7, ncols=min(4, len(names)))
    memory.legend(fontsize=7, ncols=min(4, len(names) + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict, estimates: dict, results_dir: Path, tag: str | None) -> Path:
    """YYYY-MM-DD-throughput-<hardware>[-TAG].{json,md,png} in `results_dir`; returns the path without suffix.
    `estimates`: ds_estimates by (model, ranks), for the markdown's printed tables."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{result['date'][:10]}-throughput-{result['hardware']['slug']}{'-' + tag if tag else ''}"
    # name + ".json", not with_suffix: a tag such as llama-1.3b has a dot that with_suffix would cut at
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown({**result, "ds_estimates": estimates}))
    plot(result["rows"], Path(f"{stem}.png"), f"{result['settings']['precision']}, {result['hardware']['slug']}")
    return stem
