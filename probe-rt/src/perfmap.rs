//! The perf map: names for the code probekit makes at run time, in the file `perf`
//! reads for just-in-time code, `/tmp/perf-<pid>.map`.
//!
//! `perf report` and `perf script` resolve an address in anonymous executable memory
//! through that file: one line per piece of code, `START SIZE name`, both numbers in
//! hexadecimal without `0x` (Linux `tools/perf/Documentation/jit-interface.txt`).
//! Without it, samples in a return probe's stub or a breakpoint probe's out-of-line
//! slot show as `[unknown]`.
//!
//! Opt-in: [`perf_map`]`(true)`, or the environment variable `PROBEKIT_PERF_MAP=1`
//! (read before `main`). The file is written outside every hit path: when it is
//! turned on (everything made so far), when a block of return stubs is made, and when
//! a breakpoint or return probe is registered (the out-of-line slots made since the
//! last time: a breakpoint probe's slot is named when the next breakpoint probe's registration begins, a
//! return probe's when its own ends, or at the next `perf_map(true)`). It names
//! - `probekit_kretprobe_trampoline` and `probekit_site_trampoline` (also in the
//!   executable's symbol table; listed so that the map alone tells the whole story),
//! - every return stub: `probekit_return_stub[<block>.<index>]`, one per instance of a
//!   return probe, reused by a later probe with the same `maxactive`,
//! - every out-of-line slot: `probekit_slot[<probed address>]`, for the probe it was
//!   made for (a slot reused by a later probe keeps that name).
//!
//! `gdb` does not read perf maps (it would need the JIT interface's in-memory ELF
//! objects); it shows these addresses unnamed.
//!
//! The file belongs to the process: it is truncated when first opened (a file left by
//! an earlier process with the same pid would name the wrong code) and kept at exit,
//! as every JIT does, for `perf report` to read afterwards.

use crate::Error;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Whether names are written.
static ON: AtomicBool = AtomicBool::new(false);

struct Map {
    /// The open file (`None` until first turned on).
    file: Option<std::fs::File>,
    /// The trampolines were named.
    trampolines: bool,
    /// Blocks of stubs named so far (a prefix of `retprobe::stub_blocks`).
    blocks_seen: usize,
    /// Records below this index have had their slots named.
    slots_seen: usize,
}

static MAP: Mutex<Map> = Mutex::new(Map { file: None, trampolines: false, blocks_seen: 0, slots_seen: 0 });

/// The path of this process's perf map.
pub fn perf_map_path() -> std::path::PathBuf {
    format!("/tmp/perf-{}.map", std::process::id()).into()
}

/// Turns the perf map on or off (see the [module docs](self)). Turning it on writes
/// the names of everything probekit has made so far; from then on each new stub
/// block and slot is added. Turning it off stops the additions (the file stays).
pub fn perf_map(on: bool) -> Result<(), Error> {
    let mut map = MAP.lock().unwrap_or_else(|p| p.into_inner());
    if !on {
        ON.store(false, Ordering::Relaxed);
        return Ok(());
    }
    if map.file.is_none() {
        let path = perf_map_path();
        let file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path).map_err(|e| Error::Os {
            addr: 0,
            call: "open /tmp/perf-<pid>.map",
            errno: e.raw_os_error().unwrap_or(0),
        })?;
        map.file = Some(file);
    }
    ON.store(true, Ordering::Relaxed);
    let mut text = String::new();
    if !map.trampolines {
        let sites = crate::site::trampolines().into_iter().map(|(symbol, _, addr)| (symbol, addr));
        let kretprobe = ("probekit_kretprobe_trampoline".to_string(), crate::retprobe::trampoline());
        for (name, addr) in std::iter::once(kretprobe).chain(sites) {
            let size = crate::sys::symbols::function_at(addr).filter(|f| f.addr == addr).map_or(1, |f| f.size.max(1));
            line(&mut text, addr, size, &name);
        }
        map.trampolines = true;
    }
    catch_up(&mut map, &mut text);
    write(&mut map, &text)
}

/// `PROBEKIT_PERF_MAP=1` turns the map on before `main` (names only: no probe exists yet).
extern "C" fn from_env() {
    if std::env::var_os("PROBEKIT_PERF_MAP").is_some_and(|v| v == "1") {
        let _ = perf_map(true);
    }
}
#[used]
#[link_section = ".init_array"]
static FROM_ENV: extern "C" fn() = from_env;

/// Names the slots made since the last call: run at each registration, outside the
/// hit paths.
pub(crate) fn on_register() {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let mut map = MAP.lock().unwrap_or_else(|p| p.into_inner());
    let mut text = String::new();
    catch_up(&mut map, &mut text);
    let _ = write(&mut map, &text);
}

/// Names a new block of return stubs (registration, outside the hit paths): the same
/// catching up as [`on_register`].
pub(crate) fn stubs_made() {
    on_register();
}

/// Names the stub blocks and slots made since the last time.
fn catch_up(map: &mut Map, text: &mut String) {
    let blocks = crate::retprobe::stub_blocks();
    for (code, n) in blocks.iter().skip(map.blocks_seen) {
        stubs(text, *code, *n);
    }
    map.blocks_seen = blocks.len();
    slots(map, text);
}

fn stubs(text: &mut String, code: usize, n: usize) {
    let (stride, _) = crate::retprobe::stub_layout();
    for i in 0..n {
        line(text, code + i * stride, stride, &format!("probekit_return_stub[{code:x}.{i}]"));
    }
}

/// The slots of the records not seen yet.
fn slots(map: &mut Map, text: &mut String) {
    let used = crate::registry::used();
    for i in map.slots_seen..used {
        let e = crate::registry::record(i);
        let slot = e.slot.load(Ordering::Relaxed);
        if slot != 0 {
            let target = e.target.load(Ordering::Relaxed);
            line(text, slot, crate::registry::SLOT, &format!("probekit_slot[{target:x}]"));
        }
    }
    map.slots_seen = map.slots_seen.max(used);
}

fn line(text: &mut String, start: usize, size: usize, name: &str) {
    let _ = writeln!(text, "{start:x} {size:x} {name}");
}

fn write(map: &mut Map, text: &str) -> Result<(), Error> {
    let Some(file) = map.file.as_mut() else { return Ok(()) };
    file.write_all(text.as_bytes()).map_err(|e| Error::Os { addr: 0, call: "write /tmp/perf-<pid>.map", errno: e.raw_os_error().unwrap_or(0) })
}
