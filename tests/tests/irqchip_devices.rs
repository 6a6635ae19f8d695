//! MMIO devices on a VM with an in-kernel irqchip, as Linux guests and their clones have: each
//! device interrupt is an irqfd on its GSI, virtio-blk's QueueNotify a KVM ioeventfd served by
//! the disk's event loop. The `dma` guest keeps interrupts off and polls, so it finishes either
//! way; what the test checks from the host is that its 32-bit QueueNotify write was served
//! through the ioeventfd (KVM refuses a second ioeventfd there as a duplicate: one is
//! registered) and that the devices' completions reached KVM's interrupt controller (the PIC's
//! request register holds GSIs 5 and 6 afterwards, which nothing but an irqfd could set). The
//! same holds for a clone: `build_from_state` wires the clone's devices the same way, and a
//! request whose notification the source had not served at the clone instant is served by
//! the clone.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER};
use kvm_ioctls::IoEventAddress;
use memory::{Bytes, GuestAddress};
use vmm::clone::capture_clone;
use vmm::layout::{DMA_ENGINE_IRQ, VIRTIO_BLK_IRQ, VIRTIO_BLK_MMIO_ADDR};
use vmm::{build_tiny_vm, guests, Console, VmConfig, VmOutcome, Vmm};
use vmm_sys_util::eventfd::EventFd;
use zygote_tests::blk_driver::{read_bytes, BlkDriver, DATA, USED_RING};
use zygote_tests::{captured, scratch_dir, text};

/// virtio-mmio's QueueNotify register offset.
const QUEUE_NOTIFY: u64 = 0x50;
/// The GSIs of both MMIO devices as bits of a PIC register.
const DEVICE_IRQ_BITS: u8 = 1 << VIRTIO_BLK_IRQ | 1 << DMA_ENGINE_IRQ;

/// A byte of the test disk.
fn disk_byte(offset: u32) -> u8 {
    (offset * 7 + offset / 512) as u8
}

/// A 64 KiB disk of `disk_byte`s in a scratch directory.
fn disk(name: &str) -> PathBuf {
    let path = scratch_dir(name).join("disk.img");
    std::fs::write(&path, (0..64u32 << 10).map(disk_byte).collect::<Vec<_>>()).unwrap();
    path
}

/// A paused `dma` guest VM (DMA pacing 100 µs per chunk) with an in-kernel irqchip and `disk`.
fn dma_vm_with_irqchip(disk: PathBuf) -> (Vmm, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (config, out) = captured(1);
    let config = VmConfig { disk: Some(disk), irqchip: true, ..config };
    (build_tiny_vm(&config, guests::find("dma").unwrap(), 100).unwrap(), out)
}

/// The master PIC's interrupt request register.
fn pic_irr(vmm: &Vmm) -> u8 {
    let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_PIC_MASTER, ..Default::default() };
    vmm.vm().fd().get_irqchip(&mut chip).expect("the VM has an in-kernel irqchip");
    // SAFETY: KVM_GET_IRQCHIP for KVM_IRQCHIP_PIC_MASTER fills the union's `pic` member.
    unsafe { chip.chip.pic }.irr
}

/// Waits (5 s at most) until the master PIC requests every GSI in `bits`, and returns the
/// bits of `bits` it requests then: KVM injects irqfd signals from a worker thread, so the
/// last one may land after the guest has already seen the device finish.
fn wait_for_pic_irr(vmm: &Vmm, bits: u8) -> u8 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let irr = pic_irr(vmm) & bits;
        if irr == bits || Instant::now() > deadline {
            return irr;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether an ioeventfd is already registered on virtio-blk's QueueNotify for queue 0: KVM
/// refuses a second one for the same address, length and datamatch with EEXIST.
fn queue_notify_is_an_ioeventfd(vmm: &Vmm) -> bool {
    let probe = EventFd::new(0).unwrap();
    let addr = IoEventAddress::Mmio(VIRTIO_BLK_MMIO_ADDR + QUEUE_NOTIFY);
    match vmm.vm().fd().register_ioevent(&probe, &addr, 0u32) {
        Err(e) if e.errno() == libc::EEXIST => true,
        Err(e) => panic!("KVM_IOEVENTFD failed otherwise: {e}"),
        Ok(()) => {
            vmm.vm().fd().unregister_ioevent(&probe, &addr, 0u32).unwrap();
            false
        }
    }
}

/// Runs `vmm` to its end and checks the guest saw both devices finish.
fn run_to_end(vmm: &mut Vmm, out: &std::sync::Mutex<Vec<u8>>) {
    vmm.start();
    assert!(vmm.wait_timeout(Duration::from_secs(30)), "the dma guest did not finish: {}", text(out));
    let output = text(out);
    assert!(output.contains("DMA done ") && output.contains("BLK done "), "{output}");
}

#[test]
fn a_vm_with_an_irqchip_takes_notifications_by_ioeventfd_and_interrupts_by_irqfd() {
    let (mut vmm, out) = dma_vm_with_irqchip(disk("irqchip-vm"));
    assert!(queue_notify_is_an_ioeventfd(&vmm));
    assert_eq!(pic_irr(&vmm) & DEVICE_IRQ_BITS, 0, "no device interrupt before the guest runs");
    run_to_end(&mut vmm, &out);
    assert_eq!(wait_for_pic_irr(&vmm, DEVICE_IRQ_BITS), DEVICE_IRQ_BITS, "both devices interrupted through KVM");
    assert!(matches!(vmm.stop(), VmOutcome::Exited(0)), "{}", text(&out));
}

#[test]
fn a_clone_of_a_vm_with_an_irqchip_gets_the_same_irqfds_and_ioeventfd() {
    let (mut source, _) = dma_vm_with_irqchip(disk("irqchip-clone"));
    let token = source.pause().unwrap();
    let image = capture_clone(&source, &token).unwrap();
    assert!(image.state.irqchip.is_some(), "the irqchip is in the clone's state");
    let (console, out) = Console::capture();
    let mut clone = image.build(1, &console).unwrap();
    drop(source);
    assert!(queue_notify_is_an_ioeventfd(&clone), "the clone's QueueNotify is an ioeventfd");
    assert_eq!(pic_irr(&clone) & DEVICE_IRQ_BITS, 0, "no device interrupt before the clone runs");
    run_to_end(&mut clone, &out);
    assert_eq!(
        wait_for_pic_irr(&clone, DEVICE_IRQ_BITS),
        DEVICE_IRQ_BITS,
        "the clone's devices interrupted through KVM"
    );
    assert!(matches!(clone.stop(), VmOutcome::Exited(0)), "{}", text(&out));
}

/// COM1's ISA interrupt as a bit of the master PIC's request register.
const SERIAL_IRQ_BIT: u8 = 1 << 4;

/// Enables the UART's transmit-holding-register-empty interrupt through the VM's port bus, as
/// a guest's 8250 driver does before sending: the transmitter is empty, so it fires at once.
fn enable_serial_tx_interrupt(vmm: &Vmm) {
    vmm.buses().0.write(u64::from(vmm::layout::SERIAL_PORT) + 1, &[0x02]).expect("COM1 on the port bus");
}

#[test]
fn the_serial_interrupt_is_an_irqfd_on_gsi_4_in_a_vm_with_an_irqchip_and_in_its_clone() {
    let (source, _) = dma_vm_with_irqchip(disk("irqchip-serial"));
    assert_eq!(pic_irr(&source) & SERIAL_IRQ_BIT, 0, "no serial interrupt yet");
    enable_serial_tx_interrupt(&source);
    assert_eq!(wait_for_pic_irr(&source, SERIAL_IRQ_BIT), SERIAL_IRQ_BIT, "the source's UART interrupted through KVM");
    // A clone taken before its UART's interrupt is enabled: a Linux clone's init needs this to
    // write anything (its 8250 driver sends from the transmit interrupt).
    let (mut other, _) = dma_vm_with_irqchip(disk("irqchip-serial-2"));
    let token = other.pause().unwrap();
    let image = capture_clone(&other, &token).unwrap();
    let (console, _out) = Console::capture();
    let clone = image.build(1, &console).unwrap();
    drop(other);
    drop(source);
    assert_eq!(pic_irr(&clone) & SERIAL_IRQ_BIT, 0, "no serial interrupt in the clone yet");
    enable_serial_tx_interrupt(&clone);
    assert_eq!(wait_for_pic_irr(&clone, SERIAL_IRQ_BIT), SERIAL_IRQ_BIT, "the clone's UART interrupted through KVM");
}

#[test]
fn a_vm_without_an_irqchip_keeps_polled_devices() {
    let (config, _) = captured(1);
    let config = VmConfig { disk: Some(disk("irqchip-none")), ..config };
    let vmm = build_tiny_vm(&config, guests::find("dma").unwrap(), 100).unwrap();
    assert!(!queue_notify_is_an_ioeventfd(&vmm), "QueueNotify stays an MMIO exit");
}

#[test]
fn a_clone_serves_a_request_whose_notification_the_source_had_not_served() {
    let (config, _) = captured(1);
    let config = VmConfig { disk: Some(disk("irqchip-kick")), irqchip: true, ..config };
    let mut source = build_tiny_vm(&config, guests::find("spin").unwrap(), 0).unwrap();
    source.start();
    let mut driver = BlkDriver::setup(&source);
    // In the avail ring, not notified: what a guest's QueueNotify whose ioeventfd signal the
    // source's event loop had not yet served looks like at the clone instant.
    let request = driver.offer_read(&source, 2, DATA, 4096);
    let token = source.pause().unwrap();
    let image = capture_clone(&source, &token).unwrap();
    source.resume(token);
    let clone = image.build(1, &Console::capture().0).unwrap();
    assert_eq!(BlkDriver::wait(&clone, request), 0, "the clone served the request");
    assert_eq!(read_bytes(&clone, DATA, 4096), (1024..1024 + 4096).map(disk_byte).collect::<Vec<_>>());
    let source_used: u16 = source.ram().read_obj(GuestAddress(USED_RING + 2)).unwrap();
    assert_eq!(source_used, 0, "the source, never notified, served nothing");
}
