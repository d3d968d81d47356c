//! C helpers for probekit's tests (see `build.rs`), the threads that call probed
//! functions while a test arms and disarms them, and libgcc's stack walk.

use std::ffi::c_void;

extern "C" {
    /// Calls `f(arg)` under a `setjmp`: 0 when `f` returned, 1 when [`probekit_jump_out`]
    /// jumped back.
    pub fn probekit_jump_run(f: extern "C" fn(*mut c_void), arg: *mut c_void) -> i32;
    /// `longjmp`s to the innermost [`probekit_jump_run`] of this thread. Every frame
    /// between must be plain (no destructors to run).
    pub fn probekit_jump_out() -> !;
}

extern "C" {
    /// C calling `probekit_traceable_c_scale(a, b)` by that name, plus 1. The test that
    /// calls it defines the function (`#[traceable] #[unsafe(no_mangle)] extern "C"`).
    pub fn probekit_c_calls_by_name(a: u64, b: u64) -> u64;
    /// C calling `f(a, b)` through the pointer, plus 1.
    pub fn probekit_c_calls_through(f: extern "C" fn(u64, u64) -> u64, a: u64, b: u64) -> u64;
}

/// The path of the shared library built from `c/gone.c` (exports `probekit_gone_add`).
pub const GONE_SO: &str = env!("GONE_SO");

/// Threads calling a probed function in a loop while a test arms and disarms probes on
/// it: thread `t` of `n` runs `call(t)`, `call(t + n)`, `call(t + 2n)`, … (each call
/// asserts its own result) until [`Callers::stop`].
pub struct Callers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Calls returned so far, by all threads.
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

/// Starts `n` [`Callers`] of `call`.
pub fn callers(n: u64, call: fn(u64)) -> Callers {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads = (0..n)
        .map(|t| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut calls = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    call(calls * n + t);
                    calls += 1;
                    done.fetch_add(1, std::sync::atomic::Ordering::Release);
                }
                calls
            })
        })
        .collect();
    Callers { stop, done, threads }
}

impl Callers {
    /// Waits until the threads have returned from `more` calls more than when it was
    /// called: on a loaded machine they may not have run at all yet. With `n` threads,
    /// `n + 1` calls include one that began after this was called. Returns early if a
    /// thread ended (a call's wrong result: [`Callers::stop`] reports it); panics after
    /// a minute.
    pub fn wait(&self, more: u64) {
        let ordering = std::sync::atomic::Ordering::Acquire;
        let (until, deadline) = (self.done.load(ordering) + more, std::time::Instant::now() + std::time::Duration::from_secs(60));
        while self.done.load(ordering) < until && !self.threads.iter().any(|t| t.is_finished()) {
            assert!(std::time::Instant::now() < deadline, "the callers made no {more} calls in a minute");
            std::thread::yield_now();
        }
    }

    /// Stops and joins the threads (a failed assertion in one fails the test here):
    /// how many times `call` ran.
    pub fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads.into_iter().map(|t| t.join().expect("every call returned the right value")).sum()
    }
}

/// libgcc's walk (`_Unwind_Backtrace`, what `std::backtrace`, the `backtrace` crate and
/// a panic use), calling `f` with each frame's instruction pointer.
pub fn libgcc_walk(mut f: impl FnMut(usize)) {
    type Ctx = c_void;
    extern "C" {
        fn _Unwind_Backtrace(cb: extern "C" fn(*mut Ctx, *mut c_void) -> i32, arg: *mut c_void) -> i32;
        fn _Unwind_GetIP(ctx: *mut Ctx) -> usize;
    }
    extern "C" fn cb<F: FnMut(usize)>(ctx: *mut Ctx, arg: *mut c_void) -> i32 {
        // SAFETY: arg is the `&mut F` passed below, ctx the unwinder's context.
        unsafe { (*(arg as *mut F))(_Unwind_GetIP(ctx)) };
        0 // _URC_NO_REASON: go on
    }
    // SAFETY: the callback matches the unwinder's signature and `f` outlives the walk.
    unsafe { _Unwind_Backtrace(cb::<&mut dyn FnMut(usize)>, &mut (&mut f as &mut dyn FnMut(usize)) as *mut _ as *mut _) };
}
