//! The x86_64 FP/SIMD steps: the vector argument and return registers (whole, in the
//! wide modes), and all of the state (`xsave`, `xsavec`, or the moves of what is in
//! use).

use super::*;

/// The FP/SIMD steps of mode `fp` over the area at `at`, and the operands they read
/// (`xsave_size`, `xsave_mask`, `wide_mode`).
pub(super) fn steps(fp: Fp, at: u64) -> (Vec<Step>, &'static [&'static str]) {
    match fp {
        Fp::None => (Vec::new(), &[]),
        Fp::Args | Fp::Return | Fp::ArgsWide | Fp::ReturnWide => {
            let n = vector_regs(fp);
            let mut steps = low_halves(at, n);
            if !fp.is_wide() {
                return (steps, &[]);
            }
            steps.push(wide_step(at, n, n));
            (steps, &["wide_mode"])
        }
        // Restore runs the steps in reverse: the wide step's (legacy `movaps` reloads the
        // low halves under the bits it put back), the x87 stack's `fxrstor` (which loads
        // xmm0-15 and MXCSR too), the low halves', then MXCSR's.
        Fp::Sse => {
            let mut steps = vec![mxcsr_step(at + 64 * SSE_REGS + 8)];
            steps.extend(low_halves(at, SSE_REGS));
            steps.push(x87_stack_step(at + SSE_FX));
            steps.push(wide_step(at, SSE_REGS, SSE_REGS));
            (steps, &["wide_mode"])
        }
        Fp::FullInUse => (vec![in_use_step(at)], &["xsave_size", "xsave_mask"]),
        Fp::Full | Fp::FullCompact => {
            let mut save = zero_xsave_header(at);
            let mask = xsave_mask();
            let (m, encoding) = mem(at);
            let acc = |dir| Access { dir, slots: vec![(at, 512, Slot::Fp("xsave".into()))], encoding };
            save.extend(mask.clone());
            save.push(match fp {
                Fp::FullCompact => Op::mem(format!("xsavec64 {m}"), "all FP/SIMD state of the mask but components in their initial state", acc(Dir::Store)),
                _ => Op::mem(format!("xsave64 {m}"), "all FP/SIMD state of the mask", acc(Dir::Store)),
            });
            let mut restore = mask.to_vec();
            restore.push(Op::mem(format!("xrstor64 {m}"), "all FP/SIMD state of the mask", acc(Dir::Load)));
            (vec![Step { save, restore }], &["xsave_size", "xsave_mask"])
        }
    }
}

/// The low 128 bits of `xmm0`..`xmm{n-1}`, one step each, at the FP area's start (`at`).
/// Legacy `movaps`: its load keeps the bits above 127, which the wide step restored
/// before it (restore runs the steps in reverse).
fn low_halves(at: u64, n: u64) -> Vec<Step> {
    (0..n)
        .map(|i| {
            let off = at + 16 * i;
            let (m, encoding) = mem(off);
            let slot = Slot::Fp(format!("xmm{i}"));
            let acc = |dir| Access { dir, slots: vec![(off, 16, slot.clone())], encoding };
            Step {
                save: vec![Op::mem(format!("movaps xmmword ptr {m}, xmm{i}"), format!("xmm{i} @{off}"), acc(Dir::Store))],
                restore: vec![Op::mem(format!("movaps xmm{i}, xmmword ptr {m}"), format!("xmm{i} @{off}"), acc(Dir::Load))],
            }
        })
        .collect()
}

/// MXCSR at `at` (and, at `at + 4`, as the handler left it): saved, and reloaded only
/// if the handler changed it (`ldmxcsr` costs ~4 ns: it serialises the FP control
/// state). Legacy `stmxcsr`/`ldmxcsr`: the step needs no AVX.
fn mxcsr_step(at: u64) -> Step {
    let access = |dir| {
        let (m, encoding) = mem(at);
        (m, Access { dir, slots: vec![(at, 4, Slot::Fp("mxcsr".into()))], encoding })
    };
    let (m, store) = access(Dir::Store);
    let (_, load) = access(Dir::Load);
    let (now, _) = mem(at + 4);
    Step {
        save: vec![Op::mem(format!("stmxcsr dword ptr {m}"), format!("MXCSR @{at}"), store)],
        restore: vec![
            Op::new(format!("stmxcsr dword ptr {now}"), format!("MXCSR now @{}", at + 4)),
            Op::mem(format!("mov eax, dword ptr {m}"), format!("MXCSR @{at}"), load),
            Op::new(format!("cmp eax, dword ptr {now}"), ""),
            Op::new("je 5f", "unchanged"),
            Op::new(format!("ldmxcsr dword ptr {m}"), "the probed code's"),
            Op::new("5:", ""),
        ],
    }
}

/// `Fp::Sse`'s x87 stack: code with no x87 instruction can still have values on it (a
/// `long double` a callee returned in `st0`, on its way to the caller), which a
/// handler's x87 or MMX code would overwrite. Where the status word's TOP says values
/// are there, `fxsave64` into the 512-byte area at `fx` keeps them (its bytes 464 on
/// are software's: the word there says whether it did); an empty stack (a stack of
/// eight values, or MMX state, looks so too) costs the `fnstsw` alone.
fn x87_stack_step(fx: u64) -> Step {
    let ((area, _), (flag, _)) = (mem(fx), mem(fx + 464));
    Step {
        save: vec![
            Op::new("fnstsw ax", "x87 status word"),
            Op::new("test ax, 0x3800", "TOP: 0 when the stack is empty"),
            Op::new(format!("mov qword ptr {flag}, 0"), format!("x87 stack not kept @{}", fx + 464)),
            Op::new("jz 4f", "empty: nothing to keep"),
            Op::new(format!("fxsave64 {area}"), format!("values on the x87 stack: the legacy region @{fx}")),
            Op::new(format!("mov qword ptr {flag}, 1"), "kept"),
            Op::new("4:", ""),
        ],
        restore: vec![
            Op::new(format!("cmp qword ptr {flag}, 0"), ""),
            Op::new("je 4f", ""),
            Op::new(format!("fxrstor64 {area}"), "the x87 stack (and xmm0-15, MXCSR: reloaded after)"),
            Op::new("4:", ""),
        ],
    }
}

/// The wide modes' upper halves of the first `n` of the `low` vector registers whose
/// low 128 bits the FP area starts with (at `at`): above them, the bits 128-255 of
/// each of the `n` (`ymm`), then the bits 256-511 of each (`zmm`), then the word of
/// which to put back: bit 2 for the ymm halves, bit 6 for the zmm bits (as XCR0 &
/// XINUSE gives them).
///
/// Save, as the `wide_mode` operand says ([`Fp::WIDE_ASK`], [`Fp::WIDE_ZMM`]): either ask the
/// CPU which state is in use (`xgetbv` with `ecx = 1`) and keep what is, or keep the
/// upper parts whatever they hold (the zmm bits where `Fp::WIDE_ZMM` says XCR0 enables
/// ZMM_Hi256) and put back those that are not zero. The question costs ~2.7 ns on some
/// CPUs and ~12 on others (AMD Zen 4), the test ~2 ns; but on AVX-512 CPUs with
/// frequency licences (Intel's Skylake-SP) the test's 512-bit instructions on every
/// hit would lower the core's clock, and the question keeps them to hits that meet
/// AVX-512 state in use. The zmm bits go first (EVEX `vextractf64x4`), then the ymm
/// halves; on the test's path `xmm0`/`ymm0`, saved by then, ORs them. Restore, in the
/// mirror order and before the low halves are reloaded (legacy `movaps` keeps the bits
/// above): the ymm halves (`vinsertf128`, which zeroes bits 256 on), then the zmm bits
/// if their bit says so; or, with neither bit, `vzeroupper`, which zeroes the upper
/// halves a handler may have left (on the test's path those of the registers past `n`
/// too: caller-saved, dead where these modes run), keeps bits 0-127, and leaves the
/// state in its initial configuration, as it was or with the same values.
fn wide_step(at: u64, low: u64, n: u64) -> Step {
    let ymm_at = at + 16 * low;
    let zmm_at = ymm_at + 16 * n;
    let flag_at = zmm_at + 32 * n;
    let access = |dir, off, size, what: String| {
        let (m, encoding) = mem(off);
        (m, Access { dir, slots: vec![(off, size, Slot::Fp(what))], encoding })
    };
    let mut save = vec![
        Op::new(format!("test byte ptr [rip + {{wide_mode}}], {:#x}", Fp::WIDE_ASK), "ask the CPU which state is in use?"),
        Op::new("jz 10f", "no: keep the upper parts, then test them"),
        Op::new("mov ecx, 1", "xgetbv 1: which state components are in use (ecx stays 1: asked)"),
        Op::new("xgetbv", "eax = XCR0 & XINUSE (edx: the high half)"),
        Op::new("and eax, 0x44", "AVX (ymm upper halves) | ZMM_Hi256 (zmm0-15 bits 256-511): those in use"),
        Op::new("jmp 11f", ""),
        Op::new("10:", ""),
        Op::new("xor ecx, ecx", "not asked (the word is read once)"),
        Op::new("movzx eax, byte ptr [rip + {wide_mode}]", ""),
        Op::new(format!("and eax, {:#x}", Fp::WIDE_ZMM), "the zmm bits where XCR0 enables them"),
        Op::new("or eax, 0x04", "the ymm halves always"),
        Op::new("11:", ""),
        Op::new("test al, 0x40", "the zmm bits"),
        Op::new("jz 6f", ""),
    ];
    for i in 0..n {
        let (m, a) = access(Dir::Store, zmm_at + 32 * i, 32, format!("zmm{i} bits 256-511"));
        save.push(Op::mem(format!("vextractf64x4 ymmword ptr {m}, zmm{i}, 1"), format!("zmm{i} bits 256-511 @{}", zmm_at + 32 * i), a));
    }
    // The ymm halves with either part: the restore puts them back whenever it puts
    // anything back (XINUSE may say ZMM_Hi256 alone).
    save.extend([Op::new("6:", ""), Op::new("test al, 0x44", "the ymm halves"), Op::new("jz 7f", "")]);
    for i in 0..n {
        let (m, a) = access(Dir::Store, ymm_at + 16 * i, 16, format!("ymm{i} bits 128-255"));
        save.push(Op::mem(format!("vextractf128 xmmword ptr {m}, ymm{i}, 1"), format!("ymm{i} bits 128-255 @{}", ymm_at + 16 * i), a));
    }
    // The test's path: which of what it kept are not zero.
    save.extend([
        Op::new("7:", ""),
        Op::new("test ecx, ecx", ""),
        Op::new("jnz 9f", "asked: eax says which to put back"),
        Op::new("mov edx, eax", "which were kept"),
        Op::new("xor eax, eax", ""),
    ]);
    save.extend(or_test(ymm_at, 16, n));
    save.extend([
        Op::new("setnz al", ""),
        Op::new("shl eax, 2", "bit 2: some ymm half not zero"),
        Op::new("test dl, 0x40", "the zmm bits, if kept"),
        Op::new("jz 9f", ""),
    ]);
    save.extend(or_test(zmm_at, 32, n));
    save.extend([Op::new("jz 9f", "all zero"), Op::new("or eax, 0x40", "bit 6: some zmm bits not zero"), Op::new("9:", "")]);
    let (m, a) = access(Dir::Store, flag_at, 8, "in use".into());
    save.push(Op::mem(format!("mov qword ptr {m}, rax"), format!("which to put back @{flag_at}"), a));

    let mut restore = Vec::new();
    let mut zmm_restore = Vec::new();

    let (m, a) = access(Dir::Load, flag_at, 8, "in use".into());
    restore.push(Op::mem(format!("mov rax, qword ptr {m}"), format!("which to put back @{flag_at}"), a));
    restore.extend([
        Op::new("test eax, eax", ""),
        Op::new("jnz 8f", "some: put them back"),
        Op::new(
            "vzeroupper",
            "none (not in use, or zero): zero and in their initial state (bits 0-127 kept; a handler's AVX state left behind would cost the probed code)",
        ),
        Op::new("jmp 9f", ""),
        Op::new("8:", ""),
    ]);
    for i in (0..n).rev() {
        let (m, a) = access(Dir::Load, ymm_at + 16 * i, 16, format!("ymm{i} bits 128-255"));
        restore.push(Op::mem(
            format!("vinsertf128 ymm{i}, ymm{i}, xmmword ptr {m}, 1"),
            format!("ymm{i} bits 128-255 @{} (bits 256 on: zero)", ymm_at + 16 * i),
            a,
        ));
        let (m, a) = access(Dir::Load, zmm_at + 32 * i, 32, format!("zmm{i} bits 256-511"));
        zmm_restore.push(Op::mem(format!("vinsertf64x4 zmm{i}, zmm{i}, ymmword ptr {m}, 1"), format!("zmm{i} bits 256-511 @{}", zmm_at + 32 * i), a));
    }
    restore.extend([Op::new("test al, 0x40", "the zmm bits"), Op::new("jz 9f", "not to put back: bits 256 on stay zero")]);
    restore.extend(zmm_restore);
    restore.push(Op::new("9:", ""));
    Step { save, restore }
}

/// The wide step's test: the OR of the `n` parts of `width` bytes (16 or 32) stored
/// from `at` on, into `xmm0` or `ymm0` (saved by then), and `vptest` of it: ZF set if
/// all are zero. AVX only (`vorps`, bitwise as `vpor`, needs no AVX2 at 256 bits).
fn or_test(at: u64, width: u64, n: u64) -> Vec<Op> {
    let (reg, ptr) = if width == 16 { ("xmm0", "xmmword") } else { ("ymm0", "ymmword") };
    let part = |i: u64| mem(at + width * i).0;
    let mut ops = vec![Op::new(format!("vmovups {reg}, {ptr} ptr {}", part(0)), format!("the OR of the {n} parts from @{at}"))];
    ops.extend((1..n).map(|i| Op::new(format!("vorps {reg}, {reg}, {ptr} ptr {}", part(i)), "")));
    ops.push(Op::new(format!("vptest {reg}, {reg}"), ""));
    ops
}

/// The stores that zero the header of the `xsave` area at `at` (its 64 bytes at 512):
/// `xrstor` faults on a dirty one.
fn zero_xsave_header(at: u64) -> Vec<Op> {
    (0..8)
        .map(|i| {
            let off = at + 512 + 8 * i;
            let (m, encoding) = mem(off);
            Op::mem(
                format!("mov qword ptr {m}, 0"),
                "zero the xsave header: xrstor faults on a dirty one",
                Access { dir: Dir::Store, slots: vec![(off, 8, Slot::Fp(format!("xsave header {i}")))], encoding },
            )
        })
        .collect()
}

/// The requested-feature bitmap of `xsave`/`xrstor` in edx:eax, from the `xsave_mask`
/// operand.
fn xsave_mask() -> [Op; 2] {
    [
        Op::new("mov eax, dword ptr [rip + {xsave_mask}]", "requested-feature bitmap, low half"),
        Op::new("mov edx, dword ptr [rip + {xsave_mask} + 4]", "requested-feature bitmap, high half"),
    ]
}

/// Components `Fp::FullInUse` keeps with moves (x87, SSE, AVX, opmask, ZMM_Hi256,
/// Hi16_ZMM) or leaves alone (PKRU, bit 9): any other in use takes the `xsavec64` path.
/// Bit 8 (PT state, never in XCR0) is the routine's own: set when x87 went with
/// `fxsave64`, so that the restore does not decide by the area, which the handler may
/// write.
const IN_USE_MOVED: u64 = 0x3e7;
/// The in-use word's bit for "the legacy region went with `fxsave64`".
const FXSAVED: u64 = 0x100;

/// `Fp::FullInUse`: the state in use, kept with moves at its offsets in the standard
/// `xsave` layout of the run-time area at `at`, the in-use word at `at - 8`.
///
/// Save: `xgetbv` with `ecx = 1` gives XCR0 & XINUSE, kept in r8 (saved by now, as
/// every caller-saved register) as far as the area has room for it (`xsave_mask`, 0
/// before `init_xsave`: then x87 and SSE only). A component outside `IN_USE_MOVED` in use: `xsavec64`
/// of the whole mask. Else the upper parts in use, in the order their restore mirrors
/// (zmm bits 256-511, ymm bits 128-255, k0-k7, zmm16-31), then the legacy region:
/// MXCSR and xmm0-15 by VEX moves (no SSE/AVX transition), and of x87 state in use
/// the status and control words (x87 state is in use in every thread that ever took
/// a signal: the kernel's `sigreturn` leaves it so), or `fxsave64` of the whole region
/// when the status word's TOP says values are on the x87 stack (`FXSAVED` in the word).
/// Restore: `vzeroupper`
/// (bits 128 on of zmm0-15 in their initial state, and the handler's upper state
/// gone), the legacy region (`vmovaps` loads keep bits 128 on zero; MXCSR reloaded
/// only if the handler changed it; the x87 words written back only if the handler
/// changed them, and x87 reset if it was in its initial state and the handler left a
/// status), the upper parts that were in use (ymm with VEX `vinsertf128`, which zeroes
/// bits 256 on, before the zmm bits); then zmm16-31 and k0-k7, where they were in their
/// initial state at the entry and are in use now, zeroed. Only the moves of the vector
/// registers and MXCSR, and the header's zeroing, record their accesses: the `fxsave`
/// and `xsavec` paths write the same area.
fn in_use_step(at: u64) -> Step {
    let [(_, ymm, _), (_, k, _), (_, zmm, _), (_, hi16, _)] = Fp::IN_USE_COMPONENTS;
    let (ymm_at, k_at, zmm_at, hi16_at) = (at + ymm, at + k, at + zmm, at + hi16);
    let access = |dir, off, size, what: String| {
        let (m, encoding) = mem(off);
        (m, Access { dir, slots: vec![(off, size, Slot::Fp(format!("xsave {what}")))], encoding })
    };
    let (area, _) = mem(at);
    let (flag, flag_access) = access(Dir::Store, at - 8, 8, "in use".into());
    let mut save = vec![
        Op::new("mov ecx, 1", "xgetbv 1: which state components are in use"),
        Op::new("xgetbv", "edx:eax = XCR0 & XINUSE"),
        Op::new("shl rdx, 32", ""),
        Op::new("or rax, rdx", ""),
        // Before `init_xsave` set the mask (a hit in an earlier constructor) it is 0 and
        // the area only the legacy region and header: then only x87 and SSE are kept.
        Op::new("mov r8, qword ptr [rip + {xsave_mask}]", "what the area has room for (XCR0; 0 before it was read)"),
        Op::new("or r8, 3", "x87 and SSE: the legacy region, always there"),
        Op::new("and r8, rax", "r8 = the in-use word (r8 is saved by now)"),
        Op::new(format!("test r8, {}", !IN_USE_MOVED as i64), "a component the moves do not keep (AMX, APX, ...)?"),
        Op::new("jnz 8f", "in use: xsavec of everything"),
        Op::new("test r8b, 0x40", "ZMM_Hi256 (zmm0-15 bits 256-511)"),
        Op::new("jz 1f", "not in use: zero"),
    ];
    let mut restore = Vec::new();
    let mut upper_restore = Vec::new();
    for i in 0..16 {
        let (m, a) = access(Dir::Store, zmm_at + 32 * i, 32, format!("zmm{i} bits 256-511"));
        save.push(Op::mem(format!("vextractf64x4 ymmword ptr {m}, zmm{i}, 1"), format!("zmm{i} bits 256-511 @{}", zmm_at + 32 * i), a));
    }
    save.extend([Op::new("1:", ""), Op::new("test r8b, 0x04", "AVX (ymm0-15 bits 128-255)"), Op::new("jz 2f", "not in use: zero")]);
    for i in 0..16 {
        let (m, a) = access(Dir::Store, ymm_at + 16 * i, 16, format!("ymm{i} bits 128-255"));
        save.push(Op::mem(format!("vextractf128 xmmword ptr {m}, ymm{i}, 1"), format!("ymm{i} bits 128-255 @{}", ymm_at + 16 * i), a));
    }
    save.extend([Op::new("2:", ""), Op::new("test r8b, 0x20", "opmask (k0-7)"), Op::new("jz 3f", "not in use: zero")]);
    for i in 0..8 {
        let (m, a) = access(Dir::Store, k_at + 8 * i, 8, format!("k{i}"));
        save.push(Op::mem(format!("kmovq qword ptr {m}, k{i}"), format!("k{i} @{}", k_at + 8 * i), a));
    }
    save.extend([Op::new("3:", ""), Op::new("test r8b, 0x80", "Hi16_ZMM (zmm16-31)"), Op::new("jz 4f", "not in use: zero")]);
    for i in 16..32 {
        let off = hi16_at + 64 * (i - 16);
        let (m, a) = access(Dir::Store, off, 64, format!("zmm{i}"));
        save.push(Op::mem(format!("vmovaps zmmword ptr {m}, zmm{i}"), format!("zmm{i} @{off}"), a));
    }
    let (fcw, _) = mem(at);
    let (fsw, _) = mem(at + 2);
    save.extend([
        Op::new("4:", ""),
        Op::new("test r8b, 1", "x87 state in use"),
        Op::new("jz 6f", ""),
        Op::new(format!("fnstsw word ptr {fsw}"), "x87 status word, where fxsave puts it"),
        Op::new(format!("test word ptr {fsw}, 0x3800"), "TOP: 0 when the stack is empty"),
        Op::new("jnz 5f", "values on the x87 stack: fxsave keeps them with the legacy region"),
        Op::new(format!("fnstcw word ptr {fcw}"), "x87 control word, where fxsave puts it"),
        Op::new("6:", ""),
    ]);
    let (m, a) = access(Dir::Store, at + 24, 4, "mxcsr".into());
    save.push(Op::mem(format!("vstmxcsr dword ptr {m}"), format!("MXCSR @{}", at + 24), a));
    for i in 0..16 {
        let (m, a) = access(Dir::Store, at + 160 + 16 * i, 16, format!("xmm{i}"));
        save.push(Op::mem(format!("vmovaps xmmword ptr {m}, xmm{i}"), format!("xmm{i} @{}", at + 160 + 16 * i), a));
    }
    save.extend([
        Op::new("jmp 9f", ""),
        Op::new("5:", ""),
        Op::new(format!("fxsave64 {area}"), "x87, MXCSR and xmm0-15: the legacy region"),
        Op::new(format!("or r8d, {FXSAVED:#x}"), "went with fxsave"),
        Op::new("jmp 9f", ""),
        Op::new("8:", ""),
    ]);
    save.extend(zero_xsave_header(at));
    let mask = xsave_mask();
    save.extend(mask.clone());
    save.extend([
        Op::new(format!("xsavec64 {area}"), "all FP/SIMD state of the mask but components in their initial state"),
        Op::new("9:", ""),
        Op::mem(format!("mov qword ptr {flag}, r8"), format!("which were in use @{}", at - 8), flag_access),
    ]);

    let (_, flag_load) = access(Dir::Load, at - 8, 8, "in use".into());
    // 28 bytes of the legacy region's software-available tail (464-511), for `fnstenv`.
    let ((env, _), (env_fsw, _), (env_ftw, _)) = (mem(at + 464), mem(at + 468), mem(at + 472));
    restore.extend([
        Op::mem(format!("mov r8, qword ptr {flag}"), format!("which were in use @{}", at - 8), flag_load),
        Op::new(format!("test r8, {}", !IN_USE_MOVED as i64), ""),
        Op::new("jnz 8f", "saved by xsavec"),
        Op::new("vzeroupper", "bits 128 on of zmm0-15 zero and in their initial state; what was in use is put back below"),
        Op::new("test r8b, 1", "x87 state in use"),
        Op::new("jz 14f", ""),
        Op::new(format!("test r8d, {FXSAVED:#x}"), "values were on the x87 stack"),
        Op::new("jnz 5f", "fxrstor"),
        // The stack was empty: a handler's x87 code (balanced, as the ABI wants it)
        // wrote only registers the probed code has no value in; what it can leave is a
        // status (flags, condition codes) or, against the ABI, a control word. Both
        // compared (~0.5 ns); if either changed, the probed code's are written back
        // into the environment the handler left (fnstenv + fldenv, ~50 ns).
        Op::new("fnstsw ax", ""),
        Op::new(format!("cmp ax, word ptr {fsw}"), ""),
        Op::new("jne 13f", "the status changed"),
        Op::new(format!("fnstcw word ptr {env}"), ""),
        Op::new(format!("mov ax, word ptr {env}"), ""),
        Op::new(format!("cmp ax, word ptr {fcw}"), ""),
        Op::new("je 15f", "neither changed"),
        Op::new("13:", ""),
        Op::new(format!("fnstenv {env}"), "the environment now (28 bytes: control word at 0, status word at 4)"),
        Op::new(format!("mov ax, word ptr {fcw}"), ""),
        Op::new(format!("mov word ptr {env}, ax"), "the probed code's control word"),
        Op::new(format!("mov ax, word ptr {fsw}"), ""),
        Op::new(format!("mov word ptr {env_fsw}, ax"), "the probed code's status word (TOP included)"),
        Op::new(format!("mov word ptr {env_ftw}, -1"), "every register empty, as the stack was (values a handler left are gone)"),
        Op::new(format!("fldenv {env}"), ""),
        Op::new("jmp 15f", ""),
        // x87 state not in use at the entry: what a handler's x87 code left (exception
        // flags, condition codes) is cleared, as fetestexcept would see it. `fninit`
        // costs ~18 ns, `fnstsw` ~0.5: the first only when the status word says so.
        Op::new("14:", ""),
        Op::new("fnstsw ax", "x87 status word: 0 in the initial state"),
        Op::new("test ax, ax", ""),
        Op::new("jz 15f", ""),
        Op::new("fninit", "x87 in its initial state again, as at the entry"),
        Op::new("15:", ""),
    ]);
    for i in (0..16).rev() {
        let (m, a) = access(Dir::Load, at + 160 + 16 * i, 16, format!("xmm{i}"));
        restore.push(Op::mem(format!("vmovaps xmm{i}, xmmword ptr {m}"), format!("xmm{i} @{}", at + 160 + 16 * i), a));
    }
    // `ldmxcsr` costs ~4 ns (it serialises the FP control state): run only when the
    // handler changed MXCSR, which it seldom does.
    let (m, a) = access(Dir::Load, at + 24, 4, "mxcsr".into());
    let (now, _) = mem(at + 28);
    restore.extend([
        Op::new(format!("vstmxcsr dword ptr {now}"), "MXCSR now (the MXCSR_MASK slot: the move path leaves it unused)"),
        Op::mem(format!("mov eax, dword ptr {m}"), format!("MXCSR @{}", at + 24), a),
        Op::new(format!("cmp eax, dword ptr {now}"), ""),
        Op::new("je 4f", "unchanged"),
        Op::new(format!("vldmxcsr dword ptr {m}"), "the probed code's"),
        Op::new("jmp 4f", ""),
        Op::new("5:", ""),
        Op::new(format!("fxrstor64 {area}"), "x87, MXCSR and xmm0-15 (bits 128 on left zero)"),
        Op::new("4:", ""),
        Op::new("test r8b, 0x80", "Hi16_ZMM"),
        Op::new("jz 3f", ""),
    ]);
    for i in (16..32).rev() {
        let off = hi16_at + 64 * (i - 16);
        let (m, a) = access(Dir::Load, off, 64, format!("zmm{i}"));
        restore.push(Op::mem(format!("vmovaps zmm{i}, zmmword ptr {m}"), format!("zmm{i} @{off}"), a));
    }
    restore.extend([Op::new("3:", ""), Op::new("test r8b, 0x20", "opmask"), Op::new("jz 2f", "")]);
    for i in (0..8).rev() {
        let (m, a) = access(Dir::Load, k_at + 8 * i, 8, format!("k{i}"));
        restore.push(Op::mem(format!("kmovq k{i}, qword ptr {m}"), format!("k{i} @{}", k_at + 8 * i), a));
    }
    restore.extend([Op::new("2:", ""), Op::new("test r8b, 0x04", "AVX"), Op::new("jz 1f", "")]);
    for i in (0..16).rev() {
        let (m, a) = access(Dir::Load, ymm_at + 16 * i, 16, format!("ymm{i} bits 128-255"));
        restore.push(Op::mem(
            format!("vinsertf128 ymm{i}, ymm{i}, xmmword ptr {m}, 1"),
            format!("ymm{i} bits 128-255 @{} (bits 256 on: zero)", ymm_at + 16 * i),
            a,
        ));
        let (m, a) = access(Dir::Load, zmm_at + 32 * i, 32, format!("zmm{i} bits 256-511"));
        upper_restore.push(Op::mem(format!("vinsertf64x4 zmm{i}, zmm{i}, ymmword ptr {m}, 1"), format!("zmm{i} bits 256-511 @{}", zmm_at + 32 * i), a));
    }
    restore.extend([Op::new("1:", ""), Op::new("test r8b, 0x40", "ZMM_Hi256"), Op::new("jz 6f", "")]);
    restore.extend(upper_restore);
    restore.extend([
        Op::new("6:", ""),
        // AVX-512 state the XCR0 enables that was in its initial state at the entry.
        Op::new("mov eax, r8d", ""),
        Op::new("not eax", ""),
        Op::new("and eax, dword ptr [rip + {xsave_mask}]", "enabled and not in use at the entry"),
        Op::new("test al, 0xa0", "opmask, Hi16_ZMM"),
        Op::new("jz 9f", "none: nothing a handler could have left there"),
        Op::new("mov ecx, 1", ""),
        Op::new("xgetbv", "in use now"),
        Op::new("mov edx, r8d", ""),
        Op::new("not edx", ""),
        Op::new("and eax, edx", "in use now, not at the entry"),
        Op::new("test al, 0x80", "Hi16_ZMM"),
        Op::new("jz 7f", ""),
    ]);
    for i in 16..32 {
        restore.push(Op::new(format!("vpxord zmm{i}, zmm{i}, zmm{i}"), format!("zmm{i} = 0, as it was")));
    }
    restore.extend([Op::new("7:", ""), Op::new("test al, 0x20", "opmask"), Op::new("jz 9f", "")]);
    for i in 0..8 {
        restore.push(Op::new(format!("kxorq k{i}, k{i}, k{i}"), format!("k{i} = 0, as it was")));
    }
    restore.extend([Op::new("jmp 9f", ""), Op::new("8:", "")]);
    restore.extend(mask);
    restore.extend([Op::new(format!("xrstor64 {area}"), "all FP/SIMD state of the mask"), Op::new("9:", "")]);
    Step { save, restore }
}
