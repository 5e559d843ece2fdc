# The two commands: `make demo` (main job) and `make test`. Both install what they need.
CARGO ?= cargo
WASM := target/wasm32-wasip1/release/churn_guard.wasm
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER := wasm-bindgen-test-runner

.PHONY: all setup build lint test test-native test-wasm32 demo bench clean fuzz

all: build

setup:
	@scripts/setup.sh

# wasm-opt (binaryen) optimises the module further for speed and shrinks it by about an eighth;
# the module works without it too.
WASM_OPT_FLAGS := -O3 --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int --enable-mutable-globals

build: setup
	$(CARGO) build -p churn-guard --target wasm32-wasip1 --release
	@if command -v wasm-opt >/dev/null; then \
	  wasm-opt $(WASM_OPT_FLAGS) -o $(WASM).opt $(WASM) && mv $(WASM).opt $(WASM); \
	else echo "wasm-opt not found: module left unoptimised"; fi
	@printf 'built %s: %s bytes\n' $(WASM) $$(stat -c %s $(WASM))

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p churn-guard --target wasm32-wasip1 --release -- -D warnings

test-wasm32:
	$(CARGO) test -p churn-guard --target wasm32-unknown-unknown

test-native: build
	$(CARGO) test --workspace -- --test-threads 2

test: build lint test-native test-wasm32

# The lab profile: optimised without LTO, so a fresh machine's first run compiles in minutes.
demo: build
	$(CARGO) run --profile lab -p churn-lab -- demo

bench: build
	$(CARGO) build -p wasm-noop -p wasm-retry-floor --target wasm32-wasip1 --release
	$(CARGO) run --release -p churn-lab -- bench
	$(CARGO) run --release -p churn-lab -- registry-bench

# Not part of `make test`: every cargo-fuzz target for FUZZ_SECONDS (default 30) each, on nightly.
# Fails on any crash; the summary is in target/fuzz-summary.md (see docs/reliability.md).
FUZZ_SECONDS ?= 30
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

clean:
	$(CARGO) clean
