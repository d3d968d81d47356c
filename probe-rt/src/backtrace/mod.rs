//! Stack traces that see through probekit: [`backtrace`] from where it is called,
//! [`stack_trace`] from a handler's [`PtRegs`] (the kernel's `stack_trace_save_regs`).
//!
//! # What a trace holds
//! The addresses of the program's frames, innermost first: the first is a pc (where
//! the walk starts), each later one a return address (one past the call; subtract 1
//! before symbolizing, as `addr2line` users do). Every probekit frame is left out and
//! every hijacked return address is replaced by the real one, so the trace is the one
//! the program would have without probekit:
//!
//! - a return probe's stub, which stands on the stack for the real return address of
//!   every watched call in flight, is replaced by that address from the thread's live
//!   instances, as Frida's `gum_invocation_stack_translate` does;
//! - in a handler, the trace starts at the probed context (as Frida's
//!   `Thread.backtrace(this.context)` and the kernel's `stack_trace_save_regs(regs)`):
//!   the handler's own frames, probekit's hit path, the SIGTRAP signal frame and the
//!   trampolines are left out. In a pre or entry handler the first address is the
//!   probed instruction (a site probe: the site, the function's first byte); in a
//!   post handler the pc after it; in a return handler the real return address of
//!   the returning function. (If the walk
//!   cannot get there from a handler, the trace is empty rather than the handler's.)
//!
//! # How: call-frame information, async-signal-safe
//! Both walk the DWARF call-frame information (`.eh_frame`) of the images the stack
//! runs through, as a debugger does, so no frame pointers are needed on either arch:
//! the image holding a pc is found with glibc's `_dl_find_object` (2.35 and later,
//! async-signal-safe), its FDE through the image's `.eh_frame_hdr` table, the rule
//! computed by gimli with storage in line. Nothing allocates, locks or faults: every
//! stack word read is checked against the mapping of the stack the walk starts on
//! (found in `/proc/self/maps` with raw system calls once per thread and stack). So
//! both may be called in any handler, also one on `malloc`.
//!
//! Where an image has no unwind rule for a pc (code made at run time by something
//! else, an image stripped of `.eh_frame`, glibc before 2.35), the walk follows the
//! frame pointer instead: right only if that code keeps frame records
//! (`-C force-frame-pointers=yes`, the default for aarch64 C code). A walk ends at
//! the outermost frame (`_start` and `clone` mark their return address undefined), at
//! a rule it does not evaluate (a DWARF expression: signal frames of the program's
//! own handlers, PLT stubs), at a stack pointer that does not grow, or when it leaves
//! the stack it started on (a handler on `sigaltstack`, a coroutine switch).
//!
//! # How reliable, per arch
//! Rust, C and C++ code built by GCC or LLVM has complete `.eh_frame` on both x86_64
//! and aarch64 Linux (Rust keeps it even with `panic = "abort"`), so traces through
//! it are exact at every instruction, prologues and epilogues included, and a
//! breakpoint in the middle of a function walks as well as one at its entry. Known
//! limits: hand-written assembly without CFI (the walk stops or, with frame records,
//! follows them); aarch64 return addresses signed with pointer authentication are
//! not stripped (Debian does not enable it).
//!
//! # `std::backtrace` and the `backtrace` crate
//! They use libgcc's unwinder, which probekit's unwind information keeps on the right
//! path: every stub has an FDE that gives the real return address from its instance,
//! and the return trampoline's CFI gives the real caller at the handler call. Two
//! things differ from [`backtrace`], and cannot be made right in unwind information
//! (libgcc reports every pc it reaches, and the hijacked address is what the stack
//! holds):
//!
//! 1. each watched call in flight below the capture point, except the one whose
//!    return handler is running, adds one frame whose address is its stub
//!    (`<unknown>`, or `probekit_return_stub[…]` in `perf` with the perf map), just
//!    before the frame of its real return address; the frames themselves are right;
//! 2. in a handler, the handler's frames and probekit's (`dispatch`, the trampoline,
//!    the SIGTRAP handler and its signal frame) are listed. The site and optimized
//!    probes' trampolines read the probed context from their frame, as [`stack_trace`]
//!    does, and go on to the probed function (a `#[traceable]` site has the rules of a
//!    function's entry; see also the optprobe module's "Unwinding").

mod cfi;
mod stack;

use crate::PtRegs;
use stack::Stack;

/// DWARF register numbers (System V x86_64 psABI 3.6.2, Figure 3.36; AAPCS64
/// "DWARF for the Arm 64-bit Architecture", 4.1): how many general registers a frame
/// keeps, the stack pointer, the frame pointer and the return-address column.
#[cfg(target_arch = "x86_64")]
mod dwarf {
    pub(super) const NREGS: usize = 17;
    pub(super) const SP: usize = 7;
    pub(super) const FP: usize = 6;
    pub(super) const RA: usize = 16;
}
#[cfg(target_arch = "aarch64")]
mod dwarf {
    pub(super) const NREGS: usize = 32;
    pub(super) const SP: usize = 31;
    pub(super) const FP: usize = 29;
    pub(super) const RA: usize = 30;
}
use dwarf::{FP, NREGS, RA, SP};

/// The registers of one frame by DWARF number, and its pc.
#[derive(Clone, Copy)]
struct Regs {
    pc: usize,
    r: [usize; NREGS],
}

impl Regs {
    fn of(regs: &PtRegs) -> Regs {
        let mut r = [0usize; NREGS];
        #[cfg(target_arch = "x86_64")]
        {
            let g = [regs.rax, regs.rdx, regs.rcx, regs.rbx, regs.rsi, regs.rdi, regs.rbp, regs.rsp, regs.r8, regs.r9, regs.r10, regs.r11];
            let hi = [regs.r12, regs.r13, regs.r14, regs.r15];
            for (d, s) in r.iter_mut().zip(g.iter().chain(hi.iter())) {
                *d = *s as usize;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            for (d, s) in r.iter_mut().zip(regs.regs.iter()) {
                *d = *s as usize;
            }
            r[SP] = regs.sp as usize;
        }
        Regs { pc: regs.instruction_pointer() as usize, r }
    }
}

/// Fills `out` with the stack trace of the context `regs` describes, innermost first,
/// and returns how many addresses it wrote: `regs`' pc, then the return address of
/// each caller, hijacked ones replaced by the real ones (see the [module docs](self)).
///
/// `regs` must be a context of the calling thread, on the stack it runs on: the frame
/// a handler received, or one a handler built from it; for any other (another
/// thread's, one on `sigaltstack`) the trace is empty. Async-signal-safe: no
/// allocation, no lock.
pub fn stack_trace(regs: &PtRegs, out: &mut [usize]) -> usize {
    walk(Regs::of(regs), out, 0, false)
}

/// Fills `out` with the stack trace of the calling thread, from the function that
/// calls `backtrace` (its return address into that function first) outwards, every
/// probekit frame left out and every hijacked return address replaced by the real one;
/// in a handler it starts at the probed context instead (see the [module docs](self)).
/// Returns how many addresses it wrote. Async-signal-safe: no allocation, no lock.
#[inline(never)]
pub fn backtrace(out: &mut [usize]) -> usize {
    let here = current();
    // The first frame is this function's own. In a handler (probekit marks the thread
    // active while one runs) every frame before the probed context is left out.
    let in_handler = crate::grace::with_thread(|t| t.active.get());
    walk(here, out, 1, in_handler)
}

/// The registers of the caller at this point: the pc, the stack pointer and every
/// register a rule may read (the callee-saved ones; the others are not needed to find
/// a caller). Always inlined into [`backtrace`], whose rules then describe them.
#[inline(always)]
fn current() -> Regs {
    let mut r = [0usize; NREGS];
    let pc: usize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads registers into `r` (NREGS words, written at indices below 17).
    unsafe {
        std::arch::asm!(
            "lea {pc}, [rip]",
            "mov [{r} + 24], rbx",
            "mov [{r} + 48], rbp",
            "mov [{r} + 56], rsp",
            "mov [{r} + 96], r12",
            "mov [{r} + 104], r13",
            "mov [{r} + 112], r14",
            "mov [{r} + 120], r15",
            r = in(reg) r.as_mut_ptr(),
            pc = out(reg) pc,
            options(nostack, preserves_flags),
        )
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: reads registers into `r` (NREGS words, written at indices 19..=31).
    unsafe {
        std::arch::asm!(
            "adr {pc}, .",
            "stp x19, x20, [{r}, #152]",
            "stp x21, x22, [{r}, #168]",
            "stp x23, x24, [{r}, #184]",
            "stp x25, x26, [{r}, #200]",
            "stp x27, x28, [{r}, #216]",
            "stp x29, x30, [{r}, #232]",
            "mov {t}, sp",
            "str {t}, [{r}, #248]",
            r = in(reg) r.as_mut_ptr(),
            pc = out(reg) pc,
            t = out(reg) _,
            options(nostack, preserves_flags),
        )
    };
    Regs { pc, r }
}

/// Runs before `main`: looks up what the walks need from the C library.
extern "C" fn init() {
    cfi::init();
}
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

/// The most frames a walk steps through (including left-out ones): a bound for
/// corrupt stacks whose pointers still grow.
const MAX_STEPS: usize = 4096;

/// The walk: steps from `regs` outwards, writing each frame's address into `out`
/// after the first `skip` ones. `in_handler`: the walk starts in a handler, whose
/// frames and probekit's are not written (nor do they fill `out`) until it steps out
/// of the dispatcher into the probed context; a walk that does not get there writes
/// nothing.
fn walk(mut regs: Regs, out: &mut [usize], skip: usize, mut in_handler: bool) -> usize {
    let Some(stack) = Stack::of(regs.r[SP]) else { return 0 };
    let mut ctx = cfi::Context::new_in();
    let (mut n, mut seen) = (0, 0);
    // The first frame's pc is where it stands (a breakpoint, an entry, the pc a
    // return handler resumes at), not a return address: its own rule applies.
    let mut exact = true;
    for _ in 0..MAX_STEPS {
        if n == out.len() && !in_handler {
            break;
        }
        if seen >= skip && !in_handler {
            out[n] = regs.pc;
            n += 1;
        }
        seen += 1;
        let lookup = if exact { regs.pc } else { regs.pc.wrapping_sub(1) };
        let step = cfi::with_row(&mut ctx, lookup, |start, row| (start, step(&regs, row, &stack)));
        let (start, next) = match step {
            Some((start, next)) => (start, next),
            // No rule: the frame record, where the pc is a return address (a frame
            // record is not set up at every instruction), or where there are no rules.
            None if !exact || !cfi::available() => (0, frame_record(&regs, &stack)),
            // A `#[traceable]` function's site is its first instruction, in a naked
            // function without CFI: the rule of every function's entry.
            None if at_site(regs.pc) => (0, entry(&regs, &stack)),
            None => (0, None),
        };
        let Some(mut next) = next else { break };
        exact = false;
        // Stepping out of probekit's hit path into the probed context: the frames so
        // far were the handler's and probekit's (see the module docs).
        if let Some(probed) = probed_context(start, next.r[SP], &stack) {
            next = probed;
            exact = true;
            n = 0;
            seen = skip;
            in_handler = false;
        }
        next.pc = crate::retprobe::translate(next.pc);
        if next.pc == 0 {
            break;
        }
        // The walk stays on the stack it started on.
        if !stack.holds(next.r[SP], 0) {
            break;
        }
        regs = next;
    }
    n
}

/// The caller's registers by the rule `row` (from the frame's FDE), or `None` where
/// the walk ends: the return address is undefined (the outermost frame), a rule is a
/// DWARF expression, or the stack pointer would not grow.
fn step(regs: &Regs, row: &cfi::Row, stack: &Stack) -> Option<Regs> {
    use gimli::{CfaRule, RegisterRule};
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => regs.r.get(register.0 as usize)?.wrapping_add_signed(*offset as isize),
        CfaRule::Expression(_) => return None,
    };
    let sp = regs.r[SP];
    if cfa < sp {
        return None;
    }
    let mut next = *regs;
    for (k, slot) in next.r.iter_mut().enumerate() {
        let Some(rule) = row.register(gimli::Register(k as u16)) else { continue };
        *slot = match rule {
            RegisterRule::Undefined => 0,
            RegisterRule::SameValue => regs.r[k],
            RegisterRule::Offset(o) => stack.word(cfa.wrapping_add_signed(o as isize))?,
            RegisterRule::ValOffset(o) => cfa.wrapping_add_signed(o as isize),
            RegisterRule::Register(r) => *regs.r.get(r.0 as usize)?,
            RegisterRule::Constant(v) => v as usize,
            // Only the return address is needed from these: checked below.
            _ => 0,
        };
    }
    // The return address: undefined in the outermost frame; an expression is not
    // evaluated. No rule: unchanged (aarch64 x30 in a leaf).
    match row.register(gimli::Register(RA as u16)) {
        None | Some(RegisterRule::SameValue | RegisterRule::Offset(_) | RegisterRule::ValOffset(_) | RegisterRule::Register(_)) => {}
        Some(_) => return None,
    }
    next.pc = next.r[RA];
    next.r[SP] = cfa;
    if cfa == sp && next.pc == regs.pc {
        return None;
    }
    Some(next)
}

/// The caller's registers by the frame record at the frame pointer (`[fp]` the
/// caller's frame pointer, `[fp + 8]` the return address, on both arches), for code
/// without unwind information. `None` if the frame pointer is not one.
fn frame_record(regs: &Regs, stack: &Stack) -> Option<Regs> {
    let fp = regs.r[FP];
    if fp < regs.r[SP] || !stack.holds(fp, 16) {
        return None;
    }
    let mut next = *regs;
    next.r[FP] = stack.word(fp)?;
    next.pc = stack.word(fp + 8)?;
    next.r[SP] = fp + 16;
    #[cfg(target_arch = "aarch64")]
    {
        next.r[RA] = next.pc;
    }
    Some(next)
}

/// Whether a site probe is armed at `pc` (lock-free: the registry's chains).
fn at_site(pc: usize) -> bool {
    crate::registry::armed_at(pc).any(|e| e.site.load(std::sync::atomic::Ordering::Relaxed))
}

/// The caller's registers at a function's first instruction (the rule a CIE gives on
/// each arch): x86_64 the return address at `[rsp]`, CFA `rsp + 8`; aarch64 the
/// return address in `x30`, CFA `sp`.
fn entry(regs: &Regs, stack: &Stack) -> Option<Regs> {
    let mut next = *regs;
    #[cfg(target_arch = "x86_64")]
    {
        next.pc = stack.word(regs.r[SP])?;
        next.r[SP] = regs.r[SP] + 8;
    }
    #[cfg(target_arch = "aarch64")]
    {
        let _ = stack;
        next.pc = regs.r[RA];
    }
    Some(next)
}

/// If the frame just stepped out of (its function starts at `start`) is one of
/// probekit's dispatchers, the context it dispatched for: the probed registers.
/// `cfa` is that frame's canonical frame address, the caller's stack pointer.
///
/// - the SIGTRAP handler: the caller is the signal return trampoline, and the
///   interrupted context is the `ucontext_t` of the signal frame, at `cfa` on x86_64
///   (the handler's `ret` pops `pretcode`; Linux `struct rt_sigframe`) and after the
///   128-byte `siginfo_t` on aarch64;
/// - the return, site and exit-path dispatchers: the caller is the trampoline, which passed its
///   frame, at its stack pointer (`mov rdi, rsp` / `mov x0, sp` before the call).
fn probed_context(start: usize, cfa: usize, stack: &Stack) -> Option<Regs> {
    if start == 0 {
        return None;
    }
    if start == crate::retprobe::dispatch as *const () as usize
        || crate::site::patch::dispatchers().contains(&start)
        || start == crate::retprobe::dispatch_exit as *const () as usize
        || start == crate::site::patch::dispatch_exit_entry as *const () as usize
        || start == crate::optprobe::dispatch as *const () as usize
    {
        if !stack.holds(cfa, std::mem::size_of::<PtRegs>()) || !cfa.is_multiple_of(std::mem::align_of::<PtRegs>()) {
            return None;
        }
        // SAFETY: the trampoline's frame, in the stack (checked), every field written
        // before the dispatcher was called; a `PtRegs` of integers, valid in any bits.
        let frame = unsafe { &*(cfa as *const PtRegs) };
        return Some(Regs::of(frame));
    }
    if start == crate::breakpoint::trap::on_sigtrap as *const () as usize {
        #[cfg(target_arch = "x86_64")]
        let uc = cfa;
        #[cfg(target_arch = "aarch64")]
        let uc = cfa + std::mem::size_of::<libc::siginfo_t>();
        if !stack.holds(uc, std::mem::size_of::<libc::ucontext_t>()) || !uc.is_multiple_of(std::mem::align_of::<libc::ucontext_t>()) {
            return None;
        }
        // SAFETY: the signal frame the kernel wrote for the SIGTRAP handler, in the
        // stack (checked, aligned); a `ucontext_t` of integers.
        let uc = unsafe { &*(uc as *const libc::ucontext_t) };
        let mut pc = crate::sys::regs::pc(uc);
        // The pre handlers' context: x86_64 reports the pc past the `int3`; the
        // handlers saw (and a trace shows) the probed instruction's address.
        let adv = crate::arch::insn::TRAP_PC_ADVANCE;
        if adv > 0 && crate::registry::armed_at((pc - adv) as usize).any(|e| !e.site.load(std::sync::atomic::Ordering::Relaxed)) {
            pc -= adv;
        }
        return Some(Regs::of(&crate::sys::regs::read(uc, pc)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn third(out: &mut [usize]) -> usize {
        let n = backtrace(out);
        std::hint::black_box(n)
    }

    #[inline(never)]
    fn second(out: &mut [usize]) -> usize {
        std::hint::black_box(third(out))
    }

    #[inline(never)]
    fn first(out: &mut [usize]) -> usize {
        std::hint::black_box(second(out))
    }

    fn name(ret: usize) -> String {
        crate::sys::symbols::symbol_of(ret - 1).map_or_else(|| format!("{ret:#x}"), |(n, _)| n)
    }

    #[test]
    #[inline(never)] // its name is looked for in the walk: its own frame in a release build too
    fn a_backtrace_without_probes_is_the_call_chain() {
        let mut out = [0usize; 64];
        let n = first(&mut out);
        let names: Vec<String> = out[..n].iter().map(|a| name(*a)).collect();
        assert_eq!(names[..3], ["probe_rt::backtrace::tests::third", "probe_rt::backtrace::tests::second", "probe_rt::backtrace::tests::first"], "{names:#?}");
        assert!(names.iter().any(|n| n.ends_with("a_backtrace_without_probes_is_the_call_chain")), "{names:#?}");
        // The walk goes on to the thread's start.
        assert!(n > 6, "{names:#?}");
    }

    #[test]
    fn a_short_buffer_holds_the_innermost_frames() {
        let (mut long, mut short) = ([0usize; 64], [0usize; 2]);
        let n = first(&mut long);
        assert_eq!(first(&mut short), 2);
        assert_eq!(short[1], long[1], "the same caller of `third`");
        assert!(n > 2);
        assert_eq!(first(&mut []), 0);
    }

    #[test]
    fn a_context_off_this_stack_has_no_trace() {
        let mut regs = PtRegs::default();
        #[cfg(target_arch = "x86_64")]
        {
            regs.rsp = 0x1000;
        }
        #[cfg(target_arch = "aarch64")]
        {
            regs.sp = 0x1000;
        }
        assert_eq!(stack_trace(&regs, &mut [0; 8]), 0);
    }

    #[test]
    fn the_stack_mapping_holds_a_local() {
        let local = 0u64;
        let at = &local as *const u64 as usize;
        let stack = Stack::of(at).expect("a mapping holds the stack");
        assert!(stack.holds(at, 8));
        assert_eq!(stack.word(at), Some(0));
        assert_eq!(stack.word(at + 1), None, "unaligned");
        assert!(Stack::of(8).is_none(), "page zero is not mapped");
        let heap = Box::new(0u64);
        assert!(Stack::of(&*heap as *const u64 as usize).is_none(), "not the thread's stack");
    }

    #[test]
    fn fdes_are_found_with_their_function() {
        let mut ctx = cfi::Context::new_in();
        let f = walk as *const () as usize;
        let start = cfi::with_row(&mut ctx, f + 1, |start, _| start);
        assert_eq!(start, Some(f), "walk's FDE starts at walk");
        assert!(cfi::with_row(&mut ctx, 8, |s, _| s).is_none(), "no image at page zero");
    }
}
