#!/usr/bin/env bash
# Everything a lent GPU should run, in one call that ends well inside 10 minutes:
#   environment, the test suite on CUDA (GPU-marked tests included), compute-sanitizer memcheck on a
#   small forward + backward of every kernel, and the benchmark suite.
# Usage: bash benchmarks/gpu_run.sh [OUT_DIR]       (default $OUT, else ./gpu_run_out)
#   GPU_RUN_STEPS=env,tests,sanitizer,bench  picks steps; BENCH_ARGS passes flags to python -m benchmarks.
# Python packages missing on the machine can travel as wheels in .whl/ (installed to /tmp/site).
# Everything lands in OUT_DIR/gpu_run.tar.gz, plus the logs and the summary beside it.
set -u
out=${1:-${OUT:-$PWD/gpu_run_out}}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${GPU_RUN_STEPS:-env,tests,sanitizer,bench}
status=0
has() { case ",$steps," in *",$1,"*) return 0;; *) return 1;; esac; }
save() { cp "$work"/*.log "$work"/*.txt "$out/" 2>/dev/null; tar -czf "$out/gpu_run.tar.gz" -C "$work" . 2>/dev/null; }

if has env; then
  { date -u; nvidia-smi; python3 -c "import torch, triton, transformers, sys; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())"; git rev-parse HEAD 2>/dev/null; \
    python3 -m pip list 2>/dev/null; } > "$work/env.txt" 2>&1
  head -n 30 "$work/env.txt"
fi
if has tests; then
  echo "== tests"
  # xdist spreads the many kernel compilations over the machine's cores.
  PREFIX_ATTN_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-330} python3 -m pytest ${TEST_PATHS:-tests} -q -p no:cacheprovider \
    -n ${TEST_WORKERS:-8} --durations=15 ${TEST_ARGS:-} > "$work/tests.log" 2>&1 || status=1
  tail -n 25 "$work/tests.log"
  save
fi
if has sanitizer; then
  echo "== compute-sanitizer memcheck"
  PREFIX_ATTN_AUTOTUNE=0 timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 benchmarks/sanitize_small.py > "$work/sanitizer.log" 2>&1 || status=1
  tail -n 8 "$work/sanitizer.log"
  save
fi
if has bench; then
  echo "== benchmarks"
  timeout ${BENCH_TIMEOUT:-300} python3 -m benchmarks --out "$work/bench" ${BENCH_ARGS:-} > "$work/bench.log" 2>&1 \
    || status=1
  python3 -m benchmarks.digest "$work/bench/results.json" | tee "$work/digest.txt"
fi
cp "$work/bench/summary.md" "$out/" 2>/dev/null
save
echo "gpu_run: status $status, files in $out"
exit $status
