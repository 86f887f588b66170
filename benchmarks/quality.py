#!/usr/bin/env python
"""Quality per unit of compute: trains recipes for a fixed budget of CPU-seconds (or GPU-seconds), then scores
bits per byte on the WHOLE validation text (every target, `dsllm evaluate`'s own code), over seeds and datasets.

    python benchmarks/quality.py                                      # dsllm-default, 300 CPU-s, 2 seeds, 2 datasets
    python benchmarks/quality.py --recipes dsllm-default,mine --recipe-file recipes.yaml --nanogpt /tmp/nanogpt
    python benchmarks/quality.py --quick --dataset test=DIR --results-dir /tmp/q   # CI-sized

A recipe is a name and `dsllm pretrain` options: built in, `dsllm-default` (launch/recipes/default.yaml), or from
--recipe-file (YAML/JSON: {name: [ARG, ...] or "ARGS as one string"}). Its --max-steps sets its schedule; the
budget cuts it (or it ends earlier). Each run is one process (`python -m dsllm pretrain`, one rank, no loader
workers, OMP_NUM_THREADS=1) pinned to one core, stopped by its own `--max-cpu-seconds` at a step boundary: the
process's CPU time from its start (imports, setup, evaluations and logging included; the final checkpoint is
written past the budget and not counted). The CPU-s reported are the process's, by getrusage(RUSAGE_CHILDREN).
`--budget-kind gpu`: the budget is wall-clock seconds of the training process on one device (`--max-time`, from
the process's start), for a GPU; no pinning.

Datasets: `shakespeare` (../shared/data/tinyshakespeare.txt: the first 90% of its characters train, the LAST 10%
are the validation text, nanoGPT's shakespeare_char split; a byte-level BPE tokenizer trained on the train part
only, prepared with dsllm's pipeline, no cleaning, so the token files decode to the text exactly; cached under
$DSLLM_CACHE_DIR/quality/), `stdlib` (the embedded default corpus, dsllm.data.default_corpus, its hashed 5%
held-out documents) and any prepared dataset (--dataset NAME=DIR, its val split). Training never reads a val split.

`--nanogpt DIR`: a checkout of karpathy/nanoGPT OUTSIDE this project (never copied in) runs its README's CPU
recipe for shakespeare_char under the same budget on each dataset, on the same text: its train.bin/val.bin/
meta.pkl are written from this benchmark's train and validation texts (characters, nanoGPT's format) into
DIR/data/dsllm-quality-NAME/. It is stopped (SIGKILL) when its process's CPU time passes the budget; its
checkpoint (saved by its own rule: at an evaluation that improved val loss) is scored here on EVERY character of
the validation text, in windows of its block size (its own model code, imported from DIR), and converted to
bits per byte with that text's UTF-8 byte count; its own logged val-loss estimate (eval_iters batches) at its last
evaluation is reported beside it. nanoGPT's seed is fixed in its train.py (1337), so its seeds repeat one run.

Writes YYYY-MM-DD-quality-<hardware>[-TAG].{md,json,png} to --results-dir (default benchmarks/results/).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsllm.errors import ArgumentParser, UserError, run_cli  # noqa: E402

BUILTIN_RECIPES = {"dsllm-default": ["--recipe", str(REPO / "launch" / "recipes" / "default.yaml")]}
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_RECIPE = [  # nanoGPT's README, "I only have a macbook" CPU command for shakespeare_char
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
# --quick: a tiny model and schedule that shows several evaluations inside a few CPU-seconds
QUICK_ARGS = [
    *("--model", "tiny", "--model.n_layers", "2", "--model.d_model", "64", "--model.n_heads", "4"),
    *("--model.n_kv_heads", "2", "--model.max_seq_len", "64", "--model.mlp_multiple_of", "32"),
    *("--seq-len", "32", "--micro-batch-size", "4", "--grad-accum", "1", "--max-steps", "2000"),
    *("--eval-interval", "10", "--eval-windows", "4", "--precision", "fp32"),
]


# -- datasets -------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    from dsllm.data.default_corpus import default_cache_dir

    return default_cache_dir() / "quality"


def shakespeare_dataset(text_file: Path, vocab_size: int, log) -> Path:
    """The tinyshakespeare dataset (cached): train = the first 90% of its characters, val = the last 10%."""
    from dsllm.data.cleaning import CleaningConfig
    from dsllm.data.prepare import META_FILE, PrepareConfig, prepare
    from dsllm.tokenizer import TOKENIZER_FILE, save_tokenizer, train_tokenizer

    if not text_file.is_file():
        raise UserError(f"--shakespeare {text_file}: no such file; pass the path of tinyshakespeare.txt")
    text = text_file.read_text(encoding="utf-8")
    key = hashlib.sha256(f"1|{vocab_size}|".encode() + text.encode()).hexdigest()[:12]
    home = cache_dir() / f"shakespeare-{key}"
    dataset = home / "data"
    if (dataset / META_FILE).is_file() and (dataset / "val.idx").is_file():
        return dataset
    log(f"shakespeare: preparing {text_file} (last 10% held out) in {home}")
    cut = int(len(text) * 0.9)  # nanoGPT's data/shakespeare_char/prepare.py split
    home.mkdir(parents=True, exist_ok=True)
    (home / "train.txt").write_text(text[:cut], encoding="utf-8")
    (home / "val.txt").write_text(text[cut:], encoding="utf-8")
    tokenizer_dir = home / "tokenizer"
    if not (tokenizer_dir / TOKENIZER_FILE).is_file():
        save_tokenizer(train_tokenizer([text[:cut]], vocab_size, show_progress=False), tokenizer_dir)
    raw = CleaningConfig(
        strip_html=False, normalize_unicode=False, normalize_whitespace=False, dedup=False, min_chars=1
    )
    parts = {}
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        jsonl = home / f"{split}.jsonl"
        jsonl.write_text(json.dumps({"text": part}) + "\n")
        out = home / f"prepared-{split}"
        config = PrepareConfig(
            inputs=[str(jsonl)],
            tokenizer=str(tokenizer_dir),
            output=str(out),
            val_fraction=0.0,
            workers=1,
            cleaning=raw,
            overwrite=True,
            progress=False,
        )
        parts[split] = (out, prepare(config, log=lambda _m: None))
    # one dataset folder: the train part's files, and the val part's train split as its val split
    dataset.mkdir(parents=True, exist_ok=True)
    train_dir, meta = parts["train"]
    val_dir, val_meta = parts["val"]
    for name in os.listdir(train_dir):
        if name != META_FILE:
            os.replace(train_dir / name, dataset / name)
    for suffix in (".bin", ".idx"):
        os.replace(val_dir / f"train{suffix}", dataset / f"val{suffix}")
    meta["splits"]["val"] = val_meta["splits"]["train"]
    meta["held_out"] = "val: the last 10% of the characters of " + text_file.name
    (dataset / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return dataset


def resolve_datasets(args, log) -> dict[str, Path]:
    datasets = {}
    for name in [n for n in args.datasets.split(",") if n]:
        if name == "shakespeare":
            datasets[name] = shakespeare_dataset(Path(args.shakespeare), args.vocab_size, log)
        elif name == "stdlib":
            from dsllm.data.default_corpus import build_default_dataset

            datasets[name] = build_default_dataset(log=log)
        else:
            raise UserError(f"--datasets {name}: unknown; use shakespeare, stdlib, or --dataset NAME=DIR")
    for spec in args.dataset:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not (Path(folder) / "val.idx").is_file():
            raise UserError(f"--dataset {spec}: give NAME=DIR, a prepared dataset folder with a val split")
        datasets[name] = Path(folder)
    if not datasets:
        raise UserError("--datasets: no dataset; pass shakespeare, stdlib or --dataset NAME=DIR")
    return datasets


def split_texts(data: Path) -> tuple[str, str]:
    """(train text, validation text) of a dataset: shakespeare's raw parts, else its documents decoded."""
    home = data.parent
    if (home / "val.txt").is_file() and (home / "train.txt").is_file():
        return (home / "train.txt").read_text(encoding="utf-8"), (home / "val.txt").read_text(encoding="utf-8")
    from dsllm.data.format import TokenFile
    from dsllm.tokenizer import TOKENIZER_FILE, load_tokenizer

    tokenizer = load_tokenizer(data / TOKENIZER_FILE)
    texts = []
    for split in ("train", "val"):
        tokens = TokenFile(data / split)
        texts.append("\n".join(tokenizer.decode(tokens.document(d).tolist()) for d in range(tokens.num_documents)))
    return texts[0], texts[1]


# -- recipes --------------------------------------------------------------------------------------------------
def resolve_recipes(args) -> dict[str, list[str]]:
    known = dict(BUILTIN_RECIPES)
    if args.recipe_file:
        from dsllm.cli_args import read_json_or_yaml

        values = read_json_or_yaml(Path(args.recipe_file), "--recipe-file")
        if not isinstance(values, dict):
            raise UserError(f"--recipe-file {args.recipe_file}: must map recipe names to pretrain options")
        for name, value in values.items():
            if isinstance(value, str):
                value = shlex.split(value)
            if not isinstance(value, list):
                raise UserError(f"--recipe-file {args.recipe_file}: recipe {name}: give a list of options or a string")
            known[str(name)] = [str(v) for v in value]
    recipes = {}
    for name in [n for n in args.recipes.split(",") if n]:
        if name not in known:
            raise UserError(f"--recipes {name}: unknown recipe; known: {', '.join(known)} (add it in --recipe-file)")
        recipes[name] = known[name]
    return recipes


# -- one dsllm run --------------------------------------------------------------------------------------------
def child_env(kind: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if kind == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_child(cmd: list[str], kind: str, core: int | None, log_file: Path, cwd: Path = REPO, budget=None, watch=None):
    """Run `cmd` pinned to `core`; (exit code, its CPU-seconds by getrusage, wall seconds). `budget`: kill it
    (SIGKILL) once its process tree's CPU time passes that many seconds (a process that cannot stop itself).
    `watch(proc)`: called in a thread of its own while it runs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(kind), stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin)
        killed = False
        watcher = threading.Thread(target=watch, args=(proc,), daemon=True) if watch else None
        if watcher is not None:
            watcher.start()
        while proc.poll() is None:
            if budget is not None and tree_cpu_seconds(proc.pid) >= budget:
                proc.send_signal(signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        if watcher is not None:
            watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return ("killed at the budget" if killed else proc.returncode), cpu, time.monotonic() - start


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants so far (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def evaluate_whole(run: Path, data: Path, kind: str, core: int | None, log_file: Path) -> dict:
    """`dsllm evaluate` (every target of the val split) of a run: its JSON."""
    cmd = [sys.executable, "-m", "dsllm", "evaluate", "--checkpoint", str(run), "--data", str(data)]
    cmd += ["--split", "val", "--whole-split", "--device", "cpu" if kind == "cpu" else "auto"]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=child_env(kind),
        capture_output=True,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None,
    )
    log_file.write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"dsllm evaluate of {run} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dsllm_run(recipe: list[str], data: Path, out: Path, seed: int, args, core: int | None) -> dict:
    cmd = [sys.executable, "-m", "dsllm", "pretrain"]
    if "--recipe" not in recipe and "--ds_config" not in recipe:
        cmd += ["--ds_config", str(REPO / "ds_configs" / "zero2.json")]
    cmd += [*(QUICK_ARGS if args.quick else []), *recipe, "--data", str(data), "--out", str(out)]  # recipe wins
    cmd += ["--seed", str(seed), "--resume", "none", "--loader-workers", "0", "--sample-tokens", "0"]
    cmd += ["--log-interval", "1", "--save-interval", "1000000000"]
    cmd += ["--max-cpu-seconds" if args.budget_kind == "cpu" else "--max-time", f"{args.budget:g}"]
    out.mkdir(parents=True, exist_ok=True)
    rc, cpu, wall = run_child(cmd, args.budget_kind, core, out / "train.log")
    if rc != 0:
        tail = (out / "train.log").read_text()[-1500:]
        raise RuntimeError(f"training exited {rc}: {shlex.join(cmd)}\n{tail}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "cpu_seconds" in r]
    clock = "cpu_seconds" if args.budget_kind == "cpu" else "process_seconds"
    curve = []
    for r in records:
        if "bits_per_byte" in r:
            before = [s for s in steps if s["step"] <= r["step"]]
            curve.append(
                {"step": r["step"], "seconds": before[-1][clock] if before else 0.0, "bpb": r["bits_per_byte"]}
            )
    scored = evaluate_whole(out, data, args.budget_kind, core, out / "evaluate.log")
    last = steps[-1] if steps else {"step": 0, "tokens": 0}
    return {
        "command": shlex.join(cmd),
        "seed": seed,
        "bpb": scored["bits_per_byte"],
        "val_loss": scored["loss"],
        "val_tokens": scored["tokens"],
        "val_bytes": scored["bytes"],
        "checkpoint": scored["checkpoint"],
        "steps": last["step"],
        "tokens_seen": last["tokens"],
        "cpu_seconds": cpu,
        "cpu_seconds_at_stop": last.get(clock, cpu),  # the process's, at its last step (before the checkpoint)
        "wall_seconds": wall,
        "curve": curve,
    }


# -- nanoGPT as a reference -----------------------------------------------------------------------------------
def nanogpt_data(checkout: Path, name: str, data: Path) -> tuple[str, dict]:
    """Write the dataset's train and validation texts in nanoGPT's character format into the checkout."""
    import pickle  # writing nanoGPT's meta.pkl (its train.py reads it); nothing here is ever unpickled

    import numpy as np

    train, val = split_texts(data)
    chars = sorted(set(train + val))
    if len(chars) > 65535:
        raise UserError(f"--nanogpt: dataset {name} has {len(chars)} distinct characters, past nanoGPT's uint16 ids")
    stoi = {c: i for i, c in enumerate(chars)}
    folder = checkout / "data" / f"dsllm-quality-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("val", val)):
        np.array([stoi[c] for c in text], dtype=np.uint16).tofile(folder / f"{split}.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return folder.name, {"val_text": val, "stoi": stoi}


def nanogpt_score(checkout: Path, ckpt: Path, val: str, stoi: dict) -> dict:
    """nanoGPT's checkpoint on EVERY character of the validation text (after the first), in windows of its block
    size, as dsllm's whole-split score: bits per byte over the UTF-8 bytes of the characters scored."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = module.GPT(module.GPTConfig(**state["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
    model.eval()
    ids = torch.tensor([stoi[c] for c in val], dtype=torch.long)
    block = state["model_args"]["block_size"]
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block):
            x = ids[start : min(start + block, len(ids) - 1)]
            y = ids[start + 1 : start + 1 + len(x)]
            _, loss = model(x[None], y[None])
            nll += loss.double().item() * len(y)
    n_bytes = len(val[1:].encode("utf-8"))
    return {"bpb": nll / math.log(2) / n_bytes, "val_loss": nll / (len(ids) - 1), "iter": state.get("iter_num")}


def nanogpt_run(checkout: Path, name: str, data: Path, out: Path, seed: int, args, core: int | None) -> dict:
    dataset, texts = nanogpt_data(checkout, name, data)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-u", "train.py", *NANOGPT_RECIPE, f"--dataset={dataset}", f"--out_dir={out}"]
    if args.quick:
        cmd += ["--eval_interval=5", "--eval_iters=2", "--max_iters=40", "--n_layer=1", "--n_embd=32", "--n_head=2"]
    log = out / "train.log"
    marks = []  # (CPU-seconds when its "step N: ... val loss X" line appeared, step, val loss)

    saving = [False]

    def watch(proc):  # the CPU-seconds of an evaluation: when its line appears in the log
        seen, done = 0, False
        while not done:
            done = proc.poll() is not None
            lines = log.read_text().splitlines()
            for line in lines[seen:]:
                if m := re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line):
                    cpu_now = tree_cpu_seconds(proc.pid) if not done else (marks[-1][0] if marks else 0.0)
                    marks.append((cpu_now, int(m.group(1)), float(m.group(2))))
                elif line.startswith("saving checkpoint"):
                    saving[0] = True
                elif line.startswith("iter ") and saving[0]:  # its save is complete: keep a copy (a kill may
                    saving[0] = False  # land inside the next save, which writes ckpt.pt in place)
                    shutil.copyfile(out / "ckpt.pt", out / "ckpt.partial")
                    os.replace(out / "ckpt.partial", out / "ckpt-complete.pt")
            seen = len(lines)
            time.sleep(0.05)

    budget = args.budget if args.budget_kind == "cpu" else None
    rc, cpu, wall = run_child(cmd, "cpu", core, log, cwd=checkout, budget=budget, watch=watch)
    ckpt = out / "ckpt.pt"
    if rc != 0 and saving[0]:  # killed (or failed) inside a save: its last complete one
        ckpt = out / "ckpt-complete.pt"
    scored = {"bpb": math.nan, "val_loss": math.nan, "iter": None}
    if ckpt.is_file():
        scored = nanogpt_score(checkout, ckpt, texts["val_text"], texts["stoi"])
    val = texts["val_text"]
    chars_per_byte = len(val) / len(val.encode("utf-8"))
    steps = [int(m.group(1)) for m in re.finditer(r"^iter (\d+):", log.read_text(), re.M)]
    return {
        "command": shlex.join(cmd) + f"  (cwd {checkout})",
        "seed": seed,
        "bpb": scored["bpb"],
        "val_loss": scored["val_loss"],
        "checkpoint": f"{ckpt} (iter {scored['iter']})",
        "logged_bpb": marks[-1][2] / math.log(2) * chars_per_byte if marks else None,
        "steps": max(steps) if steps else 0,
        "tokens_seen": (max(steps) if steps else 0) * 12 * 64,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "exit": rc,
        **({} if ckpt.is_file() else {"error": f"no checkpoint within the budget (it saves at an evaluation); {log}"}),
        "curve": [{"step": s, "seconds": c, "bpb": v / math.log(2) * chars_per_byte} for c, s, v in marks],
    }


# -- results --------------------------------------------------------------------------------------------------
def summary(runs: list[dict]) -> dict:
    bpbs = [r["bpb"] for r in runs]
    return {
        "bpb_mean": statistics.fmean(bpbs),
        "bpb_spread": (max(bpbs) - min(bpbs)) / 2,
        "bpb_stdev": statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0,
        "steps": statistics.fmean(r["steps"] for r in runs),
        "tokens_seen": statistics.fmean(r["tokens_seen"] for r in runs),
        "cpu_seconds": statistics.fmean(r["cpu_seconds"] for r in runs),
        "wall_seconds": statistics.fmean(r["wall_seconds"] for r in runs),
        "cpu_seconds_at_stop": statistics.fmean(r.get("cpu_seconds_at_stop", r["cpu_seconds"]) for r in runs),
        "seeds": len(runs),
    }


def markdown(result: dict) -> str:
    kind = "CPU-s" if result["settings"]["budget_kind"] == "cpu" else "GPU-s (wall)"
    lines = [
        f"# Quality at equal compute: {result['settings']['budget']:g} {kind}, {result['date'][:10]}",
        "",
        f"Command: `{result['command']}`  ",
        f"git {result['git_revision']}, {result['hardware']}, "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        "Bits per byte over EVERY target of each dataset's validation text (`dsllm evaluate --whole-split`; nanoGPT: "
        "its checkpoint on every character), mean over seeds ± half their range.",
        "",
        f"| dataset | recipe | val bpb | ± | seeds | steps | tokens seen | {kind} at the last step | {kind} in all |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['dataset']} | {row['recipe']} | {row['bpb_mean']:.4f} | {row['bpb_spread']:.4f} | "
            f"{row['seeds']} | {row['steps']:.0f} | {row['tokens_seen']:,.0f} | {row['cpu_seconds_at_stop']:.1f} | "
            f"{row['cpu_seconds' if result['settings']['budget_kind'] == 'cpu' else 'wall_seconds']:.1f} |"
        )
    lines += ["", "## How it was measured", "", *result["method"], ""]
    return "\n".join(lines)


METHOD = [
    "- Each run is one process (`python -m dsllm pretrain`, one rank, `--loader-workers 0`, OMP_NUM_THREADS=1) "
    "pinned to one core (sched_setaffinity), stopped by `--max-cpu-seconds`: its own `time.process_time()` "
    "(startup, evaluations, logging included) checked at each step boundary; the final checkpoint is written past "
    "the budget. CPU-s in all: getrusage(RUSAGE_CHILDREN) of the run's process (its final checkpoint and exit "
    "included); at the last step: its time.process_time() in the last step record (nanoGPT: its CPU-s in all).",
    "- A recipe's --max-steps sets its learning-rate schedule, and the budget may cut it before the end; with "
    "--decay-in-budget (the default recipe) the decay starts at the budget's last --decay-fraction and ends inside it "
    "(config.json's schedule.decided), --max-steps only a cap.",
    "- The curve (the .png): the trainer's own evaluations (its --eval-windows, not the whole text) at their "
    "CPU-seconds (the step record's process_time at that step).",
    "- shakespeare: train = the first 90% of tinyshakespeare's characters, val = the last 10% (nanoGPT's "
    "shakespeare_char split), a BPE tokenizer trained on the train part, no cleaning. The first token of the val "
    "text is context, not a target, and the val split ends with <|endoftext|> (0 bytes): bytes scored = the val "
    "text's minus its first token's.",
    "- nanoGPT (when run): its README CPU recipe, `train.py` in the given checkout, on the same train/val texts "
    "written in its character format; stopped by SIGKILL once its process's CPU time passes the budget (it "
    "cannot stop itself); its last checkpoint (saved at an evaluation where val loss improved) is scored on every "
    "character of the val text (after the first) in windows of its block size; bpb = nats/char x chars / bytes / "
    "ln 2. This is fair to its model (the best weights it had saved within the budget) but not to steps it took "
    "after its last saved evaluation. Its logged estimate at its last evaluation is in the .json (logged_bpb). "
    "Its seed is fixed in its train.py, so its seeds repeat one run.",
]


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    datasets = sorted({row["dataset"] for row in result["rows"]})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for n, row in enumerate(r for r in result["rows"] if r["dataset"] == dataset):
            color = f"C{n}"  # one color per recipe, every seed's curve in it
            for i, run in enumerate(row["runs"]):
                xs = [p["seconds"] for p in run["curve"]]
                ys = [p["bpb"] for p in run["curve"]]
                ax.plot(xs, ys, marker=".", alpha=0.6, color=color, label=row["recipe"] if i == 0 else None)
                at = run.get("cpu_seconds_at_stop", run["cpu_seconds"])
                ax.plot([at], [run["bpb"]], marker="*", markersize=12, color=color, markeredgecolor="black")
        kind = "CPU" if result["settings"]["budget_kind"] == "cpu" else "GPU (wall)"
        ax.set(
            xlabel=f"{kind} seconds",
            ylabel="val bits per byte",
            title=f"{dataset} (curves: the trainer's eval windows; *: whole val text at the stop)",
        )
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def host_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", platform.node().lower()).strip("-") or "host"


# -- main -----------------------------------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="benchmarks/quality.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="dsllm-default", help="comma-separated recipe names")
    parser.add_argument("--recipe-file", help="YAML/JSON {name: [pretrain options]} of more recipes")
    parser.add_argument("--datasets", default="shakespeare,stdlib", help="comma-separated: shakespeare, stdlib")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=DIR", help="a prepared dataset")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of compute per run")
    parser.add_argument("--budget-kind", choices=("cpu", "gpu"), default="cpu", help="CPU-seconds or GPU-seconds")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per recipe and dataset (1234, 1235, ...)")
    parser.add_argument("--first-seed", type=int, default=1234, help="the first of --seeds seeds (more seeds later)")
    parser.add_argument("--core", type=int, help="the core each run is pinned to (default: the first allowed)")
    parser.add_argument("--nanogpt", metavar="DIR", help="a karpathy/nanoGPT checkout outside this project")
    parser.add_argument("--shakespeare", default=str(SHAKESPEARE), help="tinyshakespeare.txt")
    parser.add_argument("--vocab-size", type=int, default=1024, help="the shakespeare tokenizer's vocabulary")
    parser.add_argument("--quick", action="store_true", help="CI-sized: 10 CPU-s, a tiny model")
    parser.add_argument("--work-dir", help="run folders (default: a temporary folder, removed)")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", help="added to the result file's name")
    return parser


def measure(args, log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Every run of the invocation; the result dict (written by `write_results`)."""
    if args.seeds < 1 or args.budget <= 0:
        raise UserError("--seeds must be 1 or more and --budget above 0")
    recipes = resolve_recipes(args)
    datasets = resolve_datasets(args, log)
    checkout = None
    if args.nanogpt:
        checkout = Path(args.nanogpt).resolve()
        if not (checkout / "train.py").is_file() or not (checkout / "model.py").is_file():
            raise UserError(f"--nanogpt {args.nanogpt}: not a nanoGPT checkout (no train.py/model.py)")
        if args.budget_kind != "cpu":
            raise UserError("--nanogpt with --budget-kind gpu: its reference is the README's CPU recipe; drop one")
        if checkout == REPO or REPO in checkout.parents:
            raise UserError(f"--nanogpt {args.nanogpt}: inside this project; keep the checkout outside it")
    core = None
    if args.budget_kind == "cpu":
        core = args.core if args.core is not None else min(os.sched_getaffinity(0))
    started = datetime.datetime.now()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dsllm-quality-"))
    rows = []
    for dataset, data in datasets.items():
        plans = [(name, recipe) for name, recipe in recipes.items()]
        if checkout is not None:
            plans.append(("nanogpt-cpu", None))
        for name, recipe in plans:
            runs = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                out = work / dataset / name / f"seed{seed}"
                log(f"{dataset} / {name} / seed {seed}: training for {args.budget:g} {args.budget_kind.upper()}-s")
                if recipe is None:
                    run = nanogpt_run(checkout, dataset, data, out, seed, args, core)
                else:
                    run = dsllm_run(recipe, data, out, seed, args, core)
                log(
                    f"  val bpb {run['bpb']:.4f} after {run['steps']} steps, {run['cpu_seconds']:.1f} CPU-s "
                    f"({run['wall_seconds']:.1f} s wall)"
                )
                runs.append(run)
            rows.append({"dataset": dataset, "recipe": name, **summary(runs), "runs": runs})
    import deepspeed
    import torch

    from dsllm import __version__

    return {
        "benchmark": "quality",
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "git_revision": git_revision(),
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, host {platform.node()}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "dsllm": __version__,
        },
        "settings": {
            "budget": args.budget,
            "budget_kind": args.budget_kind,
            "seeds": args.seeds,
            "core": core,
            "quick": args.quick,
            "recipes": recipes,
            "datasets": {k: str(v) for k, v in datasets.items()},
            "nanogpt": str(checkout) if checkout else None,
        },
        "method": METHOD,
        "rows": rows,
    }


def write_results(result: dict, results_dir: Path, tag: str | None) -> Path:
    """YYYY-MM-DD-quality-<host>[-TAG].{json,md,png}; returns the path without suffix."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{result['date'][:10]}-quality-{host_slug()}{'-' + tag if tag else ''}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    plot(result, Path(f"{stem}.png"))
    return stem


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick and args.budget == 300.0:
        args.budget = 10.0
    result = measure(args)
    stem = write_results(result, Path(args.results_dir), args.tag)
    for row in result["rows"]:
        print(
            f"{row['dataset']:>12} {row['recipe']:>16}: val bpb {row['bpb_mean']:.4f} ± {row['bpb_spread']:.4f} "
            f"({row['seeds']} seeds, {row['steps']:.0f} steps, {row['cpu_seconds']:.1f} CPU-s)"
        )
    print(f"wrote {stem}.md, .json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
