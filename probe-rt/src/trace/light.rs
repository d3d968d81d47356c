//! The tracer's light path: its hooks on sites' exit paths ([`fgraph`]), bound
//! statically as the light records' client (`crate::LightHooks`), and the one tracer
//! at a time that holds them.

use super::State;
use crate::site::fgraph;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

impl State {
    /// The light path's entry (through `Light::enter`): as [`Self::enter`], with the
    /// site as the frame's data (no instance: its return is found by site and stack
    /// pointer; a code address is never a return probe's per-call data, which is on
    /// the heap).
    #[inline(always)]
    fn enter_light(&self, id: u32, site: usize, sp: usize, args: &fgraph::Args) {
        if !self.running.load(Ordering::Relaxed) {
            // Stopped: the calls this entry shows gone still end (the return of this
            // call, found by stack pointer, must not take a gone call's frame for its).
            if let Some(ring) = self.own_ring().filter(|r| r.depth() > 0 && r.frame(r.depth() - 1).sp <= sp) {
                Self::end_gone(ring, sp, self.clock.ticks());
            }
            return;
        }
        let Some(ring) = self.ring() else { return };
        let now = self.clock.ticks();
        Self::end_gone(ring, sp, now);
        let _ = ring.push(id, sp, site, now, |a| args.get(a));
    }

    /// The light path's return (through `Light::exit`): records the call of `site`
    /// entered at `sp` if its frame is on this thread's stack, after ending the calls
    /// above it (a panic or `longjmp` left them: every call below `sp` has returned or
    /// is gone when this one returns). Nothing if the entry was not recorded (stopped,
    /// no ring, too deep), or the return is another function's (every return through
    /// a full exit path comes here). Out of line: the exit dispatchers keep only the
    /// test of `LIGHT` inline, which is all a return costs where no tracer runs.
    #[inline(never)]
    fn exit_light(&self, site: usize, sp: usize, value: u64) {
        let Some(ring) = self.own_ring() else { return };
        let depth = ring.depth_without(|f| f.sp < sp);
        if depth == 0 || !matches!(ring.frame(depth - 1), top if top.sp == sp && top.data == site) {
            return;
        }
        let now = self.clock.ticks();
        ring.unwind_to(depth, now);
        ring.pop(now, Some(if self.retval { value } else { 0 }));
    }
}

/// The tracer whose calls of sites with an exit path take the light path
/// ([`fgraph`]), or null: one tracer at a time (another registered meanwhile attaches
/// with return probes everywhere). Set at its registration, cleared before its
/// records are retired (see [`LightGuard`]).
static LIGHT: AtomicPtr<State> = AtomicPtr::new(std::ptr::null_mut());

/// A light record's context: its tracer and function.
pub(super) struct Member {
    pub(super) state: Arc<State>,
    pub(super) id: u32,
}

/// A light record's member (its context).
///
/// # Safety
/// `ctx` is `Arc::as_ptr` of the record's `Arc<Member>`, which its handler owns: alive
/// while the record can be hit, and after its retirement until a grace period has
/// waited out the hit path the caller is in (see `registry::handler`).
unsafe fn member<'a>(ctx: usize) -> &'a Member {
    // SAFETY: the caller's guarantee.
    unsafe { &*(ctx as *const Member) }
}

/// The tracer as the light records' client (bound as `crate::LightHooks`).
pub(crate) enum Light {}

impl fgraph::Hooks for Light {
    #[inline(always)]
    unsafe fn enter(ctx: usize, site: usize, sp: usize, args: &fgraph::Args) {
        // SAFETY: the caller passes a light record's context from inside the hit path:
        // the `Arc<Member>` its handler owns, which `member` asks for.
        let m = unsafe { member(ctx) };
        m.state.enter_light(m.id, site, sp, args);
    }

    /// Counted in [`Tracer::nmissed`](super::Tracer::nmissed).
    unsafe fn missed(ctx: usize) {
        // SAFETY: as in `enter`.
        let m = unsafe { member(ctx) };
        m.state.missed.fetch_add(1, Ordering::Relaxed);
    }

    /// Every return through a site's exit path: nothing unless a tracer holds the
    /// light path (the exit path's call is decoded only then).
    #[inline(always)]
    fn exit(site: impl FnOnce() -> Option<usize>, sp: usize, value: u64) {
        let state = LIGHT.load(Ordering::Acquire);
        // SAFETY: a non-null LIGHT is the `State` its tracer's `LightGuard` holds; the
        // guard clears LIGHT and then buries its `Arc`, which a grace period (waiting
        // out this hit path, which loaded LIGHT before) drops.
        let Some(state) = (unsafe { state.as_ref() }) else { return };
        if let Some(site) = site() {
            state.exit_light(site, sp, value);
        }
    }
}

/// Holds [`LIGHT`] for a tracer and its `State`; when dropped, clears LIGHT and leaves
/// the `State` to the registry until a grace period (a thread may have loaded LIGHT).
pub(super) struct LightGuard(Option<Arc<State>>);

impl LightGuard {
    /// Takes [`LIGHT`] for `state` if no other tracer holds it.
    pub(super) fn take(state: &Arc<State>) -> Option<LightGuard> {
        let p = Arc::as_ptr(state) as *mut State;
        LIGHT.compare_exchange(std::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Relaxed).ok().map(|_| LightGuard(Some(state.clone())))
    }
}

impl Drop for LightGuard {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            let _ = LIGHT.compare_exchange(Arc::as_ptr(&state) as *mut State, std::ptr::null_mut(), Ordering::AcqRel, Ordering::Relaxed);
            crate::registry::lock().bury([state as crate::registry::Owner]);
        }
    }
}
