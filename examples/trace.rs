//! bcc's `trace` in a process: one line per call of a function (or return, `r::`),
//! with a filter on its arguments and a printf-style message, in bcc's columns
//! (`PID TID COMM FUNC -`).
//!
//! A probe is bcc's `[{p,r}::]function [(filter)] ["format"[, arguments]]`, where the
//! function is a Rust path or glob of this program. As in bcc, `arg1` to `arg6` are the
//! integer arguments, `arg1` the first (`arg0` is an error), and `retval` the return
//! value, all unsigned 64-bit; a number may stand anywhere one of them does. The filter
//! is one comparison (`arg2 > 1000`, `retval == -1`: `== != < <= > >=`, a negative number
//! converted as C converts it) or one value, true when nonzero (`(retval)`, `(!arg1)`).
//! The format takes bcc's `%d %u %x` (C's `int` and `unsigned int`), `%hd %hu`, and
//! `%ld %lu %lx %lld %llu %llx` (64-bit), one argument each. bcc's function signatures
//! (`write(int fd, …)`), C expressions in filters and `%s %c %K %U` are not supported
//! here: a probe that uses them is an error (exit status 2), never a silent nothing. A
//! [`MultiProbe`] evaluates the filter in its handler and pushes the values (and the
//! thread's id and name) into a lock-free [`EventBuffer`]; `main` drains and prints it
//! while the workload runs. The workload knows which calls pass the default probes'
//! filters; the example checks the lines those probes printed (given on the command
//! line as well), so running it is a test.
//!
//! ```text
//! cargo run --example trace       # the two probes below
//! cargo run --example trace -- 'trace::files::write (arg2 > 1000) "fd=%d count=%d", arg1, arg2'
//! cargo run --example trace -- 'r::trace::files::open (retval) "fd=%d", retval'
//! ```

#[path = "common/bcc.rs"]
mod bcc;

use probekit::{EventBuffer, MultiProbe, MultiProbeHandle, PtRegs};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The workload: a few file operations.
mod files {
    use std::hint::black_box;
    /// Opens a file whose path is `len` bytes long; returns its descriptor.
    #[inline(never)]
    pub extern "C" fn open(len: u64) -> u64 {
        black_box(3 + len % 5)
    }
    /// Writes `count` bytes to `fd`; returns how many were written.
    #[inline(never)]
    pub extern "C" fn write(_fd: u64, count: u64) -> u64 {
        black_box(count.min(4096))
    }
}

/// A value a filter or message reads: bcc's `argN` (N from 1), `retval`, or a number.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Operand {
    /// The argument in register `n` (0-based: bcc's `arg{n + 1}`).
    Arg(usize),
    Retval,
    Const(u64),
}

impl Operand {
    fn parse(s: &str) -> Result<Operand, String> {
        let s = s.trim();
        if s == "retval" {
            return Ok(Operand::Retval);
        }
        if let Some(n) = s.strip_prefix("arg").filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            return match n.parse::<usize>() {
                Ok(0) => Err("arg0 is not an argument: bcc numbers them from 1 (arg1 is the first)".into()),
                Ok(k @ 1..=6) => Ok(Operand::Arg(k - 1)),
                _ => Err(format!("{s} is not an argument: bcc's are arg1 to arg6")),
            };
        }
        number(s).map(Operand::Const).ok_or_else(|| format!("{s:?} is not arg1..arg6, retval or a number"))
    }

    fn read(self, regs: &PtRegs) -> u64 {
        match self {
            Operand::Arg(n) => regs.arg(n).unwrap_or(0),
            Operand::Retval => regs.return_value(),
            Operand::Const(n) => n,
        }
    }
}

/// A decimal or `0x` hexadecimal number, negative ones as C converts them to unsigned
/// 64 bits (`-1` is `u64::MAX`).
fn number(s: &str) -> Option<u64> {
    let (negative, digits) = s.strip_prefix('-').map_or((false, s), |d| (true, d.trim_start()));
    let n = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None if digits.starts_with(|c: char| c.is_ascii_digit()) => digits.parse().ok()?,
        None => return None,
    };
    Some(if negative { n.wrapping_neg() } else { n })
}

/// A filter: bcc's C expression, here one comparison or one value.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Filter {
    /// `(value)`, true when nonzero (C's truth), or `(!value)`, true when zero.
    Truthy { value: Operand, negated: bool },
    /// `(left op right)`, compared as unsigned 64-bit integers (bcc's `argN` and
    /// `retval` are `unsigned long`, so C compares them so).
    Compare(Operand, &'static str, Operand),
}

/// The comparisons, two-character ones first (`<=` before `<`).
const OPS: [&str; 6] = ["==", "!=", "<=", ">=", "<", ">"];

impl Filter {
    fn parse(cond: &str) -> Result<Filter, String> {
        let hint = "a filter here is one comparison, `(arg2 > 1000)`, or one value, true when nonzero, `(retval)`";
        let found = cond.char_indices().find_map(|(i, _)| OPS.iter().find(|op| cond[i..].starts_with(**op)).map(|op| (i, *op)));
        let filter = match found {
            Some((i, op)) => Operand::parse(&cond[..i]).and_then(|l| Ok(Filter::Compare(l, op, Operand::parse(&cond[i + op.len()..])?))),
            None => {
                let cond = cond.trim();
                let (negated, value) = cond.strip_prefix('!').map_or((false, cond), |v| (true, v));
                Operand::parse(value).map(|value| Filter::Truthy { value, negated })
            }
        };
        filter.map_err(|e| match e.starts_with("arg") {
            true => format!("filter ({}): {e}", cond.trim()),
            false if found.is_none() && cond.contains('=') => format!("filter ({}): compare with `==` ({hint})", cond.trim()),
            false => format!("filter ({}): {e} ({hint})", cond.trim()),
        })
    }

    fn passes(self, regs: &PtRegs) -> bool {
        match self {
            Filter::Truthy { value, negated } => (value.read(regs) != 0) != negated,
            Filter::Compare(l, op, r) => {
                let (l, r) = (l.read(regs), r.read(regs));
                match op {
                    "==" => l == r,
                    "!=" => l != r,
                    "<=" => l <= r,
                    ">=" => l >= r,
                    "<" => l < r,
                    _ => l > r,
                }
            }
        }
    }
}

/// A piece of a format: text, or a conversion of one value to C's type for it.
#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Text(String),
    /// The value cut to `bits` (and sign-extended if `signed`), in decimal or hex.
    Int {
        bits: u32,
        signed: bool,
        hex: bool,
    },
}

/// bcc's printf conversions: `%d` is C's `int`, `%u` and `%x` `unsigned int`, `h` makes
/// them `short`, `l` and `ll` 64-bit; `%%` is `%`.
fn parse_format(fmt: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = fmt;
    while let Some(at) = rest.find('%') {
        text += &rest[..at];
        rest = &rest[at + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            text.push('%');
            rest = r;
            continue;
        }
        let length = ["ll", "l", "h"].into_iter().find(|l| rest.starts_with(*l)).unwrap_or("");
        let conv = rest[length.len()..].chars().next();
        let bits = match length {
            "ll" | "l" => 64,
            "h" => 16,
            _ => 32,
        };
        let piece = match conv {
            Some('d') => Piece::Int { bits, signed: true, hex: false },
            Some('u') => Piece::Int { bits, signed: false, hex: false },
            Some('x') if length != "h" => Piece::Int { bits, signed: false, hex: true },
            Some(c @ ('s' | 'c' | 'K' | 'U')) => return Err(format!("%{length}{c} is not supported here (integers only: %d %u %x, with h, l or ll)")),
            _ => {
                return Err(format!(
                    "unsupported conversion %{length}{} (integers only: %d %u %x, with h, l or ll)",
                    conv.map(String::from).unwrap_or_default()
                ))
            }
        };
        rest = &rest[length.len() + 1..];
        pieces.push(Piece::Text(std::mem::take(&mut text)));
        pieces.push(piece);
    }
    text += rest;
    pieces.push(Piece::Text(text));
    pieces.retain(|p| *p != Piece::Text(String::new()));
    Ok(pieces)
}

/// printf of the pieces, one value per conversion.
fn format(pieces: &[Piece], values: &[u64]) -> String {
    let mut out = String::new();
    let mut values = values.iter().copied();
    for piece in pieces {
        match *piece {
            Piece::Text(ref t) => out += t,
            Piece::Int { bits, signed, hex } => {
                let v = values.next().unwrap_or(0);
                let shift = 64 - bits;
                let (unsigned, signed_v) = ((v << shift) >> shift, ((v << shift) as i64) >> shift);
                out += &match (signed, hex) {
                    (true, _) => signed_v.to_string(),
                    (false, true) => format!("{unsigned:x}"),
                    (false, false) => unsigned.to_string(),
                };
            }
        }
    }
    out
}

/// A parsed probe.
#[derive(Debug, PartialEq)]
struct Spec {
    ret: bool,
    function: String,
    filter: Option<Filter>,
    format: Vec<Piece>,
    values: Vec<Operand>,
}

/// The index of the `)` that closes the `(` `s` starts with.
fn closing(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 1 => return Some(i),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// Parses `[{p,r}::]function [(filter)] ["format"[, values]]` as bcc's trace does: the
/// function ends at the first space, tab or `(`; a filter is in balanced parentheses.
fn parse(spec: &str) -> Result<Spec, String> {
    let spec = spec.trim();
    let (target, mut rest) = spec.split_at(spec.find([' ', '\t', '(']).unwrap_or(spec.len()));
    let (ret, function) = match target.strip_prefix("r::") {
        Some(f) => (true, f),
        None => (false, target.strip_prefix("p::").unwrap_or(target)),
    };
    if function.is_empty() {
        return Err("no function".into());
    }
    let mut filter = None;
    // bcc reads `function(...)` as a signature; here a group right after the name is
    // taken for the filter when no filter follows it (this example's older form).
    if rest.starts_with('(') {
        let end = closing(rest).ok_or("unmatched end of predicate")?;
        if rest[end + 1..].trim_start().starts_with('(') {
            return Err("function signatures (`function(int fd, …) (filter)`) are not supported here: use arg1, arg2, …".into());
        }
        filter = Some(Filter::parse(&rest[1..end])?);
        rest = &rest[end + 1..];
    }
    rest = rest.trim_start();
    if rest.starts_with('(') {
        let end = closing(rest).ok_or("unmatched end of predicate")?;
        filter = Some(Filter::parse(&rest[1..end])?);
        rest = rest[end + 1..].trim_start();
    }
    let (format, values) = match rest.strip_prefix('"') {
        None if rest.is_empty() => (Vec::new(), Vec::new()),
        None => return Err(format!("expected a (filter) or a \"format\" at {rest:?}")),
        Some(m) => {
            let end = m.find('"').ok_or("the format must end with '\"'")?;
            let values = match m[end + 1..].trim_start() {
                "" => Vec::new(),
                v => v
                    .strip_prefix(',')
                    .ok_or(format!("expected ',' after the format, at {v:?}"))?
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(Operand::parse)
                    .collect::<Result<Vec<_>, _>>()?,
            };
            (parse_format(&m[..end])?, values)
        }
    };
    let conversions = format.iter().filter(|p| matches!(p, Piece::Int { .. })).count();
    if conversions != values.len() {
        return Err(format!("the format has {conversions} conversions for {} values", values.len()));
    }
    if values.len() > MAX_VALUES {
        return Err(format!("at most {MAX_VALUES} values"));
    }
    Ok(Spec { ret, function: function.to_string(), filter, format, values })
}

const MAX_VALUES: usize = 6;

/// One line's worth, pushed by a handler.
#[derive(Clone, Copy)]
struct Event {
    probe: u32,
    function: u32,
    tid: i32,
    comm: [u8; 16],
    values: [u64; MAX_VALUES],
}

static EVENTS: EventBuffer<Event, 4096> = EventBuffer::new();

/// Attaches probe `index`.
fn attach(index: usize, spec: &Spec) -> Result<MultiProbeHandle, probekit::Error> {
    let (filter, values) = (spec.filter, spec.values.clone());
    let emit = move |regs: &PtRegs, function: u32| {
        if !filter.is_none_or(|f| f.passes(regs)) {
            return;
        }
        let mut e = Event { probe: index as u32, function, tid: bcc::gettid(), comm: [0; 16], values: [0; MAX_VALUES] };
        // SAFETY: PR_GET_NAME writes at most 16 bytes (with the NUL) into the buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, e.comm.as_mut_ptr() as libc::c_ulong, 0, 0, 0) };
        for (slot, v) in e.values.iter_mut().zip(&values) {
            *slot = v.read(regs);
        }
        EVENTS.push(e);
    };
    let probe = MultiProbe::builder().pattern(&spec.function).exclude("*{{closure}}*");
    if spec.ret {
        probe.entry(|_, _, _| true).exit(move |regs, f, _| emit(regs, f.id)).register()
    } else {
        probe
            .entry(move |regs, f, _| {
                emit(regs, f.id);
                false
            })
            .register()
    }
}

/// The default probes; the output of each, also when given on the command line, is checked.
const DEFAULTS: [&str; 2] = [r#"trace::files::write (arg2 > 1000) "fd=%d count=%d", arg1, arg2"#, r#"r::trace::files::open "fd=%d", retval"#];

const USAGE: &str = r#"usage: trace PROBE [PROBE ...]
  PROBE: [{p,r}::]function [(filter)] ["format"[, value, ...]]
  value: arg1..arg6 (arg1 is the first argument), retval, or a number
  e.g.   trace 'trace::files::write (arg2 > 1000) "fd=%d count=%d", arg1, arg2'"#;

/// Prints `message` to stderr and exits with `status`.
fn main() {
    let given: Vec<String> = std::env::args().skip(1).collect();
    if let Some(option) = given.iter().find(|a| a.starts_with('-')) {
        let help = option == "-h" || option == "--help";
        if !help {
            eprintln!("trace: unknown option {option:?}");
        }
        bcc::fail(if help { 0 } else { 2 }, USAGE);
    }
    if given.is_empty() {
        check_parser();
    }
    let raw: Vec<String> = if given.is_empty() { DEFAULTS.iter().map(|s| s.to_string()).collect() } else { given };
    let specs: Vec<Spec> = raw.iter().map(|s| parse(s).unwrap_or_else(|e| bcc::fail(2, &format!("error in probe '{s}': {e}")))).collect();
    let probes: Vec<MultiProbeHandle> =
        specs.iter().enumerate().map(|(i, s)| attach(i, s).unwrap_or_else(|e| bcc::fail(1, &format!("error in probe '{}': {e}", raw[i])))).collect();
    // bcc's FUNC column is the function as the probe names it; a glob here names
    // several, so each line names the one it matched. By id (a function refused at
    // arming leaves a gap in them).
    let names: Vec<std::collections::HashMap<u32, String>> = probes
        .iter()
        .zip(&specs)
        .map(|(p, s)| p.functions().map(|f| (f.id, if s.function.contains(['*', '?', '[']) { f.name.clone() } else { s.function.clone() })).collect())
        .collect();

    println!("{:<7} {:<7} {:<15} {:<16} {}", "PID", "TID", "COMM", "FUNC", if specs.iter().any(|s| !s.format.is_empty()) { "-" } else { "" });
    let mut lines = Vec::new();
    let mut print = || {
        for e in EVENTS.drain() {
            let spec = &specs[e.probe as usize];
            let comm = String::from_utf8_lossy(e.comm.split(|b| *b == 0).next().unwrap_or(&[])).into_owned();
            let func = names[e.probe as usize].get(&e.function).map_or("?", String::as_str);
            let msg = format(&spec.format, &e.values[..spec.values.len()]);
            println!("{:<7} {:<7} {:<15} {:<16} {msg}", std::process::id(), e.tid, comm, func);
            lines.push((e.probe as usize, msg));
        }
    };

    // The workload: two writers; writes of more than 1000 bytes are every third.
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let done = &done;
            std::thread::Builder::new()
                .name(format!("writer-{t}"))
                .spawn_scoped(s, move || {
                    let (open, write) = (black_box(files::open as extern "C" fn(u64) -> u64), black_box(files::write as extern "C" fn(u64, u64) -> u64));
                    for i in 0..12u64 {
                        let fd = open(i + t);
                        write(fd, if i % 3 == 0 { 2000 + i } else { 10 * i });
                    }
                    done.fetch_add(1, Relaxed);
                })
                .unwrap();
        }
        while done.load(Relaxed) < 2 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            print();
        }
    });
    print();

    // Running the example is a test, for each default probe (given or by default): one
    // line per write of more than 1000 bytes and per open, with the values the workload
    // passed.
    let dropped = EVENTS.dropped();
    if dropped > 0 {
        eprintln!("Possibly lost {dropped} samples");
    }
    let defaults: Vec<Spec> = DEFAULTS.iter().map(|d| parse(d).unwrap()).collect();
    for (index, spec) in specs.iter().enumerate() {
        let want: Vec<String> = if *spec == defaults[0] {
            (0..2u64).flat_map(|t| (0..12u64).filter(|i| i % 3 == 0).map(move |i| format!("fd={} count={}", 3 + (i + t) % 5, 2000 + i))).collect()
        } else if *spec == defaults[1] {
            (0..2u64).flat_map(|t| (0..12u64).map(move |i| format!("fd={}", 3 + (i + t) % 5))).collect()
        } else {
            continue; // a probe of the user's: nothing known to check against
        };
        assert_eq!(dropped, 0);
        let mut got: Vec<String> = lines.iter().filter(|l| l.0 == index).map(|l| l.1.clone()).collect();
        let mut want = want;
        got.sort();
        want.sort();
        assert_eq!(got, want, "{}", raw[index]);
    }
    drop(probes);
}

/// bcc's forms the default probes do not use, checked on made-up registers: a bare
/// value as the filter, arguments numbered from 1, C's conversions, and errors. (arg1
/// is left out: on aarch64 it is the return value's register.)
fn check_parser() {
    let mut regs = PtRegs::default();
    for (n, v) in [7, 0, u64::MAX].into_iter().enumerate() {
        regs.set_arg(n + 1, v); // arg2, arg3, arg4
    }
    let passes = |regs: &PtRegs, spec: &str| parse(spec).unwrap().filter.is_none_or(|f| f.passes(regs));
    regs.set_return_value(5);
    assert!(passes(&regs, "r::f (retval)") && !passes(&regs, "r::f (!retval)") && passes(&regs, "f (arg2)") && !passes(&regs, "f (arg3)"));
    assert!(passes(&regs, "f (arg2 == 7)") && passes(&regs, "f(arg2 > 6)") && passes(&regs, "f (arg4 == -1)") && passes(&regs, "f (arg4 > 0xffff)"));
    assert!(!passes(&regs, "f (arg3 != 0)") && passes(&regs, "f (7 <= arg2)") && !passes(&regs, "f (1 > retval)"));
    regs.set_return_value(0);
    assert!(!passes(&regs, "r::f (retval)") && passes(&regs, "r::f (!retval)") && passes(&regs, "r::f"));
    let spec = parse(r#"f "%d %u %x %ld %lx %hd %%", arg4, arg4, arg4, arg4, arg4, arg4"#).unwrap();
    let values: Vec<u64> = spec.values.iter().map(|v| v.read(&regs)).collect();
    assert_eq!(format(&spec.format, &values), "-1 4294967295 ffffffff -1 ffffffffffffffff -1 %");
    for (bad, why) in [
        ("f (arg0 > 1)", "arg1 is the first"),
        (r#"f "%d", arg0"#, "arg1 is the first"),
        ("f (arg7)", "arg1 to arg6"),
        ("f (arg1 && arg2)", "is not arg1..arg6"),
        ("f (arg1 > 1", "unmatched"),
        ("f(int fd) (fd > 1)", "signatures"),
        (r#"f "%d %d", arg1"#, "2 conversions for 1 values"),
        (r#"f "%s", arg1"#, "not supported"),
        ("", "no function"),
    ] {
        let err = parse(bad).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}
