#!/usr/bin/env bash
# The GPU checks and serving figures of one session, for a device call (one stage per call, each
# inside a 10-minute limit). Logs under $OUT (default bench_out/gpu); a short table is printed last.
#
#   bash bench/gpu_session.sh tests    # pytest -m gpu (every GPU-marked test), junit XML
#   bash bench/gpu_session.sh serve    # bench/serve_throughput.py: batch 1, throughput, mixed
#   bash bench/gpu_session.sh http     # bench/serve_http.py, then bench/plan_accuracy.py --grid quick
#
# Packages the machine lacks travel as wheels in .whl/ (docs/PERFORMANCE.md, "Running the GPU
# checks"); they are installed to /tmp/site first when the folder is there.
set -uo pipefail
stage=${1:?usage: bash bench/gpu_session.sh tests|serve|http}
out=${OUT:-bench_out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())' | tee "$out/versions.txt"
git log -1 --format='commit %H' 2>/dev/null | tee -a "$out/versions.txt"

case $stage in
tests)
    timeout 560 python3 -m pytest -m gpu -q -p no:cacheprovider --junitxml="$out/gpu-tests.xml" tests 2>&1 | tee "$out/gpu-tests.log"
    echo "== pytest -m gpu =="; tail -1 "$out/gpu-tests.log"
    ;;
serve)
    timeout 560 python3 bench/serve_throughput.py --only batch1 throughput mixed 2>&1 | tee "$out/serve.log"
    echo "== serve_throughput =="; grep -E "tok/s|TTFT|ratio" "$out/serve.log" | tail -20
    ;;
http)
    timeout 300 python3 bench/serve_http.py 2>&1 | tee "$out/http.log"
    timeout 250 python3 bench/plan_accuracy.py --grid quick --out "$out/plan" 2>&1 | tee "$out/plan.log"
    echo "== serve_http =="; tail -8 "$out/http.log"; echo "== plan_accuracy =="; tail -12 "$out/plan.log"
    ;;
*)
    echo "unknown stage $stage: tests, serve or http" >&2; exit 2
    ;;
esac
