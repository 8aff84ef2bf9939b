//! Memory accounting for /metrics and the KV-cache budget: exact bytes of our own tensors,
//! and what the device holds in use (CUDA's used memory, or the process's resident set on
//! the CPU) for peaks that no tensor count can see, such as an update's autograd graph.

use candle_core::{DType, Device};

use super::ModelConfig;

/// Bytes one cached position takes across all layers (keys and values).
pub fn kv_bytes_per_token(config: &ModelConfig, dtype: DType) -> usize {
    2 * config.num_hidden_layers
        * config.num_key_value_heads
        * config.head_dim
        * dtype.size_in_bytes()
}

/// `cpu` or `cuda:N`, as the command line spells devices.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Bytes in use on `device` now; `None` where it cannot be read.
pub fn in_use(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => resident_set_bytes(),
        _ => gpu_memory(device).map(|(free, total)| total - free),
    }
}

/// Free bytes on a GPU; `None` on the CPU, where the KV cache has no budget by default.
pub fn free_on_gpu(device: &Device) -> Option<u64> {
    gpu_memory(device).map(|(free, _)| free)
}

/// (free, total) bytes of a CUDA device.
fn gpu_memory(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64)),
        _ => None,
    }
}

/// `VmRSS` from /proc/self/statm (Linux).
fn resident_set_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The highest resident memory of this process so far (`VmHWM`, Linux).
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The highest reading of [`in_use`] over a stretch of work, above where it started.
pub struct PeakMemory<'a> {
    device: &'a Device,
    baseline: Option<u64>,
    peak: Option<u64>,
}

impl<'a> PeakMemory<'a> {
    pub fn start(device: &'a Device) -> Self {
        let baseline = in_use(device);
        Self {
            device,
            baseline,
            peak: baseline,
        }
    }

    pub fn sample(&mut self) {
        if let Some(now) = in_use(self.device) {
            self.peak = Some(self.peak.map_or(now, |p| p.max(now)));
        }
    }

    /// Bytes above the starting point at the highest sample.
    pub fn above_start(&self) -> Option<u64> {
        Some(self.peak?.saturating_sub(self.baseline?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_sees_an_allocation_that_is_freed_again() {
        let mut peak = PeakMemory::start(&Device::Cpu);
        let big = vec![1u8; 64 << 20];
        peak.sample();
        drop(std::hint::black_box(big));
        peak.sample();
        assert!(peak.above_start().unwrap() >= 32 << 20);
    }
}
