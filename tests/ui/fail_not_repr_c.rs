// A frame without #[repr(C)]: its field order would not be its memory order.
#[probekit::pt_regs]
pub struct Frame {
    pub rax: u64,
}

fn main() {}
