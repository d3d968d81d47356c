//! The contract of a `#[traceable]` site, defined once and used by both sides: the
//! attribute macro, which emits the site and its record, and the runtime, which finds
//! the records and patches the sites (it receives these definitions through its build
//! script). usdt keeps its probe record's writer and reader side by side the same way.
//!
//! A site is the first instruction(s) of a naked function: patchable nops, then a jump
//! to the body, then (where the macro could bound the stack-passed arguments) the
//! site's *exit path* ([`exit_asm`]). Its record, in the retained `probekit_sites`
//! section, is ten little-endian `u64`s, 8-aligned, back to back:
//!
//! | word | value |
//! | --- | --- |
//! | 0 | [`RECORD_VERSION`] |
//! | 1 | the site (the naked function's first byte) |
//! | 2 | the function users call (the Rust wrapper) |
//! | 3 | the name's first byte, in `.rodata.probekit_site_names` |
//! | 4 | the name's length |
//! | 5 | the exit path's first byte, or 0 if the site has none |
//! | 6 | the exit path's entry slot: the trampoline its entry calls, written by the runtime |
//! | 7 | the exit path's exit slot: the trampoline its return calls, written by the runtime |
//! | 8 | flags: [`NO_FP`] |
//! | 9 | the exit path's personality slot: the unwinder's personality routine, written by the runtime ([`CFI_PERSONALITY`]) |
//!
//! # The exit path
//! A return probe on a site without an exit path hijacks the return address (a
//! kretprobe): the function's `ret` then goes where the return-stack buffer did not
//! predict. The exit path observes the return without that: the site's patchable
//! instruction becomes a jump to it (x86_64 `jmp rel32` over the nop, aarch64 `b`
//! over the nop), and it calls the
//! entry trampoline, copies the stack-passed arguments below a new frame, *calls* the
//! body, calls the exit trampoline and returns: every `call` meets its `ret`, and the
//! call-frame information is static. The trampolines are called through the record's
//! slots (words 6 and 7), which the runtime that patches the site writes before the
//! first jump: the site may be in a library with a runtime of its own, and the
//! patching runtime's trampolines are the ones that know its probes.
//!
//! A panic that unwinds out of the body through the exit path ends the calls the
//! runtime saw enter there, at that moment: the site's call-frame information names a
//! personality routine through the record's personality slot (word 9,
//! [`CFI_PERSONALITY`]), which the patching runtime writes beside the trampolines'.
//! The unwinder calls it for the exit path's frame; it does nothing else (no landing
//! pad, no language-specific data), and a slot still 0 means no personality at all.
//!
//! A reader skips records of another version (a library built by another probekit).

use crate::Arch;

/// The version of the record layout above; raised whenever it changes.
pub const RECORD_VERSION: u64 = 4;

/// Bytes of one record.
pub const RECORD_SIZE: usize = 10 * 8;

/// The site's call-frame information names its personality routine through the
/// record's personality slot (word 9, labelled by [`record_asm`]), for `naked_asm!`
/// between `.cfi_startproc` and `.cfi_endproc` (operand `site`, `sym`). The encoding
/// is GCC's for C++: `DW_EH_PE_indirect | DW_EH_PE_pcrel | DW_EH_PE_sdata4`, a
/// pc-relative reference to a word holding the routine's address. The unwinder reads
/// the word whenever it unwinds through the site, so the runtime can write it late;
/// 0 means none. The slot's symbol is named after the site's, which makes it unique.
pub const CFI_PERSONALITY: &str = ".cfi_personality 0x9b, {site}.probekit_personality";

/// Record flag: no FP/SIMD register carries an argument of the function or its
/// return value (every one is an integer, a `bool` or `char`, a pointer, a reference,
/// or a tuple or array of them). Its entry and return then have no FP/SIMD state
/// live, and the runtime's trampolines need not keep any (SysV AMD64 ABI 1.0 §3.2.3,
/// AAPCS64 §6.8.2: every vector register is caller-saved but the low halves of
/// aarch64's v8-v15, which a handler keeps as any callee does).
pub const NO_FP: u64 = 1;

/// The section holding the records.
pub const RECORD_SECTION: &str = "probekit_sites";
/// The section holding the names the records point at.
pub const NAME_SECTION: &str = ".rodata.probekit_site_names";

/// The bytes of a disabled site: x86_64 one 5-byte nop (`nopl 0x0(%rax,%rax,1)`, the
/// kernel's ideal nop), to become `call <trampoline>`; aarch64 `mov x9, x30; nop`, the
/// nop to become `bl <trampoline>` (seed 003). The aarch64 `mov` is there from the
/// start, as the kernel's `ftrace_init_nop` writes it before any code runs: patching
/// only the `bl` is one aligned store, and a thread stopped between the two words can
/// never reach the `bl` without x9 set.
pub fn nop(arch: Arch) -> &'static [u8] {
    match arch {
        Arch::X86_64 => &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        Arch::Aarch64 => &[0xe9, 0x03, 0x1e, 0xaa, 0x1f, 0x20, 0x03, 0xd5],
    }
}

/// Bytes of a site.
pub fn len(arch: Arch) -> usize {
    nop(arch).len()
}

/// The site's instructions for `naked_asm!`: the nop bytes, then the jump to the body
/// (an operand named `body`). Written as `.byte`/`.inst` so the assembler emits exactly
/// [`nop`], whatever encoding it would choose for a mnemonic.
pub fn site_asm(arch: Arch) -> Vec<String> {
    let bytes = nop(arch);
    match arch {
        Arch::X86_64 => {
            let list: Vec<String> = bytes.iter().map(|b| format!("{b:#04x}")).collect();
            vec![format!(".byte {}", list.join(", ")), "jmp {body}".into()]
        }
        Arch::Aarch64 => {
            let mut lines: Vec<String> = bytes.chunks_exact(4).map(|w| format!(".inst {:#010x}", u32::from_le_bytes([w[0], w[1], w[2], w[3]]))).collect();
            lines.push("b {body}".into());
            lines
        }
    }
}

/// Where the exit path starts, from the site: x86_64 after the 5-byte nop and the
/// 5-byte `jmp rel32` to the body (a jump to another function's symbol is always
/// `rel32`; the runtime checks the record's word 5 against it anyway).
pub fn exit_offset(arch: Arch) -> usize {
    match arch {
        Arch::X86_64 => 10,
        Arch::Aarch64 => 12,
    }
}

/// Where the exit path's entry-trampoline call returns to, from the site: x86_64 after
/// `call qword ptr [rip + slot]` (6 bytes); aarch64 after `mov x9, x30; adrp x16, slot;
/// ldr x16, [x16, :lo12:slot]; blr x16`. The entry trampoline's dispatcher finds the
/// site from it.
pub fn exit_resume_offset(arch: Arch) -> usize {
    match arch {
        Arch::X86_64 => exit_offset(arch) + 6,
        Arch::Aarch64 => exit_offset(arch) + 16,
    }
}

/// The exit path's instructions for `naked_asm!`, right after [`site_asm`]'s, with the
/// call-frame information they need, or `None` where there is none. Operands: `body` (`sym`),
/// `args` (`const`: an upper bound of the bytes of stack-passed arguments, a multiple
/// of 8) and `frame` (`const`: the bytes allocated below the entry stack pointer,
/// at least `args`, and `frame + 8` a multiple of 16 so that the body is called with
/// the stack aligned as the ABI wants; see [`exit_frame`]). It refers to the record's
/// slots by the local labels `4:` and `5:`, which [`record_asm`] defines.
///
/// x86_64, stack picture at the body's call (`P`: rsp at the function's entry):
///
/// ```text
///  P+8 ..          the caller's stack-passed arguments (read: `args` bytes)
///  P               the caller's return address
///  P-frame+args .. padding
///  P-frame ..      the copy of the stack-passed arguments the body receives
/// ```
///
/// r10 and r11 (neither an argument nor callee-saved, SysV AMD64 ABI 1.0 §3.2.3) copy
/// the arguments; the flags are dead at a function entry. aarch64 keeps the return
/// address in its frame (`frame - 8`) across the body's call, and has the exit
/// trampoline entered as from a site, with the return address in x9.
pub fn exit_asm(arch: Arch) -> Option<Vec<String>> {
    match arch {
        Arch::X86_64 => Some(
            [
                EXIT_GUARD,
                // The exit path: CFA = rsp + 8 as at the entry.
                "1:",
                // The entry trampoline (runs the entry handlers), as the site's call would.
                "call qword ptr [rip + 4f]",
                "sub rsp, {frame}",
                ".cfi_adjust_cfa_offset {frame}",
                // The stack-passed arguments, where the body will look for them.
                ".if {args}",
                "xor r10d, r10d",
                "6:",
                "mov r11, qword ptr [rsp + r10 + {frame} + 8]",
                "mov qword ptr [rsp + r10], r11",
                "add r10, 8",
                "cmp r10, {args}",
                "jb 6b",
                ".endif",
                "call {body}",
                "add rsp, {frame}",
                ".cfi_adjust_cfa_offset -{frame}",
                // The exit trampoline (runs the return handlers, which may change the
                // return registers), called at the entry's stack pointer, then back to
                // the caller.
                "call qword ptr [rip + 5f]",
                "ret",
                ".endif",
            ]
            .iter()
            .map(|l| l.to_string())
            .collect(),
        ),
        Arch::Aarch64 => Some(
            [
                EXIT_GUARD,
                // The exit path: CFA = sp, the return address in x30, as at the entry.
                "1:",
                // The entry trampoline, entered as from the site (`mov x9, x30; bl`);
                // x16 (IP0) carries nothing at a function entry (AAPCS64 §6.1.1). It
                // restores x30 (from x9's value) and every argument register.
                "mov x9, x30",
                "adrp x16, 4f",
                "ldr x16, [x16, :lo12:4f]",
                "blr x16",
                "sub sp, sp, #{frame}",
                ".cfi_def_cfa_offset {frame}",
                "str x30, [sp, #{frame} - 8]",
                ".cfi_offset x30, -8",
                // The stack-passed arguments, where the body will look for them (x9,
                // x16 and x17 are neither arguments nor the indirect result register).
                ".if {args}",
                "add x9, sp, #{frame}",
                "mov x16, #0",
                "6:",
                "ldr x17, [x9, x16]",
                "str x17, [sp, x16]",
                "add x16, x16, #8",
                "cmp x16, #{args}",
                "b.lo 6b",
                ".endif",
                "bl {body}",
                // The return address into x9, as the trampoline wants it, and the
                // stack pointer back at the entry's.
                "ldr x9, [sp, #{frame} - 8]",
                ".cfi_register x30, x9",
                "add sp, sp, #{frame}",
                ".cfi_def_cfa_offset 0",
                "adrp x16, 5f",
                "ldr x16, [x16, :lo12:5f]",
                "blr x16",
                // The trampoline restored x30 from its field: the return address.
                ".cfi_restore x30",
                "ret",
                ".endif",
            ]
            .iter()
            .map(|l| l.to_string())
            .collect(),
        ),
    }
}

/// The largest exit-path frame. Below the entry stack pointer it stays within one page,
/// so that no guard page can be stepped over (the copy writes upwards from the new
/// stack pointer), and within aarch64's immediates. Above it the copy reads up to as
/// many bytes of the caller's stack as the bound says, which counts every argument as
/// if it were on the stack: a Rust-ABI function taking a large aggregate (passed by
/// pointer) called near the top of a thread's stack would read past the mapping with
/// a page-sized bound; a caller's frames and the thread's own data above its stack
/// cover a few hundred bytes. A function whose arguments may need more gets no exit
/// path: the assembler leaves it out (an `.if` around it) and its record says so, and
/// return probes on it hijack the return address.
pub const MAX_EXIT_FRAME: usize = 504;

/// The assembler condition around the exit path and its record word.
const EXIT_GUARD: &str = ".if {frame} <= 504";
const _: () = assert!(MAX_EXIT_FRAME == 504, "EXIT_GUARD spells MAX_EXIT_FRAME");

/// The exit path's frame for `args` bytes of stack-passed arguments (see [`exit_asm`]).
pub const fn exit_frame(arch: Arch, args: usize) -> usize {
    match arch {
        Arch::X86_64 => (args + 8).div_ceil(16) * 16 - 8,
        Arch::Aarch64 => args.div_ceil(16) * 16 + 16,
    }
}

/// [`exit_frame`] as a Rust constant expression of the variable `args`, for the macro
/// (the user's crate computes the bound from the argument types at compile time).
pub fn exit_frame_expr(arch: Arch, args: &str) -> String {
    match arch {
        Arch::X86_64 => format!("({args} + 8).div_ceil(16) * 16 - 8"),
        Arch::Aarch64 => format!("{args}.div_ceil(16) * 16 + 16"),
    }
}

/// The record's asm for `naked_asm!`, after the site's instructions, in two parts
/// around the line that defines the name's bytes, which the caller writes (starting
/// with local label `2:`; the macro builds it from `module_path!()`). Operands: `site`
/// and `function` (`sym`).
pub struct RecordAsm {
    /// The record, then the switch to the names' section.
    pub before_name: Vec<String>,
    /// The name's end label and the switch back.
    pub after_name: Vec<String>,
}

/// [`RecordAsm`] for `arch` (the section type is spelled `@progbits` on x86_64,
/// `%progbits` on aarch64); `exit`: the site has an exit path at label `1:`; `flags`:
/// the record's flags ([`NO_FP`]).
pub fn record_asm(arch: Arch, exit: bool, flags: u64) -> RecordAsm {
    let progbits = match arch {
        Arch::X86_64 => "@progbits",
        Arch::Aarch64 => "%progbits",
    };
    RecordAsm {
        before_name: vec![
            // `R` (SHF_GNU_RETAIN) keeps the records from `--gc-sections`; writable
            // because PIEs and libraries relocate the pointers at load time.
            format!(".pushsection {RECORD_SECTION}, \"awR\", {progbits}"),
            ".balign 8".into(),
            format!(".quad {RECORD_VERSION}"),
            ".quad {site}".into(),
            ".quad {function}".into(),
            ".quad 2f".into(),
            ".quad 3f - 2f".into(),
            // The exit path, if the assembler emitted it (`EXIT_GUARD`).
            if exit { format!("{EXIT_GUARD}\n.quad 1b\n.else\n.quad 0\n.endif") } else { ".quad 0".into() },
            "4: .quad 0".into(),
            "5: .quad 0".into(),
            format!(".quad {flags}"),
            // A symbol of its own (not a local label, which assemblers relocate as
            // its section plus an offset): linkers merge CIEs whose personality
            // relocations name the same symbol, and would give every site of a section
            // the first one's slot. Weak: two copies of a site keep one slot, not a
            // duplicate symbol. Hidden: never exported from a library.
            ".weak {site}.probekit_personality".into(),
            ".hidden {site}.probekit_personality".into(),
            "{site}.probekit_personality: .quad 0".into(),
            ".popsection".into(),
            format!(".pushsection {NAME_SECTION}, \"a\", {progbits}"),
        ],
        after_name: vec!["3:".into(), ".popsection".into()],
    }
}

/// The contract as Rust items for the runtime of `arch` (its build script writes them
/// to `OUT_DIR`): `SITE_LEN`, `SITE_NOP`, `SITE_RECORD_VERSION`, `SITE_RECORD_SIZE`.
pub fn runtime_consts(arch: Arch) -> String {
    format!(
        "/// Bytes of a `#[traceable]` site (probe-codegen `site::len`).\n\
         pub const SITE_LEN: usize = {};\n\
         /// The bytes of a disabled site (probe-codegen `site::nop`).\n\
         pub(crate) const SITE_NOP: [u8; SITE_LEN] = {:?};\n\
         /// The site record layout's version (probe-codegen `site::RECORD_VERSION`).\n\
         pub(crate) const SITE_RECORD_VERSION: u64 = {RECORD_VERSION};\n\
         /// Bytes of one site record (probe-codegen `site::RECORD_SIZE`).\n\
         pub(crate) const SITE_RECORD_SIZE: usize = {RECORD_SIZE};\n\
         /// Record flag: no FP/SIMD register carries an argument or the return value (probe-codegen `site::NO_FP`).\n\
         pub(crate) const SITE_NO_FP: u64 = {NO_FP};\n\
         /// Where a site's exit path starts, from the site (probe-codegen `site::exit_offset`).\n\
         #[allow(dead_code)]\n\
         pub(crate) const SITE_EXIT_OFFSET: usize = {};\n\
         /// Where the exit path's entry call returns, from the site (probe-codegen `site::exit_resume_offset`).\n\
         #[allow(dead_code)]\n\
         pub(crate) const SITE_EXIT_RESUME: usize = {};\n",
        len(arch),
        nop(arch),
        exit_offset(arch),
        exit_resume_offset(arch),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_asm_spells_the_nop_bytes() {
        assert_eq!(site_asm(Arch::X86_64)[0], ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00");
        // mov x9, x30 = orr x9, xzr, x30; nop
        assert_eq!(site_asm(Arch::Aarch64)[..2], [".inst 0xaa1e03e9".to_string(), ".inst 0xd503201f".to_string()]);
        let r = record_asm(Arch::X86_64, false, NO_FP);
        assert_eq!(r.before_name.iter().filter(|l| l.contains(".quad")).count() * 8, RECORD_SIZE, "one .quad line per word");
        let quads: Vec<&String> = r.before_name.iter().filter(|l| l.contains(".quad")).collect();
        assert_eq!(quads[8], ".quad 1", "the flags are word 8");
        let (slot, value) = quads[9].split_once(':').unwrap();
        assert!(value.trim() == ".quad 0" && CFI_PERSONALITY.ends_with(&format!(", {slot}")), "word 9 is the personality slot");
        assert!(record_asm(Arch::Aarch64, true, 0).before_name.iter().any(|l| l.contains(".quad 1b")));
        assert_eq!(exit_frame(Arch::X86_64, 0), 8);
        assert_eq!(exit_frame(Arch::X86_64, 8), 8);
        assert_eq!(exit_frame(Arch::X86_64, 16), 24);
        assert!(exit_frame(Arch::Aarch64, 24) >= 24 + 16 && exit_frame(Arch::Aarch64, 24).is_multiple_of(16));
        assert!(runtime_consts(Arch::Aarch64).contains("SITE_LEN: usize = 8"));
    }
}
