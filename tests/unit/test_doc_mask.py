"""Document masking (training/doc_mask.py): the logits of a document inside a packed row equal its logits alone,
for every architecture trained here, with eager and sdpa attention; without masking they do not."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from training.doc_mask import Feed, document_positions

EOS = 1
VOCAB = 40


def test_positions_restart_after_every_eos_and_at_every_row() -> None:
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, EOS, 3], [EOS, 4, 4, 4, 4, 4, 4, 4, 4]])
    assert document_positions(ids, EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6, 7]]


def _tiny(kind: str, attention: str) -> Any:
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": VOCAB, "eos_token_id": EOS, "bos_token_id": EOS}
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    else:
        config = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[kind](
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, **common)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_a_packed_document_has_the_logits_it_has_alone(kind: str, attention: str) -> None:
    model = _tiny(kind, attention)
    # Every packed document ends with EOS but a row's last, which the row's end cuts off.
    first, second, third = [5, 6, 7, 8, EOS], [9, 10, 11, 12, 13, 14, EOS], [15, 16, 17]
    row = torch.tensor([first + second + third, second + first + third])
    with torch.no_grad():
        packed = model(**Feed(EOS, True)(row)).logits
        plain = model(**Feed(EOS, False)(row)).logits
        alone = {name: model(input_ids=torch.tensor([doc])).logits[0]
                 for name, doc in (("first", first), ("second", second), ("third", third))}
    spans = {0: {"first": (0, 5), "second": (5, 12), "third": (12, 15)},
             1: {"second": (0, 7), "first": (7, 12), "third": (12, 15)}}
    for b, docs in spans.items():
        for name, (lo, hi) in docs.items():
            torch.testing.assert_close(packed[b, lo:hi], alone[name], rtol=1e-5, atol=1e-5)
    # Without masking a later document attends to the ones before it: the check above could fail.
    assert not torch.allclose(plain[0, 5:12], alone["second"], rtol=1e-3, atol=1e-3)
