//! Frame layouts: which register lives at which offset of a `#[repr(C)]` struct.
//!
//! A [`FrameLayout`] is read from Rust source (a `syn::ItemStruct`, a file and a struct
//! name, or a built-in frame) for one [`Arch`]. Offsets follow the `#[repr(C)]` rules:
//! fields in declaration order, each at the next multiple of its alignment, the size
//! rounded up to the largest alignment. The layout is checked against the compiler's
//! own `offset_of!` by the assertions [`crate::render::RustItems`] emits.

use crate::arch::{Arch, Reg};
use std::fmt;

/// What a frame field holds when a handler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldValue {
    /// One register per 8-byte element, in element order.
    Regs(Vec<Reg>),
    /// A defined constant, repeated over every element: `orig_rax`/`orig_x0` hold
    /// `u64::MAX` (the kernel's "not in a system call"), reserved fields (`_name`,
    /// `#[reg(zero)]`) and fields bound only on another architecture hold 0.
    Const(u64),
}

/// One field of a frame struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The field's name.
    pub name: String,
    /// Byte offset from the start of the struct.
    pub offset: u64,
    /// Size in bytes of the whole field.
    pub size: u64,
    /// Size in bytes of one element (the field's size unless it is an array).
    pub elem_size: u64,
    /// Number of elements if the field is an array.
    pub len: Option<u64>,
    /// What the trampoline writes into it.
    pub value: FieldValue,
}

impl Field {
    /// The name of element `i` as the listing and the C header spell it (`regs[3]` or `rax`).
    pub fn elem_name(&self, i: usize) -> String {
        match self.len {
            Some(_) => format!("{}[{}]", self.name, i),
            None => self.name.clone(),
        }
    }

    /// The name of the field's offset constant in every output: `S_` and the field's
    /// name in upper case (`S_PSTATE`, `S_REGS`, `S__RESERVED`; a raw identifier
    /// `r#type` gives `S_TYPE`). See [`crate::render::names`] for the whole scheme.
    pub fn const_name(&self) -> String {
        const_name(&self.name)
    }
}

/// The layout of a frame struct for one architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameLayout {
    /// The struct's name.
    pub name: String,
    /// The architecture whose register bindings the fields carry.
    pub arch: Arch,
    /// `size_of` the struct.
    pub size: u64,
    /// `align_of` the struct.
    pub align: u64,
    /// Fields in declaration (= memory) order.
    pub fields: Vec<Field>,
}

/// Where in the struct's source an error is, so a proc macro can put it under the right token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spot {
    /// The struct as a whole (its name).
    Struct,
    /// The `#[repr(...)]` attribute, or the struct if it has none.
    Repr,
    /// The generic parameters.
    Generics,
    /// Field number `n`: its `#[reg(...)]` binding if it has one, else its name.
    Field(usize),
    /// The name of field number `n`, however it is bound.
    FieldName(usize),
    /// The type of field number `n`.
    FieldType(usize),
    /// The `#[reg(...)]` attribute of field number `n`.
    RegAttr(usize),
}

/// Why a struct cannot be used as a frame. Every variant names the struct (`frame`)
/// and, where there is one, the field (`field`, with its number `index`).
#[allow(missing_docs)] // the fields are named for what they hold, as documented above
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The struct is not `#[repr(C)]`, so its field order is not its memory order.
    NotReprC { frame: String },
    /// `#[repr(packed)]`: registers would be stored unaligned.
    Packed { frame: String },
    /// `#[repr(align(N))]` above 16: the trampolines align the frame to 16, the stack's alignment.
    OverAligned { frame: String, align: u64 },
    /// Generic parameters: the layout would depend on them.
    Generic { frame: String },
    /// A tuple or unit struct: fields must be named so they can bind registers.
    NotNamedFields { frame: String },
    /// The field's name or `#[reg]` names no register of the architecture.
    UnknownRegister { frame: String, field: String, register: String, arch: Arch, index: usize },
    /// Two fields (or two elements) bind the same register.
    RegisterBoundTwice { frame: String, field: String, register: Reg, first: String, index: usize },
    /// The field (or its element) is smaller than the register stored in it.
    FieldTooSmall { frame: String, field: String, register: Reg, size: u64, needed: u64, index: usize },
    /// The field (or its element) is larger than the register, so part of it would be undefined.
    FieldTooLarge { frame: String, field: String, register: Reg, size: u64, index: usize },
    /// An array field's length does not match the register range it binds.
    ArrayLength { frame: String, field: String, len: u64, expected: String, index: usize },
    /// The field's type has no layout probe-codegen can know (only integers, floats and arrays of them).
    UnknownLayout { frame: String, field: String, ty: String, index: usize },
    /// A `#[reg(...)]` attribute probe-codegen cannot read.
    BadAttribute { frame: String, field: String, message: String, index: usize },
    /// The field's offset constant (`S_<FIELD>`) would have the name of another
    /// field's constant (`rax` and `RAX`) or of a constant the generator reserves
    /// (`S_FRAME_SIZE`, `S_ALLOC_<SHAPE>`, `S_FPSIMD_<SHAPE>`).
    NameClash { frame: String, field: String, name: String, with: String, index: usize },
    /// The source has no struct of that name.
    StructNotFound { name: String },
    /// The source is not valid Rust.
    Parse { message: String, line: usize, column: usize },
}

impl FrameError {
    /// Where in the struct the error is.
    pub fn spot(&self) -> Spot {
        use FrameError::*;
        match self {
            NotReprC { .. } | Packed { .. } | OverAligned { .. } => Spot::Repr,
            Generic { .. } => Spot::Generics,
            NotNamedFields { .. } | StructNotFound { .. } | Parse { .. } => Spot::Struct,
            UnknownRegister { index, .. } | RegisterBoundTwice { index, .. } | ArrayLength { index, .. } => Spot::Field(*index),
            NameClash { index, .. } => Spot::FieldName(*index),
            BadAttribute { index, .. } => Spot::RegAttr(*index),
            FieldTooSmall { index, .. } | FieldTooLarge { index, .. } | UnknownLayout { index, .. } => Spot::FieldType(*index),
        }
    }

    /// The field the error is about, if it is about one.
    pub fn field(&self) -> Option<&str> {
        use FrameError::*;
        match self {
            UnknownRegister { field, .. }
            | RegisterBoundTwice { field, .. }
            | FieldTooSmall { field, .. }
            | FieldTooLarge { field, .. }
            | ArrayLength { field, .. }
            | UnknownLayout { field, .. }
            | BadAttribute { field, .. }
            | NameClash { field, .. } => Some(field),
            _ => None,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FrameError::*;
        match self {
            NotReprC { frame } => write!(f, "frame `{frame}` must be `#[repr(C)]`: its field order must be its memory order"),
            Packed { frame } => write!(f, "frame `{frame}` must not be `#[repr(packed)]`: registers are stored aligned"),
            OverAligned { frame, align } => {
                write!(f, "frame `{frame}` must be aligned to at most 16 bytes (it is {align}): it lives on the stack, which is 16-aligned")
            }
            Generic { frame } => write!(f, "frame `{frame}` must not be generic: its layout must be known"),
            NotNamedFields { frame } => write!(f, "frame `{frame}` must have named fields: `struct {frame} {{ rax: u64, .. }}`"),
            UnknownRegister { frame, field, register, arch, .. } => write!(
                f,
                "field `{frame}.{field}`: `{register}` is not an {arch} register; name the field after one \
                 (e.g. `{}`), bind it with `#[reg(...)]`, or start its name with `_` to reserve it (zeroed)",
                if *arch == Arch::X86_64 { "rax" } else { "x0" }
            ),
            RegisterBoundTwice { frame, field, register, first, .. } => {
                write!(f, "field `{frame}.{field}`: register `{register}` is already bound to field `{first}`; each register must be bound once")
            }
            FieldTooSmall { frame, field, register, size, needed, .. } => {
                write!(f, "field `{frame}.{field}` is {size} byte(s) but register `{register}` needs {needed}: it must be `u64`")
            }
            FieldTooLarge { frame, field, register, size, .. } => {
                write!(f, "field `{frame}.{field}` is {size} bytes but register `{register}` has 8: it must be `u64`")
            }
            ArrayLength { frame, field, len, expected, .. } => write!(f, "field `{frame}.{field}`: array of {len} does not fit the register range: {expected}"),
            UnknownLayout { frame, field, ty, .. } => write!(
                f,
                "field `{frame}.{field}`: the layout of `{ty}` cannot be known; fields must be integers, \
                 floats or arrays of them (`u64`, `[u64; 8]`)"
            ),
            BadAttribute { frame, field, message, .. } => write!(f, "field `{frame}.{field}`: {message}"),
            NameClash { frame, field, name, with, .. } => {
                write!(f, "field `{frame}.{field}`: its offset constant would be `{name}`, the name of {with}; the field must be renamed")
            }
            StructNotFound { name } => write!(f, "no struct named `{name}` in the frame source"),
            Parse { message, line, column } => write!(f, "{line}:{column}: cannot parse frame source: {message}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// A field's register binding before it is checked against the field's type.
#[derive(Clone, Debug)]
enum Binding {
    /// Registers starting at `start`; `count` when the attribute spelled a range.
    Regs {
        start: Reg,
        count: Option<usize>,
    },
    Const(u64),
}

impl FrameLayout {
    /// Reads the layout of `item` for `arch`, collecting every error (each names its field).
    pub fn from_item(item: &syn::ItemStruct, arch: Arch) -> Result<FrameLayout, Vec<FrameError>> {
        let frame = item.ident.to_string();
        let mut errors = Vec::new();

        let (mut repr_c, mut packed, mut repr_align) = (false, false, 1u64);
        for attr in item.attrs.iter().filter(|a| a.path().is_ident("repr")) {
            let _ = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("C") {
                    repr_c = true;
                } else if meta.path.is_ident("packed") {
                    packed = true;
                    if meta.input.peek(syn::token::Paren) {
                        let _ = meta.input.parse::<proc_macro2::Group>();
                    }
                } else if meta.path.is_ident("align") {
                    let content;
                    syn::parenthesized!(content in meta.input);
                    let lit: syn::LitInt = content.parse()?;
                    repr_align = repr_align.max(lit.base10_parse()?);
                }
                Ok(())
            });
        }
        if !repr_c {
            errors.push(FrameError::NotReprC { frame: frame.clone() });
        }
        if packed {
            errors.push(FrameError::Packed { frame: frame.clone() });
        }
        if repr_align > 16 {
            errors.push(FrameError::OverAligned { frame: frame.clone(), align: repr_align });
        }
        if !item.generics.params.is_empty() {
            errors.push(FrameError::Generic { frame: frame.clone() });
        }
        let syn::Fields::Named(named) = &item.fields else {
            errors.push(FrameError::NotNamedFields { frame });
            return Err(errors);
        };

        let mut fields = Vec::new();
        let (mut offset, mut align) = (0u64, repr_align);
        let mut bound: Vec<(Reg, String)> = Vec::new();
        for (index, f) in named.named.iter().enumerate() {
            let name = f.ident.as_ref().map(|i| i.to_string()).unwrap_or_default();
            let ty = match type_layout(&f.ty) {
                Some(t) => t,
                None => {
                    errors.push(FrameError::UnknownLayout { frame: frame.clone(), field: name, ty: type_text(&f.ty), index });
                    continue;
                }
            };
            offset = offset.next_multiple_of(ty.align);
            align = align.max(ty.align);
            let field_offset = offset;
            offset += ty.size;

            let binding = match field_binding(f, &name, arch) {
                Ok(b) => b,
                Err(AttrError::Bad(message)) => {
                    errors.push(FrameError::BadAttribute { frame: frame.clone(), field: name, message, index });
                    continue;
                }
                Err(AttrError::Unknown(register)) => {
                    errors.push(FrameError::UnknownRegister { frame: frame.clone(), register, field: name, arch, index });
                    continue;
                }
            };
            let elems = ty.len.unwrap_or(1);
            if elems == 0 && matches!(binding, Binding::Regs { .. }) {
                errors.push(FrameError::ArrayLength {
                    frame: frame.clone(),
                    field: name,
                    len: 0,
                    expected: "an array binding registers must have at least one element".into(),
                    index,
                });
                continue;
            }
            let value = match binding {
                Binding::Const(v) => FieldValue::Const(v),
                Binding::Regs { start, count } => {
                    if let Some(count) = count {
                        if count as u64 != elems || (ty.len.is_none() && count != 1) {
                            errors.push(FrameError::ArrayLength {
                                frame: frame.clone(),
                                field: name,
                                len: elems,
                                expected: format!("the range starting at `{start}` has {count} register(s), so the field must be `[u64; {count}]`"),
                                index,
                            });
                            continue;
                        }
                    }
                    let regs: Option<Vec<Reg>> = (0..elems as usize).map(|i| start.nth_after(i)).collect();
                    let Some(regs) = regs else {
                        let last = (0..).map_while(|i| start.nth_after(i)).last().unwrap_or(start);
                        errors.push(FrameError::ArrayLength {
                            frame: frame.clone(),
                            field: name,
                            len: elems,
                            expected: format!("`{start}`..=`{last}` has only {} register(s)", count_range(start, last)),
                            index,
                        });
                        continue;
                    };
                    let reg = regs[0];
                    if ty.elem_size < reg.size() {
                        errors.push(FrameError::FieldTooSmall {
                            frame: frame.clone(),
                            field: name,
                            register: reg,
                            size: ty.elem_size,
                            needed: reg.size(),
                            index,
                        });
                        continue;
                    }
                    if ty.elem_size > reg.size() {
                        errors.push(FrameError::FieldTooLarge { frame: frame.clone(), field: name, register: reg, size: ty.elem_size, index });
                        continue;
                    }
                    let mut twice = false;
                    for (i, &r) in regs.iter().enumerate() {
                        let elem = if ty.len.is_some() { format!("{name}[{i}]") } else { name.clone() };
                        if let Some((_, first)) = bound.iter().find(|(b, _)| *b == r) {
                            errors.push(FrameError::RegisterBoundTwice { frame: frame.clone(), field: elem, register: r, first: first.clone(), index });
                            twice = true;
                            break;
                        }
                        bound.push((r, elem));
                    }
                    if twice {
                        continue;
                    }
                    FieldValue::Regs(regs)
                }
            };
            fields.push(Field { name, offset: field_offset, size: ty.size, elem_size: ty.elem_size, len: ty.len, value });
        }
        errors.extend(name_clashes(&frame, named));
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(FrameLayout { name: item.ident.to_string(), arch, size: offset.next_multiple_of(align), align, fields })
    }

    /// Reads the layout of struct `name` from Rust source text (a whole file).
    pub fn from_source(source: &str, name: &str, arch: Arch) -> Result<FrameLayout, Vec<FrameError>> {
        let file = syn::parse_file(source).map_err(|e| {
            let start = e.span().start();
            vec![FrameError::Parse { message: e.to_string(), line: start.line, column: start.column + 1 }]
        })?;
        let item = file
            .items
            .iter()
            .find_map(|i| match i {
                syn::Item::Struct(s) if s.ident == name => Some(s),
                _ => None,
            })
            .ok_or_else(|| vec![FrameError::StructNotFound { name: name.to_string() }])?;
        FrameLayout::from_item(item, arch)
    }

    /// The built-in frame of `arch`: Linux `pt_regs` (x86_64) or `user_pt_regs` (aarch64),
    /// parsed from the same file probe-rt compiles as its `PtRegs`.
    pub fn builtin(arch: Arch) -> FrameLayout {
        FrameLayout::from_source(crate::builtin_source(arch), "PtRegs", arch).expect("the built-in frames are valid (checked by this crate's tests)")
    }

    /// The field holding `reg`, with the element index, if any.
    pub fn field_of(&self, reg: Reg) -> Option<(&Field, usize)> {
        self.fields.iter().find_map(|f| match &f.value {
            FieldValue::Regs(regs) => regs.iter().position(|r| *r == reg).map(|i| (f, i)),
            FieldValue::Const(_) => None,
        })
    }

    /// Offset of the element holding `reg`, if a field holds it.
    pub fn offset_of(&self, reg: Reg) -> Option<u64> {
        self.field_of(reg).map(|(f, i)| f.offset + i as u64 * f.elem_size)
    }
}

/// See [`Field::const_name`].
fn const_name(field: &str) -> String {
    format!("S_{}", field.strip_prefix("r#").unwrap_or(field).to_uppercase())
}

/// Fields whose offset constant would clash with another field's or a reserved name
/// (`S_FRAME_SIZE`, and the per-routine `S_ALLOC_<SHAPE>` and `S_FPSIMD_<SHAPE>`): the
/// outputs would define one name twice, which the C preprocessor, the assembler and
/// rustc would each report differently, far from the field.
fn name_clashes(frame: &str, named: &syn::FieldsNamed) -> Vec<FrameError> {
    let mut reserved = vec![("S_FRAME_SIZE".to_string(), "the frame's size constant".to_string())];
    for shape in crate::options::Shape::ALL {
        let sfx = shape.const_suffix();
        reserved.push((format!("S_ALLOC_{sfx}"), format!("the `{shape}` routine's allocation constant")));
        reserved.push((format!("S_FPSIMD_{sfx}"), format!("the `{shape}` routine's FP/SIMD area constant")));
    }
    let mut errors = Vec::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    for (index, f) in named.named.iter().enumerate() {
        let Some(ident) = &f.ident else { continue };
        let field = ident.to_string();
        let name = const_name(&field);
        let with = reserved
            .iter()
            .find(|(r, _)| *r == name)
            .map(|(_, what)| what.clone())
            .or_else(|| seen.iter().find(|(n, _)| *n == name).map(|(_, other)| format!("field `{other}`'s constant")));
        match with {
            Some(with) => errors.push(FrameError::NameClash { frame: frame.to_string(), field, name, with, index }),
            None => seen.push((name, field)),
        }
    }
    errors
}

fn count_range(start: Reg, last: Reg) -> usize {
    (0..).map_while(|i| start.nth_after(i)).take_while(|r| *r <= last).count()
}

/// Size, alignment and array shape of a field type.
struct TypeLayout {
    size: u64,
    align: u64,
    elem_size: u64,
    len: Option<u64>,
}

/// The layout of the types a frame may use: primitive integers and floats (sizes and
/// alignments as on x86_64 and aarch64 Linux, identical for these types) and arrays of
/// them. Anything else is refused rather than guessed.
fn type_layout(ty: &syn::Type) -> Option<TypeLayout> {
    match ty {
        syn::Type::Path(p) if p.qself.is_none() => {
            let ident = &p.path.segments.last()?.ident;
            // Accept `u64`, `core::primitive::u64`, `std::primitive::u64`.
            if p.path.segments.len() > 1 {
                let first = p.path.segments.first()?.ident.to_string();
                if !(p.path.segments.len() == 3 && (first == "core" || first == "std")) || p.path.segments[1].ident != "primitive" {
                    return None;
                }
            }
            let size = match ident.to_string().as_str() {
                // No `bool`: a register or constant written into it could be an invalid bool.
                "u8" | "i8" => 1,
                "u16" | "i16" => 2,
                "u32" | "i32" | "f32" => 4,
                "u64" | "i64" | "f64" | "usize" | "isize" => 8,
                "u128" | "i128" => 16,
                _ => return None,
            };
            Some(TypeLayout { size, align: size, elem_size: size, len: None })
        }
        syn::Type::Array(a) => {
            let elem = type_layout(&a.elem)?;
            let len = match &a.len {
                syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Int(i), .. }) => i.base10_parse::<u64>().ok()?,
                _ => return None,
            };
            // Arrays of arrays store registers per innermost element only if flat; keep it simple.
            if elem.len.is_some() {
                return None;
            }
            Some(TypeLayout { size: elem.size * len, align: elem.align, elem_size: elem.size, len: Some(len) })
        }
        syn::Type::Paren(p) => type_layout(&p.elem),
        _ => None,
    }
}

fn type_text(ty: &syn::Type) -> String {
    quote::ToTokens::to_token_stream(ty).to_string()
}

/// Why a field's binding could not be read.
enum AttrError {
    /// A name that is no register of the architecture.
    Unknown(String),
    /// A malformed `#[reg(...)]`.
    Bad(String),
}

impl From<String> for AttrError {
    fn from(s: String) -> Self {
        AttrError::Bad(s)
    }
}

/// The binding of a field: its `#[reg(...)]` attribute or, without one, its name.
fn field_binding(f: &syn::Field, name: &str, arch: Arch) -> Result<Binding, AttrError> {
    let mut attrs = f.attrs.iter().filter(|a| a.path().is_ident("reg"));
    let Some(attr) = attrs.next() else {
        return binding_by_name(name, arch).ok_or_else(|| AttrError::Unknown(name.to_string()));
    };
    if attrs.next().is_some() {
        return Err(AttrError::Bad("must have at most one `#[reg(...)]` attribute".into()));
    }
    match reg_attr_spec(attr, arch)? {
        // Bound on another architecture only: defined as zero here.
        None => Ok(Binding::Const(0)),
        Some(s) => parse_spec(&s, arch),
    }
}

/// Default bindings by field name.
fn binding_by_name(name: &str, arch: Arch) -> Option<Binding> {
    if let Some(start) = Reg::from_name(arch, name) {
        return Some(Binding::Regs { start, count: None });
    }
    match (arch, name) {
        (Arch::Aarch64, "regs") => Some(Binding::Regs { start: Reg::A64X(0), count: None }),
        (Arch::X86_64, "orig_rax") | (Arch::Aarch64, "orig_x0") => Some(Binding::Const(u64::MAX)),
        _ if name.starts_with('_') => Some(Binding::Const(0)),
        _ => None,
    }
}

/// Reads `#[reg(...)]`: `reg(rax)`, `reg("rax")`, `reg(x0..=x7)`, `reg(zero)`,
/// `reg(x86_64 = "rax", aarch64 = "x0")`. Returns the spec text for `arch`, or `None`
/// when the attribute binds other architectures only.
fn reg_attr_spec(attr: &syn::Attribute, arch: Arch) -> Result<Option<String>, String> {
    const SHAPE: &str = "`#[reg(...)]` must name a register: `#[reg(rax)]`, `#[reg(x0..=x7)]`, \
                         `#[reg(zero)]` or `#[reg(x86_64 = \"rax\", aarch64 = \"x0\")]`";
    let list = attr.meta.require_list().map_err(|_| SHAPE.to_string())?;
    let tokens = list.tokens.clone();
    // Per-arch form: a comma-separated list of `arch = "spec"`.
    if let Ok(pairs) = syn::parse::Parser::parse2(syn::punctuated::Punctuated::<syn::MetaNameValue, syn::Token![,]>::parse_terminated, tokens.clone()) {
        if !pairs.is_empty() {
            let mut found = None;
            for p in &pairs {
                let key = p.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
                if Arch::from_name(&key).is_none() {
                    return Err(format!("`{key}` is not an architecture: per-arch bindings must be `x86_64 = \"...\"` or `aarch64 = \"...\"`"));
                }
                let syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(s), .. }) = &p.value else {
                    return Err(format!("`{key} = ...` must be a string: `{key} = \"...\"`"));
                };
                if key == arch.name() {
                    found = Some(s.value());
                }
            }
            return Ok(found);
        }
    }
    if let Ok(s) = syn::parse2::<syn::LitStr>(tokens.clone()) {
        return Ok(Some(s.value()));
    }
    let text = tokens.to_string().replace(' ', "");
    if text.is_empty() {
        return Err(SHAPE.into());
    }
    Ok(Some(text))
}

/// Parses a binding spec: `rax`, `x0..=x7`, `x0..x8`, `zero`.
fn parse_spec(spec: &str, arch: Arch) -> Result<Binding, AttrError> {
    let spec = spec.replace(' ', "");
    if spec == "zero" {
        return Ok(Binding::Const(0));
    }
    let unknown = |r: &str| AttrError::Unknown(r.to_string());
    if let Some((a, b)) = spec.split_once("..") {
        let (b, inclusive) = match b.strip_prefix('=') {
            Some(b) => (b, true),
            None => (b, false),
        };
        let start = Reg::from_name(arch, a).ok_or_else(|| unknown(a))?;
        let end = Reg::from_name(arch, b).ok_or_else(|| unknown(b))?;
        let n = (0..)
            .map_while(|i| start.nth_after(i))
            .position(|r| r == end)
            .ok_or_else(|| AttrError::Bad(format!("`{a}..{}{b}` must be an ascending range of numbered registers", if inclusive { "=" } else { "" })))?;
        let count = if inclusive { n + 1 } else { n };
        if count == 0 {
            return Err(AttrError::Bad(format!("`{spec}` is an empty register range")));
        }
        return Ok(Binding::Regs { start, count: Some(count) });
    }
    let start = Reg::from_name(arch, &spec).ok_or_else(|| unknown(&spec))?;
    Ok(Binding::Regs { start, count: None })
}
