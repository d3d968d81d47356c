//! bcc's `stackcount` in a process: counts the calls of the chosen functions by the
//! stack they were called from, and prints each stack (innermost first), the thread
//! that made it and its count, as bcc does (`-f`: folded, one line per stack).
//!
//! The stacks are the function-graph tracer's ([`probekit::trace::Tracer`]), not a
//! backtrace: the *traced* functions active on the thread at the call, innermost
//! first. So the tracer traces the counted functions and the context functions
//! (`-c GLOB`, by default every function of the workload), and a stack shows the
//! context functions among the callers, leaving out the untraced frames in between
//! (closures, std). The workload, a config loader whose `read` is reached along three
//! paths, knows how often it took each; the example checks the counts, so running it
//! is a test.
//!
//! ```text
//! cargo run --example stackcount                     # 'stackcount::fs::read', context stackcount::*
//! cargo run --example stackcount -- -f 'stackcount::fs::*'
//! ```

#[path = "common/bcc.rs"]
mod bcc;

use probekit::trace::Tracer;
use std::collections::BTreeMap;
use std::hint::black_box;

/// The workload: reads reached three ways.
mod fs {
    use std::hint::black_box;
    #[inline(never)]
    pub fn read(fd: u64) -> u64 {
        black_box(fd * 7)
    }
    #[inline(never)]
    pub fn open_and_read(path: &str) -> u64 {
        read(black_box(path.len() as u64))
    }
}
mod app {
    use super::fs;
    use std::hint::black_box;
    #[inline(never)]
    pub fn load_config() -> u64 {
        fs::open_and_read("/etc/app.toml") + fs::read(black_box(3))
    }
    #[inline(never)]
    pub fn load_data(n: u64) -> u64 {
        (0..n).map(|i| fs::open_and_read(if i % 2 == 0 { "a" } else { "bb" })).sum()
    }
}

fn main() -> Result<(), probekit::Error> {
    let mut folded = false;
    let mut context = "stackcount::*".to_string();
    let mut pattern = "stackcount::fs::read".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-f" => folded = true,
            "-c" => context = it.next().expect("a glob after -c"),
            p => pattern = p.to_string(),
        }
    }
    let counted = |name: &str| glob_match(&pattern, name);
    let tracer = Tracer::builder().pattern(&pattern).pattern(&context).exclude("*{{closure}}*").exclude("stackcount::main").register()?;
    let matched = tracer.functions().iter().filter(|f| counted(&f.name)).count();
    if !folded {
        println!("Tracing {matched} functions for \"{pattern}\"... Hit Ctrl-C to end.");
    }

    tracer.start();
    const DATA_CALLS: u64 = 3;
    const DATA_N: u64 = 5;
    std::thread::Builder::new()
        .name("loader".into())
        .spawn(|| {
            black_box(app::load_config());
            for _ in 0..DATA_CALLS {
                black_box(app::load_data(black_box(DATA_N)));
            }
        })
        .unwrap()
        .join()
        .unwrap();
    tracer.stop();
    let snap = tracer.snapshot();

    // Count each counted call by (thread, stack), the stack innermost first.
    let mut counts: BTreeMap<(String, Vec<String>), u64> = BTreeMap::new();
    for t in &snap.threads {
        t.walk(|i, stack| {
            let name = snap.name(&t.calls[i]);
            if counted(name) {
                let frames = stack.iter().rev().map(|s| s.map_or("[not recorded]".to_string(), |k| snap.name(&t.calls[k]).to_string())).collect();
                *counts.entry((t.name.clone(), frames)).or_default() += 1;
            }
        });
    }
    let mut rows: Vec<_> = counts.into_iter().collect();
    rows.sort_by_key(|(_, n)| *n);
    if !folded {
        println!();
    }
    for ((comm, frames), n) in &rows {
        if folded {
            let outer_first: Vec<&str> = frames.iter().rev().map(String::as_str).collect();
            println!("{comm};{} {n}", outer_first.join(";"));
        } else {
            for f in frames {
                println!("  {f}");
            }
            println!("    {comm} [{}]", std::process::id());
            println!("    {n}\n");
        }
    }
    if !folded {
        println!("Detaching...");
    }

    // Running the example is a test (for the default choice): the three paths to `read`.
    if pattern == "stackcount::fs::read" && context == "stackcount::*" {
        let path = |s: &str| s.split(';').map(|f| format!("stackcount::{f}")).rev().collect::<Vec<_>>();
        let count = |s: &str| rows.iter().find(|((c, f), _)| c == "loader" && *f == path(s)).map(|r| r.1);
        assert_eq!(count("app::load_config;fs::open_and_read;fs::read"), Some(1));
        assert_eq!(count("app::load_config;fs::read"), Some(1));
        assert_eq!(count("app::load_data;fs::open_and_read;fs::read"), Some(DATA_CALLS * DATA_N));
        assert_eq!(rows.len(), 3);
    }
    tracer.unregister()
}

/// Glob matching as the tracer's patterns (`*`, `?`), for choosing the counted functions.
fn glob_match(pattern: &str, name: &str) -> bool {
    fn m(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|k| m(rest, &s[k..])),
            Some((b'?', rest)) => !s.is_empty() && m(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && m(rest, &s[1..]),
        }
    }
    m(pattern.as_bytes(), name.as_bytes())
}
