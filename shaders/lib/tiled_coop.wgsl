// Prompt prefill on tensor cores: matmul.wgsl's tiled product with the multiply-adds of its k loop
// on cooperative matrices with f16 operands and f32 sums, where the device has them (natively; no
// browser exposes them yet). Fragments are COOP_SIDE square (16 on NVIDIA's Vulkan driver, 8 on
// lavapipe's); `coop_a`, `coop_b` and `coop_c` come from Rust. A workgroup of 128 threads computes
// COOP_TILE tokens x COOP_TILE rows from the same staged inputs and decoded weights as `tiled`
// (lib/tiles.wgsl), in subgroups of COOP_SUBGROUP threads, each holding COOP_FRAGMENTS x
// COOP_FRAGMENTS accumulators (crate::gpu::kernels::CoopTile: tiles of 64 in 2 x 2 fragments, or
// of 128 in 4 x 4, which decode each weight for twice the tokens and stage half the bytes per
// multiply-add, but make a quarter of the workgroups). Each k step stages COOP_K columns of the
// tile's inputs and weights as f16 in workgroup memory, one row after another; a thread reads the
// next step's into registers while the current one is multiplied.
// The sums leave a fragment at a time through workgroup memory into the fused output stage
// (`store`), which takes each slot with its rotation partner. As with f16 tiles, inputs and decoded
// weights are rounded to f16 (11 significant bits) and products are summed in f32.

// COOP_SIDE, COOP_SUBGROUP (the subgroup size the host runs this entry point with; it checks
// the adapter's is fixed at it), COOP_TILE and COOP_FRAGMENTS come from Rust.
const COOP_THREADS: u32 = 128u;
const COOP_FRAGMENT: u32 = COOP_SIDE * COOP_SIDE;
// Subgroups along each side of the tile.
const COOP_GRID: u32 = COOP_TILE / (COOP_FRAGMENTS * COOP_SIDE);
const_assert COOP_GRID * COOP_GRID * COOP_SUBGROUP == COOP_THREADS;
const COOP_K: u32 = 32u;
// f16 elements between staged rows: 80 bytes, a multiple of the 16 that matrix loads want, and
// off the 128-byte period of workgroup memory's banks, so a fragment's rows fall in different banks.
const COOP_STRIDE: u32 = COOP_K + 8u;
// Each thread stages 4 elements of COOP_STAGED token rows and as many weight rows per k step,
// COOP_K / 4 threads per row.
const COOP_STAGED: u32 = COOP_TILE * COOP_K / 4u / COOP_THREADS;
const COOP_ROW_THREADS: u32 = COOP_K / 4u;
const COOP_STAGED_STRIDE: u32 = COOP_THREADS / COOP_ROW_THREADS; // rows between a thread's staged rows
var<workgroup> coop_x: array<f16, COOP_TILE * COOP_STRIDE>;  // (COOP_TILE tokens, COOP_K)
var<workgroup> coop_w: array<f16, COOP_TILE * COOP_STRIDE>;  // (COOP_TILE slots, COOP_K)
// Per subgroup one fragment of sums (tokens x slots) on its way out; before the k loop, the
// RMSNorm partial sums of squares.
var<workgroup> coop_out: array<f32, COOP_GRID * COOP_GRID * COOP_FRAGMENT>;
const_assert COOP_TILE * COOP_ROW_THREADS <= COOP_GRID * COOP_GRID * COOP_FRAGMENT;

// The builtins a tiled_coop thread reads.
struct CoopThread {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) index: u32,
    @builtin(subgroup_id) subgroup: u32,
    @builtin(subgroup_invocation_id) lane: u32,
}

// A k step's staged inputs and weights, as thread `index` holds them: rows index / COOP_ROW_THREADS
// + COOP_STAGED_STRIDE p, columns 4 (index % COOP_ROW_THREADS)..+3 of the step; f16, half the
// registers of f32.
struct CoopStage {
    x: array<vec4<f16>, COOP_STAGED>,
    w: array<vec4<f16>, COOP_STAGED>,
}

fn coop_stage(t0: u32, row0: u32, index: u32, k0: u32, scales: array<f32, COOP_STAGED>) -> CoopStage {
    var stage: CoopStage;
    let r = index / COOP_ROW_THREADS;
    let c = k0 + 4u * (index % COOP_ROW_THREADS);
    for (var p = 0u; p < COOP_STAGED; p++) {
        stage.x[p] = vec4<f16>(staged_input(t0 + r + COOP_STAGED_STRIDE * p, c, scales[p]));
        stage.w[p] = vec4<f16>(staged_weight(row0 + r + COOP_STAGED_STRIDE * p, c));
    }
    return stage;
}

// The sums of fragment (token block, row block) of subgroup `subgroup` stored through `store`.
fn coop_store_fragment(thread: CoopThread, sums: coop_c, t: u32, slot: u32) {
    let at = thread.subgroup * COOP_FRAGMENT;
    coopStoreT(sums, &coop_out[at], COOP_SIDE);
    workgroupBarrier();
    for (var e = thread.lane; e < COOP_FRAGMENT; e += COOP_SUBGROUP) {
        if (t + e / COOP_SIDE < step.n_tokens && slot + e % COOP_SIDE < params.rows) {
            store(t + e / COOP_SIDE, slot + e % COOP_SIDE, coop_out[at + e], coop_out[at + (e ^ 1u)]);
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(COOP_THREADS)
fn tiled_coop(thread: CoopThread) {
    let row0 = thread.wg.x * COOP_TILE;
    let t0 = thread.wg.y * COOP_TILE;
    let r = thread.index / COOP_ROW_THREADS;
    // This subgroup's COOP_FRAGMENTS COOP_SIDE tokens and rows of the tile.
    let tokens = (thread.subgroup / COOP_GRID) * COOP_FRAGMENTS * COOP_SIDE;
    let slots = (thread.subgroup % COOP_GRID) * COOP_FRAGMENTS * COOP_SIDE;
    // RMSNorm: as in `tiled`, the inputs are staged scaled by their row's 1 / rms.
    var scales: array<f32, COOP_STAGED>;
    for (var p = 0u; p < COOP_STAGED; p++) {
        scales[p] = 1.0;
    }
    if (INPUT == INPUT_RMSNORM) {
        let lane = thread.index % COOP_ROW_THREADS;
        for (var p = 0u; p < COOP_STAGED; p++) {
            let row = r + COOP_STAGED_STRIDE * p;
            coop_out[row * COOP_ROW_THREADS + lane] = squares_share(t0 + row, lane, COOP_ROW_THREADS);
        }
        workgroupBarrier();
        for (var p = 0u; p < COOP_STAGED; p++) {
            let first = (r + COOP_STAGED_STRIDE * p) * COOP_ROW_THREADS;
            var squares = 0.0;
            for (var i = 0u; i < COOP_ROW_THREADS; i++) {
                squares += coop_out[first + i];
            }
            scales[p] = row_scale(squares);
        }
        workgroupBarrier();
    }
    // acc[COOP_FRAGMENTS i + j]: tokens + COOP_SIDE i.., slots + COOP_SIDE j..
    var acc: array<coop_c, COOP_FRAGMENTS * COOP_FRAGMENTS>;
    for (var f = 0u; f < COOP_FRAGMENTS * COOP_FRAGMENTS; f++) {
        acc[f] = coop_c();
    }
    var stage = coop_stage(t0, row0, thread.index, 0u, scales);
    let c = 4u * (thread.index % COOP_ROW_THREADS);
    for (var k0 = 0u; k0 < params.k; k0 += COOP_K) {
        for (var p = 0u; p < COOP_STAGED; p++) {
            let at = (r + COOP_STAGED_STRIDE * p) * COOP_STRIDE + c;
            for (var i = 0u; i < 4u; i++) {
                coop_x[at + i] = stage.x[p][i];
                coop_w[at + i] = stage.w[p][i];
            }
        }
        workgroupBarrier();
        if (k0 + COOP_K < params.k) {
            stage = coop_stage(t0, row0, thread.index, k0 + COOP_K, scales);
        }
        for (var kk = 0u; kk < COOP_K; kk += COOP_SIDE) {
            // A: tokens x k, row-major; B: k x slots, each slot's k contiguous (column-major).
            // Every A fragment, then one B fragment at a time: fewer registers live beside the
            // accumulators.
            var a: array<coop_a, COOP_FRAGMENTS>;
            for (var i = 0u; i < COOP_FRAGMENTS; i++) {
                a[i] = coopLoadT<coop_a>(&coop_x[(tokens + i * COOP_SIDE) * COOP_STRIDE + kk], COOP_STRIDE);
            }
            for (var j = 0u; j < COOP_FRAGMENTS; j++) {
                let b = coopLoad<coop_b>(&coop_w[(slots + j * COOP_SIDE) * COOP_STRIDE + kk], COOP_STRIDE);
                for (var i = 0u; i < COOP_FRAGMENTS; i++) {
                    acc[COOP_FRAGMENTS * i + j] = coopMultiplyAdd(a[i], b, acc[COOP_FRAGMENTS * i + j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < COOP_FRAGMENTS; i++) {
        for (var j = 0u; j < COOP_FRAGMENTS; j++) {
            coop_store_fragment(thread, acc[COOP_FRAGMENTS * i + j], t0 + tokens + i * COOP_SIDE, row0 + slots + j * COOP_SIDE);
        }
    }
}
