//! Generates the save/restore routine of `MyRegs` for the target architecture, and
//! builds it with the C reader that uses the generated header: the `.S` goes through
//! the C compiler's GNU assembler, as a C project's asm would (probe-codegen's torture
//! assembles the same kind of file with LLVM's, through `global_asm!`).
//!
//! `MyRegs` is declared with `#[pt_regs]`, which gives the type its items
//! (`MyRegs::S_ARG0`, `Frame`): the Builder's `my_regs.rs` holds the same names as free
//! constants (`Place::Module`, its default for such a struct).

use probe_codegen::{Builder, Policy, Shape};

fn main() {
    let out = Builder::new()
        .frame_file("src/frame.rs", "MyRegs")
        .shape(Shape::SaveRestore)
        .policy(Policy::All)
        .handler("custom_frame_handler")
        .type_path("crate::frame::MyRegs")
        .arch_from_env()
        .out_dir_from_env()
        .write()
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = out.header.parent().expect("OUT_DIR");
    println!("cargo:rerun-if-changed=src/peek.c");
    cc::Build::new().file("src/peek.c").file(&out.asm).include(dir).compile("custom_frame_c");
}
