//! Generates, for the target architecture, every probe-codegen routine the torture
//! executes: the built-in frame and the frames of `src/frames.rs` in every policy × FP
//! mode × shape, plus seeded random frames (struct source, routine and offset
//! assertions), and a table describing each routine to the checker.

use probe_codegen::render::{self, Place, RustItems};
use probe_codegen::{Arch, FieldValue, Fp, FrameLayout, Plan, Policy, Reg, Shape};
use std::fmt::Write;

/// A small deterministic generator (xorshift64*): the same frames on every build
/// unless `TORTURE_SEED` says otherwise.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const RANDOM_FRAMES: usize = 48;

/// The `#[pt_regs]` frames of src/macro_frames.rs and the options they are declared
/// with (the macro generates their routines; this table only describes them).
const MACRO_FRAMES: &[(&str, Policy, Fp)] = &[("MacroMixed", Policy::CallerSaved, Fp::Args), ("MacroFull", Policy::All, Fp::Full)];

fn main() {
    println!("cargo:rerun-if-changed=src/frames.rs");
    println!("cargo:rerun-if-changed=src/macro_frames.rs");
    println!("cargo:rerun-if-env-changed=TORTURE_SEED");
    let arch_name = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut out = String::new();
    let Some(arch) = Arch::from_name(&arch_name) else {
        // Other targets: no routines, nothing to torture.
        std::fs::write(out_dir.join("generated.rs"), "pub static ROUTINES: &[crate::Routine] = &[];\n").unwrap();
        return;
    };
    let seed: u64 = std::env::var("TORTURE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1234_abcd_0001);

    let custom: &[&str] = match arch {
        Arch::X86_64 => &["X86Sparse", "X86Reversed", "X86Big", "X86Empty"],
        Arch::Aarch64 => &["A64Sparse", "A64Ranges", "A64Big", "A64Empty"],
    };
    let mut frames: Vec<(FrameLayout, String)> = vec![(FrameLayout::builtin(arch), "::probe_rt::PtRegs".into())];
    for name in custom {
        let layout = FrameLayout::from_file("src/frames.rs", name, arch).unwrap_or_else(|e| panic!("{e}"));
        frames.push((layout, format!("crate::frames::{name}")));
    }

    // A site routine needs a pc field (`PlanError::SiteWithoutPc`).
    let has_pc = |f: &FrameLayout| f.offset_of(Reg::pc(arch)).is_some();
    let mut routines = Vec::new();
    for (i, (frame, ty)) in frames.iter().enumerate() {
        for &shape in Shape::ALL.iter().filter(|s| **s != Shape::Site || has_pc(frame)) {
            for &policy in Policy::ALL {
                for &fp in Fp::ALL {
                    routines.push((frame.clone(), ty.clone(), i, policy, fp, shape));
                }
            }
        }
    }

    // Random frames: random subsets and orders of registers, padding, constants.
    let mut rng = Rng(seed);
    for n in 0..RANDOM_FRAMES {
        let (src, name) = random_frame(&mut rng, arch, n);
        let layout = FrameLayout::from_source(&src, &name, arch).unwrap_or_else(|e| panic!("{e:?}\n{src}"));
        let _ = writeln!(out, "pub mod rf{n} {{\n{src}\n}}");
        let policy = Policy::ALL[rng.below(2) as usize];
        let fp = Fp::ALL[rng.below(Fp::ALL.len() as u64) as usize];
        let shape = match Shape::ALL[rng.below(Shape::ALL.len() as u64) as usize] {
            Shape::Site if !has_pc(&layout) => Shape::Entry,
            shape => shape,
        };
        routines.push((layout, format!("crate::generated::rf{n}::{name}"), frames.len() + n, policy, fp, shape));
    }

    let symbols = render::Symbols {
        handler: "crate::torture_handler".into(),
        xsave_size: "crate::XSAVE_SIZE".into(),
        xsave_mask: "crate::XSAVE_MASK".into(),
        wide_mode: "crate::WIDE_MODE".into(),
    };
    let mut table = String::from("pub static ROUTINES: &[crate::Routine] = &[\n");
    let mut asserted = std::collections::HashSet::new();
    for (k, (frame, ty, fi, policy, fp, shape)) in routines.iter().enumerate() {
        let plan = Plan::new(frame, *policy, *fp, *shape).unwrap_or_else(|e| panic!("{e}"));
        let sym = format!("torture_r{k}_{}_{}_{}_{}", frame.name.to_lowercase(), shape.name(), policy.name(), fp.name()).replace('-', "_");
        out.push_str(&render::rust_global_asm(&plan, &sym, ty, &symbols));
        let _ = writeln!(out, "extern \"C\" {{ fn {sym}(); }}");
        if asserted.insert(*fi) {
            // One module of items per frame, as `#[pt_regs]` makes them: the compiler
            // checks the plan's layout, names and `Frame` impl. The built-in `PtRegs` is
            // probe-rt's (it has its type items): its constants go in the module.
            let place = if *fi == 0 { Place::Module } else { Place::Type };
            let items = RustItems::new(ty).place(place).krate("::probe_rt").arch(frame, Vec::new()).render();
            let _ = writeln!(out, "#[allow(dead_code)] pub mod offsets{fi} {{\n{items}}}");
        }
        table.push_str(&table_entry(&sym, &sym, frame, &plan, *policy, *fp, *shape));
    }
    for (name, policy, fp) in MACRO_FRAMES {
        let frame = FrameLayout::from_file("src/macro_frames.rs", name, arch).unwrap_or_else(|e| panic!("{e}"));
        for &shape in Shape::ALL.iter().filter(|s| **s != Shape::Site || has_pc(&frame)) {
            let plan = Plan::new(&frame, *policy, *fp, shape).unwrap_or_else(|e| panic!("{e}"));
            let konst = shape.const_suffix();
            let label = format!("torture_macro_{}_{}", name.to_lowercase(), shape.name()).replace('-', "_");
            table.push_str(&table_entry(&label, &format!("crate::macro_frames::{name}::{konst}"), &frame, &plan, *policy, *fp, shape));
        }
    }
    // The build-script front end: Builder writes a .S (with the xsave operands as the
    // symbols probe-rt exports) that is assembled here through global_asm!(include_str!).
    let builtin_file = format!("../../codegen/frames/{}.rs", arch.name());
    let written = probe_codegen::Builder::new()
        .frame_file(&builtin_file, "PtRegs")
        .name("builder_ptregs")
        .shape(Shape::SaveRestore)
        .shape(Shape::Kretprobe)
        .shape(Shape::Entry)
        .shape(Shape::Site)
        .policy(Policy::CallerSaved)
        .fp(Fp::Full)
        .handler("torture_handler")
        .type_path("::probe_rt::PtRegs")
        .place(Place::Module)
        .crate_path("::probe_rt")
        .arch(arch)
        .out_dir(&out_dir)
        .write()
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = writeln!(out, "::core::arch::global_asm!(include_str!({:?}));", written.asm);
    let _ = writeln!(out, "#[allow(dead_code)] pub mod builder_offsets {{ include!({:?}); }}", written.rust);
    let frame = FrameLayout::builtin(arch);
    for (sym, &shape) in written.symbols.iter().zip(Shape::ALL) {
        let plan = Plan::new(&frame, Policy::CallerSaved, Fp::Full, shape).unwrap_or_else(|e| panic!("{e}"));
        // Entered through the routine constant of the Builder's items (`builder_offsets::ENTRY` …).
        let entry = format!("crate::generated::builder_offsets::{}", shape.const_suffix());
        table.push_str(&table_entry(&format!("torture_{sym}"), &entry, &frame, &plan, Policy::CallerSaved, Fp::Full, shape));
    }
    table.push_str("];\n");
    out.push_str(&table);
    std::fs::write(out_dir.join("generated.rs"), out).unwrap();
}

fn value(r: Reg) -> String {
    match r {
        Reg::X86Gpr(n) | Reg::A64X(n) => format!("crate::V::Gpr({n})"),
        Reg::X86Rip | Reg::A64Pc => "crate::V::Pc".into(),
        Reg::X86Eflags | Reg::A64Pstate => "crate::V::Flags".into(),
        Reg::A64Sp => "crate::V::Sp".into(),
        Reg::X86Seg(n) => format!("crate::V::Seg({n})"),
    }
}

/// Source of a random `#[repr(C)]` frame bound by field names only (it must compile as plain Rust).
fn random_frame(rng: &mut Rng, arch: Arch, n: usize) -> (String, String) {
    let mut names: Vec<String> = match arch {
        Arch::X86_64 => [
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "eflags", "cs", "ss",
            "orig_rax",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        Arch::Aarch64 => (0..=30).map(|i| format!("x{i}")).chain(["sp", "pc", "pstate", "orig_x0"].map(String::from)).collect(),
    };
    let mut fields = Vec::new();
    // aarch64: sometimes a `regs` array for x0..x(k-1).
    if arch == Arch::Aarch64 && rng.below(2) == 0 {
        let k = 1 + rng.below(31) as usize;
        names.retain(|s| !(s.starts_with('x') && s[1..].parse::<usize>().map(|i| i < k).unwrap_or(false)));
        fields.push(format!("pub regs: [u64; {k}],"));
    }
    // Random order, random subset.
    for i in (1..names.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        names.swap(i, j);
    }
    names.truncate(rng.below(names.len() as u64 + 1) as usize);
    for (i, name) in names.iter().enumerate() {
        if rng.below(4) == 0 {
            let ty = ["u8", "u16", "u32", "u64", "[u8; 3]", "[u16; 5]", "[u64; 2]"][rng.below(7) as usize];
            fields.push(format!("pub _p{i}: {ty},"));
        }
        let pos = rng.below(fields.len() as u64 + 1) as usize;
        fields.insert(pos, format!("pub {name}: u64,"));
    }
    if fields.is_empty() {
        fields.push("pub _empty: u64,".into());
    }
    let name = format!("Random{n}");
    (format!("#[repr(C)]\n#[allow(dead_code)]\npub struct {name} {{\n    {}\n}}", fields.join("\n    ")), name)
}

/// The checker's description of one routine.
fn table_entry(name: &str, entry: &str, frame: &FrameLayout, plan: &Plan, policy: Policy, fp: Fp, shape: Shape) -> String {
    let mut elems = String::new();
    for f in &frame.fields {
        if let FieldValue::Const(c) = f.value {
            // One element for the whole constant field: every byte is checked.
            let _ = write!(elems, "crate::Elem {{ off: {}, size: {}, v: crate::V::Const({c:#x}) }}, ", f.offset, f.size);
            continue;
        }
        for i in 0..f.len.unwrap_or(1) as usize {
            let off = f.offset + i as u64 * f.elem_size;
            let FieldValue::Regs(r) = &f.value else { unreachable!() };
            let _ = write!(elems, "crate::Elem {{ off: {off}, size: {}, v: {} }}, ", f.elem_size, value(r[i]));
        }
    }
    let fp_area = match plan.fp_area {
        Some((a, s)) => format!("Some(({a}, {s}))"),
        None => "None".into(),
    };
    format!(
        "    crate::Routine {{ name: {name:?}, entry: {entry}, shape: crate::Kind::{shape:?}, all: {all}, fp: crate::FpMode::{fp:?}, \
         frame_size: {}, alloc: {}, fp_area: {fp_area}, elems: &[{elems}] }},\n",
        frame.size,
        plan.alloc,
        all = policy == Policy::All,
    )
}
