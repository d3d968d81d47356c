//! The thread table: an entry per thread that has entered a hit path, each its
//! thread's mailbox for the samples of a grace period (see the parent module's docs,
//! "Which threads").

use super::syscall::{raw_syscall6, thread_alive};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// One entry of the thread table: its owner, and the mailbox of the samples that ask
/// through it. All zero is a free entry with no request (a chunk comes zeroed).
pub(super) struct Entry {
    /// The owner's thread id (low 32 bits; 0: free) and a generation (high 32 bits)
    /// that every change of owner bumps, so that a compare-exchange taking the entry
    /// back from an exited thread fails if it changed hands meanwhile.
    pub(super) owner: AtomicU64,
    /// The sample asked through this entry: its round (high 32 bits) and the id of the
    /// thread asked (low 32 bits); 0: none yet.
    pub(super) ask: AtomicU64,
    /// The `ask` the answer below answers (published last).
    pub(super) answered: AtomicU64,
    /// The pc the sampled thread was at.
    pub(super) pc: AtomicUsize,
    /// How deep the sampled thread was in hit paths (`depth` + `active`).
    pub(super) inside: AtomicU32,
    /// The breakpoint its SIGTRAP handler was resolving (0: none).
    pub(super) trap: AtomicUsize,
}

/// Entries per chunk (40 KiB: ten pages).
const CHUNK_BITS: usize = 10;
const CHUNK: usize = 1 << CHUNK_BITS;
/// Chunks at most: 4 Mi entries, the kernel's `PID_MAX_LIMIT` (2^22), so that every
/// thread a process can have at once finds one.
const MAX_CHUNKS: usize = 1 << 12;
const MAX_ENTRIES: usize = CHUNK * MAX_CHUNKS;

type Chunk = [Entry; CHUNK];

/// The chunks mapped so far (null: not yet), by index.
static CHUNKS: [AtomicPtr<Chunk>; MAX_CHUNKS] = [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_CHUNKS];
/// Entries handed out for the first time so far, in index order (which may run ahead of
/// the chunks mapped: an index whose chunk could not be mapped is skipped).
static FRESH: AtomicUsize = AtomicUsize::new(0);
/// Where the next recording thread starts looking for an entry to take back.
static SWEEP: AtomicUsize = AtomicUsize::new(0);
/// How many entries a recording thread looks at to take one back before it takes a new
/// one: enough that a table whose threads come and go stays about as large as the
/// most threads alive at once, few enough that recording costs a few system calls.
const LOOK: usize = 4;
/// A thread found no entry: grace periods list every thread of the process too.
pub(super) static OVERFLOW: AtomicBool = AtomicBool::new(false);

/// Entry `index`, if its chunk is mapped. Lock-free.
pub(super) fn entry(index: usize) -> Option<&'static Entry> {
    let p = CHUNKS.get(index >> CHUNK_BITS)?.load(Ordering::Acquire);
    // SAFETY: a non-null chunk pointer was stored (Release, loaded Acquire) by
    // `map_chunk` from a zero-filled private mapping of a whole `Chunk` (all zero is a
    // valid `Entry`: atomics), never unmapped or written through a non-atomic
    // reference, so a shared reference to it is valid for the rest of the process.
    (!p.is_null()).then(|| unsafe { &(*p)[index & (CHUNK - 1)] })
}

/// Entries handed out so far (an upper bound of the indices in use).
pub(super) fn entries() -> usize {
    FRESH.load(Ordering::Acquire).min(MAX_ENTRIES)
}

/// Maps chunk `c` unless another thread did. Async-signal-safe: raw `mmap`/`munmap`
/// system calls and a compare-exchange (libc's `mmap` is not called: the hit path
/// would then forbid probing it, see `blacklist`).
fn map_chunk(c: usize) -> Option<&'static Chunk> {
    let cell = CHUNKS.get(c)?;
    let mut p = cell.load(Ordering::Acquire);
    if p.is_null() {
        let bytes = std::mem::size_of::<Chunk>();
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as usize;
        let m = raw_syscall6(libc::SYS_mmap, [0, bytes, (libc::PROT_READ | libc::PROT_WRITE) as usize, flags, usize::MAX, 0]);
        // The kernel returns -errno (-4095..=-1) on failure.
        if (-4095..0).contains(&m) {
            return None;
        }
        p = match cell.compare_exchange(std::ptr::null_mut(), m as *mut Chunk, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => m as *mut Chunk,
            Err(other) => {
                // Another thread mapped it first: ours was never shared.
                raw_syscall6(libc::SYS_munmap, [m as usize, bytes, 0, 0, 0, 0]);
                other
            }
        };
    }
    // SAFETY: as in `entry`: a mapped, zero-filled chunk that stays for good.
    Some(unsafe { &*p })
}

/// The owner word that follows `owner` when thread `tid` (0: nobody) takes the entry.
pub(super) fn next_owner(owner: u64, tid: i32) -> u64 {
    ((owner >> 32).wrapping_add(1) << 32) | u64::from(tid as u32)
}

impl Entry {
    /// Takes this entry for thread `tid` if it is free, or its owner has exited (or is
    /// `tid` itself: a thread takes an entry once, so one already holding its id was
    /// left by an exited thread whose id it got). Async-signal-safe.
    pub(super) fn take(&self, tid: i32) -> bool {
        let owner = self.owner.load(Ordering::Acquire);
        let held = owner as u32 as i32;
        if held != 0 && held != tid && thread_alive(held) {
            return false;
        }
        self.owner.compare_exchange(owner, next_owner(owner, tid), Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }
}

/// An entry for thread `tid`: one taken back if one of the [`LOOK`] entries at the
/// sweep cursor is free, else a new one. `None` if the table is full or the kernel
/// refused a new chunk's memory. Async-signal-safe.
pub(super) fn take_entry(tid: i32) -> Option<usize> {
    let n = entries();
    if n > 0 {
        let start = SWEEP.fetch_add(LOOK, Ordering::Relaxed);
        for k in 0..LOOK.min(n) {
            let i = start.wrapping_add(k) % n;
            if entry(i).is_some_and(|e| e.take(tid)) {
                return Some(i);
            }
        }
    }
    loop {
        let i = FRESH.fetch_add(1, Ordering::AcqRel);
        if i >= MAX_ENTRIES {
            return None;
        }
        let chunk = map_chunk(i >> CHUNK_BITS)?;
        // It fails only if a sweeping thread took this (free) entry first.
        if chunk[i & (CHUNK - 1)].take(tid) {
            return Some(i);
        }
    }
}

/// The thread table now (`__private::thread_table`).
pub(crate) fn table_state() -> crate::__private::ThreadTable {
    let n = entries();
    let taken = (0..n).filter_map(entry).filter(|e| e.owner.load(Ordering::Relaxed) as u32 != 0).count();
    crate::__private::ThreadTable { entries: n, taken, fallback: OVERFLOW.load(Ordering::Relaxed) }
}
