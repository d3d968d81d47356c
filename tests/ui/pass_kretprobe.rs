// Every form of `#[kretprobe]`, registered and hit.
use probekit::{Entry, PtRegs};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

#[inline(never)]
#[no_mangle]
pub extern "C" fn krp_add(a: u64, b: u64) -> u64 {
    black_box(a) + black_box(b)
}

#[inline(never)]
#[no_mangle]
pub extern "C" fn krp_triple(a: u64) -> u64 {
    black_box(a) * 3
}

fn add(a: u64, b: u64) -> u64 {
    black_box(krp_add as extern "C" fn(u64, u64) -> u64)(a, b)
}

fn triple(a: u64) -> u64 {
    black_box(krp_triple as extern "C" fn(u64) -> u64)(a)
}

// data + entry + maxactive: the entry handler keeps the first argument for the return.
#[derive(Default)]
struct Call {
    first: u64,
}

static SEEN: AtomicU64 = AtomicU64::new(0);

fn keep_first(regs: &PtRegs, call: &mut Call) -> bool {
    call.first = regs.arg(0).unwrap_or(0);
    call.first != 99 // watch every call but those of 99
}

#[probekit::kretprobe(function = krp_add, maxactive = 4, entry = keep_first, data = Call)]
fn on_add(regs: &PtRegs, call: &mut Call) {
    SEEN.store(call.first * 1000 + regs.return_value(), Ordering::Relaxed);
}

// By name, no data (`()`), and the handler changes the result: `register` is `unsafe`.
#[probekit::kretprobe(symbol = "krp_triple")]
pub fn plus_one(regs: &mut probekit::PtRegs, _: &mut ()) {
    regs.set_return_value(regs.return_value() + 1);
}

// An entry handler that skips the function (`entry_mut`): `register` is `unsafe`.
fn zero_is_seven(regs: &mut PtRegs, _: &mut ()) -> Entry {
    match regs.arg(0) {
        Some(0) => Entry::Override(7),
        _ => Entry::Continue,
    }
}

static RETURNS: AtomicU64 = AtomicU64::new(0);

#[probekit::kretprobe(function = krp_triple, entry_mut = zero_is_seven, maxactive = 1usize)]
fn count(_regs: &PtRegs, _: &mut ()) {
    RETURNS.fetch_add(1, Ordering::Relaxed);
}

// Paths resolve where the attribute is written, `crate` included.
mod inner {
    use probekit::PtRegs;

    use probekit as pk;

    #[probekit::kretprobe(function = super::krp_add, data = super::Call, crate = pk)]
    pub fn on_add(regs: &PtRegs, call: &mut super::Call) {
        call.first = 0;
        super::SEEN.store(regs.return_value(), Ordering::Relaxed);
    }

    use std::sync::atomic::Ordering;
}

fn main() {
    let p = on_add::register().unwrap();
    assert_eq!(p.maxactive(), 4);
    assert_eq!(add(2, 3), 5);
    assert_eq!(SEEN.load(Ordering::Relaxed), 2005, "the return handler saw the entry's data and the return value");
    assert_eq!(add(99, 1), 100);
    assert_eq!(SEEN.load(Ordering::Relaxed), 2005, "a skipped call runs no return handler");
    assert_eq!((p.nhit(), p.nmissed()), (2, 0));
    drop(p);

    // SAFETY: `krp_triple` returns a `u64`: any value is one.
    let q = unsafe { plus_one::register() }.unwrap();
    assert_eq!(q.address(), krp_triple as *const () as usize);
    assert_eq!(triple(5), 16);
    drop(q);
    assert_eq!(triple(5), 15);

    // SAFETY: as above; skipping `krp_triple` skips no effect.
    let r = unsafe { count::register() }.unwrap();
    assert_eq!(r.maxactive(), 1);
    assert_eq!((triple(0), triple(2)), (7, 6), "an entry handler overrides the call");
    assert_eq!(RETURNS.load(Ordering::Relaxed), 1, "an overridden call runs no return handler");
    drop(r);

    let s = inner::on_add::register().unwrap();
    assert_eq!(add(20, 22), 42);
    assert_eq!(SEEN.load(Ordering::Relaxed), 42);
    drop(s);
}
