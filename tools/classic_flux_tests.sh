#!/usr/bin/env bash
# The classic library's own Flux fast tests, run on the classic classes and on stepdiff's (issue 27).
#
#   DIFFUSERS_SRC=/path/to/classic/checkout bash tools/classic_flux_tests.sh [diffusers|stepdiff|both] [pytest args]
#
# Uses the shared harness of the classic fast tests (/work/shared/classic-tests, or $CLASSIC_TESTS): its pytest
# plugin classic_shim.py swaps every classic pipeline class stepdiff exports (FluxPipeline, FluxImg2ImgPipeline,
# FluxInpaintPipeline among them) for stepdiff's when DIFFTEST_IMPL=stepdiff, redirects the hub ids of the tiny
# tokenizers and text encoders to local stand-ins, and fails a test that builds a classic class by accident. The
# node ids are the classic repository's tests/pipelines/flux/test_pipeline_flux{,_img2img,_inpaint}.py (measured at
# commit 58eb52c0; a copy of its tests/ tree: git archive 58eb52c0 tests | tar -x -C $DIFFUSERS_SRC). The slow and
# GPU-only classes skip themselves. Junit and logs go to $DIFFTEST_OUT (default /tmp/classic-flux-tests); then
#   python $CLASSIC_TESTS/score.py  (or read the last line of each out_*.txt)
set -u
WHICH=${1:-both}; shift || true
HERE="$(cd "$(dirname "$0")" && pwd)"
SHIM="${CLASSIC_TESTS:-/work/shared/classic-tests}"
SRC="${DIFFUSERS_SRC:?set DIFFUSERS_SRC to a source checkout of the classic library (its tests/ tree)}"
OUT="${DIFFTEST_OUT:-/tmp/classic-flux-tests}"
export DIFFTEST_LOCAL2="${DIFFTEST_LOCAL2:-$OUT/local2}"
mkdir -p "$OUT"
[ -f "$SHIM/local/tiny-random-clip/vocab.json" ] || python "$SHIM/build_tokenizers.py" "$SHIM/local" "$SHIM/corpus.txt" || exit 1
[ -f "$DIFFTEST_LOCAL2/tiny-random-t5/model.safetensors" ] || python "$SHIM/build_standins.py" "$DIFFTEST_LOCAL2" || exit 1
TESTS=(tests/pipelines/flux/test_pipeline_flux.py tests/pipelines/flux/test_pipeline_flux_img2img.py
       tests/pipelines/flux/test_pipeline_flux_inpaint.py)
case "$WHICH" in both) IMPLS=(diffusers stepdiff);; diffusers|stepdiff) IMPLS=("$WHICH");;
  *) echo "usage: classic_flux_tests.sh [diffusers|stepdiff|both] [pytest args]"; exit 2;; esac
unset DIFFUSERS_VERBOSITY TRANSFORMERS_VERBOSITY PYTHONWARNINGS   # some upstream tests assert on logged warnings
for IMPL in "${IMPLS[@]}"; do
  (cd "$SRC" && PYTHONPATH="$SHIM" HF_HUB_OFFLINE=1 DIFFTEST_IMPL=$IMPL OMP_NUM_THREADS=1 \
    python -m pytest -p classic_shim -p no:cacheprovider -q -rA --timeout=300 --junitxml="$OUT/junit_$IMPL.xml" \
    "${TESTS[@]}" "$@" > "$OUT/out_$IMPL.txt" 2>&1)
  echo "$IMPL: $(tail -1 "$OUT/out_$IMPL.txt")  (exit $?; $OUT/out_$IMPL.txt)"
done
