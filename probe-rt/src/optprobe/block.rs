//! Detour blocks: where they are placed (near the probe: a jump reaches them), and
//! when one may be used again.
//!
//! A block is written once, before its address is optimized, and never written again:
//! a thread may be in it, or an unwinder reading its unwind rules, at any time after
//! (a thread that took the jump just before the address was unoptimized may still be
//! on its first instructions, before the dispatcher tells grace periods it is inside;
//! an out-of-line helper the detour calls, or a signal handler's unwinder, is in no
//! range a grace period knows of). So when its address is unoptimized the block is
//! *parked* for that address only: re-optimizing it with the same bytes (the probe
//! re-enabled, a probe inside its range gone) takes it again, with nothing written.
//! Each written block's unwind rules (`arch::detour::unwind`) are registered with the
//! unwinder when it is written and never deregistered; blocks are never unmapped.
//! Memory is bounded by the addresses ever optimized: a block of [`BLOCK`] bytes each
//! (one more for an address whose detour's bytes changed, its code replaced).

use crate::arch::detour::BLOCK;
use crate::registry::NEAR;
use crate::sys::code;
use crate::unwind::{Fde, Table, PC};
use crate::NotOptimized;
use std::collections::BTreeMap;

/// A parked block: where it is and how many bytes of it the detour is (the block's
/// memory holds them).
struct Parked {
    block: usize,
    len: usize,
}

/// The detour blocks of the process (under the registry lock, through `optprobe`'s
/// state).
pub(super) struct Blocks {
    /// `(page, bytes handed out)`.
    pages: Vec<(usize, usize)>,
    /// By the address they detour.
    parked: BTreeMap<usize, Parked>,
    /// The registered unwind rules of every block ever written: never dropped (that
    /// would deregister them, and free words an unwinder may be reading).
    tables: Vec<Table>,
}

/// Whether a block at `block` is in jump range of a probe at `addr` (either way).
fn near(block: usize, addr: usize) -> bool {
    block.abs_diff(addr) < NEAR - code::page_size()
}

impl Blocks {
    pub(super) const fn new() -> Blocks {
        Blocks { pages: Vec::new(), parked: BTreeMap::new(), tables: Vec::new() }
    }

    /// A block holding `make(block)`'s bytes for the probe at `addr`, written, with
    /// its unwind rules registered: the address's parked block if its bytes are the same
    /// (nothing written, its rules registered still), else a new one near `addr`.
    /// `make` may refuse (the relocation depends on where the block is). Returns the
    /// block and the detour's length.
    pub(super) fn place(&mut self, addr: usize, make: impl Fn(usize) -> Result<(Vec<u8>, Fde), NotOptimized>) -> Result<(usize, usize), NotOptimized> {
        if let Some(p) = self.parked.get(&addr) {
            let (bytes, _) = make(p.block)?;
            if bytes.len() == p.len && code::read(p.block, p.len).is_some_and(|b| b == bytes) {
                let p = self.parked.remove(&addr).expect("looked up above");
                return Ok((p.block, p.len));
            }
            // Different bytes (the code at `addr` was replaced): the block stays parked
            // for them, never written again; a new one is taken.
        }
        let block = self.fresh(addr)?;
        let placed = make(block).and_then(|(bytes, fde)| match code::write_code(block, &bytes) {
            Ok(()) => Ok((bytes, fde)),
            Err(e) => Err(NotOptimized::Write(Box::new(e))),
        });
        match placed {
            Ok((bytes, fde)) => {
                // Before anything can jump to the block.
                self.tables.push(Table::register(PC, None, &[fde]));
                Ok((block, bytes.len()))
            }
            Err(e) => {
                // Never reachable, no rules: handed back to its page (the last handed out).
                self.unfresh(block);
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

    /// Gives back the block [`Self::fresh`] just handed out, which nothing can reach.
    fn unfresh(&mut self, block: usize) {
        if let Some(p) = self.pages.iter_mut().find(|(p, used)| *p + *used == block + BLOCK) {
            p.1 -= BLOCK;
        }
    }

    /// Parks the block of an address just unoptimized, or whose optimization failed
    /// after the block was placed (see the module docs): reused only for `probe`.
    pub(super) fn park(&mut self, block: usize, probe: usize, len: usize) {
        self.parked.insert(probe, Parked { block, len });
    }
}
