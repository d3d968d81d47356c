//! Generates the functions the scale tests probe, into `OUT_DIR`:
//!
//! - `bp_functions.rs`: [`BP_FUNCTIONS`] small plain functions in ONE `global_asm!` block
//!   per arch, `scale_bp_N` returning `BP_BASE + N` (so a probe that fired on the wrong
//!   function, or a slot that ran the wrong instruction, shows in a result), and a
//!   table of their addresses. Assembly costs the compiler next to nothing: a thousand
//!   Rust functions would cost seconds of codegen on each lane.
//! - `site_functions.rs`: [`SITE_FUNCTIONS`] `#[probekit::traceable]` functions
//!   `scale_site_N(x) = x + N` and a table of them. Each expands to three functions
//!   and a site record, which is what costs build time: measured on a 2-core machine,
//!   the whole crate with its tests builds in 4 s (x86_64, rustc 1.95) and 8 s
//!   (aarch64, Debian's 1.96), so all 500 are kept.
//!
//! The counts reach the crate as `BP_FUNCTIONS`/`SITE_FUNCTIONS` constants written
//! into the same files, so the tests never disagree with the generator.

use std::fmt::Write as _;
use std::path::PathBuf;

/// How many plain (asm) functions: breakpoint probes go here.
const BP_FUNCTIONS: usize = 1000;
/// What `scale_bp_N` returns: `BP_BASE + N` (an aarch64 `movz` immediate: < 65536).
const BP_BASE: usize = 0x5000;
/// How many `#[traceable]` functions: site probes go here.
const SITE_FUNCTIONS: usize = 500;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // The target's arch, not the host's: the build script runs on the host.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    std::fs::write(out.join("bp_functions.rs"), bp_functions(&arch)).expect("write bp_functions.rs");
    std::fs::write(out.join("site_functions.rs"), site_functions()).expect("write site_functions.rs");
}

/// The asm functions for `arch` (none on another arch: the tests do not build there
/// anyway, probekit has no runtime for it), their declarations and their table.
fn bp_functions(arch: &str) -> String {
    let mut s = String::new();
    writeln!(s, "/// How many generated plain functions there are.").unwrap();
    writeln!(s, "pub const BP_FUNCTIONS: usize = {BP_FUNCTIONS};").unwrap();
    writeln!(s, "/// What `scale_bp_N` returns: `BP_BASE + N`.").unwrap();
    writeln!(s, "pub const BP_BASE: u32 = {BP_BASE};").unwrap();
    // Each function is 16-aligned and 16 bytes apart, so reading 16 bytes at one never
    // reads past the block (a pad closes it). x86_64: `mov eax, imm32` (5 bytes) and
    // `ret`; aarch64: `movz w0, #imm16` and `ret`. The body has no call, no stack use:
    // every instruction runs out of line or is simulated by the runtime.
    let (ty, body, pad): (&str, fn(usize) -> String, &str) = match arch {
        "x86_64" => ("@function", |v| format!("    mov eax, {v}\n    ret\n"), "    .fill 16, 1, 0xcc\n"),
        "aarch64" => ("%function", |v| format!("    mov w0, #{v}\n    ret\n"), "    .fill 4, 4, 0\n"),
        _ => return s,
    };
    writeln!(s, "core::arch::global_asm!(r#\"").unwrap();
    writeln!(s, "    .pushsection .text.scale_bp_functions,\"ax\"").unwrap();
    for n in 0..BP_FUNCTIONS {
        writeln!(s, "    .balign 16\n    .globl scale_bp_{n}\n    .type scale_bp_{n},{ty}\nscale_bp_{n}:").unwrap();
        s.push_str(&body(BP_BASE + n));
        writeln!(s, "    .size scale_bp_{n}, . - scale_bp_{n}").unwrap();
    }
    // What a 16-byte read at the last function covers; never executed (int3 / udf).
    writeln!(s, "    .balign 16\nscale_bp_end_pad:\n{pad}    .popsection").unwrap();
    writeln!(s, "\"#);").unwrap();

    writeln!(s, "extern \"C\" {{").unwrap();
    for n in 0..BP_FUNCTIONS {
        writeln!(s, "    fn scale_bp_{n}() -> u32;").unwrap();
    }
    writeln!(s, "}}").unwrap();
    writeln!(s, "/// `scale_bp_N` at index N.").unwrap();
    writeln!(s, "pub static BP_TABLE: [unsafe extern \"C\" fn() -> u32; BP_FUNCTIONS] = [").unwrap();
    for n in 0..BP_FUNCTIONS {
        writeln!(s, "    scale_bp_{n},").unwrap();
    }
    writeln!(s, "];").unwrap();
    s
}

/// The `#[traceable]` functions and their table (arch-independent Rust).
fn site_functions() -> String {
    let mut s = String::new();
    writeln!(s, "/// How many generated `#[traceable]` functions there are.").unwrap();
    writeln!(s, "pub const SITE_FUNCTIONS: usize = {SITE_FUNCTIONS};").unwrap();
    for n in 0..SITE_FUNCTIONS {
        writeln!(s, "#[probekit::traceable]\nfn scale_site_{n}(x: u64) -> u64 {{\n    x.wrapping_add({n})\n}}").unwrap();
    }
    writeln!(s, "/// `scale_site_N` at index N.").unwrap();
    writeln!(s, "pub static SITE_TABLE: [fn(u64) -> u64; SITE_FUNCTIONS] = [").unwrap();
    for n in 0..SITE_FUNCTIONS {
        writeln!(s, "    scale_site_{n},").unwrap();
    }
    writeln!(s, "];").unwrap();
    s
}
