//! `#[traceable]` functions in a library that tests load with `dlopen`: the built
//! `libsite_dylib.so` carries its own `probekit_sites` table, which
//! `probekit::sites()` must find once it is loaded. The test links the rlib too, so
//! its own executable has a second copy of each site.

use probekit::traceable;

/// Adds two numbers, through a site.
#[traceable]
pub fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// Scales by a float, through a site.
#[traceable]
pub fn scale(x: f64, by: f64) -> f64 {
    x * by
}

/// Panics on 7, to show a panic unwinds through a site to the caller.
#[traceable]
pub fn fails_on_seven(x: u64) -> u64 {
    assert_ne!(x, 7, "seven");
    x
}

/// A counter whose method is traceable.
pub struct Counter(pub u64);

impl Counter {
    /// Adds `by` and returns the new count.
    #[traceable]
    pub fn bump(&mut self, by: u64) -> u64 {
        self.0 += by;
        self.0
    }
}

/// The C entry points the loading test finds with `dlsym`: a Rust-ABI function has no
/// stable symbol name, so each calls its traceable function.
#[no_mangle]
pub extern "C" fn site_dylib_add(a: u64, b: u64) -> u64 {
    add(a, b)
}

/// The address of [`add`] in this copy of the library, to compare with the table.
#[no_mangle]
pub extern "C" fn site_dylib_add_address() -> usize {
    add as fn(u64, u64) -> u64 as usize
}
