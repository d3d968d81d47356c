//! A lock-free, allocation-free event buffer: handlers push, the program drains.
//!
//! Handlers run in a signal handler and must not print, allocate or lock; they push a
//! small `Copy` event here and `main` drains and prints it. A bounded MPMC queue
//! (Dmitry Vyukov's design): every cell carries a sequence number telling producers
//! and consumers whose turn it is, so a push or pop is a CAS on a position and two
//! plain accesses, never a wait on another thread. Written here because the crates
//! that have it allocate their buffer at run time, and a `static` buffer is what a
//! handler can reach.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A bounded buffer of `N` events (`N` a power of two), usable as a `static`.
pub struct EventBuffer<T: Copy, const N: usize> {
    cells: [Cell<T>; N],
    push_at: AtomicUsize,
    pop_at: AtomicUsize,
    dropped: AtomicU64,
}

struct Cell<T> {
    /// The cell's sequence number minus its index (so that all-zero is the initial
    /// state and the buffer can be built in a `const fn`): `index + lap * N` when
    /// free for the push of that position, `+ 1` when it holds that push's value.
    seq: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: a cell's value is written by the one producer that won its position and read
// by the one consumer that won it, ordered by the Release/Acquire on `seq`; T: Send.
unsafe impl<T: Copy + Send, const N: usize> Sync for EventBuffer<T, N> {}

impl<T: Copy, const N: usize> EventBuffer<T, N> {
    const MASK: usize = {
        assert!(N.is_power_of_two(), "EventBuffer size must be a power of two");
        N - 1
    };

    /// An empty buffer.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        let _ = Self::MASK;
        EventBuffer {
            cells: [const { Cell { seq: AtomicUsize::new(0), value: UnsafeCell::new(MaybeUninit::uninit()) } }; N],
            push_at: AtomicUsize::new(0),
            pop_at: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn seq(&self, i: usize) -> usize {
        self.cells[i].seq.load(Ordering::Acquire).wrapping_add(i)
    }

    fn set_seq(&self, i: usize, seq: usize) {
        self.cells[i].seq.store(seq.wrapping_sub(i), Ordering::Release);
    }

    /// Adds an event; async-signal-safe. Returns `false` (and counts it in
    /// [`dropped`](Self::dropped)) when the buffer is full.
    pub fn push(&self, event: T) -> bool {
        let mut pos = self.push_at.load(Ordering::Relaxed);
        loop {
            let i = pos & Self::MASK;
            let dif = self.seq(i) as isize - pos as isize;
            if dif == 0 {
                match self.push_at.compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => {
                        // SAFETY: winning the CAS for `pos` gives this producer the cell
                        // until it publishes it with the sequence store below.
                        unsafe { (*self.cells[i].value.get()).write(event) };
                        self.set_seq(i, pos + 1);
                        return true;
                    }
                    Err(now) => pos = now,
                }
            } else if dif < 0 {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            } else {
                pos = self.push_at.load(Ordering::Relaxed);
            }
        }
    }

    /// Takes the oldest event, if any.
    pub fn pop(&self) -> Option<T> {
        let mut pos = self.pop_at.load(Ordering::Relaxed);
        loop {
            let i = pos & Self::MASK;
            let dif = self.seq(i) as isize - (pos + 1) as isize;
            if dif == 0 {
                match self.pop_at.compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => {
                        // SAFETY: the cell's sequence says its push published a value
                        // (Acquire above), and winning the CAS makes it this consumer's.
                        let v = unsafe { (*self.cells[i].value.get()).assume_init() };
                        self.set_seq(i, pos + N);
                        return Some(v);
                    }
                    Err(now) => pos = now,
                }
            } else if dif < 0 {
                return None;
            } else {
                pos = self.pop_at.load(Ordering::Relaxed);
            }
        }
    }

    /// Takes every event there is now, oldest first.
    pub fn drain(&self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(|| self.pop())
    }

    /// Events refused because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_full_and_wraparound() {
        let b: EventBuffer<u32, 4> = EventBuffer::new();
        for round in 0..3 {
            assert!((0..4).all(|i| b.push(round * 10 + i)));
            assert!(!b.push(99));
            assert_eq!(b.drain().collect::<Vec<_>>(), (0..4).map(|i| round * 10 + i).collect::<Vec<_>>());
        }
        assert_eq!(b.dropped(), 3);
    }

    #[test]
    fn many_producers_one_consumer_lose_nothing() {
        static B: EventBuffer<u64, 1024> = EventBuffer::new();
        let producers: Vec<_> = (0..4u64).map(|t| std::thread::spawn(move || (0..10_000u64).filter(|i| B.push(t << 32 | i)).count() as u64)).collect();
        let mut got = Vec::new();
        while got.len() < 40_000 - B.dropped() as usize || producers.iter().any(|p| !p.is_finished()) {
            got.extend(B.drain());
        }
        let pushed: u64 = producers.into_iter().map(|p| p.join().unwrap()).sum();
        got.extend(B.drain());
        assert_eq!(got.len() as u64, pushed);
        assert_eq!(pushed + B.dropped(), 40_000);
        // Per producer, events come out in the order they went in.
        for t in 0..4u64 {
            let mine: Vec<u64> = got.iter().filter(|v| *v >> 32 == t).map(|v| v & 0xffff_ffff).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
