// Everything `#[traceable]` refuses, one error each, on the token that is wrong.
use probekit::traceable;

#[traceable]
async fn not_async() {}

#[traceable]
const fn not_const() -> u64 {
    0
}

// The C ABI is fine (`extern "C"`, `extern "C-unwind"`); another is not.
#[traceable]
extern "sysv64" fn not_the_c_abi() {}

#[traceable]
fn impl_argument(f: impl Fn() -> u64) -> u64 {
    f()
}

#[traceable]
fn impl_in_return() -> Box<impl Fn() -> u64> {
    Box::new(|| 0)
}

#[traceable]
unsafe fn variadic(a: u64, _: ...) -> u64 {
    a
}

#[traceable]
#[inline]
fn inlined() {}

#[traceable]
#[inline(always)]
fn always_inlined() {}

#[traceable(fast)]
fn unknown_option() {}

#[traceable]
struct NotAFunction;

#[traceable]
pub static NOT_A_FUNCTION_EITHER: u64 = 0;

pub trait Tr {
    fn m(&self) -> u64;
}

pub struct S;

#[traceable(associated)]
impl S {
    fn a(&self) {}
}

#[traceable]
impl Tr for S {
    #[traceable(fast)]
    fn m(&self) -> u64 {
        0
    }
}

pub struct U;

#[traceable]
impl Tr for U {
    #[inline]
    fn m(&self) -> u64 {
        0
    }
}

fn main() {}
