"""Near-duplicate removal (`--near-dedup`): planted near copies go, distinct documents stay, the same with any
number of workers, and the report counts them."""

import random

from conftest import make_documents, write_jsonl

from dsllm.data import encode_workers
from dsllm.data.cleaning import CleaningConfig, CleaningReport
from dsllm.data.near_dedup import NearDeduplicator, Signer, bands, shingles
from dsllm.data.prepare import PrepareConfig, format_report, prepare
from dsllm.data.sources import CorpusReader
from dsllm.data.train_tokenizer import cleaned_documents


def jaccard(a: str, b: str) -> float:
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


def planted_corpus(count=60, copies_every=4):
    """Distinct 200-300-word documents, and after them a near copy of every `copies_every`-th one: a word
    changed (Jaccard of word 5-grams ~0.95-0.97, where 9 bands of 13 rows catch a pair with probability > 0.99),
    and for every other copy the case of a few words too."""
    texts = make_documents(count, seed=7, min_words=200, max_words=300)
    rng = random.Random(11)
    near = []
    for n, i in enumerate(range(0, count, copies_every)):
        words = texts[i].split()
        words[rng.randrange(10, len(words))] = "CHANGED"
        if n % 2:
            words[5:8] = [w.upper() for w in words[5:8]]  # case does not count: shingles are lower-cased
        near.append(" ".join(words))
        assert jaccard(texts[i], near[-1]) > 0.94
    rewritten = texts[1].split()  # a word in 8 changed: Jaccard ~0.5, a different document, kept
    for j in range(3, len(rewritten), 8):
        rewritten[j] = "other"
    assert jaccard(texts[1], " ".join(rewritten)) < 0.6
    return texts + near + [" ".join(rewritten)], len(near)


def test_planted_near_duplicates_are_found_and_distinct_documents_kept():
    texts, planted = planted_corpus()
    signer, near = Signer(0.8), NearDeduplicator()
    keys = signer.band_keys(texts)
    assert keys.shape == (len(texts), bands(0.8)[0]) and bands(0.8) == (9, 13)
    flags = [near.is_duplicate(row) for row in keys]
    assert flags == [False] * 60 + [True] * planted + [False]
    assert (Signer(0.8).band_keys(texts[:3]) == keys[:3]).all()  # the same keys in another process's signer
    assert len(shingles("one two three")) == 1 and len(shingles("a b c d e f")) == 2


def test_prepare_near_dedup_counts_and_does_not_depend_on_workers(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(encode_workers, "BATCH_DOCUMENTS", 16)  # copies and originals in batches of other workers
    texts, planted = planted_corpus()
    texts += [texts[0]]  # an exact duplicate stays an exact duplicate
    write_jsonl(tmp_path / "c.jsonl", texts)
    outputs = []
    for workers in (1, 2):
        meta = prepare(
            PrepareConfig(
                inputs=[str(tmp_path / "c.jsonl")],
                tokenizer=str(tokenizer_dir),
                output=str(tmp_path / f"w{workers}"),
                workers=workers,
                val_fraction=0.1,
                cleaning=CleaningConfig(near_dedup=0.8),
                progress=False,
            )
        )
        assert meta["report"]["dropped"] == {"empty": 0, "too_short": 0, "duplicate": 1, "near_duplicate": planted}
        assert meta["report"]["documents_kept"] == 61
        assert meta["near_dedup"] == {"threshold": 0.8, "num_perm": 128, "shingle_words": 5, "bands": 9, "rows": 13}
        assert f"near-dedup {planted:,} near duplicates removed (Jaccard 0.8 over word 5-grams" in format_report(meta)
        outputs.append([(tmp_path / f"w{workers}" / name).read_bytes() for name in ("train.bin", "val.bin")])
    assert outputs[0] == outputs[1]


def test_the_tokenizer_trainer_drops_the_same_near_duplicates(tmp_path):
    texts, planted = planted_corpus()
    write_jsonl(tmp_path / "c.jsonl", texts)
    cleaning = CleaningConfig(near_dedup=0.8)
    report = CleaningReport.for_config(cleaning)
    kept = list(cleaned_documents(CorpusReader([tmp_path / "c.jsonl"]), cleaning, report, progress=False))
    assert report.dropped["near_duplicate"] == planted and kept == texts[:60] + texts[-1:]
    assert "near_duplicate" not in CleaningReport.for_config(CleaningConfig()).dropped  # off: not in reports
