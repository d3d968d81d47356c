//! x86_64 planner (System V AMD64 ABI, Intel syntax).
//!
//! Stack picture of every shape, highest address first (`P` is the stack pointer of
//! the probed context, `A` the anchor):
//!
//! ```text
//!  P        ──────────────  stack of the probed context
//!  P-8      resume address  pushed by the site's `call` (SaveRestore, Entry) or a hole
//!                           the Kretprobe prologue makes for the real return address
//!  P-8-RZ   red zone        128 bytes skipped by Entry (0 for the other shapes)
//!  A+8      rflags          pushfq: the flags are read before anything changes them
//!  A        rax             push rax; then rax = A
//!           (alignment)     and rsp, -16 (-64 with Fp::Full, then the run-time xsave area)
//!  rsp+FP   FP/SIMD area
//!  rsp+H    hidden spills, anchor slot (holds A)
//!  rsp+0    the frame       every field at its struct offset
//! ```
//!
//! Only `lea` and `mov` run before `pushfq`, so the flags are saved untouched, and
//! `cld` runs just before the handler call, where the ABI wants DF clear. On the way
//! out the frame's rax, rflags and rip are copied to `A`, `A+8` and `P-8`, every other
//! register is reloaded, and `mov rsp, rax`, the flags set from `A+8` (DF, OF by an
//! addition, the rest by `sahf`: a few cycles where `popfq` costs 10–20), `pop rax;
//! lea rsp, [rsp+8+RZ]; ret` resumes at the (possibly changed) rip with the stack
//! pointer of the probed context. Entry and Kretprobe, at a function's entry and
//! return, only drop the flags word: the ABI does not preserve the flags across calls.
//! Kretprobe also drops its resume address there and ends in `jmp [rsp-8]` instead of
//! `ret`: its entry was a `ret` the return-stack buffer did not expect, and a second
//! `ret` would desynchronise it for every return above.
//!
//! Entry (but with `Fp::Full`, or a frame too large to allocate without probing the
//! pages) needs no anchor: it runs at a function entry, where the ABI has `rsp + 8`
//! 16-aligned, so after the site's `call` rsp is 16-aligned and the frame sits at a
//! fixed distance below it. Every register, rax included, goes straight into its
//! field, and rflags is pushed straight into its own (or not saved at all without
//! one: Entry never restores the flags):
//!
//! ```text
//!  P        ──────────────  stack of the probed context
//!  P-8      resume address  pushed by the site's `call`; 16-aligned
//!  P-8-RZ   red zone        128 bytes skipped
//!  rsp+FP   FP/SIMD area
//!  rsp+H    hidden spills
//!  rsp+0    the frame       rflags pushed into its field by `pushfq` (rsp placed by `lea`)
//! ```
//!
//! It leaves with `lea rsp, [rsp + alloc + RZ]; ret`. Against the anchored form that
//! is four stores and four loads fewer (rax and rflags are not copied through the
//! anchor words, and there is no anchor) and no alignment, on the path of every site hit.

use super::*;

const RAX: Reg = Reg::X86Gpr(0);
const RED_ZONE: u64 = 128;

fn mem(off: u64) -> (String, Encoding) {
    let enc = if off <= 127 { Encoding::X86Disp8 } else { Encoding::X86Disp32 };
    (format!("[rsp + {off}]"), enc)
}

fn ptr(size: u64) -> &'static str {
    match size {
        1 => "byte",
        2 => "word",
        4 => "dword",
        _ => "qword",
    }
}

fn store(reg: &str, off: u64, slot: Slot, note: String) -> Op {
    let (m, encoding) = mem(off);
    Op::mem(format!("mov qword ptr {m}, {reg}"), note, Access { dir: Dir::Store, slots: vec![(off, 8, slot)], encoding })
}

fn load(reg: &str, off: u64, slot: Slot, note: String) -> Op {
    let (m, encoding) = mem(off);
    Op::mem(format!("mov {reg}, qword ptr {m}"), note, Access { dir: Dir::Load, slots: vec![(off, 8, slot)], encoding })
}

pub(super) fn plan(frame: &FrameLayout, policy: Policy, fp: Fp, shape: Shape) -> Result<Plan, PlanError> {
    if frame.arch != Arch::X86_64 {
        return Err(PlanError::ArchMismatch { frame: frame.arch, wanted: Arch::X86_64 });
    }
    let rz = if shape == Shape::Entry { RED_ZONE } else { 0 };
    let elems = elements(frame);
    // Entry at a known alignment (module docs): the allocation must fit in one page
    // below the red zone, so that no guard page can be jumped over.
    let fixed = shape == Shape::Entry && !fp.is_full() && area(frame, fp, shape, false).alloc + rz <= 4096;
    let Area { hidden, anchor, spills, rip, fp_area, alloc } = area(frame, fp, shape, !fixed);

    // Where the resume address the call pushed is, and the probed context's rsp: above
    // the anchor A (after rax, rflags and the red zone), or at a fixed distance above
    // the frame base.
    let (resume_at, probed_sp) = match anchor {
        Some(_) => (format!("rax + {}", 16 + rz), format!("rax + {}", 24 + rz)),
        None => (format!("rsp + {}", alloc + rz), format!("rsp + {}", alloc + rz + 8)),
    };
    let eflags = elems.iter().find(|e| e.3 == Ok(Reg::X86Eflags)).map(|e| (e.0, e.2.clone()));
    let mut prologue = Vec::new();
    let mut steps = Vec::new();
    match (anchor, &eflags) {
        // A fixed Entry with a flags field: rsp is placed just above it (lea: flags
        // untouched), `pushfq` writes it before any instruction changes the flags, then
        // rsp drops to the frame base.
        (None, Some((off, name))) => {
            prologue.push(Op::new(
                format!("lea rsp, [rsp - {}]", rz + alloc - off - 8),
                format!("over the red zone, to just above the {name} field (lea: flags untouched)"),
            ));
            let slot = Slot::Field { name: name.clone(), reg: Some(Reg::X86Eflags) };
            let mut save = vec![Op::mem(
                "pushfq",
                format!("{name} @{off}: rflags, before any instruction changes them"),
                Access { dir: Dir::Store, slots: vec![(*off, 8, slot)], encoding: Encoding::X86Push },
            )];
            if *off > 0 {
                save.push(Op::new(format!("lea rsp, [rsp - {off}]"), format!("allocate the rest of frame {} + hidden + FP area", frame.name)));
            }
            steps.push(Step { save, restore: vec![] });
        }
        // A fixed Entry without one: nothing to save (Entry does not restore the flags).
        (None, None) => {
            prologue.push(Op::new(format!("lea rsp, [rsp - {}]", rz + alloc), format!("over the red zone, allocate frame {} + hidden + FP area", frame.name)))
        }
        (Some(_), _) => {
            match shape {
                Shape::Entry => prologue.push(Op::new(format!("lea rsp, [rsp - {rz}]"), "step over the red zone of the probed code (lea: flags untouched)")),
                Shape::Kretprobe => {
                    prologue.push(Op::new("lea rsp, [rsp - 8]", "hole for the real return address the handler gives back (lea: flags untouched)"))
                }
                Shape::SaveRestore => {}
            }
            prologue.push(Op::new("pushfq", "save rflags before any instruction changes them: [A+8]"));
            prologue.push(Op::new("push rax", "free rax: [A]"));
            prologue.push(Op::new("mov rax, rsp", "rax = anchor A"));
            if fp.is_full() {
                prologue.push(Op::new("sub rsp, qword ptr [rip + {xsave_size}]", "room for the xsave area (its size is known at run time)"));
                prologue.push(Op::new("and rsp, -64", "xsave needs a 64-aligned area"));
            } else {
                prologue.push(Op::new("and rsp, -16", "align: the ABI wants rsp % 16 == 0 at a call"));
            }
            // Touch every 4 KiB page on the way down: a large frame must not jump a guard page.
            let mut rest = alloc;
            while rest > 4096 {
                prologue.push(Op::new("sub rsp, 4096", "allocate one page"));
                prologue.push(Op::new("or qword ptr [rsp], 0", "probe it: no jumping over a guard page"));
                rest -= 4096;
            }
            prologue.push(Op::new(format!("sub rsp, {rest}"), format!("allocate frame {} + hidden + FP area", frame.name)));
        }
    }

    // 1. General registers into their fields, in field order (rsp comes later, and so
    //    does rax when it holds the anchor).
    for (off, _, name, v) in &elems {
        if let Ok(r @ Reg::X86Gpr(n)) = v {
            if (*n == 0 && anchor.is_some()) || *n == 4 {
                continue;
            }
            let slot = || Slot::Field { name: name.clone(), reg: Some(*r) };
            let note = format!("{name} @{off}");
            let restore = if restores(Arch::X86_64, policy, shape, *r) { vec![load(r.name(), *off, slot(), note.clone())] } else { vec![] };
            steps.push(Step { save: vec![store(r.name(), *off, slot(), note)], restore });
        }
    }
    // 2. Hidden spills of caller-saved registers without a field.
    for (r, off) in &spills {
        let note = format!("hidden spill of {r} (no field) @{off}");
        steps.push(Step { save: vec![store(r.name(), *off, Slot::Hidden(*r), note.clone())], restore: vec![load(r.name(), *off, Slot::Hidden(*r), note)] });
    }
    // 3. Values that are not in a register at their own name: copied through rcx
    //    (saved by now) from the anchor words, or computed.
    for (off, size, name, v) in &elems {
        let slot = |reg| Slot::Field { name: name.clone(), reg };
        let note = format!("{name} @{off}");
        let mut step = Step::default();
        match v {
            Ok(RAX | Reg::X86Eflags) if anchor.is_none() => continue, // stored above
            Ok(RAX) => {
                step.save.push(Op::new("mov rcx, qword ptr [rax]", "rax of the probed context, from [A]"));
                step.save.push(store("rcx", *off, slot(Some(RAX)), note.clone()));
                if restores(Arch::X86_64, policy, shape, RAX) {
                    step.restore.push(load("rcx", *off, slot(Some(RAX)), note));
                    step.restore.push(Op::new("mov qword ptr [rax], rcx", "to [A], for `pop rax`"));
                }
            }
            Ok(Reg::X86Eflags) => {
                step.save.push(Op::new("mov rcx, qword ptr [rax + 8]", "rflags saved by pushfq, from [A+8]"));
                step.save.push(store("rcx", *off, slot(Some(Reg::X86Eflags)), note.clone()));
                if restores(Arch::X86_64, policy, shape, Reg::X86Eflags) {
                    step.restore.push(load("rcx", *off, slot(Some(Reg::X86Eflags)), note));
                    step.restore.push(Op::new("mov qword ptr [rax + 8], rcx", "to [A+8], for the flags' restore"));
                }
            }
            Ok(r @ Reg::X86Gpr(4)) => {
                step.save.push(Op::new(format!("lea rcx, [{probed_sp}]"), "rsp of the probed context: above the red zone and resume address"));
                step.save.push(store("rcx", *off, slot(Some(*r)), format!("{note} (read-only)")));
            }
            Ok(Reg::X86Rip) => {} // below, with a hidden resume slot
            Ok(r @ Reg::X86Seg(_)) => {
                step.save.push(Op::new(format!("mov rcx, {r}"), "segment selector, zero-extended"));
                step.save.push(store("rcx", *off, slot(Some(*r)), format!("{note} (read-only)")));
            }
            Ok(_) => continue,
            Err(c) => {
                for (at, chunk) in chunks(0, *size) {
                    let (m, encoding) = mem(off + at);
                    let imm = if *c == 0 { 0 } else { -1 };
                    step.save.push(Op::mem(
                        format!("mov {} ptr {m}, {imm}", ptr(chunk)),
                        format!("{note}: defined value {c:#x}"),
                        Access { dir: Dir::Store, slots: vec![(off + at, chunk, slot(None))], encoding },
                    ));
                }
            }
        }
        steps.push(step);
    }
    // Large reserved fields: a loop through rdx (saved by now), counting up to zero.
    for f in fills(frame) {
        let imm = if f.value == 0 { 0 } else { -1 };
        let end = f.start + f.len;
        steps.push(Step {
            save: vec![
                Op::new(format!("mov rdx, -{}", f.len / 8), format!("{}: {} qwords", f.name, f.len / 8)),
                Op::new("2:", ""),
                Op::mem(
                    format!("mov qword ptr [rsp + rdx*8 + {end}], {imm}"),
                    format!("{} @{}..{end}: defined value {:#x}", f.name, f.start, f.value),
                    Access { dir: Dir::Store, slots: vec![(f.start, f.len, Slot::Field { name: f.name.clone(), reg: None })], encoding: Encoding::Loop },
                ),
                Op::new("inc rdx", ""),
                Op::new("jnz 2b", ""),
            ],
            restore: vec![],
        });
    }
    if let Some((off, slot)) = &rip {
        let mut step = Step::default();
        if shape == Shape::Kretprobe {
            step.save.push(Op::new("lea rcx, [rip + {self}]", "rip: the trampoline (the handler gives the real one)"));
        } else {
            step.save.push(Op::new(format!("mov rcx, qword ptr [{resume_at}]"), "rip: the resume address the call pushed"));
        }
        step.save.push(store("rcx", *off, slot.clone(), format!("{slot} @{off}")));
        step.restore.push(load("rcx", *off, slot.clone(), format!("{slot} @{off}")));
        step.restore.push(Op::new(format!("mov qword ptr [{resume_at}], rcx"), "the resume address"));
        steps.push(step);
    }
    // 4. The anchor, last of the general state: restore reloads it first.
    if let Some(anchor) = anchor {
        steps.push(Step {
            save: vec![store("rax", anchor, Slot::Anchor, format!("anchor A @{anchor}"))],
            restore: vec![load("rax", anchor, Slot::Anchor, format!("rax = anchor A @{anchor}"))],
        });
    }
    // 5. FP/SIMD state.
    let mut operands = vec!["handler"];
    match (fp, fp_area) {
        (Fp::Args | Fp::Return | Fp::ArgsWide | Fp::ReturnWide, Some((at, _))) => {
            let n = vector_regs(fp);
            for i in 0..n {
                let off = at + 16 * i;
                let (m, encoding) = mem(off);
                let slot = Slot::Fp(format!("xmm{i}"));
                let acc = |dir| Access { dir, slots: vec![(off, 16, slot.clone())], encoding };
                steps.push(Step {
                    save: vec![Op::mem(format!("movaps xmmword ptr {m}, xmm{i}"), format!("xmm{i} @{off}"), acc(Dir::Store))],
                    restore: vec![Op::mem(format!("movaps xmm{i}, xmmword ptr {m}"), format!("xmm{i} @{off}"), acc(Dir::Load))],
                });
            }
            if fp.is_wide() {
                steps.push(wide_step(at, n));
            }
        }
        (Fp::FullInUse, Some((at, _))) => {
            operands.extend(["xsave_size", "xsave_mask"]);
            steps.push(in_use_step(at));
        }
        (Fp::Full | Fp::FullCompact, Some((at, _))) => {
            operands.extend(["xsave_size", "xsave_mask"]);
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
            steps.push(Step { save, restore });
        }
        _ => {}
    }

    // After the save sequence (no string instruction there), so that a fixed Entry's
    // `pushfq` saw the flags first.
    let mut call = vec![Op::new("cld", "the ABI wants DF clear at a call (the original rflags are saved)")];
    call.push(Op::new("mov rdi, rsp", "argument 1: the frame"));
    call.push(match fp_area {
        Some((at, _)) => Op::new(format!("lea rsi, [rsp + {at}]"), "argument 2: the FP/SIMD area"),
        None => Op::new("xor esi, esi", "argument 2: no FP/SIMD area"),
    });
    if shape == Shape::Kretprobe {
        let (off, slot) = rip.clone().expect("a kretprobe always has a resume slot");
        let anchor = anchor.expect("a kretprobe has an anchor");
        // CFA = A + 24 (above rax, rflags and the hole), A read back from its slot:
        // DW_OP_breg7 (rsp) anchor; DW_OP_deref; DW_OP_plus_uconst 24.
        let mut cfa = vec![0x77];
        super::sleb(&mut cfa, anchor as i64);
        cfa.extend([0x06, 0x23, 24]);
        let (before, after) = super::kretprobe_cfi(Arch::X86_64, &cfa, off);
        call.extend(before);
        call.push(Op::new("call {handler}", "the handler; rsp is 16-aligned here"));
        call.push(after);
        call.push(store("rax", off, slot.clone(), format!("{slot} @{off} = the real return address the handler returned")));
    } else if let Some((before, after)) = matches!(shape, Shape::SaveRestore | Shape::Entry).then(|| super::context_cfi(Arch::X86_64, frame)).flatten() {
        call.extend(before);
        call.push(Op::new("call {handler}", "the handler; rsp is 16-aligned here"));
        call.push(after);
    } else {
        call.push(Op::new("call {handler}", "the handler; rsp is 16-aligned here"));
    }

    // Back to the anchor (rax, then rflags if they are restored), then one `lea` over
    // what is left above: the frame (fixed form), the rflags word, the red zone, and
    // a kretprobe's resume address.
    let restores_flags = restores(Arch::X86_64, policy, shape, Reg::X86Eflags);
    let mut epilogue = Vec::new();
    let mut skip = Vec::new();
    match anchor {
        None => skip.push((alloc, "the frame")),
        Some(_) => {
            epilogue.push(Op::new("mov rsp, rax", "back to the anchor"));
            if restores_flags {
                epilogue.extend(restore_flags());
            }
            epilogue.push(Op::new("pop rax", "rax (the frame's, under either policy)"));
            match restores_flags {
                true => skip.push((8, "the rflags word (restored above)")),
                false => skip.push((8, "the saved rflags (not restored at a function entry or return)")),
            }
        }
    }
    skip.push((rz, "the red zone"));
    if shape == Shape::Kretprobe {
        skip.push((8, "the resume address"));
    }
    skip.retain(|(n, _)| *n > 0);
    if !skip.is_empty() {
        let bytes: u64 = skip.iter().map(|(n, _)| n).sum();
        let what: Vec<&str> = skip.iter().map(|(_, w)| *w).collect();
        epilogue.push(Op::new(format!("lea rsp, [rsp + {bytes}]"), format!("drop {}", what.join(", "))));
    }
    if shape == Shape::Kretprobe {
        // Entered by a `ret` the return-stack buffer mispredicted (it expected the real
        // return address); another `ret` here would pop the caller's own entry and make
        // every return above mispredict too. An indirect jump leaves the buffer alone.
        // [rsp - 8] is safe to read after the `lea`: the kernel delivers signals below
        // the 128-byte red zone.
        epilogue.push(Op::new("jmp qword ptr [rsp - 8]", "resume at the frame's rip (a jump: the return-stack buffer stays in step)"));
    } else {
        epilogue.push(Op::new("ret", "resume at the frame's rip; rsp is the probed context's again"));
    }

    Ok(Plan::assemble(frame, policy, fp, shape, Parts { alloc, hidden, fp_area, red_zone: rz, prologue, steps, call, epilogue, operands }))
}

/// Sets the flags to the frame's, from the word at `[rsp + 8]` (the anchor's), with
/// `rax` free: DF, then OF by an addition that overflows or not, then SF, ZF, AF, PF
/// and CF with `sahf`. Not `popfq`, which costs 10–20 cycles (serialising; ~11 ns on a
/// virtual CPU), against a few here. These are the flags a handler may change and the
/// only ones the routine changes (`cld`, and its arithmetic); the others (TF, AC, ...)
/// keep their values. Needs LAHF/SAHF in 64-bit mode (`CPUID.80000001H:ECX[0]`, every
/// x86_64 CPU since 2006).
fn restore_flags() -> Vec<Op> {
    vec![
        Op::new("mov rax, qword ptr [rsp + 8]", "the frame's rflags, from [A+8]"),
        Op::new("test ah, 4", "DF (bit 10)"),
        Op::new("jz 2f", "clear, as `cld` left it"),
        Op::new("std", "set in the frame"),
        Op::new("2:", "DF is the frame's"),
        Op::new("mov al, ah", "bits 8-15"),
        Op::new("shr al, 3", "OF (bit 11) to bit 0"),
        Op::new("and al, 1", "al = OF"),
        Op::new("add al, 127", "OF = al: 1 + 127 overflows a signed byte, 0 + 127 does not"),
        Op::new("mov ah, byte ptr [rsp + 8]", "SF ZF AF PF CF: bits 7 6 4 2 0, as `sahf` reads them"),
        Op::new("sahf", "the status flags but OF, which it leaves"),
    ]
}

/// What a routine keeps past the frame, and its allocation.
struct Area {
    /// `(slot, offset)` of every hidden word.
    hidden: Vec<(Slot, u64)>,
    /// The anchor slot (every routine but a fixed Entry).
    anchor: Option<u64>,
    /// Caller-saved registers without a field, and their hidden slots.
    spills: Vec<(Reg, u64)>,
    /// Where the resume address is kept: the rip field, or a hidden slot (Kretprobe).
    rip: Option<(u64, Slot)>,
    /// Offset and static size of the FP/SIMD area.
    fp_area: Option<(u64, u64)>,
    /// Bytes allocated below the entry (16-aligned).
    alloc: u64,
}

/// The hidden area past the frame: the anchor (if `anchored`), caller-saved registers
/// without a field (rax lives at the anchor when there is one), the resume address of
/// a kretprobe frame without a rip field; then the FP/SIMD area.
fn area(frame: &FrameLayout, fp: Fp, shape: Shape, anchored: bool) -> Area {
    let mut h = Hidden::after(frame);
    let mut take = |slot: Slot| h.take(slot);
    let anchor = anchored.then(|| take(Slot::Anchor));
    let spills: Vec<(Reg, u64)> = Reg::gprs(Arch::X86_64)
        .into_iter()
        .filter(|r| (*r != RAX || !anchored) && r.class() == RegClass::CallerSaved && frame.offset_of(*r).is_none())
        .map(|r| (r, take(Slot::Hidden(r))))
        .collect();
    let rip = match frame.offset_of(Reg::X86Rip) {
        Some(off) => Some((off, Slot::Field { name: field_name(frame, Reg::X86Rip), reg: Some(Reg::X86Rip) })),
        None if shape == Shape::Kretprobe => Some((take(Slot::Resume), Slot::Resume)),
        None => None,
    };
    let Hidden { next, slots: hidden } = h;
    let (fp_area, alloc) = match fp {
        Fp::None => (None, next.next_multiple_of(16)),
        Fp::Args | Fp::Return | Fp::ArgsWide | Fp::ReturnWide => {
            let at = next.next_multiple_of(16);
            let size = match fp.is_wide() {
                // xmm, ymm upper halves, zmm upper halves, the in-use word (padded).
                true => 64 * vector_regs(fp) + 16,
                false => 16 * vector_regs(fp),
            };
            (Some((at, size)), at + size)
        }
        // The xsave area must be 64-aligned; its size is known at run time only, so it
        // sits on top of the static allocation, inside the `sub rsp, [xsave_size]`.
        Fp::Full | Fp::FullCompact => {
            let at = next.next_multiple_of(64);
            (Some((at, 0)), at)
        }
        // FullInUse keeps the word of which state was in use just below it.
        Fp::FullInUse => {
            let at = (next + 8).next_multiple_of(64);
            (Some((at, 0)), at)
        }
    };
    Area { hidden, anchor, spills, rip, fp_area, alloc: alloc.next_multiple_of(16) }
}

/// How many vector registers `Args` and `Return` (and their wide forms) keep.
fn vector_regs(fp: Fp) -> u64 {
    if fp.narrow() == Fp::Return {
        2
    } else {
        8
    }
}

/// The wide modes' upper halves of the `n` vector registers whose low 128 bits the
/// FP area starts with (at `at`): above them, the bits 128-255 of each (`ymm`), then
/// the bits 256-511 of each (`zmm`), then the word of which were in use.
///
/// Save: `xgetbv` with `ecx = 1` gives XCR0 & XINUSE; of it, AVX (bit 2: some `ymm`
/// upper half is not zero) and ZMM_Hi256 (bit 6: some `zmm0`–`zmm15` bits 256-511 are
/// not zero) say what to keep: the zmm bits first (EVEX `vextractf64x4`, only with
/// ZMM_Hi256 in use, so only on an AVX-512 machine), then the ymm halves. Restore, in
/// the mirror order and before the low halves are reloaded (legacy `movaps` keeps the
/// bits above): the ymm halves (`vinsertf128`, which zeroes bits 256 on), then the zmm
/// bits; or, with neither in use at the entry, `vzeroupper`, which zeroes the upper
/// halves a handler may have left and keeps bits 0-127.
fn wide_step(at: u64, n: u64) -> Step {
    let ymm_at = at + 16 * n;
    let zmm_at = ymm_at + 16 * n;
    let flag_at = zmm_at + 32 * n;
    let access = |dir, off, size, what: String| {
        let (m, encoding) = mem(off);
        (m, Access { dir, slots: vec![(off, size, Slot::Fp(what))], encoding })
    };
    let mut save = vec![
        Op::new("mov ecx, 1", "xgetbv 1: which state components are in use"),
        Op::new("xgetbv", "eax = XCR0 & XINUSE (edx: the high half)"),
        Op::new("and eax, 0x44", "AVX (ymm upper halves) | ZMM_Hi256 (zmm0-15 bits 256-511)"),
        Op::new("jz 7f", "neither in use: nothing above bit 127 to keep"),
        Op::new("test al, 0x40", "ZMM_Hi256"),
        Op::new("jz 6f", "not in use: the zmm bits are zero"),
    ];
    let mut restore = Vec::new();
    let mut zmm_restore = Vec::new();
    for i in 0..n {
        let (m, a) = access(Dir::Store, zmm_at + 32 * i, 32, format!("zmm{i} bits 256-511"));
        save.push(Op::mem(format!("vextractf64x4 ymmword ptr {m}, zmm{i}, 1"), format!("zmm{i} bits 256-511 @{}", zmm_at + 32 * i), a));
    }
    save.push(Op::new("6:", ""));
    for i in 0..n {
        let (m, a) = access(Dir::Store, ymm_at + 16 * i, 16, format!("ymm{i} bits 128-255"));
        save.push(Op::mem(format!("vextractf128 xmmword ptr {m}, ymm{i}, 1"), format!("ymm{i} bits 128-255 @{}", ymm_at + 16 * i), a));
    }
    save.push(Op::new("7:", ""));
    let (m, a) = access(Dir::Store, flag_at, 8, "in use".into());
    save.push(Op::mem(format!("mov qword ptr {m}, rax"), format!("which were in use @{flag_at}"), a));

    let (m, a) = access(Dir::Load, flag_at, 8, "in use".into());
    restore.push(Op::mem(format!("mov rax, qword ptr {m}"), format!("which were in use @{flag_at}"), a));
    restore.extend([
        Op::new("test eax, eax", ""),
        Op::new("jnz 8f", "some were: put them back"),
        Op::new("vzeroupper", "none were: none are (bits 0-127 kept; a handler's AVX state left behind would cost the probed code)"),
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
    restore.extend([Op::new("test al, 0x40", "ZMM_Hi256"), Op::new("jz 9f", "not in use: bits 256 on stay zero")]);
    restore.extend(zmm_restore);
    restore.push(Op::new("9:", ""));
    Step { save, restore }
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
    let (ymm_at, k_at, zmm_at, hi16_at) = (at + 576, at + 1088, at + 1152, at + 1664);
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

fn field_name(frame: &FrameLayout, reg: Reg) -> String {
    frame.field_of(reg).map(|(f, i)| f.elem_name(i)).unwrap_or_default()
}
