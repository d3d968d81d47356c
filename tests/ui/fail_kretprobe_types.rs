// Type errors are rustc's, on the user's tokens: data of another type, data that is
// not `Default + Send`, an entry handler of the wrong shape.
use probekit::{Entry, PtRegs};

fn target() {}

#[derive(Default)]
struct Data;

struct NotDefault;

#[probekit::kretprobe(function = target, data = Data)]
fn other_data(_regs: &PtRegs, _data: &mut u64) {}

#[probekit::kretprobe(function = target, data = NotDefault)]
fn not_default(_regs: &PtRegs, _data: &mut NotDefault) {}

fn entry_without_result(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, entry = entry_without_result)]
fn bad_entry(_regs: &PtRegs, _: &mut ()) {}

fn entry_with_data(_regs: &PtRegs, _data: &mut Data) -> bool {
    true
}

#[probekit::kretprobe(function = target, entry = entry_with_data)]
fn entry_takes_data_without_option(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, data = u32, entry = entry_with_data)]
fn entry_with_other_data(_regs: &PtRegs, _data: &mut u32) {}

fn skips(_regs: &mut PtRegs, _: &mut ()) -> Entry {
    Entry::Override(0)
}

// An entry handler that may skip the function is `entry_mut`, not `entry`.
#[probekit::kretprobe(function = target, entry = skips)]
fn skipping_entry_is_not_safe(_regs: &PtRegs, _: &mut ()) {}

#[probekit::kretprobe(function = target, data = std::rc::Rc<u8>)]
fn not_send(_regs: &PtRegs, _data: &mut std::rc::Rc<u8>) {}

fn main() {}
