//! Generates for the target: the built-in frame's source (`frame.rs`); its Rust items
//! (`offsets.rs`): the `PtRegs::S_*` offsets, `unsafe impl Frame` and the compile-time
//! assertions that probe-codegen's layout of `PtRegs` is the compiler's (both read the
//! same file, `codegen/frames/<arch>.rs`; this proves they agree), rendered by the one
//! renderer `#[pt_regs]` uses, and the same offsets as free constants of
//! `probe_rt::offsets`; the site contract (`site_contract.rs`); and the runtime's
//! trampolines.

use probe_codegen::render::{self, names, Place, RustItems};
use probe_codegen::{Arch, Fp, FrameLayout, Plan, Policy, Shape};
use std::fmt::Write;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let out = out_dir.join("offsets.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").ok().and_then(|a| Arch::from_name(&a));

    // The built-in frame's source, from probe-codegen (which parses the same text), and
    // the site contract: probe-rt compiles both from OUT_DIR, so it packages on its own.
    let (frame, contract) = match arch {
        Some(arch) => (probe_codegen::builtin_source(arch).to_string(), probe_codegen::site::runtime_consts(arch)),
        None => (String::new(), String::new()),
    };
    std::fs::write(out_dir.join("frame.rs"), frame).expect("OUT_DIR is writable");
    std::fs::write(out_dir.join("site_contract.rs"), contract).expect("OUT_DIR is writable");
    // Where `Fp::FullInUse` moves the upper state, for the size of the area, and the
    // bits of the wide modes' word (see `arch::in_use_area`, `arch::wide_mode`).
    let in_use = format!(
        "/// `(XCR0 bit, offset, bytes)` of each component `Fp::FullInUse` moves (probe-codegen's `Fp::IN_USE_COMPONENTS`).\n\
         const IN_USE_COMPONENTS: [(u32, u64, u64); 4] = {:?};\n\
         /// probe-codegen's `Fp::WIDE_ASK`.\nconst WIDE_ASK: u64 = {:#x};\n/// probe-codegen's `Fp::WIDE_ZMM`.\nconst WIDE_ZMM: u64 = {:#x};\n",
        Fp::IN_USE_COMPONENTS,
        Fp::WIDE_ASK,
        Fp::WIDE_ZMM
    );
    std::fs::write(out_dir.join("xsave.rs"), in_use).expect("OUT_DIR is writable");
    let text = match arch {
        Some(arch) => {
            let frame = FrameLayout::builtin(arch);
            // `PtRegs::S_PSTATE` …, as `#[pt_regs]` would give the type, with its `Frame` impl.
            let mut text = RustItems::new("crate::PtRegs").place(Place::Type).krate("crate").arch(&frame, Vec::new()).render();
            // `probe_rt::offsets::S_PSTATE` …, the names asm-offsets users know, free.
            for o in names::offsets(&frame) {
                let _ = writeln!(text, "/// Offset of `{}` in [`PtRegs`](crate::PtRegs): [`PtRegs::{1}`](crate::PtRegs::{1}).", o.describe(), o.name);
                let _ = writeln!(text, "pub const {0}: usize = crate::PtRegs::{0};", o.name);
            }
            let _ = writeln!(text, "/// `size_of::<PtRegs>()`: [`PtRegs::S_FRAME_SIZE`](crate::PtRegs::S_FRAME_SIZE).");
            let _ = writeln!(text, "pub const S_FRAME_SIZE: usize = crate::PtRegs::S_FRAME_SIZE;");
            text
        }
        None => String::new(),
    };
    std::fs::write(out, text).expect("OUT_DIR is writable");

    // The runtime's trampolines, each a probe-codegen shape over the built-in frame with
    // every general register restored and FP/SIMD registers kept:
    // - the return trampoline of return probes (kretprobe shape): the FP return
    //   registers, x86_64 xmm0-xmm1 (the others are dead at a return) whole
    //   (Fp::ReturnWide: a C function's `__m256`/`__m512` return value) where the OS
    //   enabled AVX state (`cpu_support().wide`), else their low 128
    //   bits (Fp::Return, the `_narrow` copy); aarch64 v0-v3 (an HFA of four returns
    //   in them: Fp::Args, q0-q7);
    // - the site trampoline of `#[traceable]` functions (site shape: the entry shape
    //   called from the patched site, whose frame's pc is the site and which resumes
    //   where its dispatcher says; handlers may use floats and vector code): the low 128 bits of the
    //   argument registers (Fp::Args), all a traceable function can take in them: the
    //   Rust ABI passes SIMD vectors by pointer, and an `extern "C"` function taking
    //   `__m256` needs `#[target_feature]`, which a naked site cannot have (unstable);
    // - the two trampolines of sites' exit paths (probe-codegen `site::exit_asm`), called
    //   like the site trampoline at the function's entry stack pointer, so of its shape:
    //   the exit-entry one runs the site's probes (return probes watching without a
    //   hijack), with the site trampoline's registers; the exit one the return
    //   handlers, with the return registers (x86_64 rax, rdx and the low 128 bits of
    //   xmm0-xmm1, Fp::Return: by the same argument a traceable function returns no
    //   wider vector in them; aarch64 x0-x7, q0-q3 in Fp::Args) among those restored.
    // The three of the entry shape come twice: as above, and keeping no FP/SIMD state
    // (Fp::None, the `_no_fp` copy) for the sites of functions whose arguments and return
    // value no FP/SIMD register carries (probe-codegen `site::NO_FP`, which the macro
    // writes into the site's record): nothing there is live in them (~1 ns a hit).
    let routines = [
        ("kretprobe.rs", Shape::Kretprobe, "probekit_kretprobe_trampoline", "crate::retprobe::dispatch"),
        ("site.rs", Shape::Site, "probekit_site_trampoline", "crate::site::dispatch"),
        ("site_exit_entry.rs", Shape::Entry, "probekit_site_exit_entry_trampoline", "crate::site::patch::dispatch_exit_entry"),
        ("site_exit.rs", Shape::Entry, "probekit_site_exit_trampoline", "crate::retprobe::dispatch_exit"),
    ];
    for (file, shape, name, handler) in routines {
        let mut text = String::new();
        if let Some(arch) = arch {
            let mut fps = match (arch, shape) {
                (Arch::X86_64, Shape::Kretprobe) => vec![(Fp::ReturnWide, ""), (Fp::Return, "_narrow")],
                (Arch::X86_64, _) if file == "site_exit.rs" => vec![(Fp::Return, "")],
                _ => vec![(Fp::Args, "")],
            };
            // Sites' trampolines once more without FP/SIMD state, for functions whose
            // arguments and return value no FP/SIMD register carries (probe-codegen
            // `site::NO_FP`): nothing there is live at the entry or the return.
            if shape.at_entry() {
                fps.push((Fp::None, "_no_fp"));
            }
            let mut probed_sps = Vec::new();
            for (fp, suffix) in fps {
                let plan = Plan::new(&FrameLayout::builtin(arch), Policy::All, fp, shape).expect("the built-in frame plans");
                // The site dispatcher is one per trampoline: it finds the probed stack
                // pointer (and on x86_64 the site) from the frame (`site::patch::dispatch`).
                let handler = match file {
                    "site.rs" => {
                        let sp = plan.probed_sp_offset().expect("the site trampolines allocate a fixed frame");
                        probed_sps.push(sp);
                        format!("{handler}::<{sp}>")
                    }
                    _ => handler.to_string(),
                };
                let symbols = render::Symbols { handler, ..runtime_symbols() };
                text += &render::rust_global_asm(&plan, &format!("{name}{suffix}"), "crate::PtRegs", &symbols);
            }
            if file == "site.rs" {
                text += &format!(
                    "/// Where the site trampolines (with FP/SIMD state, without) keep the probed stack pointer, from their frame.\npub(crate) const SITE_SP: [usize; 2] = {probed_sps:?};\n"
                );
            }
        }
        std::fs::write(out_dir.join(file), text).expect("OUT_DIR is writable");
    }

    // The light trampolines of sites' exit paths (see probe-rt's `site::fgraph`: the
    // function-graph tracer's path, ftrace's `ftrace_regs` beside its `pt_regs`): entry
    // shape, called like the exit-path trampolines above, over frames of the argument
    // registers or the return register only (their source written to OUT_DIR, which
    // probe-rt includes: planner and compiler read the same text). Every other
    // caller-saved register goes to the hidden area (Policy::CallerSaved), the
    // callee-saved ones are the ABI's to keep; FP/SIMD as the exit-path trampolines,
    // and none in the `_no_fp` copies (see above).
    let (source, text) = match arch {
        Some(arch) => {
            let source = fgraph_frames(arch);
            let mut text = String::new();
            let frames = [
                ("FgraphRegs", "probekit_fgraph_entry_trampoline", "crate::site::fgraph::dispatch_entry", Fp::Args),
                (
                    "FgraphRetRegs",
                    "probekit_fgraph_exit_trampoline",
                    "crate::site::fgraph::dispatch_exit",
                    if arch == Arch::X86_64 { Fp::Return } else { Fp::Args },
                ),
                ("FgraphRegs", "probekit_fgraph_entry_trampoline_no_fp", "crate::site::fgraph::dispatch_entry", Fp::None),
                ("FgraphRetRegs", "probekit_fgraph_exit_trampoline_no_fp", "crate::site::fgraph::dispatch_exit", Fp::None),
            ];
            for (frame, name, handler, fp) in frames {
                let layout = FrameLayout::from_source(&source, frame, arch).expect("the fgraph frames parse");
                let plan = Plan::new(&layout, Policy::CallerSaved, fp, Shape::Entry).expect("the fgraph frames plan");
                let symbols = render::Symbols { handler: handler.into(), ..runtime_symbols() };
                text += &render::rust_global_asm(&plan, name, &format!("crate::site::fgraph::{frame}"), &symbols);
            }
            (source, text)
        }
        None => (String::new(), String::new()),
    };
    std::fs::write(out_dir.join("fgraph_frames.rs"), source).expect("OUT_DIR is writable");
    std::fs::write(out_dir.join("fgraph.rs"), text).expect("OUT_DIR is writable");

    // The trampolines of optimized probes' detours (see probe-rt's `arch::detour` and `optprobe::hit`):
    // SaveRestore routines (called like a function, from the detour, with the stack
    // already past the probed code's red zone) that save and restore every general
    // register and the flags, over the built-in frame. FP/SIMD state:
    // - mid-function anything may be live: all of it (Fp::Full: x86_64 xsave of every
    //   enabled component, aarch64 q0-q31, fpcr, fpsr);
    // - x86_64, at a function's entry, where the ABI leaves nothing live in the vector
    //   registers but arguments (as at a site): the argument registers, whole where
    //   the OS enabled AVX state (Fp::ArgsWide; else Fp::Args, as the return
    //   trampoline); their low halves (Fp::Args) at the entry of a leaf function of
    //   legacy SSE code, which can neither read nor hand on the rest (keeping them
    //   whole costs ~2 ns of a ~13 ns hit: `arch::wide_mode`). The full state
    //   costs ~180 ns a hit on an AVX-512 machine (xsave writes 2.7 KiB), the argument
    //   registers ~1 ns, and whole ~4 ns.
    // x86_64 Full comes three times: with xsave64; Fp::FullCompact's xsavec64, which
    // leaves out the components in their initial state (the AVX-512 upper halves after
    // vzeroupper): ~80 ns a hit, where the CPU has it (CPUID.(EAX=0DH,ECX=1):EAX[1]);
    // and Fp::FullInUse, which moves the components in use (xgetbv 1) instead of
    // xsave/xrstor (xrstor alone costs 50-70 ns on a virtual CPU), where the CPU can
    // tell which are in use (`cpu_support().in_use`): ~22 ns a hit in all.
    // - x86_64, mid-function in a function of legacy SSE code only (the whole function
    //   decoded: no VEX, EVEX, x87, MMX or xsave instruction), which never touches
    //   zmm16-31 or k0-k7 (caller-saved): xmm0-15 whole and MXCSR (Fp::Sse), where the
    //   OS enabled AVX state; the most common mid-function probe
    //   (code built for baseline x86_64) then costs about what an entry probe does,
    //   not the ~10 ns more of AVX-512 state moves.
    let text = match arch {
        Some(arch) => {
            let symbols = render::Symbols { handler: "crate::optprobe::hit::dispatch".into(), ..runtime_symbols() };
            let plan = |fp| Plan::new(&FrameLayout::builtin(arch), Policy::All, fp, Shape::SaveRestore).expect("the built-in frame plans");
            let full = render::rust_global_asm(&plan(Fp::Full), "probekit_opt_trampoline_full", "crate::PtRegs", &symbols);
            match arch {
                Arch::X86_64 => {
                    let compacted = render::rust_global_asm(&plan(Fp::FullCompact), "probekit_opt_trampoline_full_c", "crate::PtRegs", &symbols);
                    let entry = render::rust_global_asm(&plan(Fp::ArgsWide), "probekit_opt_trampoline_entry", "crate::PtRegs", &symbols);
                    let narrow = render::rust_global_asm(&plan(Fp::Args), "probekit_opt_trampoline_entry_narrow", "crate::PtRegs", &symbols);
                    let in_use = render::rust_global_asm(&plan(Fp::FullInUse), "probekit_opt_trampoline_full_u", "crate::PtRegs", &symbols);
                    let sse = render::rust_global_asm(&plan(Fp::Sse), "probekit_opt_trampoline_sse", "crate::PtRegs", &symbols);
                    format!("{entry}\n{narrow}\n{full}\n{compacted}\n{in_use}\n{sse}")
                }
                Arch::Aarch64 => full,
            }
        }
        None => String::new(),
    };
    std::fs::write(out_dir.join("opt.rs"), text).expect("OUT_DIR is writable");
}

/// The frames of the light trampolines (`site::fgraph`): the registers a function's
/// entry passes its integer arguments in (SysV AMD64 ABI 1.0 §3.2.3, AAPCS64 §6.8.2) or
/// its return passes its value in, the stack pointer and resume address, and at the
/// entry on aarch64 the return address (x86_64: the word at the stack pointer).
fn fgraph_frames(arch: Arch) -> String {
    let (entry, exit) = match arch {
        Arch::X86_64 => (
            "pub(crate) rdi: u64,\n    pub(crate) rsi: u64,\n    pub(crate) rdx: u64,\n    pub(crate) rcx: u64,\n    pub(crate) r8: u64,\n    pub(crate) r9: u64,\n    pub(crate) rsp: u64,\n    pub(crate) rip: u64,",
            "pub(crate) rax: u64,\n    pub(crate) rsp: u64,\n    pub(crate) rip: u64,",
        ),
        // x30: the return address, which the exit path leaves in x9 (the entry shape
        // takes x9 for the probed x30, as from a site).
        Arch::Aarch64 => (
            "pub(crate) regs: [u64; 8],\n    pub(crate) x30: u64,\n    pub(crate) sp: u64,\n    pub(crate) pc: u64,",
            "pub(crate) regs: [u64; 1],\n    pub(crate) sp: u64,\n    pub(crate) pc: u64,",
        ),
    };
    format!(
        "/// A light entry trampoline's frame: the integer argument registers, the stack\n\
         /// pointer at the function's entry and where the trampoline resumes.\n\
         #[repr(C)]\npub(crate) struct FgraphRegs {{\n    {entry}\n}}\n\n\
         /// A light exit trampoline's frame: the integer return register, the stack pointer\n\
         /// at the function's entry and where the trampoline resumes.\n\
         #[repr(C)]\npub(crate) struct FgraphRetRegs {{\n    {exit}\n}}\n"
    )
}

/// The operands of the runtime's own trampolines but their handler: its private copies
/// of the `xsave` size and mask and the wide modes' word (`arch::XSAVE_SIZE`, ...).
fn runtime_symbols() -> render::Symbols {
    render::Symbols {
        handler: String::new(),
        xsave_size: "crate::arch::XSAVE_SIZE".into(),
        xsave_mask: "crate::arch::XSAVE_MASK".into(),
        wide_mode: "crate::arch::WIDE_MODE".into(),
    }
}
