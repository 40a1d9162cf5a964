#!/usr/bin/env bash
# Every GPU check in one bounded run, for a lent GPU machine (Python 3.12 + torch, no network,
# no Ray/pydantic/MLflow of its own): the `gpu` tests (serving on the GPU, the real OOM, the
# tabular job end to end), the OOM guard's cost, the LM job against a plain loop (eager and
# compiled), GPU serving against in-process prediction, and the training data stage's rows/s
# against the host's CPUs. Logs and JSON results go to $OUT
# (default ./gpu-out). Prepare here, with the registry reachable (see tests/gpu/build_site.sh):
#   ../shared/tools/gpu-wheels.sh <extras>  &&  tests/gpu/build_site.sh
# then run this script on the device with .gpusite.tar.xz carried along.
# Each section has its own time limit, so one that hangs cannot eat the others' time.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), ${SECONDS}s)"; }
ONLY="${ONLY:-tests,memory,lm,serve,ingest}"
want() { [[ ",$ONLY," == *",$1,"* ]]; }
# The whole run stays inside BUDGET_S seconds: a section gets its own limit or what is left.
BUDGET_S="${BUDGET_S:-540}"
limit() { local left=$((BUDGET_S - SECONDS - 5)); ((left < $1)) && echo $((left > 1 ? left : 1)) || echo "$1"; }
export PYTHONUNBUFFERED=1

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p /tmp/site-root && tar -C /tmp/site-root -xJf .gpusite.tar.xz
export PYTHONPATH="/tmp/site-root/site:$PWD"
export SKEWLESS_HOME="$(mktemp -d)/home" RAY_USAGE_STATS_ENABLED=0 PYTHONDONTWRITEBYTECODE=1
python3 -c "import torch, ray, pydantic, mlflow, safetensors, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| ray', ray.__version__, '| mlflow', mlflow.__version__, '| device', torch.cuda.get_device_name(0))"

if want tests; then
  step "gpu tests"
  timeout "$(limit 230)" python3 -m pytest -p no:cacheprovider -m gpu tests/gpu tests/unit/test_lm.py -v --timeout 200 \
    --junitxml="$OUT/gpu-tests.xml" -o addopts="" -s 2>&1 | grep -v "^\s*$" >"$OUT/gpu-tests.log"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$OUT/gpu-tests.log" | tail -60
fi

if want memory; then
  step "the OOM guard's and tracker's cost on cuda (defaults; and record_history: always)"
  timeout "$(limit 70)" python3 benchmarks/memory_overhead.py --device cuda --steps 300 --out "$OUT/memory_overhead_cuda.json" 2>&1 | tail -8
fi

if want lm; then
  step "LM: Ray Train job vs plain PyTorch loop, eager and compiled (lm_gpu_large.yaml)"
  timeout "$(limit 250)" python3 benchmarks/lm_overhead.py --config jobs/configs/lm_gpu_large.yaml --steps 40 --warmup 8 \
    --out "$OUT/lm_overhead.json" 2>&1 | grep -v "^\s*$" >"$OUT/lm.log"
  grep -v "^  \[ray\]" "$OUT/lm.log" | tail -20
fi

if want serve; then
  step "GPU serving: 1 x 1.0 and 4 x 0.25 replicas vs in-process predict_table"
  timeout "$(limit 120)" python3 benchmarks/serve_gpu_bench.py --duration 3 --out "$OUT/serve_gpu.json" 2>&1 | grep -v "^\s*$" | tail -12
fi
if want ingest; then
  step "the training data stage vs one process, rows/s against CPUs (the host's cores)"
  timeout "$(limit 150)" python3 benchmarks/ingest_bench.py --rows 8000000 --passes 1 --cpus 1 4 16 \
    --out "$OUT/ingest_bench.json" 2>&1 | grep -v "^\s*$" | grep -v "Deprecat\|exclude_resources =" | tail -8
fi
step "done"
