//! Arbitrary region lists and pin arguments: always a result, never a panic or a stray access.

use memory::{Access, Bytes, GuestAddress, GuestRam};
use proptest::prelude::*;

fn region() -> impl Strategy<Value = (u64, usize)> {
    prop_oneof![
        (any::<u64>(), any::<usize>()),
        ((0..64u64).prop_map(|p| p << 12), (0..8usize).prop_map(|p| p << 12)),
        ((0..4u64).prop_map(|p| p << 30), (1..16usize).prop_map(|p| p << 20)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn new_and_pin_never_panic(
        regions in prop::collection::vec(region(), 0..4),
        pins in prop::collection::vec((any::<u64>(), 0..(1usize << 22), any::<bool>()), 0..8),
    ) {
        let layout: Vec<_> = regions.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        let Ok(ram) = GuestRam::new(&layout) else { return Ok(()) };
        for &(addr, len, write) in &pins {
            let access = if write { Access::Write } else { Access::Read };
            let inside = ram.layout().iter().any(|&(start, size)| {
                addr >= start.0 && addr.checked_add(len as u64).is_some_and(|end| end <= start.0 + size as u64)
            });
            match ram.pin(GuestAddress(addr), len, access) {
                Ok(guard) => {
                    prop_assert!(inside && len > 0);
                    prop_assert!(guard.write_at(len, &[1]).is_err());
                    if write { guard.write_at(len - 1, &[1]).unwrap(); }
                }
                Err(_) => prop_assert!(!inside || len == 0),
            }
            let _ = ram.write_slice(&[1; 4], GuestAddress(addr));
        }
    }
}
