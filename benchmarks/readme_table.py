"""Generate the README's results section from the committed GPU results (never hand-typed).

python -m benchmarks.readme_table [--results benchmarks/results] [--readme README.md] [--check]

For every benchmark family (op-level attention, decode, end to end) it takes the newest run under
benchmarks/results/<device>/<run>/results.json that measured it, and writes tables with the device,
versions and commit between the README markers. --check exits 1 when the README is out of date.
"""
import argparse
import glob
import json
import math
import os
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runs(results_dir):
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*", "results.json"))):
        with open(path) as f:
            data = json.load(f)
        if data["environment"].get("interpreter") or "cpu" in data["environment"]["device"].lower():
            continue  # only GPU figures go into the README
        runs.append((os.path.relpath(os.path.dirname(path), ROOT), data))
    return runs


def _latest(runs, prefix):
    found = [(run, data) for run, data in runs if any(r["bench"].startswith(prefix) and not r.get("skipped")
                                                       for r in data["records"])]
    return found[-1] if found else (None, None)


def _env_line(run, data):
    e = data["environment"]
    ceil = e.get("ceilings", {})
    extra = (f"; measured ceilings {ceil['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {ceil['copy_gbps']:.0f} GB/s copy"
             if ceil else "")
    return (f"*{e['device']}, torch {e['torch']}, triton {e['triton']}, transformers {e.get('transformers', '?')}, "
            f"commit {e['commit']}{extra}. Source: `{run}/`.*")


def _f(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _key(r):
    return (r["provider"], r["mode"], r.get("B"), r.get("H"), r.get("L"), r.get("P"), r.get("model"))


def _records(data, prefix):
    """The measured records of one family (bench name prefix), one per point: a point that several
    sweeps measured (attn_vs_L and attn_vs_P both hold B 8, H 12, L 1024, P 10) keeps its first
    record, so that every table of the README quotes the same measurement of it."""
    points = {}
    for r in (data or {}).get("records", []):
        if r["bench"].startswith(prefix) and not r.get("skipped"):
            points.setdefault(_key(r), r)
    return list(points.values())


def _index(records):
    return {_key(r): r for r in records}


def op_table(run, data):
    recs = [r for r in _records(data, "attn") if r.get("Hkv", r["H"]) == r["H"] and r.get("D", 64) == 64]  # GPT-2
    idx = _index(recs)
    shapes = sorted({(r["B"], r["H"], r["L"], r["P"]) for r in recs}, key=lambda s: (s[2], s[3]))
    lines = ["| B, H, L, P (D = 64, bf16) | mode | prefix_attn kernel ms | TFLOP/s | concat_sdpa kernel ms | "
             "speedup | peak MiB (ours / sdpa) |", "|---|---|---|---|---|---|---|"]
    for B, H, L, P in shapes:
        for mode in ("fwd", "bwd", "fwd+bwd"):
            ours, sdpa = (idx.get(("prefix_attn", mode, B, H, L, P, None)),
                          idx.get(("concat_sdpa", mode, B, H, L, P, None)))
            if not ours:
                continue
            speed = f"{sdpa['kernel_ms'] / ours['kernel_ms']:.2f}x" if sdpa else "-"
            mem = f"{_f(ours['peak_mem_mb'], 4)} / {_f(sdpa['peak_mem_mb'], 4)}" if sdpa and mode != "bwd" else "-"
            lines.append(f"| {B}, {H}, {L}, {P} | {mode} | {_f(ours['kernel_ms'])} | {_f(ours['kernel_tflops'])} | "
                         f"{_f(sdpa['kernel_ms']) if sdpa else '-'} | {speed} | {mem} |")
    return lines


def decode_table(run, data):
    recs = _records(data, "decode")
    idx = _index(recs)
    shapes = sorted({(r["B"], r["H"], r["L"], r["P"]) for r in recs})
    lines = ["| B, cache L, P (H = 12, D = 64, bf16) | prefix_attn kernel ms | GB/s (of measured copy) | "
             "concat_sdpa kernel ms | speedup |", "|---|---|---|---|---|"]
    for B, H, L, P in shapes:
        ours, sdpa = (idx.get(("prefix_attn", "decode", B, H, L, P, None)),
                      idx.get(("concat_sdpa", "decode", B, H, L, P, None)))
        if not ours:
            continue
        lines.append(f"| {B}, {L}, {P} | {_f(ours['kernel_ms'])} | {ours['kernel_gbps']:.0f} "
                     f"({100 * ours.get('frac_of_copy_bw', float('nan')):.0f}%) | {_f(sdpa['kernel_ms']) if sdpa else '-'} "
                     f"| {(sdpa['kernel_ms'] / ours['kernel_ms']) if sdpa else float('nan'):.1f}x |")
    return lines


def e2e_table(run, data, prefix="e2e"):
    recs = _records(data, prefix)
    lines = ["| GPT-2, B, L, P (bf16) | mode | route | ms (p50) | tokens/s | vs peft_sdpa | peak MiB "
             "| expanded prefix E (MiB) |", "|---|---|---|---|---|---|---|---|"]
    keyed = _index(recs)
    for r in recs:
        base = keyed.get(("peft_sdpa", r["mode"], r["B"], r.get("H"), r["L"], r["P"], r.get("model")))
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        lines.append(f"| {r.get('model')}, {r['B']}, {r['L']}, {r['P']} | {r['mode']} | {r['provider']} | "
                     f"{r['ms_p50']:.1f} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_mem_mb']:.0f} | "
                     f"{r.get('expanded_prefix_mb', float('nan')):.0f} |")
    return lines


def _get(records, **match):
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets_table(runs) -> list:
    """The issues' H100 targets against what the committed runs measured (kernel times)."""
    # The same records as the family tables below (one per point): a figure is quoted once.
    op, dec, e2e = (_records(_latest(runs, prefix)[1], prefix) for prefix in ("attn", "decode", "e2e"))
    rows = []

    def row(target, value, ok):
        status = "not measured" if ok is None else "met" if ok else "not met"
        rows.append(f"| {target} | {value} | {status} |")

    if op:
        for mode, goal in (("fwd", 300), ("bwd", 250)):
            r = _get(op, provider="prefix_attn", mode=mode, B=8, H=12, L=1024, P=10)
            if r:
                row(f"{mode} >= {goal} TFLOP/s at L = 1024, D = 64 (B = 8, H = 12, P = 10)",
                    f"{r['kernel_tflops']:.0f} TFLOP/s", r["kernel_tflops"] >= goal)
        base_fwd = {m: _get(op, provider="prefix_attn", mode=m, B=8, H=12, L=1024, P=0) for m in ("fwd", "bwd")}
        for P in (10, 64, 256):
            for mode in ("fwd", "bwd"):
                r, b = _get(op, provider="prefix_attn", mode=mode, B=8, H=12, L=1024, P=P), base_fwd[mode]
                if r and b:
                    ratio = (r["kernel_ms"] / b["kernel_ms"]) / (r["tflops"] * r["ms_p50"] / (b["tflops"] * b["ms_p50"]))
                    row(f"prefix costs <= 1.05x its FLOPs ({mode}, P = {P}, L = 1024)", f"{ratio:.2f}x", ratio <= 1.05)
    if dec:
        r = _get(dec, provider="prefix_attn", B=128, P=2048, L=1024)
        b = _get(dec, provider="concat_sdpa", B=128, P=2048, L=1024)
        if r:
            row("decode >= 70% of measured copy bandwidth (B = 128, P = 2048, cache 1024)",
                f"{100 * r['frac_of_copy_bw']:.0f}%", r["frac_of_copy_bw"] >= 0.7)
        if r and b:
            row("decode >= 8x faster than SDPA on the concatenation (B = 128, P = 2048)",
                f"{b['kernel_ms'] / r['kernel_ms']:.1f}x kernel, {b['ms_p50'] / r['ms_p50']:.1f}x end to end of the call",
                b["kernel_ms"] / r["kernel_ms"] >= 8)
    if e2e:
        for r in e2e:
            if r["mode"] != "train_step" or r["provider"] != "peft+patch":
                continue
            b = _get(e2e, provider="peft_sdpa", mode="train_step", B=r["B"], L=r["L"], P=r["P"], model=r["model"])
            if not b:
                continue
            speed = r["tokens_per_s"] / b["tokens_per_s"]
            saved = b["peak_mem_mb"] - r["peak_mem_mb"]
            row(f"training >= 1.3x PEFT+SDPA tokens/s (GPT-2 {r['model']}, B = {r['B']}, P = {r['P']})",
                f"{speed:.2f}x", speed >= 1.3)
            row(f"peak memory lower by >= E (GPT-2 {r['model']}, B = {r['B']}, P = {r['P']}, "
                f"E = {r['expanded_prefix_mb']:.0f} MiB)", f"{saved:.0f} MiB lower", saved >= r["expanded_prefix_mb"])
    _never_slower_rows(e2e, row)
    if not rows:
        return ["No GPU results committed yet."]
    return ["| target (from the issues) | measured | status |", "|---|---|---|"] + rows


def _never_slower_rows(e2e, row) -> None:
    """Issue 9's end-to-end targets: each route that patches attention at or above PEFT+SDPA's tokens/s at every
    e2e point, training and generate(); generate() of GPT-2 XL (B 128, P 512, 64 new tokens) at 1.5x or more,
    said to be unmeasured while no committed run has it."""
    xl_measured = False
    for r in e2e:
        if r["provider"] not in ("peft+patch", "native"):
            continue
        b = _get(e2e, provider="peft_sdpa", mode=r["mode"], B=r["B"], L=r["L"], P=r["P"], model=r["model"])
        if not b:
            continue
        speed = r["tokens_per_s"] / b["tokens_per_s"]
        what = "training step" if r["mode"] == "train_step" else "generate()"
        # Three decimals: at two, a 0.998x reads "1.00x, not met".
        row(f"{what} >= 1.0x PEFT+SDPA tokens/s ({r['provider']}, {r['model']}, B = {r['B']}, P = {r['P']})",
            f"{speed:.3f}x", speed >= 1.0)
        if r["mode"] == "generate" and (r["model"], r["B"], r["P"], r.get("new_tokens")) == _XL_GENERATE:
            xl_measured = True
            row(f"generate() >= 1.5x PEFT+SDPA tokens/s ({r['provider']}, GPT-2 XL, B = 128, P = 512, 64 new tokens)",
                f"{speed:.2f}x", speed >= 1.5)
    if not xl_measured:
        row("generate() >= 1.5x PEFT+SDPA tokens/s (GPT-2 XL, B = 128, P = 512, 64 new tokens)",
            "not in a committed GPU run yet", None)


# (model, B, P, new tokens) of issue 9's GPT-2 XL generate() target (benchmarks/bench_e2e.py's GPU sweep).
_XL_GENERATE = ("xl", 128, 512, 64)


def render(results_dir) -> str:
    runs = _runs(results_dir)
    out = [BEGIN, "", "_Generated by `python -m benchmarks.readme_table` from the committed results; kernel ms is "
           "the summed GPU time of the op's kernels (torch.profiler), TFLOP/s counts useful work only "
           "(4·B·H·D·(L·P + L(L+1)/2) per causal forward, 2.5x that per backward)._", ""]
    out += ["#### Targets", ""] + targets_table(runs) + [""]
    for title, prefix, table in (("Op level: fused prefix attention vs SDPA over the concatenation", "attn", op_table),
                                 ("Decode step: one query per sequence, one shared prefix", "decode", decode_table),
                                 ("End to end: GPT-2 prefix tuning (random weights)", "e2e", e2e_table),
                                 ("End to end, compiled: a training step under torch.compile(mode=\"reduce-overhead\") "
                                  "(CUDA graphs), generate() with a static cache and a compiled decoding step", "graphs",
                                  lambda run, data: e2e_table(run, data, "graphs"))):
        run, data = _latest(runs, prefix)
        out.append(f"#### {title}")
        out.append("")
        if run is None:
            out += ["Not measured on a GPU yet.", ""]
            continue
        out += [_env_line(run, data), ""] + table(run, data) + [""]
    out.append(END)
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--check", action="store_true", help="fail if the README's section is out of date")
    args = parser.parse_args(argv)
    section = render(args.results)
    with open(args.readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        print(f"{args.readme} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    new = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    if args.check:
        if new != text:
            print("README results section is out of date: run python -m benchmarks.readme_table", file=sys.stderr)
            return 1
        return 0
    with open(args.readme, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
