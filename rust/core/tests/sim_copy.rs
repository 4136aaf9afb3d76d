//! Device copies on the simulated device move every byte of any size, in parts, with
//! 'issued' (and its event) after the last part and 'done' after that event.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{block_bytes, copy, fill, host_allocator, pattern, sim_allocator, wait_for};
use moeflow_core::{
    ArenaAllocator, BlockHandle, Completion, CopyRequest, SimDevice, Status, TransferEngine,
    PRIORITY_DEMAND, PRIORITY_PREFETCH,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;

fn request(
    src: &Arc<ArenaAllocator>,
    a: BlockHandle,
    dst: &Arc<ArenaAllocator>,
    b: BlockHandle,
    length: u64,
    priority: u8,
) -> CopyRequest {
    CopyRequest {
        dst: dst.clone(),
        priority,
        ..copy(src, a, b, length)
    }
}

/// Waits for `id`'s final completion, checking that 'issued' came first with an event.
fn issued_then_done(engine: &TransferEngine, id: u64) -> Completion {
    let mut others = Vec::new();
    let done = wait_for(engine, id, &mut others);
    let issued: Vec<_> = others
        .iter()
        .filter(|c| c.id == id && c.status == Status::Issued)
        .collect();
    assert_eq!(
        issued.len(),
        1,
        "one 'issued' before 'done' for transfer {id}"
    );
    assert!(issued[0].event.is_some());
    done
}

#[test]
fn copies_of_every_size_move_every_byte_both_ways() {
    let sim = Arc::new(SimDevice::new(50.0, 5.0, true).unwrap());
    let engine = TransferEngine::with_sim(2, CHUNK, None, Some(sim.clone())).unwrap();
    let (host, host_class) = host_allocator(256 * MIB, 128 * MIB, 65 * MIB);
    let (device, device_class) = sim_allocator(&sim, 256 * MIB, 128 * MIB, 65 * MIB);
    let sizes = [KIB, CHUNK - 1, CHUNK, CHUNK + 1, 64 * MIB, 3 * 4096 + 123];
    for (seed, &size) in sizes.iter().enumerate() {
        for priority in [PRIORITY_DEMAND, PRIORITY_PREFETCH] {
            let bytes = pattern(size as usize, seed as u64 + 1);
            let src = host.lock().alloc(host_class).unwrap();
            let back = host.lock().alloc(host_class).unwrap();
            let block = device.lock().alloc(device_class).unwrap();
            let second = device.lock().alloc(device_class).unwrap();
            fill(&host, &src, &bytes);
            let up = engine
                .submit_copy(request(&host, src, &device, block, size, priority))
                .unwrap();
            let done = issued_then_done(&engine, up);
            assert_eq!(
                (done.status, done.bytes),
                (Status::Done, size),
                "up, {size} bytes"
            );
            assert!(done.event.as_ref().unwrap().query().unwrap());
            let on_device = block_bytes(&device, &block);
            assert!(
                on_device[..size as usize] == bytes[..],
                "{size} bytes landed on the device"
            );
            assert!(
                on_device[size as usize..].iter().all(|&b| b == 0xFF),
                "bytes past the copy stay poison"
            );
            let across = engine
                .submit_copy(request(&device, block, &device, second, size, priority))
                .unwrap();
            assert_eq!(issued_then_done(&engine, across).bytes, size);
            let down = engine
                .submit_copy(request(&device, second, &host, back, size, priority))
                .unwrap();
            let done = issued_then_done(&engine, down);
            assert_eq!(
                (done.status, done.bytes),
                (Status::Done, size),
                "down, {size} bytes"
            );
            assert!(block_bytes(&host, &back)[..size as usize] == bytes[..]);
            for (alloc, handle) in [
                (&host, src),
                (&host, back),
                (&device, block),
                (&device, second),
            ] {
                alloc.free(&handle).unwrap();
            }
        }
    }
    assert_eq!(sim.hazards(), 0, "{:?}", sim.last_hazard());
    assert_eq!(engine.pending(), 0);
    assert_eq!(device.stats().pinned_blocks, 0);
}

#[test]
fn bandwidth_and_latency_are_respected() {
    let sim = Arc::new(SimDevice::new(4.0, 2000.0, true).unwrap());
    let engine = TransferEngine::with_sim(1, 8 * MIB, None, Some(sim.clone())).unwrap();
    let (host, host_class) = host_allocator(64 * MIB, 64 * MIB, 32 * MIB);
    let (device, device_class) = sim_allocator(&sim, 64 * MIB, 64 * MIB, 32 * MIB);
    let src = host.lock().alloc(host_class).unwrap();
    let block = device.lock().alloc(device_class).unwrap();
    let start = Instant::now();
    let id = engine
        .submit_copy(request(
            &host,
            src,
            &device,
            block,
            32 * MIB,
            PRIORITY_DEMAND,
        ))
        .unwrap();
    let done = wait_for(&engine, id, &mut Vec::new());
    let elapsed = start.elapsed();
    // 4 parts of 8 MiB: 4 x 2 ms latency + 32 MiB / 4 GB/s = 16.4 ms.
    let model = Duration::from_secs_f64(4.0 * 2e-3 + (32 * MIB) as f64 / 4e9);
    assert_eq!(done.status, Status::Done);
    assert!(elapsed >= model, "{elapsed:?} beat the model {model:?}");
    assert!(
        elapsed < model * 4 + Duration::from_millis(200),
        "{elapsed:?} vs {model:?}"
    );
    let busy = sim.busy_seconds();
    assert!(
        (busy - model.as_secs_f64()).abs() < 1e-3,
        "busy {busy} s, model {model:?}"
    );
    assert_eq!(sim.bytes_copied(), 32 * MIB);
    // the engine's busy time counts the copy stream's time too, as the completer saw it land
    let counted = engine.stats().busy_nanos as f64 / 1e9;
    assert!(
        counted >= busy * 0.95 && counted <= elapsed.as_secs_f64() + 1e-3,
        "busy_nanos {counted} s, stream busy {busy} s, elapsed {elapsed:?}"
    );
}

#[test]
fn a_zero_length_device_copy_completes() {
    let sim = Arc::new(SimDevice::new(25.0, 10.0, true).unwrap());
    let engine = TransferEngine::with_sim(1, CHUNK, None, Some(sim.clone())).unwrap();
    let (host, host_class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let (device, device_class) = sim_allocator(&sim, 4 * MIB, 4 * MIB, MIB);
    let src = host.lock().alloc(host_class).unwrap();
    let block = device.lock().alloc(device_class).unwrap();
    let id = engine
        .submit_copy(request(&host, src, &device, block, 0, PRIORITY_DEMAND))
        .unwrap();
    let done = issued_then_done(&engine, id);
    assert_eq!((done.status, done.bytes), (Status::Done, 0));
}

#[test]
fn a_device_copy_is_refused_by_an_engine_of_another_device() {
    let sim = Arc::new(SimDevice::new(25.0, 10.0, true).unwrap());
    let other = Arc::new(SimDevice::new(25.0, 10.0, true).unwrap());
    let engine = TransferEngine::with_sim(1, CHUNK, None, Some(other)).unwrap();
    let (host, host_class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let (device, device_class) = sim_allocator(&sim, 4 * MIB, 4 * MIB, MIB);
    let src = host.lock().alloc(host_class).unwrap();
    let block = device.lock().alloc(device_class).unwrap();
    let refused = engine.submit_copy(request(&host, src, &device, block, MIB, PRIORITY_DEMAND));
    assert!(
        matches!(refused, Err(moeflow_core::CoreError::InvalidArgument(_))),
        "{refused:?}"
    );
    assert_eq!(device.stats().pinned_blocks, 0, "nothing stays pinned");
    assert!(TransferEngine::with_sim(1, CHUNK, Some(0), Some(sim)).is_err());
}
