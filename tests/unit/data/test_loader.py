"""Training reads: windows from the memory map, and a sample order that survives any world size,
worker count and resume."""

import itertools

import numpy as np
import pytest
import torch

from dsllm.data.format import TokenFile
from dsllm.data.loader import ResumableLoader, TokenWindows
from dsllm.data.sampler import DataFingerprintError, WindowOrder, WindowSampler

SEQ = 16


@pytest.fixture
def windows(dataset_dir):
    return TokenWindows(dataset_dir / "train", SEQ)


def test_windows_are_seq_len_plus_one_slices_of_the_stream(windows):
    tokens = np.asarray(windows.file.tokens)
    assert len(windows) == (tokens.size - 1) // SEQ
    for i in (0, 1, len(windows) - 1):
        w = windows[i]
        assert w.dtype == torch.int64 and w.shape == (SEQ + 1,)
        assert w.tolist() == tokens[i * SEQ : i * SEQ + SEQ + 1].tolist()
    assert windows[1][0] == windows[0][-1]  # consecutive windows share the boundary token (input/target shift)
    with pytest.raises(IndexError):
        windows[len(windows)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_each_epoch_is_a_permutation(n):
    order = WindowOrder(n, "ab" * 16, SEQ, seed=1)
    first = [order.window(i) for i in range(n)]
    second = [order.window(i) for i in range(n, 2 * n)]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    if n >= 64:
        assert first != second and first != list(range(n))  # reshuffled each epoch, and shuffled at all


def test_order_is_a_pure_function_of_seed_fingerprint_seq_len_and_index():
    def take(order, count=50):
        return [order.window(i) for i in range(count)]

    base = take(WindowOrder(500, "f" * 32, SEQ, seed=7))
    assert take(WindowOrder(500, "f" * 32, SEQ, seed=7)) == base
    assert [WindowOrder(500, "f" * 32, SEQ, seed=7).window(i) for i in range(49, -1, -1)] == base[::-1]
    assert take(WindowOrder(500, "f" * 32, SEQ, seed=8)) != base
    assert take(WindowOrder(500, "e" * 32, SEQ, seed=7)) != base
    assert take(WindowOrder(500, "f" * 32, SEQ + 1, seed=7)) != base


def test_the_order_of_existing_runs_never_changes():
    """Values of the keyed permutation as every run so far has read it (a resumed run must read the same): the
    numpy rounds over a chunk of samples give what the first implementation, one sample at a time, gave."""
    expected = {
        (7, "ab" * 16, 16, 1): [0, 3, 4, 1, 5, 2, 3, 3],
        (257, "e" * 32, 64, 3): [82, 256, 120, 48, 1, 33, 199, 94],
        (1000, "f" * 32, 1024, 1234): [359, 326, 309, 788, 438, 614, 827, 485],
        (4099, "0123456789abcdef" * 2, 64, 7): [1083, 3303, 396, 3393, 1766, 1827, 2049, 3186],
    }
    for (n, fingerprint, seq_len, seed), windows in expected.items():
        order = WindowOrder(n, fingerprint, seq_len, seed)
        at = [0, 1, 2, 3, n - 1, n, n + 5, 3 * n + 2]
        assert order.windows(np.array(at)).tolist() == windows and [order.window(i) for i in at] == windows


def steps(world_size, micro_batch, accumulation, step_count, windows, num_workers=0):
    """The set of windows each optimizer step sees, gathered over all ranks and micro-batches."""
    loaders = [
        iter(ResumableLoader(windows, micro_batch, seed=3, rank=r, world_size=world_size, num_workers=num_workers))
        for r in range(world_size)
    ]
    per_step = []
    for _ in range(step_count):
        seen = []
        for loader in loaders:
            for _ in range(accumulation):
                seen += [tuple(row.tolist()) for row in next(loader)]
        per_step.append(sorted(seen))
    return per_step


def test_global_batches_do_not_depend_on_world_size(windows):
    global_batch = 8
    reference = steps(1, 8, 1, 6, windows)
    assert steps(2, 4, 1, 6, windows) == reference
    assert steps(4, 1, 2, 6, windows) == reference
    assert steps(2, 2, 2, 6, windows) == reference
    assert len(reference[0]) == global_batch and len(set(reference[0])) == global_batch


def test_loader_workers_do_not_change_the_batches(windows):
    loader = ResumableLoader(windows, 4, seed=3, num_workers=2)
    with_workers = [b for b in itertools.islice(iter(loader), 10)]
    without = [b for b in itertools.islice(iter(ResumableLoader(windows, 4, seed=3)), 10)]
    assert all(torch.equal(a, b) for a, b in zip(with_workers, without))
    assert loader.consumed_samples == 40


def test_resume_continues_exactly_even_on_another_world_size(windows):
    uninterrupted = steps(1, 4, 1, 10, windows)
    first = ResumableLoader(windows, 2, seed=3, rank=0, world_size=2)
    second = ResumableLoader(windows, 2, seed=3, rank=1, world_size=2)
    for _ in zip(range(4), first, second):  # four steps on two ranks
        pass
    state = first.state_dict()
    assert state["consumed_samples"] == second.consumed_samples == 16
    resumed = ResumableLoader(windows, 4, seed=3, num_workers=2)  # one rank now, with loader workers
    resumed.load_state_dict(state)
    got = [sorted(tuple(r.tolist()) for r in batch) for _, batch in zip(range(6), resumed)]
    assert got == uninterrupted[4:]


def test_resume_on_changed_data_is_a_loud_error(windows, dataset_dir):
    state = ResumableLoader(windows, 4, seed=3).state_dict()
    other = ResumableLoader(TokenWindows(dataset_dir / "val", SEQ), 4, seed=3)
    with pytest.raises(DataFingerprintError, match="trained on dataset .* but --data is"):
        other.load_state_dict(state)
    with pytest.raises(DataFingerprintError, match="seq_len 16"):
        ResumableLoader(TokenWindows(dataset_dir / "train", SEQ * 2), 4, seed=3).load_state_dict(state)


def test_memory_map_survives_fork_after_use(dataset_dir):
    tf = TokenFile(dataset_dir / "train")
    parent_view = tf.tokens[:5].tolist()  # opened in the parent before the loader forks
    loader = torch.utils.data.DataLoader(
        TokenWindows(tf, SEQ), batch_size=2, num_workers=2, multiprocessing_context="fork"
    )
    batch = next(iter(loader))
    assert batch[0, :5].tolist() == parent_view


def test_sampler_refuses_bad_rank():
    with pytest.raises(ValueError):
        WindowSampler(WindowOrder(10, "a" * 32, SEQ, 0), rank=2, world_size=2)


def test_no_full_window_is_a_user_error():
    with pytest.raises(Exception, match="no full window of 17 tokens"):
        WindowOrder(0, "a" * 32, SEQ, 0)
