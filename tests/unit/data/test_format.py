"""The token file format: one module defines it; the writer and the reader agree on every field."""

import numpy as np
import pytest

from dsllm.data.format import (
    HEADER_SIZE,
    MAGIC,
    TokenFile,
    TokenFileError,
    TokenFileWriter,
    dtype_for_vocab,
    paths_for,
    read_header,
)
from dsllm.errors import UserError


def write(prefix, docs, vocab_size=1000, tok_hash=b"\x01" * 32):
    writer = TokenFileWriter(prefix, vocab_size, tok_hash)
    writer.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    return writer.close()


def test_dtype_follows_vocabulary_size():
    assert dtype_for_vocab(50_257) == np.uint16
    assert dtype_for_vocab(65_536) == np.uint16  # ids 0..65535 fit
    assert dtype_for_vocab(65_537) == np.uint32
    assert dtype_for_vocab(128_256) == np.uint32
    with pytest.raises(UserError, match="uint32"):
        dtype_for_vocab(2**32 + 1)


@pytest.mark.parametrize("vocab_size", [1000, 100_000])
def test_round_trip_header_offsets_and_tokens(tmp_path, vocab_size):
    docs = [np.array([5, 6, 0]), np.array([vocab_size - 1, 0]), np.array([7, 8, 9, 10, 0])]
    header = write(tmp_path / "train", docs, vocab_size)
    tf = TokenFile(tmp_path / "train")
    assert tf.header == header == read_header(tmp_path / "train.idx")
    assert (tf.num_documents, tf.num_tokens, tf.vocab_size) == (3, 10, vocab_size)
    assert tf.header.tokenizer_hash == b"\x01" * 32
    assert tf.tokens.dtype == (np.uint16 if vocab_size <= 65536 else np.uint32)
    assert list(tf.offsets) == [0, 3, 5, 10]
    for i, doc in enumerate(docs):
        assert tf.document(i).tolist() == doc.tolist()
    bin_path, idx_path = paths_for(tmp_path / "train")
    assert bin_path.stat().st_size == 10 * tf.tokens.dtype.itemsize
    assert idx_path.stat().st_size == HEADER_SIZE + 8 * 4
    assert idx_path.read_bytes()[:8] == MAGIC


def test_fingerprint_tracks_content_and_tokenizer(tmp_path):
    a = write(tmp_path / "a", [np.array([1, 2, 0])])
    b = write(tmp_path / "b", [np.array([1, 2, 0])])
    c = write(tmp_path / "c", [np.array([1, 3, 0])])
    d = write(tmp_path / "d", [np.array([1, 2, 0])], tok_hash=b"\x02" * 32)
    e = write(tmp_path / "e", [np.array([1]), np.array([2, 0])])  # same tokens, other document boundaries
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint, e.fingerprint}) == 4


def test_reader_refuses_truncated_bin(tmp_path):
    write(tmp_path / "train", [np.arange(1, 50), np.array([0])])
    bin_path = tmp_path / "train.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-4])
    with pytest.raises(TokenFileError, match=r"train\.bin: 96 bytes.*truncated"):
        TokenFile(tmp_path / "train")


def test_reader_refuses_wrong_magic_and_truncated_idx(tmp_path):
    write(tmp_path / "train", [np.array([1, 0])])
    idx = tmp_path / "train.idx"
    good = idx.read_bytes()
    idx.write_bytes(b"NOTMAGIC" + good[8:])
    with pytest.raises(TokenFileError, match="wrong magic"):
        TokenFile(tmp_path / "train")
    idx.write_bytes(good[:-8])
    with pytest.raises(TokenFileError, match="truncated"):
        TokenFile(tmp_path / "train")


def test_reader_refuses_missing_partner(tmp_path):
    write(tmp_path / "train", [np.array([1, 0])])
    (tmp_path / "train.bin").unlink()
    with pytest.raises(TokenFileError, match=r"train\.bin: missing"):
        TokenFile(tmp_path / "train")
    with pytest.raises(TokenFileError, match="no such index"):
        TokenFile(tmp_path / "nothing")


def test_memory_map_reopens_after_pickle(tmp_path):
    import pickle

    write(tmp_path / "train", [np.array([4, 5, 0])])
    tf = TokenFile(tmp_path / "train")
    assert tf.tokens.tolist() == [4, 5, 0]
    clone = pickle.loads(pickle.dumps(tf))  # what a spawned loader worker receives
    assert clone._maps is None and clone.tokens.tolist() == [4, 5, 0]
