//! The patchable sites of `#[traceable]` functions, found in the `probekit_sites`
//! section of the executable and of every loaded library (the kernel's
//! `__mcount_loc`).
//!
//! Each site emits, from its naked function's asm, one 32-byte entry into the
//! `probekit_sites` section (`RawEntry`) and its name into
//! `.rodata.probekit_site_names`. Nothing runs at start-up: [`sites()`] finds the
//! tables when asked. The file of each image (found through `/proc/self/maps`, as
//! symbol lookups do) tells where the section is; the entries are read from memory,
//! where the dynamic loader has relocated their pointers. Memory is read only inside
//! a `dl_iterate_phdr` callback, which holds the loader's lock so no library can be
//! unloaded meanwhile, and only within the loaded segments of the object it belongs
//! to: a table or an entry that does not fit them (a file replaced on disk since it
//! was loaded) is skipped, never read.
//!
//! Registration and listing only: this reads files, takes a lock and allocates, so it
//! must not be called from a probe handler or any signal context.

use crate::sys::maps::{Image, PerLoad};

/// A `#[traceable]` function's patchable site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteInfo {
    /// The first byte of the site (the patchable nops).
    pub site: usize,
    /// The function users call and take pointers of.
    pub function: usize,
    /// Its path (`module::function`).
    pub name: String,
}

// The site contract, from probe-codegen (`site::runtime_consts`): `SITE_LEN`,
// `SITE_NOP`, `SITE_RECORD_VERSION`, `SITE_RECORD_SIZE`.
include!(concat!(env!("OUT_DIR"), "/site_contract.rs"));

/// One record of the `probekit_sites` section, as probe-codegen's site contract lays
/// it out (`site::record_asm`, which `#[traceable]` emits): ten `.quad`s, 8-aligned.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawEntry {
    /// `.quad SITE_RECORD_VERSION`: records of another layout are skipped.
    version: u64,
    /// `.quad {site}`: the naked site function.
    site: u64,
    /// `.quad {function}`: the Rust wrapper users call.
    function: u64,
    /// `.quad 2f`: the name's first byte, in `.rodata.probekit_site_names`.
    name: u64,
    /// `.quad 3f - 2f`: the name's length.
    len: u64,
    /// `.quad 1b` or `.quad 0`: the site's exit path, if it has one.
    exit: u64,
    /// `4: .quad 0`: the trampoline the exit path's entry calls (written at arming).
    entry_slot: u64,
    /// `5: .quad 0`: the trampoline the exit path's return calls (written at arming).
    exit_slot: u64,
    /// `.quad {flags}`: `SITE_NO_FP` or 0.
    flags: u64,
    /// `{site}.probekit_personality: .quad 0`: the personality routine the site's
    /// call-frame information names (written at arming).
    personality_slot: u64,
}

/// The site whose exit path's return call returns to `resume`, read from that call's
/// own operand, which names the record's exit slot (word 7), and the record's `site`
/// word (1): x86_64 `call qword ptr [rip + 5f]`, aarch64 `adrp x16, 5f; ldr x16, [x16,
/// :lo12:5f]; blr x16` (probe-codegen `site::exit_asm`). `None` if the instructions
/// before `resume` are not that call. For the exit dispatchers, which the call called
/// (async-signal-safe: reads of the exit path's code and of its record).
pub(crate) fn site_of_exit_call(resume: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    let slot = {
        // SAFETY: `resume` follows a call in the exit path's code, which is mapped and
        // readable while its function runs; the 6 bytes before it are that call.
        let code = unsafe { std::slice::from_raw_parts((resume - 6) as *const u8, 6) };
        if code[..2] != [0xff, 0x15] {
            return None;
        }
        resume.wrapping_add_signed(i32::from_le_bytes([code[2], code[3], code[4], code[5]]) as isize)
    };
    #[cfg(target_arch = "aarch64")]
    let slot = {
        // SAFETY: as above, the three instructions before `resume`.
        let word = |at: usize| unsafe { (at as *const u32).read() };
        let (adrp, ldr, blr) = (word(resume - 12), word(resume - 8), word(resume - 4));
        // `adrp x16`, `ldr x16, [x16, #imm]` (64-bit, unsigned offset), `blr x16`.
        if adrp & 0x9f00_001f != 0x9000_0010 || ldr & 0xffc0_03ff != 0xf940_0210 || blr != 0xd63f_0200 {
            return None;
        }
        let pages = ((((adrp >> 5) & 0x7ffff) << 2 | (adrp >> 29) & 3) as i64) << 43 >> 43; // sign-extended 21 bits
        let page = ((resume - 12) & !0xfff).wrapping_add_signed((pages << 12) as isize);
        page + ((ldr >> 10) & 0xfff) as usize * 8
    };
    // SAFETY: the call's operand is the record's exit slot, word 7 of an 8-aligned
    // record mapped with its object; word 1 is the site.
    Some(unsafe { ((slot - 6 * 8) as *const usize).read() })
}

/// The bytes of the frame of the exit path whose body call returns to `ret`, read from
/// the instruction there, which frees that frame: x86_64 `add rsp, {frame}` (`48 83 c4
/// ib` or `48 81 c4 id`), aarch64 `ldr x9, [sp, #{frame} - 8]` (probe-codegen
/// `site::exit_asm`). `None` if the instruction is another. For the exit path's
/// personality routine, which knows the frame's stack pointer only.
///
/// # Safety
/// `ret` is the return address of a call in a site's exit path (the code after it is
/// the exit path's, mapped while the call runs).
pub(crate) unsafe fn exit_frame_after_body_call(ret: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the exit path goes on for at least 7 bytes after its body's call (the
        // frame's `add`, then the exit trampoline's call and `ret`).
        let code = unsafe { std::slice::from_raw_parts(ret as *const u8, 7) };
        match code[..3] {
            [0x48, 0x83, 0xc4] => Some(code[3] as usize),
            [0x48, 0x81, 0xc4] => Some(u32::from_le_bytes([code[3], code[4], code[5], code[6]]) as usize),
            _ => None,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as above, the instruction after the call.
        let ldr = unsafe { (ret as *const u32).read() };
        // `ldr x9, [sp, #imm]` (64-bit, unsigned offset, scaled by 8).
        (ldr & 0xffc0_03ff == 0xf940_03e9).then(|| ((ldr >> 10) & 0xfff) as usize * 8 + 8)
    }
}

/// A site's exit path (probe-codegen `site::exit_asm`) and the record's words its
/// calls go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ExitPath {
    /// The exit path's first byte.
    pub path: usize,
    /// The record's word the exit path's entry calls through.
    pub entry_slot: usize,
    /// The record's word the exit path's return calls through.
    pub exit_slot: usize,
    /// The record's word the site's call-frame information names its personality
    /// routine by (probe-codegen `site::CFI_PERSONALITY`).
    pub personality_slot: usize,
}
// The asm emits exactly SITE_RECORD_SIZE bytes per record with nothing between them
// (each `.balign 8` is a no-op after a multiple of 8): the stride must match.
static_assertions::const_assert_eq!(std::mem::size_of::<RawEntry>(), SITE_RECORD_SIZE);

/// Every site of the executable and the loaded libraries, each library's in its
/// table's order (the link order).
///
/// Each instance of a generic function has its own site, listed under the same name.
/// Not for signal context: it reads `/proc/self/maps` and the ELF files, and allocates.
pub fn sites() -> Vec<SiteInfo> {
    index().list.clone()
}

/// The sites, with look-ups by address: read once per set of loaded objects (the
/// loader's generation, see `sys::maps`), since registration asks several times per
/// probe and the tables of loaded objects do not change.
struct Index {
    list: Vec<SiteInfo>,
    /// Position in `list` of the site whose first byte, or whose function, is the key.
    by_addr: std::collections::HashMap<usize, usize>,
    /// `(site, position in list)`, sorted: for the site an address is inside of.
    sorted: Vec<(usize, usize)>,
    /// What else the record of the site at each position in `list` says.
    more: Vec<More>,
}

/// What a record says besides [`SiteInfo`].
#[derive(Clone, Copy)]
struct More {
    /// The site's exit path, if it has one.
    exit: Option<ExitPath>,
    /// No FP/SIMD register carries an argument or the return value (`SITE_NO_FP`).
    no_fp: bool,
}

fn index() -> std::sync::Arc<Index> {
    static CACHE: PerLoad<Index> = PerLoad::new();
    // A failed read of the mappings finds no site, and is not kept (see `sys::maps`).
    CACHE.get(false, || read_sites().map(Index::new)).unwrap_or_else(|| std::sync::Arc::new(Index::new(Vec::new())))
}

impl Index {
    fn new(sites: Vec<(SiteInfo, More)>) -> Index {
        let (list, more): (Vec<SiteInfo>, Vec<More>) = sites.into_iter().unzip();
        let mut by_addr = std::collections::HashMap::with_capacity(2 * list.len());
        for (i, s) in list.iter().enumerate().rev() {
            by_addr.insert(s.function, i);
            by_addr.insert(s.site, i);
        }
        let mut sorted: Vec<(usize, usize)> = list.iter().enumerate().map(|(i, s)| (s.site, i)).collect();
        sorted.sort_unstable();
        Index { list, by_addr, sorted, more }
    }
}

/// The sites of every loaded object; None if the mappings could not be read.
fn read_sites() -> Option<Vec<(SiteInfo, More)>> {
    let objects = loaded_objects();
    let tables: Vec<Table> = crate::sys::maps::images()?
        .iter()
        // Only files the dynamic loader loaded, not data mapped by hand (the locale
        // archive, fonts), which could be large and hold no table.
        .filter(|i| objects.iter().any(|o| o.overlaps(&i.ranges)))
        .filter_map(table)
        .collect();
    if tables.is_empty() {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    for_each_object(|object| {
        for t in tables.iter().filter(|t| t.bias == object.bias) {
            read_table(&object, t, &mut out);
        }
    });
    Some(out)
}

/// The site whose first byte, or whose function, is at `addr`.
pub(crate) fn site_of(addr: usize) -> Option<SiteInfo> {
    let index = index();
    index.by_addr.get(&addr).map(|i| index.list[*i].clone())
}

/// What the record of the site whose first byte is `site` says besides its
/// [`SiteInfo`].
fn more_of(site: usize) -> Option<More> {
    let index = index();
    let i = *index.by_addr.get(&site)?;
    (index.list[i].site == site).then(|| index.more[i])
}

/// The exit path of the site whose first byte is `site`, if it has one.
pub(crate) fn exit_of(site: usize) -> Option<ExitPath> {
    more_of(site)?.exit
}

/// Whether no FP/SIMD register carries an argument or the return value of the
/// function whose site is `site` (probe-codegen `site::NO_FP`): its trampolines then
/// need keep no FP/SIMD state.
pub(crate) fn no_fp(site: usize) -> bool {
    more_of(site).is_some_and(|m| m.no_fp)
}

/// The site `addr` is strictly inside of (not its first byte).
pub(crate) fn site_around(addr: usize) -> Option<SiteInfo> {
    let index = index();
    let below = index.sorted.partition_point(|(site, _)| *site < addr);
    let (site, i) = *index.sorted[..below].last()?;
    (addr < site + SITE_LEN).then(|| index.list[i].clone())
}

/// Where an image's `probekit_sites` section is in memory.
#[derive(Clone, Copy)]
struct Table {
    /// The image's load bias (`dl_phdr_info::dlpi_addr` of the object it belongs to).
    bias: usize,
    /// The section's first byte in memory.
    start: usize,
    /// Its size in bytes.
    size: usize,
}

/// The table of an image, if it has one (from the image's parsed file, `sys::image`).
fn table(image: &Image) -> Option<Table> {
    let parsed = crate::sys::image::parsed(image);
    let ((start, size), bias) = (parsed.site_table?, parsed.bias?);
    Some(Table { bias, start, size })
}

/// An object the dynamic loader has loaded: its load bias and its `PT_LOAD` segments
/// in memory, `(start, end, p_flags)`.
struct Loaded {
    bias: usize,
    segments: Vec<(usize, usize, u32)>,
}

impl Loaded {
    fn overlaps(&self, ranges: &[(usize, usize)]) -> bool {
        self.segments.iter().any(|&(s, e, _)| ranges.iter().any(|&(a, b)| a < e && s < b))
    }

    /// Whether `[addr, addr + len)` lies inside one segment with all of `flags`.
    fn holds(&self, addr: usize, len: usize, flags: u32) -> bool {
        let Some(end) = addr.checked_add(len) else { return false };
        self.segments.iter().any(|&(s, e, f)| s <= addr && end <= e && f & flags == flags)
    }
}

/// The objects loaded now (executable, libraries, vDSO).
fn loaded_objects() -> Vec<Loaded> {
    let mut out = Vec::new();
    for_each_object(|o| out.push(o));
    out
}

/// Calls `f` with each loaded object while the loader's lock is held (so its
/// segments stay mapped until `f` returns). `f` must not panic: it runs inside a C
/// callback, where a panic aborts.
fn for_each_object<F: FnMut(Loaded)>(mut f: F) {
    /// `dl_iterate_phdr`'s callback: hands each object to the `F` behind `data`.
    ///
    /// # Safety
    /// `info` must point to a valid `dl_phdr_info` and `data` to a live, unaliased `F`.
    unsafe extern "C" fn callback<F: FnMut(Loaded)>(info: *mut libc::dl_phdr_info, _size: usize, data: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `data` is the `&mut F` `for_each_object` passed to `dl_iterate_phdr`,
        // which calls back synchronously, one call at a time, while that borrow lives.
        let f = unsafe { &mut *(data as *mut F) };
        // SAFETY: glibc passes a valid `dl_phdr_info` for the duration of the call.
        let info = unsafe { &*info };
        let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: `dlpi_phdr` points to the object's `dlpi_phnum` program headers,
            // mapped for as long as the object is loaded, and the loader's lock held
            // during the callback keeps it loaded.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
        };
        let bias = info.dlpi_addr as usize;
        let segments = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD)
            .map(|p| {
                let start = bias.wrapping_add(p.p_vaddr as usize);
                (start, start.wrapping_add(p.p_memsz as usize), p.p_flags)
            })
            .collect();
        f(Loaded { bias, segments });
        0
    }
    // SAFETY: the callback matches the signature `dl_iterate_phdr` expects and only
    // uses `data` as the `F` passed here, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(callback::<F>), &mut f as *mut F as *mut libc::c_void) };
}

/// Longest name read: a module path and a function name.
const MAX_NAME: usize = 4096;

/// Appends the entries of `table` in `object` to `out`, reading them from memory.
/// Called with the loader's lock held, so `object`'s segments stay mapped; nothing
/// outside them is read.
fn read_table(object: &Loaded, table: &Table, out: &mut Vec<(SiteInfo, More)>) {
    const ENTRY: usize = std::mem::size_of::<RawEntry>();
    if !table.start.is_multiple_of(8) || !object.holds(table.start, table.size, libc::PF_R) {
        return; // not this file's table: the file on disk is not what was loaded
    }
    for at in (table.start..table.start + table.size / ENTRY * ENTRY).step_by(ENTRY) {
        // SAFETY: `[at, at + ENTRY)` lies in a readable loaded segment of `object` (checked
        // above for the whole table), kept mapped by the loader's lock; `RawEntry` is
        // plain integers, valid for any bytes; `at` is 8-aligned, as `RawEntry`.
        let e = unsafe { std::ptr::read(at as *const RawEntry) };
        if e.version != SITE_RECORD_VERSION {
            continue; // written by another probekit: its fields are not these
        }
        let (site, function, name, len) = (e.site as usize, e.function as usize, e.name as usize, e.len as usize);
        let readable = len <= MAX_NAME && object.holds(name, len, libc::PF_R);
        if !readable || !object.holds(site, SITE_LEN, libc::PF_X) || !object.holds(function, 1, libc::PF_X) {
            continue;
        }
        // SAFETY: `[name, name + len)` lies in a readable loaded segment of `object`,
        // kept mapped by the loader's lock, and is copied out before it is released.
        let bytes = unsafe { std::slice::from_raw_parts(name as *const u8, len) };
        // An exit path where the contract puts it, in the site's code, with its slots
        // writable in the record (the runtime writes them before the path is used).
        let record = at + std::mem::offset_of!(RawEntry, entry_slot);
        let personality_slot = at + std::mem::offset_of!(RawEntry, personality_slot);
        let exit = (e.exit as usize == site + SITE_EXIT_OFFSET
            && object.holds(site, SITE_EXIT_OFFSET + 1, libc::PF_X)
            && object.holds(record, 16, libc::PF_R | libc::PF_W)
            && object.holds(personality_slot, 8, libc::PF_R | libc::PF_W))
        .then_some(ExitPath { path: e.exit as usize, entry_slot: record, exit_slot: record + 8, personality_slot });
        let _ = (e.entry_slot, e.exit_slot, e.personality_slot);
        let more = More { exit, no_fp: e.flags & SITE_NO_FP != 0 };
        out.push((SiteInfo { site, function, name: String::from_utf8_lossy(bytes).into_owned() }, more));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_site_found_is_in_loaded_code() {
        // probe-rt's own tests may or may not hold `#[traceable]` functions; whatever
        // is listed must be code of a loaded object, each site once.
        let objects = loaded_objects();
        let mut all = sites();
        for s in &all {
            assert!(objects.iter().any(|o| o.holds(s.site, SITE_LEN, libc::PF_X) && o.holds(s.function, 1, libc::PF_X)), "{s:?}");
            assert!(!s.name.is_empty(), "{s:?}");
        }
        let n = all.len();
        all.sort_by_key(|s| s.site);
        all.dedup_by_key(|s| s.site);
        assert_eq!(all.len(), n, "each site listed once");
        assert_eq!(site_around(every_site_found_is_in_loaded_code as *const () as usize), None);
    }

    #[test]
    fn every_loaded_object_is_seen_with_its_segments() {
        let objects = loaded_objects();
        let here = every_loaded_object_is_seen_with_its_segments as *const () as usize;
        assert!(objects.iter().any(|o| o.holds(here, 1, libc::PF_X | libc::PF_R)), "this test's code is in an executable segment");
        let images = crate::sys::maps::images().expect("the mappings are read");
        let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        let image = images.iter().find(|i| std::path::Path::new(&i.path) == exe).expect("the executable is mapped");
        let object = objects.iter().find(|o| o.overlaps(&image.ranges)).expect("the executable is a loaded object");
        if let Some(t) = table(image) {
            assert_eq!(t.bias, object.bias, "the file and the loader agree on the load bias");
        }
    }
}
