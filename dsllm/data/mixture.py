"""Weighted data mixtures: `--data` as several prepared datasets ("sources") read in given proportions, the
proportions changing at given steps or token counts (a schedule). One module owns the mixture: its syntax, its
checks (one line each) and its sample order.

`--data` takes one dataset folder (as before), or
    web=data/web:0.7,code=data/code:0.2,books=data/books:0.1        NAME=DIR:WEIGHT, comma-separated
    mix.json / mix.yaml    {"sources": {NAME: {"path": DIR, "weight": W}, ...},
                            "schedule": [{"at_step": N (or "at_tokens": T), "weights": {NAME: W, ...}}, ...]}
Weights are proportions: each phase's are scaled to sum to 1 (said once when they did not). Every source must
share one tokenizer.

The order (`MixtureOrder`) is a pure function of (seed, the sources' fingerprints, the weights in force, global
sample index), so any world size and worker count see the same global batches and a resumed run continues
exactly, with no history kept: the samples of a phase (the run between two schedule entries) are cut into blocks
of `BLOCK`; the first k blocks of a phase hold floor(w_s * k * BLOCK) samples of each source s (the heaviest takes
the rest), so each block holds every share to within one sample and any whole number of blocks holds it exactly,
however small a weight is. Inside a block the places are dealt by a keyed permutation (the windows' own keyed
Feistel network, `WindowOrder`), and a source's places read its next samples in order. Source s's n-th sample
is window `n` of its own `WindowOrder` (a keyed permutation of its windows per epoch), and n follows in closed
form from the sample index and the counts each earlier phase ended with. A one-source mixture reads exactly what
its folder alone reads. All of it runs in numpy on a rank's next chunk of samples (`dsllm.data.sampler.CHUNK`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from bisect import bisect_right
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dsllm.data.sampler import DataFingerprintError, WindowOrder, check_seq_len_and_seed
from dsllm.errors import UserError

if TYPE_CHECKING:
    from dsllm.data.format import TokenFile
    from dsllm.data.shards import ShardedTokenFile

BLOCK = 256  # samples per stratified block: a power of 4, at least sources squared (see MixtureOrder._apportion)
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MIXTURE_FILES = (".json", ".yaml", ".yml")
EXAMPLE = "web=data/web:0.7,code=data/code:0.3"


@dataclasses.dataclass(frozen=True)
class Phase:
    """Weights (normalised, exact) in force from `at_step`, or from the first step to start at or past `at_tokens`
    tokens; the first phase (the sources' own weights) starts at step 0."""

    weights: dict[str, Fraction]
    at_step: int = 0
    at_tokens: int | None = None

    def start_step(self, tokens_per_step: int) -> int:
        return self.at_step if self.at_tokens is None else -(-self.at_tokens // tokens_per_step)

    def where(self) -> str:
        return "the sources' weights" if self.at_step == 0 and self.at_tokens is None else self.entry()

    def entry(self) -> str:
        return f"at_tokens {self.at_tokens}" if self.at_tokens is not None else f"at_step {self.at_step}"


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
    """--data as a mixture, as written: source name -> dataset folder (sorted by name), the phases, and the lines
    to say once (weights that were scaled to sum to 1)."""

    given: str
    paths: dict[str, Path]
    phases: tuple[Phase, ...]
    notes: tuple[str, ...] = ()


def parse_data(text: str) -> MixtureSpec | None:
    """--data's mixture, or None when it names one dataset folder (an existing folder always does)."""
    path = Path(text)
    if path.is_dir():
        return None
    if path.suffix.lower() in MIXTURE_FILES:
        return _from_file(path)
    if "=" in text:
        return _from_text(text)
    return None


def _from_text(text: str) -> MixtureSpec:
    paths, weights = {}, {}
    for entry in (part.strip() for part in text.split(",")):
        name, equals, rest = entry.partition("=")
        folder, colon, weight = rest.rpartition(":")
        if not equals or not colon or not folder:
            raise UserError(f"--data {text}: {entry!r} is not NAME=DIR:WEIGHT; write e.g. {EXAMPLE}")
        _add_source(paths, weights, name.strip(), Path(folder), weight, f"--data {text}")
    return _spec(text, paths, weights, [])


def _from_file(path: Path) -> MixtureSpec:
    from dsllm.cli_args import read_json_or_yaml

    where = f"--data {path}"
    if not path.is_file():
        raise UserError(f"{where}: no such mixture file; write one (see README, weighted mixtures) or pass a folder")
    content = read_json_or_yaml(path, "--data")
    if not isinstance(content, dict) or not isinstance(content.get("sources"), dict) or not content["sources"]:
        raise UserError(f'{where}: needs "sources": {{NAME: {{"path": DIR, "weight": W}}, ...}} at the top')
    _only_keys(content, {"sources", "schedule"}, where)
    paths, weights = {}, {}
    for name, source in content["sources"].items():
        if not isinstance(source, dict) or set(source) != {"path", "weight"}:
            raise UserError(f'{where}: source {name}: write {{"path": DIR, "weight": W}}, nothing else')
        folder = Path(str(source["path"]))
        folder = folder if folder.is_absolute() else path.parent / folder  # relative to the file, wherever run from
        _add_source(paths, weights, str(name), folder, source["weight"], where)
    schedule = content.get("schedule", [])
    if not isinstance(schedule, list):
        raise UserError(f'{where}: "schedule" must be a list of {{"at_step": N, "weights": {{...}}}}')
    return _spec(str(path), paths, weights, [_entry(item, i, paths, where) for i, item in enumerate(schedule)])


def _only_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(str(key) for key in mapping if key not in allowed)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(allowed))}")


def _add_source(paths: dict, weights: dict, name: str, folder: Path, weight, where: str) -> None:
    if not NAME.fullmatch(name):
        raise UserError(f"{where}: source name {name!r}: use letters, digits, _, . and - (e.g. web, code_v2)")
    if name in paths:
        raise UserError(f"{where}: source {name} is named twice; give each source one entry")
    paths[name], weights[name] = folder, _weight(weight, f"{where}: source {name}")
    if weights[name] <= 0:
        raise UserError(f"{where}: source {name} has weight {weight}; a source's weight must be above 0")


def _weight(value, where: str) -> Fraction:
    """An exact weight from a number (or a numeric string: 0.7, 1e-3, 1/3); a float's shortest repr is read, so
    0.7 is 7/10."""
    if not isinstance(value, (int, float, str)) or isinstance(value, bool):
        raise UserError(f"{where}: weight {value!r} is not a number")
    try:
        return Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{where}: weight {value!r} is not a finite number") from None


def _entry(item, index: int, paths: dict, where: str) -> Phase:
    here = f"{where}: schedule[{index}]"
    if not isinstance(item, dict):
        raise UserError(f'{here}: write {{"at_step": N, "weights": {{NAME: W, ...}}}}')
    _only_keys(item, {"at_step", "at_tokens", "weights"}, here)
    at = [key for key in ("at_step", "at_tokens") if key in item]
    if len(at) != 1:
        raise UserError(f"{here}: give exactly one of at_step (an optimizer step) or at_tokens (a token count)")
    value = item[at[0]]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{here}: {at[0]} {value!r}; must be a whole number, 1 or more")
    given = item.get("weights")
    if not isinstance(given, dict):
        raise UserError(f'{here}: needs "weights": {{NAME: W, ...}} for every source')
    _only_keys(given, set(paths), f"{here}: weights")
    missing = [name for name in paths if name not in given]
    if missing:
        raise UserError(f"{here}: no weight for source {missing[0]}; give every source a weight (0 leaves it out)")
    weights = {}
    for name in paths:
        weights[name] = _weight(given[name], f"{here}: source {name}")
        if weights[name] < 0:
            raise UserError(f"{here}: source {name} has weight {given[name]}; weights must be 0 or more")
    return Phase(weights, at_step=value if at[0] == "at_step" else 0, at_tokens=value if at[0] == "at_tokens" else None)


def _spec(given: str, paths: dict, weights: dict, schedule: list[Phase]) -> MixtureSpec:
    notes, phases = [], []
    for phase in [Phase(weights), *schedule]:
        total = sum(phase.weights.values())
        if total <= 0:
            raise UserError(f"--data {given}: every weight of {phase.where()} is 0; leave at least one source in")
        normalised = {name: phase.weights[name] / total for name in sorted(paths)}
        if total != 1:
            shares = ", ".join(f"{name} {float(w):.4g}" for name, w in normalised.items())
            notes.append(f"--data: the weights of {phase.where()} sum to {float(total):g}, not 1; read as {shares}")
        phases.append(dataclasses.replace(phase, weights=normalised))
    return MixtureSpec(given, dict(sorted(paths.items())), tuple(phases), tuple(notes))


# -- the sources on disk -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """One prepared dataset folder: its splits, checked against its tokenizer. `label` names it in messages."""

    name: str
    dir: Path
    train: TokenFile | ShardedTokenFile
    val: TokenFile | ShardedTokenFile
    label: str

    def check_seq_len(self, seq_len: int) -> None:
        for split, file in (("train", self.train), ("val", self.val)):
            if file.num_tokens <= seq_len:
                raise UserError(
                    f"{self.label}: the {split} split has {file.num_tokens} tokens, not one window of "
                    f"{seq_len + 1}; use a shorter --seq-len or more data"
                )


def open_source(name: str, data_dir: Path, label: str) -> Source:
    """A dataset folder's splits (a sharded one's too: dsllm.data.shards), refused (one line) when it is not a
    prepared dataset, has no val split, its tokenizer is not the one its tokens were made with, or a token id is past
    that tokenizer's vocabulary."""
    from dsllm.data.shards import has_split, open_token_file
    from dsllm.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_hash

    if not (data_dir / "meta.json").is_file():
        raise UserError(f"{label}: not a prepared dataset (no meta.json); create it with data_pipeline/prepare.py")
    if not has_split(data_dir, "val"):
        raise UserError(f"{label}: has no val split; re-run prepare with --val-fraction above 0")
    train, val = open_token_file(data_dir, "train"), open_token_file(data_dir, "val")
    tokenizer = load_tokenizer(data_dir / TOKENIZER_FILE)
    if tokenizer_hash(tokenizer) != train.header.tokenizer_hash:
        raise UserError(
            f"{data_dir / TOKENIZER_FILE}: does not match the tokenizer the dataset was made with; "
            "run data_pipeline/validate.py and re-create the dataset"
        )
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for split in (train, val):  # ids past the tokenizer train silently on padded rows, or crash the embedding
        largest = split.max_token_id()
        if largest >= vocab_size:
            raise UserError(
                f"{split.bin_path}: token id {largest} is not below the tokenizer's vocabulary size "
                f"{vocab_size}; re-create the dataset with data_pipeline/prepare.py"
            )
    return Source(name, data_dir, train, val, label)


def combined_fingerprint(fingerprints: dict[str, str]) -> str:
    """One fingerprint of a mixture's train splits (name -> fingerprint), 32 hex digits like a dataset's."""
    text = "|".join(f"{name}={fingerprints[name]}" for name in sorted(fingerprints))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclasses.dataclass(frozen=True)
class Mixture:
    """A checked mixture: its sources (sorted by name, one tokenizer) and phases."""

    spec: MixtureSpec
    sources: tuple[Source, ...]

    @property
    def phases(self) -> tuple[Phase, ...]:
        return self.spec.phases

    @property
    def fingerprint(self) -> str:
        return combined_fingerprint({s.name: s.train.fingerprint for s in self.sources})

    def boundaries(self, global_batch: int, seq_len: int) -> list[tuple[int, dict[str, Fraction]]]:
        """(first global sample, weights) of each phase: its step times the global batch. Entries must come in
        order of the steps they start at."""
        starts = []
        for phase in self.phases:
            step = phase.start_step(global_batch * seq_len)
            if starts and step <= starts[-1][0]:
                raise UserError(
                    f"--data {self.spec.given}: schedule entry {phase.entry()} starts at step {step}, not after the "
                    f"entry before it (step {starts[-1][0]}, {global_batch * seq_len:,} tokens a step); list the "
                    "entries in the order they start"
                )
            starts.append((step, phase.weights))
        return [(step * global_batch, weights) for step, weights in starts]

    def record(self, global_batch: int, seq_len: int) -> dict:
        """config.json's account of the mixture: sources (folders, fingerprints, first weights) and schedule."""
        phases = self.boundaries(global_batch, seq_len)
        return {
            "train_fingerprint": self.fingerprint,
            "sources": {
                s.name: {
                    "dir": str(s.dir.resolve()),
                    "weight": float(self.phases[0].weights[s.name]),
                    "train_fingerprint": s.train.fingerprint,
                    "val_fingerprint": s.val.fingerprint,
                }
                for s in self.sources
            },
            "schedule": [
                {
                    **({"at_tokens": p.at_tokens} if p.at_tokens is not None else {"at_step": p.at_step}),
                    "start_step": start // global_batch,
                    "start_sample": start,
                    "weights": {name: float(w) for name, w in weights.items()},
                }
                for p, (start, weights) in zip(self.phases[1:], phases[1:])
            ],
        }


def open_mixture(spec: MixtureSpec) -> Mixture:
    """Each source opened and checked (`open_source`), and one tokenizer for all: refused otherwise, naming two."""
    sources = []
    for name, folder in spec.paths.items():
        if not folder.is_dir():
            raise UserError(
                f"--data: source {name}: {folder}: no such folder; prepare it (data_pipeline/prepare.py) or fix "
                "the path"
            )
        sources.append(open_source(name, folder, f"--data source {name} ({folder})"))
    first = sources[0]
    for other in sources[1:]:
        if other.train.header.tokenizer_hash != first.train.header.tokenizer_hash:
            raise UserError(
                f"--data: sources {first.name} and {other.name} were made with different tokenizers "
                f"({first.train.header.tokenizer_hash.hex()[:12]} vs {other.train.header.tokenizer_hash.hex()[:12]});"
                " prepare every source with one tokenizer (data_pipeline/prepare.py --tokenizer FILE)"
            )
    return Mixture(spec, tuple(sources))


def train_fingerprint(data: str) -> str:
    """The fingerprint of --data's training tokens without checking them (multi-host pre-flight compares hosts):
    a folder's train split's, or a mixture's combined one."""
    from dsllm.data.shards import open_token_file

    spec = parse_data(data)
    if spec is None:
        return open_token_file(data, "train").fingerprint
    return combined_fingerprint(
        {name: open_token_file(folder, "train").fingerprint for name, folder in spec.paths.items()}
    )


# -- the sample order ----------------------------------------------------------------------------------------------
class MixtureOrder:
    """Global sample index -> window of the mixture (its source's offset + the window in that source; offsets in
    the order of `sources`), a pure function of (seed, fingerprints, phases, index): see the module docstring.

    `sources`: (name, windows, fingerprint) each; `phases`: (first global sample, {name: weight summing to 1}),
    the first at sample 0."""

    def __init__(
        self,
        sources: list[tuple[str, int, str]],
        phases: list[tuple[int, dict[str, Fraction]]],
        seq_len: int,
        seed: int,
    ):
        if not phases or phases[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(phases, phases[1:])):
            raise ValueError("phases must start at sample 0 and increase")
        self.names = [name for name, _, _ in sources]
        self.num_windows = [count for _, count, _ in sources]
        self.fingerprints = {name: fingerprint for name, _, fingerprint in sources}
        self.seq_len, self.seed = seq_len, seed
        self.orders = [WindowOrder(count, fingerprint, seq_len, seed) for _, count, fingerprint in sources]
        self.offsets = [sum(self.num_windows[:s]) for s in range(len(sources))]
        self.starts = [start for start, _ in phases]
        self.weights = [[weights[name] for name in self.names] for _, weights in phases]
        self.block = BLOCK
        while self.block < len(sources) ** 2:  # a power of 4: a keyed permutation of [0, block) walks no cycles
            self.block *= 4
        self.key = combined_fingerprint(self.fingerprints)
        # each phase's deal: block k's places in a keyed permutation of [0, block) (its "epoch" k)
        self.dealers = [WindowOrder(self.block, f"{self.key}|phase {p}", seq_len, seed) for p in range(len(phases))]
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.bases = [np.zeros(len(sources), dtype=np.int64)]  # each source's samples before each phase
        for phase in range(len(phases) - 1):
            self.bases.append(self.bases[phase] + self._drawn_in(phase, self.starts[phase + 1] - self.starts[phase]))

    def _apportion(self, phase: int, blocks: int) -> list[int]:
        """Each source's samples in the first `blocks` blocks of a phase: floor(w * total), the heaviest source the
        rest. Non-decreasing in `blocks` for every source (the rest grows by at least w_max * block - (S - 1) >= 0,
        as w_max >= 1/S and block >= S^2), so a block's counts are never negative."""
        total, weights = blocks * self.block, self.weights[phase]
        heaviest = weights.index(max(weights))
        counts = [w.numerator * total // w.denominator for w in weights]
        counts[heaviest] = total - sum(c for s, c in enumerate(counts) if s != heaviest)
        return counts

    def _arrange(self, phase: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Block `block` of a phase: (source, that source's sample number) at each of its places, cached. Source s
        owns c_s = A_s(k+1) - A_s(k) of the block's slots (in source order), place q gets slot pi_k(q) (the phase's
        keyed permutation of [0, block), its "epoch" k), and a source's j-th place in order reads its sample
        base_s + A_s(k) + j: a prefix of a block (where a phase ends) reads each source's next samples, no gaps."""
        hit = self._cache.get((phase, block))
        if hit is not None:
            return hit
        before, after = self._apportion(phase, block), self._apportion(phase, block + 1)
        counts = [a - b for a, b in zip(after, before)]
        owners = np.repeat(np.arange(len(self.names)), counts)  # slot -> source
        sources = owners[self.dealers[phase].windows(block * self.block + np.arange(self.block))]
        shift = self.bases[phase] + np.array(before) - (np.cumsum(counts) - counts)  # number = shift + slot of rank
        numbers = np.empty(self.block, dtype=np.int64)
        numbers[np.argsort(sources, kind="stable")] = np.arange(self.block) + shift[owners]
        if len(self._cache) >= 16:  # a rank reads on block by block: the last few suffice
            self._cache.clear()
        self._cache[(phase, block)] = sources, numbers
        return sources, numbers

    def _deal(self, phase: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, its sample number) of a phase's samples, given as offsets from the phase's start."""
        blocks, places = np.divmod(offsets, self.block)
        sources, numbers = np.empty_like(offsets), np.empty_like(offsets)
        for block in np.unique(blocks).tolist():
            here = blocks == block
            arranged = self._arrange(phase, block)
            sources[here], numbers[here] = arranged[0][places[here]], arranged[1][places[here]]
        return sources, numbers

    def _drawn_in(self, phase: int, count: int) -> np.ndarray:
        """Each source's samples among the first `count` of a phase."""
        block, rest = divmod(count, self.block)
        counts = np.array(self._apportion(phase, block), dtype=np.int64)
        if rest:
            counts += np.bincount(self._arrange(phase, block)[0][:rest], minlength=len(self.names))
        return counts

    def windows(self, global_indices) -> np.ndarray:
        """The mixture's window of each global sample index (int64 array in, int64 array out)."""
        indices = np.asarray(global_indices, dtype=np.int64)
        if len(self.names) == 1:  # nothing to deal: sample i is the source's sample i, as its folder alone
            return self.orders[0].windows(indices)
        sources, numbers = np.empty_like(indices), np.empty_like(indices)
        phases = np.searchsorted(self.starts, indices, side="right") - 1
        for phase in np.unique(phases).tolist():
            here = phases == phase
            sources[here], numbers[here] = self._deal(phase, indices[here] - self.starts[phase])
        out = np.empty_like(indices)
        for s, order in enumerate(self.orders):
            mine = sources == s
            if mine.any():
                out[mine] = self.offsets[s] + order.windows(numbers[mine])
        return out

    def window(self, global_index: int) -> int:
        return int(self.windows([global_index])[0])

    def drawn(self, consumed_samples: int) -> dict[str, int]:
        """Each source's samples among the first `consumed_samples` global samples."""
        phase = bisect_right(self.starts, consumed_samples) - 1
        counts = self.bases[phase] + self._drawn_in(phase, consumed_samples - self.starts[phase])
        return dict(zip(self.names, counts.tolist()))

    def seen(self, consumed_samples: int) -> dict[str, dict]:
        """Per source: training tokens read (samples x seq_len) and epochs (samples / its windows)."""
        return {
            name: {"tokens": n * self.seq_len, "epochs": round(n / windows, 4)}
            for (name, n), windows in zip(self.drawn(consumed_samples).items(), self.num_windows)
        }

    def _schedule(self) -> list[dict]:
        return [
            {"start": start, "weights": {name: str(w) for name, w in zip(self.names, weights)}}
            for start, weights in zip(self.starts, self.weights)
        ]

    def state(self) -> dict:
        sources = {
            name: {"fingerprint": self.fingerprints[name], "num_windows": n}
            for name, n in zip(self.names, self.num_windows)
        }
        return {
            "mixture": {"sources": sources, "schedule": self._schedule(), "block": self.block},
            "seq_len": self.seq_len,
            "seed": self.seed,
        }

    def check(self, state: dict, consumed_samples: int) -> None:
        """Refuse (DataFingerprintError) a checkpoint of other data: another set of sources, a source whose
        fingerprint changed, another seq_len or seed, or weights that differ before the resume point. The schedule
        may change from the resume point on: the samples read so far are those the new schedule gives too."""
        if "mixture" not in state:
            raise DataFingerprintError(
                f"the checkpoint was trained on one dataset ({state['fingerprint']}), but --data is a mixture of "
                f"{', '.join(self.names)}: resuming would silently change the data; pass the original --data or "
                "start a new run"
            )
        saved = state["mixture"]
        if sorted(saved["sources"]) != sorted(self.names):
            raise DataFingerprintError(
                f"the checkpoint was trained on a mixture of {', '.join(sorted(saved['sources']))}, but --data "
                f"has {', '.join(self.names)}: resuming would silently change the data; pass the original sources "
                "or start a new run"
            )
        for name in self.names:
            if saved["sources"][name]["fingerprint"] != self.fingerprints[name]:
                raise DataFingerprintError(
                    f"source {name}: the checkpoint was trained on dataset {saved['sources'][name]['fingerprint']}, "
                    f"but --data's {name} is {self.fingerprints[name]}: resuming would silently change the data; pass "
                    "the original dataset or start a new run"
                )
        check_seq_len_and_seed(state, self.seq_len, self.seed)
        past = [phase for phase in saved["schedule"] if phase["start"] < consumed_samples]
        ours = [phase for phase in self._schedule() if phase["start"] < consumed_samples]
        if past != ours:
            raise DataFingerprintError(
                f"the checkpoint read its first {consumed_samples} samples with weights {_describe(past)}, --data "
                f"gives {_describe(ours)} for them: a mixture's weights may change only from the resume point on; "
                "keep the schedule up to it (entries after it may change) or start a new run"
            )


def _describe(schedule: list[dict]) -> str:
    return "; then ".join(
        f"from sample {p['start']} " + ", ".join(f"{n} {float(Fraction(w)):.4g}" for n, w in p["weights"].items())
        for p in schedule
    )
