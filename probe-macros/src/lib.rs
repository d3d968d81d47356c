//! probekit's procedural macros. Thin: they parse with `syn`, ask `probe-codegen`
//! and emit with `quote`.
#![deny(missing_docs)]

use proc_macro::TokenStream;

mod kprobe;
mod kretprobe;
mod pt_regs;
mod traceable;

/// Declares a register frame and generates its save/restore routines.
///
/// # Syntax
///
/// ```text
/// #[pt_regs]
/// #[pt_regs(shapes(save_restore, kretprobe, entry, site), policy = all | caller_saved,
///           fp = none | args | return | args_wide | return_wide | full | full_compact | full_in_use | sse, handler = path::to::handler, crate = ::probekit)]
/// ```
///
/// # Usage
///
/// On a `#[repr(C)]` struct with named fields, each bound to a register by its name
/// (`rax`, `x19`, `lr`, `sp`, `pc`, `pstate`, `eflags`, …; `regs: [u64; 31]` is x0..x30)
/// or by `#[reg(...)]`: `#[reg(rdi)]`, `#[reg(x0..=x7)]` on `[u64; 8]`, `#[reg(zero)]`,
/// or per architecture `#[reg(x86_64 = "rax", aarch64 = "x0")]` (a field bound on one
/// architecture only holds 0 on the other). Fields named `_…` hold 0, `orig_rax` and
/// `orig_x0` hold `u64::MAX`.
///
/// The macro emits the struct (without the `#[reg]` attributes) and the items
/// probe-codegen renders for a frame, the same whether this macro, a build script's
/// `probe_codegen::Builder` or the `probe-codegen rust` command made them:
///
/// - offsets, in the names of the kernel's asm-offsets: `T::S_<FIELD>` for every field
///   (`S_PSTATE`, `S_REGS`, `S__RESERVED`), `T::S_<REG>` for each element of an array
///   that binds registers (`S_X0` … `S_X30` of `regs: [u64; 31]`, `S_R8` … of
///   `#[reg(r8..=r11)] range: [u64; 4]`), on aarch64 `T::S_FP` and `T::S_LR`, and
///   `T::S_FRAME_SIZE`; elements of arrays of constants have no names of their own
///   (`S__RESERVED + 8`). A field name whose constant would clash with another's (`rax`
///   and `RAX`) or with a generated one (`frame_size`) is refused;
/// - `unsafe impl Frame`, and compile-time assertions, one per field offset and size
///   and one for the size, that fail the build naming the field if the struct and the
///   generated asm ever disagree;
/// - for each shape, the routine for x86_64 and for aarch64 under `#[cfg(target_arch)]`
///   (the macro runs on the host and cannot know the target), whose asm reads the frame
///   by those names as `const` operands taken from `offset_of!`, and `T::SAVE_RESTORE`,
///   `T::KRETPROBE`, `T::ENTRY`, `T::SITE`: the routines as `unsafe extern "C" fn()`, with
///   `T::S_ALLOC_<SHAPE>` (the bytes each allocates) and, with an FP mode,
///   `T::S_FPSIMD_<SHAPE>` (where its FP/SIMD area starts).
///
/// The names that depend on the registers bound, and the routines, exist under the
/// architecture's `cfg` only.
///
/// # Safety
///
/// The routines are not Rust functions: they are entered as their shape says (a call
/// that preserves every register, a hijacked return, a patched site) and call
/// `handler`, an `unsafe extern "C" fn(*mut T, *mut u8) -> usize` that receives the frame
/// and the FP/SIMD area (null with `fp = none`) and, for a kretprobe, returns the
/// address to return to, for a site where to resume (the continuation, the frame's pc
/// plus the site's length, to go on into the function); the other shapes ignore what it
/// returns. A site routine needs a pc field. The handler must not unwind.
///
/// On x86_64 some FP modes need more of the CPU than x86_64 itself: `full` an OS
/// that enabled `xsave`, `args_wide` and `return_wide` AVX state enabled,
/// `full_compact` `xsavec64`, `full_in_use` all of these and more, `sse` what
/// `args_wide` needs (and `full` where it does not run); and every
/// `save_restore` routine LAHF/SAHF in 64-bit mode. Their routines fault elsewhere:
/// check `probekit::cpu_support()` before running one (and fall back to `args`,
/// `return` or `full`), as the runtime does for its own.
///
/// # Examples
///
/// ```
/// #[probekit::pt_regs(shapes(save_restore), policy = caller_saved, handler = on_frame)]
/// #[repr(C)]
/// pub struct Args {
///     #[reg(x86_64 = "rdi", aarch64 = "x0")]
///     pub first: u64,
///     #[reg(x86_64 = "rip", aarch64 = "pc")]
///     pub ip: u64,
/// }
/// unsafe extern "C" fn on_frame(_f: *mut Args, _fp: *mut u8) -> usize { 0 }
///
/// fn main() {
///     // The offsets, checked against the compiler's layout at compile time, and the routine.
///     assert_eq!((Args::S_FIRST, Args::S_IP, Args::S_FRAME_SIZE), (0, 8, 16));
///     let _routine: unsafe extern "C" fn() = Args::SAVE_RESTORE;
/// }
/// ```
#[proc_macro_attribute]
pub fn pt_regs(attr: TokenStream, item: TokenStream) -> TokenStream {
    pt_regs::expand(attr.into(), item.into()).into()
}

/// Makes a function the pre handler of a breakpoint probe and generates its
/// registration.
///
/// # Syntax
///
/// ```text
/// #[kprobe(function = path::to::f)]
/// #[kprobe(symbol = "name", offset = 0x10)]
/// #[kprobe(function = f, post = other_handler, crate = ::probekit)]
/// #[kprobe(function = f, post_mut = other_handler)]
/// ```
///
/// # Usage
///
/// On `fn handler(regs: &PtRegs)`, which observes, or `fn handler(regs: &mut PtRegs)`,
/// which may change the registers. The function stays as written; next to it a module
/// of the same name holds `register()`, which arms the probe and returns its
/// `ProbeHandle` (unregistered on drop): `handler::register()?`. `function` names a
/// function item (its address is the probe's target); `symbol` a function by name, as
/// `ProbeBuilder::symbol` does. `post` takes a `fn(&PtRegs)`, `post_mut` a
/// `fn(&mut PtRegs)`.
///
/// # Safety
///
/// With a `&mut PtRegs` handler or `post_mut`, `register` is an `unsafe fn`: its caller
/// promises what `ProbeBuilder::pre_mut` asks (every change the handlers make is one the
/// probed code is correct with). Handlers run in a signal handler on the thread that
/// hit the probe: they must be async-signal-safe (no allocation, no locks, no printing;
/// push to an `EventBuffer`).
///
/// # Examples
///
/// ```
/// use probekit::{EventBuffer, PtRegs};
///
/// #[inline(never)]
/// fn parse(n: u64) -> u64 {
///     std::hint::black_box(n) + 1
/// }
///
/// static EVENTS: EventBuffer<u64, 16> = EventBuffer::new();
///
/// #[probekit::kprobe(function = parse)]
/// fn on_parse(regs: &PtRegs) {
///     EVENTS.push(regs.arg(0).unwrap_or(0));
/// }
///
/// # fn main() -> Result<(), probekit::Error> {
/// let probe = on_parse::register()?;
/// parse(41);
/// assert_eq!(probe.nhit(), 1);
/// # Ok(())
/// # }
/// ```
#[proc_macro_attribute]
pub fn kprobe(attr: TokenStream, item: TokenStream) -> TokenStream {
    kprobe::expand(attr.into(), item.into()).into()
}

/// Makes a function the return handler of a return probe and generates its
/// registration.
///
/// # Syntax
///
/// ```text
/// #[kretprobe(function = path::to::f)]
/// #[kretprobe(symbol = "name", maxactive = 64)]
/// #[kretprobe(function = f, data = Type, entry = on_entry, maxactive = 64, crate = ::probekit)]
/// #[kretprobe(function = f, entry_mut = on_entry)]
/// ```
///
/// # Usage
///
/// On `fn handler(regs: &PtRegs, data: &mut T)`, the signature of
/// `ReturnProbeBuilder::handler`, with `T` from `data = T` or `()`; with
/// `regs: &mut PtRegs` it may change the registers, the return value included. The
/// handler runs when the probed function returns, with the return value in
/// `rax`/`x0`. The entry handler, if any, runs at the function's entry:
/// `entry = f` with `fn f(regs: &PtRegs, data: &mut T) -> bool` says whether to watch
/// this call; `entry_mut = f` with `fn f(regs: &mut PtRegs, data: &mut T) -> Entry` may
/// also change the registers or skip the function (`Entry::Override`). Each watched
/// call gets a fresh `T::default()` (`T: Default + Send + 'static`) that both handlers
/// see.
/// `maxactive` is how many calls can be watched at once, on all threads (an integer
/// literal; default max(10, 2 × CPUs)). There is no `offset`: a return probe goes on
/// a function's entry.
///
/// The function stays as written; next to it a module of the same name holds
/// `register()`, which arms the probe and returns its `ReturnProbeHandle`
/// (unregistered on drop): `handler::register()?`. Paths in the options resolve where
/// the attribute is written.
///
/// # Safety
///
/// With a `&mut PtRegs` handler or `entry_mut`, `register` is an `unsafe fn`: its
/// caller promises what `ReturnProbeBuilder::handler_mut` and `entry_handler_mut` ask
/// (a return value written or overridden is a valid value of the function's return
/// type; skipping the function leaves the program correct).
///
/// The entry handler and `T::default()` run in a signal handler on the thread that
/// called the function; the return handler runs on that thread's stack when the
/// function returns, wherever that is. Both must be async-signal-safe (no allocation,
/// no locks, no printing; push to an `EventBuffer`), and must not panic: a panic in
/// the return handler aborts.
///
/// # Examples
///
/// ```
/// use probekit::{EventBuffer, PtRegs};
///
/// #[inline(never)]
/// fn parse(n: u64) -> u64 {
///     std::hint::black_box(n) * 2
/// }
///
/// static EVENTS: EventBuffer<(u64, u64), 16> = EventBuffer::new();
///
/// #[derive(Default)]
/// struct Call { arg: u64 }
///
/// fn on_entry(regs: &PtRegs, call: &mut Call) -> bool {
///     call.arg = regs.arg(0).unwrap_or(0);
///     true
/// }
///
/// #[probekit::kretprobe(function = parse, data = Call, entry = on_entry, maxactive = 64)]
/// fn on_parse_return(regs: &PtRegs, call: &mut Call) {
///     EVENTS.push((call.arg, regs.return_value()));
/// }
///
/// # fn main() -> Result<(), probekit::Error> {
/// let probe = on_parse_return::register()?;
/// assert_eq!(parse(21), 42);
/// assert_eq!(probe.nhit(), 1);
/// # Ok(())
/// # }
/// ```
#[proc_macro_attribute]
pub fn kretprobe(attr: TokenStream, item: TokenStream) -> TokenStream {
    kretprobe::expand(attr.into(), item.into()).into()
}

/// Gives a function a patchable entry (a site) that probes can switch on without a trap.
///
/// # Syntax
///
/// ```text
/// #[traceable]                 // on a function, or on an impl block
/// #[traceable(associated)]     // on an associated function without `self` or `Self`
/// ```
///
/// # Usage
///
/// On a free function or an inherent method, generic or not, `unsafe` or not, with the
/// Rust ABI or the C one: `[pub] [unsafe] [extern "C"] fn name<G>(args) -> R where … { body }`.
/// The function keeps its name, signature (ABI included), visibility, attributes and
/// behaviour; [`probekit::sites()`] lists it (as `module::path::name`, for a method
/// `module::path::method`) and a `Probe` or `ReturnProbe` on it rides its site instead
/// of a breakpoint.
///
/// An `extern "C"` (or `"C-unwind"`, `"system"`) function is what asm and C callers
/// need: with `#[unsafe(no_mangle)]` its C name is the function that enters the site,
/// so a call from C, or through an `extern "C" fn` pointer, is probed like any other.
/// A panic in its body ends at its `extern "C"` boundary (an abort), as without the
/// attribute. `#[inline(never)]` may be written: the function is never inlined anyway,
/// so that every call passes its site.
///
/// Refused, each with an error on its token: `async`, `const`, another ABI
/// (`extern "sysv64"`, …), `impl Trait` in argument or return position, variadics,
/// `#[inline]` and `#[inline(always)]`, anything but a function or an impl.
///
/// Inside an `impl` block a function that takes `self` or names `Self` is recognised as
/// an associated function; one that does neither needs `#[traceable(associated)]`.
///
/// On an `impl` block, inherent or of a trait, generic or not, for a local or a foreign
/// type: the methods marked `#[traceable]` inside it get sites, or all its methods if
/// none is marked. This is the way for trait impls, whose methods cannot take the
/// attribute themselves (it adds items next to the function, and rustc refuses items
/// that are not members of the trait). There the extra functions go to a private
/// helper trait, `__probekit_traceable_<hash>`, implemented for the same type with the
/// trait as its supertrait (so `Self::Assoc` keeps resolving; lifetimes the trait
/// path elides are named for it), and each method is listed as
/// `module::path::<Type as Trait>::method`. The impl's lint levels cover the moved
/// bodies. Provided methods the impl does not override keep the trait's body and get
/// no site.
///
/// ```
/// use probekit::{Probe, PtRegs};
/// use std::io::Read;
///
/// struct Wire(u8);
///
/// #[probekit::traceable]
/// impl Read for Wire {
///     fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
///         buf.fill(self.0);
///         Ok(buf.len())
///     }
/// }
///
/// # fn main() -> Result<(), probekit::Error> {
/// let read = <Wire as Read>::read as fn(&'static mut Wire, &'static mut [u8]) -> std::io::Result<usize>;
/// let p = Probe::builder().function(read).pre(|_: &PtRegs| {}).register()?;
/// assert_eq!(Wire(7).read(&mut [0; 4]).unwrap(), 4);
/// assert_eq!(p.nhit(), 1);
/// # Ok(())
/// # }
/// ```
///
/// # What it generates, and why
///
/// `#[traceable] fn f(a: u64) -> u64 { body }` becomes (an `extern "C" fn f` keeps its
/// ABI; the site and the body are `extern "C-unwind"` whatever it is):
///
/// ```text
/// #[inline(never)]
/// fn f(a: u64) -> u64 { __probekit_site_f(a) }   // users call it and take its address
///
/// #[doc(hidden)]
/// #[unsafe(naked)]
/// extern "C-unwind" fn __probekit_site_f(a: u64) -> u64 {
///     // x86_64: `nopl 0x0(%rax,%rax,1)` (5 bytes), `jmp __probekit_body_f`
///     // aarch64: `mov x9, x30; nop; b __probekit_body_f`
///     // and a record in the `probekit_sites` section: site, f, name, exit path,
///     // flags (probe-codegen's `site` contract)
///     naked_asm!(/* … */)
/// }
///
/// #[doc(hidden)]
/// extern "C-unwind" fn __probekit_body_f(a: u64) -> u64 { body }
/// ```
///
/// Naked functions (stable since Rust 1.88) give a function whose first bytes are
/// exactly the nops, with no prologue before them; they are stable for the `C` and
/// `C-unwind` ABIs only, so the site and the body use `C-unwind` (a panic in the body
/// still unwinds to the caller) and the Rust-ABI wrapper keeps the function's type as
/// written. The cost when no probe is on: the wrapper's call or jump to the site, the
/// nop, and the site's jump to the body.
///
/// The record's flags say whether the function's arguments and return value are all
/// integers, `bool`s, `char`s, pointers, references, function pointers, or tuples and
/// arrays of them, as written in the signature (probe-codegen `site::NO_FP`): no
/// FP/SIMD register then carries one, and the runtime's trampolines for the site keep
/// no FP/SIMD state (~1 ns of a site hit). A float, a struct, a generic or a type alias
/// keeps them. The judgement goes by names, so the body holds, for each primitive name
/// it took, a nested `fn __probekit_primitive_u64(x: u64) -> ::core::primitive::u64`
/// that does not compile where the name is not the primitive (an alias, an import or an
/// impl's type parameter under a primitive's name).
///
/// The table is a linker section, like the kernel's `__mcount_loc`: nothing runs at
/// start-up, and `--gc-sections` keeps it (`SHF_GNU_RETAIN`). Each instance of a
/// generic function gets its own site and entry. In debug builds a generic function's
/// wrapper can be instantiated once per codegen unit, so a pointer to it taken in
/// another unit may differ from the one the table records: a probe on that pointer then
/// falls back to a breakpoint. Non-generic functions have one wrapper.
///
/// # Safety
///
/// The attribute adds no obligation: the generated `unsafe` is the naked site, whose
/// asm jumps to the body with every argument register untouched. An `unsafe fn` stays
/// `unsafe` with the same contract. A crate with `#![forbid(unsafe_code)]` cannot use
/// it (`#[unsafe(naked)]` counts as unsafe code).
///
/// # Examples
///
/// ```
/// use probekit::{Probe, PtRegs};
///
/// #[probekit::traceable]
/// pub fn parse(input: &[u8]) -> Option<u64> {
///     std::str::from_utf8(input).ok()?.parse().ok()
/// }
///
/// struct Parser<T>(T);
/// impl<T: Clone> Parser<T> {
///     #[probekit::traceable]
///     fn step(&mut self, n: usize) -> usize { n + 1 }
/// }
///
/// // Called from C (`uint64_t checksum(const uint8_t *, size_t);`) and asm.
/// #[probekit::traceable]
/// #[unsafe(no_mangle)]
/// pub unsafe extern "C" fn checksum(p: *const u8, len: usize) -> u64 {
///     // SAFETY: the caller passes `len` readable bytes at `p`.
///     unsafe { std::slice::from_raw_parts(p, len) }.iter().map(|b| *b as u64).sum()
/// }
///
/// # fn main() -> Result<(), probekit::Error> {
/// assert!(probekit::sites().iter().any(|s| s.name.ends_with("::parse")));
/// let f = checksum as unsafe extern "C" fn(*const u8, usize) -> u64;
/// let p = Probe::builder().function(f).pre(|_: &PtRegs| {}).register()?;
/// // SAFETY: three readable bytes.
/// assert_eq!(unsafe { checksum(b"abc".as_ptr(), 3) }, 294);
/// assert_eq!((parse(b"42"), Parser(()).step(1), p.nhit()), (Some(42), 2, 1));
/// # Ok(())
/// # }
/// ```
///
/// [`probekit::sites()`]: ../probekit/fn.sites.html
#[proc_macro_attribute]
pub fn traceable(attr: TokenStream, item: TokenStream) -> TokenStream {
    traceable::expand(attr.into(), item.into()).into()
}

/// What `#[kprobe]` and `#[kretprobe]` expand to: the handler `f` as written, a hidden
/// function holding the builder chain `body` beside it (so `super::`, `self::` and
/// `crate = alias` paths in the options resolve where they were written), and
/// `mod <handler> { pub fn register() }` forwarding to it. The result type is named by
/// a private alias beside the handler too, transparent to privacy and rustdoc.
fn registration(
    f: &syn::ItemFn,
    result: proc_macro2::TokenStream,
    body: proc_macro2::TokenStream,
    unsafe_register: bool,
    noun: &str,
    handler_of: &str,
    attribute: &str,
) -> proc_macro2::TokenStream {
    let (vis, ident) = (&f.vis, &f.sig.ident);
    let hidden = quote::format_ident!("__probekit_register_{}", ident);
    let alias = quote::format_ident!("__probekit_Result_{}", ident);
    let module_doc = format!("The {noun} of [`fn@{ident}`] (generated by `#[{attribute}]`).");
    let doc = format!("Registers the {handler_of} is [`fn@{ident}`].");
    // A handler that may change the registers (`&mut PtRegs`) is registered through
    // `unsafe` builder methods: `register` passes the obligation on to its caller.
    let (unsafety, safety_doc, call) = if unsafe_register {
        (
            quote::quote! { unsafe },
            quote::quote! {
                #[doc = ""]
                #[doc = "# Safety"]
                #[doc = "The handlers may change the registers (they take `&mut PtRegs`): the caller promises"]
                #[doc = "that every change they make is one the probed code is correct with, as"]
                #[doc = "`ProbeBuilder::pre_mut` and `ReturnProbeBuilder::handler_mut` say."]
            },
            quote::quote! { unsafe { super::#hidden() } },
        )
    } else {
        (quote::quote! {}, quote::quote! {}, quote::quote! { super::#hidden() })
    };
    quote::quote! {
        #f

        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        type #alias = #result;

        #[doc(hidden)]
        #[allow(non_snake_case)]
        #unsafety fn #hidden() -> #alias {
            #body
        }

        #[doc = #module_doc]
        #[allow(non_snake_case)]
        #vis mod #ident {
            #[doc = #doc]
            #safety_doc
            pub #unsafety fn register() -> super::#alias {
                // SAFETY: the caller's promise, when this function is `unsafe`.
                #call
            }
        }
    }
}

/// `chain` in an `unsafe` block when `unsafe_chain` (it calls `unsafe` builder methods,
/// whose obligation the generated `register` passes on to its caller).
fn unsafe_if(unsafe_chain: bool, chain: proc_macro2::TokenStream) -> proc_macro2::TokenStream {
    if unsafe_chain {
        quote::quote! {
            // SAFETY: this function is `unsafe`; its caller promises what the builder's
            // `unsafe` methods ask (see `register`'s docs).
            unsafe { #chain }
        }
    } else {
        chain
    }
}

/// The target `function = path`: the address of a function item of any signature,
/// which the builder trusts as a function's start. `FnItem::new` checks at compile
/// time that `path` names a function item (a zero-sized value that casts to a
/// pointer), not an integer constant. `in_unsafe`: the chain is already in an
/// `unsafe` block ([`unsafe_if`]), where another would be an `unused_unsafe` warning
/// in the user's code.
fn function_item(krate: &syn::Path, path: &syn::Path, in_unsafe: bool) -> proc_macro2::TokenStream {
    use syn::spanned::Spanned;
    let item = quote::quote_spanned! { path.span() => #krate::__private::FnItem::new(&#path, #path as *const () as usize) };
    match in_unsafe {
        // SAFETY (of the `unsafe` block around the chain, too): the address is that of
        // the function item `#path` itself.
        true => quote::quote_spanned! { path.span() => .__function_item(#item) },
        false => quote::quote_spanned! { path.span() =>
            // SAFETY: the address is that of the function item `#path` itself.
            .__function_item(unsafe { #item })
        },
    }
}

/// Whether `t` is `&PtRegs` (`Some(false)`) or `&mut PtRegs` (`Some(true)`).
fn regs_ref(t: &syn::Type) -> Option<bool> {
    match t {
        syn::Type::Reference(r) if matches!(&*r.elem, syn::Type::Path(p) if p.path.segments.last().is_some_and(|l| l.ident == "PtRegs")) => {
            Some(r.mutability.is_some())
        }
        _ => None,
    }
}

/// The checks every probe handler's signature shares: a plain, safe, non-generic Rust
/// function that returns nothing. One error per problem, on its token; `shape` says
/// what the signature must be.
fn check_plain_fn(s: &syn::Signature, shape: &str, errors: &mut Vec<syn::Error>) {
    use syn::spanned::Spanned;
    let mut refuse = |span: proc_macro2::Span, why: &str| errors.push(syn::Error::new(span, format!("{shape}: {why}")));
    if let Some(t) = &s.asyncness {
        refuse(t.span(), "it must not be `async`");
    }
    if let Some(t) = &s.constness {
        refuse(t.span(), "it must not be `const`");
    }
    if let Some(t) = &s.unsafety {
        refuse(t.span(), "it must not be `unsafe`");
    }
    if let Some(a) = &s.abi {
        refuse(a.span(), "it must use the Rust ABI");
    }
    if !s.generics.params.is_empty() {
        refuse(s.generics.span(), "it must not be generic");
    }
    if let Some(v) = &s.variadic {
        refuse(v.span(), "it must not be variadic");
    }
    if let syn::ReturnType::Type(_, t) = &s.output {
        refuse(t.span(), "it must return nothing");
    }
}
