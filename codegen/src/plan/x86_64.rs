//! x86_64 planner (System V AMD64 ABI, Intel syntax).
//!
//! Stack picture of every shape, highest address first (`P` is the stack pointer of
//! the probed context, `A` the anchor):
//!
//! ```text
//!  P        ──────────────  stack of the probed context
//!  P-8      resume address  pushed by the site's `call` (SaveRestore, Entry, Site) or a
//!                           hole the Kretprobe prologue makes for the real return address
//!  P-8-RZ   red zone        128 bytes skipped by Entry and Site (0 for the other shapes)
//!  A+8      rflags          pushfq: the flags are read before anything changes them
//!  A        rax             push rax; then rax = A
//!           (alignment)     and rsp, -16 (-64 with Fp::Full, then the run-time xsave area)
//!  rsp+FP   FP/SIMD area
//!  rsp+H    hidden spills, anchor slot (holds A)
//!  rsp+0    the frame       every field at its struct offset
//! ```
//!
//! Only `lea` and `mov` run before `pushfq`, so the flags are saved untouched, and
//! `cld` runs just before the handler call, where the ABI wants DF clear (not in
//! Entry: at a function's entry it is clear already). On the way
//! out the frame's rax, rflags and rip are copied to `A`, `A+8` and `P-8`, every other
//! register is reloaded, and `mov rsp, rax`, the flags set from `A+8` (DF, OF by an
//! addition, the rest by `sahf`: a few cycles where `popfq` costs 10–20), `pop rax;
//! lea rsp, [rsp+8+RZ]; ret` resumes at the (possibly changed) rip with the stack
//! pointer of the probed context. Entry and Kretprobe, at a function's entry and
//! return, only drop the flags word: the ABI does not preserve the flags across calls.
//! Kretprobe also drops its resume address there and ends in `jmp [rsp-8]` instead of
//! `ret`: its entry was a `ret` the return-stack buffer did not expect, and a second
//! `ret` would desynchronise it for every return above. Site is Entry with rip saved
//! as the site (the resume address less the call's 5 bytes) and not read back: the
//! handler's return value is written over `P-8` if it differs (with an anchor,
//! through the rip slot).
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

mod fp;

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
    let rz = if shape.at_entry() { RED_ZONE } else { 0 };
    let elems = elements(frame);
    // Entry at a known alignment (module docs): the allocation must fit in one page
    // below the red zone, so that no guard page can be jumped over.
    let fixed = shape.at_entry() && !fp.is_full() && area(frame, fp, shape, false).alloc + rz <= 4096;
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
                Shape::Entry | Shape::Site => {
                    prologue.push(Op::new(format!("lea rsp, [rsp - {rz}]"), "step over the red zone of the probed code (lea: flags untouched)"))
                }
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
        if shape == Shape::Site {
            let len = crate::site::len(Arch::X86_64);
            step.save.push(Op::new(format!("lea rcx, [rcx - {len}]"), "rip: the site, before the resume address"));
        }
        step.save.push(store("rcx", *off, slot.clone(), format!("{slot} @{off}")));
        // A Site routine resumes where its handler said (see the call below); with an
        // anchor, through the rip slot.
        if shape != Shape::Site || anchor.is_some() {
            step.restore.push(load("rcx", *off, slot.clone(), format!("{slot} @{off}")));
            step.restore.push(Op::new(format!("mov qword ptr [{resume_at}], rcx"), "the resume address"));
        }
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
    if let Some((at, _)) = fp_area {
        let (fp_steps, fp_operands) = fp::steps(fp, at);
        steps.extend(fp_steps);
        operands.extend(fp_operands);
    }

    // After the save sequence (no string instruction there), so that a fixed Entry's
    // `pushfq` saw the flags first. Not at a function's entry (Entry), where the ABI
    // has DF clear already (SysV AMD64 §3.2.1): `cld` costs a few cycles that an Entry
    // routine's ~15 ns do not have to spare (~0.5 ns a site hit here).
    let mut call = Vec::new();
    if !shape.at_entry() {
        call.push(Op::new("cld", "the ABI wants DF clear at a call (the original rflags are saved)"));
    }
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
    } else if let Some((before, after)) = shape.resumes_frame_context().then(|| super::context_cfi(Arch::X86_64, frame)).flatten() {
        call.extend(before);
        call.push(Op::new("call {handler}", "the handler; rsp is 16-aligned here"));
        call.push(after);
    } else {
        call.push(Op::new("call {handler}", "the handler; rsp is 16-aligned here"));
    }
    if shape == Shape::Site {
        match (anchor, rip.clone()) {
            // The resume address is rewritten only if it changes (flags are not
            // restored at a function entry): a store just before the `ret` that reads
            // it would cost every hit (see `Shape::Site`).
            (None, _) => call.extend([
                Op::new(format!("cmp rax, qword ptr [{resume_at}]"), "the resume address the handler returned: the continuation?"),
                Op::new("je 3f", ""),
                Op::new(format!("mov qword ptr [{resume_at}], rax"), "no: resume there"),
                Op::new("3:", ""),
            ]),
            (Some(_), Some((off, slot))) => call.push(store("rax", off, slot.clone(), format!("{slot} @{off} = the resume address the handler returned"))),
            (Some(_), None) => unreachable!("an anchored Site routine has a resume slot (`area`)"),
        }
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
        let whither = if shape == Shape::Site { "resume where the handler said" } else { "resume at the frame's rip" };
        epilogue.push(Op::new("ret", format!("{whither}; rsp is the probed context's again")));
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
        // Kretprobe's handler gives the resume address, and so does Site's, which
        // goes through the slot only with an anchor (see the handler call).
        None if shape == Shape::Kretprobe || shape == Shape::Site && anchored => Some((take(Slot::Resume), Slot::Resume)),
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
        // xmm0-15, their ymm and zmm upper halves, the in-use word and MXCSR (twice: as
        // saved, and as the handler left it), then the x87 stack's `fxsave` area.
        Fp::Sse => {
            let at = next.next_multiple_of(16);
            let size = SSE_FX + 512;
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

/// How many vector registers `Fp::Sse` keeps: all of `xmm0`-`xmm15`.
const SSE_REGS: u64 = 16;
/// Where `Fp::Sse`'s `fxsave` area is in its FP area (16-aligned, as `fxsave` needs).
const SSE_FX: u64 = 64 * SSE_REGS + 16;

/// How many vector registers `Args` and `Return` (and their wide forms) keep.
fn vector_regs(fp: Fp) -> u64 {
    if fp.narrow() == Fp::Return {
        2
    } else {
        8
    }
}

fn field_name(frame: &FrameLayout, reg: Reg) -> String {
    frame.field_of(reg).map(|(f, i)| f.elem_name(i)).unwrap_or_default()
}
