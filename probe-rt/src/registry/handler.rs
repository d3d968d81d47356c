//! Handlers as records keep them: a function and a context it is called with, and
//! what keeps the context alive.
//!
//! A closure handler `F` is kept in an `Arc<F>`: the record stores `call::<F>` and the
//! closure's address, so a hit costs one indirect call (to `call::<F>`, in which `F`
//! is called directly, usually inlined), as a bare `fn` pointer did. The `Arc` is held
//! by the probe's handle while it is registered, then by the registry until a grace
//! period shows no thread can still be running the handler (see `Slots::bury`).

use crate::PtRegs;
use std::any::Any;
use std::sync::Arc;

/// What a record calls: the registers and the handler's context.
pub(crate) type Call = fn(&mut PtRegs, usize);

/// What keeps a handler's context alive.
pub(crate) type Owner = Arc<dyn Any + Send + Sync>;

/// A handler, ready for a record.
#[derive(Clone)]
pub(crate) struct Handler {
    pub(crate) call: Call,
    pub(crate) ctx: usize,
    /// None for probekit's own handlers, whose contexts live elsewhere.
    owner: Option<Owner>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handler({:#x})", self.call as *const () as usize)
    }
}

impl Handler {
    /// A closure handler.
    pub(crate) fn new<F: Fn(&mut PtRegs) + Send + Sync + 'static>(f: F) -> Self {
        if std::mem::size_of::<F>() == 0 && !std::mem::needs_drop::<F>() {
            // A function or a closure that captures nothing: no state to keep alive,
            // so no allocation (an `Arc` of it is 16 bytes of heap per probe). Without
            // drop glue, forgetting it changes nothing.
            std::mem::forget(f);
            return Handler { call: call::<F>, ctx: std::ptr::NonNull::<F>::dangling().as_ptr() as usize, owner: None };
        }
        let owner = Arc::new(f);
        let ctx = Arc::as_ptr(&owner) as usize;
        Handler { call: call::<F>, ctx, owner: Some(owner) }
    }

    /// One of probekit's own handlers, whose context `ctx` outlives the probe.
    pub(crate) fn internal(call: Call, ctx: usize) -> Self {
        Handler { call, ctx, owner: None }
    }

    /// One of probekit's own handlers, whose context is `owner`'s value (kept alive as
    /// a closure handler's is).
    #[cfg_attr(not(feature = "trace"), allow(dead_code))]
    pub(crate) fn internal_owned<T: Send + Sync + 'static>(call: Call, owner: Arc<T>) -> Self {
        let ctx = Arc::as_ptr(&owner) as usize;
        Handler { call, ctx, owner: Some(owner) }
    }

    /// What keeps the context alive.
    pub(crate) fn owner(&self) -> Option<Owner> {
        self.owner.clone()
    }
}

/// Calls the closure `F` at `ctx`.
fn call<F: Fn(&mut PtRegs)>(regs: &mut PtRegs, ctx: usize) {
    // SAFETY: `ctx` is `Arc::as_ptr` of an `Arc<F>` (see `Handler::new`) stored in a
    // record with `call::<F>`; the `Arc` lives while the record can reach a hit path:
    // held by the handle until unregistration, then buried until a grace period. Or,
    // for a zero-sized `F`, a dangling pointer aligned for `F`, which a reference to a
    // zero-sized value may be.
    let f = unsafe { &*(ctx as *const F) };
    f(regs)
}
