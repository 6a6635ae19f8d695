//! Zygote VMM library: KVM VMs and vCPUs, buses and legacy devices, the tiny test guests, and
//! the build recipe that ties them together.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod cli;
pub mod clone;
pub mod device_manager;
pub mod exit;
pub mod guests;
pub mod layout;
pub mod linux;
pub mod longmode;
pub mod machine;
pub mod regs;
pub mod regular_file;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vstate;

pub use boot::{boot_linux, build_linux_vm, BootError, LinuxConfig};
pub use builder::{
    build_restored, build_tiny_vm, build_vm, run_tiny_guest, BuildError, ConfigError, Filling, VmConfig,
};
pub use device_manager::Console;
pub use machine::{Paused, VmOutcome, Vmm, VmmError};
