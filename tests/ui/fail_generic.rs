#[probekit::pt_regs]
#[repr(C)]
pub struct Frame<T> {
    pub rax: u64,
    pub extra: T,
}

fn main() {}
