"""--document-mask: inside a window of packed documents (each starting with <|endoftext|>), every document's logits
are those of the document run alone, for RoPE and learned positions; without the mask they are not. Fine-tuning's
packed rows use the same mask (`dsllm.data.documents.segment_mask`)."""

import pytest
import torch

from dsllm.data.documents import document_layout, segment_mask
from dsllm.model import GPT
from dsllm.model_config import resolve_model_config

EOT = 0
SMALL = {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, "mlp_multiple_of": 32}


def documents(generator):
    """Three documents of 7, 12 and 5 tokens, each starting with <|endoftext|>, after a 4-token tail of an earlier
    one (a window starts anywhere)."""
    parts = [torch.randint(1, 64, (4,), generator=generator)]
    for length in (7, 12, 5):
        parts.append(torch.cat([torch.tensor([EOT]), torch.randint(1, 64, (length - 1,), generator=generator)]))
    return parts


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_a_packed_window_scores_each_document_as_if_alone(positions):
    model = GPT(resolve_model_config("tiny", {**SMALL, "positions": positions}), seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    parts = [documents(generator) for _ in range(2)]
    window = torch.stack([torch.cat(p) for p in parts])  # [2, 28]
    with torch.no_grad():
        packed = model(window, **document_layout(window, EOT))[0]
        plain = model(window)[0]
        for row, pieces in enumerate(parts):
            start = 0
            for piece in pieces:
                alone = model(piece[None])[0][0]
                assert torch.allclose(packed[row, start : start + len(piece)], alone, atol=1e-5)
                start += len(piece)
    assert not torch.allclose(packed, plain, atol=1e-3)  # the mask matters


def test_layout_positions_and_mask():
    idx = torch.tensor([[5, 6, EOT, 7, 8, EOT, 9]])
    layout = document_layout(idx, EOT)
    assert layout["positions"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    mask = layout["mask"][0, 0]
    assert mask[4].tolist() == [False, False, True, True, True, False, False]  # its own document, causally
    assert mask[1].tolist() == [True, True, False, False, False, False, False]
    padded = segment_mask(torch.tensor([[0, 0, 1, -1]]))[0, 0]
    assert padded[3].tolist() == [False, False, False, True]  # padding sees only itself
