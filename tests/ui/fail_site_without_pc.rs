// A site routine over a frame without a pc field: its handler could neither see the
// site nor tell where to resume.
#[probekit::pt_regs(shapes(entry, site), policy = all, fp = none, handler = on_frame)]
#[repr(C)]
pub struct NoPc {
    #[reg(x86_64 = "rax", aarch64 = "x0")]
    pub ret: u64,
}

unsafe extern "C" fn on_frame(_frame: *mut NoPc, _fp: *mut u8) -> usize {
    0
}

fn main() {}
