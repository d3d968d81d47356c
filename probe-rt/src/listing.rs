//! The listing of registered probes, as the kernel's `kprobes/list`.

use crate::registry;
use crate::sys::maps;
use std::sync::atomic::Ordering;

/// One registered probe, as [`list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeInfo {
    /// The probed address.
    pub addr: usize,
    /// A return probe's entry (`r` in the listing) rather than a breakpoint probe (`k`).
    pub is_return: bool,
    /// The function holding it (ELF symbol tables), and the offset into it.
    pub symbol: Option<(String, usize)>,
    /// Whether the breakpoint is in place.
    pub enabled: bool,
    /// Whether the code is gone (its library was unloaded).
    pub gone: bool,
    /// Rides a `#[traceable]` function's site (the kernel's `[FTRACE]`).
    pub site: bool,
    /// A jump to a detour, not a breakpoint (the kernel's `[OPTIMIZED]`).
    pub optimized: bool,
    /// Hits whose handlers ran.
    pub nhit: u64,
    /// Hits whose handlers did not run.
    pub nmissed: u64,
}

/// Every registered probe; `Display` prints them as the kernel's `kprobes/list`:
/// `address  k  symbol+0xoff  [DISABLED][GONE][SITE][OPTIMIZED]` (`r` for a return probe), after
/// a header line naming how this process writes code, as [`crate::text_writes`] says
/// it (`# text writes: /proc/self/mem (kernel)`, `# text writes: mprotect (fallback: …)`):
/// one choice for the life of the process, so `Display` reads it when it prints.
#[derive(Clone, Debug, Default)]
pub struct ProbeList(pub Vec<ProbeInfo>);

impl std::fmt::Display for ProbeList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "# text writes: {}", crate::sys::code::text_writes())?;
        for p in &self.0 {
            let place = match &p.symbol {
                Some((name, off)) => format!("{name}+{off:#x}"),
                None => format!("{:#x}", p.addr),
            };
            let flags = format!(
                "{}{}{}{}",
                if p.enabled { "" } else { "[DISABLED]" },
                if p.gone { "[GONE]" } else { "" },
                if p.site { "[SITE]" } else { "" },
                if p.optimized { "[OPTIMIZED]" } else { "" }
            );
            writeln!(f, "{:016x}  {}  {place}  {flags}", p.addr, if p.is_return { 'r' } else { 'k' })?;
        }
        Ok(())
    }
}

/// The registered probes (not for signal context: it allocates and reads `/proc`).
pub fn list() -> ProbeList {
    ProbeList(
        registry::records()
            .filter(|(_, e)| e.live.load(Ordering::Relaxed))
            .map(|(index, e)| {
                let addr = e.target.load(Ordering::Relaxed);
                let id = e.code_id.load(Ordering::Relaxed);
                let gone = e.gone.load(Ordering::Relaxed) || maps::mapping_of(addr).is_none_or(|m| m.code_id(addr) != id);
                ProbeInfo {
                    addr,
                    // A return probe's entry runs its hook.
                    is_return: e.pre.load(Ordering::Relaxed) == crate::retprobe::on_entry as *const () as usize,
                    // A site is named after its function, not the naked stub it is in;
                    // gone code by its address only (something else may be there now).
                    symbol: match (gone, e.site.load(Ordering::Relaxed)) {
                        (true, _) => None,
                        (false, true) => crate::site::table::site_of(addr).map(|s| (s.name, 0)),
                        (false, false) => crate::sys::symbols::symbol_of(addr),
                    },
                    site: e.site.load(Ordering::Relaxed),
                    optimized: !gone && e.addr.load(Ordering::Relaxed) != 0 && !e.site.load(Ordering::Relaxed) && crate::optprobe::is_live(addr),
                    enabled: e.addr.load(Ordering::Relaxed) != 0,
                    gone,
                    nhit: e.nhit.load(Ordering::Relaxed) + registry::site_hits(index),
                    nmissed: e.nmissed.load(Ordering::Relaxed),
                }
            })
            .collect(),
    )
}
