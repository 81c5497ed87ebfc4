// A pass's tokens (crate::gpu::ops::StepParams): where each sits, and the key splits of a decode
// pass's attention.
struct Step {
    n_tokens: u32,
    keys_per_split: u32, // keys each split attends to, the last one fewer
    key_splits: u32,     // splits of this pass (their keys cover every token's position); 1: attend writes out
    _pad: u32,
    // Per token: (position, KV row in the pool's pages, sequence slot, 0); a sequence's tokens come
    // in position order
    slots: array<vec4<u32>, MAX_BATCH_TOKENS>,
}
