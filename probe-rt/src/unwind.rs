//! Unwind information for code made at run time: the return-probe stubs.
//!
//! A function whose return address was replaced by a stub's address must still be
//! unwound through (a panic raised below it, a backtrace taken inside it). The stub has
//! no frame of its own: when the unwinder reaches it, the stack pointer is already the
//! real caller's and the real return address is in the instance's slot. So each stub
//! gets an FDE saying exactly that: `CFA = sp + 0`, and the return-address column is
//! `DW_CFA_val_expression(DW_OP_addr <slot>; DW_OP_deref)`. `.cfi_escape` cannot carry
//! an address known only at run time, so the FDEs are built here, in `.eh_frame`
//! format, and registered with libgcc's `__register_frame` (the unwinder Rust uses on
//! `*-linux-gnu`). Unwinders look up `return address - 1`, so each FDE also covers the
//! byte before its stub (a pad the stub layout leaves for that).
//!
//! The FDE puts the walk back on the real path, but cannot hide the stub: libgcc has
//! already reported a frame at the stub's address (the return address the stack
//! holds) when it looks the FDE up. `crate::backtrace` translates instead.
//!
//! Written by hand: no crate builds `.eh_frame` records for the in-process unwinder
//! (gimli's writer would do, at the cost of a large dependency, for ~40 lines here).

use crate::Error;

#[cfg(target_env = "gnu")]
extern "C" {
    /// libgcc: registers the `.eh_frame` records starting at `begin`, up to a zero
    /// length word. The memory must stay valid while registered (here: forever).
    /// (LLVM's libunwind, used on musl, takes one FDE per call instead.)
    fn __register_frame(begin: *const u8);
}

/// DWARF register numbers: the stack pointer and the return-address column.
#[cfg(target_arch = "x86_64")]
const SP: u8 = 7;
#[cfg(target_arch = "x86_64")]
const RA: u8 = 16;
#[cfg(target_arch = "aarch64")]
const SP: u8 = 31;
#[cfg(target_arch = "aarch64")]
const RA: u8 = 30;

/// One stub's unwind rule: `[begin, end)` is covered, and the real return address is
/// the word at `slot`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StubFrame {
    pub begin: usize,
    pub end: usize,
    pub slot: usize,
}

/// Builds one CIE and an FDE per stub and registers them for the life of the process.
/// Called once per block of stubs, which is then reused (`retprobe::pool`): libgcc
/// looks through every registered table on each unwind, so tables must not pile up.
pub(crate) fn register_stubs(stubs: &[StubFrame]) -> Result<(), Error> {
    let table = eh_frame(stubs);
    // Registered memory must outlive every lookup: leaked, as the stubs are.
    let table: &'static [u8] = Box::leak(table.into_boxed_slice());
    if !(table.as_ptr() as usize).is_multiple_of(8) {
        return Err(Error::Os { addr: table.as_ptr() as usize, call: "__register_frame (misaligned table)", errno: libc::EINVAL });
    }
    // SAFETY: `table` is a well-formed `.eh_frame` sequence ending in a zero length
    // word (built by `eh_frame`), 8-aligned, and never freed.
    #[cfg(target_env = "gnu")]
    unsafe {
        __register_frame(table.as_ptr())
    };
    // Elsewhere no unwinder is told: unwinding through a hijacked frame is not
    // supported there (returns still work).
    Ok(())
}

/// The `.eh_frame` bytes: CIE, FDEs, terminator. Every record is padded to 8 bytes.
fn eh_frame(stubs: &[StubFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    // CIE: version 1, augmentation "zR" (pointer encoding follows: absolute, 8 bytes),
    // code alignment 1, data alignment -8, the return-address column, no instructions.
    let mut cie = vec![0, 0, 0, 0, 1, b'z', b'R', 0, 1, 0x78, RA, 1, 0x00];
    pad(&mut cie);
    push_record(&mut out, &cie);
    for s in stubs {
        // The CIE pointer: from this field back to the CIE at 0.
        let cie_ptr = (out.len() + 4) as u32;
        let mut fde = cie_ptr.to_ne_bytes().to_vec();
        fde.extend_from_slice(&(s.begin as u64).to_ne_bytes());
        fde.extend_from_slice(&((s.end - s.begin) as u64).to_ne_bytes());
        fde.push(0); // augmentation data length
                     // DW_CFA_def_cfa sp, 0
        fde.extend([0x0c, SP, 0]);
        // DW_CFA_val_expression RA, 10 bytes: DW_OP_addr <slot>; DW_OP_deref
        fde.extend([0x16, RA, 10, 0x03]);
        fde.extend_from_slice(&(s.slot as u64).to_ne_bytes());
        fde.push(0x06);
        pad(&mut fde);
        push_record(&mut out, &fde);
    }
    out.extend_from_slice(&0u32.to_ne_bytes());
    out
}

/// Pads a record body with DW_CFA_nop so that length word + body is a multiple of 8.
fn pad(body: &mut Vec<u8>) {
    while !(body.len() + 4).is_multiple_of(8) {
        body.push(0);
    }
}

fn push_record(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_ne_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_aligned_and_linked_to_the_cie() {
        let t = eh_frame(&[StubFrame { begin: 0x1000, end: 0x1010, slot: 0x2000 }, StubFrame { begin: 0x1010, end: 0x1020, slot: 0x2008 }]);
        let word = |at: usize| u32::from_ne_bytes(t[at..at + 4].try_into().unwrap()) as usize;
        let mut at = 0;
        let mut fdes = 0;
        while word(at) != 0 {
            assert_eq!(at % 8, 0);
            if at > 0 {
                assert_eq!(at + 4 - word(at + 4), 0, "the FDE points back to the CIE");
                fdes += 1;
            }
            at += 4 + word(at);
        }
        assert_eq!((fdes, at + 4), (2, t.len()));
    }
}
