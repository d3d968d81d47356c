//! Builds the twin shared libraries of the stale-probe scenario (issue 17, item 1):
//! `c/twin.c` twice, with a different return value, as `libhostile_twin_a.so` and
//! `libhostile_twin_b.so`, their paths given to the crate as `env!("TWIN_A_SO")` and
//! `env!("TWIN_B_SO")`.

fn main() {
    println!("cargo:rerun-if-changed=c");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // cc builds static archives only; its compiler (the target's: aarch64-linux-gnu-gcc
    // when cross-compiling) links the shared objects.
    let compiler = cc::Build::new().get_compiler();
    for (name, value, var) in [("a", 100042, "TWIN_A_SO"), ("b", 200077, "TWIN_B_SO")] {
        let so = out.join(format!("libhostile_twin_{name}.so"));
        let status = compiler
            .to_command()
            .args(["-shared", "-fPIC", "-O1"])
            .arg(format!("-DTWIN_VALUE={value}"))
            .arg("-o")
            .arg(&so)
            .arg("c/twin.c")
            .status()
            .expect("the C compiler runs");
        assert!(status.success(), "building {} failed", so.display());
        println!("cargo:rustc-env={var}={}", so.display());
    }
}
