//! Waiting for the GPU. Native wgpu needs `poll` to drive callbacks; on the web `poll` does nothing
//! and the browser fires them, so one async path serves both hosts.

use super::{Gpu, GpuError};
use futures_channel::oneshot;

/// Resolves when everything submitted so far has finished.
pub(super) async fn wait(gpu: &Gpu) -> Result<(), GpuError> {
    let (sender, receiver) = oneshot::channel();
    gpu.queue.on_submitted_work_done(move || {
        let _ = sender.send(());
    });
    poll(gpu, None)?;
    receiver.await.map_err(|_| lost(gpu))?;
    gpu.check()
}

/// Maps and reads `staging` once `submission` (or, without one, all submitted work) is done.
pub(super) async fn read_mapped(gpu: &Gpu, staging: &wgpu::Buffer, bytes: u64, submission: Option<wgpu::SubmissionIndex>) -> Result<Vec<u8>, GpuError> {
    let slice = staging.slice(..);
    let (sender, receiver) = oneshot::channel();
    slice.map_async(wgpu::MapMode::Read, move |result| {
        let _ = sender.send(result);
    });
    poll(gpu, submission)?;
    receiver
        .await
        .map_err(|_| lost(gpu))?
        .map_err(|e| gpu.check().err().unwrap_or(GpuError::Readback(e.to_string())))?;
    gpu.check()?;
    let data = slice.get_mapped_range().map_err(|e| GpuError::Readback(e.to_string()))?[..bytes as usize].to_vec();
    staging.unmap();
    Ok(data)
}

fn poll(gpu: &Gpu, submission: Option<wgpu::SubmissionIndex>) -> Result<(), GpuError> {
    gpu.device.poll(wgpu::PollType::Wait { submission_index: submission, timeout: None }).map_err(|e| gpu.check().err().unwrap_or(GpuError::DeviceLost(e.to_string())))?;
    Ok(())
}

fn lost(gpu: &Gpu) -> GpuError {
    gpu.check().err().unwrap_or_else(|| GpuError::DeviceLost("a GPU callback was dropped".into()))
}
