//! Symbols of the process: the ELF symbol tables (`.symtab` and `.dynsym`) of the
//! executable and every loaded library, found through `/proc/self/maps`, so that
//! functions that are not exported resolve too. Registration and listing only: this
//! reads files and allocates.

use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};
use std::sync::{Arc, Mutex};

/// A file mapped into the process: its path, the address its file offset 0 is mapped
/// at, and the ranges of its mappings.
pub(crate) struct Image {
    pub(crate) path: String,
    pub(crate) start: usize,
    pub(crate) ranges: Vec<(usize, usize)>,
}

pub(crate) fn images() -> Vec<Image> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut out: Vec<Image> = Vec::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(off), Some(path)) = (f.first(), f.get(2), f.get(5)) else { continue };
        if !path.starts_with('/') {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else { continue };
        let (Ok(a), Ok(b), Ok(off)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16), usize::from_str_radix(off, 16)) else {
            continue;
        };
        match out.iter_mut().find(|i| i.path == *path) {
            Some(i) => {
                i.ranges.push((a, b));
                if off == 0 {
                    i.start = i.start.min(a);
                }
            }
            None => out.push(Image { path: path.to_string(), start: if off == 0 { a } else { usize::MAX }, ranges: vec![(a, b)] }),
        }
    }
    out.retain(|i| i.start != usize::MAX);
    out
}

/// The function symbols of an image, with its load bias applied: `(name, address,
/// size)`. Parsed once per file and load address (and file identity: a library
/// replaced on disk and loaded again is read again), as registering many probes
/// would otherwise re-read the executable each time.
fn functions(image: &Image) -> Arc<Vec<(String, usize, usize)>> {
    type Cache = Vec<((String, usize, u64, i64), Arc<Vec<(String, usize, usize)>>)>;
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

fn parse_functions(image: &Image) -> Vec<(String, usize, usize)> {
    let Ok(data) = std::fs::read(&image.path) else { return Vec::new() };
    let Ok(file) = object::File::parse(&*data) else { return Vec::new() };
    let Some(bias) = load_bias(&file, image) else { return Vec::new() };
    let mut f: Vec<(String, usize, usize)> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
        .filter_map(|s| Some((s.name().ok()?.to_string(), bias.wrapping_add(s.address() as usize), s.size() as usize)))
        .collect();
    f.sort_by_key(|(_, a, _)| *a); // for `function_at`'s binary search
    f
}

/// The load bias of `image` parsed as `file`: where the segment holding file offset 0
/// landed, minus its link address.
pub(crate) fn load_bias<'data, R: object::ReadRef<'data>>(file: &object::File<'data, R>, image: &Image) -> Option<usize> {
    let base = file.segments().find(|s| s.file_range().0 == 0).map(|s| s.address() as usize)?;
    Some(image.start.wrapping_sub(base))
}

/// The address of function `name` (the executable first, then the libraries): its
/// symbol name, or for Rust a demangled path without the hash (`my_crate::parse`).
pub(crate) fn address_of(name: &str) -> Option<usize> {
    let images = images();
    let find = |matches: &dyn Fn(&str) -> bool| {
        images.iter().find_map(|i| functions(i).iter().find(|(n, ..)| matches(n)).map(|(_, a, _)| *a))
    };
    find(&|n| n == name).or_else(|| find(&|n| (n.starts_with("_ZN") || n.starts_with("_R")) && demangled(n) == name))
}

/// A symbol name as people write it: Rust paths demangled without the hash.
fn demangled(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name))
}

/// The function containing `addr`: `(name, start, size)`.
pub(crate) fn function_at(addr: usize) -> Option<(String, usize, usize)> {
    let images = images();
    let image = images.iter().find(|i| i.ranges.iter().any(|(a, b)| (*a..*b).contains(&addr)))?;
    // The nearest start at or below `addr` whose function contains it: from the last
    // start <= addr backwards, past a few sizeless or nested symbols at most.
    let f = functions(image);
    let below = f.partition_point(|(_, a, _)| *a <= addr);
    f[..below].iter().rev().take(64).find(|(_, a, size)| (*a..*a + (*size).max(1)).contains(&addr)).cloned()
}

/// The function containing `addr` (demangled) and the offset into it.
pub(crate) fn symbol_of(addr: usize) -> Option<(String, usize)> {
    function_at(addr).map(|(n, a, _)| (demangled(&n), addr - a))
}
