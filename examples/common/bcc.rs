//! What bcc's tools share, for the examples that imitate them: log2 histograms as
//! `print_log2_hist` prints them, the time of day as `strftime("%H:%M:%S")`, and the
//! command name of a thread. Included with `#[path = "common/bcc.rs"] mod bcc;`.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// bcc's `bpf_log2l(v)`: `floor(log2(v)) + 1`, with 0 in slot 1 like 1.
pub fn log2_slot(v: u64) -> usize {
    64 - (v | 1).leading_zeros() as usize
}

/// A log2 histogram a handler can fill: atomic slots, no lock, no allocation.
pub struct Log2Hist {
    slots: [AtomicU64; 65],
}

impl Log2Hist {
    /// An empty histogram (usable as a `static`).
    pub const fn new() -> Self {
        Log2Hist { slots: [const { AtomicU64::new(0) }; 65] }
    }

    /// Counts `v` in its slot.
    pub fn record(&self, v: u64) {
        self.slots[log2_slot(v)].fetch_add(1, Relaxed);
    }

    /// The counts, slot by slot.
    pub fn counts(&self) -> Vec<u64> {
        self.slots.iter().map(|s| s.load(Relaxed)).collect()
    }
}

/// bcc's `print_log2_hist` (`stars_max = 40`, the wide format past slot 32).
pub fn print_log2_hist(slots: &[u64], val_type: &str) {
    let Some(idx_max) = slots.iter().rposition(|&c| c > 0) else { return };
    let val_max = slots.iter().copied().max().unwrap_or(0);
    let wide = idx_max > 32;
    let stars_max = if wide { 20 } else { 40 };
    if wide {
        println!("               {val_type:<29} : count     distribution");
    } else {
        println!("     {val_type:<19} : count     distribution");
    }
    for (i, &val) in slots.iter().enumerate().take(idx_max + 1).skip(1) {
        let (high, low) = ((1u128 << i) - 1, (1u128 << i) >> 1);
        let low = if low == high { low - 1 } else { low };
        let stars = "*".repeat((val * stars_max / val_max) as usize);
        if wide {
            println!("{low:>20} -> {high:<20} : {val:<8} |{stars:<20}|");
        } else {
            println!("{low:>10} -> {high:<10} : {val:<8} |{stars:<40}|");
        }
    }
}

/// The local time as `HH:MM:SS` (bcc's `strftime("%H:%M:%S")`).
pub fn hms() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value for localtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to valid, live values of the right types.
    unsafe { libc::localtime_r(&now, &mut tm) };
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// The calling thread's command name (the kernel's `comm`, as bcc's `COMM` column).
pub fn comm() -> String {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (with the NUL) into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr() as libc::c_ulong, 0, 0, 0) };
    String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or(&[])).into_owned()
}

/// The calling thread's id (bcc's `TID`; the `PID` column is the process's).
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Prints `message` to stderr and exits with `status`, as the tools do on a bad
/// command line (2) or a probe that cannot be attached (1).
pub fn fail(status: i32, message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(status)
}

/// Waits until `f` says done, polling (handlers cannot wake anyone).
pub fn wait_for(mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "timed out");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
