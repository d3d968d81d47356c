//! `#[kretprobe]`: a return probe's handler and its registration.
//!
//! Modelled on `#[kprobe]`, with one difference in the expansion: the builder chain is
//! a hidden function next to the handler, not inside the generated module, so every
//! path the user wrote (`function = super::f`, `data = self::D`, `entry = …`) resolves
//! where it was written.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;

const OPTIONS: &str = "`function = path`, `symbol = \"name\"`, `data = Type`, `entry = path`, `entry_mut = path`, `maxactive = N` or `crate = path`";

struct Options {
    function: Option<syn::Path>,
    symbol: Option<syn::LitStr>,
    data: Option<syn::Type>,
    entry: Option<syn::Path>,
    entry_mut: Option<syn::Path>,
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
    let mut o = Options { function: None, symbol: None, data: None, entry: None, entry_mut: None, maxactive: None, krate: None };
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
            "entry_mut" => match path_of(meta.value()?.parse()?, "`entry_mut` must be a path to the entry handler: `entry_mut = on_entry`") {
                Ok(p) => o.entry_mut = Some(p),
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
    if let (Some(_), Some(p)) = (&o.entry, &o.entry_mut) {
        errors.push(syn::Error::new(
            p.span(),
            "one entry handler: `entry = path` (it reads the registers and returns whether to watch the call) \
             or `entry_mut = path` (it may change them, or skip the function)",
        ));
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

/// Checks `fn h(regs: &PtRegs, data: &mut T)` (it observes) or `fn h(regs: &mut PtRegs,
/// data: &mut T)` (it may change the registers: registering it is `unsafe`), with `T`
/// from `data = T` or `()`: the signature of `ReturnProbeBuilder::handler`. One error
/// per problem, each on its token; whether the second argument is `&mut T` for this
/// `T` is left to rustc (see `expand`). Whether the handler changes the registers.
fn check_signature(f: &syn::ItemFn, data: Option<&syn::Type>, errors: &mut Vec<syn::Error>) -> bool {
    let t = data.map_or_else(|| "()".to_string(), type_text);
    let shape = format!("`#[kretprobe]` handler must have signature `fn(regs: &PtRegs, data: &mut {t})` (or `&mut PtRegs`)");
    let s = &f.sig;
    crate::check_plain_fn(s, &shape, errors);
    // The whole `(...)`: a group's span covers it even where spans cannot be joined.
    let parens = s.paren_token.span.join();
    let mut mutates = false;
    for (i, a) in s.inputs.iter().enumerate() {
        match a {
            syn::FnArg::Receiver(r) => errors.push(syn::Error::new(r.span(), format!("{shape}: it must not take `self`"))),
            syn::FnArg::Typed(p) if i == 0 => match crate::regs_ref(&p.ty) {
                Some(m) => mutates = m,
                None => errors.push(syn::Error::new(p.ty.span(), format!("{shape}: its first argument must be `&PtRegs` or `&mut PtRegs`"))),
            },
            syn::FnArg::Typed(p) if i == 1 && !matches!(&*p.ty, syn::Type::Reference(r) if r.mutability.is_some()) => {
                errors.push(syn::Error::new(p.ty.span(), format!("{shape}: its second argument must be `&mut {t}`")))
            }
            _ => {}
        }
    }
    if s.inputs.len() != 2 {
        errors.push(syn::Error::new(parens, format!("{shape}: it must take exactly two arguments, the registers and this call's data")));
    }
    mutates
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
    let mutates = check_signature(&f, o.data.as_ref(), &mut errors);
    if let Some(e) = errors.into_iter().reduce(|mut a, b| {
        a.combine(b);
        a
    }) {
        let e = e.to_compile_error();
        return quote! { #e #f };
    }
    let krate = o.krate.unwrap_or_else(|| syn::parse_quote!(::probekit));
    let ident = &f.sig.ident;
    let unsafe_register = mutates || o.entry_mut.is_some();
    let target = match (&o.function, &o.symbol) {
        (Some(path), _) => crate::function_item(&krate, path, unsafe_register),
        (_, Some(name)) => quote! { .symbol(#name) },
        _ => unreachable!("checked with the options"),
    };
    let maxactive = o.maxactive.as_ref().map(|n| quote! { .maxactive(#n) });
    let result = quote! { ::core::result::Result<#krate::ReturnProbeHandle, #krate::Error> };
    // The builder is typed by the data from `.data::<T>()` on, which needs
    // `T: Default + Send + 'static`: a `T` without them is one error, on the `data = T`
    // token. A handler of another shape is rustc's error on its name.
    let data = match &o.data {
        Some(t) => quote_spanned! { t.span() => .data::<#t>() },
        None => quote! {},
    };
    let entry = match (&o.entry, &o.entry_mut) {
        (Some(p), _) => Some(quote_spanned! { p.span() => .entry_handler(#p) }),
        (_, Some(p)) => Some(quote_spanned! { p.span() => .entry_handler_mut(#p) }),
        _ => None,
    };
    let handler = if mutates {
        quote! { .handler_mut(#ident) }
    } else {
        quote! { .handler(#ident) }
    };
    let chain = quote! { #krate::ReturnProbe::builder() #data #target #maxactive #entry #handler .register() };
    let body = crate::unsafe_if(unsafe_register, chain);
    crate::registration(&f, result, body, unsafe_register, "return probe", "return probe whose return handler", "kretprobe")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(attr: &str, item: &str) -> String {
        expand(attr.parse().unwrap(), item.parse().unwrap()).to_string()
    }

    #[test]
    fn data_types_the_handlers() {
        let out = expand_str("function = f, maxactive = 64, entry = on_entry, data = MyData", "fn h(regs: &PtRegs, data: &mut MyData) {}");
        assert!(
            out.contains(
                ":: probekit :: ReturnProbe :: builder () . data :: < MyData > () \
                 . __function_item (unsafe { :: probekit :: __private :: FnItem :: new (& f , f as * const () as usize) }) \
                 . maxactive (64) . entry_handler (on_entry) . handler (h) . register ()"
            ),
            "{out}"
        );
        assert!(out.contains("pub fn register ()"), "observing handlers: a safe `register`: {out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn changing_handlers_make_register_unsafe() {
        let out = expand_str("symbol = \"f\", entry_mut = e", "fn h(regs: &PtRegs, _: &mut ()) {}");
        assert!(
            out.contains("unsafe { :: probekit :: ReturnProbe :: builder () . symbol (\"f\") . entry_handler_mut (e) . handler (h) . register () }"),
            "{out}"
        );
        assert!(out.contains("pub unsafe fn register ()"), "{out}");
        assert!(!out.contains(". data"), "without `data`, the data is `()`: {out}");
        let out = expand_str("symbol = \"f\"", "fn h(regs: &mut PtRegs, _: &mut ()) {}");
        assert!(out.contains(". handler_mut (h)") && out.contains("pub unsafe fn register ()"), "{out}");
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
