// Every shape, policy `all`, fp `none`, per-arch bindings: the routines exist for the target.
#[probekit::pt_regs(shapes(save_restore, kretprobe, entry, site), policy = all, fp = none, handler = on_frame)]
#[repr(C)]
pub struct Regs {
    #[reg(x86_64 = "rax", aarch64 = "x0")]
    pub ret: u64,
    #[reg(x86_64 = "rip", aarch64 = "pc")]
    pub ip: u64,
    #[reg(aarch64 = "x30")]
    pub lr: u64,
}

unsafe extern "C" fn on_frame(_frame: *mut Regs, _fp: *mut u8) -> usize {
    0
}

fn main() {
    let routines: [unsafe extern "C" fn(); 4] = [Regs::SAVE_RESTORE, Regs::KRETPROBE, Regs::ENTRY, Regs::SITE];
    assert!(routines.iter().all(|r| *r as usize != 0));
}
