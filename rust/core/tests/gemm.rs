//! The bf16 product against its plain reference, bit for bit, over shapes that cross every tile
//! edge (4-row and 3/12-column tiles, 8-wide k steps, 128 KiB panels, threads), and row
//! invariance: a row's outputs are the same bits alone or in any batch. MXFP4 weights give the
//! bits of the bf16 product over their dequantized values.

use moeflow_core::gemm::{self, bf16_to_f32, f32_to_bf16, GemmError, Output};
use proptest::prelude::*;

/// Deterministic values in about [-2, 2) with varied exponents.
fn values(seed: u64, count: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            (unit * 4.0 - 2.0) * if state & 0x100 != 0 { 0.01 } else { 1.0 }
        })
        .collect()
}

fn bf16s(seed: u64, count: usize) -> Vec<u16> {
    values(seed, count).into_iter().map(f32_to_bf16).collect()
}

fn run_f32(x: &[f32], m: usize, k: usize, w: &[u16], n: usize, bias: Option<&[f32]>, threads: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; m * n];
    gemm::linear(x, m, k, w, n, bias, Output::F32(&mut y), threads).unwrap();
    y
}

fn check_shape(m: usize, k: usize, n: usize, threads: usize, with_bias: bool) {
    let x = values(1 + (m * 31 + k) as u64, m * k);
    let w = bf16s(7 + (n * 17 + k) as u64, n * k);
    let b = values(99, n);
    let bias = with_bias.then_some(&b[..]);
    let want = gemm::reference(&x, m, k, n, bias, |r, c| bf16_to_f32(w[r * k + c]));
    let got = run_f32(&x, m, k, &w, n, bias, threads);
    for (i, (g, r)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), r.to_bits(), "m={m} k={k} n={n} threads={threads} output {i}: {g} != {r}");
    }
    let mut y16 = vec![0u16; m * n];
    gemm::linear(&x, m, k, &w, n, bias, Output::Bf16(&mut y16), threads).unwrap();
    for (i, (g, r)) in y16.iter().zip(&want).enumerate() {
        assert_eq!(*g, f32_to_bf16(*r), "bf16 output {i} of m={m} k={k} n={n}");
    }
}

#[test]
fn matches_the_reference_across_tile_edges() {
    if !gemm::available() {
        return; // the kernel refuses such CPUs (tested below)
    }
    for m in [1, 2, 3, 4, 5, 7, 8, 9] {
        for k in [1, 7, 8, 9, 16, 63, 200] {
            for n in [1, 2, 3, 4, 11, 12, 13, 25, 40] {
                check_shape(m, k, n, 1, (m + n) % 2 == 0);
            }
        }
    }
}

#[test]
fn panels_and_threads_give_the_same_bits() {
    if !gemm::available() {
        return;
    }
    // k = 1000: 65 columns a panel (rounded up to 72), so n = 300 spans 5 panels, the last partial
    for threads in [1, 2, 3, 8] {
        check_shape(6, 1000, 300, threads, true);
    }
    // a panel wider than n, and more threads than panels
    check_shape(3, 64, 50, 4, false);
}

#[test]
fn a_row_gives_the_same_bits_alone_or_in_any_batch() {
    if !gemm::available() {
        return;
    }
    let (m, k, n) = (13, 520, 37);
    let x = values(5, m * k);
    let w = bf16s(6, n * k);
    let all = run_f32(&x, m, k, &w, n, None, 2);
    for r in 0..m {
        let alone = run_f32(&x[r * k..(r + 1) * k], 1, k, &w, n, None, 1);
        assert_eq!(alone, all[r * n..(r + 1) * n], "row {r}");
    }
    // every prefix batch too (tile tails of 1-3 rows)
    for rows in 1..m {
        let part = run_f32(&x[..rows * k], rows, k, &w, n, None, 1);
        assert_eq!(part, all[..rows * n], "first {rows} rows");
    }
}

#[test]
fn wrong_lengths_are_refused_and_nothing_is_written() {
    if !gemm::available() {
        return;
    }
    let x = vec![1.0f32; 6];
    let w = vec![0x3f80u16; 6]; // 1.0
    let mut y = vec![-1.0f32; 4];
    let err = gemm::linear(&x, 2, 3, &w[..5], 2, None, Output::F32(&mut y), 1).unwrap_err();
    assert_eq!(err, GemmError::Size { what: "w", got: 5, need: 6 });
    let err = gemm::linear(&x, 2, 3, &w, 2, Some(&[0.0]), Output::F32(&mut y), 1).unwrap_err();
    assert_eq!(err, GemmError::Size { what: "bias", got: 1, need: 2 });
    let err = gemm::linear(&x, 2, 3, &w, 2, None, Output::F32(&mut y[..3]), 1).unwrap_err();
    assert_eq!(err, GemmError::Size { what: "y", got: 3, need: 4 });
    assert!(y.iter().all(|&v| v == -1.0));
    gemm::linear(&x, 2, 3, &w, 2, None, Output::F32(&mut y), 1).unwrap();
    assert_eq!(y, vec![3.0; 4]);
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(f32_to_bf16(1.0), 0x3f80);
    assert_eq!(bf16_to_f32(0x3f80), 1.0);
    // halfway between 1.0 (0x3f80) and the next bf16 (0x3f81): ties go to the even 0x3f80
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
    assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    assert_eq!(f32_to_bf16(f32::MAX), 0x7f80); // rounds up to infinity, as torch's cast does
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn any_shape_matches_the_reference(m in 1usize..11, k in 1usize..90, n in 1usize..30, threads in 1usize..4) {
        if gemm::available() {
            check_shape(m, k, n, threads, n % 3 == 0);
        }
    }
}

/// Random MXFP4 blocks and scales of [n, k]; scales around 2^0 (bytes 117-136) plus the
/// subnormal byte 0 in every seventh block.
fn mxfp4(seed: u64, n: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    let codes = values(seed, n * k / 2);
    let blocks = codes.iter().map(|v| (v.to_bits() >> 7) as u8).collect();
    let scales = (0..n * k / 32)
        .map(|i| if i % 7 == 3 { 0 } else { 117 + (i * 13 % 20) as u8 })
        .collect();
    (blocks, scales)
}

fn check_mxfp4(m: usize, k: usize, n: usize, threads: usize, with_bias: bool) {
    let x = values(11 + (m * 7 + k) as u64, m * k);
    let (blocks, scales) = mxfp4(3 + n as u64, n, k);
    let b = values(5, n);
    let bias = with_bias.then_some(&b[..]);
    let value = |r: usize, c: usize| gemm::mxfp4_value(&blocks, &scales, k, r, c);
    let want = gemm::reference(&x, m, k, n, bias, value);
    let mut got = vec![f32::NAN; m * n];
    gemm::mxfp4_linear(&x, m, k, &blocks, &scales, n, bias, Output::F32(&mut got), threads).unwrap();
    for (i, (g, r)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), r.to_bits(), "mxfp4 m={m} k={k} n={n} threads={threads} output {i}");
    }
    // the same bits as the bf16 product over the dequantized matrix (every value fits bf16 exactly)
    let dense: Vec<u16> = (0..n * k).map(|i| f32_to_bf16(value(i / k, i % k))).collect();
    assert!((0..n * k).all(|i| bf16_to_f32(dense[i]) == value(i / k, i % k)));
    let mut as_bf16 = vec![f32::NAN; m * n];
    gemm::linear(&x, m, k, &dense, n, bias, Output::F32(&mut as_bf16), 1).unwrap();
    assert_eq!(got, as_bf16);
}

#[test]
fn mxfp4_matches_the_reference_and_the_dequantized_product() {
    if !gemm::available() {
        return;
    }
    for (m, k, n) in [(1, 32, 1), (2, 64, 13), (4, 96, 12), (5, 320, 25), (9, 2048, 40)] {
        check_mxfp4(m, k, n, 1, n % 2 == 1);
    }
    check_mxfp4(6, 2880, 200, 3, true); // GPT-OSS's hidden size: several panels and threads
}

#[test]
fn mxfp4_values_follow_the_format() {
    // byte 0x71: low nibble 1 (+0.5), high nibble 7 (+6.0); 0xf8: -0.0 and -6.0
    let blocks = [0x71u8, 0xf8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(gemm::mxfp4_value(&blocks, &[127], 32, 0, 0), 0.5);
    assert_eq!(gemm::mxfp4_value(&blocks, &[127], 32, 0, 1), 6.0);
    assert_eq!(gemm::mxfp4_value(&blocks, &[128], 32, 0, 3), -12.0);
    assert_eq!(gemm::mxfp4_value(&blocks, &[0], 32, 0, 0), 0.5 * 2f32.powi(-127));
    assert_eq!(gemm::e8m0(255), f32::INFINITY);
    assert!(gemm::mxfp4_value(&blocks, &[255], 32, 0, 2).is_nan()); // 0 x 2^128, as torch.ldexp
}

#[test]
fn mxfp4_refuses_a_partial_block_and_short_buffers() {
    if !gemm::available() {
        return;
    }
    let x = vec![0f32; 40];
    let mut y = vec![0f32; 1];
    let err = gemm::mxfp4_linear(&x, 1, 40, &[0; 20], &[0; 1], 1, None, Output::F32(&mut y), 1).unwrap_err();
    assert_eq!(err, GemmError::Block { k: 40 });
    let err = gemm::mxfp4_linear(&x[..32], 1, 32, &[0; 15], &[0; 1], 1, None, Output::F32(&mut y), 1).unwrap_err();
    assert_eq!(err, GemmError::Size { what: "blocks", got: 15, need: 16 });
}

/// Random min-max codes (all byte patterns) with float16 scales and zeros like store/quant.py's.
fn minmax(seed: u64, n: usize, k: usize, bits: u32, group: usize) -> (Vec<u8>, Vec<u16>, Vec<u16>) {
    let q = values(seed, n * k * bits as usize / 8).iter().map(|v| (v.to_bits() >> 5) as u8).collect();
    let groups = n * k / group;
    let f16 = |v: f32| -> u16 {
        // v in [2^-14, 2^15): the half whose value is v truncated to 10 mantissa bits
        let b = v.to_bits();
        ((((b >> 23) & 0xff) - 112) << 10 | ((b >> 13) & 0x3ff)) as u16
    };
    let scale = values(seed + 1, groups).iter().map(|v| f16(v.abs() * 0.01 + 1e-3)).collect();
    let zero = values(seed + 2, groups).iter().map(|v| f16(v.abs() * 4.0 + 0.25)).collect();
    (q, scale, zero)
}

fn check_minmax(m: usize, k: usize, n: usize, bits: u32, group: usize, bf16: bool, threads: usize) {
    let x = values(21 + (m + k + n) as u64, m * k);
    let (q, scale, zero) = minmax(bits as u64 * 100 + group as u64, n, k, bits, group);
    let b = values(8, n);
    let bias = (n % 2 == 0).then_some(&b[..]);
    let value = |r: usize, c: usize| gemm::minmax_value(&q, &scale, &zero, k, bits, group, bf16, r, c);
    let want = gemm::reference(&x, m, k, n, bias, value);
    let mut got = vec![f32::NAN; m * n];
    gemm::minmax_linear(&x, m, k, &q, &scale, &zero, bits, group, bf16, n, bias, Output::F32(&mut got), threads)
        .unwrap();
    for (i, (g, r)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), r.to_bits(), "int{bits} g{group} bf16={bf16} m={m} k={k} n={n} output {i}");
    }
}

#[test]
fn minmax_matches_the_reference() {
    if !gemm::available() {
        return;
    }
    for bits in [2, 4, 8] {
        for bf16 in [false, true] {
            for (m, k, n, group) in [(1, 8, 1, 8), (2, 64, 13, 32), (5, 128, 12, 64), (4, 256, 25, 128)] {
                check_minmax(m, k, n, bits, group, bf16, 1);
            }
            check_minmax(7, 2048, 150, bits, 64, bf16, 3);
        }
    }
}

#[test]
fn minmax_values_and_refusals() {
    assert_eq!(gemm::f16_to_f32(0x3c00), 1.0);
    assert_eq!(gemm::f16_to_f32(0xc000), -2.0);
    assert_eq!(gemm::f16_to_f32(0x0001), 2f32.powi(-24)); // smallest subnormal
    assert_eq!(gemm::f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
    assert_eq!(gemm::f16_to_f32(0x7bff), 65504.0);
    assert_eq!(gemm::f16_to_f32(0x7c00), f32::INFINITY);
    // int4: byte 0x5a holds code 10 (column 0) and 5 (column 1); w = (q - 2) * 0.5
    let (scale, zero) = ([0x3800u16], [0x4000u16]);
    assert_eq!(gemm::minmax_value(&[0x5a, 0, 0, 0], &scale, &zero, 8, 4, 8, false, 0, 0), 4.0);
    assert_eq!(gemm::minmax_value(&[0x5a, 0, 0, 0], &scale, &zero, 8, 4, 8, false, 0, 1), 1.5);
    // int2: byte 0b11_10_01_00 holds codes 0, 1, 2, 3
    assert_eq!(gemm::minmax_value(&[0xe4, 0], &scale, &zero, 8, 2, 8, false, 0, 3), 0.5);
    if !gemm::available() {
        return;
    }
    let x = [0f32; 24];
    let mut y = vec![0f32; 1];
    for (bits, group, k) in [(3, 8, 24), (4, 12, 24), (4, 16, 24), (4, 0, 24)] {
        let err = gemm::minmax_linear(&x[..k], 1, k, &[0; 12], &[0; 3], &[0; 3], bits, group, true, 1, None,
                                      Output::F32(&mut y), 1)
            .unwrap_err();
        assert_eq!(err, GemmError::MinMax { bits, group, k });
    }
}
