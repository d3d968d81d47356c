//! Runs the example as a user would (`cargo run -p custom-frame`).

#[test]
fn prints_the_listing_and_the_changed_register() {
    let bin = env!("CARGO_BIN_EXE_custom-frame");
    let mut cmd = match std::env::var("CROSS_RUNNER").ok().filter(|r| !r.is_empty()) {
        Some(runner) => {
            let mut w = runner.split_whitespace();
            let mut c = std::process::Command::new(w.next().expect("runner"));
            c.args(w).arg(bin);
            c
        }
        None => std::process::Command::new(bin),
    };
    let out = cmd.output().expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("my_regs_save_restore:"), "{stdout}");
    assert!(stdout.contains("handler saw arg0 = 40, arg1 = 2"), "{stdout}");
    assert!(stdout.contains("result register after the routine: 42"), "{stdout}");
}
