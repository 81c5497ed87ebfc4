// A sum over the workgroup through workgroup memory: a tree of log2(SUM_WG) barriers, SUM_WG (a
// power of two) being the workgroup size the including module declares. Call it from uniform
// control flow.

var<workgroup> workgroup_sums: array<f32, SUM_WG>;

// The total of every thread's `value`, returned to every thread.
fn workgroup_sum(lid: u32, value: f32) -> f32 {
    workgroup_sums[lid] = value;
    workgroupBarrier();
    for (var stride = SUM_WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            workgroup_sums[lid] += workgroup_sums[lid + stride];
        }
        workgroupBarrier();
    }
    let total = workgroup_sums[0];
    workgroupBarrier();
    return total;
}
