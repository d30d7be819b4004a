#!/usr/bin/env bash
# The one command for a GPU machine: bench/gpu.py at the gpu size (CPU size where there is no GPU).
#
#   bash bench/gpu.sh [extra bench/gpu.py arguments, e.g. --sections loss mfu]
#
# Writes $OUT/gpu_results.json (and the log, $OUT/gpu_log.txt) when $OUT is set, else
# bench/results/gpu_results.json. Finishes in under 10 minutes on one H100 or H200: bench/gpu.py
# runs the CUDA tests (180 s at most: the compiled loss kernel compiles there), then keeps each section within its budget (340 s in all);
# `timeout` stops it at 360 s in any case;
# the JSON is rewritten after each section, so what finished is kept.
#
# Python: the GPU machine has no internet, so nothing is pip-installed from a registry. The first of
# $PYTHON, python3, python, .venv/bin/python that imports torch and transformers is used (on the lent
# H100/H200 machines that is the image's python3, which has a CUDA torch and transformers); opd
# itself is not installed: PYTHONPATH=src imports it from this checkout. A `.venv` made here holds
# the CPU build of torch and is far over what can be carried (64 MiB), so it only serves a CPU run.
#
# Extra packages travel as wheels in `.whl/` (git-ignored through .git/info/exclude, named in the
# run's `carry`); they are installed with --no-index into /tmp/opd-site, which goes first on
# PYTHONPATH. The lent image lacks pydantic (opd's config) and Liger-Kernel (the loss section's
# third side); fetch both, here, once:
#   bash bench/fetch_wheels.sh
# then run `bash bench/gpu.sh` with carry [".whl"]. If the machine's transformers lacks the
# `cache` argument that opd's HF fallback decoder passes (see the JSON's meta.warning), carry the
# transformers wheel this repo is tested with the same way.
#
# First, the CUDA tests (tests/test_cuda.py, skipped where there is no GPU), time-boxed to 180 s;
# their log goes beside the JSON.
set -uo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/opd-site .whl/*.whl && export PYTHONPATH="/tmp/opd-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

py=""
for cand in "${PYTHON:-}" python3 python .venv/bin/python; do
    if [ -n "$cand" ] && command -v "$cand" >/dev/null && "$cand" -c "import torch, transformers" 2>/dev/null; then
        py=$cand
        break
    fi
done
if [ -z "$py" ]; then
    echo "bench/gpu.sh: no python with torch and transformers (tried \$PYTHON, python3, python, .venv)" >&2
    exit 2
fi
"$py" -c "import sys, torch, transformers; print(sys.executable, 'python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, torch.cuda.is_available(), '| transformers', transformers.__version__)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ -n "${OUT:-}" ]; then
    out="$OUT/gpu_results.json" logfile="$OUT/gpu_log.txt"
else
    out="bench/results/gpu_results.json" logfile="bench/results/gpu_log.txt"
fi
mkdir -p "$(dirname "$out")"
timeout -k 5 180 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$(dirname "$out")/cuda_tests.txt"
timeout -k 10 360 "$py" bench/gpu.py --out "$out" "$@" 2>&1 | tee "$logfile"
rc=$?
echo "bench/gpu.sh: exit $rc, results in $out"
exit $rc
