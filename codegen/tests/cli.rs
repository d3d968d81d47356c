//! The `probe-codegen` command, as a user runs it.

use std::process::Command;

/// Runs the CLI; under a cross runner (the aarch64 lane sets `CROSS_RUNNER` to the
/// qemu command line) the binary is started through it, as cargo starts the tests.
fn run(args: &[&str]) -> (bool, String, String) {
    let bin = env!("CARGO_BIN_EXE_probe-codegen");
    let mut cmd = match std::env::var("CROSS_RUNNER").ok().filter(|r| !r.is_empty()) {
        Some(runner) => {
            let mut words = runner.split_whitespace();
            let mut c = Command::new(words.next().expect("a runner command"));
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let out = cmd.args(args).output().expect("runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn header_aarch64() {
    let (ok, out, _) = run(&["header", "--arch", "aarch64"]);
    assert!(ok);
    assert!(out.contains("#define S_PSTATE 264"), "{out}");
    assert!(out.contains("#define S_FRAME_SIZE 272"), "{out}");
    assert!(out.contains("#define S_X30 240") && out.contains("#define S_LR 240") && out.contains("#define S_FP 232"), "{out}");
}

#[test]
fn header_x86_64() {
    let (ok, out, _) = run(&["header", "--arch", "x86_64"]);
    assert!(ok);
    assert!(out.contains("#define S_RIP 128"), "{out}");
    assert!(out.contains("#define S_FRAME_SIZE 168"), "{out}");
}

#[test]
fn every_subcommand_and_option() {
    for what in ["header", "asm", "rust", "listing"] {
        for arch in ["x86_64", "aarch64"] {
            for shape in ["save-restore", "kretprobe", "entry"] {
                for fp in ["none", "args", "return", "full"] {
                    let (ok, out, err) = run(&[what, "--arch", arch, "--shape", shape, "--fp", fp, "--policy", "caller-saved"]);
                    assert!(ok && !out.is_empty(), "{what} {arch} {shape} {fp}: {err}");
                }
            }
        }
    }
}

#[test]
fn bad_frame_is_a_typed_error_with_file_and_field() {
    let dir = std::env::temp_dir().join(format!("probe-codegen-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("frame.rs");
    std::fs::write(&file, "#[repr(C)]\npub struct Bad { pub rax: u64, pub rbx: u32, pub nosuch: u64 }\n").unwrap();
    let (ok, out, err) = run(&["header", "--arch", "x86_64", "--frame", file.to_str().unwrap(), "--struct", "Bad"]);
    assert!(!ok);
    assert!(out.is_empty());
    assert!(err.contains("frame.rs") && err.contains("`Bad.rbx`") && err.contains("`Bad.nosuch`"), "{err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    let (ok, _, err) = run(&["header", "--frame", "/nonexistent/frame.rs", "--struct", "X"]);
    assert!(!ok && err.contains("/nonexistent/frame.rs"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn asm_and_listing_read_in_names() {
    let (ok, out, err) = run(&["asm", "--arch", "aarch64", "--shape", "kretprobe"]);
    assert!(ok, "{err}");
    assert!(out.contains(".equ S_PSTATE, 264") && out.contains(".equ S_X0, 0") && out.contains(".equ S_ALLOC_KRETPROBE, 272"), "{out}");
    assert!(out.contains("stp x0, x1, [sp, #S_X0]") && out.contains("str x0, [sp, #S_PSTATE]") && !out.contains("[sp, #264]"), "{out}");
    let (ok, out, _) = run(&["listing", "--arch", "x86_64", "--shape", "entry"]);
    assert!(ok && out.contains("mov qword ptr [rsp + S_RAX], rax") && out.contains("S_RAX"), "{out}");
}

#[test]
fn rust_is_the_items_pt_regs_gives() {
    let (ok, out, err) = run(&["rust", "--arch", "aarch64", "--shape", "entry", "--name", "my_entry", "--handler", "crate::on_hit"]);
    assert!(ok, "{err}");
    for want in [
        "impl PtRegs {",
        "pub const S_REGS: usize = 0;",
        "pub const S_X0: usize = 0;",
        "pub const ENTRY: unsafe extern \"C\" fn() = {",
        "unsafe impl ::probekit::Frame for PtRegs {",
        "\"`PtRegs.pstate` must be at offset 264: the generated code stores and reads it there\"",
        "handler = sym crate::on_hit,",
        "S_PSTATE = const ::core::mem::offset_of!(PtRegs, pstate),",
    ] {
        assert!(out.contains(want), "{want} missing from\n{out}");
    }
    let (ok, out, _) = run(&["rust", "--arch", "x86_64", "--place", "module", "--type", "::probekit::PtRegs"]);
    assert!(ok && out.contains("\npub const S_RIP: usize = 128;") && !out.contains("unsafe impl"), "{out}");
}
