#!/usr/bin/env bash
# One call on a lent GPU machine (see the device tool): install, test, sanitize, benchmark.
# Logs and results go to $OUT (default /tmp/flix_out); copy the results folder back into
# benchmarks/results/<device>/ and commit it.
set -u -o pipefail
OUT=${OUT:-/tmp/flix_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python -c "import flix_kernels as fk; print(fk.available_backends('cuda'))" | tee "$OUT/backends.log"
# The whole suite on CUDA (bf16 cases and GPU-only tests included).
python -m pytest -q -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/pytest.log" || status=1
# Memory errors on a small case of every kernel (packed layout, fused and unfused paths, dropout).
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -p no:cacheprovider \
    tests/test_triton_backend.py -k "(test_linear_matches_oracle and packed-) or test_dropout_matches" \
    2>&1 | tail -30 | tee "$OUT/memcheck.log" || status=1
else
  echo "compute-sanitizer not found" | tee "$OUT/memcheck.log"
fi
python benchmarks/bench_triton.py ${BENCH_ARGS:-} --out "$OUT/results" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
