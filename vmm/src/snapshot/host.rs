//! The host a snapshot was taken on: CPU vendor and feature bits (CPUID). A snapshot's vCPUs
//! were running with the features of that host; restoring them on a CPU of another vendor or
//! one that lacks some of those features makes the guest fault on its first use of one, so
//! loading says so instead. Knows nothing of the rest of the VMM.

use serde::{Deserialize, Serialize};

/// The CPUID (leaf, subleaf, register) words recorded, in `HostCpu::features` order.
pub const FEATURE_WORDS: [(u32, u32, &str); 7] = [
    (1, 0, "ecx"),
    (1, 0, "edx"),
    (7, 0, "ebx"),
    (7, 0, "ecx"),
    (7, 0, "edx"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

/// Bits that differ between hosts and guests without changing what a guest may use: leaf 1
/// ECX bit 27 (OSXSAVE, mirrors the OS's CR4) and EBX-like per-CPU values are not recorded;
/// leaf 1 ECX bit 31 (hypervisor present) depends on nesting.
const IGNORED: [(usize, u32); 2] = [(0, 1 << 27), (0, 1 << 31)];

/// A CPU's vendor string and feature words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    pub vendor: String,
    pub features: Vec<u32>,
}

/// Why a snapshot's CPU does not fit this host.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostCpuError {
    #[error("taken on a {snapshot} CPU, this host is {host}")]
    Vendor { snapshot: String, host: String },
    #[error("recorded {found} CPU feature words, this build records {expected}")]
    WordCount { found: usize, expected: usize },
    #[error("the snapshot's CPU has features this host lacks: CPUID leaf {leaf:#x}.{register} bits {missing:#010x}")]
    Missing { leaf: u32, register: &'static str, missing: u32 },
}

fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // SAFETY: CPUID exists on every x86_64 CPU (the crate builds only for x86_64); leaves above
    // the maximum return zeros or the highest leaf's values, never fault.
    // (Safe to call since Rust 1.87; the workspace still builds with 1.85.)
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid_count(leaf, subleaf) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

impl HostCpu {
    /// This host's CPU.
    pub fn current() -> HostCpu {
        let [max, ebx, ecx, edx] = cpuid(0, 0);
        let vendor: Vec<u8> = [ebx, edx, ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
        let max_ext = cpuid(0x8000_0000, 0)[0];
        let features = FEATURE_WORDS
            .iter()
            .enumerate()
            .map(|(index, &(leaf, subleaf, register))| {
                let present = if leaf >= 0x8000_0000 { leaf <= max_ext } else { leaf <= max };
                let regs = if present { cpuid(leaf, subleaf) } else { [0; 4] };
                let word = match register {
                    "ebx" => regs[1],
                    "ecx" => regs[2],
                    _ => regs[3],
                };
                IGNORED.iter().filter(|&&(i, _)| i == index).fold(word, |w, &(_, mask)| w & !mask)
            })
            .collect();
        HostCpu { vendor: String::from_utf8_lossy(&vendor).into_owned(), features }
    }

    /// Whether a snapshot taken on `self` can run on `host`: same vendor, and every feature it
    /// had is there.
    pub fn check_runs_on(&self, host: &HostCpu) -> Result<(), HostCpuError> {
        if self.vendor != host.vendor {
            return Err(HostCpuError::Vendor { snapshot: self.vendor.clone(), host: host.vendor.clone() });
        }
        if self.features.len() != FEATURE_WORDS.len() {
            return Err(HostCpuError::WordCount { found: self.features.len(), expected: FEATURE_WORDS.len() });
        }
        for ((&had, &has), &(leaf, _, register)) in self.features.iter().zip(&host.features).zip(&FEATURE_WORDS) {
            let missing = had & !has;
            if missing != 0 {
                return Err(HostCpuError::Missing { leaf, register, missing });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_runs_its_own_snapshots_and_not_a_richer_or_foreign_cpu() {
        let host = HostCpu::current();
        assert_eq!(host.vendor.len(), 12, "{host:?}");
        assert!(host.features[1] & 1 != 0, "leaf 1 EDX bit 0 (FPU) is set on every x86_64 CPU");
        assert_eq!(host.check_runs_on(&host), Ok(()));
        let foreign = HostCpu { vendor: "SomeOtherCPU".into(), ..host.clone() };
        assert!(matches!(foreign.check_runs_on(&host), Err(HostCpuError::Vendor { .. })));
        let mut richer = host.clone();
        let missing = !host.features[2];
        richer.features[2] = u32::MAX;
        let err = richer.check_runs_on(&host);
        if missing != 0 {
            assert_eq!(err, Err(HostCpuError::Missing { leaf: 7, register: "ebx", missing }));
        }
        let short = HostCpu { features: vec![], ..host.clone() };
        assert!(matches!(short.check_runs_on(&host), Err(HostCpuError::WordCount { found: 0, .. })));
    }
}
