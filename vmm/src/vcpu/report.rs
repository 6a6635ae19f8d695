//! What a vCPU reports when the guest dies: the error type and a register dump.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use memory::{Bytes, GuestAddress, GuestRam};

/// Errors of a vCPU: the guest's death (with registers) or a failed KVM call.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {vcpu}: guest took exception {vector} {name}, error code {error_code:#x}{cr2}\n{regs}")]
    Exception { vcpu: usize, vector: u32, name: &'static str, error_code: u64, cr2: Cr2, regs: RegisterDump },
    #[error("vCPU {vcpu}: guest triple-faulted (KVM_EXIT_SHUTDOWN)\n{regs}")]
    TripleFault { vcpu: usize, regs: RegisterDump },
    #[error("vCPU {vcpu}: guest halted and nothing can wake it (no interrupt controller)\n{regs}")]
    Halted { vcpu: usize, regs: RegisterDump },
    #[error("vCPU {vcpu}: unhandled exit {exit}\n{regs}")]
    UnhandledExit { vcpu: usize, exit: String, regs: RegisterDump },
    #[error("vCPU {vcpu}: KVM_RUN failed")]
    Run {
        vcpu: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: setting up registers failed")]
    Setup {
        vcpu: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot start the thread of vCPU {vcpu}")]
    Spawn {
        vcpu: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
}

/// The faulting address of a page fault, shown after the error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cr2(pub Option<u64>);

impl fmt::Display for Cr2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, ", address {addr:#x}"),
            None => Ok(()),
        }
    }
}

/// The name of exception `vector`.
pub fn exception_name(vector: u32) -> &'static str {
    match vector {
        0 => "#DE (divide error)",
        1 => "#DB (debug)",
        2 => "NMI",
        3 => "#BP (breakpoint)",
        4 => "#OF (overflow)",
        5 => "#BR (bound range exceeded)",
        6 => "#UD (invalid opcode)",
        7 => "#NM (device not available)",
        8 => "#DF (double fault)",
        10 => "#TS (invalid TSS)",
        11 => "#NP (segment not present)",
        12 => "#SS (stack-segment fault)",
        13 => "#GP (general protection)",
        14 => "#PF (page fault)",
        16 => "#MF (x87 floating-point error)",
        17 => "#AC (alignment check)",
        18 => "#MC (machine check)",
        19 => "#XM (SIMD floating-point)",
        20 => "#VE (virtualization exception)",
        21 => "#CP (control protection)",
        _ => "(reserved vector)",
    }
}

/// The guest's registers when it died, or why they could not be read.
#[derive(Clone, Debug, PartialEq)]
pub struct RegisterDump(Result<Box<(kvm_regs, u16, u16)>, String>);

impl RegisterDump {
    /// Reads `vcpu`'s registers as they are now.
    pub fn read(vcpu: &VcpuFd) -> RegisterDump {
        let regs = vcpu.get_regs().and_then(|r| vcpu.get_sregs().map(|s| Box::new((r, s.cs.selector, s.ss.selector))));
        RegisterDump(regs.map_err(|e| format!("registers unavailable: {e}")))
    }

    /// A dump of the given values (for reports rebuilt from an exception frame).
    pub fn from_parts(regs: kvm_regs, cs: u16, ss: u16) -> RegisterDump {
        RegisterDump(Ok(Box::new((regs, cs, ss))))
    }
}

impl fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, cs, ss) = match &self.0 {
            Ok(v) => &**v,
            Err(e) => return f.write_str(e),
        };
        writeln!(f, "  rip={:#018x} rsp={:#018x} rflags={:#010x} cs={cs:#x} ss={ss:#x}", r.rip, r.rsp, r.rflags)?;
        writeln!(f, "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}", r.rax, r.rbx, r.rcx, r.rdx)?;
        writeln!(f, "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}", r.rsi, r.rdi, r.rbp, r.r8)?;
        writeln!(f, "  r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}", r.r9, r.r10, r.r11, r.r12)?;
        write!(f, "  r13={:#018x} r14={:#018x} r15={:#018x}", r.r13, r.r14, r.r15)
    }
}

/// The exception stubs' frame at RSP when they report (see `resources/guests/traps.s`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrapFrame {
    pub rdx: u64,
    pub rax: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// Parses the eight words at the stub's RSP.
    pub fn from_words(w: [u64; 8]) -> TrapFrame {
        TrapFrame { rdx: w[0], rax: w[1], error_code: w[2], rip: w[3], cs: w[4], rflags: w[5], rsp: w[6], ss: w[7] }
    }

    /// The interrupted context: `stub_regs` with what the CPU and the stub saved put back.
    #[allow(clippy::cast_possible_truncation)]
    pub fn interrupted(&self, stub_regs: kvm_regs) -> RegisterDump {
        let regs =
            kvm_regs { rax: self.rax, rdx: self.rdx, rip: self.rip, rsp: self.rsp, rflags: self.rflags, ..stub_regs };
        // Selectors are 16 bits; the CPU pushed them zero-extended.
        RegisterDump::from_parts(regs, self.cs as u16, self.ss as u16)
    }
}

/// Builds the report of exception `vector`, which the stub on `vcpu` just announced.
pub fn exception_report(index: usize, vcpu: &VcpuFd, ram: &GuestRam, vector: u32) -> VcpuError {
    let read = || -> Result<(kvm_regs, kvm_sregs, [u64; 8]), String> {
        let regs = vcpu.get_regs().map_err(|e| format!("registers unavailable: {e}"))?;
        let sregs = vcpu.get_sregs().map_err(|e| format!("registers unavailable: {e}"))?;
        let words: [u64; 8] = ram
            .read_obj(GuestAddress(regs.rsp))
            .map_err(|e| format!("exception frame at {:#x} unreadable: {e}", regs.rsp))?;
        Ok((regs, sregs, words))
    };
    match read() {
        Ok((regs, sregs, words)) => {
            let frame = TrapFrame::from_words(words);
            VcpuError::Exception {
                vcpu: index,
                vector,
                name: exception_name(vector),
                error_code: frame.error_code,
                cr2: Cr2((vector == 14).then_some(sregs.cr2)),
                regs: frame.interrupted(regs),
            }
        }
        Err(e) => VcpuError::Exception {
            vcpu: index,
            vector,
            name: exception_name(vector),
            error_code: 0,
            cr2: Cr2(None),
            regs: RegisterDump(Err(e)),
        },
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn frame_restores_the_interrupted_context() {
        let frame = TrapFrame::from_words([1, 2, 0, 0x100007, 0x23, 0x3002, 0x1ffff8, 0x1b]);
        let stub = kvm_regs { rax: 6, rdx: 0x503, rbx: 42, rip: 0x6000, ..Default::default() };
        let err = VcpuError::Exception {
            vcpu: 0,
            vector: 6,
            name: exception_name(6),
            error_code: 0,
            cr2: Cr2(None),
            regs: frame.interrupted(stub),
        };
        let text = err.to_string();
        assert!(text.starts_with("vCPU 0: guest took exception 6 #UD (invalid opcode)"), "{text}");
        assert!(text.contains("rip=0x0000000000100007") && text.contains("cs=0x23"), "{text}");
        assert!(text.contains("rax=0x0000000000000002") && text.contains("rbx=0x000000000000002a"), "{text}");
    }
}
