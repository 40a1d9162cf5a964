#!/usr/bin/env bash
# Build .gpusite.tar.xz: Ray (Serve, Train, Tune, Data) *and* MLflow for an offline GPU machine
# with Python 3.12 + torch + pyarrow but neither of them, inside the device tool's 64 MiB
# carry limit. The wheels alone are ~67 MB; installed, stripped of what no skewless path runs
# (RLlib, Ray's LLM library, the dashboard's web client: the dashboard *server* stays, Ray
# Train's placement-group cleaner needs it) and xz-compressed, the tree is ~45 MB.
#
# Run from the project root, with the registry reachable:
#   ../shared/tools/gpu-wheels.sh safetensors pytest pytest-timeout iniconfig pluggy httpx httpcore \
#     h11 anyio sniffio typer click shellingham rich markdown-it-py mdurl pygments pyyaml typing-extensions
#   tests/gpu/build_site.sh
# On the GPU machine tests/gpu/device_run.sh unpacks it into /tmp/site (PYTHONPATH).
set -euo pipefail
MLFLOW_VERSION="${MLFLOW_VERSION:-3.17.2}"
[ -d .whl ] || { echo "no .whl/: run ../shared/tools/gpu-wheels.sh first (see the header)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# MLflow's tracking + registry client and its SQLite store, and what they import that the GPU
# image lacks (as of 2026-11; the image has requests, packaging, protobuf, numpy, pandas).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$work/wheels" "mlflow-skinny==$MLFLOW_VERSION" "mlflow-tracing==$MLFLOW_VERSION" sqlalchemy greenlet \
  alembic mako sqlparse python-dotenv cloudpickle databricks-sdk importlib-metadata zipp lazy-importer \
  cryptography cffi pycparser
python3 -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --target "$work/site" .whl/*.whl $(ls "$work"/wheels/*.whl | grep -v cachetools)
rm -rf "$work/site/ray/rllib" "$work/site/ray/llm" "$work/site/ray/dashboard/client"
# The dashboard server refuses to start without the web client's build folder, and ray.init
# then waits a minute for it (seen on the H200: a minute lost per cluster start). An empty
# page keeps the server (and the Jobs / Serve REST APIs) up without the 20 MB client.
mkdir -p "$work/site/ray/dashboard/client/build/static"
echo '<!doctype html><title>Ray dashboard (web client not shipped here)</title>' \
  >"$work/site/ray/dashboard/client/build/index.html"
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$work" -cf - site | xz -T0 -6 > .gpusite.tar.xz
grep -qxF '/.gpusite.tar.xz' .git/info/exclude 2>/dev/null || echo '/.gpusite.tar.xz' >> .git/info/exclude
du -h .gpusite.tar.xz
