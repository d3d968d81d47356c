// Field names whose offset constants would clash with another field's or with a
// constant the generator defines: refused under the field, before rustc would report
// a duplicate definition somewhere in the expansion.
#[probekit::pt_regs]
#[repr(C)]
#[allow(non_snake_case)]
pub struct Clash {
    pub rax: u64,
    #[reg(x86_64 = "rbx", aarch64 = "x1")]
    pub RAX: u64,
    #[reg(zero)]
    pub frame_size: u64,
    #[reg(zero)]
    pub alloc_entry: u64,
}

fn main() {}
