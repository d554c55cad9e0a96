"""Gathers what the two calls of benchmarks/gpu_run.sh left into the files to commit.

    python benchmarks/gpu_session_results.py RUN_A RUN_B --name h200-2026-12-03
    python benchmarks/report.py benchmarks/results/h200-2026-12-03.json      # the tables and plots

RUN_A and RUN_B are the unpacked bundles (`gpu-run-a.tar.gz`, `gpu-run-b.tar.gz`; either may be
missing when a call did not run). Writes, in `--out-dir` (default benchmarks/results), never over an
existing file:

- `NAME.json`: the pytest-benchmark JSON of both calls merged (the machine info of the first, the rows
  of all: benchmarks/report.py reads it as it reads one run's), plus `ceilings` (benchmarks/ceilings.py),
  `end_to_end` (benchmarks/end_to_end_dpo_step.py) and `steps` (each call's summary);
- `NAME-session.md`: versions, the measured ceilings, the end-to-end DPO step of both trainers and the
  steps of both calls with their limits and results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"gpu_session_results: cannot read {path}: {exc}") from None


def gather(run_dirs) -> dict:
    """The merged results of the unpacked bundles in `run_dirs` (in order)."""
    merged = {"machine_info": None, "benchmarks": [], "sources": [], "ceilings": None, "end_to_end": None,
              "steps": {}}
    for run_dir in run_dirs:
        for path in sorted(run_dir.glob("*.json")):
            data = _load(path)
            if "benchmarks" in data:  # a pytest-benchmark file
                merged["machine_info"] = merged["machine_info"] or data.get("machine_info")
                merged["datetime"] = merged.get("datetime") or data.get("datetime")
                merged["benchmarks"].extend(data["benchmarks"])
                merged["sources"].append(f"{run_dir.name}/{path.name}")
            elif path.name == "ceilings.json":
                merged["ceilings"] = data
            elif path.name == "end-to-end-dpo-step.json":
                merged["end_to_end"] = data
        summary = run_dir / "summary.txt"
        if summary.is_file():
            merged["steps"][run_dir.name] = summary.read_text()
    return merged


def _gib(value) -> str:
    return "" if value is None else f"{value:.1f}"


def session_markdown(merged: dict, name: str) -> str:
    lines = [f"# GPU session {name}", ""]
    bench = (merged.get("machine_info") or {}).get("dpo_bench", {})
    e2e = merged.get("end_to_end") or {}
    versions = {**e2e.get("environment", {}).get("versions", {}), **bench.get("versions", {})}
    gpu = bench.get("gpu_name") or e2e.get("environment", {}).get("gpu_name") or "?"
    lines.append(f"- GPU: {gpu}, driver {bench.get('gpu_driver') or '?'}, "
                 f"CUDA of torch {bench.get('torch_cuda') or '?'}")
    lines.append("- Versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in sorted(versions.items())))
    ceilings = merged.get("ceilings")
    if ceilings:
        lines.append(f"- Ceilings: copy {ceilings['copy_bandwidth_gbs']:.0f} GB/s (read + write, "
                     f"{ceilings['copy_bytes'] / 2**30:.2f} GiB), bf16 matmul {ceilings['bf16_matmul_tflops']:.0f} "
                     f"TFLOP/s (n = {ceilings['matmul_size']}, random data)")
    if e2e.get("trainers"):
        s = e2e["settings"]
        lines += ["", f"## End-to-end DPO step ({e2e.get('parameters', 0) / 1e9:.2f} B parameters, {s['dtype']}, "
                  f"{s['pairs']} pairs x 2 rows, hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']})", "",
                  "| trainer | seq len | median step (s) | tokens/s | peak memory (GiB) | longest seq len that fits |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for trainer, result in e2e["trainers"].items():
            at = result["at_seq_len"]
            search = result.get("longest_seq_len") or {}
            longest = search.get("longest_fitting")
            bound = ("" if search.get("shortest_failing") is None else f" (fails at {search['shortest_failing']})")
            timed = (f"{at['median_step_s']:.3f}" if at.get("median_step_s") is not None
                     else f"failed: {(at.get('error') or '')[:80]}")
            lines.append(f"| {trainer} | {at['seq_len']} | {timed} | {at.get('tokens_per_s', '')} | "
                         f"{_gib(at.get('peak_memory_gib'))} | {longest if longest is not None else '?'}{bound} |")
    for part, text in merged.get("steps", {}).items():
        lines += ["", f"## Steps of {part}", "", "```", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="unpacked gpu-run-a / gpu-run-b bundles")
    parser.add_argument("--name", required=True, help="file name stem, e.g. h200-2026-12-03")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not d.is_dir()]
    if missing:
        parser.error(f"run_dirs: no such folder: {', '.join(missing)}")
    if not args.name or "/" in args.name:
        parser.error(f"--name must be a plain file name stem, got {args.name!r}")
    outputs = [args.out_dir / f"{args.name}.json", args.out_dir / f"{args.name}-session.md"]
    existing = [str(p) for p in outputs if p.exists()]
    if existing:
        parser.error(f"{', '.join(existing)} exist(s); choose another --name (results are never overwritten)")
    merged = gather(args.run_dirs)
    if not merged["benchmarks"] and merged["end_to_end"] is None and merged["ceilings"] is None:
        parser.error(f"no results in {', '.join(map(str, args.run_dirs))} (expected the unpacked gpu-run bundles)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    outputs[0].write_text(json.dumps(merged, indent=1) + "\n")
    outputs[1].write_text(session_markdown(merged, args.name))
    for path in outputs:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
