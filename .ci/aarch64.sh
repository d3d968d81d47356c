#!/usr/bin/env bash
# The aarch64 lane: the workspace tests built for aarch64-unknown-linux-gnu and run
# under qemu-aarch64 (user mode), with Debian's Rust toolchain, which ships an arm64
# standard library (rustup's has none here). Installs what a fresh Debian 12 lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
[ -x /usr/bin/cargo ] && [ -x /usr/bin/rustc ] || need+=(rustc-web cargo-web)
dpkg -s libstd-rust-web-dev:arm64 >/dev/null 2>&1 || need+=(libstd-rust-web-dev:arm64)
if [ ${#need[@]} -gt 0 ]; then
    echo "aarch64 lane: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    dpkg --add-architecture arm64
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Debian's cargo/rustc (1.96) are named explicitly: rustup's (1.95) stay first on PATH.
# A target directory of its own, so the two compilers do not rebuild each other's work.
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/aarch64-lane"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# The loader and libc must come from one package: with only -L, qemu takes the
# cross ld.so (libc6-arm64-cross) but ld.so finds the multiarch libc (libc6:arm64,
# a newer patch level pulled in by libstd-rust-web-dev:arm64), and the mismatch hangs
# the first pthread_create (glibc's stack cache list lives in the loader's state).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib"
# Tests that start a binary of the workspace (the CLI) start it through the same runner.
export CROSS_RUNNER="$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"
/usr/bin/cargo --version
/usr/bin/cargo test --workspace --target aarch64-unknown-linux-gnu "$@"
# The breakpoint suites again with every probe a breakpoint (by default a probe that
# can take a jump is optimized).
PROBEKIT_OPTIMIZE=never /usr/bin/cargo test --target aarch64-unknown-linux-gnu -p probe-rt --test breakpoint --test races --test simulate --test foreign_trap
PROBEKIT_OPTIMIZE=never /usr/bin/cargo test --target aarch64-unknown-linux-gnu -p hostile-tests
PROBEKIT_OPTIMIZE=never /usr/bin/cargo test --target aarch64-unknown-linux-gnu -p native-tests --test retprobe --test batch --test multi
# Unwinding through stubs and detours, and the fuzzer's harness, in a release build too:
# inlining decides which frame catches a panic (the bench builds below need the
# release build of the libraries anyway).
/usr/bin/cargo test --release --target aarch64-unknown-linux-gnu -p native-tests --test retprobe --test traces
/usr/bin/cargo test --release --target aarch64-unknown-linux-gnu -p probe-rt --test optprobe_unwind --test opt_fuzz
for example in quickstart funclatency fault_injection funccount funcslower argdist stackcount trace trace_miniz; do
    /usr/bin/cargo run --target aarch64-unknown-linux-gnu --example "$example"
done
/usr/bin/cargo bench --target aarch64-unknown-linux-gnu --bench hit -- --test
/usr/bin/cargo bench --target aarch64-unknown-linux-gnu --bench attach -- --test
/usr/bin/cargo bench --target aarch64-unknown-linux-gnu --bench grace -- --test
/usr/bin/cargo bench --target aarch64-unknown-linux-gnu --bench trace -- --test
