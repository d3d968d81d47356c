//! Symbols of the process: look-ups over the ELF symbol tables (`.symtab` and
//! `.dynsym`) of the executable and every loaded library (read by `sys::image`), so
//! that functions that are not exported resolve too. Registration and listing only:
//! this reads files and allocates.

pub(crate) use crate::sys::image::Function;
use crate::sys::image::{parsed, Parsed};
use crate::sys::maps::{Image, PerLoad};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Functions declared at run time (`crate::jit`): code no symbol table describes, by
/// first byte. Consulted before the images' symbols, for address and name look-ups.
static JIT: Mutex<BTreeMap<usize, Function>> = Mutex::new(BTreeMap::new());

fn jit() -> std::sync::MutexGuard<'static, BTreeMap<usize, Function>> {
    JIT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a run-time function could not be declared (see [`declare_jit`]).
pub(crate) enum JitClash {
    /// Its range overlaps this declared function's.
    Range(Function),
    /// This declared function has its name.
    Name(Function),
}

/// Declares the function `f` (a sized one, the caller checked) for the look-ups, unless
/// its range or name is another declared function's.
pub(crate) fn declare_jit(f: Function) -> Result<(), JitClash> {
    let mut t = jit();
    let end = f.addr + f.size;
    if let Some((_, g)) = t.range(..end).next_back().filter(|(_, g)| g.addr + g.size > f.addr) {
        return Err(JitClash::Range(g.clone()));
    }
    if let Some(g) = t.values().find(|g| g.name == f.name) {
        return Err(JitClash::Name(g.clone()));
    }
    t.insert(f.addr, f);
    Ok(())
}

/// Takes the declared function starting at `addr` out of the look-ups.
pub(crate) fn undeclare_jit(addr: usize) {
    jit().remove(&addr);
}

/// The declared function containing `addr`.
fn jit_at(addr: usize) -> Option<Function> {
    jit().range(..=addr).next_back().map(|(_, f)| f).filter(|f| f.holds(addr)).cloned()
}

/// The declared function named `name`.
fn jit_named(name: &str) -> Option<Function> {
    jit().values().find(|f| f.name == name).cloned()
}

/// The function symbols of every image mapped now, read once: for many look-ups in a
/// row (each free function below reads `/proc/self/maps` again).
pub(crate) struct Snapshot {
    images: Vec<(Image, Arc<Parsed>)>,
    /// Made from a read of the mappings (false: the read failed, the snapshot is
    /// empty and not kept).
    pub(crate) complete: bool,
}

impl Snapshot {
    /// The images mapped now, with their functions: read again only when the loader
    /// has loaded or unloaded something since (see `sys::maps`), or when the last
    /// read of the mappings failed (an empty snapshot, not kept).
    pub(crate) fn now() -> Arc<Snapshot> {
        static CACHE: PerLoad<Snapshot> = PerLoad::new();
        let read = || {
            let images = crate::sys::maps::images()?.into_iter().map(|i| {
                let p = parsed(&i);
                (i, p)
            });
            Some(Snapshot { images: images.collect(), complete: true })
        };
        CACHE.get(false, read).unwrap_or_else(|| Arc::new(Snapshot { images: Vec::new(), complete: false }))
    }

    /// The function named `name` (the executable first, then the libraries): its
    /// symbol name (a C symbol, a mangled Rust one), a Rust path without the hash
    /// (`my_crate::parse::number`), or the end of one (`number`, `parse::number`) when
    /// it names one function of the process only. `Err` with the candidates (their
    /// paths, sorted) when it names several.
    pub(crate) fn resolve_name(&self, name: &str) -> Result<Option<Function>, Vec<String>> {
        if let Some(f) = jit_named(name) {
            return Ok(Some(f));
        }
        let all = || self.images.iter().flat_map(|(_, p)| p.functions.iter()).filter(|f| !f.label);
        if let Some(f) = all().find(|f| f.name == name).or_else(|| all().find(|f| f.path == name)) {
            return Ok(Some(f.clone()));
        }
        let suffix = format!("::{name}");
        let mut found: Vec<&Function> = all().filter(|f| f.path.ends_with(&suffix) && !super::image::generated(&f.path)).collect();
        // Aliases of one function (and one function listed in .symtab and .dynsym) are one.
        found.sort_by_key(|f| f.addr);
        found.dedup_by_key(|f| f.addr);
        match found.as_slice() {
            [] => Ok(None),
            [f] => Ok(Some((*f).clone())),
            many => {
                let mut names: Vec<String> = many.iter().map(|f| f.path.clone()).collect();
                names.sort();
                names.dedup();
                Err(names)
            }
        }
    }

    /// [`Self::resolve_name`], an ambiguous name counting as not found.
    pub(crate) fn function_named(&self, name: &str) -> Option<Function> {
        self.resolve_name(name).ok().flatten()
    }

    /// Every function symbol of every image, with its image.
    pub(crate) fn functions(&self) -> impl Iterator<Item = (&Image, &Function)> {
        self.images.iter().flat_map(|(i, p)| p.functions.iter().map(move |f| (i, f)))
    }

    /// The functions of the image holding `addr`, and how many of them start at or
    /// below it.
    fn below(&self, addr: usize) -> Option<(&[Function], usize)> {
        let (_, p) = self.images.iter().find(|(i, _)| i.ranges.iter().any(|(a, b)| (*a..*b).contains(&addr)))?;
        Some((&p.functions, p.functions.partition_point(|f| f.addr <= addr)))
    }

    /// The first symbol of the image holding `addr` that starts after it.
    pub(crate) fn next_start(&self, addr: usize) -> Option<usize> {
        let (f, below) = self.below(addr)?;
        f[below..].iter().map(|f| f.addr).find(|a| *a > addr)
    }

    /// The function containing `addr`, by its symbol's size (a declared run-time
    /// function first: see `crate::jit`).
    pub(crate) fn function_at(&self, addr: usize) -> Option<Function> {
        if let Some(f) = jit_at(addr) {
            return Some(f);
        }
        // The nearest start at or below `addr` whose function contains it: from the
        // last start <= addr backwards, past a few sizeless or nested symbols at most.
        let (f, below) = self.below(addr)?;
        f[..below].iter().rev().take(64).find(|f| f.holds(addr)).cloned()
    }

    /// The function containing `addr` by its symbol's size, past labels and sizeless
    /// symbols inside it (a label in the middle of a function holds its first byte).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // optprobes' x86_64 window checks
    pub(crate) fn sized_function_at(&self, addr: usize) -> Option<Function> {
        if let Some(f) = jit_at(addr) {
            return Some(f);
        }
        let (f, below) = self.below(addr)?;
        f[..below].iter().rev().take(64).find(|f| f.size > 0 && f.holds(addr)).cloned()
    }

    /// The separate cold parts of function `f` (`f.cold`, `f.cold.N`) in its image.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // optprobes' x86_64 window checks
    pub(crate) fn cold_parts(&self, f: &Function) -> Vec<Function> {
        let Some((_, p)) = self.images.iter().find(|(i, _)| i.ranges.iter().any(|(a, b)| (*a..*b).contains(&f.addr))) else { return Vec::new() };
        p.cold.get(&f.name).into_iter().flatten().filter_map(|k| p.functions.get(*k)).cloned().collect()
    }

    /// The functions `f` may be a separate cold part of (`f` is `g.cold` or
    /// `g.cold.N`): every `g` of its image (static functions of two files may share a
    /// name). Empty if `f` is no cold part.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // optprobes' x86_64 window checks
    pub(crate) fn parents_of_cold(&self, f: &Function) -> Vec<Function> {
        let Some((_, p)) = self.images.iter().find(|(i, _)| i.ranges.iter().any(|(a, b)| (*a..*b).contains(&f.addr))) else { return Vec::new() };
        let Some((base, _)) = f.name.rsplit_once(".cold") else { return Vec::new() };
        let is_part = p.cold.get(base).is_some_and(|parts| parts.iter().any(|k| p.functions.get(*k).is_some_and(|c| c.addr == f.addr)));
        match is_part {
            true => p.functions.iter().filter(|g| g.name == base).cloned().collect(),
            false => Vec::new(),
        }
    }

    /// The function an instruction boundary at `addr` can be proven from: the function
    /// containing it by its size, else the nearest sizeless symbol at or below it (code
    /// written in asm without `.size`, whose extent is unknown: decoding runs from
    /// there). None when no symbol of the image starts at or below `addr`, or the
    /// nearest one has a size and ends before it (code no symbol describes).
    pub(crate) fn known_start(&self, addr: usize) -> Option<Function> {
        if let Some(f) = jit_at(addr) {
            return Some(f);
        }
        let (f, below) = self.below(addr)?;
        if let Some(sized) = f[..below].iter().rev().take(64).find(|f| f.holds(addr)) {
            return Some(sized.clone());
        }
        f[..below].last().filter(|f| f.size == 0).cloned()
    }
}

/// [`Snapshot::resolve_name`] of the images mapped now.
pub(crate) fn resolve_name(name: &str) -> Result<Option<Function>, Vec<String>> {
    Snapshot::now().resolve_name(name)
}

/// [`Snapshot::function_at`] of the images mapped now.
pub(crate) fn function_at(addr: usize) -> Option<Function> {
    Snapshot::now().function_at(addr)
}

/// [`Snapshot::sized_function_at`] of the images mapped now.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn sized_function_at(addr: usize) -> Option<Function> {
    Snapshot::now().sized_function_at(addr)
}

/// [`Snapshot::cold_parts`] of the images mapped now.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn cold_parts(f: &Function) -> Vec<Function> {
    Snapshot::now().cold_parts(f)
}

/// [`Snapshot::parents_of_cold`] of the images mapped now.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn parents_of_cold(f: &Function) -> Vec<Function> {
    Snapshot::now().parents_of_cold(f)
}

/// [`Snapshot::known_start`] of the images mapped now.
pub(crate) fn known_start(addr: usize) -> Option<Function> {
    Snapshot::now().known_start(addr)
}

/// The function containing `addr` (demangled) and the offset into it.
pub(crate) fn symbol_of(addr: usize) -> Option<(String, usize)> {
    function_at(addr).map(|f| (f.display_name().to_string(), addr - f.addr))
}
