//! Host arenas: sizes the machine cannot back are typed errors; mappings are aligned.

use moeflow_core::arena::page_size;
use moeflow_core::{CoreError, HostArena};

#[test]
fn zero_size_is_an_arena_error() {
    let err = HostArena::new(0, true, true).unwrap_err();
    assert!(
        matches!(err, CoreError::Arena { requested: 0, .. }),
        "{err}"
    );
}

#[test]
fn a_pebibyte_is_refused_with_the_numbers() {
    let pib = 1u64 << 50;
    let err = HostArena::new(pib, true, true).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, CoreError::Arena { requested, .. } if requested == pib),
        "{text}"
    );
    assert!(
        text.contains(&pib.to_string()) && text.contains("RAM"),
        "{text}"
    );
}

#[test]
fn sizes_near_the_address_space_limit_are_refused() {
    for size in [u64::MAX, u64::MAX - 1, 1 << 63] {
        assert!(matches!(
            HostArena::new(size, false, false),
            Err(CoreError::Arena { .. })
        ));
    }
}

#[test]
fn sizes_round_up_to_pages_and_huge_arenas_align_to_huge_pages() {
    let small = HostArena::new(1, false, false).unwrap();
    assert_eq!(small.size(), page_size());
    assert_eq!(small.address() % page_size() as u64, 0);
    let big = HostArena::new(6 << 20, true, false).unwrap();
    assert_eq!(big.address() % (2 << 20), 0);
    assert!(big.locked() || big.lock_error().is_some());
    assert!(!big.cuda_registered());
    // SAFETY: (test) the whole mapping is ours and nothing else uses it.
    let bytes = unsafe { std::slice::from_raw_parts_mut(big.as_ptr(), big.size()) };
    assert!(
        bytes.iter().all(|&b| b == 0),
        "anonymous memory starts zeroed"
    );
    bytes.fill(0xa5);
    assert_eq!(bytes[big.size() - 1], 0xa5);
}
