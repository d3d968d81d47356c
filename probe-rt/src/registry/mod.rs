//! The probe records: one lock-free record per registered probe, read by every hit
//! path; their allocation (no fixed cap: chunks of records are added as needed and
//! never move), the chains of records that share an address (the kernel's aggregated
//! kprobes), the lookup of a chain by address ([`addrmap`]), and the out-of-line slot
//! pages.
//!
//! Written under [`REGISTRY`]'s lock by registration, arming and disarming; read
//! without a lock by the hit paths, which must see every field of a record they reach
//! filled in: a record is reached only through a chain link or a table entry stored
//! with `Release` after it was filled in, or through [`record()`] for an index below
//! [`used`] (raised with `Release`).

pub(crate) mod addrmap;
pub(crate) mod handler;
mod record;
mod sole;

use crate::grace::Shard;
use crate::{grace, Error, PtRegs};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

pub(crate) use handler::{Call, Handler, Owner};
pub(crate) use record::Record;
use record::NONE;
use sole::refresh_sole;
pub(crate) use sole::sole;
#[cfg(test)]
use sole::{sole_entry, SOLE_LEN};

/// Records per chunk, and chunks at most (16 Mi records: memory runs out first).
const CHUNK_BITS: usize = 10;
const CHUNK: usize = 1 << CHUNK_BITS;
const MAX_CHUNKS: usize = 1 << 14;

/// Site hits are counted per thread, for the threads holding the first [`HIT_SHARDS`]
/// entries of the grace periods' thread table (see `grace::Thread::index`): each
/// counter has one writer at a time (an entry passes to another thread only once its
/// owner has exited), so a hit costs a plain load and store instead of a locked add
/// (the kernel's per-CPU `nhit`); a site probe's hit count is `nhit` plus its counters
/// here. Other threads count with the locked add.
pub(crate) const HIT_SHARDS: usize = 8;

/// A chunk of records and their per-thread hit counters, in groups.
struct Chunk {
    groups: [Group; CHUNK / GROUP],
}

/// Records per group.
const GROUP: usize = 8;

/// [`GROUP`] records and their per-thread hit counters, at a multiple of its size
/// (its alignment), so that a hit reaches a record's counter from the record's address
/// alone ([`counter`]): a pointer the record kept to it cost a load between the
/// record's and the counter's, on the path every later instruction of the hit waits
/// on (0.3-0.4 ns of a 6 ns site hit here, A/B). A thread's counters of a group share
/// one cache line, which no other thread writes. [`RECORD_BYTES`] a record in all.
#[repr(C, align(2048))] // the records first: record `i` is `i * size_of::<Record>()` bytes in
struct Group {
    records: [Record; GROUP],
    /// Shard `s`'s counter of the group's record `i` is `hits[s][i]`.
    hits: [[AtomicU64; GROUP]; HIT_SHARDS],
}
// Records that grew past the room of the group's alignment need a larger one; a row of
// counters is one thread's cache line; the shift finds a record's place (records that
// grew past 8/7 of a power of two would need a division); a chunk is whole groups.
const _: () = {
    assert!(size_of::<Group>() == align_of::<Group>(), "a group fills its alignment");
    assert!(std::mem::offset_of!(Group, hits) % 64 == 0 && GROUP * size_of::<AtomicU64>() == 64, "a row is a cache line");
    assert!(((GROUP - 1) * size_of::<Record>()) >> PLACE_SHIFT == GROUP - 1, "the shift gives a record's place");
    assert!(CHUNK.is_multiple_of(GROUP), "a chunk is whole groups");
};

/// A record's bytes, with its counters and its share of its group's padding.
pub(crate) const RECORD_BYTES: usize = size_of::<Group>() / GROUP;
/// A record's per-thread counters' bytes.
pub(crate) const COUNTER_BYTES: usize = HIT_SHARDS * size_of::<AtomicU64>();
/// A record's share of its group's padding.
pub(crate) const PADDING_BYTES: usize = RECORD_BYTES - size_of::<Record>() - COUNTER_BYTES;

/// A record's place in its group from its offset there, shifted right by this rather
/// than divided by the record's size (a shift costs less): exact for the group's
/// places while records are less than 8/7 of a power of two long (checked above).
const PLACE_SHIFT: u32 = size_of::<Record>().ilog2();
/// What [`grow`] allocates for a chunk: a group's alignment more than the chunk, so
/// that a multiple of it with the chunk's room after it lies inside; with a word's
/// alignment, for which the allocator gives fresh zeroed pages (`calloc`), untouched
/// until used (with the group's, it would zero them by hand).
const CHUNK_ROOM: std::alloc::Layout = match std::alloc::Layout::from_size_align(size_of::<Chunk>() + align_of::<Group>(), align_of::<AtomicU64>()) {
    Ok(layout) => layout,
    Err(_) => panic!("a chunk's layout"),
};

/// Group and place in it of record `index`.
#[inline(always)]
fn place(index: usize) -> (usize, usize) {
    let j = index & (CHUNK - 1);
    (j / GROUP, j % GROUP)
}

/// The chunks taken so far (null: not yet), filled in order.
static CHUNKS: [AtomicPtr<Chunk>; MAX_CHUNKS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_CHUNKS];

/// How many records registrations have taken so far: they are taken in order, and
/// reused once freed.
static USED: AtomicUsize = AtomicUsize::new(0);

/// The chunk holding record `index`, if it was allocated.
#[inline(always)]
fn chunk(index: usize) -> Option<&'static Chunk> {
    let p = CHUNKS.get(index >> CHUNK_BITS)?.load(Ordering::Acquire);
    // SAFETY: a non-null chunk pointer was stored (Release, loaded Acquire) from a
    // zero-initialised allocation of a `Chunk` that is never freed (see `grow`).
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Record `index`. Lock-free, for the hit paths.
#[inline(always)]
pub(crate) fn record(index: usize) -> &'static Record {
    let (g, i) = place(index);
    chunk(index).map_or(&NONE, |c| &c.groups[g].records[i])
}

/// How many records were taken so far.
pub(crate) fn used() -> usize {
    USED.load(Ordering::Acquire)
}

/// The records taken so far, with their indices, in index order (registration and
/// listing; the hit paths reach records through chains).
pub(crate) fn records() -> impl Iterator<Item = (usize, &'static Record)> {
    (0..used()).map(|i| (i, record(i)))
}

/// Record `index`'s hits counted per thread.
pub(crate) fn site_hits(index: usize) -> u64 {
    let (g, i) = place(index);
    chunk(index).map_or(0, |c| c.groups[g].hits.iter().map(|s| s[i].load(Ordering::Relaxed)).sum())
}

/// Zeroes record `index`'s per-thread hit counters (before it is reused).
pub(crate) fn reset_site_hits(index: usize) {
    let (g, i) = place(index);
    if let Some(c) = chunk(index) {
        for s in &c.groups[g].hits {
            s[i].store(0, Ordering::Relaxed);
        }
    }
}

/// Counts a hit of record `e` on a site, in this thread's counter (`shard`) if it
/// has one, else with a locked add.
#[inline(always)]
pub(crate) fn count_site_hit(shard: Shard, e: &Record) {
    let s = shard.counter();
    // `NONE` is the only record outside a chunk (see `Record::_private`); no hit
    // path is given it, and it is compared with an address, not loaded.
    if s < HIT_SHARDS && !std::ptr::eq(e, &NONE) {
        // SAFETY: `e` is a record of a chunk (above), which is never freed, and `s <
        // HIT_SHARDS`: `counter` gives its counter of shard `s` there.
        let h = unsafe { &*counter(e, s) };
        h.store(h.load(Ordering::Relaxed) + 1, Ordering::Relaxed)
    } else {
        e.nhit.fetch_add(1, Ordering::Relaxed);
    }
}

/// The counter of shard `s` of record `e`, found from `e`'s address with no load:
/// its group starts at the multiple of the group's alignment below it. Valid to
/// dereference if `e` is a record of a chunk and `s < HIT_SHARDS`; the pointer takes
/// the chunk's provenance, exposed when it was allocated ([`grow`]): `e`'s own covers
/// the record only.
#[inline(always)]
fn counter(e: &Record, s: usize) -> *const AtomicU64 {
    let at = (e as *const Record).addr();
    let group = at & !(align_of::<Group>() - 1);
    let i = (at - group) >> PLACE_SHIFT; // the record's place in the group
    std::ptr::with_exposed_provenance(group + std::mem::offset_of!(Group, hits) + (s * GROUP + i) * size_of::<AtomicU64>())
}

/// Makes sure the chunk of record `index` exists (under the registry lock).
fn grow(index: usize) -> Result<(), Error> {
    let c = index >> CHUNK_BITS;
    if c >= MAX_CHUNKS {
        return Err(Error::TooManyProbes { max: MAX_CHUNKS * CHUNK });
    }
    if CHUNKS[c].load(Ordering::Relaxed).is_null() {
        // SAFETY: the layout's size is not zero.
        let room = unsafe { std::alloc::alloc_zeroed(CHUNK_ROOM) };
        if room.is_null() {
            return Err(Error::OutOfMemory { bytes: CHUNK_ROOM.size() });
        }
        // Taken by `counter`, which finds a counter from a record's address.
        room.expose_provenance();
        // SAFETY: the next multiple of the group's alignment is less than that into the
        // room, which is that much longer than a chunk: the chunk from there is inside
        // it, and aligned for a `Chunk` (whose alignment is its groups'). Every field
        // of a `Chunk` is an atomic integer or bool, or `()`, for which all-zero bits
        // are a valid value (0 / false), or padding, so the zeroed bytes are a valid
        // `Chunk`. It is never freed: the hit paths may hold references to its records
        // at any time.
        let p = unsafe { room.add(room.addr().next_multiple_of(align_of::<Group>()) - room.addr()) }.cast::<Chunk>();
        CHUNKS[c].store(p, Ordering::Release);
    }
    Ok(())
}

/// Bytes of one out-of-line slot.
pub(crate) const SLOT: usize = 32;

/// How many retired records make registration run a grace period to reuse them.
pub const RECLAIM_BATCH: usize = 64;

/// Registration, arming and disarming take this lock; the hit paths never do.
static REGISTRY: Mutex<Slots> = Mutex::new(Slots { pages: Vec::new(), retired: Vec::new(), buried: Vec::new(), free: Vec::new(), retry: grace::Retry::new() });

/// Takes the registry lock (a panic while it was held leaves the data consistent:
/// every change under it is a few stores).
pub(crate) fn lock() -> MutexGuard<'static, Slots> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// The out-of-line slot pages, and the records of unregistered probes.
pub(crate) struct Slots {
    /// `(page, bytes used)`.
    pages: Vec<(usize, usize)>,
    /// Unregistered probes' records, which a thread may still be using.
    pub(crate) retired: Vec<usize>,
    /// The handlers of unregistered probes, which a thread may still be running:
    /// dropped with the next grace period.
    buried: Vec<Owner>,
    /// Records a grace period showed nobody uses: reusable, with their slots.
    free: Vec<usize>,
    /// When a grace period is worth trying again after one could not complete (which
    /// costs up to 100 ms): by time, not by count.
    retry: grace::Retry,
}

/// How near its probe a slot is placed: x86_64 within rel32 (±2 GiB) so RIP-relative
/// operands can be relocated; aarch64 within `b` range (±128 MiB) so it can jump back.
#[cfg(target_arch = "aarch64")]
pub(crate) const NEAR: usize = 128 << 20;
#[cfg(target_arch = "x86_64")]
pub(crate) const NEAR: usize = 1 << 31;

impl Slots {
    /// A free slot for a probe at `addr`, near it if possible (see [`NEAR`]):
    /// `(page index, slot address)`. Taken only by [`Slots::commit`].
    pub(crate) fn find(&mut self, addr: usize) -> Result<(usize, usize), Error> {
        use crate::sys::code;
        let ok = |p: usize| p.abs_diff(addr) < NEAR - code::page_size();
        if let Some(i) = self.pages.iter().position(|(p, used)| ok(*p) && *used + SLOT <= code::page_size()) {
            return Ok((i, self.pages[i].0 + self.pages[i].1));
        }
        // Far, if nothing near can be had: boosting and relocation then fall back or refuse.
        let p = code::alloc_exec_page_near(addr, NEAR - code::page_size()).map_or_else(code::alloc_exec_page, Ok)?;
        self.pages.push((p, 0));
        Ok((self.pages.len() - 1, p))
    }

    /// Marks the slot [`Slots::find`] gave as used.
    pub(crate) fn commit(&mut self, page: usize) {
        self.pages[page].1 += SLOT;
    }

    /// A record for a new probe: a reused one if a grace period has shown nobody uses
    /// it any more, else a new one. Probes at one address run in the order of their
    /// chain, so any record will do.
    pub(crate) fn take_record(&mut self) -> Result<usize, Error> {
        if self.free.is_empty() && self.retired.len() >= RECLAIM_BATCH && self.retry.due() {
            self.reclaim();
        }
        if let Some(i) = self.free.pop() {
            return Ok(i);
        }
        let index = USED.load(Ordering::Relaxed);
        grow(index)?;
        Ok(index) // published by `publish` once it is filled in
    }

    /// Gives back a record `take_record` gave that was never reachable.
    pub(crate) fn untake(&mut self, index: usize) {
        if index < USED.load(Ordering::Relaxed) {
            self.free.push(index);
        }
    }

    /// Retires record `index` (it may have been reachable): reused after a grace period.
    pub(crate) fn retire(&mut self, index: usize) {
        self.retired.push(index);
    }

    /// Keeps an unregistered probe's handlers until a grace period (they may be running).
    pub(crate) fn bury(&mut self, owners: impl IntoIterator<Item = Owner>) {
        self.buried.extend(owners);
    }

    /// Runs a grace period for the retired records and buried handlers: if it
    /// completes, the records become free and the handlers are dropped (here, under
    /// the registry lock: a handler's captured state must not register or unregister
    /// probes when dropped). Whether it completed, or there was nothing to wait for.
    pub(crate) fn reclaim(&mut self) -> bool {
        if self.retired.is_empty() && self.buried.is_empty() {
            return true;
        }
        let slots: Vec<(usize, usize)> =
            self.retired.iter().map(|i| record(*i).slot.load(Ordering::Relaxed)).filter(|s| *s != 0).map(|s| (s, s + SLOT)).collect();
        if !self.retry.quiescent(&slots) {
            return false;
        }
        self.free.append(&mut self.retired);
        self.buried.clear();
        true
    }
}

/// How many records were ever taken, are retired (waiting for a grace period) and
/// free for reuse: `(taken, retired, free)`.
pub(crate) fn counts() -> (usize, usize, usize) {
    let reg = lock();
    (USED.load(Ordering::Relaxed), reg.retired.len(), reg.free.len())
}

/// Makes record `index` (filled in) reachable by index: raises [`used`] past it.
pub(crate) fn publish(index: usize) {
    if index >= USED.load(Ordering::Relaxed) {
        USED.store(index + 1, Ordering::Release);
    }
}

/// The record a link names (an index + 1, as chains and the address table hold them; 0
/// names none).
#[inline(always)]
fn linked(link: u32) -> Option<&'static Record> {
    (link as usize).checked_sub(1).map(record)
}

/// The records linked from `first` (an index + 1) on.
#[inline(always)]
fn chain_from(first: u32) -> impl Iterator<Item = &'static Record> {
    chain_from_record(linked(first))
}

/// The records linked from `first` on.
#[inline(always)]
fn chain_from_record(first: Option<&'static Record>) -> Chain {
    Chain { first, last: None }
}

/// The records of a chain. Unlike `std::iter::successors`, it reads a record's link
/// only when asked for the record after it: the hit paths mostly take the first
/// record alone, and would otherwise pay for the load of the next one's chunk.
struct Chain {
    first: Option<&'static Record>,
    /// The record given last, if any.
    last: Option<&'static Record>,
}

impl Iterator for Chain {
    type Item = &'static Record;

    #[inline(always)]
    fn next(&mut self) -> Option<&'static Record> {
        let e = match self.last {
            None => self.first.take()?,
            Some(l) => linked(l.chain.load(Ordering::Acquire))?,
        };
        self.last = Some(e);
        Some(e)
    }
}

/// The records linked at `addr` (armed or not), in registration order. Lock-free, for
/// the hit paths: through the address's [`sole()`] hint when it names its record, else
/// the address table.
#[inline(always)]
pub(crate) fn linked_at(addr: usize) -> impl Iterator<Item = &'static Record> {
    chain_from_record(sole(addr).or_else(|| linked(ADDRS.head(addr))))
}

/// The records armed at `addr`, in registration order (breakpoint probes; sites use
/// their own filter).
#[inline(always)]
pub(crate) fn armed_at(addr: usize) -> impl Iterator<Item = &'static Record> {
    linked_at(addr).filter(move |e| e.addr.load(Ordering::Acquire) == addr)
}

pub(crate) use addrmap::{ADDRS, REDIRECTS, TRAPS};

/// Disarms every record armed at `at` in place, writing nothing: their breakpoint or
/// site call is not in the text any more (the code was unloaded, maybe loaded again
/// at the same address), so there is nothing to restore and nothing to share.
pub(crate) fn disarm_in_place(at: usize) {
    for o in armed_at(at) {
        o.addr.store(0, Ordering::Release);
    }
}

/// Whether a probe other than `e` is armed at `at` (they share its breakpoint or site).
pub(crate) fn others_armed(e: &Record, at: usize) -> bool {
    armed_at(at).any(|o| !std::ptr::eq(o, e))
}

/// Appends record `index` to the chain of its address, which therefore runs in
/// registration order. Under the registry lock.
pub(crate) fn link(index: usize) -> Result<(), Error> {
    let e = record(index);
    let target = e.target.load(Ordering::Relaxed);
    e.chain.store(0, Ordering::Relaxed);
    let me = index as u32 + 1;
    match chain_from(ADDRS.head(target)).last() {
        Some(tail) => tail.chain.store(me, Ordering::Release),
        None => ADDRS.set(target, me)?,
    }
    refresh_sole(target);
    Ok(())
}

/// Takes record `index` out of its address's chain. Its own link stays, for a hit
/// walking through it (the record is reused only after a grace period). Under the
/// registry lock.
pub(crate) fn unlink(index: usize) {
    let target = record(index).target.load(Ordering::Relaxed);
    let (me, next) = (index as u32 + 1, record(index).chain.load(Ordering::Relaxed));
    let head = ADDRS.head(target);
    if head == me {
        // The address has an entry (its head is `me`): this cannot fail.
        let _ = ADDRS.set(target, next);
    } else if let Some(before) = chain_from(head).find(|e| e.chain.load(Ordering::Relaxed) == me) {
        before.chain.store(next, Ordering::Release);
    }
    refresh_sole(target);
}

/// What the blacklist (the crate's top layer, which knows every mechanism's hit path)
/// says of an address: the name of the code it is in, if probes are refused there.
/// Set before `main` through [`set_blacklist`], so that no mechanism depends on it.
static BLACKLIST: std::sync::OnceLock<fn(usize) -> Option<&'static str>> = std::sync::OnceLock::new();

/// See [`BLACKLIST`].
pub(crate) fn set_blacklist(f: fn(usize) -> Option<&'static str>) {
    let _ = BLACKLIST.set(f);
}

/// Why probes are refused at `addr`, if they are (see [`BLACKLIST`]).
pub(crate) fn blacklisted(addr: usize) -> Option<&'static str> {
    BLACKLIST.get().and_then(|f| f(addr))
}

/// Calls a handler; `extern "C"` so that a panic aborts instead of unwinding out of
/// the signal handler or trampoline.
pub(crate) extern "C" fn call_handler(h: usize, ctx: usize, regs: &mut PtRegs) {
    // SAFETY: `h` was stored from a `Call` at registration, with its context `ctx`.
    let h = unsafe { std::mem::transmute::<usize, Call>(h) };
    h(regs, ctx)
}

/// Marks this thread as running a handler (or not); returns what it was. Probes hit
/// while it is set count as missed and run no handler.
pub(crate) fn set_active(on: bool) -> bool {
    grace::with_thread(|t| {
        // Recorded first, as `site::enter_site` does: a grace period samples recorded
        // threads only, and a thread may reach a return's dispatcher before any other
        // hit path (in a child made by `fork` inside a probed call, the forking thread
        // is recorded no more).
        if on {
            t.shard();
        }
        t.active.replace(on)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Indices of the records `it` yields.
    fn indices(it: impl Iterator<Item = &'static Record>) -> Vec<usize> {
        it.map(index_of).collect()
    }

    /// The index of record `e`.
    fn index_of(e: &Record) -> usize {
        records().find(|(_, r)| std::ptr::eq(*r, e)).expect("a record").0
    }

    /// A record linked at `addr`, as registration links one.
    fn link_new(reg: &mut Slots, addr: usize) -> usize {
        let i = reg.take_record().unwrap();
        record(i).target.store(addr, Ordering::Relaxed);
        publish(i);
        link(i).unwrap();
        i
    }

    #[test]
    fn the_sole_hint_names_an_address_s_only_record_and_walks_stay_its_chain() {
        // Addresses no probe uses (data), of one hint entry.
        static DATA: [u8; 16 * SOLE_LEN + 16] = [0; 16 * SOLE_LEN + 16];
        let addr = (DATA.as_ptr() as usize).next_multiple_of(16);
        let other = addr + 16 * SOLE_LEN;
        assert!(std::ptr::eq(sole_entry(addr), sole_entry(other)));
        let mut reg = lock();
        let a = link_new(&mut reg, addr);
        assert_eq!(sole(addr).map(index_of), Some(a), "the only record");
        assert_eq!(indices(linked_at(addr)), [a]);
        let b = link_new(&mut reg, addr);
        assert_eq!(sole(addr).map(index_of), None, "two records: no hint");
        assert_eq!(indices(linked_at(addr)), [a, b]);
        unlink(a);
        assert_eq!(sole(addr).map(index_of), Some(b));
        assert_eq!(indices(linked_at(addr)), [b]);
        // A reader that took the hint to `a` before walks on from it (its link stays).
        assert_eq!(indices(chain_from_record(Some(record(a)))), [a, b]);
        // Another address of the same entry goes through the table while `addr` holds it.
        let c = link_new(&mut reg, other);
        assert_eq!(sole(addr).map(index_of), Some(b));
        assert_eq!(sole(other).map(index_of), None);
        assert_eq!(indices(linked_at(other)), [c]);
        // Once `addr` gives it up (two records), the next change at `other` takes it,
        // and keeps it when `addr` has one record again.
        let d = link_new(&mut reg, addr);
        assert_eq!(sole(addr).map(index_of), None);
        let e = link_new(&mut reg, other);
        unlink(e);
        assert_eq!(sole(other).map(index_of), Some(c));
        unlink(d);
        assert_eq!(sole(addr).map(index_of), None);
        assert_eq!(indices(linked_at(addr)), [b]);
        assert_eq!(indices(linked_at(other)), [c]);
        // A reader pairing `addr` with `c` (an entry rewritten under it) does not take
        // `c`, whose target is another address.
        sole_entry(addr).addr.store(addr, Ordering::Release);
        assert!(std::ptr::eq(sole_entry(addr).record.load(Ordering::Relaxed), record(c)));
        assert_eq!(sole(addr).map(index_of), None);
        assert_eq!(indices(linked_at(addr)), [b]);
        for i in [b, c] {
            unlink(i);
        }
        assert!(linked_at(addr).next().is_none() && linked_at(other).next().is_none());
        // A record with a post handler is never named (the site dispatcher's short path
        // runs pre handlers only), but is found through the table.
        let f = reg.take_record().unwrap();
        record(f).target.store(addr, Ordering::Relaxed);
        record(f).post.store(empty_handler as *const () as usize, Ordering::Relaxed);
        publish(f);
        link(f).unwrap();
        assert_eq!(sole(addr).map(index_of), None, "a post handler: no hint");
        assert_eq!(indices(linked_at(addr)), [f]);
        unlink(f);
        record(f).post.store(0, Ordering::Relaxed);
        for i in [a, b, c, d, e, f] {
            reg.retire(i);
        }
    }

    fn empty_handler(_: &mut PtRegs, _: usize) {}

    #[test]
    fn a_record_s_counters_are_found_from_its_address() {
        let reg = lock(); // chunks grow under the registry lock
        grow(0).expect("the first chunk");
        drop(reg);
        let c = chunk(0).expect("the first chunk");
        for (g, group) in c.groups.iter().enumerate() {
            assert_eq!((group as *const Group).addr() % align_of::<Group>(), 0, "group {g} starts at a multiple of its alignment");
            for i in 0..GROUP {
                for s in 0..HIT_SHARDS {
                    assert_eq!(counter(&group.records[i], s), &group.hits[s][i] as *const AtomicU64, "group {g}, record {i}, shard {s}");
                }
            }
        }
        assert!(std::ptr::eq(record(GROUP + 1), &c.groups[1].records[1]), "record GROUP + 1 is the second of the second group");
    }

    #[test]
    fn a_site_hit_is_counted_in_the_thread_s_counter_and_reset() {
        let mut reg = lock();
        let i = reg.take_record().unwrap();
        let e = record(i);
        let shard = grace::with_thread(|t| t.shard());
        count_site_hit(shard, e);
        count_site_hit(shard, e);
        // This thread's counter if it has one (the first HIT_SHARDS threads do), else `nhit`.
        let sharded = shard.counter() < HIT_SHARDS;
        assert_eq!((site_hits(i), e.nhit.load(Ordering::Relaxed)), if sharded { (2, 0) } else { (0, 2) });
        reset_site_hits(i);
        e.nhit.store(0, Ordering::Relaxed);
        assert_eq!(site_hits(i), 0);
        reg.untake(i);
    }
}
