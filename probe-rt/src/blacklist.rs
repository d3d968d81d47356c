//! The code probes are refused in (the kernel's `kprobes/blacklist`): everything
//! probekit's hit paths run before a handler is marked active, where a breakpoint would
//! make the hit path recurse until the stack is gone, and the code signal delivery
//! itself runs.
//!
//! The hit path's functions are the *closure* of a few roots (the SIGTRAP handler, the
//! site and return dispatchers, …) under direct calls and jumps, decoded from the
//! machine code once: in a debug build that takes in the dozens of small functions the
//! optimiser would have inlined (`Cell::get`, `LocalKey::with`, atomics), and in any
//! build the libc functions reached through the PLT (`memcpy`'s implementation, for a
//! struct copy). Calls through pointers (the handlers) are not followed: a probe hit
//! inside a handler is counted as missed, it does not recurse. Panic paths are not
//! followed either (a panic in the hit path aborts the process anyway), so that
//! `malloc` and the formatting machinery stay probeable.

use crate::sys::code as text;
use crate::sys::symbols::Snapshot;
use std::collections::HashSet;
use std::sync::OnceLock;

/// A range of code probes must not touch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blacklisted {
    /// What it is.
    pub name: &'static str,
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// The code probes are refused in, found once through the symbol tables and the hit
/// path's machine code (see the module docs). A root whose size is unknown counts as
/// one page; a function reached from the hit path whose size is unknown, as its first
/// instruction.
pub fn blacklist() -> Vec<Blacklisted> {
    static LIST: OnceLock<Vec<Blacklisted>> = OnceLock::new();
    kept(&LIST, find)
}

/// `cell`'s value, else what `find` gives, kept in `cell` only if `find` says it was
/// found from a read of the mappings (a failed one, no file descriptor left, gives no
/// symbol: found again next time).
fn kept<T: Clone>(cell: &OnceLock<T>, find: impl FnOnce() -> (T, bool)) -> T {
    if let Some(v) = cell.get() {
        return v.clone();
    }
    let (v, complete) = find();
    if complete {
        let _ = cell.set(v.clone());
    }
    v
}

/// The blacklist entry holding `addr`, if any.
pub(crate) fn find_at(addr: usize) -> Option<Blacklisted> {
    blacklist().into_iter().find(|b| (b.start..b.end).contains(&addr))
}

/// The hit path's own entry points' ranges (not their closure), by their symbols' sizes: code
/// a thread may be in outside the bookkeeping that tells grace periods it is inside.
pub(crate) fn hit_path_ranges() -> Vec<(usize, usize)> {
    static ROOTS: OnceLock<Vec<(usize, usize)>> = OnceLock::new();
    kept(&ROOTS, || {
        let symbols = Snapshot::now();
        (hit_path_roots().into_iter().map(|(_, addr)| root_range(&symbols, addr)).collect(), symbols.complete)
    })
}

fn root_range(symbols: &Snapshot, addr: usize) -> (usize, usize) {
    match symbols.function_at(addr) {
        Some(f) if f.size > 0 => (f.addr, f.addr + f.size),
        _ => (addr, addr + text::page_size()),
    }
}

/// How many functions the closure takes at most (a debug build's hit path reaches a
/// few hundred), and how many bytes of one function are decoded.
const MAX_FUNCTIONS: usize = 4096;
const MAX_FUNCTION_BYTES: usize = 1 << 20;

/// Names of code only a panic reaches: not followed (see the module docs).
fn panic_path(name: &str) -> bool {
    ["panic", "_fail", "handle_alloc_error", "handle_error", "abort"].iter().any(|w| name.contains(w))
}

/// The blacklist, and whether it was found from a read of the mappings.
fn find() -> (Vec<Blacklisted>, bool) {
    let symbols = Snapshot::now();
    let mut out: Vec<Blacklisted> = Vec::new();
    let mut seen: HashSet<usize> = HashSet::new();
    let mut todo: Vec<usize> = Vec::new();
    for (name, addr) in hit_path_roots() {
        let (start, end) = root_range(&symbols, addr);
        out.push(Blacklisted { name, start, end });
        seen.insert(start);
        todo.push(start);
    }
    while let Some(at) = todo.pop() {
        if seen.len() > MAX_FUNCTIONS {
            break;
        }
        let (start, len) = match symbols.function_at(at) {
            Some(f) if f.size > 0 => (f.addr, f.size.min(MAX_FUNCTION_BYTES)),
            // A PLT entry, or code without a size: its first instruction only, and a
            // PLT entry's target.
            _ => {
                if let Some(t) = text::read(at, 16).and_then(|code| crate::arch::insn::plt_target(at, &code)) {
                    visit(&symbols, t, &mut seen, &mut todo, &mut out);
                }
                continue;
            }
        };
        let Some(code) = text::read(start, len) else { continue };
        for t in crate::arch::insn::branch_targets(start, &code) {
            visit(&symbols, t, &mut seen, &mut todo, &mut out);
        }
    }
    out.extend(signal_return(&symbols));
    out.extend(exec_family(&symbols));
    (out, symbols.complete)
}

/// Adds the function at `t` (reached from the hit path) unless it was seen or is a
/// panic path.
fn visit(symbols: &Snapshot, t: usize, seen: &mut HashSet<usize>, todo: &mut Vec<usize>, out: &mut Vec<Blacklisted>) {
    let f = symbols.function_at(t);
    let start = f.as_ref().map_or(t, |f| f.addr);
    if !seen.insert(start) || f.as_ref().is_some_and(|f| panic_path(f.display_name())) {
        return;
    }
    let end = match &f {
        Some(f) if f.size > 0 => f.addr + f.size,
        // Code of unknown size (hand-written asm, a PLT entry): up to the next symbol,
        // which is where it can end at the latest, within a bound.
        _ => symbols.next_start(start).map_or(start + 1, |next| next.min(start + MAX_FUNCTION_BYTES)),
    };
    out.push(Blacklisted { name: "code probekit's hit path runs", start, end });
    todo.push(start);
}

/// The code a signal handler returns through: glibc's `__restore_rt` (x86_64, the
/// `sa_restorer` of every handler it installs) and the vDSO (aarch64, where the
/// kernel's sigreturn trampoline lives).
fn signal_return(symbols: &Snapshot) -> Vec<Blacklisted> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        // glibc gives every handler it installs the same restorer: read it from the
        // first signal that has one (probekit's SIGTRAP, Rust's SIGSEGV, …).
        let restorer = [libc::SIGTRAP, libc::SIGSEGV, libc::SIGBUS, libc::SIGURG].into_iter().find_map(|sig| {
            // SAFETY: reading a disposition only.
            let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            (unsafe { libc::sigaction(sig, std::ptr::null(), &mut cur) } == 0).then_some(cur.sa_restorer).flatten()
        });
        {
            if let Some(r) = restorer {
                let r = r as usize;
                let (start, end) = symbols.function_at(r).filter(|f| f.size > 0).map_or((r, r + 16), |f| (f.addr, f.addr + f.size));
                out.push(Blacklisted { name: "the signal return trampoline (sa_restorer)", start, end });
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        let _ = symbols;
        // SAFETY: getauxval has no preconditions.
        let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
        if let Some(m) = crate::sys::maps::mapping_of(vdso).filter(|_| vdso != 0) {
            out.push(Blacklisted { name: "the vDSO (the signal return trampoline)", start: vdso, end: m.end });
        }
    }
    out
}

/// The exec family: a child that `posix_spawn` or `vfork` starts resets its signal
/// handlers and then calls one of them, so a breakpoint there would kill every such
/// child (`std::process::Command` included) with SIGTRAP.
fn exec_family(symbols: &Snapshot) -> Vec<Blacklisted> {
    ["execve", "execveat", "fexecve", "execv", "execvp", "execvpe", "execl", "execle", "execlp"]
        .into_iter()
        .filter_map(|n| symbols.function_named(n))
        .map(|f| Blacklisted {
            name: "the exec family (runs in spawned children after their signal handlers are reset)",
            start: f.addr,
            end: f.addr + f.size.max(1),
        })
        .collect()
}

/// The entry points of probekit's hit paths, named: the roots of the blacklist's
/// closure (see `blacklist`).
pub(crate) fn hit_path_roots() -> Vec<(&'static str, usize)> {
    let roots = vec![
        ("probekit's hit-path bookkeeping", crate::grace::enter as *const () as usize),
        ("probekit's hit-path bookkeeping", crate::grace::leave as *const () as usize),
        ("probekit's hit-path bookkeeping", crate::grace::Thread::enter as *const () as usize),
        ("probekit's hit-path bookkeeping", crate::grace::Thread::index as *const () as usize),
        ("probekit's hit-path bookkeeping", crate::grace::Thread::record as *const () as usize),
        ("probekit's site lookup", crate::registry::addrmap::AddrMap::head as *const () as usize),
        ("probekit's detour dispatcher", crate::optprobe::dispatch as *const () as usize),
        ("probekit's SIGTRAP handler", crate::breakpoint::trap::on_sigtrap as *const () as usize),
        ("probekit's hit path", crate::breakpoint::trap::hit as *const () as usize),
        ("probekit's return-probe entry", crate::retprobe::on_entry as *const () as usize),
        ("probekit's return dispatcher", crate::retprobe::dispatch as *const () as usize),
        ("probekit's return trampoline", crate::retprobe::trampoline()),
        ("probekit's exit-path entry dispatcher", crate::site::patch::dispatch_exit_entry as *const () as usize),
        ("probekit's exit dispatcher", crate::retprobe::dispatch_exit as *const () as usize),
        ("probekit's light entry dispatcher", crate::site::fgraph::dispatch_entry as *const () as usize),
        ("probekit's light exit dispatcher", crate::site::fgraph::dispatch_exit as *const () as usize),
        ("probekit's light entry hook", crate::site::fgraph::hook()),
        ("probekit's handler call", crate::registry::call_handler as *const () as usize),
        ("probekit's site probes", crate::site::missed_site as *const () as usize),
        ("probekit's site probes", crate::site::run_site_chain as *const () as usize),
        ("probekit's trap chaining", crate::sys::signal::chain as *const () as usize),
        ("probekit's register reading", crate::sys::regs::read as *const () as usize),
        ("probekit's register writing", crate::sys::regs::write as *const () as usize),
        ("probekit's reentrancy guard", crate::registry::set_active as *const () as usize),
        ("libc sigaction (trap chaining)", libc::sigaction as *const () as usize),
        ("libc raise (trap chaining)", libc::raise as *const () as usize),
    ];
    let roots = {
        let mut roots = roots;
        roots.extend(crate::optprobe::trampolines().into_iter().map(|t| ("probekit's detour trampoline", t)));
        roots.extend(crate::site::trampolines().into_iter().map(|(_, what, addr)| (what, addr)));
        roots.extend(crate::site::patch::dispatchers().into_iter().map(|d| ("probekit's site dispatcher", d)));
        roots
    };
    #[cfg(target_arch = "x86_64")]
    let roots = {
        let mut roots = roots;
        roots.extend([
            ("probekit's site dispatcher", crate::site::patch::redirected as *const () as usize),
            ("probekit's stack-exhaustion handler", crate::breakpoint::trap::on_sigsegv as *const () as usize),
        ]);
        roots
    };
    roots
}
