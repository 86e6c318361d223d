//! A passed-through PCI function: the guest's configuration space (emulated over the
//! device's), its BARs (directly mapped where possible, trapped elsewhere), the
//! MSI-X table, and interrupt arming.

use std::sync::{Arc, Mutex};

use log::{debug, info, warn};

use super::backend::{BackendError, VfioBackend, CONFIG_REGION};
use super::bars::{self, DirectArea, SlotMapper};
use super::caps::{MsiCap, MsixCap};
use super::config::{
    describe_bars, BarDesc, ConfigError, VfioConfig, COMMAND_MEMORY, LEGACY_SIZE, NUM_BARS,
    REG_INTERRUPT,
};
use super::irq::{Interrupts, IntxLine, MsiState};
use crate::bus::BusDevice;
use crate::pci::msix::{Msix, VectorRouter};
use crate::pci::{BarMapper, BarWindow, PciFunction};

/// Errors while setting up a passed-through function.
#[derive(Debug, thiserror::Error)]
pub enum VfioDeviceError {
    /// The device has no configuration region.
    #[error("the device has no PCI configuration region")]
    NoConfigRegion,
    /// The configuration space cannot be passed through.
    #[error("configuration space: {0}")]
    Config(#[from] ConfigError),
    /// A VFIO operation failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A BAR could not be mapped into the guest.
    #[error("BAR {bar}: {reason}")]
    Map {
        /// BAR index.
        bar: usize,
        /// What failed.
        reason: String,
    },
}

/// What a device offers, read before its BARs are placed and its vectors allocated.
#[derive(Debug, Clone)]
pub struct DeviceProbe {
    /// The device's configuration space (256 or 4096 bytes).
    pub space: Vec<u8>,
    /// Its BARs, not yet placed.
    pub bars: [BarDesc; NUM_BARS],
    /// MSI capability.
    pub msi: Option<MsiCap>,
    /// MSI-X capability.
    pub msix: Option<MsixCap>,
    /// Whether the device has an INTx pin.
    pub has_intx: bool,
}

impl DeviceProbe {
    /// Reads the configuration space and BAR regions of `backend`.
    pub fn read(backend: &dyn VfioBackend) -> Result<Self, VfioDeviceError> {
        let region = backend
            .region_info(CONFIG_REGION)
            .filter(|r| r.size >= LEGACY_SIZE as u64)
            .ok_or(VfioDeviceError::NoConfigRegion)?;
        let len = region.size.min(super::config::CONFIG_SIZE as u64) as usize;
        let mut space = vec![0u8; len];
        for (i, chunk) in space.chunks_mut(4).enumerate() {
            backend.read_region(CONFIG_REGION, (i * 4) as u64, chunk);
        }
        let mut sizes = [0u64; NUM_BARS];
        for (i, s) in sizes.iter_mut().enumerate() {
            *s = backend.region_info(i as u32).map_or(0, |r| r.size);
        }
        let bars = describe_bars(&space, sizes)?;
        let caps = super::caps::parse(&space)?;
        Ok(Self {
            msi: super::caps::msi(&space, &caps),
            msix: super::caps::msix(&space, &caps),
            has_intx: space.get(0x3d).is_some_and(|&p| p != 0),
            space,
            bars,
        })
    }

    /// Interrupt vectors the device needs from the VMM (MSI-X table size or MSI
    /// maximum, whichever is larger; at least 1).
    pub fn vectors_needed(&self) -> usize {
        let msix = self.msix.map_or(0, |m| m.vectors);
        let msi = self.msi.map_or(0, |m| m.max_vectors);
        msix.max(msi).max(1) as usize
    }
}

/// How the VMM wires a device.
pub struct DeviceWiring {
    /// The device's vectors (MSI and MSI-X share them; one mode is armed at a time).
    pub router: Arc<dyn VectorRouter>,
    /// INTx line, if the VMM wired one.
    pub intx: Option<Arc<dyn IntxLine>>,
    /// BARs with the guest addresses the VMM placed them at.
    pub bars: [BarDesc; NUM_BARS],
}

/// A passed-through PCI function.
pub struct VfioPciDevice {
    name: String,
    backend: Arc<dyn VfioBackend>,
    config: VfioConfig,
    msix: Option<(MsixCap, Msix)>,
    irqs: Interrupts,
    /// Where each memory BAR sits on the MMIO bus.
    mapped: [Option<u64>; NUM_BARS],
    areas: [Vec<DirectArea>; NUM_BARS],
    mapper: Option<(Arc<dyn BarMapper>, Vec<BarWindow>)>,
    slots: Option<Arc<dyn SlotMapper>>,
    released: bool,
    /// Resources that must outlive the device (its container, the DMA mappings of
    /// guest RAM); dropped after the device was released.
    held: Vec<Arc<dyn std::any::Any + Send + Sync>>,
}

impl VfioPciDevice {
    /// Builds the function from its probe and the VMM's wiring; arms INTx if wired.
    pub fn new(
        name: impl Into<String>,
        backend: Arc<dyn VfioBackend>,
        probe: &DeviceProbe,
        wiring: DeviceWiring,
    ) -> Result<Self, VfioDeviceError> {
        let name = name.into();
        let intx = if probe.has_intx { wiring.intx } else { None };
        let line = intx.as_ref().map(|l| l.line());
        let config = VfioConfig::new(&probe.space, wiring.bars, line)?;
        let msix = config
            .msix()
            .map(|cap| (cap, Msix::new(Arc::clone(&wiring.router))));
        let msix_vectors = config.msix().map_or(0, |m| m.vectors);
        let mut irqs = Interrupts::new(
            &name,
            Arc::clone(&backend),
            wiring.router,
            intx,
            msix_vectors,
        );
        irqs.follow(false, MsiState::default());
        let mut mapped = [None; NUM_BARS];
        for (i, bar) in wiring.bars.iter().enumerate() {
            if bar.is_memory() {
                mapped[i] = Some(bar.addr);
            }
        }
        Ok(Self {
            name,
            backend,
            config,
            msix,
            irqs,
            mapped,
            areas: Default::default(),
            mapper: None,
            slots: None,
            released: false,
            held: Vec::new(),
        })
    }

    /// The device's name (its `[[vfio]]` id).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keeps `resource` alive until the device is dropped (after its release).
    pub fn hold(&mut self, resource: Arc<dyn std::any::Any + Send + Sync>) {
        self.held.push(resource);
    }

    /// The memory BARs to put on the MMIO bus: (index, guest address, size).
    pub fn bus_ranges(&self) -> Vec<(usize, u64, u64)> {
        let bars = self.config.bars();
        (0..NUM_BARS)
            .filter_map(|i| self.mapped[i].map(|addr| (i, addr, bars[i].size)))
            .collect()
    }

    /// The interrupt pin the guest sees (1 = INTA .. 4 = INTD), None when INTx is
    /// not wired (the pin reads 0).
    pub fn intx_pin(&self) -> Option<u8> {
        let pin = (self.config.virt(REG_INTERRUPT) >> 8) as u8;
        (pin != 0).then_some(pin)
    }

    /// The armed interrupt mode.
    pub fn irq_mode(&self) -> super::irq::IrqMode {
        self.irqs.mode()
    }

    /// Lets the guest move BARs within `window`.
    pub fn set_bar_mapper(&mut self, mapper: Arc<dyn BarMapper>, window: BarWindow) {
        self.mapper = Some((mapper, vec![window]));
    }

    /// Lets the guest move BARs within `window` too (the high MMIO window). Needs
    /// [`VfioPciDevice::set_bar_mapper`] first; ignored otherwise.
    pub fn add_bar_window(&mut self, window: BarWindow) {
        if let Some((_, windows)) = &mut self.mapper {
            windows.push(window);
        }
    }

    fn msix_holes(&self, bar: usize) -> Vec<(u64, u64)> {
        let Some((cap, _)) = &self.msix else {
            return Vec::new();
        };
        let mut holes = Vec::new();
        if usize::from(cap.table_bar) == bar {
            holes.push((cap.table_offset, cap.table_len()));
        }
        if usize::from(cap.pba_bar) == bar {
            holes.push((cap.pba_offset, cap.pba_len()));
        }
        holes
    }

    /// Prepares direct mappings of the mmap-able parts of every memory BAR, as KVM
    /// slots `first_slot..`; they are mapped while the guest enables memory decoding.
    /// Returns the number of slots used.
    pub fn setup_direct(
        &mut self,
        slots: Arc<dyn SlotMapper>,
        first_slot: u32,
    ) -> Result<u32, VfioDeviceError> {
        let mut next = first_slot;
        for i in 0..NUM_BARS {
            if self.mapped[i].is_none() {
                continue;
            }
            let Some(region) = self.backend.region_info(i as u32) else {
                continue;
            };
            let size = self.config.bars()[i].size;
            for (offset, len) in bars::direct_areas(&region, size, &self.msix_holes(i)) {
                let mapping = self.backend.mmap_region(i as u32, offset, len)?;
                self.areas[i].push(DirectArea {
                    offset,
                    mapping,
                    slot: next,
                    mapped_at: None,
                });
                next += 1;
            }
        }
        self.slots = Some(slots);
        self.sync_all_bars();
        Ok(next - first_slot)
    }

    fn memory_enabled(&self) -> bool {
        let mut cmd = [0u8; 2];
        self.config.read(&*self.backend, 4, &mut cmd);
        u16::from_le_bytes(cmd) & COMMAND_MEMORY != 0
    }

    fn sync_all_bars(&mut self) {
        for i in 0..NUM_BARS {
            self.sync_bar(i);
        }
    }

    /// Follows the guest's BAR programming and memory decoding: moves the trapped
    /// range on the MMIO bus and the direct mappings to a valid new address; maps
    /// direct areas only while memory decoding is on (the kernel refuses access to
    /// a BAR of a device with memory decoding off).
    fn sync_bar(&mut self, i: usize) {
        let Some(current) = self.mapped[i] else {
            return;
        };
        let memory_on = self.memory_enabled();
        let size = self.config.bars()[i].size;
        let mut target = current;
        if let (Some(wanted), Some((mapper, windows))) = (self.config.bar_address(i), &self.mapper)
        {
            // A 32-bit BAR's address is always below 4 GiB, so it can only fit the hole.
            let fits = windows
                .iter()
                .any(|w| wanted >= w.start && wanted.checked_add(size).is_some_and(|e| e <= w.end));
            if memory_on && fits && wanted != current {
                match mapper.move_bar(current, wanted, size) {
                    Ok(()) => {
                        info!(
                            "{}: BAR {i} moved by the guest {current:#x} -> {wanted:#x}",
                            self.name
                        );
                        target = wanted;
                        self.mapped[i] = Some(wanted);
                    }
                    Err(e) => warn!(
                        "{}: BAR {i} move {current:#x} -> {wanted:#x} refused: {e}",
                        self.name
                    ),
                }
            }
        }
        let Some(slots) = self.slots.clone() else {
            return;
        };
        let areas = &mut self.areas[i];
        let at_target = areas.iter().all(|a| a.mapped_at == Some(target + a.offset));
        if memory_on && at_target {
            return;
        }
        bars::unmap_all(&slots, areas, &self.name);
        if memory_on {
            if let Err(e) = bars::map_all(&slots, areas, target) {
                warn!(
                    "{}: BAR {i}: direct mapping failed, trapping: {e}",
                    self.name
                );
                bars::unmap_all(&slots, areas, &self.name);
            }
        }
    }

    fn msi_state(&self) -> MsiState {
        let Some(cap) = self.config.msi() else {
            return MsiState::default();
        };
        let control = self.config.virt_word(cap.offset + 2);
        let mme = u32::from((control >> 4) & 7).min(5);
        let lo = u64::from(self.config.virt((cap.offset + 4) / 4));
        let hi = if cap.is_64bit {
            u64::from(self.config.virt((cap.offset + 8) / 4))
        } else {
            0
        };
        MsiState {
            enabled: control & 1 != 0,
            vectors: (1u32 << mme).min(cap.max_vectors),
            address: lo | (hi << 32),
            data: self.config.virt(cap.data_offset() / 4) & 0xffff,
            mask: if cap.maskable {
                self.config.virt(cap.mask_offset() / 4)
            } else {
                0
            },
        }
    }

    fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|(_, m)| m.enabled())
    }

    /// A guest read of the MSI-X PBA at `offset` of its BAR: the device's pending
    /// bits, for the vectors masked on the device (the others are delivered as they
    /// fire, so a pending bit there is transient). Bytes past the PBA read as zero.
    fn read_pba(&self, cap: &MsixCap, offset: u64, data: &mut [u8]) {
        let mut device = vec![0u8; data.len()];
        self.backend
            .read_region(u32::from(cap.pba_bar), offset, &mut device);
        let first_bit = (offset - cap.pba_offset) * 8;
        for (i, (out, dev)) in data.iter_mut().zip(&device).enumerate() {
            *out = 0;
            for bit in 0..8u64 {
                let v = first_bit + i as u64 * 8 + bit;
                let off = usize::try_from(v).is_ok_and(|v| self.irqs.msix_off(v));
                if off && v < u64::from(cap.vectors) && dev & (1 << bit) != 0 {
                    *out |= 1 << bit;
                }
            }
        }
    }

    /// Reads from BAR `bar` at `offset` (a trapped access).
    pub fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some((cap, msix)) = &self.msix {
            if usize::from(cap.table_bar) == bar
                && (cap.table_offset..cap.table_offset + cap.table_len()).contains(&offset)
            {
                msix.read_table(offset - cap.table_offset, data);
                return;
            }
            if usize::from(cap.pba_bar) == bar
                && (cap.pba_offset..cap.pba_offset + cap.pba_len()).contains(&offset)
            {
                let cap = *cap;
                self.read_pba(&cap, offset, data);
                return;
            }
        }
        data.fill(0xff);
        self.backend.read_region(bar as u32, offset, data);
    }

    /// Writes to BAR `bar` at `offset` (a trapped access).
    pub fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some((cap, msix)) = &mut self.msix {
            if usize::from(cap.table_bar) == bar
                && (cap.table_offset..cap.table_offset + cap.table_len()).contains(&offset)
            {
                msix.write_table(offset - cap.table_offset, data);
                let masked = msix.masked_vectors();
                self.irqs.set_msix_masks(&masked);
                return;
            }
            if usize::from(cap.pba_bar) == bar
                && (cap.pba_offset..cap.pba_offset + cap.pba_len()).contains(&offset)
            {
                debug!("{}: ignored write to the MSI-X PBA", self.name);
                return;
            }
        }
        self.backend.write_region(bar as u32, offset, data);
    }

    /// Stops the device for good: disarms interrupts, removes direct mappings and
    /// resets it, so the host can hand it to the next user. Idempotent.
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        self.irqs.shutdown();
        if let Some((_, msix)) = &mut self.msix {
            msix.reset();
        }
        if let Some(slots) = self.slots.clone() {
            for areas in &mut self.areas {
                bars::unmap_all(&slots, areas, &self.name);
            }
        }
        match self.backend.reset() {
            Ok(true) => info!("{}: device reset", self.name),
            Ok(false) => warn!("{}: the device has no reset method; not reset", self.name),
            Err(e) => warn!("{}: reset failed: {e}", self.name),
        }
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.release();
    }
}

impl PciFunction for VfioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(&*self.backend, offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if self.released {
            return;
        }
        let Some(reg) = self.config.write(&*self.backend, offset, data) else {
            return;
        };
        if let Some(bar) = self.config.bar_of_reg(reg) {
            self.sync_bar(bar);
        } else if reg == 1 {
            self.sync_all_bars();
        }
        if let Some((cap, msix)) = &mut self.msix {
            if reg == cap.offset / 4 {
                msix.set_control(self.config.virt_word(cap.offset + 2));
                let masked = msix.masked_vectors();
                let msi = self.msi_state();
                let on = self.msix_enabled();
                // Masks before arming (MSI-X is armed with them), after disarming
                // (a disabled table's masks must not reach the device).
                if on {
                    self.irqs.set_msix_masks(&masked);
                    self.irqs.follow(on, msi);
                } else {
                    self.irqs.follow(on, msi);
                    self.irqs.set_msix_masks(&masked);
                }
                return;
            }
        }
        if let Some(cap) = self.config.msi() {
            if (cap.offset / 4..(cap.offset + cap.len()).div_ceil(4)).contains(&reg) {
                let msi = self.msi_state();
                let on = self.msix_enabled();
                self.irqs.follow(on, msi);
            }
        }
    }
}

/// One BAR of a shared device, as a device on the MMIO bus.
pub struct BarAccess {
    device: Arc<Mutex<VfioPciDevice>>,
    bar: usize,
}

impl BarAccess {
    /// The trapped side of BAR `bar` of `device`.
    pub fn new(device: Arc<Mutex<VfioPciDevice>>, bar: usize) -> Self {
        Self { device, bar }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VfioPciDevice> {
        self.device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl BusDevice for BarAccess {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bar = self.bar;
        self.lock().bar_read(bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let bar = self.bar;
        self.lock().bar_write(bar, offset, data);
    }
}
