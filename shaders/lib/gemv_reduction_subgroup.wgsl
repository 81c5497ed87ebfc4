// The GEMVs' reduction over their workgroup with subgroup operations: adds within each subgroup
// (subgroupAdd) and joins the subgroups with one barrier. A file of its own rather than a switch:
// a module for an adapter without subgroups must not name their builtins at all. Its directives
// (`enable subgroups;`, `requires subgroup_id;`) come first in the browser's module only
// (Kernel::source_for): naga 30 rejects them as not yet implemented (gfx-rs/wgpu#5555).

struct Thread {
    @builtin(local_invocation_index) index: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) subgroup: u32,
    @builtin(num_subgroups) subgroups: u32,
}

// One slot per subgroup and token: GEMV_WG / 4 subgroups covers the smallest subgroups an
// adapter may have (4).
var<workgroup> subgroup_sums: array<vec4<f32>, GEMV_WG / 4u * GEMV_COLUMNS>;   // (subgroup, token)
var<workgroup> subgroup_squares: array<f32, GEMV_WG / 4u * GEMV_COLUMNS>;

fn reduce_columns(thread: Thread, sums: array<vec4<f32>, MAX_GEMV_COLUMNS>, squares: array<f32, MAX_GEMV_COLUMNS>) {
    for (var c = 0u; c < GEMV_COLUMNS; c++) {
        let sums_of_subgroup = subgroupAdd(sums[c]);
        let squares_of_subgroup = subgroupAdd(squares[c]);
        if (thread.lane == 0u) {
            subgroup_sums[thread.subgroup * GEMV_COLUMNS + c] = sums_of_subgroup;
            subgroup_squares[thread.subgroup * GEMV_COLUMNS + c] = squares_of_subgroup;
        }
    }
    workgroupBarrier();
}

fn column_totals(thread: Thread, c: u32) -> Totals {
    var totals = Totals(vec4(0.0, 0.0, 0.0, 0.0), 0.0);
    for (var i = 0u; i < thread.subgroups; i++) {
        totals.sums += subgroup_sums[i * GEMV_COLUMNS + c];
        totals.squares += subgroup_squares[i * GEMV_COLUMNS + c];
    }
    return totals;
}
