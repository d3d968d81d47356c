#[probekit::pt_regs]
#[repr(C, packed)]
pub struct Frame {
    pub rax: u64,
}

fn main() {}
