#!/usr/bin/env bash
# Everything a lent GPU should run, in one call that ends inside the device tool's 10-minute limit:
#   environment, the test suite on CUDA (GPU-marked tests included), compute-sanitizer memcheck on a
#   small forward + backward of every kernel, and the benchmarks, one invocation per benchmark in the
#   order of what the open issues still need measured (e2e, host and graphs first: issue 9's figures).
# Usage: bash benchmarks/gpu_run.sh [OUT_DIR]       (default $OUT, else ./gpu_run_out)
#   GPU_RUN_STEPS=env,tests,sanitizer,bench  picks steps; GPU_RUN_BENCHES=e2e,host,graphs,decode,attention picks
#   and orders the benchmarks; BENCH_ARGS passes flags to each python -m benchmarks.
#   GPU_RUN_BUDGET=540: seconds for the whole script; each step stops at its own cap (TESTS_TIMEOUT 220,
#   SANITIZER_TIMEOUT 90) or at the budget's end, whichever comes first, and the benchmarks share what is
#   left. A benchmark writes its records when it ends, so each runs in its own process and folder
#   (bench-<name>/, committed as its own run folder): one stopped at the budget loses only its own.
# Python packages missing on the machine can travel as wheels in .whl/ (installed to /tmp/site).
# Everything lands in OUT_DIR/gpu_run.tar.gz (each benchmark's folder in it), the logs and digest.txt beside it:
# six files at most (the device tool brings back eight).
set -u
start=$SECONDS
budget=${GPU_RUN_BUDGET:-540}
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
# Seconds a step may run: its cap, or what is left of the budget (at least 1, so that timeout stops it at once).
allow() {
  local left=$((budget - (SECONDS - start)))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

if has env; then
  { date -u; nvidia-smi; python3 -c "import torch, triton, transformers, sys; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())"; git rev-parse HEAD 2>/dev/null; \
    python3 -m pip list 2>/dev/null; } > "$work/env.txt" 2>&1
  head -n 30 "$work/env.txt"
fi
if has tests; then
  limit=$(allow ${TESTS_TIMEOUT:-220})
  echo "== tests ($limit s at most)"
  # xdist spreads the many kernel compilations over the machine's cores.
  PREFIX_ATTN_AUTOTUNE=0 timeout $limit python3 -m pytest ${TEST_PATHS:-tests} -q \
    -p no:cacheprovider -n ${TEST_WORKERS:-8} --durations=15 ${TEST_ARGS:-} > "$work/tests.log" 2>&1 || status=1
  tail -n 25 "$work/tests.log"
  save
fi
if has sanitizer; then
  limit=$(allow ${SANITIZER_TIMEOUT:-90})
  echo "== compute-sanitizer memcheck ($limit s at most)"
  PREFIX_ATTN_AUTOTUNE=0 timeout $limit compute-sanitizer --tool memcheck \
    --error-exitcode 3 python3 benchmarks/sanitize_small.py > "$work/sanitizer.log" 2>&1 || status=1
  tail -n 8 "$work/sanitizer.log"
  save
fi
if has bench; then
  for name in $(echo "${GPU_RUN_BENCHES:-e2e,host,graphs,decode,attention}" | tr , ' '); do
    left=$((budget - (SECONDS - start)))
    if [ "$left" -lt 20 ]; then
      echo "== benchmark $name: not run, the budget is spent" | tee -a "$work/bench.log"
      status=1
      continue
    fi
    echo "== benchmark $name ($left s at most)"
    timeout "$left" python3 -m benchmarks --only "$name" --out "$work/bench-$name" ${BENCH_ARGS:-} \
      >> "$work/bench.log" 2>&1 || { status=1; echo "benchmark $name: stopped or failed" | tee -a "$work/bench.log"; }
    if [ -f "$work/bench-$name/results.json" ]; then
      python3 -m benchmarks.digest "$work/bench-$name/results.json" | tee -a "$work/digest.txt"
    fi
    save
  done
fi
save
echo "gpu_run: status $status after $((SECONDS - start)) s, files in $out"
exit $status
