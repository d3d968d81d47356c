//! What a `#[traceable]` function's signature, as written, says of its ABI: how many
//! bytes of arguments may be on the stack ([`stack_args_bound`]), and whether any
//! FP/SIMD register can carry an argument or the result ([`no_fp`], held to the
//! primitives it took by [`primitives_check`]).

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::visit_mut::VisitMut;

/// Turns every lifetime into `'static`, for types named in a constant (their sizes do
/// not depend on lifetimes, and a constant cannot name the function's).
struct StaticLifetimes;

impl VisitMut for StaticLifetimes {
    fn visit_lifetime_mut(&mut self, l: &mut syn::Lifetime) {
        *l = syn::Lifetime::new("'static", l.apostrophe);
    }
}

/// An upper bound of the bytes of stack-passed arguments of a function taking
/// `inputs`, as a constant expression, or `None` if it cannot be a constant (the
/// function or its impl is generic).
///
/// - At most five arguments, each a scalar (`size == align <= 8`, or zero-sized): 0.
///   Each takes one register of its class (SysV AMD64 ABI 1.0 §3.2.3: INTEGER or SSE;
///   only a type with unaligned fields would be MEMORY, and a type whose alignment is
///   its size cannot have one: a packed type's alignment is below its unaligned
///   field's, whose size is at least its alignment), and five fit in the six integer
///   registers even when rdi carries a hidden result pointer; AAPCS64 has eight of each.
/// - Else every argument counted as if it were passed on the stack (each in
///   eightbytes, aligned to its own alignment if that is larger), whatever registers it
///   gets: reading a few bytes of the caller's frame too many is harmless, and the
///   bound needs no classification.
pub(super) fn stack_args_bound(
    sig: &syn::Signature,
    inputs: &syn::punctuated::Punctuated<syn::FnArg, syn::Token![,]>,
    concrete_impl: bool,
) -> Option<TokenStream> {
    let generic = sig.generics.params.iter().any(|p| !matches!(p, syn::GenericParam::Lifetime(_)));
    if generic || !concrete_impl {
        return None;
    }
    let types: Vec<syn::Type> = inputs
        .iter()
        .map(|input| {
            let mut ty = match input {
                syn::FnArg::Receiver(r) => (*r.ty).clone(),
                syn::FnArg::Typed(p) => (*p.ty).clone(),
            };
            StaticLifetimes.visit_type_mut(&mut ty);
            ty
        })
        .collect();
    let n = types.len();
    Some(quote! {
        {
            let args: [(usize, usize); #n] = [#((::core::mem::size_of::<#types>(), ::core::mem::align_of::<#types>())),*];
            let (mut i, mut scalars, mut all) = (0, true, 0usize);
            while i < args.len() {
                let (size, align) = args[i];
                scalars &= size == 0 || size == align && size <= 8;
                all += size.div_ceil(8) * 8 + if align > 8 { align - 8 } else { 0 };
                i += 1;
            }
            if scalars && args.len() <= 5 { 0 } else { all }
        }
    })
}

/// Whether no FP/SIMD register can carry an argument of `sig` or its return value
/// (probe-codegen `site::NO_FP`), judged from the types as written: every one is an
/// integer, `bool`, `char`, a pointer, a reference, a function pointer, `()` or `!`, or
/// a tuple or array of them (the C ABI gives such an aggregate the INTEGER class or
/// memory, SysV AMD64 ABI 1.0 §3.2.3, AAPCS64 §6.8.2). Anything else (a float, a
/// struct, a generic or an alias, which may hold one) says no. If yes, the primitive
/// names it took as the primitives, which [`primitives_check`] holds it to (a generic
/// parameter of the function with such a name says no).
pub(super) fn no_fp(sig: &syn::Signature) -> Option<Vec<syn::Ident>> {
    const PRIMITIVES: [&str; 14] = ["u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize", "bool", "char"];
    fn integer(ty: &syn::Type, names: &mut Vec<syn::Ident>) -> bool {
        match ty {
            syn::Type::Reference(_) | syn::Type::Ptr(_) | syn::Type::BareFn(_) | syn::Type::Never(_) => true,
            syn::Type::Tuple(t) => t.elems.iter().all(|t| integer(t, names)),
            syn::Type::Array(a) => integer(&a.elem, names),
            syn::Type::Paren(p) => integer(&p.elem, names),
            syn::Type::Group(g) => integer(&g.elem, names),
            syn::Type::Path(p) => match p.path.get_ident().filter(|i| p.qself.is_none() && PRIMITIVES.iter().any(|n| *i == n)) {
                Some(i) => {
                    if !names.contains(i) {
                        names.push(i.clone());
                    }
                    true
                }
                None => false,
            },
            _ => false,
        }
    }
    let shadowed = sig.generics.params.iter().any(|p| match p {
        syn::GenericParam::Type(t) => PRIMITIVES.iter().any(|n| t.ident == n),
        syn::GenericParam::Const(c) => PRIMITIVES.iter().any(|n| c.ident == n),
        syn::GenericParam::Lifetime(_) => false,
    });
    let mut names = Vec::new();
    let inputs = sig.inputs.iter().all(|input| match input {
        syn::FnArg::Receiver(r) => r.reference.is_some() || integer(&r.ty, &mut names),
        syn::FnArg::Typed(p) => integer(&p.ty, &mut names),
    });
    let output = match &sig.output {
        syn::ReturnType::Default => true,
        syn::ReturnType::Type(_, ty) => integer(ty, &mut names),
    };
    (!shadowed && inputs && output).then_some(names)
}

/// Items for the body's block that hold [`no_fp`]'s judgement to the primitives: each
/// name it took for one must be that primitive where the function is written (an
/// alias `type u64 = f64;` or an import under a primitive's name fails to compile
/// here, and so does an impl's generic parameter of that name: an item in a function
/// cannot use it), or the site's trampolines could leave a float argument to the
/// handler.
pub(super) fn primitives_check(names: &[syn::Ident]) -> Vec<syn::Stmt> {
    names
        .iter()
        .map(|n| {
            let check = format_ident!("__probekit_primitive_{}", n);
            // Spanned at the name, where an error then points.
            syn::parse_quote_spanned! {n.span()=>
                #[allow(dead_code, non_snake_case)]
                fn #check(x: #n) -> ::core::primitive::#n { x }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_integer_signatures_say_no_fp() {
        let no_fp = |sig: &str| super::no_fp(&syn::parse_str::<syn::Signature>(sig).unwrap()).is_some();
        for sig in [
            "fn f()",
            "fn f(a: u64, b: &[f64], c: *const f32, d: (u8, [i128; 2]), e: fn(f64) -> f64) -> usize",
            "fn f(&self, c: char, b: bool) -> &str",
            "fn f(&mut self) -> !",
        ] {
            assert!(no_fp(sig), "{sig}");
        }
        for sig in [
            "fn f(x: f64)",
            "fn f() -> f32",
            "fn f(p: (u64, f32))",
            "fn f(s: S)",
            "fn f<T>(t: T)",
            "fn f(self)",
            "fn f() -> Option<u8>",
            "fn f(x: core::primitive::u8)",
            "fn f<u64>(x: u64)",
        ] {
            assert!(!no_fp(sig), "{sig}");
        }
        // The names it took for primitives, which the body's block checks.
        let names = super::no_fp(&syn::parse_str::<syn::Signature>("fn f(a: u64, b: (u64, bool)) -> u64").unwrap()).unwrap();
        assert_eq!(names.iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["u64", "bool"]);
    }
}
