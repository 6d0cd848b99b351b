//! `config.toml`: the schema, its defaults, validation, and the flag / `--set` overrides.
//!
//! Order of precedence: built-in defaults < the file < `--set section.key=value` < dedicated flags.
//! Every error names the key and where it came from (the file, with line and column, or `--set`).
//!
//! - `mod.rs`: `Settings::load` (read, override, validate, resolve paths), the `Settings` helpers, re-exports.
//! - `schema.rs`: `Config` and its sections (`[paths]`, `[dataset]`, ... `[timeline]`) with their defaults.
//! - `values.rs`: the keys' value types (`Format`, `Sample`, `OptimizerKind`, `Cache`, `EvalSplit`, ...) and serde.
//! - `overrides.rs`: `--set section.key=value` and the dedicated flags (`FlagOverrides`).
//! - `validate.rs`: `Config::validate`, the range checks, one function per section.
mod overrides;
mod schema;
mod validate;
mod values;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use crate::precision::{ChannelsLast, Precision};
pub use crate::switch::Switch;

pub use crate::models::Arch;

pub use overrides::FlagOverrides;
pub use schema::{AugmentCfg, Config, DatasetCfg, EvaluateCfg, ImageCfg, ModelCfg, Paths, TimelineCfg, TrainCfg};
pub use values::{
    Cache, DeviceKind, EvalSplit, Exchange, Format, ImagePlacement, LrScaling, LrSchedule, OnBadImage, OnNonFinite,
    OptimizerKind, Overlap, ResizeMode, Sample, Sampler,
};

use overrides::parse_with_sets;

/// A loaded, overridden, validated config with every path made absolute.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    /// The file it came from.
    pub file: PathBuf,
    /// The keys this command line's `--set`s name (`train.precision`): what the user asked of
    /// this run in particular.
    pub set_keys: Vec<String>,
}

impl Settings {
    /// Reads `file`, applies `--set` overrides and flag overrides, validates, resolves paths.
    pub fn load(file: &Path, sets: &[String], flags: &FlagOverrides) -> Result<Settings> {
        let text = std::fs::read_to_string(file).with_context(|| {
            format!("cannot read config file {} (pass --config PATH to use another)", file.display())
        })?;
        let mut config = parse_with_sets(&text, sets).with_context(|| {
            if sets.is_empty() {
                format!("in config file {}", file.display())
            } else {
                format!("in config file {} with the --set overrides", file.display())
            }
        })?;
        flags.apply(&mut config);
        config.validate().with_context(|| format!("in config file {}", file.display()))?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let base = std::path::absolute(&base).with_context(|| format!("resolving {}", base.display()))?;
        config.resolve_paths(&base);
        let set_keys = sets.iter().filter_map(|s| s.split_once('=')).map(|(k, _)| k.trim().to_owned()).collect();
        Ok(Settings { config, file: file.to_path_buf(), set_keys })
    }

    /// Whether this command line sets `key` with `--set`.
    pub fn sets(&self, key: &str) -> bool {
        self.set_keys.iter().any(|k| k == key)
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.paths.data_dir
    }

    /// `<checkpoint_dir>/<model>/`.
    pub fn model_dir(&self) -> PathBuf {
        self.config.paths.checkpoint_dir.join(self.config.model.name.name())
    }

    /// The checkpoint `evaluate` reads.
    pub fn eval_checkpoint(&self) -> PathBuf {
        if self.config.evaluate.checkpoint.as_os_str().is_empty() {
            self.model_dir().join(if self.config.evaluate.ema {
                crate::checkpoint::EMA_FILE
            } else {
                crate::checkpoint::MODEL_FILE
            })
        } else {
            self.config.evaluate.checkpoint.clone()
        }
    }

    pub fn pretrained(&self) -> Option<&Path> {
        let p = &self.config.model.pretrained;
        (!p.as_os_str().is_empty()).then_some(p.as_path())
    }
}

impl Config {
    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.paths.data_dir);
        abs(&mut self.paths.checkpoint_dir);
        abs(&mut self.paths.output_dir);
        abs(&mut self.paths.log_file);
        abs(&mut self.dataset.source);
        abs(&mut self.dataset.predict_source);
        abs(&mut self.model.pretrained);
        abs(&mut self.evaluate.checkpoint);
        abs(&mut self.timeline.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_config_parses_and_validates() {
        let text = include_str!("../../config.toml");
        let c = parse_with_sets(text, &[]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.model.name, Arch::Resnet18);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let mut c = Config::default();
        c.resolve_paths(Path::new("/proj"));
        assert_eq!(c.paths.data_dir, Path::new("/proj/data"));
        assert_eq!(c.dataset.source, Path::new("/usr/share/datasets/fashion-mnist"));
        assert!(c.model.pretrained.as_os_str().is_empty());
    }
}
