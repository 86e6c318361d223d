//! MSI-X: the capability's control bits, the vector table and the pending-bit array.
//!
//! Each vector is delivered by the VMM through a KVM irqfd bound to its own GSI; this
//! module decides when a vector has a valid, unmasked message and tells the
//! [`VectorRouter`], which (re)programs the GSI route or detaches the irqfd while the
//! vector is masked. A backend signalling a masked vector leaves its eventfd counter
//! raised, so the interrupt is delivered when the guest unmasks it.

use std::sync::Arc;

use log::debug;

/// PCI capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// The message a vector sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Connects a device's MSI-X vectors to the hypervisor.
pub trait VectorRouter: Send + Sync {
    /// Number of vectors available.
    fn vectors(&self) -> usize;
    /// Routes `vector` to `message`, or detaches it (None: masked or disabled).
    fn update(&self, vector: usize, message: Option<MsiMessage>);
    /// Raises `vector` from the VMM (config change interrupts).
    fn trigger(&self, vector: usize);
    /// The eventfd whose writes raise `vector` (handed to vhost-user backends).
    fn eventfd(&self, vector: usize) -> Option<&vmm_sys_util::eventfd::EventFd>;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

/// MSI-X state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    control: u16,
    router: Arc<dyn VectorRouter>,
    /// What was last told to the router, per vector.
    routed: Vec<Option<MsiMessage>>,
}

impl Msix {
    /// MSI-X with as many vectors as `router` provides, all masked, disabled.
    pub fn new(router: Arc<dyn VectorRouter>) -> Self {
        let n = router.vectors();
        Self {
            entries: vec![
                Entry {
                    control: ENTRY_MASKED,
                    ..Entry::default()
                };
                n
            ],
            control: 0,
            router,
            routed: vec![None; n],
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The capability body (after ID and next pointer) for a table at
    /// `table_offset` and PBA at `pba_offset`, both in BAR `bar`, and the write mask.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let size = (self.entries.len().max(1) - 1) as u16;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        // Only the enable and function-mask bits of message control are writable.
        (body, vec![0x00, 0xc0])
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    /// Applies a new message-control value (after the config-space mask).
    pub fn set_control(&mut self, control: u16) {
        self.control = control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        self.sync_all();
    }

    /// Per vector, whether the guest masked it (its mask bit or the function mask).
    pub fn masked_vectors(&self) -> Vec<bool> {
        let function = self.control & CONTROL_FUNCTION_MASK != 0;
        self.entries
            .iter()
            .map(|e| function || e.control & ENTRY_MASKED != 0)
            .collect()
    }

    /// The message of `vector` if it may be delivered now.
    fn deliverable(&self, vector: usize) -> Option<MsiMessage> {
        let e = self.entries.get(vector)?;
        let off = self.control & CONTROL_ENABLE == 0
            || self.control & CONTROL_FUNCTION_MASK != 0
            || e.control & ENTRY_MASKED != 0;
        (!off).then_some(MsiMessage {
            address: u64::from(e.address_lo) | (u64::from(e.address_hi) << 32),
            data: e.data,
        })
    }

    fn sync(&mut self, vector: usize) {
        let now = self.deliverable(vector);
        if let Some(slot) = self.routed.get_mut(vector) {
            if *slot != now {
                *slot = now;
                self.router.update(vector, now);
            }
        }
    }

    fn sync_all(&mut self) {
        for v in 0..self.entries.len() {
            self.sync(v);
        }
    }

    /// Reads the table at `offset` (4- or 8-byte accesses; others read as zeros).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let vector = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(vector) else {
            return;
        };
        let words = [e.address_lo, e.address_hi, e.data, e.control];
        let word = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        match data.len() {
            4 if offset % 4 == 0 => data.copy_from_slice(&words[word].to_le_bytes()),
            8 if offset % 8 == 0 => {
                data[..4].copy_from_slice(&words[word].to_le_bytes());
                data[4..].copy_from_slice(&words[word + 1].to_le_bytes());
            }
            _ => debug!(
                "msix: ignored {}-byte table read at {offset:#x}",
                data.len()
            ),
        }
    }

    /// Writes the table at `offset` (4- or 8-byte aligned accesses; others ignored).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let vector = (offset / MSIX_ENTRY_SIZE) as usize;
        if vector >= self.entries.len() {
            return;
        }
        let word = ((offset % MSIX_ENTRY_SIZE) / 4) as usize;
        let mut values = [None, None];
        match data.len() {
            4 if offset % 4 == 0 => {
                values[0] = Some(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            }
            8 if offset % 8 == 0 => {
                values[0] = Some(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
                values[1] = Some(u32::from_le_bytes([data[4], data[5], data[6], data[7]]));
            }
            _ => {
                debug!(
                    "msix: ignored {}-byte table write at {offset:#x}",
                    data.len()
                );
                return;
            }
        }
        for (i, v) in values.iter().enumerate() {
            let Some(v) = *v else { continue };
            let e = &mut self.entries[vector];
            match word + i {
                0 => e.address_lo = v,
                1 => e.address_hi = v,
                2 => e.data = v,
                3 => e.control = v & ENTRY_MASKED,
                _ => {}
            }
        }
        self.sync(vector);
    }

    /// Reads the pending-bit array. While a vector is masked (or MSI-X is off) its
    /// signals accumulate in its eventfd, detached from KVM: the bit is set when that
    /// eventfd is readable (checked with `poll`, which does not consume it). A routed
    /// vector is delivered at once and never reads as pending.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = 0;
            for bit in 0..8u64 {
                let Some(vector) = offset
                    .checked_add(i as u64)
                    .and_then(|b| b.checked_mul(8))
                    .and_then(|b| b.checked_add(bit))
                    .and_then(|v| usize::try_from(v).ok())
                else {
                    continue;
                };
                if vector < self.entries.len() && self.pending(vector) {
                    *byte |= 1 << bit;
                }
            }
        }
    }

    /// Whether `vector` is masked with a signal waiting in its eventfd.
    fn pending(&self, vector: usize) -> bool {
        if self.routed.get(vector).is_some_and(Option::is_some) {
            return false;
        }
        let Some(fd) = self.router.eventfd(vector) else {
            return false;
        };
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(fd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd living across the call, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & libc::POLLIN != 0
    }

    /// Raises `vector` if it is deliverable; a masked vector is left pending in its
    /// eventfd by the router.
    pub fn trigger(&self, vector: u16) {
        if usize::from(vector) < self.entries.len() {
            self.router.trigger(usize::from(vector));
        }
    }

    /// The router.
    pub fn router(&self) -> &Arc<dyn VectorRouter> {
        &self.router
    }

    /// Back to the reset state: disabled, every vector masked.
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = Entry {
                control: ENTRY_MASKED,
                ..Entry::default()
            };
        }
        self.control = 0;
        self.sync_all();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    /// Records route updates.
    pub(crate) struct RecordingRouter {
        pub(crate) updates: Mutex<Vec<(usize, Option<MsiMessage>)>>,
        pub(crate) triggered: Mutex<Vec<usize>>,
        fds: Vec<EventFd>,
    }

    impl RecordingRouter {
        pub(crate) fn new(n: usize) -> Arc<Self> {
            Arc::new(Self {
                updates: Mutex::new(Vec::new()),
                triggered: Mutex::new(Vec::new()),
                fds: (0..n).map(|_| EventFd::new(0).unwrap()).collect(),
            })
        }
    }

    impl VectorRouter for RecordingRouter {
        fn vectors(&self) -> usize {
            self.fds.len()
        }
        fn update(&self, vector: usize, message: Option<MsiMessage>) {
            self.updates.lock().unwrap().push((vector, message));
        }
        fn trigger(&self, vector: usize) {
            self.triggered.lock().unwrap().push(vector);
        }
        fn eventfd(&self, vector: usize) -> Option<&EventFd> {
            self.fds.get(vector)
        }
    }

    #[test]
    fn pba_shows_masked_vectors_with_a_waiting_signal() {
        let router = RecordingRouter::new(12);
        let mut m = Msix::new(router.clone());
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba, [0; 8]);
        // Signals for masked vectors 3 and 10 wait in their eventfds.
        router.eventfd(3).unwrap().write(1).unwrap();
        router.eventfd(10).unwrap().write(1).unwrap();
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 1 << 3 | 1 << 10);
        // Reading does not consume them; byte-wide reads at an offset see the same.
        let mut b = [0u8; 1];
        m.read_pba(1, &mut b);
        assert_eq!(b[0], 1 << 2);
        // Beyond the table: zero, never a panic.
        m.read_pba(u64::MAX, &mut b);
        assert_eq!(b[0], 0);
        // Once vector 3 is routed (enabled, unmasked) it is not pending any more.
        program(&mut m, 3, 0xfee0_0000, 0x41);
        m.set_control(CONTROL_ENABLE);
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 1 << 10);
    }

    fn program(m: &mut Msix, vector: u64, addr: u64, data: u32) {
        let base = vector * MSIX_ENTRY_SIZE;
        m.write_table(base, &addr.to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn vectors_route_only_when_enabled_and_unmasked() {
        let r = RecordingRouter::new(2);
        let mut m = Msix::new(r.clone());
        program(&mut m, 1, 0xfee0_0000, 0x31);
        assert!(
            r.updates.lock().unwrap().is_empty(),
            "disabled: nothing routed"
        );
        m.set_control(CONTROL_ENABLE);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        assert_eq!(r.updates.lock().unwrap().as_slice(), &[(1, Some(msg))]);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(r.updates.lock().unwrap().last(), Some(&(1, None)));
        m.set_control(CONTROL_ENABLE);
        m.write_table(MSIX_ENTRY_SIZE + 12, &1u32.to_le_bytes());
        assert_eq!(r.updates.lock().unwrap().last(), Some(&(1, None)));
        let mut d = [0u8; 4];
        m.read_table(MSIX_ENTRY_SIZE + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x31);
    }

    #[test]
    fn masked_vectors_follow_entry_and_function_masks() {
        let r = RecordingRouter::new(3);
        let mut m = Msix::new(r);
        assert_eq!(m.masked_vectors(), vec![true; 3], "masked at reset");
        m.write_table(MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(m.masked_vectors(), vec![true, false, true]);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(m.masked_vectors(), vec![true; 3]);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(m.masked_vectors(), vec![true, false, true]);
    }

    #[test]
    fn bad_table_accesses_are_ignored() {
        let r = RecordingRouter::new(1);
        let mut m = Msix::new(r.clone());
        m.set_control(CONTROL_ENABLE);
        m.write_table(5 * MSIX_ENTRY_SIZE, &[1, 2, 3, 4]); // past the table
        m.write_table(2, &[1, 2, 3, 4]); // unaligned
        m.write_table(0, &[1, 2]); // odd width
        m.write_table(12, &0xffff_fffeu32.to_le_bytes()); // reserved control bits
        let mut d = [0u8; 4];
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        m.read_table(1 << 20, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
