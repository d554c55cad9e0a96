"""`dpo_kernels.integrations.trl` against TRL 1.16's own path: the fused LM head's per-token outputs
and gradients, `DPOTrainer` step losses, logged metrics and gradients, the patch's scope, the
version check, and the ImportError without TRL. Tiny fp32 models on CPU."""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys

import pytest
import torch

HAS_TRL = importlib.util.find_spec("trl") is not None

requires_trl = pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (the integration extra)")

BETA = 0.1
STEPS = 3
BATCH_PAIRS = 2
# fp32 against fp32: both kernels accumulate in fp32 but in different orders
RTOL = 1e-5


def test_import_without_trl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "dpo_kernels.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r'pip install "dpo-kernels\[integration\]"'):
        importlib.import_module("dpo_kernels.integrations.trl")


# ---------------------------------------------------------------------------------------------- fixtures


def _tokenizer():
    from dpo_kernels.train.default_tokenizer import default_tokenizer

    return default_tokenizer()


def _records(n: int = 8, seed: int = 0):
    """Standard-format pairs of short letter strings (prompt and completions of a few characters)."""
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        length = int(torch.randint(lo, hi + 1, (), generator=g))
        return "".join(chr(ord("a") + int(c)) for c in torch.randint(0, 26, (length,), generator=g))

    return [{"prompt": text(2, 6) + "=", "chosen": text(1, 5), "rejected": text(1, 5)} for _ in range(n)]


def _model(kind: str, vocab_size: int):
    """A tiny fp32 causal LM, fixed seed. `kind`: llama-untied, llama-tied, gemma2-softcap (Gemma-2's
    final-logit soft-capping), cohere-logit-scale (Cohere's logit scale)."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if kind.startswith("llama"):
        config = transformers.LlamaConfig(**common, tie_word_embeddings=kind == "llama-tied")
        return transformers.LlamaForCausalLM(config)
    if kind == "gemma2-softcap":
        # softcap 0.5 with logits up to ~1: the tanh is far from linear here
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5)
        return transformers.Gemma2ForCausalLM(config)
    if kind == "cohere-logit-scale":
        config = transformers.CohereConfig(**common, logit_scale=0.5)
        return transformers.CohereForCausalLM(config)
    raise ValueError(kind)


class _Spy:
    """Counts calls through `dk.linear_sequence_logps`, keeping their keyword arguments and the
    number of hidden-state rows each got."""

    def __init__(self, monkeypatch):
        import dpo_kernels as dk

        self.calls = []
        original = dk.linear_sequence_logps

        def spy(hidden, *args, **kwargs):
            self.calls.append({"hidden_rows": hidden.shape[0], **kwargs})
            return original(hidden, *args, **kwargs)

        monkeypatch.setattr(dk, "linear_sequence_logps", spy)


class _TRLKernelSpy:
    """Counts calls of TRL's own `ChunkedLogProbFunction.apply`."""

    def __init__(self, monkeypatch):
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        self.count = 0
        original = ChunkedLogProbFunction.apply

        def counting_apply(*args):
            self.count += 1
            return original(*args)

        monkeypatch.setattr(ChunkedLogProbFunction, "apply", counting_apply)


# ------------------------------------------------------------------------------- the fused LM head alone

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _fused_head_run(model, input_ids, attention_mask, labels):
    """Per-token outputs of one fused-head forward, and the parameter gradients of a loss that
    uses log_probs and entropy."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    fields = {name: getattr(out, name).detach().clone() for name in ALL_OUTPUTS + ("label_mask",)}
    return fields, grads


@requires_trl
@pytest.mark.parametrize("kind", ["llama-untied", "llama-tied", "gemma2-softcap", "cohere-logit-scale"])
def test_fused_head_outputs_and_gradients_match_trl(kind, monkeypatch):
    from trl.trainer.utils import add_fused_lm_head

    from dpo_kernels.integrations import trl as dk_trl

    model = _model(kind, vocab_size=360)
    add_fused_lm_head(model, temperature=0.7, outputs=ALL_OUTPUTS)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 360, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0  # right padding
    with torch.no_grad():  # the model's own top-1 next tokens, so that is_top1 is True somewhere
        top1 = model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
    labels = input_ids.clone()
    labels[:, 1::2] = top1[:, 0:-1:2]
    labels = labels.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # prompt

    trl_spy = _TRLKernelSpy(monkeypatch)
    expected, expected_grads = _fused_head_run(model, input_ids, attention_mask, labels)
    assert trl_spy.count == 1
    spy = _Spy(monkeypatch)
    with dk_trl.dk_log_probs():
        got, got_grads = _fused_head_run(model, input_ids, attention_mask, labels)
    assert trl_spy.count == 1 and len(spy.calls) == 1
    config = model.config
    assert spy.calls[0]["temperature"] == pytest.approx(0.7)
    assert spy.calls[0]["softcap"] == getattr(config, "final_logit_softcapping", None)
    assert spy.calls[0]["logit_scale"] == getattr(config, "logit_scale", 1.0)

    mask = expected["label_mask"]
    assert torch.equal(got["label_mask"], mask)
    assert int(mask.sum()) == 2 * 5 + 2
    assert spy.calls[0]["hidden_rows"] == 12  # only the positions with a label reach our kernel
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=1e-6, msg=name)
        assert torch.all(got[name][~mask] == 0), name
    assert torch.equal(got["is_top1"], expected["is_top1"])
    assert 0 < int(expected["is_top1"].sum()) < int(mask.sum())
    assert expected_grads.keys() == got_grads.keys()
    for name, grad in expected_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(got_grads[name], grad, rtol=RTOL, atol=RTOL * scale, msg=name)


@requires_trl
def test_fused_head_with_no_valid_label_gives_zeros_and_a_backward(monkeypatch):
    from trl.trainer.utils import add_fused_lm_head

    from dpo_kernels.integrations import trl as dk_trl

    model = _model("llama-untied", vocab_size=360)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(3, 360, (2, 5), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(input_ids, -100)
    spy = _Spy(monkeypatch)
    with dk_trl.dk_log_probs():
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert len(spy.calls) == 1
    assert torch.equal(out.log_probs, torch.zeros(2, 4)) and torch.equal(out.entropy, torch.zeros(2, 4))
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and torch.all(model.lm_head.weight.grad == 0)


# -------------------------------------------------------------------------------- DPOTrainer, end to end

LOGGED_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                  "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
                  "num_tokens", "grad_norm")
DISCRETE_METRICS = ("rewards/accuracies", "mean_token_accuracy", "num_tokens")


def _trained(kind, loss_type, use_dk, tmp_path, **config_overrides):
    from python_tests.helpers.trl_training import make_dpo_trainer

    tokenizer = _tokenizer()
    trainer = make_dpo_trainer(_model(kind, len(tokenizer)), tokenizer, _records(), steps=STEPS,
                               batch_pairs=BATCH_PAIRS, lr=1e-2, beta=BETA, loss_type=loss_type, seed=0,
                               output_dir=str(tmp_path / ("dk" if use_dk else "trl")), use_dk=use_dk,
                               **config_overrides)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    return trainer.step_losses, logs


def _assert_metric_close(name, got, expected, step_logs):
    if name in DISCRETE_METRICS:
        assert got == expected, name
        return
    if name.startswith("rewards/"):
        # beta * (policy - reference) log-probs: a difference of sums of size |logps|, rounded in fp32
        scale = BETA * max(abs(step_logs["logps/chosen"]), abs(step_logs["logps/rejected"]))
    elif name.startswith("logits/"):
        # a mean over the vocabulary of logits up to ~1 in size, whose mean is near 0: its rounding
        # follows the size of the logits, not of their mean
        scale = 1e-1
    else:
        scale = 0.0
    assert abs(got - expected) <= RTOL * max(abs(expected), scale), (name, got, expected)


@requires_trl
@pytest.mark.parametrize("kind, loss_type, overrides", [
    ("llama-untied", "sigmoid", {}),
    ("llama-tied", "ipo", {}),
    ("gemma2-softcap", ["sigmoid", "sft"], {}),
    # reference log-probs computed up front (compute_ref_log_probs), WPO weights (log_sum_sq_probs)
    ("llama-untied", "sigmoid", {"precompute_ref_log_probs": True, "use_weighting": True}),
], ids=["llama-untied-sigmoid", "llama-tied-ipo", "gemma2-softcap-sigmoid+sft", "precomputed-ref-wpo"])
def test_dpo_trainer_matches_trl_step_by_step(kind, loss_type, overrides, tmp_path, monkeypatch):
    trl_spy = _TRLKernelSpy(monkeypatch)
    expected_losses, expected_logs = _trained(kind, loss_type, False, tmp_path, **overrides)
    trl_calls = trl_spy.count
    # policy and reference each step, or the policy each step and the reference once per batch of the data
    precomputed = overrides.get("precompute_ref_log_probs", False)
    assert trl_calls == (STEPS + len(_records()) // BATCH_PAIRS if precomputed else 2 * STEPS)
    spy = _Spy(monkeypatch)
    losses, logs = _trained(kind, loss_type, True, tmp_path, **overrides)
    assert len(spy.calls) == trl_calls and trl_spy.count == trl_calls  # ours ran each time, TRL's not once
    assert all(call["softcap"] == (0.5 if kind == "gemma2-softcap" else None) for call in spy.calls)

    assert len(losses) == len(expected_losses) == STEPS
    assert losses[0] != losses[1]  # the model trains: the steps are not all the same number
    for step, (got, expected) in enumerate(zip(losses, expected_losses)):
        assert got == pytest.approx(expected, rel=RTOL), f"step {step}: {got} vs {expected}"
    assert len(logs) == len(expected_logs) == STEPS
    for got_step, expected_step in zip(logs, expected_logs):
        for name in LOGGED_METRICS:
            _assert_metric_close(name, got_step[name], expected_step[name], expected_step)
    # the metrics compared are not trivially equal: the policy moved away from the reference
    assert expected_logs[-1]["rewards/margins"] != 0.0


@requires_trl
def test_dpo_trainer_gradients_match_trl(tmp_path, monkeypatch):
    import dpo_kernels.linear.linear_token_logps as linear_token_logps
    from python_tests.helpers.trl_training import make_dpo_trainer

    backward_calls = []
    original_backward = linear_token_logps.backward_chunks

    def counting_backward(*args, **kwargs):
        backward_calls.append(1)
        return original_backward(*args, **kwargs)

    monkeypatch.setattr(linear_token_logps, "backward_chunks", counting_backward)
    tokenizer = _tokenizer()
    model = _model("llama-untied", len(tokenizer))
    grads = {}
    for use_dk in (False, True):
        trainer = make_dpo_trainer(model, tokenizer, _records(), steps=1, batch_pairs=4, lr=1e-2, beta=BETA,
                                   loss_type="sigmoid", seed=0, output_dir=str(tmp_path / str(use_dk)), use_dk=use_dk)
        # at step 0 policy == reference, yet the sigmoid loss's gradient is not zero:
        # beta / 2 * (grad log pi(chosen) - grad log pi(rejected))
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        policy = trainer.model
        policy.zero_grad(set_to_none=True)
        trainer.compute_loss(policy, batch).backward()
        grads[use_dk] = {name: p.grad.clone() for name, p in policy.named_parameters()}
    assert len(backward_calls) == 1  # the policy's log-probs went through our backward (the reference's need none)
    assert grads[False].keys() == grads[True].keys()
    for name, expected in grads[False].items():
        scale = expected.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[True][name], expected, rtol=RTOL, atol=RTOL * scale, msg=name)


# ------------------------------------------------------------------------------ scope, version, options


@requires_trl
def test_patch_scope_and_restore():
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from dpo_kernels.integrations import trl as dk_trl

    original_use_triton = trl_utils._use_triton
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction and not dk_trl.is_trl_patched()
    try:
        installed = dk_trl.patch_trl(chunk_size=64)
        assert trl_utils._ChunkedLogProbFunction is installed and dk_trl.is_trl_patched()
        assert installed.chunk_size == 64 and trl_utils._use_triton(torch.device("cpu"))
        with dk_trl.dk_log_probs(backend="cpu") as inner:
            assert trl_utils._ChunkedLogProbFunction is inner
        assert trl_utils._ChunkedLogProbFunction is installed  # the context restores the outer patch
    finally:
        dk_trl.unpatch_trl()
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert trl_utils._use_triton is original_use_triton and not dk_trl.is_trl_patched()


@requires_trl
def test_dpo_trainer_swaps_only_while_it_computes(tmp_path, monkeypatch):
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from python_tests.helpers.trl_training import make_dpo_trainer

    tokenizer = _tokenizer()
    trainer = make_dpo_trainer(_model("llama-untied", len(tokenizer)), tokenizer, _records(4), steps=1,
                               batch_pairs=2, lr=1e-2, beta=BETA, loss_type="sigmoid", seed=0,
                               output_dir=str(tmp_path), use_dk=True)
    seen = []
    original = trainer.dk_function.apply
    monkeypatch.setattr(trainer.dk_function, "apply",
                        lambda *args: seen.append(trl_utils._ChunkedLogProbFunction) or original(*args))
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    trainer.compute_loss(trainer.model, batch)
    assert seen == [trainer.dk_function] * 3  # reference (precompute path), policy, reference
    assert ref_chosen.shape == ref_rejected.shape == (2,) and torch.isfinite(ref_chosen).all()
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction  # restored afterwards


@requires_trl
@pytest.mark.parametrize("installed", ["1.17.0", "1.15.2", "2.0.0.dev0", "unknown"])
def test_other_trl_versions_are_refused_before_any_work(installed, monkeypatch):
    import trl
    import trl.trainer.utils as trl_utils

    from dpo_kernels.integrations import trl as dk_trl

    monkeypatch.setattr(trl, "__version__", installed)
    before = trl_utils._ChunkedLogProbFunction
    model = _model("llama-untied", 360)
    with pytest.raises(RuntimeError, match=rf"supports trl 1\.16\.x, found trl {re.escape(installed)}"):
        dk_trl.patch_trl()
    with pytest.raises(RuntimeError, match=r"1\.16"):
        with dk_trl.dk_log_probs():
            pass
    with pytest.raises(RuntimeError, match=r"1\.16"):
        dk_trl.DPOTrainer(model=model, train_dataset=None)
    assert trl_utils._ChunkedLogProbFunction is before
    assert "forward" not in vars(model)  # TRL's __init__ never ran: no fused head was added


@requires_trl
def test_bad_kernel_options_are_refused_before_any_work():
    from dpo_kernels.integrations import trl as dk_trl

    model = _model("llama-untied", 360)
    with pytest.raises(ValueError, match="dk_backend must be one of"):
        dk_trl.DPOTrainer(model=model, train_dataset=None, dk_backend="gpu")
    with pytest.raises(ValueError, match="chunk_size"):
        dk_trl.patch_trl(chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        dk_trl.LinearLogpsFunction(chunk_size=1.5)
    assert not dk_trl.is_trl_patched() and "forward" not in vars(model)


@requires_trl
def test_mixed_dtype_head_outside_autocast_matches_trl():
    """TRL's `cast_lm_head_to_fp32=True` path (GRPO/RLOO): fp32 hidden states, bf16 weight, no autocast."""
    import trl.trainer.utils as trl_utils

    from dpo_kernels.integrations import trl as dk_trl

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16, generator=g)).bfloat16().requires_grad_()
    targets = torch.randint(0, 50, (7,), generator=g)
    args = (1.0, 32768, None, 1.0, ("log_probs", "entropy"))
    results = []
    for function in (trl_utils._ChunkedLogProbFunction, dk_trl.LinearLogpsFunction()):
        hidden.grad = weight.grad = None
        log_probs, entropy, *_ = function.apply(hidden, weight, None, targets, *args)
        log_probs.sum().backward()
        results.append((log_probs.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()))
    for name, got, expected in zip(("log_probs", "entropy", "hidden.grad"), results[1][:3], results[0][:3]):
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=1e-6, msg=name)
    # the weight gradient is rounded to bf16 (the weight's dtype) by both: one bf16 ulp apart at most
    torch.testing.assert_close(results[1][3].float(), results[0][3].float(), rtol=2**-8, atol=0)
    assert math.isfinite(results[1][0].sum().item())
