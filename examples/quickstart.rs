//! probekit in one page: probe a function of this program and one libc function, read
//! their arguments in the handlers, push events to a lock-free buffer, and print
//! them, with the probes' hit counts, from `main` (handlers run in signal context and
//! never print).
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use probekit::{EventBuffer, Probe, PtRegs};
use std::hint::black_box;

/// What the handlers tell `main`.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// `checksum(data, len)` was called.
    Checksum { data: u64, len: u64 },
    /// `getpid()` was called, with this stack pointer.
    Getpid { caller_sp: u64 },
}

static EVENTS: EventBuffer<Event, 256> = EventBuffer::new();

#[inline(never)]
#[no_mangle]
extern "C" fn checksum(data: *const u8, len: usize) -> u32 {
    // SAFETY: callers pass a valid slice.
    let bytes = unsafe { std::slice::from_raw_parts(data, len) };
    bytes.iter().fold(0u32, |a, b| a.rotate_left(5) ^ *b as u32)
}

fn on_checksum(regs: &PtRegs) {
    let (data, len) = (regs.arg(0).unwrap_or(0), regs.arg(1).unwrap_or(0));
    EVENTS.push(Event::Checksum { data, len });
}

fn on_getpid(regs: &PtRegs) {
    EVENTS.push(Event::Getpid { caller_sp: regs.stack_pointer() });
}

fn main() -> Result<(), probekit::Error> {
    let f = checksum as extern "C" fn(*const u8, usize) -> u32;
    let mine = Probe::builder().function(f).pre(on_checksum).register()?;
    let libc = Probe::builder().symbol("getpid").pre(on_getpid).register()?;
    println!("probing checksum at {:#x} and getpid at {:#x}", mine.address(), libc.address());

    for text in ["probekit", "kprobes in a process", "!"] {
        let sum = black_box(f)(text.as_ptr(), text.len());
        println!("checksum({text:?}) = {sum:#010x}");
    }
    for _ in 0..2 {
        println!("pid {}", std::process::id());
    }

    for e in EVENTS.drain() {
        match e {
            Event::Checksum { data, len } => println!("event: checksum(data = {data:#x}, len = {len})"),
            Event::Getpid { caller_sp } => println!("event: getpid() with sp = {caller_sp:#x}"),
        }
    }
    println!("checksum: {} hits, {} missed; getpid: {} hits", mine.nhit(), mine.nmissed(), libc.nhit());
    Ok(())
}
