//! x86_64 `Fp::FullInUse` routines hit before the `xsave` size and mask are known (a
//! probe hit in an earlier constructor): the area is then only the legacy region and
//! header (576 bytes) and the mask 0, and the routines keep x87 and SSE state only,
//! writing nothing past the area, whatever upper state is in use. A process of its own:
//! the size and mask are the process's.
#![cfg(target_arch = "x86_64")]

use codegen_torture::{torture, FpMode, Rng, ROUTINES, XSAVE_MASK, XSAVE_SIZE};
use std::sync::atomic::Ordering;

#[test]
fn full_in_use_before_the_mask_is_known() {
    XSAVE_SIZE.store(576, Ordering::Relaxed);
    XSAVE_MASK.store(0, Ordering::Relaxed);
    let mut rng = Rng(0x5eed);
    let mut runs = 0;
    for r in ROUTINES.iter().filter(|r| r.fp == FpMode::FullInUse && r.name.contains("_ptregs_")) {
        // skew true, df false: upper halves, zmm16-31 and k registers in use (AVX-512
        // machines), x87 in use with the stack empty.
        if let Err(e) = torture(r, &mut rng, true, false, false) {
            panic!("{e}");
        }
        runs += 1;
    }
    assert_eq!(runs, 8, "4 shapes x 2 policies");
}
