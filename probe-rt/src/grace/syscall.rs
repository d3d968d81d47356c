//! The system calls of the hit paths, made directly.

/// A system call with up to three integer arguments and no memory operands, made
/// directly: the hit paths use it, and going through libc's `syscall`, `gettid` or
/// `getpid` would recurse if those functions were probed. Callers pass only calls
/// that read and write no user memory (gettid, getpid, tgkill).
fn raw_syscall3(nr: libc::c_long, a: usize, b: usize, c: usize) -> isize {
    let ret: isize;
    // SAFETY: the callers' system calls touch no user memory (see above); the
    // registers the kernel clobbers are declared.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a, in("rsi") b, in("rdx") c,
            out("rcx") _, out("r11") _, options(nostack, nomem, preserves_flags));
    }
    // SAFETY: as above (aarch64: x8 the number, x0..x2 the arguments, x0 the result).
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!("svc #0", in("x8") nr, inlateout("x0") a => ret, in("x1") b, in("x2") c, options(nostack, nomem, preserves_flags));
    }
    ret
}

/// A system call with six integer arguments, made directly (as [`raw_syscall3`]), for
/// `mmap` and `munmap` of the thread table's chunks: they change the address space but
/// read and write no memory the program holds a reference to.
pub(super) fn raw_syscall6(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the callers map fresh memory or unmap a mapping nothing references (see
    // above); the registers the kernel clobbers are declared. Not `nomem`: the
    // compiler must not assume memory unchanged across a change of the address space.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3],
            in("r8") a[4], in("r9") a[5], out("rcx") _, out("r11") _, options(nostack, preserves_flags));
    }
    // SAFETY: as above (aarch64: x8 the number, x0..x5 the arguments, x0 the result).
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!("svc #0", in("x8") nr, inlateout("x0") a[0] => ret, in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4],
            in("x5") a[5], options(nostack, preserves_flags));
    }
    ret
}

/// The calling thread's id (a raw system call, see [`raw_syscall3`]).
pub(crate) fn gettid() -> i32 {
    raw_syscall3(libc::SYS_gettid, 0, 0, 0) as i32
}

/// This process's id (a raw system call, see [`raw_syscall3`]).
pub(super) fn getpid() -> i32 {
    raw_syscall3(libc::SYS_getpid, 0, 0, 0) as i32
}

/// Whether the thread `tid` of this process may still be alive: false only when the
/// kernel says the id names no thread of it (an id reused by a new thread keeps
/// looking alive: an instance it names is then reclaimed only once that one exits).
/// Async-signal-safe.
pub(crate) fn thread_alive(tid: i32) -> bool {
    // tgkill with signal 0 checks that the thread exists and sends nothing.
    raw_syscall3(libc::SYS_tgkill, getpid() as usize, tid as usize, 0) != -(libc::ESRCH as isize)
}
