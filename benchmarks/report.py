"""Result files of a benchmark run: JSON, CSV, one PNG per sweep and a markdown summary."""
import csv
import json
import math
import os
from collections import defaultdict

FIELDS = ["bench", "provider", "mode", "dtype", "B", "H", "L", "P", "D", "ms_p50", "ms_p20", "ms_p80", "tflops",
          "kernel_ms", "kernel_tflops", "host_us", "host_us_p20", "host_us_p80", "launches", "syncs", "tasks", "bytes", "gbps", "kernel_gbps", "frac_of_copy_bw", "tokens_per_s", "peak_mem_mb", "device", "torch", "triton",
          "commit", "skipped"]
SHAPE_KEYS = ("B", "H", "L", "P", "D", "dtype")
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


def summary_markdown(records, env, quick) -> str:
    measured = [r for r in records if not r.get("skipped") and "ms_p50" in r]  # host records: their own table
    lines = [f"# Benchmark results: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env.get('transformers', '?')}, "
             f"commit {env['commit']}{' (quick sweep)' if quick else ''}.", ""]
    ceil = env.get("ceilings", {})
    if ceil:
        lines += [f"Measured ceilings: {ceil['matmul_dtype']} matmul {ceil['matmul_tflops']:.0f} TFLOP/s, "
                  f"device copy {ceil['copy_gbps']:.0f} GB/s.", ""]
    if env.get("interpreter"):
        lines += ["**Interpreter run: not performance figures.**", ""]
    lines += ["ms: CUDA-event time per call (host overhead included when the GPU outruns the host); kernel ms: "
              "sum of the call's GPU kernel durations (torch.profiler). TFLOP/s counts useful work only.", "",
              "| bench | mode | shape (B,H,L,P,D,dtype) | provider | ms p50 [p20, p80] | TFLOP/s | kernel ms "
              "| kernel TFLOP/s | peak MiB | speedup vs concat_sdpa | memory vs concat_sdpa |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (bench, mode, shape), group in sorted(_group(measured).items(), key=lambda kv: str(kv[0])):
        by_provider = {r["provider"]: r for r in group}
        base = by_provider.get("concat_sdpa") or by_provider.get("peft_sdpa")  # the path users run today
        for r in group:
            speed = mem = "-"
            if base and r is not base:
                speed = f"{base['ms_p50'] / r['ms_p50']:.2f}x"
                if r.get("peak_mem_mb") and not math.isnan(r.get("peak_mem_mb", float("nan"))) and base.get(
                        "peak_mem_mb"):
                    mem = f"{r['peak_mem_mb'] / base['peak_mem_mb']:.2f}x"
            lines.append(f"| {bench} | {mode} | {','.join(map(str, shape))} | {r['provider']} | "
                         f"{_fmt(r['ms_p50'])} [{_fmt(r['ms_p20'])}, {_fmt(r['ms_p80'])}] | "
                         f"{_fmt(r.get('tflops'))} | {_fmt(r.get('kernel_ms'))} | {_fmt(r.get('kernel_tflops'))} | "
                         f"{_fmt(r.get('peak_mem_mb'), 4)} | {speed} | {mem} |")
    from benchmarks.bench_host import summary_markdown as host_summary

    host = host_summary(records)
    if host:
        lines += ["", host]
    skipped = {(r["provider"], r["skipped"]) for r in records if r.get("skipped")}
    if skipped:
        lines += ["", "Skipped providers:"] + [f"- {p}: {why}" for p, why in sorted(skipped)]
    return "\n".join(lines) + "\n"


def plot_sweeps(records, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    measured = [r for r in records if not r.get("skipped") and "ms_p50" in r]
    for bench in sorted({r["bench"] for r in measured}):
        rows = [r for r in measured if r["bench"] == bench]
        modes = sorted({r["mode"] for r in rows})
        x_key = _x_axis(rows)
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for provider in sorted({r["provider"] for r in rows}):
                pts = sorted((r[x_key], r["ms_p50"]) for r in rows if r["mode"] == mode and r["provider"] == provider)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ax.set_title(f"{bench}: {mode}")
            ax.set_xlabel(x_key)
            ax.set_ylabel("ms (median)")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(rows[0]["device"])
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
    plot_sweeps(records, out_dir)
    return summary
