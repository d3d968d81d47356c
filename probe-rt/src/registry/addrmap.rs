//! Which records are at each address, found without a scan: an open-addressed table
//! from an address to the index + 1 of the first record there (the kernel's aggregated
//! kprobe list, reached from the probe's address). Written under the registry lock,
//! read lock-free by the hit paths.
//!
//! Entries are never emptied, so a lookup's probe sequence is never broken: an entry
//! whose head is 0 (its address has no registered probe) is *dead*, and may be taken
//! over by another address. A reader that found the old address's entry just before
//! may then walk the new address's chain: it checks each record's address, so it runs
//! none of them, which is right, since the old address had no probe left.
//!
//! The table grows without stopping a lookup in progress: a larger table is filled
//! with the live entries and published; a reader still in the old one finds what was
//! there when it started, as if its lookup had come a moment earlier. Old tables are
//! kept (never freed: a reader may be in one at any time); together they are smaller
//! than the newest.

use crate::Error;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};

struct Entry {
    /// The address; 0 for an entry never used.
    key: AtomicUsize,
    /// The index + 1 of the first record there; 0 for none (a dead entry).
    head: AtomicU32,
}

/// Bytes of one entry (the attach bench's memory report).
pub(crate) const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

struct Table {
    /// Entries - 1 (a power of two minus one).
    mask: usize,
    /// 64 - log2(entries): the hash's top bits are the first entry's index.
    shift: u32,
    /// Entries ever used (live or dead): at most half of them, or the table grows.
    used: AtomicUsize,
    entries: Box<[Entry]>,
}

impl Table {
    fn new(len: usize) -> Table {
        let entries = (0..len).map(|_| Entry { key: AtomicUsize::new(0), head: AtomicU32::new(0) }).collect();
        Table { mask: len - 1, shift: 64 - len.trailing_zeros(), used: AtomicUsize::new(0), entries }
    }

    /// The index of the first entry a lookup of `key` visits (Fibonacci hashing:
    /// addresses' low bits are alignment).
    #[inline(always)]
    fn start(&self, key: usize) -> usize {
        ((key as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    /// The entries a lookup of `key` visits, in order.
    #[inline(always)]
    fn probe_sequence(&self, key: usize) -> impl Iterator<Item = &Entry> {
        let start = self.start(key);
        (0..=self.mask).map(move |k| &self.entries[(start + k) & self.mask])
    }
}

/// A table from addresses to chain heads.
pub(crate) struct AddrMap {
    table: AtomicPtr<Table>,
}

/// The probed addresses: breakpoints and sites.
pub(crate) static ADDRS: AddrMap = AddrMap { table: AtomicPtr::new(std::ptr::null_mut()) };
/// The addresses of out-of-line slots' breakpoints (probes with a post handler).
pub(crate) static TRAPS: AddrMap = AddrMap { table: AtomicPtr::new(std::ptr::null_mut()) };
/// The breakpoints of detour blocks that resume a redirected optimized probe (see
/// `arch::detour`): head 1 for every one ever written (blocks are never unmapped).
pub(crate) static REDIRECTS: AddrMap = AddrMap { table: AtomicPtr::new(std::ptr::null_mut()) };

/// Entries of the first table.
const FIRST: usize = 1024;

impl AddrMap {
    fn current(&self) -> Option<&'static Table> {
        let p = self.table.load(Ordering::Acquire);
        // SAFETY: a non-null pointer was stored (Release) from `Box::into_raw` of a
        // `Table` that is never freed (see the module docs).
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// The index + 1 of the first record at `key`, 0 if it has none. Lock-free, for the
    /// hit paths.
    #[inline(always)]
    pub(crate) fn head(&self, key: usize) -> u32 {
        let Some(t) = self.current() else { return 0 };
        // The first slot of the sequence holds most keys (the table stays under half
        // full): checked inline, in the hit path; the rest of the sequence out of line.
        let Some(e) = t.entries.get(t.start(key)) else { return 0 };
        match e.key.load(Ordering::Acquire) {
            k if k == key => e.head.load(Ordering::Acquire),
            0 => 0,
            _ => Self::head_after_first(t, key),
        }
    }

    /// [`Self::head`] past the first entry of `key`'s sequence.
    #[cold]
    #[inline(never)]
    fn head_after_first(t: &Table, key: usize) -> u32 {
        for e in t.probe_sequence(key).skip(1) {
            match e.key.load(Ordering::Acquire) {
                k if k == key => return e.head.load(Ordering::Acquire),
                0 => return 0,
                _ => {}
            }
        }
        0
    }

    /// Makes `head` (an index + 1, or 0) the first record at `key`. Under the registry
    /// lock.
    pub(crate) fn set(&self, key: usize, head: u32) -> Result<(), Error> {
        let t = match self.current() {
            Some(t) => t,
            None if head == 0 => return Ok(()),
            None => self.publish(Table::new(FIRST)),
        };
        let mut dead = None;
        for e in t.probe_sequence(key) {
            match e.key.load(Ordering::Relaxed) {
                k if k == key => {
                    e.head.store(head, Ordering::Release);
                    return Ok(());
                }
                0 => break,
                _ if dead.is_none() && e.head.load(Ordering::Relaxed) == 0 => dead = Some(e),
                _ => {}
            }
        }
        if head == 0 {
            return Ok(()); // nothing at an address that has no entry
        }
        if let Some(e) = dead {
            Self::fill(e, key, head);
            return Ok(());
        }
        let t = if (t.used.load(Ordering::Relaxed) + 1) * 2 > t.mask + 1 { self.grow(t)? } else { t };
        let e = t.probe_sequence(key).find(|e| e.key.load(Ordering::Relaxed) == 0).ok_or(Error::OutOfMemory { bytes: 0 })?;
        t.used.fetch_add(1, Ordering::Relaxed);
        Self::fill(e, key, head);
        Ok(())
    }

    fn fill(e: &Entry, key: usize, head: u32) {
        // The key first: a reader that sees the new head sees the new key too.
        e.key.store(key, Ordering::Release);
        e.head.store(head, Ordering::Release);
    }

    fn publish(&self, t: Table) -> &'static Table {
        let p = Box::into_raw(Box::new(t));
        self.table.store(p, Ordering::Release);
        // SAFETY: just leaked, never freed.
        unsafe { &*p }
    }

    /// A table twice as large (or as large, if most entries are dead) with the live
    /// entries of `old`, published.
    fn grow(&self, old: &Table) -> Result<&'static Table, Error> {
        let live: Vec<(usize, u32)> =
            old.entries.iter().map(|e| (e.key.load(Ordering::Relaxed), e.head.load(Ordering::Relaxed))).filter(|(k, h)| *k != 0 && *h != 0).collect();
        let mut len = old.mask + 1;
        while (live.len() + 1) * 4 > len {
            len = len.checked_mul(2).ok_or(Error::OutOfMemory { bytes: usize::MAX })?;
        }
        let t = Table::new(len);
        for (k, h) in live {
            if let Some(e) = t.probe_sequence(k).find(|e| e.key.load(Ordering::Relaxed) == 0) {
                Self::fill(e, k, h);
                t.used.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(self.publish(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_follow_updates_growth_and_dead_entries() {
        let map = AddrMap { table: AtomicPtr::new(std::ptr::null_mut()) };
        const BASE: usize = 0x7fff_0000_0000;
        assert_eq!(map.head(BASE), 0, "an empty map has nothing");
        // Enough keys to grow the table several times.
        let keys: Vec<usize> = (0..5000).map(|i| BASE + i * 16).collect();
        for (i, k) in keys.iter().enumerate() {
            map.set(*k, i as u32 + 1).unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.head(*k), i as u32 + 1);
        }
        assert_eq!(map.head(BASE + 8), 0, "a key never set has no record");
        map.set(keys[3], 0).unwrap();
        assert_eq!(map.head(keys[3]), 0);
        // A new key may take the dead entry; every other lookup still finds its own.
        map.set(BASE + 0x10_0000, 77).unwrap();
        assert_eq!(map.head(BASE + 0x10_0000), 77);
        for (i, k) in keys.iter().enumerate().filter(|(i, _)| *i != 3) {
            assert_eq!(map.head(*k), i as u32 + 1);
        }
    }
}
