//! The names of a frame's offsets, one scheme for every output: the Rust constants, the
//! C header, the `.equ`s of the `.S`, the listing, and the asm text itself, which reads
//! `str x0, [sp, #S_PSTATE]` as the kernel's entry code reads with asm-offsets.
//!
//! | name | offset of | example |
//! | --- | --- | --- |
//! | `S_<FIELD>` | every field (its first byte) | `S_PSTATE`, `S_REGS`, `S_ORIG_RAX`, `S__RESERVED` |
//! | `S_<REG>` | each element of an array field that binds registers, by the register it holds | `S_X0` … `S_X30` of `regs: [u64; 31]`; `S_R8` of `#[reg(r8..=r11)] range: [u64; 4]` |
//! | `S_FP`, `S_LR` | aarch64: x29 and x30, wherever they are stored (as asm-offsets spells them) | |
//! | `S_FRAME_SIZE` | `size_of` the frame | |
//! | `S_ALLOC_<SHAPE>` | bytes a routine allocates: frame, hidden spills, FP/SIMD area | `S_ALLOC_KRETPROBE` |
//! | `S_FPSIMD_<SHAPE>` | where a routine's FP/SIMD area starts, from the frame | `S_FPSIMD_ENTRY` |
//!
//! Elements of other arrays (constants, reserved space) have no names of their own:
//! asm spells them from their field, `S__RESERVED + 8`. A field's name wins over an
//! element's or an alias's: `#[reg(x1)] x0: u64` is `S_X0`, and the element of another
//! array that holds x0 is then spelled `S_<THAT FIELD> + 8 * i`. Field names that would
//! give two fields one constant, or a field a reserved constant, are refused by the
//! layout reader ([`crate::FrameError::NameClash`]).

use crate::arch::{Arch, Reg};
use crate::layout::{FieldValue, FrameLayout};
use crate::plan::{Encoding, Op};

/// What an [`Offset`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetKind {
    /// A field: `S_<FIELD>`.
    Field,
    /// An element of a register array, by its register: `S_<REG>`.
    Element,
    /// Another name of an element or field (aarch64 `S_FP`, `S_LR`).
    Alias,
}

/// One named offset of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offset {
    /// The constant's name (`S_X0`).
    pub name: String,
    /// Bytes from the start of the frame.
    pub offset: u64,
    /// The field it lies in, as written in the struct (`regs`).
    pub field: String,
    /// Bytes from the start of that field (`offset_of!(T, field) + delta` is `offset`).
    pub delta: u64,
    /// What is there, as the struct spells it: `regs[0]`, `pstate`.
    pub what: String,
    /// The register held there, when the name is not the field's: `x0`, `x29, the
    /// frame pointer`; empty for fields.
    pub holds: String,
    /// Field, element or alias.
    pub kind: OffsetKind,
}

/// Every named offset of `frame`, in memory order, each field followed by its elements
/// (the aliases last). See the [module docs](self) for the scheme.
pub fn offsets(frame: &FrameLayout) -> Vec<Offset> {
    let mut v: Vec<Offset> = Vec::new();
    for f in &frame.fields {
        let (name, field, what) = (f.const_name(), f.name.clone(), f.name.clone());
        v.push(Offset { name, offset: f.offset, field, delta: 0, what, holds: String::new(), kind: OffsetKind::Field });
    }
    let taken = |v: &[Offset], name: &str| v.iter().any(|o| o.name == name);
    for f in &frame.fields {
        if let (FieldValue::Regs(regs), Some(_)) = (&f.value, f.len) {
            for (i, r) in regs.iter().enumerate() {
                let name = reg_const(*r);
                if !taken(&v, &name) {
                    let delta = i as u64 * f.elem_size;
                    let (field, what, holds) = (f.name.clone(), f.elem_name(i), r.to_string());
                    v.push(Offset { name, offset: f.offset + delta, field, delta, what, holds, kind: OffsetKind::Element });
                }
            }
        }
    }
    if frame.arch == Arch::Aarch64 {
        for (alias, reg) in [("S_FP", Reg::A64X(29)), ("S_LR", Reg::A64X(30))] {
            if let Some((f, i)) = frame.field_of(reg) {
                if !taken(&v, alias) {
                    let delta = i as u64 * f.elem_size;
                    v.push(Offset {
                        name: alias.into(),
                        offset: f.offset + delta,
                        field: f.name.clone(),
                        delta,
                        what: f.elem_name(i),
                        holds: format!("{reg}, the {}", if alias == "S_FP" { "frame pointer" } else { "link register" }),
                        kind: OffsetKind::Alias,
                    });
                }
            }
        }
    }
    // Memory order, a field before its elements, aliases last (stable sort).
    v.sort_by_key(|o| (o.kind == OffsetKind::Alias, o.offset, o.kind == OffsetKind::Element));
    v
}

impl Offset {
    /// What is there and what it holds, for comments: `regs[0] (x0)`, `pstate`.
    pub fn describe(&self) -> String {
        match self.holds.as_str() {
            "" => self.what.clone(),
            holds => format!("{} ({holds})", self.what),
        }
    }
}

/// `S_` and a register's name in upper case: `S_X19`, `S_R8`.
fn reg_const(r: Reg) -> String {
    format!("S_{}", r.name().to_uppercase())
}

/// How the asm text spells a frame offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spelling {
    /// By the `.equ` names: `[sp, #S_PSTATE]` (the `.S` and the listing).
    Names,
    /// By `global_asm!` operands of the same names: `[sp, #{S_PSTATE}]`.
    Operands,
}

/// A frame's names, for spelling the addresses of its routines' instructions.
pub(crate) struct Names<'a> {
    frame: &'a FrameLayout,
    offsets: Vec<Offset>,
}

impl<'a> Names<'a> {
    pub(crate) fn new(frame: &'a FrameLayout) -> Names<'a> {
        Names { frame, offsets: offsets(frame) }
    }

    /// The name an address at `off` is spelled with, and the bytes past it: an element
    /// that starts there, else a field that starts there, else the field `off` is in.
    /// `None` in padding and past the frame (hidden spills, the FP/SIMD area).
    pub(crate) fn at(&self, off: u64) -> Option<(&Offset, u64)> {
        let exact = |kind| self.offsets.iter().find(|o| o.kind == kind && o.offset == off);
        if let Some(o) = exact(OffsetKind::Element).or_else(|| exact(OffsetKind::Field)) {
            return Some((o, 0));
        }
        let f = self.frame.fields.iter().find(|f| f.offset <= off && off < f.offset + f.size)?;
        let o = self.offsets.iter().find(|o| o.kind == OffsetKind::Field && o.field == f.name)?;
        Some((o, off - f.offset))
    }

    /// `op`'s text with the frame offset of its address spelled as a name, and the name
    /// used (`None`: the text as it is, for instructions that address no frame field or
    /// address it in a form with no single displacement, as pushes and loops do).
    pub(crate) fn spell(&self, op: &Op, how: Spelling) -> (String, Option<&Offset>) {
        let unchanged = (op.asm.clone(), None);
        let Some(access) = &op.access else { return unchanged };
        let Some(&(off, _, _)) = access.slots.first() else { return unchanged };
        let Some((o, delta)) = self.at(off) else { return unchanged };
        let name = match how {
            Spelling::Names => o.name.clone(),
            Spelling::Operands => format!("{{{}}}", o.name),
        };
        let expr = |minus: u64| match (delta, minus) {
            (0, 0) => name.clone(),
            (d, 0) => format!("{name} + {d}"),
            (0, m) => format!("{name} - {m}"),
            (d, m) => format!("{name} + {d} - {m}"),
        };
        // aarch64 immediates take an expression in parentheses when it is not a single name.
        let imm = |minus: u64| if delta == 0 && minus == 0 { format!("#{name}") } else { format!("#({})", expr(minus)) };
        let (numeric, named) = match access.encoding {
            Encoding::A64Pair | Encoding::A64Unsigned => (format!("[sp, #{off}]"), format!("[sp, {}]", imm(0))),
            Encoding::A64Base { base, base_offset } => (format!("[{base}, #{}]", off - base_offset), format!("[{base}, {}]", imm(base_offset))),
            Encoding::X86Disp8 | Encoding::X86Disp32 => (format!("[rsp + {off}]"), format!("[rsp + {}]", expr(0))),
            Encoding::X86Push | Encoding::Loop => return unchanged,
        };
        if op.asm.matches(&numeric).count() != 1 {
            return unchanged;
        }
        (op.asm.replacen(&numeric, &named, 1), Some(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fp, Plan, Policy, Shape};

    fn names(frame: &FrameLayout) -> Vec<(String, u64)> {
        offsets(frame).into_iter().map(|o| (o.name, o.offset)).collect()
    }

    #[test]
    fn builtin_frames_have_the_asm_offsets_names() {
        let a = names(&FrameLayout::builtin(Arch::Aarch64));
        assert_eq!(a[..3], [("S_REGS".to_string(), 0), ("S_X0".into(), 0), ("S_X1".into(), 8)]);
        for (n, off) in [("S_X30", 240), ("S_SP", 248), ("S_PC", 256), ("S_PSTATE", 264), ("S_FP", 232), ("S_LR", 240)] {
            assert!(a.contains(&(n.to_string(), off)), "{n} in {a:?}");
        }
        let x = names(&FrameLayout::builtin(Arch::X86_64));
        for (n, off) in [("S_R15", 0), ("S_RAX", 80), ("S_ORIG_RAX", 120), ("S_RIP", 128), ("S_EFLAGS", 144), ("S_SS", 160)] {
            assert!(x.contains(&(n.to_string(), off)), "{n} in {x:?}");
        }
    }

    #[test]
    fn a_field_name_wins_and_arrays_of_constants_are_spelled_from_their_field() {
        let src = "#[repr(C)] struct F { #[reg(x1)] x0: u64, #[reg(x0)] a: [u64; 1], #[reg(x2..=x3)] b: [u64; 2], _r: [u32; 3], fp: u64 }";
        let f = FrameLayout::from_source(src, "F", Arch::Aarch64).unwrap();
        let n = names(&f);
        assert_eq!(n.iter().filter(|(s, _)| s == "S_X0").count(), 1, "{n:?}");
        assert!(n.contains(&("S_X2".into(), 16)) && n.contains(&("S_X3".into(), 24)) && n.contains(&("S__R".into(), 32)), "{n:?}");
        // `fp` is a field bound to x29 by its name: the alias is the field's constant.
        assert_eq!(n.iter().filter(|(s, _)| s == "S_FP").count(), 1, "{n:?}");
        let names = Names::new(&f);
        assert_eq!(names.at(8).map(|(o, d)| (o.name.as_str(), d)), Some(("S_A", 0)));
        assert_eq!(names.at(36).map(|(o, d)| (o.name.as_str(), d)), Some(("S__R", 4)));
    }

    #[test]
    fn addresses_are_spelled_by_name() {
        let f = FrameLayout::builtin(Arch::Aarch64);
        let p = Plan::new(&f, Policy::All, Fp::None, Shape::Kretprobe).unwrap();
        let n = Names::new(&f);
        let spelled: Vec<String> = p.ops().map(|op| n.spell(op, Spelling::Names).0).collect();
        for want in ["stp x0, x1, [sp, #S_X0]", "str x0, [sp, #S_PSTATE]", "ldr x30, [sp, #S_PC]"] {
            assert!(spelled.iter().any(|s| s == want), "{want} in {spelled:#?}");
        }
        let x = FrameLayout::builtin(Arch::X86_64);
        let p = Plan::new(&x, Policy::All, Fp::Args, Shape::Entry).unwrap();
        let n = Names::new(&x);
        let spelled: Vec<String> = p.ops().map(|op| n.spell(op, Spelling::Operands).0).collect();
        assert!(spelled.iter().any(|s| s == "mov qword ptr [rsp + {S_RAX}], rax"), "{spelled:#?}");
        // The FP area and hidden words keep their numbers.
        assert!(spelled.iter().any(|s| s.starts_with("movaps xmmword ptr [rsp + 1")), "{spelled:#?}");
    }
}
