// A safe handler sees the registers read-only.
use probekit::{Probe, PtRegs};

#[inline(never)]
#[no_mangle]
pub extern "C" fn target(x: u64) -> u64 {
    x + 1
}

fn main() {
    let f = target as extern "C" fn(u64) -> u64;
    let _ = Probe::builder().function(f).pre(|r: &PtRegs| r.set_return_value(1));
}
