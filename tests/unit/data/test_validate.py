"""data_pipeline/validate.py: a sound dataset passes; each kind of damage is named in one line, exit 2."""

import shutil

import numpy as np
import pytest
from conftest import assert_user_error, run_script

from dsllm.data.format import HEADER_SIZE
from dsllm.tokenizer import save_tokenizer, train_tokenizer

SCRIPT = "data_pipeline/validate.py"


@pytest.fixture
def dataset(tmp_path, dataset_dir):
    copy = tmp_path / "ds"
    shutil.copytree(dataset_dir, copy)
    return copy


def test_sound_dataset_summary(dataset):
    proc = run_script(SCRIPT, dataset, check_rc=0)
    train_line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("train"))
    assert "documents" in train_line and "tokens" in train_line and "mean" in train_line and "uint16" in train_line
    assert "OK (vocab 300" in proc.stdout


def test_truncated_bin(dataset):
    data = (dataset / "train.bin").read_bytes()
    (dataset / "train.bin").write_bytes(data[:-2])
    assert_user_error(run_script(SCRIPT, dataset), "train.bin", "truncated", "re-create the dataset")


def test_wrong_magic(dataset):
    data = bytearray((dataset / "val.idx").read_bytes())
    data[:8] = b"MMIDIDX\0"
    (dataset / "val.idx").write_bytes(bytes(data))
    assert_user_error(run_script(SCRIPT, dataset), "val.idx: wrong magic")


def test_token_id_beyond_vocabulary(dataset):
    tokens = np.fromfile(dataset / "train.bin", dtype=np.uint16)
    tokens[17] = 300  # vocab is 300: ids 0..299
    tokens.tofile(dataset / "train.bin")
    assert_user_error(
        run_script(SCRIPT, dataset), "train.bin: token id 300 at position 17", ">= the vocabulary size 300"
    )


def test_changed_token_inside_vocabulary_breaks_the_content_hash(dataset):
    tokens = np.fromfile(dataset / "train.bin", dtype=np.uint16)
    tokens[5] = (tokens[5] + 1) % 299 + 1
    tokens.tofile(dataset / "train.bin")
    assert_user_error(run_script(SCRIPT, dataset), "train.bin: contents do not match the content hash")


def test_idx_and_bin_from_different_datasets(dataset, tmp_path, tokenizer_dir):
    from dsllm.data.format import TokenFileWriter

    # a same-sized .bin of other documents: the sizes agree, the document ends and the hash do not
    n = np.fromfile(dataset / "train.bin", dtype=np.uint16).size
    writer = TokenFileWriter(tmp_path / "other", 300, b"\0" * 32)
    writer.add_documents(np.full(n, 7, dtype=np.uint16), np.array([n]))
    writer.close()
    shutil.copyfile(tmp_path / "other.bin", dataset / "train.bin")
    assert_user_error(
        run_script(SCRIPT, dataset),
        "train.bin: document 0 does not end with the end-of-text id",
        "do not belong together",
    )
    shutil.copyfile(dataset / "val.bin", dataset / "train.bin")
    assert_user_error(run_script(SCRIPT, dataset), "train.bin", "different datasets")


def test_offsets_damaged(dataset):
    data = bytearray((dataset / "train.idx").read_bytes())
    data[HEADER_SIZE + 8 : HEADER_SIZE + 16] = np.int64(10**9).tobytes()
    (dataset / "train.idx").write_bytes(bytes(data))
    assert_user_error(run_script(SCRIPT, dataset), "train.idx", "the index is damaged")


def test_tokenizer_does_not_match_the_stamped_hash(dataset, corpus_texts):
    save_tokenizer(train_tokenizer(corpus_texts[::-1][:200], 300, show_progress=False), dataset)
    assert_user_error(run_script(SCRIPT, dataset), "made with a different tokenizer", "hash mismatch")


def test_incomplete_or_missing_dataset(dataset, tmp_path):
    (dataset / "meta.json").unlink()
    assert_user_error(run_script(SCRIPT, dataset), "meta.json: missing", "incomplete")
    assert_user_error(run_script(SCRIPT, tmp_path / "nowhere"), "no such dataset folder")
