//! The harness of probekit's hostile-input tests (issue 17): every scenario runs in a
//! child process, so that a crash, a hang or a wrong exit status is observed by the
//! parent test instead of taking the test runner down with it.
//!
//! A scenario is a pair of tests in one test binary:
//! - the *child*, an `#[ignore]`d `#[test]` named `child_…`, which does the hostile thing
//!   and prints what it saw as `key=value` lines on stdout ([`report`]); it does nothing
//!   unless [`is_child`] (so `cargo test -- --ignored` does not run them all in one
//!   process);
//! - the *parent*, a plain `#[test]`, which starts the test binary again with
//!   `--exact child_… --ignored` ([`run_child`]) and asserts what can be trusted: the exit
//!   status or the terminating signal, and the values the child printed.
//!
//! Under a cross runner (the aarch64 lane sets `CROSS_RUNNER` to the qemu command line;
//! there is no binfmt registration) the child is started through it, as cargo starts the
//! tests.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that tells a child test it was started by its parent.
const CHILD_ENV: &str = "PROBEKIT_HOSTILE_CHILD";

/// How long a child may run before it counts as hung and is killed. Natively every
/// child takes well under 5 s; qemu-user is slower.
fn timeout() -> Duration {
    match cross_runner() {
        Some(_) => Duration::from_secs(180),
        None => Duration::from_secs(60),
    }
}

/// Whether the tests run under a cross runner (qemu-user): then the child's RSS is
/// qemu's, which also grows with qemu's translation cache.
pub fn emulated() -> bool {
    cross_runner().is_some()
}

/// The cross runner (the aarch64 lane's qemu command line), if any.
pub fn cross_runner() -> Option<String> {
    std::env::var("CROSS_RUNNER").ok().filter(|r| !r.trim().is_empty())
}

/// Whether this process is a child started by [`run_child`]: child tests return at once
/// otherwise.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Prints one `key=value` line of a child's report (flushed at once: a crash right after
/// it must not lose it).
pub fn report(key: &str, value: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{key}={value}");
    let _ = out.flush();
}

/// What a child process did.
#[derive(Debug)]
pub struct Outcome {
    /// The child test's name.
    pub name: String,
    /// Its exit status; `None` if it hung and was killed after the timeout.
    pub status: Option<ExitStatus>,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl Outcome {
    /// The value of the last `key=value` line the child printed.
    pub fn value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.stdout.lines().rev().find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    /// [`Outcome::value`], which the child must have printed.
    pub fn expect_value(&self, key: &str) -> &str {
        self.value(key).unwrap_or_else(|| panic!("the child printed no `{key}=`\n{}", self.describe()))
    }

    /// [`Outcome::value`] as a number (decimal or `0x` hex).
    pub fn number(&self, key: &str) -> u64 {
        let v = self.expect_value(key);
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        parsed.unwrap_or_else(|_| panic!("`{key}={v}` is not a number\n{}", self.describe()))
    }

    /// The signal that killed the child, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.status.and_then(|s| s.signal())
    }

    /// Whether the child ran to the end and exited 0.
    pub fn exited_ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Whether the child printed `SKIP=…` (the scenario cannot be set up here).
    pub fn skipped(&self) -> Option<&str> {
        self.value("SKIP")
    }

    /// How the child ended, and all it printed: for assertion messages.
    pub fn describe(&self) -> String {
        let how = match self.status {
            None => "HUNG (killed after the timeout)".to_string(),
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exited with {c}"),
                (_, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
                _ => format!("{s}"),
            },
        };
        format!("child `{}` {how}\n--- stdout\n{}--- stderr\n{}", self.name, self.stdout, self.stderr)
    }

    /// Asserts that the child exited 0 (not crashed, not hung, no failed assertion).
    pub fn assert_ok(&self) {
        assert!(self.exited_ok(), "{}", self.describe());
    }
}

/// A signal's name, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL",
        libc::SIGFPE => "SIGFPE",
        _ => "?",
    }
}

/// Runs child test `name` of this test binary in a process of its own, with extra
/// environment `env`, and waits for it (at most the timeout: then it is killed).
pub fn run_child_with(name: &str, env: &[(&str, &str)]) -> Outcome {
    spawn_child(name, env, timeout())
}

/// [`run_child_with`] with a timeout of the caller's (the scale tests' scenarios run
/// longer): the harness other test crates of the workspace share.
pub fn spawn_child(name: &str, env: &[(&str, &str)], timeout: Duration) -> Outcome {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = match cross_runner() {
        Some(runner) => {
            let mut words = runner.split_whitespace();
            let mut c = Command::new(words.next().expect("a runner command"));
            c.args(words).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(["--exact", name, "--ignored", "--nocapture", "--test-threads=1", "-q"])
        .env(CHILD_ENV, "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the child test");
    // Drained on threads of their own, so that a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("wait for the child") {
            Some(s) => break Some(s),
            None if Instant::now() >= deadline => {
                // The child is ours, killed by its own id.
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    Outcome { name: name.to_string(), status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() }
}

/// [`run_child_with`] without extra environment.
pub fn run_child(name: &str) -> Outcome {
    run_child_with(name, &[])
}

/// The process's resident set, in bytes (`/proc/self/statm`).
pub fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("statm's resident field");
    pages * page_size()
}

/// How many mappings the process has (lines of `/proc/self/maps`).
pub fn maps_lines() -> usize {
    std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps").lines().count()
}

/// The page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096)
}

/// The current stack pointer.
#[inline(always)]
pub fn stack_pointer() -> usize {
    let sp: usize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads rsp into a register; touches no memory.
    unsafe {
        std::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: reads sp into a register; touches no memory.
    unsafe {
        std::arch::asm!("mov {}, sp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    sp
}

/// The lowest usable address of this thread's stack (above its guard page), from
/// `pthread_getattr_np`.
pub fn stack_low() -> usize {
    // SAFETY: pthread_getattr_np fills the attribute object it is given, which is then
    // read with pthread_attr_getstack and destroyed once.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0, "pthread_getattr_np");
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        assert_eq!(libc::pthread_attr_getstack(&attr, &mut addr, &mut size), 0, "pthread_attr_getstack");
        libc::pthread_attr_destroy(&mut attr);
        addr as usize
    }
}

/// Installs `handler` for SIGTRAP (`SA_SIGINFO`); returns its address as probekit would
/// report it.
pub fn install_sigtrap(handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)) -> usize {
    let addr = handler as *const () as usize;
    // SAFETY: installs an SA_SIGINFO handler of the matching signature, from a zeroed
    // struct filled field by field.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = addr;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0, "sigaction");
    }
    addr
}

/// The current SIGTRAP disposition.
pub fn sigtrap_disposition() -> libc::sigaction {
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut old), 0, "sigaction");
        old
    }
}
