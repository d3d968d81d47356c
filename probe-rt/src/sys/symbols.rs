//! Symbols of the process: the ELF symbol tables (`.symtab` and `.dynsym`) of the
//! executable and every loaded library, found through `/proc/self/maps`, so that
//! functions that are not exported resolve too. Registration and listing only: this
//! reads files and allocates.

use crate::sys::maps::Image;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};
use std::sync::{Arc, Mutex};

/// One function symbol of an image, with the load bias applied.
#[derive(Clone, Debug)]
pub(crate) struct Function {
    /// Its symbol name (mangled).
    pub(crate) name: String,
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
    /// Whether `addr` is inside it (a sizeless function holds its first byte only).
    fn holds(&self, addr: usize) -> bool {
        (self.addr..self.addr + self.size.max(1)).contains(&addr)
    }
}

/// `STT_GNU_IFUNC` (elf.h): a symbol whose value is a resolver function.
const STT_GNU_IFUNC: u8 = 10;
/// `STT_NOTYPE` (elf.h): a symbol of no declared type (an asm label).
const STT_NOTYPE: u8 = 0;

/// The function symbols of an image, sorted by address. Parsed once per file and
/// load address (and file identity: a library replaced on disk and loaded again is
/// read again), as registering many probes would otherwise re-read the executable
/// each time.
fn functions(image: &Image) -> Arc<Vec<Function>> {
    type Cache = Vec<((String, usize, u64, i64), Arc<Vec<Function>>)>;
    static CACHE: Mutex<Cache> = Mutex::new(Vec::new());
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(&image.path) else { return Arc::default() };
    let key = (image.path.clone(), image.start, meta.ino(), meta.mtime_nsec() + meta.mtime() * 1_000_000_000);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, f)) = cache.iter().find(|(k, _)| *k == key) {
        return f.clone();
    }
    let f = Arc::new(parse_functions(image));
    cache.push((key, f.clone()));
    f
}

fn parse_functions(image: &Image) -> Vec<Function> {
    let Ok(data) = std::fs::read(&image.path) else { return Vec::new() };
    let Ok(file) = object::File::parse(&*data) else { return Vec::new() };
    let Some(bias) = load_bias(&file, image) else { return Vec::new() };
    let mut f: Vec<Function> = file
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
            Some(Function { name: s.name().ok()?.to_string(), addr, size, ifunc, label })
        })
        .collect();
    f.sort_by_key(|f| f.addr); // for the binary searches below
    f
}

/// A label in code (`STT_NOTYPE`: a hand-written asm symbol without `.type`), which
/// starts code of unknown size; not the aarch64 mapping symbols (`$x`, `$d`).
fn is_code_label<'data, R: object::ReadRef<'data>>(file: &object::File<'data, R>, s: &object::Symbol<'data, '_, R>) -> bool {
    matches!(s.flags(), object::SymbolFlags::Elf { st_info, .. } if st_info & 0xf == STT_NOTYPE)
        && s.name().is_ok_and(|n| !n.is_empty() && !n.starts_with('$') && !n.starts_with(".L"))
        && s.section_index().and_then(|i| file.section_by_index(i).ok()).is_some_and(|sec| sec.kind() == object::SectionKind::Text)
}

/// The load bias of `image` parsed as `file`: where the segment holding file offset 0
/// landed, minus its link address.
pub(crate) fn load_bias<'data, R: object::ReadRef<'data>>(file: &object::File<'data, R>, image: &Image) -> Option<usize> {
    let base = file.segments().find(|s| s.file_range().0 == 0).map(|s| s.address() as usize)?;
    Some(image.start.wrapping_sub(base))
}

/// The function symbols of every image mapped now, read once: for many look-ups in a
/// row (each free function below reads `/proc/self/maps` again).
pub(crate) struct Snapshot {
    images: Vec<(Image, Arc<Vec<Function>>)>,
}

impl Snapshot {
    /// The images mapped now, with their functions: read again only when the loader
    /// has loaded or unloaded something since (see `sys::maps`).
    pub(crate) fn now() -> Arc<Snapshot> {
        static CACHE: Mutex<Option<(u64, Arc<Snapshot>)>> = Mutex::new(None);
        let generation = crate::sys::maps::loader_generation();
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, s)) = &*cache {
            if *g == generation && generation != u64::MAX {
                return s.clone();
            }
        }
        let s = Arc::new(Snapshot {
            images: crate::sys::maps::images()
                .into_iter()
                .map(|i| {
                    let f = functions(&i);
                    (i, f)
                })
                .collect(),
        });
        *cache = Some((generation, s.clone()));
        s
    }

    /// The function named `name` (the executable first, then the libraries): its
    /// symbol name, or for Rust a demangled path without the hash (`my_crate::parse`).
    pub(crate) fn function_named(&self, name: &str) -> Option<Function> {
        let find = |matches: &dyn Fn(&str) -> bool| self.images.iter().find_map(|(_, f)| f.iter().find(|f| matches(&f.name)).cloned());
        find(&|n| n == name).or_else(|| find(&|n| (n.starts_with("_ZN") || n.starts_with("_R")) && demangled(n) == name))
    }

    /// Every function symbol of every image, with its image.
    pub(crate) fn functions(&self) -> impl Iterator<Item = (&Image, &Function)> {
        self.images.iter().flat_map(|(i, f)| f.iter().map(move |f| (i, f)))
    }

    /// The functions of the image holding `addr`, and how many of them start at or
    /// below it.
    fn below(&self, addr: usize) -> Option<(&[Function], usize)> {
        let (_, f) = self.images.iter().find(|(i, _)| i.ranges.iter().any(|(a, b)| (*a..*b).contains(&addr)))?;
        Some((f, f.partition_point(|f| f.addr <= addr)))
    }

    /// The function containing `addr`, by its symbol's size.
    pub(crate) fn function_at(&self, addr: usize) -> Option<Function> {
        // The nearest start at or below `addr` whose function contains it: from the
        // last start <= addr backwards, past a few sizeless or nested symbols at most.
        let (f, below) = self.below(addr)?;
        f[..below].iter().rev().take(64).find(|f| f.holds(addr)).cloned()
    }

    /// The function an instruction boundary at `addr` can be proven from: the function
    /// containing it by its size, else the nearest sizeless symbol at or below it (code
    /// written in asm without `.size`, whose extent is unknown: decoding runs from
    /// there). None when no symbol of the image starts at or below `addr`, or the
    /// nearest one has a size and ends before it (code no symbol describes).
    pub(crate) fn known_start(&self, addr: usize) -> Option<Function> {
        let (f, below) = self.below(addr)?;
        if let Some(sized) = f[..below].iter().rev().take(64).find(|f| f.holds(addr)) {
            return Some(sized.clone());
        }
        f[..below].last().filter(|f| f.size == 0).cloned()
    }
}

/// [`Snapshot::function_named`] of the images mapped now.
pub(crate) fn function_named(name: &str) -> Option<Function> {
    Snapshot::now().function_named(name)
}

/// A symbol name as people write it: Rust paths demangled without the hash.
pub(crate) fn demangled(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name))
}

/// [`Snapshot::function_at`] of the images mapped now.
pub(crate) fn function_at(addr: usize) -> Option<Function> {
    Snapshot::now().function_at(addr)
}

/// [`Snapshot::known_start`] of the images mapped now.
pub(crate) fn known_start(addr: usize) -> Option<Function> {
    Snapshot::now().known_start(addr)
}

/// The function containing `addr` (demangled) and the offset into it.
pub(crate) fn symbol_of(addr: usize) -> Option<(String, usize)> {
    function_at(addr).map(|f| (demangled(&f.name), addr - f.addr))
}
