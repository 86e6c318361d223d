//! The virtio-pci modern transport (virtio 1.x): common configuration, notify, ISR
//! and device-specific configuration regions in BAR 0, and MSI-X.
//!
//! BAR 0 layout: common config at 0x0000, ISR at 0x1000, device config at 0x2000,
//! notifications at 0x3000 (4 bytes per queue), MSI-X table at 0x4000, PBA at 0x6000.
//! Every value the guest writes is checked here or when the driver sets DRIVER_OK;
//! a bad queue configuration sets NEEDS_RESET instead of reaching the backend.

use std::sync::Arc;

use log::{debug, info, warn};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{QueueSetup, VirtioDevice, NO_VECTOR, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::pci::config::{PciConfig, PciConfigError, PciIds};
use crate::pci::msix::{Msix, VectorRouter, MSIX_CAP_ID};
use crate::pci::{BarMapper, BarWindow, PciFunction};

/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
/// Offset of the ISR byte in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_LEN: u64 = 0x1000;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending-bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

const ISR_CONFIG: u8 = 2;

#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    vector: u16,
    enable: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            vector: NO_VECTOR,
            enable: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// A virtio device on PCI.
pub struct VirtioPci {
    name: String,
    config: PciConfig,
    msix: Msix,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    device_features: u64,
    device_feature_select: u32,
    driver_features: u64,
    driver_feature_select: u32,
    msix_config: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    kicks: Vec<EventFd>,
    isr: u8,
    active: bool,
    mapper: Option<(Arc<dyn BarMapper>, BarWindow)>,
    /// Where BAR 0 is currently mapped.
    mapped_bar0: u64,
    needs_reset_count: u32,
    activations: u32,
}

/// Guest-triggered events logged at warn/info level before going quiet (debug).
const GUEST_ERROR_LOG_LIMIT: u32 = 10;

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        body.extend_from_slice(&x.to_le_bytes());
    }
    body
}

fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0u64, |acc, (i, b)| acc | (u64::from(*b) << (8 * i)))
}

fn put_le(data: &mut [u8], value: u64) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = if i < 8 { (value >> (8 * i)) as u8 } else { 0 };
    }
}

impl VirtioPci {
    /// Wraps `device` in a PCI function whose BAR 0 lives at `bar0`.
    pub fn new(
        name: impl Into<String>,
        device: Box<dyn VirtioDevice>,
        router: Arc<dyn VectorRouter>,
        mem: GuestMemoryMmap,
        bar0: u32,
    ) -> Result<Self, PciConfigError> {
        let device_type = device.device_type();
        let class = match device_type {
            super::TYPE_NET => [0x02, 0x00, 0x00],
            super::TYPE_BLOCK => [0x01, 0x00, 0x00],
            _ => [0xff, 0x00, 0x00],
        };
        let mut config = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1040 + device_type as u16,
            revision: 1,
            class,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_memory_bar32(0, BAR0_SIZE, bar0)?;
        let msix = Msix::new(router);
        let (body, mask) = msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(MSIX_CAP_ID, &body, &mask)?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_LEN, None),
            &[],
        )?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_LEN,
                Some(NOTIFY_MULTIPLIER),
            ),
            &[],
        )?;
        config.add_capability(CAP_VENDOR, &virtio_cap(CFG_ISR, ISR_OFFSET, 1, None), &[])?;
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, None),
            &[],
        )?;

        let max_sizes = device.queue_max_sizes();
        let queues: Vec<QueueRegs> = max_sizes.iter().map(|&m| QueueRegs::new(m)).collect();
        let mut kicks = Vec::with_capacity(queues.len());
        for _ in &queues {
            kicks.push(EventFd::new(EFD_NONBLOCK).map_err(|_| PciConfigError::NoRoom(0))?);
        }
        let device_features = device.features() | (1 << VIRTIO_F_VERSION_1);
        Ok(Self {
            name: name.into(),
            config,
            msix,
            msix_cap,
            device,
            mem,
            device_features,
            device_feature_select: 0,
            driver_features: 0,
            driver_feature_select: 0,
            msix_config: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            kicks,
            isr: 0,
            active: false,
            mapper: None,
            mapped_bar0: u64::from(bar0),
            needs_reset_count: 0,
            activations: 0,
        })
    }

    /// The guest addresses of each queue's notification register and the eventfd
    /// to bind to it (as a KVM ioeventfd).
    pub fn notify_eventfds(&self) -> Vec<(u64, &EventFd)> {
        let base = self.mapped_bar0;
        self.kicks
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                (
                    base + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER),
                    fd,
                )
            })
            .collect()
    }

    /// Lets the guest move BAR 0 within `window`; without a mapper BAR writes are
    /// accepted in config space but the device stays where the VMM put it.
    pub fn set_bar_mapper(&mut self, mapper: Arc<dyn BarMapper>, window: BarWindow) {
        self.mapper = Some((mapper, window));
    }

    /// Follows a guest BAR reprogramming: when memory decoding is on and BAR 0 names
    /// a valid, free place in the window, the MMIO range and the notify ioeventfds
    /// move there; anything else (sizing, bad addresses, overlaps) leaves the
    /// mapping as it is.
    fn sync_bar0(&mut self) {
        let Some((mapper, window)) = &self.mapper else {
            return;
        };
        let memory_on = self.config.command() & crate::pci::config::COMMAND_MEMORY != 0;
        let Some(wanted) = self.config.bar_address(0) else {
            return;
        };
        let fits = wanted >= window.start
            && wanted
                .checked_add(BAR0_SIZE)
                .is_some_and(|end| end <= window.end);
        if !memory_on || wanted == self.mapped_bar0 || !fits {
            return;
        }
        let old = self.mapped_bar0;
        if let Err(e) = mapper.move_bar(old, wanted, BAR0_SIZE) {
            warn!(
                "{}: BAR 0 move {old:#x} -> {wanted:#x} refused: {e}",
                self.name
            );
            return;
        }
        for (i, fd) in self.kicks.iter().enumerate() {
            let off = NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Err(e) = mapper.move_ioeventfd(fd, old + off, wanted + off) {
                warn!("{}: queue {i}: notify ioeventfd not moved: {e}", self.name);
            }
        }
        self.mapped_bar0 = wanted;
        info!(
            "{}: BAR 0 moved by the guest {old:#x} -> {wanted:#x}",
            self.name
        );
    }

    /// The backend socket to watch for hang-ups, if the device has one.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// Tries once to reconnect a restarted backend (see
    /// [`VirtioDevice::reconnect_backend`]).
    pub fn reconnect_backend(&mut self) -> Result<(), String> {
        self.device.reconnect_backend()
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current device status.
    pub fn status(&self) -> u8 {
        self.status
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        for k in &self.kicks {
            let _ = k.read();
        }
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.msix_config = NO_VECTOR;
        self.queue_select = 0;
        self.isr = 0;
        self.status = 0;
        debug!("{}: reset by the driver", self.name);
    }

    /// Marks the device broken and tells the driver through a config interrupt.
    fn needs_reset(&mut self, why: &str) {
        // The guest can trigger this at will: log the first few, then quietly.
        self.needs_reset_count = self.needs_reset_count.saturating_add(1);
        if self.needs_reset_count <= GUEST_ERROR_LOG_LIMIT {
            warn!("{}: needs reset: {why}", self.name);
        } else {
            debug!("{}: needs reset: {why}", self.name);
        }
        self.status |= status::NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.isr |= ISR_CONFIG;
        if self.msix_config != NO_VECTOR {
            self.msix.trigger(self.msix_config);
        }
    }

    fn check_queue(&self, index: usize, q: &QueueRegs) -> Result<(), String> {
        let size = u64::from(q.size);
        if q.size == 0 || q.size > q.max_size || !q.size.is_power_of_two() {
            return Err(format!(
                "size {} (maximum {}, must be a power of two)",
                q.size, q.max_size
            ));
        }
        let parts = [
            ("descriptor table", q.desc, 16, 16 * size),
            ("available ring", q.avail, 2, 6 + 2 * size),
            ("used ring", q.used, 4, 6 + 8 * size),
        ];
        for (what, addr, align, len) in parts {
            if addr % align != 0 {
                return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
            }
            let last = addr
                .checked_add(len - 1)
                .ok_or_else(|| format!("{what} at {addr:#x} wraps"))?;
            // The ring must be RAM in one piece (vhost-user backends map regions).
            let ok = self
                .mem
                .to_region_addr(GuestAddress(addr))
                .zip(self.mem.to_region_addr(GuestAddress(last)))
                .is_some_and(|((r1, _), (r2, _))| std::ptr::eq(r1, r2));
            if !ok {
                return Err(format!(
                    "{what} {addr:#x}..={last:#x} is not inside guest RAM"
                ));
            }
        }
        let _ = index;
        Ok(())
    }

    fn activate(&mut self) {
        let mut setups = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.enable {
                continue;
            }
            if let Err(reason) = self.check_queue(i, q) {
                self.needs_reset(&format!("queue {i}: {reason}"));
                return;
            }
            let kick = match self.kicks[i].try_clone() {
                Ok(k) => k,
                Err(e) => {
                    self.needs_reset(&format!("queue {i}: cannot clone its kick eventfd: {e}"));
                    return;
                }
            };
            setups.push(QueueSetup {
                index: i,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick,
                vector: q.vector,
            });
        }
        if setups.is_empty() {
            self.needs_reset("DRIVER_OK with no queue enabled");
            return;
        }
        let router = Arc::clone(self.msix.router());
        match self
            .device
            .activate(&self.mem, self.driver_features, setups, &router)
        {
            Ok(()) => {
                self.active = true;
                self.activations = self.activations.saturating_add(1);
                if self.activations <= GUEST_ERROR_LOG_LIMIT {
                    info!("{}: activated", self.name);
                } else {
                    debug!("{}: activated", self.name);
                }
            }
            Err(e) => self.needs_reset(&e.to_string()),
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = value & !status::NEEDS_RESET | (old & status::NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let unsupported = self.driver_features & !self.device_features;
            let version1 = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if unsupported != 0 || !version1 {
                debug!(
                    "{}: refusing features {:#x} (unsupported {unsupported:#x}, VERSION_1 {version1})",
                    self.name, self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        if new & status::DRIVER_OK != 0
            && old & status::DRIVER_OK == 0
            && new & status::FEATURES_OK != 0
            && new & status::FAILED == 0
        {
            self.activate();
        }
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.msix_config),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.enable)),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20, 4) => q.map_or(0, |q| q.desc & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc >> 32),
            (0x28, 4) => q.map_or(0, |q| q.avail & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.avail >> 32),
            (0x30, 4) => q.map_or(0, |q| q.used & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.used >> 32),
            (0x20, 8) => q.map_or(0, |q| q.desc),
            (0x28, 8) => q.map_or(0, |q| q.avail),
            (0x30, 8) => q.map_or(0, |q| q.used),
            _ => {
                debug!(
                    "{}: ignored {}-byte common read at {offset:#x}",
                    self.name,
                    data.len()
                );
                0
            }
        };
        put_le(data, value);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let value = le_value(data);
        let running = self.status & status::DRIVER_OK != 0;
        let vectors = self.msix.len() as u64;
        let vector = |v: u64| if v < vectors { v as u16 } else { NO_VECTOR };
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if self.status & status::FEATURES_OK == 0 => match self.driver_feature_select
            {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
                _ => {}
            },
            (0x10, 2) => self.msix_config = vector(value),
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            // Queue registers are frozen once the driver is running.
            (0x18, 2) if !running => {
                if let Some(q) = self.selected() {
                    q.size = value as u16;
                }
            }
            (0x1a, 2) => {
                let v = vector(value);
                if let Some(q) = self.selected() {
                    q.vector = v;
                }
            }
            (0x1c, 2) if !running => {
                if let Some(q) = self.selected() {
                    q.enable = value == 1;
                }
            }
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) | (0x20 | 0x28 | 0x30, 8) if !running => {
                let Some(q) = self.selected() else { return };
                let field = match offset & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.avail,
                    _ => &mut q.used,
                };
                if data.len() == 8 {
                    *field = value;
                } else if offset % 8 == 0 {
                    *field = (*field & !0xffff_ffff) | value;
                } else {
                    *field = (*field & 0xffff_ffff) | (value << 32);
                }
            }
            _ => debug!(
                "{}: ignored {}-byte common write at {offset:#x} (status {:#x})",
                self.name,
                data.len(),
                self.status
            ),
        }
    }
}

impl PciFunction for VirtioPci {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let old_bar = self.config.bar_address(0);
        let Some(reg) = self.config.write(offset, data) else {
            return;
        };
        if reg == self.msix_cap / 4 {
            let control = u16::from(self.config.byte(self.msix_cap + 2))
                | (u16::from(self.config.byte(self.msix_cap + 3)) << 8);
            self.msix.set_control(control);
        }
        if PciConfig::bar_index(reg) == Some(0) || reg == 1 {
            if PciConfig::bar_index(reg) == Some(0) && self.config.bar_address(0) != old_bar {
                debug!(
                    "{}: BAR 0 programmed to {:x?}",
                    self.name,
                    self.config.bar_address(0)
                );
            }
            self.sync_bar0();
        }
    }
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.read_common(o - COMMON_OFFSET, data),
            ISR_OFFSET => {
                put_le(data, u64::from(self.isr));
                self.isr = 0;
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR0_SIZE).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.write_common(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                // Normally caught by the ioeventfd; forward a notification that reached
                // the VMM (e.g. an odd access width) to the same eventfd.
                let queue = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(queue) {
                    let _ = k.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => debug!(
                "{}: ignored {}-byte BAR write at {offset:#x}",
                self.name,
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::tests::RecordingRouter;
    use crate::virtio::DeviceError;
    use std::sync::Mutex;

    /// (queue index, size, descriptor table address)
    type QueueSummary = (usize, u16, u64);

    #[derive(Default)]
    struct Record {
        activated: Vec<(u64, Vec<QueueSummary>)>,
        resets: usize,
    }

    struct FakeDevice {
        record: Arc<Mutex<Record>>,
        fail: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            super::super::TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![64, 64]
        }
        fn features(&self) -> u64 {
            1 << 9
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            put_le(data, 0x1000 + offset);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: &GuestMemoryMmap,
            features: u64,
            queues: Vec<QueueSetup>,
            _interrupts: &Arc<dyn VectorRouter>,
        ) -> Result<(), DeviceError> {
            if self.fail {
                return Err(DeviceError::Backend("fake failure".into()));
            }
            self.record.lock().unwrap().activated.push((
                features,
                queues.iter().map(|q| (q.index, q.size, q.desc)).collect(),
            ));
            Ok(())
        }
        fn reset(&mut self) {
            self.record.lock().unwrap().resets += 1;
        }
    }

    fn device(fail: bool) -> (VirtioPci, Arc<Mutex<Record>>, Arc<RecordingRouter>) {
        let record = Arc::new(Mutex::new(Record::default()));
        let router = RecordingRouter::new(3);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = VirtioPci::new(
            "test",
            Box::new(FakeDevice {
                record: record.clone(),
                fail,
            }),
            router.clone(),
            mem,
            0xc000_0000,
        )
        .unwrap();
        (dev, record, router)
    }

    fn w(dev: &mut VirtioPci, off: u64, value: u64, len: usize) {
        dev.write(off, &value.to_le_bytes()[..len]);
    }

    fn r(dev: &mut VirtioPci, off: u64, len: usize) -> u64 {
        let mut d = vec![0u8; len];
        dev.read(off, &mut d);
        le_value(&d)
    }

    fn negotiate(dev: &mut VirtioPci, features: u64) -> u8 {
        w(
            dev,
            0x14,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
            1,
        );
        w(dev, 0x08, 0, 4);
        w(dev, 0x0c, features & 0xffff_ffff, 4);
        w(dev, 0x08, 1, 4);
        w(dev, 0x0c, features >> 32, 4);
        w(
            dev,
            0x14,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
            1,
        );
        r(dev, 0x14, 1) as u8
    }

    fn setup_queue(dev: &mut VirtioPci, index: u16, size: u16, base: u64) {
        w(dev, 0x16, u64::from(index), 2);
        w(dev, 0x18, u64::from(size), 2);
        w(dev, 0x20, base, 8);
        w(dev, 0x28, base + 0x1000, 8);
        w(dev, 0x30, base + 0x2000, 8);
        w(dev, 0x1c, 1, 2);
    }

    fn driver_ok(dev: &mut VirtioPci) -> u8 {
        w(
            dev,
            0x14,
            u64::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
            1,
        );
        r(dev, 0x14, 1) as u8
    }

    #[test]
    fn config_space_identifies_a_modern_virtio_blk_with_capabilities() {
        let (mut dev, _, _) = device(false);
        let mut d = [0u8; 4];
        dev.config_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        dev.config_read(0x10, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xc000_0000);
        // Walk the capability list: MSI-X then four virtio capabilities.
        let mut ptr = {
            let mut b = [0u8; 1];
            dev.config_read(0x34, &mut b);
            b[0] as usize
        };
        let mut kinds = Vec::new();
        while ptr != 0 {
            let mut b = [0u8; 4];
            dev.config_read(ptr, &mut b);
            kinds.push((b[0], if b[0] == CAP_VENDOR { b[3] } else { 0 }));
            ptr = b[1] as usize;
        }
        assert_eq!(
            kinds,
            vec![
                (MSIX_CAP_ID, 0),
                (9, CFG_COMMON),
                (9, CFG_NOTIFY),
                (9, CFG_ISR),
                (9, CFG_DEVICE)
            ]
        );
    }

    #[test]
    fn negotiation_and_activation_reach_the_device() {
        let (mut dev, record, _) = device(false);
        assert_eq!(r(&mut dev, 0x12, 2), 2, "num_queues");
        w(&mut dev, 0x00, 1, 4);
        assert_eq!(r(&mut dev, 0x04, 4), 1, "VERSION_1 in the high word");
        let st = negotiate(&mut dev, (1 << 32) | (1 << 9));
        assert_ne!(st & status::FEATURES_OK, 0);
        setup_queue(&mut dev, 0, 32, 0x10000);
        let st = driver_ok(&mut dev);
        assert_eq!(st & status::NEEDS_RESET, 0);
        let rec = record.lock().unwrap();
        assert_eq!(
            rec.activated,
            vec![((1 << 32) | (1 << 9), vec![(0, 32, 0x10000)])]
        );
    }

    #[test]
    fn unsupported_features_or_missing_version_1_are_refused() {
        let (mut dev, _, _) = device(false);
        assert_eq!(
            negotiate(&mut dev, 1 << 9) & status::FEATURES_OK,
            0,
            "no VERSION_1"
        );
        w(&mut dev, 0x14, 0, 1);
        assert_eq!(
            negotiate(&mut dev, (1 << 32) | (1 << 3)) & status::FEATURES_OK,
            0,
            "bit 3 not offered"
        );
    }

    #[test]
    fn bad_queues_set_needs_reset_and_never_reach_the_device() {
        let cases: [(u16, u64); 4] = [
            (48, 0x10000),       // not a power of two
            (128, 0x10000),      // above the maximum
            (32, 0x10008),       // misaligned descriptor table
            (32, 0xf_ffff_0000), // outside guest RAM
        ];
        for (size, base) in cases {
            let (mut dev, record, router) = device(false);
            negotiate(&mut dev, 1 << 32);
            w(&mut dev, 0x10, 0, 2); // config vector 0
            setup_queue(&mut dev, 0, size, base);
            let st = driver_ok(&mut dev);
            assert_ne!(st & status::NEEDS_RESET, 0, "size {size} base {base:#x}");
            assert!(record.lock().unwrap().activated.is_empty());
            assert_eq!(router.triggered.lock().unwrap().as_slice(), &[0]);
            // A reset clears it and the device can be brought up again.
            w(&mut dev, 0x14, 0, 1);
            assert_eq!(r(&mut dev, 0x14, 1), 0);
            negotiate(&mut dev, 1 << 32);
            setup_queue(&mut dev, 0, 32, 0x10000);
            assert_eq!(driver_ok(&mut dev) & status::NEEDS_RESET, 0);
            assert_eq!(record.lock().unwrap().activated.len(), 1);
        }
    }

    #[test]
    fn backend_failure_sets_needs_reset() {
        let (mut dev, _, _) = device(true);
        negotiate(&mut dev, 1 << 32);
        setup_queue(&mut dev, 0, 32, 0x10000);
        assert_ne!(driver_ok(&mut dev) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn driver_reload_resets_the_device_and_reactivates() {
        let (mut dev, record, _) = device(false);
        negotiate(&mut dev, 1 << 32);
        setup_queue(&mut dev, 1, 16, 0x20000);
        driver_ok(&mut dev);
        w(&mut dev, 0x14, 0, 1);
        assert_eq!(record.lock().unwrap().resets, 1);
        w(&mut dev, 0x16, 1, 2);
        assert_eq!(r(&mut dev, 0x1c, 2), 0, "queue disabled after reset");
        assert_eq!(r(&mut dev, 0x18, 2), 64, "size back to maximum");
        negotiate(&mut dev, 1 << 32);
        setup_queue(&mut dev, 1, 16, 0x30000);
        driver_ok(&mut dev);
        assert_eq!(record.lock().unwrap().activated.len(), 2);
    }

    #[test]
    fn queue_registers_are_frozen_while_running_and_vectors_are_bounded() {
        let (mut dev, _, _) = device(false);
        negotiate(&mut dev, 1 << 32);
        setup_queue(&mut dev, 0, 32, 0x10000);
        w(&mut dev, 0x1a, 7, 2); // only 3 vectors exist
        assert_eq!(r(&mut dev, 0x1a, 2), u64::from(NO_VECTOR));
        w(&mut dev, 0x1a, 1, 2);
        driver_ok(&mut dev);
        w(&mut dev, 0x20, 0xdead_0000, 8);
        assert_eq!(r(&mut dev, 0x20, 8), 0x10000);
        // Garbage widths and offsets anywhere in the BAR are ignored.
        for off in (0..BAR0_SIZE).step_by(0x3f3) {
            dev.write(off, &[0xff; 3]);
            let mut d = [0u8; 3];
            dev.read(off, &mut d);
        }
        assert_eq!(r(&mut dev, 0x20, 8), 0x10000);
    }

    #[test]
    fn msix_enable_through_config_space_routes_programmed_vectors() {
        let (mut dev, _, router) = device(false);
        let table = MSIX_TABLE_OFFSET;
        dev.write(table, &0xfee0_0000u64.to_le_bytes());
        dev.write(table + 8, &0x41u32.to_le_bytes());
        dev.write(table + 12, &0u32.to_le_bytes());
        assert!(router.updates.lock().unwrap().is_empty());
        // Message control is at cap + 2; set the enable bit (bit 15).
        let cap = dev.msix_cap;
        dev.config_write(cap + 3, &[0x80]);
        let updates = router.updates.lock().unwrap();
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].0, 0);
        assert_eq!(updates[0].1.map(|m| m.data), Some(0x41));
    }

    struct RecordingMapper {
        moves: Mutex<Vec<(u64, u64)>>,
        ioevents: Mutex<Vec<(u64, u64)>>,
        refuse: bool,
    }

    impl BarMapper for RecordingMapper {
        fn move_bar(&self, old: u64, new: u64, len: u64) -> Result<(), String> {
            assert_eq!(len, BAR0_SIZE);
            if self.refuse {
                return Err("overlap".into());
            }
            self.moves.lock().unwrap().push((old, new));
            Ok(())
        }
        fn move_ioeventfd(&self, _fd: &EventFd, old: u64, new: u64) -> Result<(), String> {
            self.ioevents.lock().unwrap().push((old, new));
            Ok(())
        }
    }

    fn mapped(refuse: bool) -> (VirtioPci, Arc<RecordingMapper>) {
        let (mut dev, _, _) = device(false);
        let mapper = Arc::new(RecordingMapper {
            moves: Mutex::new(Vec::new()),
            ioevents: Mutex::new(Vec::new()),
            refuse,
        });
        dev.set_bar_mapper(mapper.clone(), 0xc000_0000..0xfec0_0000);
        (dev, mapper)
    }

    #[test]
    fn guest_bar_moves_follow_valid_addresses_only() {
        let (mut dev, mapper) = mapped(false);
        // Memory decoding off: programming does not move anything yet.
        dev.config_write(0x10, &0xc001_0000u32.to_le_bytes());
        assert!(mapper.moves.lock().unwrap().is_empty());
        dev.config_write(0x04, &[0x06, 0x00]); // memory + bus master
        assert_eq!(
            mapper.moves.lock().unwrap().as_slice(),
            &[(0xc000_0000, 0xc001_0000)]
        );
        assert_eq!(
            mapper.ioevents.lock().unwrap().as_slice(),
            &[(0xc000_3000, 0xc001_3000), (0xc000_3004, 0xc001_3004)]
        );
        assert_eq!(dev.notify_eventfds()[1].0, 0xc001_3004);
        // Sizing (all ones) and addresses outside the window are not followed.
        dev.config_write(0x10, &0xffff_ffffu32.to_le_bytes());
        dev.config_write(0x10, &0x0000_1000u32.to_le_bytes());
        dev.config_write(0x10, &0xfec0_0000u32.to_le_bytes());
        dev.config_write(0x10, &0xc001_0000u32.to_le_bytes());
        assert_eq!(mapper.moves.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_refused_bar_move_keeps_the_old_mapping() {
        let (mut dev, mapper) = mapped(true);
        dev.config_write(0x04, &[0x02, 0x00]);
        dev.config_write(0x10, &0xc002_0000u32.to_le_bytes());
        assert!(mapper.ioevents.lock().unwrap().is_empty());
        assert_eq!(dev.notify_eventfds()[0].0, 0xc000_3000);
    }
}
