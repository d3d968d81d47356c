//! `#[traceable]`: a function whose entry is a patchable site.
//!
//! `fn f(args) -> R { body }` becomes three functions:
//!
//! - `f`, the function users call and take pointers of: same signature (its ABI
//!   included: Rust, or `extern "C"` for C and asm callers), attributes and visibility,
//!   `#[inline(never)]`, and all it does is call the site;
//! - `__probekit_site_f`, a naked `extern "C-unwind"` function: the patchable nops, a jump
//!   to the body, the site's exit path where the stack-passed arguments can be bounded
//!   by a constant (not in generic functions and impls: probe-codegen `site::exit_asm`),
//!   and the site's entry in the `probekit_sites` table;
//! - `__probekit_body_f`, an `extern "C-unwind"` function holding the user's body and
//!   patterns.
//!
//! Naked functions are stable since Rust 1.88 for the `C` and `C-unwind` ABIs only (not
//! for `extern "Rust"`), which is why the site and the body use `C-unwind`: arguments
//! reach the body in the registers the site received them in, and a panic in the body
//! unwinds through the site and the wrapper to the caller as it would have without the
//! attribute. `sym` operands may name generic instances, so each instance of a generic
//! function gets its own site and its own table entry.
//!
//! On an `impl` block the attribute does the same for the methods marked in it (or all
//! of them). A trait impl cannot hold the site and the body (they are not members of
//! the trait), so they go to a private helper trait with the trait as supertrait,
//! implemented for the same type: see `expand_impl`.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{format_ident, quote, ToTokens};
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::visit_mut::VisitMut;

mod abi;
use abi::{no_fp, primitives_check, stack_args_bound};

/// The shape every refusal shows.
const SHAPE: &str = "`#[traceable]` function must have signature `[pub] [unsafe] [extern \"C\"] fn name<G>(args) -> R`";

/// The ABIs a traceable function may have: Rust's, and the C calling convention under
/// each of its names (on Linux x86_64 and aarch64 `system` is `C`). The wrapper keeps
/// the ABI; the site and the body are `extern "C-unwind"` whatever it is.
const ABIS: [&str; 5] = ["Rust", "C", "C-unwind", "system", "system-unwind"];

/// Whether `a` is `#[inline(never)]`, which a traceable function has anyway.
fn is_inline_never(a: &syn::Attribute) -> bool {
    a.path().is_ident("inline") && matches!(&a.meta, syn::Meta::List(l) if l.tokens.to_string() == "never")
}

struct Options {
    /// Generate the associated-function form (`Self::__probekit_site_f`) even though
    /// the signature neither takes `self` nor names `Self`.
    associated: bool,
}

fn parse_options(attr: TokenStream, errors: &mut Vec<syn::Error>) -> Options {
    let mut o = Options { associated: false };
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("associated") {
            o.associated = true;
        } else {
            errors.push(meta.error("unknown option: `#[traceable]` takes nothing, or `associated` on an associated function without `self`"));
            if meta.input.peek(syn::Token![=]) {
                let _: syn::Expr = meta.value()?.parse()?;
            }
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, attr) {
        errors.push(e);
    }
    o
}

/// Finds every `impl Trait` in a type, however deep (`Box<impl Fn()>` too).
struct ImplTraits<'a>(&'a mut Vec<syn::Error>, &'static str);

impl<'ast> Visit<'ast> for ImplTraits<'_> {
    fn visit_type_impl_trait(&mut self, t: &'ast syn::TypeImplTrait) {
        self.0.push(syn::Error::new(t.impl_token.span, format!("{SHAPE}: {}", self.1)));
    }
}

/// Checks the signature, one error per problem, each on its token.
fn check_signature(f: &syn::ItemFn, errors: &mut Vec<syn::Error>) {
    let s = &f.sig;
    if let Some(t) = &s.asyncness {
        errors.push(syn::Error::new(t.span(), format!("{SHAPE}: it must not be `async` (the site is the entry of the function itself, not of its future)")));
    }
    if let Some(t) = &s.constness {
        errors.push(syn::Error::new(t.span(), format!("{SHAPE}: it must not be `const` (a site is machine code)")));
    }
    if let Some(a) = &s.abi {
        // `extern` alone is `extern "C"`.
        let name = a.name.as_ref().map_or("C".to_string(), |n| n.value());
        if !ABIS.contains(&name.as_str()) {
            errors.push(syn::Error::new(
                a.span(),
                format!("{SHAPE}: it must use the Rust or the C ABI (`extern \"C\"`, `extern \"C-unwind\"`), not `extern \"{name}\"`: the site, a naked `extern \"C-unwind\"` function, passes the arguments on as it received them"),
            ));
        }
    }
    if let Some(v) = &s.variadic {
        errors.push(syn::Error::new_spanned(v.dots, format!("{SHAPE}: it must not be variadic")));
    }
    for input in &s.inputs {
        if let syn::FnArg::Typed(p) = input {
            ImplTraits(errors, "it must not take `impl Trait`: use a named type parameter").visit_type(&p.ty);
        }
    }
    if let syn::ReturnType::Type(_, t) = &s.output {
        ImplTraits(errors, "it must not return `impl Trait`: name the type").visit_type(t);
    }
    for a in f.attrs.iter().filter(|a| a.path().is_ident("inline") && !is_inline_never(a)) {
        errors.push(syn::Error::new_spanned(
            a,
            format!(
                "{SHAPE}: it must not be `#[inline]` or `#[inline(always)]`: every call must pass its site, so a traceable function \
                 is never inlined (`#[inline(never)]` is allowed, and implied)"
            ),
        ));
    }
}

/// Whether `Self` appears anywhere in `tokens`: then the function is an associated
/// function (a free function cannot name `Self`).
fn names_self(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|t| match t {
        TokenTree::Ident(i) => i == "Self",
        TokenTree::Group(g) => names_self(g.stream()),
        _ => false,
    })
}

/// Reports that the attribute is neither on a function nor on an impl, on the item's
/// first token after its attributes and visibility (`struct`, `const`, …), and keeps
/// the item.
fn not_a_function(item: TokenStream) -> TokenStream {
    let first_token = |input: syn::parse::ParseStream| -> syn::Result<Span> {
        input.call(syn::Attribute::parse_outer)?;
        input.parse::<syn::Visibility>()?;
        let span = input.cursor().token_tree().map(|(t, _)| t.span()).unwrap_or_else(|| input.span());
        input.parse::<TokenStream>()?;
        Ok(span)
    };
    let span = syn::parse::Parser::parse2(first_token, item.clone()).unwrap_or_else(|_| Span::call_site());
    let e = syn::Error::new(
        span,
        "`#[traceable]` must be on a function with a body, `[pub] [unsafe] [extern \"C\"] fn name<G>(args) -> R { … }`, or on an `impl` block",
    )
    .to_compile_error();
    quote! { #e #item }
}

pub fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let f: syn::ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            return match syn::parse2::<syn::ItemImpl>(item.clone()) {
                Ok(imp) => expand_impl(attr, imp),
                Err(_) => not_a_function(item),
            }
        }
    };
    let mut errors = Vec::new();
    let o = parse_options(attr, &mut errors);
    check_signature(&f, &mut errors);
    if let Some(e) = combined(errors) {
        // The item as written, so the errors above are the only ones; without its
        // `...`, which rustc refuses on a Rust-ABI function.
        let mut f = f;
        f.sig.variadic = None;
        let e = e.to_compile_error();
        return quote! { #e #f };
    }
    let place = if o.associated || f.sig.receiver().is_some() || names_self(f.sig.to_token_stream()) { Place::Associated } else { Place::Free };
    // An associated function's impl is not visible here: it may be generic, so no
    // exit path (which needs the argument types' sizes as constants).
    let concrete_impl = matches!(place, Place::Free);
    let Parts { wrapper, site, body, .. } = parts(&f, &place, concrete_impl);
    quote! { #wrapper #site #body }
}

fn combined(errors: Vec<syn::Error>) -> Option<syn::Error> {
    errors.into_iter().reduce(|mut a, b| {
        a.combine(b);
        a
    })
}

/// Whether `a` is a `#[traceable]` attribute (`#[traceable]`, `#[probekit::traceable]`, …).
fn is_traceable(a: &syn::Attribute) -> bool {
    a.path().segments.last().is_some_and(|s| s.ident == "traceable")
}

/// `#[traceable]` on an `impl` block: its methods marked `#[traceable]`, or all of them
/// if none is marked. In an inherent impl each becomes what the attribute on it makes.
/// A trait impl cannot take the extra functions, so they go to a private helper trait
/// implemented for the same type (`__probekit_traceable_<hash>`, with the trait as its
/// supertrait so that `Self::Assoc` still resolves), and the trait's method calls the
/// site through it.
fn expand_impl(attr: TokenStream, mut imp: syn::ItemImpl) -> TokenStream {
    let mut errors = Vec::new();
    if !attr.is_empty() {
        errors.push(syn::Error::new_spanned(&attr, "`#[traceable]` on an `impl` block takes no options (its functions are associated)"));
    }
    if let Some((Some(bang), _, _)) = &imp.trait_ {
        errors.push(syn::Error::new_spanned(bang, "`#[traceable]` cannot be on a negative impl"));
    }
    let marked = imp.items.iter().any(|i| matches!(i, syn::ImplItem::Fn(f) if f.attrs.iter().any(is_traceable)));
    let mut chosen = Vec::new();
    for (index, item) in imp.items.iter_mut().enumerate() {
        if let syn::ImplItem::Fn(m) = item {
            if marked && !m.attrs.iter().any(is_traceable) {
                continue;
            }
            for a in m.attrs.iter().filter(|a| is_traceable(a)) {
                if !matches!(a.meta, syn::Meta::Path(_)) && a.meta.require_list().map_or(true, |l| l.tokens.to_string() != "associated") {
                    errors.push(syn::Error::new_spanned(a, "unknown option: inside a `#[traceable]` impl a function takes `#[traceable]` alone"));
                }
            }
            m.attrs.retain(|a| !is_traceable(a));
            let f = syn::ItemFn { attrs: m.attrs.clone(), vis: m.vis.clone(), sig: m.sig.clone(), block: Box::new(m.block.clone()) };
            check_signature(&f, &mut errors);
            chosen.push((index, f));
        }
    }
    if let Some(e) = combined(errors) {
        let e = e.to_compile_error();
        return quote! { #e #imp };
    }
    // A trait impl's helper: its generics are the impl's, plus a name for each lifetime
    // the trait path elides (`impl From<&str> for S`), which a supertrait must name.
    let helper_ident = format_ident!("__probekit_traceable_{:016x}", fnv1a(imp.to_token_stream().to_string().as_bytes()));
    let mut helper_generics = imp.generics.clone();
    let place = match &imp.trait_ {
        None => Place::Associated,
        Some((_, path, _)) => {
            let label = format!("<{} as {}>", tidy(&imp.self_ty.to_token_stream().to_string()), tidy(&path.to_token_stream().to_string()));
            let mut named = path.clone();
            let mut elided = NameElided(Vec::new());
            elided.visit_path_mut(&mut named);
            for (i, l) in elided.0.iter().enumerate() {
                helper_generics.params.insert(i, syn::GenericParam::Lifetime(syn::LifetimeParam::new(l.clone())));
            }
            let (_, args, _) = helper_generics.split_for_impl();
            let helper = quote! { #helper_ident #args };
            let mut outside: syn::Path = syn::parse_quote! { #helper };
            let fresh: Vec<String> = elided.0.iter().map(|l| l.to_string()).collect();
            AnonymiseLifetimes(&fresh).visit_path_mut(&mut outside);
            Place::Helper { helper, outside: outside.to_token_stream(), trait_path: named.to_token_stream(), label }
        }
    };
    let mut generated = Vec::new();
    let concrete_impl = helper_generics.params.is_empty();
    for (index, f) in &chosen {
        let p = parts(f, &place, concrete_impl);
        imp.items[*index] = syn::ImplItem::Verbatim(p.wrapper.clone());
        generated.push(p);
    }
    match &place {
        Place::Helper { trait_path, .. } => {
            let (impl_generics, args, where_clause) = helper_generics.split_for_impl();
            let self_ty = &imp.self_ty;
            // The helper exists where the impl does; the impl's lint levels cover the
            // bodies, which are in the helper impl now (`expect` only there, where what
            // it expects can happen).
            let is = |a: &syn::Attribute, names: &[&str]| names.iter().any(|n| a.path().is_ident(n));
            let cfgs: Vec<_> = imp.attrs.iter().filter(|a| is(a, &["cfg"])).cloned().collect();
            let lints: Vec<_> = imp.attrs.iter().filter(|a| is(a, &["allow", "warn", "deny", "forbid", "expect"])).cloned().collect();
            imp.attrs.retain(|a| !is(a, &["expect"]));
            let decls = generated.iter().map(|p| &p.decls);
            let defs = generated.iter().map(|p| {
                let (site, body) = (&p.site, &p.body);
                quote! { #site #body }
            });
            quote! {
                #imp

                #(#cfgs)*
                #[doc(hidden)]
                #[allow(non_camel_case_types, improper_ctypes_definitions)]
                trait #helper_ident #impl_generics: #trait_path #where_clause {
                    #(#decls)*
                }

                #(#cfgs)*
                #(#lints)*
                #[allow(improper_ctypes_definitions)]
                impl #impl_generics #helper_ident #args for #self_ty #where_clause {
                    #(#defs)*
                }
            }
        }
        _ => {
            for p in generated {
                let (site, body) = (p.site, p.body);
                imp.items.push(syn::ImplItem::Verbatim(quote! { #site #body }));
            }
            imp.into_token_stream()
        }
    }
}

/// Names every lifetime a path elides (`&T`, `'_`) `'__probekit_lN`, collecting the
/// names. Function pointer types and `Fn(..)` sugar are left alone: their elided
/// lifetimes are their own (higher-ranked), not the impl's.
struct NameElided(Vec<syn::Lifetime>);

impl NameElided {
    fn fresh(&mut self, span: Span) -> syn::Lifetime {
        let l = syn::Lifetime::new(&format!("'__probekit_l{}", self.0.len()), span);
        self.0.push(l.clone());
        l
    }
}

impl VisitMut for NameElided {
    fn visit_type_reference_mut(&mut self, r: &mut syn::TypeReference) {
        if r.lifetime.is_none() {
            r.lifetime = Some(self.fresh(r.and_token.span));
        }
        syn::visit_mut::visit_type_reference_mut(self, r);
    }
    fn visit_lifetime_mut(&mut self, l: &mut syn::Lifetime) {
        if l.ident == "_" {
            *l = self.fresh(l.apostrophe);
        }
    }
    fn visit_type_bare_fn_mut(&mut self, _: &mut syn::TypeBareFn) {}
    fn visit_parenthesized_generic_arguments_mut(&mut self, _: &mut syn::ParenthesizedGenericArguments) {}
}

/// Turns the named lifetimes back into `'_`, for paths written where they are not in scope.
struct AnonymiseLifetimes<'a>(&'a [String]);

impl VisitMut for AnonymiseLifetimes<'_> {
    fn visit_lifetime_mut(&mut self, l: &mut syn::Lifetime) {
        if self.0.contains(&l.to_string()) {
            *l = syn::Lifetime::new("'_", l.apostrophe);
        }
    }
}

/// Token text as it would be written (`Sq < T >` → `Sq<T>`), for a site's name.
fn tidy(tokens: &str) -> String {
    [(" < ", "<"), ("< ", "<"), (" >", ">"), (" :: ", "::"), (":: ", "::"), (" ,", ","), ("& ", "&"), ("' ", "'")]
        .iter()
        .fold(tokens.to_string(), |t, (a, b)| t.replace(a, b))
}

/// FNV-1a: a stable name for an impl's helper trait (two impls of one trait in a module
/// differ in their tokens).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Which attributes go where. Everything the user wrote stays on the function users
/// see; lint levels also go to the body (which holds the user's code), `expect` only
/// there (the wrapper would leave it unfulfilled); `cfg` goes on all three.
fn split_attrs(attrs: &[syn::Attribute]) -> (Vec<&syn::Attribute>, Vec<&syn::Attribute>, Vec<&syn::Attribute>) {
    let is = |a: &syn::Attribute, names: &[&str]| names.iter().any(|n| a.path().is_ident(n));
    // The wrapper is `#[inline(never)]` anyway: the user's, if written, is not repeated.
    let wrapper = attrs.iter().filter(|a| !is(a, &["expect"]) && !is_inline_never(a)).collect();
    let body = attrs.iter().filter(|a| is(a, &["allow", "warn", "deny", "forbid", "expect", "cfg"])).collect();
    let site = attrs.iter().filter(|a| is(a, &["cfg"])).collect();
    (wrapper, body, site)
}

/// Where the generated functions live, and so how they are named.
enum Place {
    /// Next to a free function.
    Free,
    /// Next to an associated function, in its inherent impl (`Self::…`).
    Associated,
    /// In the helper trait of a trait impl: named `<Self as helper>::…` inside the
    /// helper impl and `<Self as outside>::…` in the trait impl (the helper's lifetimes
    /// that the trait impl does not have are `'_` there); the function itself is
    /// `<Self as trait_path>::…`, listed as `label::name`.
    Helper { helper: TokenStream, outside: TokenStream, trait_path: TokenStream, label: String },
}

/// What a traceable function becomes: the function users call, the site (both
/// architectures), the body, and (in a helper trait) the declarations of the last two.
struct Parts {
    wrapper: TokenStream,
    site: TokenStream,
    body: TokenStream,
    decls: TokenStream,
}

fn parts(f: &syn::ItemFn, place: &Place, concrete_impl: bool) -> Parts {
    let syn::ItemFn { attrs, vis, sig, block } = f;
    let ident = &sig.ident;
    let site = format_ident!("__probekit_site_{}", ident);
    let body = format_ident!("__probekit_body_{}", ident);
    let name = ident.to_string();
    let name = name.strip_prefix("r#").unwrap_or(&name);
    let name = match place {
        Place::Helper { label, .. } => format!("{label}::{name}"),
        _ => name.to_string(),
    };
    let (wrapper_attrs, body_attrs, site_attrs) = split_attrs(attrs);

    // The arguments under generated names: the wrapper forwards them, the naked site
    // cannot use patterns, and only the body binds the user's patterns.
    let mut forward = Vec::new();
    let plain_inputs: Vec<syn::FnArg> = sig
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| match input {
            syn::FnArg::Receiver(r) => {
                let mut r = r.clone();
                r.attrs.clear();
                if r.reference.is_none() {
                    r.mutability = None; // `mut self` binds mutably in the body only
                }
                forward.push(quote! { self });
                syn::FnArg::Receiver(r)
            }
            syn::FnArg::Typed(p) => {
                let arg = format_ident!("__probekit_arg{}", i);
                forward.push(quote! { #arg });
                let ty = &p.ty;
                syn::parse_quote! { #arg: #ty }
            }
        })
        .collect();
    let mut plain = sig.clone();
    plain.inputs = plain_inputs.into_iter().collect();

    // Explicit generic arguments: the function's own type and const parameters (its
    // lifetimes are inferred, and an impl's parameters come with `Self`).
    let params: Vec<TokenStream> = sig
        .generics
        .params
        .iter()
        .filter_map(|p| match p {
            syn::GenericParam::Type(t) => Some(t.ident.to_token_stream()),
            syn::GenericParam::Const(c) => Some(c.ident.to_token_stream()),
            syn::GenericParam::Lifetime(_) => None,
        })
        .collect();
    let turbofish = (!params.is_empty()).then(|| quote! { ::<#(#params),*> });
    let (qualify, function_path) = match place {
        Place::Free => (None, quote! { #ident #turbofish }),
        Place::Associated => (Some(quote! { Self:: }), quote! { Self::#ident #turbofish }),
        Place::Helper { helper, trait_path, .. } => (Some(quote! { <Self as #helper>:: }), quote! { <Self as #trait_path>::#ident #turbofish }),
    };
    let site_path = quote! { #qualify #site #turbofish };
    let body_path = quote! { #qualify #body #turbofish };
    // The wrapper's call, from the function's own impl.
    let called = match place {
        Place::Helper { outside, .. } => quote! { <Self as #outside>::#site #turbofish },
        _ => site_path.clone(),
    };

    let unsafety = &sig.unsafety;
    let (generics, where_clause, output) = (&sig.generics, &sig.generics.where_clause, &sig.output);
    let site_inputs = &plain.inputs;
    let body_inputs = &sig.inputs;
    let call = match unsafety {
        // SAFETY (of the generated block): the site of an `unsafe fn` runs its body, so
        // its contract is the function's own, which the wrapper's caller upholds.
        Some(_) => quote! { unsafe { #called(#(#forward),*) } },
        None => quote! { #called(#(#forward),*) },
    };

    // The site and its record, as probe-codegen's site contract spells them (the
    // runtime reads them by the same definitions).
    let args_bound = stack_args_bound(sig, &plain.inputs, concrete_impl);
    let no_fp = no_fp(sig);
    let flags = if no_fp.is_some() { probe_codegen::site::NO_FP } else { 0 };
    let mut block = block.clone();
    block.stmts.splice(0..0, primitives_check(no_fp.as_deref().unwrap_or_default()));
    let naked = |arch: probe_codegen::Arch| {
        let cfg_arch = arch.name();
        let cfg = quote! { #[cfg(target_arch = #cfg_arch)] };
        let mut site_insns = probe_codegen::site::site_asm(arch);
        // The exit path, where the arguments' stack bytes can be bounded.
        let exit = probe_codegen::site::exit_asm(arch).zip(args_bound.as_ref());
        let exit_operands = exit.as_ref().map(|(_, bound)| {
            let frame: TokenStream = probe_codegen::site::exit_frame_expr(arch, "__probekit_args").parse().expect("probe-codegen's expression is Rust");
            quote! {
                args = const #bound,
                frame = const { let __probekit_args: usize = #bound; #frame },
            }
        });
        if let Some((insns, _)) = &exit {
            site_insns.extend(insns.iter().cloned());
        }
        let personality = probe_codegen::site::CFI_PERSONALITY;
        let probe_codegen::site::RecordAsm { before_name, after_name } = probe_codegen::site::record_asm(arch, exit.is_some(), flags);
        let tail = format!("::{name}\"");
        // SAFETY (of `#[unsafe(naked)]`): the asm is the whole function. The nops leave
        // every register and the stack as the caller set them, and the jump enters the
        // body, which has the site's exact signature and ABI, so the body receives the
        // arguments (registers and stack) and returns to the site's caller as if it had
        // been called directly. The exit path (entered only once the runtime has
        // written both slots and patched the nop into a jump to it) calls the body with
        // the argument registers untouched (the entry trampoline restores them) and a
        // copy of at least every stack-passed byte at the same offsets from the stack
        // pointer, 16-aligned at the call; it returns what the body returned, as the
        // exit trampoline restores the return registers (changed only by an `unsafe`
        // return handler, whose caller answers for the value).
        quote! {
            #cfg
            #(#site_attrs)*
            #[doc(hidden)]
            #[unsafe(naked)]
            #[allow(improper_ctypes_definitions, dead_code, non_snake_case)]
            #unsafety extern "C-unwind" fn #site #generics (#site_inputs) #output #where_clause {
                ::core::arch::naked_asm!(
                    // Call-frame information, the entry's default (CFA = the stack
                    // pointer at the call, the return address where the call left it):
                    // the site changes neither, so an unwinder that reaches a context
                    // stopped here (a site probe's handler) walks on to the caller.
                    ".cfi_startproc",
                    // The personality routine, through the record's slot: the
                    // runtime's, once it arms the exit path (a panic unwinding through
                    // it ends the call there); none while the slot is 0.
                    #personality,
                    #(#site_insns,)*
                    ".cfi_endproc",
                    // The record (read by `probekit::sites()`): the site, the function
                    // users call, the name.
                    #(#before_name,)*
                    concat!("2: .ascii \"", module_path!(), #tail),
                    #(#after_name,)*
                    site = sym #site_path,
                    function = sym #function_path,
                    body = sym #body_path,
                    #exit_operands
                )
            }
        }
    };
    let x86_64 = naked(probe_codegen::Arch::X86_64);
    let aarch64 = naked(probe_codegen::Arch::Aarch64);
    let elsewhere = format!("`#[traceable]` supports x86_64 and aarch64 only (`{name}`)");

    Parts {
        wrapper: quote! {
            #(#wrapper_attrs)*
            #[inline(never)]
            #vis #plain {
                #call
            }
        },
        site: quote! {
            #x86_64
            #aarch64
            #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
            ::core::compile_error!(#elsewhere);
        },
        body: quote! {
            #(#body_attrs)*
            #[doc(hidden)]
            #[allow(improper_ctypes_definitions, dead_code, non_snake_case)]
            #unsafety extern "C-unwind" fn #body #generics (#body_inputs) #output #where_clause #block
        },
        decls: quote! {
            #(#site_attrs)*
            #unsafety extern "C-unwind" fn #site #generics (#site_inputs) #output #where_clause;
            #(#site_attrs)*
            #unsafety extern "C-unwind" fn #body #generics (#site_inputs) #output #where_clause;
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(attr: &str, item: &str) -> String {
        expand(attr.parse().unwrap(), item.parse().unwrap()).to_string()
    }

    #[test]
    fn the_body_checks_the_primitives_the_signature_names() {
        let out = expand_str("", "fn g(a: u64) -> u8 { a as u8 }");
        assert!(out.contains("fn __probekit_primitive_u64 (x : u64) -> :: core :: primitive :: u64 { x }"), "{out}");
        assert!(out.contains("fn __probekit_primitive_u8 (x : u8) -> :: core :: primitive :: u8 { x }"), "{out}");
        assert!(!expand_str("", "fn h(a: f64) -> f64 { a }").contains("__probekit_primitive"));
    }

    #[test]
    fn a_free_function_becomes_wrapper_site_and_body() {
        let out = expand_str("", "pub fn f((a, b): (u64, u64), mut c: u64) -> u64 { c += a; b + c }");
        assert!(
            out.contains("# [inline (never)] pub fn f (__probekit_arg0 : (u64 , u64) , __probekit_arg1 : u64) -> u64 { __probekit_site_f (__probekit_arg0 , __probekit_arg1) }"),
            "{out}"
        );
        assert!(out.contains("extern \"C-unwind\" fn __probekit_site_f (__probekit_arg0 : (u64 , u64) , __probekit_arg1 : u64) -> u64"), "{out}");
        assert!(out.contains("extern \"C-unwind\" fn __probekit_body_f ((a , b) : (u64 , u64) , mut c : u64) -> u64 { # [allow (dead_code , non_snake_case)] fn __probekit_primitive_u64 (x : u64) -> :: core :: primitive :: u64 { x } c += a ; b + c }"), "{out}");
        assert!(out.contains("site = sym __probekit_site_f , function = sym f , body = sym __probekit_body_f"), "{out}");
        assert_eq!(out.matches("# [unsafe (naked)]").count(), 2, "one per architecture: {out}");
        assert!(out.contains("\".byte 0x0f, 0x1f, 0x44, 0x00, 0x00\" , \"jmp {body}\""), "{out}");
        assert!(out.contains("\".inst 0xaa1e03e9\" , \".inst 0xd503201f\" , \"b {body}\""), "{out}");
        assert!(out.contains("concat ! (\"2: .ascii \\\"\" , module_path ! () , \"::f\\\"\")"), "{out}");
    }

    #[test]
    fn methods_and_generics_go_through_self_and_turbofish() {
        let out = expand_str("", "fn m<'a, U: Clone, const N: usize>(&'a self, u: U) -> &'a u8 where U: Copy { &self.0 }");
        assert!(out.contains("{ Self :: __probekit_site_m :: < U , N > (self , __probekit_arg1) }"), "{out}");
        assert!(
            out.contains(
                "site = sym Self :: __probekit_site_m :: < U , N > , function = sym Self :: m :: < U , N > , body = sym Self :: __probekit_body_m :: < U , N >"
            ),
            "{out}"
        );
        assert!(out.contains("fn __probekit_site_m < 'a , U : Clone , const N : usize > (& 'a self , __probekit_arg1 : U) -> & 'a u8 where U : Copy"), "{out}");
        // `mut self` is mutable in the body only; a signature naming `Self` is associated.
        let out = expand_str("", "fn by_value(mut self) -> Self { self }");
        assert!(out.contains("fn by_value (self) -> Self { Self :: __probekit_site_by_value (self) }"), "{out}");
        assert!(out.contains("fn __probekit_body_by_value (mut self) -> Self { self }"), "{out}");
        let out = expand_str("associated", "fn count() -> u64 { 0 }");
        assert!(out.contains("{ Self :: __probekit_site_count () }"), "{out}");
    }

    #[test]
    fn unsafe_stays_unsafe_and_attributes_are_split() {
        let out =
            expand_str("", "/// Doc.\n#[cfg(unix)] #[must_use] #[allow(unused_mut)] #[expect(unused_variables)] pub unsafe fn u(p: *const u8) -> u8 { *p }");
        assert!(out.contains("pub unsafe fn u (__probekit_arg0 : * const u8) -> u8 { unsafe { __probekit_site_u (__probekit_arg0) } }"), "{out}");
        assert!(out.contains("unsafe extern \"C-unwind\" fn __probekit_site_u"), "{out}");
        assert!(out.contains("unsafe extern \"C-unwind\" fn __probekit_body_u"), "{out}");
        let wrapper = &out[..out.find("pub unsafe fn u").unwrap()];
        assert!(wrapper.contains("must_use") && wrapper.contains("doc") && !wrapper.contains("expect"), "{out}");
        let body = &out[out.rfind("# [cfg (unix)]").unwrap()..];
        assert!(body.contains("expect") && body.contains("allow (unused_mut)") && !body.contains("must_use"), "{out}");
        assert_eq!(out.matches("# [cfg (unix)]").count(), 4, "wrapper, two sites, body: {out}");
    }

    #[test]
    fn a_trait_impl_gets_a_helper_trait() {
        let out = expand_str("", "impl<T: Copy> Tr<T> for S<T> where T: Eq { type A = u8; fn m(&self, (a, b): (u64, u64)) -> Self::A { 0 } fn n() {} }");
        let helper = &out[out.find("__probekit_traceable_").unwrap()..][..37];
        assert!(out.contains(&format!("trait {helper} < T : Copy > : Tr < T > where T : Eq {{")), "{out}");
        assert!(out.contains(&format!("impl < T : Copy > {helper} < T > for S < T > where T : Eq {{")), "{out}");
        // Declared with plain arguments, defined with the user's patterns.
        assert!(out.contains("extern \"C-unwind\" fn __probekit_body_m (& self , __probekit_arg1 : (u64 , u64)) -> Self :: A ;"), "{out}");
        assert!(out.contains("extern \"C-unwind\" fn __probekit_body_m (& self , (a , b) : (u64 , u64)) -> Self :: A { 0 }"), "{out}");
        // The trait impl keeps its other items; its methods call their sites.
        assert!(out.contains("type A = u8 ;"), "{out}");
        assert!(
            out.contains(&format!(
                "fn m (& self , __probekit_arg1 : (u64 , u64)) -> Self :: A {{ < Self as {helper} < T > > :: __probekit_site_m (self , __probekit_arg1) }}"
            )),
            "{out}"
        );
        assert!(out.contains(&format!("fn n () {{ < Self as {helper} < T > > :: __probekit_site_n () }}")), "{out}");
        assert!(out.contains("function = sym < Self as Tr < T > > :: m ,"), "{out}");
        assert!(out.contains("\"::<S<T> as Tr<T>>::m\\\"\""), "{out}");
    }

    #[test]
    fn lifetimes_the_trait_path_elides_are_named_for_the_helper() {
        let out = expand_str("", "#[allow(unused)] #[expect(dead_code)] impl PartialEq<&str> for S { fn eq(&self, o: &&str) -> bool { true } }");
        let helper = &out[out.find("__probekit_traceable_").unwrap()..][..37];
        assert!(out.contains(&format!("trait {helper} < '__probekit_l0 > : PartialEq < & '__probekit_l0 str >")), "{out}");
        assert!(out.contains(&format!("impl < '__probekit_l0 > {helper} < '__probekit_l0 > for S")), "{out}");
        // Named inside the helper impl, `'_` in the trait impl, where the name is unknown.
        assert!(out.contains(&format!("body = sym < Self as {helper} < '__probekit_l0 > > :: __probekit_body_eq")), "{out}");
        assert!(out.contains(&format!("{{ < Self as {helper} < '_ > > :: __probekit_site_eq (self , __probekit_arg1) }}")), "{out}");
        // Lint levels go to the helper impl too; `expect` only there.
        let trait_impl = &out[..out.find("# [doc (hidden)]").unwrap()];
        assert!(trait_impl.contains("allow (unused)") && !trait_impl.contains("expect"), "{out}");
        let helper_impl = &out[out.rfind("# [allow (unused)]").unwrap()..];
        assert!(helper_impl.contains("expect (dead_code)"), "{out}");
    }

    #[test]
    fn an_inherent_impl_instruments_its_marked_methods_or_all() {
        let out = expand_str("", "impl S { #[traceable] fn a(&self) {} fn b(&self) {} }");
        assert!(out.contains("__probekit_site_a") && !out.contains("__probekit_site_b"), "{out}");
        assert!(!out.contains("# [traceable]"), "the inner attribute is consumed: {out}");
        let out = expand_str("", "impl S { fn a(&self) {} fn b() {} }");
        assert!(out.contains("fn b () { Self :: __probekit_site_b () }"), "associated without `self`: {out}");
        let out = expand_str("associated", "impl S { #[traceable(fast)] fn a(&self) {} #[traceable] #[inline] fn b(&self) {} }");
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
    }

    #[test]
    fn extern_c_and_inline_never_are_accepted() {
        // The C ABI stays on the function C and asm call; site and body are `C-unwind`.
        let out = expand_str("", "#[no_mangle] #[inline(never)] pub unsafe extern \"C\" fn c(a: u64) -> u64 { a }");
        // (Only the other-architectures guard: `compile_error ! (...)`, no error `{ ... }`.)
        assert!(!out.contains("compile_error ! {"), "{out}");
        let wrapper = &out[..out.find("__probekit_site_c (__probekit_arg0)").unwrap()];
        assert_eq!(wrapper.matches("inline").count(), 1, "one `#[inline(never)]`: {out}");
        assert!(wrapper.contains("# [no_mangle] # [inline (never)] pub unsafe extern \"C\" fn c (__probekit_arg0 : u64) -> u64"), "{out}");
        assert!(out.contains("unsafe extern \"C-unwind\" fn __probekit_body_c (a : u64) -> u64 { # [allow (dead_code , non_snake_case)] fn __probekit_primitive_u64 (x : u64) -> :: core :: primitive :: u64 { x } a }"), "{out}");
        assert_eq!(out.matches("no_mangle").count(), 1, "the C name is the wrapper's only: {out}");
        for abi in ["extern", "extern \"C-unwind\"", "extern \"system\"", "extern \"Rust\""] {
            assert!(!expand_str("", &format!("{abi} fn f() {{}}")).contains("compile_error ! {"), "{abi}");
        }
        let out = expand_str("", "#[inline(always)] extern \"efiapi\" fn f() {}");
        assert_eq!(out.matches("compile_error ! {").count(), 2, "{out}");
        assert!(out.contains("not `extern \\\"efiapi\\\"`") && out.contains("`#[inline(never)]` is allowed"), "{out}");
    }

    #[test]
    fn raw_identifiers_are_named_without_r_hash() {
        let out = expand_str("", "fn r#match() {}");
        assert!(out.contains("__probekit_site_match"), "{out}");
        assert!(out.contains("\"::match\\\"\""), "{out}");
    }

    #[test]
    fn every_problem_is_reported_with_the_item() {
        let out = expand_str("speed = 11", "#[inline] const async extern \"sysv64\" fn h(a: impl Copy, ...) -> Box<impl Copy> { 0 }");
        assert_eq!(out.matches("compile_error").count(), 8, "{out}");
        assert!(out.contains("extern \"sysv64\" fn h"), "the item is kept: {out}");
        assert!(!out.contains("# [unsafe (naked)]"), "{out}");
        let out = expand_str("", "#[derive(Debug)] pub struct S;");
        assert!(out.contains("compile_error") && out.contains("pub struct S"), "{out}");
    }
}
