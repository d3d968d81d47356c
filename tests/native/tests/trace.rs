//! The function-graph tracer over frames a `longjmp` goes past: they are recorded as
//! unwound, ending when their thread's next traced entry or return shows them gone,
//! and the trace nests before and after.

use probekit::trace::{EventStyle, Tracer};
use std::ffi::c_void;
use std::hint::black_box;

mod jumpy {
    use super::*;

    /// Jumps out of `mid` and `deep` when `n` is odd.
    #[inline(never)]
    pub extern "C" fn deep(n: u64) -> u64 {
        if black_box(n) % 2 == 1 {
            // SAFETY: the frames between here and the probekit_jump_run in `outer` are
            // plain (no destructors); its jmp_buf is live.
            unsafe { native_tests::probekit_jump_out() }
        }
        n
    }

    #[inline(never)]
    pub extern "C" fn mid(n: u64) -> u64 {
        black_box(deep(n) + 1)
    }

    #[inline(never)]
    pub extern "C" fn after(n: u64) -> u64 {
        black_box(n)
    }

    extern "C" fn run(arg: *mut c_void) {
        black_box(mid(arg as u64));
    }

    /// Runs `mid(n)` under a setjmp, then `after`.
    #[inline(never)]
    pub extern "C" fn outer(n: u64) -> u64 {
        // SAFETY: `run`'s frames are plain; the jump lands in this probekit_jump_run.
        let jumped = unsafe { native_tests::probekit_jump_run(run, n as *mut c_void) };
        black_box(after(jumped as u64))
    }
}

#[test]
fn frames_a_longjmp_went_past_are_unwound() {
    let tracer = Tracer::builder().pattern("trace::jumpy::*").exclude("trace::jumpy::run").retval().register().unwrap();
    assert_eq!(tracer.functions().len(), 4, "{:?}", tracer.skipped());
    tracer.start();
    let outer = black_box(jumpy::outer as extern "C" fn(u64) -> u64);
    for n in 0..6 {
        assert_eq!(outer(n), n % 2);
    }
    tracer.stop();
    let snap = tracer.snapshot();
    let t = snap.threads.iter().find(|t| !t.calls.is_empty()).unwrap();
    let short = |i: usize| snap.name(&t.calls[i]).rsplit("::").next().unwrap().to_string();
    assert_eq!(t.calls.len(), 6 * 4);
    for (run, calls) in t.calls.chunks(4).enumerate() {
        let base = run * 4;
        let names: Vec<String> = (base..base + 4).map(short).collect();
        assert_eq!(names, ["outer", "mid", "deep", "after"]);
        let depths: Vec<u32> = calls.iter().map(|c| c.depth).collect();
        assert_eq!(depths, [0, 1, 2, 1]);
        let jumped = run % 2 == 1;
        assert_eq!((calls[1].unwound, calls[2].unwound), (jumped, jumped), "run {run}");
        assert!(!calls[0].unwound && !calls[3].unwound);
        if jumped {
            // Found gone at `after`'s entry.
            assert_eq!(calls[1].exit_ns, calls[3].enter_ns);
            assert_eq!(calls[2].exit_ns, calls[3].enter_ns);
            assert_eq!(calls[1].ret, None);
        } else {
            assert_eq!(calls[2].ret, Some(run as u64));
        }
        assert!(calls[1..].iter().all(|c| calls[0].enter_ns <= c.enter_ns && c.exit_ns <= calls[0].exit_ns), "inside outer");
    }
    let mut json = Vec::new();
    snap.write_chrome_json(&mut json, EventStyle::BeginEnd).unwrap();
    assert!(json.starts_with(b"{\"traceEvents\":["));
}
