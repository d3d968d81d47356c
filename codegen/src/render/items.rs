//! The Rust items of a frame: one renderer for every front end (see [`RustItems`]).

use super::names::{self, OffsetKind};
use super::{rust_global_asm, Symbols};
use crate::arch::Arch;
use crate::layout::FrameLayout;
use crate::plan::Plan;
use std::fmt::Write;

/// Where a frame's constants go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Place {
    /// Associated with the frame type, in an inherent `impl` (`MyRegs::S_ARG0`), with the
    /// type's `unsafe impl Frame`. The type must be defined in the crate. What
    /// `#[pt_regs]` emits.
    #[default]
    Type,
    /// Free constants where the text is `include!`d (`mod offsets { include!(..) }`,
    /// then `offsets::S_ARG0`), and no `Frame` impl: for a frame type of another crate,
    /// or one declared with `#[pt_regs]`, which made its type items already.
    Module,
}

/// How a routine's asm reaches the crate.
#[derive(Clone, Debug)]
pub enum RoutineAsm {
    /// In the items: a `global_asm!` whose `sym` operands are these Rust paths.
    Inline(Symbols),
    /// Assembled elsewhere, from the `.S` of [`super::gnu_asm`] (the `Builder`): the
    /// items only name its symbol.
    External,
}

/// One routine of the frame.
#[derive(Clone, Debug)]
pub struct Routine<'a> {
    /// Its plan (of the frame's layout for one architecture).
    pub plan: &'a Plan,
    /// Its symbol, unique in the link.
    pub symbol: String,
    /// Where its asm comes from.
    pub asm: RoutineAsm,
}

/// The Rust items of one frame type: one renderer for every front end.
///
/// `#[pt_regs]`, the [`Builder`](crate::Builder)'s `<name>.rs`, the CLI's `rust` and
/// probe-rt's build script all call [`RustItems`], so a frame gets the same items
/// whichever made them:
///
/// - an offset constant per name of [`names`] (`S_PSTATE`, `S_REGS`,
///   `S_X0` … `S_X30`, `S_FP`, `S_LR`), `S_FRAME_SIZE`, and per routine
///   `S_ALLOC_<SHAPE>` and `S_FPSIMD_<SHAPE>`;
/// - the routine itself as a constant, `<SHAPE>: unsafe extern "C" fn()`
///   (`SAVE_RESTORE`, `KRETPROBE`, `ENTRY`), and its asm: a `global_asm!` whose frame
///   offsets are `const` operands from `offset_of!`, or nothing when it is assembled
///   from a `.S` ([`RoutineAsm::External`]);
/// - `unsafe impl Frame` (`NAME`, `FIELDS`, `SIZE`);
/// - compile-time assertions, one per field offset, field size and the frame's size,
///   each failing with a message that names the field.
///
/// With [`Place::Type`] the constants are associated (`PtRegs::S_PSTATE`), in an
/// inherent impl of the frame type, which must therefore be local, and the `Frame`
/// impl comes with them. With [`Place::Module`] they are free constants wherever the
/// text is `include!`d (`offsets::S_PSTATE`), for a frame type of another crate or one
/// whose type items `#[pt_regs]` already made; there is no `Frame` impl then.
///
/// Items that differ by architecture (the element names follow the registers bound,
/// allocations and routines follow the plans) go under `#[cfg(target_arch = "...")]`
/// when several architectures are rendered at once, as `#[pt_regs]` does (a proc macro
/// runs on the host and cannot know the target).
///
/// ```
/// use probe_codegen::{render::{Place, RustItems}, Arch, FrameLayout};
/// let frame = FrameLayout::builtin(Arch::Aarch64);
/// let text = RustItems::new("PtRegs").place(Place::Module).arch(&frame, Vec::new()).render();
/// assert!(text.contains("pub const S_PSTATE: usize = 264;"));
/// assert!(text.contains(r#"assert!(::core::mem::offset_of!(PtRegs, pstate) == 264, "`PtRegs.pstate` must be at offset 264"#));
/// ```
#[derive(Clone, Debug)]
pub struct RustItems<'a> {
    ty: String,
    place: Place,
    krate: String,
    arches: Vec<(&'a FrameLayout, Vec<Routine<'a>>)>,
}

impl<'a> RustItems<'a> {
    /// The items of the frame type `ty`, a path valid where the text is compiled
    /// (`MyRegs`, `crate::PtRegs`); [`Place::Type`], crate path `::probekit`.
    pub fn new(ty: &str) -> RustItems<'a> {
        RustItems { ty: ty.to_string(), place: Place::Type, krate: "::probekit".into(), arches: Vec::new() }
    }

    /// Where the constants go (default [`Place::Type`]).
    pub fn place(mut self, place: Place) -> Self {
        self.place = place;
        self
    }

    /// The path of the crate that defines `Frame` and `FrameField` (default
    /// `::probekit`; `crate` inside probe-rt).
    pub fn krate(mut self, path: &str) -> Self {
        self.krate = path.to_string();
        self
    }

    /// Adds the frame's layout for one architecture, with the routines planned from it.
    /// Every layout must be of the same struct (the offsets do not depend on the
    /// architecture; the registers bound may).
    pub fn arch(mut self, frame: &'a FrameLayout, routines: Vec<Routine<'a>>) -> Self {
        self.arches.push((frame, routines));
        self
    }

    /// The items as Rust source text (for `include!`, or for a proc macro to parse).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Some((first, _)) = self.arches.first() else { return out };
        let arches: Vec<Arch> = self.arches.iter().map(|(f, _)| f.arch).collect();
        let arch_list = arches.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ");
        let _ = writeln!(out, "// Generated by probe-codegen for `{}` ({arch_list}). Do not edit.", first.name);
        let several = self.arches.len() > 1;

        // Offsets of fields and the size are the same on every architecture; element
        // names and aliases follow the registers bound, allocations and routines the
        // plans. With one architecture they all go in memory order into one block.
        let offset_doc = |o: &names::Offset| match o.holds.as_str() {
            "" => format!("Offset of `{}` in `{}`.", o.what, first.name),
            holds => format!("Offset of `{}` ({holds}) in `{}`.", o.what, first.name),
        };
        let size = konst(&format!("`size_of::<{}>()`.", first.name), "S_FRAME_SIZE", "usize", &first.size.to_string());
        let mut common: Vec<String> = Vec::new();
        let mut per_arch: Vec<(Arch, Vec<String>, Vec<String>)> = Vec::new();
        for (frame, routines) in &self.arches {
            let mut consts = Vec::new();
            for o in names::offsets(frame) {
                let c = konst(&offset_doc(&o), &o.name, "usize", &o.offset.to_string());
                match (o.kind, several) {
                    (OffsetKind::Field, true) if per_arch.is_empty() => common.push(c),
                    (OffsetKind::Field, true) => {}
                    _ => consts.push(c),
                }
            }
            if several && per_arch.is_empty() {
                common.push(size.clone());
            } else if !several {
                consts.push(size.clone());
            }
            let mut asm = Vec::new();
            for r in routines {
                let sfx = r.plan.shape.const_suffix();
                let shape = r.plan.shape;
                consts.push(konst(
                    &format!("Bytes the `{shape}` routine allocates below the stack pointer: the frame, hidden spills and the FP/SIMD area."),
                    &format!("S_ALLOC_{sfx}"),
                    "usize",
                    &r.plan.alloc.to_string(),
                ));
                if let Some((at, _)) = r.plan.fp_area {
                    consts.push(konst(
                        &format!("Where the `{shape}` routine's FP/SIMD area starts, in bytes from the frame."),
                        &format!("S_FPSIMD_{sfx}"),
                        "usize",
                        &at.to_string(),
                    ));
                }
                let doc = format!(
                    "The `{shape}` routine of `{}` (symbol `{}`; policy `{}`, fp `{}`). Not a Rust function: it is entered as \
                     its shape says (probe-codegen `Shape`) and calls its handler with the frame.",
                    frame.name, r.symbol, r.plan.policy, r.plan.fp
                );
                let value = format!(
                    "{{\n    unsafe extern \"C\" {{\n        #[link_name = {:?}]\n        fn __probekit_routine();\n    }}\n    __probekit_routine\n}}",
                    r.symbol
                );
                consts.push(konst(&doc, &sfx, "unsafe extern \"C\" fn()", &value));
                if let RoutineAsm::Inline(symbols) = &r.asm {
                    asm.push(rust_global_asm(r.plan, &r.symbol, &self.ty, symbols));
                }
            }
            per_arch.push((frame.arch, consts, asm));
        }

        let cfg = |arch: Arch| if several { format!("#[cfg(target_arch = \"{}\")]\n", arch.name()) } else { String::new() };
        match self.place {
            Place::Type => {
                let mut block = common;
                if !several {
                    block.extend(per_arch.iter().flat_map(|(_, c, _)| c.iter().cloned()));
                }
                let _ = writeln!(out, "\nimpl {} {{\n{}}}", self.ty, indent(&block.join("")));
                for (arch, consts, _) in per_arch.iter().filter(|_| several) {
                    if !consts.is_empty() {
                        let _ = writeln!(out, "\n{}impl {} {{\n{}}}", cfg(*arch), self.ty, indent(&consts.join("")));
                    }
                }
                out.push('\n');
                out.push_str(&self.frame_impl(first));
            }
            Place::Module => {
                out.push('\n');
                out.push_str(&common.join(""));
                for (arch, consts, _) in &per_arch {
                    for c in consts {
                        let _ = write!(out, "{}{c}", cfg(*arch));
                    }
                }
            }
        }
        out.push('\n');
        out.push_str(&self.assertions(first));
        for (arch, _, asm) in &per_arch {
            for a in asm {
                let _ = write!(out, "\n{}{a}", cfg(*arch));
            }
        }
        out
    }

    /// `unsafe impl Frame`: the layout the assertions check, for code that reads any frame.
    fn frame_impl(&self, frame: &FrameLayout) -> String {
        let k = &self.krate;
        let mut fields = String::new();
        for f in &frame.fields {
            let _ = writeln!(fields, "        {k}::FrameField {{ name: {:?}, offset: {}, size: {} }},", f.name, f.offset, f.size);
        }
        format!(
            "// SAFETY: FIELDS and SIZE are the layout the assertions below check against the\n\
             // compiler's, and probe-codegen accepted every field only as an integer, a float or an\n\
             // array of them, for which every bit pattern the routines write is valid.\n\
             unsafe impl {k}::Frame for {ty} {{\n    const NAME: &'static str = {name:?};\n    \
             const FIELDS: &'static [{k}::FrameField] = &[\n{fields}    ];\n    const SIZE: usize = {size};\n}}\n",
            ty = self.ty,
            name = frame.name,
            size = frame.size,
        )
    }

    /// The compile-time assertions, one per field offset and size and one for the size.
    fn assertions(&self, frame: &FrameLayout) -> String {
        let (ty, name) = (&self.ty, &frame.name);
        let mut out = String::new();
        let _ = writeln!(out, "// Soundness: the routines store each register at these offsets, and C and asm read");
        let _ = writeln!(out, "// the frame through the names above. A struct changed without regenerating them");
        let _ = writeln!(out, "// would have registers written into the wrong fields: the build fails here instead,");
        let _ = writeln!(out, "// naming the field.");
        let _ = writeln!(out, "const _: () = {{");
        let _ = writeln!(out, "    #[allow(dead_code)]");
        let _ = writeln!(out, "    const fn field_size<T, F>(_: fn(&T) -> &F) -> usize {{\n        ::core::mem::size_of::<F>()\n    }}");
        for f in &frame.fields {
            let (field, off, size) = (&f.name, f.offset, f.size);
            let _ = writeln!(
                out,
                "    assert!(::core::mem::offset_of!({ty}, {field}) == {off}, \"`{name}.{field}` must be at offset {off}: the generated code \
                 stores and reads it there\");"
            );
            let _ = writeln!(
                out,
                "    assert!(field_size(|s: &{ty}| &s.{field}) == {size}, \"`{name}.{field}` must be {size} bytes: the generated code \
                 stores that many\");"
            );
        }
        let size = frame.size;
        let _ = writeln!(out, "    assert!(::core::mem::size_of::<{ty}>() == {size}, \"`{name}` must be {size} bytes: the routines allocate that much\");");
        let _ = writeln!(out, "}};");
        out
    }
}

/// A documented `pub const`.
fn konst(doc: &str, name: &str, ty: &str, value: &str) -> String {
    format!("/// {doc}\npub const {name}: {ty} = {value};\n")
}

fn indent(text: &str) -> String {
    text.lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("    {l}\n") }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fp, Policy, Shape};

    fn mixed(arch: Arch) -> FrameLayout {
        let src = r#"#[repr(C)] struct M {
            #[reg(x86_64 = "rip", aarch64 = "pc")] ip: u64,
            #[reg(x86_64 = "r8..=r9", aarch64 = "x19..=x20")] range: [u64; 2],
            _pad: u32,
        }"#;
        FrameLayout::from_source(src, "M", arch).unwrap()
    }

    #[test]
    fn one_architecture_is_one_impl_block_with_its_routines() {
        let f = mixed(Arch::X86_64);
        let p = Plan::new(&f, Policy::All, Fp::None, Shape::SaveRestore).unwrap();
        let r = Routine { plan: &p, symbol: "m_save_restore".into(), asm: RoutineAsm::External };
        let text = RustItems::new("M").arch(&f, vec![r]).render();
        assert_eq!(text.matches("\nimpl M {").count(), 1, "{text}");
        for want in [
            "pub const S_IP: usize = 0;",
            "pub const S_RANGE: usize = 8;",
            "pub const S_R8: usize = 8;",
            "pub const S_R9: usize = 16;",
            "pub const S__PAD: usize = 24;",
            "pub const S_FRAME_SIZE: usize = 32;",
            "pub const S_ALLOC_SAVE_RESTORE: usize",
            "pub const SAVE_RESTORE: unsafe extern \"C\" fn() = {",
            "#[link_name = \"m_save_restore\"]",
            "unsafe impl ::probekit::Frame for M {",
            "::probekit::FrameField { name: \"range\", offset: 8, size: 16 },",
            "\"`M.range` must be 16 bytes: the generated code stores that many\"",
            "\"`M` must be 32 bytes: the routines allocate that much\"",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(!text.contains("global_asm") && !text.contains("cfg("), "{text}");
    }

    #[test]
    fn several_architectures_share_the_fields_and_split_the_rest() {
        let (x, a) = (mixed(Arch::X86_64), mixed(Arch::Aarch64));
        let px = Plan::new(&x, Policy::All, Fp::Args, Shape::Entry).unwrap();
        let pa = Plan::new(&a, Policy::All, Fp::Args, Shape::Entry).unwrap();
        let inline = |p| Routine { plan: p, symbol: "m_entry".into(), asm: RoutineAsm::Inline(Symbols { handler: "on_m".into(), ..Default::default() }) };
        let text = RustItems::new("M").krate("crate").arch(&x, vec![inline(&px)]).arch(&a, vec![inline(&pa)]).render();
        assert_eq!(text.matches("pub const S_RANGE: usize = 8;").count(), 1, "{text}");
        assert!(text.contains("#[cfg(target_arch = \"x86_64\")]\nimpl M {") && text.contains("#[cfg(target_arch = \"aarch64\")]\nimpl M {"), "{text}");
        assert!(text.contains("pub const S_R8: usize = 8;") && text.contains("pub const S_X19: usize = 8;"), "{text}");
        assert_eq!(text.matches("::core::arch::global_asm!(").count(), 2, "{text}");
        assert!(text.contains("#[cfg(target_arch = \"aarch64\")]\n// Generated by probe-codegen: M (aarch64)"), "{text}");
        // The asm reads the frame by name; the names are const operands from the compiler.
        assert!(text.contains("[sp, #{S_IP}]") && text.contains("S_IP = const ::core::mem::offset_of!(M, ip),"), "{text}");
        assert!(text.contains("[rsp + {S_R9}]") && text.contains("S_R9 = const ::core::mem::offset_of!(M, range) + 8,"), "{text}");
        assert!(text.contains("unsafe impl crate::Frame for M {"), "{text}");
    }

    #[test]
    fn module_placement_has_free_constants_and_no_frame_impl() {
        let f = FrameLayout::builtin(Arch::X86_64);
        let text = RustItems::new("::probe_rt::PtRegs").place(Place::Module).arch(&f, Vec::new()).render();
        assert!(text.contains("\npub const S_RIP: usize = 128;") && !text.contains("impl"), "{text}");
        assert!(text.contains("::core::mem::offset_of!(::probe_rt::PtRegs, rip) == 128"), "{text}");
    }
}
