"""The host path: the sync counter, the host benchmark (fake Triton driver) and the launch counts."""
import json
import os
import subprocess
import sys

import pytest
import torch

from prefix_attn.host_syncs import HostSyncCounter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sync_counter_counts_value_reads():
    x = torch.arange(6)
    with HostSyncCounter() as syncs:
        y = (x * 2).sum()  # no read
    assert syncs.count == 0
    with HostSyncCounter() as syncs:
        int(y)
        bool(x.any())
        y.item()
        float(x.float().mean())
    assert syncs.count == 4
    assert all("test_host_path.py" in s for s in syncs.sources), syncs.sources


def test_sync_counter_ignores_host_to_host_copies():
    with HostSyncCounter() as syncs:
        torch.ones(3).to(torch.float64).cpu().clone()
    assert syncs.count == 0


@pytest.fixture(scope="module")
def host_records(tmp_path_factory):
    """One quick host-benchmark run in its own process: without TRITON_INTERPRET, with the fake
    driver (it compiles the kernels for sm_90, a minute the first time on a 2-core CPU)."""
    out = tmp_path_factory.mktemp("host")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; from benchmarks import bench_host; "
            "recs = list(bench_host.run(True, 'cpu', calls=3, repeats=2, points=bench_host.shapes(False))); "
            f"json.dump(recs, open({str(out / 'r.json')!r}, 'w'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(out / "r.json"))


def test_host_benchmark_records(host_records):
    got = {(r["provider"], r["mode"], r["tasks"]) for r in host_records}
    for tasks in (1, 4):
        for provider in ("prefix_attn", "sdpa"):
            for mode in ("fwd", "bwd", "decode"):
                assert (provider, mode, tasks) in got
    for r in host_records:
        assert r["bench"] == "host" and r["host_us"] > 0 and "fake driver" in r["label"]
        assert r["host_us_p20"] <= r["host_us_p80"]


def test_host_benchmark_launch_and_sync_counts(host_records):
    ours = {(r["mode"], r["tasks"]): r for r in host_records if r["provider"] == "prefix_attn"}
    assert ours[("fwd", 1)]["launches"] == 1
    assert ours[("fwd", 4)]["launches"] == 1
    for tasks in (1, 4):
        assert ours[("bwd", tasks)]["launches"] <= 4
        assert ours[("decode", tasks)]["launches"] <= 3
    for mode in ("fwd", "bwd", "decode"):
        assert ours[(mode, 1)]["syncs"] == 0, mode


def test_direct_launches_match_triton_dispatch():
    """Under the fake driver (real Triton launch path, C launch recorded): the second call of each
    mode, launched directly from the kept compiled kernels, hands the C launcher the same grids and
    arguments as the first call, which went through kernel[grid](...)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.host_launch_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"fwd-1", "bwd-1", "decode-1", "fwd-4", "bwd-4", "decode-4"}
    for name, r in results.items():
        assert r["launches"] >= 1 and r["same"], (name, r)
        assert r["cached"] >= r["launches"], (name, r)
