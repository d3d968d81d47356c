//! Prints, for a frame, the annotated listing of every routine shape: each instruction
//! with the field and offset it touches, the way a reviewer of seed 000 would want to
//! read a trampoline.
//!
//! ```text
//! cargo run --example asm_inspect                                  # built-in PtRegs, host arch
//! cargo run --example asm_inspect -- --arch aarch64 --policy caller-saved --fp args
//! cargo run --example asm_inspect -- path/to/frame.rs MyRegs --arch x86_64
//! ```

use probe_codegen::{render, Arch, Fp, FrameLayout, Plan, Policy, Shape};

fn main() {
    if let Err(e) = run() {
        eprintln!("asm_inspect: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut positional, mut arch, mut policy, mut fp) = (Vec::new(), Arch::host().unwrap_or(Arch::X86_64), Policy::All, Fp::None);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--arch" => arch = value()?.parse()?,
            "--policy" => policy = value()?.parse()?,
            "--fp" => fp = value()?.parse()?,
            _ if a.starts_with("--") => return Err(format!("unknown option {a}: --arch, --policy, --fp")),
            _ => positional.push(a),
        }
    }
    let frame = match &positional[..] {
        [] => FrameLayout::builtin(arch),
        [file, name] => FrameLayout::from_file(file, name, arch).map_err(|e| e.to_string())?,
        _ => return Err("usage: asm_inspect [FILE.rs STRUCT] [--arch A] [--policy P] [--fp F]".into()),
    };
    for &shape in Shape::ALL {
        let plan = Plan::new(&frame, policy, fp, shape).map_err(|e| e.to_string())?;
        let name = format!("{}_{}", frame.name.to_lowercase(), shape.name().replace('-', "_"));
        println!("{}", render::listing(&plan, &name));
    }
    Ok(())
}
