// fp = return, full, full_compact, full_in_use (x86_64: the xsave operands come from
// probekit),
// args_wide, return_wide and sse.
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

#[probekit::pt_regs(shapes(save_restore), fp = full_compact, handler = on_full_c)]
#[repr(C)]
pub struct Compact {
    #[reg(x86_64 = "rax", aarch64 = "x0")]
    pub value: u64,
}

#[probekit::pt_regs(shapes(save_restore), fp = full_in_use, handler = on_in_use)]
#[repr(C)]
pub struct InUse {
    #[reg(x86_64 = "rax", aarch64 = "x0")]
    pub value: u64,
}

#[probekit::pt_regs(shapes(entry, kretprobe), fp = args_wide, handler = on_wide)]
#[repr(C)]
pub struct Wide {
    #[reg(x86_64 = "rax", aarch64 = "x0")]
    pub value: u64,
}

#[probekit::pt_regs(shapes(kretprobe), fp = return_wide, handler = on_wide_ret)]
#[repr(C)]
pub struct WideRet {
    #[reg(x86_64 = "rax", aarch64 = "x0")]
    pub value: u64,
}

#[probekit::pt_regs(shapes(save_restore, entry), fp = sse, handler = on_sse)]
#[repr(C)]
pub struct Sse {
    #[reg(x86_64 = "rax", aarch64 = "x0")]
    pub value: u64,
}

unsafe extern "C" fn on_sse(_frame: *mut Sse, _fp: *mut u8) -> usize {
    0
}

unsafe extern "C" fn on_full_c(_frame: *mut Compact, _fp: *mut u8) -> usize {
    0
}

unsafe extern "C" fn on_in_use(_frame: *mut InUse, _fp: *mut u8) -> usize {
    0
}

unsafe extern "C" fn on_wide(_frame: *mut Wide, _fp: *mut u8) -> usize {
    0
}

unsafe extern "C" fn on_wide_ret(_frame: *mut WideRet, _fp: *mut u8) -> usize {
    0
}

unsafe extern "C" fn on_ret(_frame: *mut Ret, _fp: *mut u8) -> usize {
    0
}

unsafe extern "C" fn on_full(_frame: *mut Everything, _fp: *mut u8) -> usize {
    0
}

fn main() {
    let _ = (Ret::KRETPROBE, Everything::SAVE_RESTORE, Compact::SAVE_RESTORE, InUse::SAVE_RESTORE, Wide::ENTRY, Wide::KRETPROBE, WideRet::KRETPROBE, Sse::SAVE_RESTORE, Sse::ENTRY);
}
