//! Interrupt delivery of a passed-through function: which VFIO interrupt index is
//! armed (INTx, MSI or MSI-X), with which eventfds, and the MSI routes.
//!
//! MSI and MSI-X: the eventfds given to `VFIO_DEVICE_SET_IRQS` are the irqfds of the
//! device's [`VectorRouter`] (in keel-vmm, `DeviceVectors`: one KVM GSI per vector,
//! routed to the message the guest programmed). A device interrupt is thus injected
//! by the kernel without waking the VMM. The guest's MSI-X table and MSI capability
//! are emulated: the host kernel programs the real ones with host vectors.
//!
//! INTx (fallback when the guest enables neither MSI nor MSI-X): the VMM provides an
//! [`IntxLine`], a KVM irqfd on an IOAPIC GSI registered with a resample eventfd
//! (`KVM_IRQFD_FLAG_RESAMPLE`). VFIO signals the trigger eventfd and masks the
//! line; when the guest EOIs, KVM writes the resample eventfd, and VFIO (armed with
//! `ACTION_UNMASK` on that eventfd) unmasks it. The level-triggered cycle stays in
//! the kernel too.
//!
//! Only one index is armed at a time (the kernel refuses two), so switching disables
//! the old one first.
//!
//! MSI-X masking reaches the device: vfio-pci has no MASK/UNMASK action for MSI-X,
//! so a vector the guest masks (its mask bit or the function mask) has its trigger
//! eventfd removed (`set_irq_triggers` with None), which makes the host mask the
//! vector in the device's real table; the device then latches its pending bit, which
//! the guest reads through the emulated PBA ([`Interrupts::msix_off`]). Unmasking
//! puts the eventfd back; the host unmasks the vector and the device sends the
//! pending message. Only vectors whose state changed are touched.

use std::sync::Arc;

use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{BackendError, IrqKind, VfioBackend};
use crate::pci::msix::{MsiMessage, VectorRouter};

/// A level-triggered interrupt line for INTx, provided by the VMM.
pub trait IntxLine: Send + Sync {
    /// Written by VFIO when the device asserts INTx (a KVM irqfd with resample).
    fn trigger(&self) -> &EventFd;
    /// Written by KVM when the guest acknowledges the interrupt (end of interrupt).
    fn resample(&self) -> &EventFd;
    /// The guest interrupt line (IOAPIC pin) it is wired to.
    fn line(&self) -> u8;
}

/// The armed interrupt index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqMode {
    /// Nothing armed.
    Off,
    /// INTx through the [`IntxLine`].
    Intx,
    /// MSI with this many vectors.
    Msi(u32),
    /// MSI-X with every table entry.
    Msix,
}

/// The MSI capability state the guest programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiState {
    /// MSI enable bit.
    pub enabled: bool,
    /// Vectors enabled (1 << multiple message enable, at most the device's count).
    pub vectors: u32,
    /// Message address.
    pub address: u64,
    /// Message data (vector i sends `data | i` in the low bits).
    pub data: u32,
    /// Per-vector mask bits.
    pub mask: u32,
}

/// The interrupt side of one passed-through function.
pub struct Interrupts {
    name: String,
    backend: Arc<dyn VfioBackend>,
    router: Arc<dyn VectorRouter>,
    intx: Option<Arc<dyn IntxLine>>,
    msix_vectors: u32,
    mode: IrqMode,
    msi_routed: Vec<Option<MsiMessage>>,
    /// MSI-X vectors the guest has masked.
    msix_masked: Vec<bool>,
    /// MSI-X vectors whose trigger eventfd is set in VFIO (all false unless MSI-X
    /// is armed).
    msix_armed: Vec<bool>,
}

impl Interrupts {
    /// Nothing armed yet; `msix_vectors` is the size of the device's MSI-X table.
    pub fn new(
        name: &str,
        backend: Arc<dyn VfioBackend>,
        router: Arc<dyn VectorRouter>,
        intx: Option<Arc<dyn IntxLine>>,
        msix_vectors: u32,
    ) -> Self {
        let n = router.vectors();
        Self {
            name: name.to_owned(),
            backend,
            router,
            intx,
            msix_vectors,
            mode: IrqMode::Off,
            msi_routed: vec![None; n],
            msix_masked: vec![true; msix_vectors as usize],
            msix_armed: vec![false; msix_vectors as usize],
        }
    }

    /// The armed index.
    pub fn mode(&self) -> IrqMode {
        self.mode
    }

    /// The interrupt line advertised in config space (None without INTx).
    pub fn intx_line(&self) -> Option<u8> {
        self.intx.as_ref().map(|l| l.line())
    }

    /// What should be armed for the guest's current MSI-X / MSI state.
    pub fn wanted(&self, msix_enabled: bool, msi: MsiState) -> IrqMode {
        if msix_enabled && self.msix_vectors > 0 {
            IrqMode::Msix
        } else if msi.enabled && msi.vectors > 0 {
            IrqMode::Msi(msi.vectors)
        } else if self.intx.is_some() {
            IrqMode::Intx
        } else {
            IrqMode::Off
        }
    }

    fn fds(&self, count: u32) -> Vec<&EventFd> {
        (0..count as usize)
            .filter_map(|v| self.router.eventfd(v))
            .collect()
    }

    /// Arms `want`, disarming what was armed before. On failure nothing is armed.
    pub fn switch(&mut self, want: IrqMode) -> Result<(), BackendError> {
        if want == self.mode {
            return Ok(());
        }
        let old = self.mode;
        match old {
            IrqMode::Off => {}
            IrqMode::Intx => self.backend.disable_irq(IrqKind::Intx)?,
            IrqMode::Msi(_) => self.backend.disable_irq(IrqKind::Msi)?,
            IrqMode::Msix => self.backend.disable_irq(IrqKind::Msix)?,
        }
        self.mode = IrqMode::Off;
        self.msix_armed.fill(false);
        match want {
            IrqMode::Off => {}
            IrqMode::Intx => {
                let Some(line) = &self.intx else {
                    return Ok(());
                };
                self.backend.enable_irq(IrqKind::Intx, &[line.trigger()])?;
                self.backend.set_intx_resample(line.resample())?;
            }
            IrqMode::Msi(n) => {
                let n = n.min(self.backend.irq_count(IrqKind::Msi));
                let fds = self.fds(n);
                if fds.len() != n as usize || n == 0 {
                    return Err(BackendError::new(
                        "VFIO_DEVICE_SET_IRQS(MSI)",
                        format!("{n} vectors wanted, {} eventfds available", fds.len()),
                    ));
                }
                self.backend.enable_irq(IrqKind::Msi, &fds)?;
            }
            IrqMode::Msix => {
                let fds = self.fds(self.msix_vectors);
                if fds.len() != self.msix_vectors as usize || fds.is_empty() {
                    return Err(BackendError::new(
                        "VFIO_DEVICE_SET_IRQS(MSI-X)",
                        format!(
                            "{} vectors wanted, {} eventfds available",
                            self.msix_vectors,
                            fds.len()
                        ),
                    ));
                }
                // Enabled with the guest's masks already applied: masked vectors
                // never fire on the host.
                let wanted: Vec<Option<&EventFd>> = fds
                    .iter()
                    .zip(&self.msix_masked)
                    .map(|(fd, &masked)| (!masked).then_some(*fd))
                    .collect();
                self.backend.set_irq_triggers(IrqKind::Msix, 0, &wanted)?;
                for (armed, masked) in self.msix_armed.iter_mut().zip(&self.msix_masked) {
                    *armed = !masked;
                }
            }
        }
        self.mode = want;
        debug!("{}: interrupts {old:?} -> {want:?}", self.name);
        Ok(())
    }

    /// Applies the guest's MSI-X masks (one flag per table entry; missing entries
    /// count as masked). While MSI-X is armed, each vector whose state changed gets
    /// its trigger removed or restored on the device, in runs of adjacent vectors.
    pub fn set_msix_masks(&mut self, masked: &[bool]) {
        for (v, m) in self.msix_masked.iter_mut().enumerate() {
            *m = masked.get(v).copied().unwrap_or(true);
        }
        if self.mode != IrqMode::Msix {
            return;
        }
        let n = self.msix_masked.len();
        let mut v = 0;
        while v < n {
            if self.msix_armed[v] != self.msix_masked[v] {
                v += 1;
                continue;
            }
            let start = v;
            while v < n && self.msix_armed[v] == self.msix_masked[v] {
                v += 1;
            }
            let wanted: Vec<Option<&EventFd>> = (start..v)
                .map(|i| {
                    if self.msix_masked[i] {
                        None
                    } else {
                        self.router.eventfd(i)
                    }
                })
                .collect();
            if wanted
                .iter()
                .zip(start..v)
                .any(|(fd, i)| fd.is_none() && !self.msix_masked[i])
            {
                warn!("{}: MSI-X vectors {start}..{v}: no eventfd", self.name);
                continue;
            }
            match self
                .backend
                .set_irq_triggers(IrqKind::Msix, start as u32, &wanted)
            {
                Ok(()) => {
                    for i in start..v {
                        self.msix_armed[i] = !self.msix_masked[i];
                    }
                    debug!("{}: MSI-X vectors {start}..{v} (un)masked", self.name);
                }
                Err(e) => warn!(
                    "{}: cannot change the mask of MSI-X vectors {start}..{v}: {e}",
                    self.name
                ),
            }
        }
    }

    /// Whether MSI-X vector `v` is masked on the device (armed, trigger removed):
    /// only such a vector can have a pending bit worth showing the guest.
    pub fn msix_off(&self, v: usize) -> bool {
        self.mode == IrqMode::Msix && !self.msix_armed.get(v).copied().unwrap_or(true)
    }

    /// Arms what the guest state asks for; failures are logged (the guest then sees
    /// no interrupts, as with a broken device).
    pub fn follow(&mut self, msix_enabled: bool, msi: MsiState) {
        let want = self.wanted(msix_enabled, msi);
        if let Err(e) = self.switch(want) {
            warn!("{}: cannot arm interrupts {want:?}: {e}", self.name);
        }
        self.route_msi(msi);
    }

    /// Routes MSI vectors to the programmed messages (None while disabled or masked).
    fn route_msi(&mut self, msi: MsiState) {
        let active = matches!(self.mode, IrqMode::Msi(_));
        for v in 0..self.msi_routed.len() {
            let on = active && msi.enabled && (v as u32) < msi.vectors && msi.mask & (1 << v) == 0;
            let msg = on.then(|| MsiMessage {
                address: msi.address,
                data: (msi.data & !(msi.vectors - 1)) | v as u32,
            });
            if self.msi_routed[v] != msg {
                self.msi_routed[v] = msg;
                self.router.update(v, msg);
            }
        }
    }

    /// Disarms everything and drops the MSI routes (VM stop).
    pub fn shutdown(&mut self) {
        if let Err(e) = self.switch(IrqMode::Off) {
            warn!("{}: cannot disarm interrupts: {e}", self.name);
        }
        self.route_msi(MsiState::default());
    }
}
