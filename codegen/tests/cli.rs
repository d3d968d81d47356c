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
