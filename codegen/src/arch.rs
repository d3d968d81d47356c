//! Architectures, registers and the ABI facts the generator relies on.

use std::fmt;

/// A target architecture probe-codegen can generate for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// x86_64, System V AMD64 ABI (Linux user space: 128-byte red zone).
    X86_64,
    /// aarch64, AAPCS64 (Linux user space: no red zone, `sp` always 16-aligned).
    Aarch64,
}

impl Arch {
    /// Every supported architecture.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The name Rust uses for the architecture (`cfg(target_arch = "...")`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Parses a Rust `target_arch` name (as in `CARGO_CFG_TARGET_ARCH`).
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// The architecture probe-codegen itself was compiled for, if supported.
    pub fn host() -> Option<Arch> {
        Arch::from_name(std::env::consts::ARCH)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Arch::from_name(s).ok_or_else(|| format!("unknown architecture `{s}`: must be `x86_64` or `aarch64`"))
    }
}

/// x86_64 general registers in encoding order (the order `r8`..`r15` continue).
const X86_GPR: [&str; 16] = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];

/// x86_64 segment registers a frame may record (read-only).
const X86_SEG: [&str; 6] = ["es", "cs", "ss", "ds", "fs", "gs"];

/// A register, or a piece of machine state, a frame field can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reg {
    /// x86_64 general register by encoding number (0 = `rax` … 4 = `rsp` … 15 = `r15`).
    X86Gpr(u8),
    /// x86_64 instruction pointer: the address the probed context resumes at.
    X86Rip,
    /// x86_64 `rflags`.
    X86Eflags,
    /// x86_64 segment selector by encoding number (`es`, `cs`, `ss`, `ds`, `fs`, `gs`).
    X86Seg(u8),
    /// aarch64 general register `x0`..`x30`.
    A64X(u8),
    /// aarch64 stack pointer.
    A64Sp,
    /// aarch64 program counter: the address the probed context resumes at.
    A64Pc,
    /// aarch64 condition flags (`nzcv`, in `pstate` bit positions).
    A64Pstate,
}

/// How the ABI treats a register across a call, which decides what a trampoline
/// must restore itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegClass {
    /// Not preserved across calls (SysV: rax, rcx, rdx, rsi, rdi, r8–r11, flags;
    /// AAPCS64: x0–x18, x30, nzcv).
    CallerSaved,
    /// Preserved by every callee (SysV: rbx, rbp, r12–r15; AAPCS64: x19–x29).
    CalleeSaved,
    /// The stack pointer: recorded, never restored from the frame.
    StackPointer,
    /// The resume address: restoring it means resuming there.
    ProgramCounter,
    /// Read-only machine state (x86 segment selectors): recorded, never restored.
    ReadOnly,
}

impl Reg {
    /// The architecture this register belongs to.
    pub fn arch(self) -> Arch {
        match self {
            Reg::X86Gpr(_) | Reg::X86Rip | Reg::X86Eflags | Reg::X86Seg(_) => Arch::X86_64,
            Reg::A64X(_) | Reg::A64Sp | Reg::A64Pc | Reg::A64Pstate => Arch::Aarch64,
        }
    }

    /// Looks a register up by its assembler name on `arch` (also `rflags`, `fp`, `lr`, `nzcv`).
    pub fn from_name(arch: Arch, name: &str) -> Option<Reg> {
        let name = name.trim();
        match arch {
            Arch::X86_64 => {
                if let Some(i) = X86_GPR.iter().position(|r| *r == name) {
                    return Some(Reg::X86Gpr(i as u8));
                }
                if let Some(i) = X86_SEG.iter().position(|r| *r == name) {
                    return Some(Reg::X86Seg(i as u8));
                }
                match name {
                    "rip" => Some(Reg::X86Rip),
                    "eflags" | "rflags" => Some(Reg::X86Eflags),
                    _ => None,
                }
            }
            Arch::Aarch64 => match name {
                "sp" => Some(Reg::A64Sp),
                "pc" => Some(Reg::A64Pc),
                "pstate" | "nzcv" => Some(Reg::A64Pstate),
                "fp" => Some(Reg::A64X(29)),
                "lr" => Some(Reg::A64X(30)),
                _ => {
                    let n: u8 = name.strip_prefix('x')?.parse().ok()?;
                    // Reject spellings like `x01` that would parse but are not register names.
                    (n <= 30 && name == format!("x{n}")).then_some(Reg::A64X(n))
                }
            },
        }
    }

    /// The assembler name (64-bit view).
    pub fn name(self) -> &'static str {
        const A64: [&str; 31] = [
            "x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12", "x13", "x14", "x15", "x16", "x17", "x18", "x19", "x20", "x21",
            "x22", "x23", "x24", "x25", "x26", "x27", "x28", "x29", "x30",
        ];
        match self {
            Reg::X86Gpr(n) => X86_GPR[n as usize],
            Reg::X86Rip => "rip",
            Reg::X86Eflags => "eflags",
            Reg::X86Seg(n) => X86_SEG[n as usize],
            Reg::A64X(n) => A64[n as usize],
            Reg::A64Sp => "sp",
            Reg::A64Pc => "pc",
            Reg::A64Pstate => "pstate",
        }
    }

    /// The register `n` places after this one in its numbered file, for array fields
    /// (`x19` + 2 = `x21`; on x86_64 numbering is the encoding order).
    pub fn nth_after(self, n: usize) -> Option<Reg> {
        match self {
            Reg::X86Gpr(r) => (r as usize + n <= 15).then(|| Reg::X86Gpr((r as usize + n) as u8)),
            Reg::A64X(r) => (r as usize + n <= 30).then(|| Reg::A64X((r as usize + n) as u8)),
            _ => (n == 0).then_some(self),
        }
    }

    /// Size in bytes of the value the trampoline stores for this register.
    pub fn size(self) -> u64 {
        8
    }

    /// How the ABI of the register's architecture treats it across a call.
    pub fn class(self) -> RegClass {
        match self {
            Reg::X86Gpr(4) | Reg::A64Sp => RegClass::StackPointer,
            // rbx, rbp, r12..r15
            Reg::X86Gpr(3 | 5 | 12..=15) => RegClass::CalleeSaved,
            Reg::X86Gpr(_) | Reg::X86Eflags => RegClass::CallerSaved,
            Reg::X86Rip | Reg::A64Pc => RegClass::ProgramCounter,
            Reg::X86Seg(_) => RegClass::ReadOnly,
            Reg::A64X(19..=29) => RegClass::CalleeSaved,
            Reg::A64X(_) | Reg::A64Pstate => RegClass::CallerSaved,
        }
    }

    /// The program counter of `arch`: x86_64 `rip`, aarch64 `pc`.
    pub fn pc(arch: Arch) -> Reg {
        match arch {
            Arch::X86_64 => Reg::X86Rip,
            Arch::Aarch64 => Reg::A64Pc,
        }
    }

    /// The general registers of `arch` a trampoline must preserve, in encoding order
    /// (x86_64: all but `rsp`; aarch64: x0..x30).
    pub fn gprs(arch: Arch) -> Vec<Reg> {
        match arch {
            Arch::X86_64 => (0..16).filter(|&n| n != 4).map(Reg::X86Gpr).collect(),
            Arch::Aarch64 => (0..=30).map(Reg::A64X).collect(),
        }
    }
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
