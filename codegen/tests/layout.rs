//! Frame layouts: `#[repr(C)]` offsets, bindings by name and `#[reg]`, and one typed
//! error per way a struct can be wrong, each naming its field.

use probe_codegen::{Arch, FieldValue, FrameError, FrameLayout, Reg, Spot};

fn parse(src: &str, arch: Arch) -> Result<FrameLayout, Vec<FrameError>> {
    let item: syn::ItemStruct = syn::parse_str(src).unwrap();
    FrameLayout::from_item(&item, arch)
}

fn errors(src: &str, arch: Arch) -> Vec<FrameError> {
    parse(src, arch).expect_err("must be refused")
}

#[test]
fn repr_c_offsets_with_padding_and_arrays() {
    let f = parse("#[repr(C)] struct F { _a: u8, rax: u64, _b: u16, _c: [u32; 3], rbx: u64, _d: u8 }", Arch::X86_64).unwrap();
    let offs: Vec<u64> = f.fields.iter().map(|x| x.offset).collect();
    assert_eq!(offs, [0, 8, 16, 20, 32, 40]);
    assert_eq!((f.size, f.align), (48, 8));
    let f = parse("#[repr(C, align(16))] struct F { x0: u64 }", Arch::Aarch64).unwrap();
    assert_eq!((f.size, f.align), (16, 16));
    // The stack is 16-aligned: a frame cannot promise more.
    let e = errors("#[repr(C, align(64))] struct F { x0: u64 }", Arch::Aarch64);
    assert!(matches!(&e[..], [FrameError::OverAligned { align: 64, .. }]), "{e:?}");
}

#[test]
fn bindings() {
    let f = parse(
        "#[repr(C)] struct F { regs: [u64; 4], #[reg(x19..=x21)] saved: [u64; 3], #[reg(lr)] link: u64, \
         #[reg(\"x8\")] r: u64, #[reg(x86_64 = \"rax\", aarch64 = \"x9\")] both: u64, \
         #[reg(x86_64 = \"rbx\")] only_x86: u64, #[reg(zero)] z: u64, orig_x0: u64, _r: u32 }",
        Arch::Aarch64,
    )
    .unwrap();
    let v = |n: &str| f.fields.iter().find(|x| x.name == n).unwrap().value.clone();
    assert_eq!(v("regs"), FieldValue::Regs((0..4).map(Reg::A64X).collect()));
    assert_eq!(v("saved"), FieldValue::Regs((19..=21).map(Reg::A64X).collect()));
    assert_eq!(v("link"), FieldValue::Regs(vec![Reg::A64X(30)]));
    assert_eq!(v("r"), FieldValue::Regs(vec![Reg::A64X(8)]));
    assert_eq!(v("both"), FieldValue::Regs(vec![Reg::A64X(9)]));
    assert_eq!(v("only_x86"), FieldValue::Const(0));
    assert_eq!(v("z"), FieldValue::Const(0));
    assert_eq!(v("orig_x0"), FieldValue::Const(u64::MAX));
    assert_eq!(v("_r"), FieldValue::Const(0));
    // A start register on an array binds the range from it.
    let f = parse("#[repr(C)] struct F { #[reg(r8)] hi: [u64; 8] }", Arch::X86_64).unwrap();
    assert_eq!(f.fields[0].value, FieldValue::Regs((8..16).map(Reg::X86Gpr).collect()));
}

#[test]
fn not_repr_c() {
    let e = errors("struct F { rax: u64 }", Arch::X86_64);
    assert!(matches!(&e[..], [FrameError::NotReprC { frame }] if frame == "F"));
    assert_eq!(e[0].spot(), Spot::Repr);
    assert!(e[0].to_string().contains("must be `#[repr(C)]`"));
}

#[test]
fn packed_generic_tuple() {
    let e = errors("#[repr(C, packed)] struct F<T> { rax: u64, t: T }", Arch::X86_64);
    assert!(e.iter().any(|e| matches!(e, FrameError::Packed { .. })));
    assert!(e.iter().any(|e| matches!(e, FrameError::Generic { .. })));
    assert!(e.iter().any(|e| matches!(e, FrameError::UnknownLayout { field, .. } if field == "t")));
    let e = errors("#[repr(C)] struct F(u64);", Arch::X86_64);
    assert!(matches!(&e[..], [FrameError::NotNamedFields { .. }]));
}

#[test]
fn unknown_register_by_name_and_attribute() {
    let e = errors("#[repr(C)] struct F { rax: u64, x0: u64, #[reg(r99)] r: u64 }", Arch::X86_64);
    assert!(matches!(&e[0], FrameError::UnknownRegister { field, register, index: 1, .. } if field == "x0" && register == "x0"));
    assert!(matches!(&e[1], FrameError::UnknownRegister { field, register, index: 2, .. } if field == "r" && register == "r99"));
    assert_eq!(e[0].field(), Some("x0"));
}

#[test]
fn register_bound_twice() {
    let e = errors("#[repr(C)] struct F { regs: [u64; 31], #[reg(x30)] lr2: u64 }", Arch::Aarch64);
    assert!(matches!(&e[..], [FrameError::RegisterBoundTwice { field, register: Reg::A64X(30), first, .. }] if field == "lr2" && first == "regs[30]"));
    assert!(e[0].to_string().contains("already bound to field `regs[30]`"));
}

#[test]
fn field_too_small_and_too_large() {
    let e = errors("#[repr(C)] struct F { rax: u32, rbx: u128 }", Arch::X86_64);
    assert!(matches!(&e[0], FrameError::FieldTooSmall { field, size: 4, needed: 8, .. } if field == "rax"));
    assert!(matches!(&e[1], FrameError::FieldTooLarge { field, size: 16, .. } if field == "rbx"));
    assert_eq!(e[0].spot(), Spot::FieldType(0));
}

#[test]
fn array_length_that_does_not_fit() {
    let e = errors("#[repr(C)] struct F { regs: [u64; 32] }", Arch::Aarch64);
    assert!(matches!(&e[..], [FrameError::ArrayLength { len: 32, .. }]), "{e:?}");
    let e = errors("#[repr(C)] struct F { x3: u64, regs: [u64; 0] }", Arch::Aarch64);
    assert!(matches!(&e[..], [FrameError::ArrayLength { len: 0, field, .. }] if field == "regs"), "{e:?}");
    let e = errors("#[repr(C)] struct F { #[reg(x0..=x7)] a: [u64; 6] }", Arch::Aarch64);
    assert!(matches!(&e[..], [FrameError::ArrayLength { len: 6, .. }]), "{e:?}");
    assert!(e[0].to_string().contains("must be `[u64; 8]`"));
}

#[test]
fn unknown_layout() {
    let e = errors("#[repr(C)] struct F { rax: Vec<u64>, rbx: [u64; N], rcx: &'static u64, _flag: bool }", Arch::X86_64);
    assert_eq!(e.len(), 4);
    assert!(e.iter().all(|e| matches!(e, FrameError::UnknownLayout { .. })));
}

#[test]
fn bad_attribute() {
    let e = errors("#[repr(C)] struct F { #[reg(sparc = \"g1\")] a: u64, #[reg] b: u64, #[reg(x0..x0)] c: u64 }", Arch::Aarch64);
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e.iter().all(|e| matches!(e, FrameError::BadAttribute { .. })));
}

#[test]
fn names_that_would_clash() {
    let src = "#[repr(C)] struct F { rax: u64, #[reg(rbx)] RAX: u64, #[reg(zero)] frame_size: u64, _fpsimd_kretprobe: u64 }";
    let e = errors(src, Arch::X86_64);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(matches!(&e[0], FrameError::NameClash { field, name, index: 1, .. } if field == "RAX" && name == "S_RAX"), "{e:?}");
    assert_eq!(e[0].spot(), Spot::FieldName(1));
    assert!(matches!(&e[1], FrameError::NameClash { name, .. } if name == "S_FRAME_SIZE"), "{e:?}");
    assert!(e[1].to_string().contains("the frame's size constant"), "{}", e[1]);
    // `S__FPSIMD_KRETPROBE` is not reserved; `r#type` is `S_TYPE`.
    let f = parse("#[repr(C)] struct F { _fpsimd_kretprobe: u64, #[reg(zero)] r#type: u64 }", Arch::X86_64).unwrap();
    assert_eq!(f.fields[1].const_name(), "S_TYPE");
}

#[test]
fn from_source_errors() {
    assert!(matches!(&FrameLayout::from_source("struct", "F", Arch::X86_64).unwrap_err()[..], [FrameError::Parse { line: 1, .. }]));
    assert!(matches!(&FrameLayout::from_source("struct G;", "F", Arch::X86_64).unwrap_err()[..], [FrameError::StructNotFound { .. }]));
}
