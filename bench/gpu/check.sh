#!/usr/bin/env bash
# The GPU check: what rho does on a GPU machine, as one JSON (device-check.json under --out).
#
# It needs only a `rho` built with `--features cuda` (scripts/cuda-cargo build --release; strip
# it to bring it under 35 MB) and the fixtures of model/tests/fixtures, copied beside this
# script's repository layout: no network, no Rust toolchain. The GPU machine must have the
# NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries the binary links (libcudart.so.13,
# libcublas.so.13, libcublasLt.so.13, libcurand.so.10; a directory holding them can be named in
# LD_LIBRARY_PATH). What is missing is said, and written to the JSON, before anything runs.
#
#     bench/gpu/check.sh [--rho PATH] [--out DIR] [--device cuda:0]   # on the GPU machine
#     bench/gpu/check.sh --device cpu --tiny                          # the same steps on a CPU
#
# Steps (`rho bench device`): per-token losses of every fixture on the device against the CPU
# in f32 and in half precision (bf16 on a GPU, f16 on a CPU); reference throughput of a
# TinyLlama-1.1B-shape model in half precision at 8 x 2048 tokens (tokens/s, TFLOP/s and model
# FLOPs utilization against the card's dense bf16 peak, looked up from its name); a causal-LM and
# an SLM training step; a short `rho run` with the selector and the trainer on the device.
set -uo pipefail
cd "$(dirname "$0")/../.."

rho=${RHO:-}
out=runs/device-check
device=cuda:0
tiny=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --rho) rho=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --tiny) tiny=1; shift ;;
        *) echo "unknown argument $1 (see the head of $0)" >&2; exit 2 ;;
    esac
done
if [[ -z "$rho" ]]; then
    for candidate in ./rho target/cuda/release/rho target/release/rho; do
        if [[ -x "$candidate" ]]; then rho=$candidate; break; fi
    done
fi
mkdir -p "$out"
json=$out/device-check.json

# fail REASON MISSING...: writes the JSON of a check that could not start, and exits.
fail() {
    local reason=$1 items="" m
    shift
    for m in "$@"; do items+="${items:+, }\"$m\""; done
    printf '{"ok": false, "reason": "%s", "missing": [%s]}\n' "$reason" "$items" > "$json"
    echo "device check not run: $reason${items:+: $*}" >&2
    cat "$json"
    exit 1
}

[[ -n "$rho" && -x "$rho" ]] || fail "no rho binary (give --rho PATH or RHO)" "rho"
[[ -d model/tests/fixtures ]] || fail "no fixtures at model/tests/fixtures" "model/tests/fixtures"

missing=()
while read -r lib _; do
    missing+=("$lib")
done < <(ldd "$rho" 2>/dev/null | grep 'not found')
if [[ ${#missing[@]} -gt 0 ]]; then
    fail "shared libraries the binary needs are not on this machine" "${missing[@]}"
fi

args=(bench device --device "$device" --out "$out")
if [[ $device == cuda* ]]; then
    if ! "$rho" score --help 2>/dev/null | grep -q -- '--device'; then
        fail "the binary does not run" "$rho"
    fi
    # Dense bf16 peak (no sparsity) of the card, for model FLOPs utilization.
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
    case $name in
        *H200*) peak=989 ;;
        *H100*PCIe*) peak=756 ;;
        *H100*) peak=989 ;;
        *A100*) peak=312 ;;
        *L40S*) peak=362 ;;
        *) peak= ;;
    esac
    echo "GPU: ${name:-unknown (nvidia-smi did not answer)}; bf16 peak: ${peak:-unknown} TFLOP/s" >&2
    [[ -n "$peak" ]] && args+=(--peak-tflops "$peak")
fi
if [[ $tiny == 1 ]]; then
    args+=(--preset tiny --batch-size 2 --seq-len 64 --batches 2
        --train-preset tiny --train-batch-size 2 --train-seq-len 64)
fi
"$rho" "${args[@]}" > /dev/null
status=$?
[[ -f "$json" ]] && cat "$json"
exit $status
