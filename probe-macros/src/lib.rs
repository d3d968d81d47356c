//! probekit's procedural macros (placeholder until the `#[pt_regs]` issue lands).
