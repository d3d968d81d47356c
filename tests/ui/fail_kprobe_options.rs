use probekit::PtRegs;

fn target() {}

#[probekit::kprobe(function = target, symbol = "target")]
fn both(_regs: &PtRegs) {}

#[probekit::kprobe]
fn neither(_regs: &PtRegs) {}

#[probekit::kprobe(function = target, speed = 11)]
fn unknown(_regs: &PtRegs) {}

fn main() {}
