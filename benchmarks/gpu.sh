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
# 4. Print sizes: peak CUDA memory and seconds per step of one pair at 2048 and 4096 px (bf16, 3 steps,
#    each size in a fresh process: benchmarks/bench_memory.py), to check the engine's memory model.
# 5. Learned networks: a training step and a forward pass at 512 and 1024 px (bench_network.py --gpu-only).
# 6. The CLI end to end with the defaults: run, resume, status.
# Every part has its own time limit, so a slow part cannot eat the next one's budget.
# PARTS="1024 network memory cli" runs only those parts (names: 512 compile 1024 network memory cli),
# for a second look inside a short lease.
#
#     PARTS=throughput bash benchmarks/gpu.sh     # its own lease: at most ~9.5 minutes, not in the default set
#
# It first runs tests/core/test_graphs.py on the card (the CUDA-graph test the CPU skips), then:
# throughput: pairs/hour through Engine.make at 512 px (3:2 photos, 300 steps, one scale) for batch 1, 8,
# 32, 64 and auto, with CUDA graphs (and batch 1 and 8 without), each with its mean final loss and its share
# of the card's bf16 peak; every L-BFGS chunk under torch.cuda.set_sync_debug_mode("error")
# (benchmarks/bench_gpu_throughput.py). A row predicted to end past 360 s is skipped and says so.
#
#     PARTS=slice bash benchmarks/gpu.sh          # its own lease too: ~5 minutes
#
# slice: a 10,000 photos x 20 styles plan (3:2 photos at 512 px, the defaults with method optimize and
# batch auto), its shard 0 of 100 (~2,000 pairs of every style) run end to end through the CLI for 200 s
# and stopped with Ctrl-C: start-up, pairs/hour, mean final loss, the GPU's busy share (nvidia-smi) and
# the whole plan's projected hours (benchmarks/bench_slice.py).
# Images: $IMAGES, else ../shared/images, else the repository's bundled data/ (3 contents x 3 styles).
set -uo pipefail
cd "$(dirname "$0")/.."
# Runs from a plain checkout too (a lent GPU machine has no `pip install -e .`).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
out="${OUT:-benchmarks/gpu-results}"
mkdir -p "$out"
images="${IMAGES:-../shared/images}"
if [ ! -d "$images/content" ]; then
    echo "no $images/content here: using the repository's bundled data/ images"
    images=data
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "PyTorch sees no CUDA GPU: nothing to benchmark" >&2
    exit 2
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv; nvidia-smi; } \
    > "$out/nvidia-smi.txt" 2>&1 || true

bench() {  # bench LIMIT_S NAME ARGS...: one part, output to the terminal and to $out/NAME.txt
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s) =="
    timeout "$limit" "$py" benchmarks/bench_throughput.py --device cuda --images "$images" \
        --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "== $name: stopped at its ${limit}s limit ==" | tee -a "$out/$name.txt"
    return 0
}

want() { [ -z "${PARTS:-}" ] || [[ " $PARTS " == *" $1 "* ]]; }
asked() { [[ " ${PARTS:-} " == *" $1 "* ]]; }  # a part run only when PARTS names it
start=$SECONDS
if asked throughput; then
    echo "== graphs test (limit 90s): captured, replayed, no host read inside a chunk, eager's images =="
    timeout 90 "$py" -m pytest -q -p no:cacheprovider tests/core/test_graphs.py 2>&1 | tee "$out/graphs_test.txt"
    echo "== throughput (limit 480s) =="
    timeout 480 "$py" benchmarks/bench_gpu_throughput.py --device cuda --images "$images" --size 512 --steps 300 \
        --batches 1,8,32,64,auto --eager 1,8 --budget-s 360 --json "$out/throughput.json" 2>&1 \
        | tee "$out/throughput.txt"
    [ "${PIPESTATUS[0]}" = 124 ] && echo "== throughput: stopped at its 480s limit ==" | tee -a "$out/throughput.txt"
fi
if asked slice; then
    echo "== slice (limit 330s): shard 0/100 of 10,000 x 20 at 512 px, 200 s of making =="
    timeout 330 "$py" benchmarks/bench_slice.py --device cuda --images "$images" --seconds 200 \
        --json "$out/slice.json" 2>&1 | tee "$out/slice.txt"
    [ "${PIPESTATUS[0]}" = 124 ] && echo "== slice: stopped at its 330s limit ==" | tee -a "$out/slice.txt"
fi
want 512 && bench 300 gpu_512 --size 512 --pairs 2x2 --loop-frozen \
    --config "fp32:precision=fp32;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16:precision=bf16;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16-no-channels-last:precision=bf16;steps=300;channels_last=false;scales=[1.0];stop_window=0" \
    --config "bf16-no-cudnn-benchmark:precision=bf16;steps=300;cudnn_benchmark=false;scales=[1.0];stop_window=0" \
    --config "bf16-c2f:precision=bf16;scales=[0.5,1.0];steps=250;stop_window=0" \
    --config "bf16-c2f-150:precision=bf16;scales=[0.5,1.0];steps=150;stop_window=0" \
    --batch --profile --memory-sizes 512,1024,2048
want compile && bench 150 gpu_512_compile --size 512 --pairs 1x2 --no-default-row \
    --config "bf16:precision=bf16;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16-compile:precision=bf16;steps=300;compile=true;scales=[1.0];stop_window=0"
want 1024 && bench 120 gpu_1024 --size 1024 --pairs 1x2 --no-default-row \
    --config "fp32:precision=fp32;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16:precision=bf16;steps=300;scales=[1.0];stop_window=0" \
    --config "bf16-c2f:precision=bf16;scales=[0.5,1.0];steps=250;stop_window=0"
if want network; then
    echo "== network (limit 60s) =="  # learned networks: a training step and a forward pass at 512 and 1024 px
    timeout 60 "$py" benchmarks/bench_network.py --device cuda --gpu-only --json "$out/network.json" 2>&1 \
        | tee "$out/network.txt"
fi
if want memory; then
    echo "== gpu_memory (limit 60s) =="
    timeout 60 "$py" benchmarks/bench_memory.py --device cuda --precision auto --sizes 2048,4096 --steps 3 \
        --timeout 25 --json "$out/gpu_memory.json" 2>&1 | tee "$out/gpu_memory.txt"
    [ "${PIPESTATUS[0]}" = 124 ] && echo "== gpu_memory: stopped at its 60s limit ==" | tee -a "$out/gpu_memory.txt"
fi
# 4. The CLI end to end on the GPU (device auto, so the defaults a user gets): 2 photos x 2 styles at 512 px,
#    then a resume that must find nothing to do, then status; then method network on 2 photos x 1 style.
#    Whatever time is left of 580 s, at most 90 s for the first run.
left=$((580 - (SECONDS - start)))
[ "$left" -gt 90 ] && left=90
if want cli && [ "$left" -gt 20 ]; then
    echo "== cli (limit ${left}s) =="
    tmp=$(mktemp -d)
    mkdir -p "$tmp/content" "$tmp/styles"
    ls "$images"/content/*.jpg | head -2 | xargs -I{} cp {} "$tmp/content/"
    ls "$images"/styles/*.jpg | head -2 | xargs -I{} cp {} "$tmp/styles/"
    t0=$SECONDS
    { timeout "$left" "$py" -m nst_batch run --content "$tmp/content" --styles "$tmp/styles" --out "$tmp/out" \
          --size 512 --steps 300 --quiet
      echo "run rc=$? in $((SECONDS - t0)) s"
      "$py" -m nst_batch run --content "$tmp/content" --styles "$tmp/styles" --out "$tmp/out" --size 512 --steps 300 --quiet
      echo "resume rc=$?"
      "$py" -m nst_batch status "$tmp/out"
      head -3 "$tmp/out/losses.csv"
      # The learned-network path end to end: one style, its network trained briefly, then 2 photos.
      t0=$SECONDS
      rm "$tmp/styles/$(ls "$tmp/styles" | tail -1)"
      timeout 60 "$py" -m nst_batch run --content "$tmp/content" --styles "$tmp/styles" --out "$tmp/out-net" \
          --size 512 --set method=network --set network_steps=200 --quiet
      echo "network run rc=$? in $((SECONDS - t0)) s"
      "$py" -m nst_batch status "$tmp/out-net"
    } > "$out/cli.txt" 2>&1
    cat "$out/cli.txt"
fi
echo "total $((SECONDS - start)) s; results in $out"
