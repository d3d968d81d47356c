//! Issue 16: no page is ever writable and executable. A sampler thread reads
//! `/proc/self/maps` without pause while probes of every kind are registered, hit,
//! disabled, enabled and unregistered; in the default mode (code written through the
//! kernel) no sample shows an `rwx` mapping. Under qemu-user (the aarch64 lane) the
//! self-test picks the `mprotect` fallback, which the test checks instead. The
//! listing's header names the mode on both lanes.

use probekit::{Probe, PtRegs, ReturnProbe, TextWrites, WriteFailure, WriteMode};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[inline(never)]
fn wx_plain(x: u64) -> u64 {
    black_box(x).wrapping_mul(7)
}

#[probekit::traceable]
fn wx_traced(x: u64) -> u64 {
    black_box(x).wrapping_add(9)
}

static HITS: AtomicU64 = AtomicU64::new(0);

fn count(_: &PtRegs) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

fn count_return(_: &PtRegs, _: &mut ()) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

/// Whether qemu-user runs this process (its RSS and code writes behave otherwise).
fn emulated() -> bool {
    std::env::var("CROSS_RUNNER").is_ok_and(|r| !r.trim().is_empty())
        || cfg!(target_arch = "aarch64") && std::fs::read_link("/proc/self/exe").is_ok_and(|p| p.to_string_lossy().contains("qemu"))
}

#[test]
fn no_mapping_is_ever_writable_and_executable() {
    let mode = probekit::write_mode();
    if emulated() {
        assert_eq!(mode, Some(WriteMode::Mprotect), "qemu-user does not see code written through the kernel: the fallback");
        return;
    }
    if matches!(std::env::var("PROBEKIT_TEXT_WRITE").as_deref(), Ok("kernel" | "mprotect")) {
        return; // a forced mode: the sampler's promise is the default mode's
    }
    assert_eq!(mode, Some(WriteMode::Kernel), "this kernel allows writes through /proc/self/mem");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut samples, mut rwx) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
                rwx.extend(maps.lines().filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.starts_with("rwx"))).map(str::to_string));
                samples += 1;
            }
            (samples, rwx)
        })
    };
    let plain = wx_plain as fn(u64) -> u64;
    let traced = wx_traced as fn(u64) -> u64;
    for round in 0..100 {
        let probes = [
            Probe::builder().function(plain).pre(count).register().unwrap(),
            Probe::builder().function(plain).pre(count).post(count).register().unwrap(),
            Probe::builder().function(traced).pre(count).register().unwrap(),
        ];
        let ret = ReturnProbe::builder().function(plain).handler(count_return).register().unwrap();
        assert_eq!(black_box(plain)(round), round.wrapping_mul(7));
        assert_eq!(wx_traced(round), round + 9);
        for p in &probes {
            p.disable().unwrap();
            p.enable().unwrap();
        }
        assert_eq!(black_box(plain)(round), round.wrapping_mul(7));
        drop(ret);
        for p in probes {
            p.unregister().unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (samples, rwx) = sampler.join().unwrap();
    assert!(samples > 0 && HITS.load(Ordering::Relaxed) > 0);
    assert!(rwx.is_empty(), "{} of {samples} samples showed rwx mappings, e.g. {:?}", rwx.len(), rwx.first());
    eprintln!("{samples} samples of /proc/self/maps, none rwx");
}

/// The listing's first line names the write mode, as the kernel's listings carry a
/// header: the kernel's by default on the host lane, the fallback under qemu-user
/// (which does not see writes through /proc/self/mem), the forced one when forced.
#[test]
fn listing_header_names_the_write_mode() {
    let p = Probe::builder().function(wx_plain as fn(u64) -> u64).pre(count).register().unwrap();
    let listing = probekit::list().to_string();
    let header = listing.lines().next().expect("a header line");
    let writes = probekit::text_writes();
    assert_eq!(header, format!("# text writes: {writes}"), "{listing}");
    assert!(listing.lines().skip(1).any(|l| l.contains("wx_plain")), "the probes follow the header\n{listing}");
    let forced = std::env::var("PROBEKIT_TEXT_WRITE").ok();
    match forced.as_deref() {
        Some("mprotect") => {
            assert_eq!(writes, TextWrites::Mprotect { kernel: WriteFailure::Forced });
            assert_eq!(header, "# text writes: mprotect (forced by PROBEKIT_TEXT_WRITE)");
        }
        Some("kernel") => {
            assert_eq!(writes, TextWrites::Kernel { forced: true });
            assert_eq!(header, "# text writes: /proc/self/mem (kernel, forced by PROBEKIT_TEXT_WRITE)");
        }
        _ if emulated() => {
            // qemu-user: the kernel's write goes through, but the translated code stays.
            assert_eq!(writes, TextWrites::Mprotect { kernel: WriteFailure::NotSeen }, "{header}");
            assert!(header.starts_with("# text writes: mprotect (fallback: /proc/self/mem written, but code that had run"), "{header}");
        }
        _ => {
            assert_eq!(writes, TextWrites::Kernel { forced: false });
            assert_eq!(header, "# text writes: /proc/self/mem (kernel)");
        }
    }
    eprintln!("{header}");
    p.unregister().unwrap();
}
