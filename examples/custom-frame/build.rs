//! Generates the save/restore routine of `MyRegs` for the target architecture and
//! compiles the C reader that uses the generated header.

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
    cc::Build::new().file("src/peek.c").include(dir).compile("peek");
}
