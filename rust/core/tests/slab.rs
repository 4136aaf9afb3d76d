//! Property tests of the slab allocator against a model, plus its bad inputs.

use std::collections::{BTreeMap, HashMap, HashSet};

use moeflow_core::error::BudgetLimit;
use moeflow_core::{BlockHandle, CoreError, SlabAllocator};
use proptest::prelude::*;

const ALIGN: u64 = 4096;
const SLAB: u64 = 64 * 1024;
const ARENA: u64 = 16 * SLAB;

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    Free(usize),
    Pin(usize),
    Unpin(usize),
    UseStale(usize),
    UseForeign,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize).prop_map(Op::Alloc),
        3 => any::<usize>().prop_map(Op::Free),
        1 => any::<usize>().prop_map(Op::Pin),
        1 => any::<usize>().prop_map(Op::Unpin),
        1 => any::<usize>().prop_map(Op::UseStale),
        1 => Just(Op::UseForeign),
    ]
}

/// What the allocator should contain.
#[derive(Default)]
struct Model {
    live: Vec<(BlockHandle, u32)>,
    dead: Vec<BlockHandle>,
    allocs: u64,
    frees: u64,
    high_water: u64,
}

impl Model {
    fn used(&self) -> u64 {
        self.live.iter().map(|(h, _)| h.size).sum()
    }
}

fn check_invariants(slab: &SlabAllocator, model: &Model, budget: u64, class_sizes: &[u64]) {
    let stats = slab.stats();
    let used = model.used();
    assert_eq!(stats.used, used);
    assert_eq!(stats.available, budget - used);
    assert_eq!(stats.high_water, model.high_water);
    assert_eq!(stats.live_blocks, model.live.len() as u64);
    assert_eq!(
        stats.pinned_blocks,
        model.live.iter().filter(|(_, p)| *p > 0).count() as u64
    );
    assert_eq!((stats.allocs, stats.frees), (model.allocs, model.frees));
    // No two live blocks overlap; each lies inside one slab of the arena.
    let mut ranges: BTreeMap<u64, u64> = BTreeMap::new();
    for (h, _) in &model.live {
        assert!(h.offset + h.size <= ARENA);
        assert_eq!(
            h.offset / SLAB,
            (h.offset + h.size - 1) / SLAB,
            "block straddles slabs"
        );
        assert_eq!(h.offset % ALIGN, 0);
        ranges.insert(h.offset, h.offset + h.size);
    }
    assert_eq!(
        ranges.len(),
        model.live.len(),
        "two live blocks share an offset"
    );
    let mut last_end = 0;
    for (start, end) in ranges {
        assert!(start >= last_end, "live blocks overlap");
        last_end = end;
    }
    // Bonwick: a slab serves one class while it has live blocks, else it is free.
    let mut slabs_of: HashMap<u32, HashSet<u64>> = HashMap::new();
    for (h, _) in &model.live {
        slabs_of
            .entry(h.size_class)
            .or_default()
            .insert(h.offset / SLAB);
    }
    let mut busy = 0;
    for (class, c) in stats.classes.iter().enumerate() {
        assert_eq!(c.block_size, class_sizes[class]);
        let live = model
            .live
            .iter()
            .filter(|(h, _)| h.size_class == class as u32)
            .count() as u64;
        assert_eq!(c.live, live);
        let slabs = slabs_of.get(&(class as u32)).map_or(0, HashSet::len) as u32;
        assert_eq!(c.slabs, slabs);
        busy += slabs;
    }
    assert_eq!(stats.slabs_free, stats.slabs_total - busy);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn allocator_matches_model(ops in prop::collection::vec(op(), 1..300), budget_slabs in 4u64..16) {
        let budget = budget_slabs * SLAB - ALIGN;
        let mut slab = SlabAllocator::new(ARENA, budget, Some(SLAB), ALIGN).unwrap();
        let mut other = SlabAllocator::new(ARENA, budget, Some(SLAB), ALIGN).unwrap();
        let sizes = [1u64, 5000, 16 * 1024, SLAB];
        let classes: Vec<u32> = sizes.iter().map(|&s| slab.add_class(s).unwrap()).collect();
        let class_sizes: Vec<u64> = classes.iter().map(|&c| slab.block_size(c).unwrap()).collect();
        assert_eq!(class_sizes, vec![4096, 8192, 16 * 1024, SLAB]);
        let other_class = other.add_class(4096).unwrap();
        let foreign = other.alloc(other_class).unwrap();
        let mut model = Model::default();
        let mut generations = HashSet::new();

        for op in ops {
            match op {
                Op::Alloc(c) => match slab.alloc(classes[c]) {
                    Ok(h) => {
                        prop_assert!(generations.insert(h.generation), "generation reused");
                        prop_assert_eq!(h.size, class_sizes[c]);
                        model.live.push((h, 0));
                        model.allocs += 1;
                        model.high_water = model.high_water.max(model.used());
                    }
                    Err(CoreError::OutOfBudget { requested, available, limit }) => {
                        prop_assert_eq!(requested, class_sizes[c]);
                        match limit {
                            BudgetLimit::Budget => {
                                prop_assert_eq!(available, budget - model.used());
                                prop_assert!(model.used() + requested > budget);
                            }
                            BudgetLimit::ArenaExhausted => prop_assert_eq!(slab.stats().slabs_free, 0),
                        }
                    }
                    Err(other) => prop_assert!(false, "unexpected {other:?}"),
                },
                Op::Free(i) if !model.live.is_empty() => {
                    let i = i % model.live.len();
                    let (h, pins) = model.live[i];
                    let result = slab.free(&h);
                    if pins > 0 {
                        let blocked = matches!(result, Err(CoreError::BlockPinned { .. }));
                        prop_assert!(blocked);
                    } else {
                        prop_assert!(result.is_ok());
                        model.live.swap_remove(i);
                        model.dead.push(h);
                        model.frees += 1;
                    }
                }
                Op::Pin(i) if !model.live.is_empty() => {
                    let i = i % model.live.len();
                    let count = slab.pin(&model.live[i].0).unwrap();
                    model.live[i].1 += 1;
                    prop_assert_eq!(count, model.live[i].1);
                }
                Op::Unpin(i) if !model.live.is_empty() => {
                    let i = i % model.live.len();
                    let result = slab.unpin(&model.live[i].0);
                    if model.live[i].1 == 0 {
                        let refused = matches!(result, Err(CoreError::InvalidArgument(_)));
                        prop_assert!(refused);
                    } else {
                        model.live[i].1 -= 1;
                        prop_assert_eq!(result.unwrap(), model.live[i].1);
                    }
                }
                Op::UseStale(i) if !model.dead.is_empty() => {
                    let h = model.dead[i % model.dead.len()];
                    let is_stale = |r: Result<(), CoreError>| matches!(r, Err(CoreError::StaleHandle { .. }));
                    prop_assert!(is_stale(slab.free(&h)), "double free not rejected");
                    prop_assert!(is_stale(slab.pin(&h).map(drop)));
                    prop_assert!(is_stale(slab.unpin(&h).map(drop)));
                    prop_assert!(!slab.is_live(&h));
                }
                Op::UseForeign => {
                    let is_foreign = |r: Result<(), CoreError>| matches!(r, Err(CoreError::ForeignHandle { .. }));
                    prop_assert!(is_foreign(slab.free(&foreign)));
                    prop_assert!(is_foreign(slab.pin(&foreign).map(drop)));
                    prop_assert!(!slab.is_live(&foreign));
                }
                _ => {}
            }
            check_invariants(&slab, &model, budget, &class_sizes);
        }
        // Unpin and free everything: the allocator returns to empty.
        for (h, pins) in std::mem::take(&mut model.live) {
            for _ in 0..pins {
                slab.unpin(&h).unwrap();
            }
            slab.free(&h).unwrap();
        }
        let stats = slab.stats();
        prop_assert_eq!((stats.used, stats.live_blocks, stats.pinned_blocks), (0, 0, 0));
        prop_assert_eq!(stats.slabs_free, stats.slabs_total);
    }
}

#[test]
fn zero_budget_is_refused() {
    let err = SlabAllocator::new(ARENA, 0, None, ALIGN).unwrap_err();
    assert!(
        matches!(err, CoreError::InvalidArgument(ref m) if m.contains("budget")),
        "{err}"
    );
}

#[test]
fn budget_larger_than_arena_is_refused() {
    let err = SlabAllocator::new(ARENA, ARENA + 1, None, ALIGN).unwrap_err();
    assert!(err.to_string().contains(&ARENA.to_string()), "{err}");
}

#[test]
fn bad_alignment_and_slab_size_are_refused() {
    assert!(SlabAllocator::new(ARENA, ARENA, None, 3000).is_err());
    assert!(SlabAllocator::new(ARENA, ARENA, Some(ALIGN + 1), ALIGN).is_err());
    assert!(SlabAllocator::new(ARENA, ARENA, Some(2 * ARENA), ALIGN).is_err());
}

#[test]
fn block_larger_than_slab_is_refused() {
    let mut slab = SlabAllocator::new(ARENA, ARENA, Some(SLAB), ALIGN).unwrap();
    let err = slab.add_class(SLAB + 1).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&(SLAB + 1).to_string()) && text.contains(&SLAB.to_string()),
        "{text}"
    );
}

#[test]
fn same_rounded_size_shares_a_class() {
    let mut slab = SlabAllocator::new(ARENA, ARENA, Some(SLAB), ALIGN).unwrap();
    assert_eq!(slab.add_class(100).unwrap(), slab.add_class(4096).unwrap());
    assert_ne!(slab.add_class(4096).unwrap(), slab.add_class(4097).unwrap());
}

#[test]
fn double_free_is_stale_and_reuse_never_aliases() {
    let mut slab = SlabAllocator::new(ARENA, ARENA, Some(SLAB), ALIGN).unwrap();
    let class = slab.add_class(ALIGN).unwrap();
    let first = slab.alloc(class).unwrap();
    slab.free(&first).unwrap();
    assert!(matches!(
        slab.free(&first),
        Err(CoreError::StaleHandle { .. })
    ));
    let second = slab.alloc(class).unwrap();
    assert_eq!(second.offset, first.offset, "the freed block is reused");
    assert!(matches!(
        slab.free(&first),
        Err(CoreError::StaleHandle { .. })
    ));
    assert!(slab.is_live(&second));
}

#[test]
fn empty_slab_moves_to_another_class() {
    let mut slab = SlabAllocator::new(2 * SLAB, 2 * SLAB, Some(SLAB), ALIGN).unwrap();
    let small = slab.add_class(ALIGN).unwrap();
    let half = slab.add_class(SLAB / 2).unwrap();
    let whole = slab.add_class(SLAB).unwrap();
    let a = slab.alloc(small).unwrap();
    let b = slab.alloc(half).unwrap();
    // The budget has room, but both slabs serve other classes.
    let refused = slab.alloc(whole).unwrap_err();
    assert!(matches!(
        refused,
        CoreError::OutOfBudget {
            limit: BudgetLimit::ArenaExhausted,
            ..
        }
    ));
    slab.free(&a).unwrap();
    let c = slab.alloc(whole).unwrap();
    assert_eq!(
        c.offset, a.offset,
        "the emptied slab now serves the other class"
    );
    assert_ne!(b.offset / SLAB, c.offset / SLAB);
}
