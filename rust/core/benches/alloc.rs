//! Criterion benches of the slab allocator: one alloc+free pair, and a burst of
//! allocations freed in reverse (partial-slab list and slab pool traffic).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use moeflow_core::SlabAllocator;

const MIB: u64 = 1 << 20;

fn alloc_free(c: &mut Criterion) {
    let mut slab = SlabAllocator::new(1 << 30, 1 << 30, Some(64 * MIB), 4096).unwrap();
    let small = slab.add_class(64 * 1024).unwrap();
    let expert = slab.add_class(16 * MIB).unwrap();
    // Keep one block live so the pair below does not return its slab to the pool.
    let _keep = slab.alloc(small).unwrap();
    c.bench_function("alloc_free_pair_64k", |b| {
        b.iter(|| {
            let handle = slab.alloc(black_box(small)).unwrap();
            slab.free(black_box(&handle)).unwrap();
        })
    });
    c.bench_function("alloc_free_pair_slab_to_pool_16m", |b| {
        b.iter(|| {
            let handle = slab.alloc(black_box(expert)).unwrap();
            slab.free(black_box(&handle)).unwrap();
        })
    });
    c.bench_function("alloc_1000_then_free_1000_64k", |b| {
        let mut handles = Vec::with_capacity(1000);
        b.iter(|| {
            handles.extend((0..1000).map(|_| slab.alloc(small).unwrap()));
            while let Some(handle) = handles.pop() {
                slab.free(&handle).unwrap();
            }
        })
    });
}

criterion_group!(benches, alloc_free);
criterion_main!(benches);
