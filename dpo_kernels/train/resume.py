"""What a resumed run may change, and what it may not.

A resumed run must take the steps the interrupted one would have taken, so every setting that enters
the computation of a step is fixed when the run starts: model, data, tokenisation, loss options,
optimisation, batching, seed. What may change is how long the run goes (`max_steps`, `epochs`), how
it is watched and saved (evaluation, checkpoint and log cadence, the progress bar, plots, the number
of checkpoints kept) and how a step is executed without changing what it computes (device, backend,
vocabulary chunk, gradient checkpointing, eager backward, a precomputed reference, FSDP2): those give
the same losses up to floating-point rounding, not bit for bit.
"""

from __future__ import annotations

from typing import List, Tuple

# `TrainConfig` fields a resumed run may change
CHANGEABLE_SETTINGS = frozenset({
    "output_dir", "ref_cache_dir", "progress_bar", "plots", "log_every", "eval_every", "save_every",
    "keep_checkpoints", "eval_batch_pairs", "max_steps", "epochs", "backend", "chunk_size",
    "gradient_checkpointing", "eager_backward", "precompute_ref_logps", "fsdp2",
})
# `dpo-kernels train` arguments (argparse names) a resumed run may change: the same settings, plus
# the device and the output switches
CHANGEABLE_ARGUMENTS = frozenset(CHANGEABLE_SETTINGS - {"progress_bar", "plots", "eval_batch_pairs"}
                                 | {"device", "no_progress", "no_plots"})


def refused_changes(stored: dict, given: dict, changeable: frozenset) -> List[Tuple[str, object, object]]:
    """(name, stored value, given value) of each setting of `given` that differs from `stored` and
    is not in `changeable`, sorted by name."""
    return [(name, stored.get(name), given[name]) for name in sorted(given)
            if name not in changeable and as_stored(stored.get(name)) != as_stored(given[name])]


def as_stored(value):
    """A setting as JSON stores it (tuples become lists), so that stored and given values compare."""
    if isinstance(value, (list, tuple)):
        return [as_stored(v) for v in value]
    if isinstance(value, dict):
        return {k: as_stored(v) for k, v in value.items()}
    return value
