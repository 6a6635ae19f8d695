//! Zygote's tools around the VMM library: the clone-vs-DMA timing fuzzer, the benchmarks and
//! the demo. None of them is part of the product; the `zygote` binary offers them beside the
//! VMM's own `run` and `ctl`.

pub mod bench;
pub mod bench_fleet;
pub mod bench_host;
pub mod demo;
pub mod fuzz;
pub mod net_bench;
pub mod peer_restore;
pub mod report;
pub mod snapshot_bench;
pub mod vsock_bench;
