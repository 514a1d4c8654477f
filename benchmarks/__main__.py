"""python -m benchmarks [--quick] [--out DIR] [--only NAME] [--device DEV]"""
import argparse
import json
import os
import sys

import torch

from benchmarks import bench_attention, bench_decode, bench_e2e, bench_host
from benchmarks.measure import device_name, environment, measure_ceilings
from benchmarks.report import write_results

# host last: without a GPU it installs a fake Triton driver (benchmarks/fake_driver.py) for its run.
BENCHES = {"attention": bench_attention.run, "decode": bench_decode.run, "e2e": bench_e2e.run,
           "graphs": bench_e2e.run_compiled, "host": bench_host.run}


def autotuned_configs() -> dict:
    """The config autotuning chose for each kernel and key in this run (when Triton ran)."""
    if "prefix_attn.triton_launch" not in sys.modules:
        return {}
    from csrc_triton.attn_bwd import bwd_kernel
    from csrc_triton.attn_fwd import prefix_attn_fwd_kernel

    return {kernel.fn.__name__: {str(key): str(cfg) for key, cfg in kernel.cache.items()}
            for kernel in (prefix_attn_fwd_kernel, bwd_kernel)}


def default_out(device) -> str:
    name = device_name(device).replace(" ", "_").replace("/", "_")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small sweep (minutes on a 2-core CPU)")
    parser.add_argument("--out", help="result folder (default benchmarks/results/<device name>/)")
    parser.add_argument("--only", choices=sorted(BENCHES), help="run one benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", help="comma-separated subset of providers (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: interpreter timings are not performance figures; unset it.",
              file=sys.stderr)
        return 2
    out_dir = args.out or default_out(args.device)
    env = environment(args.device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    env["ceilings"] = measure_ceilings(args.device) if args.only != "host" else {}
    if env["ceilings"]:
        print("ceilings: " + json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in env["ceilings"].items()}))
    records = []
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars only: pip install -e ".[bench]" brings tqdm and matplotlib
        def tqdm(iterable, **_):
            return iterable

    for name, bench in BENCHES.items():
        if args.only and name != args.only:
            continue
        providers = args.providers.split(",") if args.providers else None
        extra = {"copy_gbps": env["ceilings"]["copy_gbps"]} if name == "decode" and env["ceilings"] else {}
        for record in tqdm(bench(args.quick, args.device, providers, **extra), desc=name, unit="point",
                           file=sys.stderr):
            records.append({**record, "device": env["device"], "torch": env["torch"], "triton": env["triton"],
                            "commit": env["commit"]})
    env["autotuned"] = autotuned_configs()
    summary = write_results(records, env, out_dir, quick=args.quick)
    print(summary)
    print(f"results written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
