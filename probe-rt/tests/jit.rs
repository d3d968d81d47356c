//! Functions declared at run time (`probe_rt::jit`): code in anonymous memory can be
//! probed by name and address, and optimized, while declared, and not before or after;
//! bad declarations get their typed error.

use probe_rt::jit::{self, JitError};
use probe_rt::{Error, Optimize, Probe};

/// `mov eax, 42; ret` / `movz w0, #42; ret`: a C-ABI `fn() -> u32`, and the offset of its `ret`.
#[cfg(target_arch = "x86_64")]
const ANSWER: (&[u8], usize) = (&[0xb8, 42, 0, 0, 0, 0xc3], 5);
#[cfg(target_arch = "aarch64")]
const ANSWER: (&[u8], usize) = (&[0x40, 0x05, 0x80, 0x52, 0xc0, 0x03, 0x5f, 0xd6], 4);

/// A fresh page holding `code`, written while read-write, then made read+execute; the
/// page after it stays read-write (not executable), whatever gets mapped near.
fn code_page(code: &[u8]) -> usize {
    let page = page_size();
    // SAFETY: a fresh anonymous mapping of two pages, ours alone (never unmapped);
    // `code` fits in the first.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
        assert_eq!(libc::mprotect(p, page, libc::PROT_READ | libc::PROT_EXEC), 0);
        sync_icache(p as usize, code.len());
        p as usize
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Makes freshly written code visible to instruction fetch (aarch64: `dc cvau`,
/// `ic ivau` per 4-byte step, which covers any line size; x86_64 needs nothing).
fn sync_icache(addr: usize, len: usize) {
    #[cfg(target_arch = "aarch64")]
    for a in (addr & !3..addr + len).step_by(4) {
        // SAFETY: cache maintenance by address on mapped memory (allowed at EL0 on Linux).
        unsafe { std::arch::asm!("dc cvau, {a}", "dsb ish", "ic ivau, {a}", "dsb ish", "isb", a = in(reg) a, options(nostack)) };
    }
    let _ = (addr, len);
}

fn call(f: usize) -> u32 {
    // SAFETY: `f` holds `ANSWER`, a C-ABI function taking nothing and returning an int.
    unsafe { std::mem::transmute::<usize, extern "C" fn() -> u32>(f)() }
}

#[test]
fn a_declared_function_is_probed_by_name_and_address_and_optimized() {
    let (code, ret_at) = ANSWER;
    let f = code_page(code);
    // Undeclared: no symbol proves a boundary, and no name finds it.
    // SAFETY (here and below): `f` and `f + ret_at` are instructions of `ANSWER`.
    let err = unsafe { Probe::builder().address(f) }.pre(|_| {}).register().err();
    assert_eq!(err, Some(Error::NoKnownStart { addr: f }));
    let err = Probe::builder().symbol("probekit_jit_answer").pre(|_| {}).register().err();
    assert_eq!(err, Some(Error::SymbolNotFound { name: "probekit_jit_answer".into() }));

    // SAFETY: `f..f + code.len()` is one function, entered at `f` only, unchanged while declared.
    let jit = unsafe { jit::declare("probekit_jit_answer", f, code.len()) }.expect("declared");
    assert_eq!((jit.name(), jit.addr(), jit.len()), ("probekit_jit_answer", f, code.len()));
    assert_eq!(probe_rt::__private::symbol_of(f + ret_at), Some(("probekit_jit_answer".to_string(), ret_at)));
    let entry = Probe::builder().symbol("probekit_jit_answer").optimize(Optimize::Required).pre(|_| {}).register().expect("optimized at the entry");
    let ret = unsafe { Probe::builder().address(f + ret_at) }.optimize(Optimize::Never).pre(|_| {}).register().expect("a breakpoint on the ret");
    assert!(entry.is_optimized());
    assert_eq!(call(f), 42);
    assert_eq!((entry.nhit(), ret.nhit()), (1, 1));
    // Past the end: the declared size bounds `.offset`.
    let err = Probe::builder().symbol("probekit_jit_answer").offset(code.len()).pre(|_| {}).register().err();
    assert_eq!(err, Some(Error::OutsideFunction { addr: f + code.len(), function: f, size: code.len() }));
    entry.unregister().unwrap();
    ret.unregister().unwrap();
    #[cfg(target_arch = "x86_64")]
    {
        // The ret cannot be displaced: the window would run past the declared end.
        let err = Probe::builder().symbol("probekit_jit_answer").offset(ret_at).optimize(Optimize::Required).pre(|_| {}).register().err();
        assert!(matches!(err, Some(Error::NotOptimized { reason: probe_rt::NotOptimized::UnrelocatableInstruction { .. }, .. })), "{err:?}");
    }

    // Taken back: as before the declaration.
    drop(jit);
    let err = unsafe { Probe::builder().address(f) }.pre(|_| {}).register().err();
    assert_eq!(err, Some(Error::NoKnownStart { addr: f }));
    let err = Probe::builder().symbol("probekit_jit_answer").pre(|_| {}).register().err();
    assert_eq!(err, Some(Error::SymbolNotFound { name: "probekit_jit_answer".into() }));
    assert_eq!(call(f), 42);
}

#[test]
fn bad_declarations_are_refused_with_the_reason() {
    let (code, _) = ANSWER;
    let f = code_page(code);
    // SAFETY (every declaration below): `f` holds `ANSWER`; the ones that succeed
    // declare it whole or a prefix of its first instruction's bytes that nothing probes.
    unsafe {
        assert_eq!(jit::declare("probekit_jit_empty", f, 0).err(), Some(JitError::Empty { addr: f }));
        assert_eq!(jit::declare("probekit_jit_overflow", usize::MAX - 1, 4).err(), Some(JitError::Overflow { addr: usize::MAX - 1, len: 4 }));
        // Past the page: the next one is not executable.
        let page = page_size();
        assert_eq!(jit::declare("probekit_jit_long", f, page + 1).err(), Some(JitError::NotExecutable { addr: f + page }));
        // A writable, not executable buffer.
        let data = [0u8; 64];
        let at = data.as_ptr() as usize;
        assert_eq!(jit::declare("probekit_jit_data", at, 64).err(), Some(JitError::NotExecutable { addr: at }));

        let one = jit::declare("probekit_jit_one", f, code.len()).expect("declared");
        let err = jit::declare("probekit_jit_two", f + 2, 2).err();
        assert_eq!(err, Some(JitError::Overlaps { other: "probekit_jit_one".into(), addr: f, len: code.len() }));
        let g = code_page(code);
        assert_eq!(jit::declare("probekit_jit_one", g, code.len()).err(), Some(JitError::NameTaken { name: "probekit_jit_one".into(), addr: f }));
        let two = jit::declare("probekit_jit_two", g, code.len()).expect("another range, another name");
        assert!(err.unwrap().to_string().contains("overlaps `probekit_jit_one`"));
        drop(one);
        // The range and the name are free again.
        let again = jit::declare("probekit_jit_one", f, code.len()).expect("declared again");
        drop((again, two));
    }
}
