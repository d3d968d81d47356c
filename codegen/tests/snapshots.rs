//! Snapshots of every output for the built-in frames and for a frame with register
//! and constant arrays: the `.S`, the C header, the Rust items (as `#[pt_regs]`, the
//! Builder, the CLI and probe-rt render them) and the listing.
//!
//! A snapshot proves only that the output did not change; that it is right is proved
//! by assembling and running it (tests/codegen-torture, examples/custom-frame). After a
//! deliberate change, bless and read the diff:
//! `PROBEKIT_BLESS=1 cargo test -p probe-codegen --test snapshots`, then
//! `git diff codegen/tests/snapshots`.

use probe_codegen::render::{self, Place, Routine, RoutineAsm, RustItems, Symbols};
use probe_codegen::{Arch, Fp, FrameLayout, Plan, Policy, Shape};
use std::path::Path;

fn check(name: &str, text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots").join(name);
    if std::env::var_os("PROBEKIT_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().expect("a directory")).expect("snapshot directory");
        std::fs::write(&path, text).expect("snapshot written");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; bless with PROBEKIT_BLESS=1", path.display()));
    if want != text {
        let line = want.lines().zip(text.lines()).position(|(a, b)| a != b).unwrap_or(want.lines().count().min(text.lines().count()));
        panic!(
            "{} differs from the output at line {}:\n  snapshot: {:?}\n  output:   {:?}\nbless with PROBEKIT_BLESS=1 after reading the change",
            path.display(),
            line + 1,
            want.lines().nth(line),
            text.lines().nth(line)
        );
    }
}

/// Register arrays, an array of constants, padding, per-arch bindings.
const MIXED: &str = r#"#[repr(C)] pub struct Mixed {
    #[reg(x86_64 = "rip", aarch64 = "pc")] pub ip: u64,
    pub _tag: u16,
    #[reg(x86_64 = "r8..=r11", aarch64 = "x19..=x22")] pub range: [u64; 4],
    #[reg(x86_64 = "rdi", aarch64 = "x0")] pub arg0: u64,
    pub _spare: [u32; 3],
    #[reg(x86_64 = "eflags", aarch64 = "pstate")] pub flags: u64,
    #[reg(x86_64 = "rsp", aarch64 = "sp")] pub stack: u64,
}"#;

#[test]
fn builtin_frames() {
    for arch in Arch::ALL {
        let frame = FrameLayout::builtin(arch);
        let plans: Vec<Plan> = Shape::ALL.iter().map(|&s| Plan::new(&frame, Policy::All, Fp::Args, s).unwrap()).collect();
        let refs: Vec<&Plan> = plans.iter().collect();
        let a = arch.name();
        check(&format!("{a}/pt_regs.h"), &render::c_header(&refs));
        let routines: Vec<(&Plan, &str)> = vec![(&plans[1], "pt_regs_kretprobe"), (&plans[2], "pt_regs_entry"), (&plans[3], "pt_regs_site")];
        check(&format!("{a}/pt_regs.S"), &render::gnu_asm(&routines, &Symbols::default()));
        check(&format!("{a}/pt_regs_kretprobe.txt"), &render::listing(&plans[1], "pt_regs_kretprobe"));
        check(&format!("{a}/pt_regs_site.txt"), &render::listing(&plans[3], "pt_regs_site"));
        // As probe-rt's build script renders the built-in frame's items, with a routine.
        let handler = Symbols { handler: "crate::retprobe::dispatch".into(), ..Default::default() };
        let r = Routine { plan: &plans[1], symbol: "pt_regs_kretprobe".into(), asm: RoutineAsm::Inline(handler) };
        check(&format!("{a}/pt_regs.rs"), &RustItems::new("crate::PtRegs").krate("crate").arch(&frame, vec![r]).render());
    }
}

#[test]
fn mixed_frame() {
    let layouts: Vec<FrameLayout> = Arch::ALL.iter().map(|&a| FrameLayout::from_source(MIXED, "Mixed", a).unwrap()).collect();
    let plans: Vec<Plan> = layouts.iter().map(|f| Plan::new(f, Policy::CallerSaved, Fp::None, Shape::SaveRestore).unwrap()).collect();
    // As `#[pt_regs(shapes(save_restore), policy = caller_saved, handler = on_frame)]` renders it.
    let mut items = RustItems::new("Mixed");
    for (f, p) in layouts.iter().zip(&plans) {
        let symbols = Symbols { handler: "on_frame".into(), ..Default::default() };
        let symbol = format!("__probekit_mixed_save_restore_{}", f.arch);
        items = items.arch(f, vec![Routine { plan: p, symbol, asm: RoutineAsm::Inline(symbols) }]);
    }
    check("mixed_pt_regs.rs", &items.render());
    for (f, p) in layouts.iter().zip(&plans) {
        let a = f.arch.name();
        // As the Builder writes them, for a struct declared with `#[pt_regs]`.
        let r = Routine { plan: p, symbol: "mixed_save_restore".into(), asm: RoutineAsm::External };
        check(&format!("{a}/mixed_builder.rs"), &RustItems::new("Mixed").place(Place::Module).arch(f, vec![r]).render());
        check(&format!("{a}/mixed.S"), &render::gnu_asm(&[(p, "mixed_save_restore")], &Symbols::default()));
        check(&format!("{a}/mixed.txt"), &render::listing(p, "mixed_save_restore"));
    }
}
