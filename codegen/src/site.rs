//! The contract of a `#[traceable]` site, defined once and used by both sides: the
//! attribute macro, which emits the site and its record, and the runtime, which finds
//! the records and patches the sites (it receives these definitions through its build
//! script). usdt keeps its probe record's writer and reader side by side the same way.
//!
//! A site is the first instruction(s) of a naked function: patchable nops, then a jump
//! to the body. Its record, in the retained `probekit_sites` section, is five
//! little-endian `u64`s, 8-aligned, back to back:
//!
//! | word | value |
//! | --- | --- |
//! | 0 | [`RECORD_VERSION`] |
//! | 1 | the site (the naked function's first byte) |
//! | 2 | the function users call (the Rust wrapper) |
//! | 3 | the name's first byte, in `.rodata.probekit_site_names` |
//! | 4 | the name's length |
//!
//! A reader skips records of another version (a library built by another probekit).

use crate::Arch;

/// The version of the record layout above; raised whenever it changes.
pub const RECORD_VERSION: u64 = 1;

/// Bytes of one record.
pub const RECORD_SIZE: usize = 5 * 8;

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
/// `%progbits` on aarch64).
pub fn record_asm(arch: Arch) -> RecordAsm {
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
         pub(crate) const SITE_RECORD_SIZE: usize = {RECORD_SIZE};\n",
        len(arch),
        nop(arch)
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
        let r = record_asm(Arch::X86_64);
        assert_eq!(r.before_name.len() * 8 - 8 * 4, RECORD_SIZE, "one .quad line per word");
        assert!(runtime_consts(Arch::Aarch64).contains("SITE_LEN: usize = 8"));
    }
}
