//! Jump-optimized probes (x86_64 natively, aarch64 under qemu): a probe registered on an
//! address that can take a jump is optimized, runs its handlers with the registers of
//! the probed context, follows their changes (registers, the pc, the stack pointer),
//! aggregates, enables, disables and unregisters while threads run through it, and
//! says why when it cannot be optimized.

use probe_rt::{Error, NotOptimized, Optimize, Probe, PtRegs, ReturnProbe};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[cfg(target_arch = "x86_64")]
#[path = "common/vectors.rs"]
mod vectors;

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.opt_tests, \"ax\", @progbits",
    // x + y: a plain entry of two instructions (6 bytes)
    ".globl opt_add",
    ".type opt_add, @function",
    "opt_add:",
    "mov rax, rdi",
    "add rax, rsi",
    "ret",
    ".size opt_add, . - opt_add",
    // x * 3 + 1, for the threads
    ".globl opt_busy",
    ".type opt_busy, @function",
    "opt_busy:",
    "lea rax, [rdi + rdi * 2]",
    "add rax, 1",
    "ret",
    ".size opt_busy, . - opt_busy",
    // the same, for the return probes
    ".globl opt_ret3",
    ".type opt_ret3, @function",
    "opt_ret3:",
    "lea rax, [rdi + rdi * 2]",
    "add rax, 1",
    "ret",
    ".size opt_ret3, . - opt_ret3",
    // (x + 1) * y + 2, in rax; probed in the middle
    ".globl opt_mid",
    ".globl opt_mid_at",
    ".globl opt_mid_skip",
    ".type opt_mid, @function",
    "opt_mid:",
    "mov rax, rdi",
    "opt_mid_at:",
    "add rax, 1",
    "imul rax, rsi",
    "opt_mid_skip:",
    "add rax, 2",
    "ret",
    ".size opt_mid, . - opt_mid",
    // the same, for the redirect test
    ".globl opt_mid2",
    ".globl opt_mid2_at",
    ".globl opt_mid2_skip",
    ".type opt_mid2, @function",
    "opt_mid2:",
    "mov rax, rdi",
    "opt_mid2_at:",
    "add rax, 1",
    "imul rax, rsi",
    "opt_mid2_skip:",
    "add rax, 2",
    "ret",
    ".size opt_mid2, . - opt_mid2",
    // x < y, the flags live across the probed instruction (a window of one)
    ".globl opt_flags",
    ".globl opt_flags_at",
    ".type opt_flags, @function",
    "opt_flags:",
    "cmp rdi, rsi",
    "opt_flags_at:",
    "mov eax, 0",
    "setb al",
    "ret",
    ".size opt_flags, . - opt_flags",
    // x + [data]: RIP-relative data reached from the detour
    ".globl opt_riprel",
    ".type opt_riprel, @function",
    "opt_riprel:",
    "lea rax, [rip + opt_data]",
    "mov rax, qword ptr [rax]",
    "add rax, rdi",
    "ret",
    ".size opt_riprel, . - opt_riprel",
    // push rbx; ...; pop rbx; ret: a handler at opt_pop_at returns for it
    ".globl opt_pop",
    ".globl opt_pop_at",
    ".type opt_pop, @function",
    "opt_pop:",
    "push rbx",
    "mov rbx, rdi",
    "opt_pop_at:",
    "lea rax, [rbx + 1]",
    "mov rdx, rax",
    "pop rbx",
    "ret",
    ".size opt_pop, . - opt_pop",
    // refusals: no size
    ".globl opt_sizeless",
    "opt_sizeless:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    // a window past the end (the size says 4 bytes)
    ".globl opt_short",
    ".type opt_short, @function",
    "opt_short:",
    "mov rax, rdi",
    "nop",
    "ret",
    ".size opt_short, 4",
    // a jump into the window of opt_loop_at (3..11) at 7
    ".globl opt_loop",
    ".globl opt_loop_at",
    ".globl opt_loop_in",
    ".type opt_loop, @function",
    "opt_loop:",
    "mov rax, rdi",
    "opt_loop_at:",
    "add rax, 1",
    "opt_loop_in:",
    "add rax, 2",
    "cmp rax, 100",
    "jb opt_loop_in",
    "ret",
    ".size opt_loop, . - opt_loop",
    // an indirect jump in the function
    ".globl opt_table",
    ".type opt_table, @function",
    "opt_table:",
    "mov rax, rdi",
    "add rax, 1",
    "lea rcx, [rip + 3f]",
    "jmp rcx",
    "3:",
    "ret",
    ".size opt_table, . - opt_table",
    // a call in the window
    ".globl opt_call",
    ".globl opt_call_at",
    ".type opt_call, @function",
    "opt_call:",
    "push rbx",
    "opt_call_at:",
    "xor eax, eax",
    "call opt_leaf",
    "pop rbx",
    "ret",
    ".size opt_call, . - opt_call",
    ".globl opt_leaf",
    ".type opt_leaf, @function",
    "opt_leaf:",
    "lea rax, [rdi + 5]",
    "ret",
    ".size opt_leaf, . - opt_leaf",
    // copies of opt_add and opt_mid for tests of their own (tests run at once)
    ".globl opt_post",
    ".type opt_post, @function",
    "opt_post:",
    "mov rax, rdi",
    "add rax, rsi",
    "ret",
    ".size opt_post, . - opt_post",
    ".globl opt_reent",
    ".type opt_reent, @function",
    "opt_reent:",
    "mov rax, rdi",
    "add rax, rsi",
    "ret",
    ".size opt_reent, . - opt_reent",
    ".globl opt_list",
    ".type opt_list, @function",
    "opt_list:",
    "mov rax, rdi",
    "add rax, rsi",
    "ret",
    ".size opt_list, . - opt_list",
    ".globl opt_list2",
    ".type opt_list2, @function",
    "opt_list2:",
    "mov rax, rdi",
    "add rax, rsi",
    "ret",
    ".size opt_list2, . - opt_list2",
    ".globl opt_win",
    ".globl opt_win_at",
    ".type opt_win, @function",
    "opt_win:",
    "mov rax, rdi",
    "opt_win_at:",
    "add rax, 1",
    "imul rax, rsi",
    "add rax, 2",
    "ret",
    ".size opt_win, . - opt_win",
    ".globl opt_retp",
    ".type opt_retp, @function",
    "opt_retp:",
    "lea rax, [rip + opt_data]",
    "mov rax, qword ptr [rax]",
    "add rax, rdi",
    "ret",
    ".size opt_retp, . - opt_retp",
    // a function that does not decode past its `ret` (data in the text)
    ".globl opt_data_in_text",
    ".type opt_data_in_text, @function",
    "opt_data_in_text:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".byte 0x06",
    ".size opt_data_in_text, . - opt_data_in_text",
    // x -> xmm8 (and zmm16 where the test puts it), probed, then back
    ".globl opt_vec",
    ".globl opt_vec_at",
    ".type opt_vec, @function",
    "opt_vec:",
    "movq xmm8, rdi",
    "opt_vec_at:",
    "movq rax, xmm8",
    "add rax, 0",
    "ret",
    ".size opt_vec, . - opt_vec",
    // The same with AVX code (the CPU has AVX-512 where the test calls it): anything
    // may be live at the probe, zmm16 included.
    ".globl opt_vec_avx",
    ".globl opt_vec_avx_at",
    ".type opt_vec_avx, @function",
    "opt_vec_avx:",
    "vmovq xmm8, rdi",
    "opt_vec_avx_at:",
    "movq rax, xmm8",
    "add rax, 0",
    "ret",
    ".size opt_vec_avx, . - opt_vec_avx",
    // batch and multi-function probes
    ".globl opt_batch1",
    ".type opt_batch1, @function",
    "opt_batch1:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size opt_batch1, . - opt_batch1",
    ".globl opt_batch2",
    ".type opt_batch2, @function",
    "opt_batch2:",
    "mov rax, rdi",
    "add rax, 2",
    "ret",
    ".size opt_batch2, . - opt_batch2",
    ".globl opt_batch3",
    ".type opt_batch3, @function",
    "opt_batch3:",
    "mov rax, rdi",
    "add rax, 3",
    "ret",
    ".size opt_batch3, . - opt_batch3",
    ".globl opt_multi1",
    ".type opt_multi1, @function",
    "opt_multi1:",
    "mov rax, rdi",
    "add rax, 1",
    "ret",
    ".size opt_multi1, . - opt_multi1",
    ".globl opt_multi2",
    ".type opt_multi2, @function",
    "opt_multi2:",
    "mov rax, rdi",
    "add rax, 2",
    "ret",
    ".size opt_multi2, . - opt_multi2",
    ".popsection",
    ".pushsection .rodata.opt_tests, \"a\", @progbits",
    ".balign 8",
    "opt_data:",
    ".quad 0x1000",
    ".popsection",
);

#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.opt_tests, \"ax\", %progbits",
    ".globl opt_add",
    ".type opt_add, %function",
    "opt_add:",
    "add x0, x0, x1",
    "ret",
    ".size opt_add, . - opt_add",
    ".globl opt_busy",
    ".type opt_busy, %function",
    "opt_busy:",
    "add x0, x0, x0, lsl #1",
    "add x0, x0, #1",
    "ret",
    ".size opt_busy, . - opt_busy",
    ".globl opt_ret3",
    ".type opt_ret3, %function",
    "opt_ret3:",
    "add x0, x0, x0, lsl #1",
    "add x0, x0, #1",
    "ret",
    ".size opt_ret3, . - opt_ret3",
    ".globl opt_mid",
    ".globl opt_mid_at",
    ".globl opt_mid_skip",
    "opt_mid:",
    "mov x2, x0",
    "opt_mid_at:",
    "add x2, x2, #1",
    "mul x2, x2, x1",
    "opt_mid_skip:",
    "add x0, x2, #2",
    "ret",
    ".globl opt_mid2",
    ".globl opt_mid2_at",
    ".globl opt_mid2_skip",
    "opt_mid2:",
    "mov x2, x0",
    "opt_mid2_at:",
    "add x2, x2, #1",
    "mul x2, x2, x1",
    "opt_mid2_skip:",
    "add x0, x2, #2",
    "ret",
    ".globl opt_flags",
    ".globl opt_flags_at",
    "opt_flags:",
    "cmp x0, x1",
    "opt_flags_at:",
    "mov x0, #0",
    "cset x0, lo",
    "ret",
    ".globl opt_riprel",
    "opt_riprel:",
    "adr x2, 1f",
    "ldr x2, [x2]",
    "add x0, x0, x2",
    "ret",
    ".balign 8",
    "1:",
    ".quad 0x1000",
    ".globl opt_pop",
    ".globl opt_pop_at",
    "opt_pop:",
    "stp x29, x30, [sp, #-16]!",
    "opt_pop_at:",
    "add x0, x0, #1",
    "ldp x29, x30, [sp], #16",
    "ret",
    // blr x30: not relocatable into a detour (a breakpoint simulates it)
    ".globl opt_blr30",
    ".globl opt_blr30_at",
    "opt_blr30:",
    "mov x9, x30",
    "adr x30, 2f",
    "opt_blr30_at:",
    "blr x30",
    "2:",
    "mov x30, x9",
    "add x0, x0, #1",
    "ret",
    // every pc-relative class, rewritten into the detour
    ".globl opt_ldrlit",
    ".globl opt_ldrlit_at",
    "opt_ldrlit:",
    "opt_ldrlit_at:",
    "ldr x2, 1f",
    "add x0, x0, x2",
    "ret",
    ".balign 8",
    "1:",
    ".quad 40",
    ".globl opt_ldrw",
    ".globl opt_ldrw_at",
    "opt_ldrw:",
    "opt_ldrw_at:",
    "ldrsw x2, 1f",
    "add x0, x0, x2",
    "ret",
    ".balign 8",
    "1:",
    ".word -3",
    ".word 0",
    ".globl opt_ldrq",
    ".globl opt_ldrq_at",
    "opt_ldrq:",
    "opt_ldrq_at:",
    "ldr q0, 1f",
    "fmov x2, d0",
    "add x0, x0, x2",
    "ret",
    ".balign 16",
    "1:",
    ".quad 50",
    ".quad 0",
    ".globl opt_adrp",
    ".globl opt_adrp_at",
    "opt_adrp:",
    "opt_adrp_at:",
    "adrp x2, opt_adrp",
    "sub x0, x2, x0",
    "ret",
    ".globl opt_bcond",
    ".globl opt_bcond_at",
    "opt_bcond:",
    "cmp x0, #10",
    "opt_bcond_at:",
    "b.lo 1f",
    "mov x0, #100",
    "ret",
    "1:",
    "mov x0, #200",
    "ret",
    ".globl opt_cbz",
    ".globl opt_cbz_at",
    "opt_cbz:",
    "opt_cbz_at:",
    "cbz x0, 1f",
    "mov x0, #7",
    "ret",
    "1:",
    "mov x0, #8",
    "ret",
    ".globl opt_tbnz",
    ".globl opt_tbnz_at",
    "opt_tbnz:",
    "opt_tbnz_at:",
    "tbnz w0, #1, 1f",
    "mov x0, #7",
    "ret",
    "1:",
    "mov x0, #8",
    "ret",
    ".globl opt_bl",
    ".globl opt_bl_at",
    "opt_bl:",
    "stp x29, x30, [sp, #-16]!",
    "opt_bl_at:",
    "bl opt_leaf",
    "ldp x29, x30, [sp], #16",
    "ret",
    ".globl opt_blr",
    ".globl opt_blr_at",
    "opt_blr:",
    "stp x29, x30, [sp, #-16]!",
    "adr x3, opt_leaf",
    "opt_blr_at:",
    "blr x3",
    "ldp x29, x30, [sp], #16",
    "ret",
    ".globl opt_b",
    ".globl opt_b_at",
    "opt_b:",
    "opt_b_at:",
    "b opt_leaf",
    ".globl opt_ret",
    ".globl opt_ret_at",
    "opt_ret:",
    "add x0, x0, #3",
    "opt_ret_at:",
    "ret",
    ".globl opt_leaf",
    "opt_leaf:",
    "add x0, x0, #5",
    "ret",
    ".globl opt_post",
    "opt_post:",
    "add x0, x0, x1",
    "ret",
    ".globl opt_reent",
    "opt_reent:",
    "add x0, x0, x1",
    "ret",
    ".globl opt_list",
    "opt_list:",
    "add x0, x0, x1",
    "ret",
    ".globl opt_list2",
    "opt_list2:",
    "add x0, x0, x1",
    "ret",
    ".globl opt_win",
    ".globl opt_win_at",
    "opt_win:",
    "mov x2, x0",
    "opt_win_at:",
    "add x2, x2, #1",
    "mul x2, x2, x1",
    "add x0, x2, #2",
    "ret",
    ".globl opt_vec",
    ".globl opt_vec_at",
    "opt_vec:",
    "fmov d16, x0",
    "opt_vec_at:",
    "fmov x0, d16",
    "ret",
    ".globl opt_batch1",
    "opt_batch1:",
    "add x0, x0, #1",
    "ret",
    ".globl opt_batch2",
    "opt_batch2:",
    "add x0, x0, #2",
    "ret",
    ".globl opt_batch3",
    "opt_batch3:",
    "add x0, x0, #3",
    "ret",
    ".globl opt_multi1",
    ".type opt_multi1, %function",
    "opt_multi1:",
    "add x0, x0, #1",
    "ret",
    ".size opt_multi1, . - opt_multi1",
    ".globl opt_multi2",
    ".type opt_multi2, %function",
    "opt_multi2:",
    "add x0, x0, #2",
    "ret",
    ".size opt_multi2, . - opt_multi2",
    ".globl opt_retp",
    "opt_retp:",
    "adr x2, 1f",
    "ldr x2, [x2]",
    "add x0, x0, x2",
    "ret",
    ".balign 8",
    "1:",
    ".quad 0x1000",
    ".popsection",
);

// The functions above follow the C ABI and touch only scratch registers and their own
// stack: safe to call. The labels are only addresses.
unsafe extern "C" {
    safe fn opt_add(x: u64, y: u64) -> u64;
    safe fn opt_busy(x: u64) -> u64;
    safe fn opt_ret3(x: u64) -> u64;
    safe fn opt_mid(x: u64, y: u64) -> u64;
    safe fn opt_mid_at();
    safe fn opt_mid2(x: u64, y: u64) -> u64;
    safe fn opt_mid2_at();
    safe fn opt_mid2_skip();
    safe fn opt_flags(x: u64, y: u64) -> u64;
    safe fn opt_flags_at();
    safe fn opt_riprel(x: u64) -> u64;
    safe fn opt_pop(x: u64) -> u64;
    safe fn opt_pop_at();
    safe fn opt_post(x: u64, y: u64) -> u64;
    safe fn opt_reent(x: u64, y: u64) -> u64;
    safe fn opt_list(x: u64, y: u64) -> u64;
    safe fn opt_list2(x: u64, y: u64) -> u64;
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the window tests are x86_64's
    safe fn opt_win(x: u64, y: u64) -> u64;
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    safe fn opt_win_at();
    safe fn opt_retp(x: u64) -> u64;
    safe fn opt_batch1(x: u64) -> u64;
    safe fn opt_batch2(x: u64) -> u64;
    safe fn opt_batch3(x: u64) -> u64;
    safe fn opt_multi1(x: u64) -> u64;
    safe fn opt_multi2(x: u64) -> u64;
    safe fn opt_vec(x: u64) -> u64;
    safe fn opt_vec_at();
}
#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    /// Needs AVX.
    fn opt_vec_avx(x: u64) -> u64;
    fn opt_vec_avx_at();
}

fn addr(f: unsafe extern "C" fn()) -> usize {
    f as usize
}

/// The register the mid-function tests compute in (x86_64 rax, aarch64 x2).
fn work(r: &mut PtRegs) -> &mut u64 {
    #[cfg(target_arch = "x86_64")]
    return &mut r.rax;
    #[cfg(target_arch = "aarch64")]
    return &mut r.regs[2];
}

fn jump_in_text(at: usize) -> bool {
    // SAFETY: reads the text of a function of this binary.
    let b = unsafe { *(at as *const [u8; 4]) };
    #[cfg(target_arch = "x86_64")]
    return b[0] == 0xe9;
    #[cfg(target_arch = "aarch64")]
    return u32::from_le_bytes(b) >> 26 == 0b000101;
}

static ENTRY_HITS: AtomicU64 = AtomicU64::new(0);
static ENTRY_PC: AtomicU64 = AtomicU64::new(0);
static ENTRY_ARG: AtomicU64 = AtomicU64::new(0);

#[test]
fn a_function_entry_is_optimized_and_its_handler_sees_the_probed_registers() {
    let f = opt_add as extern "C" fn(u64, u64) -> u64;
    let before = f(2, 3);
    let p = Probe::builder()
        .function(f)
        .pre(|r: &PtRegs| {
            ENTRY_HITS.fetch_add(1, Ordering::Relaxed);
            ENTRY_PC.store(r.instruction_pointer(), Ordering::Relaxed);
            ENTRY_ARG.store(r.arg(1).unwrap_or(0), Ordering::Relaxed);
        })
        .optimize(Optimize::Required)
        .register()
        .expect("optimized");
    assert!(p.is_optimized(), "{:?}", p.why_not_optimized());
    assert!(jump_in_text(f as usize), "the jump is in the text");
    assert_eq!(black_box(f)(2, 3), before);
    assert_eq!(black_box(f)(40, 2), 42);
    assert_eq!((p.nhit(), p.nmissed(), ENTRY_HITS.load(Ordering::Relaxed)), (2, 0, 2));
    assert_eq!(ENTRY_PC.load(Ordering::Relaxed), f as usize as u64, "the pc is the probed address");
    assert_eq!(ENTRY_ARG.load(Ordering::Relaxed), 2);
    // The stack pointer is the probed one: at the entry it holds the return address.
    drop(p);
    assert!(!jump_in_text(f as usize), "unregistering takes the jump out");
    assert_eq!(black_box(f)(2, 3), 5);
}

#[test]
fn a_mid_function_probe_changes_a_register() {
    let f = opt_mid as extern "C" fn(u64, u64) -> u64;
    assert_eq!(f(4, 3), 17);
    // SAFETY: opt_mid_at is an instruction of opt_mid, which is correct with any value
    // in its work register.
    let p = unsafe { Probe::builder().address(addr(opt_mid_at)).pre_mut(|r: &mut PtRegs| *work(r) += 10) }
        .optimize(Optimize::Required)
        .register()
        .expect("optimized");
    assert!(p.is_optimized());
    assert_eq!(black_box(f)(4, 3), (4 + 10 + 1) * 3 + 2, "the handler's write reached the function");
    assert_eq!(p.nhit(), 1);
    p.disable().unwrap();
    assert_eq!(p.why_not_optimized(), Some(NotOptimized::Disabled));
    assert_eq!(black_box(f)(4, 3), 17);
    p.enable().unwrap();
    assert!(p.is_optimized(), "optimized again when enabled: {:?}", p.why_not_optimized());
    assert_eq!(black_box(f)(4, 3), 47);
}

#[test]
fn a_handler_that_changes_the_pc_is_followed() {
    let f = opt_mid2 as extern "C" fn(u64, u64) -> u64;
    let skip = addr(opt_mid2_skip) as u64;
    // SAFETY: resuming at opt_mid2_skip skips `add 1; mul`, which opt_mid2 is correct without.
    let p = unsafe { Probe::builder().address(addr(opt_mid2_at)).pre_mut(move |r: &mut PtRegs| r.set_instruction_pointer(skip)) }
        .optimize(Optimize::Required)
        .register()
        .expect("optimized");
    assert_eq!(black_box(f)(4, 3), 4 + 2, "resumed at the new pc, the displaced instructions skipped");
    assert_eq!(black_box(f)(9, 9), 11);
    assert_eq!(p.nhit(), 2);
}

#[test]
fn the_flags_survive_the_detour() {
    let f = opt_flags as extern "C" fn(u64, u64) -> u64;
    // A handler that does arithmetic (and so changes the flags of its own code).
    let p = Probe::builder()
        .address_safe(addr(opt_flags_at))
        .pre(|r: &PtRegs| {
            black_box(r.arg(0).unwrap_or(0).wrapping_sub(r.arg(1).unwrap_or(0)));
        })
        .optimize(Optimize::Required)
        .register()
        .expect("optimized");
    for (x, y) in [(1, 2), (2, 1), (5, 5), (0, u64::MAX)] {
        assert_eq!(black_box(f)(x, y), (x < y) as u64, "{x} < {y}");
    }
    assert_eq!(p.nhit(), 4);
}

/// `ProbeBuilder::address` for this test's own code labels.
trait AddressSafe {
    fn address_safe(self, at: usize) -> Self;
}
impl AddressSafe for probe_rt::ProbeBuilder {
    fn address_safe(self, at: usize) -> Self {
        // SAFETY: every caller passes a label of this test's code, an instruction.
        unsafe { self.address(at) }
    }
}

#[test]
fn pc_relative_data_is_reached_from_the_detour() {
    let f = opt_riprel as extern "C" fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(|_: &PtRegs| {}).optimize(Optimize::Required).register().expect("optimized");
    assert_eq!(black_box(f)(1), 0x1001);
    assert_eq!(p.nhit(), 1);
}

static ORDER: AtomicU64 = AtomicU64::new(0);

#[test]
fn probes_at_one_address_share_one_detour() {
    let f = opt_busy as extern "C" fn(u64) -> u64;
    let first = Probe::builder().function(f).pre(|_: &PtRegs| {
        let _ = ORDER.compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed);
    });
    let second = Probe::builder().function(f).pre(|_: &PtRegs| {
        let _ = ORDER.compare_exchange(1, 2, Ordering::Relaxed, Ordering::Relaxed);
    });
    let a = first.register().unwrap();
    let b = second.register().unwrap();
    assert!(a.is_optimized() && b.is_optimized(), "{:?} {:?}", a.why_not_optimized(), b.why_not_optimized());
    assert_eq!(black_box(f)(2), 7);
    assert_eq!(ORDER.load(Ordering::Relaxed), 2, "both ran, in registration order");
    assert_eq!((a.nhit(), b.nhit()), (1, 1));
    // A post handler at the address: every probe there goes back to the breakpoint.
    let post = Probe::builder().function(f).pre(|_: &PtRegs| {}).post(|_: &PtRegs| {}).register().unwrap();
    assert_eq!(post.why_not_optimized(), Some(NotOptimized::PostHandler));
    assert_eq!(a.why_not_optimized(), Some(NotOptimized::SharedWithBreakpoint));
    assert!(!jump_in_text(f as usize));
    assert_eq!(refused(Probe::builder().function(f)), NotOptimized::SharedWithBreakpoint, "nor can one that requires it join");
    assert_eq!(black_box(f)(2), 7);
    assert_eq!((a.nhit(), b.nhit(), post.nhit()), (2, 2, 1));
    drop(post);
    assert!(a.is_optimized() && b.is_optimized(), "optimized again without the post handler: {:?}", a.why_not_optimized());
    drop(a);
    assert!(b.is_optimized(), "the other stays optimized");
    assert_eq!(black_box(f)(3), 10);
    assert_eq!(b.nhit(), 3);
    // A probe that must stay a breakpoint cannot join; Never is a breakpoint alone.
    let never = Probe::builder().function(f).optimize(Optimize::Never).register().unwrap();
    assert_eq!(never.why_not_optimized(), Some(NotOptimized::Off));
    assert!(!b.is_optimized());
}

static CALLS: AtomicU64 = AtomicU64::new(0);

#[test]
fn enable_disable_and_unregister_while_threads_call_the_function() {
    let f = opt_ret3 as extern "C" fn(u64) -> u64;
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = n * 7 + t;
                    assert_eq!(black_box(f)(x), x * 3 + 1, "call {n} of thread {t}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut hits = 0;
    for round in 0..30 {
        let before = CALLS.load(Ordering::Relaxed);
        let p = Probe::builder()
            .function(f)
            .pre(|_: &PtRegs| {
                CALLS.fetch_add(1, Ordering::Relaxed);
            })
            .register()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
        if round % 3 == 0 {
            p.disable().unwrap();
            p.enable().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        p.disable().unwrap();
        // Once every handler that started has returned: every hit counted once, by the
        // probe and by its handler.
        // (A grace period fails if no thread answers for 100 ms: on a loaded machine,
        // threads that spin may not be scheduled that long. Tried again.)
        let t = std::time::Instant::now();
        while !probe_rt::__private::grace_period() {
            assert!(t.elapsed() < std::time::Duration::from_secs(20), "no grace period completes");
        }
        let nhit = p.nhit();
        assert_eq!(nhit, CALLS.load(Ordering::Relaxed) - before, "round {round}");
        drop(p);
        hits += nhit;
    }
    stop.store(true, Ordering::Relaxed);
    let calls: u64 = threads.into_iter().map(|t| t.join().expect("every call right")).sum();
    assert!(hits > 0 && hits <= calls, "{hits} hits of {calls} calls");
}

static INNER: AtomicU64 = AtomicU64::new(0);

#[test]
fn a_hit_inside_a_handler_is_missed_and_its_instructions_still_run() {
    let inner = opt_reent as extern "C" fn(u64, u64) -> u64;
    let p = Probe::builder()
        .function(inner)
        .pre(move |_: &PtRegs| {
            INNER.store(black_box(inner)(40, 2), Ordering::Relaxed);
        })
        .register()
        .unwrap();
    assert!(p.is_optimized(), "{:?}", p.why_not_optimized());
    assert_eq!(black_box(inner)(1, 1), 2);
    assert_eq!(INNER.load(Ordering::Relaxed), 42, "the inner call ran the displaced instructions");
    assert_eq!((p.nhit(), p.nmissed()), (1, 1));
}

#[test]
fn a_handler_that_returns_for_the_function_moves_the_stack_pointer() {
    // At opt_pop_at the function has pushed rbx (x86_64) / x29, x30 (aarch64): the
    // handler pops it and returns 99 (a stack pointer neither the probed one nor one
    // word above: the detour resumes through its breakpoint).
    let f = opt_pop as extern "C" fn(u64) -> u64;
    // SAFETY: the handler does what the rest of opt_pop would, with another result.
    let p = unsafe {
        Probe::builder().address(addr(opt_pop_at)).pre_mut(|r: &mut PtRegs| {
            #[cfg(target_arch = "x86_64")]
            {
                let sp = r.rsp as *const u64;
                r.rbx = *sp;
                r.rip = *sp.add(1);
                r.rsp += 16;
                r.rax = 99;
            }
            #[cfg(target_arch = "aarch64")]
            {
                let sp = r.sp as *const u64;
                r.regs[29] = *sp;
                r.regs[30] = *sp.add(1);
                r.sp += 16;
                r.pc = r.regs[30];
                r.regs[0] = 99;
            }
        })
    }
    .optimize(Optimize::Required)
    .register()
    .expect("optimized");
    let rbx_kept = black_box(f)(5);
    assert_eq!(rbx_kept, 99);
    assert_eq!(p.nhit(), 1);
    drop(p);
    assert_eq!(black_box(f)(5), 6);
}

static ENTERED: AtomicU64 = AtomicU64::new(0);
static RETURNED: AtomicU64 = AtomicU64::new(0);

#[test]
fn return_probes_take_an_optimized_entry_and_can_override() {
    let f = opt_retp as extern "C" fn(u64) -> u64;
    let p = ReturnProbe::builder()
        .function(f)
        .optimize(Optimize::Required)
        .entry_handler(|_: &PtRegs, _: &mut ()| {
            ENTERED.fetch_add(1, Ordering::Relaxed);
            true
        })
        .handler(|r: &PtRegs, _: &mut ()| RETURNED.store(r.return_value(), Ordering::Relaxed))
        .register()
        .expect("an optimized entry");
    assert!(p.is_optimized());
    assert_eq!(black_box(f)(2), 0x1002);
    assert_eq!((ENTERED.load(Ordering::Relaxed), RETURNED.load(Ordering::Relaxed)), (1, 0x1002));
    drop(p);
    // Overriding: the function is skipped, its caller gets the value.
    // SAFETY: opt_riprel returns a u64; any value is one.
    let p =
        unsafe { ReturnProbe::builder().function(f).optimize(Optimize::Required).entry_handler_mut(|_: &mut PtRegs, _: &mut ()| probe_rt::Entry::Override(7)) }
            .register()
            .expect("an optimized entry");
    assert_eq!(black_box(f)(2), 7);
    assert_eq!(black_box(f)(3), 7);
    drop(p);
    assert_eq!(black_box(f)(2), 0x1002);
}

#[test]
fn the_listing_says_which_probes_are_optimized() {
    let f = opt_list as extern "C" fn(u64, u64) -> u64;
    let g = opt_list2 as extern "C" fn(u64, u64) -> u64;
    let p = Probe::builder().function(f).register().unwrap();
    let q = Probe::builder().function(g).optimize(Optimize::Never).register().unwrap();
    assert_eq!(q.why_not_optimized(), Some(NotOptimized::Off));
    let list = probe_rt::list();
    let line = |a: usize| list.0.iter().find(|i| i.addr == a).cloned().expect("listed");
    assert!(line(f as usize).optimized, "{:?}", p.why_not_optimized());
    assert!(!line(g as usize).optimized);
    let text = list.to_string();
    let l = text.lines().find(|l| l.starts_with(&format!("{:016x}", f as usize))).expect("a line");
    assert!(l.ends_with("[OPTIMIZED]"), "{l}");
    let l = text.lines().find(|l| l.starts_with(&format!("{:016x}", g as usize))).expect("a line");
    assert!(!l.contains("[OPTIMIZED]"), "{l}");
    p.disable().unwrap();
    assert!(!probe_rt::list().0.iter().any(|i| i.addr == f as usize && i.optimized), "disabled: not optimized");
}

fn refused(b: probe_rt::ProbeBuilder) -> NotOptimized {
    match b.optimize(Optimize::Required).register() {
        Err(Error::NotOptimized { reason, .. }) => reason,
        Err(e) => panic!("another error: {e}"),
        Ok(p) => panic!("optimized: {p:?}"),
    }
}

#[test]
fn what_cannot_be_optimized_is_refused_with_the_reason() {
    assert_eq!(refused(Probe::builder().function(opt_post as extern "C" fn(u64, u64) -> u64).post(|_: &PtRegs| {})), NotOptimized::PostHandler);
    #[cfg(target_arch = "x86_64")]
    {
        unsafe extern "C" {
            safe fn opt_sizeless();
            safe fn opt_short();
            safe fn opt_loop_at();
            safe fn opt_loop_in();
            safe fn opt_table();
            safe fn opt_call_at();
            safe fn opt_leaf();
        }
        assert_eq!(refused(Probe::builder().address_safe(addr(opt_sizeless))), NotOptimized::FunctionSizeUnknown);
        assert!(matches!(refused(Probe::builder().address_safe(addr(opt_short))), NotOptimized::CrossesFunctionEnd { .. }));
        let jump = refused(Probe::builder().address_safe(addr(opt_loop_at)));
        assert!(matches!(jump, NotOptimized::JumpIntoWindow { to, .. } if to == addr(opt_loop_in)), "{jump:?}");
        assert!(matches!(refused(Probe::builder().address_safe(addr(opt_table))), NotOptimized::IndirectJumpInFunction { .. }));
        assert!(matches!(refused(Probe::builder().address_safe(addr(opt_call_at))), NotOptimized::UnrelocatableInstruction { .. }));
        unsafe extern "C" {
            safe fn opt_data_in_text();
        }
        assert!(matches!(refused(Probe::builder().address_safe(addr(opt_data_in_text))), NotOptimized::UndecodableFunction { .. }));
        // The same probes when possible: breakpoints, that say why.
        let p = Probe::builder().address_safe(addr(opt_call_at)).register().unwrap();
        assert!(matches!(p.why_not_optimized(), Some(NotOptimized::UnrelocatableInstruction { .. })));
        drop(p);
        let _ = opt_leaf;
        // Another probe inside the window: refused; and an optimized probe goes back
        // to its breakpoint when one comes inside its window.
        let (at, imul) = (addr(opt_win_at), addr(opt_win_at) + 4);
        let inside = Probe::builder().address_safe(imul).register().unwrap();
        assert_eq!(refused(Probe::builder().address_safe(at)), NotOptimized::ProbeInWindow { at: imul });
        drop(inside);
        let outer = Probe::builder().address_safe(at).register().unwrap();
        assert!(outer.is_optimized(), "{:?}", outer.why_not_optimized());
        let inside = Probe::builder().address_safe(imul).register().unwrap();
        assert_eq!(outer.why_not_optimized(), Some(NotOptimized::ProbeInWindow { at: imul }));
        assert!(inside.is_optimized(), "{:?}", inside.why_not_optimized());
        assert_eq!(black_box(opt_win as extern "C" fn(u64, u64) -> u64)(4, 3), 17);
        assert_eq!((outer.nhit(), inside.nhit()), (1, 1));
        drop(inside);
        assert!(outer.is_optimized(), "optimized again once the probe inside is gone: {:?}", outer.why_not_optimized());
        assert_eq!(black_box(opt_win as extern "C" fn(u64, u64) -> u64)(4, 3), 17);
        assert_eq!(outer.nhit(), 2);
    }
    #[cfg(target_arch = "aarch64")]
    {
        unsafe extern "C" {
            safe fn opt_blr30(x: u64) -> u64;
            safe fn opt_blr30_at();
        }
        assert!(matches!(refused(Probe::builder().address_safe(addr(opt_blr30_at))), NotOptimized::UnrelocatableInstruction { .. }));
        let p = Probe::builder().address_safe(addr(opt_blr30_at)).register().unwrap();
        assert!(!p.is_optimized());
        assert_eq!(black_box(opt_blr30 as extern "C" fn(u64) -> u64)(1), 2, "a breakpoint then");
    }
}

#[cfg(target_arch = "aarch64")]
#[test]
fn every_pc_relative_class_runs_in_the_detour() {
    unsafe extern "C" {
        safe fn opt_ldrlit(x: u64) -> u64;
        safe fn opt_ldrlit_at();
        safe fn opt_ldrw(x: u64) -> u64;
        safe fn opt_ldrw_at();
        safe fn opt_ldrq(x: u64) -> u64;
        safe fn opt_ldrq_at();
        safe fn opt_adrp(x: u64) -> u64;
        safe fn opt_adrp_at();
        safe fn opt_bcond(x: u64) -> u64;
        safe fn opt_bcond_at();
        safe fn opt_cbz(x: u64) -> u64;
        safe fn opt_cbz_at();
        safe fn opt_tbnz(x: u64) -> u64;
        safe fn opt_tbnz_at();
        safe fn opt_bl(x: u64) -> u64;
        safe fn opt_bl_at();
        safe fn opt_blr(x: u64) -> u64;
        safe fn opt_blr_at();
        safe fn opt_b(x: u64) -> u64;
        safe fn opt_b_at();
        safe fn opt_ret(x: u64) -> u64;
        safe fn opt_ret_at();
    }
    let cases: [(&str, extern "C" fn(u64) -> u64, unsafe extern "C" fn()); 11] = [
        ("ldr literal", opt_ldrlit, opt_ldrlit_at),
        ("ldrsw literal", opt_ldrw, opt_ldrw_at),
        ("ldr q literal", opt_ldrq, opt_ldrq_at),
        ("adrp", opt_adrp, opt_adrp_at),
        ("b.cond", opt_bcond, opt_bcond_at),
        ("cbz", opt_cbz, opt_cbz_at),
        ("tbnz", opt_tbnz, opt_tbnz_at),
        ("bl", opt_bl, opt_bl_at),
        ("blr", opt_blr, opt_blr_at),
        ("b", opt_b, opt_b_at),
        ("ret", opt_ret, opt_ret_at),
    ];
    for (name, f, at) in cases {
        let inputs = [0u64, 2, 3, 9, 10, 11];
        let expected: Vec<u64> = inputs.iter().map(|&x| f(x)).collect();
        let p = Probe::builder().address_safe(addr(at)).pre(|_: &PtRegs| {}).optimize(Optimize::Required).register().unwrap_or_else(|e| panic!("{name}: {e}"));
        let got: Vec<u64> = inputs.iter().map(|&x| black_box(f)(x)).collect();
        assert_eq!(got, expected, "{name}");
        assert_eq!(p.nhit(), inputs.len() as u64, "{name}");
    }
}

static BATCH_HITS: AtomicU64 = AtomicU64::new(0);

#[test]
fn batches_are_optimized_together_and_a_required_member_that_cannot_be_fails_them() {
    let fs: [extern "C" fn(u64) -> u64; 3] = [opt_batch1, opt_batch2, opt_batch3];
    let count = |_: &PtRegs| {
        BATCH_HITS.fetch_add(1, Ordering::Relaxed);
    };
    let handles = probe_rt::register_batch(fs.iter().map(|f| Probe::builder().function(*f).pre(count).optimize(Optimize::Required))).expect("a batch");
    for (k, (f, h)) in fs.iter().zip(&handles).enumerate() {
        assert!(h.is_optimized(), "member {k}: {:?}", h.why_not_optimized());
        assert_eq!(black_box(f)(10), 11 + k as u64);
    }
    assert_eq!(BATCH_HITS.load(Ordering::Relaxed), 3);
    probe_rt::unregister_batch(handles).expect("unregistered");
    for f in fs {
        assert!(!jump_in_text(f as usize), "the jumps are out");
    }
    // A member that requires optimization and has a post handler: nothing is armed.
    let members = [
        Probe::builder().function(opt_batch1 as extern "C" fn(u64) -> u64).pre(count),
        Probe::builder().function(opt_batch2 as extern "C" fn(u64) -> u64).post(|_: &PtRegs| {}).optimize(Optimize::Required),
    ];
    let e = probe_rt::register_batch(members).expect_err("refused");
    assert_eq!(e.index, 1);
    assert!(matches!(e.error, Error::NotOptimized { reason: NotOptimized::PostHandler, .. }), "{e}");
    assert!(!probe_rt::list().0.iter().any(|i| i.addr == opt_batch1 as *const () as usize), "nothing of the batch is left");
    assert_eq!(black_box(opt_batch1 as extern "C" fn(u64) -> u64)(10), 11);
    assert_eq!(BATCH_HITS.load(Ordering::Relaxed), 3);
}

static MULTI_HITS: AtomicU64 = AtomicU64::new(0);

#[test]
fn multi_function_probes_take_optimized_entries() {
    let m = probe_rt::MultiProbe::builder()
        .function(opt_multi1 as extern "C" fn(u64) -> u64)
        .function(opt_multi2 as extern "C" fn(u64) -> u64)
        .entry(|_: &PtRegs, _, _: &mut ()| {
            MULTI_HITS.fetch_add(1, Ordering::Relaxed);
            false
        })
        .register()
        .expect("attached");
    let list = probe_rt::list();
    for f in [opt_multi1 as extern "C" fn(u64) -> u64, opt_multi2] {
        assert!(list.0.iter().any(|i| i.addr == f as usize && i.optimized), "{list}");
    }
    assert_eq!(black_box(opt_multi1 as extern "C" fn(u64) -> u64)(1) + black_box(opt_multi2 as extern "C" fn(u64) -> u64)(1), 5);
    assert_eq!(MULTI_HITS.load(Ordering::Relaxed), 2);
    drop(m);
}

/// Clobbers the vector registers a mid-function probe's handler may use (as a handler
/// calling a vectorised `memcpy` would).
fn clobber_vectors() {
    // SAFETY: the registers are declared clobbered.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::asm!("pxor xmm8, xmm8", "pcmpeqd xmm0, xmm0", out("xmm8") _, out("xmm0") _);
    }
    // SAFETY: as above.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        std::arch::asm!("movi v16.2d, #0", "movi v0.2d, #0", out("v16") _, out("v0") _);
    }
}

#[test]
fn the_vector_registers_survive_a_mid_function_detour() {
    let f = opt_vec as extern "C" fn(u64) -> u64;
    let p = Probe::builder().address_safe(addr(opt_vec_at)).pre(|_: &PtRegs| clobber_vectors()).optimize(Optimize::Required).register().expect("optimized");
    assert_eq!(black_box(f)(0x1234_5678_9abc), 0x1234_5678_9abc, "xmm8 / v16 kept");
    assert_eq!(p.nhit(), 1);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // The AVX-512 state too, in code that may have it live (opt_vec is legacy SSE
        // code, which cannot read zmm16: there it is the handler's, see mid_sse.rs):
        // zmm16 across the detour.
        use vectors::{all_ones_through, clobber_zmm16};
        drop(p);
        let p = Probe::builder()
            .address_safe(addr(opt_vec_avx_at))
            // SAFETY: the CPU has AVX-512 (checked above).
            .pre(|_: &PtRegs| unsafe { clobber_zmm16() })
            .optimize(Optimize::Required)
            .register()
            .expect("optimized");
        let mut out = [0u64; 8];
        // SAFETY: zmm16 is loaded with all ones, opt_vec_avx (which keeps zmm16: it uses
        // xmm8 and rax only) runs through the probe, and zmm16 is stored to `out`; the
        // call clobbers what the C ABI lets it.
        unsafe { all_ones_through(opt_vec_avx as *const (), 7, &mut out) };
        assert_eq!(out, [u64::MAX; 8], "zmm16 kept");
        assert_eq!(p.nhit(), 1);
    }
}
