//! Which device to compute on, and how many CPU threads.
//!
//! candle sizes its CPU thread pool from the physical core count and ignores
//! cgroup limits; a job sets the count explicitly (and records it), because
//! CPU results are bit-identical only for the same thread count.

use candle_core::Device;

use crate::error::{EngineError, Result};

/// "cpu" or "cuda:N" (the latter needs the `cuda` feature and a GPU).
pub fn select(spec: &str) -> Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = spec.strip_prefix("cuda:") {
        let n: usize = n
            .parse()
            .map_err(|_| EngineError::Input(format!("bad device {spec:?}: expected cuda:N")))?;
        return cuda(n);
    }
    Err(EngineError::Input(format!(
        "unknown device {spec:?}: expected \"cpu\" or \"cuda:N\""
    )))
}

/// The device a bench runs on: `HERD_BENCH_DEVICE` (`cpu`, the default, or
/// `cuda:N`), as scripts/gpu-check.sh sets it.
pub fn bench_device() -> Device {
    let spec = std::env::var("HERD_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    select(&spec).unwrap_or_else(|e| panic!("HERD_BENCH_DEVICE={spec}: {e}"))
}

#[cfg(feature = "cuda")]
fn cuda(n: usize) -> Result<Device> {
    Ok(Device::new_cuda(n)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_n: usize) -> Result<Device> {
    Err(EngineError::Input(
        "this build has no CUDA support (build with --features cuda)".into(),
    ))
}

/// CUDA devices visible to this build (empty without the `cuda` feature).
pub fn cuda_devices() -> Vec<String> {
    #[cfg(feature = "cuda")]
    {
        (0..16)
            .take_while(|n| Device::new_cuda(*n).is_ok())
            .map(|n| format!("cuda:{n}"))
            .collect()
    }
    #[cfg(not(feature = "cuda"))]
    {
        vec![]
    }
}

/// Fix the CPU thread count for this process. Call before any tensor work.
pub fn set_cpu_threads(n: usize) {
    let n = n.max(1).to_string();
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", &n);
}

/// The thread count candle will use.
pub fn cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Keep freed memory for reuse instead of returning it to the OS: a training
/// step allocates and frees the same large buffers over and over, and fresh
/// pages cost a page fault each (measured: ~20% of an SFT step on 2 cores).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before
    // any other thread allocates heavily, and invalid values are rejected.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The NVIDIA driver's version line (it names the CUDA driver), where one is
/// loaded; part of a GPU job's fingerprint.
pub fn cuda_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    text.lines()
        .next()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Start this process's peak resident set (VmHWM) over from the current
/// one (Linux: `clear_refs` 5), so a bench can report the peak of one phase.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's peak resident set (VmHWM) in MiB, for benches; 0 where
/// /proc is not there.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}
