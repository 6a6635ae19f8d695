//! The entry point for booting a Linux kernel. The loader itself (`vmm::linux`) is written on
//! another branch; until it is wired in, `boot_linux` checks its inputs and says so.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::builder::{ConfigError, VmConfig};
use crate::machine::VmOutcome;

/// What `zygote run --kernel` asks for.
#[derive(Clone, Debug)]
pub struct LinuxConfig {
    pub vm: VmConfig,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

/// Errors booting Linux.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("Linux boot not built yet (kernel {path} looks fine)")]
    NotBuilt { path: PathBuf },
}

impl LinuxBootError {
    /// Whether the user's input is at fault (the CLI exits 2). Everything is, for now.
    pub fn is_bad_input(&self) -> bool {
        true
    }
}

fn open_file(what: &'static str, path: &Path) -> Result<std::fs::File, LinuxBootError> {
    let read_err = |source| LinuxBootError::Read { what, path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(LinuxBootError::NotAFile { what, path: path.to_path_buf() });
    }
    Ok(file)
}

/// Whether the first bytes of a file are an ELF header or a bzImage setup header ("HdrS").
fn looks_like_kernel(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF") || head.get(0x202..0x206) == Some(b"HdrS")
}

/// Boots `config.kernel`. Not wired to the loader yet: validates the inputs, then reports that.
pub fn boot_linux(config: &LinuxConfig) -> Result<VmOutcome, LinuxBootError> {
    config.vm.validate()?;
    let mut head = Vec::with_capacity(0x206);
    open_file("kernel", &config.kernel)?
        .take(0x206)
        .read_to_end(&mut head)
        .map_err(|source| LinuxBootError::Read { what: "kernel", path: config.kernel.clone(), source })?;
    if !looks_like_kernel(&head) {
        return Err(LinuxBootError::NotAKernel { path: config.kernel.clone() });
    }
    if let Some(initrd) = &config.initrd {
        open_file("initrd", initrd)?;
    }
    Err(LinuxBootError::NotBuilt { path: config.kernel.clone() })
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn config(kernel: &str) -> LinuxConfig {
        LinuxConfig { vm: VmConfig::default(), kernel: kernel.into(), initrd: None, cmdline: None }
    }

    #[test]
    fn refuses_what_is_not_a_kernel() {
        assert!(matches!(boot_linux(&config("/dev/null")), Err(LinuxBootError::NotAFile { .. })));
        assert!(matches!(boot_linux(&config("Cargo.toml")), Err(LinuxBootError::NotAKernel { .. })));
        assert!(matches!(boot_linux(&config("/nonexistent")), Err(LinuxBootError::Read { .. })));
    }

    #[test]
    fn recognises_elf_and_bzimage_headers() {
        assert!(looks_like_kernel(b"\x7fELF\x02\x01"));
        let mut bz = vec![0u8; 0x206];
        bz[0x202..].copy_from_slice(b"HdrS");
        assert!(looks_like_kernel(&bz));
        assert!(!looks_like_kernel(b"# README"));
    }
}
