//! A fake VFIO device, router, INTx line and mappers that record what they are told.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::pci::msix::{MsiMessage, VectorRouter};
use crate::pci::BarMapper;
use crate::vfio::backend::{
    BackendError, DmaMapper, HostMapping, IrqKind, RegionInfo, VfioBackend, CONFIG_REGION,
};
use crate::vfio::bars::SlotMapper;
use crate::vfio::irq::IntxLine;

/// Parses an `lspci -xxxx`-style dump (lines `OFF: b0 b1 ...`, `#` comments).
pub fn parse_dump(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (off, bytes) = line.split_once(':').unwrap();
        assert_eq!(usize::from_str_radix(off, 16).unwrap(), out.len(), "{line}");
        out.extend(
            bytes
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap()),
        );
    }
    out
}

pub fn i350_space() -> Vec<u8> {
    parse_dump(include_str!("../testdata/i350-8086-1521.txt"))
}

pub fn nvme_space() -> Vec<u8> {
    parse_dump(include_str!("../testdata/nvme-144d-a808.txt"))
}

fn mem_region(size: u64, mmap: bool) -> Option<RegionInfo> {
    Some(RegionInfo {
        size,
        readable: true,
        writable: true,
        mmap,
        sparse: None,
    })
}

/// A device: configuration space and BAR contents in memory, calls recorded.
pub struct FakeDevice {
    pub config: Mutex<Vec<u8>>,
    pub config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
    pub regions: Vec<Option<RegionInfo>>,
    pub bar_data: Mutex<HashMap<u32, Vec<u8>>>,
    pub region_writes: Mutex<Vec<(u32, u64, Vec<u8>)>>,
    pub irq_counts: HashMap<IrqKind, u32>,
    pub calls: Mutex<Vec<String>>,
    /// Raw fds of every eventfd handed over: ("trigger Intx", fd), ("resample", fd).
    pub fds: Mutex<Vec<(String, RawFd)>>,
    /// Fails `set_irq_triggers` while set.
    pub fail_triggers: std::sync::atomic::AtomicBool,
}

impl FakeDevice {
    pub fn new(space: Vec<u8>, bars: [Option<RegionInfo>; 6], irqs: [u32; 3]) -> Arc<Self> {
        let mut regions: Vec<Option<RegionInfo>> = bars.to_vec();
        regions.push(None); // ROM
        regions.push(mem_region(space.len() as u64, false));
        let mut bar_data = HashMap::new();
        for (i, r) in regions.iter().enumerate().take(6) {
            if let Some(r) = r {
                bar_data.insert(i as u32, vec![0u8; r.size as usize]);
            }
        }
        Arc::new(Self {
            config: Mutex::new(space),
            config_writes: Mutex::new(Vec::new()),
            regions,
            bar_data: Mutex::new(bar_data),
            region_writes: Mutex::new(Vec::new()),
            irq_counts: HashMap::from([
                (IrqKind::Intx, irqs[0]),
                (IrqKind::Msi, irqs[1]),
                (IrqKind::Msix, irqs[2]),
            ]),
            calls: Mutex::new(Vec::new()),
            fds: Mutex::new(Vec::new()),
            fail_triggers: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// An I350 port: BAR0 1 MiB, BAR2 32-byte I/O, BAR3 16 KiB (MSI-X table and PBA).
    pub fn i350() -> Arc<Self> {
        let io = Some(RegionInfo {
            size: 32,
            readable: true,
            writable: true,
            mmap: false,
            sparse: None,
        });
        Self::new(
            i350_space(),
            [
                mem_region(1 << 20, true),
                None,
                io,
                mem_region(16 << 10, true),
                None,
                None,
            ],
            [1, 1, 10],
        )
    }

    /// A Samsung NVMe controller: BAR0 16 KiB, 64-bit.
    pub fn nvme() -> Arc<Self> {
        Self::new(
            nvme_space(),
            [mem_region(16 << 10, true), None, None, None, None, None],
            [1, 32, 33],
        )
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    pub fn config_byte(&self, at: usize) -> u8 {
        self.config.lock().unwrap()[at]
    }

    pub fn set_config(&self, at: usize, bytes: &[u8]) {
        self.config.lock().unwrap()[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn call(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
}

impl VfioBackend for FakeDevice {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(index as usize).cloned().flatten()
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) {
        let off = offset as usize;
        if index == CONFIG_REGION {
            let c = self.config.lock().unwrap();
            data.copy_from_slice(&c[off..off + data.len()]);
            return;
        }
        if let Some(mem) = self.bar_data.lock().unwrap().get(&index) {
            data.copy_from_slice(&mem[off..off + data.len()]);
        }
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) {
        let off = offset as usize;
        if index == CONFIG_REGION {
            let mut c = self.config.lock().unwrap();
            for (i, b) in data.iter().enumerate() {
                c[off + i] = match off + i {
                    // Status: low byte read-only, high byte write-1-to-clear.
                    6 => c[6],
                    7 => c[7] & !b,
                    _ => *b,
                };
            }
            drop(c);
            self.config_writes
                .lock()
                .unwrap()
                .push((offset, data.to_vec()));
            return;
        }
        if let Some(mem) = self.bar_data.lock().unwrap().get_mut(&index) {
            mem[off..off + data.len()].copy_from_slice(data);
        }
        self.region_writes
            .lock()
            .unwrap()
            .push((index, offset, data.to_vec()));
    }

    fn mmap_region(&self, index: u32, offset: u64, len: u64) -> Result<HostMapping, BackendError> {
        self.call(format!("mmap {index} {offset:#x}+{len:#x}"));
        HostMapping::anonymous(len as usize).map_err(|e| BackendError::new("mmap", e))
    }

    fn irq_count(&self, kind: IrqKind) -> u32 {
        self.irq_counts.get(&kind).copied().unwrap_or(0)
    }

    fn enable_irq(&self, kind: IrqKind, fds: &[&EventFd]) -> Result<(), BackendError> {
        self.call(format!("enable {kind:?} {}", fds.len()));
        let mut log = self.fds.lock().unwrap();
        log.extend(
            fds.iter()
                .map(|f| (format!("trigger {kind:?}"), f.as_raw_fd())),
        );
        Ok(())
    }

    /// Recorded as "triggers KIND START PATTERN", '+' an eventfd, '-' none.
    fn set_irq_triggers(
        &self,
        kind: IrqKind,
        start: u32,
        fds: &[Option<&EventFd>],
    ) -> Result<(), BackendError> {
        if self.fail_triggers.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(BackendError::new("VFIO_DEVICE_SET_IRQS", "EINVAL"));
        }
        let pattern: String = fds
            .iter()
            .map(|f| if f.is_some() { '+' } else { '-' })
            .collect();
        self.call(format!("triggers {kind:?} {start} {pattern}"));
        let mut log = self.fds.lock().unwrap();
        for (i, f) in fds.iter().enumerate() {
            if let Some(f) = f {
                log.push((
                    format!("trigger {kind:?} {}", start as usize + i),
                    f.as_raw_fd(),
                ));
            }
        }
        Ok(())
    }

    fn disable_irq(&self, kind: IrqKind) -> Result<(), BackendError> {
        self.call(format!("disable {kind:?}"));
        Ok(())
    }

    fn set_intx_resample(&self, fd: &EventFd) -> Result<(), BackendError> {
        self.call("resample Intx".to_owned());
        self.fds
            .lock()
            .unwrap()
            .push(("resample".to_owned(), fd.as_raw_fd()));
        Ok(())
    }

    fn reset(&self) -> Result<bool, BackendError> {
        self.call("reset".to_owned());
        Ok(true)
    }
}

/// Vector v is GSI 24 + v; records GSI route changes.
pub struct GsiRouter {
    fds: Vec<EventFd>,
    pub routes: Mutex<Vec<(u32, Option<MsiMessage>)>>,
}

pub const FIRST_GSI: u32 = 24;

impl GsiRouter {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            fds: (0..n).map(|_| EventFd::new(0).unwrap()).collect(),
            routes: Mutex::new(Vec::new()),
        })
    }

    pub fn take(&self) -> Vec<(u32, Option<MsiMessage>)> {
        std::mem::take(&mut *self.routes.lock().unwrap())
    }
}

impl VectorRouter for GsiRouter {
    fn vectors(&self) -> usize {
        self.fds.len()
    }
    fn update(&self, vector: usize, message: Option<MsiMessage>) {
        self.routes
            .lock()
            .unwrap()
            .push((FIRST_GSI + vector as u32, message));
    }
    fn trigger(&self, _vector: usize) {}
    fn eventfd(&self, vector: usize) -> Option<&EventFd> {
        self.fds.get(vector)
    }
}

/// An INTx line on IOAPIC pin 10.
pub struct FakeLine {
    trigger: EventFd,
    resample: EventFd,
}

impl FakeLine {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            trigger: EventFd::new(0).unwrap(),
            resample: EventFd::new(0).unwrap(),
        })
    }
}

impl IntxLine for FakeLine {
    fn trigger(&self) -> &EventFd {
        &self.trigger
    }
    fn resample(&self) -> &EventFd {
        &self.resample
    }
    fn line(&self) -> u8 {
        10
    }
}

/// Records BAR moves (MMIO bus) and slot changes (KVM).
#[derive(Default)]
pub struct Recorder {
    pub log: Mutex<Vec<String>>,
}

impl Recorder {
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl BarMapper for Recorder {
    fn move_bar(&self, old: u64, new: u64, len: u64) -> Result<(), String> {
        self.log
            .lock()
            .unwrap()
            .push(format!("move {old:#x} -> {new:#x} len {len:#x}"));
        Ok(())
    }
    fn move_ioeventfd(&self, _fd: &EventFd, _old: u64, _new: u64) -> Result<(), String> {
        Ok(())
    }
}

impl SlotMapper for Recorder {
    fn map(&self, slot: u32, guest_addr: u64, mapping: &HostMapping) -> Result<(), String> {
        self.log.lock().unwrap().push(format!(
            "map slot {slot} at {guest_addr:#x} len {:#x}",
            mapping.len()
        ));
        Ok(())
    }
    fn unmap(&self, slot: u32) -> Result<(), String> {
        self.log.lock().unwrap().push(format!("unmap slot {slot}"));
        Ok(())
    }
}

/// A DMA mapper that records, and fails the `fail_at`-th map call.
pub struct FakeDma {
    pub log: Mutex<Vec<String>>,
    pub fail_at: Option<usize>,
}

impl DmaMapper for FakeDma {
    unsafe fn map(&self, iova: u64, size: u64, _host: *mut u8) -> Result<(), BackendError> {
        let mut log = self.log.lock().unwrap();
        let n = log.iter().filter(|l| l.starts_with("map")).count();
        if self.fail_at == Some(n) {
            return Err(BackendError::new("VFIO_IOMMU_MAP_DMA", "ENOMEM"));
        }
        log.push(format!("map {iova:#x}+{size:#x}"));
        Ok(())
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<(), BackendError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("unmap {iova:#x}+{size:#x}"));
        Ok(())
    }
}
