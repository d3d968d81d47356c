//! The process's return-probe stub blocks, reused after a grace period.
//!
//! A *block* is what a return probe with `maxactive = n` needs that only code made at
//! run time can give: `n` stubs in executable pages of their own, an FDE per stub
//! registered with the unwinder (see `crate::unwind`), and the `n` instances the stubs and
//! FDEs point at. Making one costs a mapping and a `__register_frame` table, which
//! libgcc then searches on every unwind; neither can be given back while any thread
//! may return through a stub or unwind through it. So blocks are made once and never
//! freed: an unregistered probe's block is *retired*, and becomes free for the next
//! probe with the same `n` once
//!
//! 1. a grace period that began after the probe's entry was disarmed has completed
//!    (`grace::quiescent` with the block's stubs as busy ranges): no thread is still
//!    in the entry hook with the old probe (it could take an instance yet), in a stub,
//!    or in the return dispatcher, and none can enter the entry hook with it again;
//! 2. then no instance is busy: every call the probe watched has returned through its
//!    stub (the dispatcher releases the instance after its last read of it, of the
//!    probe and of the data), or its thread has exited (the kernel says its id names
//!    no thread). A live thread's instance abandoned by a `longjmp` or a caught panic
//!    stays busy until that thread next enters or returns from a return-probed
//!    function (which drops its stale instances); until then the block stays retired,
//!    and a new probe gets another block.
//!
//! A block's stubs and FDEs never change (every stub jumps to the one trampoline, each
//! FDE reads its own instance's return-address slot), so a reused block needs no code
//! write and no new unwind table: only its instances are pointed at the new probe.
//! Grace periods run for [`RECLAIM_BATCH`] retired blocks at once (as `probe` does
//! for records), and after one fails at most every 100 ms (`grace::Retry`).
//! When a block is freed, its old probe's `Core` and per-call data go with it (the `T`s
//! are dropped then, on the registering thread). The memory held is that of the most
//! blocks ever registered or retired at once, per `n`.

use super::{free_core, stub_code, trampoline, Core, Inst, STUB, STUB_ENTRY};
use crate::sys::code as text;
use crate::unwind::{Expr, Fde, Program, Table, RA, SP};
use crate::{grace, Error};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// One block: `insts[i]`'s stub is at `code + i * STUB + STUB_ENTRY`.
pub(crate) struct Block {
    pub(crate) insts: &'static [Inst],
    /// The stubs' bytes: `[code, code + insts.len() * STUB)`.
    code: usize,
}

impl Block {
    /// Makes the stubs, their instances and FDEs (registered with the unwinder once,
    /// for the life of the process).
    fn new(n: usize) -> Result<&'static Block, Error> {
        let stubs: Vec<u8> = (0..n).flat_map(|_| stub_code(trampoline())).collect();
        let code = text::alloc_code(&stubs)?;
        let insts: &'static [Inst] = Box::leak(
            (0..n)
                .map(|i| Inst {
                    ret: AtomicUsize::new(0),
                    unwind: AtomicUsize::new(0),
                    sp: AtomicUsize::new(0),
                    next: AtomicUsize::new(0),
                    busy: AtomicBool::new(false),
                    taken: AtomicU64::new(0),
                    owner: AtomicUsize::new(0),
                    exit: AtomicBool::new(false),
                    parked: AtomicBool::new(false),
                    claimed: AtomicBool::new(false),
                    generation: AtomicUsize::new(0),
                    stub: code + i * STUB + STUB_ENTRY,
                    data: AtomicUsize::new(0),
                    core: AtomicUsize::new(0),
                })
                .collect(),
        );
        // Each stub's FDE (see `retprobe`'s module docs, "Unwinding"): the stub has no
        // frame of its own, the stack pointer is already the real caller's (its sp
        // rule: the stub's), and the real return address is the word in its instance's
        // slot. Unwinders look up `return address - 1`: each FDE covers the pad before
        // its stub's entry. Registered once, for good: blocks are reused, never freed.
        //
        // The CFA is not that sp but `STUB_CFA` above it. libgcc tells frames apart by
        // their CFA: the frame a panic's search phase found the handler in is the one
        // whose context holds its CFA in the cleanup phase. With CFA = sp the stub would
        // share the probed function's CFA, and a `catch_unwind` right in the real caller
        // (what inlining makes of `catch_unwind(|| f())`) would be found at the stub in
        // the cleanup phase, which has no handler: libgcc aborts the process. Every CFA
        // of a frame that made a call is 16-aligned (the psABI's and AAPCS64's call
        // alignment), sp + 8 is not, so `STUB_CFA` names no other frame; and a stub
        // never stands on another stub in a walk (`Inst::unwind` skips a chained one),
        // which would share it.
        let fdes: Vec<Fde> = (0..n)
            .map(|i| {
                let mut program = Program::default();
                program.cfa(SP, STUB_CFA).val_expr(SP, Expr::breg(SP, 0)).val_expr(RA, Expr::addr(&insts[i].unwind as *const AtomicUsize as usize).deref());
                Fde { begin: code + i * STUB, end: code + (i + 1) * STUB, program }
            })
            .collect();
        // A panic unwinding a stub's frame ends the calls it shows gone there.
        Table::register(RA, Some(crate::unwind::stub_personality()), &fdes).leak();
        ALL.lock().unwrap_or_else(|p| p.into_inner()).push((code, n));
        crate::perfmap::stubs_made();
        Ok(Box::leak(Box::new(Block { insts, code })))
    }

    /// Points the instances at a new probe: its `Core`, and instance `i` at the `T`
    /// at `data + i * size`. Before the probe is armed.
    pub(crate) fn assign(&self, core: *const Core, data: usize, size: usize) {
        for (i, inst) in self.insts.iter().enumerate() {
            inst.data.store(data + i * size, Ordering::Relaxed);
            inst.core.store(core as usize, Ordering::Release);
        }
    }

    /// The stubs' code, for a grace period's busy ranges.
    /// Takes back the instances parked in the block (it is idle: none is claimed), so
    /// that no thread's parking slot names them any more, before their probe's `Core`
    /// is freed (a new `Core` may get its address, and the slot is keyed by it).
    fn unpark(&self) {
        for inst in self.insts {
            if inst.parked.load(Ordering::Relaxed) {
                inst.generation.store(inst.generation.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
                inst.parked.store(false, Ordering::Relaxed);
                inst.release();
            }
        }
    }

    fn range(&self) -> (usize, usize) {
        (self.code, self.code + self.insts.len() * STUB)
    }

    /// Whether no instance can be in use (see the module docs, 2): each is free, or
    /// held by a thread that has exited. Only after a grace period (1): then no
    /// instance can be taken any more, and a free one stays free.
    fn idle(&self) -> bool {
        self.insts.iter().all(|i| {
            let owner = i.owner.load(Ordering::Acquire);
            // A parked instance not claimed: its owner is not inside a call (the
            // claim is dropped after its last use), and cannot claim it again for this
            // probe, whose entry is disarmed and waited out.
            let parked = i.parked.load(Ordering::Acquire) && !i.claimed.load(Ordering::Acquire);
            !i.busy.load(Ordering::Acquire) || parked || owner != 0 && !grace::thread_alive(owner as i32)
        })
    }
}

/// An unregistered probe's block, and its probe.
struct Retired {
    block: &'static Block,
    /// The `Core` (from `Box::into_raw`), freed with the block.
    core: usize,
    /// A grace period completed since it was retired.
    graced: bool,
}

struct Pool {
    /// Blocks no probe uses; any `n`.
    free: Vec<&'static Block>,
    retired: Vec<Retired>,
    retry: grace::Retry,
}

/// How many retired blocks make registration run a grace period to reuse them (a new
/// block is made meanwhile): one grace period, which signals every thread that has
/// hit a probe, serves them all.
const RECLAIM_BATCH: usize = 8;

/// How far above the stack pointer at a stub its FDE puts the stub's CFA (see
/// `Block::new`): a value no real frame there has.
const STUB_CFA: u64 = 8;

/// Every block ever made, `(code, n)`: for the perf map. Registration takes it.
static ALL: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// Every block ever made: where its stubs start and how many there are.
pub(crate) fn blocks() -> Vec<(usize, usize)> {
    ALL.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Registration and unregistration take it; the hit paths never do.
static POOL: Mutex<Pool> = Mutex::new(Pool { free: Vec::new(), retired: Vec::new(), retry: grace::Retry::new() });

impl Pool {
    /// Frees the retired blocks that can be freed (see the module docs), running a
    /// grace period if [`RECLAIM_BATCH`] blocks wait for one and one of them has `n`
    /// instances. Returns their probes'
    /// cores, to be freed once the lock is let go (dropping a `T` may do anything).
    fn reclaim(&mut self, n: usize) -> Vec<usize> {
        let fits = |r: &Retired| r.block.insts.len() == n;
        let waiting = self.retired.iter().filter(|r| !r.graced).count();
        if waiting >= RECLAIM_BATCH && self.retired.iter().any(|r| fits(r) && !r.graced) && self.retry.due() {
            // Every block retired so far at once: one grace period serves them all.
            let busy: Vec<(usize, usize)> = self.retired.iter().filter(|r| !r.graced).map(|r| r.block.range()).collect();
            if self.retry.quiescent(&busy) {
                self.retired.iter_mut().for_each(|r| r.graced = true);
            }
        }
        let mut cores = Vec::new();
        let mut k = 0;
        while k < self.retired.len() {
            let r = &self.retired[k];
            if r.graced && r.block.idle() {
                let r = self.retired.swap_remove(k);
                r.block.unpark();
                self.free.push(r.block);
                cores.push(r.core);
            } else {
                k += 1;
            }
        }
        cores
    }
}

/// A block of `n` free instances for a new probe, reset: nothing of an earlier probe
/// remains reachable through it. The caller points them at its probe
/// ([`Block::assign`]) before arming it.
pub(crate) fn take(n: usize) -> Result<&'static Block, Error> {
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    let mut found = pool.free.iter().position(|b| b.insts.len() == n);
    let mut cores = Vec::new();
    if found.is_none() {
        cores = pool.reclaim(n);
        found = pool.free.iter().position(|b| b.insts.len() == n);
    }
    let block = match found {
        Some(k) => Ok(pool.free.swap_remove(k)),
        None => Block::new(n),
    };
    drop(pool);
    for c in cores {
        // SAFETY: retired with `retire`, which got it from `Box::into_raw`; reclaimed
        // once (taken out of the retired list under the lock) after a grace period
        // and with its block idle: no thread can reach it (module docs).
        unsafe { free_core(c) };
    }
    let block = block?;
    for inst in block.insts {
        inst.ret.store(0, Ordering::Relaxed);
        inst.unwind.store(0, Ordering::Relaxed);
        inst.sp.store(0, Ordering::Relaxed);
        inst.next.store(0, Ordering::Relaxed);
        inst.taken.store(0, Ordering::Relaxed);
        inst.data.store(0, Ordering::Relaxed);
        inst.core.store(0, Ordering::Relaxed);
        // Free or held by an exited thread (`Block::idle`): free from here on.
        inst.owner.store(0, Ordering::Relaxed);
        // A thread's cached parking names the old generation: no longer its own.
        inst.generation.store(inst.generation.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        inst.parked.store(false, Ordering::Relaxed);
        inst.claimed.store(false, Ordering::Relaxed);
        inst.busy.store(false, Ordering::Release);
    }
    Ok(block)
}

/// Runs a grace period for every retired block now, and frees the probes (their
/// `Core`, data and handlers) whose blocks are idle. Whether the grace period
/// completed (or none was needed).
pub(crate) fn synchronize() -> bool {
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    let busy: Vec<(usize, usize)> = pool.retired.iter().filter(|r| !r.graced).map(|r| r.block.range()).collect();
    let done = busy.is_empty() || pool.retry.quiescent(&busy);
    if done {
        pool.retired.iter_mut().for_each(|r| r.graced = true);
    }
    let mut cores = Vec::new();
    pool.retired.retain(|r| {
        let idle = r.graced && r.block.idle();
        if idle {
            r.block.unpark();
            cores.push((r.block, r.core));
        }
        !idle
    });
    pool.free.extend(cores.iter().map(|(b, _)| *b));
    drop(pool);
    for (_, c) in cores {
        // SAFETY: as in `take`: retired once, reclaimed once after a grace period with
        // its block idle.
        unsafe { free_core(c) };
    }
    done
}

/// Retires the block of an unregistered probe (entry disarmed, `live` cleared), with
/// its `Core` (from `Box::into_raw`), to be freed with it (see the module docs).
pub(crate) fn retire(block: &'static Block, core: usize) {
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    pool.retired.push(Retired { block, core, graced: false });
}
