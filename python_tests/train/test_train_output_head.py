"""The trainer's view of a model's lm_head: tied weights, bias, logit_scale and softcapping, checked
against the model's own logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpo_kernels.train.output_head import check_output_head, last_hidden_states, output_head  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _ids():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 97, (2, 9), generator=gen), torch.ones(2, 9, dtype=torch.long)


def _own_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _head_logits(model, ids, mask):
    head = output_head(model)
    with torch.no_grad():
        z = last_hidden_states(model, ids, mask) @ head.weight.T
        if head.bias is not None:
            z = z + head.bias
        z = z * head.logit_scale
        return z if head.softcap is None else torch.tanh(z / head.softcap) * head.softcap


@pytest.mark.parametrize("tied", [True, False])
def test_llama_head_is_the_models_own_parameter(tied):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=tied, **SMALL))
    head = output_head(model)
    assert head.weight is model.lm_head.weight
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert head.bias is None and head.logit_scale == 1.0 and head.softcap is None
    ids, mask = _ids()
    torch.testing.assert_close(_head_logits(model, ids, mask), _own_logits(model, ids, mask), rtol=1e-5, atol=1e-5)
    check_output_head(model, head, ids, mask)


def test_gemma2_final_logit_softcapping():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(final_logit_softcapping=0.5, head_dim=8, **SMALL)
    model = transformers.Gemma2ForCausalLM(config)
    head = output_head(model)
    assert head.softcap == 0.5
    ids, mask = _ids()
    own = _own_logits(model, ids, mask)
    assert own.abs().max() < 0.5 and own.abs().max() > 0.1  # the cap is active
    torch.testing.assert_close(_head_logits(model, ids, mask), own, rtol=1e-5, atol=1e-5)


def test_cohere_logit_scale():
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.25, **SMALL))
    head = output_head(model)
    assert head.logit_scale == 0.25
    ids, mask = _ids()
    torch.testing.assert_close(_head_logits(model, ids, mask), _own_logits(model, ids, mask), rtol=1e-5, atol=1e-5)


def test_unknown_head_transform_is_refused():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    ids, mask = _ids()
    head = output_head(model)
    wrong = type(head)(weight=head.weight, bias=None, logit_scale=2.0, softcap=None)
    with pytest.raises(ValueError, match="transform the trainer does not know"):
        check_output_head(model, wrong, ids, mask)
