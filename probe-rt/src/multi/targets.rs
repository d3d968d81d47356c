//! Which functions a multi-function probe chooses: globs over the symbol tables, names,
//! function pointers.

use super::Skipped;
use crate::sys::image::generated;
use crate::sys::symbols::Snapshot;
use crate::Error;
use std::collections::HashSet;

/// What the builder was told to attach to.
#[derive(Default)]
pub(super) struct Choice {
    pub(super) patterns: Vec<String>,
    pub(super) excludes: Vec<String>,
    pub(super) object: Option<String>,
    pub(super) names: Vec<String>,
    pub(super) functions: Vec<usize>,
}

fn compile(globs: &[String]) -> Result<Vec<glob::Pattern>, Error> {
    globs.iter().map(|g| glob::Pattern::new(g).map_err(|e| Error::BadPattern { pattern: g.clone(), reason: e.msg.to_string() })).collect()
}

/// The functions chosen, `(name, address)`, and those that could not be.
type Chosen = (Vec<(String, usize)>, Vec<Skipped>);

impl Choice {
    /// The functions chosen, `(name, address)` each once (by address, in the order
    /// found: patterns over each image's symbols, then names, then pointers), and the
    /// names that did not resolve. [`Error::NoMatch`] if nothing was chosen.
    pub(super) fn resolve(&self) -> Result<Chosen, Error> {
        let (patterns, excludes) = (compile(&self.patterns)?, compile(&self.excludes)?);
        let excluded = |names: &[&str]| names.iter().any(|n| excludes.iter().any(|p| p.matches(n)));
        let mut chosen = Vec::new();
        let mut skipped = Vec::new();
        let mut seen = HashSet::new();
        if !patterns.is_empty() {
            let symbols = Snapshot::now();
            for (image, f) in symbols.functions() {
                if f.label || self.object.as_ref().is_some_and(|o| !image.path.contains(o.as_str())) {
                    continue;
                }
                let path = f.display_name().to_string();
                let names = [path.as_str(), f.name.as_str()];
                if generated(&path) || !names.iter().any(|n| patterns.iter().any(|p| p.matches(n))) || excluded(&names) {
                    continue;
                }
                // An IFUNC symbol is its resolver: attach to what calls reach, as `.symbol`.
                let addr = match f.ifunc {
                    false => f.addr,
                    true => match crate::breakpoint::resolve(&f.name) {
                        Ok(a) => a,
                        Err(error) => {
                            skipped.push(Skipped { name: path, addr: f.addr, error });
                            continue;
                        }
                    },
                };
                if seen.insert(addr) {
                    chosen.push((path, addr));
                }
            }
        }
        for name in &self.names {
            match crate::breakpoint::resolve(name) {
                Ok(addr) if seen.insert(addr) => chosen.push((name.clone(), addr)),
                Ok(_) => {}
                Err(error) => skipped.push(Skipped { name: name.clone(), addr: 0, error }),
            }
        }
        for &addr in &self.functions {
            if seen.insert(addr) {
                let name = crate::sys::symbols::symbol_of(addr).map_or_else(|| format!("{addr:#x}"), |(n, _)| n);
                chosen.push((name, addr));
            }
        }
        if chosen.is_empty() && skipped.is_empty() {
            return Err(Error::NoMatch { patterns: self.patterns.clone(), names: self.names.len() + self.functions.len() });
        }
        Ok((chosen, skipped))
    }
}
