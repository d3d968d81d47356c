// One naming scheme, whichever front end: `S_<FIELD>` for every field, `S_<REG>` for
// each element of a register array, `S_ALLOC_<SHAPE>`/`S_FPSIMD_<SHAPE>` per routine,
// and the built-in frame's own constants, old (`offsets::`) and new (`PtRegs::`).
#[probekit::pt_regs(shapes(save_restore, entry), fp = args, handler = on_frame)]
#[repr(C)]
pub struct Named {
    #[reg(x86_64 = "rip", aarch64 = "pc")]
    pub ip: u64,
    #[reg(x86_64 = "r8..=r10", aarch64 = "x19..=x21")]
    pub saved: [u64; 3],
    pub _spare: [u32; 3],
    #[reg(x86_64 = "rsp", aarch64 = "sp")]
    pub stack: u64,
}

unsafe extern "C" fn on_frame(_frame: *mut Named, _fp: *mut u8) -> usize {
    0
}

fn main() {
    assert_eq!((Named::S_IP, Named::S_SAVED, Named::S__SPARE, Named::S_STACK, Named::S_FRAME_SIZE), (0, 8, 32, 48, 56));
    #[cfg(target_arch = "x86_64")]
    assert_eq!((Named::S_R8, Named::S_R9, Named::S_R10), (8, 16, 24));
    #[cfg(target_arch = "aarch64")]
    assert_eq!((Named::S_X19, Named::S_X20, Named::S_X21), (8, 16, 24));
    assert!(Named::S_ALLOC_SAVE_RESTORE >= Named::S_FRAME_SIZE && Named::S_FPSIMD_ENTRY >= Named::S_FRAME_SIZE);
    let _: [unsafe extern "C" fn(); 2] = [Named::SAVE_RESTORE, Named::ENTRY];

    use probekit::PtRegs;
    #[cfg(target_arch = "x86_64")]
    assert_eq!((PtRegs::S_RIP, probekit::offsets::S_RIP, PtRegs::S_FRAME_SIZE, probekit::offsets::S_FRAME_SIZE), (128, 128, 168, 168));
    #[cfg(target_arch = "aarch64")]
    assert_eq!((PtRegs::S_REGS, PtRegs::S_X0, PtRegs::S_LR, probekit::offsets::S_PSTATE), (0, 0, 240, 264));
}
