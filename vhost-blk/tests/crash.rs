//! `kill -9` of the backend during a verified write workload: after a restart on the
//! same image, every acknowledged write is readable (peer: the blkio crate).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use common::{make_image, Backend, Client, Rng};

const IMAGE_LEN: usize = 16 << 20;
const BLOCK: usize = 4096;
const DEPTH: usize = 8;

#[test]
fn acknowledged_writes_survive_backend_kill() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    make_image(&image, IMAGE_LEN, 9);
    let mut backend = Backend::start(dir.path(), &image, &[]);
    let mut c = Client::connect(&backend.socket, DEPTH * BLOCK).unwrap();
    let blocks = (IMAGE_LEN / BLOCK) as u64;
    let mut rng = Rng(99);
    let mut seq = 0u64;
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut inflight: Vec<Option<(u64, u64)>> = vec![None; DEPTH];
    let mut submit = |c: &mut Client, slot: usize, inflight: &mut Vec<Option<(u64, u64)>>| {
        let mut block = rng.below(blocks);
        while inflight.iter().flatten().any(|(b, _)| *b == block) {
            block = rng.below(blocks);
        }
        seq += 1;
        let buf = &mut c.buf()[slot * BLOCK..(slot + 1) * BLOCK];
        buf.fill(seq as u8);
        buf[..8].copy_from_slice(&seq.to_le_bytes());
        let p = (c.region.addr + slot * BLOCK) as *const u8;
        c.queue.write(
            block * BLOCK as u64,
            p,
            BLOCK,
            slot,
            blkio::ReqFlags::empty(),
        );
        inflight[slot] = Some((block, seq));
    };
    for slot in 0..DEPTH {
        submit(&mut c, slot, &mut inflight);
    }
    let kill_at = Instant::now() + Duration::from_millis(300);
    let mut killed = false;
    let mut comps: Vec<MaybeUninit<blkio::Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    loop {
        if !killed && Instant::now() >= kill_at {
            backend.kill();
            killed = true;
        }
        let mut timeout = Duration::from_millis(500);
        let n = c
            .queue
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .unwrap_or_default();
        if n == 0 {
            assert!(killed, "backend stalled before it was killed");
            break;
        }
        for comp in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let comp = unsafe { comp.assume_init_ref() };
            assert_eq!(comp.ret, 0);
            let (block, s) = inflight[comp.user_data].take().unwrap();
            acked.insert(block, s);
            if !killed {
                submit(&mut c, comp.user_data, &mut inflight);
            }
        }
    }
    assert!(
        acked.len() > 100,
        "too few writes before the kill: {}",
        acked.len()
    );
    let pending: HashMap<u64, u64> = inflight.iter().flatten().copied().collect();
    drop(c);

    // Restart on the same socket and image; read everything acknowledged.
    let backend = Backend::start(dir.path(), &image, &[]);
    let mut c = Client::connect(&backend.socket, BLOCK).unwrap();
    for (&block, &s) in &acked {
        assert_eq!(c.read(block * BLOCK as u64, 0, BLOCK), 0);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&c.buf()[..8]);
        let found = u64::from_le_bytes(tag);
        // A write in flight at the kill may or may not have landed after the ack.
        let ok = found == s || pending.get(&block) == Some(&found);
        assert!(ok, "block {block}: found write {found}, acknowledged {s}");
        assert!(c.buf()[8..BLOCK].iter().all(|&b| b == found as u8));
    }
}
