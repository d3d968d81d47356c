//! Jump-optimized probes: the kernel's optprobes (Documentation/trace/kprobes.rst,
//! "How Does Jump Optimization Work?"), for breakpoint probes on any address.
//!
//! A [`Probe`](crate::Probe) (and a [`ReturnProbe`](crate::ReturnProbe)'s entry) is
//! registered as a breakpoint probe, then, if [`Optimize`] allows and the address
//! passes the checks of the kernel's `can_optimize` (see `arch::detour`), switched to
//! a jump to a *detour*: a block near the address that calls the generated trampoline
//! (every register, the flags and the FP/SIMD state saved into a [`PtRegs`](crate::PtRegs) and
//! restored), whose dispatcher runs the probes at the address as the SIGTRAP handler
//! would, then runs the displaced instructions relocated and jumps back. No trap, no
//! signal: tens of nanoseconds instead of microseconds.
//!
//! # Same semantics as a breakpoint
//! The pre handlers see every register with the pc at the probed address, in
//! registration order (aggregation: one detour per address runs every probe armed
//! there); their changes are written back (x86_64 flags: the status flags and DF, as a
//! breakpoint's); a changed pc (or stack pointer) is followed: execution resumes
//! there, not in the relocated copy. `nhit`, `nmissed`, enable/disable and reentrancy
//! (a probe hit inside a handler is missed, its instructions still run) are as for a
//! breakpoint. A probe with a post handler stays a breakpoint (the kernel never
//! optimizes one either), and so do the other probes at its address.
//!
//! # Switching while threads run
//! As the kernel does it. Optimizing: the breakpoint is armed first; the block is
//! written (through `sys::code`, before anything can jump to it); the breakpoint path
//! is told to send threads that trap there on to the block's relocated copy (as the
//! kernel's `setup_detour_execution`); x86_64, where the jump displaces more than one
//! instruction, a grace period that samples *every* thread of the process shows that
//! none is inside the displaced range past its first byte (a thread stopped there, in
//! the SIGTRAP handler of a breakpoint anywhere in the range, or in the out-of-line
//! slot of any probe in the range, registered or unregistered and not yet reclaimed,
//! on its way there, is asked again until it is out), then the `text_poke_bp` sequence: the `int3` stays on the first
//! byte while the other four bytes of the `jmp` are written, every core is synced, then
//! the first byte, then a sync. aarch64 replaces the `brk` word with a `b`, both of the
//! instructions the architecture lets one rewrite while others run them, and syncs: a
//! one-instruction range has no inside. Unoptimizing runs backwards: the breakpoint's
//! first byte back, a sync, the original tail, a sync (x86_64); the block is never
//! written again nor unmapped, and serves only that address again (see `block`).
//!
//! Residual risk (x86_64): the grace period sees the pc each thread is interrupted at.
//! A thread that was inside the displaced range when a signal handler started, and is
//! still in that handler, is seen in the handler, not in the range.
//!
//! # Unwinding
//! A panic raised in a function called from a probed region unwinds to the probed
//! function's caller, and backtraces name the real frames. No callee returns into a
//! detour: x86_64 never displaces a `call` (the window stops before it), and aarch64
//! relocates a displaced `bl`/`blr` with x30 set to the original next instruction, so
//! the callee returns to the probed code and the unwinder walks its own FDE. Where a
//! thread can stand in probekit's code, unwind information says where the probed
//! context is:
//!
//! - in a pre handler, the trampoline's call of the dispatcher carries CFI (probe-codegen's
//!   SaveRestore shape) that reads the probed context from the `PtRegs` frame: stack
//!   pointer, every register, and the probed pc (given + 1, so that the lookup at return
//!   address − 1 lands on it, and the probed function's name, not the one before, is
//!   shown). libgcc's walk (a backtrace in a handler) goes from `dispatch` through the
//!   trampoline straight to the probed function and its callers;
//! - in the block itself (a signal taken in its entry, its relocated copy or a resume
//!   stub; the trampoline's return address before the dispatcher rewrote the frame),
//!   an FDE per block (`arch::detour::unwind`, built by `crate::unwind`) describes each
//!   instruction as the probed code's frame at the original instruction it stands for.
//!   It is registered with libgcc's `__register_frame` when the block is written (never
//!   on a hit path), and never deregistered (the block is never written again).
//!
//! [`crate::backtrace()`] and [`crate::stack_trace`] see through the dispatcher from the
//! same frame (see [`crate::backtrace`](mod@crate::backtrace)); they do not read the
//! blocks' FDEs: a walk that starts at a pc inside a block (a signal handler's
//! `stack_trace` of the interrupted context) ends there. libgcc shows one frame at
//! the block's address (`<unknown>`) when a signal interrupted a thread in it.

mod block;
mod hit;

pub(crate) use hit::{dispatch, resume_trap, trampoline, trampolines, Live};

#[cfg(target_arch = "x86_64")]
use crate::arch::cpu_support;
use crate::arch::detour::{self, JUMP};
use crate::arch::insn::BREAKPOINT;
use crate::registry::{self, record, Record, ADDRS, REDIRECTS};
use crate::sys::code;
use crate::{Error, NotOptimized};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Whether a probe may be optimized: switched from a breakpoint (a trap and a signal
/// per hit, microseconds) to a jump to a *detour* that calls a generated trampoline
/// (tens of nanoseconds), as the kernel's optimized kprobes are.
///
/// A probe is registered as a breakpoint, then switched when its address allows:
/// x86_64, the whole instructions the 5-byte `jmp` displaces fall through, relocate,
/// end inside the function (its symbol must have a size), and nothing in the function
/// or its separate cold parts (`f.cold`, `f.cold.N`) jumps into them or through a jump
/// table; aarch64, the one instruction a `b`
/// replaces relocates (every pc-relative form does, but `blr x30`). Handlers see and
/// change the same registers as a breakpoint's, a changed pc is followed, and probes
/// at one address share one detour. A probe with a post handler stays a breakpoint,
/// and so do the other probes at its address; a probe on a `#[traceable]` site rides
/// the site. [`crate::ProbeHandle::why_not_optimized`] says why a probe is not
/// optimized ([`crate::NotOptimized`]); the listing flags optimized probes
/// `[OPTIMIZED]`.
///
/// On x86_64 a displaced range of several instructions is written only once a grace
/// period that samples every thread of the process (a signal each) shows that none is
/// inside it; a thread that blocks the signal keeps such probes breakpoints
/// ([`crate::NotOptimized::ThreadsInWindow`]) until it unblocks or exits (tried again
/// by later registrations, at growing intervals).
///
/// A builder starts from [`Optimize::WhenPossible`], or from [`Optimize::Never`] when
/// the environment variable `PROBEKIT_OPTIMIZE` is `never` at the first registration:
/// a way to run a program, or a test suite, with every probe a breakpoint, to tell
/// the mechanisms apart (CI runs the breakpoint suites both ways).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Optimize {
    /// Always a breakpoint (a trap and a signal per hit).
    Never,
    /// A jump when the address allows it, else a breakpoint (the default): the handle
    /// says which, and why ([`crate::ProbeHandle::is_optimized`]).
    #[default]
    WhenPossible,
    /// A jump, or no probe: registration fails with [`crate::Error::NotOptimized`] and
    /// the reason. A probe on a `#[traceable]` site rides the site, which is no trap
    /// either: that satisfies it.
    Required,
}

impl Optimize {
    /// What a builder asks for unless told: [`Optimize::WhenPossible`], or
    /// [`Optimize::Never`] if `PROBEKIT_OPTIMIZE=never` (read once).
    pub(crate) fn by_default() -> Optimize {
        static DEFAULT: std::sync::OnceLock<Optimize> = std::sync::OnceLock::new();
        *DEFAULT.get_or_init(|| match std::env::var("PROBEKIT_OPTIMIZE").as_deref() {
            Ok("never") => Optimize::Never,
            _ => Optimize::WhenPossible,
        })
    }

    /// The byte a record keeps (0, a zeroed record's, is the default).
    pub(crate) fn byte(self) -> u8 {
        match self {
            Optimize::WhenPossible => 0,
            Optimize::Never => 1,
            Optimize::Required => 2,
        }
    }

    fn of(e: &Record) -> Optimize {
        match e.opt_mode.load(Ordering::Relaxed) {
            1 => Optimize::Never,
            2 => Optimize::Required,
            _ => Optimize::WhenPossible,
        }
    }
}

/// The most bytes a jump displaces: x86_64, whole instructions covering its 5 bytes,
/// so at most 4 and then one of up to 15; aarch64 one instruction.
const WINDOW_MAX: usize = 4 + 15;

/// An optimized address: the jump is in the text. Kept for every optimized address,
/// so small: the original bytes inline, the detour's only as long as they are (the
/// block's memory holds them).
struct Window {
    /// Bytes the jump displaced (whole instructions).
    len: usize,
    /// Their original bytes: `orig[..len]`.
    orig: [u8; WINDOW_MAX],
    /// The detour block, and how many bytes of it the detour is.
    block: usize,
    code: usize,
}

impl Window {
    /// The original bytes of the displaced range.
    fn orig(&self) -> &[u8] {
        &self.orig[..self.len]
    }
}

/// What is optimized, why the rest is not, and the blocks. Taken under the registry
/// lock only (after it), so the two never wait on each other the other way round.
struct State {
    windows: BTreeMap<usize, Window>,
    /// Why an address with armed probes is not optimized (its last try).
    reasons: BTreeMap<usize, NotOptimized>,
    blocks: block::Blocks,
    /// When a grace period over every thread is worth trying again after one failed
    /// (a thread that blocks the sampling signal costs each try 100 ms), and how long
    /// to wait after the next failure (doubling, up to [`MAX_BACKOFF`]). Addresses
    /// refused meanwhile ([`NotOptimized::ThreadsInWindow`]) are tried again by later
    /// registrations once it is due.
    retry: Option<Instant>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // aarch64 needs no grace period
    backoff: Duration,
}

/// Grace periods tried in a row before an optimization is given up (until [`State::retry`]).
#[cfg(target_arch = "x86_64")]
const TRIES: usize = 3;
/// The longest wait between grace periods over every thread that keep failing.
#[cfg(target_arch = "x86_64")]
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The first wait after a failure (the sampling's own silence budget).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

static STATE: Mutex<State> =
    Mutex::new(State { windows: BTreeMap::new(), reasons: BTreeMap::new(), blocks: block::Blocks::new(), retry: None, backoff: FIRST_BACKOFF });

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether record `e` lets its address be optimized: not [`Optimize::Never`], no post
/// handler, not a site.
pub(crate) fn allows(e: &Record) -> bool {
    Optimize::of(e) != Optimize::Never && e.post.load(Ordering::Relaxed) == 0 && !e.site.load(Ordering::Relaxed)
}

/// Whether `addr` is optimized now (the jump is in the text).
pub(crate) fn is_live(addr: usize) -> bool {
    state().windows.contains_key(&addr)
}

/// Whether probekit's jump is in the text at `addr` (optimized, and the code still
/// there: not unloaded, maybe something else mapped there since).
pub(crate) fn jump_in_text(addr: usize) -> bool {
    let st = state();
    let Some(w) = st.windows.get(&addr) else { return false };
    jump_bytes(addr, w.block).is_some_and(|j| code::read(addr, JUMP).is_some_and(|t| t == j))
}

/// The jump written at `addr` to its block.
fn jump_bytes(addr: usize, block: usize) -> Option<Vec<u8>> {
    #[cfg(target_arch = "x86_64")]
    return detour::jump(addr, block + detour::ENTRY).map(|j| j.to_vec());
    #[cfg(target_arch = "aarch64")]
    return detour::branch(addr, block + detour::ENTRY, false).map(|w| w.to_le_bytes().to_vec());
}

/// The code at `addr` is gone (its library unloaded): its window is forgotten, with
/// nothing written. Under the registry lock.
pub(crate) fn forget(addr: usize) {
    let mut st = state();
    if let Some(w) = st.windows.remove(&addr) {
        publish(addr, 0);
        st.blocks.park(w.block, addr, w.code);
    }
    st.reasons.remove(&addr);
}

/// Called when record `index` is linked at its address: it sends trapping threads to
/// the address's detour if the address is optimized (see `Record::detour`).
pub(crate) fn linked(index: usize) {
    let e = record(index);
    let addr = e.target.load(Ordering::Relaxed);
    let copy = state().windows.get(&addr).map_or(0, |w| w.block + detour::COPY);
    e.detour.store(copy, Ordering::Release);
}

/// Tells every record linked at `addr` where a trapping thread goes on (0: the slot).
fn publish(addr: usize, copy: usize) {
    for e in registry::linked_at(addr) {
        if e.target.load(Ordering::Relaxed) == addr {
            e.detour.store(copy, Ordering::Release);
        }
    }
}

/// Puts the original bytes of optimized windows back into `code`, the text at `from`
/// (registration reads the original code: the breakpoints are taken out elsewhere).
pub(crate) fn original(from: usize, code: &mut [u8]) {
    overlay(&state(), from, code);
}

/// [`original`] with the state at hand.
fn overlay(st: &State, from: usize, code: &mut [u8]) {
    let to = from + code.len();
    for (&a, w) in st.windows.range(..to) {
        for (k, b) in w.orig().iter().enumerate() {
            if let Some(i) = (a + k).checked_sub(from).filter(|i| *i < code.len()) {
                code[i] = *b;
            }
        }
    }
}

/// The optimized address whose displaced range holds `addr` past its first byte, if any.
pub(crate) fn window_around(addr: usize) -> Option<usize> {
    let st = state();
    st.windows.range(..addr).next_back().filter(|(a, w)| addr < *a + w.len).map(|(a, _)| *a)
}

/// Why record `e`'s probe is not optimized, or None if it is.
pub(crate) fn why_not(e: &Record) -> Option<NotOptimized> {
    if e.site.load(Ordering::Relaxed) {
        return Some(NotOptimized::Site);
    }
    if Optimize::of(e) == Optimize::Never {
        return Some(NotOptimized::Off);
    }
    if e.post.load(Ordering::Relaxed) != 0 {
        return Some(NotOptimized::PostHandler);
    }
    let addr = e.target.load(Ordering::Relaxed);
    if e.addr.load(Ordering::Relaxed) == 0 {
        return Some(NotOptimized::Disabled);
    }
    let st = state();
    if st.windows.contains_key(&addr) {
        // With a reason: a window whose tail could not be written (see `back_out`).
        return st.reasons.get(&addr).cloned();
    }
    Some(st.reasons.get(&addr).cloned().unwrap_or(NotOptimized::SharedWithBreakpoint))
}

/// Whether record `e` was registered with [`Optimize::Required`].
pub(crate) fn required(e: &Record) -> bool {
    Optimize::of(e) == Optimize::Required
}

/// Optimizes every address of `addrs` whose armed probes all allow it and that is not
/// optimized yet (batched: one grace period, one `text_poke_bp` sequence), with those
/// a failed grace period left waiting once it is worth trying again; records why for
/// the others. Under the registry lock.
pub(crate) fn settle(addrs: &[usize]) {
    let mut st = state();
    let mut todo = Vec::new();
    // Tried again: addresses a grace period failed for, once worth it, and those a
    // probe inside their range kept breakpoints, when that probe's address changes.
    let due = st.retry.is_none_or(|at| Instant::now() >= at);
    let waiting: Vec<usize> = st
        .reasons
        .iter()
        .filter(|(_, r)| match r {
            NotOptimized::ThreadsInWindow => due,
            NotOptimized::ProbeInWindow { at } => addrs.contains(at),
            _ => false,
        })
        .map(|(a, _)| *a)
        .collect();
    for &a in addrs.iter().chain(&waiting) {
        if st.windows.contains_key(&a) || todo.contains(&a) {
            continue;
        }
        let mut armed = registry::armed_at(a).filter(|e| !e.site.load(Ordering::Relaxed)).peekable();
        if armed.peek().is_none() {
            st.reasons.remove(&a);
            continue;
        }
        if !armed.all(allows) {
            st.reasons.insert(a, NotOptimized::SharedWithBreakpoint);
            continue;
        }
        todo.push(a);
    }
    if !todo.is_empty() {
        optimize(&mut st, &todo);
    }
}

/// An address ready to be optimized: block written, not yet reachable.
struct Prepared {
    addr: usize,
    window: Window,
    jump: Vec<u8>,
}

/// Prepares the detour of `addr` (see [`Prepared`]).
fn prepare(st: &mut State, addr: usize) -> Result<Prepared, NotOptimized> {
    #[cfg(target_arch = "x86_64")]
    let (len, orig, make) = {
        // The trampolines' flags restore uses them (see probe-codegen's x86_64 planner).
        if !cpu_support().lahf_sahf {
            return Err(NotOptimized::CpuLacks { feature: "LAHF/SAHF in 64-bit mode" });
        }
        let f = crate::sys::symbols::sized_function_at(addr).ok_or(NotOptimized::FunctionSizeUnknown)?;
        let mut func = crate::breakpoint::without_breakpoints(f.addr, f.addr + f.size).ok_or(NotOptimized::UndecodableFunction { at: f.addr })?;
        overlay(st, f.addr, &mut func);
        let window = detour::window(addr, f.addr, &func)?;
        let len = window.len;
        // Its separate cold parts (GCC's hot/cold split) jump back into it: checked as
        // the function is (one without a size cannot be). An address inside a cold
        // part is inside its function: the function and its other parts are checked.
        use crate::sys::symbols::{cold_parts, parents_of_cold};
        let parents = parents_of_cold(&f);
        let family = if parents.is_empty() { std::slice::from_ref(&f) } else { &parents[..] };
        let mut others: Vec<_> = family.iter().flat_map(|g| std::iter::once(g.clone()).chain(cold_parts(g))).filter(|c| c.addr != f.addr).collect();
        others.sort_by_key(|c| c.addr);
        others.dedup_by_key(|c| c.addr);
        let mut parts = Vec::new();
        for c in others {
            if c.size == 0 {
                return Err(NotOptimized::FunctionSizeUnknown);
            }
            let mut part = crate::breakpoint::without_breakpoints(c.addr, c.addr + c.size).ok_or(NotOptimized::UndecodableFunction { at: c.addr })?;
            overlay(st, c.addr, &mut part);
            detour::no_jump_into(addr, len, c.addr, &part)?;
            parts.push((c, part));
        }
        let orig = &func[addr - f.addr..addr - f.addr + len];
        // A function's entry (not a label inside one): only arguments live in the
        // vector registers, and only their low halves in a leaf of legacy SSE code.
        // Mid-function in code of legacy SSE only (the whole function and its parts
        // decoded): xmm0-15 and MXCSR.
        let uses = detour::vector_use(f.addr, &func);
        let legacy = uses.legacy && parts.iter().all(|(c, part)| detour::vector_use(c.addr, part).legacy);
        let live = match (f.addr == addr && !f.label && parents.is_empty(), legacy) {
            (true, true) if uses.leaf => Live::ArgsLow,
            (true, _) => Live::Args,
            (false, true) => Live::Sse,
            (false, false) => Live::All,
        };
        // Where the trampoline keeps the whole FP/SIMD state it does so with `xsave` and
        // its kin, which fault where the OS did not enable them (as it does in legacy
        // code where the CPU has no AVX state: `trampoline`).
        if (live == Live::All || live == Live::Sse && !cpu_support().wide) && !cpu_support().xsave {
            return Err(NotOptimized::CpuLacks { feature: "xsave enabled by the OS (OSXSAVE), which keeps the FP/SIMD state mid-function" });
        }
        let tramp = trampoline(live);
        let make = move |block: usize| {
            let (copy, rows) = window.relocate(block + detour::COPY, addr + len)?;
            Ok((detour::block(block, addr, tramp, &copy), detour::unwind(block, addr, &rows, copy.len())))
        };
        let mut saved = [0; WINDOW_MAX];
        saved.get_mut(..len).ok_or(NotOptimized::UndecodableFunction { at: addr })?.copy_from_slice(orig);
        (len, saved, make)
    };
    #[cfg(target_arch = "aarch64")]
    let (len, orig, make) = {
        let mut orig = crate::breakpoint::without_breakpoints(addr, addr + 4).ok_or(NotOptimized::UndecodableFunction { at: addr })?;
        overlay(st, addr, &mut orig);
        let w = u32::from_le_bytes(orig[..4].try_into().map_err(|_| NotOptimized::UndecodableFunction { at: addr })?);
        let tramp = trampoline(Live::All);
        let make = move |block: usize| {
            let (copy, pool, rows) = detour::relocate(w, addr, block + detour::COPY, block + detour::POOL)?;
            Ok((detour::block(block, addr, tramp, &copy, &pool), detour::unwind(block, addr, &rows)))
        };
        let mut saved = [0; WINDOW_MAX];
        saved[..4].copy_from_slice(&orig[..4]);
        (4, saved, make)
    };
    // Nothing else may be written inside the range: another probe's breakpoint, a site.
    for at in addr + 1..addr + len {
        let site = crate::site::table::site_of(at).is_some_and(|s| s.site == at) || crate::site::table::site_around(at).is_some();
        if ADDRS.head(at) != 0 || site {
            return Err(NotOptimized::ProbeInWindow { at });
        }
    }
    let (block, code) = st.blocks.place(addr, make)?;
    let Some(jump) = jump_bytes(addr, block) else {
        st.blocks.park(block, addr, code);
        return Err(NotOptimized::NoNearMemory);
    };
    // Its resume breakpoint is known to the trap path (for good: blocks stay mapped).
    if let Err(e) = REDIRECTS.set(block + detour::RESUME_TRAP, 1) {
        st.blocks.park(block, addr, code);
        return Err(NotOptimized::Write(Box::new(e)));
    }
    Ok(Prepared { addr, window: Window { len, orig, block, code }, jump })
}

/// Gives a prepared address up: trapping threads go to the slot again, the block is parked.
fn abandon(st: &mut State, p: Prepared, why: NotOptimized) {
    publish(p.addr, 0);
    st.blocks.park(p.window.block, p.addr, p.window.code);
    st.reasons.insert(p.addr, why);
}

/// See [`settle`].
fn optimize(st: &mut State, addrs: &[usize]) {
    let mut ready = Vec::new();
    for &a in addrs {
        match prepare(st, a) {
            Ok(p) => ready.push(p),
            Err(why) => {
                st.reasons.insert(a, why);
            }
        }
    }
    if ready.is_empty() {
        return;
    }
    // Threads that trap from now on are sent on to the detour's copy, past the range.
    for p in &ready {
        publish(p.addr, p.window.block + detour::COPY);
    }
    code::sync_cores();
    #[cfg(target_arch = "x86_64")]
    {
        // No thread may be inside a range of more than one instruction (or in a slot of
        // the address, which returns inside it): a grace period over every thread.
        let (mut ready, wait): (Vec<Prepared>, Vec<Prepared>) = ready.into_iter().partition(|p| first_len(p) == p.window.len);
        if !wait.is_empty() {
            // Busy: the range past its first byte; the slot of every record whose
            // probe is in the range (at the address, or inside it, as linked or as
            // retired and maybe still run: a slot returns into the range); a thread
            // resolving a breakpoint anywhere in the range (its handler goes on to such a
            // slot). Free records are counted too: a superset is sound, and cheaper to
            // find than each record's state.
            let ranges: BTreeMap<usize, usize> = wait.iter().map(|p| (p.addr, p.addr + p.window.len)).collect();
            let within = |t: usize| ranges.range(..=t).next_back().is_some_and(|(_, end)| t < *end);
            let mut busy: Vec<(usize, usize)> = wait.iter().map(|p| (p.addr + 1, p.addr + p.window.len)).collect();
            for (_, e) in registry::records() {
                let slot = e.slot.load(Ordering::Relaxed);
                if slot != 0 && within(e.target.load(Ordering::Relaxed)) {
                    busy.push((slot, slot + registry::SLOT));
                }
            }
            let traps: Vec<(usize, usize)> = ranges.into_iter().collect();
            let due = st.retry.is_none_or(|at| Instant::now() >= at);
            // A few tries: one fails when no thread answers for 100 ms, which a thread
            // that is not scheduled that long (a loaded machine) also does.
            if due && (0..TRIES).any(|_| crate::grace::window_clear(&busy, &traps)) {
                st.retry = None;
                st.backoff = FIRST_BACKOFF;
                ready.extend(wait);
            } else {
                if due {
                    st.retry = Some(Instant::now() + st.backoff);
                    st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
                }
                for p in wait {
                    abandon(st, p, NotOptimized::ThreadsInWindow);
                }
            }
        }
        // text_poke_bp: the int3 stays in front while the tail is written. The text is
        // checked first: the breakpoint, and the original tail.
        let mut ok = Vec::new();
        for p in ready {
            let mut expect = BREAKPOINT.to_vec();
            expect.extend_from_slice(&p.window.orig[1..JUMP]);
            if code::read(p.addr, JUMP).is_none_or(|t| t != expect) {
                abandon(st, p, NotOptimized::Write(Box::new(Error::CodeGone { addr: 0 })));
                continue;
            }
            match code::write_code(p.addr + 1, &p.jump[1..]) {
                Ok(()) => ok.push(p),
                Err(e) => back_out(st, p, e),
            }
        }
        code::sync_cores();
        let mut live = Vec::new();
        for p in ok {
            match code::write_code(p.addr, &p.jump[..1]) {
                Ok(()) => live.push(p),
                Err(e) => back_out(st, p, e),
            }
        }
        code::sync_cores();
        for p in live {
            st.reasons.remove(&p.addr);
            st.windows.insert(p.addr, p.window);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // brk -> b: one aligned word, each of them safe to run while it changes.
        let mut live = Vec::new();
        for p in ready {
            if code::read(p.addr, 4).is_none_or(|t| t != BREAKPOINT) {
                abandon(st, p, NotOptimized::Write(Box::new(Error::CodeGone { addr: 0 })));
                continue;
            }
            match code::write_code(p.addr, &p.jump) {
                Ok(()) => live.push(p),
                Err(e) => abandon(st, p, NotOptimized::Write(Box::new(e))),
            }
        }
        code::sync_cores();
        for p in live {
            st.reasons.remove(&p.addr);
            st.windows.insert(p.addr, p.window);
        }
    }
}

/// A jump that could not be written whole (x86_64, error `e`): the original tail back
/// behind the breakpoint, and the address given up. If even that write fails, the
/// breakpoint stays in front of a tail that is not the code's: the window is kept, so
/// that trapping threads still go on to the detour's copy (never into the tail), its
/// block is not parked, and the error is recorded; `unoptimize` writes the tail later.
#[cfg(target_arch = "x86_64")]
fn back_out(st: &mut State, p: Prepared, e: Error) {
    match code::write_code(p.addr + 1, &p.window.orig[1..JUMP]) {
        Ok(()) => abandon(st, p, NotOptimized::Write(Box::new(e))),
        Err(e) => {
            st.reasons.insert(p.addr, NotOptimized::Write(Box::new(e)));
            st.windows.insert(p.addr, p.window);
        }
    }
}

/// Bytes of the first instruction of a prepared window (a range of one instruction
/// has no inside).
#[cfg(target_arch = "x86_64")]
fn first_len(p: &Prepared) -> usize {
    let mut d = iced_x86::Decoder::with_ip(64, p.window.orig(), p.addr as u64, iced_x86::DecoderOptions::NONE);
    d.decode().len()
}

/// Takes the jumps at `addrs` out (those that are optimized), back to their
/// breakpoints (batched: x86_64 every first byte, a sync, every tail, a sync). The
/// first error, if a write failed: those addresses keep their window (an address whose
/// tail could not be written back has the breakpoint in front, and sends trapping
/// threads on to the detour's copy as while it is optimized). Under the registry lock.
pub(crate) fn unoptimize(addrs: &[usize]) -> Result<(), Error> {
    let mut st = state();
    let mut live: Vec<usize> = addrs.iter().copied().filter(|a| st.windows.contains_key(a)).collect();
    live.sort_unstable();
    live.dedup();
    if live.is_empty() {
        return Ok(());
    }
    let mut result = Ok(());
    // Addresses whose code is gone (or was changed behind probekit's back): forgotten,
    // nothing written. Those with probekit's breakpoint in front now: their tail next.
    let mut gone = Vec::new();
    let mut ours = Vec::new();
    for a in live {
        let w = &st.windows[&a];
        let text = code::read(a, JUMP);
        let Some(jump) = jump_bytes(a, w.block).filter(|_| text.is_some()) else {
            gone.push(a);
            continue;
        };
        let text = text.unwrap_or_default();
        if text == jump {
            match code::write_code(a, BREAKPOINT) {
                Ok(()) => ours.push(a),
                Err(e) => result = result.and(Err(e)),
            }
            continue;
        }
        // x86_64: an earlier try (or a failed optimization) left the breakpoint in
        // front of the jump's tail, which could not be written back.
        let stuck = matches!(st.reasons.get(&a), Some(NotOptimized::Write(_)));
        if cfg!(target_arch = "x86_64") && text[..BREAKPOINT.len()] == *BREAKPOINT && (text[1..] == jump[1..] || stuck) {
            ours.push(a);
        } else {
            gone.push(a);
        }
    }
    code::sync_cores();
    #[cfg(target_arch = "x86_64")]
    {
        // Only where the breakpoint is ours: a tail that cannot be written back keeps
        // its window (trapping threads still go on to the detour's copy, past the
        // range) and block, and its error, for a later try.
        let mut restored = Vec::new();
        for a in std::mem::take(&mut ours) {
            match code::write_code(a + 1, &st.windows[&a].orig[1..JUMP]) {
                Ok(()) => restored.push(a),
                Err(e) => {
                    st.reasons.insert(a, NotOptimized::Write(Box::new(e.clone())));
                    result = result.and(Err(e));
                }
            }
        }
        ours = restored;
        code::sync_cores();
    }
    for a in gone.into_iter().chain(ours) {
        if let Some(w) = st.windows.remove(&a) {
            publish(a, 0);
            st.blocks.park(w.block, a, w.code);
        }
    }
    result
}

/// Records why `addr` is not optimized (a probe was registered inside its range).
pub(crate) fn refuse(addr: usize, why: NotOptimized) {
    state().reasons.insert(addr, why);
}

// ---- the hit path ----
