// Every way a handler's signature can be wrong, each reported on its token.
use probekit::PtRegs;

fn target() {}

#[probekit::kprobe(function = target)]
async fn not_async(_regs: &PtRegs) {}

#[probekit::kprobe(function = target)]
fn generic<T>(_regs: &PtRegs) {}

#[probekit::kprobe(function = target)]
fn wrong_argument(_regs: &PtRegs) {}

#[probekit::kprobe(function = target)]
fn returns(_regs: &PtRegs) -> u64 {
    0
}

#[probekit::kprobe(function = target)]
fn two(_regs: &PtRegs, _extra: u64) {}

fn main() {}
