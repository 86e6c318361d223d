//! MSI-X masking reaching the device, the emulated PBA, bad table writes, and the
//! INTx eventfds handed to VFIO.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::fake::{FakeDevice, FakeLine, GsiRouter};
use crate::pci::PciFunction;
use crate::vfio::device::{DeviceProbe, DeviceWiring, VfioPciDevice};
use crate::vfio::irq::{IntxLine, IrqMode};

/// I350: MSI-X capability at 0x70 (control 0x72), 10 vectors, table at BAR 3
/// offset 0, PBA at BAR 3 offset 0x2000.
const CONTROL: usize = 0x72;
const PBA: u64 = 0x2000;
const ENABLE: u16 = 0x8000;
const FUNCTION_MASK: u16 = 0x4000;

fn i350(intx: Option<Arc<FakeLine>>) -> (Arc<FakeDevice>, VfioPciDevice) {
    let dev = FakeDevice::i350();
    let probe = DeviceProbe::read(&*dev).unwrap();
    let mut bars = probe.bars;
    bars[0].addr = 0xc000_0000;
    bars[3].addr = 0xc010_0000;
    let f = VfioPciDevice::new(
        "nic0",
        dev.clone(),
        &probe,
        DeviceWiring {
            router: GsiRouter::new(probe.vectors_needed()),
            intx: intx.map(|l| l as Arc<dyn IntxLine>),
            bars,
        },
    )
    .unwrap();
    dev.take_calls();
    (dev, f)
}

fn entry(f: &mut VfioPciDevice, v: u64, masked: bool) {
    f.bar_write(3, v * 16, &0xfee0_0000u64.to_le_bytes());
    f.bar_write(3, v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
    f.bar_write(3, v * 16 + 12, &u32::from(masked).to_le_bytes());
}

fn set_device_pba(dev: &FakeDevice, bytes: &[u8]) {
    let mut data = dev.bar_data.lock().unwrap();
    let bar3 = data.get_mut(&3).unwrap();
    bar3[PBA as usize..PBA as usize + bytes.len()].copy_from_slice(bytes);
}

fn pba(f: &mut VfioPciDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut d = vec![0xaa; len];
    f.bar_read(3, PBA + offset, &mut d);
    d
}

#[test]
fn vector_masks_reach_the_device_and_the_pba_shows_pending_masked_vectors() {
    let (dev, mut f) = i350(None);
    // Linux's order: enable with the function masked, program, unmask the function.
    f.config_write(CONTROL, &(ENABLE | FUNCTION_MASK).to_le_bytes());
    assert_eq!(dev.take_calls(), vec!["triggers Msix 0 ----------"]);
    assert_eq!(f.irq_mode(), IrqMode::Msix);
    for v in 0..3 {
        entry(&mut f, v, false);
    }
    assert!(dev.take_calls().is_empty(), "function mask still set");
    f.config_write(CONTROL, &ENABLE.to_le_bytes());
    assert_eq!(
        dev.take_calls(),
        vec!["triggers Msix 0 +++"],
        "one call for the run of unmasked vectors"
    );
    // Mask vector 1; vectors 0 and 2 keep signalling.
    f.bar_write(3, 16 + 12, &1u32.to_le_bytes());
    assert_eq!(dev.take_calls(), vec!["triggers Msix 1 -"]);
    // The same mask again: nothing to do.
    f.bar_write(3, 16 + 12, &1u32.to_le_bytes());
    assert!(dev.take_calls().is_empty());

    // The device latched vectors 1 and 2 (2 is unmasked: transient, not shown),
    // and 8, 9 and bits past the table (10-15) in the second byte.
    set_device_pba(&dev, &[0b110, 0xff]);
    assert_eq!(pba(&mut f, 0, 8), vec![0b010, 0b11, 0, 0, 0, 0, 0, 0]);
    assert_eq!(pba(&mut f, 0, 4), vec![0b010, 0b11, 0, 0]);
    assert_eq!(pba(&mut f, 1, 1), vec![0b11], "byte reads work too");
    // Unmask vector 1: its trigger is back; no longer shown pending.
    f.bar_write(3, 16 + 12, &0u32.to_le_bytes());
    assert_eq!(dev.take_calls(), vec!["triggers Msix 1 +"]);
    assert_eq!(pba(&mut f, 0, 1), vec![0]);
    // Function mask: only the vectors that were signalling change.
    f.config_write(CONTROL, &(ENABLE | FUNCTION_MASK).to_le_bytes());
    assert_eq!(dev.take_calls(), vec!["triggers Msix 0 ---"]);
    assert_eq!(pba(&mut f, 0, 1), vec![0b110]);
    // Disabled: nothing armed, the PBA reads zero whatever the device says.
    f.config_write(CONTROL, &0u16.to_le_bytes());
    assert_eq!(dev.take_calls(), vec!["disable Msix"]);
    assert_eq!(pba(&mut f, 0, 2), vec![0, 0]);
}

#[test]
fn bad_table_writes_change_no_mask() {
    let (dev, mut f) = i350(None);
    f.config_write(CONTROL, &ENABLE.to_le_bytes());
    assert_eq!(dev.take_calls(), vec!["triggers Msix 0 ----------"]);
    // Partial and unaligned writes of vector 4's control word are ignored.
    f.bar_write(3, 4 * 16 + 12, &[0, 0]);
    f.bar_write(3, 4 * 16 + 12, &[0]);
    f.bar_write(3, 4 * 16 + 13, &[0, 0, 0, 0]);
    f.bar_write(3, 4 * 16 + 10, &[0, 0, 0, 0]);
    // Reserved control bits are dropped; the mask bit stays set.
    f.bar_write(3, 4 * 16 + 12, &0xffff_ffffu32.to_le_bytes());
    assert!(dev.take_calls().is_empty(), "vector 4 still masked");
    let mut c = [0u8; 4];
    f.bar_read(3, 4 * 16 + 12, &mut c);
    assert_eq!(u32::from_le_bytes(c), 1);
    // Writes to the PBA never reach the device and change nothing.
    f.bar_write(3, PBA, &[0; 8]);
    assert!(dev.region_writes.lock().unwrap().is_empty());
    // A valid 8-byte write of data + control unmasks it.
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&0x44u32.to_le_bytes());
    f.bar_write(3, 4 * 16 + 8, &v);
    assert_eq!(dev.take_calls(), vec!["triggers Msix 4 +"]);
    // Config writes of odd widths to the control word are ignored.
    f.config_write(CONTROL, &[0, 0, 0]);
    assert_eq!(f.irq_mode(), IrqMode::Msix);
    assert!(dev.take_calls().is_empty());
}

#[test]
fn a_refused_mask_change_is_retried_on_the_next_write() {
    let (dev, mut f) = i350(None);
    f.config_write(CONTROL, &ENABLE.to_le_bytes());
    dev.take_calls();
    dev.fail_triggers.store(true, Ordering::SeqCst);
    entry(&mut f, 0, false);
    assert!(
        dev.take_calls().is_empty(),
        "the failed call is not recorded"
    );
    set_device_pba(&dev, &[1]);
    assert_eq!(pba(&mut f, 0, 1), vec![1], "still masked on the device");
    dev.fail_triggers.store(false, Ordering::SeqCst);
    f.bar_write(3, 5 * 16 + 8, &0x45u32.to_le_bytes());
    assert_eq!(dev.take_calls(), vec!["triggers Msix 0 +"]);
    assert_eq!(pba(&mut f, 0, 1), vec![0]);
}

#[test]
fn intx_gets_the_lines_trigger_and_resample_eventfds() {
    let line = FakeLine::new();
    let dev = FakeDevice::i350();
    let probe = DeviceProbe::read(&*dev).unwrap();
    let f = VfioPciDevice::new(
        "nic0",
        dev.clone(),
        &probe,
        DeviceWiring {
            router: GsiRouter::new(probe.vectors_needed()),
            intx: Some(line.clone() as Arc<dyn IntxLine>),
            bars: probe.bars,
        },
    )
    .unwrap();
    assert_eq!(f.irq_mode(), IrqMode::Intx);
    assert_eq!(f.intx_pin(), Some(1), "INTA");
    assert_eq!(
        dev.fds.lock().unwrap().as_slice(),
        &[
            ("trigger Intx".to_owned(), line.trigger().as_raw_fd()),
            ("resample".to_owned(), line.resample().as_raw_fd()),
        ]
    );
    let mut cfg = [0u8; 2];
    let mut f = f;
    f.config_read(0x3c, &mut cfg);
    assert_eq!(cfg, [10, 1], "line 10 (the IOAPIC pin), pin INTA");
}

#[test]
fn no_pin_no_intx() {
    let dev = FakeDevice::i350();
    dev.set_config(0x3d, &[0]);
    let probe = DeviceProbe::read(&*dev).unwrap();
    assert!(!probe.has_intx);
    let f = VfioPciDevice::new(
        "nic0",
        dev.clone(),
        &probe,
        DeviceWiring {
            router: GsiRouter::new(probe.vectors_needed()),
            intx: Some(FakeLine::new() as Arc<dyn IntxLine>),
            bars: probe.bars,
        },
    )
    .unwrap();
    assert_eq!(f.irq_mode(), IrqMode::Off);
    assert_eq!(f.intx_pin(), None);
    assert!(dev.calls().is_empty());
}
