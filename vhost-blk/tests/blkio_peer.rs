//! keel-vhost-blk driven by an independent frontend: libblkio's pure-Rust
//! `virtio-blk-vhost-user` driver (the `blkio` crate).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{make_image, Backend, Client, Rng};

const IMAGE_LEN: usize = 8 << 20;
const BUF_LEN: usize = 1 << 20;

#[test]
fn random_read_write_verify_flush_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut model = make_image(&image, IMAGE_LEN, 1);
    let mut backend = Backend::start(
        dir.path(),
        &image,
        &["--serial", "keel-test", "--queue-size", "128"],
    );

    let mut rng = Rng(42);
    for round in 0..2 {
        let mut c = Client::connect_with(&backend.socket, BUF_LEN, 128, false).unwrap();
        assert_eq!(c.capacity(), IMAGE_LEN as u64);
        for _ in 0..300 {
            let sectors = 1 + rng.below(64) as usize;
            let len = sectors * 512;
            let offset = rng.below((IMAGE_LEN - len) as u64 / 512) * 512;
            if rng.below(2) == 0 {
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                c.buf()[..len].copy_from_slice(&data);
                assert_eq!(c.write(offset, 0, len), 0);
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            } else {
                c.buf()[..len].fill(0xee);
                assert_eq!(c.read(offset, 0, len), 0);
                assert!(
                    c.buf()[..len] == model[offset as usize..offset as usize + len],
                    "round {round}: data mismatch at {offset} len {len}"
                );
            }
        }
        assert_eq!(c.flush(), 0);
        // After a flush the image on disk holds exactly what was acknowledged.
        assert!(
            std::fs::read(&image).unwrap() == model,
            "image differs after flush"
        );
        drop(c);
        assert!(
            backend.is_running(),
            "backend exited when the frontend went away"
        );
    }

    // A third frontend reads everything back in large requests.
    let mut c = Client::connect_with(&backend.socket, BUF_LEN, 128, false).unwrap();
    for off in (0..IMAGE_LEN).step_by(BUF_LEN) {
        assert_eq!(c.read(off as u64, 0, BUF_LEN), 0);
        assert!(c.buf()[..] == model[off..off + BUF_LEN]);
    }
}

#[test]
fn many_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let model = make_image(&image, IMAGE_LEN, 2);
    let backend = Backend::start(dir.path(), &image, &["--queue-size", "64"]);
    let mut c = Client::connect_with(&backend.socket, BUF_LEN, 64, false).unwrap();
    let mut rng = Rng(7);
    // 128 x 4 KiB reads at once: more than the queue holds, so blkio backlogs some.
    let mut expected = Vec::new();
    for i in 0..128usize {
        let offset = rng.below((IMAGE_LEN / 4096) as u64) * 4096;
        let p = (c.region.addr + i * 4096) as *mut u8;
        c.queue.read(offset, p, 4096, i, blkio::ReqFlags::empty());
        expected.push(offset as usize);
    }
    let done = c.wait(128);
    assert!(done.iter().all(|&(_, ret)| ret == 0));
    for (i, off) in expected.iter().enumerate() {
        assert!(c.buf()[i * 4096..(i + 1) * 4096] == model[*off..off + 4096]);
    }
}

#[test]
fn errors_read_only_and_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let model = make_image(&image, IMAGE_LEN, 3);
    let backend = Backend::start(dir.path(), &image, &["--read-only"]);
    // blkio refuses to open a read-only device for writing.
    assert!(Client::connect(&backend.socket, BUF_LEN).is_err());
    let mut c = Client::connect_with(&backend.socket, BUF_LEN, 256, true).unwrap();
    assert_ne!(
        c.read(IMAGE_LEN as u64, 0, 4096),
        0,
        "read past the end succeeded"
    );
    assert_ne!(
        c.read(IMAGE_LEN as u64 - 512, 0, 1024),
        0,
        "read across the end succeeded"
    );
    assert_eq!(c.read(IMAGE_LEN as u64 - 4096, 0, 4096), 0);
    assert!(c.buf()[..4096] == model[IMAGE_LEN - 4096..]);
    assert!(std::fs::read(&image).unwrap() == model);
}

#[test]
fn discard_and_write_zeroes_read_back_zero() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut model = make_image(&image, IMAGE_LEN, 4);
    let backend = Backend::start(dir.path(), &image, &[]);
    let mut c = Client::connect(&backend.socket, BUF_LEN).unwrap();
    c.queue
        .write_zeroes(65536, 8192, 1, blkio::ReqFlags::empty());
    assert_eq!(c.wait(1)[0].1, 0);
    model[65536..65536 + 8192].fill(0);
    c.queue
        .write_zeroes(1 << 20, 4096, 2, blkio::ReqFlags::NO_UNMAP);
    assert_eq!(c.wait(1)[0].1, 0);
    model[1 << 20..(1 << 20) + 4096].fill(0);
    c.queue.discard(2 << 20, 4096, 3, blkio::ReqFlags::empty());
    assert_eq!(c.wait(1)[0].1, 0);
    assert_eq!(c.read(0, 0, BUF_LEN), 0);
    assert!(c.buf()[..] == model[..BUF_LEN]);
    assert_eq!(c.read(1 << 20, 0, 8192), 0);
    assert!(c.buf()[..8192] == model[1 << 20..(1 << 20) + 8192]);
}

#[test]
fn toml_config_two_queues_poll_mode() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let model = make_image(&image, IMAGE_LEN, 5);
    let config = dir.path().join("blk.toml");
    std::fs::write(
        &config,
        "[[disk]]\nsocket = \"blk.sock\"\nimage = \"disk.img\"\nqueues = 2\nmode = \"poll\"\npoll_us = 200\nwrite_cache = false\n",
    )
    .unwrap();
    let socket = dir.path().join("blk.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel-vhost-blk"))
        .arg("--config")
        .arg(&config)
        .stderr(std::fs::File::create(dir.path().join("backend.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let result = std::panic::catch_unwind(|| {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", socket.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        assert_eq!(b.get_i32("max-queues").unwrap(), 2);
        b.set_i32("num-queues", 2).unwrap();
        let mut started = b.start().unwrap();
        let region = b.alloc_mem_region(BUF_LEN).unwrap();
        b.map_mem_region(&region).unwrap();
        let mut rng = Rng(11);
        for round in 0..200usize {
            let q = &mut started.queues[round % 2];
            let offset = rng.below((IMAGE_LEN / 4096) as u64) as usize * 4096;
            q.read(
                offset as u64,
                region.addr as *mut u8,
                4096,
                round,
                blkio::ReqFlags::empty(),
            );
            let mut comps = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
            let mut timeout = std::time::Duration::from_secs(10);
            assert_eq!(q.do_io(&mut comps, 1, Some(&mut timeout), None).unwrap(), 1);
            // SAFETY: do_io filled one completion.
            let c = unsafe { comps[0].assume_init_ref() };
            assert_eq!(c.ret, 0);
            // SAFETY: the region is mapped read/write and only used here.
            let got = unsafe { std::slice::from_raw_parts(region.addr as *const u8, 4096) };
            assert!(got == &model[offset..offset + 4096]);
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap();
}
