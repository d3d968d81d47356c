#[probekit::pt_regs]
#[repr(C)]
pub struct Frame(u64, u64);

fn main() {}
