//! `#[kprobe]`: a breakpoint probe's handler and its registration.
//!
//! The builder chain is a hidden function next to the handler, not inside the
//! generated module, so every path the user wrote (`function = super::f`,
//! `post = self::after`, `crate = pk`) resolves where it was written; the module only
//! forwards to it.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

struct Options {
    function: Option<syn::Path>,
    symbol: Option<syn::LitStr>,
    offset: Option<syn::LitInt>,
    post: Option<syn::Path>,
    post_mut: Option<syn::Path>,
    krate: syn::Path,
}

fn parse_options(attr: TokenStream, errors: &mut Vec<syn::Error>) -> Options {
    let mut o = Options { function: None, symbol: None, offset: None, post: None, post_mut: None, krate: syn::parse_quote!(::probekit) };
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("function") {
            o.function = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("symbol") {
            o.symbol = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("offset") {
            o.offset = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("post") {
            o.post = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("post_mut") {
            o.post_mut = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("crate") {
            o.krate = meta.value()?.parse()?;
        } else {
            errors.push(
                meta.error("unknown option: must be `function = path`, `symbol = \"name\"`, `offset = N`, `post = path`, `post_mut = path` or `crate = path`"),
            );
            if meta.input.peek(syn::Token![=]) {
                let _: syn::Expr = meta.value()?.parse()?;
            }
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, attr) {
        errors.push(e);
    }
    if let (Some(_), Some(p)) = (&o.post, &o.post_mut) {
        errors.push(syn::Error::new(p.span(), "one post handler: `post = path` (it reads the registers) or `post_mut = path` (it may change them)"));
    }
    match (&o.function, &o.symbol) {
        (Some(f), Some(_)) => errors.push(syn::Error::new(f.span(), "must have one target: `function = path` or `symbol = \"name\"`, not both")),
        (None, None) => errors.push(syn::Error::new(
            Span::call_site(),
            "`#[kprobe]` must name its target: `#[kprobe(function = path::to::f)]` or `#[kprobe(symbol = \"name\", offset = 0x10)]`",
        )),
        _ => {}
    }
    o
}

/// Checks `fn h(regs: &PtRegs)` (it observes) or `fn h(regs: &mut PtRegs)` (it may
/// change the registers: registering it is `unsafe`), one error per problem, each on
/// its token. Whether the handler changes the registers.
fn check_signature(f: &syn::ItemFn, errors: &mut Vec<syn::Error>) -> bool {
    const SHAPE: &str = "`#[kprobe]` handler must have signature `fn(regs: &PtRegs)` or `fn(regs: &mut PtRegs)`";
    let s = &f.sig;
    crate::check_plain_fn(s, SHAPE, errors);
    match s.inputs.len() {
        1 => match s.inputs.first() {
            Some(syn::FnArg::Typed(p)) => match crate::regs_ref(&p.ty) {
                Some(mutable) => return mutable,
                None => errors.push(syn::Error::new(p.ty.span(), format!("{SHAPE}: its argument must be `&PtRegs` or `&mut PtRegs`"))),
            },
            Some(a) => errors.push(syn::Error::new(a.span(), format!("{SHAPE}: it must not take `self`"))),
            None => {}
        },
        _ => errors
            .push(syn::Error::new(if s.inputs.is_empty() { s.ident.span() } else { s.inputs.span() }, format!("{SHAPE}: it must take exactly one argument"))),
    }
    false
}

pub fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let f: syn::ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            let span = item.clone().into_iter().next().map(|t| t.span()).unwrap_or_else(Span::call_site);
            let e = syn::Error::new(span, "`#[kprobe]` must be on a function: `fn handler(regs: &mut PtRegs)`").to_compile_error();
            return quote! { #e #item };
        }
    };
    let mut errors = Vec::new();
    let o = parse_options(attr, &mut errors);
    let mutates = check_signature(&f, &mut errors);
    if let Some(e) = errors.into_iter().reduce(|mut a, b| {
        a.combine(b);
        a
    }) {
        let e = e.to_compile_error();
        return quote! { #e #f };
    }
    let krate = &o.krate;
    let ident = &f.sig.ident;
    let unsafe_register = mutates || o.post_mut.is_some();
    let target = match (&o.function, &o.symbol) {
        (Some(path), _) => crate::function_item(krate, path, unsafe_register),
        (_, Some(name)) => quote! { .symbol(#name) },
        _ => unreachable!("checked with the options"),
    };
    let offset = o.offset.as_ref().map(|n| quote! { .offset(#n) });
    let pre = if mutates {
        quote! { .pre_mut(#ident) }
    } else {
        quote! { .pre(#ident) }
    };
    let post = match (&o.post, &o.post_mut) {
        (Some(p), _) => Some(quote_spanned! { p.span() => .post(#p) }),
        (_, Some(p)) => Some(quote_spanned! { p.span() => .post_mut(#p) }),
        _ => None,
    };
    let result = quote! { ::core::result::Result<#krate::ProbeHandle, #krate::Error> };
    let chain = quote! { #krate::Probe::builder() #target #offset #pre #post .register() };
    let body = crate::unsafe_if(unsafe_register, chain);
    crate::registration(&f, result, body, unsafe_register, "probe", "breakpoint probe whose pre handler", "kprobe")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(attr: &str, item: &str) -> String {
        expand(attr.parse().unwrap(), item.parse().unwrap()).to_string()
    }

    #[test]
    fn the_chain_is_next_to_the_handler() {
        let out = expand_str("function = super::f, offset = 4, post = self::after", "fn h(regs: &PtRegs) {}");
        assert!(
            out.contains(
                "fn __probekit_register_h () -> __probekit_Result_h { :: probekit :: Probe :: builder () \
                 . __function_item (unsafe { :: probekit :: __private :: FnItem :: new (& super :: f , super :: f as * const () as usize) }) \
                 . offset (4) . pre (h) . post (self :: after) . register () }"
            ),
            "{out}"
        );
        assert!(out.contains("type __probekit_Result_h = :: core :: result :: Result < :: probekit :: ProbeHandle , :: probekit :: Error > ;"), "{out}");
        let module = &out[out.find("mod h").expect("the module")..];
        assert!(module.contains("pub fn register () -> super :: __probekit_Result_h { super :: __probekit_register_h () }"), "{out}");
        assert!(!module.contains("use super"), "the module only forwards: {out}");
        assert!(!module.contains("builder"), "the module only forwards: {out}");
    }

    #[test]
    fn crate_is_used_next_to_the_handler() {
        let out = expand_str("symbol = \"f\", crate = self::pk", "pub fn h(regs: &PtRegs) {}");
        assert!(out.contains("Result < self :: pk :: ProbeHandle , self :: pk :: Error >"), "{out}");
        assert!(out.contains("self :: pk :: Probe :: builder () . symbol (\"f\") . pre (h) . register ()"), "{out}");
        assert!(out.contains("pub mod h"), "{out}");
    }

    #[test]
    fn a_handler_that_changes_registers_makes_register_unsafe() {
        let out = expand_str("symbol = \"f\", post = g", "fn h(regs: &mut PtRegs) {}");
        assert!(out.contains("unsafe fn __probekit_register_h () -> __probekit_Result_h { unsafe { :: probekit :: Probe :: builder () . symbol (\"f\") . pre_mut (h) . post (g) . register () } }"), "{out}");
        let module = &out[out.find("mod h").expect("the module")..];
        assert!(module.contains("pub unsafe fn register () -> super :: __probekit_Result_h { unsafe { super :: __probekit_register_h () } }"), "{out}");
        assert!(module.contains("# Safety"), "{out}");
        let out = expand_str("symbol = \"f\", post_mut = g", "fn h(regs: &PtRegs) {}");
        assert!(out.contains(". pre (h) . post_mut (g)") && out.contains("pub unsafe fn register"), "{out}");
    }

    #[test]
    fn every_problem_is_reported_with_the_item() {
        let out = expand_str("function = f, symbol = \"f\", speed = 11", "async fn h(regs: &PtRegs) -> u8 { 0 }");
        assert_eq!(out.matches("compile_error").count(), 4, "{out}");
        assert!(out.contains("async fn h"), "the item is kept: {out}");
        assert!(!out.contains("mod h"), "{out}");
    }
}
