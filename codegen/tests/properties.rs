//! Properties of every plan, over random frames (orders, subsets, arrays, padding)
//! and every policy × FP mode × shape: no two stores overlap, every bound register
//! is stored exactly once, every field byte is written (no uninitialised field),
//! every encoding is in range, and restore mirrors save.
//!
//! That the offsets equal the compiler's is proved where a compiler runs:
//! tests/codegen-torture compiles `offset_of!` assertions for seeded random frames.

use probe_codegen::{Access, Arch, Dir, Encoding, FieldValue, Fp, FrameLayout, Plan, PlanError, Policy, Reg, RegClass, Shape, Slot};

/// Whether `policy` reloads `r` (caller-saved always, callee-saved under `All`).
fn plan_restores(_frame: &FrameLayout, policy: Policy, r: Reg) -> bool {
    r.class() == RegClass::CallerSaved || policy == Policy::All
}
use proptest::prelude::*;

/// A random frame's source: register fields by name, padding, an aarch64 `regs` array.
fn frame_source() -> impl Strategy<Value = (Arch, String)> {
    let arch = prop_oneof![Just(Arch::X86_64), Just(Arch::Aarch64)];
    arch.prop_flat_map(|arch| {
        let names: Vec<String> = match arch {
            Arch::X86_64 => "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip eflags cs ss orig_rax".split(' ').map(String::from).collect(),
            Arch::Aarch64 => (0..=30).map(|i| format!("x{i}")).chain(["sp", "pc", "pstate", "orig_x0"].map(String::from)).collect(),
        };
        let n = names.len();
        (Just(arch), Just(names).prop_shuffle(), 0..=n, proptest::collection::vec((0usize..8, 0usize..40), 0..6), 0usize..32, 0usize..5)
    })
    .prop_map(|(arch, names, keep, pads, regs, big)| {
        let mut fields: Vec<String> = Vec::new();
        let mut names = names;
        if arch == Arch::Aarch64 && regs > 0 {
            names.retain(|s| !(s.starts_with('x') && s[1..].parse::<usize>().map(|i| i < regs).unwrap_or(false)));
            fields.push(format!("regs: [u64; {regs}]"));
        }
        for name in names.iter().take(keep) {
            fields.push(format!("{name}: u64"));
        }
        for (i, (ty, at)) in pads.into_iter().enumerate() {
            let ty = ["u8", "u16", "u32", "u64", "[u8; 3]", "[u16; 7]", "[u64; 5]", "u128"][ty];
            fields.insert(at % (fields.len() + 1), format!("_p{i}: {ty}"));
        }
        // Sometimes a frame past 32 KiB, with one or several far regions: aarch64 then
        // reaches them through a base register.
        if big >= 2 {
            fields.insert(fields.len() / 2, "_big: [u64; 4500]".into());
        }
        if big >= 3 {
            fields.insert(fields.len() / 3, "_big2: [u8; 9001]".into());
        }
        if big == 4 {
            fields.push("_big3: [u32; 9000]".into());
        }
        if fields.is_empty() {
            fields.push("_e: u64".into());
        }
        (arch, format!("#[repr(C)] struct F {{ {} }}", fields.join(", ")))
    })
}

fn in_range(a: &Access, off: u64, size: u64) -> bool {
    let pair = a.slots.len() == 2;
    match a.encoding {
        Encoding::A64Pair => pair && off.is_multiple_of(size) && off <= 63 * size,
        Encoding::A64Unsigned => !pair && off.is_multiple_of(size) && off / size <= 4095,
        Encoding::A64Base { base_offset, .. } => {
            let d = off - base_offset;
            d.is_multiple_of(size) && if pair { d <= 63 * size } else { d / size <= 4095 }
        }
        Encoding::X86Disp8 => off <= 127,
        Encoding::X86Disp32 => off <= i32::MAX as u64,
        Encoding::X86Push => size == 8 && off.is_multiple_of(8),
        Encoding::Loop => true,
    }
}

fn check(frame: &FrameLayout, plan: &Plan) -> Result<(), TestCaseError> {
    let stores: Vec<(usize, &(u64, u64, Slot))> = plan
        .save
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.access.as_ref().filter(|a| a.dir == Dir::Store).map(|a| (i, a)))
        .flat_map(|(i, a)| a.slots.iter().map(move |s| (i, s)))
        .collect();
    // No two stores overlap.
    let mut spans: Vec<(u64, u64)> = stores.iter().map(|(_, s)| (s.0, s.0 + s.1)).collect();
    spans.sort();
    for w in spans.windows(2) {
        prop_assert!(w[0].1 <= w[1].0, "stores overlap: {:?} {:?}", w[0], w[1]);
    }
    // Every bound register stored exactly once, every field byte written.
    for f in &frame.fields {
        if let FieldValue::Const(_) = f.value {
            // Written whole: by stores and loops that lie inside it.
            let (lo, hi) = (f.offset, f.offset + f.size);
            let covered: u64 = stores.iter().filter(|(_, s)| s.0 >= lo && s.0 + s.1 <= hi).map(|(_, s)| s.1).sum();
            prop_assert_eq!(covered, f.size, "constant field {} not fully written", f.name);
            continue;
        }
        for i in 0..f.len.unwrap_or(1) as usize {
            let (lo, hi) = (f.offset + i as u64 * f.elem_size, f.offset + (i as u64 + 1) * f.elem_size);
            let covering: Vec<_> = stores.iter().filter(|(_, s)| s.0 >= lo && s.0 + s.1 <= hi).collect();
            let covered: u64 = covering.iter().map(|(_, s)| s.1).sum();
            prop_assert_eq!(covered, hi - lo, "field {} not fully written", f.elem_name(i));
            if let FieldValue::Regs(regs) = &f.value {
                let n = covering.iter().filter(|(_, s)| matches!(&s.2, Slot::Field { reg: Some(r), .. } if *r == regs[i])).count();
                prop_assert_eq!(n, 1, "register {} stored {} times", regs[i], n);
            }
        }
    }
    // Every encoding in range; every access inside the allocation (x86 xsave area, and
    // Fp::FullInUse's moves into it: above it, sized at run time).
    for op in plan.ops() {
        if let Some(a) = &op.access {
            for (off, size, slot) in &a.slots {
                let elem = if matches!(slot, Slot::Fp(n) if n.starts_with('q')) { 16 } else { (*size).min(8) };
                prop_assert!(in_range(a, *off, elem), "`{}` out of range", op.asm);
                if !matches!(slot, Slot::Fp(n) if n.starts_with("xsave") && n != "xsave in use") {
                    prop_assert!(off + size <= plan.alloc, "`{}` beyond the allocation {}", op.asm, plan.alloc);
                }
            }
        }
    }
    prop_assert_eq!(plan.alloc % 16, 0);
    // Every byte of the frame, implicit padding included, is written.
    let written: u64 = stores.iter().filter(|(_, s)| s.0 < frame.size).map(|(_, s)| s.1).sum();
    prop_assert_eq!(written, frame.size, "not every byte of the frame is written");
    // Restore mirrors save: each slot loaded was stored, and loads come in the
    // reverse order of the stores of the same slots.
    let load_order: Vec<u64> =
        plan.restore.iter().filter_map(|o| o.access.as_ref().filter(|a| a.dir == Dir::Load)).flat_map(|a| a.slots.iter().map(|s| s.0)).collect();
    let store_index = |off: u64| stores.iter().find(|(_, s)| s.0 == off).map(|(i, _)| *i);
    let mut last = usize::MAX;
    for off in &load_order {
        let Some(i) = store_index(*off) else {
            return Err(TestCaseError::fail(format!("load of {off} never stored")));
        };
        prop_assert!(i <= last, "restore is not the mirror of save at offset {}", off);
        last = i;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn plans_hold_their_invariants((arch, src) in frame_source()) {
        let item: syn::ItemStruct = syn::parse_str(&src).unwrap();
        let frame = FrameLayout::from_item(&item, arch).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        for &policy in Policy::ALL {
            for &fp in Fp::ALL {
                for &shape in Shape::ALL {
                    let plan = match Plan::new(&frame, policy, fp, shape) {
                        Ok(p) => p,
                        // Refused only when nothing can serve as a base: an aarch64 frame past
                        // 32 KiB with no reloaded x3..x8/x10..x29 field below that.
                        Err(PlanError::FrameTooLarge { .. }) => {
                            // (Site keeps x16 for its resume address: never a base there.)
                            let near_base = (3..=29).filter(|n| *n != 9 && !(shape == Shape::Site && *n == 16)).any(|n| {
                                let r = Reg::A64X(n);
                                frame.offset_of(r).is_some_and(|o| o <= 32760) && plan_restores(&frame, policy, r)
                            });
                            prop_assert!(arch == Arch::Aarch64 && frame.size > 32760 && !near_base, "refused: {src}");
                            continue;
                        }
                        // Refused only for a site routine over a frame without a pc field.
                        Err(PlanError::SiteWithoutPc { .. }) => {
                            prop_assert!(shape == Shape::Site && frame.offset_of(Reg::pc(arch)).is_none(), "refused: {src}");
                            continue;
                        }
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    };
                    check(&frame, &plan).map_err(|e| TestCaseError::fail(format!("{policy} {fp} {shape} {src}: {e}")))?;
                }
            }
        }
    }
}

#[test]
fn builtin_frames_hold_their_invariants() {
    for arch in Arch::ALL {
        let frame = FrameLayout::builtin(arch);
        for &policy in Policy::ALL {
            for &fp in Fp::ALL {
                for &shape in Shape::ALL {
                    check(&frame, &Plan::new(&frame, policy, fp, shape).unwrap()).unwrap();
                }
            }
        }
    }
}

/// x86_64 `Fp::FullInUse`: every move into the run-time area lies inside the bytes
/// `Fp::in_use_area` gives for the components it moves, which the runtime allocates
/// (more than some CPUs' own standard size: AMD Zen 4's 2,432 bytes).
#[test]
fn in_use_moves_stay_inside_the_area_sized_for_them() {
    assert_eq!(Fp::in_use_area(0), 576, "the legacy region and the header");
    assert_eq!(Fp::in_use_area(0x7), 832, "x87, SSE, AVX");
    assert_eq!(Fp::in_use_area(0xe7), 2688, "and AVX-512");
    assert_eq!(Fp::in_use_area(0x2e7), 2688, "PKRU is not moved");
    let frame = FrameLayout::builtin(Arch::X86_64);
    for &shape in Shape::ALL {
        let plan = Plan::new(&frame, Policy::All, Fp::FullInUse, shape).unwrap();
        let moves: Vec<(u64, u64, String)> = plan
            .ops()
            .filter_map(|op| op.access.as_ref())
            .flat_map(|a| a.slots.iter())
            .filter_map(|(off, size, slot)| match slot {
                Slot::Fp(n) if n.starts_with("xsave ") && n != "xsave in use" => Some((*off, *size, n.clone())),
                _ => None,
            })
            .collect();
        // The area starts 160 bytes below xmm0, in the legacy region of every form.
        let at = moves.iter().find(|m| m.2 == "xsave xmm0").expect("xmm0 is moved").0 - 160;
        let end = at + Fp::in_use_area(u64::MAX);
        for (off, size, what) in &moves {
            assert!(*off >= at && off + size <= end, "{shape:?}: {what} at {off}+{size} outside {at}..{end}");
        }
        let last = moves.iter().map(|(off, size, _)| off + size).max().unwrap();
        assert_eq!(last, end, "{shape:?}: the last component ends where the area does");
    }
}
