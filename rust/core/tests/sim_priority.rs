//! Demand before prefetch at the copy engine: a demand copy waits behind at most one
//! bounded speculative part; cancel and promote act on the parts not yet issued.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{copy, host_allocator, next_final, sim_allocator, wait_for};
use moeflow_core::{
    ArenaAllocator, BlockHandle, CopyRequest, SimDevice, Status, TransferEngine, PRIORITY_DEMAND,
    PRIORITY_PREFETCH, SPECULATIVE_PART_BYTES,
};

const MIB: u64 = 1 << 20;
const GBPS: f64 = 1.0;

struct Rig {
    sim: Arc<SimDevice>,
    engine: TransferEngine,
    host: Arc<ArenaAllocator>,
    source: BlockHandle,
    device: Arc<ArenaAllocator>,
    class: u32,
}

/// 16 MiB blocks on a 1 GB/s device: one 8 MiB part takes ~8.4 ms.
fn rig() -> Rig {
    rig_at(GBPS)
}

fn rig_at(gbps: f64) -> Rig {
    let sim = Arc::new(SimDevice::new(gbps, 10.0, true).unwrap());
    let engine = TransferEngine::with_sim(2, 16 * MIB, None, Some(sim.clone())).unwrap();
    let (host, host_class) = host_allocator(16 * MIB, 16 * MIB, 16 * MIB);
    let (device, class) = sim_allocator(&sim, 256 * MIB, 16 * MIB, 16 * MIB);
    let source = host.lock().alloc(host_class).unwrap();
    Rig {
        sim,
        engine,
        host,
        source,
        device,
        class,
    }
}

impl Rig {
    fn submit(&self, length: u64, priority: u8, owned: bool) -> (u64, BlockHandle) {
        let block = self.device.lock().alloc(self.class).unwrap();
        let request = CopyRequest {
            dst: self.device.clone(),
            priority,
            owned,
            ..copy(&self.host, self.source, block, length)
        };
        (self.engine.submit_copy(request).unwrap(), block)
    }

    fn seconds(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / (GBPS * 1e9))
    }
}

#[test]
fn a_demand_copy_overtakes_ten_queued_prefetches() {
    let rig = rig();
    let prefetches: Vec<u64> = (0..10)
        .map(|_| rig.submit(16 * MIB, PRIORITY_PREFETCH, true).0)
        .collect();
    std::thread::sleep(Duration::from_millis(2));
    let start = Instant::now();
    let (demand, _) = rig.submit(MIB, PRIORITY_DEMAND, true);
    let done = wait_for(&rig.engine, demand, &mut Vec::new());
    let waited = start.elapsed();
    assert_eq!((done.status, done.bytes), (Status::Done, MIB));
    // The rule: one speculative part ahead of it, then its own bytes.
    let bound = rig.seconds(SPECULATIVE_PART_BYTES + MIB) + Duration::from_micros(10);
    let all_prefetches = rig.seconds(160 * MIB);
    assert!(
        waited < bound.mul_f64(1.5) + Duration::from_millis(20),
        "demand waited {waited:?}; bound {bound:?}, all prefetches take {all_prefetches:?}"
    );
    for id in prefetches {
        let done = wait_for(&rig.engine, id, &mut Vec::new());
        assert_eq!((done.status, done.bytes), (Status::Done, 16 * MIB));
    }
    assert_eq!(rig.sim.hazards(), 0);
}

#[test]
fn cancel_drops_unissued_parts_and_ends_after_the_issued_landed() {
    // At 0.5 GB/s the first 8 MiB part is on the stream for ~17 ms; the second waits.
    let rig = rig_at(0.5);
    let free_before = rig.device.stats().live_blocks;
    let (id, block) = rig.submit(16 * MIB, PRIORITY_PREFETCH, true);
    std::thread::sleep(Duration::from_millis(5));
    assert!(
        rig.engine.cancel(id),
        "a copy with unissued parts can be cancelled"
    );
    assert!(!rig.engine.cancel(id), "once");
    let done = wait_for(&rig.engine, id, &mut Vec::new());
    assert_eq!(done.status, Status::Cancelled);
    assert_eq!(
        done.bytes, SPECULATIVE_PART_BYTES,
        "the issued part landed and is reported"
    );
    assert!(
        !rig.device.lock().is_live(&block),
        "the owned block is freed"
    );
    assert_eq!(rig.device.stats().live_blocks, free_before);
    assert_eq!(rig.device.stats().pinned_blocks, 0);
    assert_eq!(rig.engine.pending(), 0);
}

#[test]
fn a_copy_whose_parts_are_all_issued_cannot_be_cancelled() {
    let rig = rig();
    let (id, _) = rig.submit(MIB, PRIORITY_DEMAND, false);
    let issued = rig.engine.wait(Some(Duration::from_secs(5))).unwrap();
    assert_eq!((issued.id, issued.status), (id, Status::Issued));
    assert!(!rig.engine.cancel(id));
    assert_eq!(next_final(&rig.engine).status, Status::Done);
}

#[test]
fn promote_moves_unissued_parts_to_the_demand_lane() {
    let rig = rig();
    let queued: Vec<u64> = (0..6)
        .map(|_| rig.submit(16 * MIB, PRIORITY_PREFETCH, true).0)
        .collect();
    let last = *queued.last().unwrap();
    assert!(rig.engine.promote(last, PRIORITY_DEMAND).unwrap());
    assert!(
        !rig.engine.promote(last, PRIORITY_PREFETCH).unwrap(),
        "never demoted"
    );
    let mut order = Vec::new();
    while order.len() < queued.len() {
        order.push(next_final(&rig.engine).id);
    }
    let at = |id: u64| order.iter().position(|&x| x == id).unwrap();
    assert!(
        at(last) <= 1,
        "the promoted copy finished first or second: {order:?}"
    );
}

#[test]
fn shutdown_with_queued_device_copies_cancels_them_and_frees_their_blocks() {
    let rig = rig();
    let ids: Vec<u64> = (0..5)
        .map(|_| rig.submit(16 * MIB, PRIORITY_PREFETCH, true).0)
        .collect();
    rig.engine.close();
    let finals: Vec<_> = rig
        .engine
        .drain()
        .into_iter()
        .filter(|c| c.is_final())
        .collect();
    assert_eq!(finals.len(), ids.len());
    assert!(finals.iter().any(|c| c.status == Status::Cancelled));
    let done = finals.iter().filter(|c| c.status == Status::Done).count() as u64;
    assert_eq!(
        rig.device.stats().live_blocks,
        done,
        "cancelled owned blocks are freed"
    );
    assert_eq!(rig.device.stats().pinned_blocks, 0);
}
