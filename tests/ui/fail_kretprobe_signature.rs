// Every way a handler's signature can be wrong, each reported on its token.
use probekit::PtRegs;

fn target() {}

#[derive(Default)]
struct Data;

#[probekit::kretprobe(function = target)]
async fn not_async(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target)]
const fn not_const(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target)]
fn generic<T>(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target)]
fn wrong_argument(_regs: u64, _: &mut ()) {}

#[probekit::kretprobe(function = target)]
fn returns(_regs: &PtRegs, _: &mut ()) -> u64 {
    0
}

#[probekit::kretprobe(function = target)]
fn none() {}

#[probekit::kretprobe(function = target)]
fn only_registers(_regs: &PtRegs) {}

#[probekit::kretprobe(function = target, data = Data)]
fn data_not_mut(_regs: &PtRegs, _data: &Data) {}

#[probekit::kretprobe(function = target, data = Data)]
fn three(_regs: &PtRegs, _data: &mut Data, _extra: u64) {}

#[probekit::kretprobe(function = target)]
struct NotAFunction;

fn main() {}
