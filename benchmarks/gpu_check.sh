#!/usr/bin/env bash
# Every check that needs a GPU, in one call (sized for about 8 minutes on one H100/H200):
#   build hkd._C with CUDA for this card, `hkd info`, the cuda-marked tests and the Triton tests compiled for the GPU
#   (not the interpreter), then the kernel and model benchmarks. Logs go to $OUT (or ./gpu_check): copy the numbers,
#   the card and this command into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#
# Works offline: the build uses the installed torch, scikit-build-core, cmake and ninja (--no-build-isolation
# --no-deps); a missing test dependency skips its tests rather than failing the build.
set -uo pipefail
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() { echo "== $* ($(date +%T))"; }

step build
arch=$($py -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))") || exit 1
HKD_CUDA=on HKD_CUDA_ARCHITECTURES="$arch" CMAKE_BUILD_PARALLEL_LEVEL=16 \
  $py -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
$py -m hkd.cli info | tee "$out/info.txt"

step tests: cuda and triton on the GPU
timeout 240 $py -m pytest -q -m "cuda or triton" -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" | tail -25

step benchmarks
timeout 150 $py -m hkd.cli bench spectral --device cuda --batch 64 256 2>&1 | tee "$out/bench_spectral.txt"
timeout 90 $py -m hkd.cli bench dense --device cuda 2>&1 | tee "$out/bench_dense.txt"
timeout 60 $py benchmarks/bench_train_step.py --device cuda --preset cifar 2>&1 | tee "$out/bench_train_step.txt"
timeout 60 $py benchmarks/bench_generation.py --device cuda --preset cifar 2>&1 | tee "$out/bench_generation.txt"
step done
