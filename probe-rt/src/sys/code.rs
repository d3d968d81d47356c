//! Writing code: through the kernel or through page protections, and instruction-cache
//! sync.
//!
//! Two ways to write code ([`WriteMode`]), chosen once by a self-test:
//! - [`WriteMode::Kernel`], the default: `pwrite` on `/proc/self/mem`, as the kernel's
//!   own `text_poke` writes through an alias. No page is ever writable and executable,
//!   not even for a moment, and a page unmapped by another thread meanwhile (a racing
//!   `dlclose`) gives an error, not a SIGSEGV. The kernel breaks copy-on-write and
//!   copies the bytes with one `memcpy` of the length asked: a 1-byte write (the x86_64
//!   `int3`, the only write a running thread can meet outside the `text_poke_bp`
//!   protocol) is one byte store.
//! - [`WriteMode::Mprotect`], the fallback: a plain store while `mprotect` makes the
//!   pages writable (and executable: threads running through them go on), their
//!   protection given back right after. Used where the self-test shows that a write
//!   through the kernel is not seen by code that already ran: qemu-user (the aarch64
//!   lane) keeps its translation of the old instruction (DESIGN.md). Kernels that
//!   refuse `/proc/self/mem` writes (`PROC_MEM_NO_FORCE`) also land here.
//!
//! `PROBEKIT_TEXT_WRITE=kernel` or `=mprotect` forces a mode (for tests of both).

use crate::Error;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

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

fn protect(start: usize, len: usize, prot: libc::c_int, addr: usize) -> Result<(), Error> {
    // SAFETY: changes the protection of pages of an existing mapping of this process
    // (callers pass pages of a mapping found in /proc/self/maps); no memory is freed.
    let r = unsafe { libc::mprotect(start as *mut libc::c_void, len, prot) };
    if r == 0 {
        Ok(())
    } else {
        Err(Error::Os { addr, call: "mprotect", errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0) })
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

/// The mode in use: forced by `PROBEKIT_TEXT_WRITE`, else the kernel's if the
/// self-test shows it works here.
pub fn write_mode() -> WriteMode {
    static MODE: std::sync::OnceLock<WriteMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("PROBEKIT_TEXT_WRITE").as_deref() {
        Ok("kernel") => WriteMode::Kernel,
        Ok("mprotect") => WriteMode::Mprotect,
        _ if kernel_write_works() => WriteMode::Kernel,
        _ => WriteMode::Mprotect,
    })
}

/// `/proc/self/mem`, opened once for writing.
fn proc_mem() -> Option<&'static std::fs::File> {
    static MEM: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    MEM.get_or_init(|| std::fs::OpenOptions::new().read(true).write(true).open("/proc/self/mem").ok()).as_ref()
}

/// Writes `bytes` at `addr` through `/proc/self/mem`.
fn kernel_write(addr: usize, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    let mem = proc_mem().ok_or_else(|| Error::last_os(addr, "open /proc/self/mem"))?;
    match mem.write_at(bytes, addr as u64) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(_) => Err(Error::Os { addr, call: "pwrite /proc/self/mem", errno: libc::EIO }),
        Err(e) => Err(Error::Os { addr, call: "pwrite /proc/self/mem", errno: e.raw_os_error().unwrap_or(0) }),
    }
}

/// The self-test: a probekit-owned function is run, rewritten through the kernel and
/// run again; the write works here if the second run returns the new value.
fn kernel_write_works() -> bool {
    #[cfg(target_arch = "x86_64")]
    let (before, after): (&[u8], &[u8]) = (&[0xb8, 1, 0, 0, 0, 0xc3], &[0xb8, 42, 0, 0, 0, 0xc3]); // mov eax, imm32; ret
    #[cfg(target_arch = "aarch64")]
    let (before, after): (&[u8], &[u8]) = (&[0x20, 0x00, 0x80, 0x52, 0xc0, 0x03, 0x5f, 0xd6], &[0x40, 0x05, 0x80, 0x52, 0xc0, 0x03, 0x5f, 0xd6]); // mov w0, #imm; ret
    let Ok(f) = alloc_code(before) else { return false };
    // SAFETY: `f` is a fresh read+execute page holding `mov eax/w0, 1; ret`, a function
    // of the C ABI taking nothing and returning an int.
    let run = || unsafe { std::mem::transmute::<usize, extern "C" fn() -> u32>(f)() };
    let works = run() == 1 && kernel_write(f, after).is_ok() && {
        sync_icache(f, after.len());
        run() == 42
    };
    // The page stays mapped (never freed, one page for the life of the process): a
    // thread cannot be in it, but freeing it gains nothing.
    works
}

/// Writes `bytes` at `addr` in executable memory, then synchronises the instruction
/// cache, in the [`write_mode`]. A breakpoint (x86_64: 1 byte, aarch64: an aligned
/// 4-byte word) is one atomic store, so threads executing it see the old or the new
/// instruction; longer writes are for code no thread runs yet (fresh out-of-line
/// slots) or guarded by the `text_poke_bp` protocol.
pub(crate) fn write_code(addr: usize, bytes: &[u8]) -> Result<(), Error> {
    let m = crate::sys::maps::executable(addr)?;
    if addr + bytes.len() > m.end {
        return Err(Error::NotExecutable { addr: m.end });
    }
    if write_mode() == WriteMode::Kernel {
        kernel_write(addr, bytes)?;
        sync_icache(addr, bytes.len());
        return Ok(());
    }
    let ps = page_size();
    let start = addr & !(ps - 1);
    let len = (addr + bytes.len() + ps - 1) / ps * ps - start;
    protect(start, len, m.prot | libc::PROT_WRITE, addr)?;
    match bytes.len() {
        // SAFETY: the page is writable now; single naturally aligned atomic stores.
        1 => unsafe { (*(addr as *const AtomicU8)).store(bytes[0], Ordering::Release) },
        4 if addr % 4 == 0 => unsafe {
            // SAFETY: as above, 4-aligned (checked).
            (*(addr as *const AtomicU32)).store(u32::from_ne_bytes(bytes.try_into().expect("4 bytes")), Ordering::Release)
        },
        // SAFETY: the range is inside the mapping (checked) and writable now.
        _ => unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) },
    }
    // Give the pages their protection back whatever happened above.
    let restored = protect(start, len, m.prot, addr);
    sync_icache(addr, bytes.len());
    restored
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
/// with a pc-relative jump), if one can be had: tries free addresses 1 MiB apart on
/// both sides.
pub(crate) fn alloc_exec_page_near(addr: usize, range: usize) -> Option<usize> {
    let step = 1 << 20;
    for k in 1..(range / step) {
        for hint in [addr.checked_sub(k * step), addr.checked_add(k * step)].into_iter().flatten() {
            let hint = hint & !(page_size() - 1);
            if let Some(p) = map_exec(hint, libc::MAP_FIXED_NOREPLACE) {
                if p.abs_diff(addr) < range {
                    return Some(p);
                }
                // An old kernel took the flag as a hint only: give the page back.
                // SAFETY: p is the page mmap just returned, unused.
                unsafe { libc::munmap(p as *mut libc::c_void, page_size()) };
            }
        }
    }
    None
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
        // A page mapped, then unmapped: refused, and the pipe is left empty (the next
        // read is right).
        let page = page_size();
        // SAFETY: a fresh anonymous mapping of one page, unmapped at once: only its
        // address is used after, by the kernel (which refuses it).
        let gone = unsafe {
            let p = libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert_ne!(p, libc::MAP_FAILED);
            libc::munmap(p, page);
            p as usize
        };
        assert!(!read_through_pipe(gone, &mut [0u8; 16]));
        let mut again = vec![0u8; 64];
        assert!(read_through_pipe(data.as_ptr() as usize + 100, &mut again));
        assert_eq!(again, data[100..164]);
    }
}
