//! A user crate with its own frame: prints the generated listing, then runs one
//! save → handler → restore round in which the handler changes a register, and shows
//! that the change reached the caller.

mod frame;

use frame::MyRegs;
use std::sync::atomic::{AtomicU64, Ordering};

/// The Builder's items: the offsets, the routine and the compile-time assertions.
#[allow(dead_code)]
mod offsets {
    include!(concat!(env!("OUT_DIR"), "/my_regs.rs"));
}

// The routine `my_regs_save_restore` is in `my_regs.S`, generated and assembled by
// build.rs (`offsets::SAVE_RESTORE` names it too).
extern "C" {
    fn my_regs_save_restore();
    fn peek_arg0(frame: *const MyRegs) -> u64;
    fn peek_arg1(frame: *const MyRegs) -> u64;
}

static SEEN_BY_C: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static SEEN_IP: AtomicU64 = AtomicU64::new(0);

/// Called by the routine with the saved frame; sets `result` to `arg0 + arg1`.
///
/// # Safety
/// Called only by `my_regs_save_restore`, with a frame valid for the call.
#[no_mangle]
unsafe extern "C" fn custom_frame_handler(frame: *mut MyRegs, _fp: *mut u8) -> usize {
    // SAFETY: the routine passes its frame, every field written (rule 2).
    let regs = unsafe { &mut *frame };
    // SAFETY: peek_* only read the frame at the generated offsets.
    unsafe {
        SEEN_BY_C[0].store(peek_arg0(frame), Ordering::Relaxed);
        SEEN_BY_C[1].store(peek_arg1(frame), Ordering::Relaxed);
    }
    SEEN_IP.store(regs.ip, Ordering::Relaxed);
    regs.result = regs.arg0 + regs.arg1;
    0
}

/// Runs the routine with `a` and `b` in the argument registers and 0 in `result`'s.
fn round(a: u64, b: u64) -> u64 {
    let result: u64;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the routine preserves every register except those whose frame field the
    // handler changed (rax here); it uses the stack below rsp, which asm! without
    // `nostack` allows.
    unsafe {
        std::arch::asm!("call {r}", r = sym my_regs_save_restore, in("rdi") a, in("rsi") b, inout("rax") 0u64 => result);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above; `bl` writes the link register x30, declared clobbered.
    unsafe {
        std::arch::asm!("bl {r}", r = sym my_regs_save_restore, in("x0") a, in("x1") b, inout("x2") 0u64 => result, out("x30") _);
    }
    result
}

fn main() {
    print!("{}", include_str!(concat!(env!("OUT_DIR"), "/my_regs.txt")));
    println!();
    let result = round(40, 2);
    println!(
        "handler saw arg0 = {}, arg1 = {} (read by C through S_ARG0 = {}, S_ARG1 = {}), ip = {:#x}",
        SEEN_BY_C[0].load(Ordering::Relaxed),
        SEEN_BY_C[1].load(Ordering::Relaxed),
        offsets::S_ARG0,
        offsets::S_ARG1,
        SEEN_IP.load(Ordering::Relaxed),
    );
    println!("result register after the routine: {result} (the handler wrote arg0 + arg1 into it)");
    assert_eq!(result, 42, "the handler's write must take effect");
    // One naming scheme: `#[pt_regs]` and the Builder give the frame the same constants.
    assert_eq!((MyRegs::S_RESULT, MyRegs::S_FRAME_SIZE), (offsets::S_RESULT, offsets::S_FRAME_SIZE));
    assert_eq!(offsets::SAVE_RESTORE as usize, my_regs_save_restore as unsafe extern "C" fn() as usize);
}
