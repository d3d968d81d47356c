//! bcc's `trace` in a process: one line per call of a function (or return, `r::`),
//! with a filter on its arguments and a printf-style message, in bcc's columns
//! (`PID TID COMM FUNC -`).
//!
//! A probe is bcc's `[{p,r}::]function[(filter)] ["format"[, arguments]]`, where the
//! function is a Rust path or glob of this program, the filter one comparison
//! (`arg1 > 1000`, `retval == 0`; `argN` are the integer arguments, `retval` the
//! return value) and the format takes `%d %u %x %lx %llx %ld %lu %lld %llu` with
//! `argN` or `retval` for each. A [`MultiProbe`] evaluates the filter in its handler
//! and pushes the values (and the thread's id and name) into a lock-free
//! [`EventBuffer`]; `main` drains and prints it while the workload runs. The workload
//! knows which calls pass the default filters; the example checks the lines it
//! printed, so running it is a test.
//!
//! ```text
//! cargo run --example trace       # the two probes below
//! cargo run --example trace -- 'trace::files::write(arg1 > 1000) "fd=%d count=%d", arg0, arg1'
//! cargo run --example trace -- 'r::trace::files::open "fd=%d", retval'
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

/// A value a filter or message reads.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Arg(usize),
    Retval,
}

impl Value {
    fn parse(s: &str) -> Result<Value, String> {
        match s.trim() {
            "retval" => Ok(Value::Retval),
            a => a.strip_prefix("arg").and_then(|n| n.parse().ok()).map(Value::Arg).ok_or(format!("{a:?} must be argN or retval")),
        }
    }

    fn read(self, regs: &PtRegs) -> u64 {
        match self {
            Value::Arg(n) => regs.arg(n).unwrap_or(0),
            Value::Retval => regs.return_value(),
        }
    }
}

/// A parsed probe.
struct Spec {
    ret: bool,
    function: String,
    filter: Option<(Value, &'static str, u64)>,
    format: String,
    values: Vec<Value>,
}

const OPS: [&str; 6] = ["==", "!=", "<=", ">=", "<", ">"];

fn parse(spec: &str) -> Result<Spec, String> {
    let (head, message) = match spec.find('"') {
        Some(q) => (&spec[..q], Some(&spec[q..])),
        None => (spec, None),
    };
    let head = head.trim();
    let (ret, head) = match head.strip_prefix("r::") {
        Some(h) => (true, h),
        None => (false, head.strip_prefix("p::").unwrap_or(head)),
    };
    let (function, filter) = match head.split_once('(') {
        Some((f, rest)) => {
            let cond = rest.trim_end().strip_suffix(')').ok_or("the filter must end with ')'")?;
            let op = *OPS.iter().find(|op| cond.contains(*op)).ok_or(format!("the filter {cond:?} needs one of {OPS:?}"))?;
            let (l, r) = cond.split_once(op).unwrap_or_default();
            let r = r.trim();
            let n = r.strip_prefix("0x").map_or_else(|| r.parse(), |h| u64::from_str_radix(h, 16)).map_err(|_| format!("{r:?} must be a number"))?;
            (f.trim(), Some((Value::parse(l)?, op, n)))
        }
        None => (head, None),
    };
    let (format, values) = match message {
        None => (String::new(), Vec::new()),
        Some(m) => {
            let end = m[1..].find('"').ok_or("the format must end with '\"'")? + 1;
            let values = m[end + 1..].split(',').map(str::trim).filter(|v| !v.is_empty()).map(Value::parse).collect::<Result<_, _>>()?;
            (m[1..end].to_string(), values)
        }
    };
    if values.len() > MAX_VALUES {
        return Err(format!("at most {MAX_VALUES} values"));
    }
    Ok(Spec { ret, function: function.to_string(), filter, format, values })
}

fn passes(filter: Option<(Value, &str, u64)>, regs: &PtRegs) -> bool {
    let Some((v, op, n)) = filter else { return true };
    let v = v.read(regs);
    match op {
        "==" => v == n,
        "!=" => v != n,
        "<=" => v <= n,
        ">=" => v >= n,
        "<" => v < n,
        _ => v > n,
    }
}

/// printf of integers: `%d %u %x` with `l`/`ll` lengths, and `%%`.
fn format(fmt: &str, values: &[u64]) -> String {
    let mut out = String::new();
    let mut values = values.iter();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        while chars.peek() == Some(&'l') {
            chars.next();
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('d') => out += &(values.next().copied().unwrap_or(0) as i64).to_string(),
            Some('u') => out += &values.next().copied().unwrap_or(0).to_string(),
            Some('x') => out += &format!("{:x}", values.next().copied().unwrap_or(0)),
            Some(o) => out += &format!("%{o}"),
            None => out.push('%'),
        }
    }
    out
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
        if !passes(filter, regs) {
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

fn main() {
    let given: Vec<String> = std::env::args().skip(1).collect();
    let defaults = [r#"trace::files::write(arg1 > 1000) "fd=%d count=%d", arg0, arg1"#, r#"r::trace::files::open "fd=%d", retval"#];
    let raw: Vec<String> = if given.is_empty() { defaults.iter().map(|s| s.to_string()).collect() } else { given.clone() };
    let specs: Vec<Spec> = raw.iter().map(|s| parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))).collect();
    let probes: Vec<MultiProbeHandle> = specs.iter().enumerate().map(|(i, s)| attach(i, s).unwrap_or_else(|e| panic!("{}: {e}", raw[i]))).collect();
    let names: Vec<Vec<String>> = probes.iter().map(|p| p.functions().map(|f| f.name.rsplit("::").next().unwrap_or(&f.name).to_string()).collect()).collect();

    println!("{:<7} {:<7} {:<15} {:<16} {}", "PID", "TID", "COMM", "FUNC", if specs.iter().any(|s| !s.format.is_empty()) { "-" } else { "" });
    let mut lines = Vec::new();
    let mut print = || {
        for e in EVENTS.drain() {
            let spec = &specs[e.probe as usize];
            let comm = String::from_utf8_lossy(e.comm.split(|b| *b == 0).next().unwrap_or(&[])).into_owned();
            let func = names[e.probe as usize].get(e.function as usize).map_or("?", String::as_str);
            let msg = format(&spec.format, &e.values[..spec.values.len()]);
            println!("{:<7} {:<7} {:<15} {:<16} {msg}", std::process::id(), e.tid, comm, func);
            lines.push((e.probe, msg));
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

    // Running the example is a test (for the default probes): one line per write of
    // more than 1000 bytes and per open, with the values the workload passed.
    assert_eq!(EVENTS.dropped(), 0);
    if given.is_empty() {
        let mut writes: Vec<String> = lines.iter().filter(|l| l.0 == 0).map(|l| l.1.clone()).collect();
        let mut want: Vec<String> =
            (0..2u64).flat_map(|t| (0..12u64).filter(|i| i % 3 == 0).map(move |i| format!("fd={} count={}", 3 + (i + t) % 5, 2000 + i))).collect();
        writes.sort();
        want.sort();
        assert_eq!(writes, want);
        let mut opens: Vec<String> = lines.iter().filter(|l| l.0 == 1).map(|l| l.1.clone()).collect();
        let mut want: Vec<String> = (0..2u64).flat_map(|t| (0..12u64).map(move |i| format!("fd={}", 3 + (i + t) % 5))).collect();
        opens.sort();
        want.sort();
        assert_eq!(opens, want);
    }
    drop(probes);
}
