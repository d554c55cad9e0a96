"""FSDP2 for the trainer: the policy sharded with `fully_shard`, and its full state dicts for
checkpoints and `save_pretrained`.

Units: each decoder layer, then the whole model as the root unit (embeddings, final norm and the
lm_head, tied or not: FSDP2 keeps a tied weight one parameter only when both its modules are in
one unit). The trainer runs the root's forward with no position kept for the logits
(`logits_to_keep` empty: the lm_head projects `[2B, 0, H]`), so FSDP2's hooks gather and later
reduce every parameter, and takes the backbone's output with a forward hook. The root is not
resharded after its forward, so the lm_head weight read next is the unsharded parameter; the
linear path's gradient for it joins the embedding's, and FSDP2 reduce-scatters both (averaged
over ranks).
"""

from __future__ import annotations

import torch

from .output_head import backbone, hidden_states_from_root


def decoder_layers(model) -> list:
    """The repeated blocks of the backbone: its first non-empty `nn.ModuleList`."""
    for module in backbone(model).modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ValueError(f"model {type(model).__name__}: no decoder layers (nn.ModuleList) found to shard with FSDP2")


def shard_model(model) -> None:
    """`fully_shard` the policy in place over the default process group (every rank must hold the
    same weights first)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)


def sharded_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[rows, T, H]` last hidden states of a sharded model, through its root forward (FSDP2's hooks
    run) with no logits computed; afterwards `output_head(model)` holds unsharded parameters."""
    return hidden_states_from_root(model, input_ids, attention_mask)[0]


def full_model_state(model, sharded: bool) -> dict:
    """The full state dict (on CPU when sharded; collective then, on every rank; full on rank 0)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_states(model, optimizer, model_state: dict, optimizer_state: dict, sharded: bool) -> None:
    """Load full state dicts (every rank passes the whole dicts; FSDP2 keeps its shard)."""
    if not sharded:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
