//! Helpers shared by the integration tests: arenas, engines and real temp files.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moeflow_core::{
    Arena, ArenaAllocator, BlockHandle, Completion, CopyRequest, DirectMode, HostArena,
    ReadRequest, TransferEngine,
};

/// A host allocator over an unlocked arena of `arena` bytes with one size class.
pub fn host_allocator(arena: u64, slab: u64, block: u64) -> (Arc<ArenaAllocator>, u32) {
    let arena = Arena::Host(Arc::new(HostArena::new(arena, false, false).unwrap()));
    let budget = arena.size() as u64;
    let allocator = ArenaAllocator::new(arena, budget, Some(slab), 4096).unwrap();
    let class = allocator.lock().add_class(block).unwrap();
    (Arc::new(allocator), class)
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A file on a real filesystem (tmpfs refuses O_DIRECT), removed on drop.
pub struct TempFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

pub fn temp_file(len: usize, seed: u64) -> TempFile {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("data.bin");
    let bytes = pattern(len, seed);
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&bytes).unwrap();
    file.sync_all().unwrap();
    TempFile {
        _dir: dir,
        path,
        bytes,
    }
}

/// Waits for the final completion of `id`, collecting everything else seen.
pub fn wait_for(engine: &TransferEngine, id: u64, others: &mut Vec<Completion>) -> Completion {
    loop {
        let done = engine
            .wait(Some(Duration::from_secs(20)))
            .expect("no completion within 20 s");
        if done.id == id && done.is_final() {
            return done;
        }
        others.push(done);
    }
}

/// Waits for one final completion.
pub fn next_final(engine: &TransferEngine) -> Completion {
    loop {
        let done = engine
            .wait(Some(Duration::from_secs(20)))
            .expect("no completion within 20 s");
        if done.is_final() {
            return done;
        }
    }
}

/// Bytes of a block as a slice.
pub fn block_bytes(allocator: &ArenaAllocator, handle: &BlockHandle) -> Vec<u8> {
    let address = allocator.address(handle).unwrap();
    // SAFETY: (test) the block is live, in a host arena, and no transfer writes it now.
    unsafe { std::slice::from_raw_parts(address as *const u8, handle.size as usize) }.to_vec()
}

/// A read request with the defaults tests start from (auto O_DIRECT, owned).
pub fn read(
    file_id: u64,
    file_offset: u64,
    length: u64,
    dst: &Arc<ArenaAllocator>,
    handle: BlockHandle,
) -> ReadRequest {
    ReadRequest {
        file_id,
        file_offset,
        length,
        dst: dst.clone(),
        dst_handle: handle,
        dst_offset: 0,
        priority: 1,
        direct: DirectMode::Auto,
        expect_crc32: None,
        owned: true,
        tag: 0,
    }
}

/// A host copy request between two blocks of one allocator (not owned).
pub fn copy(src: &Arc<ArenaAllocator>, a: BlockHandle, b: BlockHandle, length: u64) -> CopyRequest {
    CopyRequest {
        src: src.clone(),
        src_handle: a,
        dst: src.clone(),
        dst_handle: b,
        length,
        src_offset: 0,
        dst_offset: 0,
        priority: 1,
        owned: false,
        tag: 0,
        after: None,
    }
}

/// An allocator over a simulated device arena of `arena` bytes with one size class.
pub fn sim_allocator(
    sim: &Arc<moeflow_core::SimDevice>,
    arena: u64,
    slab: u64,
    block: u64,
) -> (Arc<ArenaAllocator>, u32) {
    let device = moeflow_core::DeviceArena::new_sim(arena, 0, sim.clone()).unwrap();
    let arena = Arena::Device(Arc::new(device));
    let budget = arena.size() as u64;
    let allocator = ArenaAllocator::new(arena, budget, Some(slab), 4096).unwrap();
    let class = allocator.lock().add_class(block).unwrap();
    (Arc::new(allocator), class)
}

/// Fills the first `bytes.len()` bytes of a block in host memory.
pub fn fill(allocator: &ArenaAllocator, handle: &BlockHandle, bytes: &[u8]) {
    let address = allocator.address(handle).unwrap();
    assert!(bytes.len() as u64 <= handle.size);
    // SAFETY: (test) the block is live, in host memory, and no transfer touches it now.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), address as *mut u8, bytes.len()) };
}
