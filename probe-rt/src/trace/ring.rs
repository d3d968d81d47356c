//! One thread's buffers: the ring of finished calls and the stack of calls in flight.
//!
//! A [`Ring`] belongs to one thread, which claims it at its first traced call and is
//! its only writer: the hit paths run with probekit's reentrancy guard set, so a
//! thread's handlers never interrupt each other (a probe hit inside one is missed).
//! Everything in it is an atomic, so a reader on another thread (a snapshot) never
//! races in the language's sense; it checks what it copied against the writer's
//! counters as a seqlock reader does, and keeps only records no write overlapped.
//!
//! The ring holds one record per *finished* call (function, depth, enter and exit
//! time, arguments, return value), written when the call returns or is found
//! abandoned. A record is whole or absent, so overwriting the oldest, or dropping
//! the newest when full, never leaves a begin without its end.

use crate::Error;
use std::alloc::{alloc_zeroed, Layout};
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// What a full ring does with the next record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Full {
    /// Overwrite the oldest record (a flight recorder: the last calls survive).
    #[default]
    Overwrite,
    /// Drop the new record (the first calls survive).
    Drop,
}

/// The most arguments a call's record keeps (the integer argument registers of
/// AAPCS64; System V has 6, and `arg(6..)` reads as 0 there).
pub const MAX_ARGS: usize = 8;

/// Flags of a record (the top byte of its first word).
pub(super) const UNWOUND: u64 = 1;
/// The record carries a return value.
pub(super) const HAS_RET: u64 = 2;

/// A record as the ring keeps it, decoded (see `Ring::emit`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Raw {
    pub(super) func: u32,
    pub(super) depth: u32,
    pub(super) flags: u64,
    pub(super) enter: u64,
    pub(super) exit: u64,
    pub(super) args: [u64; MAX_ARGS],
    pub(super) ret: u64,
}

/// `n` zeroed atomics, allocated with `calloc` semantics: large buffers come from
/// fresh anonymous pages, which the kernel commits only when first written, so rings
/// for threads that never trace cost address space, not memory. `OutOfMemory` (the
/// bytes asked for, `usize::MAX` if they overflow) if the allocator refuses.
pub(super) fn zeroed(n: usize) -> Result<Box<[AtomicU64]>, Error> {
    if n == 0 {
        return Ok(Box::new([]));
    }
    let layout = Layout::array::<AtomicU64>(n).map_err(|_| Error::OutOfMemory { bytes: usize::MAX })?;
    // SAFETY: the layout has a non-zero size (n > 0).
    let p = unsafe { alloc_zeroed(layout) } as *mut AtomicU64;
    if p.is_null() {
        return Err(Error::OutOfMemory { bytes: layout.size() });
    }
    // SAFETY: `p` is a fresh allocation of `n` `AtomicU64`s from the global allocator
    // with their array layout, which is what a `Box<[AtomicU64]>` frees; all-zero bytes
    // are a valid `AtomicU64` (0).
    Ok(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) })
}

/// One thread's ring of finished calls and stack of calls in flight.
pub(super) struct Ring {
    /// The claiming thread's serial and thread id (see `owner_word`), 0 while free.
    pub(super) owner: AtomicU64,
    /// Set once `tid` and `name` are written (a reader skips the ring before).
    pub(super) ready: AtomicBool,
    /// Odd while the ring passes from an exited thread to a new one (see
    /// [`Ring::take_over`]): a reader keeps what it read only if this did not change.
    /// Even, it names the ring's owner (it only grows).
    pub(super) version: AtomicU64,
    /// The number of the owner's first record: records before it were an exited
    /// thread's.
    pub(super) start: AtomicU64,
    pub(super) tid: AtomicI32,
    /// The thread's name (`PR_GET_NAME`, 15 bytes and a NUL), as two words.
    pub(super) name: [AtomicU64; 2],

    /// Records claimed for writing (the next is number `claim`): a reader discards
    /// any record a claim after its copy may have overwritten.
    claim: AtomicU64,
    /// Records written (published with Release).
    pub(super) head: AtomicU64,
    /// Records consumed by `drain` (or given up by a take-over): below it, the writer
    /// may overwrite (`Full::Drop` never writes past `tail + capacity`). Only moves
    /// forward: by a drain's compare-and-swap from the tail it read, or a take-over's
    /// `fetch_max` (see [`Ring::take_over`]).
    pub(super) tail: AtomicU64,
    /// Records dropped because the ring was full (`Full::Drop`).
    pub(super) dropped: AtomicU64,
    /// Calls not traced because the stack of calls in flight was full.
    pub(super) too_deep: AtomicU64,
    records: Box<[AtomicU64]>,
    /// Capacity in records minus 1 (a power of two minus 1).
    mask: u64,
    /// Words per record: 3 + args (+ 1 with return values).
    stride: usize,
    nargs: usize,
    full: Full,

    /// Calls in flight, oldest first, `FRAME` words each (a fixed stride: the hit
    /// path finds a frame with a shift); only the owner touches them.
    stack: Box<[AtomicU64]>,
    /// Their arguments, `nargs` words per frame.
    stack_args: Box<[AtomicU64]>,
    depth: AtomicUsize,
    max_depth: usize,
}

/// Words of a stack frame (its arguments are apart, in `stack_args`): function id,
/// stack pointer, the address of the call's per-call data, enter time.
const FRAME: usize = 4;

/// What the hit path reads of a frame of the stack.
pub(super) struct Frame {
    pub(super) sp: usize,
    pub(super) data: usize,
}

impl Ring {
    /// A free ring of `capacity` records (a power of two) and a stack `max_depth` deep;
    /// `OutOfMemory` if its buffers cannot be allocated (or their size overflows).
    pub(super) fn new(capacity: usize, max_depth: usize, nargs: usize, retval: bool, full: Full) -> Result<Ring, Error> {
        debug_assert!(capacity.is_power_of_two() && nargs <= MAX_ARGS);
        let stride = 3 + nargs + retval as usize;
        let words = |a: usize, b: usize| a.checked_mul(b).ok_or(Error::OutOfMemory { bytes: usize::MAX });
        Ok(Ring {
            owner: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            version: AtomicU64::new(0),
            start: AtomicU64::new(0),
            tid: AtomicI32::new(0),
            name: [AtomicU64::new(0), AtomicU64::new(0)],
            claim: AtomicU64::new(0),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            too_deep: AtomicU64::new(0),
            records: zeroed(words(capacity, stride)?)?,
            mask: capacity as u64 - 1,
            stride,
            nargs,
            full,
            stack: zeroed(words(max_depth, FRAME)?)?,
            stack_args: zeroed(words(max_depth, nargs)?)?,
            depth: AtomicUsize::new(0),
            max_depth,
        })
    }

    /// Takes the ring over for the thread `me` from `from`, a thread that exited
    /// (tells the caller whether it won the ring; the caller then writes its `tid` and
    /// `name` and calls [`Ring::handed_over`]). The records the exited thread left
    /// unread are given up: returned with the win is the number of its calls no reader
    /// will see, those records (overwritten or not) and the calls it dropped or found
    /// too deep, which its ring no longer counts, and its calls in flight, which never
    /// returned (it exited inside them, without a panic unwinding them: `pthread_exit`,
    /// a `longjmp` out of them before it ended) and are dropped.
    pub(super) fn take_over(&self, from: u64, me: u64) -> Option<u64> {
        self.owner.compare_exchange(from, me, Ordering::AcqRel, Ordering::Relaxed).ok()?;
        // Seqlock writer: odd, then the changes, then even (`handed_over`). Made odd
        // rather than incremented: a child made by `fork` while another thread was
        // between the two keeps an odd version with no writer to end it, and the next
        // take-over there must not turn it even while it writes. Load and store: the
        // winner of the compare-and-swap above is the only writer.
        self.version.store(self.version.load(Ordering::Relaxed) | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let head = self.head.load(Ordering::Relaxed);
        let start = self.start.swap(head, Ordering::Relaxed);
        // Consumed, as far as `Full::Drop` is concerned. The tail it replaces, read in
        // the same step, is where drains stopped: a drain consumes with a
        // compare-and-swap from the tail it read and keeps nothing if this moved it
        // first, so each record is counted by one of the two, never both.
        let tail = self.tail.fetch_max(head, Ordering::AcqRel).max(start);
        // Not clipped to the capacity: records overwritten before anyone read them were
        // counted by no reader yet (a snapshot counts them as `overwritten` only in the
        // thread's trace, which no later snapshot has).
        let unread = head.saturating_sub(tail);
        let in_flight = self.depth.swap(0, Ordering::Relaxed) as u64;
        // The new owner counts from 0; the exited thread's counts go to the caller, or
        // `calls() + lost()` would forget them.
        let uncounted = self.dropped.swap(0, Ordering::Relaxed) + self.too_deep.swap(0, Ordering::Relaxed) + in_flight;
        Some(unread + uncounted)
    }

    /// Ends a [`Ring::take_over`]: the new owner's `tid` and `name` are written.
    pub(super) fn handed_over(&self) {
        // Odd since `take_over`: the next even number (versions only grow, and name
        // their owner in `Snapshot::append`).
        self.version.store(self.version.load(Ordering::Relaxed) + 1, Ordering::Release);
    }

    /// Writes the calling thread's id and name (its owner's, once it claimed it).
    pub(super) fn name_thread(&self) {
        self.tid.store(crate::grace::with_thread(|t| t.tid()), Ordering::Relaxed);
        let mut name = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes (with the NUL) into the buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr() as libc::c_ulong, 0, 0, 0) };
        for (word, bytes) in self.name.iter().zip(name.chunks_exact(8)) {
            word.store(u64::from_ne_bytes(bytes.try_into().unwrap_or_default()), Ordering::Relaxed);
        }
    }

    /// Capacity in records.
    pub(super) fn capacity(&self) -> u64 {
        self.mask + 1
    }

    /// Calls in flight on the owner's stack.
    pub(super) fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// The words of frame `i`.
    #[inline(always)]
    fn words(&self, i: usize) -> &[AtomicU64; FRAME] {
        &self.stack.as_chunks::<FRAME>().0[i]
    }

    /// The arguments of frame `i`.
    #[inline(always)]
    fn saved_args(&self, i: usize) -> &[AtomicU64] {
        &self.stack_args[i * self.nargs..(i + 1) * self.nargs]
    }

    /// Frame `i` of the stack (owner only).
    #[inline(always)]
    pub(super) fn frame(&self, i: usize) -> Frame {
        let w = self.words(i);
        Frame { sp: w[1].load(Ordering::Relaxed) as usize, data: w[2].load(Ordering::Relaxed) as usize }
    }

    /// The depth the stack would have with its top frames popped while `gone(frame)`
    /// says so (owner only; nothing popped).
    #[inline(always)]
    pub(super) fn depth_without(&self, gone: impl Fn(&Frame) -> bool) -> usize {
        let mut depth = self.depth();
        while depth > 0 && gone(&self.frame(depth - 1)) {
            depth -= 1;
        }
        depth
    }

    /// Pushes a call entered at `enter` (owner only); its depth, or `None` (counted)
    /// if the stack is full.
    #[inline(always)]
    pub(super) fn push(&self, func: u32, sp: usize, data: usize, enter: u64, args: impl Fn(usize) -> u64) -> Option<usize> {
        let d = self.depth();
        if d == self.max_depth {
            self.too_deep.store(self.too_deep.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return None;
        }
        let w = self.words(d);
        w[0].store(func as u64, Ordering::Relaxed);
        w[1].store(sp as u64, Ordering::Relaxed);
        w[2].store(data as u64, Ordering::Relaxed);
        w[3].store(enter, Ordering::Relaxed);
        if self.nargs > 0 {
            for (a, word) in self.saved_args(d).iter().enumerate() {
                word.store(args(a), Ordering::Relaxed);
            }
        }
        self.depth.store(d + 1, Ordering::Relaxed);
        Some(d)
    }

    /// Pops the top frame (owner only) and records its call as ended at `exit`:
    /// returned with `ret`, or abandoned (`None`: a panic or `longjmp` left it).
    #[inline(always)]
    pub(super) fn pop(&self, exit: u64, ret: Option<u64>) {
        let d = self.depth() - 1;
        self.depth.store(d, Ordering::Relaxed);
        let w = self.words(d);
        let flags = match ret {
            Some(_) => HAS_RET,
            None => UNWOUND,
        };
        let load = |w: &AtomicU64| w.load(Ordering::Relaxed);
        self.emit(load(&w[0]) as u32, d as u32, flags, load(&w[3]), exit, || self.saved_args(d).iter().map(load), ret.unwrap_or(0));
    }

    /// Pops the frames above `depth` as abandoned at `exit` (owner only), if there are
    /// any: the test inline, the pops out of the hit path's line, which rarely needs
    /// them (after a panic or `longjmp`).
    #[inline(always)]
    pub(super) fn unwind_to(&self, depth: usize, exit: u64) {
        if self.depth() > depth {
            self.pop_gone(depth, exit);
        }
    }

    /// [`Ring::unwind_to`]'s pops.
    #[cold]
    #[inline(never)]
    fn pop_gone(&self, depth: usize, exit: u64) {
        while self.depth() > depth {
            self.pop(exit, None);
        }
    }

    /// Appends a record (owner only): a claim announced before the words are
    /// written (so a reader can tell which records a write may have overlapped), the
    /// words, then the head published.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn emit<A: Iterator<Item = u64>>(&self, func: u32, depth: u32, flags: u64, enter: u64, exit: u64, args: impl FnOnce() -> A, ret: u64) {
        let h = self.head.load(Ordering::Relaxed);
        if self.full == Full::Drop && h - self.tail.load(Ordering::Acquire) > self.mask {
            self.dropped.store(self.dropped.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return;
        }
        self.claim.store(h + 1, Ordering::Relaxed);
        // Orders the claim before the writes below for a reader whose Acquire fence
        // follows its reads of these words (the seqlock writer's fence).
        fence(Ordering::Release);
        let base = (h & self.mask) as usize * self.stride;
        // `stride` = 3 + nargs (+ 1 with the return value): the fixed words, then the rest.
        let (r, rest) = self.records[base..base + self.stride].split_at(3);
        r[0].store(func as u64 | (depth as u64 & 0xff_ffff) << 32 | flags << 56, Ordering::Relaxed);
        r[1].store(enter, Ordering::Relaxed);
        r[2].store(exit, Ordering::Relaxed);
        let (saved, retval) = rest.split_at(self.nargs);
        if self.nargs > 0 {
            for (word, a) in saved.iter().zip(args()) {
                word.store(a, Ordering::Relaxed);
            }
        }
        if let Some(word) = retval.first() {
            word.store(ret, Ordering::Relaxed);
        }
        self.head.store(h + 1, Ordering::Release);
    }

    /// Copies the records written since `tail` that are still whole, oldest first
    /// (any thread). Returns them with the number of the first one copied (records
    /// `tail..first` were overwritten before they could be read).
    pub(super) fn read(&self, tail: u64) -> (Vec<Raw>, u64) {
        let head = self.head.load(Ordering::Acquire);
        // At most `head`: `tail` may come from a take-over this load of `head` does not
        // see yet (the copy is then discarded by the version check, but must not panic
        // or allocate from an underflow first).
        let start = tail.max(head.saturating_sub(self.capacity())).min(head);
        let mut out = Vec::with_capacity((head - start) as usize);
        for n in start..head {
            let base = (n & self.mask) as usize * self.stride;
            let r = &self.records[base..base + self.stride];
            let w0 = r[0].load(Ordering::Relaxed);
            let mut args = [0; MAX_ARGS];
            for (a, v) in args.iter_mut().enumerate().take(self.nargs) {
                *v = r[3 + a].load(Ordering::Relaxed);
            }
            let ret = if self.stride > 3 + self.nargs { r[3 + self.nargs].load(Ordering::Relaxed) } else { 0 };
            out.push(Raw {
                func: w0 as u32,
                depth: (w0 >> 32) as u32 & 0xff_ffff,
                flags: w0 >> 56,
                enter: r[1].load(Ordering::Relaxed),
                exit: r[2].load(Ordering::Relaxed),
                args,
                ret,
            });
        }
        // Pairs with the writer's Release fence: a claim that overwrote a word read
        // above is seen here.
        fence(Ordering::Acquire);
        let claim = self.claim.load(Ordering::Relaxed);
        let first = first_whole(start, head, claim, self.capacity());
        out.drain(..(first - start) as usize);
        (out, first)
    }
}

/// The first of records `start..head`, copied by a reader, that no write overlapped,
/// given the writer's `claim` after the copy (`head` if none is).
fn first_whole(start: u64, head: u64, claim: u64, capacity: u64) -> u64 {
    // Record `n` is overwritten by the write of record `n + capacity`, claimed as
    // `n + capacity + 1`: whole if that claim was not made yet. A writer that went a
    // whole ring past `head` meanwhile overwrote every record copied.
    start.max(claim.saturating_sub(capacity)).min(head)
}

#[cfg(test)]
mod tests {
    use super::first_whole;

    #[test]
    fn records_a_later_claim_overwrote_are_dropped() {
        // Ring of 4, records 6..10 copied (head 10).
        assert_eq!(first_whole(6, 10, 10, 4), 6, "no write since: all whole");
        assert_eq!(first_whole(6, 10, 11, 4), 7, "record 10 claimed: record 6 overwritten");
        assert_eq!(first_whole(6, 10, 14, 4), 10, "records 10..14 claimed: every copy overwritten");
        assert_eq!(first_whole(6, 10, 70, 4), 10, "a writer far past head: nothing whole, and no index past head");
        assert_eq!(first_whole(0, 2, 2, 4), 0);
    }
}
