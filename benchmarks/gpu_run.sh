#!/usr/bin/env bash
# On a lent GPU machine (see the device tool), one step per call so each fits the tool's
# 10-minute limit:  bash benchmarks/gpu_run.sh install|test|sanitize|bench|all
# Full logs go to $OUT (default /tmp/flix_out); copy $OUT/results/* into
# benchmarks/results/<device>/ and commit them.
set -u -o pipefail
OUT=${OUT:-/tmp/flix_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step=${1:-all}
status=0

install() {
  python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; return 1; }
  python -m flix_kernels info | tee "$OUT/info.log"
}
run_tests() {  # the whole suite on CUDA: bf16, CUDA graphs, large shapes, compile checks
  python -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$OUT/pytest.log" | tail -25
}
sanitize() {  # memcheck on small cases of every kernel (both weight-gradient paths, dropout, fused)
  if ! command -v compute-sanitizer > /dev/null; then echo "compute-sanitizer not found" | tee "$OUT/memcheck.log"; return 0; fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python -m pytest -q -p no:cacheprovider tests/test_triton_backend.py \
    -k "(test_linear_matches_oracle and packed-) or test_dropout_matches or test_both_weight_gradient_paths or large_ranks" \
    2>&1 | tee "$OUT/memcheck.log" | tail -25
}
bench() {
  python benchmarks/bench_triton.py ${BENCH_ARGS:-} --out "$OUT/results" 2>&1 | tee "$OUT/bench.log" | tail -40
}

case "$step" in
  install) install || status=1 ;;
  test) install && run_tests || status=1 ;;
  sanitize) install && sanitize || status=1 ;;
  bench) install && bench || status=1 ;;
  all) install && { run_tests || status=1; sanitize || status=1; bench || status=1; } ;;
  *) echo "usage: $0 install|test|sanitize|bench|all"; exit 2 ;;
esac
exit $status
