"""The trainer's view of a model's lm_head: tied weights, bias, logit_scale and softcapping, padded
vocabularies, the backbone behind wrappers, checked against the model's own logits (log-probs and
gradients, relative tolerance by dtype)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpo_kernels.train.output_head import backbone, check_output_head, last_hidden_states, output_head  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _ids(vocab=97):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 9), generator=gen), torch.ones(2, 9, dtype=torch.long)


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
    wrong = dataclasses.replace(output_head(model), logit_scale=2.0)
    with pytest.raises(ValueError, match="transform the trainer does not know"):
        check_output_head(model, wrong, ids, mask)


def test_a_missed_soft_cap_of_30_is_caught_by_the_relative_check():
    """RecurrentGemma's default cap (30) barely bends small logits: an absolute tolerance let it
    through; the log-prob gradients' relative error (~1e-4) does not."""
    from python_tests.helpers.model_zoo import tiny_model

    model = tiny_model("recurrent_gemma")
    head = output_head(model)
    assert head.softcap == 30.0
    ids, mask = _ids(vocab=128)
    check_output_head(model, head, ids, mask)
    with pytest.raises(ValueError, match="gradient w.r.t. the lm_head weight"):
        check_output_head(model, dataclasses.replace(head, softcap=None), ids, mask)


class _SlicedLlama(transformers.LlamaForCausalLM):
    """Scores only the first 90 of its 97 lm_head rows, with no config field saying so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits[..., :90]
        return out


def test_a_vocabulary_sliced_without_a_known_field_is_refused():
    torch.manual_seed(0)
    model = _SlicedLlama(transformers.LlamaConfig(**SMALL))
    ids, mask = _ids(vocab=90)
    with pytest.raises(ValueError, match="90 vocabulary columns, but the trainer scores 97 lm_head rows "
                                         r"\(unpadded_vocab_size=unset\)"):
        check_output_head(model, output_head(model), ids, mask)
    model.config.unpadded_vocab_size = 90  # the field the trainer reads: now it scores the same rows
    head = output_head(model)
    assert head.rows == 90 and head.weight.shape == (90, 32) and head.weight.data_ptr() == head.parameter.data_ptr()
    check_output_head(model, head, ids, mask)


def test_a_decoder_behind_model_is_found():
    """Llama-4's text model: base_model_prefix names an attribute it does not have, and
    get_decoder() returns the model itself; the backbone is its `model` attribute."""
    from python_tests.helpers.model_zoo import tiny_model

    model = tiny_model("llama4_text")
    assert model.base_model is model
    assert backbone(model) is model.model
    ids, mask = _ids(vocab=128)
    check_output_head(model, output_head(model), ids, mask)


def test_no_backbone_is_refused():
    class Bare(torch.nn.Module):
        base_model = property(lambda self: self)

    with pytest.raises(ValueError, match="exposes no backbone"):
        backbone(Bare())
