//! Seed 000's hand-written arm64 kretprobe trampoline, reproduced by the generator
//! from `user_pt_regs`: the same stores, instruction for instruction, with the
//! offsets as numbers, plus the stores of `sp` and `pc` the seed left undefined.

use probe_codegen::{Arch, Fp, FrameLayout, Plan, Policy, Shape};

/// SAVE_REGS_STRING of the seed with `#16 * n` and `#8 * 33` evaluated.
const SEED_SAVE: &[&str] = &[
    "stp x0, x1, [sp, #0]",
    "stp x2, x3, [sp, #16]",
    "stp x4, x5, [sp, #32]",
    "stp x6, x7, [sp, #48]",
    "stp x8, x9, [sp, #64]",
    "stp x10, x11, [sp, #80]",
    "stp x12, x13, [sp, #96]",
    "stp x14, x15, [sp, #112]",
    "stp x16, x17, [sp, #128]",
    "stp x18, x19, [sp, #144]",
    "stp x20, x21, [sp, #160]",
    "stp x22, x23, [sp, #176]",
    "stp x24, x25, [sp, #192]",
    "stp x26, x27, [sp, #208]",
    "stp x28, x29, [sp, #224]",
    "str x30, [sp, #240]",
    "mrs x0, nzcv",
    "str x0, [sp, #264]",
];

/// RESTORE_REGS_STRING of the seed (its `ldr x30` becomes the resume load from `pc`,
/// where the trampoline put the address the handler returned, as the seed's
/// `str x0, [sp, #16 * 15]` put it in the x30 slot).
const SEED_RESTORE: &[&str] = &["ldr x0, [sp, #264]", "msr nzcv, x0", "ldp x0, x1, [sp, #0]"];

/// Checks that `want` occurs in `have` in order (other instructions may come between).
fn assert_subsequence(have: &[String], want: &[&str]) {
    let mut it = have.iter();
    for w in want {
        assert!(it.any(|h| h == w), "`{w}` missing or out of order in:\n{}", have.join("\n"));
    }
}

fn plan() -> Plan {
    Plan::new(&FrameLayout::builtin(Arch::Aarch64), Policy::All, Fp::None, Shape::Kretprobe).unwrap()
}

#[test]
fn kretprobe_save_is_the_seeds_save() {
    let p = plan();
    let save: Vec<String> = p.save.iter().map(|o| o.asm.clone()).collect();
    assert_subsequence(&save, SEED_SAVE);
    // The two fields the seed's reviewer worried about now hold defined values.
    assert!(save.contains(&"str x30, [sp, #256]".to_string()), "pc store missing:\n{}", save.join("\n"));
    assert_subsequence(&save, &["add x0, sp, #272", "str x0, [sp, #248]"]);
    // Nothing else is stored: 15 pairs, x30, pc, sp, pstate.
    assert_eq!(save.iter().filter(|s| s.starts_with("st")).count(), 15 + 4);
}

#[test]
fn kretprobe_is_the_seeds_trampoline() {
    let p = plan();
    let all: Vec<String> = p.ops().map(|o| o.asm.clone()).collect();
    assert_eq!(all.first().map(String::as_str), Some("sub sp, sp, #272"));
    assert_subsequence(&all, &["mov x0, sp", "bl {handler}", "str x0, [sp, #256]"]);
    let restore: Vec<String> = p.restore.iter().map(|o| o.asm.clone()).collect();
    assert_subsequence(&restore, SEED_RESTORE);
    assert_eq!(restore.iter().filter(|s| s.starts_with("ldp")).count(), 15);
    assert_eq!(&all[all.len() - 3..], ["ldr x30, [sp, #256]", "add sp, sp, #272", "ret"]);
}

#[test]
fn caller_saved_skips_x19_to_x29_on_the_way_out() {
    let p = Plan::new(&FrameLayout::builtin(Arch::Aarch64), Policy::CallerSaved, Fp::None, Shape::Kretprobe).unwrap();
    let restore: Vec<String> = p.restore.iter().map(|o| o.asm.clone()).collect();
    for r in 19..=29 {
        assert!(!restore.iter().any(|l| l.contains(&format!(" x{r},")) || l.contains(&format!(" x{r}, ["))), "x{r} reloaded");
    }
    assert!(restore.contains(&"ldr x18, [sp, #144]".to_string()));
}

#[test]
fn x86_64_pt_regs_offsets() {
    let f = FrameLayout::builtin(Arch::X86_64);
    assert_eq!(f.size, 168);
    let off = |n: &str| f.fields.iter().find(|x| x.name == n).unwrap().offset;
    assert_eq!((off("r15"), off("rax"), off("orig_rax"), off("rip"), off("eflags"), off("rsp"), off("ss")), (0, 80, 120, 128, 144, 152, 160));
    let a = FrameLayout::builtin(Arch::Aarch64);
    assert_eq!((a.size, a.fields.last().unwrap().offset), (272, 264));
}

/// x86_64 Entry at a function entry: no anchor, rflags pushed straight into its field,
/// the frame at a fixed distance below the probed stack pointer (the site trampoline of
/// probe-rt reads it there). With `Fp::Full` the run-time xsave size needs the anchor.
#[test]
fn x86_64_entry_is_anchored_only_when_it_must_be() {
    let f = FrameLayout::builtin(Arch::X86_64);
    let plan = Plan::new(&f, Policy::All, Fp::Args, Shape::Entry).unwrap();
    let text: Vec<String> = plan.ops().map(|o| o.asm.clone()).collect();
    assert_subsequence(
        &text,
        &["lea rsp, [rsp - 280]", "pushfq", "lea rsp, [rsp - 144]", "mov qword ptr [rsp + 80], rax", "call {handler}", "lea rsp, [rsp + 432]", "ret"],
    );
    assert!(!text.iter().any(|t| t.contains("and rsp") || t.contains("push rax")), "{}", text.join("\n"));
    // At a function's entry DF is clear (SysV): no `cld`, which costs cycles on every hit.
    assert!(!text.iter().any(|t| t == "cld"), "{}", text.join("\n"));
    // alloc 304 + red zone 128 + the resume address 8.
    assert_eq!(plan.probed_sp_offset(), Some(440));
    let full = Plan::new(&f, Policy::All, Fp::Full, Shape::Entry).unwrap();
    assert_eq!(full.probed_sp_offset(), None);
    let a = Plan::new(&FrameLayout::builtin(Arch::Aarch64), Policy::All, Fp::Args, Shape::Entry).unwrap();
    assert_eq!(a.probed_sp_offset(), Some(a.alloc));
}

/// aarch64 Site: x16 carries the handler's answer from the call to the `ret x16`, so
/// it is never the base register of a frame past 32 KiB (Entry, which loads x16 from
/// pc last, may take it). A frame without a pc field has no Site routine.
#[test]
fn aarch64_site_keeps_x16_for_the_resume_address() {
    let src = "#[repr(C)] pub struct Far { pub x16: u64, pub x19: u64, pub _gap: [u64; 4200], pub x0: u64, pub pc: u64 }";
    let f = FrameLayout::from_source(src, "Far", Arch::Aarch64).unwrap();
    let entry = Plan::new(&f, Policy::All, Fp::None, Shape::Entry).unwrap();
    let entry_text: Vec<String> = entry.ops().map(|o| o.asm.clone()).collect();
    assert!(entry_text.iter().any(|t| t.starts_with("add x16, sp")), "Entry uses x16 as its base:\n{}", entry_text.join("\n"));
    let site = Plan::new(&f, Policy::All, Fp::None, Shape::Site).unwrap();
    let text: Vec<String> = site.ops().map(|o| o.asm.clone()).collect();
    let answer = text.iter().position(|t| t == "mov x16, x0").expect("x16 takes the handler's answer");
    assert!(!text[answer + 1..].iter().any(|t| t.contains("x16") && t != "ret x16"), "x16 written after the answer:\n{}", text.join("\n"));
    assert!(text.iter().any(|t| t.starts_with("add x19, sp")), "Site uses x19 as its base:\n{}", text.join("\n"));
    assert_eq!(text.first().map(String::as_str), Some("sub x30, x30, #8"));

    let no_pc = FrameLayout::from_source("#[repr(C)] pub struct NoPc { pub x0: u64 }", "NoPc", Arch::Aarch64).unwrap();
    let err = Plan::new(&no_pc, Policy::All, Fp::None, Shape::Site).unwrap_err();
    assert!(err.to_string().contains("no pc (`rip`) field"), "{err}");
}
