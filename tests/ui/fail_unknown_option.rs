#[probekit::pt_regs(shapes(trampoline), policy = callee_saved, fp = avx, speed = 11)]
#[repr(C)]
pub struct Frame {
    pub rax: u64,
}

fn main() {}
