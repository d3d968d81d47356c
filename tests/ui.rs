//! Compile-fail and compile-pass tests of `#[pt_regs]` (trybuild).
//!
//! Compiler messages change between rustc versions, so these run in the host lane
//! (x86_64, rustup's toolchain) only. To re-bless after a deliberate change:
//! `TRYBUILD=overwrite cargo test --test ui`, then read the diff of `tests/ui/*.stderr`:
//! each error must sit under the token that is wrong and say what must be.

#[cfg(target_arch = "x86_64")]
#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail_*.rs");
    t.pass("tests/ui/pass_*.rs");
}
