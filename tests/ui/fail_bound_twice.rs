#[probekit::pt_regs]
#[repr(C)]
pub struct Frame {
    pub rdi: u64,
    #[reg(rdi)]
    pub first_arg: u64,
}

fn main() {}
