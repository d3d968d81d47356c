// A primitive's name given to another type: `#[traceable]` judges a signature by
// its names (an integer-only function's trampolines keep no FP/SIMD registers), so a
// name that is not the primitive must not compile, or a float would reach the
// handler's trampoline as an integer.
#[allow(non_camel_case_types)]
type u64 = f64;

#[probekit::traceable]
fn half(x: u64) -> u64 {
    x / 2.0
}

struct S<u8>(u8);

#[allow(non_camel_case_types)]
#[probekit::traceable]
impl<u8> S<u8> {
    fn get(&self, x: u8) -> i32 {
        let _ = x;
        0
    }
}

fn main() {
    let _ = half(1.0);
}
