//! The registry's hint of an address's only record ([`SOLE`]), which the hit paths try
//! before the address table.

use super::{chain_from, Record, ADDRS};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Where the hit paths find an address's record first: a direct-mapped table from an
/// address to the record linked there, written while it is the only one and has no
/// post handler (most probed addresses have one probe, with a pre handler only). It
/// saves the address table's dependent loads (its pointer, its size, its entry, the
/// record's chunk): ~3 ns of a ~10 ns site hit here. A record it names is therefore
/// the whole of its address's chain, and runs its pre handler only: the site
/// dispatcher's short path asks no more of it than that it is armed (a hit as a second
/// probe is being linked, before the hint is taken back, is a hit of the moment before
/// that registration, as one that had read the chain a moment earlier). A record's post
/// handler is set before it is linked and stays for its life.
///
/// A hint only: two addresses may share an entry, and an entry is read without a lock
/// while [`refresh_sole`] rewrites it, so a reader may pair one write's address with
/// another's record. [`sole`] therefore takes the record only if its own `target` is
/// the address, read after the record's pointer with Acquire (the pointer is stored
/// with Release): a reused record shows its new address, not one from an earlier
/// life (weak memory would otherwise allow that on aarch64, and a walk of another
/// address's chain would skip this one's records). Such a record was, when its hint
/// was written, the only one linked there; records are linked after the last, so it
/// stays the first until it is unlinked, and while a reader is in the hit path it is
/// not reused (a grace period waits for the reader): a walk from it is a walk of the
/// address's chain, or, once it is unlinked (its own link stays), the chain as it was
/// a moment before.
static SOLE: [Sole; SOLE_LEN] = [const { Sole { addr: AtomicUsize::new(0), record: AtomicPtr::new(std::ptr::null_mut()) } }; SOLE_LEN];
pub(super) const SOLE_LEN: usize = 1024;

pub(super) struct Sole {
    /// The address; 0 for none.
    pub(super) addr: AtomicUsize,
    /// Its record.
    pub(super) record: AtomicPtr<Record>,
}

/// The entry of [`SOLE`] for `addr` (probed addresses are mostly function entries:
/// 16-aligned, and neighbours).
#[inline(always)]
pub(super) fn sole_entry(addr: usize) -> &'static Sole {
    &SOLE[(addr >> 4) % SOLE_LEN]
}

/// The record [`SOLE`] names for `addr`, if it names one: the first of its chain.
#[inline(always)]
pub(crate) fn sole(addr: usize) -> Option<&'static Record> {
    let h = sole_entry(addr);
    if h.addr.load(Ordering::Acquire) != addr {
        return None;
    }
    // Acquire: the record's `target` as written before its pointer was stored here (a
    // pointer of a later write for another address may come with this address, and
    // its record must then show that address, not one from an earlier life).
    // SAFETY: the pointer is null or was stored from a `&'static Record` of a chunk,
    // which is never freed.
    let e = unsafe { h.record.load(Ordering::Acquire).as_ref() }?;
    (e.target.load(Ordering::Relaxed) == addr).then_some(e)
}

/// Rewrites the [`SOLE`] hint of `addr` after its chain changed: the record linked
/// there if it is the only one and has no post handler, else none. An entry another address holds stays
/// its (an address loses its hint only when its chain changes): addresses that share
/// an entry do not take it from each other at every registration. Under the registry
/// lock.
pub(super) fn refresh_sole(addr: usize) {
    let h = sole_entry(addr);
    let held = h.addr.load(Ordering::Relaxed);
    let mut chain = chain_from(ADDRS.head(addr));
    match (chain.next(), chain.next()) {
        (Some(e), None) if (held == 0 || held == addr) && e.post.load(Ordering::Relaxed) == 0 => {
            h.addr.store(0, Ordering::Release);
            h.record.store(e as *const Record as *mut Record, Ordering::Release);
            h.addr.store(addr, Ordering::Release);
        }
        _ if held == addr => h.addr.store(0, Ordering::Release),
        _ => {}
    }
}
