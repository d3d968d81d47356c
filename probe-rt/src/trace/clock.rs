//! The tracer's clock: the CPU's cycle counter on the hit path, converted to
//! `CLOCK_MONOTONIC` nanoseconds when records are read.
//!
//! A traced call reads the clock twice. `clock_gettime` through the vDSO costs
//! 15–20 ns in a virtual machine; the counter it is computed from costs a third of
//! that when read directly (LLVM XRay and uftrace do the same): x86_64's time-stamp
//! counter, when the CPU says it is invariant (it ticks at one rate in every P- and
//! C-state, on every core), and aarch64's virtual counter `CNTVCT_EL0`, which always
//! is. A CPU without an invariant TSC keeps `clock_gettime`.
//!
//! The conversion is linear, from an anchor `(ticks, ns)` read together and the rate:
//! aarch64's counter gives its frequency (`CNTFRQ_EL0`); the TSC's is measured once per
//! process against `CLOCK_MONOTONIC` over 10 ms (a relative error near 1e-5, from the
//! two reads' jitter), the first time a tracer is registered.

use std::sync::OnceLock;

/// `CLOCK_MONOTONIC` in nanoseconds: a vDSO read, async-signal-safe (signal-safety(7)).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The clock of a tracer's records.
#[derive(Clone, Copy, Debug)]
pub(super) struct Clock {
    /// Ticks are the cycle counter's (else `CLOCK_MONOTONIC` ns).
    counter: bool,
    /// Nanoseconds per tick.
    ns_per_tick: f64,
    /// Read together: a tick count and `CLOCK_MONOTONIC` then.
    anchor_ticks: u64,
    anchor_ns: u64,
}

impl Clock {
    /// The process's clock (the first call may take 10 ms: see the module docs).
    pub(super) fn new() -> Clock {
        let ns_per_tick = *RATE.get_or_init(rate);
        let counter = ns_per_tick > 0.0;
        let (anchor_ticks, anchor_ns) = if counter { anchor() } else { (0, 0) };
        Clock { counter, ns_per_tick, anchor_ticks, anchor_ns }
    }

    /// Now, in ticks (the hit path: async-signal-safe, no lock).
    #[inline(always)]
    pub(super) fn ticks(&self) -> u64 {
        if self.counter {
            counter()
        } else {
            now_ns()
        }
    }

    /// `ticks` as `CLOCK_MONOTONIC` nanoseconds.
    pub(super) fn ns(&self, ticks: u64) -> u64 {
        if !self.counter {
            return ticks;
        }
        // The difference in floating point, the sum in integers: `anchor_ns` counts
        // nanoseconds since boot, past f64's exact integers after 104 days.
        let delta = (ticks.wrapping_sub(self.anchor_ticks) as i64 as f64 * self.ns_per_tick).round() as i64;
        self.anchor_ns.saturating_add_signed(delta)
    }
}

/// Nanoseconds per tick of the cycle counter, 0.0 if it cannot be used.
static RATE: OnceLock<f64> = OnceLock::new();

/// A tick count and `CLOCK_MONOTONIC`, read as close together as a few tries allow
/// (the pair whose clock read took least).
fn anchor() -> (u64, u64) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..5 {
        let before = counter();
        let ns = now_ns();
        let after = counter();
        if after.wrapping_sub(before) < best.0 {
            best = (after.wrapping_sub(before), before / 2 + after / 2 + (before & after & 1), ns);
        }
    }
    (best.1, best.2)
}

#[cfg(target_arch = "x86_64")]
fn rate() -> f64 {
    use core::arch::x86_64::__cpuid;
    // CPUID.80000007H:EDX[8]: the TSC is invariant (leaf 0x8000_0000 says how far the
    // extended leaves go).
    let invariant = __cpuid(0x8000_0000).eax >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0;
    if !invariant {
        return 0.0;
    }
    let (t0, n0) = anchor();
    std::thread::sleep(std::time::Duration::from_millis(10));
    let (t1, n1) = anchor();
    match t1.checked_sub(t0) {
        Some(dt) if dt > 0 && n1 > n0 => (n1 - n0) as f64 / dt as f64,
        _ => 0.0,
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn counter() -> u64 {
    // SAFETY: RDTSC exists on every x86_64 CPU and is allowed in user mode on Linux
    // (the kernel does not set CR4.TSD for normal processes).
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(target_arch = "aarch64")]
fn rate() -> f64 {
    let hz: u64;
    // SAFETY: CNTFRQ_EL0 is readable at EL0 on Linux (CNTKCTL_EL1.EL0PCTEN/EL0VCTEN set).
    unsafe { core::arch::asm!("mrs {}, cntfrq_el0", out(reg) hz, options(nomem, nostack, preserves_flags)) };
    if hz == 0 {
        0.0
    } else {
        1e9 / hz as f64
    }
}

#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn counter() -> u64 {
    let ticks: u64;
    // SAFETY: Linux lets EL0 read CNTVCT_EL0 (the vDSO's clock_gettime does).
    unsafe { core::arch::asm!("mrs {}, cntvct_el0", out(reg) ticks, options(nomem, nostack, preserves_flags)) };
    ticks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_convert_to_monotonic_nanoseconds() {
        let clock = Clock::new();
        let before = now_ns();
        let t = clock.ticks();
        let after = now_ns();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let t2 = clock.ticks();
        let later = now_ns();
        // A few microseconds of slack: rounding, and the reads' own order.
        let (ns, ns2) = (clock.ns(t), clock.ns(t2));
        assert!(ns + 5_000 >= before && ns <= after + 5_000, "{before} <= {ns} <= {after}");
        assert!(ns2 <= later + 5_000 && ns2 >= ns + 19_000_000, "20 ms later: {ns2} after {ns}, {later}");
    }
}
