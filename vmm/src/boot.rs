//! `zygote run --kernel`: a VM for a Linux kernel. `builder::build_vm` builds it (an in-kernel
//! irqchip and PIT, the devices wired through irqfds and ioeventfds); this module says what a
//! Linux boot asks for and loads the kernel, initrd and command line (`crate::linux`) into it.

pub use crate::builder::LinuxConfig;
use crate::builder::{build_vm, create_ram, BuildError, ConfigError, Filling};
use crate::machine::{VmOutcome, Vmm};

/// What failed booting Linux.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

impl BootError {
    /// Whether the user's input (kernel, initrd, command line, sizes) is at fault: exit 2.
    pub fn is_bad_input(&self) -> bool {
        match self {
            BootError::Config(_) => true,
            BootError::Build(e) => e.is_bad_input(),
        }
    }
}

/// Builds a paused VM that will boot `config.kernel`.
pub fn build_linux_vm(config: &LinuxConfig) -> Result<Vmm, BootError> {
    config.vm.validate()?;
    let ram = create_ram(&config.vm)?;
    Ok(build_vm(config.vm.vm_id, ram, &config.vm.console, Filling::Linux(config))?)
}

/// Boots `config.kernel` and runs it until the guest resets (0xFE to port 0x64) or fails.
pub fn boot_linux(config: &LinuxConfig) -> Result<VmOutcome, BootError> {
    Ok(build_linux_vm(config)?.run())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::VmConfig;

    fn config(kernel: &str) -> LinuxConfig {
        LinuxConfig { vm: VmConfig::default(), kernel: kernel.into(), initrd: None, cmdline: None }
    }

    #[test]
    fn refuses_what_is_not_a_kernel_as_bad_input() {
        for path in ["/dev/null", "Cargo.toml", "/nonexistent"] {
            let err = boot_linux(&config(path)).err().unwrap_or_else(|| panic!("{path} booted"));
            assert!(err.is_bad_input(), "{path}: {err}");
            assert!(err.to_string().contains(path), "{path}: {err}");
        }
    }
}
