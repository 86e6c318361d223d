//! The virtio-net control queue, served by the VMM itself (vhost-user net backends
//! only move frames): multiqueue pair selection, and acknowledgements for the
//! receive-mode and MAC-filter commands a switch port does not need.
//!
//! Every chain comes from the guest and is untrusted: a malformed command gets an
//! error status when there is somewhere to write it, or is returned unused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use log::{debug, info, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::msix::VectorRouter;
use crate::virtio::{QueueSetup, NO_VECTOR};

/// Command class: receive mode (promiscuous, all-multicast...).
pub const CLASS_RX: u8 = 0;
/// Command class: MAC filter table.
pub const CLASS_MAC: u8 = 1;
/// Command class: multiqueue.
pub const CLASS_MQ: u8 = 4;
/// MQ command: set the number of queue pairs in use.
pub const MQ_VQ_PAIRS_SET: u8 = 0;
/// Acknowledgement: done.
pub const ACK_OK: u8 = 0;
/// Acknowledgement: refused.
pub const ACK_ERR: u8 = 1;

/// Carries out what a control command asks of the data plane.
pub trait CtrlTarget: Send {
    /// Use the first `pairs` queue pairs (the driver checked nothing: validate).
    fn set_queue_pairs(&mut self, pairs: u16) -> bool;
}

/// Parses one command (header and payload bytes) and returns the acknowledgement.
pub fn execute(command: &[u8], max_pairs: u16, target: &mut dyn CtrlTarget) -> u8 {
    let [class, cmd, payload @ ..] = command else {
        return ACK_ERR;
    };
    match (*class, *cmd) {
        (CLASS_MQ, MQ_VQ_PAIRS_SET) => {
            let Some(bytes) = payload.get(..2) else {
                return ACK_ERR;
            };
            let pairs = u16::from_le_bytes([bytes[0], bytes[1]]);
            if pairs == 0 || pairs > max_pairs {
                debug!("net ctrl: refused {pairs} queue pairs (maximum {max_pairs})");
                return ACK_ERR;
            }
            if target.set_queue_pairs(pairs) {
                ACK_OK
            } else {
                ACK_ERR
            }
        }
        // A switch port receives what is addressed to it and broadcasts; the
        // receive-mode and MAC-filter settings are accepted as hints.
        (CLASS_RX, _) | (CLASS_MAC, _) => ACK_OK,
        (class, cmd) => {
            debug!("net ctrl: unsupported command class {class} cmd {cmd}");
            ACK_ERR
        }
    }
}

/// Most bytes of command payload read from a chain.
const MAX_COMMAND: usize = 4096;

/// Serves one control queue on a thread until stopped.
pub struct CtrlQueue {
    stop: Arc<AtomicBool>,
    kick: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl CtrlQueue {
    /// Starts serving `setup` in `mem`, raising `setup.vector` through `router`.
    pub fn start(
        name: &str,
        mem: GuestMemoryMmap,
        setup: &QueueSetup,
        max_pairs: u16,
        router: Arc<dyn VectorRouter>,
        mut target: Box<dyn CtrlTarget>,
    ) -> std::io::Result<Self> {
        let mut queue = Queue::new(setup.size).map_err(|e| std::io::Error::other(e.to_string()))?;
        queue.set_size(setup.size);
        queue.set_desc_table_address(Some(setup.desc as u32), Some((setup.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(setup.avail as u32), Some((setup.avail >> 32) as u32));
        queue.set_used_ring_address(Some(setup.used as u32), Some((setup.used >> 32) as u32));
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            return Err(std::io::Error::other(
                "control queue rings are not valid guest memory",
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let kick = setup.kick.try_clone()?;
        let waker = kick.try_clone()?;
        let vector = setup.vector;
        let thread_stop = Arc::clone(&stop);
        let name = name.to_owned();
        let thread = thread::Builder::new()
            .name(format!("{name}-ctrl"))
            .spawn(move || loop {
                if kick.read().is_err() && !thread_stop.load(Ordering::Acquire) {
                    // Non-blocking eventfd with nothing to read: wait for it.
                    wait_readable(&kick);
                    continue;
                }
                if thread_stop.load(Ordering::Acquire) {
                    return;
                }
                if serve(&name, &mem, &mut queue, max_pairs, target.as_mut()) && vector != NO_VECTOR
                {
                    router.trigger(usize::from(vector));
                }
            })?;
        Ok(Self {
            stop,
            kick: waker,
            thread: Some(thread),
        })
    }
}

impl Drop for CtrlQueue {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.kick.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_readable(fd: &EventFd) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call; one entry.
    unsafe { libc::poll(&mut pfd, 1, 1000) };
}

/// Handles every available command; returns whether any was completed.
pub fn serve(
    name: &str,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    max_pairs: u16,
    target: &mut dyn CtrlTarget,
) -> bool {
    let mut completed = false;
    loop {
        let chain = match queue.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                warn!("{name}: control queue is not usable: {e}");
                return completed;
            }
        };
        let Some(chain) = chain else {
            break;
        };
        let head = chain.head_index();
        let mut command = Vec::new();
        let mut status_at = None;
        let mut bad = false;
        for desc in chain {
            if desc.is_write_only() {
                if desc.len() >= 1 {
                    status_at = Some(desc.addr());
                }
                continue;
            }
            if status_at.is_some() || command.len() + desc.len() as usize > MAX_COMMAND {
                bad = true;
                continue;
            }
            let start = command.len();
            command.resize(start + desc.len() as usize, 0);
            if mem.read_slice(&mut command[start..], desc.addr()).is_err() {
                bad = true;
            }
        }
        let ack = if bad {
            ACK_ERR
        } else {
            execute(&command, max_pairs, target)
        };
        let written = match status_at {
            Some(addr) => match mem.write_obj(ack, GuestAddress(addr.0)) {
                Ok(()) => 1,
                Err(_) => 0,
            },
            None => 0,
        };
        if let Err(e) = queue.add_used(mem, head, written) {
            warn!("{name}: cannot complete a control command: {e}");
            return completed;
        }
        completed = true;
    }
    if completed {
        info!("{name}: control commands served");
    }
    completed
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pairs(Vec<u16>);
    impl CtrlTarget for Pairs {
        fn set_queue_pairs(&mut self, pairs: u16) -> bool {
            self.0.push(pairs);
            true
        }
    }

    #[test]
    fn multiqueue_pairs_are_validated() {
        let mut t = Pairs(Vec::new());
        assert_eq!(
            execute(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 2, 0], 4, &mut t),
            ACK_OK
        );
        assert_eq!(
            execute(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 0, 0], 4, &mut t),
            ACK_ERR
        );
        assert_eq!(
            execute(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 5, 0], 4, &mut t),
            ACK_ERR
        );
        assert_eq!(execute(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 1], 4, &mut t), ACK_ERR);
        assert_eq!(t.0, vec![2]);
    }

    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const F_WRITE: u16 = 2;

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Runs `chains` (each a list of descriptors, chained in order) through the
    /// control queue; returns the targets' calls and the used lengths.
    fn run(chains: &[Vec<RawDescriptor>], mem: &GuestMemoryMmap) -> (Vec<u16>, Vec<u32>) {
        let mock = MockSplitQueue::new(mem, 16);
        let mut offset = 0u16;
        for chain in chains {
            let n = chain.len();
            let linked: Vec<RawDescriptor> = chain
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let d = SplitDescriptor::from(*d);
                    let (flags, next) = if i + 1 < n {
                        (d.flags() | 1, offset + i as u16 + 1)
                    } else {
                        (d.flags() & !1, 0)
                    };
                    RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
                })
                .collect();
            mock.add_desc_chains(&linked, offset).unwrap();
            offset += n as u16;
        }
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut t = Pairs(Vec::new());
        serve("test", mem, &mut queue, 4, &mut t);
        let used = mock.used();
        let count = used.idx().load();
        let lens = (0..count)
            .map(|i| used.ring().ref_at(i as usize).unwrap().load().len())
            .collect();
        (t.0, lens)
    }

    #[test]
    fn control_chains_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_slice(&[CLASS_MQ, MQ_VQ_PAIRS_SET], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&3u16.to_le_bytes(), GuestAddress(0x10_0100))
            .unwrap();
        mem.write_obj(0xaau8, GuestAddress(0x10_1000)).unwrap();
        mem.write_obj(0xaau8, GuestAddress(0x10_2000)).unwrap();
        let (calls, lens) = run(
            &[
                // Header and payload in two descriptors, then the status byte.
                vec![
                    desc(0x10_0000, 2, 0),
                    desc(0x10_0100, 2, 0),
                    desc(0x10_1000, 1, F_WRITE),
                ],
                // Readable data after the status: malformed.
                vec![desc(0x10_2000, 1, F_WRITE), desc(0x10_0000, 2, 0)],
                // Command bytes outside guest memory, no status: returned unused.
                vec![desc(0xfff_0000, 4, 0)],
            ],
            &mem,
        );
        assert_eq!(calls, vec![3]);
        assert_eq!(lens, vec![1, 1, 0]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_1000)).unwrap(), ACK_OK);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x10_2000)).unwrap(),
            ACK_ERR
        );
    }

    #[test]
    fn other_commands_and_garbage() {
        let mut t = Pairs(Vec::new());
        assert_eq!(execute(&[CLASS_RX, 0, 1], 1, &mut t), ACK_OK);
        assert_eq!(execute(&[CLASS_MAC, 1, 0, 0, 0, 0], 1, &mut t), ACK_OK);
        assert_eq!(execute(&[9, 9], 1, &mut t), ACK_ERR);
        assert_eq!(execute(&[CLASS_MQ], 1, &mut t), ACK_ERR);
        assert_eq!(execute(&[], 1, &mut t), ACK_ERR);
        assert!(t.0.is_empty());
    }
}
