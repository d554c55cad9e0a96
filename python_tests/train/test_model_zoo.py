"""The model zoo: tiny random configs of many transformers causal-LM architectures (dense, MoE,
state-space, hybrid, multimodal wrappers; tied and untied; lm_head biases; head transforms at
non-trivial values; a padded vocabulary), each taken the way the trainer takes it. Either the
trainer's log-probs and their gradients match the model's own logits (fp32, relative tolerance
1e-5, by `check_output_head`; and the reference path's sequence log-probs against a log-softmax
of the model's logits), or the model is refused with a message that says why. fp32, not float64:
several models compute in fp32 whatever their weights (Mamba's logits, grouped-GEMM experts)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from python_tests.helpers.model_zoo import VOCAB, tiny_model

from dpo_kernels.train.model_quirks import disable_training_randomness  # noqa: E402
from dpo_kernels.train.output_head import check_output_head, output_head  # noqa: E402
from dpo_kernels.train.reference_logps import reference_sequence_logps  # noqa: E402

MAMBA2 = dict(num_heads=8, head_dim=8, state_size=16, chunk_size=8, n_groups=1, time_step_rank=8)
SSM_HYBRID = dict(mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16, mamba_chunk_size=8)
GEMMA3_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
GEMMA3_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                     patch_size=14)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
INKLING = dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=8)
QWEN3_NEXT = dict(linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
           num_key_value_heads=4, first_k_dense_replace=1, n_group=1, topk_group=1)

# (model_type, config overrides, what the trainer's head carries: transforms read, bias, tied)
ZOO = [
    # dense
    ("llama", dict(tie_word_embeddings=True), dict(tied=True)),
    ("llama", dict(tie_word_embeddings=False), dict(tied=False)),
    ("qwen2", dict(), {}),
    ("gemma", dict(), dict(tied=True)),
    ("gemma2", dict(final_logit_softcapping=0.5), dict(transforms=[("final_logit_softcapping", "softcap", 0.5)])),
    ("phi3", dict(), {}),
    ("phi", dict(), dict(bias=True)),
    ("gpt2", dict(), dict(tied=True)),
    ("gpt_neox", dict(), {}),
    ("gptj", dict(rotary_dim=4), dict(bias=True)),
    ("opt", dict(dropout=0.1, attention_dropout=0.1, layerdrop=0.5), {}),
    ("xglm", dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1), {}),
    ("gpt_bigcode", dict(resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1), {}),
    ("bloom", dict(), {}),
    ("falcon", dict(), {}),
    ("olmo2", dict(), {}),
    ("starcoder2", dict(), {}),
    ("cohere", dict(logit_scale=0.25), dict(transforms=[("logit_scale", "multiply", 0.25)])),
    ("granite", dict(logits_scaling=4.0), dict(transforms=[("logits_scaling", "divide", 4.0)])),
    ("hyperclovax", dict(logits_scaling=0.5), dict(transforms=[("logits_scaling", "multiply", 0.5)])),
    ("nanochat", dict(final_logit_softcapping=0.6), dict(transforms=[("final_logit_softcapping", "softcap", 0.6)])),
    ("inkling_text", dict(vocab_size=VOCAB + 8, unpadded_vocab_size=VOCAB, **INKLING),
     dict(rows=VOCAB, transforms=[("logits_mup_width_multiplier", "divide", 24.0)])),
    # MoE
    ("mixtral", dict(router_jitter_noise=0.1), {}),
    ("qwen2_moe", dict(), {}),
    ("olmoe", dict(), {}),
    ("phimoe", dict(input_jitter_noise=0.1), {}),
    ("gpt_oss", dict(), {}),
    ("deepseek_v3", MLA, {}),
    ("granitemoe", dict(logits_scaling=2.0), dict(transforms=[("logits_scaling", "divide", 2.0)])),
    # state-space and hybrid
    ("mamba", dict(time_step_rank=4, state_size=8), dict(tied=True)),
    ("mamba2", MAMBA2, {}),
    ("rwkv", dict(attention_hidden_size=32, intermediate_size=64), dict(tied=False)),
    ("xlstm", dict(output_logit_soft_cap=0.5, embedding_dim=32, chunk_size=8),
     dict(transforms=[("output_logit_soft_cap", "softcap", 0.5)])),
    ("recurrent_gemma", dict(), dict(transforms=[("logits_soft_cap", "softcap", 30.0)])),  # its default cap
    ("jamba", dict(), {}),
    ("bamba", SSM_HYBRID, {}),
    ("falcon_h1", dict(lm_head_multiplier=0.3, mamba_d_ssm=64, **SSM_HYBRID),
     dict(transforms=[("lm_head_multiplier", "multiply", 0.3)])),
    ("qwen3_next", QWEN3_NEXT, {}),
    # wrapped decoders and multimodal wrappers
    ("llama4_text", dict(), {}),
    ("mllama", dict(text_config=dict(TEXT, cross_attention_layers=[1])), {}),
    ("aria_text", dict(), {}),
    ("gemma3", dict(text_config=GEMMA3_TEXT, vision_config=GEMMA3_VISION, mm_tokens_per_image=4), dict(tied=True)),
]

REFUSED = [
    # BERT-style heads: dense + activation + LayerNorm inside the lm_head module, before the decoder
    ("bert", dict(is_decoder=True), "applies a transform the trainer does not know"),
    # ELECTRA's generator head projects the hidden states to the embedding width first
    ("electra", dict(is_decoder=True, embedding_size=16), "projection the trainer does not know"),
    # Gemma3ForConditionalGeneration ignores its text config's final_logit_softcapping (Gemma3ForCausalLM
    # applies it): the table's cap is then wrong, and the check says so
    ("gemma3", dict(text_config=dict(GEMMA3_TEXT, final_logit_softcapping=0.8), vision_config=GEMMA3_VISION,
                    mm_tokens_per_image=4), "applies a transform the trainer does not know"),
]


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a right-padded row
    return ids, mask


def _own_sequence_logps(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logps = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logps * mask[:, 1:]).sum(-1)


def _zoo_id(entry):
    model_type, overrides, _ = entry
    return model_type + ("-tied" if overrides.get("tie_word_embeddings") else "") + (
        "-capped" if any("cap" in k for k in overrides) else "")


@pytest.mark.parametrize("model_type,overrides,expected", ZOO, ids=[_zoo_id(e) for e in ZOO])
def test_trainer_log_probs_match_the_models_own(model_type, overrides, expected):
    model = tiny_model(model_type, **overrides)
    disable_training_randomness(model)
    head = output_head(model)
    assert head.parameter is model.get_output_embeddings().weight
    assert list(head.transforms) == expected.get("transforms", [])
    assert head.rows == expected.get("rows")
    if "bias" in expected:
        assert (head.bias is not None) == expected["bias"]
    if "tied" in expected:
        assert (head.parameter is model.get_input_embeddings().weight) == expected["tied"]
    ids, mask = _batch()
    check_output_head(model, head, ids, mask)  # log-probs and gradients, fp32: relative 1e-5
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    ours = reference_sequence_logps(model.eval(), batch, loss_options={}, ignore_index=-100, chunk_size=None,
                                    backend="auto", autocast=contextlib.nullcontext)
    torch.testing.assert_close(ours.double(), _own_sequence_logps(model, ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,overrides,message", REFUSED, ids=[e[0] for e in REFUSED])
def test_models_the_trainer_cannot_score_are_refused(model_type, overrides, message):
    model = tiny_model(model_type, **overrides)
    disable_training_randomness(model)
    ids, mask = _batch()
    with pytest.raises(ValueError, match=message) as refused:
        check_output_head(model, output_head(model), ids, mask)
    assert type(model).__name__ in str(refused.value)
