#!/usr/bin/env bash
# GPU checks of the compiled CUDA kernels, run on a lent GPU machine from the
# repository root (OUT: a folder for the logs; default ./gpu-out):
#   bash benchmarks/gpu_checks.sh
# Builds plr_kernels._C in place (CPU + CUDA kernels), runs the CUDA kernel
# tests and the Triton dropout-mask parity test on the GPU, then the CUDA
# inference benchmark and the end-to-end serving benchmark on the GPU.
set -u -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import plr_kernels as K; print(K._extension.build_info(), K.extension_error())"
timeout 180 python3 -m pytest -q -p no:cacheprovider -rf tests/test_cuda_kernels.py \
    "tests/test_stream_attention_cpu.py" -k "cuda or triton or gpu" 2>&1 | tee "$OUT/tests.log" | tail -25
timeout 120 python3 -m pytest -q -p no:cacheprovider -rf tests/test_cuda_causal_stream_attention.py 2>&1 \
    | tee "$OUT/tests_causal.log" | tail -15
timeout 150 python3 benchmarks/bench_cuda_inference.py --out "$OUT/cuda_inference.json" 2>&1 | tee "$OUT/cuda_inference.log" | tail -60
timeout 100 python3 benchmarks/bench_serving.py --device cuda --rounds 3 --min-run-time 0.1 --no-http \
    --json "$OUT/serving_gpu.json" 2>&1 | tee "$OUT/serving_gpu.log" | tail -20
