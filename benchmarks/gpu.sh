#!/usr/bin/env bash
# The whole GPU benchmark, one command, under 10 minutes on an H100/H200:
#
#     bash benchmarks/gpu.sh            # from anywhere; results in $OUT (if set) or benchmarks/gpu-results/
#
# 1. 512 px, 2 contents x 2 styles: the tutorial loop (as written, and with VGG frozen) vs nst-batch in
#    fp32 and bf16, with and without channels_last and cudnn.benchmark, coarse to fine, and the
#    default (gatys) row; pairs/hour, ratios, TFLOP/s vs the card's peak; B=2 batching; a profile;
#    peak memory at 512/1024/2048 px.
# 2. torch.compile, 512 px, 1 content x 2 styles (one shape, so one compile, paid in the warm-up).
# 3. 1024 px, 1 content x 2 styles: loop vs fp32, bf16 and bf16 coarse to fine.
# Every part has its own time limit, so a slow part cannot eat the next one's budget.
# Images: $IMAGES, else ../shared/images, else the repository's bundled data/ (3 contents x 3 styles).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu-results}"
mkdir -p "$out"
images="${IMAGES:-../shared/images}"
if [ ! -d "$images/content" ]; then
    echo "no $images/content here: using the repository's bundled data/ images"
    images=data
fi
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "PyTorch sees no CUDA GPU: nothing to benchmark" >&2
    exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv; nvidia-smi; } \
    > "$out/nvidia-smi.txt" 2>&1 || true

bench() {  # bench LIMIT_S NAME ARGS...: one part, output to the terminal and to $out/NAME.txt
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s) =="
    timeout "$limit" python benchmarks/bench_throughput.py --device cuda --images "$images" \
        --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "== $name: stopped at its ${limit}s limit ==" | tee -a "$out/$name.txt"
    return 0
}

start=$SECONDS
bench 300 gpu_512 --size 512 --pairs 2x2 --loop-frozen \
    --config "fp32:precision=fp32;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16:precision=bf16;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16-no-channels-last:precision=bf16;steps=300;channels_last=false;scales=[1.0];stop_window=0" \
    --config "bf16-no-cudnn-benchmark:precision=bf16;steps=300;cudnn_benchmark=false;scales=[1.0];stop_window=0" \
    --config "bf16-c2f:precision=bf16;scales=[0.5,1.0];steps=250;stop_window=0" \
    --config "bf16-c2f-150:precision=bf16;scales=[0.5,1.0];steps=150;stop_window=0" \
    --batch --profile --memory-sizes 512,1024,2048
bench 150 gpu_512_compile --size 512 --pairs 1x2 --no-default-row \
    --config "bf16:precision=bf16;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16-compile:precision=bf16;steps=300;compile=true;scales=[1.0];stop_window=0"
bench 120 gpu_1024 --size 1024 --pairs 1x2 --no-default-row \
    --config "fp32:precision=fp32;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16:precision=bf16;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16-c2f:precision=bf16;scales=[0.5,1.0];steps=250;stop_window=0"
echo "== network (limit 60s) =="  # issue 13: a training step and a forward pass at 512 and 1024 px
timeout 60 python benchmarks/bench_network.py --device cuda --gpu-only --json "$out/network.json" 2>&1 \
    | tee "$out/network.txt"
echo "total $((SECONDS - start)) s; results in $out"
