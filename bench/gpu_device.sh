#!/usr/bin/env bash
# The GPU checks and the GPU decode table (issue 19), as one script for a lent GPU machine.
#
#   bench/gpu_device.sh smoke   the machine, the GPU tests, PCIe and HBM rates, llama.cpp's CUDA
#                               build on a tiny model (about a minute)
#   bench/gpu_device.sh table   the decode table: python -m shunter.bench.gpu_decode on 4 of
#                               Mixtral-8x7B's layers (about 8 minutes; DEADLINE_S bounds the rounds)
#   bench/gpu_device.sh all     the GPU tests (TESTS_S, 100 s), then the table
#
# Expects .gpu/ (not in git): llama-cuda.tar.xz (llama.cpp's build/bin for CUDA, sm_90) and
# convert/ (its convert_hf_to_gguf.py, conversion/ and gguf-py/). Writes under $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/shunter-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/shunter-gpu-work}
LLAMA=/tmp/llama-cuda

stamp() { echo "== $(date +%H:%M:%S) $*"; }

unpack_llama() {
    mkdir -p "$LLAMA" && tar -xJf .gpu/llama-cuda.tar.xz -C "$LLAMA"
    local cu13
    cu13=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
    local found
    found=$(find /usr/local /opt -name 'libcublas.so.13*' 2>/dev/null | head -1)
    export LD_LIBRARY_PATH="$LLAMA/bin:${cu13}:${found%/*}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
}

case "${1:-}" in
smoke)
    stamp machine
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-200
    free -g | head -2; df -h / /tmp /dev/shm | cat
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'
    stamp rates
    python3 - <<'EOF' | tee "$OUT/rates.txt"
import torch, time
def timed(fn, reps=10):
    fn(); torch.cuda.synchronize()
    t = []
    for _ in range(reps):
        a = time.perf_counter(); fn(); torch.cuda.synchronize(); t.append(time.perf_counter() - a)
    return sorted(t)[len(t) // 2]
n = 2 << 30
host = torch.empty(n, dtype=torch.uint8).pin_memory(); dev = torch.empty(n, dtype=torch.uint8, device="cuda")
dev2 = torch.empty_like(dev)
print(f"host->device pinned {n / timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9:.1f} GB/s")
print(f"device->host pinned {n / timed(lambda: host.copy_(dev, non_blocking=True)) / 1e9:.1f} GB/s")
print(f"device->device (read+write) {2 * n / timed(lambda: dev2.copy_(dev)) / 1e9:.0f} GB/s")
EOF
    stamp gpu tests
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu -x 2>&1 | tail -15
    stamp llama.cpp on a tiny model
    unpack_llama
    ldd "$LLAMA/bin/libggml-cuda.so" | grep -E 'not found|cublas|cudart'
    timeout 240 python3 -m shunter.bench.gpu_decode --work /tmp/shunter-gpu-tiny --llama-bin "$LLAMA/bin" \
        --convert .gpu/convert --out "$OUT/tiny.json" --tiny --layers 2 --budget 25e6 --llama-reserve 1e6 \
        --host-bytes 1e9 --reps 1 --warmup 0 --new-tokens 4 2>&1 | tail -25
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print([(x["contender"], x["condition"], x.get("gpu_used_peak_mib"), x.get("peak_gpu_bytes"), x.get("error", "")[-300:]) for x in r["runs"]]); print(r["runs"][0].get("profile"))' "$OUT/tiny.json"
    stamp done
    ;;
all)
    stamp gpu tests
    timeout "${TESTS_S:-100}" python3 -m pytest -q -p no:cacheprovider tests/gpu --maxfail=6 2>&1 | tail -25
    ;&
table)
    unpack_llama
    stamp table
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
    free -g | head -2; df -h / /tmp | cat
    timeout "${TIMEOUT_S:-540}" python3 -m shunter.bench.gpu_decode --work "$WORK" --llama-bin "$LLAMA/bin" \
        --convert .gpu/convert --out "$OUT/gpu-decode.json" --layers "${LAYERS:-4}" \
        --deadline-s "${DEADLINE_S:-420}" --reps "${REPS:-5}" --warmup 1 --precisions "${PRECISIONS:-bf16,4-bit,8-bit}" 2>&1 | tee "$OUT/table.log" | tail -40
    stamp done
    ;;
*)
    echo "usage: bench/gpu_device.sh smoke|table|all" >&2
    exit 2
    ;;
esac
