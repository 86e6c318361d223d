//! keel-vmm
fn main() {}
