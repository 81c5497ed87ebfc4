// The GEMVs' reduction over their workgroup, of every token at once, through workgroup memory: a
// tree of log2(GEMV_WG) = 6 barriers. For adapters without subgroups (and every browser);
// gemv_reduction_subgroup.wgsl is the same interface with subgroup operations.

struct Thread {
    @builtin(local_invocation_index) index: u32,
}

var<workgroup> thread_sums: array<vec4<f32>, GEMV_WG * GEMV_COLUMNS>;   // (thread, token)
var<workgroup> thread_squares: array<f32, GEMV_WG * GEMV_COLUMNS>;

// Adds up every thread's `sums` and `squares` of each token; column_totals then reads them.
fn reduce_columns(thread: Thread, sums: array<vec4<f32>, MAX_GEMV_COLUMNS>, squares: array<f32, MAX_GEMV_COLUMNS>) {
    for (var c = 0u; c < GEMV_COLUMNS; c++) {
        thread_sums[thread.index * GEMV_COLUMNS + c] = sums[c];
        thread_squares[thread.index * GEMV_COLUMNS + c] = squares[c];
    }
    workgroupBarrier();
    for (var stride = GEMV_WG / 2u; stride > 0u; stride /= 2u) {
        if (thread.index < stride) {
            for (var c = 0u; c < GEMV_COLUMNS; c++) {
                let i = thread.index * GEMV_COLUMNS + c;
                thread_sums[i] += thread_sums[i + stride * GEMV_COLUMNS];
                thread_squares[i] += thread_squares[i + stride * GEMV_COLUMNS];
            }
        }
        workgroupBarrier();
    }
}

fn column_totals(thread: Thread, c: u32) -> Totals {
    return Totals(thread_sums[c], thread_squares[c]);
}
