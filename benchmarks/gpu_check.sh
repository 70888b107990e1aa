#!/usr/bin/env bash
# The prepared GPU check (issues 3 and 4): build _C with CUDA, run the kernel and patching tests on the GPU, the
# end-to-end benchmark on SD1.5 shapes, its host-bound mode and the kernel benchmark. Meant for the `device` tool,
# which runs it from the repository root on an H100/H200 whose image has torch, Triton, nvcc, pybind11, CMake,
# ninja but not diffusers (and no network):
#
#   make gpu-carry                                   # here: diffusers' sources into .gpu_carry/ (git-ignored)
#   device run  command: bash benchmarks/gpu_check.sh   carry: [".gpu_carry"]   timeout_s: 600
#
# Every step's log and results go into one archive, $OUT/gpu_check.tar (the device tool brings back at most 8
# files; read it with `tar -xf gpu_check.tar`), rewritten as soon as a step ends, so a step that runs out of time
# loses only itself. The step timeouts (SIGINT, so pytest still writes its results) are capped by what is left of a
# 580 s budget, so everything fits one device call's 600 s. GPU_CHECK_STEPS="tests e2e" (say) runs those steps in
# that order (default "build e2e host tests kernels"); on a machine still warm from an earlier call the build is
# kept there. GPU_CHECK_E2E_ARGS sets extra arguments of the end-to-end step (default --backends cuda triton: the
# patch with every op that has a CUDA C++ kernel on it, and with every op that has a Triton one on it, beside the
# default that splits them by size; --channels-last, say). The steps:
#   build:   ANIMATELCM_CUDA=1, archs 90 (Hopper) only, to keep the compile short;
#   e2e:     SD1.5 + motion modules, random weights, 16 frames at 512x512, 4 steps, fp16, guidance 1 and 2, with MFU,
#            the VAE decode alone, a profile and where the host's time goes: end_to_end_cuda.md,
#            end_to_end_profile_cuda.md, end_to_end_cuda_host_profile.md;
#   host:    the host-bound end-to-end (end_to_end.py --host-bound): the host time of a call, Triton's launches
#            included, and where it goes: end_to_end_host_cuda.md, end_to_end_host_cuda_host_profile.md;
#   tests:   the patching and op tests that run on the GPU (the cuda and triton backends, the GPU pipeline tests;
#            GPU_CHECK_TESTS_K="" runs them all, about 400, longer than the step's cap);
#   kernels: the kernel benchmark (SD1.5 shapes, fp16): kernels_gpu.{md,csv} (GPU_CHECK_KERNELS_K selects);
#   compile: (not in the default steps; best alone in a call) diffusers, the patch and the patch + CUDA graph
#            against torch.compile(unet, max-autotune) at guidance 1: end_to_end_compile_cuda.md. The compile takes
#            more than one call: its autotuning results come back as $OUT/inductor_autotune.tar.gz; commit it as
#            benchmarks/results/inductor_autotune_h100.tar.gz, which `make gpu-carry` unpacks into .inductor_cache
#            (git-ignored), and carry that in the next call (carry: [".gpu_carry", ".inductor_cache"]);
#   tune:    (not in the default steps) benchmarks/tune_group_norm.py: the Triton GroupNorm launch choices and the
#            CUDA C++ kernel's two paths (its log has each shape's row as soon as it is timed;
#            GPU_CHECK_TUNE_PROVIDERS, ';'-separated column names, selects);
#   ncu:     (not in the default steps) Nsight Compute's counters for the GroupNorm kernels at the roofline shape and a
#            VAE one (tune_group_norm.py --ncu; GPU_CHECK_NCU_SHAPES, space-separated, and GPU_CHECK_NCU_PROVIDERS,
#            ';'-separated column names, select): ncu_group_norm.txt.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_check_out}
RESULTS=/tmp/gpu_check_results
rm -rf "$RESULTS"  # this call's results only (a machine can keep /tmp from an earlier lease)
mkdir -p "$OUT" "$RESULTS"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/.gpu_carry/site${PYTHONPATH:+:$PYTHONPATH}"
# the steps to run, in this order
STEPS=${GPU_CHECK_STEPS:-build e2e host tests kernels}
STEP_NAMES="build e2e host tests kernels compile tune ncu"
# what the tests and kernels steps select: by default the tests that run on the GPU (CI runs the others) and every
# kernel benchmark on CUDA tensors
TESTS_K=${GPU_CHECK_TESTS_K-cuda or triton or gpu or offload}
KERNELS_K=${GPU_CHECK_KERNELS_K-cuda}
log() { echo "[gpu_check $(date +%T)] $*"; }
pack() { tar -cf "$OUT/gpu_check.tar" -C "$RESULTS" .; }
# A step's timeout: its own cap, or what is left of GPU_CHECK_BUDGET (seconds since the script began, default 580,
# under the device call's 600) less 10 s for packing its results, whichever is smaller.
BUDGET=${GPU_CHECK_BUDGET:-580}
step_limit() { local left=$((BUDGET - SECONDS - 10)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }

step_build() {
  log "build"
  { nvidia-smi; "$PYTHON" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
    > "$RESULTS/machine.txt" 2>&1
  if ! ANIMATELCM_CUDA=1 ANIMATELCM_CUDA_ARCHS="${ANIMATELCM_CUDA_ARCHS:-90}" \
       "$PYTHON" -m pip install --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1; then
    pack; log "build failed: see build.log"; tail -30 "$RESULTS/build.log"; exit 1
  fi
  "$PYTHON" -m animatelcm.info 2>&1 | tee -a "$RESULTS/machine.txt"
  pack
}


step_e2e() {
  log "end-to-end"
  timeout -s INT -k 10 "$(step_limit 240)" "$PYTHON" benchmarks/end_to_end.py --device cuda --runs 3 --guidance 1 2 --profile \
    --decode-alone --host-profile --no-compile ${GPU_CHECK_E2E_ARGS---backends cuda triton} > "$RESULTS/end_to_end.log" 2>&1
  cp benchmarks/results/end_to_end_cuda.md benchmarks/results/end_to_end_profile_cuda.md \
    benchmarks/results/end_to_end_cuda_host_profile.md "$RESULTS/" 2>/dev/null
  pack
  log "end-to-end: $(tail -3 "$RESULTS/end_to_end.log" | tr '\n' ' ')"
  grep -E "^\| (diffusers|patched)" "$RESULTS/end_to_end_cuda.md" 2>/dev/null
}


step_host() {
  log "host-bound end-to-end (toy widths, 16 frames at 64x64: the host's Python and the real call's launches)"
  timeout -s INT -k 10 "$(step_limit 90)" "$PYTHON" benchmarks/end_to_end.py --device cuda --host-bound --frames 16 \
    --runs 10 --guidance 1 2 --backends cuda --no-compile --host-profile > "$RESULTS/host.log" 2>&1
  cp benchmarks/results/end_to_end_host_cuda.md benchmarks/results/end_to_end_host_cuda_host_profile.md "$RESULTS/" \
    2>/dev/null
  pack
  log "host-bound: $(tail -3 "$RESULTS/host.log" | tr '\n' ' ')"
  grep -E "^\| (diffusers|patched)" "$RESULTS/end_to_end_host_cuda.md" 2>/dev/null
}


step_tests() {
  log "tests"
  timeout -s INT -k 10 "$(step_limit 170)" "$PYTHON" -m pytest -q -rfE --tb=short -p no:cacheprovider -k "$TESTS_K" \
    tests/test_patching.py tests/test_attention_op.py tests/test_group_norm_op.py tests/test_consistency_op.py \
    tests/test_geglu_op.py tests/test_op_layouts.py tests/test_scheduler.py > "$RESULTS/tests.log" 2>&1
  pack
  log "tests: $(tail -1 "$RESULTS/tests.log")"
  grep -E "^(FAILED|ERROR)" "$RESULTS/tests.log" | head -20
}


step_kernels() {
  log "kernel benchmark"
  ANIMATELCM_BENCH_NAME=kernels_gpu timeout -s INT -k 10 "$(step_limit 150)" "$PYTHON" -m pytest -q -p no:cacheprovider \
    benchmarks/test_kernels.py -k "$KERNELS_K" --benchmark-disable-gc > "$RESULTS/kernels.log" 2>&1
  cp benchmarks/results/kernels_gpu.md benchmarks/results/kernels_gpu.csv "$RESULTS/" 2>/dev/null
  pack
  log "kernels: $(tail -1 "$RESULTS/kernels.log")"
}


step_compile() {
  log "end-to-end against torch.compile(unet, max-autotune), guidance 1 (the compile takes most of the step)"
  # Inductor's autotuning timings (written as each matrix product's choices are timed) and its pointwise kernels'
  # best configs accumulate in .inductor_cache across calls and leases: the full UNet's max-autotune compile takes
  # longer than one call (run 9: 22 products timed in 400 s, unfinished). They come back as
  # $OUT/inductor_autotune.tar.gz; commit it as benchmarks/results/inductor_autotune_h100.tar.gz (`make gpu-carry`
  # unpacks it into .inductor_cache) and carry that folder in the next call, in this lease or a later one.
  mkdir -p .inductor_cache
  TORCHINDUCTOR_CACHE_DIR="$PWD/.inductor_cache" timeout -s INT -k 10 "$(step_limit 540)" "$PYTHON" \
    benchmarks/end_to_end.py --device cuda --runs 3 --guidance 1 --compile-mode max-autotune --compile-baseline-only \
    --results-name end_to_end_compile_cuda > "$RESULTS/compile.log" 2>&1
  cp benchmarks/results/end_to_end_compile_cuda.md "$RESULTS/" 2>/dev/null
  (cd .inductor_cache && find . -path ./cache -prune -o -name '*.best_config' -print | { cat; [ -d cache ] && echo cache; } \
     | tar -czf "$OUT/inductor_autotune.tar.gz" -T -)
  pack
  log "compile: $(grep -c 'AUTOTUNE benchmarking' "$RESULTS/compile.log") products timed this call; $(tail -3 "$RESULTS/compile.log" | tr '\n' ' ')"
}


step_tune() {
  log "GroupNorm tuning"
  local selection=()
  if [ -n "${GPU_CHECK_TUNE_PROVIDERS:-}" ]; then
    IFS=';' read -ra TUNE_PROVIDERS <<< "$GPU_CHECK_TUNE_PROVIDERS"
    selection=(--providers "${TUNE_PROVIDERS[@]}")
  fi
  timeout -s INT -k 10 "$(step_limit 200)" "$PYTHON" benchmarks/tune_group_norm.py --out "$RESULTS/tune_group_norm_cuda.md" \
    "${selection[@]}" > "$RESULTS/tune.log" 2>&1
  pack
  log "tune: $(tail -1 "$RESULTS/tune.log")"
}

step_ncu() {
  log "Nsight Compute: the GroupNorm kernels' hardware counters at the roofline shape"
  # what bounds them short of the copy's bandwidth: DRAM and L2 throughput, the second read's L2 hits, occupancy,
  # warp stalls. --clock-control none: the device tool's METHOD.md says to leave the clocks alone.
  IFS=';' read -ra NCU_PROVIDERS <<< "${GPU_CHECK_NCU_PROVIDERS:-triton (as dispatched);forward, no L2 hints;cuda;F.group_norm + F.silu}"
  timeout -s INT -k 10 "$(step_limit 150)" ncu --clock-control none --profile-from-start off \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    "$PYTHON" benchmarks/tune_group_norm.py --ncu --shapes ${GPU_CHECK_NCU_SHAPES:-32x320x64x64 16x512x128x128} \
    --providers "${NCU_PROVIDERS[@]}" \
    > "$RESULTS/ncu_group_norm.txt" 2>&1
  pack
  log "ncu: $(grep -c 'Section: GPU Speed Of Light' "$RESULTS/ncu_group_norm.txt") kernels profiled"
}

for step in $STEPS; do
  case " $STEP_NAMES " in
    *" $step "*) "step_$step" ;;
    *) log "unknown step '$step' (steps: $STEP_NAMES): skipped" ;;
  esac
done
log "done in ${SECONDS} s"
