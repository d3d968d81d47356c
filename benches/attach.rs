//! Cost of attaching probes in bulk, per probe, in each way of writing code, and of a
//! hit while many probes are live (issues 12 and 16; ids are stable: compare runs).
//!
//! - `attach/sites_10k/<mode>`: 10,000 site probes registered as one batch
//!   (`register_batch`), then unregistered as one (`unregister_batch`); the time of
//!   both, per probe. They ride the 500 generated `#[traceable]` functions of
//!   tests/scale, 20 probes per site, each its own live probe: 500 distinct sites are
//!   patched. Goal: ≤ 10 µs per probe.
//! - `attach/breakpoints_10k/<mode>`: the same with 10,000 breakpoint probes on the
//!   1,000 generated asm functions of tests/scale, at both instruction boundaries of
//!   each (`mov`, `ret`), 5 probes per address, each with its own out-of-line slot:
//!   2,000 distinct breakpoints are written. Goal: ≤ 50 µs per probe.
//! - `attach/sites_500_distinct/<mode>`: one probe on each of the 500 sites (every
//!   probe patches its own site): the per-probe cost where no probe shares a site.
//! - `attach/breakpoints_2k_distinct/<mode>`: one probe on each of the 2,000 addresses
//!   (every probe writes its own breakpoint).
//! - `hit/site`: the same measurement as benches/hit.rs's `hit/site` (a `#[traceable]`
//!   function, its site enabled, an empty pre handler), measured again in this run
//!   (one id, one history in criterion's records: either bench's run is a fair
//!   baseline for the other's).
//! - `hit/site_with_10k_live`: the same probe, hit while 10,000 other probes are live
//!   (5,000 site probes, 10 on each generated site, and 5,000 breakpoint probes over
//!   the 2,000 generated addresses). Goal: ≤ 1.1 × `hit/site`.
//!
//! `<mode>` is how code is written (`probekit::WriteMode`): `kernel` (`/proc/self/mem`,
//! the default) or `mprotect` (the fallback). A process decides its mode once, so the
//! bench runs the ids of the mode it was given here and starts itself again, with the
//! same arguments and `PROBEKIT_TEXT_WRITE=mprotect`, for the others: its output
//! follows. Where writes through the kernel are not seen (qemu-user, the aarch64 lane)
//! the runtime uses `mprotect` and the `kernel` ids are skipped, with a message; when
//! `PROBEKIT_TEXT_WRITE` is set, only its mode runs.
//!
//! Times are per probe (`iter_custom`): each round registers and unregisters the whole
//! batch (builders made beforehand, outside the time), and criterion's iteration count
//! is met by whole rounds, the time scaled to the iterations asked. A round includes
//! the grace period that lets the previous round's records be reused.
//!
//! Before the benchmarks (also with `--test`; not with `--list`, nor in the child) the
//! memory of an idle probe is printed: the heap (a counting global allocator) and the
//! resident set (`/proc/self/statm`) that 10,000 live site probes take, then 10,000
//! live breakpoint probes beside them, per probe, after one probe of each kind paid the
//! one-time costs; and the runtime's static accounting
//! (`probekit::__private::footprint`). Records come in chunks of 1,024, so the heap
//! figure moves by up to a chunk's share (about 26 B per probe) with the count.

use criterion::{BenchmarkId, Criterion};
use probekit::{Probe, ProbeBuilder, ProbeHandle, PtRegs, WriteMode};
use scale_tests::{BP_FUNCTIONS, BP_TABLE, SITE_FUNCTIONS, SITE_TABLE};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Probes per batch of the `_10k` ids, and live beside `hit/site_with_10k_live`.
const PROBES: usize = 10_000;

/// Set in the child that runs the other mode's ids.
const CHILD: &str = "PROBEKIT_ATTACH_BENCH_CHILD";

/// Bytes of heap live now, counted by [`Counting`].
static HEAP: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting the bytes live (for the memory report).
struct Counting;

// SAFETY: every call is passed on to `System` unchanged; the counter is only arithmetic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `alloc` hold for `System.alloc`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HEAP.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            HEAP.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this allocator) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's guarantees for `realloc` hold for `System.realloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
            HEAP.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn empty(_r: &PtRegs) {}

#[probekit::traceable]
fn hit_site(x: u64) -> u64 {
    x.wrapping_add(1)
}

/// The offset of the second instruction of each generated asm function (`mov eax,
/// imm32` is 5 bytes; aarch64 `mov w0, #imm` 4), where its `ret` is.
const SECOND: usize = if cfg!(target_arch = "aarch64") { 4 } else { 5 };

/// `n` breakpoint probes round-robin over the 2,000 generated addresses (the first
/// 2,000 on distinct addresses).
fn breakpoints(n: usize) -> Vec<ProbeBuilder> {
    (0..n)
        .map(|i| {
            let at = i % (2 * BP_FUNCTIONS);
            Probe::builder().function(BP_TABLE[at / 2]).offset([0, SECOND][at % 2]).pre(empty)
        })
        .collect()
}

/// `n` site probes round-robin over the 500 generated sites (the first 500 on
/// distinct sites).
fn sites(n: usize) -> Vec<ProbeBuilder> {
    (0..n).map(|i| Probe::builder().function(SITE_TABLE[i % SITE_FUNCTIONS]).pre(empty)).collect()
}

/// Registers `batch` as one batch and unregisters it as one: the time both took.
fn round(batch: Vec<ProbeBuilder>) -> Duration {
    let start = Instant::now();
    let handles = probekit::register_batch(batch).expect("register the batch");
    probekit::unregister_batch(handles).expect("unregister the batch");
    start.elapsed()
}

/// The time of `iters` probes, from whole rounds of `make()`'s batch (see the docs).
fn per_probe(iters: u64, make: &dyn Fn() -> Vec<ProbeBuilder>) -> Duration {
    let mut total = Duration::ZERO;
    let mut probes = 0u64;
    while probes < iters.max(1) {
        let batch = make();
        probes += batch.len() as u64;
        total += round(batch);
    }
    total.mul_f64(iters as f64 / probes as f64)
}

fn mode_name(m: WriteMode) -> &'static str {
    match m {
        WriteMode::Kernel => "kernel",
        WriteMode::Mprotect => "mprotect",
    }
}

fn attach(c: &mut Criterion, mode: WriteMode) {
    let mut g = c.benchmark_group("attach");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    let m = mode_name(mode);
    let sites_10k = || sites(PROBES);
    let breakpoints_10k = || breakpoints(PROBES);
    let sites_distinct = || sites(SITE_FUNCTIONS);
    let breakpoints_distinct = || breakpoints(2 * BP_FUNCTIONS);
    let cases: [(&str, &dyn Fn() -> Vec<ProbeBuilder>); 4] = [
        ("sites_10k", &sites_10k),
        ("breakpoints_10k", &breakpoints_10k),
        ("sites_500_distinct", &sites_distinct),
        ("breakpoints_2k_distinct", &breakpoints_distinct),
    ];
    for (name, make) in cases {
        g.bench_function(BenchmarkId::new(name, m), |b| b.iter_custom(|iters| per_probe(iters, make)));
    }
    g.finish();
}

fn hit(c: &mut Criterion) {
    let mut g = c.benchmark_group("hit");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let f = hit_site as fn(u64) -> u64;
    let p = Probe::builder().function(f).pre(empty).register().expect("site probe");
    assert!(probekit::list().0.iter().any(|i| i.addr == p.address() && i.site), "the probe rides the site");
    g.bench_function("site", |b| b.iter(|| black_box(f)(black_box(1))));
    // The others are registered at the first call (not at all if a filter skips the id).
    let mut others: Option<Vec<ProbeHandle>> = None;
    g.bench_function("site_with_10k_live", |b| {
        others.get_or_insert_with(|| {
            let mut batch = sites(PROBES / 2);
            batch.extend(breakpoints(PROBES / 2));
            probekit::register_batch(batch).expect("the 10,000 others")
        });
        b.iter(|| black_box(f)(black_box(1)))
    });
    g.finish();
    assert_eq!(p.nmissed(), 0);
    drop(p);
    if let Some(others) = others {
        probekit::unregister_batch(others).expect("unregister the others");
    }
}

/// Resident set size now, in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("statm's resident field");
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

/// Prints what an idle probe costs in memory (see the module docs).
fn memory(mode: WriteMode) {
    // One-time costs first (symbol tables, the site table, the signal handler, the
    // copy of the mappings): one probe of each kind, registered and unregistered.
    let warm = probekit::register_batch(sites(1).into_iter().chain(breakpoints(1))).expect("warm up");
    probekit::unregister_batch(warm).expect("warm up");
    let per = |bytes: isize| bytes as f64 / PROBES as f64;
    let handles = std::mem::size_of::<ProbeHandle>() as isize * PROBES as isize;
    println!("memory of an idle probe ({} mode, {PROBES} live; the handles' own {} B each excluded):", mode_name(mode), std::mem::size_of::<ProbeHandle>());
    let mut live = Vec::new();
    for (what, make) in
        [("site probes, on 500 sites", sites as fn(usize) -> Vec<ProbeBuilder>), ("breakpoint probes, on 2,000 addresses, each with its slot", breakpoints)]
    {
        let (heap0, rss0) = (HEAP.load(Ordering::Relaxed) as isize, rss() as isize);
        // Made inside the measured span: the batch is consumed (freed) by registration.
        let h = probekit::register_batch(make(PROBES)).expect("register for the memory report");
        let (heap1, rss1) = (HEAP.load(Ordering::Relaxed) as isize, rss() as isize);
        println!("  {PROBES} {what}: heap {:+.0} B/probe, resident {:+.0} B/probe", per(heap1 - heap0 - handles), per(rss1 - rss0 - handles));
        live.push(h);
    }
    let f = probekit::__private::footprint();
    println!(
        "  static: record {} B + site-hit counters {} B + padding {} B = {} B per probe; address-map entry {} B per probed address \
         (the table at most half full: 2 to 4 entries per address, and the outgrown tables kept: at most as much again); \
         out-of-line slot {} B per breakpoint probe",
        f.record,
        f.hit_counters,
        f.padding,
        f.record + f.hit_counters + f.padding,
        f.addr_entry,
        f.slot
    );
    for h in live {
        probekit::unregister_batch(h).expect("unregister after the memory report");
    }
}

/// Runs the other mode's ids in a child process (see the module docs), or says why not.
fn other_mode(mode: WriteMode) {
    if let Ok(forced) = std::env::var("PROBEKIT_TEXT_WRITE") {
        println!("attach/*/{}: skipped: PROBEKIT_TEXT_WRITE={forced} chooses one mode for this run", mode_name(other(mode)));
        return;
    }
    if mode == WriteMode::Mprotect {
        // The runtime's self-test found writes through the kernel not seen (qemu-user)
        // or refused (kernels with PROC_MEM_NO_FORCE).
        println!("attach/*/kernel: skipped: code written through /proc/self/mem does not take effect here (qemu-user?): the runtime writes with mprotect");
        return;
    }
    let exe = std::env::current_exe().expect("the bench's own path");
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("PROBEKIT_TEXT_WRITE", mode_name(other(mode)))
        .env(CHILD, "1")
        .status()
        .expect("start the bench again for the mprotect mode");
    assert!(status.success(), "the mprotect run failed: {status}");
}

fn other(m: WriteMode) -> WriteMode {
    match m {
        WriteMode::Kernel => WriteMode::Mprotect,
        WriteMode::Mprotect => WriteMode::Kernel,
    }
}

fn main() {
    let child = std::env::var_os(CHILD).is_some();
    let listing = std::env::args().any(|a| a == "--list");
    let Some(mode) = probekit::write_mode() else {
        eprintln!("attach: this process can write no code ({}): nothing to measure", probekit::text_writes());
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    if !child && !listing {
        memory(mode);
    }
    attach(&mut c, mode);
    if !child {
        hit(&mut c);
    }
    c.final_summary();
    if !child {
        other_mode(mode);
    }
}
