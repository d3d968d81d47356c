//! Batch registration (the kernel's `register_kprobes`): all or nothing, with the code
//! writes batched; and batches registered and unregistered while threads call the
//! targets.

use probekit::{register_batch, unregister_batch, AnyHandle, AnyProbe, Probe, ProbeBuilder, PtRegs, ReturnProbe, ReturnProbeHandle};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

#[inline(never)]
fn plain_a(x: u64) -> u64 {
    black_box(x).wrapping_mul(3).wrapping_add(1)
}

#[inline(never)]
fn plain_b(x: u64) -> u64 {
    black_box(x) ^ 0x5a5a
}

#[probekit::traceable]
fn traced_a(x: u64) -> u64 {
    black_box(x).wrapping_add(11)
}

#[probekit::traceable]
fn traced_b(x: u64) -> u64 {
    black_box(x).rotate_left(7)
}

static HANDLED: AtomicU64 = AtomicU64::new(0);

fn count(_r: &PtRegs) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// The first 16 bytes at each address.
fn text(addrs: &[usize]) -> Vec<Vec<u8>> {
    // SAFETY: every address is a function of this executable, whose text is mapped
    // readable for at least 16 bytes from a function's start (the functions here are
    // followed by more text).
    addrs.iter().map(|a| unsafe { std::slice::from_raw_parts(*a as *const u8, 16) }.to_vec()).collect()
}

fn builders() -> Vec<ProbeBuilder> {
    vec![
        Probe::builder().function(plain_a as fn(u64) -> u64).pre(count),
        Probe::builder().function(plain_b as fn(u64) -> u64).pre(count),
        Probe::builder().function(traced_a as fn(u64) -> u64).pre(count),
        Probe::builder().function(traced_b as fn(u64) -> u64).pre(count),
        // A second probe on an address of the batch: they share its breakpoint.
        Probe::builder().function(plain_a as fn(u64) -> u64).pre(count),
    ]
}

fn call_all(x: u64) {
    assert_eq!(black_box(plain_a as fn(u64) -> u64)(x), x.wrapping_mul(3).wrapping_add(1));
    assert_eq!(black_box(plain_b as fn(u64) -> u64)(x), x ^ 0x5a5a);
    assert_eq!(traced_a(x), x.wrapping_add(11));
    assert_eq!(traced_b(x), x.rotate_left(7));
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_bad_member_leaves_nothing_armed_and_no_text_changed() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let sites: Vec<usize> = probekit::sites().iter().filter(|s| s.name.ends_with("::traced_a") || s.name.ends_with("::traced_b")).map(|s| s.site).collect();
    assert_eq!(sites.len(), 2);
    let addrs = [vec![plain_a as fn(u64) -> u64 as usize, plain_b as fn(u64) -> u64 as usize], sites].concat();
    let before = text(&addrs);
    let listed = probekit::list().0.len();
    let heap = Box::new(0u64);
    let mut batch = builders();
    // SAFETY: heap memory, which registration refuses before writing anything.
    batch.insert(3, unsafe { Probe::builder().address(&*heap as *const u64 as usize) }.pre(count));
    let err = register_batch(batch).unwrap_err();
    assert_eq!(err.index, 3, "{err}");
    assert!(matches!(err.error, probekit::Error::NotExecutable { .. }), "{err}");
    assert_eq!(text(&addrs), before, "no byte of text changed");
    assert_eq!(probekit::list().0.len(), listed, "nothing registered");
    let handled = HANDLED.load(Ordering::Relaxed);
    call_all(5);
    assert_eq!(HANDLED.load(Ordering::Relaxed), handled, "no handler runs");
}

#[test]
fn a_batch_registers_and_unregisters_every_member() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let handles = register_batch(builders()).unwrap();
    assert!(handles.iter().all(|h| h.is_enabled()));
    call_all(1);
    call_all(2);
    assert!(handles.iter().all(|h| h.nhit() == 2), "{:?}", handles.iter().map(|h| h.nhit()).collect::<Vec<_>>());
    assert!(probekit::list().0.iter().filter(|p| p.site).count() >= 2);
    unregister_batch(handles).unwrap();
    let handled = HANDLED.load(Ordering::Relaxed);
    call_all(3);
    assert_eq!(HANDLED.load(Ordering::Relaxed), handled, "no handler runs after the batch is gone");
}

#[test]
fn batches_come_and_go_while_threads_call_the_targets() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let rounds = if cfg!(target_arch = "aarch64") { 40 } else { 200 };
    let callers = native_tests::callers(2, call_all);
    let (mut hits, handled) = (0, HANDLED.load(Ordering::Relaxed));
    for round in 0..rounds {
        let handles = register_batch(builders()).unwrap_or_else(|e| panic!("round {round}: {e}"));
        std::thread::yield_now();
        if round == 0 {
            // Calls that began with the batch armed (the machine may be busy).
            callers.wait(3);
        }
        hits += handles.iter().map(|h| h.nhit()).sum::<u64>();
        unregister_batch(handles).unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    let calls = callers.stop();
    // Every call returned the right value (the callers assert it). Every hit counted
    // before a batch went ran its handler (hits after the count, before the batch was
    // gone, ran too: the handlers ran at least as often as counted).
    let ran = HANDLED.load(Ordering::Relaxed) - handled;
    assert!(hits > 0 && ran >= hits, "{ran} handler runs, {hits} hits counted");
    assert!(calls > 0);
}

static RETURNED: AtomicU64 = AtomicU64::new(0);

fn count_return(r: &PtRegs, calls: &mut u64) {
    *calls += 1;
    RETURNED.fetch_add(r.return_value(), Ordering::Relaxed);
}

/// Return probes and probes of the other kinds, in one batch.
fn mixed() -> Vec<AnyProbe> {
    vec![
        ReturnProbe::builder().data::<u64>().function(plain_a as fn(u64) -> u64).handler(count_return).into(),
        Probe::builder().function(plain_b as fn(u64) -> u64).pre(count).into(),
        ReturnProbe::builder().data::<u64>().function(traced_b as fn(u64) -> u64).handler(count_return).into(),
        Probe::builder().function(traced_a as fn(u64) -> u64).pre(count).into(),
    ]
}

#[test]
fn return_probes_register_in_batches_all_or_nothing() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let sites: Vec<usize> = probekit::sites().iter().filter(|s| s.name.ends_with("::traced_a") || s.name.ends_with("::traced_b")).map(|s| s.site).collect();
    let addrs = [vec![plain_a as fn(u64) -> u64 as usize, plain_b as fn(u64) -> u64 as usize], sites].concat();
    let before = text(&addrs);
    let listed = probekit::list().0.len();

    // A return probe that is not on a function entry: refused, and nothing of the
    // members before it stays.
    let mut batch = mixed();
    // SAFETY: an instruction of `plain_b` (refused: not its entry).
    batch.push(unsafe { ReturnProbe::builder().address(plain_b as fn(u64) -> u64 as usize + 1) }.handler(|_, _| {}).into());
    let err = register_batch(batch).unwrap_err();
    assert_eq!(err.index, 4, "{err}");
    assert!(matches!(err.error, probekit::Error::NotFunctionEntry { .. } | probekit::Error::NotInstructionBoundary { .. }), "{err}");
    assert_eq!(text(&addrs), before, "no byte of text changed");
    assert_eq!(probekit::list().0.len(), listed, "nothing registered");

    // The same batch without it: every member live, the return handlers see the
    // return values.
    let (handled, returned) = (HANDLED.load(Ordering::Relaxed), RETURNED.load(Ordering::Relaxed));
    let handles = register_batch(mixed()).unwrap();
    assert!(matches!(handles[0], AnyHandle::Return(_)) && matches!(handles[1], AnyHandle::Probe(_)));
    assert_eq!(probekit::list().0.iter().filter(|p| p.is_return).count(), 2, "{}", probekit::list());
    call_all(7);
    assert_eq!(HANDLED.load(Ordering::Relaxed) - handled, 2, "two entry probes ran");
    assert_eq!(RETURNED.load(Ordering::Relaxed) - returned, (7 * 3 + 1) + 7u64.rotate_left(7), "return values (computed, not called: the probes are live)");
    assert!(handles.iter().all(|h| h.nhit() == 1), "{:?}", handles.iter().map(|h| h.nhit()).collect::<Vec<_>>());
    unregister_batch(handles).unwrap();
    assert_eq!(text(&addrs), before, "the text is restored");
    let returned = RETURNED.load(Ordering::Relaxed);
    call_all(8);
    assert_eq!(RETURNED.load(Ordering::Relaxed), returned, "no return handler runs after the batch is gone");

    // A batch of return probes alone gives return-probe handles.
    let handles: Vec<ReturnProbeHandle> = register_batch(vec![
        ReturnProbe::builder().data::<u64>().function(plain_a as fn(u64) -> u64).handler(count_return),
        ReturnProbe::builder().data::<u64>().function(plain_b as fn(u64) -> u64).handler(count_return),
    ])
    .unwrap();
    call_all(9);
    assert_eq!(RETURNED.load(Ordering::Relaxed) - returned, (9 * 3 + 1) + (9 ^ 0x5a5a));
    unregister_batch(handles).unwrap();
    assert_eq!(text(&addrs), before, "the text is restored");
}
