//! The transfer engine reading files: byte-exact ranges, O_DIRECT where aligned,
//! short files, injected I/O errors and checksums.

mod common;

use common::{block_bytes, host_allocator, read, temp_file, wait_for};
use moeflow_core::{CoreError, DirectMode, ReadRequest, Status, TransferEngine};

const MIB: u64 = 1 << 20;

#[test]
fn reads_are_byte_exact_with_direct_io_where_aligned() {
    let file = temp_file((3 * MIB + 123) as usize, 1);
    let engine = TransferEngine::new(3, 256 * 1024, None).unwrap();
    let (alloc, class) = host_allocator(8 * MIB, 4 * MIB, 2 * MIB);
    let fid = engine.register_file(file.path.to_str().unwrap()).unwrap();
    let direct_ok = engine.file_supports_direct(fid).unwrap();
    assert!(direct_ok, "ext4 under target/ supports O_DIRECT");
    let len = file.bytes.len() as u64;
    // (file offset, length, destination offset, expect O_DIRECT)
    let cases = [
        (0, MIB, 0, true),            // aligned, several parts
        (4096, MIB + 100, 0, true),   // aligned body, unaligned tail
        (1, 5000, 0, false),          // unaligned start: buffered
        (8192, 3 * 4096, 4096, true), // aligned destination offset
        (8192, 4096, 100, false),     // unaligned destination address
        (len - 5000, 5000, 0, false), // unaligned tail of the file
        (3 * MIB, 123, 0, false),     // aligned start, shorter than a page
        (2 * MIB - 4096, 4096 + 123, 0, true),
    ];
    for (i, &(offset, length, dst_offset, direct)) in cases.iter().enumerate() {
        let handle = alloc.lock().alloc(class).unwrap();
        let id = engine
            .submit_read(ReadRequest {
                dst_offset,
                tag: i as i64,
                ..read(fid, offset, length, &alloc, handle)
            })
            .unwrap();
        let done = wait_for(&engine, id, &mut Vec::new());
        assert_eq!(done.status, Status::Done, "case {i}: {:?}", done.error);
        assert_eq!((done.bytes, done.tag), (length, i as i64));
        assert_eq!(done.direct, direct, "case {i}");
        let got = block_bytes(&alloc, &handle);
        let want = &file.bytes[offset as usize..(offset + length) as usize];
        assert!(
            got[dst_offset as usize..(dst_offset + length) as usize] == *want,
            "case {i} bytes differ"
        );
        alloc.lock().free(&handle).unwrap();
    }
    assert!(engine.stats().direct_bytes > 0);
    assert_eq!(alloc.stats().pinned_blocks, 0);
}

#[test]
fn never_mode_reads_buffered_and_require_rejects_unaligned_requests() {
    let file = temp_file((MIB + 10) as usize, 2);
    let engine = TransferEngine::new(2, MIB, None).unwrap();
    let (alloc, class) = host_allocator(4 * MIB, 4 * MIB, 2 * MIB);
    let fid = engine.register_file(file.path.to_str().unwrap()).unwrap();
    let handle = alloc.lock().alloc(class).unwrap();
    let never = ReadRequest {
        direct: DirectMode::Never,
        ..read(fid, 0, MIB, &alloc, handle)
    };
    let done = wait_for(&engine, engine.submit_read(never).unwrap(), &mut Vec::new());
    assert_eq!((done.status, done.direct), (Status::Done, false));

    for (offset, length, dst_offset) in [(1, 4096, 0), (0, 4097, 0), (0, 4096, 8)] {
        let request = ReadRequest {
            direct: DirectMode::Require,
            dst_offset,
            ..read(fid, offset, length, &alloc, handle)
        };
        let err = engine.submit_read(request).unwrap_err();
        assert!(matches!(err, CoreError::Alignment(_)), "{err}");
    }
    let aligned = ReadRequest {
        direct: DirectMode::Require,
        ..read(fid, 4096, 8192, &alloc, handle)
    };
    let done = wait_for(
        &engine,
        engine.submit_read(aligned).unwrap(),
        &mut Vec::new(),
    );
    assert_eq!((done.status, done.direct), (Status::Done, true));
    assert!(alloc.lock().is_live(&handle));
    assert_eq!(
        alloc.stats().pinned_blocks,
        0,
        "refused submissions leave no pin"
    );
}

#[test]
fn a_file_shorter_than_the_range_is_a_short_read() {
    let file = temp_file(10_000, 3);
    let engine = TransferEngine::new(2, 4096, None).unwrap();
    let (alloc, class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let path = file.path.to_str().unwrap();
    let fid = engine.register_file(path).unwrap();
    let owned = alloc.lock().alloc(class).unwrap();
    let done = wait_for(
        &engine,
        engine
            .submit_read(read(fid, 4096, 20_000, &alloc, owned))
            .unwrap(),
        &mut Vec::new(),
    );
    assert_eq!(done.status, Status::Failed);
    let expected = CoreError::ShortRead {
        path: path.to_owned(),
        offset: 4096,
        length: 20_000,
        got: 10_000 - 4096,
    };
    assert_eq!(done.error, Some(expected));
    assert!(
        !alloc.lock().is_live(&owned),
        "an owned block is freed on failure"
    );

    let kept = alloc.lock().alloc(class).unwrap();
    let request = ReadRequest {
        owned: false,
        ..read(fid, 20_000, 10, &alloc, kept)
    };
    let done = wait_for(
        &engine,
        engine.submit_read(request).unwrap(),
        &mut Vec::new(),
    );
    assert!(matches!(
        done.error,
        Some(CoreError::ShortRead { got: 0, .. })
    ));
    assert!(
        alloc.lock().is_live(&kept),
        "a block not owned survives the failure"
    );
    assert_eq!(alloc.stats().pinned_blocks, 0);
}

#[test]
fn an_injected_io_error_surfaces_with_its_errno_and_frees_the_block() {
    let file = temp_file(MIB as usize, 4);
    let engine = TransferEngine::new(2, MIB, None).unwrap();
    let (alloc, class) = host_allocator(4 * MIB, 4 * MIB, MIB);
    let path = file.path.to_str().unwrap();
    let fid = engine.register_file(path).unwrap();
    engine.inject_fault(fid, libc::EIO, 1).unwrap();
    let handle = alloc.lock().alloc(class).unwrap();
    let done = wait_for(
        &engine,
        engine
            .submit_read(read(fid, 0, MIB, &alloc, handle))
            .unwrap(),
        &mut Vec::new(),
    );
    assert_eq!(done.status, Status::Failed);
    match done.error {
        Some(CoreError::Transfer {
            op,
            path: Some(p),
            errno: Some(errno),
            offset: Some(0),
            length: Some(l),
            ..
        }) => {
            assert_eq!((op, p.as_str(), errno, l), ("read", path, libc::EIO, MIB));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!alloc.lock().is_live(&handle));
    assert_eq!(alloc.stats().live_blocks, 0);
    // The fault was for one read only.
    let handle = alloc.lock().alloc(class).unwrap();
    let done = wait_for(
        &engine,
        engine
            .submit_read(read(fid, 0, MIB, &alloc, handle))
            .unwrap(),
        &mut Vec::new(),
    );
    assert_eq!(done.status, Status::Done);
    assert_eq!(engine.stats().failed, 1);
}

#[test]
fn crc_is_checked_across_parts() {
    let file = temp_file((2 * MIB) as usize, 5);
    let engine = TransferEngine::new(2, 64 * 1024, None).unwrap();
    let (alloc, class) = host_allocator(8 * MIB, 8 * MIB, 2 * MIB);
    let fid = engine.register_file(file.path.to_str().unwrap()).unwrap();
    let right = crc32fast::hash(&file.bytes[100..100 + 1_500_000]);
    let handle = alloc.lock().alloc(class).unwrap();
    let ok = ReadRequest {
        expect_crc32: Some(right),
        ..read(fid, 100, 1_500_000, &alloc, handle)
    };
    let done = wait_for(&engine, engine.submit_read(ok).unwrap(), &mut Vec::new());
    assert_eq!(done.status, Status::Done, "{:?}", done.error);
    let bad = ReadRequest {
        expect_crc32: Some(right ^ 1),
        ..read(fid, 100, 1_500_000, &alloc, handle)
    };
    let done = wait_for(&engine, engine.submit_read(bad).unwrap(), &mut Vec::new());
    assert!(matches!(
        done.error,
        Some(CoreError::ChecksumMismatch { expected, actual, .. }) if expected == right ^ 1 && actual == right
    ));
    assert!(!alloc.lock().is_live(&handle));
}
