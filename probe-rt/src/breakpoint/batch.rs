//! Batches of probes (the kernel's `register_kprobes`/`unregister_kprobes`): staged
//! one by one under the registry lock, then armed or disarmed with their code writes
//! and core syncs batched as `text_poke_bp_batch` batches them.

use super::{install_handler, orig_in_text, our_breakpoint_at, still_there, unstage, ProbeBuilder, ProbeHandle};
use crate::arch::insn::BREAKPOINT;
use crate::optprobe::{self, Optimize};
use crate::registry::{self, record, Record};
use crate::sys::code;
use crate::{Error, NotOptimized};
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// Why a batch was refused: the member (its position in the batch) and its error.
/// Nothing of the batch is armed and no byte of the program's text was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchError {
    /// The position of the member that failed.
    pub index: usize,
    /// What was wrong with it.
    pub error: Error,
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "member {} of the batch: {}", self.index, self.error)
    }
}

impl std::error::Error for BatchError {}

/// Registers probes together, all or nothing for every member that staged (see
/// `crate::batch::register_batch`). A member whose checks fail is left out when
/// `skip(position, &error)` says so (the member's slot in the result is `None`), else
/// the whole batch fails with it. Arming failures always fail the whole batch, and so
/// does a member registered with [`Optimize::Required`] that cannot be optimized.
/// Armed, the batch's addresses are optimized together (one grace period, one
/// `text_poke_bp` sequence).
pub(crate) fn register_many(
    probes: impl IntoIterator<Item = ProbeBuilder>,
    mut skip: impl FnMut(usize, &Error) -> bool,
) -> Result<Vec<Option<ProbeHandle>>, BatchError> {
    code::writable().and_then(|_| install_handler()).map_err(|error| BatchError { index: 0, error })?;
    let mut reg = registry::lock();
    let mut staged = Vec::new(); // (position, record)
    let mut positions = 0;
    let mut owners = Vec::new(); // of each staged member
    for (i, b) in probes.into_iter().enumerate() {
        positions = i + 1;
        // Required, and a post handler: refused as a check that failed.
        let member = b.stage(&mut reg).and_then(|index| {
            let e = record(index);
            if b.optimization() == Optimize::Required && b.post.is_some() && !e.site.load(Ordering::Relaxed) {
                unstage(&mut reg, &[index]);
                return Err(Error::NotOptimized { addr: e.target.load(Ordering::Relaxed), reason: NotOptimized::PostHandler });
            }
            Ok(index)
        });
        match member {
            Ok(index) => {
                staged.push((i, index));
                owners.push(b.owners());
            }
            Err(error) if skip(i, &error) => {}
            Err(error) => {
                unstage(&mut reg, &staged.iter().map(|s| s.1).collect::<Vec<_>>());
                reg.bury(owners.into_iter().flatten().flatten());
                return Err(BatchError { index: i, error });
            }
        }
    }
    let indices: Vec<usize> = staged.iter().map(|s| s.1).collect();
    if let Err((k, error, stuck)) = arm_many(&indices) {
        // Records whose breakpoint could not be taken out again stay armed (and linked,
        // so their traps still find them) with no handle: as a failed disarm leaves them.
        let back: Vec<usize> = indices.iter().copied().filter(|i| !stuck.contains(i)).collect();
        unstage(&mut reg, &back);
        for (&index, owners) in indices.iter().zip(owners) {
            match stuck.contains(&index) {
                // Still armed: its handlers may run at any time from now on.
                true => std::mem::forget(owners),
                false => reg.bury(owners.into_iter().flatten()),
            }
        }
        return Err(BatchError { index: staged[k].0, error });
    }
    let targets: Vec<usize> = indices.iter().map(|&i| record(i).target.load(Ordering::Relaxed)).collect();
    optprobe::settle(&targets);
    // A member that required optimization and did not get it fails the batch: every
    // member is taken out again, as if arming had failed.
    let refused = staged.iter().find_map(|&(i, index)| {
        let e = record(index);
        let required = optprobe::required(e) && !e.site.load(Ordering::Relaxed);
        required.then(|| optprobe::why_not(e)).flatten().map(|reason| (i, Error::NotOptimized { addr: e.target.load(Ordering::Relaxed), reason }))
    });
    if let Some((i, error)) = refused {
        let _ = disarm_many(&indices);
        let back: Vec<usize> = indices.iter().copied().filter(|&i| record(i).addr.load(Ordering::Relaxed) == 0).collect();
        unstage(&mut reg, &back);
        for (&index, owners) in indices.iter().zip(owners) {
            match back.contains(&index) {
                true => reg.bury(owners.into_iter().flatten()),
                // Still armed: its handlers may run at any time from now on.
                false => std::mem::forget(owners),
            }
        }
        optprobe::settle(&targets);
        return Err(BatchError { index: i, error });
    }
    let mut out: Vec<Option<ProbeHandle>> = (0..positions).map(|_| None).collect();
    for ((i, index), owners) in staged.into_iter().zip(owners) {
        record(index).live.store(true, Ordering::Relaxed);
        out[i] = Some(ProbeHandle { index, owners });
    }
    Ok(out)
}

/// Unregisters probes together, with the code writes batched. Returns the first error
/// and, per handle, whether it was unregistered: a probe whose text could not be
/// restored stays registered and armed (its handle is dropped without another try).
pub(crate) fn unregister_many(handles: Vec<ProbeHandle>) -> (Result<(), Error>, Vec<bool>) {
    // The handles no longer own their probes: this function unregisters them.
    let (indices, owners): (Vec<usize>, Vec<_>) = handles
        .into_iter()
        .map(|h| {
            let mut h = std::mem::ManuallyDrop::new(h);
            (h.index, std::mem::take(&mut h.owners))
        })
        .unzip();
    let mut reg = registry::lock();
    let r = disarm_many(&indices);
    let targets: Vec<usize> = indices.iter().map(|&i| record(i).target.load(Ordering::Relaxed)).collect();
    let done = indices
        .iter()
        .zip(owners)
        .map(|(&index, owners)| {
            let e = record(index);
            if e.addr.load(Ordering::Relaxed) != 0 {
                // Still armed: left registered, its handlers may run at any time.
                std::mem::forget(owners);
                return false;
            }
            registry::unlink(index);
            e.live.store(false, Ordering::Relaxed);
            reg.retire(index);
            reg.bury(owners.into_iter().flatten());
            true
        })
        .collect();
    // The probes left at those addresses may be optimizable now, or take a site's
    // light trampolines.
    optprobe::settle(&targets);
    crate::site::settle(indices.iter().map(|&i| record(i)).filter(|e| e.site.load(Ordering::Relaxed)).map(|e| e.target.load(Ordering::Relaxed)));
    (r, done)
}

/// Arms staged records together; on error every one is left unarmed with the text as
/// it was, and the position of the member that failed. Should a breakpoint just
/// written fail to come out again (its page unmapped meanwhile), the records at its
/// address are the third part of the error: they stay armed.
fn arm_many(indices: &[usize]) -> Result<(), (usize, Error, Vec<usize>)> {
    // Which member's code is where it was registered, and which addresses need a write
    // (no probe armed there yet): breakpoints and sites apart.
    let mut writes: Vec<(usize, usize)> = Vec::new(); // (member, breakpoint address)
    let mut sites: Vec<(usize, usize)> = Vec::new(); // (member, site)
    let mut shared_sites: Vec<usize> = Vec::new(); // enabled already
    let mut seen = HashSet::new();
    for (i, &index) in indices.iter().enumerate() {
        let e = record(index);
        let target = e.target.load(Ordering::Relaxed);
        if !still_there(e, target) {
            return Err((i, Error::CodeGone { addr: target }, Vec::new()));
        }
        let site = e.site.load(Ordering::Relaxed);
        // Armed records whose breakpoint or call is not in the text are stale (the code
        // was unloaded and loaded again at the same address): disarmed in place, as
        // `arm` does, so the address counts as new.
        let present = if site { crate::site::patch::enabled_in_text(target) } else { our_breakpoint_at(target) || optprobe::jump_in_text(target) };
        if !present {
            registry::disarm_in_place(target);
            optprobe::forget(target);
        }
        let new_here = registry::armed_at(target).next().is_none();
        if site && !new_here {
            shared_sites.push(target);
        }
        if !new_here || !seen.insert(target) {
            continue;
        }
        if site {
            sites.push((i, target));
        } else {
            if !orig_in_text(e, target) {
                return Err((i, Error::CodeGone { addr: target }, Vec::new()));
            }
            writes.push((i, target));
        }
    }
    // An optimized address goes back to its breakpoint before a probe that cannot be
    // optimized is armed there.
    let back: Vec<usize> = indices.iter().map(|&i| record(i)).filter(|e| !optprobe::allows(e)).map(|e| e.target.load(Ordering::Relaxed)).collect();
    if let Err(e) = optprobe::unoptimize(&back) {
        return Err((0, e, Vec::new()));
    }
    // Published before the breakpoints exist, so a trap always finds its probe.
    for &index in indices {
        let e = record(index);
        e.addr.store(e.target.load(Ordering::Relaxed), Ordering::Release);
    }
    // On failure: the breakpoints written so far taken out again, then every record
    // unpublished but those at an address whose original bytes could not be written
    // back (their breakpoint is in the text: a trap must still find them).
    let undo = |written: usize| {
        let stuck: HashSet<usize> = writes[..written]
            .iter()
            .filter(|&&(i, t)| {
                let orig = record(indices[i]).orig.load(Ordering::Relaxed).to_ne_bytes();
                code::write_code(t, &orig[..BREAKPOINT.len()]).is_err()
            })
            .map(|&(_, t)| t)
            .collect();
        code::sync_cores();
        let mut armed = Vec::new();
        for &index in indices {
            let e = record(index);
            if stuck.contains(&e.target.load(Ordering::Relaxed)) {
                armed.push(index);
            } else {
                e.addr.store(0, Ordering::Release);
            }
        }
        armed
    };
    if let Some((k, (i, e))) = writes.iter().enumerate().find_map(|(k, &(i, t))| code::write_code(t, BREAKPOINT).err().map(|e| (k, (i, e)))) {
        return Err((i, e, undo(k)));
    }
    code::sync_cores();
    let targets: Vec<usize> = sites.iter().map(|(_, t)| *t).collect();
    if let Err((k, e)) = crate::site::patch::patch_many(&targets, true) {
        return Err((sites[k].0, e, undo(writes.len())));
    }
    // Sites enabled already go to their exit path if a return probe joined them (best
    // effort: the call is correct for return probes too, by hijacking).
    for site in shared_sites {
        let _ = crate::site::patch::retarget(site);
    }
    Ok(())
}

/// Disarms records together (see [`unregister_many`]): the text restored where no
/// other armed probe needs it, every record's `addr` cleared after.
fn disarm_many(indices: &[usize]) -> Result<(), Error> {
    let batch: HashSet<usize> = indices.iter().map(|&i| record(i) as *const Record as usize).collect();
    let ours = |o: &Record| batch.contains(&(o as *const Record as usize));
    let mut writes: Vec<(usize, usize)> = Vec::new(); // (record, breakpoint address)
    let mut sites: Vec<usize> = Vec::new();
    let mut lasts: Vec<usize> = Vec::new(); // optimized
    let mut seen = HashSet::new();
    for &index in indices {
        let e = record(index);
        let target = e.target.load(Ordering::Relaxed);
        if e.addr.load(Ordering::Relaxed) == 0 {
            continue; // not armed: nothing to restore
        }
        if !still_there(e, target) {
            optprobe::forget(target);
            continue; // its code is gone: nothing to restore
        }
        let last = registry::armed_at(target).all(ours);
        if !last {
            continue;
        }
        if !seen.insert(target) {
            continue;
        }
        if e.site.load(Ordering::Relaxed) {
            sites.push(target);
        } else if optprobe::is_live(target) {
            lasts.push(target);
            writes.push((index, target));
        } else if our_breakpoint_at(target) {
            writes.push((index, target));
        }
    }
    // Optimized addresses go back to their breakpoints first (batched).
    let mut result = optprobe::unoptimize(&lasts);
    let writes: Vec<(usize, usize)> = writes.into_iter().filter(|&(_, t)| !optprobe::is_live(t)).collect();
    for &(index, t) in &writes {
        let orig = record(index).orig.load(Ordering::Relaxed).to_ne_bytes();
        if let Err(e) = code::write_code(t, &orig[..BREAKPOINT.len()]) {
            result = result.and(Err(e));
        }
    }
    code::sync_cores();
    // Sites whose code is gone are left alone (`patch_many` names them: dropped, and
    // the others patched again); on another error every site stays enabled.
    let mut failed_sites: Vec<usize> = Vec::new();
    loop {
        match crate::site::patch::patch_many(&sites, false) {
            Ok(()) => break,
            Err((k, Error::CodeGone { .. })) => {
                sites.remove(k);
            }
            Err((_, e)) => {
                result = result.and(Err(e));
                failed_sites = sites;
                break;
            }
        }
    }
    let written: HashSet<usize> = writes.iter().map(|(_, t)| *t).collect();
    for &index in indices {
        let e = record(index);
        let target = e.target.load(Ordering::Relaxed);
        let restored = match e.site.load(Ordering::Relaxed) {
            true => !failed_sites.contains(&target),
            false => !written.contains(&target) || !our_breakpoint_at(target),
        };
        if restored {
            e.addr.store(0, Ordering::Release);
        }
    }
    // Sites that stay enabled go back to the call if their last return probe left
    // (best effort: the exit path is correct without return probes too).
    for &index in indices {
        let e = record(index);
        if e.site.load(Ordering::Relaxed) {
            let _ = crate::site::patch::retarget(e.target.load(Ordering::Relaxed));
        }
    }
    result
}
