//! The probe record, in a module of its own so that no other code can make one: a
//! [`Record`] is either [`NONE`] or one of the chunks' (zeroed memory), which the hit
//! paths' counting relies on (`super::count_site_hit`).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize};

/// The lock-free record of one probe, read by the hit paths. Every field is an atomic
/// (or `()`) whose all-zero bits are its initial value: chunks of records are
/// allocated zeroed.
pub(crate) struct Record {
    /// The probed address while armed, else 0.
    pub addr: AtomicUsize,
    /// The address the slot's breakpoint reports (kept after retirement).
    pub resume_trap: AtomicUsize,
    /// Where execution continues after the slot: the probed address + its length.
    pub next: AtomicUsize,
    pub slot: AtomicUsize,
    /// The pre and post handlers: a [`Call`](super::Call) (0: none) and its context each.
    pub pre: AtomicUsize,
    pub post: AtomicUsize,
    pub ctx: AtomicUsize,
    pub post_ctx: AtomicUsize,
    pub nhit: AtomicU64,
    pub nmissed: AtomicU64,
    /// The probed address, for the handle, whether armed or not.
    pub target: AtomicUsize,
    /// The original bytes under the breakpoint.
    pub orig: AtomicU64,
    /// The identity of the probed code: its file and offset (`sys::maps::Mapping::code_id`;
    /// 0 for anonymous memory), checked before every write.
    pub code_id: AtomicU64,
    /// The probed code went away: nothing is ever written for this record again.
    pub gone: AtomicBool,
    /// A simulated instruction (`kind` 0: it runs out of line in `slot`).
    pub sim_kind: AtomicU64,
    pub sim_a: AtomicU64,
    pub sim_b: AtomicU64,
    /// Registered and not yet unregistered.
    pub live: AtomicBool,
    /// Rides a `#[traceable]` function's site instead of a breakpoint.
    pub site: AtomicBool,
    /// From registration to unregistration: the index + 1 of the next record at the
    /// same address, 0 for none. A retired record keeps its link until it is reused,
    /// so a hit walking the chain through it goes on.
    pub chain: AtomicU32,
    /// Whether the probe may be optimized into a jump (`optprobe::Mode` as a byte; 0,
    /// the zeroed value, is the default: when possible).
    pub opt_mode: AtomicU8,
    /// While its address is optimized: where a thread that hit the address's
    /// breakpoint (still there while the jump is written or taken out) continues after
    /// the pre handlers, the detour's relocated copy of the displaced instructions,
    /// instead of the slot. 0 otherwise.
    pub detour: AtomicUsize,
    /// Records are made in this module only, as [`NONE`] (the chunks' are zeroed
    /// memory): what `count_site_hit` relies on to find a record's counters from its
    /// address.
    _private: (),
}

/// A record no index reaches (what [`record`](super::record()) gives for an index whose chunk is not
/// there, which no caller passes).
pub(super) static NONE: Record = Record {
    addr: AtomicUsize::new(0),
    resume_trap: AtomicUsize::new(0),
    next: AtomicUsize::new(0),
    slot: AtomicUsize::new(0),
    pre: AtomicUsize::new(0),
    post: AtomicUsize::new(0),
    ctx: AtomicUsize::new(0),
    post_ctx: AtomicUsize::new(0),
    nhit: AtomicU64::new(0),
    nmissed: AtomicU64::new(0),
    target: AtomicUsize::new(0),
    orig: AtomicU64::new(0),
    code_id: AtomicU64::new(0),
    gone: AtomicBool::new(false),
    sim_kind: AtomicU64::new(0),
    sim_a: AtomicU64::new(0),
    sim_b: AtomicU64::new(0),
    live: AtomicBool::new(false),
    site: AtomicBool::new(false),
    chain: AtomicU32::new(0),
    opt_mode: AtomicU8::new(0),
    detour: AtomicUsize::new(0),
    _private: (),
};
