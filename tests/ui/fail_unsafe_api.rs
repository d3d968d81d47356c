// Safe code cannot change what the program does (DESIGN rule 9): a safe entry
// handler decides whether to watch a call, it cannot skip the function; and the data
// type is chosen before the handlers it types.
use probekit::{Entry, PtRegs, ReturnProbe};

#[inline(never)]
#[no_mangle]
pub extern "C" fn target(x: u64) -> u64 {
    x + 1
}

fn main() {
    let f = target as extern "C" fn(u64) -> u64;
    let _ = ReturnProbe::builder().function(f).entry_handler(|_: &PtRegs, _: &mut ()| Entry::Override(0));
    let _ = ReturnProbe::builder().function(f).handler(|_: &PtRegs, _: &mut ()| {}).data::<u64>();
}
