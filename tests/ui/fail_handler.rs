// `shapes` without a handler, and a handler of the wrong type.
#[probekit::pt_regs(shapes(kretprobe))]
#[repr(C)]
pub struct NoHandler {
    pub rax: u64,
}

#[probekit::pt_regs(shapes(save_restore), handler = wrong)]
#[repr(C)]
pub struct WrongHandler {
    pub rax: u64,
}

fn wrong(_frame: &mut WrongHandler) {}

fn main() {}
