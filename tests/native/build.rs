//! Builds the C test helpers for the target: `c/jump.c` linked in (setjmp/longjmp,
//! which Rust cannot call), `c/callers.c` linked in (C callers of a `#[traceable]
//! extern "C"` function, an archive of its own: only the test that defines the
//! function pulls it in), and `c/gone.c` as a shared library the tests `dlopen` and
//! `dlclose`, its path given to the crate as `env!("GONE_SO")`.

fn main() {
    println!("cargo:rerun-if-changed=c");
    cc::Build::new().file("c/jump.c").warnings(true).compile("probekit_jump");
    cc::Build::new().file("c/callers.c").warnings(true).compile("probekit_callers");

    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let so = out.join("libprobekit_gone.so");
    // cc builds static archives only; its compiler (the target's: aarch64-linux-gnu-gcc
    // when cross-compiling) links the shared object.
    let compiler = cc::Build::new().get_compiler();
    let status = compiler.to_command().args(["-shared", "-fPIC", "-O1", "-o"]).arg(&so).arg("c/gone.c").status().expect("the C compiler runs");
    assert!(status.success(), "building {} failed", so.display());
    println!("cargo:rustc-env=GONE_SO={}", so.display());
}
