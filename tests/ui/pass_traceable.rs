// `#[traceable]` on every kind of function it takes: each compiles, behaves as
// written, and `probekit::sites()` lists its site with its name and address, the site
// starting with the patchable nop(s).
use probekit::traceable;
use std::hint::black_box;

#[traceable]
pub fn free(a: u64) -> u64 {
    a * 3 + 1
}

#[traceable]
fn generic<T: std::ops::Add<Output = T> + Copy>(a: T, b: T) -> T {
    a + b
}

pub struct Acc<T> {
    base: T,
}

impl<T: Copy + Into<u64>> Acc<T> {
    #[traceable]
    pub fn add(&self, x: u64) -> u64 {
        self.base.into() + x
    }

    #[traceable]
    fn bump(&mut self, by: T) -> u64 {
        self.base = by;
        self.base.into()
    }

    #[traceable]
    fn into_base(self) -> T {
        self.base
    }

    #[traceable]
    fn new(base: T) -> Self {
        Acc { base }
    }

    #[traceable(associated)]
    fn answer() -> u64 {
        42
    }
}

/// # Safety
/// `p` must be valid for reads.
#[traceable]
unsafe fn read(p: *const u64) -> u64 {
    *p
}

struct Pair(u64, u64);

#[traceable]
fn patterns((a, b): (u64, u64), Pair(c, d): Pair, mut e: u64, _: u8) -> u64 {
    e += 1;
    a * 1000 + b * 100 + c * 10 + d + e * 10000
}

// More integer arguments than registers (6 on SysV x86_64, 8 on AAPCS64) and more
// than the FP registers hold too, so some go on the stack.
#[traceable]
#[allow(clippy::too_many_arguments)]
fn many(a: u64, b: u32, c: u16, d: u8, e: i64, f: f64, g: u64, h: f32, i: u64, j: u64, k: f64, l: u64) -> f64 {
    (a + b as u64 + c as u64 + d as u64 + g + i + j + l) as f64 + e as f64 + f + h as f64 + k
}

#[traceable]
fn many_floats(a: f64, b: f64, c: f64, d: f64, e: f64, f: f64, g: f64, h: f64, i: f64, j: f32) -> f64 {
    a + b * 2.0 + c * 3.0 + d * 4.0 + e * 5.0 + f * 6.0 + g * 7.0 + h * 8.0 + i * 9.0 + j as f64 * 10.0
}

#[traceable]
fn borrow<'a>(s: &'a str, n: usize) -> &'a str {
    &s[..n]
}

#[traceable]
fn r#match(x: u64) -> u64 {
    x
}

#[traceable]
fn panics(x: u64) -> u64 {
    if x == 7 {
        panic!("seven");
    }
    x
}

mod inner {
    #[probekit::traceable]
    pub fn nested() -> &'static str {
        "nested"
    }
}

// The C ABI, for C and asm callers: the function keeps it (and its C name), the site
// and the body are `C-unwind` behind it.
#[traceable]
#[unsafe(no_mangle)]
pub extern "C" fn pass_traceable_c(a: u64, b: u32) -> u64 {
    a * 10 + b as u64
}

#[traceable]
extern "C-unwind" fn c_unwind(x: u64) -> u64 {
    if x == 9 {
        panic!("nine");
    }
    x
}

// `#[inline(never)]` is what a traceable function is anyway.
#[traceable]
#[inline(never)]
fn never_inlined(x: u64) -> u64 {
    x + 1
}

#[cfg(target_arch = "x86_64")]
const NOPS: &[u8] = &[0x0f, 0x1f, 0x44, 0x00, 0x00];
#[cfg(target_arch = "aarch64")]
const NOPS: &[u8] = &[0xe9, 0x03, 0x1e, 0xaa, 0x1f, 0x20, 0x03, 0xd5]; // mov x9, x30; nop

fn main() {
    assert_eq!(free(black_box(4)), 13);
    assert_eq!(generic(black_box(2u64), 3), 5);
    assert_eq!(generic(black_box(2.5f64), 0.25), 2.75);
    let mut acc = Acc { base: 5u32 };
    assert_eq!(acc.add(black_box(6)), 11);
    assert_eq!(acc.bump(black_box(9)), 9);
    assert_eq!(Acc::<u32>::new(black_box(3)).into_base(), 3);
    assert_eq!(Acc::<u8>::answer(), 42);
    let v = 77u64;
    // SAFETY: `&v` is valid for reads.
    assert_eq!(unsafe { read(black_box(&v)) }, 77);
    assert_eq!(patterns(black_box((1, 2)), Pair(3, 4), 5, 0), 61234);
    assert_eq!(many(1, 2, 3, 4, -5, 0.5, 7, 0.25, 9, 10, 0.125, 12), 43.875);
    assert_eq!(many_floats(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5), 50.0);
    assert_eq!(borrow(black_box("hello"), 2), "he");
    assert_eq!(r#match(black_box(8)), 8);
    assert_eq!(inner::nested(), "nested");
    assert_eq!(pass_traceable_c(black_box(4), 2), 42);
    let through_a_pointer: extern "C" fn(u64, u32) -> u64 = black_box(pass_traceable_c);
    assert_eq!(through_a_pointer(5, 3), 53);
    assert_eq!(never_inlined(black_box(1)), 2);

    // A panic in the body unwinds through the site and the wrapper to the caller.
    assert_eq!(std::panic::catch_unwind(|| panics(black_box(1))).ok(), Some(1));
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // quiet: this panic is expected
    let err = std::panic::catch_unwind(|| panics(black_box(7))).unwrap_err();
    assert_eq!(err.downcast_ref::<&str>(), Some(&"seven"));
    // Through an `extern "C-unwind"` function too.
    let err = std::panic::catch_unwind(|| c_unwind(black_box(9))).unwrap_err();
    std::panic::set_hook(hook);
    assert_eq!(err.downcast_ref::<&str>(), Some(&"nine"));

    let sites = probekit::sites();
    // Names are `module_path!()::name`; trybuild names this crate, so compare below it.
    let find = |name: &str| -> Vec<&probekit::SiteInfo> {
        let name = name.replacen("pass_traceable", module_path!(), 1);
        sites.iter().filter(|s| s.name == name).collect()
    };
    let one = |name: &str, function: usize| {
        let found = find(name);
        assert_eq!(found.len(), 1, "{name}: {sites:#?}");
        assert_eq!(found[0].function, function, "{name}");
        found[0].site
    };
    let mut all = vec![
        one("pass_traceable::free", free as fn(u64) -> u64 as usize),
        one("pass_traceable::read", read as unsafe fn(*const u64) -> u64 as usize),
        one("pass_traceable::patterns", patterns as fn((u64, u64), Pair, u64, u8) -> u64 as usize),
        one("pass_traceable::many", many as *const () as usize),
        one("pass_traceable::many_floats", many_floats as *const () as usize),
        one("pass_traceable::match", r#match as fn(u64) -> u64 as usize),
        one("pass_traceable::panics", panics as fn(u64) -> u64 as usize),
        one("pass_traceable::inner::nested", inner::nested as fn() -> &'static str as usize),
        one("pass_traceable::answer", Acc::<u8>::answer as fn() -> u64 as usize),
        one("pass_traceable::borrow", borrow as for<'a> fn(&'a str, usize) -> &'a str as usize),
        one("pass_traceable::pass_traceable_c", pass_traceable_c as extern "C" fn(u64, u32) -> u64 as usize),
        one("pass_traceable::c_unwind", c_unwind as extern "C-unwind" fn(u64) -> u64 as usize),
        one("pass_traceable::never_inlined", never_inlined as fn(u64) -> u64 as usize),
    ];
    // Generic instances: one site each, all under one name.
    let g = find("pass_traceable::generic");
    assert_eq!(g.len(), 2, "two instances: {g:#?}");
    assert_ne!(g[0].site, g[1].site);
    assert_ne!(g[0].function, g[1].function);
    assert!(g.iter().any(|s| s.function == generic::<u64> as fn(u64, u64) -> u64 as usize));
    for name in ["add", "bump", "into_base", "new"] {
        let m = find(&format!("pass_traceable::{name}"));
        assert_eq!(m.len(), 1, "{name}: {sites:#?}");
        all.push(m[0].site);
    }
    assert_eq!(find("pass_traceable::add")[0].function, Acc::<u32>::add as fn(&Acc<u32>, u64) -> u64 as usize);
    all.extend(g.iter().map(|s| s.site));

    // Each site is its own code, and starts with the patchable nop(s).
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 19);
    for site in all {
        // SAFETY: a site is the first byte of a naked function at least as long as the
        // nops and the jump after them, in mapped code.
        let bytes = unsafe { std::slice::from_raw_parts(site as *const u8, NOPS.len()) };
        assert_eq!(bytes, NOPS, "{site:#x}");
    }
}
