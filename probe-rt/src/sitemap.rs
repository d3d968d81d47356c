//! Which records ride each site, found without a scan (the kernel's aggregated kprobe
//! list, reached from the site). The site trampoline's dispatcher looks the site up in
//! an open-addressed table whose entries hold the first record on the site; each record
//! links to the next (`chain` in `probe`). Written under the registry lock, read
//! lock-free by the hit path.
//!
//! Entries are never emptied, so a lookup's probe sequence is never broken: an entry
//! whose chain is empty (its site has no registered probe) is *dead*, and may be taken
//! over by another site. A reader that found the old site's entry just before may then
//! walk the new site's chain: it checks each record's address, so it runs none of them,
//! which is right, since the old site had no probe left.

use crate::Error;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Entries in the table: four times the records, so at most a quarter of it is ever
/// live (a live entry has at least one record).
const ENTRIES: usize = 4 * crate::probe::MAX_PROBES;
const _: () = assert!(ENTRIES.is_power_of_two());

struct Entry {
    /// The site's address; 0 for an entry never used.
    site: AtomicUsize,
    /// The index + 1 of the first record on the site; 0 for none (a dead entry).
    head: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)] // array initialiser only
const UNUSED: Entry = Entry { site: AtomicUsize::new(0), head: AtomicU32::new(0) };
/// Zero pages until used.
static TABLE: [Entry; ENTRIES] = [UNUSED; ENTRIES];

/// The entries a lookup of `site` visits, in order (Fibonacci hashing: sites are
/// function addresses, whose low bits are alignment).
fn probe_sequence(site: usize) -> impl Iterator<Item = &'static Entry> {
    let start = (site as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - ENTRIES.trailing_zeros());
    (0..ENTRIES).map(move |k| &TABLE[(start as usize + k) & (ENTRIES - 1)])
}

/// The index + 1 of the first record on `site`, 0 if it has none. Lock-free, for the
/// hit path.
#[inline]
pub(crate) fn head(site: usize) -> u32 {
    for e in probe_sequence(site) {
        match e.site.load(Ordering::Acquire) {
            s if s == site => return e.head.load(Ordering::Acquire),
            0 => return 0,
            _ => {}
        }
    }
    0
}

/// Makes `head` (an index + 1, or 0) the first record on `site`. Under the registry lock.
pub(crate) fn set_head(site: usize, head: u32) -> Result<(), Error> {
    let mut dead = None;
    for e in probe_sequence(site) {
        match e.site.load(Ordering::Relaxed) {
            s if s == site => {
                e.head.store(head, Ordering::Release);
                return Ok(());
            }
            0 => {
                dead = dead.or(Some(e));
                break;
            }
            _ if dead.is_none() && e.head.load(Ordering::Relaxed) == 0 => dead = Some(e),
            _ => {}
        }
    }
    if head == 0 {
        return Ok(()); // nothing on a site that has no entry
    }
    // Unreachable while a quarter of the table at most is live; an error rather than a
    // panic all the same.
    let e = dead.ok_or(Error::TooManyProbes { max: crate::probe::MAX_PROBES })?;
    // The site first: a reader that sees the new head sees the new site too.
    e.site.store(site, Ordering::Release);
    e.head.store(head, Ordering::Release);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Sites far from any real one: the table is shared with the rest of the crate's tests.
    const BASE: usize = 0x7fff_0000_0000;

    #[test]
    fn lookups_follow_updates_and_dead_entries_are_reused() {
        let sites: Vec<usize> = (0..64).map(|i| BASE + i * 16).collect();
        for (i, s) in sites.iter().enumerate() {
            set_head(*s, i as u32 + 1).unwrap();
        }
        for (i, s) in sites.iter().enumerate() {
            assert_eq!(head(*s), i as u32 + 1);
        }
        assert_eq!(head(BASE + 8), 0, "a site never set has no record");
        set_head(sites[3], 0).unwrap();
        assert_eq!(head(sites[3]), 0);
        // A new site may take the dead entry; every other lookup still finds its own.
        set_head(BASE + 0x10_0000, 77).unwrap();
        assert_eq!(head(BASE + 0x10_0000), 77);
        for (i, s) in sites.iter().enumerate().filter(|(i, _)| *i != 3) {
            assert_eq!(head(*s), i as u32 + 1);
        }
        for s in sites.iter().chain([&(BASE + 0x10_0000)]) {
            set_head(*s, 0).unwrap();
        }
    }
}
