//! Unwind information for code made at run time: the return-probe stubs and the
//! detour blocks of optimized probes.
//!
//! Code probekit writes at run time has no `.eh_frame` of an image, yet threads stand in
//! it: a return address into a stub or a block on the stack, a signal taken inside a
//! block. An unwinder (a panic, `std::backtrace`) must still walk through to the real
//! frames. So each such piece of code gets FDEs built here, in `.eh_frame` format (LSB
//! Core 5.0, "The .eh_frame section"), and registered with libgcc's
//! `__register_frame` (the unwinder Rust uses on `*-linux-gnu`); `.cfi_escape` cannot
//! carry an address known only at run time.
//!
//! Every rule describes the probed code's own frame, as if the stub or block were not
//! there: its CFA is the probed stack pointer, its return-address column the probed pc.
//! (A stub's CFA lies a few bytes above that stack pointer, which its sp rule gives
//! instead: libgcc tells frames apart by CFA, see `retprobe::pool`.)
//! A pc that stands for an *instruction* (not a return address) is given + 1: unwinders
//! look the next frame's rules up at return address − 1, and backtraces symbolize it.
//!
//! Written by hand: gimli's `write` feature would do, at the cost of three more
//! dependencies of the runtime (fnv, hashbrown, indexmap) for the few opcodes here;
//! the opcodes themselves are gimli's constants.

use gimli::constants::*;
use std::ffi::{c_int, c_void};

#[cfg(target_env = "gnu")]
extern "C" {
    /// libgcc: registers the `.eh_frame` records starting at `begin`, up to a zero
    /// length word. The memory must stay valid while registered.
    /// (LLVM's libunwind, used on musl, takes one FDE per call instead.)
    fn __register_frame(begin: *const u8);
    /// libgcc: forgets the records registered at `begin` (it aborts if none are).
    fn __deregister_frame(begin: *const u8);
}

// The unwinder's interface (the Itanium C++ ABI's "Base ABI", §1.6, which libgcc
// implements): what a personality routine is asked and answers.
#[cfg(target_env = "gnu")]
extern "C" {
    /// libgcc: the CFA its `context` holds, which for a frame is its callee's CFA:
    /// the frame's own stack pointer at its call (LLVM's libunwind returns that stack
    /// pointer too).
    fn _Unwind_GetCFA(context: *mut c_void) -> usize;
    /// libgcc: the frame's pc, and whether it is a signal frame's (`*before` set: the
    /// interrupted instruction's address, not a return address).
    fn _Unwind_GetIPInfo(context: *mut c_void, before: *mut c_int) -> usize;
}
/// `_UA_CLEANUP_PHASE`: the second phase, which unwinds the frame.
const UA_CLEANUP_PHASE: c_int = 2;
/// `_URC_CONTINUE_UNWIND`: no handler and nothing to run here, go on.
const URC_CONTINUE_UNWIND: c_int = 8;

/// Code that runs calls the runtime watches and has no landing pad, and how its
/// frame shows where the call it watches entered.
trait Watching {
    /// The stack pointer the watched call entered at, from the frame's stack pointer
    /// at its call (`sp`) and its pc (a return address); `None` if they are not this
    /// code's.
    ///
    /// # Safety
    /// `pc` is the return address of a call in this code, in a frame being unwound.
    unsafe fn entry_sp(sp: usize, pc: usize) -> Option<usize>;
}

/// A return probe's stub: it stands where the probed function returned to, so its
/// stack pointer is the function's CFA, `ENTRY_SP_BELOW_CFA` above its entry sp.
enum Stub {}

impl Watching for Stub {
    unsafe fn entry_sp(sp: usize, _pc: usize) -> Option<usize> {
        sp.checked_sub(ENTRY_SP_BELOW_CFA)
    }
}

/// A site's exit path, unwound at its body's call (the only call that can unwind
/// there: the trampolines' dispatchers abort rather than unwind): the function's
/// entry stack pointer lies the exit path's frame above the stack pointer there,
/// and the instruction after the call frees that frame, which gives its size.
enum ExitPath {}

impl Watching for ExitPath {
    unsafe fn entry_sp(sp: usize, pc: usize) -> Option<usize> {
        // SAFETY: the caller's guarantee: `pc` follows the body's call in an exit path.
        Some(sp + unsafe { crate::site::table::exit_frame_after_body_call(pc) }?)
    }
}

/// The personality routine of code `W`: when a panic unwinds its frame (the cleanup
/// phase), the calls of this thread entered at the stack pointer `W::entry_sp` gives,
/// or deeper, are over, and the runtime is told so at that moment
/// ([`crate::unwound`]). Never a handler, never a landing pad: it answers "continue"
/// in both phases. `extern "C"`: a panic in it would abort, not unwind into the
/// unwinder.
///
/// # Safety
/// Called by the unwinder only, for a frame of `W`'s code, with `context` the frame's.
unsafe extern "C" fn personality<W: Watching>(_version: c_int, actions: c_int, _class: u64, _exception: *mut c_void, context: *mut c_void) -> c_int {
    #[cfg(target_env = "gnu")]
    if actions & UA_CLEANUP_PHASE != 0 {
        let mut signal_frame = 0;
        // SAFETY: the unwinder passes the context of the frame it is unwinding;
        // `signal_frame` is a valid `int` to write.
        let (sp, pc) = unsafe { (_Unwind_GetCFA(context), _Unwind_GetIPInfo(context, &mut signal_frame)) };
        // A frame stopped by a signal (an unwind out of a signal handler) is not at a
        // call: its stack pointer and pc are not the ones this code knows.
        if signal_frame == 0 {
            // SAFETY: not a signal frame, so `pc` is the return address of a call in
            // `W`'s code (the unwinder calls this routine for `W`'s frames only).
            if let Some(entry) = unsafe { W::entry_sp(sp, pc) } {
                crate::unwound(entry);
            }
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = (actions, context);
    URC_CONTINUE_UNWIND
}

/// The stubs' personality routine's address, for their CIE.
pub(crate) fn stub_personality() -> usize {
    personality::<Stub> as unsafe extern "C" fn(c_int, c_int, u64, *mut c_void, *mut c_void) -> c_int as usize
}

/// The exit paths' personality routine's address, for the sites' personality slots.
pub(crate) fn exit_path_personality() -> usize {
    personality::<ExitPath> as unsafe extern "C" fn(c_int, c_int, u64, *mut c_void, *mut c_void) -> c_int as usize
}

/// Bytes between a function's stack pointer at its entry and its CFA: x86_64's return
/// address (CFA = rsp + 8), none on aarch64 (CFA = sp; the return address is in x30).
#[cfg(target_arch = "x86_64")]
const ENTRY_SP_BELOW_CFA: usize = 8;
#[cfg(target_arch = "aarch64")]
const ENTRY_SP_BELOW_CFA: usize = 0;

/// DWARF register numbers (System V AMD64 psABI 1.0, 3.6.2, Figure 3.36; "DWARF for
/// the Arm 64-bit Architecture", 4.1): the stack pointer and the return-address
/// column of a function's CIE.
#[cfg(target_arch = "x86_64")]
pub(crate) const SP: u8 = 7;
#[cfg(target_arch = "x86_64")]
pub(crate) const RA: u8 = 16;
#[cfg(target_arch = "aarch64")]
pub(crate) const SP: u8 = 31;
#[cfg(target_arch = "aarch64")]
pub(crate) const RA: u8 = 30;
/// The column that holds the pc where it is not the link register: x86_64 `rip` (the
/// return-address column), aarch64 the column GCC's unwinder keeps for the pc of
/// signal frames (`DWARF_ALT_FRAME_RETURN_COLUMN`, 96), so that `x30` keeps a rule
/// of its own (probe-codegen's SaveRestore routines use it too).
#[cfg(target_arch = "x86_64")]
pub(crate) const PC: u8 = 16;
#[cfg(target_arch = "aarch64")]
pub(crate) const PC: u8 = 96;

/// A DWARF expression (DWARF 5, 2.5).
#[derive(Clone, Debug, Default)]
pub(crate) struct Expr(Vec<u8>);

impl Expr {
    /// `DW_OP_breg<reg> off`: the register's value plus `off`.
    pub(crate) fn breg(reg: u8, off: i64) -> Expr {
        let mut e = vec![DW_OP_breg0.0 + reg];
        sleb(&mut e, off);
        Expr(e)
    }

    /// `DW_OP_addr a`: a constant address.
    pub(crate) fn addr(a: usize) -> Expr {
        let mut e = vec![DW_OP_addr.0];
        e.extend_from_slice(&(a as u64).to_ne_bytes());
        Expr(e)
    }

    /// `… DW_OP_deref`: the word at the address.
    pub(crate) fn deref(mut self) -> Expr {
        self.0.push(DW_OP_deref.0);
        self
    }

    /// `… DW_OP_plus_uconst n`.
    pub(crate) fn plus(mut self, n: u64) -> Expr {
        self.0.push(DW_OP_plus_uconst.0);
        uleb(&mut self.0, n);
        self
    }
}

/// The call-frame program of one FDE: rows of rules, each from a code offset on.
#[derive(Clone, Debug, Default)]
pub(crate) struct Program {
    bytes: Vec<u8>,
    /// The code offset of the current row.
    at: usize,
}

impl Program {
    /// Starts a new row at `offset` from the FDE's first address (not before the
    /// current one); the rules so far carry over.
    pub(crate) fn row(&mut self, offset: usize) -> &mut Program {
        let delta = offset - self.at;
        match delta {
            0 => {}
            1..0x40 => self.bytes.push(DW_CFA_advance_loc.0 | delta as u8),
            0x40..0x100 => self.bytes.extend([DW_CFA_advance_loc1.0, delta as u8]),
            _ => {
                self.bytes.push(DW_CFA_advance_loc2.0);
                self.bytes.extend_from_slice(&(delta as u16).to_ne_bytes());
            }
        }
        self.at = offset;
        self
    }

    /// CFA = `reg` + `off`.
    pub(crate) fn cfa(&mut self, reg: u8, off: u64) -> &mut Program {
        self.bytes.extend([DW_CFA_def_cfa.0, reg]);
        uleb(&mut self.bytes, off);
        self
    }

    /// CFA = the value of `e`.
    pub(crate) fn cfa_expr(&mut self, e: Expr) -> &mut Program {
        self.bytes.push(DW_CFA_def_cfa_expression.0);
        self.block(e)
    }

    /// `reg` of the caller is the value of `e` (evaluated with the CFA pushed).
    pub(crate) fn val_expr(&mut self, reg: u8, e: Expr) -> &mut Program {
        self.bytes.extend([DW_CFA_val_expression.0, reg]);
        self.block(e)
    }

    /// `reg` of the caller is saved at the address `e` computes.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub(crate) fn saved_at(&mut self, reg: u8, e: Expr) -> &mut Program {
        self.bytes.extend([DW_CFA_expression.0, reg]);
        self.block(e)
    }

    /// `reg` of the caller is in `from`.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub(crate) fn in_reg(&mut self, reg: u8, from: u8) -> &mut Program {
        self.bytes.extend([DW_CFA_register.0, reg, from]);
        self
    }

    /// `reg` of the caller is its value here.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub(crate) fn same(&mut self, reg: u8) -> &mut Program {
        self.bytes.extend([DW_CFA_same_value.0, reg]);
        self
    }

    fn block(&mut self, e: Expr) -> &mut Program {
        uleb(&mut self.bytes, e.0.len() as u64);
        self.bytes.extend(e.0);
        self
    }
}

/// One FDE: the code `[begin, end)` and its rules.
#[derive(Clone, Debug)]
pub(crate) struct Fde {
    pub begin: usize,
    pub end: usize,
    pub program: Program,
}

/// A table of FDEs registered with the unwinder until it is dropped.
#[derive(Debug)]
pub(crate) struct Table {
    /// The `.eh_frame` bytes, in words: 8-aligned, as libgcc reads them.
    words: Box<[u64]>,
}

impl Table {
    /// Builds one CIE (return-address column `ra`, personality routine
    /// `personality` if any) and `fdes`, and registers them. Not async-signal-safe
    /// (libgcc allocates and locks): registration paths only.
    pub(crate) fn register(ra: u8, personality: Option<usize>, fdes: &[Fde]) -> Table {
        let bytes = eh_frame(ra, personality, fdes);
        let mut words = vec![0u64; bytes.len().div_ceil(8)].into_boxed_slice();
        for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_ne_bytes(b);
        }
        // SAFETY: `words` holds a well-formed `.eh_frame` sequence ending in a zero
        // length word (built by `eh_frame`), 8-aligned, and is neither moved (a boxed
        // slice) nor freed before `drop` deregisters it.
        #[cfg(target_env = "gnu")]
        unsafe {
            __register_frame(words.as_ptr().cast())
        };
        // Elsewhere no unwinder is told: unwinding through such code is not supported
        // there (the code itself still works).
        Table { words }
    }

    /// Keeps the table registered for the life of the process.
    pub(crate) fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for Table {
    /// Deregisters the table. Its code must be out of use: no thread may be unwinding
    /// through it (libgcc reads an FDE it found after letting go of its lock).
    fn drop(&mut self) {
        // SAFETY: registered by `register` at this very address, not deregistered yet.
        #[cfg(target_env = "gnu")]
        unsafe {
            __deregister_frame(self.words.as_ptr().cast())
        };
    }
}

/// The `.eh_frame` bytes: CIE, FDEs, terminator. Every record is padded to 8 bytes.
fn eh_frame(ra: u8, personality: Option<usize>, fdes: &[Fde]) -> Vec<u8> {
    let mut out = Vec::new();
    // CIE: id 0, version 1, augmentation "zR" (pointer encoding follows: absolute, 8
    // bytes), or "zPR" with a personality routine (its address, absolute, first),
    // code alignment 1, data alignment -8, the return-address column, no instructions.
    let mut cie = vec![0, 0, 0, 0, 1, b'z'];
    cie.extend(match personality {
        Some(_) => &b"PR\0"[..],
        None => &b"R\0"[..],
    });
    cie.extend([1, 0x78]);
    uleb(&mut cie, ra.into());
    match personality {
        Some(p) => {
            cie.extend([1 + 8 + 1, DW_EH_PE_absptr.0]);
            cie.extend_from_slice(&(p as u64).to_ne_bytes());
        }
        None => cie.push(1),
    }
    cie.push(DW_EH_PE_absptr.0);
    pad(&mut cie);
    push_record(&mut out, &cie);
    for f in fdes {
        // The CIE pointer: from this field back to the CIE at 0.
        let cie_ptr = (out.len() + 4) as u32;
        let mut fde = cie_ptr.to_ne_bytes().to_vec();
        fde.extend_from_slice(&(f.begin as u64).to_ne_bytes());
        fde.extend_from_slice(&((f.end - f.begin) as u64).to_ne_bytes());
        fde.push(0); // augmentation data length
        fde.extend_from_slice(&f.program.bytes);
        pad(&mut fde);
        push_record(&mut out, &fde);
    }
    out.extend_from_slice(&0u32.to_ne_bytes());
    out
}

/// Pads a record body with DW_CFA_nop so that length word + body is a multiple of 8.
fn pad(body: &mut Vec<u8>) {
    while !(body.len() + 4).is_multiple_of(8) {
        body.push(DW_CFA_nop.0);
    }
}

fn push_record(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_ne_bytes());
    out.extend_from_slice(body);
}

/// DWARF unsigned LEB128.
fn uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// DWARF signed LEB128.
fn sleb(out: &mut Vec<u8>, mut v: i64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if (v == 0 && b & 0x40 == 0) || (v == -1 && b & 0x40 != 0) {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gimli::{BaseAddresses, CfaRule, EhFrame, NativeEndian, RegisterRule, UnwindContext, UnwindContextStorage, UnwindSection, UnwindTableRow};

    /// gimli's storage in line (the runtime reads `.eh_frame` without `alloc`).
    struct InLine;

    impl<T: gimli::ReaderOffset> UnwindContextStorage<T> for InLine {
        type Rules = [(gimli::Register, RegisterRule<T>); 8];
        type Stack = [UnwindTableRow<T, Self>; 2];
    }

    #[test]
    fn records_are_aligned_and_linked_to_the_cie() {
        let mut p = Program::default();
        p.cfa(SP, 0);
        let f = |begin| Fde { begin, end: begin + 16, program: p.clone() };
        let t = eh_frame(RA, None, &[f(0x1000), f(0x1010)]);
        let word = |at: usize| u32::from_ne_bytes(t[at..at + 4].try_into().unwrap()) as usize;
        let mut at = 0;
        let mut fdes = 0;
        while word(at) != 0 {
            assert_eq!(at % 8, 0);
            if at > 0 {
                assert_eq!(at + 4 - word(at + 4), 0, "the FDE points back to the CIE");
                fdes += 1;
            }
            at += 4 + word(at);
        }
        assert_eq!((fdes, at + 4), (2, t.len()));
        // Without a personality routine, gimli reads none.
        let section = EhFrame::new(&t, NativeEndian);
        let bases = BaseAddresses::default();
        let mut entries = section.entries(&bases);
        while let Some(e) = entries.next().unwrap() {
            if let gimli::CieOrFde::Fde(partial) = e {
                assert_eq!(partial.parse(EhFrame::cie_from_offset).unwrap().personality(), None);
            }
        }
    }

    #[test]
    fn gimli_reads_the_rows_back() {
        let mut p = Program::default();
        p.cfa(SP, 0).val_expr(PC, Expr::addr(0x5001));
        p.row(8).cfa(SP, 144);
        p.row(100).cfa_expr(Expr::breg(SP, 8).deref()).saved_at(3, Expr::breg(SP, 0)).same(6).in_reg(PC, 3);
        let t = eh_frame(PC, Some(0x7000), &[Fde { begin: 0x4000, end: 0x4080, program: p }]);
        let section = EhFrame::new(&t, NativeEndian);
        let bases = BaseAddresses::default();
        let mut entries = section.entries(&bases);
        let mut ctx = Box::new(UnwindContext::<usize, InLine>::new_in());
        let mut seen = 0;
        while let Some(e) = entries.next().unwrap() {
            let gimli::CieOrFde::Fde(partial) = e else { continue };
            let fde = partial.parse(EhFrame::cie_from_offset).unwrap();
            assert_eq!((fde.initial_address(), fde.len()), (0x4000, 0x80));
            assert_eq!(fde.cie().return_address_register(), gimli::Register(PC.into()));
            assert_eq!(fde.personality(), Some(gimli::Pointer::Direct(0x7000)));
            let row = fde.unwind_info_for_address(&section, &bases, &mut ctx, 0x4000).unwrap();
            assert_eq!(*row.cfa(), CfaRule::RegisterAndOffset { register: gimli::Register(SP.into()), offset: 0 });
            assert!(matches!(row.register(gimli::Register(PC.into())), Some(RegisterRule::ValExpression(_))));
            let row = fde.unwind_info_for_address(&section, &bases, &mut ctx, 0x4008).unwrap();
            assert_eq!(*row.cfa(), CfaRule::RegisterAndOffset { register: gimli::Register(SP.into()), offset: 144 });
            let row = fde.unwind_info_for_address(&section, &bases, &mut ctx, 0x4070).unwrap();
            assert!(matches!(row.cfa(), CfaRule::Expression(_)));
            assert_eq!(row.register(gimli::Register(PC.into())), Some(RegisterRule::Register(gimli::Register(3))));
            assert_eq!(row.register(gimli::Register(6)), Some(RegisterRule::SameValue));
            assert!(matches!(row.register(gimli::Register(3)), Some(RegisterRule::Expression(_))));
            seen += 1;
        }
        assert_eq!(seen, 1);
    }
}
