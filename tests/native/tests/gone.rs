//! A probe in a shared library that is unloaded: the kernel's `[GONE]`. The library
//! built from `c/gone.c` is loaded with `dlopen`, probed, called, and unloaded with
//! `dlclose`; the probe must then list as gone, and unregistering it must write nothing
//! where its code was.
//!
//! The tests share one process and one library: each takes `SERIAL`, so that none
//! unloads the library under another.

use native_tests::GONE_SO;
use probekit::{Error, Probe, ProbeInfo, PtRegs};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The arguments the pre handler saw last: `a << 32 | b`.
static SEEN: AtomicU64 = AtomicU64::new(0);

fn see_args(r: &PtRegs) {
    let (a, b) = (r.arg(0).unwrap_or(0) & 0xffff_ffff, r.arg(1).unwrap_or(0) & 0xffff_ffff);
    SEEN.store(a << 32 | b, Ordering::Relaxed);
}

/// `int probekit_gone_add(int, int)` of `c/gone.c`.
type Add = extern "C" fn(i32, i32) -> i32;

/// The library, loaded.
struct Lib {
    handle: *mut c_void,
    add: Add,
}

/// The dynamic linker's last error message.
fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message that stays valid until
    // this thread's next dl call (none before it is copied).
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn load() -> Lib {
    let path = std::ffi::CString::new(GONE_SO).expect("no NUL in a path");
    // SAFETY: a NUL-terminated path of a plain C library built for this target (no
    // constructors).
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen {GONE_SO}: {}", dlerror());
    // SAFETY: a live handle and a NUL-terminated name.
    let sym = unsafe { libc::dlsym(handle, c"probekit_gone_add".as_ptr()) };
    assert!(!sym.is_null(), "dlsym probekit_gone_add: {}", dlerror());
    // SAFETY: gone.c defines `int probekit_gone_add(int a, int b)`, the C ABI of `Add`.
    let add = unsafe { std::mem::transmute::<*mut c_void, Add>(sym) };
    assert!(mapped().is_some());
    Lib { handle, add }
}

/// The ranges of the library in `/proc/self/maps`, if it is mapped.
fn mapped() -> Option<Vec<(usize, usize)>> {
    let path = std::fs::canonicalize(GONE_SO).expect("the library exists");
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let ranges: Vec<(usize, usize)> = maps
        .lines()
        .filter(|l| l.split_whitespace().nth(5).is_some_and(|p| std::path::Path::new(p) == path))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))
        })
        .collect();
    (!ranges.is_empty()).then_some(ranges)
}

/// Unloads the library and checks that it is really unmapped.
fn unload(lib: Lib) {
    assert!(mapped().is_some(), "loaded");
    // SAFETY: the handle came from dlopen and is closed once (`lib` is consumed); no
    // pointer into the library is used after this.
    assert_eq!(unsafe { libc::dlclose(lib.handle) }, 0, "dlclose: {}", dlerror());
    assert_eq!(mapped(), None, "dlclose left {GONE_SO} mapped");
}

/// The listing of the probe at `addr`: its info and its line of `list()`'s text.
fn listed(addr: usize) -> Option<(ProbeInfo, String)> {
    let list = probekit::list();
    let info = list.0.iter().find(|p| p.addr == addr)?.clone();
    let line = list.to_string().lines().find(|l| l.starts_with(&format!("{addr:016x} ")))?.to_string();
    Some((info, line))
}

/// Probed, called, unloaded: the probe lists as `[GONE]`; dropping its handle then
/// writes nothing where the code was (there is nothing mapped there), and does not crash.
#[test]
fn a_probe_in_an_unloaded_library_lists_as_gone_and_drops_safely() {
    let _s = serial();
    let lib = load();
    let addr = lib.add as usize;
    // SAFETY: the address is an instruction of this test's code, not data.
    let p = unsafe { Probe::builder().address(addr) }.pre(see_args).register().expect("probe the library");
    assert_eq!(std::hint::black_box(lib.add)(2, 3), 5);
    assert_eq!(p.nhit(), 1);
    assert_eq!(SEEN.load(Ordering::Relaxed), 2 << 32 | 3, "the handler saw the arguments");

    let (info, line) = listed(addr).expect("listed while loaded");
    assert!(!info.gone && info.enabled, "{line}");
    assert_eq!(info.symbol, Some(("probekit_gone_add".to_string(), 0)), "{line}");
    assert!(line.contains("probekit_gone_add+0x0") && !line.contains("[GONE]"), "{line}");

    unload(lib);
    let (info, line) = listed(addr).expect("a gone probe is still listed until unregistered");
    assert!(info.gone, "{line}");
    assert_eq!(info.symbol, None, "{line}");
    assert!(line.ends_with("[GONE]"), "{line}");

    // Disarming must not restore the original bytes: there is no code to restore them
    // to (a write to the unmapped page would kill the test with SIGSEGV).
    drop(p);
    assert_eq!(mapped(), None, "nothing was mapped back");
}

/// While the library is loaded, its function can be probed by name; once it is
/// unloaded, the name is no longer found.
#[test]
fn a_library_function_is_probed_by_name_while_loaded() {
    let _s = serial();
    let lib = load();
    let p = Probe::builder().symbol("probekit_gone_add").pre(see_args).register().expect("probe by name");
    assert_eq!(p.address(), lib.add as usize, "the name resolves to dlsym's address");
    assert_eq!(std::hint::black_box(lib.add)(40, 2), 42);
    assert_eq!(p.nhit(), 1);
    assert_eq!(SEEN.load(Ordering::Relaxed), 40 << 32 | 2);
    assert!(!listed(p.address()).expect("listed").0.gone);
    // Unregistered while loaded: the text is restored, the call runs unprobed.
    p.unregister().expect("unregister while loaded");
    assert_eq!(std::hint::black_box(lib.add)(1, 1), 2);
    let addr = lib.add as usize;
    assert!(listed(addr).is_none());
    unload(lib);
    let e = Probe::builder().symbol("probekit_gone_add").pre(see_args).register().unwrap_err();
    assert!(matches!(&e, Error::SymbolNotFound { name } if name == "probekit_gone_add"), "{e}");
}

// What unregistering a gone probe does: it succeeds, writes nothing, and leaves no
// armed record behind to capture a later load at the same address.

/// Unregistering a gone probe succeeds and takes it out of the list (as the kernel's
/// `unregister_kprobe` of a `[GONE]` probe does).
#[test]
fn unregistering_a_gone_probe_retires_it() {
    let _s = serial();
    let lib = load();
    let addr = lib.add as usize;
    // SAFETY: the address is an instruction of this test's code, not data.
    let p = unsafe { Probe::builder().address(addr) }.pre(see_args).register().expect("probe the library");
    unload(lib);
    let r = p.unregister();
    assert_eq!(r, Ok(()), "unregistering a gone probe");
    assert!(listed(addr).is_none(), "an unregistered probe is not listed");
}

/// The library loaded again can be probed again after the gone probe was dropped. This
/// matters when the reload lands at the old address: natively it does (the kernel
/// hands out the same free range); under qemu-user it lands elsewhere.
#[test]
fn a_reloaded_library_can_be_probed_again() {
    let _s = serial();
    let lib = load();
    let first = lib.add as usize;
    // SAFETY: the address is an instruction of this test's code, not data.
    let p = unsafe { Probe::builder().address(first) }.pre(see_args).register().expect("probe the library");
    unload(lib);
    drop(p);
    let lib = load();
    let again = lib.add as usize;
    // SAFETY: the address is an instruction of this test's code, not data.
    let p = unsafe { Probe::builder().address(again) }.pre(see_args).register().expect("probe the reloaded library");
    let r = std::hint::black_box(lib.add)(5, 6);
    let hits = p.nhit();
    drop(p);
    unload(lib);
    assert_eq!(r, 11);
    assert_eq!(hits, 1, "the reloaded function was probed (loaded at {again:#x}, first at {first:#x})");
}

/// Whatever is mapped at a gone probe's address later is not written by its
/// unregistration: here an executable anonymous page.
#[test]
fn a_gone_probe_writes_nothing_into_a_later_mapping() {
    let _s = serial();
    let lib = load();
    let addr = lib.add as usize;
    // SAFETY: the address is an instruction of this test's code, not data.
    let p = unsafe { Probe::builder().address(addr) }.pre(see_args).register().expect("probe the library");
    unload(lib);
    // SAFETY: sysconf has no preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let page = addr & !(ps - 1);
    // SAFETY: a new anonymous mapping where the library was (nothing is there now;
    // MAP_FIXED_NOREPLACE replaces nothing), filled, then made read + execute as code is.
    let mapped_at = unsafe {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        let m = libc::mmap(page as *mut c_void, ps, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0);
        assert_eq!(m as usize, page, "map a page where the library was");
        std::ptr::write_bytes(m as *mut u8, 0x5a, ps);
        assert_eq!(libc::mprotect(m, ps, libc::PROT_READ | libc::PROT_EXEC), 0);
        m as *const u8
    };
    drop(p);
    // SAFETY: the page is mapped readable (above) and never unmapped.
    let bytes = unsafe { std::slice::from_raw_parts(mapped_at, ps) };
    assert!(bytes.iter().all(|b| *b == 0x5a), "the page at {page:#x} was written: {:02x?}", &bytes[addr - page..addr - page + 4]);
}
