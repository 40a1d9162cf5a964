#!/usr/bin/env bash
# Every GPU check in one bounded run, for a lent GPU machine (Python 3.12 + torch, no network,
# no Ray/pydantic/MLflow): the `gpu` tests, the memory-overhead benchmark on CUDA, and the
# byte-level LM job (GPU config) through the shared worker loop. Logs go to $OUT (default
# ./gpu-out). Prepare the wheels first, here, with network:
#   ../shared/tools/gpu-wheels.sh safetensors pytest pytest-timeout iniconfig pluggy httpx httpcore \
#     h11 anyio sniffio typer click shellingham rich markdown-it-py mdurl pygments pyyaml typing-extensions
# then run this script on the device with .whl/ carried along.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
export SKEWLESS_HOME="$(mktemp -d)/home" RAY_USAGE_STATS_ENABLED=0
python3 -c "import torch, ray, pydantic, safetensors, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| ray', ray.__version__, '| pydantic', pydantic.__version__, '| device', torch.cuda.get_device_name(0))"

step "gpu tests"
timeout 240 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu tests/unit/test_lm.py -v --timeout 200 \
  --junitxml="$OUT/gpu-tests.xml" -o addopts="" 2>&1 | tail -60

step "memory overhead on cuda (tracker + OOM guard vs neither)"
timeout 90 python3 benchmarks/memory_overhead.py --device cuda --steps 400 --out "$OUT/memory_overhead_cuda.json" 2>&1 | tail -15

step "LM job, lm_gpu.yaml (86M parameters, bf16), no tracking"
python3 - <<'EOF' > "$OUT/lm_gpu_run.yaml"
import yaml
cfg = yaml.safe_load(open("jobs/configs/lm_gpu.yaml"))
cfg["experiment"] = None
cfg["training"]["steps"] = 120
cfg["training"]["log_every"] = 40
print(yaml.safe_dump(cfg))
EOF
RAY_ADDRESS=local timeout 180 python3 -m jobs.lm --config "$OUT/lm_gpu_run.yaml" 2>&1 | grep -v "^\s*$" | tail -25
step "done"
