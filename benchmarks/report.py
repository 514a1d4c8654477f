"""Result files of a benchmark run: JSON, CSV, one PNG per sweep and a markdown summary."""
import csv
import json
import math
import os
import sys
from collections import defaultdict

FIELDS = ["bench", "provider", "mode", "dtype", "B", "H", "Hkv", "L", "P", "D", "ms_p50", "ms_p20", "ms_p80", "tflops",
          "kernel_ms", "kernel_tflops", "host_us", "host_us_p20", "host_us_p80", "launches", "syncs", "tasks", "bytes", "gbps", "kernel_gbps", "frac_of_copy_bw", "tokens_per_s", "peak_mem_mb", "device", "torch", "triton",
          "commit", "model", "new_tokens", "skipped"]
SHAPE_KEYS = ("B", "H", "Hkv", "L", "P", "D", "dtype")
FUSED = ("prefix_attn", "prefix_attn_torch", "peft+patch", "native")
BASELINES = ("concat_sdpa", "concat_eager", "concat_flex", "peft_sdpa", "peft_eager")


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _x_axis(records):
    """The shape field that varies within a sweep (its plot's x axis)."""
    for key in ("P", "L", "B", "H"):
        if len({r.get(key) for r in records}) > 1:
            return key
    return "P"


def _group(records):
    groups = defaultdict(list)
    for r in records:
        groups[(r["bench"], r["mode"], tuple(r.get(k) for k in SHAPE_KEYS))].append(r)
    return groups


def _sig(x: float) -> str:
    """A figure with three significant digits, whatever its size (0.0512, 731, 1.2e+04)."""
    return f"{x:.3g}"


def _timing_note(env) -> str:
    """What "ms" and "peak MiB" mean on the device this run measured."""
    if env.get("cuda"):
        return ("ms: CUDA-event time per call (triton.testing.do_bench, L2 flushed; host overhead included "
                "when the GPU outruns the host); kernel ms: sum of the call's GPU kernel durations "
                "(torch.profiler); peak MiB: torch.cuda.max_memory_allocated during one call. TFLOP/s counts "
                "useful work only.")
    return ("ms: wall-clock time per call on this CPU (time.perf_counter, median of repeated calls after a "
            "warm-up; no GPU was used, so there are no kernel times); peak MiB: the largest total of tensor "
            "storages alive during one call (counted by a dispatch mode: what torch allocated, not the "
            "process RSS). TFLOP/s counts useful work only.")


def baseline_of(by_provider: dict):
    """The record of the path users run today at one point: SDPA over the concatenation (op level)
    or PEFT with SDPA (end to end); None when neither ran."""
    return by_provider.get("concat_sdpa") or by_provider.get("peft_sdpa")


def summary_markdown(records, env, quick) -> str:
    # Host records (no ms_p50) get their own table.
    measured = [r for r in records if not r.get("skipped") and r.get("ms_p50") is not None]
    lines = [f"# Benchmark results: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env.get('transformers', '?')}, "
             f"commit {env['commit']}{' (quick sweep)' if quick else ''}.", ""]
    ceil = env.get("ceilings", {})
    if ceil:
        where = "GPU" if env.get("cuda") else "CPU"
        lines += [f"Measured ceilings of this {where}: {ceil['matmul_dtype']} matmul {_sig(ceil['matmul_tflops'])} "
                  f"TFLOP/s, copy {_sig(ceil['copy_gbps'])} GB/s.", ""]
    if env.get("interpreter"):
        lines += ["**Interpreter run: not performance figures.**", ""]
    if measured:  # a host-only run (--only host) has no timed sweeps
        lines += [_timing_note(env), "",
                  "| bench | mode | shape (B,H,L,P,D,dtype) | provider | ms p50 [p20, p80] | TFLOP/s | kernel ms "
                  "| kernel TFLOP/s | peak MiB | speedup vs baseline | memory vs baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (bench, mode, shape), group in sorted(_group(measured).items(), key=lambda kv: str(kv[0])):
            by_provider = {r["provider"]: r for r in group}
            base = baseline_of(by_provider)
            for r in group:
                speed = mem = "-"
                if base and r is not base:
                    speed = f"{base['ms_p50'] / r['ms_p50']:.2f}x"
                    ratio = _ratio(r.get("peak_mem_mb"), base.get("peak_mem_mb"))
                    mem = "-" if ratio is None else f"{ratio:.2f}x"
                lines.append(f"| {bench} | {mode} | {','.join(map(str, shape))} | {r['provider']} | "
                             f"{_fmt(r['ms_p50'])} [{_fmt(r['ms_p20'])}, {_fmt(r['ms_p80'])}] | "
                             f"{_fmt(r.get('tflops'))} | {_fmt(r.get('kernel_ms'))} | {_fmt(r.get('kernel_tflops'))} | "
                             f"{_fmt(r.get('peak_mem_mb'), 4)} | {speed} | {mem} |")
        lines += ["", "Baseline: concat_sdpa (SDPA over the batch-expanded concatenation) at op level, peft_sdpa "
                  "(PEFT's prefix tuning with SDPA) end to end. Speedup = baseline ms / ms; memory = peak / baseline peak."]
    from benchmarks.bench_host import summary_markdown as host_summary

    host = host_summary(records)
    if host:
        lines += ["", host]
    # Per benchmark family: a route skipped in one (graphs: CUDA graphs need a GPU) may have run in another.
    skipped = {(r["bench"].split("_")[0], r["provider"], r["skipped"]) for r in records if r.get("skipped")}
    if skipped:
        lines += ["", "Skipped providers:"] + [f"- {p} ({family}): {why}" for family, p, why in sorted(skipped)]
    return "\n".join(lines) + "\n"


def _ratio(value, base):
    if value is None or base is None or not base or math.isnan(value) or math.isnan(base):
        return None
    return value / base


def _plain_log_axis(axis):
    """Log scale with ticks at 1, 2, 5 x 10^k labelled as plain numbers (0.2, 5, 100), not 2 x 10^-1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


PANELS = (
    ("ms_p50", "time per call (ms, median)", True),
    ("peak_mem_mb", "peak memory (MiB)", True),
    ("speedup", "speedup vs baseline (x, higher is better)", False),
    ("memory_ratio", "memory vs baseline (x, lower is better)", False),
)


def _panel_points(rows, x_key, provider, metric, baselines):
    pts = []
    for r in rows:
        if r["provider"] != provider:
            continue
        if metric in ("speedup", "memory_ratio"):
            base = baselines.get(tuple(r.get(k) for k in SHAPE_KEYS))
            if base is None or base is r:
                continue
            value = (_ratio(base["ms_p50"], r["ms_p50"]) if metric == "speedup"
                     else _ratio(r.get("peak_mem_mb"), base.get("peak_mem_mb")))
        else:
            value = r.get(metric)
        if value is not None and not math.isnan(value) and value > 0:
            pts.append((r[x_key], value))
    return sorted(pts)


def plot_sweeps(records, out_dir):
    """One PNG per sweep: per mode, time and peak memory per provider, and both as ratios to the baseline.

    Returns the paths written. Raises ImportError without matplotlib (pip install 'prefix-attn[bench]').
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    measured = [r for r in records if not r.get("skipped") and r.get("ms_p50") is not None]
    for bench in sorted({r["bench"] for r in measured}):
        rows = [r for r in measured if r["bench"] == bench]
        modes = sorted({r["mode"] for r in rows})
        providers = sorted({r["provider"] for r in rows})
        x_key = _x_axis(rows)
        xs = sorted({r[x_key] for r in rows})
        fig, axes = plt.subplots(len(modes), len(PANELS), figsize=(4.6 * len(PANELS), 3.4 * len(modes)),
                                 squeeze=False)
        for row_axes, mode in zip(axes, modes):
            mode_rows = [r for r in rows if r["mode"] == mode]
            baselines = {}
            for (_, _, shape), group in _group(mode_rows).items():
                baselines[shape] = baseline_of({r["provider"]: r for r in group})
            for ax, (metric, label, log) in zip(row_axes, PANELS):
                drawn = False
                for provider in providers:
                    pts = _panel_points(mode_rows, x_key, provider, metric, baselines)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
                        drawn = True
                if not drawn:
                    ax.text(0.5, 0.5, "not measured in this mode", ha="center", va="center", transform=ax.transAxes,
                            color="gray")
                elif log:
                    ax.set_yscale("log")
                    _plain_log_axis(ax.yaxis)
                else:
                    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
                ax.set_xticks(xs)
                ax.set_xticklabels([str(x) for x in xs], rotation=45 if len(xs) > 6 else 0)
                ax.set_title(f"{mode}: {label}", fontsize=9)
                ax.set_xlabel(x_key)
                ax.grid(True, alpha=0.3)
                if drawn:
                    ax.legend(fontsize=7)
        fig.suptitle(f"{bench} on {rows[0]['device']} (baseline: concat_sdpa / peft_sdpa)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{bench}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(records, env, out_dir, quick=False) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"environment": env, "records": records}, f, indent=1, default=str)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    summary = summary_markdown(records, env, quick)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary)
    try:
        plot_sweeps(records, out_dir)
    except ImportError:
        print("matplotlib is not installed: no PNG plots were written (pip install -e '.[bench]')",
              file=sys.stderr)
    return summary
