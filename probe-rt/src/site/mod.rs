//! Site probes: the patchable entries of `#[traceable]` functions (the kernel's
//! KPROBES_ON_FTRACE, seed 003). [`table`] finds the sites, [`patch`] enables and
//! disables them and holds the trampoline's dispatcher; this module arms site probes
//! and runs their hit path.

pub(crate) mod fgraph;
pub(crate) mod patch;
pub(crate) use patch::dispatch;
pub mod table;

use crate::grace::Shard;
use crate::registry::{self, call_handler, count_site_hit, linked_at, Record};
use crate::{grace, Error, PtRegs};
use std::sync::atomic::{compiler_fence, Ordering};

/// Arms (`on`) or disarms a probe on the site at `site`: the first armed there enables
/// the site, the last disarmed disables it. Under the registry lock.
pub(crate) fn arm(e: &Record, site: usize, on: bool) -> Result<(), Error> {
    // Records armed here whose site is not enabled in the text are stale (the library
    // was unloaded and loaded again at the same address): disarmed in place.
    if !patch::enabled_in_text(site) {
        registry::disarm_in_place(site);
    }
    let shared = registry::others_armed(e, site);
    if on {
        e.addr.store(site, Ordering::Release);
        let r = match shared {
            // Already enabled: to its exit path if this is its first return probe.
            true => patch::retarget(site),
            false => patch::patch(site, true).and_then(|intact| if intact { Ok(()) } else { Err(Error::NotExecutable { addr: site }) }),
        };
        if r.is_err() {
            e.addr.store(0, Ordering::Release);
        }
        r
    } else {
        // A site whose code is gone is left alone (`patch` checks): disarmed in place.
        if shared {
            // Disarmed at once; the site stays enabled, back to the call if this was
            // its last return probe (best effort: the exit path is correct without
            // return probes too, only slower).
            e.addr.store(0, Ordering::Release);
            let _ = patch::retarget(site);
            return Ok(());
        }
        let r = patch::patch(site, false).map(|_| ());
        if r.is_ok() {
            e.addr.store(0, Ordering::Release);
        }
        r
    }
}

/// After site probes were unregistered at `sites` (their records unlinked): those that
/// stay enabled take the trampolines the probes left there want (a site takes the
/// light ones only once no return probe is registered on it; see [`fgraph`]). Best
/// effort, as [`patch::retarget`]: the full ones are correct too. Under the registry
/// lock.
pub(crate) fn settle(sites: impl IntoIterator<Item = usize>) {
    let mut sites: Vec<usize> = sites.into_iter().collect();
    sites.sort_unstable();
    sites.dedup();
    for site in sites {
        let _ = patch::retarget(site);
    }
}

/// Every trampoline of the sites' paths, in both copies (keeping the FP/SIMD argument
/// or return registers, and keeping none: `_no_fp`): `(symbol, what it is, address)`,
/// for the blacklist's roots and the perf map.
pub(crate) fn trampolines() -> Vec<(String, &'static str, usize)> {
    [false, true]
        .into_iter()
        .flat_map(|no_fp| {
            let suffix = if no_fp { "_no_fp" } else { "" };
            let (light_entry, light_exit) = fgraph::trampolines(no_fp);
            [
                ("probekit_site_trampoline", "probekit's site trampoline", patch::trampoline(no_fp)),
                ("probekit_site_exit_entry_trampoline", "probekit's exit-path entry trampoline", patch::exit_entry_trampoline(no_fp)),
                ("probekit_site_exit_trampoline", "probekit's exit trampoline", crate::retprobe::exit_trampoline(no_fp)),
                ("probekit_fgraph_entry_trampoline", "probekit's light entry trampoline", light_entry),
                ("probekit_fgraph_exit_trampoline", "probekit's light exit trampoline", light_exit),
            ]
            .map(|(symbol, what, addr)| (format!("{symbol}{suffix}"), what, addr))
        })
        .collect()
}

/// Whether a return probe or a light record ([`fgraph`]) is armed on the site at
/// `site`: its enabled site then jumps to its exit path (if it has one), where the
/// return is observed without hijacking the return address. Under the registry lock.
pub(crate) fn wants_exit(site: usize) -> bool {
    let (on_entry, light) = (crate::retprobe::entry_hook(), fgraph::hook());
    registry::armed_at(site).any(|r| matches!(r.pre.load(Ordering::Relaxed), p if p == on_entry || p == light))
}

/// Runs the probes armed on the site at `site`, in registration order, for the site
/// trampoline's dispatcher: pre handlers, then (unless one redirected execution) post
/// handlers, with `regs` as at the function's entry (pc = `site`). A site hit inside a
/// handler is counted as missed.
#[inline(always)]
pub(crate) fn run_site(site: usize, regs: &mut PtRegs) {
    match enter_site() {
        Some(shard) => {
            run_site_entered(site, shard, regs);
            leave_site();
        }
        None => missed_site(site),
    }
}

/// Sets this thread's `active` flag, and gives the thread's hit counter shard; `None`
/// if the flag was set already (a site hit inside a handler: [`missed_site`], and the
/// flag stays with the hit path that set it). Every record is read while the flag is
/// set, which also tells a grace period that the thread is inside the hit path;
/// [`leave_site`] clears it. The guard of every path that counts hits in the
/// per-thread counters: sites, their light path (`fgraph`) and optimized probes.
#[inline(always)]
pub(crate) fn enter_site() -> Option<Shard> {
    // The shard first: its first-time path is a call, across which `active` would
    // otherwise be kept in a register the dispatcher saves.
    let (shard, active) = grace::with_thread(|t| (t.shard(), t.active.replace(true)));
    // The sampling handler reads `active` on this thread: the store must not move past
    // the reads of the records.
    compiler_fence(Ordering::SeqCst);
    (!active).then_some(shard)
}

/// [`enter_site`] for a short path free of calls: `None`, with the flag untouched, if
/// the thread was never recorded (its first hit) or is in a handler; the general path
/// then handles the hit.
#[inline(always)]
pub(crate) fn try_enter_site() -> Option<Shard> {
    let shard = grace::with_thread(|t| match t.recorded_shard() {
        Some(shard) if !t.active.get() => {
            t.active.set(true);
            Some(shard)
        }
        _ => None,
    });
    // As in `enter_site`.
    compiler_fence(Ordering::SeqCst);
    shard
}

/// Clears the `active` flag [`enter_site`] set, once no record is read any more.
#[inline(always)]
pub(crate) fn leave_site() {
    compiler_fence(Ordering::SeqCst);
    grace::with_thread(|t| t.active.set(false));
}

/// [`run_site`]'s handlers, between [`enter_site`] (which gave `shard`) and
/// [`leave_site`]: the site's record through its hint (`registry::linked_at`), else a
/// table lookup, no scan, and [`run_sole`] for the common case. The site dispatcher's
/// own short path does without it (`patch::dispatch`); its long ones and the exit-path
/// dispatcher take it.
#[inline(always)]
pub(crate) fn run_site_entered(site: usize, shard: Shard, regs: &mut PtRegs) {
    if !linked_at(site).next().is_some_and(|e| run_sole(e, site, shard, regs)) {
        run_site_chain(site, regs);
    }
}

/// The short path of a site hit, for the first record `e` linked at `site`: if it is
/// the only one, armed, without a post handler (the common case), counts the hit and
/// runs its pre handler; false, having done nothing, otherwise.
#[inline(always)]
pub(crate) fn run_sole(e: &Record, site: usize, shard: Shard, regs: &mut PtRegs) -> bool {
    if e.chain.load(Ordering::Acquire) != 0 || e.addr.load(Ordering::Acquire) != site || e.post.load(Ordering::Relaxed) != 0 {
        return false;
    }
    run_hinted(e, shard, regs);
    true
}

/// The short path of a site hit for the record `e` the site's hint names, armed there
/// (the hint names only the only record of an address, without a post handler: see
/// `registry::sole`): counts the hit and runs its pre handler.
#[inline(always)]
pub(crate) fn run_hinted(e: &Record, shard: Shard, regs: &mut PtRegs) {
    count_site_hit(shard, e);
    let pre = e.pre.load(Ordering::Relaxed);
    if pre != 0 {
        call_handler(pre, e.ctx.load(Ordering::Relaxed), regs);
    }
}

/// [`run_site_entered`] for every record on the site's chain. Out of line, and it
/// finds the thread's counter itself: nothing of the short path stays live across its
/// call, which would cost the dispatcher callee-saved registers on every hit.
#[inline(never)]
pub(crate) fn run_site_chain(site: usize, regs: &mut PtRegs) {
    let shard = grace::with_thread(|t| t.shard());
    let mut posts = false;
    for e in registry::armed_at(site) {
        posts |= e.post.load(Ordering::Relaxed) != 0;
        count_site_hit(shard, e);
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
        for e in registry::armed_at(site) {
            let post = e.post.load(Ordering::Relaxed);
            if post != 0 {
                call_handler(post, e.post_ctx.load(Ordering::Relaxed), regs);
            }
        }
    }
}

/// A site hit inside a handler: counted as missed, runs nothing.
#[cold]
pub(crate) fn missed_site(site: usize) {
    for e in registry::armed_at(site) {
        e.nmissed.fetch_add(1, Ordering::Relaxed);
    }
}
