//! bcc's `argdist` in a process: a frequency count (`-C`) or a log2 histogram (`-H`)
//! of a function's argument or return value, from a bcc probe specifier, printed as
//! bcc prints it.
//!
//! The specifier is bcc's `{p,r}:[library]:function(signature):type:expr`; here the
//! library is this program (left empty) and the function a Rust path or a glob:
//! `p::argdist::heap::alloc(u64 size):u64:size` counts the `size` argument of every
//! call, `r::argdist::heap::alloc():u64:$retval` the return value. A [`MultiProbe`]
//! reads the value in its entry (or return) handler and counts it in a lock-free
//! table (`-C`) or atomic log2 slots (`-H`). The workload, an allocator that hands out
//! sizes from a known mix, checks the counts against what it asked for, so running it
//! is a test.
//!
//! ```text
//! cargo run --example argdist                           # both specifiers below
//! cargo run --example argdist -- -C 'p::argdist::heap::alloc(u64 size):u64:size'
//! cargo run --example argdist -- -H 'r::argdist::heap::alloc():u64:$retval'
//! ```

#[path = "common/bcc.rs"]
mod bcc;

use bcc::Log2Hist;
use probekit::{MultiProbe, MultiProbeHandle};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The workload: an allocator of sorts (returns the size rounded up to 8).
mod heap {
    use std::hint::black_box;
    #[inline(never)]
    pub extern "C" fn alloc(size: u64, _align: u64) -> u64 {
        black_box(size.div_ceil(8) * 8)
    }
}

/// A frequency table a handler can fill: open addressing over atomics, no lock, no
/// allocation. Keys are stored + 1 (0 marks a free slot).
struct Freq {
    keys: Vec<AtomicU64>,
    counts: Vec<AtomicU64>,
    /// Values that found the table full.
    dropped: AtomicU64,
}

impl Freq {
    fn new(n: usize) -> Self {
        let atomics = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Freq { keys: atomics(), counts: atomics(), dropped: AtomicU64::new(0) }
    }

    fn add(&self, v: u64) {
        let key = v.wrapping_add(1);
        let n = self.keys.len();
        let mut i = (v.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize % n;
        for _ in 0..n {
            // A free slot is taken for the key; one another thread took first may hold it too.
            let k = match self.keys[i].load(Relaxed) {
                0 => self.keys[i].compare_exchange(0, key, Relaxed, Relaxed).map_or_else(|now| now, |_| key),
                k => k,
            };
            if k == key {
                self.counts[i].fetch_add(1, Relaxed);
                return;
            }
            i = (i + 1) % n;
        }
        self.dropped.fetch_add(1, Relaxed);
    }

    /// `(value, count)`, fewest first (bcc's order).
    fn sorted(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.keys.iter().zip(&self.counts).filter_map(|(k, c)| Some((k.load(Relaxed).checked_sub(1)?, c.load(Relaxed)))).collect();
        v.sort_by_key(|&(value, count)| (count, value));
        v
    }
}

/// A parsed specifier.
struct Spec {
    raw: String,
    kind: Kind,
    ret: bool,
    function: String,
    /// Which argument `expr` names (for entry specifiers).
    arg: usize,
    expr: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Count,
    Hist,
}

/// Parses `{p,r}:[library]:function(signature):type:expr` (the library must be empty:
/// this program). Errors say what is wrong.
fn parse(kind: Kind, raw: &str) -> Result<Spec, String> {
    let (probe, rest) = raw.split_once(':').ok_or("a specifier starts with p: or r:")?;
    let ret = match probe {
        "p" => false,
        "r" => true,
        _ => return Err(format!("probe type must be p or r, not {probe:?}")),
    };
    let (library, rest) = rest.split_once(':').ok_or("missing ':' after the library")?;
    if !library.is_empty() {
        return Err("only this program's functions (an empty library)".into());
    }
    let (function, rest) = rest.split_once('(').ok_or("missing '(' after the function")?;
    let (signature, rest) = rest.split_once(')').ok_or("missing ')'")?;
    let mut fields = rest.strip_prefix(':').ok_or("missing ':type:expr'")?.splitn(2, ':');
    let (_type, expr) = (fields.next().unwrap_or(""), fields.next().ok_or("missing ':expr'")?.to_string());
    let params: Vec<&str> = signature.split(',').map(|p| p.split_whitespace().last().unwrap_or("")).collect();
    let arg = match (ret, expr.as_str()) {
        (true, "$retval") => 0,
        (true, _) => return Err("a return specifier's expr must be $retval".into()),
        (false, e) => params.iter().position(|p| *p == e).ok_or(format!("{e:?} is not a parameter of ({signature})"))?,
    };
    Ok(Spec { raw: raw.to_string(), kind, ret, function: function.to_string(), arg, expr })
}

/// What a specifier's handler counts into.
struct Counts {
    freq: Freq,
    hist: Log2Hist,
}

/// Attaches a specifier's probe.
fn attach(spec: &Spec, counts: Arc<Counts>) -> Result<MultiProbeHandle, probekit::Error> {
    let (kind, arg) = (spec.kind, spec.arg);
    let count = move |v: u64| match kind {
        Kind::Count => counts.freq.add(v),
        Kind::Hist => counts.hist.record(v),
    };
    let probe = MultiProbe::builder().pattern(&spec.function);
    if spec.ret {
        probe.entry(|_, _, _| true).exit(move |regs, _, _| count(regs.return_value())).register()
    } else {
        probe
            .entry(move |regs, _, _| {
                count(regs.arg(arg).unwrap_or(0));
                false
            })
            .register()
    }
}

fn display(spec: &Spec, counts: &Counts) {
    match spec.kind {
        Kind::Count => {
            println!("{}", spec.raw);
            println!("\t{:<10} EVENT", "COUNT");
            for (value, count) in counts.freq.sorted() {
                let event = if spec.ret { format!("retval = {value}") } else { format!("{} = {value}", spec.expr) };
                println!("\t{count:<10} {event}");
            }
        }
        Kind::Hist => bcc::print_log2_hist(&counts.hist.counts(), if spec.ret { "retval" } else { &spec.expr }),
    }
}

/// The sizes the workload asks for: `(size, how many times)`.
const MIX: [(u64, u64); 5] = [(16, 40), (24, 7), (32, 25), (100, 10), (4096, 3)];

fn main() {
    let mut specs = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let kind = match flag.as_str() {
            "-C" => Kind::Count,
            "-H" => Kind::Hist,
            f => panic!("usage: argdist [-C SPEC] [-H SPEC] (not {f:?})"),
        };
        let raw = it.next().expect("a specifier after -C or -H");
        specs.push(parse(kind, &raw).unwrap_or_else(|e| panic!("{raw}: {e}")));
    }
    if specs.is_empty() {
        specs.push(parse(Kind::Count, "p::argdist::heap::alloc(u64 size, u64 align):u64:size").unwrap());
        specs.push(parse(Kind::Hist, "r::argdist::heap::alloc(u64 size, u64 align):u64:$retval").unwrap());
    }
    let attached: Vec<(Arc<Counts>, MultiProbeHandle)> = specs
        .iter()
        .map(|s| {
            let counts = Arc::new(Counts { freq: Freq::new(1024), hist: Log2Hist::new() });
            let probe = attach(s, counts.clone()).unwrap_or_else(|e| panic!("{}: {e}", s.raw));
            (counts, probe)
        })
        .collect();

    let alloc = black_box(heap::alloc as extern "C" fn(u64, u64) -> u64);
    std::thread::scope(|s| {
        for (size, times) in MIX {
            s.spawn(move || (0..times).for_each(|_| assert_eq!(alloc(size, 8), size.div_ceil(8) * 8)));
        }
    });

    // bcc prints every interval; here once, after the workload.
    println!("[{}]", bcc::hms());
    for (spec, (counts, _)) in specs.iter().zip(&attached) {
        display(spec, counts);
    }

    // Running the example is a test: the counts are the mix the workload asked for.
    for (spec, (counts, probe)) in specs.iter().zip(&attached) {
        assert_eq!(probe.nmissed(), 0);
        let value = |size: u64| if spec.ret { size.div_ceil(8) * 8 } else { size };
        if !spec.function.starts_with("argdist::heap::") || spec.arg > 0 && !spec.ret {
            continue; // a specifier of the user's: nothing known to check against
        }
        match spec.kind {
            Kind::Count => {
                let mut want: Vec<(u64, u64)> = MIX.iter().map(|&(s, n)| (value(s), n)).collect();
                want.sort_by_key(|&(v, n)| (n, v));
                assert_eq!(counts.freq.sorted(), want);
            }
            Kind::Hist => {
                let mut want = vec![0u64; 65];
                MIX.iter().for_each(|&(s, n)| want[bcc::log2_slot(value(s))] += n);
                assert_eq!(counts.hist.counts(), want);
            }
        }
    }
}
