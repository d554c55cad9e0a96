"""The reference model's per-sequence log-probs: scored live for each batch, or once for a whole
split and cached on disk (safetensors), keyed by a hash of the reference model, the tokenised pairs
and the settings that change the numbers; a later run with the same key loads the file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from ..linear.linear_sequence_logps import linear_sequence_logps
from ..losses.dpo_from_logps import ld_alpha_weights
from .fingerprint import model_fingerprint, pairs_fingerprint
from .output_head import last_hidden_states, output_head

log = logging.getLogger(__name__)


@torch.no_grad()
def reference_sequence_logps(ref_model, batch: dict, *, loss_options: dict, ignore_index: int,
                             chunk_size: Optional[int], backend: str, autocast) -> torch.Tensor:
    """`[2B]` fp32 log-probs of the batch's rows under `ref_model` (its own lm_head and transforms),
    weighted per token as the policy's are (LD-DPO). No logits are built."""
    head = output_head(ref_model)
    labels = batch["labels"]
    with autocast():
        hidden = last_hidden_states(ref_model, batch["input_ids"], batch["attention_mask"])
        weights = ld_alpha_weights(labels, loss_options, ignore_index=ignore_index, shift=True,
                                   dtype=torch.float32)
        out = linear_sequence_logps(hidden, head.weight, labels, head.bias, ignore_index=ignore_index, shift=True,
                                    token_weights=weights, logit_scale=head.logit_scale, softcap=head.softcap,
                                    chunk_size=chunk_size, backend=backend)
    return out.logps.float()


def precompute_reference_logps(ref_model, pairs, batches: Callable, *, cache_dir: Path, loss_options: dict,
                               ignore_index: int, chunk_size: Optional[int], backend: str, autocast,
                               progress: Callable = lambda iterable, **_: iterable) -> torch.Tensor:
    """`[P, 2]` (chosen, rejected) reference log-probs of `pairs`, in their order. `batches()`
    yields collated batches covering the pairs in order, each with a `pair_index` `[B]`.

    The result is cached as `<cache_dir>/ref_logps-<key>.safetensors`; the key hashes the reference
    model's parameters, the pairs' token ids, `ld_alpha` and `ignore_index`, so a changed model or
    dataset never reuses stale numbers. Files are written atomically (temporary name, then rename).
    """
    from safetensors.torch import load_file, save_file

    key = pairs_fingerprint(pairs, model=model_fingerprint(ref_model), ld_alpha=loss_options.get("ld_alpha"),
                            ignore_index=ignore_index, format=1)
    path = Path(cache_dir) / f"ref_logps-{key}.safetensors"
    if path.exists():
        table = load_file(str(path))["logps"]
        if table.shape != (len(pairs), 2):
            raise ValueError(f"cached reference log-probs {path} hold {tuple(table.shape)}, expected "
                             f"({len(pairs)}, 2); delete the file to recompute")
        log.info("reference log-probs: loaded %s", path)
        return table
    table = torch.full((len(pairs), 2), float("nan"))
    for batch in progress(batches(), desc="reference log-probs"):
        logps = reference_sequence_logps(ref_model, batch, loss_options=loss_options, ignore_index=ignore_index,
                                         chunk_size=chunk_size, backend=backend, autocast=autocast).cpu()
        index = batch["pair_index"].cpu()
        table[index, 0], table[index, 1] = logps.chunk(2)
    if torch.isnan(table).any():
        raise RuntimeError("reference log-probs: some pairs were not scored (the batches did not cover them)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"logps": table}, str(tmp))
    os.replace(tmp, path)
    log.info("reference log-probs: computed %d pairs, cached in %s", len(pairs), path)
    return table
