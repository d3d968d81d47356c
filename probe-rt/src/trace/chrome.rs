//! The Chrome trace event format: JSON that Perfetto's UI (ui.perfetto.dev) and
//! `chrome://tracing` open.
//!
//! Written with `serde_json`, streaming: events are serialized one by one from the
//! snapshot, never built as a JSON tree. Timestamps are microseconds (the format's
//! unit) relative to the tracer's first start, with the nanoseconds as decimals:
//! exact as doubles for traces shorter than about three months, and read back
//! exactly by Perfetto, which rounds `ts * 1000` to the nearest nanosecond.
//! Values (arguments, return values) are hex strings, since a JSON number loses
//! integers past 2^53.

use super::snapshot::{Call, Snapshot, ThreadTrace};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use std::cell::Cell;
use std::io::{self, Write};

/// How calls are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EventStyle {
    /// One complete event (`"ph": "X"`, `ts` and `dur`) per call: the smaller file.
    #[default]
    Complete,
    /// A begin (`"B"`) and an end (`"E"`) event per call, in order on each thread,
    /// every end matching the latest unmatched begin: the form that needs no
    /// arithmetic from the reader to nest.
    BeginEnd,
}

/// One event of the trace.
enum Event<'a> {
    /// `process_name` metadata.
    Process { pid: u32, name: &'a str },
    /// `thread_name` metadata.
    ThreadName { pid: u32, tid: i32, name: &'a str },
    /// `thread_sort_index` metadata: threads listed in the order they first traced.
    ThreadSort { pid: u32, tid: i32, index: usize },
    /// A call: complete (`X`), its begin (`B`) or its end (`E`).
    Call { snap: &'a Snapshot, pid: u32, tid: i32, call: &'a Call, ph: &'static str },
}

/// Microseconds since `t0`, with nanosecond decimals.
fn micros(ns: u64, t0: u64) -> f64 {
    ns.saturating_sub(t0) as f64 / 1000.0
}

/// `{"name": name}`, the args of naming metadata.
struct Named<'a>(&'a str);

impl Serialize for Named<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("name", self.0)?;
        m.end()
    }
}

/// `{"sort_index": n}`.
struct SortIndex(usize);

impl Serialize for SortIndex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("sort_index", &self.0)?;
        m.end()
    }
}

/// A call's args: `arg0`… at its begin, `ret` and `unwound` at its end.
struct CallArgs<'a> {
    call: &'a Call,
    begin: bool,
    end: bool,
}

impl CallArgs<'_> {
    fn is_empty(&self) -> bool {
        !(self.begin && !self.call.args().is_empty() || self.end && (self.call.ret.is_some() || self.call.unwound))
    }
}

impl Serialize for CallArgs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const ARG: [&str; 8] = ["arg0", "arg1", "arg2", "arg3", "arg4", "arg5", "arg6", "arg7"];
        let mut m = s.serialize_map(None)?;
        if self.begin {
            for (name, v) in ARG.iter().zip(self.call.args()) {
                m.serialize_entry(name, &format_args!("{v:#x}"))?;
            }
        }
        if self.end {
            if let Some(r) = self.call.ret {
                m.serialize_entry("ret", &format_args!("{r:#x}"))?;
            }
            if self.call.unwound {
                m.serialize_entry("unwound", &true)?;
            }
        }
        m.end()
    }
}

impl Serialize for Event<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match *self {
            Event::Process { pid, name } => {
                m.serialize_entry("name", "process_name")?;
                m.serialize_entry("ph", "M")?;
                m.serialize_entry("pid", &pid)?;
                m.serialize_entry("args", &Named(name))?;
            }
            Event::ThreadName { pid, tid, name } => {
                m.serialize_entry("name", "thread_name")?;
                m.serialize_entry("ph", "M")?;
                m.serialize_entry("pid", &pid)?;
                m.serialize_entry("tid", &tid)?;
                m.serialize_entry("args", &Named(name))?;
            }
            Event::ThreadSort { pid, tid, index } => {
                m.serialize_entry("name", "thread_sort_index")?;
                m.serialize_entry("ph", "M")?;
                m.serialize_entry("pid", &pid)?;
                m.serialize_entry("tid", &tid)?;
                m.serialize_entry("args", &SortIndex(index))?;
            }
            Event::Call { snap, pid, tid, call, ph } => {
                m.serialize_entry("name", snap.name(call))?;
                m.serialize_entry("cat", "function")?;
                m.serialize_entry("ph", ph)?;
                m.serialize_entry("pid", &pid)?;
                m.serialize_entry("tid", &tid)?;
                let at = if ph == "E" { call.exit_ns } else { call.enter_ns };
                m.serialize_entry("ts", &micros(at, snap.t0_ns))?;
                if ph == "X" {
                    // From integer nanoseconds, so that ts + dur is the exit exactly.
                    m.serialize_entry("dur", &(call.duration_ns() as f64 / 1000.0))?;
                }
                // Arguments on the begin, the return on the end (Chrome merges them).
                let args = CallArgs { call, begin: ph != "E", end: ph != "B" };
                if !args.is_empty() {
                    m.serialize_entry("args", &args)?;
                }
            }
        }
        m.end()
    }
}

/// One thread's call events in order: for `BeginEnd`, each call's end comes before
/// the begin of the first later call it does not contain (see `Call::may_contain`).
fn thread_events<'a>(snap: &'a Snapshot, pid: u32, t: &'a ThreadTrace, style: EventStyle) -> impl Iterator<Item = Event<'a>> + 'a {
    let tid = t.tid;
    let call = move |call: &'a Call, ph| Event::Call { snap, pid, tid, call, ph };
    let mut open: Vec<&'a Call> = Vec::new();
    let mut calls = t.calls.iter();
    let mut pending: Option<&'a Call> = None;
    std::iter::from_fn(move || {
        if style == EventStyle::Complete {
            return calls.next().map(|c| call(c, "X"));
        }
        let next = pending.take().or_else(|| calls.next());
        match next {
            // Close what the next call is not inside of, then open it.
            Some(c) => match open.last() {
                Some(o) if !o.may_contain(c) => {
                    pending = Some(c);
                    open.pop().map(|o| call(o, "E"))
                }
                _ => {
                    open.push(c);
                    Some(call(c, "B"))
                }
            },
            None => open.pop().map(|o| call(o, "E")),
        }
    })
}

/// Serializes an iterator as a JSON array, streaming (taken on first use).
struct Seq<I>(Cell<Option<I>>);

impl<'a, I: Iterator<Item = Event<'a>>> Serialize for Seq<I> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.take().into_iter().flatten())
    }
}

/// `{"otherData": {...}}`: what the trace does not hold, for whoever reads the file.
struct OtherData<'a>(&'a Snapshot);

impl Serialize for OtherData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let snap = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("tracer", "probekit function-graph tracer")?;
        m.serialize_entry("calls", &snap.calls())?;
        m.serialize_entry("lost", &snap.lost())?;
        m.serialize_entry("missed", &snap.missed)?;
        m.serialize_entry("no_ring", &snap.no_ring)?;
        m.end()
    }
}

impl Snapshot {
    /// Writes the snapshot in the Chrome trace event format (JSON object form):
    /// process and thread names, then every call of every thread, nested. Open the
    /// file in <https://ui.perfetto.dev> (Open trace file) or `chrome://tracing`.
    pub fn write_chrome_json<W: Write>(&self, w: W, style: EventStyle) -> io::Result<()> {
        let pid = std::process::id();
        let process = std::env::current_exe().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
        let meta = std::iter::once(Event::Process { pid, name: &process }).chain(
            self.threads
                .iter()
                .enumerate()
                .flat_map(move |(index, t)| [Event::ThreadName { pid, tid: t.tid, name: &t.name }, Event::ThreadSort { pid, tid: t.tid, index }]),
        );
        let calls = self.threads.iter().flat_map(move |t| thread_events(self, pid, t, style));
        let mut w = io::BufWriter::new(w);
        let mut ser = serde_json::Serializer::new(&mut w);
        let mut top = ser.serialize_map(Some(2)).map_err(io::Error::from)?;
        top.serialize_entry("traceEvents", &Seq(Cell::new(Some(meta.chain(calls))))).map_err(io::Error::from)?;
        top.serialize_entry("otherData", &OtherData(self)).map_err(io::Error::from)?;
        SerializeMap::end(top).map_err(io::Error::from)?;
        w.flush()
    }
}
