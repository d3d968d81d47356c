//! `#[kretprobe]`: a return probe's handler and its registration.
//!
//! Modelled on `#[kprobe]`, with one difference in the expansion: the builder chain is
//! a hidden function next to the handler, not inside the generated module, so every
//! path the user wrote (`function = super::f`, `data = self::D`, `entry = …`) resolves
//! where it was written.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;

const OPTIONS: &str = "`function = path`, `symbol = \"name\"`, `data = Type`, `entry = path`, `maxactive = N` or `crate = path`";

struct Options {
    function: Option<syn::Path>,
    symbol: Option<syn::LitStr>,
    data: Option<syn::Type>,
    entry: Option<syn::Path>,
    maxactive: Option<syn::LitInt>,
    krate: Option<syn::Path>,
}

/// A path expression (`f`, `a::b::<T>`), or an error on `e` saying what `what` must be.
fn path_of(e: syn::Expr, what: &str) -> Result<syn::Path, syn::Error> {
    match e {
        syn::Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => Ok(p.path),
        e => Err(syn::Error::new(e.span(), what)),
    }
}

fn parse_options(attr: TokenStream, errors: &mut Vec<syn::Error>) -> Options {
    let mut o = Options { function: None, symbol: None, data: None, entry: None, maxactive: None, krate: None };
    let mut seen: Vec<String> = Vec::new();
    let parser = syn::meta::parser(|meta| {
        let Some(key) = meta.path.get_ident().map(|i| i.to_string()) else {
            errors.push(meta.error(format!("unknown option: must be {OPTIONS}")));
            return skip_value(&meta);
        };
        // Each option once: a second one is an error on its name, and is not used.
        if seen.contains(&key) {
            errors.push(meta.error(format!("`{key}` must be given once")));
            return skip_value(&meta);
        }
        seen.push(key.clone());
        match key.as_str() {
            "function" => match path_of(meta.value()?.parse()?, "`function` must be a path to a function: `function = path::to::f`") {
                Ok(p) => o.function = Some(p),
                Err(e) => errors.push(e),
            },
            "symbol" => match meta.value()?.parse()? {
                syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }) if s.value().is_empty() => {
                    errors.push(syn::Error::new(s.span(), "`symbol` must name a function: `symbol = \"name\"`"))
                }
                syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }) => o.symbol = Some(s),
                e => errors.push(syn::Error::new(e.span(), "`symbol` must be a string literal: `symbol = \"name\"`")),
            },
            "data" => o.data = Some(meta.value()?.parse()?),
            "entry" => match path_of(meta.value()?.parse()?, "`entry` must be a path to the entry handler: `entry = on_entry`") {
                Ok(p) => o.entry = Some(p),
                Err(e) => errors.push(e),
            },
            "maxactive" => match check_maxactive(meta.value()?.parse()?) {
                Ok(n) => o.maxactive = Some(n),
                Err(e) => errors.push(e),
            },
            "crate" => o.krate = Some(meta.value()?.parse()?),
            "offset" => {
                errors.push(meta.error(
                    "`offset` is not allowed: a return probe must be on a function's entry, its first instruction \
                     (to probe inside a function, use `#[kprobe(symbol = \"name\", offset = N)]`)",
                ));
                return skip_value(&meta);
            }
            _ => {
                errors.push(meta.error(format!("unknown option: must be {OPTIONS}")));
                return skip_value(&meta);
            }
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, attr) {
        errors.push(e);
    }
    match (&o.function, &o.symbol) {
        (Some(f), Some(_)) => errors.push(syn::Error::new(f.span(), "must have one target: `function = path` or `symbol = \"name\"`, not both")),
        // A target given but not valid is reported where it is written.
        (None, None) if seen.iter().any(|k| k == "function" || k == "symbol") => {}
        (None, None) => errors.push(syn::Error::new(
            Span::call_site(),
            "`#[kretprobe]` must name its target: `#[kretprobe(function = path::to::f)]` or `#[kretprobe(symbol = \"name\")]`",
        )),
        _ => {}
    }
    o
}

/// Consumes `= value` after an option that is reported and not used, so the options
/// after it are still checked.
fn skip_value(meta: &syn::meta::ParseNestedMeta) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        let _: syn::Expr = meta.value()?.parse()?;
    }
    Ok(())
}

/// `maxactive = N`: an integer literal, unsuffixed or `usize`, at least 1.
fn check_maxactive(e: syn::Expr) -> Result<syn::LitInt, syn::Error> {
    const SHAPE: &str = "`maxactive` must be an integer literal: `maxactive = 64`";
    let n = match e {
        syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Int(n), .. }) => n,
        e => return Err(syn::Error::new(e.span(), SHAPE)),
    };
    if !matches!(n.suffix(), "" | "usize") {
        return Err(syn::Error::new(n.span(), format!("{SHAPE} (a `usize`, not `{}`)", n.suffix())));
    }
    match n.base10_parse::<usize>() {
        Ok(0) => Err(syn::Error::new(n.span(), "`maxactive` must be at least 1: it is how many calls can be watched at once")),
        Ok(_) => Ok(n),
        Err(_) => Err(syn::Error::new(n.span(), format!("{SHAPE} that fits in a `usize`"))),
    }
}

/// A type as the user would write it, for messages (`Vec<u8>`, not `Vec < u8 >`).
fn type_text(t: &syn::Type) -> String {
    let s = t.to_token_stream().to_string();
    [(" :: ", "::"), (":: ", "::"), (" < ", "<"), ("< ", "<"), (" <", "<"), (" >", ">"), (" ,", ","), ("& ", "&"), (" ;", ";")]
        .iter()
        .fold(s, |s, (from, to)| s.replace(from, to))
}

/// Checks `fn h(regs: &mut PtRegs)`, or `fn h(regs: &mut PtRegs, data: &mut T)` with
/// `data = T`; one error per problem, each on its token. Whether the second argument
/// is `&mut T` for this `T` is left to rustc (see `expand`).
fn check_signature(f: &syn::ItemFn, data: Option<&syn::Type>, errors: &mut Vec<syn::Error>) {
    let shape = match data {
        None => "`#[kretprobe]` handler must have signature `fn(regs: &mut PtRegs)`".to_string(),
        Some(t) => {
            let t = type_text(t);
            format!("`#[kretprobe(data = {t})]` handler must have signature `fn(regs: &mut PtRegs, data: &mut {t})`")
        }
    };
    let s = &f.sig;
    crate::check_plain_fn(s, &shape, errors);
    fn mut_ref(t: &syn::Type) -> Option<&syn::Type> {
        match t {
            syn::Type::Reference(r) if r.mutability.is_some() => Some(&r.elem),
            _ => None,
        }
    }
    let is_regs = |t: &syn::Type| mut_ref(t).is_some_and(|e| matches!(e, syn::Type::Path(p) if p.path.segments.last().is_some_and(|l| l.ident == "PtRegs")));
    // The whole `(...)`: a group's span covers it even where spans cannot be joined.
    let parens = s.paren_token.span.join();
    let args: Vec<_> = s.inputs.iter().collect();
    for (i, a) in args.iter().enumerate() {
        match a {
            syn::FnArg::Receiver(r) => errors.push(syn::Error::new(r.span(), format!("{shape}: it must not take `self`"))),
            syn::FnArg::Typed(p) if i == 0 && !is_regs(&p.ty) => {
                errors.push(syn::Error::new(p.ty.span(), format!("{shape}: its first argument must be `&mut PtRegs`")))
            }
            syn::FnArg::Typed(p) if i == 1 && data.is_none() => {
                errors.push(syn::Error::new(p.span(), format!("{shape}: a second argument, the per-call data, must come with `data = T` in the attribute")))
            }
            syn::FnArg::Typed(p) if i == 1 && mut_ref(&p.ty).is_none() => {
                errors.push(syn::Error::new(p.ty.span(), format!("{shape}: its second argument must be `&mut {}`", data.map(type_text).unwrap_or_default())))
            }
            _ => {}
        }
    }
    match (args.len(), data) {
        (1, None) | (2, Some(_)) | (2, None) => {} // (2, None): reported on the argument
        (1, Some(t)) => errors.push(syn::Error::new(parens, format!("{shape}: it must take the data as its second argument, `data: &mut {}`", type_text(t)))),
        (_, None) => errors.push(syn::Error::new(parens, format!("{shape}: it must take exactly one argument"))),
        (_, Some(_)) => errors.push(syn::Error::new(parens, format!("{shape}: it must take exactly two arguments"))),
    }
}

pub fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let f: syn::ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            let span = item.clone().into_iter().next().map(|t| t.span()).unwrap_or_else(Span::call_site);
            let e = syn::Error::new(span, "`#[kretprobe]` must be on a function: `fn handler(regs: &mut PtRegs)`").to_compile_error();
            return quote! { #e #item };
        }
    };
    let mut errors = Vec::new();
    let o = parse_options(attr, &mut errors);
    check_signature(&f, o.data.as_ref(), &mut errors);
    if let Some(e) = errors.into_iter().reduce(|mut a, b| {
        a.combine(b);
        a
    }) {
        let e = e.to_compile_error();
        return quote! { #e #f };
    }
    let krate = o.krate.unwrap_or_else(|| syn::parse_quote!(::probekit));
    let ident = &f.sig.ident;
    let target = match (&o.function, &o.symbol) {
        // Any function item or pointer, whatever its signature (`FnAddr` would need the
        // pointer type spelled out): its address, as `#[kprobe]` does.
        (Some(path), _) => quote_spanned! { path.span() => .address(#path as *const () as usize) },
        (_, Some(name)) => quote! { .symbol(#name) },
        _ => unreachable!("checked with the options"),
    };
    let maxactive = o.maxactive.as_ref().map(|n| quote! { .maxactive(#n) });
    let result = quote! { ::core::result::Result<#krate::ReturnProbeHandle, #krate::Error> };
    let body = match &o.data {
        // The builder is typed by the data from `.data::<T>()` on, and each of its
        // methods needs `T: Default + Send + 'static`: called from a function generic
        // over `T`, a `T` without them is one error, on the `data = T` token, not one
        // per method. A handler of another `T` is rustc's "expected fn pointer" on its
        // name.
        Some(t) => {
            let entry = match &o.entry {
                Some(p) => quote_spanned! { p.span() => ::core::option::Option::Some(#p) },
                None => quote! { ::core::option::Option::None },
            };
            let data = quote_spanned! { t.span() => __probekit_with_data::<#t> };
            quote! {
                fn __probekit_with_data<T: ::core::default::Default + ::core::marker::Send + 'static>(
                    b: #krate::ReturnProbeBuilder<()>,
                    handler: #krate::ReturnHandler<T>,
                    entry: ::core::option::Option<#krate::EntryHandler<T>>,
                ) -> #result {
                    let b = b.data::<T>().handler(handler);
                    match entry {
                        ::core::option::Option::Some(e) => b.entry_handler(e),
                        ::core::option::Option::None => b,
                    }
                    .register()
                }
                #data(#krate::ReturnProbe::builder() #target #maxactive, #ident, #entry)
            }
        }
        // Without data the handlers take only the registers. Adapters that take the
        // `&mut ()` call them through constants (a closure that captured a pointer
        // would not be a `fn`), so a handler of another shape is one "expected fn
        // pointer" error on its name.
        None => {
            let entry = o.entry.as_ref().map(|p| {
                quote! {
                    const __PROBEKIT_ENTRY: fn(&mut #krate::PtRegs) -> #krate::Entry = #p;
                }
            });
            let entry_call = o.entry.as_ref().map(|_| quote! { .entry_handler(|regs, _| __PROBEKIT_ENTRY(regs)) });
            quote! {
                const __PROBEKIT_HANDLER: fn(&mut #krate::PtRegs) = #ident;
                #entry
                #krate::ReturnProbe::builder() #target #maxactive #entry_call
                    .handler(|regs, _| __PROBEKIT_HANDLER(regs))
                    .register()
            }
        }
    };
    crate::registration(&f, result, body, "return probe", "return probe whose return handler", "kretprobe")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(attr: &str, item: &str) -> String {
        expand(attr.parse().unwrap(), item.parse().unwrap()).to_string()
    }

    #[test]
    fn data_types_the_handlers() {
        let out = expand_str("function = f, maxactive = 64, entry = on_entry, data = MyData", "fn h(regs: &mut PtRegs, data: &mut MyData) {}");
        assert!(out.contains(". data :: < T > () . handler (handler)"), "{out}");
        assert!(
            out.contains(
                "__probekit_with_data :: < MyData > (:: probekit :: ReturnProbe :: builder () \
                 . address (f as * const () as usize) . maxactive (64) , h , :: core :: option :: Option :: Some (on_entry))"
            ),
            "{out}"
        );
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn without_data_the_handlers_are_adapted() {
        let out = expand_str("symbol = \"f\", entry = e", "fn h(regs: &mut PtRegs) {}");
        assert!(out.contains("const __PROBEKIT_HANDLER : fn (& mut :: probekit :: PtRegs) = h ;"), "{out}");
        assert!(out.contains(". entry_handler (| regs , _ | __PROBEKIT_ENTRY (regs))"), "{out}");
        assert!(out.contains(". handler (| regs , _ | __PROBEKIT_HANDLER (regs))"), "{out}");
        assert!(!out.contains(". data"), "{out}");
    }

    #[test]
    fn every_problem_is_reported_with_the_item() {
        let out = expand_str("offset = 4, maxactive = x, maxactive = 0, speed = 11", "async fn h(regs: &PtRegs) -> u8 { 0 }");
        assert_eq!(out.matches("compile_error").count(), 8, "{out}");
        assert!(out.contains("async fn h"), "the item is kept: {out}");
    }

    #[test]
    fn types_read_as_written() {
        assert_eq!(type_text(&syn::parse_quote!(std::vec::Vec<Option<(u8, u16)>>)), "std::vec::Vec<Option<(u8, u16)>>");
        assert_eq!(type_text(&syn::parse_quote!([u8; 4])), "[u8; 4]");
    }
}
