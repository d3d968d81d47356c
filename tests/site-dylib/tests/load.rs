//! `probekit::sites()` finds the sites of a library loaded at run time, and those
//! of the same functions linked into this executable; a panic unwinds through a site.

use std::ffi::CString;
use std::path::PathBuf;

const NAMES: [&str; 4] = ["site_dylib::add", "site_dylib::scale", "site_dylib::fails_on_seven", "site_dylib::bump"];

#[cfg(target_arch = "x86_64")]
const NOPS: &[u8] = &[0x0f, 0x1f, 0x44, 0x00, 0x00];
#[cfg(target_arch = "aarch64")]
const NOPS: &[u8] = &[0xe9, 0x03, 0x1e, 0xaa, 0x1f, 0x20, 0x03, 0xd5]; // mov x9, x30; nop

/// The built `libsite_dylib.so`: cargo puts the cdylib next to the test executable,
/// in `target/[<triple>/]debug/deps/`, and a copy one level up.
fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    let deps = exe.parent().expect("its directory");
    [deps.to_path_buf(), deps.join("..")]
        .iter()
        .map(|d| d.join("libsite_dylib.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("libsite_dylib.so next to {}", exe.display()))
        .canonicalize()
        .expect("a real path")
}

/// The ranges `path` is mapped at, from `/proc/self/maps`.
fn mappings(path: &std::path::Path) -> Vec<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter(|l| l.split_whitespace().nth(5) == path.to_str())
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))
        })
        .collect()
}

fn inside(ranges: &[(usize, usize)], addr: usize) -> bool {
    ranges.iter().any(|&(a, b)| (a..b).contains(&addr))
}

/// `dlsym` as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the type of the function `name` names.
unsafe fn symbol<F: Copy>(handle: *mut libc::c_void, name: &str) -> F {
    let c = CString::new(name).unwrap();
    // SAFETY: `handle` is a live `dlopen` handle and `c` a NUL-terminated name.
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    assert!(!p.is_null(), "dlsym({name})");
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut libc::c_void>());
    // SAFETY: `p` is the address of `name`, whose type the caller vouches is `F`, a
    // function pointer (pointer-sized, checked above).
    unsafe { std::mem::transmute_copy(&p) }
}

#[test]
fn sites_of_a_library_loaded_at_run_time() {
    let path = library();
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: the library is Rust code of this workspace whose initialisers are
    // sound to run; RTLD_LOCAL keeps its symbols from interposing on ours.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen({})", path.display());
    let ranges = mappings(&path);
    assert!(!ranges.is_empty(), "{} is mapped", path.display());

    let sites = probekit::sites();
    let in_library: Vec<&probekit::SiteInfo> = sites.iter().filter(|s| inside(&ranges, s.site)).collect();
    let mut names: Vec<&str> = in_library.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    let mut expected = NAMES.to_vec();
    expected.sort();
    assert_eq!(names, expected, "{sites:#?}");
    for s in &in_library {
        assert!(inside(&ranges, s.function), "{s:?}: the function is in the library too");
        // SAFETY: the site is mapped code of the loaded library, at least as long as
        // its nops.
        let bytes = unsafe { std::slice::from_raw_parts(s.site as *const u8, NOPS.len()) };
        assert_eq!(bytes, NOPS, "{s:?}");
    }

    // SAFETY: both are `extern "C"` functions of the library with these signatures.
    let (add, add_address) =
        unsafe { (symbol::<extern "C" fn(u64, u64) -> u64>(handle, "site_dylib_add"), symbol::<extern "C" fn() -> usize>(handle, "site_dylib_add_address")) };
    assert_eq!(add(2, 3), 5, "a call through the library's site");
    let add_site = in_library.iter().find(|s| s.name == "site_dylib::add").unwrap();
    assert_eq!(add_site.function, add_address(), "the table records the library's own `add`");
    assert_ne!(add_site.function, site_dylib::add as fn(u64, u64) -> u64 as usize, "not this executable's copy");

    // A probe on the library's site, from this executable's runtime: the library is
    // usually mapped too far from the trampoline for a direct call, so through a veneer.
    // SAFETY: the address is an instruction of this test's code, not data.
    let probe = unsafe { probekit::Probe::builder().address(add_site.site) }.pre(count).register().expect("probe the library's site");
    assert_eq!(add(20, 22), 42);
    assert_eq!(probe.nhit(), 1);
    assert!(probekit::list().0.iter().any(|p| p.addr == add_site.site && p.site), "it rides the site");

    // SAFETY: nothing of the library is used past this point but the probe, whose
    // unregistration must write nothing if the library's code is gone.
    unsafe { libc::dlclose(handle) };
    drop(probe);
    // A Rust library may stay loaded (glibc keeps objects with thread-local
    // destructors); if it went, so did its sites.
    if mappings(&path).is_empty() {
        assert!(probekit::sites().iter().all(|s| !inside(&ranges, s.site)), "no site of an unloaded library");
    }
}

static HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count(_: &probekit::PtRegs) {
    HITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn sites_of_the_executable() {
    let mut counter = site_dylib::Counter(1);
    assert_eq!(counter.bump(2), 3);
    assert_eq!(site_dylib::add(40, 2), 42);
    assert_eq!(site_dylib::scale(1.5, 4.0), 6.0);
    let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    let ranges = mappings(&exe);
    let sites = probekit::sites();
    let here = |name: &str| {
        let found: Vec<_> = sites.iter().filter(|s| s.name == name && inside(&ranges, s.site)).collect();
        assert_eq!(found.len(), 1, "{name}: {sites:#?}");
        found[0].clone()
    };
    assert_eq!(here("site_dylib::add").function, site_dylib::add as fn(u64, u64) -> u64 as usize);
    assert_eq!(here("site_dylib::scale").function, site_dylib::scale as fn(f64, f64) -> f64 as usize);
    assert_eq!(here("site_dylib::bump").function, site_dylib::Counter::bump as fn(&mut site_dylib::Counter, u64) -> u64 as usize);
}

#[test]
fn a_panic_unwinds_through_a_site_to_the_caller() {
    assert_eq!(std::panic::catch_unwind(|| site_dylib::fails_on_seven(std::hint::black_box(6))).ok(), Some(6));
    let payload = std::panic::catch_unwind(|| site_dylib::fails_on_seven(std::hint::black_box(7))).unwrap_err();
    let message = payload.downcast_ref::<String>().map(String::as_str).unwrap_or_default();
    assert!(message.contains("seven"), "the payload arrives: {message:?}");
    // The caller's frame is intact: it goes on and calls through the site again.
    assert_eq!(site_dylib::fails_on_seven(std::hint::black_box(8)), 8);
}
