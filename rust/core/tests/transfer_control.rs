//! The transfer engine's control flow: cancellation, promotion, host copies, handle
//! checks at submission and shutdown.

mod common;

use std::sync::Arc;

use common::{block_bytes, copy, host_allocator, next_final, read, temp_file, wait_for};
use moeflow_core::{
    ArenaAllocator, BlockHandle, CopyRequest, CoreError, Status, TransferEngine,
    PRIORITY_BACKGROUND, PRIORITY_DEMAND,
};

const MIB: u64 = 1 << 20;

/// An engine with one worker kept busy by a run of long single-part copies (prefetch
/// lane), so that what is submitted next at that priority or below stays queued;
/// returns the busy transfers' ids once the worker took the first.
fn busy_engine(alloc: &Arc<ArenaAllocator>, class: u32) -> (TransferEngine, Vec<u64>) {
    const COPIES: usize = 16;
    let engine = TransferEngine::new(1, 512 * MIB, None).unwrap();
    let a = alloc.lock().alloc(class).unwrap();
    let b = alloc.lock().alloc(class).unwrap();
    let ids = (0..COPIES)
        .map(|_| engine.submit_copy(copy(alloc, a, b, a.size)).unwrap())
        .collect();
    // Once the worker popped the first, its claim follows within nanoseconds.
    while engine.stats().queued.iter().sum::<u64>() == COPIES as u64 {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    std::thread::sleep(std::time::Duration::from_millis(1));
    (engine, ids)
}

/// Every final completion until none is pending, in arrival order.
fn all_finals(engine: &TransferEngine) -> Vec<(u64, Status)> {
    let mut finals = Vec::new();
    while engine.pending() > 0 || engine.completions_waiting() > 0 {
        let done = next_final(engine);
        finals.push((done.id, done.status));
    }
    finals
}

#[test]
fn cancel_succeeds_only_before_a_part_started() {
    let (alloc, class) = host_allocator(512 * MIB, 256 * MIB, 192 * MIB);
    let (small, small_class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let (engine, busy) = busy_engine(&alloc, class);
    let file = temp_file(MIB as usize, 6);
    let fid = engine.register_file(file.path.to_str().unwrap()).unwrap();
    let handle = small.lock().alloc(small_class).unwrap();
    let id = engine
        .submit_read(read(fid, 0, MIB, &small, handle))
        .unwrap();
    assert_eq!(
        small.lock().pin_count(&handle).unwrap(),
        1,
        "pinned while queued"
    );
    assert!(engine.cancel(id));
    assert!(!engine.cancel(id), "a transfer is cancelled once");
    assert!(
        !small.lock().is_live(&handle),
        "the owned block is freed by the cancel"
    );
    let mut others = Vec::new();
    let cancelled = wait_for(&engine, id, &mut others);
    assert_eq!(
        (cancelled.status, cancelled.bytes, cancelled.nanos),
        (Status::Cancelled, 0, 0)
    );
    assert!(
        !engine.cancel(busy[0]),
        "a started transfer cannot be cancelled"
    );
    let finals = all_finals(&engine);
    assert!(others.iter().all(|c| c.status == Status::Done));
    assert!(finals.iter().all(|&(_, status)| status == Status::Done));
    assert_eq!(others.len() + finals.len(), busy.len());
    assert_eq!(engine.pending(), 0);
    assert_eq!(engine.stats().cancelled, 1);
    assert_eq!(small.stats().pinned_blocks, 0);
}

#[test]
fn promote_moves_a_queued_transfer_ahead() {
    let (alloc, class) = host_allocator(512 * MIB, 256 * MIB, 192 * MIB);
    let (small, small_class) = host_allocator(8 * MIB, 8 * MIB, MIB);
    let (engine, busy) = busy_engine(&alloc, class);
    let blocks: Vec<BlockHandle> = (0..4)
        .map(|_| small.lock().alloc(small_class).unwrap())
        .collect();
    let ids: Vec<u64> = (0..3)
        .map(|i| {
            let request = CopyRequest {
                priority: PRIORITY_BACKGROUND,
                ..copy(&small, blocks[3], blocks[i], MIB)
            };
            engine.submit_copy(request).unwrap()
        })
        .collect();
    assert_eq!(engine.stats().queued[PRIORITY_BACKGROUND as usize], 3);
    assert!(engine.promote(ids[2], PRIORITY_DEMAND).unwrap());
    assert!(
        !engine.promote(ids[2], PRIORITY_BACKGROUND).unwrap(),
        "never demoted"
    );
    assert!(engine.promote(ids[0], 7).is_err(), "no such lane");
    let order: Vec<u64> = all_finals(&engine).into_iter().map(|(id, _)| id).collect();
    let at = |id: u64| order.iter().position(|&x| x == id).unwrap();
    assert!(
        at(ids[2]) < at(busy[busy.len() - 2]),
        "demand overtakes queued prefetches"
    );
    assert_eq!(
        &order[order.len() - 2..],
        &[ids[0], ids[1]],
        "background last, FIFO"
    );
    assert!(
        !engine.promote(ids[1], PRIORITY_DEMAND).unwrap(),
        "finished transfers stay put"
    );
}

#[test]
fn host_copies_are_byte_exact_across_parts() {
    let engine = TransferEngine::new(2, 64 * 1024, None).unwrap();
    let (alloc, class) = host_allocator(8 * MIB, 8 * MIB, 2 * MIB);
    let a = alloc.lock().alloc(class).unwrap();
    let b = alloc.lock().alloc(class).unwrap();
    let data = common::pattern(a.size as usize, 7);
    let address = alloc.address(&a).unwrap();
    // SAFETY: (test) the block is live, host memory, and no transfer touches it yet.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), address as *mut u8, data.len()) };
    let request = CopyRequest {
        src_offset: 3,
        dst_offset: 5,
        ..copy(&alloc, a, b, MIB + 7)
    };
    let done = wait_for(
        &engine,
        engine.submit_copy(request).unwrap(),
        &mut Vec::new(),
    );
    assert_eq!((done.status, done.bytes), (Status::Done, MIB + 7));
    assert!(block_bytes(&alloc, &b)[5..5 + (MIB + 7) as usize] == data[3..3 + (MIB + 7) as usize]);
    let overlap = CopyRequest {
        dst_offset: 10,
        ..copy(&alloc, a, a, 100)
    };
    assert!(matches!(
        engine.submit_copy(overlap),
        Err(CoreError::InvalidArgument(_))
    ));
    let too_long = copy(&alloc, a, b, a.size + 1);
    assert!(matches!(
        engine.submit_copy(too_long),
        Err(CoreError::InvalidArgument(_))
    ));
    assert_eq!(alloc.stats().pinned_blocks, 0);
}

#[test]
fn stale_and_foreign_handles_are_refused_at_submission() {
    let engine = TransferEngine::new(1, MIB, None).unwrap();
    let (alloc, class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let (other, other_class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let file = temp_file(4096, 8);
    let fid = engine.register_file(file.path.to_str().unwrap()).unwrap();
    let freed = alloc.lock().alloc(class).unwrap();
    alloc.lock().free(&freed).unwrap();
    let stale = engine
        .submit_read(read(fid, 0, 4096, &alloc, freed))
        .unwrap_err();
    assert!(matches!(stale, CoreError::StaleHandle { .. }), "{stale}");
    let foreign = other.lock().alloc(other_class).unwrap();
    let err = engine
        .submit_read(read(fid, 0, 4096, &alloc, foreign))
        .unwrap_err();
    assert!(matches!(err, CoreError::ForeignHandle { .. }), "{err}");
    assert!(matches!(
        engine.submit_read(read(fid + 9, 0, 1, &alloc, foreign)),
        Err(CoreError::InvalidArgument(_))
    ));
    let missing = engine
        .register_file("/nonexistent/moeflow.bin")
        .unwrap_err();
    assert!(
        matches!(
            missing,
            CoreError::Transfer {
                errno: Some(libc::ENOENT),
                ..
            }
        ),
        "{missing}"
    );
    assert_eq!(other.stats().pinned_blocks, 0);
}

#[test]
fn close_cancels_queued_work_and_refuses_new_work() {
    let (alloc, class) = host_allocator(512 * MIB, 256 * MIB, 192 * MIB);
    let (small, small_class) = host_allocator(8 * MIB, 8 * MIB, MIB);
    let (engine, busy) = busy_engine(&alloc, class);
    let blocks: Vec<BlockHandle> = (0..4)
        .map(|_| small.lock().alloc(small_class).unwrap())
        .collect();
    let queued: Vec<u64> = (0..3)
        .map(|i| {
            engine
                .submit_copy(CopyRequest {
                    owned: true,
                    ..copy(&small, blocks[3], blocks[i], MIB)
                })
                .unwrap()
        })
        .collect();
    engine.close();
    engine.close();
    let mut finals: Vec<_> = engine
        .drain()
        .into_iter()
        .filter(|c| c.is_final())
        .collect();
    finals.sort_by_key(|c| c.id);
    assert_eq!(finals.len(), busy.len() + queued.len());
    assert_eq!((finals[0].id, finals[0].status), (busy[0], Status::Done));
    for c in &finals[1..busy.len()] {
        assert!(matches!(c.status, Status::Done | Status::Cancelled));
    }
    for (c, id) in finals[busy.len()..].iter().zip(&queued) {
        assert_eq!((c.id, c.status), (*id, Status::Cancelled));
    }
    assert_eq!(
        small.stats().live_blocks,
        1,
        "owned destinations of cancelled copies are freed"
    );
    let refused = engine
        .submit_copy(copy(&small, blocks[3], blocks[3], 0))
        .unwrap_err();
    assert_eq!(refused, CoreError::EngineClosed);
    assert_eq!(small.stats().pinned_blocks, 0);
    assert_eq!(engine.pending(), 0);
}

#[test]
fn device_work_without_cuda_is_cuda_unavailable() {
    if moeflow_core::cuda::available() {
        return;
    }
    let err = TransferEngine::new(1, MIB, Some(0)).unwrap_err();
    assert!(matches!(err, CoreError::CudaUnavailable(_)), "{err}");
    let err = moeflow_core::DeviceArena::new(MIB, 0).unwrap_err();
    assert!(matches!(err, CoreError::CudaUnavailable(_)), "{err}");
}

#[test]
fn a_demand_part_waits_behind_at_most_one_speculative_part() {
    // Three workers and a queue of long background copies: one runs at a time, so a demand
    // part submitted behind them starts at once on a free worker, and a device serving
    // requests in order would have at most one speculative part ahead of it.
    let (alloc, class) = host_allocator(512 * MIB, 64 * MIB, 64 * MIB);
    let engine = TransferEngine::new(3, 512 * MIB, None).unwrap();
    let a = alloc.lock().alloc(class).unwrap();
    let b = alloc.lock().alloc(class).unwrap();
    let c = alloc.lock().alloc(class).unwrap();
    let d = alloc.lock().alloc(class).unwrap();
    let mut background = Vec::new();
    for i in 0..12 {
        let (src, dst) = if i % 2 == 0 { (a, b) } else { (c, d) };
        let mut request = copy(&alloc, src, dst, 64 * MIB);
        request.priority = PRIORITY_BACKGROUND;
        background.push(engine.submit_copy(request).unwrap());
    }
    std::thread::sleep(std::time::Duration::from_millis(2));
    let (small, small_class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let s1 = small.lock().alloc(small_class).unwrap();
    let s2 = small.lock().alloc(small_class).unwrap();
    let mut demand = copy(&small, s1, s2, MIB);
    demand.priority = PRIORITY_DEMAND;
    let id = engine.submit_copy(demand).unwrap();
    let finals = all_finals(&engine);
    assert!(finals.iter().all(|(_, status)| *status == Status::Done));
    let high = engine.speculative_high_water();
    assert_eq!(high, 1, "{high} speculative parts ran at once on 3 workers");
    let at = finals.iter().position(|(done, _)| *done == id).unwrap();
    let before = finals[..at]
        .iter()
        .filter(|(done, _)| background.contains(done))
        .count();
    // 2 ms of 64 MiB copies before it was submitted: at most the one running then and the
    // one after (a loaded machine), never the queue of twelve
    assert!(before <= 3, "the demand copy finished behind {before} background copies");
}
