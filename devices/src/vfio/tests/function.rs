//! The passed-through function: interrupts, BAR moves, direct mappings, release.

use std::sync::Arc;

use super::fake::{FakeDevice, FakeLine, GsiRouter, Recorder, FIRST_GSI};
use crate::bus::BusDevice;
use crate::pci::msix::MsiMessage;
use crate::pci::PciFunction;
use crate::vfio::bars::FIRST_DEVICE_SLOT;
use crate::vfio::device::{BarAccess, DeviceProbe, DeviceWiring, VfioPciDevice};
use crate::vfio::irq::{IntxLine, IrqMode};

struct Setup {
    dev: Arc<FakeDevice>,
    router: Arc<GsiRouter>,
    rec: Arc<Recorder>,
    function: VfioPciDevice,
}

fn setup(dev: Arc<FakeDevice>, intx: bool) -> Setup {
    let probe = DeviceProbe::read(&*dev).unwrap();
    let router = GsiRouter::new(probe.vectors_needed());
    let mut bars = probe.bars;
    let mut next = 0xc000_0000u64;
    for b in bars.iter_mut().filter(|b| b.is_memory()) {
        next = next.div_ceil(b.size) * b.size;
        b.addr = next;
        next += b.size;
    }
    let line = FakeLine::new();
    let function = VfioPciDevice::new(
        "nic0",
        dev.clone(),
        &probe,
        DeviceWiring {
            router: router.clone(),
            intx: intx.then_some(line as Arc<dyn IntxLine>),
            bars,
        },
    )
    .unwrap();
    let rec = Arc::new(Recorder::default());
    Setup {
        dev,
        router,
        rec,
        function,
    }
}

fn cfg16(f: &mut VfioPciDevice, at: usize, v: u16) {
    f.config_write(at, &v.to_le_bytes());
}

fn cfg32(f: &mut VfioPciDevice, at: usize, v: u32) {
    f.config_write(at, &v.to_le_bytes());
}

fn msg(address: u64, data: u32) -> Option<MsiMessage> {
    Some(MsiMessage { address, data })
}

#[test]
fn probe_counts_vectors() {
    let nic = DeviceProbe::read(&*FakeDevice::i350()).unwrap();
    assert_eq!(nic.vectors_needed(), 10);
    assert!(nic.has_intx);
    let nvme = DeviceProbe::read(&*FakeDevice::nvme()).unwrap();
    assert_eq!(nvme.vectors_needed(), 33);
}

#[test]
fn msix_table_writes_route_vectors_to_their_gsis() {
    let mut s = setup(FakeDevice::i350(), true);
    assert_eq!(
        s.dev.take_calls(),
        vec!["enable Intx 1", "resample Intx"],
        "INTx armed until the guest enables MSI-X"
    );
    let f = &mut s.function;
    // The table is in BAR 3 at offset 0: program vectors 0 and 3 (trapped writes).
    for (v, data) in [(0u64, 0x41u32), (3, 0x44)] {
        f.bar_write(3, v * 16, &0xfee0_0000u32.to_le_bytes());
        f.bar_write(3, v * 16 + 4, &0u32.to_le_bytes());
        f.bar_write(3, v * 16 + 8, &data.to_le_bytes());
        f.bar_write(3, v * 16 + 12, &0u32.to_le_bytes());
    }
    assert!(s.router.take().is_empty(), "nothing routed before enable");
    assert!(
        s.dev.region_writes.lock().unwrap().is_empty(),
        "table writes never reach the device"
    );
    // Enable MSI-X (control at 0x72).
    cfg16(f, 0x72, 0x8000);
    assert_eq!(
        s.dev.take_calls(),
        vec!["disable Intx", "triggers Msix 0 +--+------"],
        "MSI-X armed with the guest's masks: only vectors 0 and 3 signal"
    );
    assert_eq!(f.irq_mode(), IrqMode::Msix);
    let mut routes = s.router.take();
    routes.sort_by_key(|r| r.0);
    assert_eq!(
        routes,
        vec![
            (FIRST_GSI, msg(0xfee0_0000, 0x41)),
            (FIRST_GSI + 3, msg(0xfee0_0000, 0x44)),
        ]
    );
    // Reprogram vector 3 while enabled, then mask it.
    f.bar_write(3, 3 * 16 + 8, &0x55u32.to_le_bytes());
    f.bar_write(3, 3 * 16 + 12, &1u32.to_le_bytes());
    assert_eq!(
        s.router.take(),
        vec![
            (FIRST_GSI + 3, msg(0xfee0_0000, 0x55)),
            (FIRST_GSI + 3, None)
        ]
    );
    assert_eq!(
        s.dev.take_calls(),
        vec!["triggers Msix 3 -"],
        "the mask reaches the device"
    );
    let mut d = [0u8; 4];
    f.bar_read(3, 3 * 16 + 8, &mut d);
    assert_eq!(
        u32::from_le_bytes(d),
        0x55,
        "table reads come from the emulation"
    );
    // Function mask, then disable: routes removed, INTx back.
    cfg16(f, 0x72, 0xc000);
    assert_eq!(s.router.take(), vec![(FIRST_GSI, None)]);
    assert_eq!(s.dev.take_calls(), vec!["triggers Msix 0 -"]);
    cfg16(f, 0x72, 0x0000);
    assert_eq!(
        s.dev.take_calls(),
        vec!["disable Msix", "enable Intx 1", "resample Intx"]
    );
    assert_eq!(f.irq_mode(), IrqMode::Intx);
}

#[test]
fn msi_vectors_follow_the_capability() {
    let mut s = setup(FakeDevice::nvme(), false);
    assert!(s.dev.take_calls().is_empty(), "no INTx line: nothing armed");
    let f = &mut s.function;
    cfg32(f, 0x54, 0xfee0_2000);
    cfg32(f, 0x58, 0);
    cfg16(f, 0x5c, 0x60);
    // MME = 2 (4 vectors), enable.
    cfg16(f, 0x52, (2 << 4) | 1);
    assert_eq!(s.dev.take_calls(), vec!["enable Msi 4"]);
    assert_eq!(f.irq_mode(), IrqMode::Msi(4));
    assert_eq!(
        s.router.take(),
        (0..4)
            .map(|v| (FIRST_GSI + v, msg(0xfee0_2000, 0x60 | v)))
            .collect::<Vec<_>>()
    );
    // New data while enabled re-routes every vector.
    cfg16(f, 0x5c, 0x80);
    assert_eq!(s.router.take().len(), 4);
    // MSI-X wins over MSI.
    cfg16(f, 0xb2, 0x8000);
    assert_eq!(
        s.dev.take_calls(),
        vec![
            "disable Msi",
            "triggers Msix 0 ---------------------------------"
        ]
    );
    assert_eq!(
        s.router.take(),
        (0..4).map(|v| (FIRST_GSI + v, None)).collect::<Vec<_>>(),
        "MSI routes dropped"
    );
    cfg16(f, 0xb2, 0);
    assert_eq!(s.dev.take_calls(), vec!["disable Msix", "enable Msi 4"]);
}

#[test]
fn guest_bar_moves_follow_memory_decoding_and_the_window() {
    let mut s = setup(FakeDevice::i350(), false);
    let f = &mut s.function;
    f.set_bar_mapper(s.rec.clone(), 0xc000_0000..0xfec0_0000);
    let used = f.setup_direct(s.rec.clone(), FIRST_DEVICE_SLOT).unwrap();
    // BAR 0: one area; BAR 3: the pages around the table (0x0) and PBA (0x2000).
    assert_eq!(used, 3);
    assert_eq!(
        s.dev.take_calls(),
        vec![
            "mmap 0 0x0+0x100000",
            "mmap 3 0x1000+0x1000",
            "mmap 3 0x3000+0x1000"
        ]
    );
    assert!(
        s.rec.take().is_empty(),
        "memory decoding off: nothing mapped"
    );
    cfg16(f, 4, 0x0006);
    assert_eq!(
        s.rec.take(),
        vec![
            "map slot 16 at 0xc0000000 len 0x100000",
            "map slot 17 at 0xc0101000 len 0x1000",
            "map slot 18 at 0xc0103000 len 0x1000",
        ]
    );
    // Linux' way: decoding off, program, decoding on.
    cfg16(f, 4, 0x0004);
    assert_eq!(
        s.rec.take(),
        vec!["unmap slot 16", "unmap slot 17", "unmap slot 18"]
    );
    cfg32(f, 0x10, 0xffff_ffff); // sizing: no move
    cfg32(f, 0x10, 0xd000_0000);
    assert!(s.rec.take().is_empty(), "no moves while decoding is off");
    cfg16(f, 4, 0x0006);
    assert_eq!(
        s.rec.take(),
        vec![
            "move 0xc0000000 -> 0xd0000000 len 0x100000",
            "map slot 16 at 0xd0000000 len 0x100000",
            "map slot 17 at 0xc0101000 len 0x1000",
            "map slot 18 at 0xc0103000 len 0x1000",
        ]
    );
    assert_eq!(f.bus_ranges()[0], (0, 0xd000_0000, 0x10_0000));
    // Outside the window, or sizing while decoding is on: stays put.
    cfg32(f, 0x10, 0x1000_0000);
    cfg32(f, 0x10, 0xffff_ffff);
    assert!(s.rec.take().is_empty());
    assert_eq!(f.bus_ranges()[0], (0, 0xd000_0000, 0x10_0000));
}

#[test]
fn trapped_bar_accesses_reach_the_region_except_msix() {
    let s = setup(FakeDevice::i350(), false);
    let dev = s.dev.clone();
    let shared = Arc::new(std::sync::Mutex::new(s.function));
    let mut bar0 = BarAccess::new(shared.clone(), 0);
    let mut bar3 = BarAccess::new(shared, 3);
    bar0.write(0x8, &0x1234_5678u32.to_le_bytes());
    let mut d = [0u8; 4];
    bar0.read(0x8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x1234_5678);
    bar3.write(0x2000, &[0xff; 8]); // PBA: ignored
    bar3.write(0x10, &[1, 2, 3, 4]); // table: emulated
    bar3.write(0x3000, &[9, 9, 9, 9]); // past table and PBA: device
    assert_eq!(
        dev.region_writes.lock().unwrap().as_slice(),
        &[
            (0, 0x8, vec![0x78, 0x56, 0x34, 0x12]),
            (3, 0x3000, vec![9; 4])
        ]
    );
    let mut d = [0u8; 8];
    bar3.read(0x2000, &mut d);
    assert_eq!(d, [0; 8]);
}

#[test]
fn release_disarms_unmaps_and_resets_once() {
    let mut s = setup(FakeDevice::i350(), false);
    let f = &mut s.function;
    f.setup_direct(s.rec.clone(), FIRST_DEVICE_SLOT).unwrap();
    cfg16(f, 4, 0x0006);
    f.bar_write(3, 0, &0xfee0_0000u32.to_le_bytes());
    f.bar_write(3, 12, &0u32.to_le_bytes());
    cfg16(f, 0x72, 0x8000);
    s.dev.take_calls();
    s.rec.take();
    s.router.take();
    f.release();
    assert_eq!(s.dev.take_calls(), vec!["disable Msix", "reset"]);
    assert_eq!(s.router.take(), vec![(FIRST_GSI, None)]);
    assert_eq!(
        s.rec.take(),
        vec!["unmap slot 16", "unmap slot 17", "unmap slot 18"]
    );
    f.release();
    cfg16(f, 0x72, 0x8000);
    assert!(s.dev.take_calls().is_empty(), "released: idempotent, inert");
    drop(s.function);
    assert!(
        s.dev.calls().is_empty(),
        "drop after release does nothing more"
    );
}

#[test]
fn a_64bit_bar_moves_within_the_high_window() {
    // NVMe BAR 0: 64-bit, 16 KiB, placed at 0xc0000000 by `setup`.
    let mut s = setup(FakeDevice::nvme(), false);
    let f = &mut s.function;
    f.set_bar_mapper(s.rec.clone(), 0xc000_0000..0xfec0_0000);
    f.add_bar_window(0x10_0000_0000..0x20_0000_0000);
    f.setup_direct(s.rec.clone(), FIRST_DEVICE_SLOT).unwrap();
    cfg16(f, 4, 0x0006);
    s.rec.take();
    // Decoding off, both halves programmed, decoding on.
    cfg16(f, 4, 0x0004);
    cfg32(f, 0x10, 0x0000_4000);
    cfg32(f, 0x14, 0x10);
    s.rec.take();
    cfg16(f, 4, 0x0006);
    let log = s.rec.take();
    assert!(
        log.contains(&"move 0xc0000000 -> 0x1000004000 len 0x4000".to_owned()),
        "{log:?}"
    );
    assert_eq!(f.bus_ranges()[0], (0, 0x10_0000_4000, 0x4000));
    // Past both windows (above the high window's end): refused, stays put.
    cfg16(f, 4, 0x0004);
    cfg32(f, 0x14, 0x40);
    cfg16(f, 4, 0x0006);
    assert!(!s.rec.take().iter().any(|l| l.starts_with("move")));
    assert_eq!(f.bus_ranges()[0], (0, 0x10_0000_4000, 0x4000));
}
