//! Guest RAM DMA mappings with rollback.

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::fake::FakeDma;
use crate::vfio::dma::{ranges_of, DmaError, DmaMappings, DmaRange};

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 2 << 20),
        (GuestAddress(0x1_0000_0000), 4 << 20),
    ])
    .unwrap()
}

#[test]
fn every_ram_region_is_mapped_at_its_guest_address_and_unmapped_on_drop() {
    let mem = memory();
    let ranges = ranges_of(&mem);
    assert_eq!(ranges.len(), 2);
    assert_eq!((ranges[1].iova, ranges[1].size), (0x1_0000_0000, 4 << 20));
    let dma = Arc::new(FakeDma {
        log: Mutex::new(Vec::new()),
        fail_at: None,
    });
    // SAFETY: `mem` outlives the mappings (dropped at the end of the test after them).
    let mapped = unsafe { DmaMappings::map(dma.clone(), &ranges) }.unwrap();
    assert_eq!(mapped.ranges().len(), 2);
    drop(mapped);
    assert_eq!(
        dma.log.lock().unwrap().as_slice(),
        &[
            "map 0x0+0x200000",
            "map 0x100000000+0x400000",
            "unmap 0x100000000+0x400000",
            "unmap 0x0+0x200000",
        ]
    );
}

#[test]
fn a_failed_mapping_rolls_back() {
    let mem = memory();
    let dma = Arc::new(FakeDma {
        log: Mutex::new(Vec::new()),
        fail_at: Some(1),
    });
    // SAFETY: `mem` outlives the call.
    let err = unsafe { DmaMappings::map(dma.clone(), &ranges_of(&mem)) }
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            DmaError::Map {
                iova: 0x1_0000_0000,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        dma.log.lock().unwrap().as_slice(),
        &["map 0x0+0x200000", "unmap 0x0+0x200000"]
    );
}

#[test]
fn unaligned_ranges_are_refused() {
    let dma = Arc::new(FakeDma {
        log: Mutex::new(Vec::new()),
        fail_at: None,
    });
    let bad = DmaRange {
        iova: 0x1000,
        size: 0x800,
        host: 0x7000_0000,
    };
    // SAFETY: the range is refused before any mapping is made.
    let err = unsafe { DmaMappings::map(dma.clone(), &[bad]) }
        .err()
        .unwrap();
    assert_eq!(
        err,
        DmaError::Unaligned {
            iova: 0x1000,
            size: 0x800
        }
    );
    assert!(dma.log.lock().unwrap().is_empty());
}
