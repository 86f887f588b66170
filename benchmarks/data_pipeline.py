#!/usr/bin/env python
"""Benchmark of the data stage on one corpus and machine, in one run:

1. the ceiling: raw `encode_batch_fast` on the cleaned texts in memory, at 1 and N threads;
2. `prepare` end to end (read, clean, tokenize, dedup, split, write) at 1 and N workers, as a share of (1);
3. the training loader's random-window read rate, against what a training step consumes, from one dataset and from
   a weighted mixture of three (the corpus's documents dealt into three datasets, weights 0.6/0.3/0.1), whose rate
   should be >= 0.8 of the one dataset's.

    python benchmarks/data_pipeline.py                                 # standard library corpus
    python benchmarks/data_pipeline.py --quick --results-dir /tmp/b    # CI-sized smoke run

Writes YYYY-MM-DD-data-pipeline-<hardware>[-TAG].{md,json} to --results-dir (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsllm.errors import ArgumentParser, UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
TARGET_PREPARE_SHARE = 0.8  # prepare should run at >= 80% of the raw encode rate
TARGET_LOADER_HEADROOM = 100  # the loader should read >= 100x what training consumes
TARGET_MIXTURE_SHARE = 0.8  # a 3-source mixture's loader should read >= 80% of one dataset's rate
MIXTURE = {"web": 0.6, "code": 0.3, "books": 0.1}  # (names only: the corpus's documents dealt round-robin)
CONSUMERS = [  # tokens/s one training process consumes
    {"name": "CPU 3.45M-param model, bf16 (measured, 2-core dev machine)", "tokens_per_second": 15_000},
    {"name": "GPU anchor: llm.c GPT-2 124M, one H100", "tokens_per_second": 468_000},
]
ENCODE_CHUNK_CHARACTERS = 1 << 23  # the ceiling encodes 8M-character batches: enough work per call for N threads
PRESETS = {  # full / --quick defaults of the options left unset
    "full": {"max_bytes": None, "vocab_size": 8192, "loader_batches": 1000, "trials": 3},
    "quick": {"max_bytes": 300_000, "vocab_size": 1000, "loader_batches": 20, "trials": 1},
}


def parse_args(argv):
    p = ArgumentParser(
        prog="data_pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="CI smoke run: 300 kB corpus, vocab 1000, 20 loader batches")
    p.add_argument(
        "--input", nargs="+", metavar="PATH", help="corpus instead of the standard library (any prepare input)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="K",
        help="replicate the corpus K times (copies differ by a first line)",
    )
    p.add_argument("--max-bytes", type=int, help="standard library corpus: first N bytes of sources (default all)")
    p.add_argument("--tokenizer", metavar="DIR_OR_FILE", help="use this tokenizer instead of training one")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer (default 8192, quick 1000)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="N: threads / prepare workers (default: cores)"
    )
    p.add_argument("--seq-len", type=int, default=1024, help="loader window length (default %(default)s)")
    p.add_argument("--micro-batch", type=int, default=8, help="loader micro batch (default %(default)s)")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers to try")
    p.add_argument("--loader-batches", type=int, help="batches timed per loader trial (default 1000, quick 20)")
    p.add_argument("--trials", type=int, help="repeats of each measurement, the best is kept (default 3, quick 1)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"), help="where the .md/.json go")
    p.add_argument("--tag", help="appended to the results' file names (e.g. mixture)")
    p.add_argument("--_job", help=argparse.SUPPRESS)  # child process mode: run one measurement, print it as JSON
    args = p.parse_args(argv)
    for name, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("repeat", "workers", "seq_len", "micro_batch", "loader_batches", "trials"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} is {getattr(args, name)}; give 1 or more")
    return args


# -- corpus and tokenizer ----------------------------------------------------------------------------
def corpus_inputs(args, work: Path) -> list[str]:
    """What prepare reads: --input as given, else a JSONL of the standard library (K copies with --repeat)."""
    from dsllm.data.default_corpus import stdlib_sources
    from dsllm.data.sources import CorpusReader

    if args.input and args.repeat == 1:
        return list(args.input)
    if args.input:
        documents = CorpusReader(args.input)  # iterating it again reads the files again
    else:
        documents = [p.read_bytes().decode("utf-8", errors="replace") for p in stdlib_sources(args.max_bytes)]
    corpus = work / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as out:
        for copy in range(args.repeat):
            for text in documents:
                out.write(json.dumps({"text": f"# copy {copy}\n{text}" if copy else text}) + "\n")
    return [str(corpus)]


def cleaned_texts(inputs: list[str], cleaning) -> list[str]:
    """Exactly the documents prepare tokenizes: cleaned, and not dropped as empty or too short."""
    from dsllm.data.cleaning import clean, drop_reason
    from dsllm.data.sources import CorpusReader

    texts = (clean(text, cleaning) for text in CorpusReader(inputs))
    return [text for text in texts if drop_reason(text, cleaning) is None]


def tokenizer_file(args, texts: list[str], work: Path) -> tuple[str, dict]:
    from dsllm.tokenizer import resolve_tokenizer_file, save_tokenizer, train_tokenizer

    if args.tokenizer:
        return str(resolve_tokenizer_file(args.tokenizer)), {"tokenizer": str(Path(args.tokenizer).resolve())}
    start = time.perf_counter()
    path = save_tokenizer(train_tokenizer(texts, args.vocab_size, show_progress=False), work / "tokenizer")
    return str(path), {
        "tokenizer": f"trained, vocab {args.vocab_size}",
        "tokenizer_train_seconds": round(time.perf_counter() - start, 2),
    }


# -- 1. the ceiling and 2. prepare: each measurement in a fresh process -----------------------------
def in_fresh_process(job: dict, work: Path) -> dict:
    """The Rust thread pool reads RAYON_NUM_THREADS once, at its first use, and a process that has built and
    dropped tokenizers before encodes measurably slower (~20% after 5 prepare runs): so one process each."""
    threads = job.get("threads", 1)
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": str(threads > 1).lower()}
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job))
    done = subprocess.run([sys.executable, __file__, "--_job", str(job_file)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {job['kind']} process failed:\n{done.stderr}")
    return json.loads(done.stdout)


def encode_rate(job: dict) -> dict:
    """One pass of encode_batch_fast over the cleaned texts held in memory."""
    from dsllm.tokenizer import load_tokenizer

    texts = json.loads(Path(job["texts"]).read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(job["tokenizer"])
    tokenizer.encode_special_tokens = True  # as prepare's workers do
    chunks, characters = [[]], 0
    for text in texts:
        if characters >= ENCODE_CHUNK_CHARACTERS:
            chunks, characters = chunks + [[]], 0
        chunks[-1].append(text)
        characters += len(text)
    tokenizer.encode_batch_fast(texts[:64], add_special_tokens=False)  # warm-up: starts the thread pool
    start = time.perf_counter()
    tokens = sum(len(e) for chunk in chunks for e in tokenizer.encode_batch_fast(chunk, add_special_tokens=False))
    seconds = time.perf_counter() - start
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return {
        "threads": job["threads"],
        "seconds": round(seconds, 3),
        "text_bytes": text_bytes,
        "tokens": tokens,
        "mb_per_second": round(text_bytes / 1e6 / seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1),
    }


def prepare_rate(job: dict) -> dict:
    """`prepare` end to end; its own report gives the rates (MB/s: input bytes_in / seconds)."""
    from dsllm.data.cleaning import CleaningConfig
    from dsllm.data.default_corpus import VAL_FRACTION
    from dsllm.data.prepare import PrepareConfig, prepare

    report = prepare(
        PrepareConfig(
            inputs=job["inputs"],
            tokenizer=job["tokenizer"],
            output=job["output"],
            val_fraction=VAL_FRACTION,
            workers=job["workers"],
            cleaning=CleaningConfig(**job["cleaning"]),
            overwrite=True,
            progress=False,
        )
    )["report"]
    keys = (
        "seconds",
        "mb_per_second",
        "tokens_per_second",
        "bytes_in",
        "tokens_out",
        "documents_read",
        "documents_kept",
    )
    return {"workers": job["workers"], **{k: report[k] for k in keys}}


def best_of(runs: list[dict]) -> dict:
    return {**min(runs, key=lambda run: run["seconds"]), "trial_seconds": [run["seconds"] for run in runs]}


# -- 3. the loader -----------------------------------------------------------------------------------
def mixture_sources(inputs: list[str], tokenizer: str, cleaning, workers: int, work: Path) -> dict[str, Path]:
    """Three prepared datasets of one tokenizer: the corpus's documents dealt round-robin into MIXTURE's names."""
    from dsllm.data.default_corpus import VAL_FRACTION
    from dsllm.data.prepare import PrepareConfig, prepare
    from dsllm.data.sources import CorpusReader

    names, folders = list(MIXTURE), {}
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(open(work / f"{name}.jsonl", "w", encoding="utf-8")) for name in names}
        for i, text in enumerate(CorpusReader(inputs)):
            files[names[i % len(names)]].write(json.dumps({"text": text}) + "\n")
    for name in names:
        folders[name] = work / f"mixture-{name}"
        config = PrepareConfig(
            inputs=[str(work / f"{name}.jsonl")],
            tokenizer=tokenizer,
            output=str(folders[name]),
            val_fraction=VAL_FRACTION,
            workers=workers,
            cleaning=cleaning,
            progress=False,
        )
        prepare(config)
    return folders


def loader_rates(datasets: dict, seq_len: int, micro_batch: int, num_workers: int, batches: int, trials: int) -> dict:
    """{name: rate} of each dataset's loader (TokenWindows or MixtureWindows), trials interleaved so that a slow spell
    of a noisy machine hits them alike."""
    from dsllm.data.loader import ResumableLoader

    startups, trial_seconds = {name: [] for name in datasets}, {name: [] for name in datasets}
    for trial in range(trials):
        for name, windows in datasets.items():
            start = time.perf_counter()
            stream = iter(ResumableLoader(windows, micro_batch, seed=trial, num_workers=num_workers))
            next(stream)  # the first batch pays for starting workers: timed apart
            ready = time.perf_counter()
            for _ in range(batches):
                next(stream)
            trial_seconds[name].append(time.perf_counter() - ready)
            startups[name].append(ready - start)
            stream.close()
    rates = {}
    for name, windows in datasets.items():
        seconds = min(trial_seconds[name])
        rates[name] = {
            "num_workers": num_workers,
            "windows": len(windows),
            "seconds": round(seconds, 4),
            "tokens_per_second": round(batches * micro_batch * seq_len / seconds, 1),
            "batches_per_second": round(batches / seconds, 1),
            "startup_seconds": round(min(startups[name]), 3),
            "trial_seconds": [round(s, 4) for s in trial_seconds[name]],
        }
    return rates


# -- provenance --------------------------------------------------------------------------------------
def git_revision() -> str:
    """HEAD, plus "-dirty" when the tree has changes (results files aside)."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changes = subprocess.run(
            git + ["status", "--porcelain", "--", ".", ":!benchmarks/results"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if changes else "")


def hardware() -> dict:
    import torch

    proc = {
        name: Path(f"/proc/{name}").read_text() if Path(f"/proc/{name}").is_file() else ""
        for name in ("cpuinfo", "meminfo")
    }
    cpu = re.search(r"^model name\s*:\s*(.+)$", proc["cpuinfo"], re.M)
    ram = re.search(r"^MemTotal:\s*(\d+) kB", proc["meminfo"], re.M)
    info = {
        "cpu": cpu.group(1).strip() if cpu else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "ram_gib": round(int(ram.group(1)) / 2**20, 1) if ram else None,
        "platform": platform.platform(),
        **({"gpu": torch.cuda.get_device_name(0)} if torch.cuda.is_available() else {}),
    }
    name = re.sub(
        r"\((r|tm)\)|@.*|\b(cpu|processor)\b", " ", info["cpu"].lower()
    )  # "Intel(R) Xeon(R) CPU @ 2GHz" -> intel-xeon
    info["slug"] = f"{re.sub(r'[^a-z0-9]+', '-', name).strip('-') or 'cpu'}-{info['cores']}c"
    return info


def versions() -> dict:
    import numpy  # noqa: E401
    import tokenizers
    import torch

    from dsllm import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
        "dsllm": __version__,
    }


# -- report ------------------------------------------------------------------------------------------
def report_markdown(r: dict) -> str:
    c, hw, settings = r["corpus"], r["hardware"], r["settings"]
    plural = lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    lines = [
        f"# Data pipeline benchmark, {r['date'][:10]}, {hw['slug']}",
        "",
        f"- command: `{r['command']}`",
        f"- git revision: `{r['git_revision']}`",
        f"- date: {r['date']}",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in r["versions"].items()),
        f"- hardware: {hw['cpu']}, {hw['cores']} cores, {hw['ram_gib']} GiB RAM"
        + (f", {hw['gpu']}" if "gpu" in hw else ""),
        f"- corpus: {c['source']} (x{c['repeat']}); {c['documents_encoded']:,} documents encoded, "
        f"{c['text_bytes'] / 1e6:.1f} MB of cleaned text, {c['tokens']:,} tokens; tokenizer: {c['tokenizer']}",
        f"- each number is the best of {plural(settings['trials'], 'trial')}; 1-minute load average "
        f"{r['load_average_1min']['start']:.2f} at the start, {r['load_average_1min']['end']:.2f} at the end",
        "",
        "## Tokenization: raw encode ceiling vs prepare",
        "",
        f"| stage | parallelism | MB/s | tokens/s | seconds | share of raw encode (target >= {TARGET_PREPARE_SHARE}) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| raw encode_batch_fast | {plural(e['threads'], 'thread')} | {e['mb_per_second']:.2f} | "
        f"{e['tokens_per_second']:,.0f} | {e['seconds']:.2f} | 1.00 |"
        for e in r["encode"]
    ]
    lines += [
        f"| prepare end to end | {plural(p['workers'], 'worker')} | {p['mb_per_second']:.2f} | "
        f"{p['tokens_per_second']:,.0f} | "
        f"{p['seconds']:.2f} | {p['share_of_raw_encode']:.2f} |"
        for p in r["prepare"]
    ]
    lines += [
        "",
        "Raw encode MB/s counts cleaned UTF-8 text, prepare MB/s its input bytes (`bytes_in`; for JSONL the "
        "escaped lines). The share compares seconds on the same documents: raw encode / prepare.",
        "",
        f"## Loader: random windows ({settings['micro_batch']} x {settings['seq_len']} tokens a batch) vs training",
        "",
        "| num_workers | tokens/s | batches/s | first batch s | "
        + " | ".join(f"x {k['tokens_per_second']:,} tokens/s" for k in CONSUMERS)
        + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(CONSUMERS),
    ]
    lines += [
        f"| {row['num_workers']} | {row['tokens_per_second']:,.0f} | {row['batches_per_second']:,.0f} | "
        f"{row['startup_seconds']:.2f} | " + " | ".join(f"{x:,.0f}" for x in row["headroom"]) + " |"
        for row in r["loader"]
    ]
    lines += [
        "",
        f"Headroom = loader rate / consumption, target >= {TARGET_LOADER_HEADROOM}; "
        f"{settings['loader_batches']:,} batches timed after the first. Consumption per training process:",
        "",
        "| consumer | tokens/s |",
        "|---|---:|",
    ] + [f"| {k['name']} | {k['tokens_per_second']:,} |" for k in CONSUMERS]
    weights = "/".join(f"{w:g}" for w in r["mixture_weights"].values())
    lines += [
        "",
        f"## Loader: a weighted mixture of 3 datasets ({weights}) vs one dataset",
        "",
        f"| num_workers | one dataset tokens/s | mixture tokens/s | share (target >= {TARGET_MIXTURE_SHARE}) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {one['num_workers']} | {one['tokens_per_second']:,.0f} | {mix['tokens_per_second']:,.0f} | "
        f"{mix['share_of_single']:.2f} |"
        for one, mix in zip(r["loader"], r["loader_mixture"])
    ]
    lines += [
        "",
        "The mixture's datasets are the corpus's documents dealt round-robin into three, prepared with the same "
        "tokenizer; its loader reads them in the mixture's order (`dsllm.data.mixture`), trials interleaved with "
        "the one dataset's.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._job:
        job = json.loads(Path(args._job).read_text())
        print(json.dumps(encode_rate(job) if job["kind"] == "encode" else prepare_rate(job)))
        return 0
    from fractions import Fraction

    from dsllm.data.cleaning import CleaningConfig
    from dsllm.data.default_corpus import CODE_CLEANING
    from dsllm.data.loader import MixtureWindows, TokenWindows

    started, load_at_start = datetime.datetime.now(), os.getloadavg()[0]
    cleaning = CleaningConfig() if args.input else CODE_CLEANING
    parallel = sorted({1, args.workers})
    with tempfile.TemporaryDirectory(prefix="dsllm-bench-") as tmp:
        work = Path(tmp)
        inputs = corpus_inputs(args, work)
        texts = cleaned_texts(inputs, cleaning)
        if not texts:
            raise UserError(f"{', '.join(inputs)}: no document is left after cleaning; give a bigger corpus")
        tokenizer, tokenizer_info = tokenizer_file(args, texts, work)
        texts_file = work / "cleaned.json"
        texts_file.write_text(json.dumps(texts), encoding="utf-8")
        corpus = {
            "source": " ".join(args.input) if args.input else "Python standard library .py sources",
            "repeat": args.repeat,
            "cleaning": cleaning.describe(),
            "documents_encoded": len(texts),
            **tokenizer_info,
        }
        del texts
        print(f"timing raw encode and prepare at {parallel} threads/workers, {args.trials} trial(s)", file=sys.stderr)
        encode_runs, prepare_runs = {n: [] for n in parallel}, {n: [] for n in parallel}
        for _ in range(args.trials):  # interleaved, so that a slow spell of a noisy machine hits both alike
            for n in parallel:
                encode_runs[n].append(
                    in_fresh_process(
                        {"kind": "encode", "threads": n, "texts": str(texts_file), "tokenizer": tokenizer}, work
                    )
                )
                prepare_runs[n].append(
                    in_fresh_process(
                        {
                            "kind": "prepare",
                            "workers": n,
                            "inputs": inputs,
                            "tokenizer": tokenizer,
                            "cleaning": cleaning.describe(),
                            "output": str(work / f"data-{n}"),
                        },
                        work,
                    )
                )
        encode, prepared = [best_of(encode_runs[n]) for n in parallel], [best_of(prepare_runs[n]) for n in parallel]
        for p, e in zip(prepared, encode):
            p["share_of_raw_encode"] = round(e["seconds"] / p["seconds"], 3)
        sources = mixture_sources(inputs, tokenizer, cleaning, parallel[-1], work)
        datasets = {"single": TokenWindows(work / f"data-{parallel[-1]}" / "train", args.seq_len)}
        phases = [(0, {name: Fraction(str(weight)) for name, weight in MIXTURE.items()})]
        datasets["mixture"] = MixtureWindows(
            {name: TokenWindows(folder / "train", args.seq_len) for name, folder in sources.items()}, phases
        )
        print(f"timing the loader at num_workers {args.loader_workers}, one dataset and a mixture", file=sys.stderr)
        rates = [
            loader_rates(datasets, args.seq_len, args.micro_batch, n, args.loader_batches, args.trials)
            for n in args.loader_workers
        ]
    loader, mixture = [rate["single"] for rate in rates], [rate["mixture"] for rate in rates]
    for row in loader:
        row["headroom"] = [round(row["tokens_per_second"] / k["tokens_per_second"], 1) for k in CONSUMERS]
    for row, single in zip(mixture, loader):
        row["share_of_single"] = round(row["tokens_per_second"] / single["tokens_per_second"], 3)
    corpus.update(text_bytes=encode[0]["text_bytes"], tokens=encode[0]["tokens"])
    result = {
        "benchmark": "data_pipeline",
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "git_revision": git_revision(),
        "versions": versions(),
        "hardware": hardware(),
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "corpus": corpus,
        "encode": encode,
        "prepare": prepared,
        "loader": loader,
        "loader_mixture": mixture,
        "mixture_weights": MIXTURE,
        "consumption": CONSUMERS,
        "targets": {
            "prepare_share_of_raw_encode": TARGET_PREPARE_SHARE,
            "loader_headroom": TARGET_LOADER_HEADROOM,
            "mixture_share_of_single": TARGET_MIXTURE_SHARE,
        },
    }
    markdown = report_markdown(result)
    tag = f"-{re.sub(r'[^a-z0-9]+', '-', args.tag.lower()).strip('-')}" if args.tag else ""
    stem = Path(args.results_dir) / f"{started:%Y-%m-%d}-data-pipeline-{result['hardware']['slug']}{tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown)
    print(markdown + f"\nwrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
