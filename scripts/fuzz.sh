#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for FUZZ_SECONDS each (default 30), one after the
# other, and writes target/fuzz-summary.md. Exits non-zero if any target crashed (or timed out,
# or ran out of memory), naming the input that did it.
#
#   make fuzz                         # every target, 30 s each
#   make fuzz FUZZ_SECONDS=60         # the run docs/reliability.md reports
#   FUZZ_TARGETS="cache_http" scripts/fuzz.sh
#   FUZZ_BUILD=0 ...                  # run the binaries already in fuzz/target
#
# The seed corpora in fuzz/corpus/<target> are read-only inputs: what the fuzzer finds goes to
# target/fuzz-corpus/<target>, which starts empty and is kept between runs.
# Crashing inputs land in fuzz/artifacts/<target>/ (git-ignored).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-30}"
RSS_LIMIT_MB="${FUZZ_RSS_LIMIT_MB:-2048}"
# A single input taking this long is reported as a hang (a crash).
UNIT_TIMEOUT="${FUZZ_UNIT_TIMEOUT:-30}"
CARGO="${CARGO:-cargo}"
# Debug assertions on (-a): integer overflow and debug_assert! fail loudly under fuzzing.
BUILD_FLAGS=(-O -a)

cd "$ROOT/fuzz"

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: the nightly toolchain is needed (rustup toolchain install nightly --profile minimal)" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! "$CARGO" +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  "$CARGO" install cargo-fuzz --locked || "$CARGO" install cargo-fuzz
fi

# Longest input each target is given (bytes).
max_len() {
  case "$1" in
    filter_classify) echo 64 ;;
    filter_properties) echo 256 ;;
    cache_layer) echo 65536 ;;
    cache_layer_tar) echo 16384 ;;
    cache_manifest) echo 16384 ;;
    cache_http) echo 2048 ;;
    *) echo 4096 ;;
  esac
}

TARGETS="${FUZZ_TARGETS:-$("$CARGO" +nightly fuzz list)}"
if [ "${FUZZ_BUILD:-1}" != 0 ]; then
  "$CARGO" +nightly fuzz build "${BUILD_FLAGS[@]}"
fi
BIN_DIR="$ROOT/fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"

LOGS="$ROOT/target/fuzz-logs"
SUMMARY="$ROOT/target/fuzz-summary.md"
mkdir -p "$LOGS"
failed=()
{
  echo "# Fuzz run $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "\`FUZZ_SECONDS=$SECONDS_PER_TARGET\`, $(rustc +nightly --version), $(nproc) cores"
  echo
  echo "| target | seconds | executions | exec/s | seeds | corpus after | result |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
} >"$SUMMARY"

for t in $TARGETS; do
  seeds="$ROOT/fuzz/corpus/$t"
  work="$ROOT/target/fuzz-corpus/$t"
  mkdir -p "$seeds" "$work"
  log="$LOGS/$t.log"
  echo "fuzz: $t for ${SECONDS_PER_TARGET}s (log: $log)"
  start=$(date +%s)
  status=0
  # The first corpus directory is the writable one: new inputs go there, seeds stay untouched.
  # The binaries built above, run directly: `cargo fuzz run` would rebuild first, and the tree
  # may have changed since.
  mkdir -p "$ROOT/fuzz/artifacts/$t"
  ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}" "$BIN_DIR/$t" "$work" "$seeds" \
    -artifact_prefix="$ROOT/fuzz/artifacts/$t/" \
    -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb="$RSS_LIMIT_MB" -timeout="$UNIT_TIMEOUT" \
    -max_len="$(max_len "$t")" -print_final_stats=1 >"$log" 2>&1 || status=$?
  wall=$(($(date +%s) - start))
  # libFuzzer's own count: the wall time also includes cargo checking the build.
  elapsed=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' | tail -1 || true)
  elapsed="${elapsed:-$wall}"
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  nseeds=$(find "$seeds" -type f | wc -l)
  ncorpus=$(find "$work" -type f | wc -l)
  if [ "$status" -eq 0 ]; then
    result="ok"
  else
    artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -1 | sed 's/Test unit written to //' || true)
    result="FAILED (exit $status${artifact:+, input $artifact})"
    failed+=("$t: $result")
    tail -40 "$log" >&2
  fi
  echo "fuzz: $t: ${execs:-?} executions in ${elapsed}s: $result"
  echo "| $t | $elapsed | ${execs:-?} | ${rate:-?} | $nseeds | $ncorpus | $result |" >>"$SUMMARY"
done

echo
cat "$SUMMARY"
if [ "${#failed[@]}" -ne 0 ]; then
  echo >&2
  printf 'fuzz: %s\n' "${failed[@]}" >&2
  exit 1
fi
