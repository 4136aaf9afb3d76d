//! Injected faults in the I/O and copy paths: each reaches its transfer's completion as
//! a typed error (or, for a delay, only slows it), frees an owned block, and leaves the
//! engine serving the next transfer with the right bytes.

mod common;

use std::time::{Duration, Instant};

use common::{block_bytes, copy, host_allocator, read, temp_file, wait_for};
use moeflow_core::{CoreError, FaultKind, FaultOp, FaultRule, Status, TransferEngine};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;

/// Reads `[offset, offset + length)` with a CRC; returns the completion and the block.
fn read_checked(
    engine: &TransferEngine,
    fid: u64,
    bytes: &[u8],
    offset: u64,
    length: u64,
) -> (moeflow_core::Completion, Vec<u8>) {
    let (alloc, class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let handle = alloc.lock().alloc(class).unwrap();
    let crc = crc32fast::hash(&bytes[offset as usize..(offset + length) as usize]);
    let request = moeflow_core::ReadRequest {
        expect_crc32: Some(crc),
        ..read(fid, offset, length, &alloc, handle)
    };
    let done = wait_for(
        engine,
        engine.submit_read(request).unwrap(),
        &mut Vec::new(),
    );
    let got = if done.status == Status::Done {
        let got = block_bytes(&alloc, &handle)[..length as usize].to_vec();
        alloc.lock().free(&handle).unwrap();
        got
    } else {
        assert!(
            !alloc.lock().is_live(&handle),
            "a failed owned read frees its block"
        );
        Vec::new()
    };
    assert_eq!(alloc.stats().pinned_blocks, 0);
    (done, got)
}

fn aimed(kind: FaultKind, fid: u64, offset: u64) -> FaultRule {
    FaultRule {
        file_id: Some(fid),
        offset: Some(offset),
        ..FaultRule::new(kind, FaultOp::Read)
    }
}

#[test]
fn each_read_fault_fails_its_transfer_with_a_typed_error_then_reads_are_exact() {
    let file = temp_file((2 * MIB) as usize, 11);
    let engine = TransferEngine::new(3, CHUNK, None).unwrap();
    let path = file.path.to_str().unwrap();
    let fid = engine.register_file(path).unwrap();
    // 300 KiB from 64 KiB: five parts; the fault is aimed inside the third.
    let (offset, length, target) = (CHUNK, 300 * 1024, CHUNK + 2 * CHUNK + 777);
    for kind in [
        FaultKind::Errno(libc::EIO),
        FaultKind::ShortRead,
        FaultKind::Corrupt,
        FaultKind::Panic,
    ] {
        engine.add_fault(aimed(kind, fid, target)).unwrap();
        let (done, _) = read_checked(&engine, fid, &file.bytes, offset, length);
        assert_eq!(done.status, Status::Failed, "{kind:?}");
        match (kind, done.error) {
            (
                FaultKind::Errno(_),
                Some(CoreError::Transfer {
                    errno: Some(libc::EIO),
                    path: Some(p),
                    offset: Some(at),
                    ..
                }),
            ) => assert_eq!((p.as_str(), at), (path, offset + 2 * CHUNK)),
            (FaultKind::ShortRead, Some(CoreError::ShortRead { path: p, got, .. })) => {
                // the file seemed to end at the aimed offset
                assert_eq!((p.as_str(), got), (path, target - offset));
            }
            (
                FaultKind::Corrupt,
                Some(CoreError::ChecksumMismatch {
                    path: p,
                    offset: at,
                    ..
                }),
            ) => assert_eq!((p.as_str(), at), (path, offset)),
            (
                FaultKind::Panic,
                Some(CoreError::Transfer {
                    path: Some(p),
                    message,
                    ..
                }),
            ) => {
                assert_eq!(p, path);
                assert!(message.contains("panicked"), "{message}");
            }
            (kind, other) => panic!("{kind:?} gave {other:?}"),
        }
        // The rule was for one part: the same read now lands byte for byte.
        let (done, got) = read_checked(&engine, fid, &file.bytes, offset, length);
        assert_eq!(
            done.status,
            Status::Done,
            "after {kind:?}: {:?}",
            done.error
        );
        assert!(got == file.bytes[offset as usize..(offset + length) as usize]);
    }
    assert_eq!(engine.fault_hits(), 4);
    let stats = engine.stats();
    assert_eq!((stats.failed, stats.completed), (4, 4));
}

#[test]
fn a_panicking_worker_keeps_serving_and_every_worker_survives() {
    let file = temp_file(MIB as usize, 12);
    let engine = TransferEngine::new(2, CHUNK, None).unwrap();
    let fid = engine.register_file(file.path.to_str().unwrap()).unwrap();
    // Every part of the next eight reads panics: more panics than workers.
    engine
        .add_fault(FaultRule {
            count: 8,
            ..FaultRule::new(FaultKind::Panic, FaultOp::Read)
        })
        .unwrap();
    for _ in 0..8 {
        let (done, _) = read_checked(&engine, fid, &file.bytes, 0, CHUNK);
        assert_eq!(done.status, Status::Failed);
    }
    for _ in 0..4 {
        let (done, got) = read_checked(&engine, fid, &file.bytes, 0, 3 * CHUNK);
        assert_eq!(done.status, Status::Done);
        assert!(got == file.bytes[..3 * CHUNK as usize]);
    }
}

#[test]
fn the_nth_read_is_hit_and_copies_can_panic_or_wait() {
    let file = temp_file(MIB as usize, 13);
    let engine = TransferEngine::new(1, CHUNK, None).unwrap();
    let fid = engine.register_file(file.path.to_str().unwrap()).unwrap();
    engine
        .add_fault(FaultRule {
            skip: 2,
            ..FaultRule::new(FaultKind::Errno(libc::EIO), FaultOp::Read)
        })
        .unwrap();
    let statuses: Vec<Status> = (0..4)
        .map(|_| read_checked(&engine, fid, &file.bytes, 0, CHUNK).0.status)
        .collect();
    assert_eq!(
        statuses,
        [Status::Done, Status::Done, Status::Failed, Status::Done]
    );

    let (alloc, class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let a = alloc.lock().alloc(class).unwrap();
    let b = alloc.lock().alloc(class).unwrap();
    engine
        .add_fault(FaultRule::new(FaultKind::Panic, FaultOp::Copy))
        .unwrap();
    let done = wait_for(
        &engine,
        engine.submit_copy(copy(&alloc, a, b, CHUNK)).unwrap(),
        &mut Vec::new(),
    );
    assert_eq!(done.status, Status::Failed);
    assert!(matches!(
        done.error,
        Some(CoreError::Transfer { op: "copy", .. })
    ));
    engine
        .add_fault(FaultRule::new(
            FaultKind::Delay(Duration::from_millis(200)),
            FaultOp::Any,
        ))
        .unwrap();
    let begin = Instant::now();
    let done = wait_for(
        &engine,
        engine.submit_copy(copy(&alloc, a, b, CHUNK)).unwrap(),
        &mut Vec::new(),
    );
    assert_eq!(done.status, Status::Done);
    assert!(begin.elapsed() >= Duration::from_millis(200));
    assert_eq!(alloc.stats().pinned_blocks, 0);
}

#[test]
fn close_finishes_within_a_delay_and_cleared_rules_stop_hitting() {
    let file = temp_file(MIB as usize, 14);
    let engine = TransferEngine::new(2, CHUNK, None).unwrap();
    let fid = engine.register_file(file.path.to_str().unwrap()).unwrap();
    engine
        .add_fault(FaultRule {
            count: 0,
            ..FaultRule::new(FaultKind::Errno(libc::EIO), FaultOp::Read)
        })
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            read_checked(&engine, fid, &file.bytes, 0, CHUNK).0.status,
            Status::Failed
        );
    }
    engine.clear_faults();
    assert_eq!(
        read_checked(&engine, fid, &file.bytes, 0, CHUNK).0.status,
        Status::Done
    );
    engine
        .add_fault(FaultRule {
            count: 0,
            ..FaultRule::new(FaultKind::Delay(Duration::from_millis(300)), FaultOp::Read)
        })
        .unwrap();
    let (alloc, class) = host_allocator(8 * MIB, 8 * MIB, MIB);
    let handles: Vec<_> = (0..4).map(|_| alloc.lock().alloc(class).unwrap()).collect();
    for handle in &handles {
        engine
            .submit_read(read(fid, 0, CHUNK, &alloc, *handle))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(50)); // two parts are running (sleeping)
    let begin = Instant::now();
    engine.close();
    // the two running parts finish their delay; the queued ones are cancelled
    assert!(begin.elapsed() < Duration::from_secs(2));
    assert_eq!(alloc.stats().pinned_blocks, 0);
    assert!(engine.add_fault(aimed(FaultKind::Corrupt, 99, 0)).is_err());
}

#[test]
fn a_panic_at_a_device_copy_issue_fails_that_copy_and_the_copy_stream_goes_on() {
    let sim = std::sync::Arc::new(moeflow_core::SimDevice::new(50.0, 5.0, true).unwrap());
    let engine = TransferEngine::with_sim(2, CHUNK, None, Some(sim.clone())).unwrap();
    let (host, host_class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let (device, device_class) = common::sim_allocator(&sim, 4 * MIB, 4 * MIB, MIB);
    let src = host.lock().alloc(host_class).unwrap();
    let bytes = common::pattern(MIB as usize, 15);
    common::fill(&host, &src, &bytes);
    let submit = |owned: bool| {
        let dst = device.lock().alloc(device_class).unwrap();
        let request = moeflow_core::CopyRequest {
            dst: device.clone(),
            dst_handle: dst,
            owned,
            ..copy(&host, src, src, MIB)
        };
        (dst, engine.submit_copy(request).unwrap())
    };
    engine
        .add_fault(FaultRule::new(FaultKind::Panic, FaultOp::Copy))
        .unwrap();
    let (dst, id) = submit(true);
    let done = wait_for(&engine, id, &mut Vec::new());
    assert_eq!(done.status, Status::Failed);
    match done.error {
        Some(CoreError::Transfer {
            op: "copy",
            message,
            ..
        }) => {
            assert!(message.contains("panicked"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        !device.lock().is_live(&dst),
        "the owned destination was freed"
    );
    engine
        .add_fault(FaultRule::new(
            FaultKind::Delay(Duration::from_millis(200)),
            FaultOp::Copy,
        ))
        .unwrap();
    let begin = Instant::now();
    let (dst, id) = submit(false);
    assert_eq!(wait_for(&engine, id, &mut Vec::new()).status, Status::Done);
    assert!(begin.elapsed() >= Duration::from_millis(200));
    let (back, id) = {
        let back = host.lock().alloc(host_class).unwrap();
        let request = moeflow_core::CopyRequest {
            src: device.clone(),
            src_handle: dst,
            ..copy(&host, back, back, MIB)
        };
        (back, engine.submit_copy(request).unwrap())
    };
    assert_eq!(wait_for(&engine, id, &mut Vec::new()).status, Status::Done);
    assert!(block_bytes(&host, &back)[..MIB as usize] == bytes[..]);
    assert_eq!(
        (host.stats().pinned_blocks, device.stats().pinned_blocks),
        (0, 0)
    );
}
