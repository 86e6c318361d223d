//! MSI/MSI-X delivery through KVM: a GSI per vector, routed to its MSI message, and
//! an irqfd per vector that backends (or the VMM) write to raise it.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the table kept here always
//! carries the default PIC/IOAPIC routes for GSIs 0–23 as well.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use keel_devices::pci::msix::{MsiMessage, VectorRouter};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use log::{debug, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout::IOAPIC_PINS;

/// Highest GSI keel hands out (KVM's default routing table limit is 4096 on x86).
const MAX_GSI: u32 = 1023;

/// Errors while allocating interrupt vectors.
#[derive(Debug, Error)]
pub enum InterruptError {
    /// No GSIs left.
    #[error("out of interrupt GSIs")]
    Exhausted,
    /// An eventfd could not be created.
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// The VM's GSI routing table.
pub struct GsiRoutes {
    vm: Arc<VmFd>,
    state: Mutex<RoutesState>,
}

struct RoutesState {
    msi: BTreeMap<u32, kvm_irq_routing_entry>,
    next_gsi: u32,
}

impl GsiRoutes {
    /// Routes for `vm`; MSI GSIs start after the IOAPIC pins.
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(Self {
            vm,
            state: Mutex::new(RoutesState {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        })
    }

    fn allocate(&self, count: usize) -> Result<Vec<u32>, InterruptError> {
        let mut s = crate::lock(&self.state);
        let first = s.next_gsi;
        let end = first
            .checked_add(count as u32)
            .filter(|&e| e <= MAX_GSI + 1)
            .ok_or(InterruptError::Exhausted)?;
        s.next_gsi = end;
        Ok((first..end).collect())
    }

    fn commit(&self, msi: &BTreeMap<u32, kvm_irq_routing_entry>) {
        let mut entries: Vec<kvm_irq_routing_entry> = Vec::new();
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for pin in 0..8 {
            entries.push(irqchip_route(pin, KVM_IRQCHIP_PIC_MASTER, pin));
            entries.push(irqchip_route(pin + 8, KVM_IRQCHIP_PIC_SLAVE, pin));
        }
        entries.extend(msi.values().copied());
        match KvmIrqRouting::from_entries(&entries) {
            Ok(table) => {
                if let Err(e) = self.vm.set_gsi_routing(&table) {
                    warn!("KVM_SET_GSI_ROUTING failed: {e}");
                }
            }
            Err(e) => warn!("cannot build the GSI routing table: {e:?}"),
        }
    }

    fn set(&self, gsi: u32, msg: Option<MsiMessage>) {
        let mut s = crate::lock(&self.state);
        match msg {
            Some(m) => {
                s.msi.insert(gsi, msi_route(gsi, m));
            }
            None => {
                s.msi.remove(&gsi);
            }
        }
        self.commit(&s.msi);
    }
}

struct Vector {
    gsi: u32,
    eventfd: EventFd,
    attached: bool,
}

/// The MSI-X vectors of one device.
pub struct DeviceVectors {
    name: String,
    routes: Arc<GsiRoutes>,
    vectors: Vec<Mutex<Vector>>,
    fds: Vec<EventFd>,
}

impl DeviceVectors {
    /// Allocates `count` vectors for device `name`.
    pub fn new(
        name: &str,
        routes: &Arc<GsiRoutes>,
        count: usize,
    ) -> Result<Arc<Self>, InterruptError> {
        let gsis = routes.allocate(count)?;
        let mut vectors = Vec::with_capacity(count);
        let mut fds = Vec::with_capacity(count);
        for gsi in gsis {
            let eventfd = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
            fds.push(eventfd.try_clone().map_err(InterruptError::EventFd)?);
            vectors.push(Mutex::new(Vector {
                gsi,
                eventfd,
                attached: false,
            }));
        }
        Ok(Arc::new(Self {
            name: name.to_owned(),
            routes: Arc::clone(routes),
            vectors,
            fds,
        }))
    }
}

impl VectorRouter for DeviceVectors {
    fn vectors(&self) -> usize {
        self.vectors.len()
    }

    fn update(&self, vector: usize, message: Option<MsiMessage>) {
        let Some(v) = self.vectors.get(vector) else {
            return;
        };
        let mut v = crate::lock(v);
        let gsi = v.gsi;
        match message {
            Some(msg) => {
                self.routes.set(gsi, Some(msg));
                if !v.attached {
                    match self.routes.vm.register_irqfd(&v.eventfd, gsi) {
                        Ok(()) => v.attached = true,
                        Err(e) => warn!(
                            "{}: vector {vector}: cannot attach irqfd to GSI {gsi}: {e}",
                            self.name
                        ),
                    }
                }
                debug!("{}: vector {vector} -> GSI {gsi} {msg:x?}", self.name);
            }
            None => {
                if v.attached {
                    // While detached, signals accumulate in the eventfd and are
                    // delivered when the vector is attached again.
                    if let Err(e) = self.routes.vm.unregister_irqfd(&v.eventfd, gsi) {
                        warn!("{}: vector {vector}: cannot detach irqfd: {e}", self.name);
                    }
                    v.attached = false;
                }
                self.routes.set(gsi, None);
                debug!("{}: vector {vector} masked", self.name);
            }
        }
    }

    fn trigger(&self, vector: usize) {
        if let Some(fd) = self.fds.get(vector) {
            if let Err(e) = fd.write(1) {
                warn!("{}: cannot raise vector {vector}: {e}", self.name);
            }
        }
    }

    fn eventfd(&self, vector: usize) -> Option<&EventFd> {
        self.fds.get(vector)
    }
}
