// Every way the options can be wrong, each reported on its token.
use probekit::PtRegs;

fn target() {}

#[derive(Default)]
struct Data;

#[probekit::kretprobe(function = target, symbol = "target")]
fn both(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe]
fn neither(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, speed = 11)]
fn unknown(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, offset = 4)]
fn offset(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, maxactive = N)]
fn maxactive_not_literal(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, maxactive = 0)]
fn maxactive_zero(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, maxactive = 8u8)]
fn maxactive_suffix(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, maxactive = 8, maxactive = 16)]
fn twice(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = "target", symbol = target)]
fn wrong_kinds(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(symbol = "")]
fn empty_symbol(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, entry = || {})]
fn entry_not_path(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, data = Data)]
fn data_without_argument(_regs: &PtRegs) {}

const N: usize = 4;

fn main() {}
