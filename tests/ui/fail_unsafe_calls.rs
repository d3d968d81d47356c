// Handlers that may change the registers, and raw addresses, need `unsafe`.
use probekit::{Probe, PtRegs, ReturnProbe};

#[inline(never)]
#[no_mangle]
pub extern "C" fn target(x: u64) -> u64 {
    x + 1
}

fn main() {
    let f = target as extern "C" fn(u64) -> u64;
    let _ = Probe::builder().function(f).pre_mut(|r: &mut PtRegs| r.set_return_value(1));
    let _ = Probe::builder().function(f).post_mut(|_: &mut PtRegs| {});
    let _ = Probe::builder().address(f as usize);
    let _ = ReturnProbe::builder().function(f).handler_mut(|r: &mut PtRegs, _: &mut ()| r.set_return_value(0));
    let _ = ReturnProbe::builder().function(f).entry_handler_mut(|_: &mut PtRegs, _: &mut ()| probekit::Entry::Skip);
}
