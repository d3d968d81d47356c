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
    krate: syn::Path,
}

fn parse_options(attr: TokenStream, errors: &mut Vec<syn::Error>) -> Options {
    let mut o = Options { function: None, symbol: None, offset: None, post: None, krate: syn::parse_quote!(::probekit) };
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("function") {
            o.function = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("symbol") {
            o.symbol = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("offset") {
            o.offset = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("post") {
            o.post = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("crate") {
            o.krate = meta.value()?.parse()?;
        } else {
            errors.push(meta.error("unknown option: must be `function = path`, `symbol = \"name\"`, `offset = N`, `post = path` or `crate = path`"));
            if meta.input.peek(syn::Token![=]) {
                let _: syn::Expr = meta.value()?.parse()?;
            }
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, attr) {
        errors.push(e);
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

/// Checks `fn h(regs: &mut PtRegs)`, one error per problem, each on its token.
fn check_signature(f: &syn::ItemFn, errors: &mut Vec<syn::Error>) {
    const SHAPE: &str = "`#[kprobe]` handler must have signature `fn(regs: &mut PtRegs)`";
    let s = &f.sig;
    crate::check_plain_fn(s, SHAPE, errors);
    let is_regs = |t: &syn::Type| match t {
        syn::Type::Reference(r) if r.mutability.is_some() => {
            matches!(&*r.elem, syn::Type::Path(p) if p.path.segments.last().is_some_and(|l| l.ident == "PtRegs"))
        }
        _ => false,
    };
    match s.inputs.len() {
        1 => {
            if let Some(syn::FnArg::Typed(p)) = s.inputs.first() {
                if !is_regs(&p.ty) {
                    errors.push(syn::Error::new(p.ty.span(), format!("{SHAPE}: its argument must be `&mut PtRegs`")));
                }
            } else if let Some(a) = s.inputs.first() {
                errors.push(syn::Error::new(a.span(), format!("{SHAPE}: it must not take `self`")));
            }
        }
        _ => errors
            .push(syn::Error::new(if s.inputs.is_empty() { s.ident.span() } else { s.inputs.span() }, format!("{SHAPE}: it must take exactly one argument"))),
    }
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
    check_signature(&f, &mut errors);
    if let Some(e) = errors.into_iter().reduce(|mut a, b| {
        a.combine(b);
        a
    }) {
        let e = e.to_compile_error();
        return quote! { #e #f };
    }
    let krate = &o.krate;
    let ident = &f.sig.ident;
    let target = match (&o.function, &o.symbol) {
        (Some(path), _) => quote_spanned! { path.span() => .address(#path as *const () as usize) },
        (_, Some(name)) => quote! { .symbol(#name) },
        _ => unreachable!("checked with the options"),
    };
    let offset = o.offset.as_ref().map(|n| quote! { .offset(#n) });
    let post = o.post.as_ref().map(|p| quote_spanned! { p.span() => .post(#p) });
    let result = quote! { ::core::result::Result<#krate::ProbeHandle, #krate::Error> };
    let body = quote! { #krate::Probe::builder() #target #offset .pre(#ident) #post .register() };
    crate::registration(&f, result, body, "probe", "breakpoint probe whose pre handler", "kprobe")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(attr: &str, item: &str) -> String {
        expand(attr.parse().unwrap(), item.parse().unwrap()).to_string()
    }

    #[test]
    fn the_chain_is_next_to_the_handler() {
        let out = expand_str("function = super::f, offset = 4, post = self::after", "fn h(regs: &mut PtRegs) {}");
        assert!(
            out.contains(
                "fn __probekit_register_h () -> __probekit_Result_h { :: probekit :: Probe :: builder () \
                 . address (super :: f as * const () as usize) . offset (4) . pre (h) . post (self :: after) . register () }"
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
        let out = expand_str("symbol = \"f\", crate = self::pk", "pub fn h(regs: &mut PtRegs) {}");
        assert!(out.contains("Result < self :: pk :: ProbeHandle , self :: pk :: Error >"), "{out}");
        assert!(out.contains("self :: pk :: Probe :: builder () . symbol (\"f\") . pre (h) . register ()"), "{out}");
        assert!(out.contains("pub mod h"), "{out}");
    }

    #[test]
    fn every_problem_is_reported_with_the_item() {
        let out = expand_str("function = f, symbol = \"f\", speed = 11", "async fn h(regs: &PtRegs) -> u8 { 0 }");
        assert_eq!(out.matches("compile_error").count(), 5, "{out}");
        assert!(out.contains("async fn h"), "the item is kept: {out}");
        assert!(!out.contains("mod h"), "{out}");
    }
}
