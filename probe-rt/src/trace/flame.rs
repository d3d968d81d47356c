//! Folded stacks (`a;b;c count`, Brendan Gregg's format) and SVG flame graphs
//! through `inferno`.

use super::snapshot::Snapshot;
use std::collections::BTreeMap;
use std::io::{self, Write};

/// What a flame graph's widths measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Weight {
    /// Calls: each call counts 1 for its stack, so a frame's width is its calls and
    /// its callees' calls.
    Calls,
    /// Time: each call counts its self time in ns (its duration less its recorded
    /// callees'), so a frame's width is the time spent in it.
    #[default]
    Time,
}

/// A missing caller in a stack: its record was lost, or it is still running.
const MISSING: &str = "[not recorded]";

impl Snapshot {
    /// The folded stacks, `root;…;function count` each, sorted; the names are
    /// the traced functions' (`;` in them written as `,`), and a caller whose record
    /// is missing is `[not recorded]`. With [`Weight::Calls`] the counts add up to
    /// [`Snapshot::calls`].
    pub fn folded(&self, weight: Weight) -> Vec<String> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let names: Vec<String> = self.functions.iter().map(|f| f.name.replace(';', ",")).collect();
        for t in &self.threads {
            // Self time: duration less the callees' durations. A call whose caller's
            // record is missing is a callee of its nearest recorded caller, whose width
            // holds it (under `[not recorded]`) and must not count its time twice.
            let mut own: Vec<u64> = t.calls.iter().map(|c| c.duration_ns()).collect();
            let mut stacks = Vec::with_capacity(t.calls.len());
            t.walk(|i, stack| {
                let c = &t.calls[i];
                let callers = &stack[..stack.len().saturating_sub(1)];
                if let Some(caller) = callers.iter().rev().find_map(|s| *s) {
                    own[caller] = own[caller].saturating_sub(c.duration_ns());
                }
                let path: Vec<&str> =
                    stack.iter().map(|s| s.map_or(MISSING, |k| names.get(t.calls[k].function as usize).map_or("[unknown]", |n| n.as_str()))).collect();
                stacks.push(path.join(";"));
            });
            for (i, path) in stacks.into_iter().enumerate() {
                let n = match weight {
                    Weight::Calls => 1,
                    Weight::Time => own[i],
                };
                *counts.entry(path).or_default() += n;
            }
        }
        counts.into_iter().filter(|(_, n)| *n > 0).map(|(p, n)| format!("{p} {n}")).collect()
    }

    /// Writes [`Self::folded`], one stack a line.
    pub fn write_folded<W: Write>(&self, w: W, weight: Weight) -> io::Result<()> {
        let mut w = io::BufWriter::new(w);
        for line in self.folded(weight) {
            writeln!(w, "{line}")?;
        }
        w.flush()
    }

    /// Writes an SVG flame graph of [`Self::folded`] (drawn by `inferno`), titled `title`.
    pub fn write_flamegraph<W: Write>(&self, w: W, weight: Weight, title: &str) -> io::Result<()> {
        let lines = self.folded(weight);
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_string();
        opts.count_name = match weight {
            Weight::Calls => "calls",
            Weight::Time => "ns",
        }
        .to_string();
        inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), io::BufWriter::new(w))
    }
}

#[cfg(test)]
mod tests {
    use super::super::ring::{Raw, HAS_RET, MAX_ARGS};
    use super::super::snapshot::{Function, ThreadTrace};
    use super::*;
    use std::sync::Arc;

    fn raw(func: u32, depth: u32, enter: u64, exit: u64) -> Raw {
        Raw { func, depth, flags: HAS_RET, enter, exit, args: [0; MAX_ARGS], ret: 0 }
    }

    /// `a` (0..100 ns) called `b`, whose record is missing (lost), which called `c`
    /// (10..40 ns): `c`'s time is inside `a`'s and counts once.
    #[test]
    fn a_call_under_a_missing_caller_counts_its_time_once() {
        let functions: Arc<[Function]> = ["a", "b", "c"].map(|n| Function { name: n.into(), addr: 1 }).into();
        let thread = ThreadTrace::new((0, 0), 1, "t".into(), vec![raw(2, 2, 10, 40), raw(0, 0, 0, 100)], 0, false);
        let snap = Snapshot::new(functions, vec![thread], 0, 0, 0, 2, 0);
        assert_eq!(snap.folded(Weight::Time), ["a 70", "a;[not recorded];c 30"]);
        assert_eq!(snap.folded(Weight::Calls), ["a 1", "a;[not recorded];c 1"]);
    }
}
