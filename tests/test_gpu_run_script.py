"""benchmarks/gpu_run.sh without a GPU: it fits the device tool's 10-minute call (a budget that every step and
benchmark shares), runs each benchmark in its own process and folder, and brings back at most eight files.
`python3` is a stand-in here that writes a benchmark's results folder, so the test runs in a second."""
import os
import stat
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_run.sh")

FAKE_PYTHON = """#!/usr/bin/env bash
# python3 -m benchmarks --only NAME --out DIR [...] | python3 -m benchmarks.digest FILE
if [ "$1 $2" = "-m benchmarks" ]; then
  mkdir -p "$6" && echo '{"environment": {}, "records": []}' > "$6/results.json" && echo "ran $4" >> "$CALLS"
  exit 0
fi
if [ "$1 $2" = "-m benchmarks.digest" ]; then echo "digest of $3"; exit 0; fi
exit 9
"""


@pytest.fixture
def fake_python(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(tmp_path, bin_dir, **env):
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    out = tmp_path / "out"
    done = subprocess.run(["bash", SCRIPT, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
                               "GPU_RUN_STEPS": "bench", **env})
    return done, calls.read_text().split("\n")[:-1], out


def test_each_benchmark_in_its_own_folder_and_at_most_eight_files_back(tmp_path, fake_python):
    done, calls, out = _run(tmp_path, fake_python, GPU_RUN_BENCHES="e2e,host")
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls == ["ran e2e", "ran host"]  # e2e first: what the open issue still needs measured
    with tarfile.open(out / "gpu_run.tar.gz") as tar:
        names = tar.getnames()
    assert "./bench-e2e/results.json" in names and "./bench-host/results.json" in names, names
    assert len(os.listdir(out)) <= 8, os.listdir(out)
    assert "digest of" in (out / "digest.txt").read_text()


def test_a_spent_budget_runs_nothing_and_says_so(tmp_path, fake_python):
    done, calls, out = _run(tmp_path, fake_python, GPU_RUN_BENCHES="e2e,host", GPU_RUN_BUDGET="0")
    assert done.returncode == 1
    assert calls == []
    assert done.stdout.count("not run, the budget is spent") == 2, done.stdout
