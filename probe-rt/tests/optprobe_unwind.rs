//! Unwinding through jump-optimized probes (x86_64 natively, aarch64 under qemu): a
//! panic raised in a function called from a probed region unwinds through to the
//! probed function's caller, and backtraces taken in a pre handler, or in a callee of
//! the probed region, name the real frames, with libgcc's unwinder
//! (`std::backtrace`) and probekit's own walk alike.
//!
//! The probed functions call `callee` right at their probed address on aarch64 (the
//! `bl` is the displaced instruction, relocated into the detour) and just past it on
//! x86_64 (where a `call` is never displaced: the window stops before it).

use probe_rt::{Optimize, Probe, PtRegs};
use std::backtrace::Backtrace;
use std::cell::RefCell;
use std::hint::black_box;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

/// `callee(x)` panics for this argument.
const PANIC: u64 = 0xdead;
/// `callee(x)` records a backtrace for this argument.
const CAPTURE: u64 = 0xcafe;

/// Backtraces captured on this thread: `std::backtrace`'s text and probekit's walk,
/// symbolized.
#[derive(Clone, Debug, Default)]
struct Traces {
    std: String,
    own: Vec<String>,
}

thread_local! {
    /// The last traces the pre handler and `callee` captured on this thread.
    static IN_HANDLER: RefCell<Traces> = RefCell::default();
    static IN_CALLEE: RefCell<Traces> = RefCell::default();
}

/// Called from the probed region: doubles, panics, or records backtraces.
extern "C-unwind" fn callee(x: u64) -> u64 {
    match x {
        PANIC => panic!("raised below an optimized probe"),
        CAPTURE => {
            let t = capture(None);
            IN_CALLEE.with(|c| *c.borrow_mut() = t);
            x
        }
        _ => black_box(x) * 2,
    }
}

/// Both traces: from here, or from a handler's registers.
#[inline(never)]
fn capture(regs: Option<&PtRegs>) -> Traces {
    let std = Backtrace::force_capture().to_string();
    let mut out = [0usize; 64];
    let n = match regs {
        Some(r) => probe_rt::stack_trace(r, &mut out),
        None => probe_rt::backtrace(&mut out),
    };
    // The first address is a pc in a handler's trace, a return address otherwise.
    let exact = regs.is_some();
    let own = out[..n]
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let at = if i == 0 && exact { *a } else { a.wrapping_sub(1) };
            probe_rt::__private::symbol_of(at).map_or_else(|| format!("<unknown {a:#x}>"), |(name, _)| name)
        })
        .collect();
    Traces { std, own }
}

// Four copies of `x -> callee(x) + 1` (one per test: probes of tests running at once
// must not share a window), each with a label at the call (aarch64) or at the two
// instructions before it (x86_64), and call-frame information as a compiler writes it.
#[cfg(target_arch = "x86_64")]
macro_rules! probed {
    ($name:literal) => {
        concat!(
            ".globl ",
            $name,
            "\n",
            ".globl ",
            $name,
            "_at\n",
            ".type ",
            $name,
            ", @function\n",
            $name,
            ":\n",
            ".cfi_startproc\n",
            "push rbx\n",
            ".cfi_def_cfa_offset 16\n",
            ".cfi_offset rbx, -16\n",
            "mov rbx, rdi\n",
            $name,
            "_at:\n",
            "mov rdi, rbx\n",
            "mov ecx, 0\n",
            "call {callee}\n",
            "add rax, 1\n",
            "pop rbx\n",
            ".cfi_def_cfa_offset 8\n",
            "ret\n",
            ".cfi_endproc\n",
            ".size ",
            $name,
            ", . - ",
            $name,
            "\n",
        )
    };
}

#[cfg(target_arch = "aarch64")]
macro_rules! probed {
    ($name:literal) => {
        concat!(
            ".globl ",
            $name,
            "\n",
            ".globl ",
            $name,
            "_at\n",
            ".type ",
            $name,
            ", %function\n",
            $name,
            ":\n",
            ".cfi_startproc\n",
            "stp x29, x30, [sp, #-16]!\n",
            ".cfi_def_cfa_offset 16\n",
            ".cfi_offset x29, -16\n",
            ".cfi_offset x30, -8\n",
            "mov x29, sp\n",
            $name,
            "_at:\n",
            "bl {callee}\n",
            "add x0, x0, #1\n",
            "ldp x29, x30, [sp], #16\n",
            ".cfi_def_cfa_offset 0\n",
            ".cfi_restore x29\n",
            ".cfi_restore x30\n",
            "ret\n",
            ".cfi_endproc\n",
            ".size ",
            $name,
            ", . - ",
            $name,
            "\n",
        )
    };
}

// `x -> [x] + 1`, whose load (the probed instruction) is run in the detour's copy and
// faults for a bad `x`: a signal taken with the pc in the block.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.opt_unwind_fault, \"ax\", @progbits",
    ".globl unw_fault",
    ".globl unw_fault_at",
    ".type unw_fault, @function",
    "unw_fault:",
    ".cfi_startproc",
    "push rbx",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset rbx, -16",
    "unw_fault_at:",
    "mov rax, qword ptr [rdi]",
    "mov ecx, 0",
    "pop rbx",
    ".cfi_def_cfa_offset 8",
    "add rax, 1",
    "ret",
    ".cfi_endproc",
    ".size unw_fault, . - unw_fault",
    ".popsection",
);
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.opt_unwind_fault, \"ax\", %progbits",
    ".globl unw_fault",
    ".globl unw_fault_at",
    ".type unw_fault, %function",
    "unw_fault:",
    ".cfi_startproc",
    "stp x29, x30, [sp, #-16]!",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset x29, -16",
    ".cfi_offset x30, -8",
    "mov x29, sp",
    "unw_fault_at:",
    "ldr x0, [x0]",
    "add x0, x0, #1",
    "ldp x29, x30, [sp], #16",
    ".cfi_def_cfa_offset 0",
    ".cfi_restore x29",
    ".cfi_restore x30",
    "ret",
    ".cfi_endproc",
    ".size unw_fault, . - unw_fault",
    ".popsection",
);

std::arch::global_asm!(
    ".pushsection .text.opt_unwind_tests, \"ax\"",
    probed!("unw_entry"),
    probed!("unw_mid"),
    probed!("unw_trace_entry"),
    probed!("unw_trace_mid"),
    ".popsection",
    callee = sym callee,
);

// The functions above follow the C ABI, touch only scratch registers and the register
// they save, and let `callee`'s panics through: safe to call. The labels are addresses.
unsafe extern "C-unwind" {
    safe fn unw_entry(x: u64) -> u64;
    safe fn unw_mid(x: u64) -> u64;
    safe fn unw_mid_at();
    safe fn unw_trace_entry(x: u64) -> u64;
    safe fn unw_trace_mid(x: u64) -> u64;
    safe fn unw_trace_mid_at();
    safe fn unw_fault_at();
}

unsafe extern "C" {
    /// Reads the word at `x`: only for a readable `x`, or while `on_fault` is installed.
    fn unw_fault(x: *const u64) -> u64;
}

/// Registers an optimized probe at `at` that counts and, with `trace`, records both
/// backtraces from its pre handler.
fn optimized(at: usize, hits: &'static AtomicU64, trace: bool) -> probe_rt::ProbeHandle {
    // SAFETY: `at` is an instruction of one of the functions above; the handler only
    // observes.
    let p = unsafe { Probe::builder().address(at) }
        .pre(move |r: &PtRegs| {
            hits.fetch_add(1, Ordering::Relaxed);
            if trace && r.arg(0) == Some(CAPTURE) {
                let t = capture(Some(r));
                IN_HANDLER.with(|c| *c.borrow_mut() = t);
            }
        })
        .optimize(Optimize::Required)
        .register()
        .expect("optimized");
    assert!(p.is_optimized(), "{:?}", p.why_not_optimized());
    p
}

/// Calls `f` (probed) so that its callee panics, from inside `catch_unwind` in this
/// frame, the probed function's caller; then the process goes on.
#[inline(never)]
fn panics_are_caught_above(f: extern "C-unwind" fn(u64) -> u64) {
    assert_eq!(black_box(f)(3), 7);
    let caught = catch_unwind(AssertUnwindSafe(|| black_box(f)(PANIC)));
    let msg = caught.expect_err("the panic reached catch_unwind");
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"raised below an optimized probe"));
    // The stack and the probed function are fine: calls go on through the detour.
    assert_eq!(black_box(f)(20), 41);
    let again = catch_unwind(AssertUnwindSafe(|| black_box(f)(PANIC)));
    assert!(again.is_err());
    assert_eq!(black_box(f)(1), 3);
}

static ENTRY_HITS: AtomicU64 = AtomicU64::new(0);
static MID_HITS: AtomicU64 = AtomicU64::new(0);

#[test]
fn a_panic_below_an_optimized_entry_unwinds_to_the_caller() {
    let p = optimized(unw_entry as *const () as usize, &ENTRY_HITS, false);
    panics_are_caught_above(unw_entry);
    assert_eq!((p.nhit(), ENTRY_HITS.load(Ordering::Relaxed)), (5, 5));
}

#[test]
fn a_panic_below_an_optimized_mid_function_probe_unwinds_to_the_caller() {
    // aarch64: the probed instruction is the `bl` itself, relocated into the detour.
    let p = optimized(unw_mid_at as *const () as usize, &MID_HITS, false);
    panics_are_caught_above(unw_mid);
    assert_eq!((p.nhit(), MID_HITS.load(Ordering::Relaxed)), (5, 5));
}

/// Checks traces: the probed function `probed` (by its symbol) and this test's
/// function `test` are named, `test` after `probed`, in either trace.
fn check(t: &Traces, probed: &str, test: &str) {
    let at = |what: &str| t.std.find(what).unwrap_or_else(|| panic!("std::backtrace names {what}:\n{}", t.std));
    assert!(at(probed) < at(test), "std::backtrace: {probed} then {test}:\n{}", t.std);
    let at = |what: &str| t.own.iter().position(|n| n.contains(what)).unwrap_or_else(|| panic!("probe_rt's trace names {what}: {:#?}", t.own));
    assert!(at(probed) < at(test), "probe_rt's trace: {probed} then {test}: {:#?}", t.own);
}

/// Calls `f` so that its pre handler and then its callee capture, and checks both.
#[inline(never)]
fn traces_name_the_real_frames(f: extern "C-unwind" fn(u64) -> u64, probed: &str, test: &str) {
    assert_eq!(black_box(f)(CAPTURE), CAPTURE + 1);
    let handler = IN_HANDLER.with(|c| c.borrow().clone());
    check(&handler, probed, test);
    // In a handler, probekit's walk starts at the probed context: the probed function
    // comes first.
    assert!(handler.own.first().is_some_and(|n| n.starts_with(probed)), "{:#?}", handler.own);
    if std::env::var_os("SHOW_TRACES").is_some() {
        eprintln!("{}", handler.std);
    }
    let callee = IN_CALLEE.with(|c| c.borrow().clone());
    check(&callee, probed, test);
    // From `capture` (its first address is into it), called by the callee.
    assert!(callee.own.get(1).is_some_and(|n| n.ends_with("::callee")), "{:#?}", callee.own);
}

static TRACE_ENTRY_HITS: AtomicU64 = AtomicU64::new(0);
static TRACE_MID_HITS: AtomicU64 = AtomicU64::new(0);

#[test]
#[inline(never)] // its name is looked for in backtraces: its own frame in a release build too
fn backtraces_at_an_optimized_entry_name_the_real_frames() {
    let p = optimized(unw_trace_entry as *const () as usize, &TRACE_ENTRY_HITS, true);
    traces_name_the_real_frames(unw_trace_entry, "unw_trace_entry", "::backtraces_at_an_optimized_entry_name_the_real_frames");
    assert_eq!(p.nhit(), 1);
}

#[test]
#[inline(never)] // its name is looked for in backtraces: its own frame in a release build too
fn backtraces_at_an_optimized_mid_function_probe_name_the_real_frames() {
    let p = optimized(unw_trace_mid_at as *const () as usize, &TRACE_MID_HITS, true);
    traces_name_the_real_frames(unw_trace_mid, "unw_trace_mid", "::backtraces_at_an_optimized_mid_function_probe_name_the_real_frames");
    assert_eq!(p.nhit(), 1);
}

/// The address `unw_fault` is given to fault on (page zero).
const BAD: usize = 0x10;
/// The value `on_fault` loads instead.
const LOADED: u64 = 41;
/// `std::backtrace`'s text as `on_fault` took it.
static IN_SIGNAL: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// The SIGSEGV handler of the fault test: records a backtrace (libgcc walks from the
/// signal frame into the interrupted pc, in the detour's copy), then completes the
/// faulting load with [`LOADED`] and resumes after it.
extern "C" fn on_fault(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if addr != BAD {
        std::process::abort(); // a fault the test did not plan
    }
    // A synchronous fault at a known point of the test's own code, not inside the
    // allocator: allocating here is fine for a test.
    if let Ok(mut t) = IN_SIGNAL.lock() {
        *t = Backtrace::force_capture().to_string();
    }
    // SAFETY: the ucontext of the thread the kernel interrupted, ours to change.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    #[cfg(target_arch = "x86_64")]
    {
        // mov rax, qword ptr [rdi]: 3 bytes
        uc.uc_mcontext.gregs[libc::REG_RAX as usize] = LOADED as i64;
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] += 3;
    }
    #[cfg(target_arch = "aarch64")]
    {
        // ldr x0, [x0]
        uc.uc_mcontext.regs[0] = LOADED;
        uc.uc_mcontext.pc += 4;
    }
}

static FAULT_HITS: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
fn fault_in_the_copy() -> u64 {
    // SAFETY: `on_fault` completes the load from BAD.
    black_box(unsafe { unw_fault(black_box(BAD as *const u64)) })
}

#[test]
#[inline(never)] // its name is looked for in backtraces: its own frame in a release build too
fn a_signal_in_the_detour_copy_unwinds_to_the_real_frames() {
    let word = 7u64;
    // SAFETY: a readable word.
    assert_eq!(unsafe { unw_fault(&word) }, 8);
    let p = optimized(unw_fault_at as *const () as usize, &FAULT_HITS, false);
    // SAFETY: a handler for SIGSEGV in this process (the test's only), restored below;
    // the sigaction structs are zeroed and then filled.
    let old = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_fault as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(libc::SIGSEGV, &sa, &mut old), 0);
        old
    };
    let r = fault_in_the_copy();
    // SAFETY: puts back the disposition saved above.
    unsafe { libc::sigaction(libc::SIGSEGV, &old, std::ptr::null_mut()) };
    assert_eq!(r, LOADED + 1, "the load was completed in the detour, and the function went on");
    assert_eq!(p.nhit(), 1);
    let t = IN_SIGNAL.lock().unwrap().clone();
    if std::env::var_os("SHOW_TRACES").is_some() {
        eprintln!("{t}");
    }
    let at = |what: &str| t.find(what).unwrap_or_else(|| panic!("std::backtrace from the signal names {what}:\n{t}"));
    assert!(at("unw_fault") < at("fault_in_the_copy"), "{t}");
    assert!(at("fault_in_the_copy") < at("::a_signal_in_the_detour_copy_unwinds_to_the_real_frames"), "{t}");
}
