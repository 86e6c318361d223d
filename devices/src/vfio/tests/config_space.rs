//! Configuration-space emulation over the NIC and NVMe fixtures.

use super::fake::{i350_space, nvme_space, FakeDevice};
use crate::vfio::backend::VfioBackend;
use crate::vfio::caps::{CAP_MSI, CAP_MSIX, CAP_PCIE, CAP_PM};
use crate::vfio::config::{describe_bars, BarKind, ConfigError, VfioConfig, NUM_BARS};

fn bar_sizes(dev: &FakeDevice) -> [u64; NUM_BARS] {
    let mut s = [0; NUM_BARS];
    for (i, v) in s.iter_mut().enumerate() {
        *v = dev.region_info(i as u32).map_or(0, |r| r.size);
    }
    s
}

/// Builds the guest view with memory BARs placed from 0xc000_0000 up.
fn view(dev: &FakeDevice, intx: Option<u8>) -> VfioConfig {
    let space = dev.config.lock().unwrap().clone();
    let mut bars = describe_bars(&space, bar_sizes(dev)).unwrap();
    let mut next = 0xc000_0000u64;
    for b in bars.iter_mut().filter(|b| b.is_memory()) {
        next = next.div_ceil(b.size) * b.size;
        b.addr = next;
        next += b.size;
    }
    VfioConfig::new(&space, bars, intx).unwrap()
}

fn r32(c: &VfioConfig, dev: &FakeDevice, at: usize) -> u32 {
    let mut d = [0u8; 4];
    c.read(dev, at, &mut d);
    u32::from_le_bytes(d)
}

fn r16(c: &VfioConfig, dev: &FakeDevice, at: usize) -> u16 {
    let mut d = [0u8; 2];
    c.read(dev, at, &mut d);
    u16::from_le_bytes(d)
}

fn r8(c: &VfioConfig, dev: &FakeDevice, at: usize) -> u8 {
    let mut d = [0u8; 1];
    c.read(dev, at, &mut d);
    d[0]
}

fn w32(c: &mut VfioConfig, dev: &FakeDevice, at: usize, v: u32) {
    c.write(dev, at, &v.to_le_bytes());
}

/// The guest's capability list as (offset, id).
fn chain(c: &VfioConfig, dev: &FakeDevice) -> Vec<(usize, u8)> {
    let mut out = Vec::new();
    let mut at = usize::from(r8(c, dev, 0x34));
    while at != 0 && out.len() < 64 {
        out.push((at, r8(c, dev, at)));
        at = usize::from(r8(c, dev, at + 1));
    }
    out
}

#[test]
fn fixtures_are_4k_dumps_with_the_documented_ids() {
    let nic = i350_space();
    let nvme = nvme_space();
    assert_eq!((nic.len(), nvme.len()), (4096, 4096));
    assert_eq!(&nic[..4], &[0x86, 0x80, 0x21, 0x15]);
    assert_eq!(&nvme[..4], &[0x4d, 0x14, 0x08, 0xa8]);
    assert_eq!(&nvme[0x09..0x0c], &[0x02, 0x08, 0x01], "NVMe class 010802");
}

#[test]
fn i350_header_identity_and_hidden_fields() {
    let dev = FakeDevice::i350();
    let c = view(&dev, None);
    assert_eq!(r32(&c, &dev, 0), 0x1521_8086);
    assert_eq!(r32(&c, &dev, 8), 0x0200_0001, "class and revision");
    assert_eq!(r32(&c, &dev, 0x2c), 0x0001_8086, "subsystem");
    assert_eq!(r8(&c, &dev, 0x0e), 0x00, "multi-function bit cleared");
    assert_eq!(r8(&c, &dev, 0x0f), 0, "BIST hidden");
    assert_eq!(r32(&c, &dev, 0x30), 0, "ROM BAR disabled");
    let mut c = c;
    w32(&mut c, &dev, 0x30, 0xffff_ffff);
    assert_eq!(r32(&c, &dev, 0x30), 0, "ROM sizing reads no ROM");
    assert_eq!(r16(&c, &dev, 0x3c), 0, "no INTx wired: pin 0");
    // Status comes from the device, with the capability-list bit.
    assert_ne!(r16(&c, &dev, 6) & 0x10, 0);
    dev.set_config(6, &[0x10, 0x40]); // device sets "signalled target abort"? (bit 14)
    assert_eq!(r16(&c, &dev, 6), 0x4010, "status read live from the device");
}

#[test]
fn i350_capability_chain_keeps_only_safe_capabilities() {
    let dev = FakeDevice::i350();
    let c = view(&dev, None);
    assert_eq!(
        chain(&c, &dev),
        vec![
            (0x40, CAP_PM),
            (0x50, CAP_MSI),
            (0x70, CAP_MSIX),
            (0xa0, CAP_PCIE)
        ]
    );
    // VPD at 0xe0 is unlinked and reads as zeros; extended space is empty.
    assert_eq!(r32(&c, &dev, 0xe0), 0);
    assert_eq!(
        r32(&c, &dev, 0x100),
        0,
        "no extended capabilities (AER, SR-IOV, ACS...)"
    );
    assert_eq!(r32(&c, &dev, 0x160), 0);
    let hidden: Vec<u8> = c
        .capabilities()
        .iter()
        .filter(|k| !k.kept())
        .map(|k| k.id)
        .collect();
    assert_eq!(hidden, vec![0x03]);
}

#[test]
fn nvme_capabilities_msi_and_msix_layout() {
    let dev = FakeDevice::nvme();
    let c = view(&dev, None);
    assert_eq!(
        chain(&c, &dev),
        vec![
            (0x40, CAP_PM),
            (0x50, CAP_MSI),
            (0x70, CAP_PCIE),
            (0xb0, CAP_MSIX)
        ]
    );
    let msi = c.msi().unwrap();
    assert!(msi.is_64bit && !msi.maskable);
    assert_eq!(msi.max_vectors, 32);
    let msix = c.msix().unwrap();
    assert_eq!(
        (
            msix.vectors,
            msix.table_bar,
            msix.table_offset,
            msix.pba_offset
        ),
        (33, 0, 0x3000, 0x2000)
    );
    // MSI-X control starts disabled with the table size; table/PBA registers as on
    // the device.
    assert_eq!(r16(&c, &dev, 0xb2), 32);
    assert_eq!(r32(&c, &dev, 0xb4), 0x3000);
    assert_eq!(r32(&c, &dev, 0xb8), 0x2000);
}

#[test]
fn bar_sizing_for_32_and_64_bit_bars_and_hidden_io_bar() {
    let dev = FakeDevice::i350();
    let mut c = view(&dev, None);
    let bars = c.bars();
    assert_eq!(bars[0].kind, BarKind::Mem32);
    assert_eq!(bars[2].kind, BarKind::Io);
    assert_eq!(r32(&c, &dev, 0x10), 0xc000_0000);
    assert_eq!(r32(&c, &dev, 0x1c), 0xc010_0000);
    w32(&mut c, &dev, 0x10, 0xffff_ffff);
    assert_eq!(r32(&c, &dev, 0x10), 0xfff0_0000, "1 MiB");
    w32(&mut c, &dev, 0x1c, 0xffff_ffff);
    assert_eq!(r32(&c, &dev, 0x1c), 0xffff_c000, "16 KiB");
    w32(&mut c, &dev, 0x18, 0xffff_ffff);
    assert_eq!(r32(&c, &dev, 0x18), 0, "I/O BAR hidden");
    w32(&mut c, &dev, 0x10, 0xc020_0000);
    assert_eq!(c.bar_address(0), Some(0xc020_0000));
    assert!(
        dev.config_writes.lock().unwrap().is_empty(),
        "BAR writes never reach the device"
    );

    let dev = FakeDevice::nvme();
    let mut c = view(&dev, None);
    assert_eq!(c.bars()[0].kind, BarKind::Mem64);
    assert_eq!(r32(&c, &dev, 0x10), 0xc000_0004);
    w32(&mut c, &dev, 0x10, 0xffff_ffff);
    w32(&mut c, &dev, 0x14, 0xffff_ffff);
    assert_eq!(r32(&c, &dev, 0x10), 0xffff_c004);
    assert_eq!(r32(&c, &dev, 0x14), 0xffff_ffff);
    w32(&mut c, &dev, 0x10, 0xd000_0000);
    w32(&mut c, &dev, 0x14, 0x1);
    assert_eq!(c.bar_address(0), Some(0x1_d000_0000));
    assert_eq!(c.bar_of_reg(5), Some(0), "upper half belongs to BAR 0");
}

#[test]
fn command_writes_reach_the_device_filtered() {
    let dev = FakeDevice::i350();
    let mut c = view(&dev, None);
    c.write(&*dev, 4, &0xffffu16.to_le_bytes());
    assert_eq!(
        dev.config_writes.lock().unwrap().as_slice(),
        &[(4, vec![0x06, 0x04])],
        "memory, bus master, INTx disable only"
    );
    assert_eq!(
        r16(&c, &dev, 4),
        0x0406,
        "I/O space, SERR#, parity... read as 0"
    );
}

#[test]
fn status_error_bits_are_write_one_to_clear_and_never_written_back() {
    let dev = FakeDevice::i350();
    let mut c = view(&dev, None);
    dev.set_config(6, &[0x10, 0x81]); // capability list + detected parity error + master data parity
                                      // A command write (dword access) must not clear the pending error bits.
    w32(&mut c, &dev, 4, 0x0000_0002);
    let writes = dev.config_writes.lock().unwrap().clone();
    let (off, bytes) = writes.last().unwrap();
    let mut dword = [0u8; 4];
    dword[..bytes.len()].copy_from_slice(bytes);
    if *off == 4 && bytes.len() == 4 {
        assert_eq!(dword[3], 0, "no 1 written back to a W1C bit");
    }
    assert_eq!(dev.config_byte(7), 0x81, "errors still pending");
    // Clearing one error bit forwards exactly that bit.
    c.write(&*dev, 7, &[0x80]);
    assert_eq!(
        dev.config_writes.lock().unwrap().last().unwrap(),
        &(7, vec![0x80])
    );
}

#[test]
fn pcie_device_control_passes_only_safe_bits() {
    let dev = FakeDevice::i350();
    let mut c = view(&dev, None);
    let devctl = 0xa0 + 8;
    dev.set_config(devctl, &[0x30, 0x28]); // max payload size 256 bytes
                                           // Try to start an FLR (bit 15) and change max payload size (bits 5-7).
    c.write(&*dev, devctl, &0xffffu16.to_le_bytes());
    let (off, bytes) = dev.config_writes.lock().unwrap().last().unwrap().clone();
    assert_eq!(off, devctl as u64);
    let v = u16::from_le_bytes([bytes[0], bytes[1]]);
    assert_eq!(v & 0x8000, 0, "no FLR");
    assert_eq!(v & 0x00e0, 0x0020, "max payload size unchanged");
    assert_eq!(
        v & 0x781f,
        0x781f,
        "error reporting, RO, no-snoop, MRRS pass"
    );
    // Link control is host-owned.
    let before = dev.config_writes.lock().unwrap().len();
    c.write(&*dev, 0xa0 + 0x10, &0xffffu16.to_le_bytes());
    assert_eq!(dev.config_writes.lock().unwrap().len(), before);
}

#[test]
fn vendor_area_reads_pass_through_and_bad_writes_are_ignored() {
    let dev = FakeDevice::i350();
    let mut c = view(&dev, None);
    // 0xf0 is outside every capability: read from the device, never written.
    dev.set_config(0xf0, &[0x5a, 0xa5]);
    assert_eq!(r16(&c, &dev, 0xf0), 0xa55a);
    w32(&mut c, &dev, 0xf0, 0);
    // Hidden VPD, IDs, class, subsystem, cap pointer: ignored.
    w32(&mut c, &dev, 0xe0, 0x8000_0000);
    w32(&mut c, &dev, 0, 0);
    w32(&mut c, &dev, 8, 0);
    w32(&mut c, &dev, 0x2c, 0);
    c.write(&*dev, 0x34, &[0x50]);
    // Past the end, crossing a dword, odd widths.
    assert_eq!(c.write(&*dev, 0x1000, &[1]), None);
    assert_eq!(c.write(&*dev, 0xffe, &[1, 2, 3, 4]), None);
    assert_eq!(c.write(&*dev, 3, &[1, 2]), None);
    assert_eq!(c.write(&*dev, 0, &[1, 2, 3]), None);
    assert_eq!(c.write(&*dev, 0x10, &[]), None);
    assert!(dev.config_writes.lock().unwrap().is_empty());
    assert_eq!(r32(&c, &dev, 0), 0x1521_8086);
    assert_eq!(r8(&c, &dev, 0x34), 0x40);
    let mut d = [0u8; 4];
    c.read(&*dev, 0x1000, &mut d);
    assert_eq!(d, [0xff; 4], "reads past the end are all ones");
    c.read(&*dev, 0x3fe, &mut d);
    assert_eq!(d, [0xff; 4], "crossing reads are all ones");
}

#[test]
fn msi_and_msix_capabilities_are_virtual() {
    let dev = FakeDevice::nvme();
    let mut c = view(&dev, None);
    // MSI: address, data, multiple message enable, enable; nothing reaches the device.
    w32(&mut c, &dev, 0x54, 0xfee0_1003);
    w32(&mut c, &dev, 0x58, 0);
    w32(&mut c, &dev, 0x5c, 0x0000_4041);
    c.write(&*dev, 0x52, &0x0021u16.to_le_bytes());
    assert_eq!(r32(&c, &dev, 0x54), 0xfee0_1000, "address is dword aligned");
    assert_eq!(r16(&c, &dev, 0x5c), 0x4041);
    assert_eq!(
        r16(&c, &dev, 0x52),
        0x008b | 0x0021,
        "MMC 32, 64-bit, MME 4, enabled"
    );
    c.write(&*dev, 0xb2, &0xffffu16.to_le_bytes());
    assert_eq!(
        r16(&c, &dev, 0xb2),
        0xc020,
        "enable + function mask; size read-only"
    );
    assert!(dev.config_writes.lock().unwrap().is_empty());
    assert_eq!(
        dev.config_byte(0x52),
        0x8a,
        "device's MSI control untouched"
    );
}

#[test]
fn a_256_byte_space_works_and_broken_spaces_are_refused() {
    let space = i350_space()[..256].to_vec();
    let dev = FakeDevice::new(
        space.clone(),
        FakeDevice::i350().regions[..6].to_vec().try_into().unwrap(),
        [1, 1, 10],
    );
    let c = view(&dev, None);
    assert_eq!(c.size(), 256);
    assert_eq!(r32(&c, &dev, 0x100), 0xffff_ffff);

    let bars = describe_bars(&space, [0; 6]).unwrap();
    assert_eq!(
        VfioConfig::new(&space[..64], bars, None).unwrap_err(),
        ConfigError::TooShort(64)
    );
    let mut looped = space.clone();
    looped[0xa1] = 0x40; // PCIe -> PM again
    assert!(matches!(
        VfioConfig::new(&looped, bars, None),
        Err(ConfigError::CapabilityLoop(0x40))
    ));
    let mut wild = space.clone();
    wild[0x41] = 0x10; // into the header
    assert!(matches!(
        VfioConfig::new(&wild, bars, None),
        Err(ConfigError::BadCapability(0x10))
    ));
    let mut bridge = space;
    bridge[0x0e] = 0x01;
    assert_eq!(
        VfioConfig::new(&bridge, bars, None).unwrap_err(),
        ConfigError::NotEndpoint(1)
    );
}

#[test]
fn intx_pin_and_line_are_advertised_only_when_wired() {
    let dev = FakeDevice::i350();
    let mut c = view(&dev, Some(10));
    assert_eq!(r16(&c, &dev, 0x3c), 0x010a, "pin INTA, line 10");
    c.write(&*dev, 0x3c, &[5]);
    assert_eq!(r8(&c, &dev, 0x3c), 5, "line is guest scratch");
    c.write(&*dev, 0x3d, &[3]);
    assert_eq!(r8(&c, &dev, 0x3d), 1, "pin is read-only");
}
