#!/usr/bin/env bash
# Everything a lent GPU should check and measure, in one call that fits a 15-minute lease:
#
#     bash bench/gpu_lease.sh OUT_DIR            # on the GPU machine; results and logs land in OUT_DIR
#
# 1. the machine: GPU, driver, torch and triton versions;
# 2. bench/gpu.py, every part (results written after each one, so a cut-short run keeps them);
# 3. the twins' CLI on CUDA with the demo model and the default CUDA budget (the warm-up that sizes
#    it included): the paged twin eager and from CUDA graphs (their tokens compared), the naive twin.
#
# Its limits (gpu.py 400 s, each CLI run 60 s) keep the whole under the 600 s one device command may run.
#
# Then, here: copy OUT_DIR/gpu.json to bench/results/gpu/ and run `python bench/tables.py --fill
# BENCHMARKS.md`. A part that failed reruns alone with `python3 bench/gpu.py --parts PART ...`.
set -uo pipefail
out=${1:?usage: bash bench/gpu_lease.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$out/machine.txt" 2>&1
python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton',
triton.__version__, torch.cuda.get_device_name())" >> "$out/machine.txt" 2>&1

timeout "${GPU_BENCH_TIMEOUT:-400}" python3 bench/gpu.py --out "$out/gpu.json" > "$out/gpu.log" 2>&1
echo "bench/gpu.py exit status $?" >> "$out/gpu.log"

cli() {  # name, then the twin script and its flags
    local name=$1; shift
    echo "=== $*" >> "$out/cli.log"
    timeout 60 python3 "$@" --no-answers --no-progress --json "$out/$name.json" >> "$out/cli.log" 2>&1
    echo "exit status $?" >> "$out/cli.log"
}
cli paged llama3-paged.py 64
cli paged-graphs llama3-paged.py 64 --attention triton --cuda-graphs
cli naive llama3-naive.py 6
python3 - "$out" >> "$out/cli.log" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
runs = {n: json.loads((Path(sys.argv[1]) / f"{n}.json").read_text()) for n in ("paged", "paged-graphs")}
tokens = {n: [r["output_token_ids"] for r in doc["requests"]] for n, doc in runs.items()}
same = sum(a == b for a, b in zip(tokens["paged"], tokens["paged-graphs"]))
print(f"CUDA graphs vs eager: {same}/{len(tokens['paged'])} requests with identical tokens")
EOF
tail -n 60 "$out/gpu.log"
tail -n 40 "$out/cli.log"
