//! `probe-codegen`: print the generated trampolines, offsets and listings of a frame.
//!
//! ```text
//! probe-codegen listing --arch aarch64 --shape kretprobe
//! probe-codegen header  --arch x86_64 --frame src/frame.rs --struct MyRegs
//! ```

use clap::{Parser, Subcommand, ValueEnum};
use probe_codegen::render::{Place, Routine, RoutineAsm, RustItems};
use probe_codegen::{render, Arch, Fp, FrameLayout, Plan, Policy, Shape};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "probe-codegen", version, about = "Generate probe trampolines from a #[repr(C)] frame struct")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// C header of offsets: S_<FIELD>, S_<REG>, S_FRAME_SIZE, S_ALLOC_<SHAPE> (the kernel's asm-offsets).
    Header(Common),
    /// GNU assembler text (.S) of the routine: `.equ` of the offsets, instructions that read them by name.
    Asm(Common),
    /// Rust: the frame's items (offset consts, the routine, `Frame` impl, assertions), as `#[pt_regs]` gives them.
    Rust(Common),
    /// Annotated listing: each instruction with the field, name and offset it touches.
    Listing(Common),
}

#[derive(clap::Args)]
struct Common {
    /// Target architecture.
    #[arg(long, value_enum, default_value_t = ArchArg::host())]
    arch: ArchArg,
    /// Rust source file holding the frame struct (default: the built-in PtRegs).
    #[arg(long, requires = "struct_name")]
    frame: Option<PathBuf>,
    /// Name of the frame struct in --frame.
    #[arg(long = "struct", requires = "frame")]
    struct_name: Option<String>,
    /// Which general registers are restored from the frame.
    #[arg(long, value_enum, default_value_t = PolicyArg::All)]
    policy: PolicyArg,
    /// Which FP/SIMD state is preserved.
    #[arg(long, value_enum, default_value_t = FpArg::None)]
    fp: FpArg,
    /// Routine shape.
    #[arg(long, value_enum, default_value_t = ShapeArg::SaveRestore)]
    shape: ShapeArg,
    /// Symbol name of the routine.
    #[arg(long, default_value = "probe_trampoline")]
    name: String,
    /// Symbol (asm) or Rust path (rust) of the handler the routine calls.
    #[arg(long, default_value = "probe_handler")]
    handler: String,
    /// Rust path of the frame type in the items (rust; default: the struct name).
    #[arg(long = "type")]
    ty: Option<String>,
    /// Where the constants go (rust): associated with the type, with its `Frame` impl, or free in a module.
    #[arg(long, value_enum, default_value_t = PlaceArg::Type)]
    place: PlaceArg,
    /// Path of the crate that defines `Frame` (rust).
    #[arg(long = "crate", default_value = "::probekit")]
    krate: String,
}

macro_rules! value_enum {
    ($arg:ident => $t:ty { $($v:ident),* }) => {
        #[derive(Clone, Copy, ValueEnum)]
        enum $arg { $($v),* }
        impl From<$arg> for $t { fn from(a: $arg) -> $t { match a { $($arg::$v => <$t>::$v),* } } }
    };
}
value_enum!(PolicyArg => Policy { All, CallerSaved });
value_enum!(FpArg => Fp { None, Args, Return, ArgsWide, ReturnWide, Full, FullCompact, FullInUse, Sse });
value_enum!(ShapeArg => Shape { SaveRestore, Kretprobe, Entry, Site });
value_enum!(PlaceArg => Place { Type, Module });

#[derive(Clone, Copy, ValueEnum)]
enum ArchArg {
    #[value(name = "x86_64")]
    X86_64,
    Aarch64,
}

impl ArchArg {
    fn host() -> ArchArg {
        match Arch::host() {
            Some(Arch::Aarch64) => ArchArg::Aarch64,
            _ => ArchArg::X86_64,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli.what) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            for line in message.lines() {
                eprintln!("probe-codegen: error: {line}");
            }
            ExitCode::from(2)
        }
    }
}

fn run(what: &What) -> Result<String, String> {
    let (What::Header(c) | What::Asm(c) | What::Rust(c) | What::Listing(c)) = what;
    let arch = match c.arch {
        ArchArg::X86_64 => Arch::X86_64,
        ArchArg::Aarch64 => Arch::Aarch64,
    };
    let frame = match (&c.frame, &c.struct_name) {
        (Some(path), Some(name)) => FrameLayout::from_file(path, name, arch).map_err(|e| e.to_string())?,
        _ => FrameLayout::builtin(arch),
    };
    let plan = Plan::new(&frame, c.policy.into(), c.fp.into(), c.shape.into()).map_err(|e| e.to_string())?;
    let symbols = render::Symbols { handler: c.handler.clone(), ..Default::default() };
    Ok(match what {
        What::Header(..) => render::c_header(&[&plan]),
        What::Asm(..) => render::gnu_asm(&[(&plan, &c.name)], &symbols),
        What::Rust(..) => {
            let ty = c.ty.clone().unwrap_or_else(|| frame.name.clone());
            let routine = Routine { plan: &plan, symbol: c.name.clone(), asm: RoutineAsm::Inline(symbols) };
            RustItems::new(&ty).place(c.place.into()).krate(&c.krate).arch(&frame, vec![routine]).render()
        }
        What::Listing(..) => render::listing(&plan, &c.name),
    })
}
