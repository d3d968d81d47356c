#[probekit::pt_regs]
#[repr(C)]
pub struct Frame {
    #[reg(r8..=r11)]
    pub args: [u64; 3],
}

fn main() {}
