/* C callers of `#[traceable] extern "C"` functions (tests/traceable_c.rs): by the
   function's C name, and through a pointer Rust hands over. */
#include <stdint.h>

/* Defined in Rust: `#[traceable] #[unsafe(no_mangle)] extern "C" fn`. */
uint64_t probekit_traceable_c_scale(uint64_t a, uint64_t b);

uint64_t probekit_c_calls_by_name(uint64_t a, uint64_t b) {
    return probekit_traceable_c_scale(a, b) + 1;
}

uint64_t probekit_c_calls_through(uint64_t (*f)(uint64_t, uint64_t), uint64_t a, uint64_t b) {
    return f(a, b) + 1;
}
