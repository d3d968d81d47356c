//! Every generated routine, executed: see the crate docs. Each routine runs with
//! several random register sets, with the probed stack pointer 16-aligned and (x86_64)
//! misaligned by 8, and (x86_64) with the direction flag set in the probed context.

use codegen_torture::{init_xsave, torture, FpMode, Rng, ROUTINES};

/// Runs the routines whose names `filter` takes, four times each; gives how many runs
/// that was, counting those of routines this CPU may not run (see below) as run.
fn run_all(filter: impl Fn(&str) -> bool) -> usize {
    init_xsave();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut failures = Vec::new();
    let mut runs = 0;
    let verbose = std::env::var_os("TORTURE_VERBOSE").is_some();
    // `Fp::FullInUse` routines run only where `cpu_support().in_use` says so, as their
    // docs ask of every caller: they need `xgetbv` with `ecx = 1`, XSAVEC, and
    // AVX512BW where AVX-512 state is enabled.
    let in_use = probe_rt::cpu_support().in_use;
    for r in ROUTINES.iter().filter(|r| filter(r.name)) {
        if verbose {
            eprintln!("{}", r.name);
        }
        // The last run also has the handler redirect execution through pc/rip.
        let sets = [(false, false, false), (true, false, false), (false, true, false), (true, true, true)];
        if r.fp == FpMode::FullInUse && !in_use {
            eprintln!("{}: not run, this CPU lacks what Fp::FullInUse needs (cpu_support().in_use)", r.name);
            runs += sets.len();
            continue;
        }
        for (skew, df, redirect) in sets {
            runs += 1;
            // aarch64 sp is 16-aligned at every instruction (AAPCS64 §6.4.5.1), so
            // only x86_64 meets a misaligned probed stack pointer.
            let x86 = cfg!(target_arch = "x86_64");
            if let Err(e) = torture(r, &mut rng, skew && x86, df && x86, redirect) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{} of {runs} runs failed:\n{}", failures.len(), failures.join("\n"));
    runs
}

#[test]
fn builtin_frame_every_policy_fp_and_shape() {
    // 4 shapes × 2 policies × 9 FP modes × 4 register sets.
    assert_eq!(run_all(|n| n.starts_with("torture_r") && n.contains("_ptregs_")), 288);
}

#[test]
fn custom_frames_every_policy_fp_and_shape() {
    // Four frames of src/frames.rs per architecture, two without a pc field (no site
    // routine: 3 shapes of 4).
    assert_eq!(run_all(|n| n.starts_with("torture_r") && !n.contains("_ptregs_") && !n.contains("_random")), 4 * 216 + 2 * 72);
}

#[test]
fn pt_regs_macro_frames() {
    // Two #[pt_regs] frames × 4 shapes (3 for the one without a pc field) × 4 register sets.
    assert_eq!(run_all(|n| n.contains("_macro_")), (4 + 3) * 4);
}

#[test]
fn random_frames() {
    assert_eq!(run_all(|n| n.contains("_random")), 48 * 4);
}

#[test]
fn builder_s_file_frames() {
    // The Builder's .S (fp = full, xsave operands by symbol) × 4 shapes × 4 register sets.
    assert_eq!(run_all(|n| n.starts_with("torture_builder_")), 4 * 4);
}
