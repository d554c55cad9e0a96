"""lm_head weights sharded by a data-parallel wrapper, passed straight to the linear path.

FSDP2 (`fully_shard`, gloo, CPU, 2 and 4 ranks, a different batch per rank): with the lm_head its
own FSDP unit (its parameters are Shard(0) DTensors outside its forward, which never runs) or inside
the root unit, every gradient equals the unsharded run on the union of the batches (the mean of
the ranks' losses) and comes back in the parameters' DTensor layout. DeepSpeed ZeRO-3 is not
installed: its branch is checked against a stand-in `deepspeed` module with the same interface
(GatheredParameters, ZeroParamStatus), which shows the wiring, not DeepSpeed's behaviour."""

from __future__ import annotations

import copy
import enum
import sys
import types

import pytest
import torch

import dpo_kernels as dk
from python_tests.helpers.distributed import requires_gloo, run_ranks

H_IN, H, V = 5, 8, 11  # V = 11: FSDP2 pads the uneven Shard(0) of the lm_head


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(H_IN, H)
        self.lm_head = torch.nn.Linear(H, V)

    def forward(self, x):  # the hidden states; the lm_head is applied by dk, outside any forward
        return torch.tanh(self.body(x))


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3, 4, H_IN, generator=g)
    labels = torch.randint(0, V, (3, 4), generator=g)
    labels[:, 0] = -100
    return x, labels


def _loss(model, x, labels):
    out = dk.linear_sequence_logps(model(x), model.lm_head.weight, labels, model.lm_head.bias,
                                   extras=("entropy",), chunk_size=4, backend="cpu")
    return -out.logps.mean() + 0.1 * out.entropy.sum()


def _check_fsdp2(rank, world, lm_head_unit):
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
    from torch.distributed.tensor import DTensor, Shard  # noqa: PLC0415

    torch.manual_seed(0)
    model = TinyLM()
    unsharded = copy.deepcopy(model)
    losses = [_loss(unsharded, *_batch(r)) for r in range(world)]
    names = [n for n, _ in unsharded.named_parameters()]
    want = dict(zip(names, torch.autograd.grad(sum(losses) / world, list(unsharded.parameters()))))

    mesh = init_device_mesh("cpu", (world,))
    if lm_head_unit:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = _loss(model, *_batch(rank))
    if lm_head_unit:
        assert isinstance(model.lm_head.weight, DTensor)  # the case this module gathers
    assert abs(float(loss) - float(losses[rank])) <= 1e-5 * max(1.0, abs(float(losses[rank])))
    loss.backward()
    for name, param in model.named_parameters():
        grad = param.grad
        assert isinstance(grad, DTensor) and grad.placements == (Shard(0),), (name, type(grad))
        full = grad.full_tensor()
        err = float((full - want[name]).abs().max())
        assert err <= 1e-5 * max(1.0, float(want[name].abs().max())), (name, err)
    with pytest.raises(TypeError, match="DTensor while process_group"):
        dk.linear_sequence_logps(torch.randn(2, 3, H), model.lm_head.weight, torch.zeros(2, 3, dtype=torch.int64),
                                 process_group=dist.group.WORLD)


@requires_gloo
@pytest.mark.parametrize("world_size,lm_head_unit", [(2, True), (4, True), (2, False)],
                         ids=["2-lm_head-own-unit", "4-lm_head-own-unit", "2-lm_head-in-root"])
def test_fsdp2_gradients_equal_the_unsharded_run(world_size, lm_head_unit, tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401, PLC0415
    except ImportError:
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    run_ranks(_check_fsdp2, world_size, tmp_path, lm_head_unit)


# --- DeepSpeed ZeRO-3, through a stand-in module ------------------------------------------------


class _Status(enum.Enum):
    AVAILABLE = 1
    NOT_AVAILABLE = 2


class _Gathered:
    """The stand-in of deepspeed.zero.GatheredParameters: the full data in `param.data` inside,
    an empty tensor outside (what ZeRO-3 leaves in a partitioned parameter)."""

    entered = 0

    def __init__(self, params, modifier_rank=None):
        self.params = list(params)

    def __enter__(self):
        _Gathered.entered += 1
        for p in self.params:
            p.data = p.ds_full
            p.ds_status = _Status.AVAILABLE

    def __exit__(self, *exc):
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype)
            p.ds_status = _Status.NOT_AVAILABLE


@pytest.fixture
def fake_deepspeed(monkeypatch):
    root = types.ModuleType("deepspeed")
    root.zero = types.SimpleNamespace(GatheredParameters=_Gathered)
    partition = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    partition.ZeroParamStatus = _Status
    for name, module in (("deepspeed", root), ("deepspeed.runtime", types.ModuleType("deepspeed.runtime")),
                         ("deepspeed.runtime.zero", types.ModuleType("deepspeed.runtime.zero")),
                         ("deepspeed.runtime.zero.partition_parameters", partition)):
        monkeypatch.setitem(sys.modules, name, module)
    _Gathered.entered = 0
    return _Gathered


def _partitioned(full: torch.Tensor, requires_grad: bool) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty(0, dtype=full.dtype), requires_grad=requires_grad)
    p.ds_id, p.ds_status, p.ds_full = 7, _Status.NOT_AVAILABLE, full
    return p


def test_zero3_partitioned_weight_is_gathered_for_the_call(fake_deepspeed):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 4, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    labels = torch.randint(0, V, (2, 4), generator=g)
    want = dk.linear_sequence_logps(hidden, weight, labels, bias, extras=("entropy",), backend="cpu")
    w, b = _partitioned(weight, requires_grad=False), _partitioned(bias, requires_grad=False)
    got = dk.linear_sequence_logps(hidden, w, labels, b, extras=("entropy",), backend="cpu")
    assert fake_deepspeed.entered == 1
    assert torch.equal(got.logps, want.logps) and torch.equal(got.entropy, want.entropy)
    assert w.numel() == 0 and w.ds_status is _Status.NOT_AVAILABLE  # partitioned again afterwards
    # a trainable head under no_grad (a reference pass) is gathered too
    w = _partitioned(weight, requires_grad=True)
    with torch.no_grad():
        got = dk.linear_sequence_logps(hidden, w, labels, bias, backend="cpu")
    assert torch.allclose(got.logps, dk.linear_sequence_logps(hidden, weight, labels, bias, backend="cpu").logps)


def test_zero3_partitioned_weight_that_needs_a_gradient_is_refused(fake_deepspeed):
    hidden, labels = torch.randn(2, 4, H), torch.randint(0, V, (2, 4))
    w = _partitioned(torch.randn(V, H), requires_grad=True)
    with pytest.raises(ValueError, match="ZeRO-3 parameter that requires grad"):
        dk.linear_sequence_logps(hidden, w, labels, backend="cpu")
    assert fake_deepspeed.entered == 0


def test_zero3_available_weight_is_used_as_it_is(fake_deepspeed):
    """Inside the lm_head's forward ZeRO-3 has gathered the parameter already: nothing to do, and the
    gradient flows to it as to a plain parameter (ZeRO-3's hooks take it from there)."""
    weight = torch.randn(V, H)
    w = torch.nn.Parameter(weight.clone())
    w.ds_id, w.ds_status = 7, _Status.AVAILABLE
    hidden, labels = torch.randn(2, 4, H), torch.randint(0, V, (2, 4))
    dk.linear_sequence_logps(hidden, w, labels, backend="cpu").logps.sum().backward()
    assert fake_deepspeed.entered == 0 and w.grad is not None and w.grad.shape == (V, H)
