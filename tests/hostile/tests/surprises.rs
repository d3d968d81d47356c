//! Issue 17, "surprises" (items 13 and 14): a probe by name on an IFUNC symbol must
//! probe the implementation the process calls, and an offset past the named function's
//! end must be refused. Each scenario runs in a child process (see the crate docs).

use hostile_tests::{is_child, report, run_child};
use probekit::{Error, Probe, PtRegs};
use std::ffi::c_void;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

fn count(_: &PtRegs) {
    HITS.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------
// Item 13: `.symbol("memcpy")`. glibc's memcpy is an IFUNC: its symbol is the resolver,
// and calls go to the implementation it chose (what `dlsym` returns). If the fix
// finds the implementation in probekit's own hit path, `Blacklisted` is right too.

type Memcpy = unsafe extern "C" fn(*mut c_void, *const c_void, usize) -> *mut c_void;

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_probe_memcpy_by_name() {
    if !is_child() {
        return;
    }
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks it up.
    let used = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"memcpy".as_ptr()) } as usize;
    let src = vec![0x5au8; 1 << 16];
    let mut dst = vec![0u8; 1 << 16];
    let r = Probe::builder().symbol("memcpy").pre(count).register();
    let (registered, addr) = (format!("{:?}", r.as_ref().map(|_| ())), r.as_ref().map_or(0, |p| p.address()));
    let blacklisted = matches!(r, Err(Error::Blacklisted { .. }));
    let copy: Memcpy = black_box(libc::memcpy);
    // SAFETY: both buffers are 64 KiB, distinct and live.
    unsafe { copy(dst.as_mut_ptr().cast(), src.as_ptr().cast(), dst.len()) };
    let hits = HITS.load(Ordering::Relaxed);
    // Unregistered before anything is printed (printing may call memcpy too).
    drop(r);
    report("register", registered);
    report("blacklisted", blacklisted);
    report("address", format!("{addr:#x}"));
    report("dlsym", format!("{used:#x}"));
    report("copied", dst == src);
    report("hits", hits);
}

/// Item 13.
#[test]
fn probe_on_memcpy_by_name_fires() {
    let out = run_child("child_probe_memcpy_by_name");
    out.assert_ok();
    let d = out.describe();
    assert_eq!(out.expect_value("copied"), "true", "{d}");
    if out.expect_value("blacklisted") == "true" {
        return;
    }
    assert_eq!(out.expect_value("register"), "Ok(())", "{d}");
    assert_eq!(out.expect_value("address"), out.expect_value("dlsym"), "memcpy must resolve to the implementation dlsym gives\n{d}");
    assert!(out.number("hits") >= 1, "a 64 KiB memcpy must hit the probe\n{d}");
}

// ---------------------------------------------------------------------------------
// Item 14: `.function(f).offset(n)` with `n` at or past `f`'s end. Two sized asm
// functions back to back, so that `f + size` is exactly the next function's entry (an
// instruction boundary, which the boundary check alone accepts).

/// `hostile_sized`'s size in bytes.
#[cfg(target_arch = "x86_64")]
const SIZED: usize = 6;
#[cfg(target_arch = "aarch64")]
const SIZED: usize = 8;

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".balign 16",
    ".globl hostile_sized",
    ".type hostile_sized, @function",
    "hostile_sized:",
    "mov eax, 7", // 5 bytes
    "ret",        // 1 byte
    ".size hostile_sized, . - hostile_sized",
    ".globl hostile_sized_next",
    ".type hostile_sized_next, @function",
    "hostile_sized_next:",
    "mov eax, 8",
    "ret",
    ".size hostile_sized_next, . - hostile_sized_next",
);

#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".balign 16",
    ".globl hostile_sized",
    ".type hostile_sized, %function",
    "hostile_sized:",
    "mov w0, #7",
    "ret",
    ".size hostile_sized, . - hostile_sized",
    ".globl hostile_sized_next",
    ".type hostile_sized_next, %function",
    "hostile_sized_next:",
    "mov w0, #8",
    "ret",
    ".size hostile_sized_next, . - hostile_sized_next",
);

extern "C" {
    fn hostile_sized() -> u32;
    fn hostile_sized_next() -> u32;
}

/// The asm functions as plain C function pointers.
fn sized() -> (extern "C" fn() -> u32, extern "C" fn() -> u32) {
    let (f, g) = (hostile_sized as unsafe extern "C" fn() -> u32, hostile_sized_next as unsafe extern "C" fn() -> u32);
    // SAFETY: both asm functions have exactly the ABI of `extern "C" fn() -> u32` and no
    // preconditions (they load a constant).
    unsafe {
        (
            std::mem::transmute::<unsafe extern "C" fn() -> u32, extern "C" fn() -> u32>(f),
            std::mem::transmute::<unsafe extern "C" fn() -> u32, extern "C" fn() -> u32>(g),
        )
    }
}

#[test]
#[ignore = "a child scenario: its parent test runs it in a process of its own"]
fn child_offset_past_function_end() {
    if !is_child() {
        return;
    }
    let (f, next) = sized();
    assert_eq!(f as usize + SIZED, next as usize, "the two functions are back to back");
    for (key, offset) in [("at_end", SIZED), ("far", 64)] {
        let r = Probe::builder().function(f).offset(offset).pre(count).register();
        report(&format!("{key}_register"), format!("{:?}", r.as_ref().map(|p| p.address())));
        let outside = matches!(r, Err(Error::OutsideFunction { function, size, .. }) if function == f as usize && size == SIZED);
        report(&format!("{key}_outside"), outside);
    }
    report("next_value", black_box(next)());
    report("nhit", HITS.load(Ordering::Relaxed));
}

/// Item 14.
#[test]
fn offset_past_function_end_is_refused() {
    let out = run_child("child_offset_past_function_end");
    out.assert_ok();
    let d = out.describe();
    assert_eq!(out.expect_value("at_end_outside"), "true", "f + size must be Err(OutsideFunction {{ function: f, size }})\n{d}");
    assert_eq!(out.expect_value("far_outside"), "true", "f + 64 must be Err(OutsideFunction {{ function: f, size }})\n{d}");
    assert_eq!(out.number("next_value"), 8, "{d}");
}
