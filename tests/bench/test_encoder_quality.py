"""bench/encoder_quality.py: sentence selection and masked mean pooling (the figure's parts)."""

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
encoder_quality = pytest.importorskip("encoder_quality")


def test_sentences_are_evenly_spaced_and_of_sentence_length():
    words = [f"w{i}" for i in range(400)]
    text = " ".join(" ".join(words[i:i + n]) + "." for i, n in
                    zip(range(0, 400, 10), [3, 8, 70, 12] * 10))
    got = encoder_quality.sentences(text, 5)
    assert len(got) == 5 and all(6 <= len(s.split()) <= 60 for s in got)
    kept = [s for s in (" ".join(words[i:i + n]) + "." for i, n in
                        zip(range(0, 400, 10), [3, 8, 70, 12] * 10)) if 6 <= len(s.split()) <= 60]
    assert got[0] == kept[0] and got[-1] == kept[-1]
    with pytest.raises(ValueError, match=f"only {len(kept)} sentences"):
        encoder_quality.sentences(text, len(kept) + 1)


def test_embedding_of_a_padded_batch_equals_each_sentence_alone():
    """Mean pooling over the attention mask: padding changes no sentence's embedding."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=32)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    a, b = torch.randint(3, 50, (1, 9)), torch.randint(3, 50, (1, 4))
    padded = {"input_ids": torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)],
                                                   1)]),
              "attention_mask": torch.tensor([[1] * 9, [1] * 4 + [0] * 5])}
    both = encoder_quality.embed(model, [padded])
    alone = encoder_quality.embed(model, [{"input_ids": x, "attention_mask": torch.ones_like(x)}
                                          for x in (a, b)])
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-6)
    assert torch.allclose(both.norm(dim=-1), torch.ones(2))
