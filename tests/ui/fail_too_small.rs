#[probekit::pt_regs]
#[repr(C)]
pub struct Frame {
    pub rax: u32,
}

fn main() {}
