#[probekit::pt_regs]
#[repr(C)]
pub struct Frame {
    pub rax: u64,
    pub accumulator: u64,
    #[reg(r99)]
    pub other: u64,
}

fn main() {}
