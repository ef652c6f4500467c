#!/usr/bin/env bash
# The GPU check, ready for a lent GPU machine (under 8 minutes on one H100):
#   1. `wmbench doctor`: the device, the `cuda` extra's kernels and whether they import;
#   2. every `cuda`-marked test: each kernel against its PyTorch reference, all eight backbones;
#   3. one XS agent update per backbone, timed (`wmbench bench --agent --size XS --device cuda`).
# Records and logs go to $OUT (the device tool's folder) or results/gpu. On a machine without CUDA it
# prints one line saying why and exits 0.
#   bash tests/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
why=$(python -c "
import torch
if torch.version.cuda is None: print('a CPU-only build of torch ' + torch.__version__)
elif not torch.cuda.is_available(): print('no CUDA device visible')
" 2>&1)
if [ -n "$why" ]; then
    echo "gpu check skipped: $why"
    exit 0
fi
out=${OUT:-results/gpu}
mkdir -p "$out"
python -m wmbench.cli doctor 2>&1 | tee "$out/doctor.txt"
timeout 300 python -m pytest -q -m cuda -p no:cacheprovider tests --junitxml "$out/cuda-tests.xml" 2>&1 \
    | tee "$out/cuda-tests.txt"
tests=${PIPESTATUS[0]}
timeout 240 python -m wmbench.cli bench --agent --size XS --device cuda --iters 3 --no-progress \
    --runs-dir "$out" 2>&1 | tee "$out/agent-bench.txt"
bench=${PIPESTATUS[0]}
echo "gpu check: cuda tests exit $tests, XS agent bench exit $bench; records and logs in $out"
exit $(( tests != 0 || bench != 0 ))
