"""Turns pytest-benchmark JSON of this suite into a markdown table and PNG plots.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--out-dir DIR] [--name NAME]

Writes `DIR/<NAME>.md` (NAME defaults to the first JSON's file name without `.json`, DIR to that
file's folder) with a header (machine, GPU and driver, library versions, date: recorded by
benchmarks/conftest.py) and one table per path, mode and dtype: implementation, shape, median time,
time relative to the reference of the same run, peak extra memory, memory relative to the reference,
and achieved GB/s (logits path) or TFLOP/s (linear path). For each path, mode and dtype it also writes
`DIR/<NAME>-<path>-<mode>-<dtype>.png`: median time (top) and peak extra memory (bottom) against each
shape dimension the grid sweeps (vocabulary size, tokens, hidden size), one line per implementation,
the other dimensions held at the values with the longest sweep. Several JSON files (say, one per
benchmark file, from separate runs) are merged; the header comes from the first.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

PATH_TITLES = {"logits": "Logits path (`dk.sequence_logps`)", "linear": "Linear path, DPO loss"}
MODE_TITLES = {"forward": "forward", "forward_backward": "forward + backward"}
AXIS_TITLES = {"V": "vocabulary size V", "N": "scored tokens N", "H": "hidden size H"}
AXES = ("V", "N", "H")
PEERS = ("torch", "triton", "dpo-kernels", "trl", "liger-kernel", "cut-cross-entropy")


def load_rows(paths):
    """(machine_info of the first file, list of row dicts, sources)."""
    rows, machine = [], None
    for path in paths:
        data = json.loads(Path(path).read_text())
        machine = machine or data.get("machine_info", {})
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "path" not in info or bench.get("stats") is None:
                continue  # not a row of this suite (or not timed)
            row = dict(info)
            row.setdefault("median_s", bench["stats"]["median"])
            row["datetime"] = data.get("datetime")
            rows.append(row)
    return machine or {}, rows


def header_lines(machine: dict, rows: list, sources) -> list:
    bench = machine.get("dpo_bench", {})
    lines = []
    if bench.get("device") == "cuda":
        lines.append(f"- GPU: {bench.get('gpu_name', '?')} ({bench.get('gpu_capability', '?')}, "
                     f"{bench.get('gpu_memory_gib', '?')} GiB), driver {bench.get('gpu_driver') or '?'}, "
                     f"CUDA runtime of torch {bench.get('torch_cuda') or '?'}")
    cpu = bench.get("cpu_model") or machine.get("cpu", {}).get("brand_raw", "?")
    count = machine.get("cpu", {}).get("count", "?")
    lines.append(f"- CPU: {cpu}, {count} cores visible, {bench.get('threads', '?')} PyTorch threads")
    versions = bench.get("versions", {})
    lines.append("- Versions: " + ", ".join(f"{name} {versions.get(name) or 'not installed'}" for name in PEERS))
    date = bench.get("date") or (rows[0]["datetime"][:10] if rows and rows[0].get("datetime") else "?")
    lines.append(f"- Date: {date}; results: {', '.join(Path(s).name for s in sources)}")
    if bench.get("copy_bandwidth_gbs"):
        lines.append(f"- Measured copy bandwidth of the device: {bench['copy_bandwidth_gbs']:.0f} GB/s "
                     "(read + write; the ceiling of a memory-bound kernel)")
    return lines


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={shape[k]}" for k in ("N", "H", "V") if k in shape)


def _shape_key(shape: dict):
    return tuple(shape.get(k, 0) for k in ("N", "H", "V"))


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def table_lines(rows: list) -> list:
    throughput = "GB/s" if any("bandwidth_gbs" in r for r in rows) else "TFLOP/s"
    lines = [f"| implementation | shape | median ms | time vs reference | peak extra MiB | memory vs reference | "
             f"{throughput} |", "|---|---|---:|---:|---:|---:|---:|"]
    order = {impl: i for i, impl in enumerate(dict.fromkeys(r["impl"] for r in rows))}
    for r in sorted(rows, key=lambda r: (_shape_key(r["shape"]), order[r["impl"]])):
        rate = r.get("bandwidth_gbs", r.get("tflops"))
        lines.append(f"| {r['impl']} | {_shape_text(r['shape'])} | {r['median_s'] * 1e3:.3g} | "
                     f"{_ratio(r.get('time_vs_reference'))} | {r['peak_extra_bytes'] / 2**20:.1f} | "
                     f"{_ratio(r.get('memory_vs_reference'))} | {'' if rate is None else f'{rate:.3g}'} |")
    return lines


def groups(rows: list) -> dict:
    grouped = defaultdict(list)
    for r in rows:
        grouped[(r["path"], r["mode"], r["dtype"])].append(r)
    order = {"logits": 0, "linear": 1, "forward": 0, "forward_backward": 1}
    return dict(sorted(grouped.items(), key=lambda kv: (order.get(kv[0][0], 9), order.get(kv[0][1], 9), kv[0][2])))


def sweep(rows: list, axis: str):
    """(fixed values of the other dimensions, rows) of the longest sweep along `axis`, or None."""
    others = [k for k in AXES if k != axis and k in rows[0]["shape"]]
    by_fixed = defaultdict(set)
    for r in rows:
        by_fixed[tuple(r["shape"][k] for k in others)].add(r["shape"][axis])
    fixed, values = max(by_fixed.items(), key=lambda kv: (len(kv[1]), kv[0]))
    if len(values) < 2:
        return None
    chosen = [r for r in rows if tuple(r["shape"][k] for k in others) == fixed]
    return dict(zip(others, fixed)), chosen


def plot_group(rows: list, title: str, out: Path) -> bool:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    plain = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "125" else "")  # 1, 2, 5 x 10^k

    sweeps = [(axis, s) for axis in AXES if axis in rows[0]["shape"] and (s := sweep(rows, axis)) is not None]
    if not sweeps:
        return False
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5.5 * len(sweeps), 7.5), squeeze=False)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for col, (axis, (fixed, chosen)) in enumerate(sweeps):
        for impl in impls:
            points = sorted((r["shape"][axis], r["median_s"] * 1e3, r["peak_extra_bytes"] / 2**20)
                            for r in chosen if r["impl"] == impl)
            if not points:
                continue
            x, ms, mib = zip(*points)
            style = dict(marker="o", linestyle="--" if impl.startswith("reference") else "-", label=impl)
            axes[0][col].plot(x, ms, **style)
            axes[1][col].plot(x, mib, **style)
        where = ", ".join(f"{k} = {v}" for k, v in fixed.items())
        axes[0][col].set_title(f"against {AXIS_TITLES[axis]} ({where})", fontsize=10)
        axes[0][col].set_yscale("log")
        axes[0][col].yaxis.set_major_formatter(plain)
        axes[0][col].yaxis.set_minor_formatter(plain)
        axes[0][col].set_ylabel("median time, ms (log)")
        axes[1][col].set_ylabel("peak extra memory, MiB")
        for row in (0, 1):
            axes[row][col].set_xlabel(AXIS_TITLES[axis])
            axes[row][col].set_xticks(sorted({r["shape"][axis] for r in chosen}))
            axes[row][col].tick_params(axis="x", labelrotation=30)
            axes[row][col].grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write_report(sources, out_dir: Path | None = None, name: str | None = None) -> Path:
    sources = [Path(s) for s in sources]
    machine, rows = load_rows(sources)
    if not rows:
        raise SystemExit(f"no benchmark rows of this suite with timings in {', '.join(map(str, sources))}")
    out_dir = out_dir or sources[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or sources[0].name.removesuffix(".json")
    device = machine.get("dpo_bench", {}).get("device", rows[0].get("device", "?"))
    lines = [f"# dpo_kernels benchmarks, {device.upper()}", ""] + header_lines(machine, rows, sources) + [
        "",
        "Median of the timed rounds; peak extra memory of one call (CUDA: `max_memory_allocated`; CPU: the "
        "profiler's allocation events); ratios against the reference row of the same run; throughput over the "
        "byte minimum (logits path: `N V b` forward, `3 N V b` forward + backward) or the GEMM work (linear "
        "path: `2 N H V` forward, `8 N H V` forward + backward).",
    ]
    for (path, mode, dtype), members in groups(rows).items():
        title = f"{PATH_TITLES.get(path, path)}, {MODE_TITLES.get(mode, mode)}, {dtype}"
        lines += ["", f"## {title}", ""] + table_lines(members)
        png = out_dir / f"{stem}-{path}-{mode}-{dtype}.png"
        if plot_group(members, title.replace("`", ""), png):
            lines += ["", f"![{title}]({png.name})"]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="pytest-benchmark JSON file(s) of this suite")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write (default: the first file's folder)")
    parser.add_argument("--name", default=None, help="file name stem of the outputs (default: the first file's)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"results: no such file: {', '.join(missing)}")
    if args.name is not None and (not args.name or "/" in args.name):
        parser.error(f"--name must be a plain file name stem, got {args.name!r}")
    print(write_report(args.results, args.out_dir, args.name))


if __name__ == "__main__":
    main()
