//! The unwind rule of one frame, from the `.eh_frame` of the image holding its pc,
//! without allocating or locking: the image through glibc's `_dl_find_object`
//! (async-signal-safe, glibc 2.35 and later), its `.eh_frame_hdr` binary search table
//! read here, the FDE and its CIE parsed and run by gimli with in-line storage.
//!
//! The table is read in the one layout GNU ld and lld write (version 1, `eh_frame_ptr`
//! pc-relative, `fde_count` a 4-byte word, table entries data-relative 4-byte words,
//! LSB Core 5.0, "The .eh_frame_hdr section"); an image with another layout, or code
//! outside every image (stubs, slots), has no rule here.

use gimli::{BaseAddresses, EhFrame, EhFrameOffset, NativeEndian, UnwindContext, UnwindContextStorage, UnwindSection, UnwindTableRow};
use std::sync::atomic::{AtomicUsize, Ordering};

/// gimli's storage for register rules and the `DW_CFA_remember_state` stack, in line:
/// no allocation. 48 rules cover every register x86_64 and aarch64 code saves.
pub(super) struct OnStack;

impl<T: gimli::ReaderOffset> UnwindContextStorage<T> for OnStack {
    type Rules = [(gimli::Register, gimli::RegisterRule<T>); 48];
    type Stack = [UnwindTableRow<T, Self>; 4];
}

/// An unwind context that never allocates (about 10 KiB: on the stack of the walk).
pub(super) type Context = UnwindContext<usize, OnStack>;

/// One row of an FDE's table: how to find the caller's registers.
pub(super) type Row = UnwindTableRow<usize, OnStack>;

/// glibc's `struct dl_find_object` (`<dlfcn.h>`, 2.35) on x86_64 and aarch64, which
/// have neither `dlfo_eh_dbase` nor `dlfo_eh_count`.
#[repr(C)]
struct DlFindObject {
    flags: u64,
    map_start: *mut libc::c_void,
    map_end: *mut libc::c_void,
    link_map: *mut libc::c_void,
    /// The image's `PT_GNU_EH_FRAME` segment (its `.eh_frame_hdr`), or null.
    eh_frame: *mut libc::c_void,
    reserved: [u64; 7],
}

type FindObject = unsafe extern "C" fn(*mut libc::c_void, *mut DlFindObject) -> libc::c_int;

/// `_dl_find_object`, looked up before `main` (0: not looked up, 1: missing).
static FIND: AtomicUsize = AtomicUsize::new(0);

/// Looks up `_dl_find_object` once (glibc before 2.35 has none: walks then follow frame
/// pointers only). Not async-signal-safe: called before `main`.
pub(super) fn init() {
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the global scope.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_dl_find_object".as_ptr()) } as usize;
    FIND.store(if f == 0 { 1 } else { f }, Ordering::Release);
}

/// Whether frames can be unwound from their FDEs (`_dl_find_object` exists).
pub(super) fn available() -> bool {
    FIND.load(Ordering::Acquire) > 1
}

/// The `.eh_frame_hdr` of the image holding `pc`.
fn eh_frame_hdr(pc: usize) -> Option<usize> {
    let f = FIND.load(Ordering::Acquire);
    if f <= 1 {
        return None;
    }
    // SAFETY: `f` is `_dl_find_object`, found by dlsym under that name, whose type
    // glibc documents as `FindObject`.
    let find: FindObject = unsafe { std::mem::transmute::<usize, FindObject>(f) };
    // SAFETY: all-zero is a valid `DlFindObject` (integers and null pointers).
    let mut out: DlFindObject = unsafe { std::mem::zeroed() };
    // SAFETY: `_dl_find_object` reads no memory at `pc` and writes `out` only.
    let r = unsafe { find(pc as *mut libc::c_void, &mut out) };
    (r == 0 && !out.eh_frame.is_null()).then_some(out.eh_frame as usize)
}

/// Reads a 4-byte word of an image's unwind data.
///
/// # Safety
/// `at` must lie in an image's mapped `.eh_frame_hdr` or `.eh_frame`.
unsafe fn word(at: usize) -> u32 {
    // SAFETY: by the caller's contract; unaligned reads are allowed here.
    unsafe { (at as *const u32).read_unaligned() }
}

/// The FDE covering `pc` (found through the header at `hdr`), as `(eh_frame, fde)`:
/// the start of `.eh_frame` and the FDE's address in it.
fn find_fde(hdr: usize, pc: usize) -> Option<(usize, usize)> {
    // SAFETY: `hdr` is an image's mapped `.eh_frame_hdr` (from `_dl_find_object`),
    // whose 12-byte header is read first; table entries are read only below `count`.
    unsafe {
        let head = word(hdr).to_le_bytes();
        if head != [1, 0x1b, 0x03, 0x3b] {
            return None; // not the layout GNU ld and lld write
        }
        let eh_frame = (hdr + 4).wrapping_add_signed(word(hdr + 4) as i32 as isize);
        let count = word(hdr + 8) as usize;
        let table = hdr + 12;
        let loc = |i: usize| hdr.wrapping_add_signed(word(table + 8 * i) as i32 as isize);
        if count == 0 || loc(0) > pc {
            return None;
        }
        // The last entry starting at or below pc.
        let (mut lo, mut hi) = (0, count);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if loc(mid) <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let fde = hdr.wrapping_add_signed(word(table + 8 * lo + 4) as i32 as isize);
        (fde > eh_frame).then_some((eh_frame, fde))
    }
}

/// Runs `f` on the row of the table of the FDE covering `pc` and that FDE's first
/// address (the function's start); `None` if no image has a rule for `pc`.
pub(super) fn with_row<R>(ctx: &mut Context, pc: usize, f: impl FnOnce(usize, &Row) -> R) -> Option<R> {
    let hdr = eh_frame_hdr(pc)?;
    let (eh_frame, fde) = find_fde(hdr, pc)?;
    // SAFETY: `fde` is an FDE of the image's `.eh_frame` (from its search table): its
    // length word is mapped.
    let len = unsafe { word(fde) } as usize;
    if len == 0 || len == 0xffff_ffff {
        return None; // a terminator, or a 64-bit record (never written for code)
    }
    let end = fde + 4 + len;
    // SAFETY: `[eh_frame, end)` is the image's `.eh_frame` up to the end of this FDE,
    // mapped read-only with the image; the CIE an FDE names precedes it.
    let bytes = unsafe { std::slice::from_raw_parts(eh_frame as *const u8, end - eh_frame) };
    let section = EhFrame::new(bytes, NativeEndian);
    let bases = BaseAddresses::default().set_eh_frame(eh_frame as u64);
    let entry = section.fde_from_offset(&bases, EhFrameOffset(fde - eh_frame), EhFrame::cie_from_offset).ok()?;
    if !entry.contains(pc as u64) {
        return None;
    }
    let row = entry.unwind_info_for_address(&section, &bases, ctx, pc as u64).ok()?;
    Some(f(entry.initial_address() as usize, row))
}
