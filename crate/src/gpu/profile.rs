//! Per-dispatch GPU times from timestamp queries, for `bench --profile`. Each dispatch runs in a
//! compute pass of its own with timestamps at its start and end, so only the TIMESTAMP_QUERY
//! feature is needed (not timestamps inside passes).

use super::ops::{Dispatch, Traffic};
use super::{Gpu, GpuError};

/// What one dispatch of a profiled pass took.
#[derive(Clone, Debug)]
pub struct DispatchTime {
    pub name: &'static str,
    pub seconds: f64,
    /// Bytes it reads and writes (see [`Traffic`]).
    pub bytes: u64,
}

/// Timestamps around up to `capacity` dispatches of one pass.
pub struct Timestamps {
    query_set: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    recorded: Vec<(&'static str, Traffic)>,
    capacity: usize,
}

impl Timestamps {
    pub fn new(gpu: &Gpu, capacity: usize) -> Result<Self, GpuError> {
        if !gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Err(GpuError::NoTimestamps(gpu.info.name.clone()));
        }
        let count = 2 * capacity as u32;
        let query_set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("profile"), ty: wgpu::QueryType::Timestamp, count });
        let bytes = 8 * count as u64;
        let resolved = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = gpu.readback_buffer("profile readback", bytes);
        Ok(Self { query_set, resolved, readback, recorded: vec![], capacity })
    }

    /// Encodes `dispatch` for `n_tokens` in a pass of its own between two timestamps.
    pub fn encode(&mut self, encoder: &mut wgpu::CommandEncoder, name: &'static str, dispatch: &Dispatch, n_tokens: u32) -> Result<(), GpuError> {
        let i = self.recorded.len() as u32;
        if self.recorded.len() == self.capacity {
            return Err(GpuError::Validation(format!("the profile holds {} dispatches; the pass has more", self.capacity)));
        }
        let timestamp_writes = wgpu::ComputePassTimestampWrites {
            query_set: &self.query_set,
            beginning_of_pass_write_index: Some(2 * i),
            end_of_pass_write_index: Some(2 * i + 1),
        };
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(name), timestamp_writes: Some(timestamp_writes) });
        dispatch.encode(&mut pass, n_tokens);
        self.recorded.push((name, dispatch.traffic()));
        Ok(())
    }

    /// Copies the timestamps written so far to the host-readable buffer; encode it last.
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        let count = 2 * self.recorded.len() as u32;
        encoder.resolve_query_set(&self.query_set, 0..count, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.readback, 0, 8 * count as u64);
    }

    /// Waits for the pass and returns each dispatch's time, with its bytes for a token at
    /// `position`; empties the record for the next pass.
    pub async fn read(&mut self, gpu: &Gpu, position: usize) -> Result<Vec<DispatchTime>, GpuError> {
        let words = 2 * self.recorded.len() as u64;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&gpu.read_mapped(&self.readback, 8 * words).await?);
        let period = gpu.queue.get_timestamp_period() as f64 * 1e-9;
        let times = self
            .recorded
            .drain(..)
            .zip(ticks.chunks(2))
            .map(|((name, traffic), t)| DispatchTime { name, seconds: t[1].saturating_sub(t[0]) as f64 * period, bytes: traffic.at(position) })
            .collect();
        Ok(times)
    }
}
