// A handler that may change the registers makes `register` unsafe.
use probekit::PtRegs;

#[inline(never)]
#[no_mangle]
pub extern "C" fn target(x: u64) -> u64 {
    x + 1
}

#[probekit::kprobe(function = target)]
fn bump(regs: &mut PtRegs) {
    regs.rax += 1;
}

#[probekit::kretprobe(function = target)]
fn zero(regs: &mut PtRegs, _: &mut ()) {
    regs.set_return_value(0);
}

fn main() {
    let _ = bump::register();
    let _ = zero::register();
}
