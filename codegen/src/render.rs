//! Renderers: every output is produced from one [`Plan`] and one naming scheme
//! ([`names`]), so they cannot disagree.
//!
//! - [`RustItems`]: the Rust items of a frame (offset constants, the `Frame` impl,
//!   layout assertions naming the field, the routines per architecture), the one
//!   renderer behind `#[pt_regs]`, the [`Builder`](crate::Builder)'s `.rs`, the CLI's
//!   `rust` and probe-rt's build script;
//! - [`rust_global_asm`]: one routine as `global_asm!`, its frame offsets `const`
//!   operands from `offset_of!`;
//! - [`gnu_asm`], [`c_header`]: a `.S` that reads in names (`.equ S_PSTATE, 264`, then
//!   `[sp, #S_PSTATE]`) and the header of the same names;
//! - [`listing`]: each instruction with the field, name and offset it touches.

use crate::arch::Arch;
use crate::layout::FieldValue;
use crate::plan::{Op, Plan};
use std::fmt::Write;

mod items;
pub mod names;

pub use items::{Place, Routine, RoutineAsm, RustItems};
use names::{Names, Offset, Spelling};

/// Where the `sym` operands of a routine point, for renderers that print symbol names.
#[derive(Clone, Debug)]
pub struct Symbols {
    /// The handler the routine calls: `extern "C" fn(*mut Frame, *mut u8)`
    /// (`-> usize`, the resume address, for a kretprobe).
    pub handler: String,
    /// A `u64` holding the `xsave` area size (x86_64 `Fp::Full`, `FullCompact`,
    /// `FullInUse`).
    pub xsave_size: String,
    /// A `u64` holding the `xsave` requested-feature bitmap (x86_64 `Fp::Full`,
    /// `FullCompact`, `FullInUse`).
    pub xsave_mask: String,
    /// A `u64` saying how the wide modes learn which upper halves to keep (x86_64
    /// `Fp::ArgsWide`, `ReturnWide`, `Sse`: `Fp::WIDE_ASK`, `Fp::WIDE_ZMM`).
    pub wide_mode: String,
}

impl Default for Symbols {
    fn default() -> Self {
        Symbols {
            handler: "probe_handler".into(),
            xsave_size: "probekit_xsave_size".into(),
            xsave_mask: "probekit_xsave_mask".into(),
            wide_mode: "probekit_wide_mode".into(),
        }
    }
}

impl Symbols {
    fn get<'a>(&'a self, operand: &'a str) -> &'a str {
        match operand {
            "handler" => &self.handler,
            "xsave_size" => &self.xsave_size,
            "xsave_mask" => &self.xsave_mask,
            "wide_mode" => &self.wide_mode,
            _ => operand,
        }
    }
}

fn header_lines(plan: &Plan, name: &str) -> Vec<String> {
    let kind = if plan.arch() == Arch::Aarch64 { "%function" } else { "@function" };
    let mut lines = vec![
        format!(".pushsection .text.{name}, \"ax\", {}progbits", if plan.arch() == Arch::Aarch64 { "%" } else { "@" }),
        ".balign 16".into(),
        format!(".globl {name}"),
        format!(".hidden {name}"),
        format!(".type {name}, {kind}"),
        format!("{name}:"),
    ];
    if plan.has_cfi() {
        // Call-frame information (see `Shape::Kretprobe`, `Shape::SaveRestore`): the
        // routine has a caller an unwinder can find only at its handler call (a
        // Kretprobe routine, entered by a `ret`, has no return address of its own
        // until the handler provides one).
        lines.push(".cfi_startproc".into());
        let ra = match plan.cfi_return_column() {
            Some(column) => {
                lines.push(format!(".cfi_return_column {column}"));
                column.to_string()
            }
            None if plan.arch() == Arch::Aarch64 => "x30".into(),
            None => "rip".into(),
        };
        lines.push(format!(".cfi_undefined {ra}"));
    }
    lines
}

fn footer_lines(plan: &Plan, name: &str) -> Vec<String> {
    let mut lines = if plan.has_cfi() { vec![".cfi_endproc".to_string()] } else { vec![] };
    lines.extend([format!(".size {name}, . - {name}"), ".popsection".into()]);
    lines
}

fn describe(plan: &Plan) -> String {
    format!("{} ({}), shape {}, policy {}, fp {}", plan.frame.name, plan.arch(), plan.shape, plan.policy, plan.fp)
}

fn op_line(asm: &str, note: &str, name: &str) -> String {
    let asm = asm.replace("{self}", name);
    if note.is_empty() {
        format!("    {asm}")
    } else {
        format!("    {asm:<44} /* {note} */")
    }
}

/// Assembler text of the routine for Rust's `global_asm!`, and the names of the offset
/// operands it reads: operand placeholders stay as `{handler}` (and `{xsave_size}`,
/// `{xsave_mask}`), frame offsets read `{S_PSTATE}`, every other brace is doubled.
/// x86_64 text is Intel syntax, Rust's default.
fn rust_template<'a>(plan: &Plan, name: &str, names: &'a Names) -> (String, Vec<&'a Offset>) {
    let mut used: Vec<&Offset> = Vec::new();
    let mut lines = header_lines(plan, name);
    for op in plan.ops() {
        let (asm, o) = names.spell(op, Spelling::Operands);
        if let Some(o) = o.filter(|o| !used.iter().any(|u| u.name == o.name)) {
            used.push(o);
        }
        lines.push(op_line(&asm, &op.note, name));
    }
    lines.extend(footer_lines(plan, name));
    let mut text = lines.join("\n").replace('{', "{{").replace('}', "}}");
    let placeholders = plan.operands.iter().copied().chain(used.iter().map(|o| o.name.as_str()));
    for operand in placeholders {
        text = text.replace(&format!("{{{{{operand}}}}}"), &format!("{{{operand}}}"));
    }
    (text, used)
}

/// A complete `core::arch::global_asm!` invocation defining the routine `name` of
/// `plan`, for a frame whose Rust type is `ty` where the text is compiled: its `sym`
/// operands are the Rust paths of `paths` (`handler = "crate::on_hit"`), and every
/// frame offset it reads by name is a `const` operand taken from the compiler,
/// `S_PSTATE = const ::core::mem::offset_of!(PtRegs, pstate)` (DESIGN.md rule 1).
pub fn rust_global_asm(plan: &Plan, name: &str, ty: &str, paths: &Symbols) -> String {
    let names = Names::new(&plan.frame);
    let (template, used) = rust_template(plan, name, &names);
    let mut out = String::new();
    let _ = writeln!(out, "// Generated by probe-codegen: {}. Do not edit.", describe(plan));
    let _ = writeln!(out, "::core::arch::global_asm!(");
    for line in template.lines() {
        let _ = writeln!(out, "    {:?},", line);
    }
    for operand in &plan.operands {
        let _ = writeln!(out, "    {operand} = sym {},", paths.get(operand));
    }
    for o in used {
        let delta = if o.delta > 0 { format!(" + {}", o.delta) } else { String::new() };
        let _ = writeln!(out, "    {} = const ::core::mem::offset_of!({ty}, {}){delta},", o.name, o.field);
    }
    let _ = writeln!(out, ");");
    out
}

/// `(name, value, what)` of the constants every output defines for `plans` (all of
/// one frame): the frame's [`names::offsets`], `S_FRAME_SIZE`, and each routine's
/// `S_ALLOC_<SHAPE>` and `S_FPSIMD_<SHAPE>`.
fn constants(plans: &[&Plan]) -> Vec<(String, u64, String)> {
    let Some(first) = plans.first() else { return Vec::new() };
    let f = &first.frame;
    let mut v: Vec<(String, u64, String)> = names::offsets(f).into_iter().map(|o| (o.describe(), o)).map(|(d, o)| (o.name, o.offset, d)).collect();
    v.push(("S_FRAME_SIZE".into(), f.size, format!("sizeof({})", f.name)));
    for p in plans {
        let sfx = p.shape.const_suffix();
        v.push((format!("S_ALLOC_{sfx}"), p.alloc, format!("bytes the {} routine allocates: frame, hidden spills, FP/SIMD area", p.shape)));
        if let Some((at, _)) = p.fp_area {
            v.push((format!("S_FPSIMD_{sfx}"), at, format!("the {} routine's FP/SIMD area, from the frame", p.shape)));
        }
    }
    v
}

/// GNU assembler text (`.S`) defining each routine `(plan, name)` (all of one frame),
/// with the operands named by `symbols`. The frame's offsets are defined once with
/// `.equ` (the names of [`c_header`]) and the instructions read them by name:
/// `str x0, [sp, #S_PSTATE]`. The text also assembles inside Rust's
/// `global_asm!(include_str!(...))` (no braces; the x86_64 syntax switch is undone at
/// the end, sections are pushed and popped; `.equ` names may be defined again by another
/// such file, each routine reads the values defined above it).
pub fn gnu_asm(routines: &[(&Plan, &str)], symbols: &Symbols) -> String {
    let mut out = String::new();
    let Some((first, _)) = routines.first() else { return out };
    let arch = first.arch();
    let _ = writeln!(out, "/* Generated by probe-codegen. Do not edit. */");
    let plans: Vec<&Plan> = routines.iter().map(|(p, _)| *p).collect();
    let _ = writeln!(out, "/* {}: offsets and sizes */", first.frame.name);
    for (name, value, what) in constants(&plans) {
        let _ = writeln!(out, "{:<44} /* {what} */", format!(".equ {name}, {value}"));
    }
    if arch == Arch::X86_64 {
        let _ = writeln!(out, ".intel_syntax noprefix");
    }
    for (plan, name) in routines {
        let names = Names::new(&plan.frame);
        let _ = writeln!(out, "/* {}: {} */", name, describe(plan));
        let mut body = header_lines(plan, name);
        for op in plan.ops() {
            let mut asm = names.spell(op, Spelling::Names).0;
            for operand in &plan.operands {
                asm = asm.replace(&format!("{{{operand}}}"), symbols.get(operand));
            }
            body.push(op_line(&asm, &op.note, name));
        }
        body.extend(footer_lines(plan, name));
        for line in body {
            let _ = writeln!(out, "{line}");
        }
    }
    if arch == Arch::X86_64 {
        let _ = writeln!(out, ".att_syntax prefix");
    }
    let pb = if arch == Arch::Aarch64 { "%" } else { "@" };
    let _ = writeln!(out, ".pushsection .note.GNU-stack, \"\", {pb}progbits\n.popsection");
    out
}

/// A C header of the frame's offsets (the kernel's asm-offsets: `S_X0`, `S_PSTATE`,
/// `S_FRAME_SIZE`), the stack each routine allocates (`S_ALLOC_<SHAPE>`) and where its
/// FP/SIMD area is (`S_FPSIMD_<SHAPE>`). All plans share one frame. The names are
/// those of [`names`], the same in the `.S` and the Rust items.
pub fn c_header(plans: &[&Plan]) -> String {
    let Some(first) = plans.first() else { return String::new() };
    let f = &first.frame;
    let guard = format!("PROBEKIT_{}_{}_H", f.name.to_uppercase(), first.arch().name().to_uppercase());
    let mut out = String::new();
    let _ = writeln!(out, "/* Generated by probe-codegen: {}. Do not edit. */", describe(first));
    let _ = writeln!(out, "#ifndef {guard}\n#define {guard}\n");
    for (name, value, what) in constants(plans) {
        let _ = writeln!(out, "#define {name} {value} /* {what} */");
    }
    let _ = writeln!(out, "\n#endif /* {guard} */");
    out
}

/// The annotated listing: the frame's fields with their names and offsets, then one
/// line per instruction, reading in names as the `.S` does, with the field and offset
/// it touches and why it is there.
pub fn listing(plan: &Plan, name: &str) -> String {
    let f = &plan.frame;
    let names = Names::new(f);
    let mut out = String::new();
    let _ = writeln!(out, "# {}", describe(plan));
    let _ = writeln!(
        out,
        "# frame {} bytes (align {}), allocation {} bytes{}{}",
        f.size,
        f.align,
        plan.alloc,
        if plan.red_zone > 0 { format!(", red zone {} bytes skipped", plan.red_zone) } else { String::new() },
        match plan.fp_area {
            Some((at, 0)) => format!(", FP/SIMD xsave area at +{at} (run-time size)"),
            Some((at, n)) => format!(", FP/SIMD area {n} bytes at +{at}"),
            None => String::new(),
        }
    );
    let _ = writeln!(out, "#");
    let _ = writeln!(out, "# {:<12} {:<14} {:>6} {:>5}  holds", "field", "name", "offset", "size");
    for field in &f.fields {
        for i in 0..field.len.unwrap_or(1) as usize {
            let what = match &field.value {
                FieldValue::Regs(r) => format!("{} ({})", r[i], if plan.restores(r[i]) { "restored" } else { "saved only" }),
                FieldValue::Const(c) => format!("constant {c:#x}"),
            };
            let off = field.offset + i as u64 * field.elem_size;
            let spelled = match names.at(off) {
                Some((o, 0)) => o.name.clone(),
                Some((o, d)) => format!("{} + {d}", o.name),
                None => String::new(),
            };
            let _ = writeln!(out, "# {:<12} {:<14} {:>6} {:>5}  {what}", field.elem_name(i), spelled, off, field.elem_size);
        }
    }
    for (slot, off) in &plan.hidden {
        let _ = writeln!(out, "# {:<12} {:<14} {:>6} {:>5}  {slot}", "(hidden)", "", off, 8);
    }
    let _ = writeln!(out, "\n{name}:");
    let sections: [(&str, &[Op]); 5] =
        [("prologue", &plan.prologue), ("save", &plan.save), ("call", &plan.call), ("restore", &plan.restore), ("epilogue", &plan.epilogue)];
    for (title, ops) in sections {
        let _ = writeln!(out, "  ; -- {title}");
        for op in ops {
            let asm = names.spell(op, Spelling::Names).0.replace("{self}", name);
            let _ = match op.note.as_str() {
                "" => writeln!(out, "    {asm}"),
                note => writeln!(out, "    {asm:<44} ; {note}"),
            };
        }
    }
    out
}
