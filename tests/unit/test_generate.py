"""generate(): the KV cache changes nothing but speed; sampling options behave; batches pad correctly."""

import pytest
import torch

from dsllm.model import GPT, sample
from dsllm.model_config import ModelConfig

CONFIGS = {
    "learned": dict(vocab_size=61, max_seq_len=48, n_layers=2, d_model=32, n_heads=4),
    "rope_gqa": dict(
        vocab_size=61,
        max_seq_len=48,
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        mlp_multiple_of=16,
        bias=False,
    ),
}


def model_for(kind, seed=0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**CONFIGS[kind])).eval()
    with torch.no_grad():  # sharper than the init, so greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(4)
    return model


@pytest.mark.parametrize("kind", CONFIGS)
def test_cache_gives_the_same_tokens_as_no_cache(kind):
    model = model_for(kind)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]
    cached = model.generate(prompts, 20, temperature=0)
    uncached = model.generate(prompts, 20, temperature=0, use_cache=False)
    assert cached == uncached and all(len(row) == 20 for row in cached)


@pytest.mark.parametrize("kind", CONFIGS)
def test_greedy_matches_argmax_of_a_plain_forward_and_batching_pads_correctly(kind):
    model = model_for(kind)
    prompt = [3, 1, 4, 1, 5]
    tokens = list(prompt)
    for _ in range(10):  # the textbook loop: full forward, argmax of the last position
        logits, _ = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    assert model.generate([prompt], 10, temperature=0)[0] == tokens[len(prompt) :]
    batch = model.generate([[2, 7, 1, 8, 2, 8, 1, 8], prompt], 10, temperature=0)  # prompt is left-padded
    assert batch[1] == tokens[len(prompt) :]


def test_top_k_1_equals_greedy_and_seeds_reproduce():
    model = model_for("rope_gqa")
    prompts = [[1, 2, 3], [4, 5, 6]]
    greedy = model.generate(prompts, 15, temperature=0)
    assert model.generate(prompts, 15, temperature=1.3, top_k=1, seed=123) == greedy
    a = model.generate(prompts, 15, temperature=1.0, seed=7)
    assert model.generate(prompts, 15, temperature=1.0, seed=7) == a
    assert model.generate(prompts, 15, temperature=1.0, seed=8) != a


def test_stops_at_end_of_text():
    model = model_for("learned")
    free = model.generate([[1, 2]], 20, temperature=0)[0]
    eos = free[5]
    stopped = model.generate([[1, 2], [3]], 20, temperature=0, eos_id=eos)
    assert stopped[0] == free[: free.index(eos) + 1]
    assert eos not in stopped[1][:-1] and (stopped[1][-1] == eos or len(stopped[1]) == 20)


def test_sampling_filters():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    top2 = sample(logits, 1.0, 2, None, generator)
    assert set(top2.tolist()) == {2, 3}
    probs = torch.tensor([0.05, 0.1, 0.25, 0.6])
    nucleus = sample(probs.log()[None].repeat(2000, 1), 1.0, None, 0.8, generator)
    assert set(nucleus.tolist()) == {2, 3}  # 0.6 + 0.25 reaches 0.8; 0.1 is not needed
    cold = sample(logits, 0.05, None, None, generator)
    assert (cold == 3).float().mean() > 0.99


def test_too_long_generation_is_refused():
    model = model_for("learned")
    with pytest.raises(Exception, match="longer than model.max_seq_len = 48"):
        model.generate([[1] * 40], 20)


def test_padded_vocabulary_ids_never_come_out():
    model = model_for("learned")
    with torch.no_grad():
        model.lm_head.weight[50:] += 5.0  # make the padding rows the most likely
    free = model.generate([[1, 2]], 30, temperature=1.0, seed=0)[0]
    assert max(free) >= 50
    limited = model.generate([[1, 2]], 30, temperature=1.0, seed=0, vocab_size=50)[0]
    assert max(limited) < 50
