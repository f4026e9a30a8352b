#!/usr/bin/env bash
# The GPU check: what rho does on a GPU machine, as one JSON (device-check.json under --out).
#
# It needs only a `rho` built with `--features cuda` (scripts/cuda-cargo build --release; strip
# it to bring it to about 36 MB) and the fixtures of model/tests/fixtures, copied beside this
# script's repository layout: no network, no Rust toolchain. The GPU machine must have the
# NVIDIA driver (libcuda.so.1, branch 580 or newer: CUDA 13.0, scripts/cuda-minimum) and the
# CUDA 13 libraries the binary links (libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10): from LD_LIBRARY_PATH, the system, or else the nvidia/*/lib directories of the
# machine's PyTorch environment, which the check finds itself. The driver's CUDA version is
# compared with the kernels' PTX version first. What is missing is said, and written to the
# JSON, before anything runs.
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

# not_found: the shared libraries the binary needs that the loader cannot find.
not_found() {
    ldd "$rho" 2>/dev/null | grep 'not found' | awk '{print $1}'
}
# Without a CUDA installation, the CUDA libraries of the machine's PyTorch environment (its
# nvidia/*/lib directories, nvidia/cu13/lib for CUDA 13 wheels) serve the binary.
if [[ -n "$(not_found)" ]]; then
    for py in python3 python; do
        command -v "$py" >/dev/null || continue
        dirs=$("$py" -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib", "lib*.so*"))})))' 2>/dev/null) || continue
        if [[ -n "$dirs" ]]; then
            export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            echo "CUDA libraries from $py's nvidia packages: $dirs" >&2
            break
        fi
    done
fi
mapfile -t missing < <(not_found)
if [[ ${#missing[@]} -gt 0 ]]; then
    fail "shared libraries the binary needs are not on this machine" "${missing[@]}"
fi

# The kernels' PTX against the driver, before anything runs: a driver loads PTX only up to the
# ISA of its own CUDA version (13.x loads 9.x and older, 12.x up to 8.8; docs/GPU.md).
kernels_ptx=$(grep -a -oE '^\.version [0-9]+\.[0-9]+' "$rho" | cut -d' ' -f2 | sort -V | tail -n1)
if [[ $device == cuda* ]]; then
    driver_cuda=$(nvidia-smi 2>/dev/null | grep -oE 'CUDA Version: [0-9]+\.[0-9]+' | head -n1 | cut -d' ' -f3)
    driver_version=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)
    # The newest PTX ISA a driver of CUDA major.minor loads.
    case ${driver_cuda:-} in
        13.*) loads="9.${driver_cuda#13.}" ;;
        12.6 | 12.7) loads=8.5 ;;
        12.8) loads=8.7 ;;
        12.9) loads=8.8 ;;
        12.*) loads="8.${driver_cuda#12.}" ;;
        *) loads= ;;
    esac
    echo "driver ${driver_version:-unknown} (CUDA ${driver_cuda:-unknown}, loads PTX up to ${loads:-unknown}); kernels: PTX ${kernels_ptx:-none found}" >&2
    if [[ -n "$loads" && -n "$kernels_ptx" && "$(printf '%s\n%s\n' "$kernels_ptx" "$loads" | sort -V | tail -n1)" != "$loads" ]]; then
        fail "the kernels are PTX $kernels_ptx, newer than the $loads that this driver (CUDA $driver_cuda) loads: update the driver (branch 580 or newer for CUDA 13.0, the build's minimum), or build rho with the CUDA toolkit this driver has (docs/GPU.md)" "driver for PTX $kernels_ptx"
    fi
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
