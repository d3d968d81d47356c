//! A check shared by the tracer's tests of both paths (return probes in `trace.rs`,
//! the light path in `trace_sites.rs`).

use probekit::trace::{Call, Snapshot};

fn short<'a>(snap: &'a Snapshot, c: &Call) -> &'a str {
    snap.name(c).rsplit("::").next().unwrap()
}

/// A panic caught in untraced code, with no traced call on the way: the calls it
/// abandons end as it unwinds them (not at the thread's next traced event, which may
/// come much later or never), so they are in a snapshot taken right after, with their
/// real durations, and a later call from a deeper frame does not nest under them.
/// `trace.rs` runs it through return probes, `trace_sites.rs` on the light path.
///
/// `caught(7)` calls `middle(7)` in a `catch_unwind`, in untraced code, and `middle`
/// calls `leaf`, which panics; `later(x)` calls `later` from an untraced frame below
/// where `middle` stood. The tracer records `middle`, `leaf` and `later` of one module.
pub fn check_calls_abandoned_by_a_caught_panic(snap_now: impl Fn() -> Snapshot, caught: impl Fn(u64) -> Option<u64>, later: impl Fn(u64) -> u64) {
    const WAIT: std::time::Duration = std::time::Duration::from_millis(200);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    assert_eq!(caught(7), None);
    std::panic::set_hook(hook);
    let snap = snap_now();
    let t = snap.threads.iter().find(|t| !t.calls.is_empty()).expect("the abandoned calls, before any later event");
    let seen: Vec<(&str, u32, bool)> = t.calls.iter().map(|c| (short(&snap, c), c.depth, c.unwound)).collect();
    assert_eq!(seen, [("middle", 0, true), ("leaf", 1, true)]);
    std::thread::sleep(WAIT);
    assert_eq!(later(5), 5);
    let snap = snap_now();
    let t = snap.threads.iter().find(|t| !t.calls.is_empty()).unwrap();
    let seen: Vec<(&str, u32, bool)> = t.calls.iter().map(|c| (short(&snap, c), c.depth, c.unwound)).collect();
    assert_eq!(seen, [("middle", 0, true), ("leaf", 1, true), ("later", 0, false)], "`later` nests under no abandoned call");
    let (middle, leaf, later) = (&t.calls[0], &t.calls[1], &t.calls[2]);
    assert!(leaf.exit_ns <= middle.exit_ns, "the leaf is unwound first");
    assert!(later.enter_ns - middle.exit_ns >= WAIT.as_nanos() as u64, "ended at the unwind, not at `later`'s entry: {middle:?} {later:?}");
    assert!(middle.duration_ns() < WAIT.as_nanos() as u64 / 2, "a duration of the call itself: {middle:?}");
}
