//! The tiny test guests, assembled by `build.rs` from `resources/guests/` and embedded here.

/// A flat 64-bit CPL3 binary loaded at `layout::GUEST_CODE_ADDR` and entered at its start.
#[derive(Debug)]
pub struct TinyGuest {
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    pub code: &'static [u8],
}

macro_rules! guest_bin {
    ($name:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".bin"))
    };
}

/// Every bundled guest, by name.
pub const TINY_GUESTS: &[TinyGuest] = &[
    TinyGuest { name: "hello", about: "prints a greeting on the serial port, exits 0", code: guest_bin!("hello") },
    TinyGuest { name: "fault", about: "faults (ud2, or a read of an unmapped address with --arg 1): the VM ends with a report", code: guest_bin!("fault") },
    TinyGuest { name: "exitcode", about: "exits with the low byte of --arg", code: guest_bin!("exitcode") },
    TinyGuest {
        name: "spin",
        about: "runs until stopped, counting per vCPU at layout::COUNTERS_ADDR and filling a pattern page with the VM id",
        code: guest_bin!("spin"),
    },
    TinyGuest {
        name: "dma",
        about: "runs a paced 1 MiB DMA-engine transfer and a virtio-blk read of the disk's first 64 KiB at once, prints their FNV-1a 64 checksums",
        code: guest_bin!("dma"),
    },
    TinyGuest {
        name: "sequence",
        about: "prints --arg lines (16 if 0) of a deterministic LCG sequence, one per 2^24 steps, exits 0",
        code: guest_bin!("sequence"),
    },
    TinyGuest {
        name: "dirty16",
        about: "writes the TSC into 16 pages at layout::DIRTY_ADDR, counts the run, exits 0 (for reset loops)",
        code: guest_bin!("dirty16"),
    },
    TinyGuest {
        name: "mailbox",
        about: "runs fill and DMA-start commands the VMM leaves at layout::MAILBOX_ADDR, one at a time, and writes nothing else (the fuzzer's guest)",
        code: guest_bin!("mailbox"),
    },
    TinyGuest {
        name: "net",
        about: "drives the first virtio-net device: sends one frame, receives --arg frames (at most 8), prints their FNV-1a 64 checksums",
        code: guest_bin!("net"),
    },
    TinyGuest {
        name: "rng",
        about: "drives the first virtio-rng device: --arg requests (1 to 8) of 256 bytes one after the other, prints each buffer's FNV-1a 64 checksum",
        code: guest_bin!("rng"),
    },
];

/// Exception stubs every tiny guest gets at `layout::TRAPS_ADDR` (see `resources/guests/traps.s`).
pub const TRAPS: &[u8] = guest_bin!("traps");

/// The bundled guest called `name`.
pub fn find(name: &str) -> Option<&'static TinyGuest> {
    TINY_GUESTS.iter().find(|g| g.name == name)
}

/// The bundled guests' names, comma-separated (for error messages).
pub fn names() -> String {
    TINY_GUESTS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::layout::{GUEST_CODE_MAX, TRAP_STUB_SIZE};

    #[test]
    fn every_guest_is_embedded_and_fits() {
        for g in TINY_GUESTS {
            assert!(!g.code.is_empty() && g.code.len() as u64 <= GUEST_CODE_MAX, "{}", g.name);
        }
        assert_eq!(find("hello").map(|g| g.name), Some("hello"));
        assert!(find("nope").is_none());
    }

    #[test]
    fn trap_stubs_have_the_stride_the_idt_assumes() {
        // 32 stubs; the last one starts at 31 * stride.
        assert!(TRAPS.len() as u64 > 31 * TRAP_STUB_SIZE);
        assert!(TRAPS.len() as u64 <= 32 * TRAP_STUB_SIZE);
        // Stub 0 (no error code) starts with `push $0` (6a 00); stub 8 (#DF) with `push %rax`.
        assert_eq!(&TRAPS[..2], &[0x6a, 0x00]);
        assert_eq!(TRAPS[(8 * TRAP_STUB_SIZE) as usize], 0x50);
    }
}
