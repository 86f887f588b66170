"""Sharded datasets (dsllm.data.shards): K prepare processes, each writing its shard, then a merge, give the documents
one process gives; the trainer reads the shards as one token file, with a bounded number of shards open."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_user_error, make_documents, run_script, write_jsonl

from dsllm.data.format import TokenFile, TokenFileWriter
from dsllm.data.loader import TokenWindows
from dsllm.data.shards import MANIFEST_FILE, ShardedTokenFile, open_token_file

SHARDS = 3


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, corpus_jsonl, tokenizer_dir) -> Path:
    """conftest's `dataset_dir` corpus, prepared as 3 shards by 3 processes at once (as 3 machines would), merged."""
    out = tmp_path_factory.mktemp("sharded") / "data"
    args = ["--input", corpus_jsonl, "--tokenizer", tokenizer_dir, "--output", out, "--val-fraction", "0.1"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "data_pipeline" / "prepare.py"), *map(str, args), "--workers", "1"]
            + ["--num-shards", str(SHARDS), "--shard-index", str(i)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(SHARDS)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    run_script("data_pipeline/merge_shards.py", "--output", out, check_rc=0)
    return out


def documents(file) -> list[tuple[int, ...]]:
    return [tuple(file.document(i).tolist()) for i in range(file.num_documents)]


def test_shards_hold_the_documents_of_one_process(sharded_dir, dataset_dir):
    """The same multiset of documents per split as one process's preparation (`dataset_dir`, the same corpus, seed
    and val fraction). Not the same order: a document's shard is its hash's, so the sharded stream is shard 0's
    documents, then shard 1's, ..., each in input order, where one process writes all of them in input order."""
    for split in ("train", "val"):
        single, sharded = documents(TokenFile(dataset_dir / split)), documents(open_token_file(sharded_dir, split))
        assert sorted(sharded) == sorted(single) and len(sharded) == len(single)
        if split == "train":
            assert sharded != single  # the order legitimately differs (see above)
    manifest = json.loads((sharded_dir / MANIFEST_FILE).read_text())
    assert [s["dir"] for s in manifest["shards"]] == [f"shard-{i}-of-3" for i in range(3)]
    assert all(s["splits"]["train"]["documents"] > 0 for s in manifest["shards"])  # each process got a share
    train = ShardedTokenFile(sharded_dir, "train")
    assert manifest["splits"]["train"]["fingerprint"] == train.fingerprint
    meta = json.loads((sharded_dir / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] == train.num_tokens == TokenFile(dataset_dir / "train").num_tokens


def test_windows_over_shards_are_windows_over_their_concatenation(sharded_dir, tmp_path):
    """TokenWindows over the sharded split read exactly what they read from one token file of the shards'
    documents in shard order: a window across a shard boundary is the two pieces joined."""
    sharded = ShardedTokenFile(sharded_dir, "train", max_open=1)
    writer = TokenFileWriter(tmp_path / "joined", sharded.vocab_size, sharded.header.tokenizer_hash)
    for i in range(sharded.num_documents):
        doc = sharded.document(i)
        writer.add_documents(doc, np.array([doc.size]))
    writer.close()
    joined = TokenFile(tmp_path / "joined")
    assert joined.num_tokens == sharded.num_tokens
    for seq_len, piece in ((37, (0, 1)), (64, (1, 2))):
        ours, theirs = TokenWindows(sharded, seq_len, piece=piece), TokenWindows(joined, seq_len, piece=piece)
        assert len(ours) == len(theirs) > 0
        for i in range(len(ours)):
            assert ours[i].tolist() == theirs[i].tolist(), i
    assert np.array_equal(sharded.tokens[5:-5], np.asarray(joined.tokens[5:-5]))
    assert sharded.tokens[-1] == joined.tokens[-1] and sharded.max_token_id() == joined.max_token_id()
    copied = copy.deepcopy(sharded)  # what a DataLoader worker gets: no open maps, its own on first use
    assert copied.open_shards == [] and copied.tokens[100:140].tolist() == sharded.tokens[100:140].tolist()


def test_open_shards_stay_within_the_bound(sharded_dir):
    """Reading windows in a shuffled order keeps at most `max_open` shards' memory maps (2 file handles each)."""

    def shard_handles() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += "/shard-" in os.readlink(f"/proc/self/fd/{fd}")
            except FileNotFoundError:  # the listing's own handle, closed by now
                pass
        return count

    sharded = ShardedTokenFile(sharded_dir, "train", max_open=2)
    windows = TokenWindows(sharded, 32)
    before, most = shard_handles(), 0
    for i in np.random.default_rng(0).permutation(len(windows)).tolist():
        windows[i]
        assert len(sharded.open_shards) <= 2
        most = max(most, shard_handles() - before)
    assert 0 < most <= 2 * 2


def shard(out: Path, index: int, count: int, tokenizer: Path, texts: list[str]) -> None:
    from dsllm.data.prepare import PrepareConfig, prepare

    corpus = write_jsonl(out.parent / "corpus.jsonl", texts)
    config = PrepareConfig(
        [str(corpus)], str(tokenizer), str(out), 0.1, workers=1, progress=False, num_shards=count, shard_index=index
    )
    prepare(config)


def test_merge_refuses_a_missing_shard_and_writes_nothing(tmp_path, tokenizer_dir):
    out = tmp_path / "data"
    for index in (0, 2):
        shard(out, index, 3, tokenizer_dir, make_documents(90, seed=4))
    proc = run_script("data_pipeline/merge_shards.py", "--output", out)
    assert_user_error(proc, "shard 1 of 3 (shard-1-of-3) is missing", "--shard-index 1")
    assert sorted(p.name for p in out.iterdir()) == ["shard-0-of-3", "shard-2-of-3"]
    shard(out, 1, 3, tokenizer_dir, make_documents(90, seed=4))
    run_script("data_pipeline/merge_shards.py", "--output", out, check_rc=0)
    assert open_token_file(out, "train").num_documents + open_token_file(out, "val").num_documents == 90


def test_pretraining_reads_a_sharded_dataset(sharded_dir, tmp_path):
    """Two steps on the merged folder: the run records the manifest's combined fingerprints, and its marker too."""
    from runs import pretrain

    pretrain(sharded_dir, tmp_path / "run", "--max-steps", "2", "--eval-interval", "2")
    manifest = json.loads((sharded_dir / MANIFEST_FILE).read_text())
    data = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert data["train_fingerprint"] == manifest["splits"]["train"]["fingerprint"]
    assert data["val_fingerprint"] == manifest["splits"]["val"]["fingerprint"]
    marker = json.loads((tmp_path / "run" / "checkpoints" / "step00000002" / "dsllm_complete.json").read_text())
    assert marker["train_fingerprint"] == manifest["splits"]["train"]["fingerprint"]


def test_merge_and_reading_refuse_shards_that_do_not_fit(sharded_dir, tmp_path):
    """Shards of other settings or of a changed input are refused by the merge; a shard changed after the merge by
    the reader (its header against the manifest). Each in one line, the folder left as it was."""
    import shutil

    from dsllm.data.format import TokenFileError
    from dsllm.data.shards import merge_shards
    from dsllm.errors import UserError

    out = tmp_path / "data"
    shutil.copytree(sharded_dir, out)
    meta_path = out / "shard-2-of-3" / "meta.json"
    good = meta_path.read_text()
    manifest = (out / MANIFEST_FILE).read_text()
    for key, value, expect in (("seed", 7, "another seed"), ("documents_read", 1, "the input changed")):
        meta = json.loads(good)
        (meta["report"] if key == "documents_read" else meta)[key] = value
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(UserError, match=f"shard 2 .*{expect}"):
            merge_shards(out)
        assert (out / MANIFEST_FILE).read_text() == manifest
    meta_path.write_text(good)
    (out / "shard-0-of-3" / "val.idx").write_bytes((out / "shard-1-of-3" / "val.idx").read_bytes())
    shutil.copyfile(out / "shard-1-of-3" / "val.bin", out / "shard-0-of-3" / "val.bin")
    with pytest.raises(TokenFileError, match="the shard changed after the merge"):
        open_token_file(out, "val")


def test_a_damaged_manifest_is_one_line(sharded_dir, tmp_path):
    """A manifest edited by hand (a shard without its fingerprints, or no shards) is refused, not a traceback."""
    import shutil

    from dsllm.errors import UserError

    out = tmp_path / "data"
    shutil.copytree(sharded_dir, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for damaged in ({**manifest, "shards": [{"dir": "shard-0-of-3"}]}, {**manifest, "shards": []}):
        (out / MANIFEST_FILE).write_text(json.dumps(damaged))
        with pytest.raises(UserError, match="not a manifest of shards") as caught:
            open_token_file(out, "train")
        assert "\n" not in str(caught.value)
