"""Weighted mixtures (dsllm.data.mixture): the --data syntax and its refusals, shares that follow the weights, an
order that is a pure function of the sample index (any world size, worker count, resume point), and schedules."""

import itertools
import json
from collections import Counter
from fractions import Fraction

import pytest
import torch

from dsllm.data.loader import MixtureWindows, ResumableLoader, TokenWindows
from dsllm.data.mixture import MixtureOrder, open_mixture, parse_data
from dsllm.data.sampler import DataFingerprintError, WindowOrder
from dsllm.errors import UserError

SEQ = 16
WEIGHTS = {"web": 0.6, "code": 0.3, "books": 0.1}


def mixture_text(dirs, weights=WEIGHTS) -> str:
    return ",".join(f"{name}={dirs[name]}:{weight}" for name, weight in weights.items())


def windows_of(dirs, phases=None, seq_len=SEQ) -> MixtureWindows:
    mixture = open_mixture(parse_data(mixture_text(dirs)))
    sources = {s.name: TokenWindows(s.train, seq_len) for s in mixture.sources}
    return MixtureWindows(sources, phases or mixture.boundaries(1, seq_len))


def source_of(windows: MixtureWindows, index: int) -> str:
    return next(name for name, start in reversed(list(zip(windows.sources, windows.offsets))) if index >= start)


def shares(windows: MixtureWindows, indices) -> dict[str, float]:
    counts = Counter(source_of(windows, i) for i in indices)
    return {name: counts[name] / sum(counts.values()) for name in windows.sources}


# -- syntax and refusals ------------------------------------------------------------------------------------------
def test_a_folder_is_not_a_mixture_and_the_string_form_is(mixture_dirs, dataset_dir):
    assert parse_data(str(dataset_dir)) is None
    spec = parse_data(mixture_text(mixture_dirs))
    assert list(spec.paths) == ["books", "code", "web"]  # sorted: the order given does not matter
    assert spec.phases[0].weights == {"books": Fraction(1, 10), "code": Fraction(3, 10), "web": Fraction(6, 10)}
    assert spec.notes == ()


def test_weights_that_do_not_sum_to_one_are_normalised_with_a_note(mixture_dirs):
    spec = parse_data(mixture_text(mixture_dirs, {"web": 6, "code": 3, "books": 1}))
    assert spec.phases[0].weights == parse_data(mixture_text(mixture_dirs)).phases[0].weights
    assert spec.notes == (
        "--data: the weights of the sources' weights sum to 10, not 1; read as books 0.1, code 0.3, web 0.6",
    )


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_mixture_file_with_a_schedule(mixture_dirs, tmp_path, suffix):
    import yaml

    content = {
        "sources": {name: {"path": str(mixture_dirs[name]), "weight": w} for name, w in WEIGHTS.items()},
        "schedule": [
            {"at_step": 10, "weights": {"web": 0.1, "code": 0.1, "books": 0.8}},
            {"at_tokens": 5000, "weights": {"web": 0, "code": 0.5, "books": 0.5}},  # 0: left out for a while
        ],
    }
    path = tmp_path / f"mix{suffix}"
    path.write_text(json.dumps(content) if suffix == ".json" else yaml.safe_dump(content))
    mixture = open_mixture(parse_data(str(path)))
    assert [s.name for s in mixture.sources] == ["books", "code", "web"]
    # global batch 8 of 32 tokens: step 10 is sample 80; 5000 tokens are step 19.5, so step 20 (sample 160)
    starts = [start for start, _ in mixture.boundaries(8, 32)]
    assert starts == [0, 80, 160]
    record = mixture.record(8, 32)
    assert record["schedule"][1] == {
        "at_tokens": 5000,
        "start_step": 20,
        "start_sample": 160,
        "weights": {"books": 0.5, "code": 0.5, "web": 0.0},
    }
    assert record["sources"]["web"]["weight"] == 0.6 and record["train_fingerprint"] == mixture.fingerprint


def test_schedule_entries_out_of_order_are_refused(mixture_dirs, tmp_path):
    content = {
        "sources": {name: {"path": str(mixture_dirs[name]), "weight": w} for name, w in WEIGHTS.items()},
        "schedule": [
            {"at_tokens": 5000, "weights": WEIGHTS},
            {"at_step": 10, "weights": WEIGHTS},
        ],
    }
    (tmp_path / "mix.json").write_text(json.dumps(content))
    mixture = open_mixture(parse_data(str(tmp_path / "mix.json")))
    with pytest.raises(UserError, match="at_step 10 starts at step 10, not after the entry before it .step 157"):
        mixture.boundaries(1, 32)  # 5000 tokens at 32 a step: step 157, after step 10
    assert [s for s, _ in mixture.boundaries(100, 32)] == [0, 200, 1000]  # at 3,200 a step: step 2, then step 10


@pytest.mark.parametrize(
    "text, message",
    [
        ("web={web}:0.5,code={code}:0", "source code has weight 0; a source's weight must be above 0"),
        ("web={web}:0.5,code={code}:-1", "source code has weight -1"),
        ("web={web}:nan,code={code}:1", "source web: weight 'nan' is not a finite number"),
        ("web={web},code={code}:1", "'web=.*' is not NAME=DIR:WEIGHT"),
        ("web={web}:1,web={code}:1", "source web is named twice"),
        ("w b={web}:1", "source name 'w b'"),
    ],
)
def test_bad_mixture_strings_are_one_line(mixture_dirs, text, message):
    with pytest.raises(UserError, match=message):
        parse_data(text.format(**mixture_dirs))


@pytest.mark.parametrize(
    "content, message",
    [
        ({"source": {}}, 'needs "sources"'),
        ({"sources": {"web": {"path": "{web}", "weight": 1}}, "shedule": []}, "unknown key 'shedule'"),
        ({"sources": {"web": {"path": "{web}"}}}, 'source web: write {"path": DIR, "weight": W}'),
        ({"sources": {"web": {"path": "{web}", "weight": True}}}, "weight True is not a number"),
        (
            {"sources": {"web": {"path": "{web}", "weight": 1}}, "schedule": [{"at_step": 0, "weights": {"web": 1}}]},
            r"schedule\[0\]: at_step 0; must be a whole number, 1 or more",
        ),
        (
            {
                "sources": {"web": {"path": "{web}", "weight": 1}, "code": {"path": "{code}", "weight": 1}},
                "schedule": [{"at_step": 5, "weights": {"web": 1}}],
            },
            r"schedule\[0\]: no weight for source code",
        ),
        (
            {"sources": {"web": {"path": "{web}", "weight": 1}}, "schedule": [{"at_step": 5, "weights": {"web": 0}}]},
            "every weight of at_step 5 is 0",
        ),
        (
            {
                "sources": {"web": {"path": "{web}", "weight": 1}},
                "schedule": [{"at_step": 5, "at_tokens": 9, "weights": {"web": 1}}],
            },
            "give exactly one of at_step",
        ),
    ],
)
def test_bad_mixture_files_are_one_line(mixture_dirs, tmp_path, content, message):
    text = json.dumps(content).replace("{web}", str(mixture_dirs["web"])).replace("{code}", str(mixture_dirs["code"]))
    (tmp_path / "mix.json").write_text(text)
    with pytest.raises(UserError, match=message):
        parse_data(str(tmp_path / "mix.json"))


def test_paths_in_a_mixture_file_are_relative_to_it(mixture_dirs, tmp_path):
    (tmp_path / "mix.yaml").write_text("sources:\n  web: {path: ../web, weight: 1}\n")
    spec = parse_data(str(tmp_path / "mix.yaml"))
    assert spec.paths["web"] == tmp_path / ".." / "web"
    with pytest.raises(UserError, match=r"--data: source web: .*: no such folder; prepare it"):
        open_mixture(spec)
    (tmp_path / "broken.yaml").write_text("sources: [\n")
    with pytest.raises(UserError, match="--data .*broken.yaml: not valid YAML"):
        parse_data(str(tmp_path / "broken.yaml"))


# -- the order ----------------------------------------------------------------------------------------------------
def test_shares_over_2000_windows_are_within_2_points_of_the_weights(mixture_dirs):
    windows = windows_of(mixture_dirs)
    sampler = ResumableLoader(windows, 8, seed=3).sampler
    for start in (0, 1234):  # from the first sample, and from anywhere
        sampler.consumed_samples = start
        seen = shares(windows, itertools.islice(iter(sampler), 2000))
        assert all(abs(seen[name] - weight) <= 0.02 for name, weight in WEIGHTS.items()), seen
    order = windows.order(seed=3)  # any 2,000 in a row: within a point (the closed-form counts)
    for start in range(0, 5000, 37):
        read = {name: order.drawn(start + 2000)[name] - order.drawn(start)[name] for name in WEIGHTS}
        assert all(abs(read[name] - 2000 * weight) <= 20 for name, weight in WEIGHTS.items()), (start, read)
    # and the windows are those the loader hands out: its batches are the windows the sampler names
    loader = ResumableLoader(windows, 8, seed=3)
    indices = list(itertools.islice(iter(ResumableLoader(windows, 8, seed=3).sampler), 16))
    batches = torch.cat(list(itertools.islice(iter(loader), 2)))
    assert torch.equal(batches, torch.stack([windows[i] for i in indices]))


def test_every_window_of_a_source_is_read_once_per_epoch(mixture_dirs):
    windows = windows_of(mixture_dirs)
    order, count = windows.order(seed=5), len(windows.sources["books"])
    samples = 12 * count  # books has a tenth of them: more than one epoch of it
    books = [i for i in map(order.window, range(samples)) if source_of(windows, i) == "books"]
    start = windows.offsets[list(windows.sources).index("books")]
    assert len(books) > count and sorted(i - start for i in books[:count]) == list(range(count))
    assert order.drawn(samples)["books"] == len(books)


def test_the_order_is_a_pure_function_of_the_sample_index(mixture_dirs):
    windows = windows_of(mixture_dirs)
    one, other = windows.order(seed=3), windows.order(seed=3)
    forward = [one.window(i) for i in range(700)]
    assert [other.window(i) for i in reversed(range(700))] == forward[::-1]  # no history: any order of asking
    assert [windows.order(seed=4).window(i) for i in range(700)] != forward


def test_one_rank_and_two_ranks_see_the_same_global_batches(mixture_dirs):
    windows = windows_of(mixture_dirs)
    single = list(itertools.islice(iter(ResumableLoader(windows, 8, seed=3).sampler), 400))
    ranks = [iter(ResumableLoader(windows, 4, seed=3, rank=r, world_size=2).sampler) for r in range(2)]
    interleaved = [next(ranks[i % 2]) for i in range(400)]  # rank r holds global samples r, r+2, ...
    assert interleaved == single
    with_workers = list(itertools.islice(iter(ResumableLoader(windows, 4, seed=3, num_workers=2)), 5))
    without = list(itertools.islice(iter(ResumableLoader(windows, 4, seed=3)), 5))
    assert all(torch.equal(a, b) for a, b in zip(with_workers, without))


def test_a_one_source_mixture_reads_what_its_folder_reads(mixture_dirs):
    web = TokenWindows(mixture_dirs["web"] / "train", SEQ)
    alone = MixtureWindows({"web": web}, [(0, {"web": Fraction(1)})])
    assert [alone.order(3).window(i) for i in range(1500)] == [web.order(3).window(i) for i in range(1500)]


def test_sequence_parallel_pieces_of_mixture_windows(mixture_dirs):
    whole, pieces = windows_of(mixture_dirs), []
    for p in range(2):
        mixture = open_mixture(parse_data(mixture_text(mixture_dirs)))
        parts = {s.name: TokenWindows(s.train, SEQ, piece=(p, 2)) for s in mixture.sources}
        pieces.append(MixtureWindows(parts, whole.phases))
    for i in (0, len(whole) // 2, len(whole) - 1):
        assert torch.equal(pieces[0][i][:-1], whole[i][: SEQ // 2]) and torch.equal(pieces[1][i], whole[i][SEQ // 2 :])


# -- schedules and resume -----------------------------------------------------------------------------------------
SWITCH_STEP, GLOBAL_BATCH = 30, 8
LATER = {"web": Fraction(1, 10), "code": Fraction(1, 10), "books": Fraction(8, 10)}


def scheduled(mixture_dirs) -> MixtureWindows:
    first = {name: Fraction(str(w)) for name, w in WEIGHTS.items()}
    return windows_of(mixture_dirs, [(0, first), (SWITCH_STEP * GLOBAL_BATCH, LATER)])


def test_a_schedule_switches_the_shares_at_its_step(mixture_dirs):
    windows = scheduled(mixture_dirs)
    order, switch = windows.order(seed=3), SWITCH_STEP * GLOBAL_BATCH
    before, after = (
        shares(windows, map(order.window, range(switch))),
        shares(windows, map(order.window, range(switch, switch + 2000))),
    )
    assert all(abs(before[n] - float(Fraction(str(w)))) <= 0.02 for n, w in WEIGHTS.items()), before
    assert all(abs(after[n] - float(w)) <= 0.02 for n, w in LATER.items()), after
    # the per-source counts carry over the switch: each source's samples go on from where they were
    drawn = order.drawn(switch + 2000)
    assert sum(drawn.values()) == switch + 2000
    assert drawn["books"] == order.drawn(switch)["books"] + round(after["books"] * 2000)


def test_each_source_reads_on_across_phases_without_gaps_or_repeats(mixture_dirs):
    first = {name: Fraction(str(w)) for name, w in WEIGHTS.items()}
    windows = windows_of(mixture_dirs, [(0, first), (240, LATER), (250, {**LATER, "web": Fraction(0)}), (700, first)])
    order, numbers = windows.order(seed=3), {name: [] for name in windows.sources}
    for i in range(1500):
        phase = sum(start <= i for start in order.starts) - 1
        block, place = divmod(i - order.starts[phase], order.block)
        sources, drawn = order._arrange(phase, block)
        if i % 50 == 0:  # the closed form: each source's samples so far
            assert order.drawn(i) == {name: len(n) for name, n in numbers.items()}
        numbers[order.names[sources[place]]].append(drawn[place])
    assert all(n == list(range(len(n))) for n in numbers.values())  # each source's n-th sample, in order
    assert numbers["web"] and order.drawn(700)["web"] == order.drawn(250)["web"]  # weight 0: not read


@pytest.mark.parametrize("resume_at", [0, 8, 232, 240, 248, 1000])  # before, at and after the switch (sample 240)
def test_a_restored_sampler_continues_identically(mixture_dirs, resume_at):
    windows = scheduled(mixture_dirs)
    uninterrupted = list(itertools.islice(iter(ResumableLoader(windows, 8, seed=3).sampler), resume_at + 300))
    first = ResumableLoader(windows, 4, seed=3, rank=0, world_size=2)
    first.sampler.consumed_samples = resume_at
    resumed = ResumableLoader(scheduled(mixture_dirs), 8, seed=3)  # a new process: another instance
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint holds it
    assert list(itertools.islice(iter(resumed.sampler), 300)) == uninterrupted[resume_at:]


def test_resume_refuses_other_data_and_a_changed_past(mixture_dirs, dataset_dir):
    windows = scheduled(mixture_dirs)
    state = {**ResumableLoader(windows, 8, seed=3).state_dict(), "consumed_samples": 400}
    swapped = {**mixture_dirs, "books": dataset_dir}
    with pytest.raises(
        DataFingerprintError, match="source books: the checkpoint was trained on dataset .* but --data's books is"
    ):
        ResumableLoader(windows_of(swapped, windows.phases), 8, seed=3).load_state_dict(state)
    two = {name: mixture_dirs[name] for name in ("web", "code")}
    mixture = open_mixture(parse_data(mixture_text(two, {"web": 1, "code": 1})))
    fewer = MixtureWindows({s.name: TokenWindows(s.train, SEQ) for s in mixture.sources}, mixture.boundaries(1, SEQ))
    with pytest.raises(DataFingerprintError, match="mixture of books, code, web, but --data has code, web"):
        ResumableLoader(fewer, 8, seed=3).load_state_dict(state)
    plain = ResumableLoader(TokenWindows(dataset_dir / "train", SEQ), 8, seed=3)
    with pytest.raises(
        DataFingerprintError, match="trained on a mixture of books, code, web, but --data is one dataset"
    ):
        plain.load_state_dict(state)
    with pytest.raises(DataFingerprintError, match="trained on one dataset .*, but --data is a mixture of books"):
        ResumableLoader(windows, 8, seed=3).load_state_dict(plain.state_dict())
    with pytest.raises(DataFingerprintError, match="seq_len 16 and data seed 3, this run 16 and 4"):
        ResumableLoader(windows, 8, seed=4).load_state_dict(state)
    # weights before the resume point (sample 400) must stay; a change from it on is the new schedule's to make
    first = {name: Fraction(str(w)) for name, w in WEIGHTS.items()}
    earlier_switch = windows_of(mixture_dirs, [(0, first), (200, LATER)])
    with pytest.raises(DataFingerprintError, match="first 400 samples with weights .* may change only from the resume"):
        ResumableLoader(earlier_switch, 8, seed=3).load_state_dict(state)
    later = windows_of(mixture_dirs, [(0, first), (240, LATER), (400, first)])
    resumed = ResumableLoader(later, 8, seed=3)
    resumed.load_state_dict(state)  # a phase added at the resume point: allowed
    assert resumed.sampler.order.drawn(400) == windows.order(seed=3).drawn(400)


def test_per_source_tokens_epochs_and_the_warning_once(mixture_dirs):
    windows = windows_of(mixture_dirs)
    loader = ResumableLoader(windows, 8, seed=3, max_epochs_warning=1.0)
    batches = iter(loader)
    books = len(windows.sources["books"])
    warnings = []
    for _ in range(0, 40 * books, 8):  # books (0.1 of the samples) is read 4 times over, the others more
        next(batches)
        fields, said = loader.report()
        warnings += said
    seen = fields["sources"]
    assert sum(s["tokens"] for s in seen.values()) == loader.consumed_samples * SEQ
    assert seen["books"]["epochs"] == pytest.approx(loader.consumed_samples * 0.1 / books, abs=0.02)
    assert sorted(w.split()[2] for w in warnings) == ["books", "code", "web"]  # each once, past 1 epoch
    assert all(w.split()[6] in ("1.00", "1.01") for w in warnings), warnings
    assert ResumableLoader(TokenWindows(mixture_dirs["web"] / "train", SEQ), 8, seed=3).report() == ({}, [])


def test_window_order_state_is_what_checkpoints_held_before_mixtures():
    order = WindowOrder(10, "a" * 32, SEQ, 3)
    assert order.state() == {"fingerprint": "a" * 32, "seq_len": SEQ, "seed": 3, "num_windows": 10}
    assert MixtureOrder([("a", 10, "a" * 32)], [(0, {"a": Fraction(1)})], SEQ, 3).seen(25) == {
        "a": {"tokens": 25 * SEQ, "epochs": 2.5}
    }
