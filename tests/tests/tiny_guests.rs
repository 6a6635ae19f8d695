//! The bundled tiny guests under real KVM, through the vmm library.

use std::time::{Duration, Instant};

use vmm::vcpu::VcpuError;
use vmm::{run_tiny_guest, BuildError, ConfigError, VmConfig, VmOutcome};
use zygote_tests::{captured, text};

#[test]
fn hello_prints_and_exits_zero() {
    let (config, out) = captured(1);
    let start = Instant::now();
    let outcome = run_tiny_guest(&config, "hello", 0).unwrap();
    let took = start.elapsed();
    assert!(matches!(outcome, VmOutcome::Exited(0)), "{outcome:?}");
    assert_eq!(text(&out), "Hello from a Zygote guest\n");
    // A hang guard, not a benchmark: loaded hosts are slow.
    assert!(took < Duration::from_secs(30), "hello took {took:?}");
}

#[test]
fn hello_on_four_vcpus_prints_once() {
    let (config, out) = captured(4);
    let outcome = run_tiny_guest(&config, "hello", 0).unwrap();
    assert!(matches!(outcome, VmOutcome::Exited(0)), "{outcome:?}");
    assert_eq!(text(&out), "Hello from a Zygote guest\n");
}

#[test]
fn exit_codes_propagate() {
    for code in [0u8, 1, 7, 42, 255] {
        let (config, _) = captured(1);
        let outcome = run_tiny_guest(&config, "exitcode", u64::from(code)).unwrap();
        assert!(matches!(outcome, VmOutcome::Exited(c) if c == code), "{code}: {outcome:?}");
        assert_eq!(outcome.exit_code(), code);
    }
}

#[test]
fn fault_ends_the_vm_with_the_exception_and_registers() {
    let (config, _) = captured(2);
    let outcome = run_tiny_guest(&config, "fault", 0).unwrap();
    let VmOutcome::Failed(err) = &outcome else { panic!("expected a fault, got {outcome:?}") };
    assert!(matches!(err, VcpuError::Exception { vcpu: 0, vector: 6, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("#UD (invalid opcode)"), "{msg}");
    // The faulting context, not the stub's: user CS and the value the guest put in RAX.
    assert!(msg.contains("cs=0x23") && msg.contains("rax=0x00000000000fa017"), "{msg}");
    assert_eq!(outcome.exit_code(), 1);
}

#[test]
fn page_fault_reports_the_address() {
    let (config, _) = captured(1);
    let outcome = run_tiny_guest(&config, "fault", 1).unwrap();
    let VmOutcome::Failed(err) = &outcome else { panic!("expected a fault, got {outcome:?}") };
    assert!(matches!(err, VcpuError::Exception { vector: 14, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("#PF (page fault)") && msg.contains("address 0x4000000000"), "{msg}");
    // Error code: user-mode read of a not-present page.
    assert!(msg.contains("error code 0x4"), "{msg}");
}

#[test]
fn bad_config_is_an_error_not_a_panic() {
    let bad = |config: VmConfig, name| run_tiny_guest(&config, name, 0).unwrap_err();
    let e = bad(VmConfig { mem_mib: 0, ..VmConfig::default() }, "hello");
    assert!(matches!(e, BuildError::Config(ConfigError::MemSize { mib: 0, .. })) && e.is_bad_input());
    let e = bad(VmConfig { vcpus: 0, ..VmConfig::default() }, "hello");
    assert!(matches!(e, BuildError::Config(ConfigError::VcpuCount { vcpus: 0, .. })));
    let e = bad(VmConfig::default(), "nope");
    assert!(e.to_string().contains("unknown guest \"nope\""), "{e}");
}
