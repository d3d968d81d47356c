//! The process's memory mappings (`/proc/self/maps`), read once and kept: registering
//! thousands of probes must not make the kernel print the file for every code write
//! (a profile put 76% of a breakpoint registration there). The copy is read again only
//! when the dynamic loader has loaded or unloaded an object since (`dl_iterate_phdr`'s
//! `dlpi_adds`/`dlpi_subs`), or when an address it is asked about is in none of its
//! mappings (memory mapped since: probekit's own slot pages, a JIT's code), or when it
//! would refuse an address as not executable (see [`executable`]). A mapping
//! removed without the loader (`munmap` of a JIT region) can stay in the copy: what
//! reads memory through it checks again (`text::read` goes through the kernel, code
//! writes fail on unmapped pages, arming compares the bytes). A read that fails (no
//! file descriptor left) is not kept, here or in what is derived from it
//! ([`images`]): the next question reads again.
//!
//! Registration and listing only: this allocates and takes a lock.

use crate::Error;
use std::sync::{Arc, Mutex};

/// One line of `/proc/self/maps`.
#[derive(Clone, Debug)]
pub(crate) struct Line {
    pub start: usize,
    pub end: usize,
    pub prot: libc::c_int,
    /// `(device, inode, file offset of start)`; None if anonymous.
    pub file: Option<(u64, u64, u64)>,
    /// The file's path (absolute), or the pseudo-path (`[vdso]`), if any.
    pub path: Option<Arc<str>>,
}

/// One mapping of `/proc/self/maps` (with the ones right after it of the same
/// protection, see [`mapping_of`]).
#[derive(Clone, Debug)]
pub(crate) struct Mapping {
    pub start: usize,
    pub end: usize,
    pub prot: libc::c_int,
    /// The file mapped, as `(device, inode, file offset of start)`; None if anonymous.
    pub file: Option<(u64, u64, u64)>,
}

impl Mapping {
    /// What identifies the code at `addr` in this mapping across unmapping and mapping
    /// again (the kernel ties uprobes to the file and offset, not to the address): a
    /// hash of the file's device, inode and the offset of `addr` in it; 0 for
    /// anonymous memory, which has no identity beyond its bytes.
    pub fn code_id(&self, addr: usize) -> u64 {
        let Some((dev, ino, off)) = self.file else { return 0 };
        // FNV-1a over the three words: a collision needs two files with equal hashes
        // mapped at one address in turn, and the bytes compared as well.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for w in [dev, ino, off + (addr - self.start) as u64] {
            for b in w.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h | 1
    }
}

/// One parsed line of `/proc/self/maps`.
fn parse_line(line: &str) -> Option<Line> {
    let mut it = line.split_whitespace();
    let (range, perms, off, dev, ino) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    let path = it.next().map(Arc::from);
    let (a, b) = range.split_once('-')?;
    let (start, end) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
    let ino: u64 = ino.parse().ok()?;
    let file = match ino {
        0 => None,
        _ => {
            let (major, minor) = dev.split_once(':')?;
            let dev = u64::from_str_radix(major, 16).ok()? << 32 | u64::from_str_radix(minor, 16).ok()?;
            Some((dev, ino, u64::from_str_radix(off, 16).ok()?))
        }
    };
    let p = perms.as_bytes();
    let mut prot = 0;
    if p.first() == Some(&b'r') {
        prot |= libc::PROT_READ;
    }
    if p.get(1) == Some(&b'w') {
        prot |= libc::PROT_WRITE;
    }
    if p.get(2) == Some(&b'x') {
        prot |= libc::PROT_EXEC;
    }
    Some(Line { start, end, prot, file, path })
}

/// A file mapped into the process: its path, the address its file offset 0 is mapped
/// at, and the ranges of its mappings.
pub(crate) struct Image {
    pub(crate) path: String,
    pub(crate) start: usize,
    pub(crate) ranges: Vec<(usize, usize)>,
}

/// The copy of the mappings.
static MAPS: PerLoad<Vec<Line>> = PerLoad::new();

/// A value derived from the mappings (the list itself, the symbols, the site tables),
/// kept with the loader's generation it was made at: good until the loader maps or
/// unmaps an object ([`loader_generation`]), never when the loader cannot say. A value
/// that could not be made whole is not kept (see [`try_lines`]).
pub(crate) struct PerLoad<T>(Mutex<Option<(u64, Arc<T>)>>);

impl<T> PerLoad<T> {
    pub(crate) const fn new() -> Self {
        PerLoad(Mutex::new(None))
    }

    /// The value kept, if the loader has changed nothing since it was made and not
    /// `fresh`; else `make`'s, kept unless it is None. One caller makes it at a time
    /// (the others wait for it).
    pub(crate) fn get(&self, fresh: bool, make: impl FnOnce() -> Option<T>) -> Option<Arc<T>> {
        let generation = loader_generation();
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, value)) = &*kept {
            if *g == generation && generation != u64::MAX && !fresh {
                return Some(value.clone());
            }
        }
        let value = Arc::new(make()?);
        *kept = Some((generation, value.clone()));
        Some(value)
    }
}

/// How many objects the dynamic loader has loaded plus unloaded so far: changes with
/// every `dlopen` and `dlclose` that maps or unmaps something.
pub(crate) fn loader_generation() -> u64 {
    /// # Safety
    /// `info` must point to a valid `dl_phdr_info` and `data` to a `u64`.
    unsafe extern "C" fn first(info: *mut libc::dl_phdr_info, size: usize, data: *mut libc::c_void) -> libc::c_int {
        // SAFETY: glibc passes a valid `dl_phdr_info` of `size` bytes; `dlpi_adds` and
        // `dlpi_subs` are there when `size` covers them (glibc >= 2.4, checked).
        let info = unsafe { &*info };
        let covers = size >= std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + 8;
        // SAFETY: `data` is the `u64` `loader_generation` passed.
        unsafe { *(data as *mut u64) = if covers { info.dlpi_adds.wrapping_add(info.dlpi_subs) } else { u64::MAX } };
        1 // the counters are the same in every object's entry: stop
    }
    let mut generation = u64::MAX;
    // SAFETY: the callback has the signature dl_iterate_phdr expects and writes only
    // the `u64` passed as its data, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first), (&mut generation as *mut u64).cast()) };
    generation
}

/// The mappings, from the copy if the loader has not changed them since; read again
/// if it has, or if `fresh`. None if the kernel's list could not be read (no file
/// descriptor left, say): that is not kept, the next question reads again.
pub(crate) fn try_lines(fresh: bool) -> Option<Arc<Vec<Line>>> {
    MAPS.get(fresh, || Some(std::fs::read_to_string("/proc/self/maps").ok()?.lines().filter_map(parse_line).collect()))
}

/// [`try_lines`], with no mapping if the list could not be read.
pub(crate) fn lines(fresh: bool) -> Arc<Vec<Line>> {
    try_lines(fresh).unwrap_or_default()
}

/// The mappings of files, by path: the address file offset 0 is mapped at and every
/// range, for the images whose offset 0 is mapped. None if the list could not be read
/// (see [`try_lines`]): callers that keep what they derive from it must not keep that.
pub(crate) fn images() -> Option<Vec<Image>> {
    let mut out: Vec<Image> = Vec::new();
    for l in try_lines(false)?.iter() {
        let (Some(path), Some((_, _, off))) = (&l.path, l.file) else { continue };
        if !path.starts_with('/') {
            continue;
        }
        match out.iter_mut().find(|i| *i.path == **path) {
            Some(i) => {
                i.ranges.push((l.start, l.end));
                if off == 0 {
                    i.start = i.start.min(l.start);
                }
            }
            None => out.push(Image { path: path.to_string(), start: if off == 0 { l.start } else { usize::MAX }, ranges: vec![(l.start, l.end)] }),
        }
    }
    out.retain(|i| i.start != usize::MAX);
    Some(out)
}

/// The mapping holding `addr` (registration path only; see the module docs for when
/// the copy is read again). Its end extends over the mappings right after it with the
/// same protection: patching a page splits a text mapping in the kernel's list (the
/// written page gets its own private copy), and an instruction may straddle the split.
pub(crate) fn mapping_of(addr: usize) -> Option<Mapping> {
    mapping_in(&lines(false), addr).or_else(|| mapping_in(&lines(true), addr))
}

fn mapping_in(lines: &[Line], addr: usize) -> Option<Mapping> {
    let at = lines.partition_point(|l| l.end <= addr);
    let l = lines.get(at).filter(|l| l.start <= addr)?;
    let mut m = Mapping { start: l.start, end: l.end, prot: l.prot, file: l.file };
    for next in &lines[at + 1..] {
        if next.start != m.end || next.prot != m.prot {
            break;
        }
        m.end = next.end;
    }
    Some(m)
}

/// The mapping of `addr` if it is executable and readable (code that cannot be read,
/// as the `[vsyscall]` page, cannot be decoded or copied out of line). A refusal is
/// never read from the copy alone: the copy may hold a mapping replaced since without
/// the loader (pages a JIT unmapped, then mapped again or made executable with
/// `mprotect`), so the kernel's current list decides.
pub(crate) fn executable(addr: usize) -> Result<Mapping, Error> {
    let judge = |m: Option<Mapping>| match m {
        Some(m) if m.prot & libc::PROT_EXEC != 0 && m.prot & libc::PROT_READ == 0 => Err(Error::NotReadable { addr }),
        Some(m) if m.prot & libc::PROT_EXEC != 0 => Ok(m),
        _ => Err(Error::NotExecutable { addr }),
    };
    judge(mapping_of(addr)).or_else(|_| judge(mapping_in(&lines(true), addr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages the copy saw read-write, made executable since (as a JIT does): they are
    /// executable now, whatever the copy says.
    #[test]
    fn pages_made_executable_after_the_copy_are_executable() {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: a fresh anonymous private page, ours alone, unmapped at the end.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = p as usize;
        assert!(matches!(executable(addr), Err(Error::NotExecutable { .. })));
        assert!(mapping_in(&lines(false), addr).is_some(), "the copy now holds the read-write page");
        // SAFETY: the page is ours; nothing runs it.
        assert_eq!(unsafe { libc::mprotect(p, page, libc::PROT_READ | libc::PROT_EXEC) }, 0);
        let m = executable(addr).expect("an executable page");
        assert!(m.start <= addr && addr < m.end);
        // SAFETY: unmaps the page mapped above, no longer used.
        assert_eq!(unsafe { libc::munmap(p, page) }, 0);
    }
}
