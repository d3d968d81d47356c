//! Detour blocks: where they are placed (near the probe: a jump reaches them), and
//! when one may be written again.
//!
//! A block is written once, before its address is optimized, and never changed while
//! a thread may run it. When the address is unoptimized its block is *parked*: a thread
//! that took the jump just before may still be on its first instructions (before the
//! dispatcher tells grace periods it is inside, see `grace`), so the block is reused
//! only for the same address with the same bytes (re-optimizing the probe after a
//! disable, nothing to write), or for anything once a grace period that samples every
//! thread of the process has passed. Blocks are never unmapped.
//!
//! Each written block's unwind rules (`arch::detour::unwind`) are registered with the
//! unwinder when it is written, and deregistered only when it becomes free: while it is
//! parked a thread may still be in it, or unwinding through it.

use crate::arch::detour::BLOCK;
use crate::registry::NEAR;
use crate::sys::code;
use crate::unwind::{Fde, Table, PC};
use crate::NotOptimized;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Parked blocks at which a grace period is tried to make them free.
const RECLAIM_AT: usize = 32;

/// A block that may still be in use: the address it detours and how many bytes of it
/// the detour is (the block's memory holds them).
struct Parked {
    block: usize,
    probe: usize,
    len: usize,
}

/// The detour blocks of the process (under the registry lock, through `optprobe`'s
/// state).
pub(super) struct Blocks {
    /// `(page, bytes handed out)`.
    pages: Vec<(usize, usize)>,
    /// Blocks no thread can be in.
    free: Vec<usize>,
    parked: Vec<Parked>,
    /// The registered unwind rules of every block written and not free again.
    tables: BTreeMap<usize, Table>,
    /// When a grace period for the parked blocks is worth trying again, and how long to
    /// wait after the next failure (it doubles: under qemu-user no grace period over
    /// every thread completes, see `grace::quiescent_every_thread`).
    retry: Option<Instant>,
    backoff: Duration,
}

/// Whether a block at `block` is in jump range of a probe at `addr` (either way).
fn near(block: usize, addr: usize) -> bool {
    block.abs_diff(addr) < NEAR - code::page_size()
}

impl Blocks {
    pub(super) const fn new() -> Blocks {
        Blocks { pages: Vec::new(), free: Vec::new(), parked: Vec::new(), tables: BTreeMap::new(), retry: None, backoff: Duration::from_millis(100) }
    }

    /// A block holding `make(block)`'s bytes for the probe at `addr`, written, with
    /// its unwind rules registered: the address's parked block if its bytes are the same
    /// (nothing written, its rules registered still), else a free or new one near
    /// `addr`. `make` may refuse (the relocation depends on where the block is).
    /// Returns the block and the detour's length.
    pub(super) fn place(&mut self, addr: usize, make: impl Fn(usize) -> Result<(Vec<u8>, Fde), NotOptimized>) -> Result<(usize, usize), NotOptimized> {
        if let Some(k) = self.parked.iter().position(|p| p.probe == addr) {
            let (bytes, _) = make(self.parked[k].block)?;
            let p = &self.parked[k];
            if bytes.len() == p.len && code::read(p.block, p.len).is_some_and(|b| b == bytes) {
                let p = self.parked.swap_remove(k);
                return Ok((p.block, p.len));
            }
        }
        if self.parked.len() >= RECLAIM_AT && !self.free.iter().any(|b| near(*b, addr)) {
            self.reclaim();
        }
        let block = match self.free.iter().position(|b| near(*b, addr)) {
            Some(k) => self.free.swap_remove(k),
            None => self.fresh(addr)?,
        };
        let placed = make(block).and_then(|(bytes, fde)| match code::write_code(block, &bytes) {
            Ok(()) => Ok((bytes, fde)),
            Err(e) => Err(NotOptimized::Write(Box::new(e))),
        });
        match placed {
            Ok((bytes, fde)) => {
                // Before anything can jump to the block (a free block has no rules).
                self.tables.insert(block, Table::register(PC, &[fde]));
                Ok((block, bytes.len()))
            }
            Err(e) => {
                // Never reachable (nothing jumps there yet): free at once.
                self.free.push(block);
                Err(e)
            }
        }
    }

    /// A block never handed out, near `addr`.
    fn fresh(&mut self, addr: usize) -> Result<usize, NotOptimized> {
        let page = code::page_size();
        if let Some(p) = self.pages.iter_mut().find(|(p, used)| near(*p, addr) && *used + BLOCK <= page) {
            p.1 += BLOCK;
            return Ok(p.0 + p.1 - BLOCK);
        }
        let p = code::alloc_exec_page_near(addr, NEAR - page).ok_or(NotOptimized::NoNearMemory)?;
        self.pages.push((p, BLOCK));
        Ok(p)
    }

    /// Parks the block of an address just unoptimized, or whose optimization failed
    /// after the block was placed (see the module docs).
    pub(super) fn park(&mut self, block: usize, probe: usize, len: usize) {
        self.parked.push(Parked { block, probe, len });
    }

    /// Runs a grace period over every thread for the parked blocks: if it completes,
    /// they become free.
    fn reclaim(&mut self) {
        if self.retry.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let ranges: Vec<(usize, usize)> = self.parked.iter().map(|p| (p.block, p.block + BLOCK)).collect();
        if crate::grace::quiescent_every_thread(&ranges) {
            for p in self.parked.drain(..) {
                // No thread is in the block, nor unwinding through it: its rules go.
                self.tables.remove(&p.block);
                self.free.push(p.block);
            }
            self.retry = None;
            self.backoff = Duration::from_millis(100);
        } else {
            self.retry = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        }
    }
}
