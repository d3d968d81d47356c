#[probekit::pt_regs(shapes(entry), policy = caller_saved, fp = args, handler = on_frame)]
#[repr(C)]
pub struct Args {
    #[reg(x86_64 = "rdi", aarch64 = "x0")]
    pub a0: u64,
    #[reg(x86_64 = "rsi", aarch64 = "x1")]
    pub a1: u64,
}

unsafe extern "C" fn on_frame(_frame: *mut Args, _fp: *mut u8) -> usize {
    0
}

fn main() {
    let _ = Args::ENTRY;
}
