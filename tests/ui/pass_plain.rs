// No options: the frame, its Frame impl, offsets and assertions; no routines.
use probekit::Frame;

#[probekit::pt_regs]
#[repr(C)]
pub struct Frame2 {
    pub rdi: u64,
    pub _pad: u32,
    pub rsi: u64,
    pub orig_rax: u64,
}

fn main() {
    assert_eq!(Frame2::S_RDI, 0);
    assert_eq!(Frame2::S__PAD, 8);
    assert_eq!(Frame2::S_RSI, 16);
    assert_eq!(Frame2::S_FRAME_SIZE, 32);
    assert_eq!(<Frame2 as Frame>::FIELDS.len(), 4);
    assert_eq!(<Frame2 as Frame>::NAME, "Frame2");
}
