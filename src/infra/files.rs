//! Files that no reader sees half-written: each output is written under a temporary name beside
//! its place and renamed over it, so a reader (or a crash) finds the old complete file or the new
//! complete one. One helper for every writer: checkpoints, reports, plots, timelines, metrics.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The temporary name beside `path`: `.<stem>.tmp-<pid>.<extension>`, hidden, one per process,
/// and with `path`'s extension kept (plotters picks the image format from it).
pub fn temp_beside(path: &Path) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!(".{stem}.tmp-{}{ext}", std::process::id()))
}

/// Makes `path` the file that `write` writes to the path it is given (a temporary file beside
/// `path`), by one rename once `write` succeeds; on any error the temporary file is removed and
/// `path` is left as it was. Creates the parent directory.
pub fn replace_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = temp_beside(path);
    let result = write(&tmp).and_then(|()| fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Writes `bytes` to `path` atomically (`replace_with`), fsynced before the rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_with(path, |tmp| {
        let mut f = fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_temporary_name_is_hidden_beside_the_file_and_keeps_its_extension() {
        let t = temp_beside(Path::new("out/confusion.png"));
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(t.parent(), Some(Path::new("out")));
        assert!(name.starts_with(".confusion.tmp-") && name.ends_with(".png"), "{name}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        write_atomic(&path, b"old").unwrap();
        let err = replace_with(&path, |tmp| {
            fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("metrics.json") && format!("{err:#}").contains("disk full"), "{err:#}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "only metrics.json is left");
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }
}
