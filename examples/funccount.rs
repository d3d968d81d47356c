//! bcc's `funccount` in a process: counts the calls of every function a glob chooses
//! and prints them as bcc does (`FUNC  COUNT`, fewest first).
//!
//! One [`MultiProbe`] with an entry handler only: each call adds one to its function's
//! counter (an atomic per function, indexed by the function's id: no lookup, no lock).
//! The workload, a small expression evaluator on two threads, knows how many calls it
//! made of each function; the example checks the counts against them, so running it
//! is a test.
//!
//! ```text
//! cargo run --example funccount                       # the default glob, funccount::calc::*
//! cargo run --example funccount -- 'funccount::calc::p*'
//! ```

#[path = "common/bcc.rs"]
mod bcc;

use probekit::MultiProbe;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The workload: a recursive-descent evaluator of `1+2*3+…`, one function per rule.
mod calc {
    use std::hint::black_box;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// Calls made, per function, counted by the workload itself.
    pub static MADE: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
    pub const NAMES: [&str; 4] = ["eval", "parse_sum", "parse_product", "parse_number"];

    #[inline(never)]
    pub fn parse_number(s: &[u8], at: &mut usize) -> u64 {
        MADE[3].fetch_add(1, Relaxed);
        let mut v = 0;
        while *at < s.len() && s[*at].is_ascii_digit() {
            v = v * 10 + (s[*at] - b'0') as u64;
            *at += 1;
        }
        black_box(v)
    }

    #[inline(never)]
    pub fn parse_product(s: &[u8], at: &mut usize) -> u64 {
        MADE[2].fetch_add(1, Relaxed);
        let mut v = parse_number(s, at);
        while *at < s.len() && s[*at] == b'*' {
            *at += 1;
            v = v.wrapping_mul(parse_number(s, at));
        }
        black_box(v)
    }

    #[inline(never)]
    pub fn parse_sum(s: &[u8], at: &mut usize) -> u64 {
        MADE[1].fetch_add(1, Relaxed);
        let mut v = parse_product(s, at);
        while *at < s.len() && s[*at] == b'+' {
            *at += 1;
            v = v.wrapping_add(parse_product(s, at));
        }
        black_box(v)
    }

    #[inline(never)]
    pub fn eval(s: &str) -> u64 {
        MADE[0].fetch_add(1, Relaxed);
        black_box(parse_sum(s.as_bytes(), &mut 0))
    }
}

fn main() -> Result<(), probekit::Error> {
    let pattern = std::env::args().nth(1).unwrap_or_else(|| "funccount::calc::*".to_string());
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..64).map(|_| AtomicU64::new(0)).collect());
    let c = counts.clone();
    let probe = MultiProbe::builder()
        .pattern(&pattern)
        .entry(move |_regs, f, _| {
            if let Some(n) = c.get(f.id as usize) {
                n.fetch_add(1, Relaxed);
            }
            false // nothing to watch at the return
        })
        .register()?;
    println!("Tracing {} functions for \"{pattern}\"... Hit Ctrl-C to end.", probe.functions().count());

    let eval = black_box(calc::eval as fn(&str) -> u64);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            s.spawn(move || {
                for i in 0..25 + 10 * t {
                    let expr = format!("{}+2*3*{}+4+{}*5", i, t + 1, i % 7);
                    assert_eq!(eval(&expr), i + 6 * (t + 1) + 4 + (i % 7) * 5);
                }
            });
        }
    });

    // bcc prints after Ctrl-C; here, after the workload.
    println!();
    println!("{:<36} {:>8}", "FUNC", "COUNT");
    let mut rows: Vec<(&str, u64)> = probe.functions().map(|f| (f.name.as_str(), counts[f.id as usize].load(Relaxed))).collect();
    rows.sort_by_key(|r| r.1);
    for (name, n) in rows.iter().filter(|r| r.1 > 0) {
        println!("{name:<36} {n:>8}");
    }
    println!("Detaching...");

    // Running the example is a test: each count is what the workload made.
    for f in probe.functions() {
        let short = f.name.rsplit("::").next().unwrap_or(&f.name);
        let i = calc::NAMES.iter().position(|n| *n == short).expect("only the workload's functions");
        assert_eq!(counts[f.id as usize].load(Relaxed), calc::MADE[i].load(Relaxed), "{}: counted as made", f.name);
    }
    assert!(rows.iter().any(|r| r.1 > 0));
    assert_eq!(probe.nmissed(), 0);
    probe.unregister()
}
