//! Criterion benches of the priority lanes: uncontended push+pop, and a producer and
//! a consumer racing on separate threads.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use criterion::{criterion_group, criterion_main, Criterion};
use moeflow_core::queue::PriorityLanes;

fn push_pop(c: &mut Criterion) {
    let lanes = PriorityLanes::<u64>::new();
    c.bench_function("push_pop_single_thread", |b| {
        b.iter(|| {
            lanes.push(black_box(1), black_box(7));
            black_box(lanes.pop());
        })
    });
    c.bench_function("pop_skips_two_empty_lanes", |b| {
        b.iter(|| {
            lanes.push(2, 7);
            black_box(lanes.pop());
        })
    });
}

fn contended(c: &mut Criterion) {
    let lanes = Arc::new(PriorityLanes::<u64>::new());
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (lanes, stop) = (lanes.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if lanes.pop().is_none() {
                    std::hint::spin_loop();
                }
            }
        })
    };
    c.bench_function("push_with_concurrent_consumer", |b| {
        b.iter(|| lanes.push(black_box(0), black_box(1)))
    });
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
}

criterion_group!(benches, push_pop, contended);
criterion_main!(benches);
