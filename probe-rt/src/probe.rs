//! Breakpoint probes: the kprobe of a process.
//!
//! Registering writes a breakpoint (`int3`; aarch64 `brk #0x4b50`) over the target
//! instruction and copies that instruction, relocated, into an out-of-line slot. A hit
//! raises SIGTRAP; the handler builds a [`PtRegs`] from the signal context, runs the
//! pre handler, writes the registers back and sends the thread to the slot. Without a
//! post handler the slot jumps straight back to the next instruction (boosted: x86_64
//! an absolute `jmp [rip]`, aarch64 a `b` from a slot page within ±128 MiB); with one,
//! the slot ends in a second breakpoint that runs the post handler and resumes at the
//! next instruction. The trap flag is never used (single-stepping costs ~15 µs on
//! virtual machines).
//!
//! # What a handler may do
//! Handlers run in a signal handler on the thread that hit the probe: they may read and
//! change the registers, and do what is async-signal-safe. They must not allocate, take
//! locks the interrupted code may hold, or print (`println!` locks stdout); push to a
//! lock-free buffer instead. A panic in a handler aborts the process (it cannot unwind
//! out of a signal handler). A probe hit inside a handler on the same thread is not run
//! again: it counts in [`ProbeHandle::nmissed`] and its instruction still executes.
//!
//! # Stack
//! A breakpoint hit runs on the thread's own stack, below the probed stack pointer
//! (and the x86_64 red zone): the kernel's signal frame (up to ~3.5 KiB with AVX-512
//! state) and the handler. Measured on x86_64: about 3.4 KiB for a hit with a pre
//! handler, 4.2 KiB with a post handler; a site hit about 1 KiB, a return about
//! 0.6 KiB, plus what the handlers use. A thread with less left is killed by SIGSEGV
//! (with a message on stderr), as a stack overflow is: never a wrong result.
//!
//! # Signals that are not probekit's
//! Only traps from breakpoint instructions are looked at (`si_code`); a SIGTRAP sent
//! with `kill`, `raise` or `sigqueue`, an `icebp`, or a breakpoint probekit never placed
//! goes to the disposition the program had before the first registration: its
//! handler, or the default action (the process is terminated, as without probekit).
//! Install your own SIGTRAP handler before registering the first probe: one installed
//! after would receive probekit's breakpoints, and the next registration fails with
//! [`Error::SigtrapHandlerReplaced`].
//!
//! # Lifetime
//! A probe's record and slot outlive its unregistration, because a thread may still be
//! in its handler, on its way to the slot or in it when the probe goes: they are
//! retired. Registration reuses retired records (and their slots, when near enough)
//! only after a grace period has shown that no thread can be using them: every other
//! thread is signalled and its interrupted pc read (see `grace`, the process analog of
//! `synchronize_rcu_tasks`). It runs when [`RECLAIM_BATCH`] records are retired or all
//! [`MAX_PROBES`] are taken; if it cannot complete (the program handles `SIGURG`, or a
//! thread blocks it), retired records stay retired until a later try completes (tried
//! at most every 100 ms).

use crate::insn::{self, Exec, Sim, BREAKPOINT, TRAP_PC_ADVANCE};
use crate::{grace, regs, text, Error, PtRegs};
use std::cell::Cell;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};

/// A pre or post handler.
pub type Handler = fn(&mut PtRegs);

/// A pre handler of probekit's own (a return probe's entry), with its context.
pub(crate) type InternalHandler = fn(&mut PtRegs, usize);

/// How many probe records a process has: registered probes plus retired ones a grace
/// period has not yet freed (see the module docs).
pub const MAX_PROBES: usize = 1024;

/// Bytes of one out-of-line slot.
const SLOT: usize = 32;

/// The lock-free record of one probe, read by the signal handler.
struct Record {
    /// The probed address while armed, else 0.
    addr: AtomicUsize,
    /// The address the slot's breakpoint reports (kept after retirement).
    resume_trap: AtomicUsize,
    /// Where execution continues after the slot: the probed address + its length.
    next: AtomicUsize,
    slot: AtomicUsize,
    pre: AtomicUsize,
    post: AtomicUsize,
    /// Non-zero: `pre` is an [`InternalHandler`] called with this context.
    ctx: AtomicUsize,
    nhit: AtomicU64,
    nmissed: AtomicU64,
    /// The probed address, for the handle, whether armed or not.
    target: AtomicUsize,
    /// The original bytes under the breakpoint.
    orig: AtomicU64,
    /// The identity of the probed code: its file and offset (`text::Mapping::code_id`;
    /// 0 for anonymous memory), checked before every write.
    code_id: AtomicU64,
    /// The probed code went away: nothing is ever written for this record again.
    gone: AtomicBool,
    /// A simulated instruction (`kind` 0: it runs out of line in `slot`).
    sim_kind: AtomicU64,
    sim_a: AtomicU64,
    sim_b: AtomicU64,
    /// Registered and not yet unregistered.
    live: AtomicBool,
    /// Rides a `#[traceable]` function's site instead of a breakpoint.
    site: AtomicBool,
    /// On a site, from registration to unregistration: the index + 1 of the next
    /// record on the same site, 0 for none (see `sitemap`). A retired record keeps its
    /// link until it is reused, so a hit walking the chain through it goes on.
    chain: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)] // array initialiser only
const EMPTY: Record = Record {
    addr: AtomicUsize::new(0),
    resume_trap: AtomicUsize::new(0),
    next: AtomicUsize::new(0),
    slot: AtomicUsize::new(0),
    pre: AtomicUsize::new(0),
    post: AtomicUsize::new(0),
    ctx: AtomicUsize::new(0),
    nhit: AtomicU64::new(0),
    nmissed: AtomicU64::new(0),
    target: AtomicUsize::new(0),
    orig: AtomicU64::new(0),
    code_id: AtomicU64::new(0),
    gone: AtomicBool::new(false),
    sim_kind: AtomicU64::new(0),
    sim_a: AtomicU64::new(0),
    sim_b: AtomicU64::new(0),
    live: AtomicBool::new(false),
    site: AtomicBool::new(false),
    chain: AtomicU32::new(0),
};

static RECORDS: [Record; MAX_PROBES] = [EMPTY; MAX_PROBES];

/// How many records registrations have taken so far: they are taken in order, and
/// reused once freed, so the hit path scans only `RECORDS[..USED]`.
static USED: AtomicUsize = AtomicUsize::new(0);

/// Site hits per thread (by its index among the threads that entered a hit path,
/// see `grace::Thread::index`) and record: each counter has one writer, so a hit costs a
/// plain load and store instead of a locked add (the kernel's per-CPU `nhit`); a
/// site probe's hit count is `nhit` plus its column here. Threads past the first
/// [`HIT_SHARDS`] count with the locked add. Zero pages until used.
const HIT_SHARDS: usize = 64;
#[allow(clippy::declare_interior_mutable_const)] // array initialiser only
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)] // array initialiser only
const ZEROS: [AtomicU64; MAX_PROBES] = [ZERO; MAX_PROBES];
static SITE_HITS: [[AtomicU64; MAX_PROBES]; HIT_SHARDS] = [ZEROS; HIT_SHARDS];

/// Record `index`'s hits counted in [`SITE_HITS`].
fn site_hits(index: usize) -> u64 {
    SITE_HITS.iter().map(|s| s[index].load(Ordering::Relaxed)).sum()
}

/// The records taken so far, in registration order.
fn records() -> &'static [Record] {
    &RECORDS[..USED.load(Ordering::Acquire)]
}

/// Registration, arming and disarming take this lock; the hit path never does.
static REGISTRY: Mutex<Slots> = Mutex::new(Slots { pages: Vec::new(), retired: Vec::new(), free: Vec::new(), retry: grace::Retry::new() });

/// The out-of-line slot pages, and the records of unregistered probes.
struct Slots {
    /// `(page, bytes used)`.
    pages: Vec<(usize, usize)>,
    /// Unregistered probes' records, which a thread may still be using.
    retired: Vec<usize>,
    /// Records a grace period showed nobody uses: reusable, with their slots.
    free: Vec<usize>,
    /// When a grace period is worth trying again after one could not complete (which
    /// costs up to 100 ms): by time, so that it is tried again even when nothing more
    /// is retired (every record taken), and succeeds once the blocking thread is gone.
    retry: grace::Retry,
}

/// How many retired records make registration run a grace period to reuse them (it
/// also runs when every record is taken).
pub const RECLAIM_BATCH: usize = 64;

/// How near its probe a slot is placed: x86_64 within rel32 (±2 GiB) so RIP-relative
/// operands can be relocated; aarch64 within `b` range (±128 MiB) so it can jump back.
#[cfg(target_arch = "aarch64")]
const NEAR: usize = 128 << 20;
#[cfg(target_arch = "x86_64")]
const NEAR: usize = 1 << 31;

impl Slots {
    /// A free slot for a probe at `addr`, near it if possible (see [`NEAR`]):
    /// `(page index, slot address)`. Taken only by [`Slots::commit`].
    fn find(&mut self, addr: usize) -> Result<(usize, usize), Error> {
        let ok = |p: usize| p.abs_diff(addr) < NEAR - text::page_size();
        if let Some(i) = self.pages.iter().position(|(p, used)| ok(*p) && *used + SLOT <= text::page_size()) {
            return Ok((i, self.pages[i].0 + self.pages[i].1));
        }
        // Far, if nothing near can be had: boosting and relocation then fall back or refuse.
        let p = text::alloc_exec_page_near(addr, NEAR - text::page_size()).map_or_else(text::alloc_exec_page, Ok)?;
        self.pages.push((p, 0));
        Ok((self.pages.len() - 1, p))
    }

    /// Marks the slot [`Slots::find`] gave as used.
    fn commit(&mut self, page: usize) {
        self.pages[page].1 += SLOT;
    }

    /// A record for a new probe at `addr`: a reused one if a grace period allows, else
    /// the next never used. Breakpoint probes at one address run in record order, so
    /// a reused record must come after every live one there (registration order);
    /// probes on a site run in the order of its chain, so any record will do (`site`).
    fn take_record(&mut self, addr: usize, site: bool) -> Result<usize, Error> {
        let last_here = match site {
            true => None,
            false => records().iter().rposition(|e| e.live.load(Ordering::Relaxed) && e.target.load(Ordering::Relaxed) == addr),
        };
        let after = |i: &usize| last_here.is_none_or(|l| *i > l);
        let used = USED.load(Ordering::Relaxed);
        // Every record taken: a grace period is the only way to succeed, so it is tried
        // whatever the last one did (a thread that blocked SIGURG may have exited since).
        let worth = self.retired.len() >= RECLAIM_BATCH && self.retry.due() || used == MAX_PROBES;
        if !self.free.iter().any(after) && !self.retired.is_empty() && worth {
            let slots: Vec<(usize, usize)> =
                self.retired.iter().map(|i| RECORDS[*i].slot.load(Ordering::Relaxed)).filter(|s| *s != 0).map(|s| (s, s + SLOT)).collect();
            if self.retry.quiescent(&slots) {
                self.free.append(&mut self.retired);
            }
        }
        if let Some(k) = self.free.iter().position(after) {
            return Ok(self.free.swap_remove(k));
        }
        if used < MAX_PROBES {
            return Ok(used); // published by raising USED once it is filled in
        }
        Err(Error::TooManyProbes { max: MAX_PROBES })
    }

    /// Gives back a record `take_record` gave that was never armed.
    fn untake(&mut self, index: usize) {
        if index < USED.load(Ordering::Relaxed) {
            self.free.push(index);
        }
    }
}

/// The SIGTRAP disposition before probekit's, for traps that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// x86_64: the SIGSEGV disposition before probekit's (see `on_sigsegv`).
#[cfg(target_arch = "x86_64")]
static PREVIOUS_SEGV: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();

thread_local! {
    /// `(address, count)` of this thread's consecutive back-ups over a breakpoint that is
    /// a probe's but was not armed when the thread looked (see `on_sigtrap`).
    static BACKUPS: Cell<(usize, u32)> = const { Cell::new((0, 0)) };
}

/// How many times in a row a thread re-runs a probe address whose breakpoint it keeps
/// meeting disarmed before it treats the breakpoint as someone else's.
const MAX_BACKUPS: u32 = 1000;

/// Something whose address can be probed: a function pointer of up to six arguments.
///
/// A function taking a reference has a higher-ranked pointer type
/// (`fn(&[u8]) -> u64` is `for<'a> fn(&'a [u8]) -> u64`), which these impls cannot cover
/// without overlapping the plain ones (rustc's `coherence_leak_check`). Name a lifetime
/// in the cast, `parse as fn(&'static [u8]) -> u64` (any function coerces to it), or
/// give the address, `.address(parse as usize)`.
pub trait FnAddr: Copy {
    /// The address of its first instruction.
    fn addr(self) -> usize;
}

macro_rules! fn_addr {
    ($($a:ident),*) => {
        impl<R, $($a),*> FnAddr for fn($($a),*) -> R { fn addr(self) -> usize { self as usize } }
        impl<R, $($a),*> FnAddr for extern "C" fn($($a),*) -> R { fn addr(self) -> usize { self as usize } }
        impl<R, $($a),*> FnAddr for unsafe fn($($a),*) -> R { fn addr(self) -> usize { self as usize } }
        impl<R, $($a),*> FnAddr for unsafe extern "C" fn($($a),*) -> R { fn addr(self) -> usize { self as usize } }
    };
}
fn_addr!();
fn_addr!(A);
fn_addr!(A, B);
fn_addr!(A, B, C);
fn_addr!(A, B, C, D);
fn_addr!(A, B, C, D, E);
fn_addr!(A, B, C, D, E, F);

/// A breakpoint probe. See the [module docs](self).
pub struct Probe;

impl Probe {
    /// Starts describing a probe.
    pub fn builder() -> ProbeBuilder {
        ProbeBuilder { target: None, offset: 0, pre: None, post: None, internal: None }
    }
}

/// What a builder was told to probe.
#[derive(Clone, Debug)]
enum Target {
    /// A function's first instruction (a function pointer).
    Function(usize),
    /// A function by name.
    Symbol(String),
    /// A raw address, whose instruction boundary must be proven from the symbols.
    Address(usize),
}

/// Where a builder's target resolved to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolved {
    /// The probed address.
    pub(crate) addr: usize,
    /// The start of the function the caller named (`.function`, `.symbol`), from which
    /// the instruction boundary is decoded; None for a raw address.
    pub(crate) start: Option<usize>,
}

/// Describes a probe: a target and handlers.
#[derive(Clone, Debug)]
pub struct ProbeBuilder {
    target: Option<Target>,
    offset: usize,
    pre: Option<Handler>,
    post: Option<Handler>,
    internal: Option<(InternalHandler, usize)>,
}

impl ProbeBuilder {
    /// Probe a function (a function pointer: `my_fn as fn(u64) -> u64`; with reference
    /// arguments, name a lifetime: `parse as fn(&'static [u8]) -> u64`, see [`FnAddr`]).
    pub fn function(mut self, f: impl FnAddr) -> Self {
        self.target = Some(Target::Function(f.addr()));
        self
    }

    /// Probe a function of the process by name: of the executable or of a loaded shared
    /// library (`getpid`), exported or not (ELF symbol tables through `/proc/self/maps`).
    /// An IFUNC symbol (glibc's `memcpy`, `strlen`, …) names the implementation the
    /// process calls (what `dlsym` returns), not its resolver.
    pub fn symbol(mut self, name: &str) -> Self {
        self.target = Some(Target::Symbol(name.to_string()));
        self
    }

    /// Probe a raw address. It must be an instruction boundary provable from the
    /// symbol tables: inside a function whose symbol has a size, or after a sizeless
    /// symbol (hand-written asm) from which the code decodes to it; else registration
    /// fails with [`Error::NoKnownStart`].
    pub fn address(mut self, addr: usize) -> Self {
        self.target = Some(Target::Address(addr));
        self
    }

    /// Bytes past the target (an instruction boundary). With `.function` or `.symbol`
    /// it must lie inside that function when its symbol gives its size
    /// ([`Error::OutsideFunction`]).
    pub fn offset(mut self, offset: usize) -> Self {
        self.offset = offset;
        self
    }

    /// Runs before the probed instruction, with the registers as they are there.
    pub fn pre(mut self, h: Handler) -> Self {
        self.pre = Some(h);
        self
    }

    /// Runs after the probed instruction executed (out of line).
    pub fn post(mut self, h: Handler) -> Self {
        self.post = Some(h);
        self
    }

    /// Probe the function starting at `addr` (already checked to be a function start).
    pub(crate) fn function_start(mut self, addr: usize) -> Self {
        self.target = Some(Target::Function(addr));
        self
    }

    /// Runs probekit's own handler `h(regs, ctx)` instead of a pre handler.
    pub(crate) fn internal_pre(mut self, h: InternalHandler, ctx: usize) -> Self {
        self.internal = Some((h, ctx));
        self
    }

    /// The address the builder names, and where its function starts when the caller
    /// named one.
    pub(crate) fn resolve_target(&self) -> Result<Resolved, Error> {
        let (base, named) = match &self.target {
            Some(Target::Symbol(name)) => (resolve(name)?, true),
            Some(Target::Function(f)) => (*f, true),
            Some(Target::Address(a)) => (*a, false),
            None => return Err(Error::NoTarget),
        };
        // A traceable function is entered through its site: offsets count from there.
        let base = crate::sites::site_of(base).map_or(base, |s| s.site);
        let addr = base.checked_add(self.offset).ok_or(Error::AddressOverflow { base, offset: self.offset })?;
        if named && self.offset > 0 {
            // Only where the symbol says how long the function is (sizeless: decoded).
            if let Some(f) = crate::symbols::function_at(base).filter(|f| f.addr == base && f.size > 0 && self.offset >= f.size) {
                return Err(Error::OutsideFunction { addr, function: base, size: f.size });
            }
        }
        Ok(Resolved { addr, start: named.then_some(base) })
    }

    /// Checks the target, prepares the out-of-line slot and arms the breakpoint.
    /// On error nothing is left armed or writable.
    pub fn register(self) -> Result<ProbeHandle, Error> {
        let Resolved { addr, start } = self.resolve_target()?;
        install_handler()?;
        if let Some(s) = crate::sites::site_around(addr) {
            return Err(Error::InsideSite { addr, site: s.site, function: s.name });
        }
        if crate::sites::site_of(addr).is_some_and(|s| s.site == addr) {
            return self.register_site(addr);
        }
        let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let mapping = crate::maps::executable(addr)?;
        if let Some(b) = crate::blacklist::find_at(addr) {
            return Err(Error::Blacklisted { addr, what: b.name });
        }
        // An instruction boundary, decoding from the start of the function: the one the
        // caller named, or the one the symbol tables prove (see `known_start`).
        let start = match start {
            Some(start) => start,
            None => known_start(addr)?,
        };
        let end = addr.saturating_add(15).min(mapping.end);
        if start != addr {
            insn::check_boundary(start, addr, &original_code(start, end).ok_or(Error::NotExecutable { addr: start })?)?;
        }
        let code = original_code(addr, end).ok_or(Error::NotExecutable { addr })?;
        let index = reg.take_record(addr, false)?;
        let (len, slot, slot_bp, sim) = match self.prepare(&mut reg, index, addr, &code) {
            Ok(p) => p,
            Err(err) => {
                reg.untake(index);
                return Err(err);
            }
        };

        let e = &RECORDS[index];
        let mut orig = [0u8; 8];
        orig[..BREAKPOINT.len()].copy_from_slice(&code[..BREAKPOINT.len()]);
        e.target.store(addr, Ordering::Relaxed);
        e.code_id.store(mapping.code_id(addr), Ordering::Relaxed);
        e.orig.store(u64::from_ne_bytes(orig), Ordering::Relaxed);
        e.slot.store(slot, Ordering::Relaxed);
        e.next.store(addr + len, Ordering::Relaxed);
        e.resume_trap.store(slot_bp.map_or(0, |bp| slot + bp + TRAP_PC_ADVANCE as usize), Ordering::Relaxed);
        e.sim_kind.store(sim.kind, Ordering::Relaxed);
        e.sim_a.store(sim.a, Ordering::Relaxed);
        e.sim_b.store(sim.b, Ordering::Relaxed);
        e.site.store(false, Ordering::Relaxed);
        self.publish_and_arm(&mut reg, index)
    }

    /// Registers a probe on the site at `site`: no breakpoint, no slot; the first probe
    /// there enables the site.
    fn register_site(self, site: usize) -> Result<ProbeHandle, Error> {
        let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let code_id = crate::maps::executable(site)?.code_id(site);
        let index = reg.take_record(site, true)?;
        let e = &RECORDS[index];
        e.target.store(site, Ordering::Relaxed);
        e.code_id.store(code_id, Ordering::Relaxed);
        e.orig.store(0, Ordering::Relaxed);
        e.next.store(site + crate::sites::SITE_LEN, Ordering::Relaxed);
        e.resume_trap.store(0, Ordering::Relaxed);
        e.sim_kind.store(0, Ordering::Relaxed);
        e.site.store(true, Ordering::Relaxed);
        self.publish_and_arm(&mut reg, index)
    }

    /// Fills in record `index`'s handlers and counters, makes it visible to the hit
    /// paths, and arms it (on error it goes back, unarmed).
    fn publish_and_arm(&self, reg: &mut Slots, index: usize) -> Result<ProbeHandle, Error> {
        let e = &RECORDS[index];
        e.gone.store(false, Ordering::Relaxed);
        e.nhit.store(0, Ordering::Relaxed);
        for shard in &SITE_HITS {
            shard[index].store(0, Ordering::Relaxed);
        }
        e.nmissed.store(0, Ordering::Relaxed);
        let (pre, ctx) = match self.internal {
            Some((h, ctx)) => (h as usize, ctx),
            None => (self.pre.map_or(0, |h| h as usize), 0),
        };
        e.pre.store(pre, Ordering::Relaxed);
        e.ctx.store(ctx, Ordering::Relaxed);
        e.post.store(self.post.map_or(0, |h| h as usize), Ordering::Relaxed);
        // Visible to the hit path (Release: with the fields above) before it is armed.
        if index == USED.load(Ordering::Relaxed) {
            USED.store(index + 1, Ordering::Release);
        }
        let site = e.site.load(Ordering::Relaxed);
        if let Err(err) = if site { link(index) } else { Ok(()) } {
            reg.untake(index);
            return Err(err);
        }
        if let Err(err) = arm(e, true) {
            if site {
                // Linked, the record was reachable: a thread still in the site's
                // dispatcher from an earlier enabling may be reading it, so it is
                // retired (reused after a grace period), not given back.
                unlink(index);
                reg.retired.push(index);
            } else {
                reg.untake(index);
            }
            return Err(err);
        }
        e.live.store(true, Ordering::Relaxed);
        Ok(ProbeHandle { index })
    }

    /// Prepares how the instruction at `addr` (original bytes `code`) runs for record
    /// `index`: out of line in a slot (the record's old one if it is near enough), or
    /// simulated. `(length, slot, slot breakpoint offset, simulation)`.
    fn prepare(&self, reg: &mut Slots, index: usize, addr: usize, code: &[u8]) -> Result<(usize, usize, Option<usize>, Sim), Error> {
        // Without a post handler the slot jumps straight back (boosted): one trap per hit.
        let boost = self.post.is_none();
        let old = RECORDS[index].slot.load(Ordering::Relaxed);
        let (page, slot) = match old {
            s if s != 0 && s.abs_diff(addr) < NEAR - text::page_size() => (None, s),
            _ => reg.find(addr).map(|(p, s)| (Some(p), s))?,
        };
        Ok(match insn::prepare(addr, code, slot, boost)? {
            Exec::Slot(d) => {
                text::write_code(slot, &d.slot)?;
                if let Some(p) = page {
                    reg.commit(p);
                }
                (d.len, slot, d.slot_bp, Sim::default())
            }
            // The record's old slot, if any, stays with it for a later reuse.
            Exec::Simulate { len, sim } => (len, if page.is_none() { old } else { 0 }, None, sim),
        })
    }
}

/// The address of function `name`: from the ELF symbol tables of the executable and
/// its libraries, or else as the dynamic linker resolves it (`dlsym(RTLD_DEFAULT)`,
/// which also finds symbols of libraries opened later).
/// An IFUNC symbol resolves as `dlsym` resolves it: to the implementation the process
/// calls, not to the resolver the symbol table names.
fn resolve(name: &str) -> Result<usize, Error> {
    let not_found = || Error::SymbolNotFound { name: name.to_string() };
    let dlsym = || {
        let c = std::ffi::CString::new(name).ok()?;
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks up symbols
        // (an IFUNC's resolver already ran when the library was relocated).
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    };
    match crate::symbols::function_named(name) {
        Some(f) if !f.ifunc => Ok(f.addr),
        _ => dlsym().ok_or_else(not_found),
    }
}

/// The start of the function an instruction boundary at raw address `addr` is proven
/// from (see `symbols::known_start`).
pub(crate) fn known_start(addr: usize) -> Result<usize, Error> {
    crate::symbols::known_start(addr).map(|f| f.addr).ok_or(Error::NoKnownStart { addr })
}

/// Whether a probe other than `e` is armed at `target` (they share its breakpoint).
fn shared(e: &Record, target: usize) -> bool {
    records().iter().any(|o| !std::ptr::eq(o, e) && o.addr.load(Ordering::Relaxed) == target)
}

/// The original bytes of `from..to`: the text with every armed breakpoint taken out
/// (registration path, under the registry lock); None if it is not readable (any more).
fn original_code(from: usize, to: usize) -> Option<Vec<u8>> {
    let mut code = text::read(from, to.checked_sub(from)?)?;
    for e in records().iter().filter(|e| e.addr.load(Ordering::Relaxed) != 0 && our_breakpoint_at(e.target.load(Ordering::Relaxed))) {
        let (t, orig) = (e.target.load(Ordering::Relaxed), e.orig.load(Ordering::Relaxed).to_ne_bytes());
        for (i, b) in orig[..BREAKPOINT.len()].iter().enumerate() {
            if (from..to).contains(&(t + i)) {
                code[t + i - from] = *b;
            }
        }
    }
    Some(code)
}

/// Whether the code record `e` was registered on is still mapped at `target`: not
/// marked gone, and the mapping there is the same file at the same offset (anonymous
/// memory: the bytes are compared where they are written). Marks it gone if not.
fn still_there(e: &Record, target: usize) -> bool {
    if e.gone.load(Ordering::Relaxed) {
        return false;
    }
    let id = e.code_id.load(Ordering::Relaxed);
    let same = crate::maps::mapping_of(target).is_some_and(|m| m.prot & libc::PROT_EXEC != 0 && m.code_id(target) == id);
    if !same {
        e.gone.store(true, Ordering::Relaxed);
    }
    same
}

/// Whether probekit's breakpoint is in the text at `addr` (readable and mapped).
fn our_breakpoint_at(addr: usize) -> bool {
    text::read(addr, BREAKPOINT.len()).is_some_and(|b| b == BREAKPOINT)
}

/// Arms (writes the breakpoint) or disarms (restores the original bytes). The entry is
/// published before the breakpoint exists and unpublished after it is gone, so a
/// trap always finds it (or finds the text restored, seed 004). Probes at one address
/// share its breakpoint (aggregation): the first armed writes it, the last disarmed
/// removes it. Called under the registry lock.
fn arm(e: &Record, on: bool) -> Result<(), Error> {
    let target = e.target.load(Ordering::Relaxed);
    if !still_there(e, target) {
        // Whatever lives at the address now is not the code that was probed: disarmed
        // in place, for good, with nothing written (uprobes are tied to the file and
        // offset, not to the address).
        e.addr.store(0, Ordering::Release);
        return if on { Err(Error::CodeGone { addr: target }) } else { Ok(()) };
    }
    if e.site.load(Ordering::Relaxed) {
        return arm_site(e, target, on);
    }
    // Records armed here whose breakpoint is not in the text any more are stale: the
    // code is gone (its library unloaded, maybe something else mapped there since).
    // They are disarmed in place, with nothing to restore: writing their original
    // bytes would corrupt whatever is there now, and sharing their breakpoint would
    // share nothing.
    let present = our_breakpoint_at(target);
    if !present {
        for o in records().iter().filter(|o| o.addr.load(Ordering::Relaxed) == target) {
            o.addr.store(0, Ordering::Release);
        }
    }
    let shared = shared(e, target);
    let orig = e.orig.load(Ordering::Relaxed).to_ne_bytes();
    if on && !shared && text::read(target, BREAKPOINT.len()).is_none_or(|b| b != orig[..BREAKPOINT.len()]) {
        // Not the bytes the probe was prepared for (mapped again with other contents).
        e.gone.store(true, Ordering::Relaxed);
        return Err(Error::CodeGone { addr: target });
    }
    if on {
        e.addr.store(target, Ordering::Release);
        let r = if shared { Ok(()) } else { text::write_code(target, BREAKPOINT).map(|()| crate::site::sync_cores()) };
        if r.is_err() {
            e.addr.store(0, Ordering::Release);
        }
        r
    } else {
        let r = if shared || !present {
            Ok(())
        } else {
            text::write_code(target, &orig[..BREAKPOINT.len()]).map(|()| crate::site::sync_cores())
        };
        if r.is_ok() {
            e.addr.store(0, Ordering::Release);
        }
        r
    }
}

/// [`arm`] for a probe on a site: the first armed there enables it, the last disarmed
/// disables it.
fn arm_site(e: &Record, site: usize, on: bool) -> Result<(), Error> {
    let shared = shared(e, site);
    if on {
        e.addr.store(site, Ordering::Release);
        let r = match shared {
            true => Ok(()),
            false => crate::site::patch(site, true).and_then(|intact| if intact { Ok(()) } else { Err(Error::NotExecutable { addr: site }) }),
        };
        if r.is_err() {
            e.addr.store(0, Ordering::Release);
        }
        r
    } else {
        // A site whose code is gone is left alone (`patch` checks): disarmed in place.
        let r = if shared { Ok(()) } else { crate::site::patch(site, false).map(|_| ()) };
        if r.is_ok() {
            e.addr.store(0, Ordering::Release);
        }
        r
    }
}

/// The records linked from `first` (an index + 1) on: `(index, record)`.
fn chain_from(first: u32) -> impl Iterator<Item = (usize, &'static Record)> {
    let mut next = first;
    std::iter::from_fn(move || {
        let index = (next as usize).checked_sub(1)?;
        let e = RECORDS.get(index)?;
        next = e.chain.load(Ordering::Acquire);
        Some((index, e))
    })
}

/// Appends site record `index` to its site's chain, which therefore runs in
/// registration order. Under the registry lock.
fn link(index: usize) -> Result<(), Error> {
    let site = RECORDS[index].target.load(Ordering::Relaxed);
    RECORDS[index].chain.store(0, Ordering::Relaxed);
    let me = index as u32 + 1;
    match chain_from(crate::sitemap::head(site)).last() {
        Some((_, tail)) => {
            tail.chain.store(me, Ordering::Release);
            Ok(())
        }
        None => crate::sitemap::set_head(site, me),
    }
}

/// Takes site record `index` out of its site's chain. Its own link stays, for a hit
/// walking through it (the record is reused only after a grace period). Under the
/// registry lock.
fn unlink(index: usize) {
    let site = RECORDS[index].target.load(Ordering::Relaxed);
    let (me, next) = (index as u32 + 1, RECORDS[index].chain.load(Ordering::Relaxed));
    let head = crate::sitemap::head(site);
    if head == me {
        // The site has an entry (its head is `me`): this cannot fail.
        let _ = crate::sitemap::set_head(site, next);
    } else if let Some((_, before)) = chain_from(head).find(|(_, e)| e.chain.load(Ordering::Relaxed) == me) {
        before.chain.store(next, Ordering::Release);
    }
}

/// Runs the probes armed on the site at `site`, in registration order, for the site
/// trampoline's dispatcher: pre handlers, then (unless one redirected execution) post
/// handlers, with `regs` as at the function's entry (pc = `site`). A site hit inside a
/// handler is counted as missed.
///
/// The hit path of every site call, inlined into the dispatcher: a table lookup, no
/// scan, and a short path for the common case. Every record is read while the
/// thread's `active` flag is set, which also tells a grace period that the thread is
/// inside the hit path.
#[inline(always)]
pub(crate) fn run_site(site: usize, regs: &mut PtRegs) {
    // The index first: its first-time path is a call, across which `active` would
    // otherwise be kept in a register this function saves.
    let (shard, active) = grace::with_thread(|t| (t.index(), t.active.replace(true)));
    // The sampling handler reads `active` on this thread: the store must not move past
    // the reads of the records.
    compiler_fence(Ordering::SeqCst);
    if active {
        return missed_site(site);
    }
    let first = crate::sitemap::head(site);
    match chain_from(first).next() {
        // The common case, kept short: one probe on the site, without a post handler.
        Some((index, e)) if e.chain.load(Ordering::Acquire) == 0 && e.addr.load(Ordering::Acquire) == site && e.post.load(Ordering::Relaxed) == 0 => {
            count_site_hit(shard, index, e);
            let pre = e.pre.load(Ordering::Relaxed);
            if pre != 0 {
                call_handler(pre, e.ctx.load(Ordering::Relaxed), regs);
            }
        }
        _ => run_site_chain(site, first, shard, regs),
    }
    compiler_fence(Ordering::SeqCst);
    grace::with_thread(|t| t.active.set(false));
}

/// Counts a hit of record `index` on a site, in this thread's counter (`shard`) if
/// it has one.
#[inline(always)]
fn count_site_hit(shard: Option<usize>, index: usize, e: &Record) {
    match shard.and_then(|s| SITE_HITS.get(s)).and_then(|h| h.get(index)) {
        Some(c) => c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed),
        None => {
            e.nhit.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// [`run_site`] for every record on the site's chain from `first` (an index + 1).
fn run_site_chain(site: usize, first: u32, shard: Option<usize>, regs: &mut PtRegs) {
    let mut posts = false;
    for (index, e) in on_site_from(first, site) {
        posts |= e.post.load(Ordering::Relaxed) != 0;
        count_site_hit(shard, index, e);
        let pre = e.pre.load(Ordering::Relaxed);
        if pre != 0 {
            call_handler(pre, e.ctx.load(Ordering::Relaxed), regs);
            if regs.instruction_pointer() != site as u64 {
                return; // redirected: the rest does not run, nor do post handlers
            }
        }
    }
    // A second pass only if a post handler is there (most sites have none).
    if posts {
        for (_, e) in on_site(site) {
            let post = e.post.load(Ordering::Relaxed);
            if post != 0 {
                call_handler(post, 0, regs);
            }
        }
    }
}

/// The records armed on `site`, in registration order.
fn on_site(site: usize) -> impl Iterator<Item = (usize, &'static Record)> {
    on_site_from(crate::sitemap::head(site), site)
}

/// The records armed on `site` on its chain from `first` (an index + 1).
fn on_site_from(first: u32, site: usize) -> impl Iterator<Item = (usize, &'static Record)> {
    chain_from(first).filter(move |(_, e)| e.addr.load(Ordering::Acquire) == site)
}

/// A site hit inside a handler: counted as missed, runs nothing.
#[cold]
fn missed_site(site: usize) {
    for (_, e) in on_site(site) {
        e.nmissed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A registered probe; unregistered when dropped.
#[derive(Debug)]
pub struct ProbeHandle {
    index: usize,
}

impl ProbeHandle {
    fn entry(&self) -> &'static Record {
        &RECORDS[self.index]
    }

    /// The probed address.
    pub fn address(&self) -> usize {
        self.entry().target.load(Ordering::Relaxed)
    }

    /// Re-arms a disabled probe.
    pub fn enable(&self) -> Result<(), Error> {
        let _reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        if self.entry().addr.load(Ordering::Relaxed) != 0 {
            return Ok(());
        }
        arm(self.entry(), true)
    }

    /// Disarms the probe: the original instruction is back, handlers stop running.
    pub fn disable(&self) -> Result<(), Error> {
        let _reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        if self.entry().addr.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        arm(self.entry(), false)
    }

    /// Whether the breakpoint is in place.
    pub fn is_enabled(&self) -> bool {
        self.entry().addr.load(Ordering::Relaxed) != 0
    }

    /// Hits whose handlers ran.
    pub fn nhit(&self) -> u64 {
        self.entry().nhit.load(Ordering::Relaxed) + site_hits(self.index)
    }

    /// Hits whose handlers did not run (the probe was hit inside a handler).
    pub fn nmissed(&self) -> u64 {
        self.entry().nmissed.load(Ordering::Relaxed)
    }

    /// Disarms and retires the probe (what dropping the handle does, with the error).
    pub fn unregister(self) -> Result<(), Error> {
        let r = self.retire();
        std::mem::forget(self);
        r
    }

    fn retire(&self) -> Result<(), Error> {
        let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let e = self.entry();
        if e.addr.load(Ordering::Relaxed) != 0 {
            arm(e, false)?;
        }
        if e.site.load(Ordering::Relaxed) {
            unlink(self.index);
        }
        e.live.store(false, Ordering::Relaxed);
        reg.retired.push(self.index);
        Ok(())
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        // The error cannot be returned from drop; `unregister` reports it.
        let _ = self.retire();
    }
}

/// The entry points of probekit's hit paths, named: the roots of the blacklist's
/// closure (see `blacklist`).
pub(crate) fn hit_path_roots() -> Vec<(&'static str, usize)> {
    let mut roots = vec![
        ("probekit's hit-path bookkeeping", grace::enter as *const () as usize),
        ("probekit's hit-path bookkeeping", grace::leave as *const () as usize),
        ("probekit's hit-path bookkeeping", grace::Thread::enter as *const () as usize),
        ("probekit's hit-path bookkeeping", grace::Thread::index as *const () as usize),
        ("probekit's hit-path bookkeeping", grace::Thread::record as *const () as usize),
        ("probekit's site dispatcher", crate::site::dispatch as *const () as usize),
        ("probekit's site lookup", crate::sitemap::head as *const () as usize),
        ("probekit's site trampoline", crate::site::trampoline()),
        ("probekit's SIGTRAP handler", on_sigtrap as *const () as usize),
        ("probekit's hit path", hit as *const () as usize),
        ("probekit's return-probe entry", crate::retprobe::on_entry as *const () as usize),
        ("probekit's return dispatcher", crate::retprobe::dispatch as *const () as usize),
        ("probekit's return trampoline", crate::retprobe::trampoline()),
        ("probekit's handler call", call_handler as *const () as usize),
        ("probekit's site probes", missed_site as *const () as usize),
        ("probekit's site probes", run_site_chain as *const () as usize),
        ("probekit's trap chaining", chain as *const () as usize),
        ("probekit's register reading", regs::read as *const () as usize),
        ("probekit's register writing", regs::write as *const () as usize),
        ("probekit's reentrancy guard", set_active as *const () as usize),
        ("libc sigaction (trap chaining)", libc::sigaction as *const () as usize),
        ("libc raise (trap chaining)", libc::raise as *const () as usize),
    ];
    #[cfg(target_arch = "x86_64")]
    roots.extend([
        ("probekit's site dispatcher", crate::site::redirected as *const () as usize),
        ("probekit's stack-exhaustion handler", on_sigsegv as *const () as usize),
    ]);
    roots
}

/// One registered probe, as [`list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeInfo {
    /// The probed address.
    pub addr: usize,
    /// A return probe's entry (`r` in the listing) rather than a breakpoint probe (`k`).
    pub is_return: bool,
    /// The function holding it (ELF symbol tables), and the offset into it.
    pub symbol: Option<(String, usize)>,
    /// Whether the breakpoint is in place.
    pub enabled: bool,
    /// Whether the code is gone (its library was unloaded).
    pub gone: bool,
    /// Rides a `#[traceable]` function's site (the kernel's `[FTRACE]`).
    pub site: bool,
    /// Hits whose handlers ran.
    pub nhit: u64,
    /// Hits whose handlers did not run.
    pub nmissed: u64,
}

/// Every registered probe; `Display` prints them as the kernel's `kprobes/list`:
/// `address  k  symbol+0xoff  [DISABLED][GONE][SITE]` (`r` for a return probe).
#[derive(Clone, Debug, Default)]
pub struct ProbeList(pub Vec<ProbeInfo>);

impl std::fmt::Display for ProbeList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.0 {
            let place = match &p.symbol {
                Some((name, off)) => format!("{name}+{off:#x}"),
                None => format!("{:#x}", p.addr),
            };
            let flags = format!(
                "{}{}{}",
                if p.enabled { "" } else { "[DISABLED]" },
                if p.gone { "[GONE]" } else { "" },
                if p.site { "[SITE]" } else { "" }
            );
            writeln!(f, "{:016x}  {}  {place}  {flags}", p.addr, if p.is_return { 'r' } else { 'k' })?;
        }
        Ok(())
    }
}

/// The registered probes (not for signal context: it allocates and reads `/proc`).
pub fn list() -> ProbeList {
    ProbeList(
        records()
            .iter()
            .enumerate()
            .filter(|(_, e)| e.live.load(Ordering::Relaxed))
            .map(|(index, e)| {
                let addr = e.target.load(Ordering::Relaxed);
                let id = e.code_id.load(Ordering::Relaxed);
                let gone = e.gone.load(Ordering::Relaxed) || crate::maps::mapping_of(addr).is_none_or(|m| m.code_id(addr) != id);
                ProbeInfo {
                    addr,
                    // Only return probes register a hook with a context.
                    is_return: e.ctx.load(Ordering::Relaxed) != 0,
                    // A site is named after its function, not the naked stub it is in;
                    // gone code by its address only (something else may be there now).
                    symbol: match (gone, e.site.load(Ordering::Relaxed)) {
                        (true, _) => None,
                        (false, true) => crate::sites::site_of(addr).map(|s| (s.name, 0)),
                        (false, false) => crate::symbols::symbol_of(addr),
                    },
                    site: e.site.load(Ordering::Relaxed),
                    enabled: e.addr.load(Ordering::Relaxed) != 0,
                    gone,
                    nhit: e.nhit.load(Ordering::Relaxed) + site_hits(index),
                    nmissed: e.nmissed.load(Ordering::Relaxed),
                }
            })
            .collect(),
    )
}

/// The errno of the last failed call, as an [`Error::Os`].
fn os_error(addr: usize, call: &'static str) -> Error {
    Error::Os { addr, call, errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0) }
}

/// Installs `handler` for `sig` (SA_SIGINFO, with `flags`), after keeping the previous
/// disposition in `previous` (so that it is in place before the handler can run).
fn take_signal(sig: libc::c_int, handler: usize, flags: libc::c_int, previous: &OnceLock<libc::sigaction>) -> Result<(), Error> {
    // SAFETY: sigaction with zeroed structs filled field by field; `handler` is an
    // extern "C" fn of the SA_SIGINFO signature (the callers pass one).
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
            return Err(os_error(0, "sigaction"));
        }
        let _ = previous.set(old);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_SIGINFO | flags;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(os_error(0, "sigaction"));
        }
    }
    Ok(())
}

/// Installs the SIGTRAP handler on the first registration; on later ones, checks that
/// it is still installed: a handler the program installed over it would receive
/// probekit's breakpoints ([`Error::SigtrapHandlerReplaced`]).
fn install_handler() -> Result<(), Error> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SA_NODEFER: a probe hit inside a handler traps inside this signal handler;
        // a blocked synchronous SIGTRAP would kill the process instead.
        // No SA_ONSTACK: the handler runs on the thread's own stack (below the
        // x86_64 red zone, which the kernel skips). The alternate stack Rust gives
        // each thread is 8 KiB, for its stack-overflow message; a signal frame is
        // ~3.5 KiB on an AVX-512 machine, so a handler there, or a probe hit inside
        // a handler (two frames), overflowed it: measured, SIGSEGV.
        result = take_signal(libc::SIGTRAP, on_sigtrap as *const () as usize, libc::SA_RESTART | libc::SA_NODEFER, &PREVIOUS);
        // On the alternate stack, as the handler it chains to (Rust's stack-overflow
        // handler) runs: it is called when the thread's stack is exhausted.
        #[cfg(target_arch = "x86_64")]
        if result.is_ok() {
            result = take_signal(libc::SIGSEGV, on_sigsegv as *const () as usize, libc::SA_ONSTACK | libc::SA_NODEFER, &PREVIOUS_SEGV);
        }
    });
    result?;
    // SAFETY: reading a disposition only.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur) } != 0 {
        return Err(os_error(0, "sigaction"));
    }
    match cur.sa_sigaction == on_sigtrap as *const () as usize {
        true => Ok(()),
        false => Err(Error::SigtrapHandlerReplaced { handler: cur.sa_sigaction }),
    }
}

/// Calls a handler; `extern "C"` so that a panic aborts instead of unwinding out of
/// the signal handler.
extern "C" fn call_handler(h: usize, ctx: usize, regs: &mut PtRegs) {
    if ctx != 0 {
        // SAFETY: with a context, `h` was stored from an `InternalHandler` at registration.
        let h = unsafe { std::mem::transmute::<usize, InternalHandler>(h) };
        return h(regs, ctx);
    }
    // SAFETY: `h` was stored from a `Handler` (a fn pointer) at registration.
    let h: Handler = unsafe { std::mem::transmute::<usize, Handler>(h) };
    h(regs);
}

/// Marks this thread as running a handler (or not); returns what it was. Probes hit
/// while it is set count as missed and run no handler.
pub(crate) fn set_active(on: bool) -> bool {
    grace::with_thread(|t| t.active.replace(on))
}

/// The SIGTRAP handler. Async-signal-safe: atomics, a const thread-local, no locks,
/// no allocation.
extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t and ucontext_t for SA_SIGINFO handlers.
    let (code, uc) = unsafe { ((*info).si_code, &mut *(ctx as *mut libc::ucontext_t)) };
    // Grace periods see this thread as inside the hit path until `hit` is done.
    let ours = from_breakpoint(code) && {
        grace::enter();
        let ours = hit(uc);
        grace::leave();
        ours
    };
    if !ours {
        chain(PREVIOUS.get(), sig, info, ctx);
    }
}

/// `si_code` values (asm-generic/siginfo.h): a signal the kernel raised for an
/// exception with no siginfo of its own, and a breakpoint instruction's.
const SI_KERNEL: libc::c_int = 0x80;
#[cfg(target_arch = "aarch64")]
const TRAP_BRKPT: libc::c_int = 1;

/// Whether a SIGTRAP with this `si_code` came from a breakpoint instruction that can be
/// probekit's: x86_64 `int3` raises SIGTRAP with `SI_KERNEL` (do_int3_user passes no
/// siginfo), aarch64 `brk` with `TRAP_BRKPT`. A signal sent with `kill`, `raise`,
/// `tgkill` or `sigqueue` (`si_code` <= 0: SI_USER, SI_TKILL, SI_QUEUE), an x86_64
/// `icebp`, a single step or a hardware breakpoint (TRAP_BRKPT, TRAP_TRACE,
/// TRAP_HWBKPT) never is: those go to the program's handler untouched.
fn from_breakpoint(code: libc::c_int) -> bool {
    #[cfg(target_arch = "x86_64")]
    return code == SI_KERNEL;
    #[cfg(target_arch = "aarch64")]
    return code == TRAP_BRKPT;
}

/// x86_64: a probe hit on a thread with too little stack left for the SIGTRAP frame.
/// The kernel cannot deliver SIGTRAP and raises SIGSEGV instead, with the pc already
/// past the `int3`: a handler that returns (Rust's stack-overflow handler does, when
/// the fault is not in its guard page) would resume inside the displaced instruction
/// and compute a wrong result. So the pc is put back on the breakpoint and the process
/// is told why it dies: the breakpoint traps again, the frame fails again, and the
/// kernel kills the process with SIGSEGV, a crash anyone can see. (aarch64 `brk`
/// leaves the pc on itself, so there the second attempt happens by itself.)
#[cfg(target_arch = "x86_64")]
extern "C" fn on_sigsegv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t and ucontext_t for SA_SIGINFO handlers.
    let (code, uc) = unsafe { ((*info).si_code, &mut *(ctx as *mut libc::ucontext_t)) };
    let pc = regs::pc(uc) as usize;
    let bp = pc.wrapping_sub(TRAP_PC_ADVANCE as usize);
    // Only records are read (no text, which may be what faulted).
    let at_ours = || crate::site::poking(bp) || records().iter().any(|e| e.addr.load(Ordering::Acquire) == bp || e.resume_trap.load(Ordering::Acquire) == pc);
    if code == SI_KERNEL && at_ours() {
        let msg = b"probekit: a thread hit a probe with too little stack left for the signal frame (a breakpoint hit needs about 4 KiB below the stack pointer): killed by SIGSEGV\n";
        // SAFETY: write(2) of a static buffer.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        regs::set_pc(uc, bp as u64);
        // Default action from now on: the next attempt kills the process.
        if let Some(prev) = PREVIOUS_SEGV.get() {
            let mut dfl = *prev;
            dfl.sa_sigaction = libc::SIG_DFL;
            // SAFETY: sigaction is async-signal-safe; `dfl` is a valid disposition.
            unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
        }
        return;
    }
    chain(PREVIOUS_SEGV.get(), sig, info, ctx);
}



/// Handles a trap at `uc`'s pc if it is probekit's: false if it is not.
fn hit(uc: &mut libc::ucontext_t) -> bool {
    let bp = (regs::pc(uc) - TRAP_PC_ADVANCE) as usize;
    if crate::site::poking(bp) {
        // A site's temporary int3 while it is patched: on past the site, as if its nop ran.
        regs::set_pc(uc, (bp + crate::sites::SITE_LEN) as u64);
        return true;
    }

    // Every probe armed at this address, in registration order (aggregation).
    let all = records();
    let at_bp = || all.iter().filter(move |e| e.addr.load(Ordering::Acquire) == bp && !e.site.load(Ordering::Relaxed));
    if let Some(first) = at_bp().next() {
        BACKUPS.set((0, 0));
        let active = grace::with_thread(|t| t.active.get());
        for e in at_bp() {
            if active {
                // Hit inside a handler: count it, execute the instruction, no handlers.
                e.nmissed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            e.nhit.fetch_add(1, Ordering::Relaxed);
            let pre = e.pre.load(Ordering::Relaxed);
            if pre != 0 {
                let mut r = regs::read(uc, bp as u64);
                set_active(true);
                call_handler(pre, e.ctx.load(Ordering::Relaxed), &mut r);
                set_active(false);
                regs::write(uc, &r);
                if r.instruction_pointer() != bp as u64 {
                    return true; // the handler redirected execution: the instruction is skipped
                }
            }
        }
        let sim = Sim { kind: first.sim_kind.load(Ordering::Relaxed), a: first.sim_a.load(Ordering::Relaxed), b: first.sim_b.load(Ordering::Relaxed) };
        if sim.kind == 0 {
            // Out of line: through a slot that ends in a breakpoint if any probe here has
            // a post handler (its own slot does), else through any (boosted) slot.
            let e = at_bp().find(|e| e.post.load(Ordering::Relaxed) != 0 && e.resume_trap.load(Ordering::Relaxed) != 0).unwrap_or(first);
            regs::set_pc(uc, e.slot.load(Ordering::Relaxed) as u64);
            return true;
        }
        // Simulated: its effect is applied here, then the post handlers see the result.
        insn::simulate(sim, bp, first.next.load(Ordering::Relaxed) - bp, uc);
        if !active {
            run_posts(bp, uc);
        }
        return true;
    }
    let pc = regs::pc(uc) as usize;
    if let Some(e) = all.iter().find(|e| e.resume_trap.load(Ordering::Acquire) == pc) {
        let next = e.next.load(Ordering::Relaxed) as u64;
        regs::set_pc(uc, next);
        if !grace::with_thread(|t| t.active.get()) {
            run_posts(e.target.load(Ordering::Relaxed), uc);
        }
        return true;
    }
    // Not armed now, at an address that is or was probed. If the text is no breakpoint
    // any more, ours was removed after this thread hit it: back up and run the original
    // instruction (seed 004). If it is a breakpoint, a disarm and re-arm raced with this
    // lookup (the breakpoint is written after the record is armed, and removed before
    // it is disarmed, but the two reads here are not one): back up too, and the next
    // trap finds it armed, or the text restored. A trap at an address probekit never
    // probed (the program's own `int3`), or one that stays unarmed, is passed on: the
    // pc is never moved for a trap that is not probekit's.
    let ours_once = all.iter().any(|e| e.target.load(Ordering::Relaxed) == bp);
    if ours_once && (!insn::is_breakpoint_at(bp) || backup_again(bp)) {
        regs::set_pc(uc, bp as u64);
        return true;
    }
    false
}

/// Runs the post handlers of the probes armed at `target`, in registration order, on
/// the context after the instruction (its pc is where execution continues).
fn run_posts(target: usize, uc: &mut libc::ucontext_t) {
    for e in records().iter().filter(|e| e.addr.load(Ordering::Acquire) == target) {
        let post = e.post.load(Ordering::Relaxed);
        if post != 0 {
            let mut r = regs::read(uc, regs::pc(uc));
            set_active(true);
            call_handler(post, 0, &mut r);
            set_active(false);
            regs::write(uc, &r);
        }
    }
}

/// Counts a back-up over `bp` on this thread; false once there were too many in a row.
fn backup_again(bp: usize) -> bool {
    let (at, n) = BACKUPS.get();
    let n = if at == bp { n + 1 } else { 1 };
    BACKUPS.set((bp, n));
    n <= MAX_BACKUPS
}

/// Passes a signal that is not ours to the disposition before probekit's, unchanged.
fn chain(prev: Option<&libc::sigaction>, sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(prev) = prev else { return };
    match prev.sa_sigaction {
        libc::SIG_IGN => {}
        libc::SIG_DFL => {
            // The default action: restore it. A signal the kernel raised for the
            // instruction (a fault) is raised again when it re-executes; one that was
            // sent (si_code <= 0) is sent again, delivered as this handler returns.
            // SAFETY: sigaction/raise are async-signal-safe; `info` is the kernel's.
            unsafe {
                libc::sigaction(sig, prev, std::ptr::null_mut());
                if sig != libc::SIGSEGV || (*info).si_code <= 0 {
                    libc::raise(sig);
                }
            }
        }
        h if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous handler was installed with this signature (SA_SIGINFO).
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = unsafe { std::mem::transmute(h) };
            f(sig, info, ctx);
        }
        h => {
            // SAFETY: a plain handler takes the signal number only.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
            f(sig);
        }
    }
}
