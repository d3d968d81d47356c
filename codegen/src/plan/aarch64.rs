//! aarch64 planner (AAPCS64).
//!
//! Stack picture, highest address first (`S` is the stack pointer of the probed context):
//!
//! ```text
//!  S        ──────────────  stack of the probed context (no red zone on Linux arm64)
//!  sp+FP    FP/SIMD area    q registers (and fpcr, fpsr with Fp::Full)
//!  sp+H     hidden spills   caller-saved registers without a field, nzcv, resume address
//!  sp+0     the frame       every field at its struct offset
//! ```
//!
//! `sub sp, sp, #ALLOC` changes no flags, so the registers and `nzcv` are saved as they
//! were. The resume address travels in a register: `x30` for SaveRestore (`bl`) and
//! Kretprobe (the probed function's `ret`), `x16` for Entry and Site. Entry's site is the
//! kernel's `mov x9, x30; bl <trampoline>` (arch/arm64/kernel/entry-ftrace.S): there
//! `x30` is the continuation and `x9` the original link register, which the function
//! finds in `x9` unprobed. The kernel resumes with `ret x9`, which leaves the
//! continuation in `x9`; this routine reloads `x9` (and `x30`) from their fields and
//! resumes with `ret x16` instead: x16 (IP0) carries nothing at a function entry, since
//! AAPCS64 (§6.1.1, 2023Q3) lets the veneers and PLT stubs between a caller and its
//! callee overwrite x16 and x17, so no function can count on what it holds there.
//! `ret`, not `br`: the routine was entered by `bl`, so the return-stack predictor
//! expects this return (a `br` would leave its entry behind and every return above
//! would mispredict), and a `ret` is exempt from BTI's landing-pad check, which a `br`
//! into the function's body would fail in a guarded page.
//!
//! The frame's `pc` field gets the continuation and is loaded into the resume register
//! last, so a handler's write to `pc` redirects execution; the resume register's own
//! field is therefore not reloaded (a handler's write to it has no effect). After a
//! routine it holds the resume address: `x30` as after any call; Entry's `x16`, the
//! one register whose value differs from the unprobed run.
//!
//! Site is Entry with `x30` lowered by the site's 8 bytes first (the pc field gets the
//! site; `x30`'s own field holds `x9`), and the resume register set from the handler's
//! return value (`x0`) right after the call, the pc field not read back: so `x16` is
//! never a base register there (see `Addr`).

use super::*;

const X9: Reg = Reg::A64X(9);
const X16: Reg = Reg::A64X(16);
const X30: Reg = Reg::A64X(30);

/// Largest offset an `stp`/`ldp` of `size`-byte registers reaches from its base.
fn pair_max(size: u64) -> u64 {
    63 * size
}

/// Whether `off` is reachable by an unsigned scaled 12-bit immediate for `size`-byte access.
fn unsigned_ok(off: u64, size: u64) -> bool {
    off.is_multiple_of(size) && off / size <= 4095
}

/// `add dst, src, #imm` for any imm below 2^24, in one or two instructions.
fn add_imm(dst: &str, src: &str, imm: u64, note: &str) -> Vec<Op> {
    let (hi, lo) = (imm >> 12, imm & 0xfff);
    assert!(hi <= 0xfff, "offset {imm} beyond 16 MiB");
    let mut v = Vec::new();
    if hi > 0 {
        v.push(Op::new(format!("add {dst}, {src}, #{hi}, lsl #12"), note));
    }
    if lo > 0 || hi == 0 {
        v.push(Op::new(format!("add {dst}, {}, #{lo}", if hi > 0 { dst } else { src }), note));
    }
    v
}

/// `sub sp, sp, #imm`, touching every 4 KiB page on the way down (`str xzr, [sp]`)
/// so a large frame cannot jump a stack guard page.
fn sub_sp(imm: u64) -> Vec<Op> {
    let mut v = Vec::new();
    let mut imm = imm;
    while imm > 4096 {
        v.push(Op::new("sub sp, sp, #4096", "allocate one page (sub: flags untouched)"));
        v.push(Op::new("str xzr, [sp]", "probe it: no jumping over a guard page"));
        imm -= 4096;
    }
    let (hi, lo) = (imm >> 12, imm & 0xfff);
    if hi > 0 {
        v.push(Op::new(format!("sub sp, sp, #{hi}, lsl #12"), "allocate (sub: flags untouched)"));
    }
    if lo > 0 || hi == 0 {
        v.push(Op::new(format!("sub sp, sp, #{lo}"), "allocate the frame, hidden spills and FP area (sub: flags untouched)"));
    }
    v
}

/// The register the routine resumes through (see the module docs).
fn resume(shape: Shape) -> Reg {
    match shape {
        Shape::Entry | Shape::Site => X16,
        Shape::SaveRestore | Shape::Kretprobe => X30,
    }
}

/// The register that holds `reg`'s value on entry to the routine.
fn source(shape: Shape, reg: Reg) -> Reg {
    match (shape, reg) {
        (Shape::Entry | Shape::Site, X30) => X9, // the site moved the link register to x9
        (_, Reg::A64Pc) => X30,                  // the continuation: bl's link, or the ret that entered us
        _ => reg,
    }
}

/// How the accesses of a routine reach their offsets: directly from `sp`, or, past
/// the immediate ranges (frames beyond 32 KiB), through a base register set right
/// before the access (`add xB, sp, #off & !0xfff`), so any offset below 16 MiB works.
struct Addr {
    /// A register saved before any far access and reloaded after all of them.
    base: Option<Reg>,
}

impl Addr {
    /// `(setup, address, encoding)` of an access of `size` bytes at `off` (`pair`: an
    /// stp/ldp of two registers, only ever direct).
    fn get(&self, off: u64, size: u64, pair: bool) -> Option<(Vec<Op>, String, Encoding)> {
        if pair {
            return (off.is_multiple_of(size) && off <= pair_max(size)).then(|| (vec![], format!("[sp, #{off}]"), Encoding::A64Pair));
        }
        if unsigned_ok(off, size) {
            return Some((vec![], format!("[sp, #{off}]"), Encoding::A64Unsigned));
        }
        let b = self.base?;
        let bo = off & !0xfff;
        let d = off - bo;
        if !unsigned_ok(d, size) || bo >> 12 > 0xfff {
            return None;
        }
        let setup = add_imm(b.name(), "sp", bo, "base for a far offset (a register already saved, reloaded later)");
        Some((setup, format!("[{b}, #{d}]"), Encoding::A64Base { base: b, base_offset: bo }))
    }
}

/// One 8-byte general-register slot stored by `str`/`stp`.
#[derive(Clone)]
struct XSlot {
    off: u64,
    src: Reg,
    slot: Slot,
    /// Register reloaded from the slot on the way out.
    into: Option<Reg>,
}

fn width(size: u64) -> (&'static str, &'static str) {
    // (mnemonic suffix, register prefix) for str/ldr of `size` bytes.
    match size {
        1 => ("b", "w"),
        2 => ("h", "w"),
        4 => ("", "w"),
        16 => ("", "q"),
        _ => ("", "x"),
    }
}

pub(super) fn plan(frame: &FrameLayout, policy: Policy, fp: Fp, shape: Shape) -> Result<Plan, PlanError> {
    if frame.arch != Arch::Aarch64 {
        return Err(PlanError::ArchMismatch { frame: frame.arch, wanted: Arch::Aarch64 });
    }
    let resume = resume(shape);
    let elems = elements(frame);

    // General-register slots of the frame.
    let mut xslots: Vec<XSlot> = Vec::new();
    for (off, _, name, v) in &elems {
        if let Ok(r @ (Reg::A64X(_) | Reg::A64Pc)) = v {
            let into = match r {
                Reg::A64Pc => None, // loaded into the resume register by the epilogue
                _ => restores(Arch::Aarch64, policy, shape, *r).then_some(*r),
            };
            xslots.push(XSlot { off: *off, src: source(shape, *r), slot: Slot::Field { name: name.clone(), reg: Some(*r) }, into });
        }
    }
    // Hidden area: caller-saved registers without a field (not the resume register),
    // nzcv without a pstate field, the resume address without a pc field.
    let mut h = Hidden::after(frame);
    let mut take = |slot: Slot| h.take(slot);
    for r in Reg::gprs(Arch::Aarch64) {
        if r != resume && r.class() == RegClass::CallerSaved && frame.offset_of(r).is_none() {
            let off = take(Slot::Hidden(r));
            xslots.push(XSlot { off, src: source(shape, r), slot: Slot::Hidden(r), into: Some(r) });
        }
    }
    let pc_off = match frame.offset_of(Reg::A64Pc) {
        Some(off) => off,
        None => {
            let off = take(Slot::Resume);
            xslots.push(XSlot { off, src: X30, slot: Slot::Resume, into: None });
            off
        }
    };
    let nzcv_hidden = frame.offset_of(Reg::A64Pstate).is_none().then(|| take(Slot::Hidden(Reg::A64Pstate)));
    // No SVE state: the wide modes keep what their narrow ones do (q registers); the
    // modes that keep all 32 (the full ones, and Sse, which is a mid-function mode
    // too) keep FPCR and FPSR as well.
    let fp_regs = match fp {
        Fp::None => 0,
        Fp::Args | Fp::ArgsWide => 8,
        Fp::Return | Fp::ReturnWide => 2,
        Fp::Full | Fp::FullCompact | Fp::FullInUse | Fp::Sse => 32,
    };
    let Hidden { next, slots: hidden } = h;
    let fp_at = next.next_multiple_of(16);
    let fp_size = 16 * fp_regs + if fp_regs == 32 { 16 } else { 0 };
    let fp_area = (fp != Fp::None).then_some((fp_at, fp_size));
    let alloc = (fp_at + fp_size).next_multiple_of(16);
    xslots.sort_by_key(|s| s.off);

    // Base register for offsets out of direct range (frames past 32 KiB): the first
    // slot saved directly whose register is reloaded on the way out, or is the resume
    // register, loaded last (so clobbering it in between is invisible; not in Site,
    // where it holds the handler's answer from the call on), is no scratch (x0..x2)
    // and carries no other value (x9, x30). Slots are in offset order, so it is saved
    // before any far access.
    let resume_is_free = shape != Shape::Site;
    let addr = Addr {
        base: xslots
            .iter()
            .find(|s| matches!(s.src, Reg::A64X(3..=8 | 10..=29)) && (s.into == Some(s.src) || s.src == resume && resume_is_free) && unsigned_ok(s.off, 8))
            .map(|s| s.src),
    };
    let too_large = |field: &str, off: u64| PlanError::FrameTooLarge { frame: frame.name.clone(), field: field.to_string(), offset: off };
    if alloc > 0xff_ffff {
        return Err(too_large("(allocation)", alloc));
    }

    let mut steps: Vec<Step> = Vec::new();

    // 1. General registers, paired where two 8-byte slots are adjacent and in stp range.
    let mut i = 0;
    while i < xslots.len() {
        let a = xslots[i].clone();
        let b = xslots.get(i + 1).filter(|b| b.off == a.off + 8).cloned();
        if let Some(b) = b.filter(|_| a.off.is_multiple_of(8) && a.off <= pair_max(8)) {
            let (_, m, enc) = addr.get(a.off, 8, true).expect("in pair range");
            let slots = vec![(a.off, 8, a.slot.clone()), (b.off, 8, b.slot.clone())];
            let note = format!("{} @{}, {} @{}", a.slot, a.off, b.slot, b.off);
            let mut step = Step {
                save: vec![Op::mem(format!("stp {}, {}, {m}", a.src, b.src), note.clone(), Access { dir: Dir::Store, slots: slots.clone(), encoding: enc })],
                restore: vec![],
            };
            match (a.into, b.into) {
                (Some(ra), Some(rb)) => step.restore.push(Op::mem(format!("ldp {ra}, {rb}, {m}"), note, Access { dir: Dir::Load, slots, encoding: enc })),
                (Some(r), None) | (None, Some(r)) => {
                    let s = if a.into.is_some() { &a } else { &b };
                    let (_, m, enc) = addr.get(s.off, 8, false).expect("pair range is in unsigned range");
                    step.restore.push(Op::mem(
                        format!("ldr {r}, {m}"),
                        format!("{} @{}", s.slot, s.off),
                        Access { dir: Dir::Load, slots: vec![(s.off, 8, s.slot.clone())], encoding: enc },
                    ));
                }
                (None, None) => {}
            }
            steps.push(step);
            i += 2;
            continue;
        }
        let Some((setup, m, enc)) = addr.get(a.off, 8, false) else {
            return Err(too_large(&a.slot.to_string(), a.off));
        };
        let note = format!("{} @{}", a.slot, a.off);
        let slots = vec![(a.off, 8, a.slot.clone())];
        let mut save = setup.clone();
        save.push(Op::mem(format!("str {}, {m}", a.src), note.clone(), Access { dir: Dir::Store, slots: slots.clone(), encoding: enc }));
        let mut restore = Vec::new();
        if let Some(r) = a.into {
            restore = setup;
            restore.push(Op::mem(format!("ldr {r}, {m}"), note, Access { dir: Dir::Load, slots, encoding: enc }));
        }
        steps.push(Step { save, restore });
        i += 1;
    }

    // 2. Values not held in a register of their own name, through scratch x0 (saved by now).
    let mut specials: Vec<(u64, u64, Slot, Result<Reg, u64>)> = elems
        .iter()
        .filter(|e| matches!(e.3, Ok(Reg::A64Sp | Reg::A64Pstate) | Err(_)))
        .map(|e| (e.0, e.1, Slot::Field { name: e.2.clone(), reg: e.3.ok() }, e.3))
        .collect();
    if let Some(off) = nzcv_hidden {
        specials.push((off, 8, Slot::Hidden(Reg::A64Pstate), Ok(Reg::A64Pstate)));
    }
    for (off, size, slot, v) in specials {
        let note = format!("{slot} @{off}");
        let mut step = Step::default();
        let chunks = match v {
            Err(_) => chunks(0, size).collect(),
            Ok(_) => vec![(0, 8)],
        };
        match v {
            Ok(Reg::A64Sp) => step.save.extend(add_imm("x0", "sp", alloc, "sp of the probed context")),
            Ok(_) => step.save.push(Op::new("mrs x0, nzcv", "condition flags (pstate bits 31..28)")),
            Err(c) if c != 0 => step.save.push(Op::new("mov x0, #-1", "defined value: all ones")),
            Err(_) => {}
        }
        for (at, chunk) in chunks {
            let o = off + at;
            let Some((setup, m, enc)) = addr.get(o, chunk, false) else {
                return Err(too_large(&slot.to_string(), o));
            };
            step.save.extend(setup.clone());
            let (sfx, pre) = width(chunk);
            let src = match v {
                Err(0) => format!("{pre}zr"),
                _ => format!("{pre}0"),
            };
            let acc = |dir| Access { dir, slots: vec![(o, chunk, slot.clone())], encoding: enc };
            step.save.push(Op::mem(format!("str{sfx} {src}, {m}"), note.clone(), acc(Dir::Store)));
            if v == Ok(Reg::A64Pstate) {
                step.restore.extend(setup);
                step.restore.push(Op::mem(format!("ldr x0, {m}"), note.clone(), acc(Dir::Load)));
                step.restore.push(Op::new("msr nzcv, x0", "condition flags (the frame's)"));
            }
        }
        steps.push(step);
    }

    // Large reserved fields: a post-indexed store loop through x0..x2 (saved by now);
    // cbnz, not subs, so the flags are not touched.
    for f in fills(frame) {
        let (n, c) = (f.len / 8, f.value);
        let mut save = add_imm("x0", "sp", f.start, &format!("{}: {n} doublewords", f.name));
        save.push(Op::new(format!("mov x1, #{}", n & 0xffff), "count"));
        if n > 0xffff {
            save.push(Op::new(format!("movk x1, #{}, lsl #16", n >> 16), "count"));
        }
        if c != 0 {
            save.push(Op::new("mov x2, #-1", "defined value: all ones"));
        }
        save.push(Op::new("2:", ""));
        save.push(Op::mem(
            format!("str {}, [x0], #8", if c == 0 { "xzr" } else { "x2" }),
            format!("{} @{}..{}: defined value {c:#x}", f.name, f.start, f.start + f.len),
            Access { dir: Dir::Store, slots: vec![(f.start, f.len, Slot::Field { name: f.name.clone(), reg: None })], encoding: Encoding::Loop },
        ));
        save.push(Op::new("sub x1, x1, #1", ""));
        save.push(Op::new("cbnz x1, 2b", ""));
        steps.push(Step { save, restore: vec![] });
    }

    // 3. FP/SIMD state.
    if let Some((at, _)) = fp_area {
        let mut q = 0;
        while q < fp_regs {
            let off = at + 16 * q;
            let pair = q + 1 < fp_regs && addr.get(off, 16, true).is_some();
            let Some((setup, m, enc)) = addr.get(off, 16, pair) else {
                return Err(too_large(&format!("q{q}"), off));
            };
            let (regs, slots) = if pair {
                (format!("q{q}, q{}", q + 1), vec![(off, 16, Slot::Fp(format!("q{q}"))), (off + 16, 16, Slot::Fp(format!("q{}", q + 1)))])
            } else {
                (format!("q{q}"), vec![(off, 16, Slot::Fp(format!("q{q}")))])
            };
            let (st, ld) = if pair { ("stp", "ldp") } else { ("str", "ldr") };
            let note = slots.iter().map(|s| format!("{} @{}", s.2, s.0)).collect::<Vec<_>>().join(", ");
            let mut save = setup.clone();
            save.push(Op::mem(format!("{st} {regs}, {m}"), note.clone(), Access { dir: Dir::Store, slots: slots.clone(), encoding: enc }));
            let mut restore = setup;
            restore.push(Op::mem(format!("{ld} {regs}, {m}"), note, Access { dir: Dir::Load, slots, encoding: enc }));
            steps.push(Step { save, restore });
            q += if pair { 2 } else { 1 };
        }
        if fp_regs == 32 {
            let off = at + 16 * 32;
            let slots = [(off, "fpcr", "x0"), (off + 8, "fpsr", "x1")];
            let mut step = Step { save: vec![Op::new("mrs x0, fpcr", "FP control"), Op::new("mrs x1, fpsr", "FP status")], restore: vec![] };
            let mut stores = Vec::new();
            let mut loads = Vec::new();
            if let Some((_, m, enc)) = addr.get(off, 8, true) {
                let slots: Vec<_> = slots.iter().map(|s| (s.0, 8, Slot::Fp(s.1.into()))).collect();
                let note = format!("fpcr @{off}, fpsr @{}", off + 8);
                stores.push(Op::mem(format!("stp x0, x1, {m}"), note.clone(), Access { dir: Dir::Store, slots: slots.clone(), encoding: enc }));
                loads.push(Op::mem(format!("ldp x0, x1, {m}"), note, Access { dir: Dir::Load, slots, encoding: enc }));
            } else {
                for (o, what, reg) in slots {
                    let Some((setup, m, enc)) = addr.get(o, 8, false) else {
                        return Err(too_large(what, o));
                    };
                    let acc = |dir| Access { dir, slots: vec![(o, 8, Slot::Fp(what.into()))], encoding: enc };
                    stores.extend(setup.clone());
                    stores.push(Op::mem(format!("str {reg}, {m}"), format!("{what} @{o}"), acc(Dir::Store)));
                    // Loads are reversed below: the load follows its setup.
                    loads.push(Op::mem(format!("ldr {reg}, {m}"), format!("{what} @{o}"), acc(Dir::Load)));
                    loads.extend(setup.into_iter().rev());
                }
            }
            step.save.extend(stores);
            // Mirror order: the last stored is loaded first.
            step.restore.extend(loads.into_iter().rev());
            step.restore.push(Op::new("msr fpcr, x0", "FP control"));
            step.restore.push(Op::new("msr fpsr, x1", "FP status"));
            steps.push(step);
        }
    }

    let mut call = vec![Op::new("mov x0, sp", "argument 1: the frame")];
    match fp_area {
        Some((at, _)) => call.extend(add_imm("x1", "sp", at, "argument 2: the FP/SIMD area")),
        None => call.push(Op::new("mov x1, xzr", "argument 2: no FP/SIMD area")),
    }
    let pc_slot = xslots.iter().find(|s| s.off == pc_off).map(|s| s.slot.clone()).expect("pc slot");
    if shape == Shape::Kretprobe {
        // CFA = sp + alloc: DW_OP_breg31 (sp) alloc.
        let mut cfa = vec![0x8f];
        super::sleb(&mut cfa, alloc as i64);
        let (before, after) = super::kretprobe_cfi(Arch::Aarch64, &cfa, pc_off);
        call.extend(before);
        call.push(Op::new("bl {handler}", "the handler; sp is 16-aligned"));
        call.push(after);
        call.extend(far_access("str", "x0", "x1", pc_off, &pc_slot, Dir::Store, "= the real return address the handler returned"));
    } else if let Some((before, after)) = shape.resumes_frame_context().then(|| super::context_cfi(Arch::Aarch64, frame)).flatten() {
        call.extend(before);
        call.push(Op::new("bl {handler}", "the handler; sp is 16-aligned"));
        call.push(after);
    } else {
        call.push(Op::new("bl {handler}", "the handler; sp is 16-aligned"));
    }
    let mut epilogue = Vec::new();
    match shape {
        // The resume register's field is not reloaded: it keeps the handler's answer.
        Shape::Site => call.push(Op::new(format!("mov {resume}, x0"), "the resume address the handler returned")),
        _ => epilogue = far_access("ldr", resume.name(), resume.name(), pc_off, &pc_slot, Dir::Load, "the resume address"),
    }
    let (hi, lo) = (alloc >> 12, alloc & 0xfff);
    if hi > 0 {
        epilogue.push(Op::new(format!("add sp, sp, #{hi}, lsl #12"), "free"));
    }
    if lo > 0 || hi == 0 {
        epilogue.push(Op::new(format!("add sp, sp, #{lo}"), "free: sp is the probed context's again"));
    }
    let whither = if shape == Shape::Site { "resume where the handler said" } else { "resume at the frame's pc" };
    epilogue.push(Op::new(if resume == X30 { "ret".to_string() } else { format!("ret {resume}") }, whither));
    // Site: the pc field gets the site, the continuation less the site's length (x30
    // is free for it: its own field holds x9's value, and the routine leaves by x16).
    let mut prologue = Vec::new();
    if shape == Shape::Site {
        prologue.push(Op::new(format!("sub x30, x30, #{}", crate::site::len(Arch::Aarch64)), "pc: the site, before the continuation (sub: flags untouched)"));
    }
    prologue.extend(sub_sp(alloc));

    Ok(Plan::assemble(frame, policy, fp, shape, Parts { alloc, hidden, fp_area, red_zone: 0, prologue, steps, call, epilogue, operands: vec!["handler"] }))
}

/// `str`/`ldr` of one 8-byte slot at any offset, through `tmp` as base if it is far.
fn far_access(mnemonic: &str, reg: &str, tmp: &str, off: u64, slot: &Slot, dir: Dir, why: &str) -> Vec<Op> {
    let note = format!("{slot} @{off} {why}");
    if unsigned_ok(off, 8) {
        return vec![Op::mem(
            format!("{mnemonic} {reg}, [sp, #{off}]"),
            note,
            Access { dir, slots: vec![(off, 8, slot.clone())], encoding: Encoding::A64Unsigned },
        )];
    }
    let bo = off & !0xfff;
    let mut v = add_imm(tmp, "sp", bo, "base for a far offset");
    let base = Reg::from_name(Arch::Aarch64, tmp).expect("tmp is a register");
    v.push(Op::mem(
        format!("{mnemonic} {reg}, [{tmp}, #{}]", off - bo),
        note,
        Access { dir, slots: vec![(off, 8, slot.clone())], encoding: Encoding::A64Base { base, base_offset: bo } },
    ));
    v
}
