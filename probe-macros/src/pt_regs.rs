//! `#[pt_regs]`: frame declaration, offsets, assertions and routines.

use probe_codegen::render::{self, Place, Routine, RoutineAsm, RustItems};
use probe_codegen::{Arch, Fp, FrameError, FrameLayout, Plan, Policy, Shape, Spot};
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use std::sync::atomic::{AtomicUsize, Ordering};
use syn::spanned::Spanned;

/// The macro's options.
struct Options {
    shapes: Vec<(Shape, Span)>,
    policy: Policy,
    fp: Fp,
    handler: Option<syn::Path>,
    krate: syn::Path,
}

fn parse_options(attr: TokenStream) -> Result<Options, syn::Error> {
    let mut o = Options { shapes: Vec::new(), policy: Policy::All, fp: Fp::None, handler: None, krate: syn::parse_quote!(::probekit) };
    let mut errors: Option<syn::Error> = None;
    let mut push = |e: syn::Error| match &mut errors {
        Some(all) => all.combine(e),
        None => errors = Some(e),
    };
    let parser = syn::meta::parser(|meta| {
        let value_ident = |meta: &syn::meta::ParseNestedMeta| -> syn::Result<syn::Ident> { meta.value()?.parse() };
        if meta.path.is_ident("shapes") {
            meta.parse_nested_meta(|m| {
                let name = m.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
                match Shape::ALL.iter().find(|s| s.name().replace('-', "_") == name) {
                    Some(s) => o.shapes.push((*s, m.path.span())),
                    None => push(syn::Error::new(m.path.span(), "unknown shape: must be one of `save_restore`, `kretprobe`, `entry`, `site`")),
                }
                Ok(())
            })
        } else if meta.path.is_ident("policy") {
            let v = value_ident(&meta)?;
            match v.to_string().as_str() {
                "all" => o.policy = Policy::All,
                "caller_saved" => o.policy = Policy::CallerSaved,
                _ => push(syn::Error::new(v.span(), "unknown policy: must be `all` or `caller_saved`")),
            }
            Ok(())
        } else if meta.path.is_ident("fp") {
            // `return` is a keyword: accept it through Ident::parse_any.
            let v: syn::Ident = syn::ext::IdentExt::parse_any(meta.value()?)?;
            match Fp::ALL.iter().find(|f| v == f.name().replace('-', "_")) {
                Some(f) => o.fp = *f,
                None => push(syn::Error::new(
                    v.span(),
                    "unknown fp mode: must be `none`, `args`, `return`, `args_wide`, `return_wide`, `full`, `full_compact`, `full_in_use` or `sse`",
                )),
            }
            Ok(())
        } else if meta.path.is_ident("handler") {
            o.handler = Some(meta.value()?.parse()?);
            Ok(())
        } else if meta.path.is_ident("crate") {
            o.krate = meta.value()?.parse()?;
            Ok(())
        } else {
            push(meta.error("unknown option: must be `shapes(...)`, `policy = ...`, `fp = ...`, `handler = path` or `crate = path`"));
            // Skip the option's value, if any, to go on to the next one.
            if meta.input.peek(syn::Token![=]) {
                let _: syn::Expr = meta.value()?.parse()?;
            } else if meta.input.peek(syn::token::Paren) {
                let _: proc_macro2::Group = meta.input.parse()?;
            }
            Ok(())
        }
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, attr) {
        push(e);
    }
    if !o.shapes.is_empty() && o.handler.is_none() {
        push(syn::Error::new(
            o.shapes[0].1,
            "`shapes(...)` needs `handler = path`: the function each routine calls, \
             `unsafe extern \"C\" fn(*mut Frame, *mut u8) -> usize`",
        ));
    }
    match errors {
        Some(e) => Err(e),
        None => Ok(o),
    }
}

/// The first token inside `#[reg(...)]` of field `i`, if it has one: where a wrong
/// binding was written.
fn reg_attr_span(item: &syn::ItemStruct, i: usize) -> Option<Span> {
    let syn::Fields::Named(n) = &item.fields else { return None };
    let attr = n.named.iter().nth(i)?.attrs.iter().find(|a| a.path().is_ident("reg"))?;
    match &attr.meta {
        syn::Meta::List(l) => l.tokens.clone().into_iter().next().map(|t| t.span()).or(Some(l.path.span())),
        m => Some(m.path().span()),
    }
}

/// The token a layout error belongs under.
fn spot_span(item: &syn::ItemStruct, e: &FrameError) -> Span {
    let field = |i: usize| match &item.fields {
        syn::Fields::Named(n) => n.named.iter().nth(i),
        _ => None,
    };
    match e.spot() {
        Spot::Struct => item.ident.span(),
        // `packed` itself, else the struct's name.
        Spot::Repr => item
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("repr"))
            .filter_map(|a| a.meta.require_list().ok())
            .flat_map(|l| l.tokens.clone())
            .find(|t| matches!(e, FrameError::Packed { .. }) && t.to_string() == "packed")
            .map(|t| t.span())
            .unwrap_or(item.ident.span()),
        // A binding written in `#[reg(...)]` is wrong where it was written.
        Spot::Field(i) if reg_attr_span(item, i).is_some() => reg_attr_span(item, i).unwrap_or(item.ident.span()),
        Spot::Generics => item.generics.span(),
        Spot::Field(i) | Spot::FieldName(i) => field(i).and_then(|f| f.ident.as_ref()).map(|i| i.span()).unwrap_or(item.ident.span()),
        Spot::FieldType(i) => field(i).map(|f| f.ty.span()).unwrap_or(item.ident.span()),
        Spot::RegAttr(i) => reg_attr_span(item, i).unwrap_or(item.ident.span()),
    }
}

/// Whether an error is the same on every architecture (it is then reported once).
fn arch_independent(e: &FrameError) -> bool {
    matches!(
        e,
        FrameError::NotReprC { .. }
            | FrameError::Packed { .. }
            | FrameError::OverAligned { .. }
            | FrameError::Generic { .. }
            | FrameError::NotNamedFields { .. }
            | FrameError::UnknownLayout { .. }
            | FrameError::NameClash { .. }
    )
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A symbol unique in the link: crate, type, shape, and a per-compilation counter
/// (a crate is compiled by one process, which runs every expansion of this macro).
fn symbol(item: &syn::ItemStruct, shape: Shape) -> String {
    let krate = std::env::var("CARGO_CRATE_NAME").unwrap_or_else(|_| "crate".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("__probekit_{krate}_{}_{}_{n}", item.ident, shape.name().replace('-', "_"))
}

pub fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut item: syn::ItemStruct = match syn::parse2(item.clone()) {
        Ok(i) => i,
        Err(_) => {
            let span = item.clone().into_iter().next().map(|t| t.span()).unwrap_or_else(Span::call_site);
            let e = syn::Error::new(span, "`#[pt_regs]` must be on a struct: `#[repr(C)] struct Frame { rax: u64, .. }`").to_compile_error();
            return quote! { #e #item };
        }
    };
    let options = parse_options(attr);
    let layouts: Vec<(Arch, Result<FrameLayout, Vec<FrameError>>)> = Arch::ALL.iter().map(|&a| (a, FrameLayout::from_item(&item, a))).collect();

    // Errors: arch-independent ones once, the others under their architecture's cfg.
    let mut errors = TokenStream::new();
    let mut seen = Vec::new();
    for (arch, layout) in &layouts {
        if let Err(list) = layout {
            for e in list {
                let msg = e.to_string();
                let err = syn::Error::new(spot_span(&item, e), &msg).to_compile_error();
                if arch_independent(e) {
                    if !seen.contains(&msg) {
                        seen.push(msg);
                        errors.extend(err);
                    }
                } else {
                    let a = arch.name();
                    errors.extend(quote! { #[cfg(target_arch = #a)] #err });
                }
            }
        }
    }
    let options = match options {
        Ok(o) => Some(o),
        Err(e) => {
            errors.extend(e.to_compile_error());
            None
        }
    };

    // The struct itself, without the `#[reg]` helper attributes.
    if let syn::Fields::Named(named) = &mut item.fields {
        for f in named.named.iter_mut() {
            f.attrs.retain(|a| !a.path().is_ident("reg"));
        }
    }
    let independent_failed = layouts.iter().any(|(_, l)| matches!(l, Err(v) if v.iter().any(arch_independent)));
    let Some(options) = options.filter(|_| !independent_failed) else {
        return quote! { #errors #item };
    };
    let krate = &options.krate;
    let ident = &item.ident;
    let name = ident.to_string();

    // The items come from probe-codegen's one renderer (the Builder, the CLI and
    // probe-rt's build script use it too): offsets, `Frame` impl, assertions naming the
    // field, and per architecture the element names and the routines.
    let k = krate.to_token_stream().to_string();
    let symbols = options.handler.as_ref().map(|h| render::Symbols {
        handler: h.to_token_stream().to_string(),
        xsave_size: format!("{k}::__private::XSAVE_SIZE"),
        xsave_mask: format!("{k}::__private::XSAVE_MASK"),
        wide_mode: format!("{k}::__private::WIDE_MODE"),
    });
    let mut plans: Vec<(&FrameLayout, Vec<(Plan, String)>)> = Vec::new();
    let mut plan_errors = TokenStream::new();
    for (arch, layout) in &layouts {
        let Ok(layout) = layout else { continue };
        let mut routines = Vec::new();
        for (shape, shape_span) in &options.shapes {
            match Plan::new(layout, options.policy, options.fp, *shape) {
                Ok(p) => routines.push((p, symbol(&item, *shape))),
                Err(e) => {
                    let (a, err) = (arch.name(), syn::Error::new(*shape_span, e.to_string()).to_compile_error());
                    plan_errors.extend(quote! { #[cfg(target_arch = #a)] #err });
                }
            }
        }
        plans.push((layout, routines));
    }
    let mut items = RustItems::new(&name).place(Place::Type).krate(&k);
    for (layout, routines) in &plans {
        let routines =
            routines.iter().filter_map(|(plan, sym)| Some(Routine { plan, symbol: sym.clone(), asm: RoutineAsm::Inline(symbols.clone()?) })).collect();
        items = items.arch(layout, routines);
    }
    let text = items.render();
    let generated: TokenStream = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("probekit bug: `#[pt_regs]` generated text rustc cannot read ({e}); please report it");
            syn::Error::new(item.ident.span(), msg).to_compile_error()
        }
    };

    // The handler's type, checked where the user wrote it.
    let handler_check = options.handler.as_ref().map(|handler| {
        quote_spanned! { handler.span() =>
            const _: unsafe extern "C" fn(*mut #ident, *mut u8) -> usize = #handler;
        }
    });

    quote! {
        #errors
        #plan_errors
        #item
        #handler_check
        #generated
    }
}
