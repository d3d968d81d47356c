// `#[traceable]` on `impl` blocks: trait impls (whose methods cannot take extra items
// next to them), generic ones, ones with associated types and consts, impls for a
// foreign type and of a generic trait, and an inherent impl with some methods marked.
// Each method behaves as written and `probekit::sites()` lists its site.
use probekit::traceable;
use std::hint::black_box;

pub trait Shape {
    type Out;
    const SIDES: u64;
    fn area(&self, k: u64) -> Self::Out;
    fn sides() -> u64 {
        Self::SIDES
    }
    fn describe(&self) -> String;
}

pub struct Square<T>(T);

// Every method of the impl gets a site.
#[traceable]
impl<T: Copy + Into<u64>> Shape for Square<T> {
    type Out = u64;
    const SIDES: u64 = 4;

    fn area(&self, k: u64) -> u64 {
        let s: u64 = self.0.into();
        s * s * k
    }

    fn describe(&self) -> String {
        format!("square of {}", self.0.into())
    }
}

pub trait Twice {
    fn twice(self) -> Self;
}

// A foreign type, a by-value receiver, a `cfg` on the impl (the helper follows it).
#[cfg(target_os = "linux")]
#[traceable]
impl Twice for u64 {
    fn twice(self) -> Self {
        self * 2
    }
}

pub struct Meters(u64);

// A generic trait, an associated function without `self`, a pattern argument.
#[traceable]
impl From<(u64, u64)> for Meters {
    fn from((km, m): (u64, u64)) -> Self {
        Meters(km * 1000 + m)
    }
}

// A trait path that elides a lifetime (the helper trait must name it), and a lint
// level on the impl (it still covers the body, which moved to the helper impl).
#[traceable]
#[deny(unused_variables)]
impl PartialEq<&str> for Meters {
    fn eq(&self, other: &&str) -> bool {
        other.parse() == Ok(self.0)
    }
}

pub struct Counter {
    n: u64,
}

// Only the marked methods get a site.
#[traceable]
impl Counter {
    #[traceable]
    fn bump(&mut self, by: u64) -> u64 {
        self.n += by;
        self.n
    }

    fn plain(&self) -> u64 {
        self.n
    }
}

#[cfg(target_arch = "x86_64")]
const NOPS: &[u8] = &[0x0f, 0x1f, 0x44, 0x00, 0x00];
#[cfg(target_arch = "aarch64")]
const NOPS: &[u8] = &[0xe9, 0x03, 0x1e, 0xaa, 0x1f, 0x20, 0x03, 0xd5]; // mov x9, x30; nop

fn main() {
    let sq = Square(black_box(3u32));
    assert_eq!(sq.area(black_box(2)), 18);
    assert_eq!(Square::<u32>::sides(), 4);
    assert_eq!(sq.describe(), "square of 3");
    assert_eq!(black_box(21u64).twice(), 42);
    assert_eq!(Meters::from(black_box((2, 5))).0, 2005);
    assert!(Meters(5) == black_box("5"));
    let mut c = Counter { n: 1 };
    assert_eq!(c.bump(black_box(2)), 3);
    assert_eq!(c.plain(), 3);

    let sites = probekit::sites();
    let one = |name: &str, function: usize| {
        let name = name.replacen("pass_traceable_impl", module_path!(), 1);
        let found: Vec<_> = sites.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "{name}: {sites:#?}");
        assert_eq!(found[0].function, function, "{name}");
        found[0].site
    };
    let all = [
        one("pass_traceable_impl::<Square<T> as Shape>::area", <Square<u32> as Shape>::area as fn(&Square<u32>, u64) -> u64 as usize),
        one("pass_traceable_impl::<Square<T> as Shape>::describe", <Square<u32> as Shape>::describe as fn(&Square<u32>) -> String as usize),
        one("pass_traceable_impl::<u64 as Twice>::twice", <u64 as Twice>::twice as fn(u64) -> u64 as usize),
        one("pass_traceable_impl::<Meters as From<(u64, u64)>>::from", <Meters as From<(u64, u64)>>::from as fn((u64, u64)) -> Meters as usize),
        one("pass_traceable_impl::<Meters as PartialEq<&str>>::eq", <Meters as PartialEq<&'static str>>::eq as fn(&Meters, &&'static str) -> bool as usize),
        one("pass_traceable_impl::bump", Counter::bump as fn(&mut Counter, u64) -> u64 as usize),
    ];
    assert!(!sites.iter().any(|s| s.name.ends_with("::plain") || s.name.ends_with("::sides")), "unmarked and default methods have no site");
    for site in all {
        // SAFETY: a site is the first byte of a naked function at least as long as the
        // nops and the jump after them, in mapped code.
        let bytes = unsafe { std::slice::from_raw_parts(site as *const u8, NOPS.len()) };
        assert_eq!(bytes, NOPS, "{site:#x}");
    }
}
