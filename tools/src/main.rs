//! `zygote`: run a tiny guest or a Linux kernel under KVM and control it (the VMM's `run` and
//! `ctl`), or run the fuzzer, the benchmarks and the demo.
//!
//! Exit codes: the guest's own code; 1 if the guest faulted or the host failed; 2 for bad input.

mod cli;

fn main() {
    // Like any Unix filter: `zygote fuzz | head` ends quietly instead of panicking on EPIPE.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    std::process::exit(cli::main(std::env::args_os()));
}
