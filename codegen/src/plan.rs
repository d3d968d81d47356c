//! Plans: the ordered instructions of a trampoline, chosen from a frame layout.
//!
//! A plan is built as a list of *steps*; each step knows how it saves and how it
//! restores, and the restore sequence is the steps in reverse order (riscv-rt's one
//! register list, read backwards), so save and restore always mirror each other.

use crate::arch::{Arch, Reg, RegClass};
use crate::layout::{FieldValue, FrameLayout};
use std::fmt;

mod aarch64;
mod x86_64;

pub use crate::options::{Fp, Policy, Shape};

/// What a memory access of the trampoline touches.
#[allow(missing_docs)] // fields documented on their variants
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// A frame field element (`regs[3]`, `rax`), holding `reg` or a constant (`None`).
    Field { name: String, reg: Option<Reg> },
    /// A hidden spill of a caller-saved register that has no field.
    Hidden(Reg),
    /// The hidden resume address of a frame without a pc/rip field.
    Resume,
    /// The x86_64 anchor: where the pre-alignment stack pointer is kept.
    Anchor,
    /// The FP/SIMD area (`q0`, `xmm3`, `fpcr`, `xsave`).
    Fp(String),
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Field { name, .. } => write!(f, "{name}"),
            Slot::Hidden(r) => write!(f, "(hidden {r})"),
            Slot::Resume => f.write_str("(hidden resume address)"),
            Slot::Anchor => f.write_str("(anchor)"),
            Slot::Fp(n) => write!(f, "(fp {n})"),
        }
    }
}

/// How an access's address is encoded.
#[allow(missing_docs)] // fields documented on their variants
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// aarch64 `stp`/`ldp` signed 7-bit immediate scaled by the register size.
    A64Pair,
    /// aarch64 `str`/`ldr` unsigned 12-bit immediate scaled by the access size.
    A64Unsigned,
    /// aarch64 access through a base register materialised once (`add xB, sp, #base`),
    /// with an unsigned 12-bit scaled immediate from it.
    A64Base { base: Reg, base_offset: u64 },
    /// x86_64 `[rsp + disp8]`.
    X86Disp8,
    /// x86_64 `[rsp + disp32]`.
    X86Disp32,
    /// x86_64 `pushfq` with rsp placed just above the slot (an 8-byte, 8-aligned word).
    X86Push,
    /// A store loop over the slot (large reserved fields): x86_64 `[rsp + rdx*8 + end]`
    /// with a negative count, aarch64 post-indexed `str xzr, [x0], #8`.
    Loop,
}

/// Direction of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Register to memory.
    Store,
    /// Memory to register.
    Load,
}

/// A memory access of one instruction, relative to the frame base (the stack pointer
/// after allocation). A pair instruction has two slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// Store or load.
    pub dir: Dir,
    /// `(offset, size, what)` of each slot touched, lowest offset first.
    pub slots: Vec<(u64, u64, Slot)>,
    /// The addressing form chosen for the offset.
    pub encoding: Encoding,
}

/// One instruction of a routine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Assembler text, without indentation; operand placeholders as `{name}`,
    /// the routine's own symbol as `{self}`.
    pub asm: String,
    /// The frame memory it touches, if any.
    pub access: Option<Access>,
    /// Why it is there (the listing prints it).
    pub note: String,
}

impl Op {
    fn new(asm: impl Into<String>, note: impl Into<String>) -> Op {
        Op { asm: asm.into(), access: None, note: note.into() }
    }
    fn mem(asm: impl Into<String>, note: impl Into<String>, access: Access) -> Op {
        Op { asm: asm.into(), access: Some(access), note: note.into() }
    }
}

/// A step of the save sequence and its mirror in the restore sequence.
#[derive(Clone, Debug, Default)]
struct Step {
    save: Vec<Op>,
    restore: Vec<Op>,
}

/// A plan could not be made.
#[allow(missing_docs)] // fields documented on their variants
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// The frame was read for another architecture.
    ArchMismatch { frame: Arch, wanted: Arch },
    /// An aarch64 offset out of every encodable range with no register to use as a base.
    FrameTooLarge { frame: String, field: String, offset: u64 },
    /// A [`Shape::Site`] routine over a frame without a pc (`rip`) field: its handler
    /// could not see the site, nor tell where to resume.
    SiteWithoutPc { frame: String },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::ArchMismatch { frame, wanted } => {
                write!(f, "the frame layout was read for {frame}, not {wanted}")
            }
            PlanError::FrameTooLarge { frame, field, offset } => write!(
                f,
                "frame `{frame}`: `{field}` at offset {offset} cannot be reached from `sp`, and no field of \
                 x3..x8 or x10..x29 below 32760 bytes can serve as a base register: such a field must come first"
            ),
            PlanError::SiteWithoutPc { frame } => {
                write!(f, "frame `{frame}` has no pc (`rip`) field: a `site` routine's handler reads the site there and returns where to resume")
            }
        }
    }
}

impl std::error::Error for PlanError {}

/// The complete instruction plan of one routine for one frame, arch, policy, FP mode and shape.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The frame layout the plan stores into.
    pub frame: FrameLayout,
    /// General-register policy.
    pub policy: Policy,
    /// FP/SIMD mode.
    pub fp: Fp,
    /// Routine shape.
    pub shape: Shape,
    /// Bytes the routine allocates statically below its entry stack pointer for the
    /// frame, hidden spills and FP area (x86_64: after the anchor words and alignment,
    /// or, for `Entry` and `Site` without an anchor, right below the red zone; with `Fp::Full` the
    /// run-time `xsave` area comes on top).
    pub alloc: u64,
    /// Hidden slots: `(slot, offset)` past the frame.
    pub hidden: Vec<(Slot, u64)>,
    /// Offset and static size of the FP/SIMD area (size 0: known at run time, `xsave`).
    pub fp_area: Option<(u64, u64)>,
    /// Bytes below the entry stack pointer the routine never touches (x86_64 `Entry` and `Site`: the red zone).
    pub red_zone: u64,
    /// Entry to allocation.
    pub prologue: Vec<Op>,
    /// The SAVE sequence: after it every field holds its defined value.
    pub save: Vec<Op>,
    /// Passing the frame to the handler and calling it.
    pub call: Vec<Op>,
    /// The RESTORE sequence: the mirror of `save`.
    pub restore: Vec<Op>,
    /// Deallocation and resumption.
    pub epilogue: Vec<Op>,
    /// Names of the `sym` operands the text refers to (`handler`, `xsave_size`, `xsave_mask`, `wide_mode`).
    pub operands: Vec<&'static str>,
}

impl Plan {
    /// Plans a routine of `shape` for `frame`.
    pub fn new(frame: &FrameLayout, policy: Policy, fp: Fp, shape: Shape) -> Result<Plan, PlanError> {
        if shape == Shape::Site && frame.offset_of(Reg::pc(frame.arch)).is_none() {
            return Err(PlanError::SiteWithoutPc { frame: frame.name.clone() });
        }
        match frame.arch {
            Arch::X86_64 => x86_64::plan(frame, policy, fp, shape),
            Arch::Aarch64 => aarch64::plan(frame, policy, fp, shape),
        }
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.frame.arch
    }

    /// Whether the routine carries call-frame information (`.cfi_*` around its handler
    /// call: a Kretprobe routine, and a SaveRestore, Entry or Site routine over a frame with
    /// stack pointer and pc fields), and so needs `.cfi_startproc` … `.cfi_endproc`
    /// around it.
    pub fn has_cfi(&self) -> bool {
        self.call.iter().any(|op| op.asm.starts_with(".cfi_"))
    }

    /// The return-address column of the routine's call-frame information, if it is not
    /// the arch's usual one (aarch64 SaveRestore: see `context_cfi`).
    pub fn cfi_return_column(&self) -> Option<u8> {
        (self.shape.resumes_frame_context() && self.arch() == Arch::Aarch64).then(|| context_ra_column(Arch::Aarch64))
    }

    /// Every instruction of the routine in order.
    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.prologue.iter().chain(&self.save).chain(&self.call).chain(&self.restore).chain(&self.epilogue)
    }

    /// Where the probed context's stack pointer is while the handler runs, as an offset
    /// from the frame base, if the routine allocates at a fixed distance below it: every
    /// aarch64 routine (sp is 16-aligned everywhere), and x86_64 `Entry` and `Site` without an
    /// anchor. `None` when only the anchor knows (x86_64 alignment at run time). A
    /// dispatcher can read it when the frame's own stack-pointer field may have been
    /// changed by a handler.
    pub fn probed_sp_offset(&self) -> Option<u64> {
        match self.arch() {
            Arch::Aarch64 => Some(self.alloc),
            Arch::X86_64 => (!self.hidden.iter().any(|(s, _)| *s == Slot::Anchor)).then_some(self.alloc + self.red_zone + 8),
        }
    }

    /// Whether `reg`, which has a field, is reloaded from it on the way out.
    pub fn restores(&self, reg: Reg) -> bool {
        restores(self.frame.arch, self.policy, self.shape, reg)
    }

    fn assemble(frame: &FrameLayout, policy: Policy, fp: Fp, shape: Shape, parts: Parts) -> Plan {
        let restore = parts.steps.iter().rev().flat_map(|s| s.restore.iter().cloned()).collect();
        Plan {
            frame: frame.clone(),
            policy,
            fp,
            shape,
            alloc: parts.alloc,
            hidden: parts.hidden,
            fp_area: parts.fp_area,
            red_zone: parts.red_zone,
            prologue: parts.prologue,
            save: parts.steps.iter().flat_map(|s| s.save.iter().cloned()).collect(),
            call: parts.call,
            restore,
            epilogue: parts.epilogue,
            operands: parts.operands,
        }
    }
}

/// The call-frame directives around a kretprobe routine's handler call: `(before,
/// after)` the call instruction. Before: the CFA (`cfa`, a DWARF expression) and the
/// return address, stored at `sp + ra_off`. After: the return address is undefined
/// again (the unwinder looks up return address − 1, which is inside the call, so the
/// rules before the call are the ones a walk from the handler uses).
fn kretprobe_cfi(arch: Arch, cfa: &[u8], ra_off: u64) -> (Vec<Op>, Op) {
    // DWARF register numbers (System V x86_64 psABI; AAPCS64 DWARF): sp, return address.
    let (sp, ra, ra_name) = match arch {
        Arch::X86_64 => (7u8, 16u8, "rip"),
        Arch::Aarch64 => (31, 30, "x30"),
    };
    let escape = |bytes: Vec<u8>| bytes.iter().map(|b| format!("{b:#04x}")).collect::<Vec<_>>().join(", ");
    // DW_CFA_def_cfa_expression (0x0f), then DW_CFA_expression (0x10) of the return
    // address column: DW_OP_breg<sp> (0x70 + reg) ra_off.
    let mut def_cfa = vec![0x0f];
    uleb(&mut def_cfa, cfa.len() as u64);
    def_cfa.extend_from_slice(cfa);
    let mut ra_at = vec![0x70 + sp];
    sleb(&mut ra_at, ra_off as i64);
    let mut ra_rule = vec![0x10, ra];
    uleb(&mut ra_rule, ra_at.len() as u64);
    ra_rule.extend(ra_at);
    let before = vec![
        Op::new(format!(".cfi_escape {}", escape(def_cfa)), "unwind: the CFA (the probed context's sp)"),
        Op::new(format!(".cfi_escape {}", escape(ra_rule)), format!("unwind: the return address is at [sp + {ra_off}]")),
    ];
    (before, Op::new(format!(".cfi_undefined {ra_name}"), "unwind: past the call the return address is not in the frame"))
}

/// The return-address column of a SaveRestore, Entry or Site routine's call-frame information: x86_64
/// `rip` (16, a column of its own); aarch64 the column GCC's unwinder keeps for the pc
/// of signal frames (`DWARF_ALT_FRAME_RETURN_COLUMN`, 96, libgcc's aarch64
/// linux-unwind.h), because `x30` is a register of the frame with a value of its own.
pub(crate) fn context_ra_column(arch: Arch) -> u8 {
    match arch {
        Arch::X86_64 => 16,
        Arch::Aarch64 => 96,
    }
}

/// DWARF register number of a general register (System V AMD64 psABI 1.0, 3.6.2,
/// Figure 3.36; "DWARF for the Arm 64-bit Architecture", 4.1), or `None`.
fn dwarf_number(r: Reg) -> Option<u8> {
    const X86: [u8; 16] = [0, 2, 1, 3, 7, 6, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15];
    match r {
        Reg::X86Gpr(n) => X86.get(n as usize).copied(),
        Reg::A64X(n) if n <= 30 => Some(n),
        Reg::A64Sp => Some(31),
        _ => None,
    }
}

/// The call-frame directives around a SaveRestore, Entry or Site routine's handler call,
/// `(before, after)` the call, or `None` if the frame has no stack pointer or pc field.
///
/// Such a routine resumes the frame's context (an Entry routine's is the probed
/// function at its entry: its stack pointer above the return address, x86_64; its link
/// register in the `x30` field, aarch64), so an unwinder in the handler
/// is told that the caller *is* that context, as for a signal frame: its stack pointer
/// (the CFA) and every general register are read from their fields (through the
/// frame base in the stack pointer, `sp_base`), its pc from the pc field, exactly.
/// Unwinders look a caller's rules up at return address − 1, so the return-address
/// column is the pc + 1: the lookup lands on the pc itself, as a signal frame's does
/// (`.cfi_signal_frame` would do that too, but then backtraces symbolize the pc − 1:
/// the function before, for a context at a function's first instruction). After the
/// call the return address is undefined: a walk from elsewhere in the routine stops.
fn context_cfi(arch: Arch, frame: &FrameLayout) -> Option<(Vec<Op>, Op)> {
    let sp_reg = match arch {
        Arch::X86_64 => Reg::X86Gpr(4),
        Arch::Aarch64 => Reg::A64Sp,
    };
    let pc_reg = Reg::pc(arch);
    let (sp_off, pc_off) = (frame.offset_of(sp_reg)?, frame.offset_of(pc_reg)?);
    let base = 0x70 + dwarf_number(sp_reg)?; // DW_OP_breg<sp>
    let ra = context_ra_column(arch);
    let escape = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:#04x}")).collect::<Vec<_>>().join(", ");
    // `DW_OP_breg<sp> off`: the address of a field.
    let at = |off: u64| {
        let mut e = vec![base];
        sleb(&mut e, off as i64);
        e
    };
    // DW_CFA_def_cfa_expression (0x0f), DW_CFA_expression (0x10), DW_CFA_val_expression
    // (0x16): the expression after its ULEB128 length.
    let rule = |op: u8, reg: Option<u8>, expr: Vec<u8>| {
        let mut r = vec![op];
        r.extend(reg);
        uleb(&mut r, expr.len() as u64);
        r.extend(expr);
        r
    };
    let mut cfa = at(sp_off);
    cfa.push(0x06); // DW_OP_deref
    let mut pc = at(pc_off);
    pc.extend([0x06, 0x23, 1]); // DW_OP_deref; DW_OP_plus_uconst 1
    let mut before = vec![
        Op::new(format!(".cfi_escape {}", escape(&rule(0x0f, None, cfa))), "unwind: the CFA is the frame's stack pointer"),
        Op::new(format!(".cfi_escape {}", escape(&rule(0x16, Some(ra), pc))), "unwind: the caller's pc is the frame's (+ 1: looked up at - 1)"),
    ];
    let mut regs: Vec<(Reg, u64)> = Reg::gprs(arch).into_iter().filter(|r| *r != sp_reg).filter_map(|r| Some((r, frame.offset_of(r)?))).collect();
    regs.sort_by_key(|(_, off)| *off);
    for (r, off) in regs {
        let Some(n) = dwarf_number(r) else { continue };
        before.push(Op::new(format!(".cfi_escape {}", escape(&rule(0x10, Some(n), at(off)))), format!("unwind: the caller's {} is in its field", r.name())));
    }
    Some((before, Op::new(format!(".cfi_undefined {ra}"), "unwind: past the call the caller is not known")))
}

/// DWARF unsigned LEB128.
pub(crate) fn uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// DWARF signed LEB128.
pub(crate) fn sleb(out: &mut Vec<u8>, mut v: i64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if (v == 0 && b & 0x40 == 0) || (v == -1 && b & 0x40 != 0) {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// What the per-arch planners hand to [`Plan::assemble`].
struct Parts {
    alloc: u64,
    hidden: Vec<(Slot, u64)>,
    fp_area: Option<(u64, u64)>,
    red_zone: u64,
    prologue: Vec<Op>,
    steps: Vec<Step>,
    call: Vec<Op>,
    epilogue: Vec<Op>,
    operands: Vec<&'static str>,
}

/// Whether a register that has a field is reloaded from it on the way out, before
/// shape-specific resume rules (the register that carries the resume address, aarch64
/// `x16` for `Entry` and `Site`, `x30` for the others, is loaded from the pc field
/// instead; see the per-arch planners).
fn restores(arch: Arch, policy: Policy, shape: Shape, reg: Reg) -> bool {
    let resume = match (arch, shape) {
        (Arch::Aarch64, Shape::Entry | Shape::Site) => Some(Reg::A64X(16)),
        (Arch::Aarch64, _) => Some(Reg::A64X(30)),
        (Arch::X86_64, _) => None,
    };
    if Some(reg) == resume {
        return false;
    }
    // x86_64 Entry runs at a function entry and Kretprobe at a function return, where
    // the status flags carry nothing (the SysV ABI does not preserve them across calls)
    // and DF is clear (the ABI has it so at both; Kretprobe's `cld` keeps it so): they
    // are saved for the handler, not restored, which spares their restore on every
    // call.
    if arch == Arch::X86_64 && reg == Reg::X86Eflags && matches!(shape, Shape::Entry | Shape::Site | Shape::Kretprobe) {
        return false;
    }
    // A Site routine resumes where its handler says: the pc field is not read back.
    if shape == Shape::Site && reg.class() == RegClass::ProgramCounter {
        return false;
    }
    match reg.class() {
        RegClass::CallerSaved | RegClass::ProgramCounter => true,
        RegClass::CalleeSaved => policy == Policy::All,
        RegClass::StackPointer | RegClass::ReadOnly => false,
    }
}

/// The hidden words past the frame, handed out 8 bytes at a time.
struct Hidden {
    /// The next free offset.
    next: u64,
    /// `(slot, offset)` of every word handed out.
    slots: Vec<(Slot, u64)>,
}

impl Hidden {
    fn after(frame: &FrameLayout) -> Hidden {
        Hidden { next: frame.size.next_multiple_of(8), slots: Vec::new() }
    }

    fn take(&mut self, slot: Slot) -> u64 {
        let off = self.next;
        self.next += 8;
        self.slots.push((slot, off));
        off
    }
}

/// Constant fields of at least this many bytes are filled by a loop, not one store per element.
const LOOP_MIN: u64 = 128;

/// An 8-byte-aligned run of a large constant field, filled by a loop.
struct Fill {
    name: String,
    start: u64,
    /// A multiple of 8.
    len: u64,
    value: u64,
}

/// The loop-filled middle of every constant field of at least [`LOOP_MIN`] bytes
/// (its unaligned head and tail are ordinary [`elements`]).
fn fills(frame: &FrameLayout) -> Vec<Fill> {
    frame
        .fields
        .iter()
        .filter_map(|f| match f.value {
            FieldValue::Const(value) if f.size >= LOOP_MIN => {
                let start = f.offset.next_multiple_of(8);
                let end = (f.offset + f.size) / 8 * 8;
                Some(Fill { name: f.name.clone(), start, len: end - start, value })
            }
            _ => None,
        })
        .collect()
}

/// Naturally aligned chunks of at most 8 bytes covering `from..to`.
fn chunks(from: u64, to: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut at = from;
    std::iter::from_fn(move || {
        (at < to).then(|| {
            let size = [8, 4, 2, 1].into_iter().find(|c| at.is_multiple_of(*c) && at + c <= to).unwrap_or(1);
            at += size;
            (at - size, size)
        })
    })
}

/// `(offset, element size, slot)` of every element of every field, in offset order,
/// with what fills it: a register or a constant (the middles of [`fills`] excepted).
/// The implicit padding between and after the fields is included as zero constants,
/// so every byte of the frame is written, not only every field.
fn elements(frame: &FrameLayout) -> Vec<(u64, u64, String, Result<Reg, u64>)> {
    let mut out = Vec::new();
    let mut end = 0;
    for f in &frame.fields {
        out.extend(chunks(end, f.offset).map(|(at, size)| (at, size, "(padding)".to_string(), Err(0))));
        end = f.offset + f.size;
        match &f.value {
            FieldValue::Const(c) if f.size >= LOOP_MIN => {
                let (start, stop) = (f.offset.next_multiple_of(8), end / 8 * 8);
                for (from, to) in [(f.offset, start), (stop, end)] {
                    out.extend(chunks(from, to).map(|(at, size)| (at, size, f.name.clone(), Err(*c))));
                }
            }
            FieldValue::Const(c) => {
                for i in 0..f.len.unwrap_or(1) as usize {
                    out.push((f.offset + i as u64 * f.elem_size, f.elem_size, f.elem_name(i), Err(*c)));
                }
            }
            FieldValue::Regs(regs) => {
                for (i, r) in regs.iter().enumerate() {
                    out.push((f.offset + i as u64 * f.elem_size, f.elem_size, f.elem_name(i), Ok(*r)));
                }
            }
        }
    }
    out.extend(chunks(end, frame.size).map(|(at, size)| (at, size, "(padding)".to_string(), Err(0))));
    out.sort_by_key(|e| e.0);
    out
}
