//! probe-codegen: generates the register SAVE/RESTORE sequences of probe trampolines
//! from a `#[repr(C)]` frame struct.
//!
//! Hand-written save sequences with literal offsets (`stp x0, x1, [sp, #16 * 0]` …
//! `str x0, [sp, #8 * 33]`) were what made reviewers of the arm64 kretprobe
//! trampoline nervous (seed 000): nothing tied them to `struct pt_regs`. Here the
//! struct is the only truth:
//!
//! ```text
//! #[repr(C)] struct ──► FrameLayout ──► Plan (arch × policy × fp × shape) ──► asm, .S, C header,
//!                                                                              Rust items,
//!                                                                              listing
//! ```
//!
//! Every output names the frame's offsets alike ([`render::names`]: `S_PSTATE`,
//! `S_REGS`, `S_X0` … `S_X30`, `S_FRAME_SIZE`), and the asm reads in those names, as
//! the kernel's entry code reads with asm-offsets: the `.S` defines `.equ S_PSTATE, 264`
//! and stores to `[sp, #S_PSTATE]`; a `global_asm!` takes `S_PSTATE` as a `const`
//! operand from `offset_of!`. The Rust items of a frame (constants, `Frame` impl,
//! assertions naming the field, routines) come from one renderer,
//! [`render::RustItems`], whether `#[pt_regs]`, the [`Builder`], the CLI or probe-rt's
//! build script asks.
//!
//! ```
//! use probe_codegen::{Arch, FrameLayout, Plan, Policy, Fp, Shape, render};
//! let frame = FrameLayout::builtin(Arch::Aarch64);
//! let plan = Plan::new(&frame, Policy::All, Fp::None, Shape::Kretprobe).unwrap();
//! assert!(render::c_header(&[&plan]).contains("#define S_PSTATE 264"));
//! let s = render::gnu_asm(&[(&plan, "my_kretprobe")], &render::Symbols::default());
//! assert!(s.contains(".equ S_PSTATE, 264") && s.contains("str x0, [sp, #S_PSTATE]"));
//! // The plan itself holds the instructions as the assembler sees them.
//! assert!(plan.save.iter().any(|op| op.asm == "stp x0, x1, [sp, #0]"));
//! ```
//!
//! The library does no I/O except [`FrameLayout::from_file`], uses no `unsafe` and
//! builds for any host.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod arch;
pub mod builder;
pub mod layout;
pub mod options;
pub mod plan;
pub mod render;
pub mod site;

pub use arch::{Arch, Reg, RegClass};
pub use builder::{BuildError, Builder, Written};
pub use layout::{Field, FieldValue, FrameError, FrameLayout, Spot};
pub use plan::{Access, Dir, Encoding, Fp, Op, Plan, PlanError, Policy, Shape, Slot};

/// Source of the built-in frame of `arch` (`codegen/frames/<arch>.rs`), the file
/// probe-rt compiles as its `PtRegs`.
pub fn builtin_source(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => include_str!("../frames/x86_64.rs"),
        Arch::Aarch64 => include_str!("../frames/aarch64.rs"),
    }
}

/// An error reading a frame from a file: the file and every problem in it.
#[derive(Debug)]
pub struct FileError {
    /// The file.
    pub path: std::path::PathBuf,
    /// What went wrong: I/O, or the frame's errors (each names its field).
    pub kind: FileErrorKind,
}

/// What went wrong in a [`FileError`].
#[derive(Debug)]
pub enum FileErrorKind {
    /// The file could not be read.
    Io(std::io::Error),
    /// The struct is not a valid frame.
    Frame(Vec<FrameError>),
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            FileErrorKind::Io(e) => write!(f, "{}: {e}", self.path.display()),
            FileErrorKind::Frame(errors) => {
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "{}: {e}", self.path.display())?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for FileError {}

impl FrameLayout {
    /// Reads the layout of struct `name` from the Rust source file `path` (what a build script uses).
    pub fn from_file(path: impl AsRef<std::path::Path>, name: &str, arch: Arch) -> Result<FrameLayout, FileError> {
        let path = path.as_ref();
        let err = |kind| FileError { path: path.to_path_buf(), kind };
        let text = std::fs::read_to_string(path).map_err(|e| err(FileErrorKind::Io(e)))?;
        FrameLayout::from_source(&text, name, arch).map_err(|e| err(FileErrorKind::Frame(e)))
    }
}
