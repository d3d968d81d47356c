//! What probekit reads from the ELF file of each mapped image, once per file and load
//! address (and file identity: a library replaced on disk and loaded again is read
//! again): its function symbols and where its `#[traceable]` site table is. One cache
//! for both, since registering many probes would otherwise re-read the files; the
//! files are read through `object`'s `ReadCache`, so only the headers, the symbol
//! tables and their strings are read, not debug information.

use crate::sys::maps::Image;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};
use std::sync::{Arc, Mutex};

/// Whether a Rust path is one probekit generated for a `#[traceable]` function (its
/// site or its body): the function itself is the one to name.
pub(crate) fn generated(path: &str) -> bool {
    path.rsplit("::").next().is_some_and(|last| last.starts_with("__probekit_"))
}

/// What an image's file says.
#[derive(Default)]
pub(crate) struct Parsed {
    /// Its function symbols, sorted by address.
    pub(crate) functions: Vec<Function>,
    /// Its load bias, if its file could be matched to the mapping.
    pub(crate) bias: Option<usize>,
    /// Where its `probekit_sites` section is in memory: `(first byte, size)`.
    pub(crate) site_table: Option<(usize, usize)>,
    /// The separate cold parts of functions (GCC's hot/cold split: `f.cold`,
    /// `f.cold.N`, symbols of their own that jump back into `f`), by the name of the
    /// function they belong to: indices into `functions`.
    pub(crate) cold: std::collections::HashMap<String, Vec<usize>>,
}

/// The parsed file of `image` (empty if it cannot be read or parsed).
pub(crate) fn parsed(image: &Image) -> Arc<Parsed> {
    type Cache = Vec<((String, usize, u64, i64), Arc<Parsed>)>;
    static CACHE: Mutex<Cache> = Mutex::new(Vec::new());
    use std::os::unix::fs::MetadataExt;
    let Ok(file) = std::fs::File::open(&image.path) else { return Arc::default() };
    let Ok(meta) = file.metadata() else { return Arc::default() };
    let key = (image.path.clone(), image.start, meta.ino(), meta.mtime_nsec() + meta.mtime() * 1_000_000_000);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = cache.iter().find(|(k, _)| *k == key) {
        return p.clone();
    }
    let p = Arc::new(parse(image, file));
    cache.push((key, p.clone()));
    p
}

fn parse(image: &Image, file: std::fs::File) -> Parsed {
    let data = object::ReadCache::new(file);
    let Ok(file) = object::File::parse(&data) else { return Parsed::default() };
    let Some(bias) = load_bias(&file, image) else { return Parsed::default() };
    let site_table = file.section_by_name("probekit_sites").map(|s| (bias.wrapping_add(s.address() as usize), s.size() as usize));
    let mut functions: Vec<Function> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter_map(|s| {
            let label = match s.kind() == SymbolKind::Text && s.section_index().is_some() {
                true => false,
                false if is_code_label(&file, &s) => true,
                false => return None,
            };
            let ifunc = matches!(s.flags(), object::SymbolFlags::Elf { st_info, .. } if st_info & 0xf == STT_GNU_IFUNC);
            let (addr, size) = (bias.wrapping_add(s.address() as usize), s.size() as usize);
            let name = s.name().ok()?.to_string();
            let path = match name.starts_with("_ZN") || name.starts_with("_R") {
                true => format!("{:#}", rustc_demangle::demangle(&name)),
                false => String::new(),
            };
            Some(Function { name, path, addr, size, ifunc, label })
        })
        .collect();
    functions.sort_by_key(|f| f.addr); // for the binary searches of `symbols`
    let mut cold: std::collections::HashMap<String, Vec<usize>> = std::collections::HashMap::new();
    for (k, f) in functions.iter().enumerate() {
        if let Some((base, rest)) = f.name.rsplit_once(".cold") {
            if !base.is_empty() && (rest.is_empty() || rest.strip_prefix('.').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))) {
                cold.entry(base.to_string()).or_default().push(k);
            }
        }
    }
    Parsed { functions, bias: Some(bias), site_table, cold }
}

/// One function symbol of an image, with the load bias applied.
#[derive(Clone, Debug)]
pub(crate) struct Function {
    /// Its symbol name (mangled).
    pub(crate) name: String,
    /// A Rust symbol's path, demangled without the hash (`my_crate::parse`); empty for
    /// other symbols. Demangled once, when the image is read.
    pub(crate) path: String,
    /// Its first byte.
    pub(crate) addr: usize,
    /// Its size in bytes (0: unknown, as for hand-written asm without `.size`).
    pub(crate) size: usize,
    /// An IFUNC (`STT_GNU_IFUNC`): the symbol is the resolver, which picks the
    /// implementation calls really reach (glibc's `memcpy`, `strlen`, …).
    pub(crate) ifunc: bool,
    /// A label (`STT_NOTYPE`) rather than a function symbol: code starts there, but it
    /// may be the middle of a function.
    pub(crate) label: bool,
}

impl Function {
    /// Its name as people write it: the Rust path, or the symbol.
    pub(crate) fn display_name(&self) -> &str {
        if self.path.is_empty() {
            &self.name
        } else {
            &self.path
        }
    }

    /// Whether `addr` is inside it (a sizeless function holds its first byte only).
    pub(crate) fn holds(&self, addr: usize) -> bool {
        (self.addr..self.addr + self.size.max(1)).contains(&addr)
    }
}

/// `STT_GNU_IFUNC` (elf.h): a symbol whose value is a resolver function.
const STT_GNU_IFUNC: u8 = 10;
/// `STT_NOTYPE` (elf.h): a symbol of no declared type (an asm label).
const STT_NOTYPE: u8 = 0;

/// A label in code (`STT_NOTYPE`: a hand-written asm symbol without `.type`), which
/// starts code of unknown size; not the aarch64 mapping symbols (`$x`, `$d`).
fn is_code_label<'data, R: object::ReadRef<'data>>(file: &object::File<'data, R>, s: &object::Symbol<'data, '_, R>) -> bool {
    matches!(s.flags(), object::SymbolFlags::Elf { st_info, .. } if st_info & 0xf == STT_NOTYPE)
        && s.name().is_ok_and(|n| !n.is_empty() && !n.starts_with('$') && !n.starts_with(".L"))
        && s.section_index().and_then(|i| file.section_by_index(i).ok()).is_some_and(|sec| sec.kind() == object::SectionKind::Text)
}

/// The load bias of `image` parsed as `file`: where the segment holding file offset 0
/// landed, minus its link address.
fn load_bias<'data, R: object::ReadRef<'data>>(file: &object::File<'data, R>, image: &Image) -> Option<usize> {
    let base = file.segments().find(|s| s.file_range().0 == 0).map(|s| s.address() as usize)?;
    Some(image.start.wrapping_sub(base))
}
