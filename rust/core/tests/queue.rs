//! The priority lanes and the doorbell under multi-thread contention.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use moeflow_core::queue::{Doorbell, PriorityLanes};

const PRODUCERS: u64 = 4;
const PER_PRODUCER: u64 = 20_000;

#[test]
fn every_item_is_popped_exactly_once_under_contention() {
    let lanes = Arc::new(PriorityLanes::<u64>::new());
    let done = Arc::new(AtomicBool::new(false));
    let seen: Arc<Vec<AtomicU64>> = Arc::new(
        (0..PRODUCERS * PER_PRODUCER)
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let (lanes, done, seen) = (lanes.clone(), done.clone(), seen.clone());
            thread::spawn(move || loop {
                match lanes.pop() {
                    Some((_, item)) => {
                        seen[item as usize].fetch_add(1, Ordering::Relaxed);
                    }
                    None if done.load(Ordering::Acquire) && lanes.is_empty() => return,
                    None => thread::yield_now(),
                }
            })
        })
        .collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let lanes = lanes.clone();
            thread::spawn(move || {
                for i in 0..PER_PRODUCER {
                    let item = p * PER_PRODUCER + i;
                    lanes.push((item % 3) as u8, item);
                }
            })
        })
        .collect();
    for producer in producers {
        producer.join().unwrap();
    }
    done.store(true, Ordering::Release);
    for consumer in consumers {
        consumer.join().unwrap();
    }
    assert!(seen.iter().all(|count| count.load(Ordering::Relaxed) == 1));
}

#[test]
fn a_single_consumer_drains_in_priority_then_fifo_order() {
    let lanes = PriorityLanes::<(u8, u32)>::new();
    let mut pushed = 0;
    for round in 0..1000u32 {
        for priority in [2u8, 0, 1] {
            lanes.push(priority, (priority, round));
            pushed += 1;
        }
    }
    assert_eq!(
        (lanes.len(0), lanes.len(1), lanes.len(2)),
        (1000, 1000, 1000)
    );
    let mut drained = Vec::with_capacity(pushed);
    while let Some((lane, item)) = lanes.pop() {
        assert_eq!(lane, item.0);
        drained.push(item);
    }
    assert_eq!(drained.len(), pushed);
    let mut expected = drained.clone();
    expected.sort();
    assert_eq!(
        drained, expected,
        "lane 0 first, then 1, then 2; FIFO within a lane"
    );
}

#[test]
fn concurrent_pushes_keep_lane_order_and_per_producer_fifo() {
    let lanes = Arc::new(PriorityLanes::<(u64, u64)>::new());
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let lanes = lanes.clone();
            thread::spawn(move || {
                for i in 0..PER_PRODUCER {
                    lanes.push((i % 3) as u8, (p, i));
                }
            })
        })
        .collect();
    for producer in producers {
        producer.join().unwrap();
    }
    let mut last_lane = 0;
    let mut last_of: std::collections::HashMap<(u8, u64), u64> = Default::default();
    let mut count = 0;
    while let Some((lane, (producer, i))) = lanes.pop() {
        assert!(lane >= last_lane, "a more urgent lane was served late");
        last_lane = lane;
        if let Some(previous) = last_of.insert((lane, producer), i) {
            assert!(previous < i, "FIFO broken within a lane");
        }
        count += 1;
    }
    assert_eq!(count, PRODUCERS * PER_PRODUCER);
}

#[test]
fn doorbell_never_loses_a_wakeup() {
    const WORKERS: usize = 3;
    const ITEMS: usize = 30_000;
    let lanes = Arc::new(PriorityLanes::<usize>::new());
    let (doorbell, parkers) = Doorbell::new(WORKERS);
    let doorbell = Arc::new(doorbell);
    let processed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = parkers
        .into_iter()
        .enumerate()
        .map(|(index, parker)| {
            let (lanes, doorbell, processed, stop) = (
                lanes.clone(),
                doorbell.clone(),
                processed.clone(),
                stop.clone(),
            );
            thread::spawn(move || loop {
                if lanes.pop().is_some() {
                    processed.fetch_add(1, Ordering::AcqRel);
                    continue;
                }
                if stop.load(Ordering::Acquire) {
                    return;
                }
                doorbell.idle(index, &parker, || {
                    !lanes.is_empty() || stop.load(Ordering::Acquire)
                });
            })
        })
        .collect();
    // Bursts with pauses, so workers really go to sleep between them.
    for burst in 0..300 {
        for i in 0..ITEMS / 300 {
            lanes.push((i % 3) as u8, burst * 1000 + i);
            doorbell.wake(1);
        }
        if burst % 50 == 0 {
            thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    // Every item is processed without any further push or wake.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while processed.load(Ordering::Acquire) < ITEMS {
        assert!(
            std::time::Instant::now() < deadline,
            "work left unprocessed: a lost wakeup"
        );
        thread::sleep(std::time::Duration::from_millis(1));
    }
    stop.store(true, Ordering::Release);
    doorbell.wake_all();
    for worker in workers {
        worker.join().unwrap();
    }
    assert_eq!(processed.load(Ordering::Acquire), ITEMS);
}
