//! bcc's `argdist` in a process: a frequency count (`-C`) or a log2 histogram (`-H`)
//! of a function's argument or return value, from a bcc probe specifier, printed as
//! bcc prints it.
//!
//! The specifier is bcc's `{p,r}:[library]:function(signature)[:type:expr][#label]`;
//! here the library is this program (left empty) and the function a Rust path or a
//! glob: `p::argdist::heap::alloc(u64 size):u64:size` counts the `size` argument of
//! every call, `r::argdist::heap::alloc():u64:$retval` the return value. As in bcc, the
//! value is converted to `type` (an integer type: `int`, `u32`, `size_t`, `i64`, …; an
//! argument first to its type in the signature), the output shows `expr` as written,
//! and without `:type:expr` a `p` specifier counts calls (`total calls`, `-C` only) and
//! an `r` one its return value as an `int` (shown as `retval`). One expression per
//! specifier, a parameter's name or `$retval`: bcc's C expressions, filters, `$entry`,
//! `$latency`, strings, tracepoints and USDT probes are errors here (exit status 2). A
//! [`MultiProbe`] reads the value in its entry (or return) handler and counts it in a
//! lock-free table (`-C`) or atomic log2 slots (`-H`). The workload, an allocator that
//! hands out sizes from a known mix, checks the counts of every specifier on it against
//! what it asked for, so running it is a test.
//!
//! ```text
//! cargo run --example argdist                           # both specifiers below
//! cargo run --example argdist -- -C 'p::argdist::heap::alloc(u64 size):u64:size'
//! cargo run --example argdist -- -H 'r::argdist::heap::alloc():u64:$retval'
//! cargo run --example argdist -- -C 'r::argdist::heap::alloc()'
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

/// A C integer type: what bcc converts a value to before it counts it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CType {
    bits: u32,
    signed: bool,
}

impl CType {
    /// `int`, `unsigned long`, `u32`, `s64`, `size_t`, `uint8_t`, Rust's `i32`, `usize`, ….
    fn parse(t: &str) -> Option<CType> {
        let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
        let (bits, signed) = match t.as_str() {
            "char" | "signed char" | "s8" | "int8_t" | "i8" => (8, true),
            "unsigned char" | "u8" | "uint8_t" => (8, false),
            "short" | "short int" | "signed short" | "s16" | "int16_t" | "i16" => (16, true),
            "unsigned short" | "unsigned short int" | "u16" | "uint16_t" => (16, false),
            "int" | "signed" | "signed int" | "s32" | "int32_t" | "i32" | "pid_t" => (32, true),
            "unsigned" | "unsigned int" | "u32" | "uint32_t" => (32, false),
            "long" | "long int" | "long long" | "long long int" | "s64" | "int64_t" | "i64" | "ssize_t" | "off_t" | "isize" => (64, true),
            "unsigned long" | "unsigned long int" | "unsigned long long" | "unsigned long long int" | "u64" | "uint64_t" | "size_t" | "usize" => (64, false),
            _ => return None,
        };
        Some(CType { bits, signed })
    }

    /// `v` converted to this type, as the 64 bits C's conversion back to `u64` gives
    /// (cut to the width, sign-extended if signed).
    fn convert(self, v: u64) -> u64 {
        let shift = 64 - self.bits;
        if self.signed {
            (((v << shift) as i64) >> shift) as u64
        } else {
            (v << shift) >> shift
        }
    }

    /// A converted value as bcc prints it.
    fn show(self, v: u64) -> String {
        if self.signed {
            (v as i64).to_string()
        } else {
            v.to_string()
        }
    }
}

const U64: CType = CType { bits: 64, signed: false };

/// What a specifier reads.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expr {
    /// The argument in register `n` (0-based), converted to its type in the signature if given.
    Arg(usize, Option<CType>),
    Retval,
    /// bcc's default for a `p` specifier: 1 per call.
    One,
}

/// A parsed specifier.
struct Spec {
    raw: String,
    /// bcc's `#label`: the `-C` title and `-H` column instead of the specifier and expr.
    label: Option<String>,
    kind: Kind,
    ret: bool,
    function: String,
    expr: Expr,
    /// The expression as written (bcc's `_display_expr`); `None` for the default one.
    shown: Option<String>,
    /// The type the value is converted to before it is counted.
    ty: CType,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Count,
    Hist,
}

/// Parses `{p,r}:[library]:function(signature)[:type:expr][#label]` (the library must
/// be empty: this program). Errors say what is wrong.
fn parse(kind: Kind, raw: &str) -> Result<Spec, String> {
    let halves: Vec<&str> = raw.split('#').collect();
    let label = if halves.len() == 2 { Some(halves[1].to_string()) } else { None };
    let whole = "at least the probe type, library, and function signature must be specified";
    let (probe, rest) = halves[0].trim().split_once(':').ok_or(whole)?;
    let ret = match probe {
        "p" => false,
        "r" => true,
        "t" | "u" => return Err("only p and r probes here (no tracepoints or USDT probes)".into()),
        _ => return Err(format!("probe type must be 'p' or 'r' but got '{probe}'")),
    };
    let (library, rest) = rest.split_once(':').ok_or(whole)?;
    if !library.is_empty() {
        return Err(format!("only this program's functions: leave the library empty (not '{library}')"));
    }
    let invalid = || format!("function signature '{rest}' has an invalid format");
    let (function, rest) = rest.split_once('(').ok_or_else(invalid)?;
    let (signature, rest) = rest.split_once(')').ok_or_else(invalid)?;
    let function = function.trim();
    if function.is_empty() {
        return Err(invalid());
    }
    let fields: Vec<&str> = match rest {
        "" => Vec::new(),
        r => r.strip_prefix(':').ok_or(format!("expected ':' after the signature, not '{r}'"))?.split(':').collect(),
    };
    let (expr, shown, ty) = match fields[..] {
        [] if ret => (Expr::Retval, None, CType { bits: 32, signed: true }),
        [] if kind == Kind::Hist => return Err("histograms must have expr".into()),
        [] => (Expr::One, None, U64),
        ["", _] => return Err("no expr types specified".into()),
        [_] | [_, ""] => return Err("no exprs specified".into()),
        [types, exprs] => {
            let (types, exprs): (Vec<&str>, Vec<&str>) = (types.split(',').collect(), exprs.split(',').collect());
            if types.len() != exprs.len() {
                return Err("mismatched # of exprs and types".into());
            }
            if exprs.len() > 1 {
                return Err(if kind == Kind::Hist { "histograms can only have 1 expr".into() } else { "one expr per specifier here".into() });
            }
            let ty = CType::parse(types[0]).ok_or(format!("type '{}' is not supported here (integer types only)", types[0].trim()))?;
            let expr = match (ret, exprs[0].trim()) {
                (true, "$retval") => Expr::Retval,
                (false, "$retval") => return Err("$retval is for r probes".into()),
                (true, e) => return Err(format!("'{e}': a return probe's expr here is $retval (no $entry, $latency or C expressions)")),
                (false, e) => {
                    // bcc's _parse_signature: the name follows the last '*' or space.
                    let params = signature.split(',').map(str::trim).map(|p| p.split_at(p.rfind('*').or_else(|| p.rfind(' ')).map_or(0, |i| i + 1)));
                    let (n, (param_type, _)) = params
                        .enumerate()
                        .find(|(_, (_, name))| name.trim() == e)
                        .ok_or(format!("'{e}' is not a parameter of ({signature}) (C expressions are not supported here)"))?;
                    // A pointer, or a type not known here, keeps the register's 64 bits.
                    Expr::Arg(n, CType::parse(param_type))
                }
            };
            (expr, Some(exprs[0].to_string()), ty)
        }
        [_, _, _] => return Err("filters are not supported here".into()),
        _ => return Err("extraneous ':'-separated parts detected".into()),
    };
    Ok(Spec { raw: raw.to_string(), label, kind, ret, function: function.to_string(), expr, shown, ty })
}

/// What a specifier's handler counts into.
struct Counts {
    freq: Freq,
    hist: Log2Hist,
}

/// Attaches a specifier's probe.
fn attach(spec: &Spec, counts: Arc<Counts>) -> Result<MultiProbeHandle, probekit::Error> {
    let (kind, expr, ty) = (spec.kind, spec.expr, spec.ty);
    let count = move |v: u64| match kind {
        Kind::Count => counts.freq.add(ty.convert(v)),
        Kind::Hist => counts.hist.record(ty.convert(v)),
    };
    let probe = MultiProbe::builder().pattern(&spec.function);
    if spec.ret {
        probe.entry(|_, _, _| true).exit(move |regs, _, _| count(regs.return_value())).register()
    } else {
        probe
            .entry(move |regs, _, _| {
                count(match expr {
                    Expr::Arg(n, param_type) => param_type.unwrap_or(U64).convert(regs.arg(n).unwrap_or(0)),
                    _ => 1,
                });
                false
            })
            .register()
    }
}

fn display(spec: &Spec, counts: &Counts) {
    match spec.kind {
        Kind::Count => {
            println!("{}", spec.label.as_deref().unwrap_or(&spec.raw));
            println!("\t{:<10} EVENT", "COUNT");
            for (value, count) in counts.freq.sorted() {
                let value = spec.ty.show(value);
                let event = match (&spec.shown, spec.ret) {
                    (Some(expr), _) => format!("{expr} = {value}"),
                    (None, false) => "total calls".to_string(),
                    (None, true) => format!("retval = {value}"),
                };
                println!("\t{count:<10} {event}");
            }
        }
        Kind::Hist => bcc::print_log2_hist(&counts.hist.counts(), spec.label.as_deref().or(spec.shown.as_deref()).unwrap_or("retval")),
    }
}

/// The sizes the workload asks for: `(size, how many times)`; the alignment is always 8.
const MIX: [(u64, u64); 5] = [(16, 40), (24, 7), (32, 25), (100, 10), (4096, 3)];
const ALIGN: u64 = 8;

const USAGE: &str = "usage: argdist [-C SPECIFIER] [-H SPECIFIER] ...
  SPECIFIER: {p,r}::function(signature)[:type:expr][#label]
  e.g.  argdist -C 'p::argdist::heap::alloc(u64 size):u64:size' -H 'r::argdist::heap::alloc():u64:$retval'";

/// Prints `message` to stderr and exits with `status`.
fn main() {
    let mut given = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let (kind, attached) = match flag.as_str() {
            "-h" | "--help" => bcc::fail(0, USAGE),
            f if f.starts_with("-C") => (Kind::Count, &f[2..]),
            f if f.starts_with("-H") => (Kind::Hist, &f[2..]),
            f => bcc::fail(2, &format!("argdist: unexpected argument {f:?}\n{USAGE}")),
        };
        let raw = if attached.is_empty() {
            it.next().unwrap_or_else(|| bcc::fail(2, &format!("argdist: {flag} needs a specifier\n{USAGE}")))
        } else {
            attached.to_string()
        };
        given.push((kind, raw));
    }
    if given.is_empty() {
        given.push((Kind::Count, "p::argdist::heap::alloc(u64 size, u64 align):u64:size".to_string()));
        given.push((Kind::Hist, "r::argdist::heap::alloc(u64 size, u64 align):u64:$retval".to_string()));
    }
    given.sort_by_key(|(kind, _)| *kind == Kind::Hist); // bcc's order: the counts, then the histograms
    let specs: Vec<Spec> =
        given.iter().map(|(kind, raw)| parse(*kind, raw).unwrap_or_else(|e| bcc::fail(2, &format!("error parsing probe '{raw}': {e}")))).collect();
    let attached: Vec<(Arc<Counts>, MultiProbeHandle)> = specs
        .iter()
        .map(|s| {
            let counts = Arc::new(Counts { freq: Freq::new(1024), hist: Log2Hist::new() });
            let probe = attach(s, counts.clone()).unwrap_or_else(|e| bcc::fail(1, &format!("error attaching probe '{}': {e}", s.raw)));
            (counts, probe)
        })
        .collect();

    let alloc = black_box(heap::alloc as extern "C" fn(u64, u64) -> u64);
    std::thread::scope(|s| {
        for (size, times) in MIX {
            s.spawn(move || (0..times).for_each(|_| assert_eq!(alloc(size, ALIGN), size.div_ceil(8) * 8)));
        }
    });

    // bcc prints every interval; here once, after the workload.
    println!("[{}]", bcc::hms());
    for (spec, (counts, _)) in specs.iter().zip(&attached) {
        display(spec, counts);
    }

    // Running the example is a test: the counts of every specifier on the allocator are
    // the mix the workload asked for, converted as the specifier says.
    for (spec, (counts, probe)) in specs.iter().zip(&attached) {
        let (missed, dropped) = (probe.nmissed(), counts.freq.dropped.load(Relaxed));
        let raw_value = |size: u64| match spec.expr {
            Expr::Arg(0, t) => Some(t.unwrap_or(U64).convert(size)),
            Expr::Arg(1, t) => Some(t.unwrap_or(U64).convert(ALIGN)),
            Expr::Arg(..) => None, // past the allocator's two arguments: nothing known
            Expr::Retval => Some(size.div_ceil(8) * 8),
            Expr::One => Some(1),
        };
        if !spec.function.starts_with("argdist::heap::") || raw_value(1).is_none() {
            if missed + dropped > 0 {
                eprintln!("{}: {missed} calls missed, {dropped} values found the table full", spec.raw);
            }
            continue; // a specifier of the user's: nothing known to check against
        }
        assert_eq!((missed, dropped), (0, 0), "{}", spec.raw);
        let want: Vec<(u64, u64)> = MIX.iter().filter_map(|&(size, n)| Some((spec.ty.convert(raw_value(size)?), n))).collect();
        match spec.kind {
            Kind::Count => {
                let mut merged: Vec<(u64, u64)> = Vec::new();
                for (value, n) in want {
                    match merged.iter_mut().find(|(v, _)| *v == value) {
                        Some((_, count)) => *count += n,
                        None => merged.push((value, n)),
                    }
                }
                merged.sort_by_key(|&(v, n)| (n, v));
                assert_eq!(counts.freq.sorted(), merged, "{}", spec.raw);
            }
            Kind::Hist => {
                let mut slots = vec![0u64; 65];
                want.iter().for_each(|&(value, n)| slots[bcc::log2_slot(value)] += n);
                assert_eq!(counts.hist.counts(), slots, "{}", spec.raw);
            }
        }
    }
}
