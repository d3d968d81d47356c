//! The function-graph tracer on code no one here wrote: `miniz_oxide` (the DEFLATE
//! implementation std's backtraces and `flate2` use) compresses and decompresses a
//! generated corpus through its public API on two threads, while a
//! [`Tracer`] records every call of its functions. Writes `trace.json` (Chrome trace
//! event format: open it in <https://ui.perfetto.dev>, "Open trace file", or in
//! `chrome://tracing`), `flame.svg` (a flame graph by time: open it in a browser)
//! and `folded.txt` (the folded stacks), and prints progress and a summary.
//!
//! The functions are chosen by a glob over the symbols, `miniz_oxide::*`: only
//! functions the compiler kept as functions can be traced (inlined ones have no
//! symbol of their own; their time counts in their caller), and the example lists
//! what it attached to. The hottest helpers, called per byte (`*::update_hash`,
//! `*::put_fast`, …), are left out with exclude globs so that a traced run stays
//! within seconds at a breakpoint per call (and under qemu).
//!
//! ```text
//! cargo run --release --example trace_miniz [-- OUT_DIR]     # default target/trace_miniz
//! ```

use miniz_oxide::deflate::compress_to_vec;
use miniz_oxide::inflate::decompress_to_vec;
use probekit::trace::{EventStyle, Snapshot, Tracer, Weight};
use std::path::PathBuf;

/// Globs left out: accessors called per byte, bit or symbol, which would make the
/// trace hundreds of thousands of calls long without showing more structure (their
/// time counts in their callers). Found with `--example funccount -- 'miniz_oxide::*'`-style
/// counting: the first run's folded stacks, summed per function.
const EXCLUDE: [&str; 19] = [
    "*::update_hash",
    "*::read_unaligned_u*",
    "*::put_fast",
    "*::write_code",
    "*::fast_lookup",
    "*::lookup",
    "*::get_flag",
    "*::consume_flag",
    "*::plant_flag",
    "*::bytes_left",
    "*::write_byte",
    "*::read_byte",
    "*::prev_code_size",
    "*::zero_code_size",
    "*::reverse_bits",
    "*read_u16_le*",
    "*read_u32_le*",
    "*memset*",
    "*{{closure}}*",
];

/// A corpus that compresses like text: log lines with repeats and numbers.
fn corpus(seed: u64, lines: usize) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::new();
    let words = ["GET", "POST", "/index.html", "/api/v1/items", "200", "404", "user=alice", "user=bob", "ms=", "bytes="];
    for i in 0..lines {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let line = format!(
            "{i:06} {} {} {} {}{}\n",
            words[(s % 4) as usize],
            words[2 + (s >> 8) as usize % 2],
            words[4 + (s >> 16) as usize % 2],
            words[8 + (s >> 20) as usize % 2],
            s % 1000
        );
        out.extend_from_slice(line.as_bytes());
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/trace_miniz".to_string()));
    std::fs::create_dir_all(&out)?;

    let mut builder = Tracer::builder().pattern("miniz_oxide::*").args(2).retval().capacity(1 << 16).maxactive(64);
    for g in EXCLUDE {
        builder = builder.exclude(g);
    }
    let tracer = builder.register()?;
    let mut names: Vec<&str> = tracer.functions().iter().filter(|f| f.addr != 0).map(|f| f.name.as_str()).collect();
    names.sort();
    println!("tracing {} functions of miniz_oxide ({} could not be attached), for example:", names.len(), tracer.skipped().len());
    for n in names.iter().filter(|n| n.contains("compress") || n.contains("decompress")).take(6) {
        println!("  {n}");
    }

    // The workload: rounds of compress + decompress at three levels, on two threads.
    const ROUNDS: usize = 6;
    let mut all: Option<Snapshot> = None;
    let started = std::time::Instant::now();
    tracer.start();
    for round in 0..ROUNDS {
        std::thread::scope(|s| {
            for t in 0..2u64 {
                std::thread::Builder::new()
                    .name(format!("deflate-{t}"))
                    .spawn_scoped(s, move || {
                        let data = corpus(round as u64 * 2 + t + 1, 120);
                        let level = [1, 6, 9][(round + t as usize) % 3];
                        let packed = compress_to_vec(&data, level);
                        let unpacked = decompress_to_vec(&packed).expect("miniz_oxide round-trips");
                        assert_eq!(unpacked, data);
                    })
                    .unwrap();
            }
        });
        // A long trace is written out piece by piece: drain the rings each round.
        let piece = tracer.drain();
        let (calls, lost) = (piece.calls(), piece.lost());
        match &mut all {
            Some(a) => a.append(piece),
            None => all = Some(piece),
        }
        let a = all.as_ref().expect("set above");
        println!(
            "[{:>2}/{ROUNDS}] {:>8} calls (+{calls}), {} lost (+{lost}), {} threads, {:.1?}",
            round + 1,
            a.calls(),
            a.lost(),
            a.threads.len(),
            started.elapsed()
        );
    }
    tracer.stop();
    let snap = all.expect("at least one round");

    let json = out.join("trace.json");
    snap.write_chrome_json(std::fs::File::create(&json)?, EventStyle::Complete)?;
    let svg = out.join("flame.svg");
    snap.write_flamegraph(std::fs::File::create(&svg)?, Weight::Time, "miniz_oxide: compress + decompress, by time (probekit trace)")?;
    let folded = out.join("folded.txt");
    snap.write_folded(std::fs::File::create(&folded)?, Weight::Calls)?;

    let size = |p: &PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    println!("summary:");
    println!("  events    {} calls on {} threads ({} functions called)", snap.calls(), snap.threads.len(), {
        let mut called: Vec<u32> = snap.threads.iter().flat_map(|t| t.calls.iter().map(|c| c.function)).collect();
        called.sort();
        called.dedup();
        called.len()
    });
    println!(
        "  lost      {} (rings overwritten, too deep, or of exited threads), missed {}, calls of threads without a ring {}",
        snap.lost(),
        snap.missed,
        snap.no_ring
    );
    println!("  deepest   {} nested calls", snap.threads.iter().flat_map(|t| &t.calls).map(|c| c.depth + 1).max().unwrap_or(0));
    println!("  {:<40} {:>10} bytes  (open in https://ui.perfetto.dev or chrome://tracing)", json.display(), size(&json));
    println!("  {:<40} {:>10} bytes  (open in a browser)", svg.display(), size(&svg));
    println!("  {:<40} {:>10} bytes", folded.display(), size(&folded));

    // Running the example is a test: the trace is whole, and it shows the API's calls.
    assert_eq!(snap.lost(), 0, "a ring was too small for a round");
    assert_eq!(snap.threads.len(), 2 * ROUNDS, "each round's two threads have their own rings");
    // The API's calls are the trace's roots, once a thread: compress_to_vec and
    // decompress_to_vec, or in a release build the function decompress_to_vec was
    // inlined into (decompress_to_vec_inner: only functions have symbols to trace).
    let roots = |prefix: &str| snap.threads.iter().flat_map(|t| &t.calls).filter(|c| c.depth == 0 && snap.name(c).starts_with(prefix)).count();
    assert_eq!(roots("miniz_oxide::deflate::compress_to_vec"), 2 * ROUNDS, "compress_to_vec, each thread's first call");
    assert_eq!(roots("miniz_oxide::inflate::decompress_to_vec"), 2 * ROUNDS, "decompress_to_vec (or what it inlined into), each thread's second");
    assert!(size(&json) > 0 && size(&svg) > 0);
    tracer.unregister()?;
    Ok(())
}
