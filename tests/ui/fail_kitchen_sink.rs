// Several mistakes at once: each is reported under its own token, and the struct is
// still emitted, so there is no cascade of "cannot find type `Frame`".
#[probekit::pt_regs(fp = fast)]
#[repr(C)]
pub struct Frame {
    pub rax: u16,
    pub rbx: u64,
    #[reg(rbx)]
    pub base: u64,
    pub nonsense: u64,
    #[reg(x86_64 = "r8..=r9")]
    pub pair: [u64; 3],
    pub list: Vec<u64>,
}

fn use_it(f: &Frame) -> u64 {
    f.rbx
}

fn main() {}
