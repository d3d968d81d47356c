//! probekit's runtime.
//!
//! It holds the register frame every probe handler sees, [`PtRegs`], for x86_64
//! (Linux `struct pt_regs`) and aarch64 (Linux `struct user_pt_regs`), its offsets
//! ([`offsets`]), breakpoint probes ([`Probe`]) and return probes ([`ReturnProbe`]).
//! Site probes build on them.
//!
//! # Observing is safe, changing is `unsafe`
//! A probe can make the program do anything a debugger can: write a register the
//! compiler keeps a pointer in, return a value no function of that type could, skip
//! a function's effects. Rust cannot check any of that, so it is `unsafe` (DESIGN rule
//! 9), as retour marks every hook and the kernel lets only root do it; everything else
//! is safe. The types draw the line:
//!
//! - safe: handlers that see the registers read-only (`Fn(&PtRegs)`:
//!   [`ProbeBuilder::pre`], [`ProbeBuilder::post`], [`ReturnProbeBuilder::handler`],
//!   [`ReturnProbeBuilder::entry_handler`], which returns whether to watch the call,
//!   [`MultiProbeBuilder::entry`] and `exit`), targets named by a function pointer, a
//!   symbol or a traceable site, and everything about a handle;
//! - `unsafe`, each with a `# Safety` section saying what the caller promises: handlers
//!   that get `&mut PtRegs` (`pre_mut`, `post_mut`, `handler_mut`,
//!   `entry_handler_mut`, which may also return [`Entry::Override`], `entry_mut`,
//!   `exit_mut`), and a raw address ([`ProbeBuilder::address`]).
//!
//! The attribute macros follow the handler's signature: with `&mut PtRegs` the
//! generated `register` is an `unsafe fn`. Handlers are closures that may capture
//! state (`Send + Sync + 'static`, no allocation on the hit path, one indirect call
//! per hit); what they capture is dropped after the probe is unregistered and a grace
//! period has passed ([`synchronize`]). Every probe of a shared handler has its own
//! closure, so two probes tell each other apart by what they captured.
//!
//! # Stack traces and `perf`
//! [`backtrace()`] and [`stack_trace`] (from a handler's [`PtRegs`], the kernel's
//! `stack_trace_save_regs`) walk the stack without allocating, leave probekit's frames
//! out and put the real return address where a return probe hijacked one; in a handler
//! they start at the probed context. `std::backtrace` differs as the [`backtrace`](mod@backtrace)
//! module docs say. [`perf_map`]`(true)` (or `PROBEKIT_PERF_MAP=1`) names probekit's
//! run-time code for `perf` in `/tmp/perf-<pid>.map`.
//!
//! # Registers after a probed call
//! A probed call leaves every general register, the flags and the stack pointer as the
//! unprobed call does, when the handlers only observe, with the exceptions below. Each
//! is a register no code may count on across a call: the status flags (System V AMD64
//! ABI 1.0, §3.2.1: not preserved across calls; DF is clear at a function's entry and
//! return, and a probe leaves it clear), r10 and r11 (§3.2.3: scratch, not preserved)
//! and x16, x17 (AAPCS64 2023Q3, §6.1.1: IP0 and IP1, which veneers and PLT stubs may
//! overwrite between a caller and its callee).
//! `tests/native/tests/clobber.rs` asserts exactly these differences, per kind and
//! architecture, natively and under qemu-aarch64.
//!
//! | probe kind | x86_64 | aarch64 |
//! | --- | --- | --- |
//! | breakpoint ([`Probe`], pre handler) | none | none |
//! | breakpoint with a post handler | none | none |
//! | site ([`Probe`] on a `#[traceable]` function) | status flags (CF PF AF ZF SF OF): as the site trampoline left them | `x16`: the site's continuation, site + 8 |
//! | return ([`ReturnProbe`]) | status flags: as the return dispatcher left them | `x16`: the address of the return trampoline |
//! | return on a `#[traceable]` function (entry on the site) | status flags, as a return probe | `x16`, as a return probe |
//! | the same, through the site's exit path (most `#[traceable]` functions: see [`ReturnProbe`]) | status flags; `r10`, `r11` if it may take arguments on the stack (the exit path copies them: more than five arguments, or one that is not a scalar) | `x16`: the exit path's continuation; `x17` if it may take arguments on the stack |
//! | optimized ([`Optimize`], a jump to a detour) mid-function | none the code there can read (below) | none |
//! | optimized at a function's entry | none but the FP status bits (below) | none |
//!
//! FP/SIMD registers are kept by every kind where they can carry anything: the
//! argument registers at an entry, the return registers at a return, all of the state
//! mid-function; none at the site and exit path of a `#[traceable]` function whose
//! signature puts no argument or return value in them (integers, pointers and
//! references only: the macro records it in the site's record). On x86_64, inside a
//! function of legacy code only (no VEX, EVEX, x87, MMX or `xsave` instruction in
//! it: code built for baseline x86_64), that is what
//! such code can hold: xmm0-15 whole and MXCSR; the rest (zmm16-31 and k0-7, which
//! only AVX-512 code holds, and the x87 status) is caller-saved, dead there, and left
//! as the handler left it, which spares such probes ~10 ns of AVX-512 state moves. At
//! the entry of such a function that calls nothing (a leaf: it can hand no vector
//! argument on), the argument registers' low halves alone, which spares keeping the
//! upper halves (~2 ns). These rest on the ABI, as every entry
//! probe does (none keeps xmm8-15): a caller that keeps a value in a caller-saved
//! register across its call of such a function (GCC's `-fipa-ra` does, for callees it
//! compiled and knows leave the register alone) may find the handler's there.
//!
//! At an entry or a return (sites, return probes, x86_64 optimized entries) the FP
//! *status* bits are not kept: x86_64 MXCSR's exception flags, aarch64
//! FPSR's cumulative flags, are as the handlers' float math left them (MXCSR's status
//! bits are caller-saved, System V AMD64 ABI §3.2.1; only its control bits are
//! callee-saved). The differential fuzzer (`probe-rt/tests/opt_fuzz.rs`) compares
//! every other register of breakpoint and optimized probes at every instruction.
//!
//! A site probe's difference is made at the function's entry: the caller sees it only
//! where the function's body leaves that register alone (x16 and the flags are scratch
//! to any function). A return probe's is made at the return, so the caller sees it.
//! Breakpoint probes restore every register from the signal context, the flags
//! included. Why the differences stay:
//!
//! - x86_64 status flags (site and return trampolines): the ABI gives them no meaning
//!   at a function's entry or return, and these paths run on every call of a traced
//!   function. (The kernel's ftrace and rethook trampolines restore them with `popfq`,
//!   which costs about 10 ns on the development machine; the detours of optimized
//!   probes, which run mid-function, restore them with `sahf` and an addition, a few
//!   cycles.)
//! - aarch64 `x16` after a site probe: the trampoline must jump back into the function
//!   with every other register restored, so it resumes through x16 (`ret x16`). The
//!   kernel's ftrace resumes through x9 instead, which then holds the continuation;
//!   here x9 keeps the link register the site's `mov x9, x30` put there, as unprobed.
//! - aarch64 `x16` after a return probe: the instance's stub reaches the trampoline
//!   with `ldr x16, <address>; br x16` (stubs may lie anywhere, out of `b` range), so
//!   what x16 held at the function's `ret` is gone before anything can save it.
//!
//! A handler's writes to the frame (the `unsafe` handlers, [`ProbeBuilder::pre_mut`]
//! and the like) take effect, except to what the mechanism owns: at a site the x86_64
//! `eflags`, the aarch64 `regs[16]` (x16 gets the pc) and the stack pointer (but for
//! an x86_64 override that returns from the function); in a return handler the x86_64
//! `eflags`, the stack pointer, the pc and the aarch64 `regs[30]` (the function
//! returns to its caller, with x30 holding the real return address).
//!
//! # Code generated at run time
//! Code in anonymous memory (a JIT's) has no symbol: [`jit::declare`] gives probekit
//! a function's name and bounds, so that it can be probed by name or address and its
//! probes optimized.
//!
//! # Layout
//! Layers whose dependencies point one way (DESIGN.md, "The runtime's layout"):
//! `sys` (maps, symbols, code writes, signals, the signal context) uses nothing of
//! probekit; `arch` (encodings, decoding, relocation, simulation) uses `sys`;
//! `registry` (probe records, their chains and lookup, slots) and `grace` (grace
//! periods) use `sys`; the mechanisms — `site` (site patching and hit path),
//! `breakpoint` (the `Probe` API, arming, the SIGTRAP path), `optprobe` (breakpoint
//! probes switched to jumps to detours), `retprobe` — use the
//! layers above them; this file, the listing and the blacklist use everything.
//! `trace` (cargo feature `trace`), the function-graph tracer, is built on `multi`.
#![deny(missing_docs)]

mod arch;
pub mod backtrace;
mod batch;
mod blacklist;
pub mod breakpoint;
mod error;
pub mod events;
pub mod frame;
mod grace;
pub mod jit;
mod listing;
pub mod multi;
mod optprobe;
pub mod perfmap;
mod registry;
pub mod retprobe;
mod site;
mod sys;
#[cfg(feature = "trace")]
pub mod trace;
mod unwind;

/// The client of the light records' hooks (`site::fgraph::Hooks`) without the `trace`
/// feature: none.
#[cfg(not(feature = "trace"))]
use site::fgraph::NoHooks as LightHooks;
/// The client of the light records' hooks (`site::fgraph::Hooks`), bound here where
/// both are known: the function-graph tracer.
#[cfg(feature = "trace")]
use trace::Light as LightHooks;

/// A panic is unwinding the frame of a call entered at stack pointer `sp` (a site's
/// exit path, a return probe's stub: see `unwind::personality`): the calls
/// of this thread entered there or deeper are over, now. The tracer ends them as
/// unwound; return-probe instances stay until the thread's next entry or return finds
/// them gone (the unwinder still reads a stub's instance after this).
fn unwound(sp: usize) {
    #[cfg(feature = "trace")]
    trace::unwound(sp);
    #[cfg(not(feature = "trace"))]
    let _ = sp;
}

pub use arch::{cpu_support, CpuSupport};
pub use backtrace::{backtrace, stack_trace};
pub use batch::{register_batch, unregister_batch, AnyHandle, AnyProbe, BatchError, BatchHandle, BatchMember};
pub use blacklist::{blacklist, Blacklisted};
pub use breakpoint::{FnAddr, Probe, ProbeBuilder, ProbeHandle};
pub use error::{Error, NotOptimized};
pub use events::EventBuffer;
pub use frame::{PtRegs, VReg};
pub use listing::{list, ProbeInfo, ProbeList};
pub use multi::{Attached, MultiProbe, MultiProbeBuilder, MultiProbeHandle, Skipped};
pub use optprobe::Optimize;
pub use perfmap::{perf_map, perf_map_path};
pub use retprobe::{Entry, HasHandler, NoHandler, ReturnProbe, ReturnProbeBuilder, ReturnProbeHandle, MAX_MAXACTIVE};
pub use site::table::{sites, SiteInfo};
pub use sys::code::{text_writes, write_mode, TextWrites, WriteFailure, WriteMode};

/// Waits for a grace period, as the kernel's `synchronize_rcu` after unregistering
/// kprobes: when it returns `true`, no thread is running a handler of a probe
/// unregistered before the call any more, and those handlers (the closures and what
/// they captured) have been dropped, a return probe's once every call it watched has
/// returned. Unregistering alone retires handlers, which are dropped with a later
/// grace period. `false` if no grace period could complete (a thread blocks the
/// signal probekit samples threads with: see the module docs of breakpoint probes,
/// "Lifetime"); try again later.
///
/// Handlers' captured state is dropped under probekit's registry lock: its `Drop`
/// must not register or unregister probes.
pub fn synchronize() -> bool {
    let records = registry::lock().reclaim();
    retprobe::synchronize() && records
}

/// Runs before `main` (and before any constructor could register a probe): tells the
/// grace periods where the hit paths are, and registration what the blacklist refuses,
/// which only this layer knows.
extern "C" fn init_layers() {
    grace::set_hit_path(blacklist::hit_path_ranges);
    // Every registration asks the blacklist first: the perf map catches up then.
    registry::set_blacklist(|addr| {
        perfmap::on_register();
        blacklist::find_at(addr).map(|b| b.name)
    });
}
#[used]
#[link_section = ".init_array"]
static INIT_LAYERS: extern "C" fn() = init_layers;

/// Breakpoint probes: the kprobe of a process (see [`Probe`]).
pub mod probe {
    pub use crate::batch::{register_batch, unregister_batch, BatchError};
    pub use crate::blacklist::{blacklist, Blacklisted};
    pub use crate::breakpoint::{FnAddr, Probe, ProbeBuilder, ProbeHandle, RECLAIM_BATCH};
    pub use crate::error::NotOptimized;
    pub use crate::listing::{list, ProbeInfo, ProbeList};
    pub use crate::optprobe::Optimize;
}

/// The patchable sites of `#[traceable]` functions (see [`sites()`]).
pub mod sites {
    pub use crate::site::table::{sites, SiteInfo, SITE_LEN};
}

/// The built-in frame's offsets (`S_X0`, `S_PSTATE`, `S_RIP`, `S_FRAME_SIZE`, …),
/// generated by probe-codegen from the same source as [`PtRegs`] and checked against
/// the compiler's `offset_of!` at build time.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub mod offsets {
    include!(concat!(env!("OUT_DIR"), "/offsets.rs"));
}

/// Support for generated code; not public API.
#[doc(hidden)]
pub mod __private {
    pub use memoffset;
    pub use static_assertions;

    /// The address of a function item, for `#[kprobe(function = path)]` and
    /// `#[kretprobe(function = path)]`, which cannot spell the function's pointer type.
    #[derive(Clone, Copy, Debug)]
    pub struct FnItem(pub(crate) usize);

    impl FnItem {
        /// `f`'s address, given as `addr`. Fails to compile unless `F` is zero-sized,
        /// as function items are (an integer constant is not).
        ///
        /// # Safety
        /// `addr` must be `f as *const () as usize`.
        pub unsafe fn new<F: Copy>(f: &F, addr: usize) -> FnItem {
            let _ = f;
            const { assert!(std::mem::size_of::<F>() == 0, "`function = path` must name a function") };
            FnItem(addr)
        }
    }

    /// The function holding `addr` (a Rust path without the hash, or a C symbol) and
    /// the offset into it, from the symbol tables: for tests that check stack traces.
    pub fn symbol_of(addr: usize) -> Option<(String, usize)> {
        crate::sys::symbols::symbol_of(addr)
    }

    /// Whether this thread has its entry in the grace periods' thread table (it took
    /// one the first time it entered a hit path). For tests of `fork`.
    pub fn this_thread_recorded() -> bool {
        crate::grace::with_thread(|t| t.recorded_shard().is_some())
    }

    /// Probe records ever taken, retired (waiting for a grace period) and free for
    /// reuse: `(taken, retired, free)`. For tests of reuse.
    pub fn record_counts() -> (usize, usize, usize) {
        crate::registry::counts()
    }

    /// What one probe costs in memory, statically (bytes): for the attach bench's
    /// report of an idle probe's memory.
    #[derive(Clone, Copy, Debug)]
    pub struct Footprint {
        /// One probe record (allocated in chunks of 1,024, never freed, reused).
        pub record: usize,
        /// The record's per-thread site-hit counters, allocated beside it.
        pub hit_counters: usize,
        /// The record's share of the padding of its group of records and counters
        /// (a group fills a power of two, so that a hit finds a counter from the
        /// record's address).
        pub padding: usize,
        /// One entry of the address map: per probed address, not per probe; the table
        /// is kept at most half full, and the tables it outgrew are kept.
        pub addr_entry: usize,
        /// One out-of-line slot (breakpoint probes; site probes have none).
        pub slot: usize,
    }

    /// See [`Footprint`].
    pub fn footprint() -> Footprint {
        Footprint {
            record: core::mem::size_of::<crate::registry::Record>(),
            hit_counters: crate::registry::COUNTER_BYTES,
            padding: crate::registry::PADDING_BYTES,
            addr_entry: crate::registry::addrmap::ENTRY_BYTES,
            slot: crate::registry::SLOT,
        }
    }

    /// Runs one grace period now, with no retired slots (only the hit paths' own code
    /// counts as busy), and says whether it completed: what every reuse of a record
    /// waits for. For benches and tests of grace periods.
    pub fn grace_period() -> bool {
        crate::grace::quiescent(&[])
    }

    /// What the grace periods' thread table holds now (see [`thread_table`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ThreadTable {
        /// Entries the table has room for without growing.
        pub entries: usize,
        /// Entries holding a thread id (threads that entered a hit path, and exited
        /// threads whose entry was not taken back yet).
        pub taken: usize,
        /// A thread found no entry: grace periods sample every thread of the process.
        pub fallback: bool,
    }

    /// The grace periods' thread table now. For tests of it.
    pub fn thread_table() -> ThreadTable {
        crate::grace::table_state()
    }

    use core::sync::atomic::AtomicU64;

    /// Size of the `xsave` area the x86_64 `fp = full` routines allocate (set before
    /// `main`): the CPU's standard size (CPUID.(EAX=0DH,ECX=0):EBX), or what
    /// `fp = full-in-use` moves reach if more (probe-codegen's `Fp::in_use_area`: on
    /// AMD Zen 4, 2,688 bytes against 2,432). Read by generated asm as a `u64`,
    /// also from `.S` files under its symbol name. Until it is set (a probe hit in an
    /// earlier constructor) it is the legacy area and header with an empty mask: safe,
    /// but no FP/SIMD state is preserved then (`fp = full-in-use`: x87 and SSE only).
    #[export_name = "probekit_xsave_size"]
    pub static XSAVE_SIZE: AtomicU64 = AtomicU64::new(512 + 64);
    /// The `xsave` requested-feature bitmap (XCR0, set before `main`).
    #[export_name = "probekit_xsave_mask"]
    pub static XSAVE_MASK: AtomicU64 = AtomicU64::new(0);
    /// How the x86_64 `fp = args_wide`, `return_wide` and `sse` routines learn which
    /// upper halves to keep (probe-codegen's `Fp::WIDE_ASK`, `Fp::WIDE_ZMM`; set before
    /// `main`, see `arch::wide_mode`). Until it is set they test the ymm halves by value
    /// and do not keep the zmm bits.
    #[export_name = "probekit_wide_mode"]
    pub static WIDE_MODE: AtomicU64 = AtomicU64::new(0);

    #[cfg(target_arch = "x86_64")]
    extern "C" fn init_xsave() {
        use core::sync::atomic::Ordering;
        // CPUID.1:ECX.OSXSAVE[bit 27]: the OS enabled xsave and xgetbv.
        if core::arch::x86_64::__cpuid(1).ecx & (1 << 27) == 0 {
            return; // no xsave: `cpu_support().xsave` is false, and fp = full routines cannot run
        }
        let standard = core::arch::x86_64::__cpuid_count(0xd, 0).ebx as u64;
        let (lo, hi): (u32, u32);
        // SAFETY: xgetbv with ecx = 0 is allowed in user space when OSXSAVE is set (checked).
        unsafe { core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
        let xcr0 = (hi as u64) << 32 | lo as u64;
        let (size, wide) = (standard.max(crate::arch::in_use_area(xcr0)), crate::arch::wide_mode(xcr0));
        // Each word, exported and the runtime's private copy (`arch::XSAVE_SIZE`, ...).
        use crate::arch as private;
        for (exported, copy, value) in
            [(&XSAVE_SIZE, &private::XSAVE_SIZE, size), (&XSAVE_MASK, &private::XSAVE_MASK, xcr0), (&WIDE_MODE, &private::WIDE_MODE, wide)]
        {
            exported.store(value, Ordering::Relaxed);
            copy.store(value, Ordering::Relaxed);
        }
    }

    /// Runs `init_xsave` before `main` (and before any constructor that could hit a probe).
    #[cfg(target_arch = "x86_64")]
    #[used]
    #[link_section = ".init_array"]
    static INIT_XSAVE: extern "C" fn() = init_xsave;
}

/// One field of a [`Frame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameField {
    /// The field's name.
    pub name: &'static str,
    /// Its offset in the struct.
    pub offset: usize,
    /// Its size in bytes.
    pub size: usize,
}

/// A register frame: a `#[repr(C)]` struct whose layout probe-codegen generated the
/// save/restore sequences for. Implemented by `#[probekit::pt_regs]` and for [`PtRegs`].
///
/// # Safety
/// `FIELDS` and `SIZE` must be the struct's real layout, and every field must be an
/// integer (or array of integers) for which any bit pattern is valid, because
/// generated code writes each field from a register. `#[pt_regs]` checks the layout
/// with compile-time assertions.
pub unsafe trait Frame: Sized + 'static {
    /// The struct's name.
    const NAME: &'static str;
    /// The fields in memory order.
    const FIELDS: &'static [FrameField];
    /// `size_of::<Self>()`.
    const SIZE: usize;
}
