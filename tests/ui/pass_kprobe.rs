use probekit::PtRegs;
use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
#[no_mangle]
pub extern "C" fn kp_target(x: u64) -> u64 {
    x + 1
}

#[probekit::kprobe(function = kp_target)]
fn on_target(_regs: &mut PtRegs) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

#[probekit::kprobe(symbol = "kp_target", offset = 0, post = after)]
pub fn by_name(_regs: &mut probekit::PtRegs) {}

fn after(_regs: &mut PtRegs) {}

fn main() {
    let p = on_target::register().unwrap();
    assert_eq!(std::hint::black_box(kp_target as extern "C" fn(u64) -> u64)(1), 2);
    assert_eq!((p.nhit(), HITS.load(Ordering::Relaxed)), (1, 1));
    drop(p);
    let q = by_name::register().unwrap();
    assert_eq!(q.address(), kp_target as *const () as usize);
}
