//! Writing code: through the kernel or through page protections, and instruction-cache
//! sync.
//!
//! Two ways to write code ([`WriteMode`]), chosen once by a self-test ([`text_writes`]):
//! - [`WriteMode::Kernel`], the default: `pwrite` on `/proc/self/mem`, as the kernel's
//!   own `text_poke` writes through an alias. No page is ever writable and executable,
//!   not even for a moment, and a page unmapped by another thread meanwhile (a racing
//!   `dlclose`) gives an error, not a SIGSEGV.
//! - [`WriteMode::Mprotect`], the fallback: one store while `mprotect` makes the pages
//!   writable (and executable: threads running through them go on), their protection
//!   given back right after. Used where the self-test shows that a write through the
//!   kernel is refused (`PROC_MEM_NO_FORCE`, `proc_mem.force_override=never`, a
//!   seccomp filter), not seen by code that already ran (qemu-user, the aarch64 lane,
//!   keeps its translation of the old instruction: DESIGN.md), or not provably atomic
//!   (aarch64 with FEAT_MOPS, below).
//!
//! Where neither works (the kernel's write refused *and* W^X enforced: SELinux without
//! `execmem`/`execmod`, PaX MPROTECT, a seccomp filter on `mprotect`), every
//! registration fails with [`Error::TextNotWritable`], naming both failures, before
//! anything is allocated or written. `PROBEKIT_TEXT_WRITE=kernel` or `=mprotect` forces
//! a mode (for tests of both; any other value, e.g. `auto`, leaves the choice to the
//! self-test); the self-test then only checks that the forced mode can write at all
//! (a forced kernel mode is taken even where qemu-user does not see its writes, never
//! where they may tear).
//!
//! # Single-copy atomicity
//! The `text_poke_bp` protocol (DESIGN.md rule 6) needs every write that a running
//! thread may meet to be single-copy atomic: one byte on x86_64 (the `int3` of a
//! breakpoint, and the first byte of a site; a site's other bytes are written only
//! behind an `int3`), one aligned 4-byte word on aarch64 (`brk`, and a site's
//! `nop` <-> `bl`). Longer writes go only to code no thread runs yet (fresh slots,
//! veneers). How each path keeps that:
//! - **mprotect**: [`store`] writes 1, 2, 4 and 8 bytes at an address aligned to their
//!   size with *one* atomic store of that width (`AtomicU8`/`AtomicU32`…: x86_64 `mov`,
//!   aarch64 `stlrb`/`stlr`, single-copy atomic by the Intel SDM vol. 3A ("Guaranteed Atomic Operations") and
//!   the Arm ARM B2.2.1), never a byte-wise copy; only other lengths are copied.
//! - **kernel**, traced through Linux: `mem_rw()` (fs/proc/base.c) copies the buffer
//!   into a bounce page and calls `access_remote_vm(mm, addr, page, this_len, flags)`
//!   with `FOLL_FORCE | FOLL_WRITE`, at most a page at a time; `__access_remote_vm()`
//!   (mm/memory.c) takes the page with `get_user_page_vma_remote()` (breaking
//!   copy-on-write first: the new private copy holds the old bytes before the process's
//!   page table points at it) and writes through the kernel's alias with
//!   `copy_to_user_page(vma, page, addr, maddr + offset, buf, bytes)`.
//!   - x86_64: `copy_to_user_page` is include/asm-generic/cacheflush.h's
//!     `memcpy(dst, src, len)` plus an empty `flush_icache_user_page`. For one byte,
//!     arch/x86/lib/memcpy_64.S stores one byte: `rep movsb` with `rcx = 1` (ERMS/FSRM),
//!     or `movzbl (%rsi), %ecx` … `.Lstore_1byte: movb %cl, (%rdi)` (`memcpy_orig`).
//!     A one-byte store cannot tear: atomic.
//!   - aarch64: arch/arm64/mm/flush.c's `copy_to_user_page()` is
//!     `memcpy(dst, src, len); flush_ptrace_access(…)`. arch/arm64/lib/memcpy.S
//!     (`__pi_memcpy_generic`, the optimized-routines import) copies 4 bytes in
//!     `L(copy8)`: `ldr A_lw, [src]; ldr B_lw, [srcend, -4]; str A_lw, [dstin];
//!     str B_lw, [dstend, -4]`, two 32-bit stores of the same word to the same address
//!     (`dstend - 4 == dstin`), each aligned because the alias keeps the offset in the
//!     page, so each single-copy atomic (Arm ARM B2.2.1): a thread sees the old word,
//!     then the new one. Older kernels' copy_template.S (`.Ltiny15`: `tbz count, #2`;
//!     `ldr1 tmp1w, src, #4; str1 tmp1w, dst, #4`; copies under 16 bytes skip the
//!     alignment prologue) make one 32-bit store. **But** kernels with the MOPS
//!     `__pi_memcpy` (`alternative_if_not ARM64_HAS_MOPS; b __pi_memcpy_generic`, else
//!     `cpyp; cpym; cpye`) copy with FEAT_MOPS instructions, each of which copies an
//!     IMPLEMENTATION DEFINED part of the bytes and may be interrupted between them: the
//!     Arm ARM promises no single-copy atomicity for the word. So on aarch64 the kernel
//!     path is taken only when `AT_HWCAP2` lacks `HWCAP2_MOPS` (the kernel's
//!     `ARM64_HAS_MOPS` and that hwcap both follow `ID_AA64ISAR2_EL1.MOPS`,
//!     arch/arm64/kernel/cpufeature.c); with it the self-test reports
//!     [`WriteFailure::NotAtomic`] and the fallback is used.
//!
//! After either write, [`sync_icache`] (aarch64) and, for text a thread may run,
//! [`sync_cores`] make the new instruction the one fetched.

use crate::Error;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

/// Copies `len` bytes of this process's memory at `addr`, or None if any of them is
/// not mapped readable *now*: through the kernel (`process_vm_readv`), so that code
/// unmapped by another thread after a `/proc/self/maps` check (a racing `dlclose`)
/// gives an error instead of a SIGSEGV. Where the call is missing (qemu-user), through
/// a pipe, whose `write` fails with `EFAULT` on memory that is not readable: the same
/// guarantee (qemu checks the guest's pages for every system call's buffers).
pub(crate) fn read(addr: usize, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    // SAFETY: the local iovec is `buf`, `len` bytes we own; the remote one is only read
    // by the kernel, which checks it.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n == len as isize {
        return Some(buf);
    }
    if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
        return None;
    }
    read_through_pipe(addr, &mut buf).then_some(buf)
}

/// Fills `buf` from this process's memory at `addr` through a pipe: the kernel copies
/// (or refuses with `EFAULT`), never a load of ours that could fault. One pipe for the
/// process, used under its lock; chunks of a page, well within a pipe's capacity.
fn read_through_pipe(addr: usize, buf: &mut [u8]) -> bool {
    static PIPE: std::sync::Mutex<Option<[libc::c_int; 2]>> = std::sync::Mutex::new(None);
    let mut pipe = PIPE.lock().unwrap_or_else(|p| p.into_inner());
    if pipe.is_none() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which has room for two.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return false;
        }
        *pipe = Some(fds);
    }
    let Some([r, w]) = *pipe else { return false };
    for (k, chunk) in buf.chunks_mut(4096).enumerate() {
        let from = addr.wrapping_add(k * 4096);
        // SAFETY: the kernel reads `chunk.len()` bytes at `from` for the pipe, checking
        // every page (EFAULT, nothing read, if one is not readable); nothing of ours
        // touches that memory.
        let n = unsafe { libc::write(w, from as *const libc::c_void, chunk.len()) };
        let mut got = 0;
        while got < n.max(0) as usize {
            // SAFETY: reads into the rest of `chunk`, memory we own, at most what the
            // pipe holds (the write above).
            let m = unsafe { libc::read(r, chunk[got..].as_mut_ptr().cast(), n as usize - got) };
            if m <= 0 {
                return false; // cannot happen: the bytes are in the pipe
            }
            got += m as usize;
        }
        if n != chunk.len() as isize {
            return false; // a page of the range is not readable (the pipe is drained)
        }
    }
    true
}

/// The page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// How code is written (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Through the kernel (`/proc/self/mem`): no page is ever writable and executable.
    Kernel,
    /// A store while `mprotect` makes the page writable (qemu-user, kernels that
    /// refuse `/proc/self/mem` writes).
    Mprotect,
}

/// Why one way of writing code is not used in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFailure {
    /// A system call was refused: its name and errno (`pwrite /proc/self/mem` refused
    /// by the kernel or a filter; `mprotect` to writable and executable refused by a
    /// W^X policy).
    Os {
        /// The call.
        call: &'static str,
        /// Its errno.
        errno: i32,
    },
    /// The write went through, but code that had run before kept running the old
    /// instruction (qemu-user translates code once and does not see the kernel's write).
    NotSeen,
    /// The write is not provably single-copy atomic: on aarch64 with FEAT_MOPS the
    /// kernel may copy a 4-byte instruction in parts (see the module docs).
    NotAtomic,
    /// `PROBEKIT_TEXT_WRITE` forced the other mode.
    Forced,
}

impl std::fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteFailure::Os { call, errno } => write!(f, "{call} failed: {}", std::io::Error::from_raw_os_error(*errno)),
            WriteFailure::NotSeen => write!(f, "written, but code that had run kept running the old instruction (as under qemu-user)"),
            WriteFailure::NotAtomic => {
                write!(f, "the kernel copies with FEAT_MOPS instructions, which may tear a 4-byte instruction seen by a running thread")
            }
            WriteFailure::Forced => write!(f, "not used (PROBEKIT_TEXT_WRITE forces the other mode)"),
        }
    }
}

/// How this process writes code, and why: what the self-test found (or the setting
/// forced) at first use. [`crate::list`]'s listing prints it as its first line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextWrites {
    /// Through `/proc/self/mem`; `forced` by `PROBEKIT_TEXT_WRITE=kernel` rather than
    /// chosen by the self-test.
    Kernel {
        /// Set by `PROBEKIT_TEXT_WRITE`.
        forced: bool,
    },
    /// With `mprotect`, because of what stopped the kernel's way
    /// ([`WriteFailure::Forced`] when `PROBEKIT_TEXT_WRITE=mprotect`).
    Mprotect {
        /// Why not through `/proc/self/mem`.
        kernel: WriteFailure,
    },
    /// Not at all: every registration fails with [`Error::TextNotWritable`].
    Neither {
        /// Why not through `/proc/self/mem`.
        kernel: WriteFailure,
        /// Why not with `mprotect`.
        mprotect: WriteFailure,
    },
}

impl TextWrites {
    /// The mode in use, if any.
    pub fn mode(&self) -> Option<WriteMode> {
        match self {
            TextWrites::Kernel { .. } => Some(WriteMode::Kernel),
            TextWrites::Mprotect { .. } => Some(WriteMode::Mprotect),
            TextWrites::Neither { .. } => None,
        }
    }
}

/// As the listing's header says it: `/proc/self/mem (kernel)`,
/// `mprotect (fallback: …why…)`, `none (…both whys…)`.
impl std::fmt::Display for TextWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TextWrites::Kernel { forced: false } => write!(f, "/proc/self/mem (kernel)"),
            TextWrites::Kernel { forced: true } => write!(f, "/proc/self/mem (kernel, forced by PROBEKIT_TEXT_WRITE)"),
            TextWrites::Mprotect { kernel: WriteFailure::Forced } => write!(f, "mprotect (forced by PROBEKIT_TEXT_WRITE)"),
            TextWrites::Mprotect { kernel } => write!(f, "mprotect (fallback: /proc/self/mem {kernel})"),
            TextWrites::Neither { kernel, mprotect } => {
                write!(f, "none, no probe can be registered (/proc/self/mem: {kernel}; mprotect: {mprotect})")
            }
        }
    }
}

/// How this process writes code: forced by `PROBEKIT_TEXT_WRITE`, else what the
/// self-test found at first use (see the module docs).
pub fn text_writes() -> TextWrites {
    static CHOICE: std::sync::OnceLock<TextWrites> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(self_test)
}

/// The mode in use: forced by `PROBEKIT_TEXT_WRITE`, else the kernel's if the
/// self-test shows it works here, else `mprotect` if that does. `None` where neither
/// works ([`text_writes`] says why; registration fails with [`Error::TextNotWritable`]).
pub fn write_mode() -> Option<WriteMode> {
    text_writes().mode()
}

/// The mode in use, or the error every registration gets where there is none: called
/// first by registration, so that nothing is allocated or written before it fails.
pub(crate) fn writable() -> Result<WriteMode, Error> {
    match text_writes() {
        TextWrites::Kernel { .. } => Ok(WriteMode::Kernel),
        TextWrites::Mprotect { .. } => Ok(WriteMode::Mprotect),
        TextWrites::Neither { kernel, mprotect } => Err(Error::TextNotWritable { kernel, mprotect }),
    }
}

/// `/proc/self/mem`, opened once for writing (or the errno of the open).
fn proc_mem() -> Result<&'static std::fs::File, i32> {
    static MEM: std::sync::OnceLock<Result<std::fs::File, i32>> = std::sync::OnceLock::new();
    MEM.get_or_init(|| std::fs::OpenOptions::new().read(true).write(true).open("/proc/self/mem").map_err(|e| e.raw_os_error().unwrap_or(0)))
        .as_ref()
        .map_err(|e| *e)
}

/// Writes `bytes` at `addr` through `/proc/self/mem`, with one `pwrite` (one
/// `memcpy` of `bytes.len()` in the kernel: see the module docs).
fn kernel_write(addr: usize, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    let mem = proc_mem().map_err(|errno| Error::Os { addr, call: "open /proc/self/mem", errno })?;
    match mem.write_at(bytes, addr as u64) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(_) => Err(Error::Os { addr, call: "pwrite /proc/self/mem", errno: libc::EIO }),
        Err(e) => Err(Error::Os { addr, call: "pwrite /proc/self/mem", errno: e.raw_os_error().unwrap_or(0) }),
    }
}

fn protect(start: usize, len: usize, prot: libc::c_int, addr: usize) -> Result<(), Error> {
    // SAFETY: changes the protection of pages of an existing mapping of this process
    // (callers pass pages of a mapping found in /proc/self/maps, or the self-test's
    // own page); no memory is freed.
    let r = unsafe { libc::mprotect(start as *mut libc::c_void, len, prot) };
    if r == 0 {
        Ok(())
    } else {
        Err(Error::last_os(addr, "mprotect"))
    }
}

/// Writes `bytes` at `addr` with a store while `mprotect` makes its pages (of a
/// mapping whose protection is `prot`) writable too; gives them `prot` back, and
/// synchronises the instruction cache. All of it with the dynamic loader's lock held
/// (see [`with_loader_lock`]): a `dlclose` on another thread cannot unmap the pages
/// between the `mprotect` and the store (which would fault), only before, when the
/// `mprotect` fails.
fn mprotect_write(addr: usize, bytes: &[u8], prot: libc::c_int) -> Result<(), Error> {
    let ps = page_size();
    let start = addr & !(ps - 1);
    let len = (addr + bytes.len()).next_multiple_of(ps) - start;
    with_loader_lock(|| {
        protect(start, len, prot | libc::PROT_WRITE, addr)?;
        // SAFETY: [addr, addr + len) lies in pages of one mapping of this process (the
        // caller's check, or the self-test's own page), writable now, and stays mapped
        // while the loader's lock is held.
        unsafe { store(addr, bytes) };
        sync_icache(addr, bytes.len());
        // Give the pages their protection back whatever happened above.
        protect(start, len, prot, addr)
    })
}

/// Runs `f` with the dynamic loader's lock held: inside the first callback of
/// `dl_iterate_phdr`, which holds glibc's `dl_load_write_lock`, the lock `dlclose`
/// holds while it unmaps an object (glibc elf/dl-close.c, `_dl_close_worker`: the
/// `DL_UNMAP` of each object is inside it). `f` must not panic (it runs in a C
/// callback, where a panic aborts) nor wait for another thread that loads or unloads.
fn with_loader_lock<R, F: FnOnce() -> R>(f: F) -> R {
    struct Call<F, R> {
        f: Option<F>,
        r: Option<R>,
    }
    /// # Safety
    /// `data` must point to a live, unaliased `Call<F, R>`.
    unsafe extern "C" fn first<F: FnOnce() -> R, R>(_info: *mut libc::dl_phdr_info, _size: usize, data: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `data` is the `&mut Call` passed to `dl_iterate_phdr` below, which
        // calls back synchronously while that borrow lives.
        let call = unsafe { &mut *(data as *mut Call<F, R>) };
        if let Some(f) = call.f.take() {
            call.r = Some(f());
        }
        1 // stop: `f` ran
    }
    let mut call = Call { f: Some(f), r: None };
    // SAFETY: the callback matches what `dl_iterate_phdr` expects and uses `data` only
    // as the `Call` passed here, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first::<F, R>), &mut call as *mut Call<F, R> as *mut libc::c_void) };
    match (call.r, call.f) {
        (Some(r), _) => r,
        // No loaded object at all (cannot happen in a process that runs this code).
        (None, Some(f)) => f(),
        (None, None) => unreachable!("`f` ran, or it is still here"),
    }
}

/// Stores `bytes` at `addr`: 1, 2, 4 or 8 bytes at an address aligned to their size
/// with one single-copy atomic store of that width, so a thread executing there sees
/// the old or the new instruction; other lengths (code no thread runs yet, or behind
/// an `int3`) with a copy.
///
/// # Safety
/// `[addr, addr + bytes.len())` is writable memory of this process that no Rust
/// reference covers (code, or the self-test's page).
unsafe fn store(addr: usize, bytes: &[u8]) {
    let p = addr as *mut u8;
    match *bytes {
        // SAFETY: the caller's guarantee; a byte has no alignment to keep.
        [b] => unsafe { AtomicU8::from_ptr(p) }.store(b, Ordering::Release),
        // SAFETY: the caller's guarantee; 2-aligned (checked).
        [a, b] if addr.is_multiple_of(2) => unsafe { AtomicU16::from_ptr(p.cast()) }.store(u16::from_ne_bytes([a, b]), Ordering::Release),
        // SAFETY: the caller's guarantee; 4-aligned (checked).
        [a, b, c, d] if addr.is_multiple_of(4) => unsafe { AtomicU32::from_ptr(p.cast()) }.store(u32::from_ne_bytes([a, b, c, d]), Ordering::Release),
        // SAFETY: the caller's guarantee; 8-aligned (checked).
        [a, b, c, d, e, f, g, h] if addr.is_multiple_of(8) => {
            unsafe { AtomicU64::from_ptr(p.cast()) }.store(u64::from_ne_bytes([a, b, c, d, e, f, g, h]), Ordering::Release)
        }
        // SAFETY: the caller's guarantee; `bytes` is ours and does not overlap it.
        _ => unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) },
    }
}

/// `mov eax, imm8; ret` (x86_64) or `mov w0, #imm8; ret` (aarch64): the self-test's
/// function, a C-ABI `fn() -> u32` returning `imm`.
fn ret_imm(imm: u8) -> [u8; SELF_TEST_LEN] {
    #[cfg(target_arch = "x86_64")]
    return [0xb8, imm, 0, 0, 0, 0xc3];
    #[cfg(target_arch = "aarch64")]
    {
        let movz = 0x5280_0000u32 | (imm as u32) << 5; // movz w0, #imm
        let [a, b, c, d] = movz.to_le_bytes();
        [a, b, c, d, 0xc0, 0x03, 0x5f, 0xd6] // ret
    }
}
#[cfg(target_arch = "x86_64")]
const SELF_TEST_LEN: usize = 6;
#[cfg(target_arch = "aarch64")]
const SELF_TEST_LEN: usize = 8;

/// aarch64: whether the kernel may copy with FEAT_MOPS instructions (`HWCAP2_MOPS`,
/// bit 43 of `AT_HWCAP2`, arch/arm64/include/uapi/asm/hwcap.h), which makes its
/// 4-byte writes not provably atomic (see the module docs).
#[cfg(target_arch = "aarch64")]
fn kernel_copy_may_tear() -> bool {
    const HWCAP2_MOPS: libc::c_ulong = 1 << 43;
    // SAFETY: getauxval has no preconditions.
    let hwcap2 = unsafe { libc::getauxval(libc::AT_HWCAP2) };
    hwcap2 & HWCAP2_MOPS != 0
}

/// x86_64: the kernel's one-byte copies cannot tear (see the module docs).
#[cfg(not(target_arch = "aarch64"))]
fn kernel_copy_may_tear() -> bool {
    false
}

/// The self-test: a probekit-owned function is run, rewritten through the kernel and
/// run again; the kernel's way works here if the second run returns the new value.
/// Where it does not, the same function is rewritten with `mprotect` and run again.
/// `PROBEKIT_TEXT_WRITE` skips the other way (and, forcing the kernel's, accepts a
/// write qemu-user does not see).
fn self_test() -> TextWrites {
    let forced = match std::env::var("PROBEKIT_TEXT_WRITE").as_deref() {
        Ok("kernel") => Some(WriteMode::Kernel),
        Ok("mprotect") => Some(WriteMode::Mprotect),
        _ => None,
    };
    // A fresh read+execute page (mapped writable, filled, then made executable: never
    // both). It stays mapped, one page for the life of the process: nothing gains by
    // freeing it.
    let f = match alloc_code(&ret_imm(1)) {
        Ok(f) => f,
        Err(e) => {
            let why = match e {
                Error::Os { call, errno, .. } => WriteFailure::Os { call, errno },
                _ => WriteFailure::Os { call: "mmap", errno: 0 },
            };
            return TextWrites::Neither { kernel: why, mprotect: why };
        }
    };
    // SAFETY: `f` is a read+execute page holding `mov eax/w0, imm; ret`, a function of
    // the C ABI taking nothing and returning an int; only this function rewrites it,
    // always with another such function.
    let run = || unsafe { std::mem::transmute::<usize, extern "C" fn() -> u32>(f)() };
    // Run once before any write, so that qemu-user translates the old code.
    let first = run();
    let kernel = match forced {
        Some(WriteMode::Mprotect) => Err(WriteFailure::Forced),
        _ if kernel_copy_may_tear() => Err(WriteFailure::NotAtomic),
        _ => match kernel_write(f, &ret_imm(42)) {
            Err(Error::Os { call, errno, .. }) => Err(WriteFailure::Os { call, errno }),
            Err(_) => Err(WriteFailure::Os { call: "pwrite /proc/self/mem", errno: 0 }),
            Ok(()) => {
                sync_icache(f, SELF_TEST_LEN);
                match (first, run()) {
                    (1, 42) => Ok(()),
                    _ if forced == Some(WriteMode::Kernel) => Ok(()),
                    _ => Err(WriteFailure::NotSeen),
                }
            }
        },
    };
    let kernel = match kernel {
        Ok(()) => return TextWrites::Kernel { forced: forced.is_some() },
        Err(why) => why,
    };
    let mprotect = match forced {
        Some(WriteMode::Kernel) => Err(WriteFailure::Forced),
        _ => match mprotect_write(f, &ret_imm(43), libc::PROT_READ | libc::PROT_EXEC) {
            Err(Error::Os { call, errno, .. }) => Err(WriteFailure::Os { call, errno }),
            Err(_) => Err(WriteFailure::Os { call: "mprotect", errno: 0 }),
            Ok(()) => {
                if run() == 43 {
                    Ok(())
                } else {
                    Err(WriteFailure::NotSeen)
                }
            }
        },
    };
    match mprotect {
        Ok(()) => TextWrites::Mprotect { kernel },
        Err(mprotect) => TextWrites::Neither { kernel, mprotect },
    }
}

/// Writes `bytes` at `addr` in executable memory, then synchronises the instruction
/// cache, in the [`write_mode`]. A write a running thread may meet (x86_64: 1 byte,
/// aarch64: an aligned 4-byte word) is single-copy atomic on both paths (see the
/// module docs), so such threads see the old or the new instruction; longer writes are
/// for code no thread runs yet (fresh out-of-line slots) or guarded by the
/// `text_poke_bp` protocol.
pub(crate) fn write_code(addr: usize, bytes: &[u8]) -> Result<(), Error> {
    let mode = writable()?;
    let m = crate::sys::maps::executable(addr)?;
    if addr + bytes.len() > m.end {
        return Err(Error::NotExecutable { addr: m.end });
    }
    if mode == WriteMode::Kernel {
        kernel_write(addr, bytes)?;
        sync_icache(addr, bytes.len());
        return Ok(());
    }
    let r = mprotect_write(addr, bytes, m.prot);
    match (r, text_writes()) {
        // The self-test's anonymous page could be made writable, this mapping cannot
        // (SELinux allows `execmem` but not `execmod` on file-backed text): say why.
        (Err(Error::Os { call: "mprotect", errno, .. }), TextWrites::Mprotect { kernel }) if errno == libc::EACCES || errno == libc::EPERM => {
            Err(Error::TextNotWritable { kernel, mprotect: WriteFailure::Os { call: "mprotect", errno } })
        }
        (r, _) => r,
    }
}

/// Makes a code change visible to instruction fetch (aarch64: clean the data cache to
/// the point of unification, invalidate the instruction cache, as `__clear_cache`;
/// x86_64 keeps them coherent).
pub(crate) fn sync_icache(addr: usize, len: usize) {
    #[cfg(target_arch = "aarch64")]
    {
        let ctr: u64;
        // SAFETY: CTR_EL0 is readable from EL0 on Linux (SCTLR_EL1.UCT).
        unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
        let dline = 4usize << ((ctr >> 16) & 0xf);
        let iline = 4usize << (ctr & 0xf);
        let end = addr + len;
        let mut a = addr & !(dline - 1);
        while a < end {
            // SAFETY: cache maintenance by VA on mapped memory; allowed at EL0 (SCTLR_EL1.UCI).
            unsafe { core::arch::asm!("dc cvau, {}", in(reg) a, options(nostack)) };
            a += dline;
        }
        // SAFETY: barriers have no memory-safety preconditions.
        unsafe { core::arch::asm!("dsb ish", options(nostack)) };
        let mut a = addr & !(iline - 1);
        while a < end {
            // SAFETY: as for `dc cvau`.
            unsafe { core::arch::asm!("ic ivau, {}", in(reg) a, options(nostack)) };
            a += iline;
        }
        // SAFETY: barriers have no memory-safety preconditions.
        unsafe { core::arch::asm!("dsb ish", "isb", options(nostack)) };
    }
    #[cfg(not(target_arch = "aarch64"))]
    let _ = (addr, len);
}

fn map_exec(hint: usize, flags: libc::c_int) -> Option<usize> {
    // SAFETY: a new anonymous private mapping; with MAP_FIXED_NOREPLACE (or none) no
    // existing mapping is replaced.
    let p = unsafe {
        libc::mmap(hint as *mut libc::c_void, page_size(), libc::PROT_READ | libc::PROT_EXEC, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags, -1, 0)
    };
    (p != libc::MAP_FAILED).then_some(p as usize)
}

/// A fresh executable page for out-of-line slots (read + execute; written through
/// [`write_code`]).
pub(crate) fn alloc_exec_page() -> Result<usize, Error> {
    map_exec(0, 0).ok_or_else(|| Error::Os { addr: 0, call: "mmap", errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0) })
}

/// A fresh executable page within `range` bytes of `addr` (for slots that branch back
/// with a pc-relative jump), if one can be had: first right after the last pages this
/// mapped in range (so that they pack, and the next one costs one `mmap`), then at free
/// addresses 1 MiB apart on both sides.
pub(crate) fn alloc_exec_page_near(addr: usize, range: usize) -> Option<usize> {
    /// The pages this mapped, newest last (they are never unmapped; a stale one would
    /// only make a hint fail).
    static MAPPED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let page = page_size();
    let mut mapped = MAPPED.lock().unwrap_or_else(|p| p.into_inner());
    let try_at = |hint: usize| {
        let p = map_exec(hint, libc::MAP_FIXED_NOREPLACE)?;
        if p.abs_diff(addr) < range {
            return Some(p);
        }
        // An old kernel took the flag as a hint only: give the page back.
        // SAFETY: p is the page mmap just returned, unused.
        unsafe { libc::munmap(p as *mut libc::c_void, page) };
        None
    };
    let after_ours = mapped.iter().rev().filter(|p| p.abs_diff(addr) < range).take(4).map(|p| p + page).collect::<Vec<_>>();
    let step = 1 << 20;
    let grid = (1..range / step).flat_map(|k| [addr.checked_sub(k * step), addr.checked_add(k * step)]).flatten().map(|h| h & !(page - 1));
    let p = after_ours.into_iter().chain(grid).find_map(try_at)?;
    mapped.push(p);
    Some(p)
}

/// Places `code` in fresh pages of its own and makes them executable (read + execute;
/// never writable and executable at once): its address. For code that needs no
/// particular address (return-probe stubs). The pages are never unmapped.
pub(crate) fn alloc_code(code: &[u8]) -> Result<usize, Error> {
    let len = code.len().max(1).next_multiple_of(page_size());
    let os = |call| Error::Os { addr: 0, call, errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0) };
    // SAFETY: a new anonymous private read-write mapping; nothing is replaced.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(os("mmap"));
    }
    // SAFETY: the mapping is `len >= code.len()` bytes, writable, and ours alone.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len()) };
    // SAFETY: mprotect of the mapping just made.
    if unsafe { libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
        let e = os("mprotect");
        // SAFETY: the mapping just made, which nothing refers to yet.
        unsafe { libc::munmap(p, len) };
        return Err(e);
    }
    sync_icache(p as usize, code.len());
    Ok(p as usize)
}

/// `membarrier` commands (linux/membarrier.h).
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

/// Whether this process registered for core-syncing membarriers.
static SYNC_CORE: AtomicBool = AtomicBool::new(false);

fn register_membarrier() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: membarrier registration has no memory-safety preconditions.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) };
        SYNC_CORE.store(r == 0, Ordering::Relaxed);
    });
}

/// Makes every thread of the process execute a core-serialising instruction before it
/// runs further code, so none runs a stale copy of patched text (sites, and
/// breakpoints written or removed: the process analog of the kernel's
/// `text_poke_sync`). Without kernel support (older kernels, qemu-user) the write
/// path's own synchronisation is all there is: x86_64 keeps instruction fetch
/// coherent with stores, aarch64 broadcasts the cache maintenance
/// (`text::sync_icache`).
pub(crate) fn sync_cores() {
    register_membarrier();
    if SYNC_CORE.load(Ordering::Relaxed) {
        // SAFETY: membarrier has no memory-safety preconditions; registered above.
        unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipe_reads_what_is_mapped_and_refuses_what_is_not() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut buf = vec![0u8; data.len()];
        assert!(read_through_pipe(data.as_ptr() as usize, &mut buf));
        assert_eq!(buf, data);
        // A page that cannot be read (mapped with no access, so that no other thread's
        // mapping can take its address meanwhile, as one could an unmapped page's):
        // refused, and the pipe is left empty (the next read is right).
        let page = page_size();
        // SAFETY: a fresh anonymous mapping of one page with no access: only its address
        // is used, by the kernel (which refuses it), until it is unmapped below.
        let sealed = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(sealed, libc::MAP_FAILED);
        assert!(!read_through_pipe(sealed as usize, &mut [0u8; 16]));
        // SAFETY: the mapping made above, used by nothing else.
        unsafe { libc::munmap(sealed, page) };
        let mut again = vec![0u8; 64];
        assert!(read_through_pipe(data.as_ptr() as usize + 100, &mut again));
        assert_eq!(again, data[100..164]);
    }

    #[test]
    fn pages_near_an_address_are_in_range_and_pack() {
        let here = pages_near_an_address_are_in_range_and_pack as *const () as usize;
        let range = 1 << 31;
        let pages: Vec<usize> = (0..8).map(|_| alloc_exec_page_near(here, range).expect("a page near the test's code")).collect();
        for p in &pages {
            assert!(p.abs_diff(here) < range && p % page_size() == 0, "{p:#x} near {here:#x}");
        }
        let mut sorted = pages.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), pages.len(), "distinct pages");
        // Each after the one before (another thread's mapping may have taken that place
        // once in a while, not every time).
        let packed = pages.windows(2).filter(|w| w[1] == w[0] + page_size()).count();
        assert!(packed >= 4, "pages pack: {pages:#x?}");
    }

    /// `store` writes exactly the bytes asked, at every width and alignment (the
    /// atomic arms and the copy).
    #[test]
    fn store_writes_exactly_the_bytes() {
        for len in 1..=9 {
            for at in 0..8 {
                let mut buf = [0xeeu8; 24];
                let bytes: Vec<u8> = (1..=len as u8).collect();
                // 8-aligned base: `at` decides the alignment of the store.
                let base = buf.as_mut_ptr() as usize;
                let addr = base.next_multiple_of(8) + at;
                let off = addr - base;
                // SAFETY: [addr, addr + len) lies inside `buf` (off + len <= 7 + 8 + 9),
                // which no reference covers during the call.
                unsafe { store(addr, &bytes) };
                let mut want = [0xeeu8; 24];
                want[off..off + len].copy_from_slice(&bytes);
                assert_eq!(buf, want, "len {len} at +{at}");
            }
        }
    }

    #[test]
    fn the_header_names_each_choice() {
        let eperm = WriteFailure::Os { call: "mprotect", errno: libc::EPERM };
        assert_eq!(TextWrites::Kernel { forced: false }.to_string(), "/proc/self/mem (kernel)");
        assert_eq!(TextWrites::Mprotect { kernel: WriteFailure::Forced }.to_string(), "mprotect (forced by PROBEKIT_TEXT_WRITE)");
        assert!(TextWrites::Mprotect { kernel: WriteFailure::NotSeen }.to_string().starts_with("mprotect (fallback: /proc/self/mem written, but"));
        let neither = TextWrites::Neither { kernel: WriteFailure::Forced, mprotect: eperm };
        assert_eq!(neither.mode(), None);
        assert!(neither.to_string().starts_with("none, no probe can be registered (/proc/self/mem: not used"), "{neither}");
    }
}
