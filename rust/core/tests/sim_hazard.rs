//! The simulated device's hazard checker: each hazard fires when its ordering is
//! missing and stays silent when it is there.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{copy, host_allocator, sim_allocator, wait_for};
use moeflow_core::{
    ArenaAllocator, BlockHandle, CopyRequest, CoreError, Event, HazardKind, SimDevice, Status,
    TransferEngine,
};

const MIB: u64 = 1 << 20;

struct Rig {
    sim: Arc<SimDevice>,
    engine: TransferEngine,
    host: Arc<ArenaAllocator>,
    host_block: BlockHandle,
    device: Arc<ArenaAllocator>,
    device_class: u32,
}

/// A 1 MiB block size; `gbps` sets how long a copy stays in flight.
fn rig(gbps: f64) -> Rig {
    let sim = Arc::new(SimDevice::new(gbps, 10.0, true).unwrap());
    let engine = TransferEngine::with_sim(1, MIB, None, Some(sim.clone())).unwrap();
    let (host, host_class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let (device, device_class) = sim_allocator(&sim, 8 * MIB, 8 * MIB, MIB);
    let host_block = host.lock().alloc(host_class).unwrap();
    Rig {
        sim,
        engine,
        host,
        host_block,
        device,
        device_class,
    }
}

impl Rig {
    fn alloc(&self) -> BlockHandle {
        self.device.lock().alloc(self.device_class).unwrap()
    }

    fn address(&self, block: &BlockHandle) -> u64 {
        self.device.address(block).unwrap()
    }

    fn upload(&self, block: BlockHandle, after: Option<Arc<Event>>) -> u64 {
        let request = CopyRequest {
            dst: self.device.clone(),
            priority: 0,
            after,
            ..copy(&self.host, self.host_block, block, MIB)
        };
        self.engine.submit_copy(request).unwrap()
    }

    /// Pops the final completion; a popped 'done' orders compute after the copy.
    fn finish(&self, id: u64) -> moeflow_core::Completion {
        wait_for(&self.engine, id, &mut Vec::new())
    }
}

fn kind(err: &CoreError) -> HazardKind {
    match err {
        CoreError::Hazard { kind, .. } => *kind,
        other => panic!("expected a hazard, got {other:?}"),
    }
}

#[test]
fn reading_a_never_written_block_is_poison() {
    let rig = rig(25.0);
    let block = rig.alloc();
    let err = rig.sim.compute_read(rig.address(&block), 4096).unwrap_err();
    assert_eq!(kind(&err), HazardKind::Poison);
    assert_eq!(rig.sim.hazards(), 1);
    assert!(rig.sim.last_hazard().unwrap().contains("poison"));
}

#[test]
fn reading_while_the_copy_is_in_flight_is_read_before_copy() {
    // 1 MiB at 0.05 GB/s stays in flight for ~21 ms.
    let rig = rig(0.05);
    let block = rig.alloc();
    let id = rig.upload(block, None);
    let issued = rig.engine.wait(Some(Duration::from_secs(5))).unwrap();
    assert_eq!((issued.id, issued.status), (id, Status::Issued));
    let err = rig.sim.compute_read(rig.address(&block), MIB).unwrap_err();
    assert_eq!(kind(&err), HazardKind::ReadBeforeCopy);
    let done = rig.finish(id);
    assert_eq!(done.status, Status::Done);
    // The popped 'done' completion orders compute after the copy.
    rig.sim.compute_read(rig.address(&block), MIB).unwrap();
    assert_eq!(rig.sim.hazards(), 1);
}

#[test]
fn a_landed_copy_needs_an_edge_and_wait_gives_it() {
    let rig = rig(25.0);
    let block = rig.alloc();
    rig.upload(block, None);
    while rig.sim.bytes_copied() < MIB {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Landed, but the completion was not popped and nothing waited on the event.
    let err = rig.sim.compute_read(rig.address(&block), 4096).unwrap_err();
    assert_eq!(kind(&err), HazardKind::ReadBeforeCopy);
    let issued = rig.engine.wait(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(issued.status, Status::Issued);
    let Some(Event::Sim(event)) = issued.event.as_deref() else {
        panic!("a simulated copy's event is simulated")
    };
    rig.sim.wait(event).unwrap();
    rig.sim.compute_read(rig.address(&block), MIB).unwrap();
    assert_eq!(rig.sim.hazards(), 1);
}

#[test]
fn a_copy_over_a_block_compute_read_needs_after() {
    let rig = rig(25.0);
    let block = rig.alloc();
    assert_eq!(rig.finish(rig.upload(block, None)).status, Status::Done);
    rig.sim.compute_read(rig.address(&block), MIB).unwrap();
    // The expert is released and its block reused with no fence: a hazard.
    let failed = rig.finish(rig.upload(block, None));
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(
        kind(failed.error.as_ref().unwrap()),
        HazardKind::CopyOverRead
    );
    assert_eq!(rig.sim.hazards(), 1);
    // Ordered after the read by an event recorded after it: silent.
    let after = Arc::new(Event::Sim(rig.sim.record_compute()));
    assert_eq!(
        rig.finish(rig.upload(block, Some(after))).status,
        Status::Done
    );
    // A read after that event needs the next fence again...
    rig.sim.compute_read(rig.address(&block), MIB).unwrap();
    assert_eq!(rig.finish(rig.upload(block, None)).status, Status::Failed);
    // ...or the host synchronising compute.
    rig.sim.synchronize();
    assert_eq!(rig.finish(rig.upload(block, None)).status, Status::Done);
    assert_eq!(rig.sim.hazards(), 2);
    assert_eq!(rig.device.stats().pinned_blocks, 0);
}

#[test]
fn a_freed_and_reallocated_block_is_poison_until_copied() {
    let rig = rig(25.0);
    let block = rig.alloc();
    assert_eq!(rig.finish(rig.upload(block, None)).status, Status::Done);
    rig.sim.compute_read(rig.address(&block), MIB).unwrap();
    rig.device.free(&block).unwrap();
    let again = rig.alloc();
    assert_eq!(
        again.offset, block.offset,
        "the slab hands the same block back"
    );
    let err = rig.sim.compute_read(rig.address(&again), 4096).unwrap_err();
    assert_eq!(kind(&err), HazardKind::Poison);
    // The read before the free still counts: reuse needs a fence.
    let after = Arc::new(Event::Sim(rig.sim.record_compute()));
    assert_eq!(
        rig.finish(rig.upload(again, Some(after))).status,
        Status::Done
    );
    rig.sim.compute_read(rig.address(&again), MIB).unwrap();
}

#[test]
fn reads_outside_the_arenas_and_foreign_events_are_refused() {
    let rig = rig(25.0);
    let host_address = rig.host.address(&rig.host_block).unwrap();
    assert!(matches!(
        rig.sim.compute_read(host_address, 16),
        Err(CoreError::InvalidArgument(_))
    ));
    let other = SimDevice::new(25.0, 10.0, true).unwrap();
    assert!(other.wait(&rig.sim.record_compute()).is_err());
    let foreign = Arc::new(Event::Sim(other.record_compute()));
    let block = rig.alloc();
    let request = CopyRequest {
        dst: rig.device.clone(),
        after: Some(foreign),
        ..copy(&rig.host, rig.host_block, block, MIB)
    };
    assert!(rig.engine.submit_copy(request).is_err());
    assert_eq!(rig.sim.hazards(), 0);
}

#[test]
fn an_unchecked_device_stays_silent() {
    let sim = Arc::new(SimDevice::new(25.0, 10.0, false).unwrap());
    let (device, class) = sim_allocator(&sim, 4 * MIB, 4 * MIB, MIB);
    let block = device.lock().alloc(class).unwrap();
    sim.compute_read(device.address(&block).unwrap(), MIB)
        .unwrap();
    assert_eq!(sim.hazards(), 0);
}
