//! Every class of the relocation and simulation tables, probed and executed: each
//! function runs unprobed, then with a probe on the instruction under test whose
//! handler reads the registers; the results must be equal. Where a handler changes a
//! register the instruction reads (flags, an operand), the outcome must follow it.

use probe_rt::{Probe, PtRegs};
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.sim_tests, \"ax\", @progbits",
    // jmp rel
    ".globl sim_jmp",
    ".globl sim_jmp_at",
    "sim_jmp:",
    "sim_jmp_at:",
    "jmp 2f",
    "ud2",
    "2:",
    "lea rax, [rdi + 1]",
    "ret",
    // jcc: 200 if rdi < 10 else 100
    ".globl sim_jcc",
    ".globl sim_jcc_at",
    "sim_jcc:",
    "cmp rdi, 10",
    "sim_jcc_at:",
    "jb 2f",
    "mov eax, 100",
    "ret",
    "2:",
    "mov eax, 200",
    "ret",
    // the same, for the steering test (tests run at once; probes here are shared)
    ".globl steer_jcc",
    ".globl steer_jcc_at",
    "steer_jcc:",
    "cmp rdi, 10",
    "steer_jcc_at:",
    "jb 2f",
    "mov eax, 100",
    "ret",
    "2:",
    "mov eax, 200",
    "ret",
    // call rel: rdi + 11
    ".globl sim_call",
    ".globl sim_call_at",
    "sim_call:",
    "sim_call_at:",
    "call 2f",
    "lea rax, [rax + 1]",
    "ret",
    "2:",
    "lea rax, [rdi + 10]",
    "ret",
    // ret
    ".globl sim_ret",
    ".globl sim_ret_at",
    "sim_ret:",
    "lea rax, [rdi + 2]",
    "sim_ret_at:",
    "ret",
    // loop: counts rdi down, returns the iterations
    ".globl sim_loop",
    ".globl sim_loop_at",
    "sim_loop:",
    "mov rcx, rdi",
    "xor eax, eax",
    "2:",
    "inc rax",
    "sim_loop_at:",
    "loop 2b",
    "ret",
    // rip-relative load, relocated into the slot
    ".globl sim_riprel",
    ".globl sim_riprel_at",
    "sim_riprel:",
    "sim_riprel_at:",
    "mov rax, qword ptr [rip + sim_data]",
    "add rax, rdi",
    "ret",
    // push / pop: the slot runs them on the thread's own stack
    ".globl sim_push",
    ".globl sim_push_at",
    "sim_push:",
    "sim_push_at:",
    "push rdi",
    "pop rax",
    "ret",
    ".globl sim_pop",
    ".globl sim_pop_at",
    "sim_pop:",
    "push rdi",
    "sim_pop_at:",
    "pop rax",
    "ret",
    // call rax: rdi + 21
    ".globl sim_callr",
    ".globl sim_callr_at",
    "sim_callr:",
    "lea rax, [rip + 2f]",
    "sim_callr_at:",
    "call rax",
    "lea rax, [rax + 1]",
    "ret",
    "2:",
    "lea rax, [rdi + 20]",
    "ret",
    // call qword ptr [rip + x]: rdi + 31
    ".globl sim_callm",
    ".globl sim_callm_at",
    "sim_callm:",
    "sim_callm_at:",
    "call qword ptr [rip + sim_ptrs]",
    "lea rax, [rax + 1]",
    "ret",
    "sim_callm_to:",
    "lea rax, [rdi + 30]",
    "ret",
    // jmp rax: rdi + 3
    ".globl sim_jmpr",
    ".globl sim_jmpr_at",
    "sim_jmpr:",
    "lea rax, [rip + 2f]",
    "sim_jmpr_at:",
    "jmp rax",
    "ud2",
    "2:",
    "lea rax, [rdi + 3]",
    "ret",
    // jmp qword ptr [rdi + 8] (the table in rdi, the argument moved to rsi): rsi + 4
    ".globl sim_jmpm",
    ".globl sim_jmpm_at",
    "sim_jmpm:",
    "mov rsi, rdi",
    "lea rdi, [rip + sim_ptrs]",
    "sim_jmpm_at:",
    "jmp qword ptr [rdi + 8]",
    "ud2",
    "sim_jmpm_to:",
    "lea rax, [rsi + 4]",
    "ret",
    // base + index * scale + displacement: call qword ptr [rax + rcx * 8 + 8]: rdi + 41
    ".globl sim_callx",
    ".globl sim_callx_at",
    "sim_callx:",
    "lea rax, [rip + sim_ptrs]",
    "mov ecx, 1",
    "sim_callx_at:",
    "call qword ptr [rax + rcx * 8 + 8]",
    "lea rax, [rax + 1]",
    "ret",
    "sim_callx_to:",
    "lea rax, [rdi + 40]",
    "ret",
    // call qword ptr [rsp]: the operand is read before the return address is pushed: rdi + 51
    ".globl sim_callsp",
    ".globl sim_callsp_at",
    "sim_callsp:",
    "lea rax, [rip + 2f]",
    "push rax",
    "sim_callsp_at:",
    "call qword ptr [rsp]",
    "pop rcx",
    "lea rax, [rax + 1]",
    "ret",
    "2:",
    "lea rax, [rdi + 50]",
    "ret",
    // jmp rax, for the steering test: rdi + 3, or rdi + 300 at steer_jmpr_alt
    ".globl steer_jmpr",
    ".globl steer_jmpr_at",
    ".globl steer_jmpr_alt",
    "steer_jmpr:",
    "lea rax, [rip + 2f]",
    "steer_jmpr_at:",
    "jmp rax",
    "ud2",
    "2:",
    "lea rax, [rdi + 3]",
    "ret",
    "steer_jmpr_alt:",
    "lea rax, [rdi + 300]",
    "ret",
    // refused, never run: fs-relative, 32-bit address, far indirect, 16-bit operand
    ".globl sim_refused_fs",
    ".globl sim_refused_a32",
    ".globl sim_refused_far",
    ".globl sim_refused_16",
    "sim_refused_fs:",
    "jmp qword ptr fs:[0x28]",
    "sim_refused_a32:",
    "call qword ptr [eax]",
    "sim_refused_far:",
    "rex64 jmp fword ptr [rax]",
    "sim_refused_16:",
    ".byte 0x66, 0xff, 0xe0",
    "ud2", // jmp ax
    ".balign 8",
    "sim_data:",
    ".quad 1000",
    ".popsection",
    // The targets of the memory-indirect branches: data, relocated at load (.text is
    // read-only in a PIE).
    ".pushsection .data.sim_tests, \"aw\", @progbits",
    ".balign 8",
    "sim_ptrs:",
    ".quad sim_callm_to",
    ".quad sim_jmpm_to",
    ".quad sim_callx_to",
    ".popsection",
);

#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.sim_tests, \"ax\", %progbits",
    ".globl sim_b",
    ".globl sim_b_at",
    "sim_b:",
    "sim_b_at:",
    "b 2f",
    "brk #9",
    "2:",
    "add x0, x0, #1",
    "ret",
    // bl: x0 + 11
    ".globl sim_bl",
    ".globl sim_bl_at",
    "sim_bl:",
    "mov x9, x30",
    "sim_bl_at:",
    "bl 2f",
    "add x0, x0, #1",
    "mov x30, x9",
    "ret",
    "2:",
    "add x0, x0, #10",
    "ret",
    // b.cond: 200 if x0 < 10 else 100
    ".globl sim_bcond",
    ".globl sim_bcond_at",
    "sim_bcond:",
    "cmp x0, #10",
    "sim_bcond_at:",
    "b.lo 2f",
    "mov x0, #100",
    "ret",
    "2:",
    "mov x0, #200",
    "ret",
    // the same, for the steering test (tests run at once; probes here are shared)
    ".globl steer_bcond",
    ".globl steer_bcond_at",
    "steer_bcond:",
    "cmp x0, #10",
    "steer_bcond_at:",
    "b.lo 2f",
    "mov x0, #100",
    "ret",
    "2:",
    "mov x0, #200",
    "ret",
    ".globl sim_cbz",
    ".globl sim_cbz_at",
    "sim_cbz:",
    "sim_cbz_at:",
    "cbz x0, 2f",
    "mov x0, #1",
    "ret",
    "2:",
    "mov x0, #2",
    "ret",
    ".globl sim_cbnz",
    ".globl sim_cbnz_at",
    "sim_cbnz:",
    "sim_cbnz_at:",
    "cbnz w0, 2f",
    "mov x0, #1",
    "ret",
    "2:",
    "mov x0, #2",
    "ret",
    ".globl sim_tbz",
    ".globl sim_tbz_at",
    "sim_tbz:",
    "sim_tbz_at:",
    "tbnz x0, #3, 2f",
    "mov x0, #1",
    "ret",
    "2:",
    "mov x0, #2",
    "ret",
    ".globl sim_adr",
    ".globl sim_adr_at",
    "sim_adr:",
    "sim_adr_at:",
    "adr x1, sim_data",
    "ldr x1, [x1]",
    "add x0, x0, x1",
    "ret",
    ".globl sim_adrp",
    ".globl sim_adrp_at",
    "sim_adrp:",
    "sim_adrp_at:",
    "adrp x1, sim_data",
    "add x1, x1, :lo12:sim_data",
    "ldr x1, [x1]",
    "add x0, x0, x1",
    "ret",
    ".globl sim_ldr",
    ".globl sim_ldr_at",
    "sim_ldr:",
    "sim_ldr_at:",
    "ldr x1, sim_data",
    "add x0, x0, x1",
    "ret",
    ".globl sim_ldrsw",
    ".globl sim_ldrsw_at",
    "sim_ldrsw:",
    "sim_ldrsw_at:",
    "ldrsw x1, sim_neg",
    "add x0, x0, x1",
    "ret",
    // prfm (literal): a hint, nothing to do but go on
    ".globl sim_prfm",
    ".globl sim_prfm_at",
    "sim_prfm:",
    "sim_prfm_at:",
    "prfm pldl1keep, sim_data",
    "add x0, x0, #6",
    "ret",
    // ldr (literal) into FP/SIMD registers: the register is all ones before, so the
    // result shows whether the bits above the loaded size were zeroed
    ".globl sim_ldrs",
    ".globl sim_ldrs_at",
    "sim_ldrs:",
    "movi v1.2d, #0xffffffffffffffff",
    "sim_ldrs_at:",
    "ldr s1, sim_data",
    "fmov x1, d1",
    "mov x2, v1.d[1]",
    "add x0, x0, x1",
    "eor x0, x0, x2",
    "ret",
    ".globl sim_ldrd",
    ".globl sim_ldrd_at",
    "sim_ldrd:",
    "movi v2.2d, #0xffffffffffffffff",
    "sim_ldrd_at:",
    "ldr d2, sim_neg",
    "fmov x1, d2",
    "mov x2, v2.d[1]",
    "add x0, x0, x1",
    "eor x0, x0, x2",
    "ret",
    ".globl sim_ldrq",
    ".globl sim_ldrq_at",
    "sim_ldrq:",
    "movi v31.2d, #0xffffffffffffffff",
    "sim_ldrq_at:",
    "ldr q31, sim_quad",
    "mov x1, v31.d[0]",
    "mov x2, v31.d[1]",
    "add x0, x0, x1",
    "eor x0, x0, x2",
    "ret",
    // refused, never run: ldr (literal) with opc 0b11 into v1 (unallocated)
    ".globl sim_refused_ldr",
    "sim_refused_ldr:",
    ".inst 0xdc000041",
    "brk #9",
    ".globl sim_br",
    ".globl sim_br_at",
    "sim_br:",
    "adr x1, 2f",
    "sim_br_at:",
    "br x1",
    "brk #9",
    "2:",
    "add x0, x0, #5",
    "ret",
    ".globl sim_blr",
    ".globl sim_blr_at",
    "sim_blr:",
    "mov x9, x30",
    "adr x1, 2f",
    "sim_blr_at:",
    "blr x1",
    "mov x30, x9",
    "ret",
    "2:",
    "add x0, x0, #7",
    "ret",
    ".globl sim_ret",
    ".globl sim_ret_at",
    "sim_ret:",
    "add x0, x0, #3",
    "sim_ret_at:",
    "ret",
    // an ordinary instruction, run out of line
    ".globl sim_add",
    ".globl sim_add_at",
    "sim_add:",
    "sim_add_at:",
    "add x0, x0, #4",
    "ret",
    ".balign 16",
    "sim_quad:",
    ".quad 0x0123456789abcdef",
    ".quad 0xfedcba9876543210",
    ".balign 8",
    "sim_data:",
    ".quad 1000",
    "sim_neg:",
    ".word -5",
    ".word 0",
    ".popsection",
);

static HITS: AtomicU64 = AtomicU64::new(0);
static SEEN: AtomicU64 = AtomicU64::new(0);

fn observe(r: &PtRegs) {
    HITS.fetch_add(1, Ordering::Relaxed);
    SEEN.store(r.arg(0).unwrap_or(0), Ordering::Relaxed);
}

/// Runs `f` unprobed and probed at `at` (with pre, and with pre + post), for each input.
fn check(name: &str, f: extern "C" fn(u64) -> u64, at: usize, inputs: &[u64]) {
    for with_post in [false, true] {
        let expected: Vec<u64> = inputs.iter().map(|&x| f(x)).collect();
        // SAFETY: the address is an instruction of this test's code, not data.
        let mut b = unsafe { Probe::builder().address(at) }.pre(observe);
        if with_post {
            b = b.post(observe);
        }
        let p = b.register().unwrap_or_else(|e| panic!("{name}: {e}"));
        let hits = HITS.load(Ordering::Relaxed);
        let got: Vec<u64> = inputs.iter().map(|&x| std::hint::black_box(f)(x)).collect();
        assert_eq!(got, expected, "{name} (post {with_post}): probed results differ");
        // At least once per call (a `loop` is hit once per iteration).
        assert!(p.nhit() >= inputs.len() as u64, "{name}: {} hits", p.nhit());
        assert!(HITS.load(Ordering::Relaxed) >= hits + inputs.len() as u64 * (1 + with_post as u64), "{name}: handlers ran");
    }
}

macro_rules! cases {
    ($($name:ident $at:ident [$($x:expr),*];)*) => {
        // The test functions above follow the C ABI and touch only scratch registers
        // and their own stack: safe to call. The `_at` labels are only addresses.
        unsafe extern "C" { $(safe fn $name(x: u64) -> u64; safe fn $at();)* }
        #[test]
        fn every_class_runs_as_unprobed() {
            $(check(stringify!($name), $name, $at as *const () as usize, &[$($x),*]);)*
        }
    };
}

#[cfg(target_arch = "x86_64")]
cases! {
    sim_jmp sim_jmp_at [1, 41];
    sim_jcc sim_jcc_at [3, 30];
    sim_call sim_call_at [0, 31];
    sim_ret sim_ret_at [5];
    sim_loop sim_loop_at [1, 7];
    sim_riprel sim_riprel_at [0, 24];
    sim_push sim_push_at [77];
    sim_pop sim_pop_at [78];
    sim_callr sim_callr_at [0, 31];
    sim_callm sim_callm_at [0, 31];
    sim_jmpr sim_jmpr_at [1, 41];
    sim_jmpm sim_jmpm_at [2, 42];
    sim_callx sim_callx_at [3, 43];
    sim_callsp sim_callsp_at [4, 44];
}

#[cfg(target_arch = "aarch64")]
cases! {
    sim_b sim_b_at [1, 41];
    sim_bl sim_bl_at [0, 31];
    sim_bcond sim_bcond_at [3, 30];
    sim_cbz sim_cbz_at [0, 9];
    sim_cbnz sim_cbnz_at [0, 1 << 32, 9];
    sim_tbz sim_tbz_at [8, 7];
    sim_adr sim_adr_at [24];
    sim_adrp sim_adrp_at [25];
    sim_ldr sim_ldr_at [26];
    sim_ldrsw sim_ldrsw_at [100];
    sim_prfm sim_prfm_at [7];
    sim_ldrs sim_ldrs_at [1];
    sim_ldrd sim_ldrd_at [2];
    sim_ldrq sim_ldrq_at [3];
    sim_br sim_br_at [2];
    sim_blr sim_blr_at [3];
    sim_ret sim_ret_at [4];
    sim_add sim_add_at [5];
}

/// A handler that flips the carry flag changes where a simulated conditional branch goes.
fn flip_carry(r: &mut PtRegs) {
    #[cfg(target_arch = "x86_64")]
    {
        r.eflags ^= 1;
    }
    #[cfg(target_arch = "aarch64")]
    {
        r.pstate ^= 1 << 29;
    }
}

#[test]
fn a_handler_steers_a_simulated_branch() {
    #[cfg(target_arch = "x86_64")]
    let (f, at): (extern "C" fn(u64) -> u64, usize) = {
        // SAFETY (declaration): as in `cases!`.
        unsafe extern "C" {
            safe fn steer_jcc(x: u64) -> u64;
            safe fn steer_jcc_at();
        }
        (steer_jcc, steer_jcc_at as *const () as usize)
    };
    #[cfg(target_arch = "aarch64")]
    let (f, at): (extern "C" fn(u64) -> u64, usize) = {
        // SAFETY (declaration): as in `cases!`.
        unsafe extern "C" {
            safe fn steer_bcond(x: u64) -> u64;
            safe fn steer_bcond_at();
        }
        (steer_bcond, steer_bcond_at as *const () as usize)
    };
    assert_eq!((f(3), f(30)), (200, 100));
    // SAFETY: `at` is the conditional branch of `steer_bcond`, whose result either way
    // is one of the two this test expects.
    let p = unsafe { Probe::builder().address(at).pre_mut(flip_carry) }.register().unwrap();
    assert_eq!((std::hint::black_box(f)(3), std::hint::black_box(f)(30)), (100, 200), "the branch follows the handler's flags");
    drop(p);
    assert_eq!((f(3), f(30)), (200, 100));
}

/// A handler that sets rax changes where a simulated `jmp rax` goes.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_handler_steers_a_simulated_indirect_jump() {
    // SAFETY (declaration): as in `cases!`.
    unsafe extern "C" {
        safe fn steer_jmpr(x: u64) -> u64;
        safe fn steer_jmpr_at();
        safe fn steer_jmpr_alt();
    }
    fn to_alt(r: &mut PtRegs) {
        r.rax = steer_jmpr_alt as *const () as u64;
    }
    assert_eq!(steer_jmpr(5), 8);
    // SAFETY: the `jmp rax` of `steer_jmpr`, sent to `steer_jmpr_alt`, written to be
    // jumped to from there.
    let p = unsafe { Probe::builder().address(steer_jmpr_at as *const () as usize).pre_mut(to_alt) }.register().unwrap();
    assert_eq!(std::hint::black_box(steer_jmpr)(5), 305, "the jump follows the handler's rax");
    assert_eq!(p.nhit(), 1);
    drop(p);
    assert_eq!(steer_jmpr(5), 8);
}

/// What is not simulated is refused with a typed error naming the instruction.
#[test]
fn forms_not_simulated_are_refused() {
    #[cfg(target_arch = "x86_64")]
    let refused: [(&str, usize); 4] = {
        // SAFETY (declaration): only their addresses are used; the code never runs.
        unsafe extern "C" {
            safe fn sim_refused_fs();
            safe fn sim_refused_a32();
            safe fn sim_refused_far();
            safe fn sim_refused_16();
        }
        [
            ("fs:", sim_refused_fs as *const () as usize),
            ("[eax]", sim_refused_a32 as *const () as usize),
            ("jmp", sim_refused_far as *const () as usize),
            ("jmp", sim_refused_16 as *const () as usize),
        ]
    };
    #[cfg(target_arch = "aarch64")]
    let refused: [(&str, usize); 1] = {
        // SAFETY (declaration): only its address is used; the code never runs.
        unsafe extern "C" {
            safe fn sim_refused_ldr();
        }
        [("unallocated", sim_refused_ldr as *const () as usize)]
    };
    for (what, at) in refused {
        // SAFETY: the address is an instruction of this test's code, not data.
        match unsafe { Probe::builder().address(at) }.pre(observe).register() {
            Err(probe_rt::Error::UnsupportedInstruction { addr, insn }) => {
                assert_eq!(addr, at);
                assert!(insn.contains(what), "{insn}");
            }
            other => panic!("{what} at {at:#x}: {other:?}"),
        }
    }
}
