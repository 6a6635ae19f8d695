//! `zygote`: run a tiny guest or (later) a Linux kernel under KVM.
//!
//! Exit codes: the guest's own code; 1 if the guest faulted or the host failed; 2 for bad input.

mod cli;

fn main() {
    std::process::exit(cli::main(std::env::args_os()));
}
