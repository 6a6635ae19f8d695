use memory::{Access, Bytes, GuestAddress, GuestRam};

#[test]
fn clone_isolates_both_ways_and_pins_stay_with_source() {
    let ram = GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap();
    ram.write_slice(&[1; 8192], GuestAddress(0x1000)).unwrap();
    let guard = ram.pin(GuestAddress(0x2000), 4096, Access::Write).unwrap();
    let clone = ram.clone_cow().unwrap();
    guard.write_at(0, &[9; 16]).unwrap();
    clone.write_slice(&[7; 4], GuestAddress(0x1000)).unwrap();
    let mut b = [0u8; 16];
    ram.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
    assert_eq!(b, [9; 16]);
    clone.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
    assert_eq!(b, [1; 16]);
    ram.read_slice(&mut b[..4], GuestAddress(0x1000)).unwrap();
    assert_eq!(&b[..4], &[1; 4]);
    assert_eq!(ram.stats().eager_copied_pages, 1);
    let snap = clone.snapshot().unwrap();
    clone.write_slice(&[5; 4], GuestAddress(0x1000)).unwrap();
    clone.reset_to(&snap).unwrap();
    clone.read_slice(&mut b[..4], GuestAddress(0x1000)).unwrap();
    assert_eq!(&b[..4], &[7; 4]);
    assert!(matches!(ram.reset_to(&snap), Err(memory::MemoryError::Pinned { pages: 1, .. })));
    drop(guard);
    ram.reset_to(&snap).unwrap();
    ram.read_slice(&mut b[..4], GuestAddress(0x1000)).unwrap();
    assert_eq!(&b[..4], &[7; 4]);
}
