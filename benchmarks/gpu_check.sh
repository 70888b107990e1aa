#!/usr/bin/env bash
# The prepared GPU check (issues 3 and 4): build _C with CUDA, run the kernel and patching tests on the GPU, the
# kernel benchmark, and the end-to-end benchmark on SD1.5 shapes. Meant for the `device` tool, which runs it from
# the repository root on an H100/H200 whose image has torch, Triton, nvcc, pybind11, CMake and ninja but not
# diffusers (and no network):
#
#   make gpu-carry                                   # here: diffusers' sources into .gpu_carry/ (git-ignored)
#   device run  command: bash benchmarks/gpu_check.sh   carry: [".gpu_carry"]   timeout_s: 600
#
# Every step writes its log and results under $OUT as soon as it ends, so a step that runs out of time loses only
# itself; the step timeouts (SIGINT, so pytest still writes its results) are capped by what is left of a 580 s budget,
# so everything fits one device call's 600 s. GPU_CHECK_STEPS="tests e2e" (say) runs a subset on
# a machine still warm from an earlier call (the build is kept there). GPU_CHECK_E2E_ARGS adds arguments to the
# end-to-end step (--channels-last, say). GPU_CHECK_COMPILE=1 adds the torch.compile
# providers to the end-to-end step, whose max-autotune compile can take longer than one call allows. Steps:
#   1. build: ANIMATELCM_CUDA=1, archs 90 (Hopper) only, to keep the compile short;
#   2. tests: the op and patching tests, which on a GPU also run the cuda and triton backends;
#   3. kernel benchmark (SD1.5 shapes, fp16): benchmarks/results/kernels_gpu.md;
#   3b. tune (not in the default steps): benchmarks/tune_group_norm.py, the Triton GroupNorm launch choices;
#   4. end-to-end: SD1.5 + motion modules, random weights, 16 frames at 512x512, 4 steps, fp16, guidance 1 and 2,
#      with MFU and a profile: benchmarks/results/end_to_end_cuda.md, end_to_end_profile_cuda.md;
#   5. host (not in the default steps): the host-bound end-to-end (end_to_end.py --host-bound): the host time of
#      a call, Triton's launches included: benchmarks/results/end_to_end_host_cuda.md (two more files back).
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/.gpu_carry/site${PYTHONPATH:+:$PYTHONPATH}"
STEPS=" ${GPU_CHECK_STEPS:-build tests kernels e2e} "
# At most 8 files come back from the device tool: machine.txt, tests.log, kernels.log, kernels_gpu.{md,csv},
# end_to_end.log, end_to_end_cuda.md, end_to_end_profile_cuda.md (build.log only when the build fails); the tune
# step's tune.log and tune_group_norm_cuda.md make 10, so run it without the kernel step.
log() { echo "[gpu_check $(date +%T)] $*"; }
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
# A step's timeout: its own cap, or what is left of GPU_CHECK_BUDGET (seconds since the script began, default 580,
# under the device call's 600) less 10 s for copying its results, whichever is smaller.
BUDGET=${GPU_CHECK_BUDGET:-580}
step_limit() { local left=$((BUDGET - SECONDS - 10)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }

if wanted build; then
  log "1. build"
  { nvidia-smi; "$PYTHON" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
    > "$OUT/machine.txt" 2>&1
  if ! ANIMATELCM_CUDA=1 ANIMATELCM_CUDA_ARCHS="${ANIMATELCM_CUDA_ARCHS:-90}" \
       "$PYTHON" -m pip install --no-build-isolation --no-deps -e . > /tmp/gpu_check_build.log 2>&1; then
    cp /tmp/gpu_check_build.log "$OUT/build.log"; log "build failed: see build.log"; tail -30 "$OUT/build.log"; exit 1
  fi
  "$PYTHON" -m animatelcm.info 2>&1 | tee -a "$OUT/machine.txt"
fi

if wanted tests; then
  log "2. tests"
  # the patching tests first (their GPU tests: patched vs unpatched, fp16 frames, offload), then the op tests, so
  # a step cut at its cap loses op parametrizations rather than the end-to-end checks
  timeout -s INT -k 10 "$(step_limit 240)" "$PYTHON" -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_patching.py \
    tests/test_attention_op.py tests/test_group_norm_op.py tests/test_consistency_op.py tests/test_geglu_op.py \
    tests/test_scheduler.py > "$OUT/tests.log" 2>&1
  log "tests: $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

if wanted kernels; then
  log "3. kernel benchmark"
  ANIMATELCM_BENCH_NAME=kernels_gpu timeout -s INT -k 10 "$(step_limit 150)" "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/test_kernels.py \
    -k cuda --benchmark-disable-gc > "$OUT/kernels.log" 2>&1
  cp benchmarks/results/kernels_gpu.md benchmarks/results/kernels_gpu.csv "$OUT/" 2>/dev/null
  log "kernels: $(tail -1 "$OUT/kernels.log")"
fi

if wanted tune; then
  log "3b. Triton GroupNorm launch tuning"
  timeout -s INT -k 10 "$(step_limit 120)" "$PYTHON" benchmarks/tune_group_norm.py --out "$OUT/tune_group_norm_cuda.md" \
    > "$OUT/tune.log" 2>&1
  log "tune: $(tail -1 "$OUT/tune.log")"
fi

if wanted e2e; then
  log "4. end-to-end"
  compile_flag=--no-compile
  [ "${GPU_CHECK_COMPILE:-0}" = 1 ] && compile_flag=""
  timeout -s INT -k 10 "$(step_limit 300)" "$PYTHON" benchmarks/end_to_end.py --device cuda --runs 3 --guidance 1 2 --backends cuda --profile $compile_flag ${GPU_CHECK_E2E_ARGS:-} \
    > "$OUT/end_to_end.log" 2>&1
  cp benchmarks/results/end_to_end_cuda.md benchmarks/results/end_to_end_profile_cuda.md "$OUT/" 2>/dev/null
  log "end-to-end: $(tail -3 "$OUT/end_to_end.log" | tr '\n' ' ')"
fi

if wanted host; then
  log "5. host-bound end-to-end (toy widths, 2 frames at 64x64: the host's Python and launches)"
  timeout -s INT -k 10 "$(step_limit 120)" "$PYTHON" benchmarks/end_to_end.py --device cuda --host-bound --runs 10 --guidance 1 2 \
    --backends cuda --no-compile > "$OUT/host.log" 2>&1
  cp benchmarks/results/end_to_end_host_cuda.md "$OUT/" 2>/dev/null
  log "host-bound: $(tail -3 "$OUT/host.log" | tr '\n' ' ')"
fi
