//! The bounds of the stack a walk reads: the mapping that holds the stack pointer it
//! starts from, found in `/proc/self/maps` with raw system calls and a buffer on the
//! stack (async-signal-safe: `open`, `read` and `close` are), and kept per thread.
//!
//! Every word a walk reads (saved registers, return addresses, frame records, a
//! signal frame, a trampoline's frame) must lie in these bounds, so a corrupt frame
//! pointer or a wrong unwind rule ends the walk instead of faulting.

use std::cell::Cell;

thread_local! {
    /// The mapping this thread's last walk started in: `(start, end)`. A walk from a
    /// stack pointer inside it reuses it: a thread's stack mapping does not shrink
    /// while the thread runs on it (the main thread's grows down, below `start`).
    static LAST: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// The readable range of the stack holding `sp`, from `sp` to the end of its mapping.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stack {
    lo: usize,
    hi: usize,
}

impl Stack {
    /// The part above `sp` of the stack the calling thread runs on, or `None` if `sp`
    /// is not in that stack's mapping (a context of another thread, or of another
    /// stack: such memory could be unmapped while it is read).
    pub(super) fn of(sp: usize) -> Option<Stack> {
        let here = &sp as *const usize as usize;
        let (mut start, mut end) = LAST.get();
        if !(start <= here && here < end) {
            (start, end) = mapping_of(here)?;
            LAST.set((start, end));
        }
        (start <= sp && sp < end).then_some(Stack { lo: sp, hi: end })
    }

    /// Whether `[at, at + len)` lies in the stack.
    pub(super) fn holds(&self, at: usize, len: usize) -> bool {
        at >= self.lo && at.checked_add(len).is_some_and(|e| e <= self.hi)
    }

    /// The word at `at`, if it lies in the stack and is aligned.
    pub(super) fn word(&self, at: usize) -> Option<usize> {
        if !at.is_multiple_of(std::mem::align_of::<usize>()) || !self.holds(at, std::mem::size_of::<usize>()) {
            return None;
        }
        // SAFETY: `at` is aligned and inside the mapping that holds the thread's stack
        // pointer, readable and writable memory that stays mapped while the thread runs
        // on it.
        Some(unsafe { (at as *const usize).read_volatile() })
    }
}

/// The `(start, end)` of the readable mapping holding `addr`, from `/proc/self/maps`.
fn mapping_of(addr: usize) -> Option<(usize, usize)> {
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut buf = [0u8; 1024];
    // Each line starts `start-end perms `: parsed byte by byte across reads.
    let (mut start, mut end, mut field, mut readable) = (0usize, 0usize, 0u8, false);
    let mut found = None;
    'read: loop {
        // SAFETY: `buf` is ours and `buf.len()` bytes long.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        for &b in &buf[..n as usize] {
            match (field, b) {
                (_, b'\n') => {
                    if field >= 2 && readable && start <= addr && addr < end {
                        found = Some((start, end));
                        break 'read;
                    }
                    (start, end, field, readable) = (0, 0, 0, false);
                }
                (0, b'-') => field = 1,
                (1, b' ') => field = 2,
                (2, b) => {
                    readable = b == b'r';
                    field = 3;
                }
                (0, _) => start = start.wrapping_mul(16).wrapping_add(hex(b)),
                (1, _) => end = end.wrapping_mul(16).wrapping_add(hex(b)),
                _ => {}
            }
        }
    }
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(fd) };
    found
}

fn hex(b: u8) -> usize {
    match b {
        b'0'..=b'9' => (b - b'0') as usize,
        b'a'..=b'f' => (b - b'a' + 10) as usize,
        b'A'..=b'F' => (b - b'A' + 10) as usize,
        _ => 0,
    }
}
