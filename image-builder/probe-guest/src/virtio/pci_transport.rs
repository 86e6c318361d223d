//! virtio-pci modern transport (virtio 1.x, section 4.1): the vendor
//! capabilities that locate the common, notify, ISR and device configuration
//! structures, the status/feature handshake, queue setup and MSI-X vectors.

use super::queue::{SplitQueue, MAX_SIZE};
use super::{feature, status};
use crate::mmio;
use crate::pci::{Bdf, MsiX, CAP_VENDOR};

/// `cfg_type` values of the virtio vendor capabilities.
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Common configuration structure offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// "No MSI-X vector" value of the vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// Reads of the status register while waiting for a reset to finish.
const RESET_POLLS: u32 = 100_000;
/// Reads of the device configuration before a changing generation is ignored.
const CONFIG_RETRIES: u32 = 16;

/// A located virtio-pci modern device.
pub struct VirtioPci {
    /// PCI address.
    pub bdf: Bdf,
    common: u64,
    notify: u64,
    notify_multiplier: u32,
    isr: u64,
    device: u64,
    device_len: u32,
    msix: Option<MsiX>,
}

/// One vendor capability: structure type, BAR, offset, length.
struct VirtioCap {
    kind: u8,
    bar: u8,
    offset: u32,
    length: u32,
    at: u8,
}

impl VirtioPci {
    /// Enables memory decoding and bus mastering on `bdf` and locates its
    /// virtio structures (the first usable capability of each type).
    pub fn probe(bdf: Bdf) -> Result<Self, &'static str> {
        bdf.enable_memory_and_dma();
        let mut common = None;
        let mut notify = None;
        let mut isr = None;
        let mut device = None;
        for (at, id) in bdf.capabilities() {
            if id != CAP_VENDOR || bdf.read8(at + 2) < 16 {
                continue;
            }
            let cap = VirtioCap {
                kind: bdf.read8(at + 3),
                bar: bdf.read8(at + 4),
                offset: bdf.read32(at + 8),
                length: bdf.read32(at + 12),
                at,
            };
            if cap.bar > 5 {
                continue;
            }
            let Some(base) = bdf.bar_address(cap.bar) else {
                continue;
            };
            let addr = base + u64::from(cap.offset);
            let slot = match cap.kind {
                CFG_COMMON => &mut common,
                CFG_NOTIFY => &mut notify,
                CFG_ISR => &mut isr,
                CFG_DEVICE => &mut device,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some((addr, cap));
            }
        }
        let (common, _) = common.ok_or("no common config capability")?;
        let (notify, notify_cap) = notify.ok_or("no notify capability")?;
        let (isr, _) = isr.ok_or("no isr capability")?;
        let (device, device_len) = match device {
            Some((addr, cap)) => (addr, cap.length),
            None => (0, 0),
        };
        let notify_multiplier = bdf.read32(notify_cap.at + 16);
        Ok(Self {
            bdf,
            common,
            notify,
            notify_multiplier,
            isr,
            device,
            device_len,
            msix: MsiX::find(bdf),
        })
    }

    fn common_read8(&self, off: u64) -> u8 {
        // SAFETY: `off` is a field of the common configuration structure,
        // which lies in a memory BAR inside the identity map.
        unsafe { mmio::read8(self.common + off) }
    }

    fn common_read16(&self, off: u64) -> u16 {
        // SAFETY: as for `common_read8`.
        unsafe { mmio::read16(self.common + off) }
    }

    fn common_read32(&self, off: u64) -> u32 {
        // SAFETY: as for `common_read8`.
        unsafe { mmio::read32(self.common + off) }
    }

    fn common_write8(&self, off: u64, value: u8) {
        // SAFETY: as for `common_read8`; writing the common configuration
        // only reprograms this device.
        unsafe { mmio::write8(self.common + off, value) }
    }

    fn common_write16(&self, off: u64, value: u16) {
        // SAFETY: as for `common_write8`.
        unsafe { mmio::write16(self.common + off, value) }
    }

    fn common_write32(&self, off: u64, value: u32) {
        // SAFETY: as for `common_write8`.
        unsafe { mmio::write32(self.common + off, value) }
    }

    /// Writes a 64-bit field as two 32-bit halves, low first.
    fn common_write64(&self, off: u64, value: u64) {
        self.common_write32(off, value as u32);
        self.common_write32(off + 4, (value >> 32) as u32);
    }

    /// Device status register.
    pub fn status(&self) -> u8 {
        self.common_read8(DEVICE_STATUS)
    }

    /// Sets `bits` in the device status (keeping the others).
    pub fn add_status(&self, bits: u8) {
        let now = self.status();
        self.common_write8(DEVICE_STATUS, now | bits);
    }

    /// Resets the device and waits until it reads back status 0.
    pub fn reset(&self) -> Result<(), &'static str> {
        self.common_write8(DEVICE_STATUS, 0);
        for _ in 0..RESET_POLLS {
            if self.status() == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err("reset did not complete")
    }

    /// Marks the device FAILED (after an error during bring-up).
    pub fn fail(&self) {
        self.add_status(status::FAILED);
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        let mut features = 0u64;
        for select in 0..2u32 {
            self.common_write32(DEVICE_FEATURE_SELECT, select);
            features |= u64::from(self.common_read32(DEVICE_FEATURE)) << (32 * select);
        }
        features
    }

    fn set_driver_features(&self, features: u64) {
        for select in 0..2u32 {
            self.common_write32(DRIVER_FEATURE_SELECT, select);
            self.common_write32(DRIVER_FEATURE, (features >> (32 * select)) as u32);
        }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (`wanted` & offered;
    /// VERSION_1 is required), FEATURES_OK and its check. Returns the offered
    /// and the accepted features.
    pub fn negotiate(&self, wanted: u64) -> Result<(u64, u64), &'static str> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        let offered = self.device_features();
        if offered & feature::VERSION_1 == 0 {
            self.fail();
            return Err("device does not offer VERSION_1");
        }
        let accepted = offered & (wanted | feature::VERSION_1);
        self.set_driver_features(accepted);
        self.add_status(status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err("device did not accept FEATURES_OK");
        }
        Ok((offered, accepted))
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> u16 {
        self.common_read16(NUM_QUEUES)
    }

    /// Whether the device has an MSI-X capability with at least `entries`
    /// table entries.
    pub fn msix_entries(&self) -> u16 {
        self.msix.as_ref().map_or(0, |m| m.table_size)
    }

    /// Programs MSI-X table entry `i` to send `vectors[i]` to APIC `apic_id`
    /// and enables MSI-X. Returns false if the device has no MSI-X or too
    /// few entries (the driver then polls).
    pub fn setup_msix(&self, apic_id: u32, vectors: &[u8]) -> bool {
        let Some(msix) = &self.msix else {
            return false;
        };
        if usize::from(msix.table_size) < vectors.len() {
            return false;
        }
        msix.enable_masked();
        let address = crate::interrupts::msi_address(apic_id);
        for (i, &v) in vectors.iter().enumerate() {
            msix.set_entry(i as u16, address, u32::from(v));
        }
        msix.unmask_function();
        true
    }

    /// Turns MSI-X off.
    pub fn disable_msix(&self) {
        if let Some(msix) = &self.msix {
            msix.disable();
        }
    }

    /// Sets the configuration-change MSI-X entry; returns what the device
    /// read back ([`NO_VECTOR`] if it refused).
    pub fn set_config_vector(&self, entry: u16) -> u16 {
        self.common_write16(CONFIG_MSIX_VECTOR, entry);
        self.common_read16(CONFIG_MSIX_VECTOR)
    }

    /// Sets up queue `index` in the page at `mem` with at most `max_size`
    /// entries, using MSI-X table entry `entry` (or [`NO_VECTOR`]), and
    /// enables it. Returns the queue and the entry the device accepted.
    ///
    /// # Safety
    ///
    /// As for [`SplitQueue::new`]: `mem` is a page reserved for this queue.
    pub unsafe fn setup_queue(
        &self,
        index: u16,
        mem: u64,
        max_size: u16,
        entry: u16,
    ) -> Result<(SplitQueue, u16), &'static str> {
        self.common_write16(QUEUE_SELECT, index);
        let device_max = self.common_read16(QUEUE_SIZE);
        if device_max == 0 {
            return Err("queue not available");
        }
        if self.common_read16(QUEUE_ENABLE) != 0 {
            return Err("queue already enabled after reset");
        }
        let size = device_max.min(max_size).min(MAX_SIZE);
        // SAFETY: forwarded from the caller.
        let mut queue = unsafe { SplitQueue::new(index, size, mem) };
        self.common_write16(QUEUE_SIZE, queue.size);
        self.common_write64(QUEUE_DESC, queue.desc_addr());
        self.common_write64(QUEUE_DRIVER, queue.avail_addr());
        self.common_write64(QUEUE_DEVICE, queue.used_addr());
        self.common_write16(QUEUE_MSIX_VECTOR, entry);
        let got = self.common_read16(QUEUE_MSIX_VECTOR);
        let notify_off = self.common_read16(QUEUE_NOTIFY_OFF);
        queue.set_notify(self.notify + u64::from(notify_off) * u64::from(self.notify_multiplier));
        self.common_write16(QUEUE_ENABLE, 1);
        Ok((queue, got))
    }

    /// Sets DRIVER_OK; fails if the device flags NEEDS_RESET or FAILED.
    pub fn driver_ok(&self) -> Result<(), &'static str> {
        self.add_status(status::DRIVER_OK);
        let now = self.status();
        if now & (status::NEEDS_RESET | status::FAILED) != 0 {
            return Err("device needs reset after DRIVER_OK");
        }
        if now & status::DRIVER_OK == 0 {
            return Err("device did not keep DRIVER_OK");
        }
        Ok(())
    }

    /// Reads the ISR status (clears it).
    pub fn isr(&self) -> u8 {
        // SAFETY: the ISR byte in a BAR inside the identity map; reading it
        // only acknowledges a legacy interrupt.
        unsafe { mmio::read8(self.isr) }
    }

    /// Reads the device configuration consistently: calls `read` until the
    /// configuration generation is the same before and after.
    pub fn read_config<T>(&self, mut read: impl FnMut(&Self) -> T) -> T {
        // A device that keeps changing its configuration gets the last read.
        for _ in 0..CONFIG_RETRIES {
            let before = self.common_read8(CONFIG_GENERATION);
            let value = read(self);
            if self.common_read8(CONFIG_GENERATION) == before {
                return value;
            }
        }
        read(self)
    }

    /// Device configuration byte at `off` (0 beyond the structure).
    pub fn config8(&self, off: u32) -> u8 {
        if self.device == 0 || off >= self.device_len {
            return 0;
        }
        // SAFETY: inside the device configuration structure, in a BAR in the
        // identity map; config reads have no side effects.
        unsafe { mmio::read8(self.device + u64::from(off)) }
    }

    /// Device configuration word at `off` (0 beyond the structure).
    pub fn config16(&self, off: u32) -> u16 {
        if self.device == 0 || off + 2 > self.device_len {
            return 0;
        }
        // SAFETY: as for `config8`.
        unsafe { mmio::read16(self.device + u64::from(off)) }
    }

    /// Device configuration dword at `off` (0 beyond the structure).
    pub fn config32(&self, off: u32) -> u32 {
        if self.device == 0 || off + 4 > self.device_len {
            return 0;
        }
        // SAFETY: as for `config8`.
        unsafe { mmio::read32(self.device + u64::from(off)) }
    }
}
