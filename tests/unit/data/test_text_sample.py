"""`train-tokenizer --sample-bytes N`: a reproducible sample of about N bytes of cleaned text, uniform across the
inputs, drawn in memory that does not grow with the corpus."""

import json
import random

from conftest import make_documents, peak_rss_kib, write_jsonl

from dsllm.data.text_sample import TextSample
from dsllm.data.train_tokenizer import main


def sample_of(texts, budget, seed=1, dedup=True):
    sample = TextSample(budget, seed, dedup=dedup)
    for text in texts:
        sample.offer(text)
    return sample, list(sample.documents())


def test_the_sample_is_the_smallest_ranks_within_the_budget_whatever_the_order():
    texts = make_documents(2000, seed=3)
    sample, docs = sample_of(texts, 20_000)
    assert 19_000 < sample.bytes <= 20_000 and sample.count == len(docs) and sample.offered == 2000
    assert docs == [t for t in texts if t in set(docs)]  # in corpus order
    ranked = sorted(texts, key=sample.rank)
    assert set(docs) == set(ranked[: len(docs)])  # a prefix by rank
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert set(sample_of(shuffled, 20_000)[1]) == set(docs)  # order does not matter
    assert set(sample_of(texts, 20_000, seed=2)[1]) != set(docs)  # the seed does


def test_inputs_are_sampled_in_proportion_to_their_size_and_duplicates_once():
    big = [f"big {t}" for t in make_documents(3000, seed=1)]
    small = [f"small {t}" for t in make_documents(1000, seed=2)]
    _, docs = sample_of(small + big, 200_000)  # ~600 of 4,000 documents
    from_big = sum(len(t) for t in docs if t.startswith("big"))
    assert 0.68 < from_big / sum(map(len, docs)) < 0.82  # 3/4 of the corpus, 3/4 of the sample
    twice = small + small
    sample, docs = sample_of(twice, 10**9)
    assert docs == small and sample.duplicates == 1000
    assert sample_of(twice, 10**9, dedup=False)[1] == twice
    assert sample_of(["x" * 100], 99)[0].too_large == 1


def test_sample_bytes_trains_the_same_tokenizer_every_run(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", make_documents(1500, seed=1))
    write_jsonl(tmp_path / "b.jsonl", make_documents(500, seed=2))
    lines = []
    for name, seed in (("one", 5), ("two", 5), ("other", 6)):
        args = ["--input", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--vocab-size", 300, "--output", tmp_path / name]
        assert main([*map(str, args), "--sample-bytes", "60000", "--seed", str(seed)]) == 0
        lines.append(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sample:")))
    assert (tmp_path / "one/tokenizer.json").read_text() == (tmp_path / "two/tokenizer.json").read_text()
    assert lines[0] == lines[1] != lines[2]
    assert lines[0].startswith("sample: ") and "documents of 2,000 cleaned ones (--sample-bytes 60,000" in lines[0]


def test_peak_memory_stays_flat_on_a_corpus_ten_times_the_sample(tmp_path):
    def write_corpus(path, copies):  # streamed to disk: never held in a list here either
        with open(path, "w") as f:
            for copy in range(copies):
                texts = make_documents(2000, seed=copy, max_words=120)
                f.writelines(json.dumps({"text": f"{copy} {t}"}) + "\n" for t in texts)
        return path.stat().st_size

    one = write_corpus(tmp_path / "one.jsonl", 3)
    ten = write_corpus(tmp_path / "ten.jsonl", 30)
    peaks, outputs = {}, {}
    for name in ("one", "ten"):
        peaks[name], _, outputs[name] = peak_rss_kib(
            "dsllm.data.train_tokenizer",
            "--input",
            tmp_path / f"{name}.jsonl",
            "--vocab-size",
            300,
            "--output",
            tmp_path / f"tok-{name}",
            "--sample-bytes",
            one,
        )
    print(f"corpus {one / 1e6:.1f} -> {ten / 1e6:.1f} MB, sample {one / 1e6:.1f} MB: peak RSS {peaks} KiB")
    assert "peak memory" in outputs["ten"]
    assert peaks["ten"] < 1.1 * peaks["one"], peaks
