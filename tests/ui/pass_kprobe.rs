use probekit::PtRegs;
use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
#[no_mangle]
pub extern "C" fn kp_target(x: u64) -> u64 {
    x + 1
}

#[probekit::kprobe(function = kp_target)]
fn on_target(_regs: &PtRegs) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

#[probekit::kprobe(symbol = "kp_target", offset = 0, post = after)]
pub fn by_name(_regs: &probekit::PtRegs) {}

fn after(_regs: &PtRegs) {}

// Paths in the options resolve where the attribute is written: `super::`, `self::`,
// a name of the handler's module, and `crate` too.
#[inline(never)]
#[no_mangle]
pub extern "C" fn kp_outer(x: u64) -> u64 {
    x * 2
}

static POSTS: AtomicU64 = AtomicU64::new(0);

fn outer_post(_regs: &PtRegs) {
    POSTS.fetch_add(1, Ordering::Relaxed);
}

mod inner {
    use probekit as pk;
    use std::sync::atomic::{AtomicU64, Ordering};

    pub static PRES: AtomicU64 = AtomicU64::new(0);
    pub static LOCAL: AtomicU64 = AtomicU64::new(0);

    #[probekit::kprobe(function = super::kp_outer, post = super::outer_post)]
    pub fn on_outer(_regs: &pk::PtRegs) {
        PRES.fetch_add(1, Ordering::Relaxed);
    }

    #[inline(never)]
    #[no_mangle]
    pub extern "C" fn kp_inner(x: u64) -> u64 {
        x * 3
    }

    fn local_post(_regs: &mut pk::PtRegs) {
        LOCAL.fetch_add(10, Ordering::Relaxed);
    }

    // Handlers that may change the registers: `register` is `unsafe`.
    #[probekit::kprobe(function = self::kp_inner, post_mut = local_post, crate = self::pk)]
    pub fn on_inner(_regs: &mut pk::PtRegs) {
        LOCAL.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() {
    let p = on_target::register().unwrap();
    assert_eq!(std::hint::black_box(kp_target as extern "C" fn(u64) -> u64)(1), 2);
    assert_eq!((p.nhit(), HITS.load(Ordering::Relaxed)), (1, 1));
    drop(p);
    let q = by_name::register().unwrap();
    assert_eq!(q.address(), kp_target as *const () as usize);
    drop(q);

    let r: Result<probekit::ProbeHandle, probekit::Error> = inner::on_outer::register();
    let r = r.unwrap();
    assert_eq!(r.address(), kp_outer as *const () as usize);
    assert_eq!(std::hint::black_box(kp_outer as extern "C" fn(u64) -> u64)(21), 42);
    assert_eq!((r.nhit(), inner::PRES.load(Ordering::Relaxed), POSTS.load(Ordering::Relaxed)), (1, 1, 1));
    drop(r);

    // SAFETY: the handlers change no register.
    let s = unsafe { inner::on_inner::register() }.unwrap();
    assert_eq!(s.address(), inner::kp_inner as *const () as usize);
    assert_eq!(std::hint::black_box(inner::kp_inner as extern "C" fn(u64) -> u64)(5), 15);
    assert_eq!((s.nhit(), inner::LOCAL.load(Ordering::Relaxed)), (1, 11), "the pre and the post handler ran");
}
