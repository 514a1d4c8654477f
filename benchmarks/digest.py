"""Print a compact digest of a results.json: one line per measured point (for logs and terminals).

python -m benchmarks.digest RESULTS_JSON [--providers a,b]
"""
import argparse
import json


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--providers", default="")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    wanted = set(filter(None, args.providers.split(",")))
    print(f"{'bench':<16}{'mode':<8}{'B,H,L,P':<16}{'provider':<18}{'ms':>8}{'kern ms':>9}{'kTFLOP/s':>9}"
          f"{'host us':>8}{'MiB':>8}")
    for r in data["records"]:
        if r.get("skipped") or (wanted and r["provider"] not in wanted):
            continue
        shape = f"{r.get('B')},{r.get('H')},{r.get('L')},{r.get('P')}"
        print(f"{r['bench']:<16}{r['mode']:<8}{shape:<16}{r['provider']:<18}{r['ms_p50']:>8.3f}"
              f"{r.get('kernel_ms', float('nan')):>9.3f}{r.get('kernel_tflops', float('nan')):>9.1f}"
              f"{r.get('host_us', float('nan')):>8.0f}{r.get('peak_mem_mb', float('nan')):>8.1f}")
    for r in data["records"]:
        if r.get("mode") == "decode" and not r.get("skipped"):
            print(f"  decode B={r['B']} P={r['P']} L={r['L']} {r['provider']}: {r['ms_p50']:.4f} ms, kernel "
                  f"{r['kernel_ms']:.4f} ms, {r.get('kernel_gbps', float('nan')):.0f} GB/s "
                  f"({100 * r.get('frac_of_copy_bw', float('nan')):.0f}% of copy)")
    for r in data["records"]:
        if r.get("bench", "").startswith(("e2e", "graphs")) and not r.get("skipped"):
            print(f"  {r['bench']} {r.get('model')} B={r['B']} L={r['L']} P={r['P']} {r['provider']}: "
                  f"{r['ms_p50']:.2f} ms, {r['tokens_per_s']:.0f} tok/s, peak {r['peak_mem_mb']:.0f} MiB "
                  f"(expanded prefix {r.get('expanded_prefix_mb', float('nan')):.0f} MiB)")
    for name, table in data["environment"].get("autotuned", {}).items():
        for key, cfg in table.items():
            print(f"  autotuned {name} {key[:70]}: {cfg}")
    for r in data["records"]:
        if r["provider"] == "prefix_attn" and r.get("kernels") and r.get("P") in (10, 256) and r.get("L") == 1024:
            top = sorted(r["kernels"].items(), key=lambda kv: -kv[1])[:6]
            print(f"  kernels {r['mode']} P={r['P']}: " + "; ".join(f"{k[:40]} {v:.3f}" for k, v in top))


if __name__ == "__main__":
    main()
