//! The build-script front end: generate a frame's routines, header and Rust offsets
//! into `OUT_DIR`.
//!
//! ```no_run
//! // build.rs
//! use probe_codegen::{Builder, Fp, Policy, Shape};
//! fn main() {
//!     let out = Builder::new()
//!         .frame_file("src/frame.rs", "MyRegs")
//!         .shape(Shape::SaveRestore)
//!         .shape(Shape::Kretprobe)
//!         .policy(Policy::CallerSaved)
//!         .fp(Fp::Args)
//!         .handler("on_frame")
//!         .arch_from_env()
//!         .out_dir_from_env()
//!         .write()
//!         .unwrap_or_else(|e| panic!("{e}"));
//!     // out.asm: my_regs.S (for `cc` or `global_asm!(include_str!(..))`),
//!     // out.header: my_regs.h (S_* for C), out.rust: my_regs.rs (the Rust items).
//! }
//! ```
//!
//! The four files read in the same names ([`render::names`]): `my_regs.h` defines
//! `S_ARG0`, `my_regs.S` defines it with `.equ` and stores to `[sp, #S_ARG0]`, and
//! `my_regs.rs` holds the items `#[pt_regs]` would give the frame ([`render::RustItems`]):
//! `MyRegs::S_ARG0`, `MyRegs::S_ALLOC_KRETPROBE`, the routines as
//! `MyRegs::SAVE_RESTORE` …, `unsafe impl Frame for MyRegs` and the layout assertions,
//! or, with [`Place::Module`], the same constants free wherever it is `include!`d.

use crate::render::{Place, Routine, RoutineAsm, RustItems};
use crate::{render, Arch, FileError, Fp, FrameLayout, Plan, PlanError, Policy, Shape};
use std::fmt;
use std::path::{Path, PathBuf};

/// Generates a frame's routines and offsets from a build script.
#[derive(Clone, Debug)]
pub struct Builder {
    frame: Option<(PathBuf, String)>,
    shapes: Vec<Shape>,
    policy: Policy,
    fp: Fp,
    arch: Option<Arch>,
    out_dir: Option<PathBuf>,
    name: Option<String>,
    handler: String,
    type_path: Option<String>,
    place: Option<Place>,
    krate: String,
    /// A `*_from_env` failure, reported by `write`.
    env_error: Option<(&'static str, String)>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

/// What [`Builder::write`] wrote.
#[derive(Clone, Debug)]
pub struct Written {
    /// `<name>.S`: the routines, one symbol per shape, `<name>_<shape>`.
    pub asm: PathBuf,
    /// `<name>.h`: `#define S_<FIELD> <offset>`, `S_FRAME_SIZE`, `S_ALLOC_<SHAPE>`.
    pub header: PathBuf,
    /// `<name>.rs`: the frame's Rust items ([`RustItems`]: offsets, routines as
    /// constants, `Frame` impl, layout assertions), to `include!`.
    pub rust: PathBuf,
    /// `<name>.txt`: the annotated listing of every routine.
    pub listing: PathBuf,
    /// The routine symbols, in the order of the shapes.
    pub symbols: Vec<String>,
}

/// Why [`Builder::write`] failed; its `Display` is one line per problem, naming the
/// file and the field, fit for a build script's panic message.
#[allow(missing_docs)] // fields documented on their variants
#[derive(Debug)]
pub enum BuildError {
    /// A setting the builder needs was not given.
    Missing(&'static str),
    /// An environment variable a `*_from_env` method reads is missing or unusable.
    Env { var: &'static str, message: String },
    /// The frame file could not be read, or its struct is no valid frame.
    Frame(FileError),
    /// [`Place::Type`] was asked for a struct declared with `#[pt_regs]`, which gives
    /// the type the same items: the two would conflict.
    TypeItemsTwice { path: PathBuf, frame: String },
    /// No plan could be made.
    Plan(PlanError),
    /// An output file could not be written.
    Write { path: PathBuf, error: std::io::Error },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Missing(what) => write!(f, "probe-codegen Builder: {what} must be set"),
            BuildError::Env { var, message } => write!(f, "probe-codegen Builder: ${var}: {message}"),
            BuildError::Frame(e) => write!(f, "{e}"),
            BuildError::TypeItemsTwice { path, frame } => write!(
                f,
                "{}: `{frame}` is declared with `#[pt_regs]`, which gives the type its constants and `Frame` impl: \
                 the Builder's items must then be free constants, `.place(Place::Module)` (the default for such a struct)",
                path.display()
            ),
            BuildError::Plan(e) => write!(f, "{e}"),
            BuildError::Write { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for BuildError {}

impl Builder {
    /// A builder with policy `All`, FP mode `None`, handler symbol `probe_handler`.
    pub fn new() -> Builder {
        Builder {
            frame: None,
            shapes: Vec::new(),
            policy: Policy::All,
            fp: Fp::None,
            arch: None,
            out_dir: None,
            name: None,
            handler: "probe_handler".into(),
            type_path: None,
            place: None,
            krate: "::probekit".into(),
            env_error: None,
        }
    }

    /// The frame: struct `name` in the Rust source file `path` (relative to the crate root).
    pub fn frame_file(mut self, path: impl AsRef<Path>, name: &str) -> Builder {
        self.frame = Some((path.as_ref().to_path_buf(), name.to_string()));
        self
    }

    /// Adds a routine of `shape` (each shape once).
    pub fn shape(mut self, shape: Shape) -> Builder {
        if !self.shapes.contains(&shape) {
            self.shapes.push(shape);
        }
        self
    }

    /// The general-register policy (default `All`).
    pub fn policy(mut self, policy: Policy) -> Builder {
        self.policy = policy;
        self
    }

    /// The FP/SIMD mode (default `None`).
    pub fn fp(mut self, fp: Fp) -> Builder {
        self.fp = fp;
        self
    }

    /// The symbol every routine calls: `extern "C" fn(*mut Frame, *mut u8) -> usize`
    /// (the return value is the real return address for a kretprobe, where to resume
    /// for a site, ignored otherwise).
    pub fn handler(mut self, symbol: &str) -> Builder {
        self.handler = symbol.to_string();
        self
    }

    /// The target architecture.
    pub fn arch(mut self, arch: Arch) -> Builder {
        self.arch = Some(arch);
        self
    }

    /// The target architecture from `CARGO_CFG_TARGET_ARCH` (what cargo gives a build script).
    pub fn arch_from_env(mut self) -> Builder {
        match std::env::var("CARGO_CFG_TARGET_ARCH") {
            Ok(a) => match Arch::from_name(&a) {
                Some(arch) => self.arch = Some(arch),
                None => self.env_error = Some(("CARGO_CFG_TARGET_ARCH", format!("`{a}` is not supported: must be x86_64 or aarch64"))),
            },
            Err(_) => self.env_error = Some(("CARGO_CFG_TARGET_ARCH", "not set (not in a build script?)".into())),
        }
        self
    }

    /// The directory to write into.
    pub fn out_dir(mut self, dir: impl AsRef<Path>) -> Builder {
        self.out_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// The directory to write into from `OUT_DIR`.
    pub fn out_dir_from_env(mut self) -> Builder {
        match std::env::var_os("OUT_DIR") {
            Some(d) => self.out_dir = Some(d.into()),
            None => self.env_error = Some(("OUT_DIR", "not set (not in a build script?)".into())),
        }
        self
    }

    /// The file stem and symbol prefix (default: the struct name in snake case).
    pub fn name(mut self, name: &str) -> Builder {
        self.name = Some(name.to_string());
        self
    }

    /// The frame type's path where `<name>.rs` is `include!`d (default: the struct name).
    pub fn type_path(mut self, path: &str) -> Builder {
        self.type_path = Some(path.to_string());
        self
    }

    /// Where `<name>.rs` puts the frame's constants ([`Place`]). By default
    /// [`Place::Type`], the items `#[pt_regs]` gives a frame (`MyRegs::S_ARG0` and
    /// `unsafe impl Frame`), unless the struct is declared with `#[pt_regs]`, which
    /// gives it those already: then [`Place::Module`], free constants in the module
    /// that `include!`s the file. A frame type of another crate needs `Place::Module`.
    pub fn place(mut self, place: Place) -> Builder {
        self.place = Some(place);
        self
    }

    /// The path of the crate that defines `Frame` in `<name>.rs` (default `::probekit`).
    pub fn crate_path(mut self, path: &str) -> Builder {
        self.krate = path.to_string();
        self
    }

    /// Reads the frame, plans every shape and writes the four files; prints
    /// `cargo:rerun-if-changed` for the frame file.
    pub fn write(self) -> Result<Written, BuildError> {
        if let Some((var, message)) = self.env_error {
            return Err(BuildError::Env { var, message });
        }
        let (path, struct_name) = self.frame.ok_or(BuildError::Missing("the frame (`frame_file`)"))?;
        let arch = self.arch.ok_or(BuildError::Missing("the architecture (`arch` or `arch_from_env`)"))?;
        let out_dir = self.out_dir.ok_or(BuildError::Missing("the output directory (`out_dir` or `out_dir_from_env`)"))?;
        if self.shapes.is_empty() {
            return Err(BuildError::Missing("at least one shape (`shape`)"));
        }
        println!("cargo:rerun-if-changed={}", path.display());
        let frame = FrameLayout::from_file(&path, &struct_name, arch).map_err(BuildError::Frame)?;
        let declared = declared_with_pt_regs(&path, &struct_name);
        let place = match self.place {
            Some(Place::Type) if declared => return Err(BuildError::TypeItemsTwice { path, frame: struct_name }),
            Some(p) => p,
            None if declared => Place::Module,
            None => Place::Type,
        };
        let name = self.name.unwrap_or_else(|| snake_case(&struct_name));
        let plans = self.shapes.iter().map(|&s| Plan::new(&frame, self.policy, self.fp, s)).collect::<Result<Vec<_>, _>>().map_err(BuildError::Plan)?;
        let symbols: Vec<String> = plans.iter().map(|p| format!("{name}_{}", p.shape.name().replace('-', "_"))).collect();
        let refs: Vec<&Plan> = plans.iter().collect();
        let routines: Vec<(&Plan, &str)> = plans.iter().zip(&symbols).map(|(p, s)| (p, s.as_str())).collect();
        let syms = render::Symbols { handler: self.handler, ..Default::default() };
        let ty = self.type_path.unwrap_or(struct_name);
        let listing: String = routines.iter().map(|(p, s)| render::listing(p, s) + "\n").collect();
        let items = routines.iter().map(|(plan, symbol)| Routine { plan, symbol: symbol.to_string(), asm: RoutineAsm::External }).collect();
        let items = RustItems::new(&ty).place(place).krate(&self.krate).arch(&frame, items).render();
        let files = [
            (format!("{name}.S"), render::gnu_asm(&routines, &syms)),
            (format!("{name}.h"), render::c_header(&refs)),
            (format!("{name}.rs"), items),
            (format!("{name}.txt"), listing),
        ];
        let mut paths = Vec::new();
        for (file, text) in files {
            let p = out_dir.join(file);
            std::fs::write(&p, text).map_err(|error| BuildError::Write { path: p.clone(), error })?;
            paths.push(p);
        }
        let mut it = paths.into_iter();
        let mut next = || it.next().expect("four files");
        Ok(Written { asm: next(), header: next(), rust: next(), listing: next(), symbols })
    }
}

/// Whether struct `name` in the file carries `#[pt_regs]` (`#[probekit::pt_regs(...)]`).
/// The file was read and parsed by `FrameLayout::from_file` already; on any failure
/// here the answer is no.
fn declared_with_pt_regs(path: &Path, name: &str) -> bool {
    let Ok(file) = std::fs::read_to_string(path).map_err(drop).and_then(|t| syn::parse_file(&t).map_err(drop)) else { return false };
    file.items.iter().any(|i| match i {
        syn::Item::Struct(s) if s.ident == name => s.attrs.iter().any(|a| a.path().segments.last().is_some_and(|seg| seg.ident == "pt_regs")),
        _ => false,
    })
}

fn snake_case(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_four_files_and_names_errors() {
        let dir = std::env::temp_dir().join(format!("probe-codegen-builder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let frame = dir.join("frame.rs");
        std::fs::write(&frame, "#[repr(C)] pub struct MyRegs { pub rdi: u64, pub rip: u64, pub x0: u64 }").unwrap();
        let b = Builder::new().frame_file(&frame, "MyRegs").shape(Shape::SaveRestore).out_dir(&dir);
        // x0 is an aarch64 register only: on x86_64 it is an error naming file and field.
        let e = b.clone().arch(Arch::X86_64).write().unwrap_err().to_string();
        assert!(e.contains("frame.rs") && e.contains("`MyRegs.x0`"), "{e}");
        std::fs::write(&frame, "#[repr(C)] pub struct MyRegs { pub rdi: u64, pub rip: u64 }").unwrap();
        let w = b.arch(Arch::X86_64).shape(Shape::Kretprobe).write().unwrap();
        assert_eq!(w.symbols, ["my_regs_save_restore", "my_regs_kretprobe"]);
        let h = std::fs::read_to_string(&w.header).unwrap();
        assert!(h.contains("#define S_RIP 8") && h.contains("#define S_ALLOC_KRETPROBE"), "{h}");
        let s = std::fs::read_to_string(&w.asm).unwrap();
        assert!(s.contains("my_regs_kretprobe:") && s.contains("call probe_handler") && !s.contains('{'), "{s}");
        assert!(s.contains(".equ S_RIP, 8") && s.contains("mov qword ptr [rsp + S_RIP], rcx"), "{s}");
        let rs = std::fs::read_to_string(&w.rust).unwrap();
        assert!(
            rs.contains("impl MyRegs {") && rs.contains("    pub const S_RDI: usize = 0;") && rs.contains("unsafe impl ::probekit::Frame for MyRegs"),
            "{rs}"
        );
        assert!(rs.contains("pub const KRETPROBE: unsafe extern \"C\" fn()") && rs.contains("#[link_name = \"my_regs_kretprobe\"]"), "{rs}");
        // A struct declared with `#[pt_regs]` has its type items: the Builder's are free constants.
        std::fs::write(&frame, "#[probekit::pt_regs]\n#[repr(C)] pub struct MyRegs { pub rdi: u64, pub rip: u64 }").unwrap();
        let b = Builder::new().frame_file(&frame, "MyRegs").shape(Shape::SaveRestore).out_dir(&dir).arch(Arch::X86_64);
        let rs = std::fs::read_to_string(b.clone().write().unwrap().rust).unwrap();
        assert!(rs.contains("\npub const S_RDI: usize = 0;") && !rs.contains("impl"), "{rs}");
        let e = b.place(Place::Type).write().unwrap_err().to_string();
        assert!(e.contains("frame.rs") && e.contains("#[pt_regs]") && e.contains("Place::Module"), "{e}");
        assert!(matches!(Builder::new().write(), Err(BuildError::Missing(_))));
        std::fs::remove_dir_all(&dir).ok();
    }
}
