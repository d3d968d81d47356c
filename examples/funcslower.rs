//! bcc's `funcslower` in a process: prints every call of the chosen functions that
//! took longer than a threshold, with its latency, return value and (with `-a N`) its
//! first arguments, in bcc's columns.
//!
//! Built on the function-graph tracer ([`probekit::trace::Tracer`]): it records every
//! call with its arguments and return value into per-thread rings; `main` drains them
//! every few milliseconds while the workload runs and prints the slow ones. Calls
//! nest correctly, so a slow caller and its slow callee are both printed with their
//! own latencies (bcc's funcslower keeps one start time per thread and function).
//! The workload, a fake key-value store on two threads, knows which calls it made
//! slow; the example checks that each of them was printed, with its arguments and
//! return value, so running it is a test.
//!
//! ```text
//! cargo run --example funcslower                        # -m 1 -a 2 'funcslower::store::*'
//! cargo run --example funcslower -- -u 500 -a 1 'funcslower::store::get'
//! ```

#[path = "common/bcc.rs"]
mod bcc;

use probekit::trace::Tracer;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// The workload: a store whose `get` is slow for some keys.
mod store {
    use std::hint::black_box;
    use std::time::Duration;

    /// Looks a key up: slow (sleeps `delay_us`) when asked to be. Returns `key * 3`.
    #[inline(never)]
    pub extern "C" fn get(key: u64, delay_us: u64) -> u64 {
        if delay_us > 0 {
            std::thread::sleep(Duration::from_micros(delay_us));
        }
        black_box(key * 3)
    }

    /// Fetches `n` keys from `first` on, each with the same delay. Returns the sum.
    #[inline(never)]
    pub extern "C" fn batch(first: u64, n: u64, delay_us: u64) -> u64 {
        (first..first + n).map(|k| get(k, delay_us)).sum()
    }
}

/// Command line: `[-u US | -m MS] [-a N] [PATTERN]`.
struct Args {
    min_ns: u64,
    unit: (&'static str, f64),
    nargs: usize,
    pattern: String,
}

fn parse_args() -> Args {
    let mut a = Args { min_ns: 1_000_000, unit: ("ms", 1e6), nargs: 2, pattern: "funcslower::store::*".to_string() };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<u64>().ok()).expect("a number after the option");
        match arg.as_str() {
            "-u" => (a.min_ns, a.unit) = (num() * 1000, ("us", 1e3)),
            "-m" => (a.min_ns, a.unit) = (num() * 1_000_000, ("ms", 1e6)),
            "-a" => a.nargs = num() as usize,
            p => a.pattern = p.to_string(),
        }
    }
    a
}

fn main() -> Result<(), probekit::Error> {
    let args = parse_args();
    // Closures inside the functions match the glob too (`store::batch::{{closure}}`): left out.
    let tracer = Tracer::builder().pattern(&args.pattern).exclude("*{{closure}}*").args(args.nargs).retval().register()?;
    let (designator, per_unit) = args.unit;
    println!("Tracing function calls slower than {} {designator}... Ctrl+C to quit.", args.min_ns as f64 / per_unit);
    println!("{:<14} {:<6} {:>7} {:>16} {}", "COMM", "PID", format!("LAT({designator})"), "RVAL", if args.nargs > 0 { "FUNC ARGS" } else { "FUNC" });

    let printed = Mutex::new(Vec::new());
    let print = |snap: probekit::trace::Snapshot| {
        // In the order they returned, as bcc's events arrive.
        let mut slow: Vec<_> = snap.threads.iter().flat_map(|t| t.calls.iter().map(move |c| (t, c))).filter(|(_, c)| c.duration_ns() >= args.min_ns).collect();
        slow.sort_by_key(|(_, c)| c.exit_ns);
        for (t, c) in slow {
            let hex: Vec<String> = c.args().iter().map(|a| format!("{a:#x}")).collect();
            println!(
                "{:<14.14} {:<6} {:>7.2} {:>16x} {} {}",
                t.name,
                std::process::id(),
                c.duration_ns() as f64 / per_unit,
                c.ret.unwrap_or(0),
                snap.name(c),
                hex.join(" ")
            );
            printed.lock().unwrap().push((snap.name(c).to_string(), *c));
        }
    };

    // The workload: slow keys are multiples of 10 (3 ms), the others answer at once.
    let done = AtomicUsize::new(0);
    let slow_us = 3 * args.min_ns / 1000;
    tracer.start();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let done = &done;
            std::thread::Builder::new()
                .name(format!("store-{t}"))
                .spawn_scoped(s, move || {
                    let get = black_box(store::get as extern "C" fn(u64, u64) -> u64);
                    let batch = black_box(store::batch as extern "C" fn(u64, u64, u64) -> u64);
                    for key in t * 100..t * 100 + 30 {
                        assert_eq!(get(key, if key % 10 == 0 { slow_us } else { 0 }), key * 3);
                    }
                    assert_eq!(batch(t * 100 + 50, 2, slow_us), (t * 100 * 2 + 101) * 3);
                    done.fetch_add(1, Relaxed);
                })
                .unwrap();
        }
        // Live, as bcc prints from its perf buffer: what finished since the last look.
        while done.load(Relaxed) < 2 {
            std::thread::sleep(Duration::from_millis(5));
            print(tracer.drain());
        }
    });
    tracer.stop();
    print(tracer.drain());

    // Running the example is a test: every slow call was printed, with its arguments
    // and return value; nothing printed was faster than the threshold.
    let printed = printed.into_inner().unwrap();
    let slow_gets: Vec<u64> = (0..2).flat_map(|t| (t * 100..t * 100 + 30).filter(|k| k % 10 == 0).chain([t * 100 + 50, t * 100 + 51])).collect();
    for key in &slow_gets {
        let hit = printed.iter().find(|(n, c)| n.ends_with("::get") && c.args().first() == Some(key));
        let (_, c) = hit.unwrap_or_else(|| panic!("the slow get({key}) was printed"));
        assert_eq!(c.ret, Some(key * 3));
        if args.nargs > 1 {
            assert_eq!(c.args()[1], slow_us);
        }
    }
    if args.pattern == "funcslower::store::*" {
        assert_eq!(printed.iter().filter(|(n, _)| n.ends_with("::batch")).count(), 2, "both batches were slow");
    }
    assert!(printed.iter().all(|(_, c)| c.duration_ns() >= args.min_ns));
    let fast = printed.len().saturating_sub(slow_gets.len() + 2);
    eprintln!("({} slow calls printed; {fast} calls the workload made fast were slow anyway)", printed.len());
    tracer.unregister()
}
