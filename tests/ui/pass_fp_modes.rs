// fp = return and fp = full (x86_64: the xsave operands come from probekit).
#[probekit::pt_regs(shapes(kretprobe), fp = return, handler = on_ret)]
#[repr(C)]
pub struct Ret {
    #[reg(x86_64 = "rax", aarch64 = "x0")]
    pub value: u64,
}

#[probekit::pt_regs(shapes(save_restore), fp = full, handler = on_full, crate = ::probekit)]
#[repr(C)]
pub struct Everything {
    #[reg(x86_64 = "rax..=r15", aarch64 = "x0..=x15")]
    pub gprs: [u64; 16],
}

unsafe extern "C" fn on_ret(_frame: *mut Ret, _fp: *mut u8) -> usize {
    0
}

unsafe extern "C" fn on_full(_frame: *mut Everything, _fp: *mut u8) -> usize {
    0
}

fn main() {
    let _ = (Ret::KRETPROBE, Everything::SAVE_RESTORE);
}
