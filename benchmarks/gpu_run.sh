#!/usr/bin/env bash
# On a lent GPU machine (see the device tool), one step per call so each fits the tool's
# 10-minute limit. The first call of a lent GPU is always
#   FLIX_COMMIT=<commit> bash benchmarks/gpu_run.sh verify      (--dry-run: the CPU check CI runs)
# (benchmarks/gpu_verify.py: every kernel path's tests, the headline, decode and training
# timings and the sanitizers in 9 minutes, build included; 4 files back; then
# `python benchmarks/gpu_import.py <folder>` here files them under benchmarks/results/).
# The other steps go deeper into one area, each on its own:
#   bash benchmarks/gpu_run.sh install|test|sanitize|bench|overhead|kernels|decode|ofa|integrations
# install builds the CUDA extension there (FLIX_CUDA=1: a failed build is an error; FLIX_CUDA=0
# skips it, e.g. for the ofa step, which does not use it).
# Wheels for packages the GPU image lacks (bitsandbytes, torchao, liger-kernel, num2words), fetched
# here by `bash benchmarks/gpu_run.sh wheels` into the git-ignored .whl/, are installed first
# when the call carries .whl. Logs go to $OUT (default /tmp/flix_out); a step that leaves more
# files than the tool returns (8) is packed into $OUT/<step>.tar.gz.
set -u -o pipefail
OUT=${OUT:-/tmp/flix_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step=${1:-}
status=0
# The optional integrations' wheels (see `wheels`): pinned, for Python 3.12 on x86-64 Linux (num2words needs
# docopt only for its command line, which has no wheel).
WHEELS="bitsandbytes==0.50.2 torchao==0.18.0 liger-kernel==0.8.5 num2words==0.5.14"

wheels() {  # run HERE (a machine with network), not on the GPU machine
  rm -rf .whl && mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl $WHEELS && ls -la .whl
}
carried_wheels() {  # on the GPU machine: the carried .whl/, if any, into /tmp/site
  if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} && echo "installed carried wheels: $(ls .whl | tr '\n' ' ')"
  fi
}
pack_out() {  # the device tool returns at most 8 files from $OUT
  local n
  n=$(find "$OUT" -type f | wc -l)
  if [ "$n" -gt 8 ]; then
    tar -czf "/tmp/$step.tar.gz" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "/tmp/$step.tar.gz" "$OUT/"
    echo "packed $n files into \$OUT/$step.tar.gz"
  fi
}

install() {
  carried_wheels
  FLIX_CUDA=${FLIX_CUDA:-1} FLIX_CUDA_ARCHS=${FLIX_CUDA_ARCHS:-90} python -m pip install -v --no-deps --no-build-isolation -e . \
    > "$OUT/install.log" 2>&1 || { tail -60 "$OUT/install.log"; return 1; }
  python -m flix_kernels info | tee "$OUT/info.log"
}
run_tests() {  # the suite on CUDA (both kernel backends, bf16, CUDA graphs, large shapes) on 8 workers; the
  # ahead-of-time compile checks need no GPU (CI runs them), so they are left out
  python -m pytest -q -p no:cacheprovider -rs -n 8 ${TEST_ARGS:-tests --ignore=tests/test_triton_compile.py} 2>&1 \
    | tee "$OUT/pytest.log" | tail -40
}
sanitize() {  # memcheck (both backends) and racecheck (CUDA kernels) on small cases of every path
  if ! command -v compute-sanitizer > /dev/null; then echo "compute-sanitizer not found" | tee "$OUT/sanitize.log"; return 0; fi
  local sel="(test_linear_matches_oracle and packed) or test_dropout_matches or test_both_weight_gradient_paths or large_ranks or test_edge_routings"
  local rc=0
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python -m pytest -q -p no:cacheprovider tests/test_kernel_backends.py -k "$sel" \
    > "$OUT/memcheck.log" 2>&1 || rc=1
  tail -8 "$OUT/memcheck.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 9 \
    python -m pytest -q -p no:cacheprovider tests/test_kernel_backends.py -k "cuda and ($sel) and not bfloat16 and not float16" \
    > "$OUT/racecheck.log" 2>&1 || rc=1
  tail -8 "$OUT/racecheck.log"
  return $rc
}
bench() {  # the flix-kernels bench suite; BENCH_ARGS e.g. "--shapes headline decode --rep-ms 100"
  python -m flix_kernels bench --no-progress ${BENCH_ARGS:-} --out "$OUT/suite" 2>&1 | tee "$OUT/bench.log" | tail -60
}
overhead() {  # the host path: bench --overhead, eager decode, then the 110M training step (about 8 minutes)
  python -m pytest -q -p no:cacheprovider -rs tests/test_overhead.py 2>&1 | tee "$OUT/pytest_overhead.log" | tail -8
  python -m flix_kernels bench --no-progress --overhead --out "$OUT/overhead" 2>&1 | tee "$OUT/overhead.log" | tail -50
  python -m flix_kernels bench --no-progress --shapes decode --rep-ms 100 --out "$OUT/decode" 2>&1 \
    | tee "$OUT/decode.log" | tail -30
}
kernels() {  # the Triton kernels (issue 18): their tests on CUDA (bf16 included), then headline + sweep timings
  python -m pytest -q -p no:cacheprovider -rs tests/test_kernel_backends.py tests/test_triton_backend.py \
    tests/test_traffic.py tests/test_triton_compile.py tests/test_isolation.py 2>&1 \
    | tee "$OUT/pytest_kernels.log" | tail -15
  local rc=${PIPESTATUS[0]}
  python -m flix_kernels bench --no-progress --shapes headline sweep --backends triton torch --rep-ms 100 \
    --out "$OUT/kernels" 2>&1 | tee "$OUT/bench_kernels.log" | tail -40
  rc=$(( rc || PIPESTATUS[0] ))
  # the fused base GEMM (128 x 128 grouped tiles) against cuBLAS + in-place expand, at the headline:
  # through TMA on a persistent grid (Hopper's default), then by pointers (FLIX_TRITON_TMA=0)
  FLIX_FUSE_BASE=1 python -m flix_kernels bench --no-progress --shapes headline --backends triton --no-e2e \
    --rep-ms 100 --out "$OUT/kernels_fused" 2>&1 | tee "$OUT/bench_kernels_fused.log" | tail -20
  rc=$(( rc || PIPESTATUS[0] ))
  FLIX_FUSE_BASE=1 FLIX_TRITON_TMA=0 python -m flix_kernels bench --no-progress --shapes headline --backends triton \
    --no-e2e --rep-ms 100 --out "$OUT/kernels_fused_pointers" 2>&1 | tee "$OUT/bench_kernels_fused_pointers.log" | tail -20
  rc=$(( rc || PIPESTATUS[0] ))
  # g and dB by two passes over dy, against the one-pass default above
  FLIX_TRITON_DY_PASS=0 python -m flix_kernels bench --no-progress --shapes headline --backends triton --no-e2e \
    --rep-ms 100 --out "$OUT/kernels_two_pass" 2>&1 | tee "$OUT/bench_kernels_two_pass.log" | tail -20
  return $(( rc || PIPESTATUS[0] ))
}
decode() {  # the CUDA decode path (issue 19): its tests, the four sanitizers on them, decode and serving timings
  python -m pytest -q -p no:cacheprovider -rs tests/test_cuda_decode.py tests/test_cuda_backend.py 2>&1 \
    | tee "$OUT/pytest_decode.log" | tail -15
  local rc=${PIPESTATUS[0]}
  if command -v compute-sanitizer > /dev/null; then
    local sel="(test_decode_matches_the_oracle and bfloat16-bfloat16) or test_forced_splits or packed or deterministic"
    local tool
    for tool in memcheck racecheck initcheck synccheck; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
        python -m pytest -q -p no:cacheprovider tests/test_cuda_decode.py -k "$sel" > "$OUT/sanitize_$tool.log" 2>&1 \
        || rc=1
      echo "$tool: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitize_$tool.log" | tail -2 | tr '\n' ' ')"
    done
  else
    echo "compute-sanitizer not found" | tee "$OUT/sanitize_decode.log"
  fi
  # one layer (in = out = 4096) at T = 1, 8, 64: every backend, eager and CUDA graph, against F.linear
  python -m flix_kernels bench --no-progress --shapes decode --no-e2e --rep-ms 100 --out "$OUT/decode" 2>&1 \
    | tee "$OUT/bench_decode.log" | tail -30
  rc=$(( rc || PIPESTATUS[0] ))
  # the general CUDA kernels at the same shapes (shrink, cuBLAS, expand), for the decode path's gain
  FLIX_CUDA_DECODE=0 python -m flix_kernels bench --no-progress --shapes decode --backends cuda --no-e2e \
    --rep-ms 100 --out "$OUT/decode_general" 2>&1 | tee "$OUT/bench_decode_general.log" | tail -12
  rc=$(( rc || PIPESTATUS[0] ))
  python -m flix_kernels bench --no-progress --serving --rep-ms 100 --out "$OUT/serving" 2>&1 \
    | tee "$OUT/bench_serving.log" | tail -40
  return $(( rc || PIPESTATUS[0] ))
}
integrations() {  # issue 20: quantized bases (bitsandbytes CUDA kernels, torchao), compiled training with the
  # kernel backends, Liger's four kernels, the README snippets; then bench --quantized (e2e and 1.1B models)
  python -m pytest -q -p no:cacheprovider -rs tests/test_quantized.py tests/test_compiled_training.py \
    tests/test_liger.py tests/test_readme.py 2>&1 | tee "$OUT/pytest_integrations.log" | tail -15
  local rc=${PIPESTATUS[0]}
  python -m flix_kernels bench --no-progress --quantized --out "$OUT/quantized" 2>&1 \
    | tee "$OUT/bench_quantized.log" | tail -30
  return $(( rc || PIPESTATUS[0] ))
}
ofa() {  # OFA: its tests on CUDA (bf16, CUDA graphs, torch.compile), then benchmarks/bench_ofa.py
  python -m pytest -q -p no:cacheprovider -rs tests/test_ofa_kernel.py tests/test_ofa.py 2>&1 | tee "$OUT/pytest_ofa.log" | tail -15
  local rc=${PIPESTATUS[0]}
  python benchmarks/bench_ofa.py --out "$OUT/ofa" 2>&1 | tee "$OUT/bench_ofa.log" | tail -40
  return $(( rc || PIPESTATUS[0] ))
}

case "$step" in
  wheels) wheels || status=1; exit $status ;;
  verify) carried_wheels; "${PYTHON:-python3}" benchmarks/gpu_verify.py "${@:2}" || status=1; exit $status ;;
  install) install || status=1 ;;
  test) install && run_tests || status=1 ;;
  sanitize) install && sanitize || status=1 ;;
  bench) install && bench || status=1 ;;
  overhead) install && overhead || status=1 ;;
  kernels) FLIX_CUDA=${FLIX_CUDA:-0} install && kernels || status=1 ;;
  decode) install && decode || status=1 ;;
  ofa) install && ofa || status=1 ;;
  integrations) install && integrations || status=1 ;;
  *) echo "usage: $0 verify [--dry-run]|wheels|install|test|sanitize|bench|overhead|kernels|decode|ofa|integrations"
     exit 2 ;;
esac
pack_out
exit $status
