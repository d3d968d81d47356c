//! Many probes live at once (issue 12, "No fixed cap"): breakpoint probes spread over
//! the generated plain functions, site probes over the generated `#[traceable]`
//! functions, a few return probes, each its own live handle. Every function is called;
//! every result must be right and every probe must have fired on its own function once
//! per call; after unregistering, the text must be restored byte for byte.
//!
//! `hundred_thousand_live_probes` is the goal: today it fails with
//! `Error::TooManyProbes` at the 1,025th record (`MAX_PROBES`), and passes once the
//! runtime has no fixed cap. `thousand_live_probes` is the same scenario within today's
//! cap, which proves the harness itself.
//!
//! Registration and unregistration times are printed (`MEASURE …`), not asserted.

use probekit::{Probe, ProbeHandle, ReturnProbe, ReturnProbeHandle};
use scale_tests::*;
use std::collections::HashSet;
use std::time::Instant;

/// How many times each function is called while the probes are live.
const CALLS: u64 = 2;

#[test]
fn thousand_live_probes() {
    run_child("child_thousand_live_probes", timeout(300));
}

#[test]
#[ignore = "child of thousand_live_probes"]
fn child_thousand_live_probes() {
    if is_child() {
        live(1_000);
    }
}

/// The issue asks for 100,000 on both lanes; kept there on aarch64 too (registration
/// is meant to take microseconds, and each function is trapped only `CALLS` times
/// however many probes share it).
#[test]
fn hundred_thousand_live_probes() {
    run_child("child_hundred_thousand_live_probes", timeout(600));
}

#[test]
#[ignore = "child of hundred_thousand_live_probes"]
fn child_hundred_thousand_live_probes() {
    if is_child() {
        live(100_000);
    }
}

/// Probes registered one by one before the rest go in batches of [`BATCH`].
const SINGLES: usize = 500;
const BATCH: usize = 5_000;

/// One probe of the scenario.
enum Live {
    Breakpoint { func: usize, handle: ProbeHandle },
    Site { func: usize, handle: ProbeHandle },
    Return { func: usize, handle: ReturnProbeHandle },
}

/// Registers `total` probes (1% return probes on plain functions, the rest half
/// breakpoint probes round-robin over the plain functions, half site probes round-robin
/// over the sites), checks them as the module docs say, and unregisters them.
fn live(total: usize) {
    let rets = (total / 100).min(BP_FUNCTIONS);
    let bps = (total - rets) / 2;
    let site_probes = total - rets - bps;
    measure("probes", format!("{total} = {bps} breakpoint + {site_probes} site + {rets} return"));

    let bp_addrs: Vec<usize> = (0..BP_FUNCTIONS).map(bp_address).collect();
    let site_addrs = site_addresses();
    let before_bp: Vec<_> = bp_addrs.iter().map(|a| text_at(*a)).collect();
    let before_site: Vec<_> = site_addrs.iter().map(|a| text_at(*a)).collect();
    let ours: HashSet<usize> = bp_addrs.iter().chain(&site_addrs).copied().collect();
    set_hit_table(ours.iter().copied().collect());
    // How many probes with a pre handler that counts (breakpoint and site) each
    // function carries: its hit counter must end at that × CALLS.
    let mut bp_count = vec![0u64; BP_FUNCTIONS];
    let mut site_count = vec![0u64; SITE_FUNCTIONS];

    let mut probes: Vec<Live> = Vec::with_capacity(total);
    let start = Instant::now();
    // The first ones one by one, the rest in batches (the kernel's register_kprobes).
    let singles = |n: usize| n.min(SINGLES);
    for i in 0..singles(bps) {
        let func = i % BP_FUNCTIONS;
        let handle = Probe::builder()
            .function(BP_TABLE[func])
            .pre(count_hit)
            .register()
            .unwrap_or_else(|e| panic!("breakpoint probe {i} of {bps} (scale_bp_{func}), with {} probes live: {e}", probes.len()));
        assert_eq!(handle.address(), bp_addrs[func], "the probe is on scale_bp_{func}");
        bp_count[func] += 1;
        probes.push(Live::Breakpoint { func, handle });
    }
    measure("register breakpoint probe, one by one", per(start.elapsed(), singles(bps)));
    let batch_start = Instant::now();
    for chunk in (singles(bps)..bps).collect::<Vec<_>>().chunks(BATCH) {
        let builders = chunk.iter().map(|i| Probe::builder().function(BP_TABLE[i % BP_FUNCTIONS]).pre(count_hit));
        let handles = probekit::register_batch(builders).unwrap_or_else(|e| panic!("a batch of breakpoint probes, with {} probes live: {e}", probes.len()));
        for (i, handle) in chunk.iter().zip(handles) {
            let func = i % BP_FUNCTIONS;
            assert_eq!(handle.address(), bp_addrs[func], "the probe is on scale_bp_{func}");
            bp_count[func] += 1;
            probes.push(Live::Breakpoint { func, handle });
        }
    }
    measure("register breakpoint probe, in batches", per(batch_start.elapsed(), bps - singles(bps)));
    let bp_time = start.elapsed();
    measure("register breakpoint probe", per(bp_time, bps));
    let start = Instant::now();
    for i in 0..singles(site_probes) {
        let func = i % SITE_FUNCTIONS;
        let handle = Probe::builder()
            .function(SITE_TABLE[func])
            .pre(count_hit)
            .register()
            .unwrap_or_else(|e| panic!("site probe {i} of {site_probes} (scale_site_{func}), with {} probes live: {e}", probes.len()));
        assert_eq!(handle.address(), site_addrs[func], "the probe is on the site of scale_site_{func}");
        site_count[func] += 1;
        probes.push(Live::Site { func, handle });
    }
    measure("register site probe, one by one", per(start.elapsed(), singles(site_probes)));
    let batch_start = Instant::now();
    for chunk in (singles(site_probes)..site_probes).collect::<Vec<_>>().chunks(BATCH) {
        let builders = chunk.iter().map(|i| Probe::builder().function(SITE_TABLE[i % SITE_FUNCTIONS]).pre(count_hit));
        let handles = probekit::register_batch(builders).unwrap_or_else(|e| panic!("a batch of site probes, with {} probes live: {e}", probes.len()));
        for (i, handle) in chunk.iter().zip(handles) {
            let func = i % SITE_FUNCTIONS;
            assert_eq!(handle.address(), site_addrs[func], "the probe is on the site of scale_site_{func}");
            site_count[func] += 1;
            probes.push(Live::Site { func, handle });
        }
    }
    measure("register site probe, in batches", per(batch_start.elapsed(), site_probes - singles(site_probes)));
    let site_time = start.elapsed();
    measure("register site probe", per(site_time, site_probes));
    let start = Instant::now();
    for (func, f) in BP_TABLE.iter().enumerate().take(rets) {
        let handle = ReturnProbe::builder()
            .function(*f)
            .handler(count_return)
            .register()
            .unwrap_or_else(|e| panic!("return probe {func} of {rets} (scale_bp_{func}), with {} probes live: {e}", probes.len()));
        probes.push(Live::Return { func, handle });
    }
    let ret_time = start.elapsed();
    measure("register return probe", per(ret_time, rets));
    assert_eq!(probes.len(), total, "every probe is live");
    measure("register all", format!("{:.3} s, {} per probe", (bp_time + site_time + ret_time).as_secs_f64(), per(bp_time + site_time + ret_time, total)));

    // The listing shows each of them.
    let start = Instant::now();
    let listed = probekit::list().0.into_iter().filter(|p| ours.contains(&p.addr)).count();
    measure("list()", format!("{:.3} s for {listed} entries", start.elapsed().as_secs_f64()));
    assert_eq!(listed, total, "probekit::list() shows every live probe");

    // Armed: each probed function's text changed (a breakpoint or an enabled site).
    for (n, a) in bp_addrs.iter().enumerate().filter(|(n, _)| bp_count[*n] > 0 || *n < rets) {
        assert_ne!(text_at(*a), before_bp[n], "scale_bp_{n} is armed");
    }
    for (n, a) in site_addrs.iter().enumerate().filter(|(n, _)| site_count[*n] > 0) {
        assert_ne!(text_at(*a), before_site[n], "the site of scale_site_{n} is armed");
    }

    // Every function, CALLS times: every result right.
    let start = Instant::now();
    for round in 0..CALLS {
        for n in 0..BP_FUNCTIONS {
            assert_eq!(call_bp(n), bp_expected(n), "scale_bp_{n}() with probes live");
        }
        for n in 0..SITE_FUNCTIONS {
            assert_eq!(call_site(n, round), site_expected(n, round), "scale_site_{n}({round}) with probes live");
        }
    }
    measure("call every function", format!("{:.3} s for {} calls", start.elapsed().as_secs_f64(), CALLS as usize * (BP_FUNCTIONS + SITE_FUNCTIONS)));

    // Every probe fired once per call of its function, on that function.
    assert_eq!(stray_hits(), 0, "no handler ran at an address that is no probed function");
    for (n, a) in bp_addrs.iter().enumerate() {
        assert_eq!(hits_at(*a), bp_count[n] * CALLS, "hits on scale_bp_{n}, which carries {} breakpoint probes", bp_count[n]);
    }
    for (n, a) in site_addrs.iter().enumerate() {
        assert_eq!(hits_at(*a), site_count[n] * CALLS, "hits on scale_site_{n}, which carries {} site probes", site_count[n]);
    }
    for p in &probes {
        let (what, func, nhit, nmissed) = match p {
            Live::Breakpoint { func, handle } => ("breakpoint probe on scale_bp", func, handle.nhit(), handle.nmissed()),
            Live::Site { func, handle } => ("site probe on scale_site", func, handle.nhit(), handle.nmissed()),
            Live::Return { func, handle } => ("return probe on scale_bp", func, handle.nhit(), handle.nmissed()),
        };
        assert_eq!((nhit, nmissed), (CALLS, 0), "(nhit, nmissed) of the {what}_{func}");
    }
    assert_eq!(returns(), (rets as u64 * CALLS, 0), "(returns seen, with a wrong value)");

    // Unregister every one: the text comes back byte for byte.
    let start = Instant::now();
    let (mut plain, mut rets_live) = (Vec::new(), Vec::new());
    for p in probes {
        match p {
            Live::Breakpoint { handle, .. } | Live::Site { handle, .. } => plain.push(handle),
            Live::Return { handle, .. } => rets_live.push(handle),
        }
    }
    for h in rets_live {
        h.unregister().expect("unregister a return probe");
    }
    while !plain.is_empty() {
        let rest = plain.split_off(plain.len().saturating_sub(BATCH));
        probekit::unregister_batch(rest).expect("unregister a batch");
    }
    let t = start.elapsed();
    measure("unregister", format!("{:.3} s, {} per probe", t.as_secs_f64(), per(t, total)));
    for (n, a) in bp_addrs.iter().enumerate() {
        assert_eq!(text_at(*a), before_bp[n], "the text of scale_bp_{n} is restored");
    }
    for (n, a) in site_addrs.iter().enumerate() {
        assert_eq!(text_at(*a), before_site[n], "the site of scale_site_{n} is restored");
    }
    let listed = probekit::list().0.into_iter().filter(|p| ours.contains(&p.addr)).count();
    assert_eq!(listed, 0, "nothing is listed after unregistering");

    // And nothing fires any more.
    for n in 0..BP_FUNCTIONS {
        assert_eq!(call_bp(n), bp_expected(n));
    }
    for n in 0..SITE_FUNCTIONS {
        assert_eq!(call_site(n, 7), site_expected(n, 7));
    }
    assert_eq!(stray_hits(), 0);
    for (n, a) in bp_addrs.iter().enumerate() {
        assert_eq!(hits_at(*a), bp_count[n] * CALLS, "no hit on scale_bp_{n} after unregistering");
    }
    for (n, a) in site_addrs.iter().enumerate() {
        assert_eq!(hits_at(*a), site_count[n] * CALLS, "no hit on scale_site_{n} after unregistering");
    }
    assert_eq!(returns(), (rets as u64 * CALLS, 0), "no return handled after unregistering");
}
