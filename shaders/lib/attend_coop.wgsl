// Prefill attention on cooperative matrices (natively, where matmul.wgsl's tiled_coop runs):
// `attend_tiles`' query blocks (PREFILL_ROWS rows) and key tiles (PREFILL_KEYS keys), with a
// tile's scores Q K^T and weighted values P V as products of COOP_SIDE fragments, f16 operands and
// f32 sums. The online softmax stays on the threads: the scores go through workgroup memory to
// become f16 weights, and each tile's P V leaves its fragments for the threads' f32 accumulators,
// which rescale by their rows' new max before adding it (a fragment's rows cannot be scaled in
// place). Each of the (PREFILL_ROWS / COOP_SIDE) x (PREFILL_KEYS / COOP_SIDE) subgroups computes one
// fragment of the scores and HEAD_DIM / 64 of P V; heads of 64 or 128 dimensions (Llama 3's; the
// host sends others to attend_tiles). A thread owns row li / 8 of the block for the softmax and
// the outputs: the keys 8 (li % 8)..+7 of each tile, the dimension quads li % 8 + 8 m.

const AC_THREADS: u32 = 128u;
const AC_MAX_HEAD_DIM: u32 = 128u;
const AC_ROW_THREADS: u32 = AC_THREADS / PREFILL_ROWS;
const AC_KEYS_PER_THREAD: u32 = PREFILL_KEYS / AC_ROW_THREADS;
const AC_QUADS_PER_THREAD: u32 = AC_MAX_HEAD_DIM / 4u / AC_ROW_THREADS;
// f16 elements between staged rows of Q, K and V (and of weights): a multiple of 8 (the 16 bytes
// matrix loads want) that puts consecutive rows 4 banks apart.
const AC_STRIDE: u32 = AC_MAX_HEAD_DIM + 8u;
const AC_P_STRIDE: u32 = PREFILL_KEYS + 8u;
// Where the rows' partial maxima sit in ac_sums, after a tile's scores.
const AC_PARTIALS: u32 = PREFILL_ROWS * PREFILL_KEYS;
var<workgroup> ac_q: array<f16, PREFILL_ROWS * AC_STRIDE>;   // (rows, head_dim), scaled
var<workgroup> ac_kv: array<f16, PREFILL_KEYS * AC_STRIDE>;  // (keys, head_dim): K, then V
var<workgroup> ac_p: array<f16, PREFILL_ROWS * AC_P_STRIDE>; // (rows, keys) weights
// A tile's scores (rows, keys) and the threads' partial maxima after them; then its P V (rows,
// head_dim); at the end the threads' partial sums.
var<workgroup> ac_sums: array<f32, PREFILL_ROWS * AC_MAX_HEAD_DIM>;

// The builtins an attend_coop thread reads.
struct CoopAttendThread {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_id) subgroup: u32,
}

// Quads of a K or V tile a thread stages: li + AC_THREADS i of the tile's keys x head_dim.
const AC_STAGED_QUADS: u32 = PREFILL_KEYS * AC_MAX_HEAD_DIM / 4u / AC_THREADS;

// The pool rows of `run`'s keys whose quads thread li stages from key0 on: NOT_HERE past the run's
// end_key or past the tile. Found once a tile for both K and V.
fn ac_tile_rows(key0: u32, run: Run, li: u32) -> array<u32, AC_STAGED_QUADS> {
    var rows: array<u32, AC_STAGED_QUADS>;
    for (var i = 0u; i < AC_STAGED_QUADS; i++) {
        let key = (li + i * AC_THREADS) / (HEAD_DIM / 4u);
        rows[i] = NOT_HERE;
        if (key < PREFILL_KEYS && key0 + key < run.end_key) {
            rows[i] = buffer_row(key0 + key, run.pages);
        }
    }
    return rows;
}

// The tile of keys whose pool rows are `rows` into ac_kv as f16 (zeros where NOT_HERE): K or V.
fn ac_stage_keys(b: QueryBlock, rows: array<u32, AC_STAGED_QUADS>, li: u32, values: bool) {
    let hd = HEAD_DIM;
    let row_quads = hd / 4u;
    for (var i = 0u; i < AC_STAGED_QUADS; i++) {
        let n = li + i * AC_THREADS;
        let key = n / row_quads;
        if (key < PREFILL_KEYS) {
            var x = vec4(0.0, 0.0, 0.0, 0.0);
            let column = b.kv_head * hd + 4u * (n % row_quads);
            if (rows[i] != NOT_HERE && values) {
                x = value_quad(rows[i], column, params.n_kv_heads * hd);
            } else if (rows[i] != NOT_HERE) {
                x = key_quad(rows[i], column, params.n_kv_heads * hd);
            }
            let at = key * AC_STRIDE + 4u * (n % row_quads);
            for (var e = 0u; e < 4u; e++) {
                ac_kv[at + e] = f16(x[e]);
            }
        }
    }
}

@compute @workgroup_size(AC_THREADS)
fn attend_coop(thread: CoopAttendThread) {
    // Not an early return: cooperative-matrix operations must be in control flow naga can see is
    // uniform, which a return before them is not.
    let b = query_block(thread.wg, PREFILL_ROWS);
    if (!b.past_the_pass) {
        attend_coop_block(thread, b);
    }
}

fn attend_coop_block(thread: CoopAttendThread, b: QueryBlock) {
    let li = thread.li;
    let hd = HEAD_DIM;
    let row_quads = hd / 4u;
    let r = li / AC_ROW_THREADS;
    let part = li % AC_ROW_THREADS;
    // Q, scaled, rows past the pass's last repeating it (computed, not stored).
    for (var i = 0u; i < PREFILL_ROWS * AC_MAX_HEAD_DIM / 4u / AC_THREADS; i++) {
        let n = li + i * AC_THREADS;
        if (n < PREFILL_ROWS * row_quads) {
            let q_row = min(b.row0 + n / row_quads, b.n_rows - 1u);
            let head = b.kv_head * b.group + q_row % b.group;
            let at = (q_row / b.group) * params.q_stride + head * hd + 4u * (n % row_quads);
            for (var e = 0u; e < 4u; e++) {
                ac_q[(n / row_quads) * AC_STRIDE + 4u * (n % row_quads) + e] = f16(q[at + e] * params.scale);
            }
        }
    }
    // This subgroup's fragment of the scores.
    let score_rows = (thread.subgroup / (PREFILL_KEYS / COOP_SIDE)) * COOP_SIDE;
    let score_keys = (thread.subgroup % (PREFILL_KEYS / COOP_SIDE)) * COOP_SIDE;
    let subgroups = (PREFILL_ROWS / COOP_SIDE) * (PREFILL_KEYS / COOP_SIDE);
    let row = min(b.row0 + r, b.n_rows - 1u);
    let pos = step.slots[row / b.group].x;
    var acc: array<vec4<f32>, AC_QUADS_PER_THREAD>;
    var row_max = MASKED;
    var sum = 0.0;
    var run_first = b.row0;
    while (run_first <= b.last_row) {
        let run = run_at(b, run_first);
        let in_run = run_holds(run, b.row0 + r);
        for (var key0 = b.first_key; key0 < run.end_key; key0 += PREFILL_KEYS) {
            let key_rows = ac_tile_rows(key0, run, li);
            ac_stage_keys(b, key_rows, li, false);
            workgroupBarrier();
            var scores = coop_c();
            for (var d = 0u; d < hd; d += COOP_SIDE) {
                let a = coopLoadT<coop_a>(&ac_q[score_rows * AC_STRIDE + d], AC_STRIDE);
                let k = coopLoad<coop_b>(&ac_kv[score_keys * AC_STRIDE + d], AC_STRIDE);
                scores = coopMultiplyAdd(a, k, scores);
            }
            // The index in a let: naga 30's WGSL front end leaves a coopStore's argument expressions
            // out of the function's emitted ones, which its SPIR-V writer then cannot find.
            let scores_at = score_rows * PREFILL_KEYS + score_keys;
            coopStoreT(scores, &ac_sums[scores_at], PREFILL_KEYS);
            workgroupBarrier();
            // Masked: past the row's position or the run's keys, in another run, in another buffer.
            var s: array<f32, AC_KEYS_PER_THREAD>;
            var part_max = MASKED;
            for (var j = 0u; j < AC_KEYS_PER_THREAD; j++) {
                let key = key0 + part * AC_KEYS_PER_THREAD + j;
                // The pool is in one buffer (ops::attention): every key of the run is here.
                let valid = key < run.end_key && key <= pos && in_run;
                s[j] = select(MASKED, ac_sums[r * PREFILL_KEYS + part * AC_KEYS_PER_THREAD + j], valid);
                part_max = max(part_max, s[j]);
            }
            ac_sums[AC_PARTIALS + li] = part_max;
            ac_stage_keys(b, key_rows, li, true);
            workgroupBarrier();
            var new_max = row_max;
            for (var t = 0u; t < AC_ROW_THREADS; t++) {
                new_max = max(new_max, ac_sums[AC_PARTIALS + r * AC_ROW_THREADS + t]);
            }
            let rescale = exp(row_max - new_max);
            row_max = new_max;
            sum *= rescale;
            for (var j = 0u; j < AC_KEYS_PER_THREAD; j++) {
                let weight = select(0.0, exp(s[j] - new_max), s[j] > MASKED);
                sum += weight;
                ac_p[r * AC_P_STRIDE + part * AC_KEYS_PER_THREAD + j] = f16(weight);
            }
            workgroupBarrier();
            for (var f = thread.subgroup; f < (PREFILL_ROWS / COOP_SIDE) * (hd / COOP_SIDE); f += subgroups) {
                let rows = (f / (hd / COOP_SIDE)) * COOP_SIDE;
                let dims = (f % (hd / COOP_SIDE)) * COOP_SIDE;
                var weighted = coop_c();
                for (var k = 0u; k < PREFILL_KEYS; k += COOP_SIDE) {
                    let p = coopLoadT<coop_a>(&ac_p[rows * AC_P_STRIDE + k], AC_P_STRIDE);
                    let v = coopLoadT<coop_b>(&ac_kv[k * AC_STRIDE + dims], AC_STRIDE);
                    weighted = coopMultiplyAdd(p, v, weighted);
                }
                let weighted_at = rows * hd + dims;
                coopStoreT(weighted, &ac_sums[weighted_at], hd);
            }
            workgroupBarrier();
            for (var m = 0u; m < AC_QUADS_PER_THREAD; m++) {
                let d = 4u * (part + AC_ROW_THREADS * m);
                if (d < hd) {
                    let at = r * hd + d;
                    acc[m] = acc[m] * rescale + vec4(ac_sums[at], ac_sums[at + 1u], ac_sums[at + 2u], ac_sums[at + 3u]);
                }
            }
            workgroupBarrier();
        }
        run_first = run.last + 1u;
    }
    // The row's sum from its threads' parts.
    ac_sums[li] = sum;
    workgroupBarrier();
    var row_sum = 0.0;
    for (var t = 0u; t < AC_ROW_THREADS; t++) {
        row_sum += ac_sums[r * AC_ROW_THREADS + t];
    }
    // Out: the host runs this entry point only where a pass has one partial per row (one key split,
    // a pool in one buffer), since partials are atomics of device scope (crate::gpu::ops::attention).
    if (b.row0 + r > b.last_row) {
        return;
    }
    let token_head = token_head_of(b, b.row0 + r);
    for (var m = 0u; m < AC_QUADS_PER_THREAD; m++) {
        let d = 4u * (part + AC_ROW_THREADS * m);
        for (var e = 0u; e < 4u && d < hd; e++) {
            out[token_head * hd + d + e] = acc[m][e] / row_sum;
        }
    }
}
