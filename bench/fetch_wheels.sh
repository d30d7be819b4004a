#!/usr/bin/env bash
# Download, here, the wheels bench/gpu.sh installs on the GPU machine (which has no registry).
#
#   bash bench/fetch_wheels.sh        # then: run `bash bench/gpu.sh` with `.whl` in the run's carry
#
# The lent H200 image has Python 3.12, torch, transformers, pytest, pyyaml, tqdm and matplotlib
# but not pydantic (which opd's config needs) nor Liger-Kernel (the loss section's third side).
# The versions are the ones this repository is tested with; `.whl/` is kept out of git through
# .git/info/exclude (about 3 MiB in all, far under the 64 MiB a run may carry).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
py=${PYTHON:-python3}
common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$py" -m pip download -q "${common[@]}" "${platforms[@]}" pydantic-core==2.50.5
"$py" -m pip download -q "${common[@]}" pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 liger-kernel==0.8.5
ls -la .whl
